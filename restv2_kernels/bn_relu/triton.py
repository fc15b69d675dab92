"""Triton kernel for the stems' bias + ReLU: ``out = relu(x + bias)``, bias per channel, in one
pass.

Where it runs: at inference the kernel path folds each stem BatchNorm into the conv before it
(``restv2.layers.conv_bn_relu``). The folded conv has a bias, and cuDNN convs take none:
PyTorch would add it in a pass of its own over the conv's output (a read and a write), then
the ReLU would make another. This kernel makes one (x read, out written: 2 + 2 bytes an
element in 16 bits), on the conv's output without its bias.

Layout: x dense in NCHW or channels-last memory (a conv's output is one or the other); the
kernel walks the storage flat and finds each element's channel as ``(i // INNER) % C``
(``INNER`` = 1 channels-last, H * W in NCHW). Other layouts cost one channels-last copy. out
has x's layout. The sum is in fp32 and rounded once, as eager's add; NaN propagates, as in
``torch.relu``.

Backward: aten (``threshold_backward`` on the saved output, then the bias gradient's sum), as
the unfused ops' backward is: the op runs where the BatchNorm is frozen (inference, or a
detector fine-tuned with frozen BatchNorm statistics), not in a training step of the
classifier.

BatchNorm + ReLU (``batch_norm_relu``, F.batch_norm's arguments): in a training step the
BatchNorm normalises with the batch's statistics and cannot fold. Eager runs the BatchNorm
(statistics, then the normalisation: x read twice, y written), an in-place ReLU (y read and
written), and in the backward ``threshold_backward`` (dout and y read, the masked gradient
written) and the BatchNorm's backward (that gradient and x read twice, dx written). Here, on a
channels-last [P = B*H*W, C] map (out is channels-last; another layout costs a channels-last
copy in each pass that reads it, and a conv on a channels-last map writes one):

1. ``_bn_stats_kernel``: a bounded number of programs per channel block, each over a
   contiguous range of pixel blocks, combines each block's count, mean and centred sum of
   squares into its own (Chan et al.'s pairwise update, not sum and sum of squares, which
   cancel where the mean is large against the spread) and stores them in its own slot; torch
   combines the slots (no atomics: deterministic). x read once.
2. ``_bn_relu_fwd_kernel``: ``out = relu((x - mean) * rstd * weight + bias)``, rounded once.
   x read, out written. The running statistics are updated by torch on the [C] vectors.
3. Backward, ``_bn_relu_bwd_sums_kernel``: the ReLU's mask is recomputed from x (the same
   fp32 expression as the forward, rounded to out's dtype as the stored output was), so the
   output is never read; per channel ``sum(g)`` and ``sum(g * x_hat)`` of the masked
   gradient g, as in 1. dout and x read.
4. ``_bn_relu_bwd_dx_kernel``: ``dx = weight * rstd * (g - (sum(g) + x_hat * sum(g x_hat)) / P)``
   (batch statistics; ``weight * rstd * g`` with running ones). dout and x read, dx written.

HBM bytes per element in 16 bits: forward 2 + 2 + 2 (eager 10: its BatchNorm reads x for the
statistics and again to normalise), backward 4 + 6 (eager 16). Each step is its own custom op,
so a traffic count sees every pass (``benchmarks/traffic.py`` counts each eager op as one pass
over its arguments: 8 and 12 there).
"""

import contextlib

import torch
import triton
import triton.language as tl

from .. import plans
from ..backend import check_kernel_device
from .reference import check_batch_norm_relu_inputs, check_bias_relu_inputs

