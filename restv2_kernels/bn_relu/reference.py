"""Eager reference for the stems' bias + ReLU: ``relu(x + bias)`` per channel, what follows a
conv whose BatchNorm is folded into it (the bias is the fold's). The ground truth and the CPU
path."""

from __future__ import annotations

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_bias_relu_inputs(x: torch.Tensor, bias: torch.Tensor) -> None:
    """Raises TypeError/ValueError naming the problem unless the arguments fit ``bias_relu``."""
    for name, t in (("x", x), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bias_relu: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"bias_relu: {name} has dtype {t.dtype}; supported: fp16, bf16, fp32, fp64")
        if t.dtype != x.dtype:
            raise TypeError(f"bias_relu: {name} has dtype {t.dtype}, but x has {x.dtype}; both must match")
        if t.device != x.device:
            raise ValueError(f"bias_relu: {name} is on {t.device}, but x is on {x.device}; both must match")
    if x.dim() != 4:
        raise ValueError(f"bias_relu: x must be a 4-D map (B, C, H, W), got shape {tuple(x.shape)}")
    if tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"bias_relu: bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}")


def bias_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``relu(x + bias)``, bias per channel, in plain eager PyTorch. x: [B, C, H, W]; bias: [C]."""
    check_bias_relu_inputs(x, bias)
    return torch.relu(x + bias.view(1, -1, 1, 1))
