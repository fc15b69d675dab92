"""Triton kernels for EMSAv2's upsample branch in one pass:
``out = x + LayerNorm(crop(PixelShuffle(conv3x3_depthwise(v))))``.

Layout: every map is channels-last, ``[B, H, W, C]`` (x, out) and ``[B, Hr, Wr, C]`` (v).
Conv output channel ``c*sr*sr + s`` with ``s = i*sr + j`` lands, after the shuffle, at
channel ``c`` of output pixel ``(yr*sr + i, xr*sr + j)``; the crop keeps the top-left H x W.

Launch geometry (tiles, warps, splits) comes from ``restv2_kernels.plans``, per target GPU.

Forward (``_upsample_fwd_kernel``): a program owns BLOCK_P reduced pixels (flattened over
``(b, yr, xr)``) and all C channels. It loads the 9 V taps of those pixels once, keeps them
in registers, then loops over the sr*sr sub-pixels: conv from the taps, LayerNorm statistics
in fp32 over the channel row, add x, store. HBM traffic: x once, out once, v and the weights
through the cache.

Backward, two kernels and one fp32 scratch ``g = d(LN input)`` of shape [B, H, W, C]:
1. ``_upsample_bwd_g_kernel``, grid ``(sr*sr sub-pixels) x SPLIT``: a program owns one
   sub-pixel ``s`` and a contiguous range of reduced-pixel blocks. It recomputes the conv
   output and the LN statistics (nothing but the inputs is saved by the forward), computes
   g and writes it once, and reduces in registers the parameter gradients of its sub-pixel:
   dweight[s, tap] = sum g * v_tap (the taps are already loaded for the conv), dbias[s] =
   sum g, dnorm_weight = sum dout * xhat, dnorm_bias = sum dout. Each program stores its
   partial sums (fp32) in its own slot; torch sums the SPLIT slots. No atomics:
   deterministic for a given shape and device.
2. ``_upsample_bwd_dv_kernel``: dv is a gather, each reduced pixel collects g from the
   sr*sr sub-pixels of its 3x3 neighbourhood of reduced positions (cropped pixels give 0).
   It needs g of other programs' pixels, hence the scratch: recomputing a neighbour's g
   would redo its conv and LN nine times over.
dx is dout itself (the residual), no kernel.

Why an fp32 scratch for g rather than a fused gather: it costs one write and one read of
4 bytes per output element, but keeps each kernel's tile one-to-one with what it writes and
the parameter reductions in registers. g stays fp32 so that dv, dweight and dbias are
accumulated from unrounded values.

Weights: the launchers re-lay the conv weight and bias sub-pixel-major, [sr*sr, 9, C] and
[sr*sr, C] (two small copies per call), so a program's per-sub-pixel weight vectors are
contiguous over channels instead of 9*sr*sr elements apart.

Channel stride: x, v and dout may have any batch/row/column strides (v is usually the
V half of a kv tensor, read in place); a non-unit channel stride is made contiguous by the
launchers (a copy). The norm parameters are made contiguous too (a no-op for parameters).
"""

import contextlib

import torch
import triton
import triton.language as tl

from .. import plans
from ..backend import check_kernel_device
from .reference import check_upsample_inputs

__all__ = ["upsample_add"]

