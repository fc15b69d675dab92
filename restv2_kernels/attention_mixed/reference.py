"""Eager reference for ResTv1's EMSA with the multi-head interaction: scores mixed across heads by
a 1x1 conv, softmax, InstanceNorm over each head's whole score map, then V. The ground truth and
the CPU path."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..attention.reference import check_attention_inputs
from ..checks import check_tensors, scale_value


def check_mixed_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> None:
    """Raises TypeError/ValueError naming the problem unless the arguments fit ``emsa_attention_mixed``."""
    check_attention_inputs(q, k, v, op="emsa_attention_mixed")
    H = q.shape[2]
    # the conv's weight and bias may stay fp32 beside 16-bit q, k, v (autocast)
    named = (("q", q), ("weight", weight), ("bias", bias))
    check_tensors("emsa_attention_mixed", named, optional=("bias",), same_dtype=False)
    if tuple(weight.shape) not in ((H, H), (H, H, 1, 1)):
        raise ValueError(
            f"emsa_attention_mixed: weight must be the head-mixing 1x1 conv's [heads, heads, 1, 1] (or [heads, heads]) "
            f"with heads = {H}, got shape {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (H,):
        raise ValueError(f"emsa_attention_mixed: bias must have shape [heads] = ({H},), got {tuple(bias.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"emsa_attention_mixed: eps must be a positive finite number, got {eps!r}")


def mixed_scores(
    q: torch.Tensor, k: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float, eps: float
) -> torch.Tensor:
    """The normalised score maps [B, H, N, M] of the published EMSA with ``apply_transform``:
    ``InstanceNorm2d(softmax(conv1x1(q k^T * scale)))``. q: [B, N, H, D], k: [B, M, H, D].

    Shared by the reference op and the model's attention-dropout path (which drops these maps
    before multiplying by V, as the published code does).
    """
    H = q.shape[2]
    attn = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1)) * scale  # [B, H, N, M]
    w = weight.reshape(H, H, 1, 1).to(attn.dtype)
    attn = F.conv2d(attn, w, None if bias is None else bias.to(attn.dtype)).softmax(dim=-1)
    # InstanceNorm2d refuses a 1x1 map (N = M = 1, a 32x32 input's stage 4); normalising one
    # element gives exactly 0. (Not Size.numel(): torch.export would specialise on its value.)
    return F.instance_norm(attn, eps=eps) if attn.shape[-2] * attn.shape[-1] > 1 else attn - attn


def emsa_attention_mixed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """ResTv1's attention with the head transform, in plain eager PyTorch.

    q: [B, N, H, D]; k, v: [B, M, H, D]; weight: [H, H, 1, 1] (or [H, H]) and bias [H] (or
    None) of the 1x1 conv mixing the heads' scores; returns [B, N, H, D], contiguous.
    ``scale`` defaults to ``D ** -0.5``; ``eps`` is the InstanceNorm's. Materialises several
    [B, H, N, M] maps, as the published code does.
    """
    check_mixed_inputs(q, k, v, weight, bias, eps)
    scale = scale_value("emsa_attention_mixed", scale, q.shape[-1])
    attn = mixed_scores(q, k, weight, bias, scale, eps)
    return (attn @ v.transpose(1, 2)).transpose(1, 2).contiguous()
