"""Eager reference for EMSAv2's reduced-K/V softmax attention: the ground truth and the CPU path."""

from __future__ import annotations

import torch

from ..checks import FLOAT_DTYPES, scale_value


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str = "emsa_attention") -> None:
    """Raises TypeError/ValueError naming the problem unless q, k, v fit ``emsa_attention`` (``op``
    names the function in the messages)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, L, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: fp16, bf16, fp32, fp64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{op}: batch sizes differ: q has {q.shape[0]}, k/v have {k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: head counts differ: q has {q.shape[2]}, k/v have {k.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{op}: head dims differ: q has {q.shape[3]}, k/v have {k.shape[3]}")
    d = q.shape[3]
    if d % 8 != 0 or not 16 <= d <= 256:
        raise ValueError(f"{op}: head_dim must be a multiple of 8 from 16 to 256, got {d}")
    if q.shape[1] < 1 or k.shape[1] < 1:
        raise ValueError(f"{op}: need at least one query and one key, got N={q.shape[1]}, M={k.shape[1]}")


def check_attention_kv_inputs(q: torch.Tensor, kv: torch.Tensor, op: str = "emsa_attention_kv") -> None:
    """Raises TypeError/ValueError naming the problem unless q and kv fit ``emsa_attention_kv``."""
    if not isinstance(kv, torch.Tensor):
        raise TypeError(f"{op}: kv must be a torch.Tensor, got {type(kv).__name__}")
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(
            f"{op}: kv must be 5-D (B, M, 2, heads, head_dim), keys then values, got shape {tuple(kv.shape)}"
        )
    k, v = kv.unbind(2)
    check_attention_inputs(q, k, v, op)


def emsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` per head, in plain eager PyTorch.

    q: [B, N, H, D]; k, v: [B, M, H, D]; returns [B, N, H, D], contiguous.
    ``scale`` defaults to ``D ** -0.5``. Materialises the [B, H, N, M] scores, as the
    published code does (scores scaled after the matmul, as there).
    """
    check_attention_inputs(q, k, v)
    scale = scale_value("emsa_attention", scale, q.shape[-1])
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).contiguous()


def emsa_attention_kv(
    q: torch.Tensor, kv: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``emsa_attention`` on keys and values packed as the kv Linear writes them, in plain eager
    PyTorch: kv [B, M, 2, H, D] (``kv[:, :, 0]`` the keys, ``kv[:, :, 1]`` the values).

    Returns ``(out, v)``: out [B, N, H, D] as ``emsa_attention(q, k, v, scale)``, and v, the
    values (a view of kv), for their other uses (EMSAv2's upsample branch). The same aten ops
    as the published code (``unbind``; its backward stacks dk and dv).
    """
    check_attention_kv_inputs(q, kv)
    scale = scale_value("emsa_attention_kv", scale, q.shape[-1])
    k, v = kv.unbind(2)
    return emsa_attention(q, k, v, scale), v