__all__ = ["bias_relu", "batch_norm_relu"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# The sizes only bound the mask and the channel index: not specialised, so a new image size
# reuses the compiled kernel.
@triton.jit(do_not_specialize=["N", "C", "INNER"])
def _bias_relu_kernel(x_ptr, bias_ptr, out_ptr, N, C, INNER, BLOCK: tl.constexpr):
    """x, out: N elements, dense; bias: [C]. out[i] = relu(x[i] + bias[(i // INNER) % C])."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    c = (offs // INNER) % C
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = v + tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
    v = tl.where(v < 0.0, 0.0, v)  # NaN stays NaN (tl.maximum would drop it)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile(pid_p, offs_c, c_mask, P, C, BLOCK_P: tl.constexpr):
    """Offsets and mask of the [BLOCK_P, BLOCK_C] tile of pixel block ``pid_p`` of a dense
    channels-last [P, C] map (int64 offsets: P * C may pass 2**31)."""
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (offs_p < P)[:, None] & c_mask[None, :]
    return offs_p.to(tl.int64)[:, None] * C + offs_c[None, :], mask


@triton.jit
def _channel_vectors(mean_ptr, rstd_ptr, w_ptr, b_ptr, offs_c, c_mask):
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    return mean, rstd, w, b


@triton.jit
def _normalized(x, mean, rstd, w, b):
    """(x_hat, the value before the ReLU) of an fp32 tile: one expression for the forward and
    both backward kernels, so that the backward's mask is the forward's."""
    x_hat = (x - mean[None, :]) * rstd[None, :]
    return x_hat, x_hat * w[None, :] + b[None, :]


@triton.jit
def _kept(v, mask, out_dtype: tl.constexpr):
    """Where the ReLU passes the gradient: as ``threshold_backward`` on the stored output (v
    rounded to out's dtype), which passes it unless the output is <= 0 (NaN passes)."""
    r = v.to(out_dtype).to(tl.float32)
    return mask & ((r > 0.0) | (r != r))


# The sizes only bound masks and loops: not specialised, so a new image size reuses the kernels.
@triton.jit(do_not_specialize=["P", "C", "BLOCKS_PER_PROGRAM"])
def _bn_stats_kernel(x_ptr, part_ptr, P, C, BLOCKS_PER_PROGRAM, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """x: [P, C] dense; part: [programs, 3, C] fp32, per program: the count of its pixels, their
    mean and their sum of squared deviations from it, per channel (program (i, j): pixel
    blocks i * BLOCKS_PER_PROGRAM ..., channel block j)."""
    pid = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    n = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for i in range(BLOCKS_PER_PROGRAM):
        offs, mask = _tile(pid * BLOCKS_PER_PROGRAM + i, offs_c, c_mask, P, C, BLOCK_P)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        n_b = tl.sum(mask.to(tl.float32), axis=0)
        mean_b = tl.sum(x, axis=0) / tl.maximum(n_b, 1.0)
        d = tl.where(mask, x - mean_b[None, :], 0.0)
        total = n + n_b
        delta = mean_b - mean
        frac = n_b / tl.maximum(total, 1.0)  # an empty block (past P) changes nothing
        mean = mean + delta * frac
        m2 = m2 + tl.sum(d * d, axis=0) + delta * delta * n * frac
        n = total
    slot = part_ptr + pid * 3 * C + offs_c
    tl.store(slot, n, mask=c_mask)
    tl.store(slot + C, mean, mask=c_mask)
    tl.store(slot + 2 * C, m2, mask=c_mask)


@triton.jit(do_not_specialize=["P", "C"])
def _bn_relu_fwd_kernel(
    x_ptr, out_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr
):
    """x, out: [P, C] dense; mean, rstd, w, b: [C]. out = relu((x - mean) * rstd * w + b)."""
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs, mask = _tile(tl.program_id(0), offs_c, c_mask, P, C, BLOCK_P)
    mean, rstd, w, b = _channel_vectors(mean_ptr, rstd_ptr, w_ptr, b_ptr, offs_c, c_mask)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _, v = _normalized(x, mean, rstd, w, b)
    v = tl.where(v < 0.0, 0.0, v)  # NaN stays NaN, as through torch.relu
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["P", "C", "BLOCKS_PER_PROGRAM"])
def _bn_relu_bwd_sums_kernel(
    dout_ptr,
    x_ptr,
    mean_ptr,
    rstd_ptr,
    w_ptr,
    b_ptr,
    part_ptr,
    P,
    C,
    BLOCKS_PER_PROGRAM,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dout, x: [P, C] dense; part: [programs, 2, C] fp32, per program: sum(g) and
    sum(g * x_hat) per channel of the gradient g the ReLU passes."""
    pid = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mean, rstd, w, b = _channel_vectors(mean_ptr, rstd_ptr, w_ptr, b_ptr, offs_c, c_mask)
    sum_g = tl.zeros([BLOCK_C], tl.float32)
    sum_gx = tl.zeros([BLOCK_C], tl.float32)
    for i in range(BLOCKS_PER_PROGRAM):
        offs, mask = _tile(pid * BLOCKS_PER_PROGRAM + i, offs_c, c_mask, P, C, BLOCK_P)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x_hat, v = _normalized(x, mean, rstd, w, b)
        g = tl.where(_kept(v, mask, dout_ptr.dtype.element_ty), dout, 0.0)
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(g * x_hat, axis=0)
    slot = part_ptr + pid * 2 * C + offs_c
    tl.store(slot, sum_g, mask=c_mask)
    tl.store(slot + C, sum_gx, mask=c_mask)


@triton.jit(do_not_specialize=["P", "C"])
def _bn_relu_bwd_dx_kernel(
    dout_ptr,
    x_ptr,
    dx_ptr,
    mean_ptr,
    rstd_ptr,
    w_ptr,
    b_ptr,
    sum_g_ptr,
    sum_gx_ptr,
    P,
    C,
    BATCH_STATS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dout, x, dx: [P, C] dense; the rest [C] (the sums fp32). With BATCH_STATS the statistics
    are the batch's (their gradient flows into dx), else constants (running statistics)."""
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs, mask = _tile(tl.program_id(0), offs_c, c_mask, P, C, BLOCK_P)
    mean, rstd, w, b = _channel_vectors(mean_ptr, rstd_ptr, w_ptr, b_ptr, offs_c, c_mask)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x_hat, v = _normalized(x, mean, rstd, w, b)
    g = tl.where(_kept(v, mask, dout_ptr.dtype.element_ty), dout, 0.0)
    if BATCH_STATS:
        sum_g = tl.load(sum_g_ptr + offs_c, mask=c_mask, other=0.0)
        sum_gx = tl.load(sum_gx_ptr + offs_c, mask=c_mask, other=0.0)
        g = g - (sum_g[None, :] + x_hat * sum_gx[None, :]) / P.to(tl.float32)
    dx = g * (w * rstd)[None, :]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launcher


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernel writes is allocated here (tests patch it to fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _dense(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x or a channels-last copy of it, INNER): x dense in channels-last or NCHW memory."""
    B, C, H, W = x.shape
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, 1
    if x.is_contiguous():
        return x, H * W
    return x.contiguous(memory_format=torch.channels_last), 1


def _fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x: [B, C, H, W] -> out: [B, C, H, W] in x's memory format (channels-last if x is neither)."""
    x, inner = _dense(x)
    B, C, H, W = x.shape
    if inner == 1:  # channels-last: a [B, H, W, C] buffer seen as [B, C, H, W]
        out = _empty((B, H, W, C), x.dtype, x.device).permute(0, 3, 1, 2)
    else:
        out = _empty((B, C, H, W), x.dtype, x.device)
    n = x.numel()
    if n == 0:
        return out
    plan = plans.bias_relu_plan(n, x.dtype, plans.device_target(x.device))
    with _device_ctx(x):
        plans.launch(_bias_relu_kernel, plan, x, bias.contiguous(), out, n, C, inner)
    return out


@torch.library.custom_op("restv2::bias_relu_fwd", mutates_args=())
def bias_relu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _fwd(x, bias)


@bias_relu_fwd.register_fake
def _(x, bias):
    dense = x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous()
    return torch.empty_like(x) if dense else torch.empty_like(x, memory_format=torch.channels_last)


class _BiasReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        out = torch.ops.restv2.bias_relu_fwd(x, bias)
        ctx.save_for_backward(out)  # as an in-place ReLU keeps its output
        return out

    @staticmethod
    def backward(ctx, dout):
        (out,) = ctx.saved_tensors
        dx = torch.ops.aten.threshold_backward(dout, out, 0)
        dbias = dx.sum((0, 2, 3)) if ctx.needs_input_grad[1] else None
        return dx, dbias


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """t itself where it is dense channels-last, else a channels-last copy."""
    return t if t.is_contiguous(memory_format=torch.channels_last) else t.contiguous(memory_format=torch.channels_last)


def _out_like(x: torch.Tensor) -> torch.Tensor:
    """An output of x's shape and dtype, dense channels-last."""
    B, C, H, W = x.shape
    return _empty((B, H, W, C), x.dtype, x.device).permute(0, 3, 1, 2)


def _pixels(x: torch.Tensor) -> tuple[int, int]:
    B, C, H, W = x.shape
    return B * H * W, C


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, C, H, W] -> the mean and the biased variance per channel, fp32."""
    x = _channels_last(x)
    P, C = _pixels(x)
    plan = plans.bn_stats_plan(P, C, x.dtype, plans.device_target(x.device))
    part = _empty((plan.programs, 3, C), torch.float32, x.device)
    with _device_ctx(x):
        plans.launch(_bn_stats_kernel, plan.launch, x, part, P, C, plan.blocks_per_program)
    n, means, m2 = part.unbind(1)
    mean = (n * means).sum(0) / P
    var = (m2 + n * (means - mean).square()).sum(0) / P  # Chan et al.'s combination of the slots
    return mean, var


def _bn_relu(x, mean, rstd, weight, bias) -> torch.Tensor:
    x = _channels_last(x)
    P, C = _pixels(x)
    out = _out_like(x)
    if P * C:
        plan = plans.bn_relu_fwd_plan(P, C, x.dtype, plans.device_target(x.device))
        with _device_ctx(x):
            plans.launch(_bn_relu_fwd_kernel, plan, x, out, mean, rstd, weight, bias, P, C)
    return out


def _bwd_sums(dout, x, mean, rstd, weight, bias) -> torch.Tensor:
    """[2, C] fp32: sum(g) and sum(g * x_hat) per channel."""
    dout, x = _channels_last(dout), _channels_last(x)
    P, C = _pixels(x)
    if not P * C:
        return torch.zeros(2, C, dtype=torch.float32, device=x.device)
    plan = plans.bn_relu_bwd_plan(P, C, x.dtype, plans.device_target(x.device)).sums
    part = _empty((plan.programs, 2, C), torch.float32, x.device)
    with _device_ctx(x):
        plans.launch(
            _bn_relu_bwd_sums_kernel,
            plan.launch,
            dout,
            x,
            mean,
            rstd,
            weight,
            bias,
            part,
            P,
            C,
            plan.blocks_per_program,
        )
    return part.sum(0)


def _bwd_dx(dout, x, mean, rstd, weight, bias, sum_g, sum_gx, batch_stats: bool) -> torch.Tensor:
    dout, x = _channels_last(dout), _channels_last(x)
    P, C = _pixels(x)
    dx = _out_like(x)
    if P * C:
        plan = plans.bn_relu_bwd_plan(P, C, x.dtype, plans.device_target(x.device)).dx
        with _device_ctx(x):
            plans.launch(
                _bn_relu_bwd_dx_kernel, plan, dout, x, dx, mean, rstd, weight, bias, sum_g, sum_gx, P, C, batch_stats
            )
    return dx


# One custom op per pass (each reads and writes what its kernel does, so a traffic count sees
# every pass). The launchers make x and dout channels-last where they are not (a copy each; a
# conv on a channels-last map writes one, so the model makes none).
@torch.library.custom_op("restv2::bn_stats", mutates_args=())
def bn_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _stats(x)


@bn_stats.register_fake
def _(x):
    C = x.shape[1]
    return x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32)


@torch.library.custom_op("restv2::bn_relu_fwd", mutates_args=())
def bn_relu_fwd(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    return _bn_relu(x, mean, rstd, weight, bias)


@bn_relu_fwd.register_fake
def _(x, mean, rstd, weight, bias):
    return torch.empty_like(x, memory_format=torch.channels_last)


@torch.library.custom_op("restv2::bn_relu_bwd_sums", mutates_args=())
def bn_relu_bwd_sums(
    dout: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    return _bwd_sums(dout, x, mean, rstd, weight, bias)


@bn_relu_bwd_sums.register_fake
def _(dout, x, mean, rstd, weight, bias):
    return x.new_empty((2, x.shape[1]), dtype=torch.float32)


@torch.library.custom_op("restv2::bn_relu_bwd_dx", mutates_args=())
def bn_relu_bwd_dx(
    dout: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    sum_g: torch.Tensor,
    sum_gx: torch.Tensor,
    batch_stats: bool,
) -> torch.Tensor:
    return _bwd_dx(dout, x, mean, rstd, weight, bias, sum_g, sum_gx, batch_stats)


@bn_relu_bwd_dx.register_fake
def _(dout, x, mean, rstd, weight, bias, sum_g, sum_gx, batch_stats):
    return torch.empty_like(x, memory_format=torch.channels_last)


class _BatchNormReLU(torch.autograd.Function):
    """relu(x_hat * weight + bias) with the statistics (mean, rstd) given: with
    ``batch_stats`` they are x's own, and the backward carries their gradient into dx."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, rstd, batch_stats):
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.batch_stats = batch_stats
        return torch.ops.restv2.bn_relu_fwd(x, mean, rstd, weight, bias)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dout = _channels_last(dout)  # once for both passes (a conv's channels-last gradient: itself)
        sum_g, sum_gx = torch.ops.restv2.bn_relu_bwd_sums(dout, x, mean, rstd, weight, bias)  # [2, C]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.restv2.bn_relu_bwd_dx(dout, x, mean, rstd, weight, bias, sum_g, sum_gx, ctx.batch_stats)
        return dx, sum_gx.to(weight.dtype), sum_g.to(bias.dtype), None, None, None


# ----------------------------------------------------------------------------- public


def bias_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``relu(x + bias)`` with ``bias`` [C] per channel of x [B, C, H, W], in one Triton pass.

    fp16, bf16 or fp32 (the add in fp32, rounded once). Returns x's memory format when x is
    NCHW or channels-last (else channels-last). Differentiable w.r.t. both.
    """
    check_bias_relu_inputs(x, bias)
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"bias_relu: the Triton kernel takes fp16/bf16/fp32, got {x.dtype} (use the reference for fp64)"
        )
    check_kernel_device(x, bias)
    return _BiasReLU.apply(x, bias)


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
    in Triton passes: the statistics (in training), then one pass normalising and applying the
    ReLU; the backward recomputes the ReLU's mask from x and never reads the output.

    x: [B, C, H, W] fp16, bf16 or fp32 (statistics and arithmetic in fp32, the output rounded
    once, channels-last); the others [C] of any floating dtype, or None as F.batch_norm allows
    them. In training the batch's statistics normalise x and update the running ones in place
    (``momentum``, the unbiased variance), as F.batch_norm does; outside training the running
    ones normalise. Differentiable w.r.t. x, weight and bias.
    """
    check_batch_norm_relu_inputs(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"batch_norm_relu: the Triton kernels take fp16/bf16/fp32, got {x.dtype} (use the reference for fp64)"
        )
    check_kernel_device(x, *(t for t in (running_mean, running_var, weight, bias) if t is not None))
    C = x.shape[1]
    if weight is None:
        weight = torch.ones(C, dtype=torch.float32, device=x.device)
    if bias is None:
        bias = torch.zeros(C, dtype=torch.float32, device=x.device)
    if training and x.numel():
        mean, var = torch.ops.restv2.bn_stats(x.detach())
        if running_mean is not None:
            P = x.numel() // C
            with torch.no_grad():  # as PyTorch's kernels: (1 - momentum) * running + momentum * batch
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var * (P / (P - 1))).to(running_var.dtype), alpha=momentum)
    elif training:  # an empty batch: nothing to normalise, the running statistics unchanged
        mean = var = torch.zeros(C, dtype=torch.float32, device=x.device)
    else:
        mean, var = running_mean.detach().float().contiguous(), running_var.detach().float()
    rstd = torch.rsqrt(var + eps)
    return _BatchNormReLU.apply(x, weight.contiguous(), bias.contiguous(), mean, rstd, training)
