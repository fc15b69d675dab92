"""Eager reference for the residual add + LayerNorm of every block: the ground truth and the CPU path."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..checks import check_eps, check_out_dtype, check_tensors, eager_norm_takes


def check_add_layer_norm_inputs(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    branch_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> None:
    """Raises TypeError/ValueError naming the problem unless the arguments fit ``add_layer_norm``."""
    # dtypes may differ: an fp32 residual stream beside a 16-bit branch under autocast
    named = (("x", x), ("weight", weight), ("bias", bias), ("branch", branch))
    check_tensors("add_layer_norm", named, optional=("branch",), same_dtype=False)
    if x.dim() < 1:
        raise ValueError("add_layer_norm: x must have at least one dimension (..., C)")
    C = x.shape[-1]
    if branch is not None and branch.shape != x.shape:
        raise ValueError(f"add_layer_norm: branch {tuple(branch.shape)} must have x's shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (C,):
            raise ValueError(
                f"add_layer_norm: {name} must have shape ({C},) for x {tuple(x.shape)}, got {tuple(t.shape)}"
            )
    check_eps("add_layer_norm", eps)
    check_out_dtype("add_layer_norm", out_dtype)
    if branch_scale is None:
        return
    check_tensors("add_layer_norm", (("x", x), ("branch_scale", branch_scale)), same_dtype=False)
    if branch is None:
        raise ValueError("add_layer_norm: branch_scale scales the branch, but branch is None")
    if x.dim() < 2 or tuple(branch_scale.shape) != (x.shape[0],):
        raise ValueError(
            f"add_layer_norm: branch_scale must have shape (B,), one factor per sample of x's first dim, "
            f"for x {tuple(x.shape)}; got {tuple(branch_scale.shape)}"
        )
    if branch_scale.requires_grad and torch.is_grad_enabled():
        raise ValueError("add_layer_norm: branch_scale is a constant (no gradient flows to it); pass it detached")


def scale_branch(branch: torch.Tensor, branch_scale: torch.Tensor) -> torch.Tensor:
    """``branch`` times its sample's factor, in branch's dtype: what eager stochastic depth
    (``DropPath``) returns, with the mask and 1 / keep as one factor."""
    return (branch * branch_scale.view(-1, *(1,) * (branch.dim() - 1))).to(branch.dtype)


def add_layer_norm(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    branch_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = x + branch`` (``x`` itself when ``branch`` is None) and
    ``normed = LayerNorm(residual)`` over the last dim, in plain eager PyTorch.

    Returns ``(residual, normed)``: the residual stream a block carries on, and the input of
    its next sub-layer. ``normed`` is cast to ``out_dtype`` when given (the dtype the next
    Linear computes in under autocast). ``branch_scale`` ([B] or None) multiplies each
    sample's branch first (``scale_branch``: stochastic depth). The same aten ops as the
    published code.
    """
    check_add_layer_norm_inputs(x, branch, weight, bias, eps, branch_scale, out_dtype)
    if branch_scale is not None:
        branch = scale_branch(branch, branch_scale)
    residual = x if branch is None else x + branch
    if eager_norm_takes(residual.dtype, {weight.dtype, bias.dtype}):
        normed = F.layer_norm(residual, (x.shape[-1],), weight, bias, eps)  # dtypes F.layer_norm takes
    else:  # e.g. 16-bit parameters beside an fp32 residual: in fp32 (fp64 for fp64), as the kernel computes
        f = functools.reduce(torch.promote_types, (residual.dtype, weight.dtype, bias.dtype, torch.float32))
        normed = F.layer_norm(residual.to(f), (x.shape[-1],), weight.to(f), bias.to(f), eps).to(residual.dtype)
    if out_dtype is not None:
        normed = normed.to(out_dtype)
    return residual, normed
