"""Fused Triton kernels for ResTv1's EMSA with the multi-head interaction, forward and backward.

``emsa_attention_mixed(q, k, v, weight, bias, scale=None, eps=1e-5)`` computes, per batch
element and head g (q: [B, N, H, D]; k, v: [B, M, H, D]; weight [H, H, 1, 1], bias [H], the
1x1 conv mixing the heads' scores)::

    s_h = scale * q_h k_h^T                    # [N, M] per head
    t_g = sum_h W[g, h] s_h + b_g              # the heads' interaction
    p_g = softmax(t_g)                         # over the M keys
    a_g = (p_g - mean_g) * rstd_g              # InstanceNorm over all N * M entries of p_g
    o_g = a_g v_g

without storing anything of size N x M.

**Per-head tiles, scores mixed in fp32.** Every program holds [BLOCK_N, BLOCK_D] and
[BLOCK_M, BLOCK_D] tiles of one head at a time, as ``restv2_kernels.attention`` does, whatever
H is: head g's mixed scores of a tile are ``t_g = sum_h W[g, h] * dot(q_h, k_h^T)``, H
tensor-core dots whose fp32 results are weighted and summed in fp32 (``_mixed_scores``), so the
mix is as exact as fp32 (eager rounds the scores to the input dtype before its conv). The cost
is recomputation: a program that needs t_g for one head runs H dots per tile. (Holding every
head's [BLOCK_N, D] rows and accumulators in one program, the first design, spilled registers
on sm_80-sm_90 from H * D = 256 up; per-head tiles fit every target, see the target check.)

**The bias is never added.** b_g shifts every score of head g's rows by one amount, which the
softmax removes exactly, so the kernels leave it out (and its gradient is exactly 0, below).
Besides the work, this keeps each score's rounding at the score's own size: eager adds b_g (of
order 1) to score differences that can be 100 times smaller, and the InstanceNorm's
1/sqrt(var + eps) amplifies that rounding where attention is near uniform.

**Centred around 1/M.** Every softmax row sums to 1, so mean_g = 1/M up to rounding. The kernels
accumulate ``p - c`` with c = 1/M (fp32) and keep ``eps_g = mean_g - c``, which is of rounding
size: ``o_g = rstd_g * (sum_m (p - c) v_m - eps_g * sum_m v_m)`` and the variance
``E[(p - c)^2] - eps_g^2`` lose nothing to cancellation, even where attention is near uniform
(p ~ c everywhere, where rstd approaches 1/sqrt(1e-5) ~ 316 and amplifies every error).

Forward (``_mixed_fwd_kernel``): one program per (query block, head g, b), H dots per tile.
When all keys fit one block (M <= BLOCK_M, the 224-px models) the softmax is exact in one pass;
otherwise a first pass finds each row's max and sum (online) and a second one forms the exactly
normalised p. It writes ``sum_m (p - c) v`` into o, the row statistics ``rows`` [2, B, H, N]
fp32 (max in log2 units and sum: what the backward needs to rebuild p exactly), per-program
partial sums of ``p - c`` and ``(p - c)^2`` (``part`` [B, H, query blocks, 2]), and
``sum_m v_g`` (``vsum`` [B, H, D], written by the first query block). A deterministic
``torch.sum`` of the partials gives ``norm`` [B, H, 2] = (rstd, eps_g); ``_mixed_norm_kernel``
then rescales o in place, elementwise.

Backward. With dA = dO v^T (the gradient of the normalised map a), InstanceNorm gives
``dp = rstd * (dA - mean(dA) - a * G2_g)`` with ``G2_g = mean(dA * a)`` over the whole map;
mean(dA) is constant per row and the softmax removes it. The softmax backward is
``dt = p * (dp - delta)`` with ``delta_n = sum_m p dp``, so
``dt = p * rstd * ((dA - <p, dA>_n) - G2_g * (a - <p, a>_n))`` with the row means
``<p, x>_n = sum_m p x / sum_m p``. Through the conv, the gradient of head h's raw scores is
``ds_h = sum_g W[g, h] dt_g``; then ``dq_h = scale * ds_h k_h``, ``dk_h = scale * ds_h^T q_h``,
``dW[g, h] = sum dt_g * s_h = scale * sum dt_g * (q_h k_h^T)``, ``dv_g = a_g^T dO_g``, and
``db_g = 0`` exactly: the bias shifts whole softmax rows, so neither the output nor the loss
depends on it (autograd's eager value is rounding noise, ~1e-5 in fp32).
- ``_mixed_bwd_stats_kernel``: one program per (query block, head g, b): the row means
  ``<p, dA>``, ``<p, a>`` (``grows`` [2, B, H, N]) and partial sums of dA * a, from the very p,
  a and dA the next two kernels rebuild. G2 computed this way (not as ``sum dO . o`` from the
  rounded output) is consistent with those a to fp32 rounding: where the InstanceNorm gradient
  nearly cancels (a map of two entries, N * M = 2, has a = +-1 whatever p is) the kernels stay
  as exact as float64 allows, where ``dO . o`` in 16-bit would leave fp16-sized garbage.
- ``_mixed_bwd_dq_kernel``: one program per (query block, head h, b): per key block it rebuilds
  every head's dt_g (H + 1 dots each), mixes them into ds_h, and adds ``ds_h k_h`` to dq_h; it
  also writes the block's partials of dW[:, h] (summed by ``torch.sum``, no atomics).
- ``_mixed_bwd_dkdv_kernel``: one program per (key block, query split, head h, b) on transposed
  tiles: dk_h from ds_h^T, dv_h from head h's own map; fp32 partials over the splits as in
  ``restv2_kernels.attention`` (dk, dv directly when there is one split).
The backward thus runs about H * (H + 1) dots per (query block, key block, head) where the
plain attention runs 4: the price of needing every head's scores for each head's gradient
without holding them all (dq/dk/dv of every head in one program is the spilling design).
With one key (M = 1) every softmax row is exactly 1, the normalised map exactly 0, and so are
the output and every gradient: the backward returns zeros without launching.

For torch.compile the launchers are the custom ops ``restv2::emsa_attention_mixed_fwd`` /
``restv2::emsa_attention_mixed_bwd`` with fake implementations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import plans
from ..attention.triton import _device_guard, _unit_last
from ..backend import check_kernel_device
from ..checks import scale_value
from .reference import check_mixed_inputs

_LOG2E = 1.4426950408889634
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _mixed_scores(A, B, W_g, a_off, b_off, mask_a, mask_b, stride_ah, stride_bh, stride_wh, H, qk_scale,
                  ROWS: tl.constexpr, COLS: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Head g's mixed scores of a [ROWS, COLS] tile in log2 units, without the conv's bias:
    ``sum_h W[g, h] * dot(a_h, b_h^T) * scale * log2(e)``.

    A, B: head 0 of the tiles' rows (q and k for t, k and q for t transposed); a_off / b_off:
    [ROWS / COLS, BLOCK_D] offsets; each head's score tile is an fp32 dot, weighted in fp32.
    """
    t = tl.zeros([ROWS, COLS], tl.float32)
    for h in range(H):
        a = tl.load(A + h * stride_ah + a_off, mask=mask_a, other=0.0)
        b = tl.load(B + h * stride_bh + b_off, mask=mask_b, other=0.0)
        t += tl.load(W_g + h * stride_wh) * tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION)
    return t * qk_scale


