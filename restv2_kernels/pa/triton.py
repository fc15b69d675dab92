"""Triton kernels for pixel attention (PA), the positional encoding of every stem and patch
embed, in one pass: ``out = x * sigmoid(conv3x3_depthwise(x, weight, bias, padding=1))``.

Layout: the model applies PA to conv outputs that are channels-last in memory and views the
result as tokens [B, H*W, C] without a copy. The kernels work on the ``[B, H, W, C]`` view
``x.permute(0, 2, 3, 1)`` (any batch/row/column strides, unit channel stride; a non-unit
channel stride is made channels-last by one copy) and write ``[B, H, W, C]`` contiguous,
which the public function returns as a [B, C, H, W] tensor in channels_last memory format.

Launch geometry (tiles, warps, the reduction's program count) comes from
``restv2_kernels.plans``, per target GPU.

Forward (``_pa_fwd_kernel``): a program owns BLOCK_P pixels (flattened over ``(b, y, x)``)
and all C channels. It streams the 9 taps (zero outside the map) into
``z = bias + sum w * tap`` in fp32, keeps the centre tap, and stores ``x * sigmoid(z)``.
HBM traffic: x read once (the halo comes through the cache), out written once.

Backward, two kernels and one fp32 scratch ``g = dL/dz = dout * x * s * (1 - s)`` of shape
[B, H, W, C] (``s = sigmoid(z)``). Nothing but the inputs is saved by the forward.
1. ``_pa_bwd_g_kernel``: a bounded number of programs (about 2 per SM), each over a
   contiguous range of pixel blocks. It loads the 9 taps, recomputes z and s, computes g and
   writes it once, and reduces in registers dweight[c, tap] = sum g * x_tap and
   dbias[c] = sum g (the taps are already loaded for the conv). Each program stores its
   [10, C] fp32 partial sums in its own slot; torch sums the slots. No atomics:
   deterministic for a given shape and device.
2. ``_pa_bwd_dx_kernel``: per pixel block, ``dx = dout * s + sum_tap w[tap] * g[p - tap]``
   (the transposed conv: the mirrored neighbour, zero outside the map). s is recomputed from
   the 9 x taps rather than stored: storing ``dout * s`` in kernel 1 would cost the same
   bytes (one write and one read instead of the x halo and dout reads) and round it once more.

Why a scratch for g rather than one fused kernel: dx at p needs g at the 3x3 neighbours,
and each of those needs z over a 5x5 window and dout over 3x3, i.e. 25 + 9 tile loads and
9 convolutions a pixel. The scratch costs 4 + 4 bytes per element (write, read) and keeps
each kernel one-to-one with what it writes. g stays fp32 so that dx, dweight and dbias are
accumulated from unrounded values. HBM bytes per element (16-bit inputs): forward 2 + 2;
backward kernel 1 reads x and dout (2 + 2) and writes g (4), kernel 2 reads x, dout, g
(2 + 2 + 4) and writes dx (2).

The bias of the conv that made x (``x_bias``, optional): cuDNN convs take no bias, and PyTorch
adds one in a pass of its own over the conv's output (a read and a write). The kernels add it
to every tap they load instead (``x + x_bias`` inside the map, zero outside it, as the conv
pads the biased map), and the dx kernel sums its [BLOCK_P, C] tile of dx per program into an
fp32 [programs, C] scratch, which torch sums into x_bias's gradient (the conv's backward would
have read dx once more for it).

PA + LayerNorm (``pixel_attention_layer_norm``, the forward kernel's ``NORM``): a stem or patch
embed normalises PA's output over the channels of each pixel before its first block. Where no
gradient is needed, the forward kernel, which holds each pixel's whole channel row, rounds PA's
output to x's dtype (as it would be stored), normalises the row in fp32 and stores that instead:
x read once, the normalised map written once (in ``out_dtype``: the model asks for fp32 under
CUDA's autocast, whose LayerNorm writes fp32), and PA's output never goes to memory. Where a gradient is needed it is stored, as
the LayerNorm's backward reads it: ``pixel_attention``, then the LayerNorm.

Weights: the launchers re-lay the conv weight tap-major, [9, C] (one small copy per call),
so a program's per-tap weight vectors are contiguous over channels.
"""

