"""Building blocks shared by ResTv2 and ResTv1: pixel attention, stems, patch embeds, MLP, drop path.

Every map size is taken from the tensor a conv produced, never computed as ``H // stride``,
so any input of at least 32x32 runs (a stride-2, pad-1, 3x3 conv gives ``ceil(H / 2)``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

MIN_INPUT_SIZE = 32


def check_image(x: torch.Tensor, in_chans: int) -> None:
    """Raises ValueError unless ``x`` is a (B, in_chans, H, W) batch with H, W >= 32."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected an image tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D image batch (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})")
    if x.shape[2] < MIN_INPUT_SIZE or x.shape[3] < MIN_INPUT_SIZE:
        raise ValueError(
            f"input must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, got {x.shape[2]}x{x.shape[3]}"
        )


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C]."""
    return rearrange(x, "b c h w -> b (h w) c")


def to_map(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[B, H*W, C] -> [B, C, H, W]."""
    return rearrange(x, "b (h w) c -> b c h w", h=H, w=W)


def drop_path_rates(rate: float, n: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to ``rate`` over ``n`` blocks (plain
    Python, so models can be built on the meta device)."""
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PA(nn.Module):
    """Pixel attention, the positional encoding: ``x * sigmoid(depthwise_conv3x3(x))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.pa_conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.pa_conv(x))


class Mlp(nn.Module):
    """Linear -> GELU -> (dropout) -> Linear -> (dropout)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


# ----------------------------------------------------------------------------- ResTv2


class ConvStem(nn.Module):
    """ResTv2 stem, stride 4: two 3x3/s2 conv-BN-ReLU, a 1x1 conv, PA, then LN on tokens."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(dim // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, kernel_size=1),
        )
        self.pos = PA(dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.pos(self.proj(x))
        H, W = x.shape[-2:]
        return self.norm(to_tokens(x)), H, W


class PatchEmbed(nn.Module):
    """ResTv2 downsampling between stages: 3x3/s2 conv, PA, then LN on tokens."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, kernel_size=3, stride=2, padding=1)
        self.pos = PA(dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.pos(self.proj(x))
        H, W = x.shape[-2:]
        return self.norm(to_tokens(x)), H, W


# ----------------------------------------------------------------------------- ResTv1


class BasicStem(nn.Module):
    """ResTv1 stem, stride 4: conv-BN-ReLU (s2), conv-BN-ReLU (s1), conv (s2), then PA."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        hidden = dim // 2
        self.conv1 = nn.Conv2d(in_chans, hidden, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.pos = PA(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        x = self.pos(self.conv3(x))
        H, W = x.shape[-2:]
        return to_tokens(x), H, W


class PatchEmbedV1(nn.Module):
    """ResTv1 downsampling between stages: 3x3/s2 conv, BatchNorm, then PA (no LN)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(dim)
        self.pos = PA(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.pos(self.norm(self.conv(x)))
        H, W = x.shape[-2:]
        return to_tokens(x), H, W


def reduce_tokens(x: torch.Tensor, H: int, W: int, sr: nn.Conv2d, norm: nn.LayerNorm) -> tuple[torch.Tensor, int, int]:
    """EMSA's spatial reduction: [B, H*W, C] -> depthwise strided conv -> LN -> [B, Hr*Wr, C].

    The tokens viewed as a map are already channels-last in memory, so the conv reads them in
    place and its channels-last output turns back into tokens without a copy.
    """
    x = sr(to_map(x, H, W))
    Hr, Wr = x.shape[-2:]
    return norm(to_tokens(x)), Hr, Wr


def stage_indices(indices: int | list[int] | tuple[int, ...] | None, num_stages: int = 4) -> list[int]:
    """timm's convention: None -> all stages, int n -> the last n, a sequence -> those (negatives allowed)."""
    if indices is None:
        return list(range(num_stages))
    if isinstance(indices, int):
        if not 1 <= indices <= num_stages:
            raise ValueError(f"indices must be between 1 and {num_stages}, got {indices}")
        return list(range(num_stages - indices, num_stages))
    out = sorted({i % num_stages for i in indices if -num_stages <= i < num_stages})
    if len(out) != len(set(indices)):
        raise ValueError(f"stage indices must lie in [-{num_stages}, {num_stages}), got {list(indices)}")
    return out
