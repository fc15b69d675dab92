"""Eager reference for the MLP's first layer and its activation: ``gelu(x @ weight.T + bias)``
with the exact (erf) GELU. The ground truth and the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_tensors


def check_linear_gelu_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    op: str = "linear_gelu",
    names: tuple[str, str] = ("weight", "bias"),
) -> None:
    """Raises TypeError/ValueError naming the problem unless the arguments fit ``linear_gelu``
    (``op`` and ``names``: the function and the weight's and bias's names in the messages)."""
    w, b = names
    check_tensors(op, (("x", x), (w, weight), (b, bias)), optional=(b,))
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"{op}: x must be (..., K) and {w} (N, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: {w} {tuple(weight.shape)} does not take x's last dim {x.shape[-1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: {b} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def check_mlp_inputs(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
) -> None:
    """Raises TypeError/ValueError naming the problem unless the arguments fit ``mlp``."""
    check_linear_gelu_inputs(x, fc1_weight, fc1_bias, "mlp", ("fc1_weight", "fc1_bias"))
    check_tensors("mlp", (("x", x), ("fc2_weight", fc2_weight), ("fc2_bias", fc2_bias)), optional=("fc2_bias",))
    hidden = fc1_weight.shape[0]
    if fc2_weight.dim() != 2 or fc2_weight.shape[1] != hidden:
        raise ValueError(
            f"mlp: fc2_weight must be (C_out, {hidden}) to take fc1's output, got {tuple(fc2_weight.shape)}"
        )
    if fc2_bias is not None and tuple(fc2_bias.shape) != (fc2_weight.shape[0],):
        raise ValueError(f"mlp: fc2_bias must have shape ({fc2_weight.shape[0]},), got {tuple(fc2_bias.shape)}")


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
    check_mlp_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
