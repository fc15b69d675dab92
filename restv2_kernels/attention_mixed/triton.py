"""Fused Triton kernels for ResTv1's EMSA with the multi-head interaction, forward and backward.

``emsa_attention_mixed(q, k, v, weight, bias, scale=None, eps=1e-5)`` computes, per batch
element and head g (q: [B, N, H, D]; k, v: [B, M, H, D]; weight [H, H, 1, 1], bias [H], the
1x1 conv mixing the heads' scores)::

    s_h = scale * q_h k_h^T                    # [N, M] per head
    t_g = sum_h W[g, h] s_h + b_g              # the heads' interaction
    p_g = softmax(t_g)                         # over the M keys
    a_g = (p_g - mean_g) * rstd_g              # InstanceNorm over all N * M entries of p_g
    o_g = a_g v_g

without storing anything of size N x M: all heads of a query block meet in one program.

**The mixed scores as one dot.** ``t_g = scale * sum_h W[g, h] q_h . k_h + b_g`` is a dot over
all C = H * D channels of a query row with all channels of a key row, once q's channels of head
h are multiplied by ``W[g, h]``. So each program loads q [BLOCK_N, C] and k [BLOCK_M, C] tiles
(the Linear outputs' rows, read in place) and ``t_g = dot(q * w_g, k^T) + b_g`` is one
tensor-core dot of depth C per head g (two in 16-bit: q * w_g split into hi + lo parts, see
``_scaled_split``). The channels are laid out padded, head h at
``[h * BLOCK_D, h * BLOCK_D + D)`` of a ``BLOCK_C = next_pow2(H) * BLOCK_D`` tile, so every
per-head quantity is a masked gather and any strides work.

**Centred around 1/M.** Every softmax row sums to 1, so mean_g = 1/M up to rounding. The kernels
accumulate ``p - c`` with c = 1/M (fp32) and keep ``eps_g = mean_g - c``, which is of rounding
size: ``o_g = rstd_g * (sum_m (p - c) v_m - eps_g * sum_m v_m)`` and the variance
``E[(p - c)^2] - eps_g^2`` lose nothing to cancellation, even where attention is near uniform
(p ~ c everywhere, where rstd approaches 1/sqrt(1e-5) ~ 316 and amplifies every error).

Forward (``_mixed_fwd_kernel``): one program per (query block, head g, b). When all keys fit one
block (M <= BLOCK_M, the 224-px models) the softmax is exact in one pass; otherwise a first pass
finds each row's max and sum (online) and a second one forms the exactly normalised p. It writes
``sum_m (p - c) v`` into o, the row statistics ``rows`` [2, B, H, N] fp32 (max in log2 units
and sum: what the backward needs to rebuild p exactly),
per-program partial sums of ``p - c`` and ``(p - c)^2`` (``part`` [B, H, query blocks, 2]), and
``sum_m v_g`` (``vsum`` [B, H, D], written by the first query block). A deterministic
``torch.sum`` of the partials gives ``norm`` [B, H, 2] = (rstd, eps_g); ``_mixed_norm_kernel``
then rescales o in place.

Backward. With dA = dO v^T (the gradient of the normalised map a), InstanceNorm gives
``dp = rstd * (dA - mean(dA) - a * G2_g)`` with ``G2_g = mean(dA * a)`` over the whole map;
mean(dA) is constant per row and the softmax removes it. The softmax backward is
``dt = p * (dp - delta)`` with ``delta_n = sum_m p dp``, so
``dt = p * rstd * ((dA - <p, dA>_n) - G2_g * (a - <p, a>_n))`` with the row means
``<p, x>_n = sum_m p x / sum_m p``. Then, through the conv,
``dq_h = scale * sum_g W[g, h] dt_g k_h``, ``dk_h = scale * sum_g W[g, h] dt_g^T q_h``,
``dW[g, h] = sum dt_g * s_h = scale * sum_n q_h . (dt_g k_h)``, ``dv_g = a_g^T dO_g``, and
``db_g = 0`` exactly: the bias shifts whole softmax rows, so neither the output nor the loss
depends on it (autograd's eager value is rounding noise, ~1e-5 in fp32).
- ``_mixed_bwd_stats_kernel``: one program per (query block, head g, b): the row means
  ``<p, dA>``, ``<p, a>`` (``grows`` [2, B, H, N]) and partial sums of dA * a, from the very p,
  a and dA the next two kernels rebuild. G2 computed this way (not as ``sum dO . o`` from the
  rounded output) is consistent with those a to fp32 rounding: where the InstanceNorm gradient
  nearly cancels (a map of two entries, N * M = 2, has a = +-1 whatever p is) the kernels stay
  as exact as float64 allows, where ``dO . o`` in 16-bit would leave fp16-sized garbage.
- ``_mixed_bwd_dq_kernel``: one program per (query block, b), every head: dq, and per-program
  partials of dW (summed by ``torch.sum``, no atomics).
- ``_mixed_bwd_dkdv_kernel``: one program per (key block, query split, b), every head: the key
  block stays on chip while the split's query blocks stream past; fp32 partials over the splits
  as in ``restv2_kernels.attention`` (dk, dv directly when there is one split).
With one key (M = 1) every softmax row is exactly 1, the normalised map exactly 0, and so are
the output and every gradient: the backward returns zeros without launching.

**Status: not used by the model yet.** The interpreter proves the maths (tests/test_attention_mixed.py),
but the GPU target check shows these whole-row tiles do not fit a GPU at the zoo's widths: from
H * D = 256 up, the [BLOCK_N, BLOCK_C] q / k tiles and fp32 dq / dk accumulators spill (tens of
bytes to kilobytes a thread on sm_80-sm_90, with 4, 8 or 16 warps) and, at BLOCK_C = 1024, exceed
sm_89's shared memory. The next step keeps per-head [BLOCK_N, BLOCK_D] tiles and mixes the
heads' [BLOCK_N, BLOCK_M] score tiles instead (a batched per-head dot, then the H x H mix on
score tiles). Until then ResTv1 keeps the eager path for its transform stages.

For torch.compile the launchers are the custom ops ``restv2::emsa_attention_mixed_fwd`` /
``restv2::emsa_attention_mixed_bwd`` with fake implementations.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import plans
from ..attention.triton import _device_guard, _unit_last
from ..backend import check_kernel_device
from .reference import check_mixed_inputs

_LOG2E = 1.4426950408889634
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _channel_offsets(HEADS_P2: tl.constexpr, BLOCK_D: tl.constexpr, H, D):
    """The padded channel layout: head h's D channels at [h * BLOCK_D, h * BLOCK_D + D)."""
    offs_c = tl.arange(0, HEADS_P2 * BLOCK_D)
    head_c = offs_c // BLOCK_D
    dd_c = offs_c % BLOCK_D
    return head_c, dd_c, (head_c < H) & (dd_c < D)