import contextlib

import torch
import triton
import triton.language as tl

from .. import plans
from ..backend import check_kernel_device
from .reference import check_pixel_attention_inputs, check_pixel_attention_layer_norm_inputs, layer_norm_pixels

__all__ = ["pixel_attention", "pixel_attention_layer_norm"]

MAX_C = plans.PIXEL_ATTENTION_MAX_C
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_N_PART = 10  # partial-sum rows per program: 9 taps, bias


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _pixels(offs_p, H, W):
    """Flattened pixel indices (int32) -> (b as int64, y, x)."""
    x = offs_p % W
    t = offs_p // W
    y = t % H
    b64 = (t // H).to(tl.int64)
    return b64, y, x


@triton.jit
def _x_bias(xb_ptr, offs_c, c_mask, HAS_XB: tl.constexpr, BLOCK_C: tl.constexpr):
    """x's bias as fp32 [1, BLOCK_C] (zeros without one)."""
    if HAS_XB:
        return tl.load(xb_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return tl.zeros([1, BLOCK_C], dtype=tl.float32)


@triton.jit
def _load_tap(x_ptr, b64, y, x, DY: tl.constexpr, DX: tl.constexpr, H, W, sxb, sxh, sxw,
              offs_c, p_mask, c_mask, xb, HAS_XB: tl.constexpr):  # fmt: skip
    """(x + xb)[b, y+DY-1, x+DX-1, :] as fp32 [BLOCK_P, BLOCK_C]; zero outside the map (the
    conv pads x + xb, the map PA is applied to)."""
    yy = y + (DY - 1)
    xx = x + (DX - 1)
    ok = p_mask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
    row = b64 * sxb + yy.to(tl.int64) * sxh + xx.to(tl.int64) * sxw
    ptr = x_ptr + row[:, None] + offs_c[None, :]
    t = tl.load(ptr, mask=ok[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    if HAS_XB:
        t = t + tl.where(ok[:, None], xb, 0.0)
    return t


@triton.jit
def _tap_weight(w_ptr, K: tl.constexpr, C, offs_c, c_mask):
    """w[K, :] of the tap-major [9, C] weight as fp32 [1, BLOCK_C]."""
    return tl.load(w_ptr + K * C + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _conv_stream(x_ptr, w_ptr, bias_ptr, b64, y, x, H, W, C, sxb, sxh, sxw, offs_c, p_mask, c_mask,
                 xb, HAS_XB: tl.constexpr):  # fmt: skip
    """(z, x_centre): z = bias + sum_taps w * x_tap in fp32, one tap live at a time."""
    z = tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    xc = _load_tap(x_ptr, b64, y, x, 1, 1, H, W, sxb, sxh, sxw, offs_c, p_mask, c_mask, xb, HAS_XB)
    z = z + xc * _tap_weight(w_ptr, 4, C, offs_c, c_mask)
    for k in tl.static_range(9):
        if k != 4:
            t = _load_tap(x_ptr, b64, y, x, k // 3, k % 3, H, W, sxb, sxh, sxw, offs_c, p_mask, c_mask, xb, HAS_XB)
            z = z + t * _tap_weight(w_ptr, k, C, offs_c, c_mask)
    return z, xc


# Map sizes only bound loops and masks: not specialised (do_not_specialize), so a new image
# size reuses the compiled kernel instead of compiling one per divisibility pattern.
@triton.jit(do_not_specialize=["NP", "H", "W"])
def _pa_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, xb_ptr, nw_ptr, nb_ptr, out_ptr,
    NP, H, W, C,
    sxb, sxh, sxw, eps,
    HAS_XB: tl.constexpr, NORM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """x: [B, H, W, C] (strided, unit channel stride), w: [9, C], bias: [C], xb: [C] (HAS_XB:
    added to x first) -> out: [B, H, W, C] contiguous. One program: BLOCK_P pixels (NP = B*H*W
    of them) x C. NORM: out is the LayerNorm over C (weight nw, bias nb: [C]) of PA's output
    rounded to x's dtype, in out's dtype."""
    pid = tl.program_id(0)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < NP
    b64, y, x = _pixels(offs_p, H, W)
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < C

    xb = _x_bias(xb_ptr, offs_c, c_mask, HAS_XB, BLOCK_C)
    z, xc = _conv_stream(x_ptr, w_ptr, bias_ptr, b64, y, x, H, W, C, sxb, sxh, sxw, offs_c, p_mask, c_mask, xb, HAS_XB)
    res = xc * tl.sigmoid(z)
    if NORM:
        # as stored between the two ops; a padded channel is 0 (its tap loads are 0)
        r = res.to(x_ptr.dtype.element_ty).to(tl.float32)
        mean = tl.sum(r, axis=1) / C
        d = tl.where(c_mask[None, :], r - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        nw = tl.load(nw_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        nb = tl.load(nb_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        res = d * rstd[:, None] * nw + nb
    o_row = offs_p.to(tl.int64) * C  # out is contiguous: pixel p's row starts at p * C
    tl.store(
        out_ptr + o_row[:, None] + offs_c[None, :],
        res.to(out_ptr.dtype.element_ty),
        mask=p_mask[:, None] & c_mask[None, :],
    )


@triton.jit(do_not_specialize=["NP", "H", "W", "BLOCKS_PER_PROGRAM"])
def _pa_bwd_g_kernel(
    dout_ptr, x_ptr, w_ptr, bias_ptr, xb_ptr, g_ptr, part_ptr,
    NP, H, W, C, BLOCKS_PER_PROGRAM,
    sdb, sdh, sdw, sxb, sxh, sxw,
    HAS_XB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dout, x: [B, H, W, C] (strided, unit channel stride) -> g: [B, H, W, C] fp32
    contiguous, and part: [programs, 10, C] fp32 partial sums (dweight taps 0..8, dbias).

    Program pid walks pixel blocks [pid*BLOCKS_PER_PROGRAM, (pid+1)*BLOCKS_PER_PROGRAM).
    """
    pid = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    c2 = c_mask[None, :]
    w0 = _tap_weight(w_ptr, 0, C, offs_c, c_mask)
    w1 = _tap_weight(w_ptr, 1, C, offs_c, c_mask)
    w2 = _tap_weight(w_ptr, 2, C, offs_c, c_mask)
    w3 = _tap_weight(w_ptr, 3, C, offs_c, c_mask)
    w4 = _tap_weight(w_ptr, 4, C, offs_c, c_mask)
    w5 = _tap_weight(w_ptr, 5, C, offs_c, c_mask)
    w6 = _tap_weight(w_ptr, 6, C, offs_c, c_mask)
    w7 = _tap_weight(w_ptr, 7, C, offs_c, c_mask)
    w8 = _tap_weight(w_ptr, 8, C, offs_c, c_mask)
    bias = tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    xb = _x_bias(xb_ptr, offs_c, c_mask, HAS_XB, BLOCK_C)
    # per-program sums over its pixels, [BLOCK_C] fp32 each
    dw0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw3 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw4 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw5 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw6 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw7 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw8 = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)

    blk_start = pid * BLOCKS_PER_PROGRAM
    blk_end = tl.minimum(blk_start + BLOCKS_PER_PROGRAM, tl.cdiv(NP, BLOCK_P))
    for blk in range(blk_start, blk_end):
        offs_p = blk * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < NP
        b64, y, x = _pixels(offs_p, H, W)
        m2 = p_mask[:, None] & c2
        # the 9 taps feed both the conv and the dweight sums: loaded once, kept in registers
        x0 = _load_tap(x_ptr, b64, y, x, 0, 0, H, W, sxb, sxh, sxw, offs_c, p_mask, c_mask, xb, HAS_XB)
        x1 = _load_tap(x_ptr, b64, y, x, 0, 1, H, W, sxb, sxh, sxw, offs_c, p_mask, c_mask, xb, HAS_XB)
        x2 = _load_tap(x_ptr, b64, y, x, 0, 2, H, W, sxb, sxh, sxw, offs_c, p_mask, c_mask, xb, HAS_XB)
        x3 = _load_tap(x_ptr, b64, y, x, 1, 0, H, W, sxb, sxh, sxw, offs_c, p_mask, c_mask, xb, HAS_XB)
        x4 = _load_tap(x_ptr, b64, y, x, 1, 1, H, W, sxb, sxh, sxw, offs_c, p_mask, c_mask, xb, HAS_XB)
        x5 = _load_tap(x_ptr, b64, y, x, 1, 2, H, W, sxb, sxh, sxw, offs_c, p_mask, c_mask, xb, HAS_XB)
        x6 = _load_tap(x_ptr, b64, y, x, 2, 0, H, W, sxb, sxh, sxw, offs_c, p_mask, c_mask, xb, HAS_XB)
        x7 = _load_tap(x_ptr, b64, y, x, 2, 1, H, W, sxb, sxh, sxw, offs_c, p_mask, c_mask, xb, HAS_XB)
        x8 = _load_tap(x_ptr, b64, y, x, 2, 2, H, W, sxb, sxh, sxw, offs_c, p_mask, c_mask, xb, HAS_XB)
        z = bias + x0 * w0 + x1 * w1 + x2 * w2 + x3 * w3 + x4 * w4 + x5 * w5 + x6 * w6 + x7 * w7 + x8 * w8
        s = tl.sigmoid(z)
        d_row = b64 * sdb + y.to(tl.int64) * sdh + x.to(tl.int64) * sdw
        dy = tl.load(dout_ptr + d_row[:, None] + offs_c[None, :], mask=m2, other=0.0).to(tl.float32)
        g = dy * x4 * s * (1.0 - s)  # 0 on masked pixels and channels: dy and x4 are 0 there
        tl.store(g_ptr + (offs_p.to(tl.int64) * C)[:, None] + offs_c[None, :], g, mask=m2)

        db += tl.sum(g, axis=0)
        dw0 += tl.sum(g * x0, axis=0)
        dw1 += tl.sum(g * x1, axis=0)
        dw2 += tl.sum(g * x2, axis=0)
        dw3 += tl.sum(g * x3, axis=0)
        dw4 += tl.sum(g * x4, axis=0)
        dw5 += tl.sum(g * x5, axis=0)
        dw6 += tl.sum(g * x6, axis=0)
        dw7 += tl.sum(g * x7, axis=0)
        dw8 += tl.sum(g * x8, axis=0)

    # every slot is written (the plan leaves no program without blocks; zeros otherwise)
    pp = part_ptr + pid * (10 * C) + offs_c
    tl.store(pp + 0 * C, dw0, mask=c_mask)
    tl.store(pp + 1 * C, dw1, mask=c_mask)
    tl.store(pp + 2 * C, dw2, mask=c_mask)
    tl.store(pp + 3 * C, dw3, mask=c_mask)
    tl.store(pp + 4 * C, dw4, mask=c_mask)
    tl.store(pp + 5 * C, dw5, mask=c_mask)
    tl.store(pp + 6 * C, dw6, mask=c_mask)
    tl.store(pp + 7 * C, dw7, mask=c_mask)
    tl.store(pp + 8 * C, dw8, mask=c_mask)
    tl.store(pp + 9 * C, db, mask=c_mask)


@triton.jit(do_not_specialize=["NP", "H", "W"])
def _pa_bwd_dx_kernel(
    dout_ptr, x_ptr, w_ptr, bias_ptr, xb_ptr, g_ptr, dx_ptr, xbpart_ptr,
    NP, H, W, C,
    sdb, sdh, sdw, sxb, sxh, sxw,
    HAS_XB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dout, x: [B, H, W, C] (strided), g: [B, H, W, C] fp32 contiguous, w: [9, C] ->
    dx: [B, H, W, C] contiguous; HAS_XB: xbpart [programs, C] fp32, each program's sum of its
    dx rows (x's bias gradient, once torch sums them).

    dx[p] = dout[p] * s[p] + sum over taps k = (ky, kx) of w[k] * g[p - (ky-1, kx-1)]
    (pixel p was tap k of that neighbour); a neighbour outside the map contributes 0.
    """
    pid = tl.program_id(0)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < NP
    b64, y, x = _pixels(offs_p, H, W)
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    c2 = c_mask[None, :]
    m2 = p_mask[:, None] & c2

    xb = _x_bias(xb_ptr, offs_c, c_mask, HAS_XB, BLOCK_C)
    z, xc = _conv_stream(x_ptr, w_ptr, bias_ptr, b64, y, x, H, W, C, sxb, sxh, sxw, offs_c, p_mask, c_mask, xb, HAS_XB)
    d_row = b64 * sdb + y.to(tl.int64) * sdh + x.to(tl.int64) * sdw
    dy = tl.load(dout_ptr + d_row[:, None] + offs_c[None, :], mask=m2, other=0.0).to(tl.float32)
    acc = dy * tl.sigmoid(z)

    g_base = ((b64 * H + y.to(tl.int64)) * W + x.to(tl.int64)) * C  # g is contiguous
    for k in tl.static_range(9):
        ky = k // 3 - 1
        kx = k % 3 - 1
        yq = y - ky
        xq = x - kx
        ok = p_mask & (yq >= 0) & (yq < H) & (xq >= 0) & (xq < W)
        g_off = g_base - (ky * W + kx).to(tl.int64) * C  # the neighbour (yq, xq) of the same image
        gk = tl.load(g_ptr + g_off[:, None] + offs_c[None, :], mask=ok[:, None] & c2, other=0.0)
        acc += gk * _tap_weight(w_ptr, k, C, offs_c, c_mask)

    tl.store(dx_ptr + (offs_p.to(tl.int64) * C)[:, None] + offs_c[None, :], acc.to(dx_ptr.dtype.element_ty), mask=m2)
    if HAS_XB:  # acc is 0 on masked pixels and channels
        tl.store(xbpart_ptr + pid.to(tl.int64) * C + offs_c, tl.sum(acc, axis=0), mask=c_mask)


# ----------------------------------------------------------------------------- launchers


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (tests patch it to fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    """A [B, H, W, C] view with unit channel stride: itself, or one channels-last copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _x_bias_arg(x_bias: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """x's bias (contiguous) for a kernel argument; without one, a tensor that stands in for
    the pointer (HAS_XB is False: never read)."""
    return stand_in if x_bias is None else x_bias.contiguous()


def _tap_major(weight: torch.Tensor) -> torch.Tensor:
    """[C, 1, 3, 3] -> [9, C] contiguous: channels last, so a tap's weights load as one vector."""
    return weight.reshape(weight.shape[0], 9).t().contiguous()


def _fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    x_bias: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x: [B, H, W, C] (any strides) -> out: [B, H, W, C] contiguous, in x's dtype; with ``norm``
    = (weight, bias, eps), the LayerNorm over C of PA's output, in ``out_dtype`` (None: x's)."""
    x = _unit_channel_stride(x)
    B, H, W, C = x.shape
    out = _empty((B, H, W, C), out_dtype or x.dtype, x.device)
    if out.numel() == 0:
        return out
    nw, nb, eps = (bias, bias, 0.0) if norm is None else (norm[0].contiguous(), norm[1].contiguous(), norm[2])
    plan = plans.pixel_attention_fwd_plan(B, H, W, C, x.dtype, plans.device_target(x.device))
    with _device_ctx(x):
        plans.launch(
            _pa_fwd_kernel, plan,
            x, _tap_major(weight), bias.contiguous(), _x_bias_arg(x_bias, bias), nw, nb, out,
            B * H * W, H, W, C,
            x.stride(0), x.stride(1), x.stride(2), float(eps),
            x_bias is not None, norm is not None,
        )  # fmt: skip
    return out


def _bwd(
    dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, x_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dout, x: [B, H, W, C] (any strides) -> (dx [B, H, W, C] contiguous, dweight [C, 1, 3, 3],
    dbias [C], dx_bias: [C], or [0] without x_bias), all in x's dtype."""
    has_xb = x_bias is not None
    dout = _unit_channel_stride(dout)
    x = _unit_channel_stride(x)
    B, H, W, C = x.shape
    NP = B * H * W
    if NP == 0 or C == 0:  # nothing to launch: every gradient is zero
        return (
            torch.zeros_like(x, memory_format=torch.contiguous_format),
            torch.zeros_like(weight),
            torch.zeros_like(bias),
            torch.zeros_like(x_bias) if has_xb else bias.new_empty(0),
        )
    plan = plans.pixel_attention_bwd_plan(B, H, W, C, x.dtype, plans.device_target(x.device))
    g = _empty((B, H, W, C), torch.float32, x.device)
    part = _empty((plan.programs, _N_PART, C), torch.float32, x.device)
    dx = _empty((B, H, W, C), x.dtype, x.device)
    # x's bias gradient: each dx program's sum of its rows (no buffer without x_bias)
    xb_part = _empty((plan.dx.grid[0], C), torch.float32, x.device) if has_xb else None
    wt = _tap_major(weight)
    bias_c = bias.contiguous()
    xb = _x_bias_arg(x_bias, bias)
    strides = (dout.stride(0), dout.stride(1), dout.stride(2), x.stride(0), x.stride(1), x.stride(2))
    with _device_ctx(x):
        plans.launch(_pa_bwd_g_kernel, plan.g, dout, x, wt, bias_c, xb, g, part,
                     NP, H, W, C, plan.blocks_per_program, *strides, has_xb)  # fmt: skip
        plans.launch(_pa_bwd_dx_kernel, plan.dx, dout, x, wt, bias_c, xb, g, dx, _x_bias_arg(xb_part, bias),
                     NP, H, W, C, *strides, has_xb)  # fmt: skip
    part = part.sum(0)  # [10, C]: the second stage of the reduction
    dt = weight.dtype
    cf = torch.contiguous_format
    dweight = part[:9].t().reshape(C, 1, 3, 3).to(dt, memory_format=cf, copy=True)
    dbias = part[9].to(dt, memory_format=cf, copy=True)  # copy: a custom op's outputs may not alias
    dx_bias = xb_part.sum(0).to(dt) if has_xb else bias.new_empty(0)
    return dx, dweight, dbias, dx_bias


# torch.compile sees two opaque ops with shape-only fake implementations. They work on the
# [B, H, W, C] view; the public function does the permutes (views) around them.


@torch.library.custom_op("restv2::pixel_attention_fwd", mutates_args=())
def pixel_attention_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, x_bias: torch.Tensor | None
) -> torch.Tensor:
    return _fwd(x, weight, bias, x_bias)


@pixel_attention_fwd.register_fake
def _(x, weight, bias, x_bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("restv2::pixel_attention_bwd", mutates_args=())
def pixel_attention_bwd(
    dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, x_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(dout, x, weight, bias, x_bias)


@pixel_attention_bwd.register_fake
def _(dout, x, weight, bias, x_bias):
    dx_bias = bias.new_empty(0) if x_bias is None else x_bias.new_empty(x_bias.shape)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape), dx_bias


@torch.library.custom_op("restv2::pixel_attention_ln_fwd", mutates_args=())
def pixel_attention_ln_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    x_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _fwd(x, weight, bias, x_bias, (norm_weight, norm_bias, eps), out_dtype)


@pixel_attention_ln_fwd.register_fake
def _(x, weight, bias, x_bias, norm_weight, norm_bias, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


# ----------------------------------------------------------------------------- autograd


class _PixelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, x_bias):
        ctx.save_for_backward(x, weight, bias, x_bias)  # the inputs only: the backward recomputes z
        return torch.ops.restv2.pixel_attention_fwd(x, weight, bias, x_bias)

    @staticmethod
    def backward(ctx, dout):
        if not any(ctx.needs_input_grad):
            return None, None, None, None
        x, weight, bias, x_bias = ctx.saved_tensors
        grads = torch.ops.restv2.pixel_attention_bwd(dout, x, weight, bias, x_bias)
        return tuple(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad))


# ----------------------------------------------------------------------------- public


def pixel_attention(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, x_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x * sigmoid(conv2d(x, weight, bias, padding=1, groups=C))`` with fused Triton kernels;
    with ``x_bias``, of ``x + x_bias`` (per channel): the bias of the conv that made x, added
    here rather than in a pass of its own over x (cuDNN convs take no bias).

    x: [B, C, H, W], best channels-last in memory (any batch/row/column strides, unit channel
    stride; other layouts cost one channels-last copy); weight: [C, 1, 3, 3]; bias, x_bias:
    [C]. fp16, bf16 or fp32, the conv and the sigmoid in fp32. Returns [B, C, H, W] in
    channels_last memory format: ``out.permute(0, 2, 3, 1)`` is a contiguous [B, H, W, C]
    (tokens without a copy). Differentiable w.r.t. every tensor; dx comes back channels-last.
    """
    check_pixel_attention_inputs(x, weight, bias, x_bias)
    _check_kernel_arguments("pixel_attention", x, weight, bias, x_bias)
    return _PixelAttention.apply(x.permute(0, 2, 3, 1), weight, bias, x_bias).permute(0, 3, 1, 2)


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
    """PA (as ``pixel_attention``), then LayerNorm over the channels of each pixel: what a stem
    or patch embed computes before its first block, ``norm(to_tokens(pa(x)))``.

    Where no gradient is needed (grad mode off, or no argument requiring one), one pass: the PA
    forward kernel normalises each pixel's row of channels, which it holds whole, before storing
    it; PA's output (rounded to x's dtype, as it would be stored) never goes to memory. Where a
    gradient is needed: ``pixel_attention``, then ``F.layer_norm`` in fp32 (the LayerNorm's
    backward needs PA's output stored). The LayerNorm computes in fp32 and rounds once to
    ``out_dtype`` (None: x's dtype; autocast gives a LayerNorm of a 16-bit map fp32).

    x, weight, bias, x_bias: as ``pixel_attention``; norm_weight, norm_bias: [C], any floating
    dtype. Returns [B, C, H, W] in channels_last memory format: ``out.permute(0, 2, 3, 1)`` is a
    contiguous [B, H, W, C] (the normalised tokens without a copy).
    """
    check_pixel_attention_layer_norm_inputs(x, weight, bias, x_bias, norm_weight, norm_bias, eps, out_dtype)
    if out_dtype not in (None, *_KERNEL_DTYPES):
        raise TypeError(
            f"pixel_attention_layer_norm: the Triton kernels write fp16/bf16/fp32, got out_dtype {out_dtype}"
        )
    _check_kernel_arguments("pixel_attention_layer_norm", x, weight, bias, x_bias, norm_weight, norm_bias)
    dtype = out_dtype or x.dtype
    tensors = (x, weight, bias, x_bias, norm_weight, norm_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return layer_norm_pixels(pixel_attention(x, weight, bias, x_bias), norm_weight, norm_bias, eps, dtype)
    args = (x.permute(0, 2, 3, 1), weight, bias, x_bias, norm_weight, norm_bias, float(eps), dtype)
    return torch.ops.restv2.pixel_attention_ln_fwd(*args).permute(0, 3, 1, 2)


def _check_kernel_arguments(op: str, x: torch.Tensor, *tensors: torch.Tensor | None) -> None:
    """What the kernels take beyond what the reference checks: dtype, width, device."""
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{op}: the Triton kernels take fp16/bf16/fp32, got {x.dtype} (use the reference for fp64)")
    C = x.shape[1]
    if not 1 <= C <= MAX_C:
        raise ValueError(f"{op}: the Triton kernels take 1 to {MAX_C} channels, got C={C}")
    check_kernel_device(x, *[t for t in tensors if t is not None])
