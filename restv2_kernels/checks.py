"""The argument checks the ops share. Each raises TypeError or ValueError with a message that names
the op and the argument; the op-specific shape checks stay beside each reference."""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensors(
    op: str, named: Sequence[tuple[str, object]], *, optional: Collection[str] = (), same_dtype: bool = True
) -> None:
    """Each ``(name, value)`` of ``named`` is a tensor of a floating dtype (fp16, bf16, fp32, fp64)
    on the first one's device and, with ``same_dtype``, of the first one's dtype; those named in
    ``optional`` may be None instead."""
    first_name, first = named[0]
    for name, t in named:
        if t is None and name in optional:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: fp16, bf16, fp32, fp64")
        if same_dtype and t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}, but {first_name} has {first.dtype}; all must match")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device}, but {first_name} is on {first.device}; all must match")


def check_non_negative(op: str, name: str, value: object) -> None:
    """A scalar argument (an eps, a momentum): a non-negative int or float (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{op}: {name} must be a non-negative number, got {value!r}")


def check_eps(op: str, eps: object) -> None:
    """A LayerNorm's eps: a non-negative int or float (not a bool)."""
    check_non_negative(op, "eps", eps)


def check_out_dtype(op: str, out_dtype: object) -> None:
    """An output dtype argument: None (the op's default) or a floating dtype."""
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be a floating dtype or None, got {out_dtype!r}")


def eager_norm_takes(x_dtype: torch.dtype, param_dtypes: set[torch.dtype]) -> bool:
    """Whether ``F.layer_norm`` / ``F.batch_norm`` take ``[C]`` parameters in ``param_dtypes``
    beside an input in ``x_dtype`` as they are: all in x's dtype, or fp32 beside a 16-bit x.
    The references compute other mixes in fp32 (fp64 for fp64), as the kernels do."""
    return param_dtypes <= {x_dtype} or (param_dtypes == {torch.float32} and x_dtype in (torch.float16, torch.bfloat16))


def scale_value(op: str, scale: object, head_dim: int) -> float:
    """An attention's score scale as a float: ``head_dim ** -0.5`` for None, else a finite real
    number, or a one-element floating tensor that needs no gradient (the scale is a constant:
    the kernels take it as a number, and neither op differentiates it)."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or not scale.dtype.is_floating_point:
            raise TypeError(
                f"{op}: scale must be a number or a one-element floating tensor, "
                f"got a {scale.dtype} tensor of shape {tuple(scale.shape)}"
            )
        if scale.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: scale is a constant (no gradient flows to it); pass a number or a detached tensor")
        if scale.is_meta:
            raise ValueError(f"{op}: scale is a meta tensor, which holds no value; pass a number")
        scale = scale.item()
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    return scale
