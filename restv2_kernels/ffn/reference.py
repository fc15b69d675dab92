"""Eager reference for the MLP's first layer and its activation: ``gelu(x @ weight.T + bias)``
with the exact (erf) GELU. The ground truth and the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_tensors


def check_linear_gelu_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raises TypeError/ValueError naming the problem unless the arguments fit ``linear_gelu``."""
    check_tensors("linear_gelu", (("x", x), ("weight", weight), ("bias", bias)), optional=("bias",))
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(
            f"linear_gelu: x must be (..., K) and weight (N, K), got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear_gelu: weight {tuple(weight.shape)} does not take x's last dim {x.shape[-1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_gelu: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias))`` (exact GELU) in plain eager PyTorch.

    x: [..., K]; weight: [N, K]; bias: [N] or None. Returns [..., N].
    """
    check_linear_gelu_inputs(x, weight, bias)
    return F.gelu(F.linear(x, weight, bias))


def mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
) -> torch.Tensor:
    """``F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)`` in plain eager PyTorch."""
    check_linear_gelu_inputs(x, fc1_weight, fc1_bias)
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
