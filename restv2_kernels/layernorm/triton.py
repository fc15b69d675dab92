"""Triton kernels for the residual add + LayerNorm of every block, in one pass:
``residual = x + branch``, ``normed = LayerNorm(residual) * weight + bias`` over the last dim.

Rows: x is [..., C]; the leading dims are flattened into R rows. The kernels take a row
stride and a unit channel stride, so contiguous tensors and views whose rows sit one stride
apart (a slice of the token dim, a batch slice) are read in place; anything else (a
non-unit channel stride, leading dims that do not merge into one stride) is copied first.
residual and normed are written contiguous.

Launch geometry (tiles, warps, splits) comes from ``restv2_kernels.plans``, per target GPU.

Forward (``_add_ln_fwd_kernel``): a program owns BLOCK_R rows x BLOCK_C = next_pow2(C)
channels. It reads x and branch once, adds them in fp32, stores the residual (in
``promote_types(x, branch)``), computes the row statistics in fp32 from the unrounded sum
and stores normed (in ``out_dtype``, default the residual's dtype). When a backward will
run it also stores the fp32 mean and rstd of each row (8 bytes a row); inference skips
them (a constexpr). HBM traffic per element: read x and branch, write residual and normed,
e.g. 4 + 2 + 4 + 2 = 12 bytes for the autocast case (fp32 stream, bf16 branch, bf16 out),
8 bytes all-16-bit; eager needs five tensor passes (add: 3, layer_norm: 2, plus a cast).
With branch=None only normed is computed (residual is x itself, never a kernel output;
with autograd, a view of x on the op's node, so that the backward below adds its gradient).

Backward (``_add_ln_bwd_kernel``): a bounded grid (about 2 programs per SM), each program
walking a contiguous range of row blocks. It recomputes xhat from the saved residual and
mean/rstd, computes ``d_residual + LN_backward(d_normed)`` and writes it once per input
dtype it is needed in (x and branch get the same value; when their dtypes differ the kernel
writes both casts, no extra pass), and accumulates dweight = sum d_normed * xhat and dbias
= sum d_normed in registers; each program stores its fp32 partial sums in its own slot and
torch sums the slots. No atomics: deterministic for a given shape and device. Saved for
backward: the residual (an output anyway; x itself when branch is None), mean, rstd and the
weight; no [R, C] tensor is saved beyond the residual.
"""

import contextlib
import math

import torch
import triton
import triton.language as tl

from .. import plans
from ..backend import check_kernel_device
from .reference import check_add_layer_norm_inputs

__all__ = ["add_layer_norm"]

MAX_C = plans.ADD_LN_MAX_C
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- kernels


