"""The MLP's first layer and its activation in one Triton GEMM: ``gelu(x @ weight.T + bias)``
with the EXACT GELU, ``0.5 * a * (1 + erf(a / sqrt(2)))``, as the architecture specifies.

Why not PyTorch's own fused GEMM + GELU: ``torch._addmm_activation(bias, x, w.t(), use_gelu=True)``
on CUDA asks cuBLASLt for its ``CUBLASLT_EPILOGUE_GELU_BIAS`` epilogue, and its non-Lt fallback
applies ``at::gelu_(result, "tanh")`` (aten/src/ATen/native/cuda/Blas.cpp,
``addmm_out_cuda_impl``): the tanh approximation, a different function (|difference| up to
~5e-4 at |a| ~ 2). (The CPU kernel of ``_addmm_activation`` happens to compute the erf form: a
CPU experiment on torch 2.13 matches ``F.gelu(pre)`` exactly and differs from the tanh form
by 4.7e-4.) Hence this kernel.

Forward (``_linear_gelu_fwd_kernel``): x is viewed as [M, K] rows (any row stride; a copy only
when rows cannot be flattened into a view or the last dim is strided), weight [N, K] is read as
its transpose [K, N] through its strides (no copy). One program per [BLOCK_M, BLOCK_N] output
tile; the 1-D grid walks the tiles in groups of GROUP_M row blocks, so consecutive programs
share x rows and weight columns in L2. The K loop accumulates in fp32 with ``tl.dot``: tensor
cores for fp16/bf16; fp32 inputs are IEEE (FMA) unless PyTorch allows cuBLAS TF32
(``torch.backends.cuda.matmul.allow_tf32``, or its newer spelling ``fp32_precision = "tf32"``),
then TF32, as cuBLAS would: the operands are first rounded to TF32 to nearest
(``_round_to_tf32``), as cuBLAS rounds them, where the tensor cores alone would truncate.
Epilogue in fp32: + bias, exact GELU, one rounding to the output dtype. With a gradient needed (training) the kernel also stores the pre-activation
``pre = x @ weight.T + bias`` (constexpr STORE_PRE), rounded to x's dtype as eager PyTorch's
linear output is; at inference it writes only the activation.

HBM traffic (e = bytes of the dtype, M rows, N = 4K in the model): x is read once
per column tile (cdiv(N, BLOCK_N) times, mostly from L2 thanks to the grouping; M*K*e from
HBM at best), the weight (N*K*e, a few MB) through L2; writes: act M*N*e, plus pre M*N*e when
training. Eager PyTorch writes the linear output, reads it back for the GELU and writes the
activation (3 M*N*e): inference saves 2/3 of that, training 1/3.

Backward (plain PyTorch, inside the autograd.Function; torch.compile and a dispatch mode see
aten ops): saved are x (the input as given, no copy), weight, and pre [..., N] in x's dtype
(nothing is recomputed). Given d_act:
1. ``d_pre = aten.gelu_backward(d_act, pre)`` (exact-GELU derivative; the one fused aten
   elementwise op): reads d_act and pre, writes d_pre (3 M*N*e);
2. ``dx = d_pre @ weight`` (cuBLAS): reads d_pre and weight, writes dx (M*N*e + M*K*e);
3. ``dweight = d_pre^T @ x`` (cuBLAS): reads d_pre and x (M*N*e + M*K*e);
4. ``dbias = d_pre.sum(rows)``: reads d_pre (M*N*e).
Only the gradients asked for are computed. These are the very ops eager autograd runs for
``F.gelu(F.linear(...))``, so the gradients equal eager's (up to cuBLAS's choices).

The whole MLP (``mlp``, what the models call) saves less: x, the weights and pre, not the
activation. Its backward's one Triton GEMM (the same kernel, GELU_GRAD) reads dy, fc2's weight
and pre, and writes d_pre = (dy @ fc2.weight) * gelu'(pre), fc1's bias gradient (its column
sums) and gelu(pre) again (STORE_GELU: eager's GELU of the stored pre, which cuBLAS reads once
for fc2's weight gradient and which is freed then). One more write of [M, N] per backward buys
one [M, N] tensor less kept from each MLP's forward to its backward (per stage-1 MLP of
restv2_tiny at batch 128, 294 MiB in bf16).

Launch geometry comes from ``plans.linear_gelu_fwd_plan`` and ``plans.linear_gelu_bwd_plan`` (tiles per
target and precision).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .. import plans
from ..backend import check_kernel_device
from .reference import check_linear_gelu_inputs, check_mlp_inputs

__all__ = ["linear_gelu", "mlp"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _round_to_tf32(x):
    """fp32 -> the nearest TF32 value (10 mantissa bits), still fp32; ties away from zero, as
    PTX's ``cvt.rna.tf32.f32``. Half a unit of TF32's last place (bit 12) is added to the bits and
    the 13 low bits cleared: a carry into the exponent is the next binade (past the largest TF32
    value, inf), subnormals round on TF32's subnormal step; NaN passes through."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


