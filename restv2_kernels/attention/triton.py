"""Fused Triton kernels for EMSAv2's reduced-K/V softmax attention, forward and backward.

``emsa_attention(q, k, v, scale=None)`` computes ``softmax(q k^T * scale) v`` per head with
q: [B, N, H, D] and k, v: [B, M, H, D], where N (queries, the full map) is far larger than
M (keys, the reduced map): N=3136, M=49 at 224 px; N~66,800, M~1,050 at 800x1333.

Layout: every kernel reads q, k, v, o and dO in place through their strides (only the last
dim must have unit stride), so the model's ``q_lin.view(B, N, H, D)`` and
``kv_lin.view(B, M, 2, H, D)[:, :, 0 / 1]`` are never copied. A tensor whose last-dim
stride is not 1 is the one case made contiguous (a copy), see ``_unit_last``.

Launch geometry (blocks, warps, stages, splits, grids) comes from ``restv2_kernels.plans``,
per target GPU; every grid is one-dimensional, B*H folded into x (CUDA caps y and z at
65,535), and each kernel unfolds its program id.

Forward (``_attn_fwd_kernel``): one program per (query block, b, h). Each program keeps its
[BLOCK_N, D] rows of q in registers and runs an online softmax over key blocks (no
[N, M] tensor anywhere); when every key fits in one block (the 224-px model: M <= 64) the
``ONE_BLOCK`` flag drops the loop and the running max/rescale. It writes o and the
natural-log log-sum-exp ``lse`` [B, H, N] (fp32) for the backward.

Backward: with ``P = softmax(q k^T * scale)``, ``dP = dO v^T`` and
``delta = rowsum(P * dP) = rowsum(dO * o)``: ``dv = P^T dO``, ``dS = P * (dP - delta)``,
``dk = scale * dS^T q``, ``dq = scale * dS k``. Because N >> M, one program per key block
looping over all queries would start only B*H programs, so ``_attn_bwd_dkdv_kernel``
runs one program per (key block, query split s < S, b, h): each program owns one key block and
a contiguous share of query blocks, and writes its partial dk, dv in fp32 to buffers
[S, B, M, H, D]; a ``torch.sum`` over S (deterministic, no atomics) is the second pass.
``plans.attention_splits`` picks S for about four programs per SM (132 SMs in the
interpreter) while keeping each split at least ``plans.MIN_BLOCKS_PER_SPLIT`` query blocks
long, so partial buffers stay small next to the q/dO traffic: on an H100, restv2_tiny at
B=128 gets S = 4, 2, 1, 1 for its four stages (19 MB of fp32 partials at stage 1);
800x1333 at B=2 (N=66,800, M=1,050) gets S = 15 over 17 key blocks, 510 programs, 24 MB. With S = 1 the kernel
writes dk, dv directly in the input dtype and there is no second pass.
dq needs a sum over all keys:
- one key block (M <= BLOCK_M, ``FUSE_DQ``; the 224-px model): that sum is inside one
  program, which recomputes its queries' softmax exactly (max, exp, normalise, as eager
  does) and delta from the same P, and writes dq. o and lse are not read: the pass reads
  q, k, v, dO once and writes dq and the partials.
- several key blocks: ``_attn_bwd_dq_kernel`` runs first, one program per (query block, b, h),
  computes and stores delta from o and dO, rebuilds P from the saved lse while looping
  over the keys, and writes dq; the dk/dv pass then reads lse and delta.
  Precision caveat of this flash-style path: P = exp(s - lse) sums to 1 only up to the
  fp32 rounding of s and lse (~|s| * 1e-7), so in fp32 with scores of |s| ~ 100 and keys
  sharing a large common component, dq and dk can be a few times less accurate than
  eager (whose softmax is normalised exactly). The fused path has no such gap.
Results are bitwise reproducible, so there is no separate deterministic path.

Packed keys and values (``emsa_attention_kv(q, kv)``, what the models call): kv [B, M, 2, H, D]
as the kv Linear writes it; the forward is the same kernel on kv's two views. The backward
writes dk and dv (or their fp32 partials) into one [S, B, M, 2, H, D] buffer, so kv's gradient
needs no ``stack``; and the function returns v (a view of kv on its autograd node) for v's other
uses (EMSAv2's upsample branch), whose gradient split 0 of ``_attn_bwd_dkdv_kernel`` adds to
its dv (``HAS_DV_EXTRA``), so autograd needs no add. For restv2_tiny at batch 128 the two passes
saved are 0.33 GB of its 32 GB forward + backward.

For torch.compile the launchers are registered as custom ops
``restv2::emsa_attention_fwd`` / ``restv2::emsa_attention_bwd`` with fake (meta)
implementations; the ``autograd.Function`` calls those ops.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .. import plans
from ..backend import check_kernel_device
from ..checks import scale_value
from .reference import check_attention_inputs, check_attention_kv_inputs

_LOG2E = 1.4426950408889634  # the kernels use exp2: exp(x) == exp2(x * log2(e))
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


# Shape ints that only bound loops, masks and the (b, h) split are not specialised
# (do_not_specialize): a new image size or head count reuses the compiled kernel instead of
# compiling one per divisibility pattern (and H = 1 saves one integer division a program).
@triton.jit(do_not_specialize=["N", "M", "H"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_ob, stride_on, stride_oh,
    N, M, H, D,
    qk_scale,  # scale * log2(e)
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """o[b, n, h] = softmax(q k^T * scale) v over keys m < M; lse[b, h, n] in natural log.

    Q: [B, N, H, D], K, V: [B, M, H, D], O: [B, N, H, D] (any strides, unit on D);
    LSE: [B, H, N] fp32, contiguous. Grid: (cdiv(N, BLOCK_N) * B * H,), query block fastest.
    """
    pid = tl.program_id(0)
    n_qblocks = tl.cdiv(N, BLOCK_N)
    start_n = (pid % n_qblocks) * BLOCK_N
    bh = (pid // n_qblocks).to(tl.int64)  # int64 before any stride product: B*N*H*D may pass 2**31
    b = bh // H
    h = bh % H

    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = start_n + offs_n < N
    mask_d = offs_d < D  # D need not be a power of two: pad to BLOCK_D and mask

    q_base = Q + b * stride_qb + h * stride_qh + start_n.to(tl.int64) * stride_qn
    # rows of q stay in registers for the whole key loop
    q = tl.load(
        q_base + offs_n[:, None] * stride_qn + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0
    )
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_m[:, None] * stride_km + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_m[:, None] * stride_vm + offs_d[None, :]

    if ONE_BLOCK:
        # all M keys in one block: a plain softmax, no running max to rescale
        mask_m = offs_m < M
        k = tl.load(k_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_m[None, :], s, float("-inf"))  # padded keys get no weight
        m_i = tl.max(s, 1)
        p = tl.exp2(s - m_i[:, None])
        l_i = tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    else:
        m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_N], tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, M, BLOCK_M):
            mask_m = start_m + offs_m < M
            k = tl.load(k_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(mask_m[None, :], s, float("-inf"))
            # the first block always holds key 0, so m_new is finite and alpha = exp2(-inf) = 0
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
            # pointer increments are 64-bit: no int32 product of M and the stride
            k_ptrs += BLOCK_M * stride_km
            v_ptrs += BLOCK_M * stride_vm

    acc = acc / l_i[:, None]
    o_base = O + b * stride_ob + h * stride_oh + start_n.to(tl.int64) * stride_on
    tl.store(
        o_base + offs_n[:, None] * stride_on + offs_d[None, :],
        acc.to(O.dtype.element_ty),
        mask=mask_n[:, None] & mask_d[None, :],
    )
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # log2 -> natural log
    tl.store(LSE + bh * N + start_n + offs_n, lse, mask=mask_n)


@triton.jit(do_not_specialize=["N", "M", "H"])
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_dob, stride_don, stride_doh,
    stride_dqb, stride_dqn, stride_dqh,
    N, M, H, D,
    sm_scale, qk_scale,  # scale, scale * log2(e)
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dq = scale * dS k over all keys; also stores delta = rowsum(dO * o) for the dk/dv pass.

    Q, O, DO, DQ: [B, N, H, D]; K, V: [B, M, H, D]; LSE, DELTA: [B, H, N] fp32.
    Grid: (cdiv(N, BLOCK_N) * B * H,), query block fastest. Used only when M spans several
    key blocks.
    """
    pid = tl.program_id(0)
    n_qblocks = tl.cdiv(N, BLOCK_N)
    start_n = (pid % n_qblocks) * BLOCK_N
    bh = (pid // n_qblocks).to(tl.int64)
    b = bh // H
    h = bh % H
    start_n64 = start_n.to(tl.int64)

    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = start_n + offs_n < N
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + start_n64 * stride_qn + offs_n[:, None] * stride_qn + offs_d[None, :],
        mask=mask_nd,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + start_n64 * stride_don + offs_n[:, None] * stride_don + offs_d[None, :],
        mask=mask_nd,
        other=0.0,
    )
    o = tl.load(
        O + b * stride_ob + h * stride_oh + start_n64 * stride_on + offs_n[:, None] * stride_on + offs_d[None, :],
        mask=mask_nd,
        other=0.0,
    )
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh * N + start_n + offs_n, delta, mask=mask_n)
    lse2 = tl.load(LSE + bh * N + start_n + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634

    k_ptrs = K + b * stride_kb + h * stride_kh + offs_m[:, None] * stride_km + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_m[:, None] * stride_vm + offs_d[None, :]
    dq = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, M, BLOCK_M):
        mask_m = start_m + offs_m < M
        k = tl.load(k_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # padded keys: zero P explicitly (exp2(0 - lse) can overflow when scores are very negative)
        p = tl.where(mask_m[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_M * stride_km
        v_ptrs += BLOCK_M * stride_vm

    dq = dq * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + start_n64 * stride_dqn + offs_n[:, None] * stride_dqn + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=mask_nd,
    )


@triton.jit(do_not_specialize=["N", "M", "H", "NUM_SPLITS", "BLOCKS_PER_SPLIT"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK_PART, DV_PART, DV_EXTRA,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_dqb, stride_dqn, stride_dqh,
    stride_ps, stride_pb, stride_pm, stride_ph,  # DK_PART and DV_PART share one layout
    stride_eb, stride_em, stride_eh,
    N, M, H, D,
    sm_scale, qk_scale,  # scale, scale * log2(e)
    NUM_SPLITS, BLOCKS_PER_SPLIT,
    HAS_DV_EXTRA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    FUSE_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Partial dk, dv of one key block over one split's share of the queries.

    Q, DO, DQ: [B, N, H, D]; K, V: [B, M, H, D]; LSE, DELTA: [B, H, N] fp32;
    DK_PART, DV_PART: [S, B, M, H, D], fp32 partials summed over S afterwards (or, when
    S = 1, the final dk, dv in the input dtype).
    Grid: (cdiv(M, BLOCK_M) * S * B * H,), key block fastest, then split (S = NUM_SPLITS);
    split s covers query blocks [s * BLOCKS_PER_SPLIT, (s + 1) * BLOCKS_PER_SPLIT).
    FUSE_DQ (only when M <= BLOCK_M): this program sees every key of its queries, so it
    recomputes their softmax and delta itself (LSE, DELTA unused) and writes dq.
    HAS_DV_EXTRA: DV_EXTRA [B, M, H, D] (strides stride_eb, stride_em, stride_eh) is v's gradient
    from its other uses; split 0 adds it to its dv, so the sum over splits holds it once.
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
    mask_m = start_m + offs_m < M
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]

    start_m64 = start_m.to(tl.int64)
    # this key block stays in registers while the program walks its queries
    k = tl.load(
        K + b * stride_kb + h * stride_kh + start_m64 * stride_km + offs_m[:, None] * stride_km + offs_d[None, :],
        mask=mask_md,
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + h * stride_vh + start_m64 * stride_vm + offs_m[:, None] * stride_vm + offs_d[None, :],
        mask=mask_md,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    first = split * BLOCKS_PER_SPLIT
    last = tl.minimum(first + BLOCKS_PER_SPLIT, tl.cdiv(N, BLOCK_N))
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    dq_base = DQ + b * stride_dqb + h * stride_dqh
    for block in range(first, last):
        start_n = block * BLOCK_N
        start_n64 = start_n.to(tl.int64)
        mask_n = start_n + offs_n < N
        mask_nd = mask_n[:, None] & mask_d[None, :]
        q = tl.load(
            q_base + start_n64 * stride_qn + offs_n[:, None] * stride_qn + offs_d[None, :], mask=mask_nd, other=0.0
        )
        do = tl.load(
            do_base + start_n64 * stride_don + offs_n[:, None] * stride_don + offs_d[None, :], mask=mask_nd, other=0.0
        )
        # transposed scores [BLOCK_M, BLOCK_N]: keys on rows, so dk/dv accumulate without transposes
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if FUSE_DQ:
            # every key of these queries is in this block: redo their softmax exactly, as eager
            # does, and take delta = rowsum(P * dP) (== rowsum(dO * o)) from the same P, so each
            # column of dS sums to ~0 even for huge scores, where exp(s - lse) would not; o and
            # lse are not read at all
            s_t = tl.where(mask_m[:, None], s_t, float("-inf"))
            p_t = tl.exp2(s_t - tl.max(s_t, 0)[None, :])
            p_t = p_t / tl.sum(p_t, 0)[None, :]
            delta = tl.sum(p_t * dp_t, 0)
        else:
            delta = tl.load(DELTA + bh * N + start_n + offs_n, mask=mask_n, other=0.0)
            # padded queries: lse = +inf makes their column of P exactly 0
            lse2 = tl.load(LSE + bh * N + start_n + offs_n, mask=mask_n, other=float("inf")) * 1.4426950408889634
            # padded keys: zero P (exp2(0 - lse) can be inf; their rows are never stored, but keep
            # inf out of the dots)
            p_t = tl.where(mask_m[:, None], tl.exp2(s_t - lse2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        if FUSE_DQ:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION) * sm_scale
            tl.store(
                dq_base + start_n64 * stride_dqn + offs_n[:, None] * stride_dqn + offs_d[None, :],
                dq.to(DQ.dtype.element_ty),
                mask=mask_nd,
            )

    dk = dk * sm_scale
    if HAS_DV_EXTRA:
        if split == 0:
            extra = DV_EXTRA + b * stride_eb + h * stride_eh + start_m64 * stride_em
            dv += tl.load(extra + offs_m[:, None] * stride_em + offs_d[None, :], mask=mask_md, other=0.0).to(tl.float32)
    part = split.to(tl.int64) * stride_ps + b * stride_pb + h * stride_ph + start_m64 * stride_pm
    part_offs = offs_m[:, None] * stride_pm + offs_d[None, :]
    tl.store(DK_PART + part + part_offs, dk.to(DK_PART.dtype.element_ty), mask=mask_md)
    tl.store(DV_PART + part + part_offs, dv.to(DV_PART.dtype.element_ty), mask=mask_md)


# ---------------------------------------------------------------------------------------
# Launchers (tensors in, tensors out)
# ---------------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer comes from here (tests patch it to fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has unit stride (read in place), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward. q: [B, N, H, D]; k, v: [B, M, H, D] -> (o [B, N, H, D], lse [B, H, N] fp32)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, N, H, D = q.shape
    M = k.shape[1]
    o = _empty((B, N, H, D), q.dtype, q.device)
    lse = _empty((B, H, N), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse
    plan = plans.attention_fwd_plan(B, N, M, H, D, q.dtype, plans.device_target(q.device))
    with _device_guard(q):
        plans.launch(
            _attn_fwd_kernel, plan,
            q, k, v, o, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            N, M, H, D, scale * _LOG2E,
        )  # fmt: skip
    return o, lse


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the backward. do, q, o: [B, N, H, D]; k, v: [B, M, H, D]; lse: [B, H, N] fp32.

    Returns contiguous (dq [B, N, H, D], dk [B, M, H, D], dv [B, M, H, D]) in q's dtype.
    """
    B, N, H, D = q.shape
    M = k.shape[1]
    if B * H == 0:  # nothing to launch
        return q.new_empty(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    plan = plans.attention_bwd_plan(B, N, M, H, D, q.dtype, plans.device_target(q.device))
    # one split writes dk, dv directly in the input dtype; several write fp32 partials
    part_dtype = q.dtype if plan.splits == 1 else torch.float32
    dk_part = _empty((plan.splits, B, M, H, D), part_dtype, q.device)
    dv_part = _empty((plan.splits, B, M, H, D), part_dtype, q.device)
    dq = _launch_bwd(plan, do, q, k, v, o, lse, scale, dk_part, dv_part, None)
    if plan.splits == 1:
        return dq, dk_part[0], dv_part[0]
    # second pass: a deterministic fp32 sum over the splits, then one rounding to the input dtype
    return dq, dk_part.sum(0).to(q.dtype), dv_part.sum(0).to(q.dtype)


def attention_kv_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    kv: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    dv_extra: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward on packed keys and values. do, q, o: [B, N, H, D]; kv: [B, M, 2, H, D];
    lse: [B, H, N] fp32; dv_extra: None or [B, M, H, D], v's gradient from its other uses.

    Returns contiguous (dq [B, N, H, D], dkv [B, M, 2, H, D]) in q's dtype: dk and dv are
    written into one buffer (no stack) and dv includes dv_extra (no add).
    """
    B, N, H, D = q.shape
    M = kv.shape[1]
    if B * H == 0:
        return q.new_empty(q.shape), kv.new_zeros(kv.shape)
    plan = plans.attention_bwd_plan(B, N, M, H, D, q.dtype, plans.device_target(q.device))
    part_dtype = q.dtype if plan.splits == 1 else torch.float32
    part = _empty((plan.splits, B, M, 2, H, D), part_dtype, q.device)
    k, v = kv.unbind(2)
    dq = _launch_bwd(plan, do, q, k, v, o, lse, scale, part[:, :, :, 0], part[:, :, :, 1], dv_extra)
    return dq, (part[0] if plan.splits == 1 else part.sum(0).to(q.dtype))


def _launch_bwd(
    plan: plans.AttentionBwdPlan,
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    dk_part: torch.Tensor,
    dv_part: torch.Tensor,
    dv_extra: torch.Tensor | None,
) -> torch.Tensor:
    """Launches both backward kernels into dk_part, dv_part ([S, B, M, H, D] with one layout,
    unit last stride); returns dq. dv_extra, where given, is added to dv by split 0."""
    do, q, k, v, o = (_unit_last(t) for t in (do, q, k, v, o))
    dv_extra = None if dv_extra is None else _unit_last(dv_extra)
    B, N, H, D = q.shape
    M = k.shape[1]
    dq = _empty((B, N, H, D), q.dtype, q.device)
    strides = {
        name: (t.stride(0), t.stride(1), t.stride(2))
        for name, t in (("q", q), ("k", k), ("v", v), ("o", o), ("do", do), ("dq", dq))
    }
    extra = dv_part if dv_extra is None else dv_extra  # dv_part: an unread stand-in
    with _device_guard(q):
        if plan.fuse_dq:
            delta = lse  # unused: the fused pass computes delta itself
        else:
            delta = _empty((B, H, N), torch.float32, q.device)
            plans.launch(
                _attn_bwd_dq_kernel, plan.dq,
                q, k, v, o, do, lse, delta, dq,
                *strides["q"], *strides["k"], *strides["v"], *strides["o"], *strides["do"], *strides["dq"],
                N, M, H, D, scale, scale * _LOG2E,
            )  # fmt: skip
        plans.launch(
            _attn_bwd_dkdv_kernel, plan.dkdv,
            q, k, v, do, lse, delta, dq, dk_part, dv_part, extra,
            *strides["q"], *strides["k"], *strides["v"], *strides["do"], *strides["dq"],
            dk_part.stride(0), dk_part.stride(1), dk_part.stride(2), dk_part.stride(3),
            extra.stride(0), extra.stride(1), extra.stride(2),
            N, M, H, D, scale, scale * _LOG2E, plan.splits, plan.blocks_per_split,
            dv_extra is not None,
        )  # fmt: skip
    return dq


# torch.compile sees opaque ops with fake implementations; the launchers run at runtime.
@torch.library.custom_op("restv2::emsa_attention_fwd", mutates_args=())
def _emsa_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, scale)


@_emsa_attention_fwd_op.register_fake
def _(q, k, v, scale):
    B, N, H, D = q.shape
    return q.new_empty((B, N, H, D)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("restv2::emsa_attention_bwd", mutates_args=())
def _emsa_attention_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(do, q, k, v, o, lse, scale)


@_emsa_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("restv2::emsa_attention_kv_bwd", mutates_args=())
def _emsa_attention_kv_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    kv: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    dv_extra: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_kv_bwd(do, q, kv, o, lse, scale, dv_extra)


@_emsa_attention_kv_bwd_op.register_fake
def _(do, q, kv, o, lse, scale, dv_extra):
    return q.new_empty(q.shape), kv.new_empty(kv.shape)


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------


class _EmsaAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = torch.ops.restv2.emsa_attention_fwd(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.restv2.emsa_attention_bwd(do, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None


class _EmsaAttentionKV(torch.autograd.Function):
    """Outputs (o, v), v a view of kv on this node: v's other uses send their gradient here, and
    the backward kernel adds it to the attention's own dv while writing dk and dv into one
    [B, M, 2, H, D] buffer (autograd would add the two dv's and stack dk and dv, two passes)."""

    @staticmethod
    def forward(ctx, q, kv, scale):
        k, v = kv.unbind(2)
        o, lse = torch.ops.restv2.emsa_attention_fwd(q, k, v, scale)
        ctx.save_for_backward(q, kv, o, lse)
        ctx.scale = scale
        ctx.set_materialize_grads(False)  # an output that reached no loss: None, not zeros
        return o, v

    @staticmethod
    def backward(ctx, do, dv_other):
        q, kv, o, lse = ctx.saved_tensors
        if do is None:  # only v's other uses reached the loss
            dkv = kv.new_zeros(kv.shape)
            dkv[:, :, 1] = dv_other
            return None, dkv, None
        dq, dkv = torch.ops.restv2.emsa_attention_kv_bwd(do, q, kv, o, lse, ctx.scale, dv_other)
        return (dq if ctx.needs_input_grad[0] else None), dkv, None


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------


def emsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` per head, fused in Triton, differentiable in q, k and v.

    q: [B, N, H, D]; k, v: [B, M, H, D] (views with unit stride on D are read in place);
    returns [B, N, H, D], contiguous, in the inputs' dtype (fp16, bf16 or fp32; fp32
    accumulation). ``scale`` defaults to ``D ** -0.5``. D: a multiple of 8 from 16 to 256.
    """
    check_attention_inputs(q, k, v)
    scale = _kernel_scale("emsa_attention", q, scale)
    check_kernel_device(q, k, v)  # after every argument check: a bad argument is named on any device
    return _EmsaAttention.apply(q, k, v, scale)


def emsa_attention_kv(
    q: torch.Tensor, kv: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``emsa_attention`` on keys and values packed as the kv Linear writes them: kv [B, M, 2, H, D]
    (``kv[:, :, 0]`` the keys, ``kv[:, :, 1]`` the values, read in place).

    Returns ``(out, v)``: out [B, N, H, D] as ``emsa_attention(q, k, v, scale)``, and v, the
    values (a view of kv), for their other uses (EMSAv2's upsample branch). Differentiable in q
    and kv; the backward writes kv's gradient as one buffer, v's other gradient added inside the
    kernel (no ``stack`` of dk and dv, no add of v's two gradients).
    """
    check_attention_kv_inputs(q, kv)
    scale = _kernel_scale("emsa_attention_kv", q, scale)
    check_kernel_device(q, kv)
    if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
        return _EmsaAttentionKV.apply(q, kv, scale)
    k, v = kv.unbind(2)
    return torch.ops.restv2.emsa_attention_fwd(q, k, v, scale)[0], v


def _kernel_scale(op: str, q: torch.Tensor, scale: float | None) -> float:
    """The scale the kernels use (default ``D ** -0.5``), after checking the dtype the kernels take."""
    if q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{op}: the Triton kernels take fp16/bf16/fp32 inputs, got {q.dtype}")
    return scale_value(op, scale, q.shape[-1])