@triton.jit
def _scaled_split(q, scale_c):
    """q times a per-channel fp32 scale, as hi + lo in q's dtype. In 16-bit the pair holds the
    product to about 2^-22 (fp16) / 2^-16 (bf16) where one rounding would cost 2^-11 / 2^-8, so
    the mixed scores are as exact as the inputs allow (their softmax differences and the
    InstanceNorm variance amplify any error in them). In fp32 ``lo`` is unused."""
    x = q.to(tl.float32) * scale_c[None, :]
    hi = x.to(q.dtype)
    return hi, (x - hi.to(tl.float32)).to(q.dtype)


@triton.jit
def _scores(qw_hi, qw_lo, k, bias2, DOT_PRECISION: tl.constexpr):
    """t (log2 units) of a [BLOCK_N, BLOCK_M] tile: dot(q * w_g, k^T) + b_g, hi and lo parts in 16-bit."""
    t = tl.dot(qw_hi, tl.trans(k), input_precision=DOT_PRECISION)
    if qw_hi.dtype != tl.float32:
        t += tl.dot(qw_lo, tl.trans(k), input_precision=DOT_PRECISION)
    return t + bias2


@triton.jit
def _scores_t(k, qw_hi, qw_lo, bias2, DOT_PRECISION: tl.constexpr):
    """``_scores`` transposed: [BLOCK_M, BLOCK_N], keys on rows."""
    t = tl.dot(k, tl.trans(qw_hi), input_precision=DOT_PRECISION)
    if qw_hi.dtype != tl.float32:
        t += tl.dot(k, tl.trans(qw_lo), input_precision=DOT_PRECISION)
    return t + bias2


@triton.jit
def _p_a_dpv(qw_hi, qw_lo, k, v, do, bias2, m2, l_i, mask, center, shift, rstd, DOT_PRECISION: tl.constexpr):
    """One [BLOCK_N, BLOCK_M] tile of head g in the backward: P rebuilt from the saved row max
    (log2 units) and sum, the normalised map a = (p - mean) * rstd, and dA = dO v^T. Padded
    keys and queries get p = a = 0 (exp2 of a padded score can overflow)."""
    t = _scores(qw_hi, qw_lo, k, bias2, DOT_PRECISION)
    p = tl.exp2(tl.where(mask, t - m2[:, None], float("-inf"))) / l_i[:, None]
    a = tl.where(mask, ((p - center) - shift) * rstd, 0.0)
    return p, a, tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=["N", "M", "H", "PLANE"])
