"""Building blocks shared by ResTv2 and ResTv1: pixel attention, stems, patch embeds, MLP, drop path.

Every map size is taken from the tensor a conv produced, never computed as ``H // stride``,
so any input of at least 32x32 runs (a stride-2, pad-1, 3x3 conv gives ``ceil(H / 2)``).
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.module_tracker import ModuleTracker

import restv2_kernels
from restv2_kernels import reference
from restv2_kernels.backend import check_backend, use_kernels
from restv2_kernels.upsample.reference import crop

MIN_INPUT_SIZE = 32


def ops_for(backend: str, x: torch.Tensor) -> ModuleType:
    """``restv2_kernels`` (the fused ops) when ``backend`` runs the kernels for activations like
    ``x``, else ``restv2_kernels.reference`` (the same signatures, eager)."""
    return restv2_kernels if use_kernels(backend, x) else reference


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes matmuls and convs in for ``x``'s device, None outside autocast.

    The fused ops are custom ops, which autocast does not cast: the kernel path casts their
    arguments itself, where autocast would have cast them for the eager op it replaces."""
    device = x.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def cast_all(dtype: torch.dtype | None, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """``tensors`` in ``dtype`` (None: unchanged); None entries stay None."""
    if dtype is None:
        return list(tensors)
    return [None if t is None else t.to(dtype) for t in tensors]


def calls_plainly(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether calling ``module`` computes ``cls.forward`` of its current parameters, so that the
    kernel path may read them instead of calling it: an instance of ``cls``, or of a subclass
    that keeps its forward (a parametrized module, whose ``weight`` is computed on access), with
    no hooks of its own. A replacement that computes more (a LoRA layer, a quantized one) or a
    hooked module (pruning's mask, old-style weight norm, a feature or gradient hook: only a call
    runs them) is called instead, as the reference calls it."""
    return (
        isinstance(module, cls)
        and type(module).forward is cls.forward
        and not (
            module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks or module._backward_hooks
        )
    )


def is_plain_layer_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` is a LayerNorm the fused ``add_layer_norm`` computes: over the last dim,
    with weight and bias, called plainly (``calls_plainly``)."""
    return (
        calls_plainly(norm, nn.LayerNorm)
        and len(norm.normalized_shape) == 1
        and norm.weight is not None
        and norm.bias is not None
    )


def is_plain_instance_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` is the InstanceNorm2d ``emsa_attention_mixed`` computes (with its eps): no
    affine parameters, no running statistics, called plainly (``calls_plainly``)."""
    return calls_plainly(norm, nn.InstanceNorm2d) and not norm.affine and not norm.track_running_stats


class DroppedBranch(NamedTuple):
    """A residual branch whose stochastic depth is still to be applied, ``branch * mask / keep``
    (mask: [B, 1, ...], 0 or 1 in the branch's dtype, drawn as ``DropPath`` draws it), by the
    add that takes it: inside the fused add + LayerNorm on the kernel path (``add_norm``), so
    that it costs no pass of its own, forward or backward; else in the add (``add_branch``)."""

    branch: torch.Tensor
    mask: torch.Tensor
    keep: float

    def factors(self) -> torch.Tensor:
        """[B] fp32: 0 for a dropped sample, 1 / keep for a kept one."""
        return torch.where(self.mask.view(-1) != 0, 1.0 / self.keep, 0.0)


def drop_branch(drop_path: nn.Module, branch: torch.Tensor, kernels: bool) -> torch.Tensor | DroppedBranch:
    """``drop_path(branch)``; on the kernel path, where ``drop_path`` is a plain ``DropPath``
    (``calls_plainly``) that drops in this call, the branch and its mask (``DroppedBranch``),
    drawn as its forward draws it (the same random numbers), for the next add to apply."""
    if kernels and calls_plainly(drop_path, DropPath):
        mask = drop_path.mask(branch)
        return branch if mask is None else DroppedBranch(branch, mask, drop_path.keep)
    return drop_path(branch)


def add_branch(x: torch.Tensor, branch: torch.Tensor | DroppedBranch | None) -> torch.Tensor:
    """``x + branch`` (x where branch is None); a ``DroppedBranch``'s ``x + branch * mask /
    keep`` in one pass (``addcmul``; rounded once, where ``DropPath`` rounds the scaled branch
    before the add), whose backward is one pass more (the branch's gradient)."""
    if isinstance(branch, DroppedBranch):
        return torch.addcmul(x, branch.branch, branch.mask, value=1.0 / branch.keep)
    return x if branch is None else x + branch


def add_norm(
    ops: ModuleType,
    x: torch.Tensor,
    branch: torch.Tensor | DroppedBranch | None,
    norm: nn.Module,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + branch, norm(x + branch))``, fused on the kernel path when ``norm`` is a plain
    LayerNorm, a ``DroppedBranch``'s drop path included; ``branch`` None: ``(x, norm(x))``."""
    if ops is restv2_kernels and is_plain_layer_norm(norm):
        if isinstance(branch, DroppedBranch):
            args = (branch.branch, norm.weight, norm.bias, norm.eps, out_dtype, branch.factors())
            return ops.add_layer_norm(x, *args)
        return ops.add_layer_norm(x, branch, norm.weight, norm.bias, norm.eps, out_dtype)
    x = add_branch(x, branch)
    return x, norm(x)


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, fold: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (weight, bias) of ``conv`` with ``bn`` folded in, where ``fold`` and it can be: both
    modules plain (``calls_plainly``), ``bn`` in eval mode (running statistics), zero padding;
    else None. Computed on the fly: the parameters and checkpoint keys stay those of the two
    modules."""
    plain = calls_plainly(conv, nn.Conv2d) and calls_plainly(bn, nn.BatchNorm2d)
    if not (fold and plain) or bn.training or bn.running_var is None or conv.padding_mode != "zeros":
        return None
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight, bias


def _conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, fold: bool) -> torch.Tensor:
    """``bn(conv(x))``; with ``fold`` (and where ``_folded`` can), one conv with the BatchNorm
    folded into its weight and bias (training keeps the true BatchNorm)."""
    folded = _folded(conv, bn, fold)
    return bn(conv(x)) if folded is None else _conv(conv, x, *folded)


def conv_bn_relu(conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: nn.Module, x: torch.Tensor, kernels: bool) -> torch.Tensor:
    """``relu(bn(conv(x)))``. On the kernel path (``kernels``), with ``relu`` a plain ReLU:
    where the BatchNorm folds (``_folded``: eval mode), the conv runs without the fold's bias
    and one pass adds it and applies the ReLU (``restv2_kernels.bias_relu``; cuDNN convs take no
    bias, so PyTorch would add it in a pass of its own, and the ReLU make another); where it
    normalises with the batch's statistics (training) and is a plain BatchNorm2d, it and the
    ReLU are ``restv2_kernels.batch_norm_relu`` (``batch_norm_relu``)."""
    if not (kernels and calls_plainly(relu, nn.ReLU)):
        return relu(conv_bn(conv, bn, x, kernels))
    folded = _folded(conv, bn, kernels)
    if folded is not None:
        weight, bias = folded
        y = _conv(conv, x, weight, None)
        return restv2_kernels.bias_relu(y, bias.to(y.dtype))
    if calls_plainly(bn, nn.BatchNorm2d):
        return batch_norm_relu(bn, conv(x))
    return relu(bn(conv(x)))


def batch_norm_relu(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``relu(bn(x))`` in ``restv2_kernels.batch_norm_relu``, with the arguments BatchNorm2d's
    forward passes F.batch_norm (it counts the batch and picks the momentum as it does)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # a cumulative average
            momentum = 1.0 / float(bn.num_batches_tracked)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    running = not bn.training or bn.track_running_stats
    return restv2_kernels.batch_norm_relu(
        x,
        bn.running_mean if running else None,
        bn.running_var if running else None,
        bn.weight,
        bn.bias,
        batch_stats,
        momentum,
        bn.eps,
    )


def add_upsample(
    ops: ModuleType, up: nn.Module, up_norm: nn.Module, x: torch.Tensor, v: torch.Tensor, sr: int
) -> torch.Tensor:
    """EMSAv2's upsample branch added to the attention's output, ``x + up_norm(crop(up(v)))``:
    x [B, H, W, C], v [B, Hr, Wr, C] (channels last) -> [B, H, W, C], contiguous. One op
    (``ops.upsample_add``: the kernel or its eager reference) reading the parameters where ``up``
    is the plain Sequential(Conv2d with a bias, PixelShuffle(sr)) and ``up_norm`` a plain
    LayerNorm (``calls_plainly``, ``is_plain_layer_norm``); else the modules are called, as the
    published code calls them, so that pruning's mask, a hook or a replacement takes effect."""
    conv = up[0] if isinstance(up, nn.Sequential) and len(up) == 2 else None
    plain = (
        conv is not None
        and calls_plainly(up, nn.Sequential)
        and calls_plainly(conv, nn.Conv2d)
        and conv.bias is not None
        and conv.padding_mode == "zeros"
        and calls_plainly(up[1], nn.PixelShuffle)
        and up[1].upscale_factor == sr
        and is_plain_layer_norm(up_norm)
    )
    if plain:
        # under autocast the activations are half while the parameters stay fp32
        params = cast_all(x.dtype, conv.weight, conv.bias, up_norm.weight, up_norm.bias)
        return ops.upsample_add(x, v, *params, sr, up_norm.eps)
    H, W = x.shape[1:3]
    branch = crop(up(v.permute(0, 3, 1, 2)), H, W)
    return (x + up_norm(branch.permute(0, 2, 3, 1))).contiguous()


def check_image(x: torch.Tensor, in_chans: int, weight: torch.Tensor | None = None) -> None:
    """Raises TypeError/ValueError unless ``x`` is a floating (B, in_chans, H, W) batch with
    H, W >= 32 that the stem's first conv (``weight``, where given) takes: on its device and,
    outside autocast, in its dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected an image tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"expected a floating-point image batch, got {x.dtype} (convert it first, e.g. x.float() / 255, "
            "and normalise it as the model was trained)"
        )
    if weight is not None and x.device != weight.device:
        raise ValueError(
            f"the image batch is on {x.device}, but the model is on {weight.device}; move one to the other"
        )
    if weight is not None and x.dtype != weight.dtype and autocast_dtype(x) is None:
        raise TypeError(
            f"the image batch is {x.dtype}, but the model's parameters are {weight.dtype}; cast one to the "
            "other's dtype, or run under torch.autocast"
        )
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
    """Stochastic depth: drops the whole residual branch per sample while training. On the
    kernel path the blocks apply it inside the add that follows (``drop_branch``)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    @property
    def keep(self) -> float:
        """The probability a sample's branch is kept."""
        return 1.0 - self.drop_prob

    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """A random [B, 1, ...] mask of 0 (dropped) and 1 (kept, with probability ``keep``) in x's
        dtype; None where nothing is dropped (eval mode, drop_prob 0)."""
        if self.drop_prob == 0.0 or not self.training:
            return None
        return x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(self.keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask(x)
        return x if mask is None else x * mask / self.keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PA(nn.Module):
    """Pixel attention, the positional encoding: ``x * sigmoid(depthwise_conv3x3(x))``, one
    fused pass on the kernel path (``restv2_kernels.pixel_attention``; eager where ``pa_conv`` is
    replaced or hooked: ``calls_plainly``)."""

    def __init__(self, dim: int, backend: str = "auto"):
        super().__init__()
        self.pa_conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernels(self.backend, x) and calls_plainly(self.pa_conv, nn.Conv2d):
            weight, bias = cast_all(x.dtype, self.pa_conv.weight, self.pa_conv.bias)
            return restv2_kernels.pixel_attention(x, weight, bias)
        return x * torch.sigmoid(self.pa_conv(x))


def conv_bn_pa(conv: nn.Conv2d, bn: nn.BatchNorm2d, pa: PA, x: torch.Tensor, kernels: bool) -> torch.Tensor:
    """``pa(bn(conv(x)))``. On the kernel path (``kernels``), where the BatchNorm folds
    (``_folded``) and PA is plain, the conv runs without the fold's bias and PA adds it to every
    tap it loads (``restv2_kernels.pixel_attention``'s ``x_bias``): cuDNN convs take no bias, so
    PyTorch would add it in a pass of its own over the conv's output."""
    plain_pa = use_kernels(pa.backend, x) and calls_plainly(pa, PA) and calls_plainly(pa.pa_conv, nn.Conv2d)
    folded = _folded(conv, bn, kernels) if plain_pa else None
    if folded is None:
        return pa(conv_bn(conv, bn, x, kernels))
    weight, bias = folded
    y = _conv(conv, x, weight, None)
    pa_weight, pa_bias, x_bias = cast_all(y.dtype, pa.pa_conv.weight, pa.pa_conv.bias, bias)
    return restv2_kernels.pixel_attention(y, pa_weight, pa_bias, x_bias)


def conv_pa_norm(conv: nn.Conv2d, pa: PA, norm: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``norm(to_tokens(pa(conv(x))))`` and the map's height and width: how a stem or patch
    embed ends. On the kernel path, all plain (``calls_plainly``), the conv runs without its
    bias and PA adds it to every tap it loads (``restv2_kernels.pixel_attention``'s ``x_bias``):
    cuDNN convs take no bias, so PyTorch would add it in a pass of its own over the conv's
    output, and read the output's gradient once more for the bias gradient. Where no gradient
    is needed and ``norm`` is a plain LayerNorm, the same pass normalises each pixel
    (``restv2_kernels.pixel_attention_layer_norm``): PA's output never goes to memory."""
    fuse = (
        use_kernels(pa.backend, x)
        and calls_plainly(pa, PA)
        and calls_plainly(pa.pa_conv, nn.Conv2d)
        and calls_plainly(conv, nn.Conv2d)
        and conv.bias is not None
        and conv.padding_mode == "zeros"
    )
    if not fuse:
        y = pa(conv(x))
        return norm(to_tokens(y)), *y.shape[-2:]
    y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    H, W = y.shape[-2:]
    weight, bias, x_bias = cast_all(y.dtype, pa.pa_conv.weight, pa.pa_conv.bias, conv.bias)
    tensors = (x, conv.weight, conv.bias, pa.pa_conv.weight, pa.pa_conv.bias, *norm.parameters())
    if is_plain_layer_norm(norm) and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        # CUDA's autocast runs a LayerNorm in fp32 (the residual stream it starts is fp32); the
        # CPU's keeps the input's dtype
        out_dtype = torch.float32 if x.is_cuda and autocast_dtype(x) is not None else None
        y = restv2_kernels.pixel_attention_layer_norm(
            y, weight, bias, x_bias, norm.weight, norm.bias, norm.eps, out_dtype
        )
        return to_tokens(y), H, W
    return norm(to_tokens(restv2_kernels.pixel_attention(y, weight, bias, x_bias))), H, W


class Mlp(nn.Module):
    """Linear -> GELU -> (dropout) -> Linear -> (dropout). On the kernel path fc1's GEMM applies
    the GELU in its epilogue, and the backward the GELU derivative in fc2's input-gradient GEMM
    (``restv2_kernels.mlp``; ``linear_gelu`` alone when dropout is active or fc2 is replaced or
    hooked; eager when fc1 or the GELU is: ``calls_plainly``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1_gelu = calls_plainly(self.fc1, nn.Linear) and calls_plainly(self.act, nn.GELU)
        if use_kernels(self.backend, x) and fc1_gelu and self.act.approximate == "none":
            dtype = autocast_dtype(x)
            if self.training and self.drop.p > 0 or not calls_plainly(self.fc2, nn.Linear):
                # dropout between the layers, or an fc2 to call: fc1 + GELU fused only
                x, w1, b1 = cast_all(dtype, x, self.fc1.weight, self.fc1.bias)
                return self.drop(self.fc2(self.drop(restv2_kernels.linear_gelu(x, w1, b1))))
            # the whole MLP: its backward also fuses the GELU derivative into fc2's input gradient
            args = cast_all(dtype, x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
            return restv2_kernels.mlp(*args)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


# ----------------------------------------------------------------------------- ResTv2


class ConvStem(nn.Module):
    """ResTv2 stem, stride 4: two 3x3/s2 conv-BN-ReLU, a 1x1 conv, PA, then LN on tokens."""

    def __init__(self, in_chans: int, dim: int, backend: str = "auto"):
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
        self.pos = PA(dim, backend)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if use_kernels(self.backend, x):  # BatchNorm folded into the convs at inference
            p = self.proj
            x = conv_bn_relu(p[0], p[1], p[2], x, kernels=True)
            x = conv_bn_relu(p[3], p[4], p[5], x, kernels=True)
            return conv_pa_norm(p[6], self.pos, self.norm, x)  # PA adds p[6]'s bias
        x = self.pos(self.proj(x))
        H, W = x.shape[-2:]
        return self.norm(to_tokens(x)), H, W


class PatchEmbed(nn.Module):
    """ResTv2 downsampling between stages: 3x3/s2 conv, PA, then LN on tokens."""

    def __init__(self, in_dim: int, dim: int, backend: str = "auto"):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, kernel_size=3, stride=2, padding=1)
        self.pos = PA(dim, backend)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        return conv_pa_norm(self.proj, self.pos, self.norm, x)  # on the kernel path PA adds the conv's bias


# ----------------------------------------------------------------------------- ResTv1


class BasicStem(nn.Module):
    """ResTv1 stem, stride 4: conv-BN-ReLU (s2), conv-BN-ReLU (s1), conv (s2), then PA."""

    def __init__(self, in_chans: int, dim: int, backend: str = "auto"):
        super().__init__()
        hidden = dim // 2
        self.conv1 = nn.Conv2d(in_chans, hidden, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.pos = PA(dim, backend)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        fold = use_kernels(self.backend, x)  # BatchNorm folded into the convs at inference
        x = conv_bn_relu(self.conv1, self.norm1, self.act, x, fold)
        x = conv_bn_relu(self.conv2, self.norm2, self.act, x, fold)
        x = self.pos(self.conv3(x))
        H, W = x.shape[-2:]
        return to_tokens(x), H, W


class PatchEmbedV1(nn.Module):
    """ResTv1 downsampling between stages: 3x3/s2 conv, BatchNorm, then PA (no LN). On the kernel
    path in eval mode the BatchNorm folds into the conv and PA adds its bias (``conv_bn_pa``)."""

    def __init__(self, in_dim: int, dim: int, backend: str = "auto"):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(dim)
        self.pos = PA(dim, backend)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = conv_bn_pa(self.conv, self.norm, self.pos, x, kernels=use_kernels(self.backend, x))
        H, W = x.shape[-2:]
        return to_tokens(x), H, W


class _LinearAndInput(torch.autograd.Function):
    """``(x @ weight.T + bias, x)``: the second output is x again (a view on this node), for x's
    other reader. Its gradient reaches this backward, which adds x's own into it in the GEMM
    that makes x's own: ``dx_other.addmm_(dy, weight)``, cuBLAS reading it as C (beta = 1) and
    writing the sum over it, instead of writing x's own gradient and adding the two [tokens, C]
    gradients in another pass. In place, because PyTorch's out-of-place ``addmm`` with a matrix
    C first copies C into its output (``addmm_out_cuda_impl``), which saves nothing.

    Writing over a gradient is safe only where nothing else holds it: ``overwrite`` is set by
    the caller where x's reader is a plain module whose backward makes a fresh input gradient
    that goes nowhere else (``reader_is_plain``), and a backward that builds a graph
    (``create_graph``) never writes in place. Elsewhere the two gradients are added out of place.
    The rest is nn.Linear's backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, overwrite):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.overwrite = overwrite
        ctx.set_materialize_grads(False)  # an output that reached no loss: None, not zeros
        return F.linear(x, weight, bias), x

    @staticmethod
    def backward(ctx, dy, dx_other):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        if dy is None:  # only x's other uses reached the loss
            return dx_other, None, None, None
        N, K = weight.shape
        dy2 = dy.reshape(-1, N)
        dx = dw = db = None
        if need_x:
            if dx_other is None:
                dx = dy2 @ weight
            elif ctx.overwrite and not torch.is_grad_enabled():
                dx = dx_other.reshape(-1, K).addmm_(dy2, weight)  # a reshape that copies is ours too
            else:
                dx = torch.addmm(dx_other.reshape(-1, K), dy2, weight)
            dx = dx.view(x.shape)
        if need_w:
            dw = dy2.t() @ x.reshape(-1, K)
        if need_b and ctx.has_bias:
            db = dy2.sum(0)
        return dx, dw, db, None


# nn.Module's global hooks (torch.nn.modules.module): they run on every module
_GLOBAL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


def global_hooks_only_observe() -> bool:
    """Whether every global module hook is PyTorch's ``ModuleTracker``'s (the traffic model's and
    FlopCounterMode's), which only notes which module runs, or there are none."""
    hooks = [hook for name in _GLOBAL_HOOKS for hook in getattr(nn.modules.module, name, {}).values()]
    return all(isinstance(getattr(hook, "__self__", None), ModuleTracker) for hook in hooks)


def reader_is_plain(reader: nn.Module) -> bool:
    """Whether ``reader``'s backward makes a fresh gradient for its input that nothing else can
    keep: a plain Conv2d or Linear (``calls_plainly``: no hooks of its own) and no global module
    hook but ``ModuleTracker``'s (``global_hooks_only_observe``)."""
    plain = calls_plainly(reader, nn.Conv2d) or calls_plainly(reader, nn.Linear)
    return plain and global_hooks_only_observe()


def linear_and_input(
    linear: nn.Module, x: torch.Tensor, kernels: bool, reader: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(x), x)``, for an x that another layer reads too (EMSA's q projection, and its
    spatial reduction's conv, or kv where there is none: ``reader``). With ``kernels``, a
    gradient to take and a plain Linear in x's dtype (under autocast: cast to it), x comes back
    from the Linear's autograd node, whose backward adds x's own gradient into the reader's in
    its input-gradient GEMM (``_LinearAndInput``; in place where ``reader_is_plain``)."""
    if kernels and torch.is_grad_enabled() and x.requires_grad and calls_plainly(linear, nn.Linear):
        weight, bias = cast_all(autocast_dtype(x), linear.weight, linear.bias)
        if weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
            return _LinearAndInput.apply(x, weight, bias, reader is not None and reader_is_plain(reader))
    return linear(x), x


def reduce_tokens(x: torch.Tensor, H: int, W: int, sr: nn.Conv2d, norm: nn.LayerNorm) -> tuple[torch.Tensor, int, int]:
    """EMSA's spatial reduction: [B, H*W, C] -> depthwise strided conv -> LN -> [B, Hr*Wr, C].

    The tokens viewed as a map are already channels-last in memory, so the conv reads them in
    place and its channels-last output turns back into tokens without a copy.
    """
    x = sr(to_map(x, H, W))
    Hr, Wr = x.shape[-2:]
    return norm(to_tokens(x)), Hr, Wr


def stage_indices(indices: int | list[int] | tuple[int, ...] | None, num_stages: int = 4) -> list[int]:
    """timm's convention: None -> all stages, int n -> the last n, a sequence -> those (negatives
    count from the end). Returns them absolute and sorted."""
    if indices is None:
        return list(range(num_stages))
    if isinstance(indices, int):
        if not 1 <= indices <= num_stages:
            raise ValueError(f"indices must be between 1 and {num_stages} (the last n stages), got {indices}")
        return list(range(num_stages - indices, num_stages))
    if not indices or any(
        isinstance(i, bool) or not isinstance(i, int) or not -num_stages <= i < num_stages for i in indices
    ):
        raise ValueError(f"stage indices must be ints in [-{num_stages}, {num_stages}), got {list(indices)}")
    out = sorted({i % num_stages for i in indices})
    if len(out) != len(indices):
        raise ValueError(f"stage indices name a stage twice: {list(indices)}")
    return out
