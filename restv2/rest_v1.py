"""ResTv1 ("ResT: An Efficient Transformer for Visual Recognition", NeurIPS 2021): EMSA, Block,
ResT, factories. Module names and state-dict keys are the released checkpoints'."""

from __future__ import annotations

import torch
import torch.nn as nn

import restv2_kernels
from restv2_kernels.attention_mixed.reference import mixed_scores
from restv2_kernels.backend import check_backend

from .backbone import Backbone, build, document_factories
from .layers import (
    BasicStem,
    DropPath,
    DroppedBranch,
    Mlp,
    PatchEmbedV1,
    add_branch,
    add_norm,
    autocast_dtype,
    calls_plainly,
    drop_branch,
    is_plain_instance_norm,
    linear_and_input,
    ops_for,
    reduce_tokens,
)


class EMSA(nn.Module):
    """Efficient multi-head self-attention (v1): queries over sr-reduced keys/values, with an
    optional 1x1 conv mixing heads on the scores (``apply_transform``, only when heads > 1).

    On the kernel backend every stage runs fused: ``emsa_attention`` without the head transform,
    ``emsa_attention_mixed`` with it (conv, softmax and InstanceNorm in the kernels). Attention
    dropout in training drops entries of the score maps, so it keeps the eager path (the
    transform through ``restv2_kernels.attention_mixed.reference.mixed_scores``). So does a
    hooked or replaced ``transform_conv`` or ``transform_norm`` (pruning's mask, a feature hook,
    an InstanceNorm with affine parameters or running statistics), which is called on both paths.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sr_ratio: int = 1,
        apply_transform: bool = False,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        backend: str = "auto",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.backend = check_backend(backend)

        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio + 1, stride=sr_ratio, padding=sr_ratio // 2, groups=dim)
            self.sr_norm = norm_layer(dim)
        self.apply_transform = apply_transform and num_heads > 1
        if self.apply_transform:
            self.transform_conv = nn.Conv2d(num_heads, num_heads, kernel_size=1)
            self.transform_norm = nn.InstanceNorm2d(num_heads)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """x: [B, H*W, C] -> [B, H*W, C]."""
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        ops = ops_for(self.backend, x)
        # x's two gradients meet in q's input-gradient GEMM, which adds into the reader's
        q, x = linear_and_input(self.q, x, ops is restv2_kernels, self.sr if self.sr_ratio > 1 else self.kv)
        q = q.view(B, N, h, d)
        if self.sr_ratio > 1:
            x, Hr, Wr = reduce_tokens(x, H, W, self.sr, self.sr_norm)
        else:
            Hr, Wr = H, W
        kv = self.kv(x).view(B, Hr * Wr, 2, h, d)
        k, v = kv.unbind(2)  # views; the backward stacks dk and dv into one buffer (two selects: two zero-filled ones)

        # the head transform's modules, hooked or replaced (pruning's mask, a feature hook), are
        # called as the published code calls them; plain, the fused ops read their parameters
        plain = not self.apply_transform or (
            calls_plainly(self.transform_conv, nn.Conv2d) and is_plain_instance_norm(self.transform_norm)
        )
        if (self.training and self.attn_drop.p > 0) or not plain:
            # attention dropout drops entries of the [B, h, N, M] score maps: the eager path
            if self.apply_transform and plain:
                conv = self.transform_conv
                attn = mixed_scores(q, k, conv.weight, conv.bias, self.scale, self.transform_norm.eps)
            else:
                attn = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1)) * self.scale
                if self.apply_transform:  # the modules, called
                    attn = self.transform_norm(self.transform_conv(attn).softmax(dim=-1))
                else:
                    attn = attn.softmax(dim=-1)
            out = (self.attn_drop(attn) @ v.transpose(1, 2)).transpose(1, 2)
        elif self.apply_transform:
            conv = self.transform_conv
            out = ops.emsa_attention_mixed(q, k, v, conv.weight, conv.bias, self.scale, self.transform_norm.eps)
        else:  # kv packed: the kernels' backward writes its gradient as one buffer (no stack)
            out = ops.emsa_attention_kv(q, kv, self.scale)[0]
        return self.proj_drop(self.proj(out.reshape(B, N, C)))

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, "
            f"apply_transform={self.apply_transform}, backend={self.backend!r}"
        )


class Block(nn.Module):
    """Pre-norm transformer block: EMSA and an MLP, each with drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        sr_ratio: int = 1,
        apply_transform: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = EMSA(
            dim, num_heads, qkv_bias, qk_scale, attn_drop, drop, sr_ratio, apply_transform, norm_layer, backend
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, backend)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x, branch = self.run(x, None, H, W)
        return add_branch(x, branch)

    def run(
        self, x: torch.Tensor, pending: torch.Tensor | DroppedBranch | None, H: int, W: int
    ) -> tuple[torch.Tensor, torch.Tensor | DroppedBranch]:
        """As ``restv2.Block.run``: residual adds fused with the next LayerNorm on the kernel path."""
        ops = ops_for(self.backend, x)
        dtype = autocast_dtype(x)
        kernels = ops is restv2_kernels  # stochastic depth applied inside the next add
        x, h = add_norm(ops, x, pending, self.norm1, dtype)
        x, h = add_norm(ops, x, drop_branch(self.drop_path, self.attn(h, H, W), kernels), self.norm2, dtype)
        return x, drop_branch(self.drop_path, self.mlp(h), kernels)