# R only bounds masks: not specialised, so a new token count reuses the compiled kernel.
@triton.jit(do_not_specialize=["R", "S"])
def _add_ln_fwd_kernel(
    x_ptr, br_ptr, s_ptr, w_ptr, b_ptr, res_ptr, out_ptr, mean_ptr, rstd_ptr,
    R, C, S, sxr, sbr,
    eps,
    HAS_BRANCH: tl.constexpr, HAS_SCALE: tl.constexpr, SAVE_STATS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """x, branch: [R, C] with row strides sxr, sbr (unit channel stride); branch_scale: [R / S]
    (HAS_SCALE: row r's branch is multiplied by element r // S); weight, bias: [C] -> residual
    (HAS_BRANCH), normed: [R, C] contiguous; mean, rstd: [R] fp32 (SAVE_STATS)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < R
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    c_mask = cols < C
    m2 = r_mask[:, None] & c_mask[None, :]

    r = tl.load(x_ptr + (rows64 * sxr)[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    out_off = (rows64 * C)[:, None] + cols[None, :]
    if HAS_BRANCH:
        br = tl.load(br_ptr + (rows64 * sbr)[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_SCALE:  # a per-sample factor (stochastic depth's 0 or 1 / keep), in fp32
            br *= tl.load(s_ptr + rows // S, mask=r_mask, other=0.0).to(tl.float32)[:, None]
        r += br
        tl.store(res_ptr + out_off, r.to(res_ptr.dtype.element_ty), mask=m2)
    # statistics in fp32 from the unrounded sum; padded channels masked out
    mean = tl.sum(r, axis=1) / C
    d = tl.where(c_mask[None, :], r - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    w = tl.load(w_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=m2)
    if SAVE_STATS:
        tl.store(mean_ptr + rows, mean, mask=r_mask)
        tl.store(rstd_ptr + rows, rstd, mask=r_mask)


@triton.jit(do_not_specialize=["R", "S", "BLOCKS_PER_SPLIT"])
def _add_ln_bwd_kernel(
    dy_ptr, dres_ptr, res_ptr, mean_ptr, rstd_ptr, w_ptr, s_ptr, dx_ptr, dx2_ptr, part_ptr,
    R, C, S, BLOCKS_PER_SPLIT, sdy, sdres, sres,
    HAS_DRES: tl.constexpr, HAS_SCALE: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DX2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """d_normed, d_residual (HAS_DRES), residual: [R, C] with row strides sdy, sdres, sres;
    mean, rstd: [R] fp32; weight: [C] -> dx (WRITE_DX), dx2 (WRITE_DX2): [R, C] contiguous,
    the same value in two dtypes, or, with HAS_SCALE, dx2 the branch's gradient: row r's dx
    times element r // S of branch_scale; part: [n_programs, 2, C] fp32 (dweight, dbias
    partials).

    Program pid: row blocks [pid * BLOCKS_PER_SPLIT, (pid + 1) * BLOCKS_PER_SPLIT).
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    c_mask = cols < C
    w = tl.load(w_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    # elementwise accumulators, reduced over rows once at the end
    dw_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)

    blk_start = pid * BLOCKS_PER_SPLIT
    blk_end = tl.minimum(blk_start + BLOCKS_PER_SPLIT, tl.cdiv(R, BLOCK_R))
    for blk in range(blk_start, blk_end):
        rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = rows < R
        rows64 = rows.to(tl.int64)
        m2 = r_mask[:, None] & c_mask[None, :]
        res = tl.load(res_ptr + (rows64 * sres)[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=r_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=r_mask, other=0.0)
        xhat = tl.where(m2, (res - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(dy_ptr + (rows64 * sdy)[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        dw_acc += dy * xhat
        db_acc += dy
        if WRITE_DX or WRITE_DX2:
            dyh = dy * w  # 0 on padded channels and rows
            c1 = tl.sum(dyh, axis=1) / C
            c2 = tl.sum(dyh * xhat, axis=1) / C
            dx = rstd[:, None] * (dyh - c1[:, None] - xhat * c2[:, None])
            if HAS_DRES:
                dx += tl.load(dres_ptr + (rows64 * sdres)[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            out_off = (rows64 * C)[:, None] + cols[None, :]
            if WRITE_DX:
                tl.store(dx_ptr + out_off, dx.to(dx_ptr.dtype.element_ty), mask=m2)
            if WRITE_DX2:
                if HAS_SCALE:
                    dx *= tl.load(s_ptr + rows // S, mask=r_mask, other=0.0).to(tl.float32)[:, None]
                tl.store(dx2_ptr + out_off, dx.to(dx2_ptr.dtype.element_ty), mask=m2)

    # every slot is written, also by a program whose range is empty (zeros)
    pp = part_ptr + pid * (2 * C) + cols
    tl.store(pp, tl.sum(dw_acc, axis=0), mask=c_mask)
    tl.store(pp + C, tl.sum(db_acc, axis=0), mask=c_mask)


# ----------------------------------------------------------------------------- launchers


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (tests patch it to fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] -> an [R, C] view with a unit channel stride and one row stride, read in place
    when the leading dims merge into one stride, else a contiguous copy."""
    C = t.shape[-1]
    try:
        t2 = t.view(-1, C)
    except RuntimeError:  # leading dims that no single stride addresses
        return t.reshape(-1, C).contiguous()
    return t2 if C == 1 or t2.stride(1) == 1 else t2.contiguous()


def _n_rows(shape) -> int:
    return math.prod(shape[:-1])


def _rows_per_sample(t: torch.Tensor, branch_scale: torch.Tensor | None) -> int:
    """The rows of each of the first dim's samples (the kernels' S: row r is sample r // S)."""
    return 1 if branch_scale is None else max(1, math.prod(t.shape[1:-1]))


def _fwd(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None,
    save_stats: bool,
    branch_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (residual, normed, mean, rstd). residual and normed have x's shape, contiguous;
    residual is an empty (0,) tensor when branch is None (the residual is x itself); mean
    and rstd are [R] fp32, or empty (0,) tensors unless save_stats. branch_scale: [B] (x's
    first dim), each sample's branch factor, or None."""
    C = x.shape[-1]
    R = _n_rows(x.shape)
    dev = x.device
    res_dtype = x.dtype if branch is None else torch.promote_types(x.dtype, branch.dtype)
    normed = _empty(tuple(x.shape), out_dtype or res_dtype, dev)
    residual = _empty(tuple(x.shape) if branch is not None else (0,), res_dtype, dev)
    mean = _empty((R,) if save_stats else (0,), torch.float32, dev)
    rstd = _empty((R,) if save_stats else (0,), torch.float32, dev)
    if R == 0:
        return residual, normed, mean, rstd
    x2 = _rows(x)
    b2 = x2 if branch is None else _rows(branch)  # x2: an unread stand-in
    plan = plans.add_layer_norm_fwd_plan(R, C, res_dtype, plans.device_target(dev))
    with _device_ctx(x):
        plans.launch(
            _add_ln_fwd_kernel, plan,
            x2, b2, weight if branch_scale is None else branch_scale.contiguous(),
            weight.contiguous(), bias.contiguous(),
            residual if branch is not None else normed, normed,
            mean if save_stats else normed, rstd if save_stats else normed,
            R, C, _rows_per_sample(x, branch_scale), x2.stride(0), b2.stride(0),
            float(eps),
            branch is not None, branch_scale is not None, bool(save_stats),
        )  # fmt: skip
    return residual, normed, mean, rstd


def _bwd(
    d_normed: torch.Tensor,
    d_residual: torch.Tensor | None,
    residual: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    dx_dtype: torch.dtype | None,
    dx2_dtype: torch.dtype | None,
    branch_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dx2, dweight, dbias): ``d_residual + LN_backward(d_normed)`` in dx_dtype and in
    dx2_dtype (contiguous, the residual's shape; an empty (0,) tensor where the dtype is
    None; dx2 times each sample's ``branch_scale`` where one is given: the branch's
    gradient), and dweight, dbias as fp32 [C]."""
    C = residual.shape[-1]
    R = _n_rows(residual.shape)
    dev = residual.device
    shape = tuple(residual.shape)
    dx = _empty(shape if dx_dtype is not None else (0,), dx_dtype or residual.dtype, dev)
    dx2 = _empty(shape if dx2_dtype is not None else (0,), dx2_dtype or residual.dtype, dev)
    if R == 0:  # nothing to launch: the parameter gradients are zero
        zeros = torch.zeros(C, dtype=torch.float32, device=dev)
        return dx, dx2, zeros, zeros.clone()
    res2 = _rows(residual)
    dy2 = _rows(d_normed)
    dres2 = dy2 if d_residual is None else _rows(d_residual)  # dy2: an unread stand-in
    plan = plans.add_layer_norm_bwd_plan(R, C, residual.dtype, plans.device_target(dev))
    part = _empty((plan.split, 2, C), torch.float32, dev)
    with _device_ctx(residual):
        plans.launch(
            _add_ln_bwd_kernel, plan.launch,
            dy2, dres2, res2, mean, rstd, weight.contiguous(),
            part if branch_scale is None else branch_scale.contiguous(),
            dx if dx_dtype is not None else part, dx2 if dx2_dtype is not None else part, part,
            R, C, _rows_per_sample(residual, branch_scale), plan.blocks_per_split,
            dy2.stride(0), dres2.stride(0), res2.stride(0),
            d_residual is not None, branch_scale is not None, dx_dtype is not None, dx2_dtype is not None,
        )  # fmt: skip
    # the second stage of the reduction; two separate sums, so the outputs do not alias
    return dx, dx2, part[:, 0].sum(0), part[:, 1].sum(0)


# torch.compile sees two opaque ops with shape-only fake implementations.


@torch.library.custom_op("restv2::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None,
    save_stats: bool,
    branch_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd(x, branch, weight, bias, eps, out_dtype, save_stats, branch_scale)


@add_layer_norm_fwd.register_fake
def _(x, branch, weight, bias, eps, out_dtype, save_stats, branch_scale=None):
    res_dtype = x.dtype if branch is None else torch.promote_types(x.dtype, branch.dtype)
    R = _n_rows(x.shape)
    stats = (R,) if save_stats else (0,)
    return (
        x.new_empty(x.shape if branch is not None else (0,), dtype=res_dtype),
        x.new_empty(x.shape, dtype=out_dtype or res_dtype),
        x.new_empty(stats, dtype=torch.float32),
        x.new_empty(stats, dtype=torch.float32),
    )


@torch.library.custom_op("restv2::add_layer_norm_bwd", mutates_args=())
def add_layer_norm_bwd(
    d_normed: torch.Tensor,
    d_residual: torch.Tensor | None,
    residual: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    dx_dtype: torch.dtype | None,
    dx2_dtype: torch.dtype | None,
    branch_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(d_normed, d_residual, residual, mean, rstd, weight, dx_dtype, dx2_dtype, branch_scale)


@add_layer_norm_bwd.register_fake
def _(d_normed, d_residual, residual, mean, rstd, weight, dx_dtype, dx2_dtype, branch_scale=None):
    C = residual.shape[-1]
    return (
        residual.new_empty(residual.shape if dx_dtype is not None else (0,), dtype=dx_dtype or residual.dtype),
        residual.new_empty(residual.shape if dx2_dtype is not None else (0,), dtype=dx2_dtype or residual.dtype),
        residual.new_empty((C,), dtype=torch.float32),
        residual.new_empty((C,), dtype=torch.float32),
    )


# ----------------------------------------------------------------------------- autograd


class _AddLayerNorm(torch.autograd.Function):
    """Outputs (residual, normed); without a branch the residual is x (autograd makes it a view
    of x on this node): x's two uses meet in this backward, where autograd would add them.
    With a branch_scale (no gradient: a per-sample constant) the branch's gradient is x's times
    the scale, written by the same kernel as a second output."""

    @staticmethod
    def forward(ctx, x, branch, weight, bias, eps, out_dtype, branch_scale):
        residual, normed, mean, rstd = torch.ops.restv2.add_layer_norm_fwd(
            x, branch, weight, bias, eps, out_dtype, True, branch_scale
        )
        has_branch = branch is not None
        ctx.save_for_backward(residual if has_branch else x, mean, rstd, weight, branch_scale)
        ctx.has_branch = has_branch
        ctx.x_dtype = x.dtype
        ctx.branch_dtype = branch.dtype if has_branch else None
        ctx.bias_dtype = bias.dtype
        ctx.set_materialize_grads(False)  # an unused output's grad stays None: nothing to read
        return (residual if has_branch else x), normed

    @staticmethod
    def backward(ctx, d_residual, d_normed):
        need_x, need_b, need_w, need_bias = ctx.needs_input_grad[:4]
        residual, mean, rstd, weight, scale = ctx.saved_tensors
        if d_normed is None:  # only the residual was used: d(x + branch) passes through
            dx = d_residual.to(ctx.x_dtype) if need_x and d_residual is not None else None
            db = None
            if need_b and d_residual is not None:
                db = d_residual if scale is None else d_residual * scale.view(-1, *(1,) * (d_residual.dim() - 1))
                db = db.to(ctx.branch_dtype)
            return dx, db, None, None, None, None, None
        if scale is None:  # x and branch get the same value: one output when one dtype serves both
            first = ctx.x_dtype if need_x else (ctx.branch_dtype if need_b else None)
            second = ctx.branch_dtype if need_x and need_b and ctx.branch_dtype != ctx.x_dtype else None
        else:  # the branch's gradient is scaled: always the second output
            first = ctx.x_dtype if need_x else None
            second = ctx.branch_dtype if need_b else None
        d1, d2, dw, dbias = torch.ops.restv2.add_layer_norm_bwd(
            d_normed, d_residual, residual, mean, rstd, weight, first, second, scale
        )
        dx = d1 if need_x else None
        db = (d2 if second is not None else d1) if need_b else None
        return (
            dx,
            db,
            dw.to(weight.dtype) if need_w else None,
            dbias.to(ctx.bias_dtype) if need_bias else None,
            None,
            None,
            None,
        )


# ----------------------------------------------------------------------------- public


def add_layer_norm(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    branch_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = x + branch`` (x itself when branch is None) and
    ``normed = LayerNorm(residual) * weight + bias`` over the last dim, fused in Triton.

    x, branch: [..., C], any leading dims, fp16/bf16/fp32 (they may differ: the residual
    takes ``promote_types``); weight, bias: [C], fp16/bf16/fp32 (fp32 with 16-bit x under
    autocast). Statistics and arithmetic in fp32. ``normed`` is in ``out_dtype`` (default:
    the residual's dtype). ``branch_scale``: None, or [B] (x's first dim), a factor per
    sample that multiplies its branch (stochastic depth: 0 for a dropped sample, 1 / keep
    for a kept one), applied in fp32 and not differentiated. Returns ``(residual, normed)``,
    both contiguous (residual is x itself when branch is None; where x needs a gradient, a
    view of x whose gradient the fused backward adds to the norm's). Differentiable w.r.t.
    x, branch, weight and bias.
    """
    check_add_layer_norm_inputs(x, branch, weight, bias, eps, branch_scale, out_dtype)
    named = [("x", x), ("weight", weight), ("bias", bias)] + ([] if branch is None else [("branch", branch)])
    if branch_scale is not None:
        named.append(("branch_scale", branch_scale))
    for name, t in named:
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(
                f"add_layer_norm: the Triton kernels take fp16/bf16/fp32, got {name} in {t.dtype} "
                "(use the reference for fp64)"
            )
    if out_dtype is not None and out_dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"add_layer_norm: out_dtype must be None or fp16/bf16/fp32 for the Triton kernels, "
            f"got {out_dtype!r} (use the reference for fp64)"
        )
    C = x.shape[-1]
    if not 1 <= C <= MAX_C:
        raise ValueError(f"add_layer_norm: the Triton kernels take 1 to {MAX_C} channels, got C={C}")
    check_kernel_device(*(t for _, t in named))
    eps = float(eps)
    grads = [t for name, t in named if name != "branch_scale"]
    if torch.is_grad_enabled() and any(t.requires_grad for t in grads):
        residual, normed = _AddLayerNorm.apply(x, branch, weight, bias, eps, out_dtype, branch_scale)
        # branch None: residual is a view of x on this node, whose backward adds its gradient to
        # the LayerNorm's (no separate add); x itself where x needs no gradient
        return (x if branch is None and not x.requires_grad else residual), normed
    # inference: no autograd node, no mean/rstd written
    residual, normed, _, _ = torch.ops.restv2.add_layer_norm_fwd(
        x, branch, weight, bias, eps, out_dtype, False, branch_scale
    )
    return (residual if branch is not None else x), normed
