"""ResTv2 ("ResT V2: Simpler, Faster and Stronger", NeurIPS 2022): EMSAv2, Block, ResTV2, factories.

Module names and state-dict keys are the released checkpoints' (``../shared/SPEC.md``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

import restv2_kernels
from restv2_kernels import reference
from restv2_kernels.backend import check_backend, use_kernels

from .backbone import Backbone, build, document_factories
from .layers import (
    ConvStem,
    DropPath,
    DroppedBranch,
    Mlp,
    PatchEmbed,
    add_branch,
    add_norm,
    add_upsample,
    autocast_dtype,
    drop_branch,
    linear_and_input,
    ops_for,
    reduce_tokens,
)


class EMSAv2(nn.Module):
    """Efficient multi-head self-attention v2: N queries over M = N / sr^2 reduced keys and
    values, plus an upsample branch that brings V back to full resolution.

    ``backend`` picks the Triton kernels or the eager reference (see ``restv2_kernels.backend``).
    Both paths take q and kv as views straight out of their Linear layers.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.backend = check_backend(backend)

        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio + 1, stride=sr_ratio, padding=sr_ratio // 2, groups=dim)
            self.sr_norm = nn.LayerNorm(dim, eps=1e-6)
        self.up = nn.Sequential(
            nn.Conv2d(dim, sr_ratio * sr_ratio * dim, kernel_size=3, padding=1, groups=dim),
            nn.PixelShuffle(sr_ratio),
        )
        self.up_norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """x: [B, H*W, C] -> [B, H*W, C]."""
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        kernels = use_kernels(self.backend, x)
        # x's two gradients meet in q's input-gradient GEMM, which adds into the reader's
        q, x = linear_and_input(self.q, x, kernels, self.sr if self.sr_ratio > 1 else self.kv)
        q = q.view(B, N, h, d)
        if self.sr_ratio > 1:
            x, Hr, Wr = reduce_tokens(x, H, W, self.sr, self.sr_norm)
        else:
            Hr, Wr = H, W
        kv = self.kv(x).view(B, Hr * Wr, 2, h, d)

        # k and v are views of kv; v comes back for the upsample branch. The kernels' backward
        # writes kv's gradient as one buffer with v's two gradients added inside it; the
        # reference unbinds (its backward adds them and stacks dk and dv in two more passes)
        ops = restv2_kernels if kernels else reference
        out, v = ops.emsa_attention_kv(q, kv, self.scale)  # [B, N, h, d], [B, Hr*Wr, h, d]
        v_map = v.view(B, Hr, Wr, C)  # channel = head * d + j, as the checkpoints expect
        out = add_upsample(ops, self.up, self.up_norm, out.view(B, H, W, C), v_map, self.sr_ratio)
        return self.proj(out.view(B, N, C))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, backend={self.backend!r}"


class Block(nn.Module):
    """Pre-norm transformer block: EMSAv2 and an MLP (ratio 4), each with drop path.

    On the kernel path each residual add is fused with the LayerNorm after it
    (``restv2_kernels.add_layer_norm``); ``run`` carries the last branch out of the block so
    that the stage adds it inside the next block's first norm.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, drop_path: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EMSAv2(dim, num_heads, sr_ratio, backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim, backend=backend)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x, branch = self.run(x, None, H, W)
        return add_branch(x, branch)

    def run(
        self, x: torch.Tensor, pending: torch.Tensor | DroppedBranch | None, H: int, W: int
    ) -> tuple[torch.Tensor, torch.Tensor | DroppedBranch]:
        """The block on the residual stream ``x + pending`` (``pending``: the previous block's
        last branch, or None): returns the new stream without its last branch, and that branch."""
        ops = ops_for(self.backend, x)
        dtype = autocast_dtype(x)  # the next Linear's dtype: the kernel writes the norm in it
        kernels = ops is restv2_kernels  # stochastic depth applied inside the next add
        x, h = add_norm(ops, x, pending, self.norm1, dtype)
        x, h = add_norm(ops, x, drop_branch(self.drop_path, self.attn(h, H, W), kernels), self.norm2, dtype)
        return x, drop_branch(self.drop_path, self.mlp(h), kernels)


class ResTV2(Backbone):
    """ResTv2. ``forward`` gives logits; ``forward_features`` the final [B, C, H/32, W/32] map;
    ``forward_intermediates`` the four stage maps. Any input of at least 32x32 runs.
    """

    embed_names = ("stem", "patch_2", "patch_3", "patch_4")

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: list[int] = [96, 192, 384, 768],
        num_heads: list[int] = [1, 2, 4, 8],
        drop_path_rate: float = 0.0,
        depths: list[int] = [2, 2, 2, 2],
        sr_ratios: list[int] = [8, 4, 2, 1],
        global_pool: str = "avg",
        backend: str | None = None,
    ):
        super().__init__()
        backend = self._init_common(in_chans, num_classes, global_pool, embed_dims, backend)

        self.stem = ConvStem(in_chans, embed_dims[0], backend)
        self.patch_2 = PatchEmbed(embed_dims[0], embed_dims[1], backend)
        self.patch_3 = PatchEmbed(embed_dims[1], embed_dims[2], backend)
        self.patch_4 = PatchEmbed(embed_dims[2], embed_dims[3], backend)

        self._add_stages(
            depths, drop_path_rate, lambda i, dp: Block(embed_dims[i], num_heads[i], sr_ratios[i], dp, backend)
        )

        self.norm = nn.LayerNorm(embed_dims[3], eps=1e-6)
        self.head = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)


def _init_weights(m: nn.Module) -> None:
    """Trunc-normal std 0.02 for conv and linear weights, zero biases; norms at identity."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


#: The architectures of the four released ResTv2 models (``ResTV2`` keyword arguments).
ARCHS = {
    "restv2_tiny": dict(embed_dims=[96, 192, 384, 768], num_heads=[1, 2, 4, 8], depths=[1, 2, 6, 2]),
    "restv2_small": dict(embed_dims=[96, 192, 384, 768], num_heads=[1, 2, 4, 8], depths=[1, 2, 12, 2]),
    "restv2_base": dict(embed_dims=[96, 192, 384, 768], num_heads=[1, 2, 4, 8], depths=[1, 3, 16, 3]),
    "restv2_large": dict(embed_dims=[128, 256, 512, 1024], num_heads=[2, 4, 8, 16], depths=[2, 3, 16, 2]),
}


def _create(name: str, checkpoint_path: str | None, **kwargs) -> ResTV2:
    return build(ResTV2, checkpoint_path, **{**ARCHS[name], **kwargs})


def restv2_tiny(checkpoint_path: str | None = None, **kwargs) -> ResTV2:
    """ResTv2-T: 30.43M params, 4.08 GMACs at 224."""
    return _create("restv2_tiny", checkpoint_path, **kwargs)


def restv2_small(checkpoint_path: str | None = None, **kwargs) -> ResTV2:
    """ResTv2-S: 41.21M params, 5.95 GMACs at 224."""
    return _create("restv2_small", checkpoint_path, **kwargs)


def restv2_base(checkpoint_path: str | None = None, **kwargs) -> ResTV2:
    """ResTv2-B: 55.97M params, 7.86 GMACs at 224."""
    return _create("restv2_base", checkpoint_path, **kwargs)


def restv2_large(checkpoint_path: str | None = None, **kwargs) -> ResTV2:
    """ResTv2-L: 86.53M params, 13.80 GMACs at 224."""
    return _create("restv2_large", checkpoint_path, **kwargs)


document_factories(ResTV2, restv2_tiny, restv2_small, restv2_base, restv2_large)