class ResT(Backbone):
    """ResTv1. Same API as ``ResTV2``: logits, ``forward_features``, ``forward_intermediates``."""

    embed_names = ("stem", "patch_embed_2", "patch_embed_3", "patch_embed_4")

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: list[int] = [64, 128, 256, 512],
        num_heads: list[int] = [1, 2, 4, 8],
        mlp_ratios: list[float] = [4, 4, 4, 4],
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        depths: list[int] = [2, 2, 2, 2],
        sr_ratios: list[int] = [8, 4, 2, 1],
        norm_layer: type[nn.Module] = nn.LayerNorm,
        apply_transform: bool = False,
        global_pool: str = "avg",
        backend: str | None = None,
    ):
        super().__init__()
        backend = self._init_common(in_chans, num_classes, global_pool, embed_dims, backend)

        self.stem = BasicStem(in_chans, embed_dims[0], backend)
        self.patch_embed_2 = PatchEmbedV1(embed_dims[0], embed_dims[1], backend)
        self.patch_embed_3 = PatchEmbedV1(embed_dims[1], embed_dims[2], backend)
        self.patch_embed_4 = PatchEmbedV1(embed_dims[2], embed_dims[3], backend)

        self._add_stages(
            depths,
            drop_path_rate,
            lambda i, dp: Block(
                embed_dims[i],
                num_heads[i],
                mlp_ratios[i],
                qkv_bias,
                qk_scale,
                drop_rate,
                attn_drop_rate,
                dp,
                norm_layer,
                sr_ratios[i],
                apply_transform,
                backend,
            ),
        )

        self.norm = norm_layer(embed_dims[3])
        self.head = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)


def _init_weights(m: nn.Module) -> None:
    """The published ResTv1 init: Kaiming (fan-out) convs, trunc-normal linears, norms at identity."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# The four released variants: qkv_bias, head transform, MLP ratio 4, sr 8/4/2/1, heads 1/2/4/8.
_RELEASED = dict(
    num_heads=[1, 2, 4, 8], mlp_ratios=[4, 4, 4, 4], qkv_bias=True, sr_ratios=[8, 4, 2, 1], apply_transform=True
)

#: The architectures of the four released ResTv1 models (``ResT`` keyword arguments).
ARCHS = {
    "rest_lite": dict(**_RELEASED, embed_dims=[64, 128, 256, 512], depths=[2, 2, 2, 2]),
    "rest_small": dict(**_RELEASED, embed_dims=[64, 128, 256, 512], depths=[2, 2, 6, 2]),
    "rest_base": dict(**_RELEASED, embed_dims=[96, 192, 384, 768], depths=[2, 2, 6, 2]),
    "rest_large": dict(**_RELEASED, embed_dims=[96, 192, 384, 768], depths=[2, 2, 18, 2]),
}


def _create(name: str, checkpoint_path: str | None, **kwargs) -> ResT:
    return build(ResT, checkpoint_path, **{**ARCHS[name], **kwargs})


def rest_lite(checkpoint_path: str | None = None, **kwargs) -> ResT:
    """ResT-Lite: 10.51M params, 1.53 GMACs at 224."""
    return _create("rest_lite", checkpoint_path, **kwargs)


def rest_small(checkpoint_path: str | None = None, **kwargs) -> ResT:
    """ResT-S: 13.68M params, 2.09 GMACs at 224."""
    return _create("rest_small", checkpoint_path, **kwargs)


def rest_base(checkpoint_path: str | None = None, **kwargs) -> ResT:
    """ResT-B: 30.33M params, 4.63 GMACs at 224."""
    return _create("rest_base", checkpoint_path, **kwargs)


def rest_large(checkpoint_path: str | None = None, **kwargs) -> ResT:
    """ResT-L: 51.68M params, 8.36 GMACs at 224."""
    return _create("rest_large", checkpoint_path, **kwargs)


document_factories(ResT, rest_lite, rest_small, rest_base, rest_large)
