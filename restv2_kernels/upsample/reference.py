"""Eager reference for EMSAv2's upsample branch: depthwise 3x3 conv, pixel-shuffle, crop,
LayerNorm over channels, residual add. The ground truth and the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_eps, check_tensors


def check_upsample_inputs(
    x: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    sr: int,
    eps: float,
) -> None:
    """Raises TypeError/ValueError naming the problem unless the arguments fit ``upsample_add``."""
    named = (
        ("x", x),
        ("v", v),
        ("weight", weight),
        ("bias", bias),
        ("norm_weight", norm_weight),
        ("norm_bias", norm_bias),
    )
    check_tensors("upsample_add", named)
    if isinstance(sr, bool) or not isinstance(sr, int) or sr < 1:
        raise ValueError(f"upsample_add: sr must be a positive int, got {sr!r}")
    if x.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"upsample_add: x and v must be 4-D channels-last maps (B, H, W, C), got {tuple(x.shape)} and {tuple(v.shape)}"
        )
    B, H, W, C = x.shape
    if v.shape[0] != B or v.shape[3] != C:
        raise ValueError(f"upsample_add: v {tuple(v.shape)} must be (B={B}, Hr, Wr, C={C}) to match x {tuple(x.shape)}")
    Hr, Wr = v.shape[1], v.shape[2]
    # torch.export cannot prove this for symbolic sizes (floor divisions); the model's shapes
    # satisfy it by construction, and eager calls are checked
    if not torch.compiler.is_exporting() and (Hr * sr < H or Wr * sr < W):
        raise ValueError(
            f"upsample_add: the upsampled map {Hr * sr}x{Wr * sr} (v's {Hr}x{Wr} times sr={sr}) "
            f"is smaller than x's {H}x{W}; need Hr*sr >= H and Wr*sr >= W"
        )
    if tuple(weight.shape) != (sr * sr * C, 1, 3, 3):
        raise ValueError(
            f"upsample_add: weight must have shape {(sr * sr * C, 1, 3, 3)} for sr={sr}, C={C}, got {tuple(weight.shape)}"
        )
    if tuple(bias.shape) != (sr * sr * C,):
        raise ValueError(
            f"upsample_add: bias must have shape {(sr * sr * C,)} for sr={sr}, C={C}, got {tuple(bias.shape)}"
        )
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if tuple(t.shape) != (C,):
            raise ValueError(f"upsample_add: {name} must have shape ({C},), got {tuple(t.shape)}")
    check_eps("upsample_add", eps)


def upsample_add(
    x: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    sr: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``x + LayerNorm(crop(PixelShuffle(conv3x3_depthwise(v))))`` in plain eager PyTorch.

    x: [B, H, W, C]; v: [B, Hr, Wr, C]; weight: [sr*sr*C, 1, 3, 3]; bias: [sr*sr*C];
    norm_weight, norm_bias: [C]. Returns [B, H, W, C], contiguous. The crop keeps the
    top-left H x W of the (Hr*sr) x (Wr*sr) upsampled map.
    """
    check_upsample_inputs(x, v, weight, bias, norm_weight, norm_bias, sr, eps)
    B, H, W, C = x.shape
    up = F.conv2d(v.permute(0, 3, 1, 2), weight, bias, padding=1, groups=C)
    up = crop(F.pixel_shuffle(up, sr), H, W)
    up = F.layer_norm(up.permute(0, 2, 3, 1), (C,), norm_weight, norm_bias, eps)
    return (x + up).contiguous()


def crop(up: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The top-left H x W of an NCHW map (the upsampled map is (Hr*sr) x (Wr*sr), at least H x W)."""
    if torch.compiler.is_exporting():  # torch.export, also behind torch.onnx.export
        # The crop as a gather: its size is H x W whatever Hr*sr is, so an exported graph keeps
        # sides that do not divide by 32 dynamic (a slice specialises on whether Hr*sr == H).
        rows, cols = (torch.arange(n, device=up.device) for n in (H, W))
        return up.index_select(2, rows).index_select(3, cols)
    return up[:, :, :H, :W]