# M (the token count) only bounds the grid and masks: not specialised, so a new batch size
# reuses the compiled kernel. N and K stay specialised (a handful of widths): their
# divisibility lets Triton vectorise the masked stores and the K loop's address arithmetic.
@triton.jit(do_not_specialize=["M"])
def _linear_gelu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, act_ptr, pre_ptr, part_ptr, gelu_ptr,
    M, N, K,
    sxm, sxk, swn, swk,
    HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, SUM_ROWS: tl.constexpr, STORE_GELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, GELU_GRAD: tl.constexpr = False,
):  # fmt: skip
    """x: [M, K] (strides sxm, sxk), w: [N, K] (strides swn, swk), b: [N] -> act (and pre when
    STORE_PRE): [M, N] contiguous, x's dtype. act = gelu(pre), pre = x @ w^T + b.

    GELU_GRAD (the MLP's backward): act = (x @ w^T) * gelu'(pre), with pre [M, N] contiguous
    READ from pre_ptr: d_pre from d_y and fc2's weight in one pass, d_act never stored. With
    SUM_ROWS also fc1's bias gradient in parts: part [cdiv(M, BLOCK_M), N] fp32 gets each row
    block's column sums of d_pre as stored (the launcher adds the parts: d_pre is not read again).
    With STORE_GELU also the activation the forward did not keep, gelu(pre) [M, N] contiguous
    into gelu_ptr, from the pre it reads anyway: fc2's weight gradient reads it."""
    pid = tl.program_id(0)
    # grouped ordering: GROUP_M row blocks x all column blocks, column-major inside a group
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows / columns past the end wrap onto valid ones: the loads need no M or N mask, and
    # what they compute there is never stored
    am = (rm % M).to(tl.int64)
    bn = (rn % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + am[:, None] * sxm + rk[None, :] * sxk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + rk[:, None] * swk + bn[None, :] * swn  # [BLOCK_K, BLOCK_N] of w^T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if DOT_PRECISION == "tf32":
            if a.dtype == tl.float32:
                # round to nearest, as cuBLAS's TF32 GEMMs do: the tensor cores alone would
                # ignore the 13 low bits (truncate), twice the error
                a = _round_to_tf32(a)
                b = _round_to_tf32(b)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk

    out_off = rm.to(tl.int64)[:, None] * N + rn[None, :]
    out_mask = (rm < M)[:, None] & (rn < N)[None, :]
    if GELU_GRAD:
        # d_pre = d_act * gelu'(pre), gelu'(a) = Phi(a) + a * phi(a), in fp32
        a = tl.load(pre_ptr + out_off, mask=out_mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        pdf = tl.exp(-0.5 * a * a) * 0.3989422804014327
        d_pre = (acc * (cdf + a * pdf)).to(act_ptr.dtype.element_ty)
        tl.store(act_ptr + out_off, d_pre, mask=out_mask)
        if STORE_GELU:  # a * cdf = 0.5 * a * (1 + erf): eager's GELU formula, of the stored pre
            tl.store(gelu_ptr + out_off, (a * cdf).to(gelu_ptr.dtype.element_ty), mask=out_mask)
        if SUM_ROWS:  # rows past M are wrapped copies of valid ones: left out of the sum
            col = tl.sum(tl.where(out_mask, d_pre.to(tl.float32), 0.0), axis=0)
            tl.store(part_ptr + pid_m.to(tl.int64) * N + rn, col, mask=rn < N)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + bn).to(tl.float32)[None, :]
        # exact GELU in fp32
        act = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        tl.store(act_ptr + out_off, act.to(act_ptr.dtype.element_ty), mask=out_mask)
        if STORE_PRE:
            tl.store(pre_ptr + out_off, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------- launcher


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernel writes is allocated here (tests patch it to fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _rows(x: torch.Tensor, M: int, K: int) -> torch.Tensor:
    """x as [M, K] rows: a view when the leading dims flatten into one row stride (contiguous
    tokens, a row-strided view), else a copy; a copy too when the last dim is strided."""
    x2 = x.reshape(M, K)
    return x2 if x2.stride(1) == 1 or K <= 1 else x2.contiguous()


def _fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, store_pre: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(act, pre): [..., N] contiguous, x's dtype; pre is empty ([0]) unless ``store_pre``."""
    K = x.shape[-1]
    N = weight.shape[0]
    lead = tuple(x.shape[:-1])
    M = math.prod(lead)
    act = _empty((M, N), x.dtype, x.device)
    pre = _empty((M, N), x.dtype, x.device) if store_pre else x.new_empty((0,))
    if M > 0 and N > 0:
        x2 = _rows(x, M, K)
        plan = plans.linear_gelu_fwd_plan(M, N, K, x.dtype, plans.device_target(x.device), plans.tf32_allowed())
        b = bias.contiguous() if bias is not None else act  # a dummy pointer when HAS_BIAS is False
        with _device_ctx(x):
            plans.launch(
                _linear_gelu_fwd_kernel, plan,
                x2, weight, b, act, pre if store_pre else act, act, act,
                M, N, K,
                x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
                bias is not None, store_pre, False, False,
            )  # fmt: skip
    return act.view(*lead, N), (pre.view(*lead, N) if store_pre else pre)


def _gelu_grad(
    dy: torch.Tensor, weight2: torch.Tensor, pre: torch.Tensor, sum_rows: bool = False, store_gelu: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d_pre = (dy @ weight2) * gelu'(pre): dy [..., C], weight2 [C, N] (fc2's weight, read as
    [N, C]^T through its strides), pre [..., N] -> (d_pre [..., N] contiguous, pre's dtype;
    ``sum_rows``: fc1's bias gradient d_pre.sum(rows) [N] in pre's dtype, from the kernel's
    fp32 column sums of each row block, else an empty [0]; ``store_gelu``: gelu(pre) [..., N]
    contiguous, pre's dtype, by ``F.gelu``'s formula (in fp32, one rounding), else an empty [0])."""
    C = dy.shape[-1]
    N = weight2.shape[1]
    lead = tuple(dy.shape[:-1])
    M = math.prod(lead)
    d_pre = _empty((M, N), pre.dtype, pre.device)
    act = _empty((M, N), pre.dtype, pre.device) if store_gelu else pre.new_empty((0,))
    act_out = act.view(*lead, N) if store_gelu else act
    if not (M > 0 and N > 0):
        return d_pre.view(*lead, N), (pre.new_zeros((N,)) if sum_rows else pre.new_empty((0,))), act_out
    dy2 = _rows(dy, M, C)
    pre2 = pre.reshape(M, N).contiguous()
    w = weight2.t()  # [N, C] view: the kernel computes dy @ w^T = dy @ weight2
    plan = plans.linear_gelu_bwd_plan(M, N, C, dy.dtype, plans.device_target(dy.device), plans.tf32_allowed())
    block_m = dict(plan.constexprs)["BLOCK_M"]
    part = _empty((triton.cdiv(M, block_m), N), torch.float32, pre.device) if sum_rows else d_pre
    with _device_ctx(dy):
        plans.launch(
            _linear_gelu_fwd_kernel, plan,
            dy2, w, d_pre, d_pre, pre2, part, act if store_gelu else d_pre,
            M, N, C,
            dy2.stride(0), dy2.stride(1), w.stride(0), w.stride(1),
            False, False, sum_rows, store_gelu,
        )  # fmt: skip
    dbias = part.sum(0).to(pre.dtype) if sum_rows else pre.new_empty((0,))
    return d_pre.view(*lead, N), dbias, act_out


# torch.compile sees opaque ops with shape-only fake implementations; the rest of the backward is aten.


@torch.library.custom_op("restv2::linear_gelu_fwd", mutates_args=())
def linear_gelu_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, store_pre: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(x, weight, bias, store_pre)


@linear_gelu_fwd.register_fake
def _(x, weight, bias, store_pre):
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if store_pre else (0,))


@torch.library.custom_op("restv2::mlp_gelu_grad", mutates_args=())
def mlp_gelu_grad(
    dy: torch.Tensor, weight2: torch.Tensor, pre: torch.Tensor, sum_rows: bool, store_gelu: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gelu_grad(dy, weight2, pre, sum_rows, store_gelu)


@mlp_gelu_grad.register_fake
def _(dy, weight2, pre, sum_rows, store_gelu):
    return (
        pre.new_empty(pre.shape),
        pre.new_empty((pre.shape[-1],) if sum_rows else (0,)),
        pre.new_empty(pre.shape if store_gelu else (0,)),
    )


# ----------------------------------------------------------------------------- autograd


class _LinearGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        act, pre = torch.ops.restv2.linear_gelu_fwd(x, weight, bias, True)
        ctx.save_for_backward(x, weight, pre)
        return act

    @staticmethod
    def backward(ctx, d_act):
        x, weight, pre = ctx.saved_tensors
        N, K = weight.shape
        M = math.prod(x.shape[:-1])
        need_x, need_w, need_b = ctx.needs_input_grad
        d_pre = torch.ops.aten.gelu_backward(d_act, pre).reshape(M, N)
        dx = (d_pre @ weight).view(x.shape) if need_x else None
        dweight = d_pre.t() @ x.reshape(M, K) if need_w else None
        dbias = d_pre.sum(0) if need_b else None
        return dx, dweight, dbias


class _Mlp(torch.autograd.Function):
    """fc2(gelu(fc1(x))): the forward is ``linear_gelu_fwd`` (storing pre) and fc2 as aten; the
    backward computes d_pre = (dy @ fc2.weight) * gelu'(pre) in one Triton GEMM (d_act is never
    stored, no gelu_backward pass), and fc1's bias gradient from that GEMM's column sums (no pass
    over d_pre, the largest tensor of the backward); the rest with cuBLAS. Saved: x, both
    weights and pre; not the activation, which the same GEMM writes again from the pre it reads
    (gelu(pre), as eager's GELU computes it) for fc2's weight gradient, freed once that is made:
    the forward to backward span keeps one [tokens, 4C] tensor per MLP instead of two."""

    @staticmethod
    def forward(ctx, x, weight1, bias1, weight2, bias2):
        act, pre = torch.ops.restv2.linear_gelu_fwd(x, weight1, bias1, True)
        ctx.save_for_backward(x, weight1, weight2, pre)
        ctx.has_bias = (bias1 is not None, bias2 is not None)
        return torch.nn.functional.linear(act, weight2, bias2)

    @staticmethod
    def backward(ctx, dy):
        x, weight1, weight2, pre = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        N, K = weight1.shape
        C = weight2.shape[0]
        M = math.prod(x.shape[:-1])
        dy2 = dy.reshape(M, C)
        db2 = dy2.sum(0) if need_b2 and ctx.has_bias[1] else None
        dx = dw1 = db1 = dw2 = None
        if need_x or need_w1 or need_b1:
            sum_rows = need_b1 and ctx.has_bias[0]  # db1 from the kernel's column sums: d_pre is not read again
            d_pre, db1, act = torch.ops.restv2.mlp_gelu_grad(dy, weight2, pre, sum_rows, need_w2)
            if need_w2:
                dw2 = dy2.t() @ act.reshape(M, N)
                del act
            d_pre = d_pre.reshape(M, N)
            dx = (d_pre @ weight1).view(x.shape) if need_x else None
            dw1 = d_pre.t() @ x.reshape(M, K) if need_w1 else None
            db1 = db1 if sum_rows else None
        elif need_w2:  # only fc2 trains: its input again, without the GEMM
            dw2 = dy2.t() @ torch.nn.functional.gelu(pre).reshape(M, N)
        return dx, dw1, db1, dw2, db2


# ----------------------------------------------------------------------------- public


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``gelu(x @ weight.T + bias)`` (exact erf GELU) in one fused Triton GEMM.

    x: [..., K] (rows may be strided, last dim unit-stride for a copy-free read); weight:
    [N, K] (nn.Linear layout); bias: [N] or None. fp16, bf16 or fp32, all the same dtype (cast
    under autocast before calling); fp32 accumulation. Returns [..., N], contiguous.
    Differentiable w.r.t. x, weight and bias; the pre-activation is stored only when a
    gradient is needed.
    """
    check_linear_gelu_inputs(x, weight, bias)
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"linear_gelu: the Triton kernel takes fp16/bf16/fp32, got {x.dtype} "
            "(use restv2_kernels.reference.linear_gelu for fp64)"
        )
    tensors = (x, weight) if bias is None else (x, weight, bias)
    check_kernel_device(*tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _LinearGelu.apply(x, weight, bias)
    return torch.ops.restv2.linear_gelu_fwd(x, weight, bias, False)[0]


def mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
) -> torch.Tensor:
    """The MLP ``fc2(gelu(fc1(x)))`` (exact GELU) with fc1 + GELU in one Triton GEMM
    (``linear_gelu``) and, in the backward, fc2's input gradient and the GELU derivative in one
    Triton GEMM (d_act = dy @ fc2_weight is never stored). fc2 and the weight gradients are
    cuBLAS. x: [..., C]; fc1_weight: [N, C]; fc2_weight: [C', N]; biases or None. One dtype
    (cast under autocast before calling). Differentiable w.r.t. all five.
    """
    check_mlp_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"mlp: the Triton kernels take fp16/bf16/fp32, got {x.dtype} (use restv2_kernels.reference.mlp for fp64)"
        )
    tensors = [t for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) if t is not None]
    check_kernel_device(*tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _Mlp.apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    act = torch.ops.restv2.linear_gelu_fwd(x, fc1_weight, fc1_bias, False)[0]
    return torch.nn.functional.linear(act, fc2_weight, fc2_bias)
