"""Eager references for the stems' BatchNorm + ReLU: ``relu(x + bias)`` per channel (what
follows a conv whose BatchNorm is folded into it, at inference) and ``relu(batch_norm(x))``
(the BatchNorm itself, in training). The ground truth and the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_non_negative, check_tensors, eager_norm_takes


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


def check_batch_norm_relu_inputs(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> None:
    """Raises TypeError/ValueError naming the problem unless the arguments fit
    ``batch_norm_relu``: x [B, C, H, W]; the others [C] or None (the running statistics both or
    neither, and required outside training), of any floating dtype (the statistics are fp32)."""
    op = "batch_norm_relu"
    named = (("x", x), ("running_mean", running_mean), ("running_var", running_var), ("weight", weight))
    check_tensors(
        op, named + (("bias", bias),), optional=("running_mean", "running_var", "weight", "bias"), same_dtype=False
    )
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D map (B, C, H, W), got shape {tuple(x.shape)}")
    for name, t in named[1:] + (("bias", bias),):
        if t is not None and tuple(t.shape) != (x.shape[1],):
            raise ValueError(f"{op}: {name} must have shape ({x.shape[1]},), got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must both be tensors or both be None")
    if not isinstance(training, bool):
        raise TypeError(f"{op}: training must be a bool, got {type(training).__name__}")
    if not training and running_mean is None:
        raise ValueError(
            f"{op}: outside training the running statistics are required (training=False, running_mean None)"
        )
    check_non_negative(op, "momentum", momentum)
    check_non_negative(op, "eps", eps)
    if training and not eps > 0:  # a channel of equal values has variance 0
        raise ValueError(f"{op}: eps must be positive in training, got {eps!r}")
    if training and x.numel() and x.numel() // x.shape[1] == 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got input size {tuple(x.shape)}")


def batch_norm_relu(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))``
    in plain eager PyTorch (the arguments are F.batch_norm's; in training the running
    statistics, where given, are updated in place, as there)."""
    check_batch_norm_relu_inputs(x, running_mean, running_var, weight, bias, training, momentum, eps)
    dtypes = {t.dtype for t in (running_mean, running_var, weight, bias) if t is not None}
    if eager_norm_takes(x.dtype, dtypes):
        return torch.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))
    # [C] tensors in dtypes F.batch_norm does not take beside x: computed in fp32 (fp64 for fp64),
    # as the kernels do; the running statistics updated in their own dtypes
    f = torch.promote_types(x.dtype, torch.float32)
    mean, var, w, b = (None if t is None else t.to(f) for t in (running_mean, running_var, weight, bias))
    out = F.batch_norm(x.to(f), mean, var, w, b, training, momentum, eps)
    with torch.no_grad():  # where a statistic was cast, F.batch_norm updated the copy
        for running, updated in ((running_mean, mean), (running_var, var)):
            if training and running is not None and updated is not running:
                running.copy_(updated)
    return torch.relu(out).to(x.dtype)
