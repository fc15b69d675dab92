"""Eager reference for pixel attention (PA), the positional encoding of every stem and patch
embed: ``x * sigmoid(depthwise_conv3x3(x))``. The ground truth and the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_tensors


def check_pixel_attention_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, x_bias: torch.Tensor | None = None
) -> None:
    """Raises TypeError/ValueError naming the problem unless the arguments fit ``pixel_attention``."""
    named = (("x", x), ("weight", weight), ("bias", bias), ("x_bias", x_bias))
    check_tensors("pixel_attention", named, optional=("x_bias",))
    if x.dim() != 4:
        raise ValueError(f"pixel_attention: x must be a 4-D map (B, C, H, W), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if tuple(weight.shape) != (C, 1, 3, 3):
        raise ValueError(f"pixel_attention: weight must have shape {(C, 1, 3, 3)} for C={C}, got {tuple(weight.shape)}")
    if tuple(bias.shape) != (C,):
        raise ValueError(f"pixel_attention: bias must have shape ({C},), got {tuple(bias.shape)}")
    if x_bias is not None and tuple(x_bias.shape) != (C,):
        raise ValueError(f"pixel_attention: x_bias must have shape ({C},), got {tuple(x_bias.shape)}")


def pixel_attention(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, x_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x * sigmoid(conv2d(x, weight, bias, padding=1, groups=C))`` in plain eager PyTorch;
    with ``x_bias`` ([C]), of ``x + x_bias`` per channel (the bias of the conv that made x).

    x: [B, C, H, W] in any memory format; weight: [C, 1, 3, 3]; bias: [C]. Returns [B, C, H, W]
    in the memory format PyTorch's conv gives (channels-last for a channels-last x).
    """
    check_pixel_attention_inputs(x, weight, bias, x_bias)
    if x_bias is not None:
        x = x + x_bias.view(1, -1, 1, 1)
    return x * torch.sigmoid(F.conv2d(x, weight, bias, padding=1, groups=x.shape[1]))