MAX_C = plans.UPSAMPLE_MAX_C
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_N_PART = 12  # partial-sum rows per (split, sub-pixel): 9 taps, bias, norm_weight, norm_bias


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _load_tap(v_ptr, b64, yr, xr, DY: tl.constexpr, DX: tl.constexpr, Hr, Wr, svb, svh, svw,
              offs_c, p_mask, c_mask):  # fmt: skip
    """V[b, yr+DY-1, xr+DX-1, :] as fp32 [BLOCK_P, BLOCK_C]; zero outside the reduced map."""
    yy = yr + (DY - 1)
    xx = xr + (DX - 1)
    ok = p_mask & (yy >= 0) & (yy < Hr) & (xx >= 0) & (xx < Wr)
    row = b64 * svb + yy.to(tl.int64) * svh + xx.to(tl.int64) * svw
    ptr = v_ptr + row[:, None] + offs_c[None, :]
    return tl.load(ptr, mask=ok[:, None] & c_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_taps(v_ptr, b64, yr, xr, Hr, Wr, svb, svh, svw, offs_c, p_mask, c_mask):
    """The 3x3 neighbourhood of V around each reduced pixel: nine [BLOCK_P, BLOCK_C] fp32 tiles,
    row-major (v00 is (yr-1, xr-1)), zero outside the map."""
    return (
        _load_tap(v_ptr, b64, yr, xr, 0, 0, Hr, Wr, svb, svh, svw, offs_c, p_mask, c_mask),
        _load_tap(v_ptr, b64, yr, xr, 0, 1, Hr, Wr, svb, svh, svw, offs_c, p_mask, c_mask),
        _load_tap(v_ptr, b64, yr, xr, 0, 2, Hr, Wr, svb, svh, svw, offs_c, p_mask, c_mask),
        _load_tap(v_ptr, b64, yr, xr, 1, 0, Hr, Wr, svb, svh, svw, offs_c, p_mask, c_mask),
        _load_tap(v_ptr, b64, yr, xr, 1, 1, Hr, Wr, svb, svh, svw, offs_c, p_mask, c_mask),
        _load_tap(v_ptr, b64, yr, xr, 1, 2, Hr, Wr, svb, svh, svw, offs_c, p_mask, c_mask),
        _load_tap(v_ptr, b64, yr, xr, 2, 0, Hr, Wr, svb, svh, svw, offs_c, p_mask, c_mask),
        _load_tap(v_ptr, b64, yr, xr, 2, 1, Hr, Wr, svb, svh, svw, offs_c, p_mask, c_mask),
        _load_tap(v_ptr, b64, yr, xr, 2, 2, Hr, Wr, svb, svh, svw, offs_c, p_mask, c_mask),
    )


@triton.jit
def _conv(v00, v01, v02, v10, v11, v12, v20, v21, v22, w_ptr, bias_ptr, s, C, offs_c, c_mask):
    """bias + sum_taps w * V_tap for sub-pixel s: [BLOCK_P, BLOCK_C] fp32.
    w: [sr*sr, 9, C] and bias: [sr*sr, C], channels contiguous (coalesced vector loads)."""
    wp = w_ptr + s * 9 * C + offs_c
    acc = tl.load(bias_ptr + s * C + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc + v00 * tl.load(wp + 0 * C, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc + v01 * tl.load(wp + 1 * C, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc + v02 * tl.load(wp + 2 * C, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc + v10 * tl.load(wp + 3 * C, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc + v11 * tl.load(wp + 4 * C, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc + v12 * tl.load(wp + 5 * C, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc + v20 * tl.load(wp + 6 * C, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc + v21 * tl.load(wp + 7 * C, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc + v22 * tl.load(wp + 8 * C, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return acc


# Map sizes only bound loops and masks: not specialised (do_not_specialize), so a new image
# size reuses the compiled kernel instead of compiling one per divisibility pattern.
@triton.jit(do_not_specialize=["NP", "H", "W", "Hr", "Wr"])
def _upsample_fwd_kernel(
    x_ptr, v_ptr, w_ptr, bias_ptr, nw_ptr, nb_ptr, out_ptr,
    NP, H, W, Hr, Wr, C,
    sxb, sxh, sxw, svb, svh, svw,
    eps,
    SR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """x: [B, H, W, C] (strided), v: [B, Hr, Wr, C] (strided), w: [sr*sr, 9, C], bias:
    [sr*sr, C], norm params: [C] -> out: [B, H, W, C] contiguous.

    One program: BLOCK_P reduced pixels (NP = B*Hr*Wr of them) x all sr*sr sub-pixels x C.
    """
    pid = tl.program_id(0)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < NP
    xr = offs_p % Wr
    t = offs_p // Wr
    yr = t % Hr
    b64 = (t // Hr).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < C

    # the 9 taps are shared by all sr*sr sub-pixels: load once, keep in registers
    v00, v01, v02, v10, v11, v12, v20, v21, v22 = _load_taps(
        v_ptr, b64, yr, xr, Hr, Wr, svb, svh, svw, offs_c, p_mask, c_mask
    )
    nw = tl.load(nw_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    nb = tl.load(nb_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    c2 = c_mask[None, :]

    # sub-pixel (i, j) of reduced pixel (yr, xr) is output pixel (yr*SR + i, xr*SR + j):
    # per-pixel bases here, the loop adds scalar offsets only
    y0 = yr * SR
    x0 = xr * SR
    x_base = b64 * sxb + y0.to(tl.int64) * sxh + x0.to(tl.int64) * sxw
    o_base = ((b64 * H + y0.to(tl.int64)) * W + x0.to(tl.int64)) * C
    y_room = tl.where(p_mask, H - y0, 0)  # the crop: sub-pixel (i, j) exists iff i < y_room, j < x_room
    x_room = W - x0

    for s in range(SR * SR):  # a real loop, not unrolled: sr*sr reaches 64
        i = s // SR
        j = s % SR
        m2 = ((i < y_room) & (j < x_room))[:, None] & c2
        acc = _conv(v00, v01, v02, v10, v11, v12, v20, v21, v22, w_ptr, bias_ptr, s, C, offs_c, c_mask)
        # LayerNorm over C in fp32; padded channels masked out of the statistics
        mean = tl.sum(acc, axis=1) / C
        d = tl.where(c2, acc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        x_off = x_base + (i.to(tl.int64) * sxh + j.to(tl.int64) * sxw)
        xin = tl.load(x_ptr + x_off[:, None] + offs_c[None, :], mask=m2, other=0.0).to(tl.float32)
        res = xin + d * rstd[:, None] * nw + nb
        o_off = o_base + (i.to(tl.int64) * W + j) * C
        tl.store(out_ptr + o_off[:, None] + offs_c[None, :], res.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["NP", "H", "W", "Hr", "Wr", "BLOCKS_PER_SPLIT"])
def _upsample_bwd_g_kernel(
    dout_ptr, v_ptr, w_ptr, bias_ptr, nw_ptr, g_ptr, part_ptr,
    NP, H, W, Hr, Wr, C, BLOCKS_PER_SPLIT,
    sdb, sdh, sdw, svb, svh, svw,
    eps,
    SR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dout: [B, H, W, C] (strided) -> g: [B, H, W, C] fp32 contiguous, and
    part: [SPLIT, sr*sr, 12, C] fp32 partial sums (dweight taps 0..8, dbias, dnw, dnb).

    Program pid: sub-pixel s = pid % (sr*sr), reduced-pixel blocks
    [split*BLOCKS_PER_SPLIT, (split+1)*BLOCKS_PER_SPLIT) with split = pid // (sr*sr).
    """
    pid = tl.program_id(0)
    s = pid % (SR * SR)
    split = pid // (SR * SR)
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    c2 = c_mask[None, :]
    nw = tl.load(nw_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
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
    dnw = tl.zeros([BLOCK_C], dtype=tl.float32)
    dnb = tl.zeros([BLOCK_C], dtype=tl.float32)

    blk_start = split * BLOCKS_PER_SPLIT
    blk_end = tl.minimum(blk_start + BLOCKS_PER_SPLIT, tl.cdiv(NP, BLOCK_P))
    for blk in range(blk_start, blk_end):
        offs_p = blk * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < NP
        xr = offs_p % Wr
        t = offs_p // Wr
        yr = t % Hr
        b64 = (t // Hr).to(tl.int64)
        y = yr * SR + s // SR
        x = xr * SR + s % SR
        pm = p_mask & (y < H) & (x < W)
        m2 = pm[:, None] & c2

        v00, v01, v02, v10, v11, v12, v20, v21, v22 = _load_taps(
            v_ptr, b64, yr, xr, Hr, Wr, svb, svh, svw, offs_c, p_mask, c_mask
        )
        # recompute the LN input and its statistics instead of saving [B, H, W, C] tensors
        acc = _conv(v00, v01, v02, v10, v11, v12, v20, v21, v22, w_ptr, bias_ptr, s, C, offs_c, c_mask)
        mean = tl.sum(acc, axis=1) / C
        d = tl.where(c2, acc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        xhat = d * rstd[:, None]

        y64 = y.to(tl.int64)
        x64 = x.to(tl.int64)
        dy = tl.load(dout_ptr + (b64 * sdb + y64 * sdh + x64 * sdw)[:, None] + offs_c[None, :], mask=m2, other=0.0).to(
            tl.float32
        )  # 0 on cropped pixels: they add nothing
        dnw += tl.sum(dy * xhat, axis=0)
        dnb += tl.sum(dy, axis=0)
        dyh = dy * nw
        c1 = tl.sum(dyh, axis=1) / C
        c2x = tl.sum(dyh * xhat, axis=1) / C
        g = rstd[:, None] * (dyh - c1[:, None] - xhat * c2x[:, None])
        g = tl.where(m2, g, 0.0)  # padded channels would otherwise carry -rstd * c1
        tl.store(g_ptr + (((b64 * H + y64) * W + x64) * C)[:, None] + offs_c[None, :], g, mask=m2)

        db += tl.sum(g, axis=0)
        dw0 += tl.sum(g * v00, axis=0)
        dw1 += tl.sum(g * v01, axis=0)
        dw2 += tl.sum(g * v02, axis=0)
        dw3 += tl.sum(g * v10, axis=0)
        dw4 += tl.sum(g * v11, axis=0)
        dw5 += tl.sum(g * v12, axis=0)
        dw6 += tl.sum(g * v20, axis=0)
        dw7 += tl.sum(g * v21, axis=0)
        dw8 += tl.sum(g * v22, axis=0)

    # every slot is written, also by programs whose range is empty (zeros)
    pp = part_ptr + (split * (SR * SR) + s) * (12 * C) + offs_c
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
    tl.store(pp + 10 * C, dnw, mask=c_mask)
    tl.store(pp + 11 * C, dnb, mask=c_mask)


@triton.jit(do_not_specialize=["NP", "H", "W", "Hr", "Wr"])
def _upsample_bwd_dv_kernel(
    g_ptr, w_ptr, dv_ptr,
    NP, H, W, Hr, Wr, C,
    SR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """g: [B, H, W, C] fp32 contiguous, w: [sr*sr, 9, C] -> dv: [B, Hr, Wr, C] contiguous.

    dv[p] = sum over sub-pixels s and taps (dy, dx) of w[s, dy*3 + dx] * g at
    sub-pixel s of reduced pixel q = p - (dy-1, dx-1); q outside the map or a cropped
    sub-pixel contributes 0.
    """
    pid = tl.program_id(0)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < NP
    xr = offs_p % Wr
    t = offs_p // Wr
    yr = t % Hr
    b64 = (t // Hr).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    c2 = c_mask[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)

    for k in tl.static_range(9):
        # tap k = (dy, dx) of reduced pixel q = p - (dy-1, dx-1) read V[p]
        yq = yr - (k // 3 - 1)
        xq = xr - (k % 3 - 1)
        q_ok = p_mask & (yq >= 0) & (yq < Hr) & (xq >= 0) & (xq < Wr)
        y0 = yq * SR
        x0 = xq * SR
        y_room = tl.where(q_ok, H - y0, 0)  # sub-pixel (i, j) of q is cropped unless i < y_room, j < x_room
        x_room = W - x0
        g_base = ((b64 * H + y0.to(tl.int64)) * W + x0.to(tl.int64)) * C
        for s in range(SR * SR):
            i = s // SR
            j = s % SR
            ok = (i < y_room) & (j < x_room)
            g_off = g_base + (i.to(tl.int64) * W + j) * C
            gk = tl.load(g_ptr + g_off[:, None] + offs_c[None, :], mask=ok[:, None] & c2, other=0.0)
            wk = tl.load(w_ptr + (s * 9 + k) * C + offs_c, mask=c_mask, other=0.0).to(tl.float32)
            acc += gk * wk[None, :]

    dv_row = ((b64 * Hr + yr.to(tl.int64)) * Wr + xr.to(tl.int64)) * C
    tl.store(dv_ptr + dv_row[:, None] + offs_c[None, :], acc.to(dv_ptr.dtype.element_ty), mask=p_mask[:, None] & c2)


# ----------------------------------------------------------------------------- launchers


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (tests patch it to fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _subpixel_major(weight: torch.Tensor, bias: torch.Tensor, sr: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[sr*sr*C, 1, 3, 3], [sr*sr*C] -> [sr*sr, 9, C], [sr*sr, C]: a program reads the weights
    of one sub-pixel for all channels, so channels go last (contiguous loads, not a stride of
    9*sr*sr elements). Two small copies per call."""
    S = sr * sr
    C = weight.shape[0] // S
    return weight.reshape(C, S, 9).permute(1, 2, 0).contiguous(), bias.reshape(C, S).t().contiguous()


def _fwd(
    x: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    sr: int,
    eps: float,
) -> torch.Tensor:
    """x: [B, H, W, C], v: [B, Hr, Wr, C] -> out: [B, H, W, C] contiguous."""
    x = _unit_channel_stride(x)
    v = _unit_channel_stride(v)
    B, H, W, C = x.shape
    Hr, Wr = v.shape[1], v.shape[2]
    out = _empty((B, H, W, C), x.dtype, x.device)
    NP = B * Hr * Wr
    if out.numel() == 0 or NP == 0:
        return out
    wt, bt = _subpixel_major(weight, bias, sr)
    plan = plans.upsample_fwd_plan(B, Hr, Wr, C, sr, x.dtype, plans.device_target(x.device))
    with _device_ctx(x):
        plans.launch(
            _upsample_fwd_kernel, plan,
            x, v, wt, bt, norm_weight.contiguous(), norm_bias.contiguous(), out,
            NP, H, W, Hr, Wr, C,
            x.stride(0), x.stride(1), x.stride(2), v.stride(0), v.stride(1), v.stride(2),
            float(eps),
        )  # fmt: skip
    return out


def _bwd(
    dout: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    sr: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dout: [B, H, W, C] -> (dv [B, Hr, Wr, C], dweight [sr*sr*C, 1, 3, 3], dbias [sr*sr*C],
    dnorm_weight [C], dnorm_bias [C]); dv contiguous, all in the inputs' dtype."""
    dout = _unit_channel_stride(dout)
    v = _unit_channel_stride(v)
    B, H, W, C = dout.shape
    Hr, Wr = v.shape[1], v.shape[2]
    NP = B * Hr * Wr
    S = sr * sr
    if dout.numel() == 0 or NP == 0:  # nothing to launch: every gradient is zero
        return (
            torch.zeros_like(v, memory_format=torch.contiguous_format),
            torch.zeros_like(weight),
            torch.zeros_like(bias),
            torch.zeros_like(norm_weight),
            torch.zeros_like(norm_bias),
        )
    dv = _empty((B, Hr, Wr, C), v.dtype, v.device)
    g = _empty((B, H, W, C), torch.float32, v.device)
    plan = plans.upsample_bwd_plan(B, Hr, Wr, C, sr, v.dtype, plans.device_target(v.device))
    part = _empty((plan.split, S, _N_PART, C), torch.float32, v.device)
    wt, bt = _subpixel_major(weight, bias, sr)
    with _device_ctx(v):
        plans.launch(
            _upsample_bwd_g_kernel, plan.g,
            dout, v, wt, bt, norm_weight.contiguous(), g, part,
            NP, H, W, Hr, Wr, C, plan.blocks_per_split,
            dout.stride(0), dout.stride(1), dout.stride(2), v.stride(0), v.stride(1), v.stride(2),
            float(eps),
        )  # fmt: skip
        plans.launch(_upsample_bwd_dv_kernel, plan.dv, g, wt, dv, NP, H, W, Hr, Wr, C)
    part = part.sum(0)  # [sr*sr, 12, C]: the second stage of the reduction
    dweight = part[:, :9].permute(2, 0, 1).reshape(C * S, 1, 3, 3)  # o = c*sr*sr + s
    dbias = part[:, 9].t().reshape(C * S)
    dnorm_weight = part[:, 10].sum(0)
    dnorm_bias = part[:, 11].sum(0)
    dt = weight.dtype
    # copy=True: at sr=1 the reshapes are views of one buffer, and a custom op's outputs may not alias
    cf = torch.contiguous_format
    return (
        dv,
        dweight.to(dt, memory_format=cf, copy=True),
        dbias.to(dt, memory_format=cf, copy=True),
        dnorm_weight.to(dt),
        dnorm_bias.to(dt),
    )


# torch.compile sees two opaque ops with shape-only fake implementations.


@torch.library.custom_op("restv2::upsample_add_fwd", mutates_args=())
def upsample_add_fwd(
    x: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    sr: int,
    eps: float,
) -> torch.Tensor:
    return _fwd(x, v, weight, bias, norm_weight, norm_bias, sr, eps)


@upsample_add_fwd.register_fake
def _(x, v, weight, bias, norm_weight, norm_bias, sr, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("restv2::upsample_add_bwd", mutates_args=())
def upsample_add_bwd(
    dout: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    sr: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(dout, v, weight, bias, norm_weight, norm_bias, sr, eps)


@upsample_add_bwd.register_fake
def _(dout, v, weight, bias, norm_weight, norm_bias, sr, eps):
    return (
        v.new_empty(v.shape),
        weight.new_empty(weight.shape),
        bias.new_empty(bias.shape),
        norm_weight.new_empty(norm_weight.shape),
        norm_bias.new_empty(norm_bias.shape),
    )


# ----------------------------------------------------------------------------- autograd


class _UpsampleAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v, weight, bias, norm_weight, norm_bias, sr, eps):
        ctx.save_for_backward(v, weight, bias, norm_weight, norm_bias)
        ctx.sr, ctx.eps = sr, eps
        return torch.ops.restv2.upsample_add_fwd(x, v, weight, bias, norm_weight, norm_bias, sr, eps)

    @staticmethod
    def backward(ctx, dout):
        v, weight, bias, norm_weight, norm_bias = ctx.saved_tensors
        grads = (None,) * 5
        if any(ctx.needs_input_grad[1:6]):
            grads = torch.ops.restv2.upsample_add_bwd(dout, v, weight, bias, norm_weight, norm_bias, ctx.sr, ctx.eps)
        dx = dout if ctx.needs_input_grad[0] else None  # the residual passes dout through
        return (dx, *(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[1:6])), None, None)


# ----------------------------------------------------------------------------- public


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
    """``x + LayerNorm(crop(PixelShuffle(conv3x3_depthwise(v))))`` with fused Triton kernels.

    x: [B, H, W, C] and v: [B, Hr, Wr, C], channels-last, any strides (v may be the V half
    of a kv tensor, read in place); weight: [sr*sr*C, 1, 3, 3]; bias: [sr*sr*C];
    norm_weight, norm_bias: [C]. Hr*sr >= H and Wr*sr >= W (top-left crop). fp16, bf16 or
    fp32, statistics and accumulation in fp32. Returns [B, H, W, C], contiguous.
    Differentiable w.r.t. all six tensors.
    """
    check_upsample_inputs(x, v, weight, bias, norm_weight, norm_bias, sr, eps)
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"upsample_add: the Triton kernels take fp16/bf16/fp32, got {x.dtype} (use the reference for fp64)"
        )
    C = x.shape[3]
    if not 1 <= C <= MAX_C:
        raise ValueError(f"upsample_add: the Triton kernels take 1 to {MAX_C} channels, got C={C}")
    check_kernel_device(x, v, weight, bias, norm_weight, norm_bias)
    return _UpsampleAdd.apply(x, v, weight, bias, norm_weight, norm_bias, sr, float(eps))
