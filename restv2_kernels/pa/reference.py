"""Eager reference for pixel attention (PA), the positional encoding of every stem and patch
embed: ``x * sigmoid(depthwise_conv3x3(x))``. The ground truth and the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_eps, check_out_dtype, check_tensors


def check_pixel_attention_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    x_bias: torch.Tensor | None = None,
    op: str = "pixel_attention",
) -> None:
    """Raises TypeError/ValueError naming the problem unless the arguments fit ``pixel_attention``
    (``op`` names the function in the messages)."""
    named = (("x", x), ("weight", weight), ("bias", bias), ("x_bias", x_bias))
    check_tensors(op, named, optional=("x_bias",))
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D map (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[2] == 0 or x.shape[3] == 0:  # as F.conv2d: a padded 2x2 map is smaller than the 3x3 kernel
        raise ValueError(f"{op}: the map must be at least 1x1, got {x.shape[2]}x{x.shape[3]}")
    C = x.shape[1]
    if tuple(weight.shape) != (C, 1, 3, 3):
        raise ValueError(f"{op}: weight must have shape {(C, 1, 3, 3)} for C={C}, got {tuple(weight.shape)}")
    if tuple(bias.shape) != (C,):
        raise ValueError(f"{op}: bias must have shape ({C},), got {tuple(bias.shape)}")
    if x_bias is not None and tuple(x_bias.shape) != (C,):
        raise ValueError(f"{op}: x_bias must have shape ({C},), got {tuple(x_bias.shape)}")


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


def check_pixel_attention_layer_norm_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    x_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None,
) -> None:
    """Raises TypeError/ValueError naming the problem unless the arguments fit
    ``pixel_attention_layer_norm``."""
    check_pixel_attention_inputs(x, weight, bias, x_bias, "pixel_attention_layer_norm")
    # the LayerNorm's parameters may stay fp32 beside a 16-bit map (autocast)
    named = (("x", x), ("norm_weight", norm_weight), ("norm_bias", norm_bias))
    check_tensors("pixel_attention_layer_norm", named, same_dtype=False)
    C = x.shape[1]
    for name, t in named[1:]:
        if tuple(t.shape) != (C,):
            raise ValueError(f"pixel_attention_layer_norm: {name} must have shape ({C},), got {tuple(t.shape)}")
    check_eps("pixel_attention_layer_norm", eps)
    check_out_dtype("pixel_attention_layer_norm", out_dtype)


def pixel_attention_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    x_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """PA, then LayerNorm over the channels of each pixel, as a stem or patch embed applies them
    (``norm(to_tokens(pixel_attention(x, ...)))``), in plain eager PyTorch.

    The PA output is rounded to x's dtype, as it is stored between the two ops; the LayerNorm
    computes in fp32 (fp64 for fp64) and rounds once to ``out_dtype`` (None: x's dtype; fp32 is
    what autocast gives a LayerNorm on a 16-bit map). Returns [B, C, H, W] in ``out_dtype``;
    its ``permute(0, 2, 3, 1)`` holds the normalised tokens.
    """
    check_pixel_attention_layer_norm_inputs(x, weight, bias, x_bias, norm_weight, norm_bias, eps, out_dtype)
    return layer_norm_pixels(pixel_attention(x, weight, bias, x_bias), norm_weight, norm_bias, eps, out_dtype)


def layer_norm_pixels(
    y: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, out_dtype: torch.dtype | None
) -> torch.Tensor:
    """LayerNorm over the channels of each pixel of y [B, C, H, W], in fp32 (fp64 for fp64),
    rounded once to ``out_dtype`` (None: y's dtype); [B, C, H, W], a permuted view of the tokens."""
    f = torch.promote_types(y.dtype, torch.float32)
    out = F.layer_norm(y.permute(0, 2, 3, 1).to(f), (y.shape[1],), norm_weight.to(f), norm_bias.to(f), eps)
    return out.to(out_dtype or y.dtype).permute(0, 3, 1, 2)