def _mixed_fwd_kernel(
    Q, K, V, W, BIAS, O, ROWS, PART, VSUM,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_wg, stride_wh,
    N, M, H, D, PLANE,  # PLANE = B * H * N: one statistic of ROWS
    qk_scale, center,  # scale * log2(e); c = 1/M
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEADS_P2: tl.constexpr,
    ONE_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """o[b, n, g] = sum_m (p - c) v_g; rows[:, b, g, n]; part[b, g, query block]; vsum[b, g].

    Grid: (cdiv(N, BLOCK_N) * H * B,), query block fastest, then head g.
    """
    pid = tl.program_id(0)
    n_qblocks = tl.cdiv(N, BLOCK_N)
    qblock = pid % n_qblocks
    start_n = qblock * BLOCK_N
    bg = (pid // n_qblocks).to(tl.int64)
    b = bg // H
    g = bg % H

    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    head_c, dd_c, mask_c = _channel_offsets(HEADS_P2, BLOCK_D, H, D)
    mask_n = start_n + offs_n < N
    mask_d = offs_d < D

    # q's channels of head h scaled by W[g, h] (and scale * log2 e): t_g is one dot over C
    w_g = tl.load(W + g * stride_wg + head_c * stride_wh, mask=head_c < H, other=0.0).to(tl.float32)
    bias2 = tl.load(BIAS + g).to(tl.float32) * 1.4426950408889634
    q = tl.load(Q + b * stride_qb + (start_n + offs_n)[:, None].to(tl.int64) * stride_qn
                + (head_c * stride_qh + dd_c)[None, :], mask=mask_n[:, None] & mask_c[None, :], other=0.0)
    qw_hi, qw_lo = _scaled_split(q, w_g * qk_scale)
    k_ptrs = K + b * stride_kb + offs_m[:, None] * stride_km + (head_c * stride_kh + dd_c)[None, :]
    v_ptrs = V + b * stride_vb + g * stride_vh + offs_m[:, None] * stride_vm + offs_d[None, :]

    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    row_sq = tl.zeros([BLOCK_N], tl.float32)
    row_s1 = tl.zeros([BLOCK_N], tl.float32)
    vsum = tl.zeros([BLOCK_D], tl.float32)
    if ONE_BLOCK:
        # every key in one block: the exact softmax of eager (max, exp, divide by the sum)
        mask_m = offs_m < M
        k = tl.load(k_ptrs, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        t = _scores(qw_hi, qw_lo, k, bias2, DOT_PRECISION)
        t = tl.where(mask_m[None, :], t, float("-inf"))
        m_i = tl.max(t, 1)
        e = tl.exp2(t - m_i[:, None])
        l_i = tl.sum(e, 1)
        pc = tl.where(mask_n[:, None] & mask_m[None, :], e / l_i[:, None] - center, 0.0)
        acc = tl.dot(pc.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_s1 = tl.sum(pc, 1)
        row_sq = tl.sum(pc * pc, 1)
        vsum = tl.sum(v.to(tl.float32), 0)
    else:
        # pass 1: each row's max and sum, online
        m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_N], tl.float32)
        for start_m in range(0, M, BLOCK_M):
            mask_m = start_m + offs_m < M
            k = tl.load(k_ptrs + start_m * stride_km, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
            t = _scores(qw_hi, qw_lo, k, bias2, DOT_PRECISION)
            t = tl.where(mask_m[None, :], t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(t, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(t - m_new[:, None]), 1)
            m_i = m_new
        # pass 2: the exactly normalised p, centred
        for start_m in range(0, M, BLOCK_M):
            mask_m = start_m + offs_m < M
            k = tl.load(k_ptrs + start_m * stride_km, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
            v = tl.load(v_ptrs + start_m * stride_vm, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            t = _scores(qw_hi, qw_lo, k, bias2, DOT_PRECISION)
            p = tl.exp2(t - m_i[:, None]) / l_i[:, None]
            pc = tl.where(mask_n[:, None] & mask_m[None, :], p - center, 0.0)
            acc += tl.dot(pc.to(v.dtype), v, input_precision=DOT_PRECISION)
            row_s1 += tl.sum(pc, 1)
            row_sq += tl.sum(pc * pc, 1)
            vsum += tl.sum(v.to(tl.float32), 0)

    n_idx = start_n + offs_n
    tl.store(O + b * stride_ob + g * stride_oh + n_idx[:, None].to(tl.int64) * stride_on + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    rows = ROWS + bg * N + n_idx
    tl.store(rows, m_i, mask=mask_n)
    tl.store(rows + PLANE, l_i, mask=mask_n)
    part = PART + (bg * n_qblocks + qblock) * 2
    tl.store(part, tl.sum(row_s1, 0))
    tl.store(part + 1, tl.sum(row_sq, 0))
    if qblock == 0:
        tl.store(VSUM + bg * D + offs_d, vsum, mask=mask_d)


@triton.jit(do_not_specialize=["R", "H"])
def _mixed_norm_kernel(
    O, NORM, VSUM,
    stride_ob, stride_on, stride_oh,
    R, H, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HEADS_P2: tl.constexpr,
):
    """In place: o[b, n, g] = rstd_g * (o[b, n, g] - eps_g * vsum_g), over all heads of a row block.

    NORM: [B, H, 2] fp32 (rstd, eps_g = mean_g - 1/M); VSUM: [B, H, D] fp32.
    Grid: (cdiv(R, BLOCK_R) * B,).
    """
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(R, BLOCK_R)
    start = (pid % n_blocks) * BLOCK_R
    b = (pid // n_blocks).to(tl.int64)
    offs_r = start + tl.arange(0, BLOCK_R)
    head_c, dd_c, mask_c = _channel_offsets(HEADS_P2, BLOCK_D, H, D)
    rstd = tl.load(NORM + (b * H + head_c) * 2, mask=mask_c, other=0.0)
    shift = tl.load(NORM + (b * H + head_c) * 2 + 1, mask=mask_c, other=0.0)
    vsum = tl.load(VSUM + (b * H + head_c) * D + dd_c, mask=mask_c, other=0.0)
    ptrs = O + b * stride_ob + offs_r[:, None].to(tl.int64) * stride_on + (head_c * stride_oh + dd_c)[None, :]
    mask = (offs_r < R)[:, None] & mask_c[None, :]
    o = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    o = rstd[None, :] * (o - (shift * vsum)[None, :])
    tl.store(ptrs, o.to(O.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "M", "H", "PLANE"])
def _mixed_bwd_stats_kernel(
    Q, K, V, W, BIAS, DO, ROWS, NORM, GROWS, G2_PART,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_wg, stride_wh,
    N, M, H, D, PLANE,
    qk_scale, center,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEADS_P2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The backward's statistics of a query block and head g, from the very p, a and dA the
    other two kernels rebuild: GROWS[0 / 1, b, g, n] = sum_m p dA / sum_m p and
    sum_m p a / sum_m p; G2_PART[b, g, query block] = sum dA * a over the block.

    Grid: (cdiv(N, BLOCK_N) * H * B,), query block fastest, then head g.
    """
    pid = tl.program_id(0)
    n_qblocks = tl.cdiv(N, BLOCK_N)
    qblock = pid % n_qblocks
    start_n = qblock * BLOCK_N
    bg = (pid // n_qblocks).to(tl.int64)
    b = bg // H
    g = bg % H

    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    head_c, dd_c, mask_c = _channel_offsets(HEADS_P2, BLOCK_D, H, D)
    n_idx = start_n + offs_n
    mask_n = n_idx < N
    mask_d = offs_d < D
    rows64 = n_idx[:, None].to(tl.int64)

    w_g = tl.load(W + g * stride_wg + head_c * stride_wh, mask=head_c < H, other=0.0).to(tl.float32)
    bias2 = tl.load(BIAS + g).to(tl.float32) * 1.4426950408889634
    q = tl.load(Q + b * stride_qb + rows64 * stride_qn + (head_c * stride_qh + dd_c)[None, :],
                mask=mask_n[:, None] & mask_c[None, :], other=0.0)
    qw_hi, qw_lo = _scaled_split(q, w_g * qk_scale)
    do = tl.load(DO + b * stride_dob + g * stride_doh + rows64 * stride_don + offs_d[None, :],
                 mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    rstd = tl.load(NORM + bg * 2)
    shift = tl.load(NORM + bg * 2 + 1)
    m2 = tl.load(ROWS + bg * N + n_idx, mask=mask_n, other=0.0)
    l_i = tl.load(ROWS + PLANE + bg * N + n_idx, mask=mask_n, other=1.0)
    k_ptrs = K + b * stride_kb + offs_m[:, None] * stride_km + (head_c * stride_kh + dd_c)[None, :]
    v_ptrs = V + b * stride_vb + g * stride_vh + offs_m[:, None] * stride_vm + offs_d[None, :]

    p_dpv = tl.zeros([BLOCK_N], tl.float32)
    p_a = tl.zeros([BLOCK_N], tl.float32)
    p_sum = tl.zeros([BLOCK_N], tl.float32)
    g2 = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, M, BLOCK_M):
        mask_m = start_m + offs_m < M
        k = tl.load(k_ptrs + start_m * stride_km, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        v = tl.load(v_ptrs + start_m * stride_vm, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        p, a, dpv = _p_a_dpv(qw_hi, qw_lo, k, v, do, bias2, m2, l_i, mask_n[:, None] & mask_m[None, :], center,
                             shift, rstd, DOT_PRECISION)
        p_dpv += tl.sum(p * dpv, 1)
        p_a += tl.sum(p * a, 1)
        p_sum += tl.sum(p, 1)
        g2 += tl.sum(dpv * a, 1)
    # divided by the row's own sum of p: each softmax-gradient row then sums to 0 to rounding
    p_sum = tl.where(mask_n, p_sum, 1.0)
    tl.store(GROWS + bg * N + n_idx, p_dpv / p_sum, mask=mask_n)
    tl.store(GROWS + PLANE + bg * N + n_idx, p_a / p_sum, mask=mask_n)
    tl.store(G2_PART + bg * n_qblocks + qblock, tl.sum(g2, 0))


@triton.jit(do_not_specialize=["N", "M", "H", "PLANE"])
def _mixed_bwd_dq_kernel(
    Q, K, V, W, BIAS, DO, ROWS, NORM, GROWS, G2, DQ, DW_PART,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_dqb, stride_dqn, stride_dqh,
    stride_wg, stride_wh,
    N, M, H, D, PLANE,
    sm_scale, qk_scale, center,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEADS_P2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq of a query block over every head and key, and this block's partial dW (without the
    scale): DW_PART [B, query blocks, H, H].

    Grid: (cdiv(N, BLOCK_N) * B,).
    """
    pid = tl.program_id(0)
    n_qblocks = tl.cdiv(N, BLOCK_N)
    qblock = pid % n_qblocks
    start_n = qblock * BLOCK_N
    b = (pid // n_qblocks).to(tl.int64)

    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    head_c, dd_c, mask_c = _channel_offsets(HEADS_P2, BLOCK_D, H, D)
    n_idx = start_n + offs_n
    mask_n = n_idx < N
    mask_d = offs_d < D
    rows64 = n_idx[:, None].to(tl.int64)

    q = tl.load(Q + b * stride_qb + rows64 * stride_qn + (head_c * stride_qh + dd_c)[None, :],
                mask=mask_n[:, None] & mask_c[None, :], other=0.0)
    k_ptrs = K + b * stride_kb + offs_m[:, None] * stride_km + (head_c * stride_kh + dd_c)[None, :]
    dq = tl.zeros([BLOCK_N, HEADS_P2 * BLOCK_D], tl.float32)
    heads = tl.arange(0, HEADS_P2)
    for g in range(H):
        bg = b * H + g
        w_g = tl.load(W + g * stride_wg + head_c * stride_wh, mask=head_c < H, other=0.0).to(tl.float32)
        qw_hi, qw_lo = _scaled_split(q, w_g * qk_scale)
        bias2 = tl.load(BIAS + g).to(tl.float32) * 1.4426950408889634
        rstd = tl.load(NORM + bg * 2)
        shift = tl.load(NORM + bg * 2 + 1)
        g2 = tl.load(G2 + bg)
        m2 = tl.load(ROWS + bg * N + n_idx, mask=mask_n, other=0.0)
        l_i = tl.load(ROWS + PLANE + bg * N + n_idx, mask=mask_n, other=1.0)
        p_dpv = tl.load(GROWS + bg * N + n_idx, mask=mask_n, other=0.0)
        p_a = tl.load(GROWS + PLANE + bg * N + n_idx, mask=mask_n, other=0.0)
        do = tl.load(DO + b * stride_dob + g * stride_doh + rows64 * stride_don + offs_d[None, :],
                     mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v_ptrs = V + b * stride_vb + g * stride_vh + offs_m[:, None] * stride_vm + offs_d[None, :]
        qx = tl.zeros([HEADS_P2 * BLOCK_D], tl.float32)
        for start_m in range(0, M, BLOCK_M):
            mask_m = start_m + offs_m < M
            k = tl.load(k_ptrs + start_m * stride_km, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
            v = tl.load(v_ptrs + start_m * stride_vm, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            p, a, dpv = _p_a_dpv(qw_hi, qw_lo, k, v, do, bias2, m2, l_i, mask_n[:, None] & mask_m[None, :], center,
                                 shift, rstd, DOT_PRECISION)
            dt = p * rstd * ((dpv - p_dpv[:, None]) - g2 * (a - p_a[:, None]))
            x = tl.dot(dt.to(k.dtype), k, input_precision=DOT_PRECISION)  # sum_m dt_g k_h, every h
            dq += x * w_g[None, :]
            qx += tl.sum(q.to(tl.float32) * x, 0)
        dw = tl.sum(tl.reshape(qx, [HEADS_P2, BLOCK_D]), 1)  # per head h: sum_n q_h . x_h
        tl.store(DW_PART + ((b * n_qblocks + qblock) * H + g) * H + heads, dw, mask=heads < H)

    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + rows64 * stride_dqn + (head_c * stride_dqh + dd_c)[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


@triton.jit(do_not_specialize=["N", "M", "H", "PLANE", "NUM_SPLITS", "BLOCKS_PER_SPLIT"])
def _mixed_bwd_dkdv_kernel(
    Q, K, V, W, BIAS, DO, ROWS, NORM, GROWS, G2, DK_PART, DV_PART,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_wg, stride_wh,
    stride_ps, stride_pb, stride_pm, stride_ph,  # DK_PART and DV_PART share one layout
    N, M, H, D, PLANE,
    sm_scale, qk_scale, center,
    NUM_SPLITS, BLOCKS_PER_SPLIT,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEADS_P2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Partial dk, dv of one key block, every head, over one split's share of the queries.

    DK_PART, DV_PART: [S, B, M, H, D], fp32 partials summed over S afterwards (or, when S = 1,
    the final dk, dv in the input dtype). Grid: (cdiv(M, BLOCK_M) * S * B,), key block
    fastest, then split; split s covers query blocks [s * BLOCKS_PER_SPLIT, (s + 1) * BLOCKS_PER_SPLIT).
    """
    pid = tl.program_id(0)
    n_kblocks = tl.cdiv(M, BLOCK_M)
    start_m = (pid % n_kblocks) * BLOCK_M
    rest = pid // n_kblocks
    split = rest % NUM_SPLITS
    b = (rest // NUM_SPLITS).to(tl.int64)

    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    head_c, dd_c, mask_c = _channel_offsets(HEADS_P2, BLOCK_D, H, D)
    m_idx = start_m + offs_m
    mask_m = m_idx < M
    mask_d = offs_d < D
    keys64 = m_idx[:, None].to(tl.int64)

    k = tl.load(K + b * stride_kb + keys64 * stride_km + (head_c * stride_kh + dd_c)[None, :],
                mask=mask_m[:, None] & mask_c[None, :], other=0.0)
    dk = tl.zeros([BLOCK_M, HEADS_P2 * BLOCK_D], tl.float32)
    first = split * BLOCKS_PER_SPLIT
    last = tl.minimum(first + BLOCKS_PER_SPLIT, tl.cdiv(N, BLOCK_N))
    part = split.to(tl.int64) * stride_ps + b * stride_pb + keys64 * stride_pm
    for g in range(H):
        bg = b * H + g
        w_g = tl.load(W + g * stride_wg + head_c * stride_wh, mask=head_c < H, other=0.0).to(tl.float32)
        bias2 = tl.load(BIAS + g).to(tl.float32) * 1.4426950408889634
        rstd = tl.load(NORM + bg * 2)
        shift = tl.load(NORM + bg * 2 + 1)
        g2 = tl.load(G2 + bg)
        v = tl.load(V + b * stride_vb + g * stride_vh + keys64 * stride_vm + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for block in range(first, last):
            n_idx = block * BLOCK_N + offs_n
            mask_n = n_idx < N
            rows64 = n_idx[:, None].to(tl.int64)
            q = tl.load(Q + b * stride_qb + rows64 * stride_qn + (head_c * stride_qh + dd_c)[None, :],
                        mask=mask_n[:, None] & mask_c[None, :], other=0.0)
            qw_hi, qw_lo = _scaled_split(q, w_g * qk_scale)
            do = tl.load(DO + b * stride_dob + g * stride_doh + rows64 * stride_don + offs_d[None, :],
                         mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            m2 = tl.load(ROWS + bg * N + n_idx, mask=mask_n, other=0.0)
            l_i = tl.load(ROWS + PLANE + bg * N + n_idx, mask=mask_n, other=1.0)
            p_dpv = tl.load(GROWS + bg * N + n_idx, mask=mask_n, other=0.0)
            p_a = tl.load(GROWS + PLANE + bg * N + n_idx, mask=mask_n, other=0.0)
            # transposed [BLOCK_M, BLOCK_N]: keys on rows, so dk and dv accumulate without transposes
            t_t = _scores_t(k, qw_hi, qw_lo, bias2, DOT_PRECISION)
            mask_mn = mask_m[:, None] & mask_n[None, :]
            p_t = tl.exp2(tl.where(mask_mn, t_t - m2[None, :], float("-inf"))) / l_i[None, :]
            a_t = tl.where(mask_mn, ((p_t - center) - shift) * rstd, 0.0)
            dv += tl.dot(a_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dpv_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dt_t = p_t * rstd * ((dpv_t - p_dpv[None, :]) - g2 * (a_t - p_a[None, :]))
            dk += tl.dot(dt_t.to(q.dtype), q, input_precision=DOT_PRECISION) * w_g[None, :]
        tl.store(DV_PART + part + g * stride_ph + offs_d[None, :], dv.to(DV_PART.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d[None, :])
    dk = dk * sm_scale
    tl.store(DK_PART + part + (head_c * stride_ph + dd_c)[None, :], dk.to(DK_PART.dtype.element_ty),
             mask=mask_m[:, None] & mask_c[None, :])


# ---------------------------------------------------------------------------------------
# Launchers (tensors in, tensors out)
# ---------------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer comes from here (tests patch it to fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _params(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv's weight as [H, H] and its bias, both fp32 (H * H + H values): one kernel
    variant whatever their dtype (fp32 under autocast, 16-bit in a half model)."""
    H = weight.shape[0]
    return weight.reshape(H, H).float(), bias.float()


def _norm_stats(part: torch.Tensor, L: int, eps: float) -> torch.Tensor:
    """(rstd, eps_g) [B, H, 2] fp32 from the forward's partial sums of p - c and (p - c)^2."""
    s1, s2 = (part.sum(2) / L).unbind(-1)  # a deterministic sum over the query blocks
    var = (s2 - s1 * s1).clamp_min(0.0)
    return torch.stack((torch.rsqrt(var + eps), s1), -1)


def attention_mixed_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the forward. Returns (o [B, N, H, D], rows [2, B, H, N], norm [B, H, 2]); rows
    and norm are fp32, saved for the backward."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, N, H, D = q.shape
    M = k.shape[1]
    device = q.device
    w, bias = _params(weight, bias)
    o = _empty((B, N, H, D), q.dtype, device)
    rows = _empty((2, B, H, N), torch.float32, device)
    vsum = _empty((B, H, D), torch.float32, device)
    if o.numel() == 0:
        return o, rows, _empty((B, H, 2), torch.float32, device)
    target = plans.device_target(device)
    plan = plans.attention_mixed_fwd_plan(B, N, M, H, D, q.dtype, target)
    part = _empty((B, H, plan.n_qblocks, 2), torch.float32, device)
    with _device_guard(q):
        plans.launch(
            _mixed_fwd_kernel, plan.main,
            q, k, v, w, bias, o, rows, part, vsum,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            w.stride(0), w.stride(1),
            N, M, H, D, B * H * N, scale * _LOG2E, 1.0 / M,
        )
        norm = _norm_stats(part, N * M, eps)
        plans.launch(
            _mixed_norm_kernel, plan.norm,
            o, norm, vsum, o.stride(0), o.stride(1), o.stride(2), N, H, D,
        )
    return o, rows, norm


def attention_mixed_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    rows: torch.Tensor, norm: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the backward. Returns contiguous (dq, dk, dv) in q's dtype, dweight in weight's
    shape and dtype, dbias (zeros) in bias's."""
    do, q, k, v = (_unit_last(t) for t in (do, q, k, v))
    B, N, H, D = q.shape
    M = k.shape[1]
    dtype, device = q.dtype, q.device
    dq = _empty((B, N, H, D), dtype, device)
    dbias = torch.zeros_like(bias)  # exactly: the bias shifts whole softmax rows (module docstring)
    if dq.numel() == 0 or M == 1:
        # M = 1: softmax rows are exactly 1, the normalised map and every gradient exactly 0
        return dq.zero_(), k.new_zeros(k.shape), v.new_zeros(v.shape), torch.zeros_like(weight), dbias
    w, bias = _params(weight, bias)
    plan = plans.attention_mixed_bwd_plan(B, N, M, H, D, dtype, plans.device_target(device))
    grows = _empty((2, B, H, N), torch.float32, device)
    g2_part = _empty((B, H, plan.n_stats_blocks), torch.float32, device)
    dw_part = _empty((B, plan.n_qblocks, H, H), torch.float32, device)
    part_dtype = dtype if plan.splits == 1 else torch.float32
    dk_part = _empty((plan.splits, B, M, H, D), part_dtype, device)
    dv_part = _empty((plan.splits, B, M, H, D), part_dtype, device)
    strides = {name: (t.stride(0), t.stride(1), t.stride(2)) for name, t in
               (("q", q), ("k", k), ("v", v), ("do", do), ("dq", dq))}
    qkvdo = (*strides["q"], *strides["k"], *strides["v"], *strides["do"])
    shape = (N, M, H, D, B * H * N)
    with _device_guard(q):
        plans.launch(
            _mixed_bwd_stats_kernel, plan.stats,
            q, k, v, w, bias, do, rows, norm, grows, g2_part, *qkvdo, w.stride(0), w.stride(1),
            *shape, scale * _LOG2E, 1.0 / M,
        )
        g2 = g2_part.sum(-1) / (N * M)  # G2_g = mean(dA * a): a deterministic sum over the query blocks
        plans.launch(
            _mixed_bwd_dq_kernel, plan.dq,
            q, k, v, w, bias, do, rows, norm, grows, g2, dq, dw_part, *qkvdo, *strides["dq"],
            w.stride(0), w.stride(1), *shape, scale, scale * _LOG2E, 1.0 / M,
        )
        plans.launch(
            _mixed_bwd_dkdv_kernel, plan.dkdv,
            q, k, v, w, bias, do, rows, norm, grows, g2, dk_part, dv_part, *qkvdo, w.stride(0), w.stride(1),
            dk_part.stride(0), dk_part.stride(1), dk_part.stride(2), dk_part.stride(3),
            *shape, scale, scale * _LOG2E, 1.0 / M, plan.splits, plan.blocks_per_split,
        )
    dweight = (dw_part.sum((0, 1)) * scale).to(weight.dtype).reshape(weight.shape)
    if plan.splits == 1:
        return dq, dk_part[0], dv_part[0], dweight, dbias
    return dq, dk_part.sum(0).to(dtype), dv_part.sum(0).to(dtype), dweight, dbias


@torch.library.custom_op("restv2::emsa_attention_mixed_fwd", mutates_args=())
def _emsa_attention_mixed_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_mixed_fwd(q, k, v, weight, bias, scale, eps)


@_emsa_attention_mixed_fwd_op.register_fake
def _(q, k, v, weight, bias, scale, eps):
    B, N, H, D = q.shape
    return q.new_empty((B, N, H, D)), q.new_empty((2, B, H, N), dtype=torch.float32), q.new_empty(
        (B, H, 2), dtype=torch.float32)


@torch.library.custom_op("restv2::emsa_attention_mixed_bwd", mutates_args=())
def _emsa_attention_mixed_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    rows: torch.Tensor, norm: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_mixed_bwd(do, q, k, v, weight, bias, rows, norm, scale)


@_emsa_attention_mixed_bwd_op.register_fake
def _(do, q, k, v, weight, bias, rows, norm, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), torch.empty_like(weight),
            torch.empty_like(bias))


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------


class _EmsaAttentionMixed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, weight, bias, scale, eps):
        o, rows, norm = torch.ops.restv2.emsa_attention_mixed_fwd(q, k, v, weight, bias, scale, eps)
        ctx.save_for_backward(q, k, v, weight, bias, rows, norm)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, weight, bias, rows, norm = ctx.saved_tensors
        dq, dk, dv, dw, db = torch.ops.restv2.emsa_attention_mixed_bwd(do, q, k, v, weight, bias, rows, norm,
                                                                       ctx.scale)
        return dq, dk, dv, dw, db, None, None


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------


def emsa_attention_mixed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """ResTv1's attention with the head transform (1x1 conv across heads' scores, softmax,
    InstanceNorm), fused in Triton, differentiable in q, k, v, weight and bias.

    q: [B, N, H, D]; k, v: [B, M, H, D] (views with unit stride on D are read in place);
    weight: [H, H, 1, 1] or [H, H], bias: [H] or None (any float dtype: under autocast they stay
    fp32). Returns [B, N, H, D], contiguous, in q's dtype (fp16, bf16 or fp32; fp32
    accumulation). ``scale`` defaults to ``D ** -0.5``; ``eps`` is the InstanceNorm's.
    D: a multiple of 8 from 16 to 256; H * D at most ``plans.MIXED_MAX_CHANNELS``.
    """
    check_mixed_inputs(q, k, v, weight, bias, eps)
    if q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"emsa_attention_mixed: the Triton kernels take fp16/bf16/fp32 inputs, got {q.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"emsa_attention_mixed: the Triton kernels take a fp16/bf16/fp32 {name}, got {t.dtype}")
    plans.check_mixed_channels(q.shape[2], q.shape[3])
    check_kernel_device(q, k, v, weight)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"emsa_attention_mixed: scale must be finite, got {scale}")
    if bias is None:
        return _EmsaAttentionMixed.apply(q, k, v, weight, weight.new_zeros(q.shape[2]), scale, float(eps))
    return _EmsaAttentionMixed.apply(q, k, v, weight, bias, scale, float(eps))