@triton.jit(do_not_specialize=["N", "M", "H", "PLANE"])
def _mixed_fwd_kernel(
    Q, K, V, W, O, ROWS, PART, VSUM,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_wg, stride_wh,
    N, M, H, D, PLANE,  # PLANE = B * H * N: one statistic of ROWS
    qk_scale, center,  # scale * log2(e); c = 1/M
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
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
    n_idx = start_n + offs_n
    mask_n = n_idx < N
    mask_d = offs_d < D
    mask_q = mask_n[:, None] & mask_d[None, :]
    q_off = n_idx[:, None].to(tl.int64) * stride_qn + offs_d[None, :]
    k_off = offs_m[:, None] * stride_km + offs_d[None, :]
    Q_b = Q + b * stride_qb
    K_b = K + b * stride_kb
    W_g = W + g * stride_wg
    v_ptrs = V + b * stride_vb + g * stride_vh + offs_m[:, None] * stride_vm + offs_d[None, :]

    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    row_sq = tl.zeros([BLOCK_N], tl.float32)
    row_s1 = tl.zeros([BLOCK_N], tl.float32)
    vsum = tl.zeros([BLOCK_D], tl.float32)
    if ONE_BLOCK:
        # every key in one block: the exact softmax of eager (max, exp, divide by the sum)
        mask_m = offs_m < M
        mask_k = mask_m[:, None] & mask_d[None, :]
        v = tl.load(v_ptrs, mask=mask_k, other=0.0)
        t = _mixed_scores(
            Q_b,
            K_b,
            W_g,
            q_off,
            k_off,
            mask_q,
            mask_k,
            stride_qh,
            stride_kh,
            stride_wh,
            H,
            qk_scale,
            BLOCK_N,
            BLOCK_M,
            DOT_PRECISION,
        )
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
            t = _mixed_scores(
                Q_b,
                K_b + start_m * stride_km,
                W_g,
                q_off,
                k_off,
                mask_q,
                mask_m[:, None] & mask_d[None, :],
                stride_qh,
                stride_kh,
                stride_wh,
                H,
                qk_scale,
                BLOCK_N,
                BLOCK_M,
                DOT_PRECISION,
            )
            t = tl.where(mask_m[None, :], t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(t, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(t - m_new[:, None]), 1)
            m_i = m_new
        # pass 2: the exactly normalised p, centred
        for start_m in range(0, M, BLOCK_M):
            mask_m = start_m + offs_m < M
            mask_k = mask_m[:, None] & mask_d[None, :]
            v = tl.load(v_ptrs + start_m * stride_vm, mask=mask_k, other=0.0)
            t = _mixed_scores(
                Q_b,
                K_b + start_m * stride_km,
                W_g,
                q_off,
                k_off,
                mask_q,
                mask_k,
                stride_qh,
                stride_kh,
                stride_wh,
                H,
                qk_scale,
                BLOCK_N,
                BLOCK_M,
                DOT_PRECISION,
            )
            p = tl.exp2(t - m_i[:, None]) / l_i[:, None]
            pc = tl.where(mask_n[:, None] & mask_m[None, :], p - center, 0.0)
            acc += tl.dot(pc.to(v.dtype), v, input_precision=DOT_PRECISION)
            row_s1 += tl.sum(pc, 1)
            row_sq += tl.sum(pc * pc, 1)
            vsum += tl.sum(v.to(tl.float32), 0)

    tl.store(
        O + b * stride_ob + g * stride_oh + n_idx[:, None].to(tl.int64) * stride_on + offs_d[None, :],
        acc.to(O.dtype.element_ty),
        mask=mask_q,
    )
    rows = ROWS + bg * N + n_idx
    tl.store(rows, m_i, mask=mask_n)
    tl.store(rows + PLANE, l_i, mask=mask_n)
    part = PART + (bg * n_qblocks + qblock) * 2
    tl.store(part, tl.sum(row_s1, 0))
    tl.store(part + 1, tl.sum(row_sq, 0))
    if qblock == 0:
        tl.store(VSUM + bg * D + offs_d, vsum, mask=mask_d)


@triton.jit(do_not_specialize=["TOTAL", "IMAGE", "H"])
def _mixed_norm_kernel(O, NORM, VSUM, TOTAL, IMAGE, H, D, BLOCK: tl.constexpr):
    """In place over the contiguous o [B, N, H, D] (TOTAL elements, IMAGE = N * H * D of them a
    batch element): o = rstd_g * (o - eps_g * vsum_g).

    NORM: [B, H, 2] fp32 (rstd, eps_g = mean_g - 1/M); VSUM: [B, H, D] fp32.
    Grid: (cdiv(TOTAL, BLOCK),).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TOTAL
    ch = offs % (H * D)  # head * D + d
    bh = (offs // IMAGE) * H + ch // D
    rstd = tl.load(NORM + bh * 2, mask=mask, other=0.0)
    shift = tl.load(NORM + bh * 2 + 1, mask=mask, other=0.0)
    vsum = tl.load(VSUM + bh * D + ch % D, mask=mask, other=0.0)
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(O + offs, (rstd * (o - shift * vsum)).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _p_and_a(t, m2, l_i, mask, center, shift, rstd):
    """P of a tile rebuilt from the saved row max (log2 units) and sum, and the normalised map
    a = (p - mean) * rstd; m2 and l_i broadcast against t. Padded keys and queries get p = a = 0
    (exp2 of a padded score can overflow)."""
    p = tl.exp2(tl.where(mask, t - m2, float("-inf"))) / l_i
    return p, tl.where(mask, ((p - center) - shift) * rstd, 0.0)


@triton.jit(do_not_specialize=["N", "M", "H", "PLANE"])
def _mixed_bwd_stats_kernel(
    Q, K, V, W, DO, ROWS, NORM, GROWS, G2_PART,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_wg, stride_wh,
    N, M, H, D, PLANE,
    qk_scale, center,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
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
    n_idx = start_n + offs_n
    mask_n = n_idx < N
    mask_d = offs_d < D
    mask_q = mask_n[:, None] & mask_d[None, :]
    rows64 = n_idx[:, None].to(tl.int64)
    q_off = rows64 * stride_qn + offs_d[None, :]
    k_off = offs_m[:, None] * stride_km + offs_d[None, :]
    Q_b = Q + b * stride_qb
    K_b = K + b * stride_kb
    W_g = W + g * stride_wg
    v_ptrs = V + b * stride_vb + g * stride_vh + offs_m[:, None] * stride_vm + offs_d[None, :]
    do = tl.load(DO + b * stride_dob + g * stride_doh + rows64 * stride_don + offs_d[None, :], mask=mask_q, other=0.0)
    rstd = tl.load(NORM + bg * 2)
    shift = tl.load(NORM + bg * 2 + 1)
    m2 = tl.load(ROWS + bg * N + n_idx, mask=mask_n, other=0.0)
    l_i = tl.load(ROWS + PLANE + bg * N + n_idx, mask=mask_n, other=1.0)

    p_dpv = tl.zeros([BLOCK_N], tl.float32)
    p_a = tl.zeros([BLOCK_N], tl.float32)
    p_sum = tl.zeros([BLOCK_N], tl.float32)
    g2 = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, M, BLOCK_M):
        mask_m = start_m + offs_m < M
        mask_k = mask_m[:, None] & mask_d[None, :]
        v = tl.load(v_ptrs + start_m * stride_vm, mask=mask_k, other=0.0)
        t = _mixed_scores(
            Q_b,
            K_b + start_m * stride_km,
            W_g,
            q_off,
            k_off,
            mask_q,
            mask_k,
            stride_qh,
            stride_kh,
            stride_wh,
            H,
            qk_scale,
            BLOCK_N,
            BLOCK_M,
            DOT_PRECISION,
        )
        p, a = _p_and_a(t, m2[:, None], l_i[:, None], mask_n[:, None] & mask_m[None, :], center, shift, rstd)
        dpv = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
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
    Q, K, V, W, DO, ROWS, NORM, GROWS, G2, DQ, DW_PART,
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
):  # fmt: skip
    """dq of head h over a query block, and the block's partial dW[:, h] (without the scale):
    DW_PART [B, query blocks, H, H]. Per key block, every head g's dt_g is rebuilt and mixed
    into ds_h = sum_g W[g, h] dt_g; then dq_h += ds_h k_h.

    Grid: (cdiv(N, BLOCK_N) * H * B,), query block fastest, then head h.
    """
    pid = tl.program_id(0)
    n_qblocks = tl.cdiv(N, BLOCK_N)
    qblock = pid % n_qblocks
    start_n = qblock * BLOCK_N
    bh = (pid // n_qblocks).to(tl.int64)
    b = bh // H
    h = bh % H

    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    heads = tl.arange(0, HEADS_P2)
    n_idx = start_n + offs_n
    mask_n = n_idx < N
    mask_d = offs_d < D
    mask_q = mask_n[:, None] & mask_d[None, :]
    rows64 = n_idx[:, None].to(tl.int64)
    q_off = rows64 * stride_qn + offs_d[None, :]
    k_off = offs_m[:, None] * stride_km + offs_d[None, :]
    v_off = offs_m[:, None] * stride_vm + offs_d[None, :]
    do_off = rows64 * stride_don + offs_d[None, :]
    Q_b = Q + b * stride_qb
    K_b = K + b * stride_kb
    V_b = V + b * stride_vb
    DO_b = DO + b * stride_dob
    q_h = tl.load(Q_b + h * stride_qh + q_off, mask=mask_q, other=0.0)

    dq = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dw = tl.zeros([HEADS_P2], tl.float32)  # sum dt_g * (q_h . k_h), for every g
    for start_m in range(0, M, BLOCK_M):
        mask_m = start_m + offs_m < M
        mask_k = mask_m[:, None] & mask_d[None, :]
        mask = mask_n[:, None] & mask_m[None, :]
        K_m = K_b + start_m * stride_km
        k_h = tl.load(K_m + h * stride_kh + k_off, mask=mask_k, other=0.0)
        s_h = tl.dot(q_h, tl.trans(k_h), input_precision=DOT_PRECISION)
        ds = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for g in range(H):
            bg = b * H + g
            t = _mixed_scores(
                Q_b,
                K_m,
                W + g * stride_wg,
                q_off,
                k_off,
                mask_q,
                mask_k,
                stride_qh,
                stride_kh,
                stride_wh,
                H,
                qk_scale,
                BLOCK_N,
                BLOCK_M,
                DOT_PRECISION,
            )
            rstd = tl.load(NORM + bg * 2)
            m2 = tl.load(ROWS + bg * N + n_idx, mask=mask_n, other=0.0)
            l_i = tl.load(ROWS + PLANE + bg * N + n_idx, mask=mask_n, other=1.0)
            p, a = _p_and_a(t, m2[:, None], l_i[:, None], mask, center, tl.load(NORM + bg * 2 + 1), rstd)
            do = tl.load(DO_b + g * stride_doh + do_off, mask=mask_q, other=0.0)
            v = tl.load(V_b + g * stride_vh + start_m * stride_vm + v_off, mask=mask_k, other=0.0)
            dpv = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            p_dpv = tl.load(GROWS + bg * N + n_idx, mask=mask_n, other=0.0)
            p_a = tl.load(GROWS + PLANE + bg * N + n_idx, mask=mask_n, other=0.0)
            dt = p * rstd * ((dpv - p_dpv[:, None]) - tl.load(G2 + bg) * (a - p_a[:, None]))
            ds += tl.load(W + g * stride_wg + h * stride_wh) * dt
            dw += tl.where(heads == g, tl.sum(tl.sum(dt * s_h, 1), 0), 0.0)
        dq += tl.dot(ds.to(k_h.dtype), k_h, input_precision=DOT_PRECISION)

    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + rows64 * stride_dqn + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=mask_q,
    )
    tl.store(DW_PART + ((b * n_qblocks + qblock) * H + heads) * H + h, dw, mask=heads < H)


@triton.jit(do_not_specialize=["N", "M", "H", "PLANE", "NUM_SPLITS", "BLOCKS_PER_SPLIT"])
def _mixed_bwd_dkdv_kernel(
    Q, K, V, W, DO, ROWS, NORM, GROWS, G2, DK_PART, DV_PART,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_wg, stride_wh,
    stride_ps, stride_pb, stride_pm, stride_ph,  # DK_PART and DV_PART share one layout
    N, M, H, D, PLANE,
    sm_scale, qk_scale, center,
    NUM_SPLITS, BLOCKS_PER_SPLIT,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Partial dk, dv of head h over one key block and one split's share of the queries, on
    transposed [BLOCK_M, BLOCK_N] tiles (keys on rows): ds_h^T = sum_g W[g, h] dt_g^T,
    dk_h += ds_h^T q_h, dv_h += a_h^T dO_h.

    DK_PART, DV_PART: [S, B, M, H, D], fp32 partials summed over S afterwards (or, when S = 1,
    the final dk, dv in the input dtype). Grid: (cdiv(M, BLOCK_M) * S * H * B,), key block
    fastest, then split, then head h; split s covers query blocks
    [s * BLOCKS_PER_SPLIT, (s + 1) * BLOCKS_PER_SPLIT).
    """
    pid = tl.program_id(0)
    n_kblocks = tl.cdiv(M, BLOCK_M)
    start_m = (pid % n_kblocks) * BLOCK_M
    rest = pid // n_kblocks
    split = rest % NUM_SPLITS
    bh = (rest // NUM_SPLITS).to(tl.int64)
    b = bh // H
    h = bh % H

    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_idx = start_m + offs_m
    mask_m = m_idx < M
    mask_d = offs_d < D
    mask_k = mask_m[:, None] & mask_d[None, :]
    keys64 = m_idx[:, None].to(tl.int64)
    k_off = keys64 * stride_km + offs_d[None, :]
    v_off = keys64 * stride_vm + offs_d[None, :]
    Q_b = Q + b * stride_qb
    K_b = K + b * stride_kb
    V_b = V + b * stride_vb
    DO_b = DO + b * stride_dob

    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first = split * BLOCKS_PER_SPLIT
    last = tl.minimum(first + BLOCKS_PER_SPLIT, tl.cdiv(N, BLOCK_N))
    for block in range(first, last):
        n_idx = block * BLOCK_N + offs_n
        mask_n = n_idx < N
        mask_q = mask_n[:, None] & mask_d[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        rows64 = n_idx[:, None].to(tl.int64)
        q_off = rows64 * stride_qn + offs_d[None, :]
        do_off = rows64 * stride_don + offs_d[None, :]
        ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        a_h = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for g in range(H):
            bg = b * H + g
            t = _mixed_scores(
                K_b,
                Q_b,
                W + g * stride_wg,
                k_off,
                q_off,
                mask_k,
                mask_q,
                stride_kh,
                stride_qh,
                stride_wh,
                H,
                qk_scale,
                BLOCK_M,
                BLOCK_N,
                DOT_PRECISION,
            )
            rstd = tl.load(NORM + bg * 2)
            m2 = tl.load(ROWS + bg * N + n_idx, mask=mask_n, other=0.0)
            l_i = tl.load(ROWS + PLANE + bg * N + n_idx, mask=mask_n, other=1.0)
            p, a = _p_and_a(t, m2[None, :], l_i[None, :], mask, center, tl.load(NORM + bg * 2 + 1), rstd)
            do = tl.load(DO_b + g * stride_doh + do_off, mask=mask_q, other=0.0)
            v = tl.load(V_b + g * stride_vh + v_off, mask=mask_k, other=0.0)
            dpv = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            p_dpv = tl.load(GROWS + bg * N + n_idx, mask=mask_n, other=0.0)
            p_a = tl.load(GROWS + PLANE + bg * N + n_idx, mask=mask_n, other=0.0)
            dt = p * rstd * ((dpv - p_dpv[None, :]) - tl.load(G2 + bg) * (a - p_a[None, :]))
            ds += tl.load(W + g * stride_wg + h * stride_wh) * dt
            a_h = tl.where(g == h, a, a_h)  # head h's own map, for dv
        q_h = tl.load(Q_b + h * stride_qh + q_off, mask=mask_q, other=0.0)
        do_h = tl.load(DO_b + h * stride_doh + do_off, mask=mask_q, other=0.0)
        dk += tl.dot(ds.to(q_h.dtype), q_h, input_precision=DOT_PRECISION)
        dv += tl.dot(a_h.to(do_h.dtype), do_h, input_precision=DOT_PRECISION)

    part = split.to(tl.int64) * stride_ps + b * stride_pb + keys64 * stride_pm + h * stride_ph + offs_d[None, :]
    tl.store(DK_PART + part, (dk * sm_scale).to(DK_PART.dtype.element_ty), mask=mask_k)
    tl.store(DV_PART + part, dv.to(DV_PART.dtype.element_ty), mask=mask_k)


# ---------------------------------------------------------------------------------------
# Launchers (tensors in, tensors out)
# ---------------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer comes from here (tests patch it to fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _mix_weight(weight: torch.Tensor) -> torch.Tensor:
    """The conv's weight as [H, H] fp32 (H * H values): one kernel variant whatever its dtype
    (fp32 under autocast, 16-bit in a half model). The bias is never needed (module docstring)."""
    H = weight.shape[0]
    return weight.reshape(H, H).float()


def _norm_stats(part: torch.Tensor, L: int, eps: float) -> torch.Tensor:
    """(rstd, eps_g) [B, H, 2] fp32 from the forward's partial sums of p - c and (p - c)^2."""
    s1, s2 = (part.sum(2) / L).unbind(-1)  # a deterministic sum over the query blocks
    var = (s2 - s1 * s1).clamp_min(0.0)
    return torch.stack((torch.rsqrt(var + eps), s1), -1)


def attention_mixed_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the forward (the conv's bias is not an argument: it never changes the result).
    Returns (o [B, N, H, D], rows [2, B, H, N], norm [B, H, 2]); rows and norm are fp32, saved
    for the backward."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, N, H, D = q.shape
    M = k.shape[1]
    device = q.device
    w = _mix_weight(weight)
    o = _empty((B, N, H, D), q.dtype, device)
    rows = _empty((2, B, H, N), torch.float32, device)
    vsum = _empty((B, H, D), torch.float32, device)
    if o.numel() == 0:
        return o, rows, _empty((B, H, 2), torch.float32, device)
    plan = plans.attention_mixed_fwd_plan(B, N, M, H, D, q.dtype, plans.device_target(device))
    part = _empty((B, H, plan.n_qblocks, 2), torch.float32, device)
    with _device_guard(q):
        plans.launch(
            _mixed_fwd_kernel, plan.main,
            q, k, v, w, o, rows, part, vsum,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            w.stride(0), w.stride(1),
            N, M, H, D, B * H * N, scale * _LOG2E, 1.0 / M,
        )  # fmt: skip
        norm = _norm_stats(part, N * M, eps)
        plans.launch(_mixed_norm_kernel, plan.norm, o, norm, vsum, o.numel(), N * H * D, H, D)
    return o, rows, norm


def attention_mixed_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the backward. Returns contiguous (dq, dk, dv) in q's dtype and dweight in
    weight's shape and dtype (the bias's gradient is exactly 0, see ``_EmsaAttentionMixed``)."""
    do, q, k, v = (_unit_last(t) for t in (do, q, k, v))
    B, N, H, D = q.shape
    M = k.shape[1]
    dtype, device = q.dtype, q.device
    dq = _empty((B, N, H, D), dtype, device)
    if dq.numel() == 0 or M == 1:
        # M = 1: softmax rows are exactly 1, the normalised map and every gradient exactly 0
        return dq.zero_(), k.new_zeros(k.shape), v.new_zeros(v.shape), torch.zeros_like(weight)
    w = _mix_weight(weight)
    plan = plans.attention_mixed_bwd_plan(B, N, M, H, D, dtype, plans.device_target(device))
    grows = _empty((2, B, H, N), torch.float32, device)
    g2_part = _empty((B, H, plan.n_stats_blocks), torch.float32, device)
    dw_part = _empty((B, plan.n_qblocks, H, H), torch.float32, device)
    part_dtype = dtype if plan.splits == 1 else torch.float32
    dk_part = _empty((plan.splits, B, M, H, D), part_dtype, device)
    dv_part = _empty((plan.splits, B, M, H, D), part_dtype, device)
    qkvdo = tuple(s for t in (q, k, v, do) for s in t.stride()[:3])
    shape = (N, M, H, D, B * H * N)
    with _device_guard(q):
        plans.launch(
            _mixed_bwd_stats_kernel, plan.stats,
            q, k, v, w, do, rows, norm, grows, g2_part, *qkvdo, w.stride(0), w.stride(1),
            *shape, scale * _LOG2E, 1.0 / M,
        )  # fmt: skip
        g2 = g2_part.sum(-1) / (N * M)  # G2_g = mean(dA * a): a deterministic sum over the query blocks
        plans.launch(
            _mixed_bwd_dq_kernel, plan.dq,
            q, k, v, w, do, rows, norm, grows, g2, dq, dw_part, *qkvdo, *dq.stride()[:3],
            w.stride(0), w.stride(1), *shape, scale, scale * _LOG2E, 1.0 / M,
        )  # fmt: skip
        plans.launch(
            _mixed_bwd_dkdv_kernel, plan.dkdv,
            q, k, v, w, do, rows, norm, grows, g2, dk_part, dv_part, *qkvdo, w.stride(0), w.stride(1),
            *dk_part.stride()[:4], *shape, scale, scale * _LOG2E, 1.0 / M, plan.splits, plan.blocks_per_split,
        )  # fmt: skip
    dweight = (dw_part.sum((0, 1)) * scale).to(weight.dtype).reshape(weight.shape)
    if plan.splits == 1:
        return dq, dk_part[0], dv_part[0], dweight
    return dq, dk_part.sum(0).to(dtype), dv_part.sum(0).to(dtype), dweight


@torch.library.custom_op("restv2::emsa_attention_mixed_fwd", mutates_args=())
def _emsa_attention_mixed_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_mixed_fwd(q, k, v, weight, scale, eps)


@_emsa_attention_mixed_fwd_op.register_fake
def _(q, k, v, weight, scale, eps):
    B, N, H, D = q.shape
    return (
        q.new_empty((B, N, H, D)),
        q.new_empty((2, B, H, N), dtype=torch.float32),
        q.new_empty((B, H, 2), dtype=torch.float32),
    )


@torch.library.custom_op("restv2::emsa_attention_mixed_bwd", mutates_args=())
def _emsa_attention_mixed_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_mixed_bwd(do, q, k, v, weight, rows, norm, scale)


@_emsa_attention_mixed_bwd_op.register_fake
def _(do, q, k, v, weight, rows, norm, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), torch.empty_like(weight)


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------


class _EmsaAttentionMixed(torch.autograd.Function):
    """The bias (or None) is an input only for its gradient: exactly zeros (module docstring),
    returned as a tensor so that its parameter gets a gradient like any other (DDP waits for one)."""

    @staticmethod
    def forward(ctx, q, k, v, weight, bias, scale, eps):
        o, rows, norm = torch.ops.restv2.emsa_attention_mixed_fwd(q, k, v, weight, scale, eps)
        ctx.save_for_backward(q, k, v, weight, rows, norm)
        ctx.scale = scale
        ctx.bias = None if bias is None else (bias.shape, bias.dtype, bias.device)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, weight, rows, norm = ctx.saved_tensors
        dq, dk, dv, dw = torch.ops.restv2.emsa_attention_mixed_bwd(do, q, k, v, weight, rows, norm, ctx.scale)
        db = None if ctx.bias is None else torch.zeros(ctx.bias[0], dtype=ctx.bias[1], device=ctx.bias[2])
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
    D: a multiple of 8 from 16 to 256; any number of heads.
    """
    check_mixed_inputs(q, k, v, weight, bias, eps)
    if q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"emsa_attention_mixed: the Triton kernels take fp16/bf16/fp32 inputs, got {q.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"emsa_attention_mixed: the Triton kernels take a fp16/bf16/fp32 {name}, got {t.dtype}")
    scale = scale_value("emsa_attention_mixed", scale, q.shape[-1])
    check_kernel_device(q, k, v, weight)  # after every argument check: a bad argument is named on any device
    return _EmsaAttentionMixed.apply(q, k, v, weight, bias, scale, float(eps))
