"""Eager reference for the stems' bias + ReLU: ``relu(x + bias)`` per channel, what follows a
conv whose BatchNorm is folded into it (the bias is the fold's). The ground truth and the CPU
path."""

from __future__ import annotations

import torch

from ..checks import check_tensors


def check_bias_relu_inputs(x: torch.Tensor, bias: torch.Tensor) -> None:
    """Raises TypeError/ValueError naming the problem unless the arguments fit ``bias_relu``."""
    check_tensors("bias_relu", (("x", x), ("bias", bias)))
    if x.dim() != 4:
        raise ValueError(f"bias_relu: x must be a 4-D map (B, C, H, W), got shape {tuple(x.shape)}")
    if tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"bias_relu: bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}")


def bias_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``relu(x + bias)``, bias per channel, in plain eager PyTorch. x: [B, C, H, W]; bias: [C]."""
    check_bias_relu_inputs(x, bias)
    return torch.relu(x + bias.view(1, -1, 1, 1))
