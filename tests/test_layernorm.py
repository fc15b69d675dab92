"""Parity, gradients, dtypes, strided views, errors and determinism of the fused residual add
+ LayerNorm.

Every comparison goes through ``helpers.assert_close``: the kernel against a float64
reference on the same (dtype-rounded) inputs, judged by the error of eager PyTorch in the
kernel's dtypes. Without a GPU these run in Triton's interpreter (see conftest.py).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import RecordShapes, assert_close, nan_buffers_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from restv2_kernels import plans, reference
from restv2_kernels.layernorm import triton as kernels
from restv2_kernels.layernorm.triton import add_layer_norm

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
GRAD_NAMES = ("dx", "dbranch", "dweight", "dbias")


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an unwritten element fails."""
    return nan_buffers_for(monkeypatch, kernels)


def _inputs(shape, seed=0):
    """float64 CPU tensors x, branch, weight, bias, d_residual, d_normed. x has a per-row
    offset (the residual stream drifts), weight and bias are random, not the identity init."""
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = torch.randn(shape, generator=g) * 2 + torch.randn(*shape[:-1], 1, generator=g)
    branch = torch.randn(shape, generator=g)
    weight = 1 + torch.randn(C, generator=g) / 2
    bias = torch.randn(C, generator=g) / 2
    d_res = torch.randn(shape, generator=g)
    d_normed = torch.randn(shape, generator=g)
    return [t.double() for t in (x, branch, weight, bias, d_res, d_normed)]


def _layout(t, layout):
    """A differentiable view of t with the same values, in one of the layouts the model (or a
    user) may pass: contiguous, a channel slice of a wider tensor (one row stride, read in
    place), a slice of the token dim (leading dims not one stride: copied), channels not unit
    stride (copied)."""
    if layout == "contig":
        return t.view(t.shape)
    if layout == "channel-slice":
        return F.pad(t, (2, 3))[..., 2:-3]
    if layout == "token-slice":
        return F.pad(t, (0, 0, 1, 2))[..., 1:-2, :]
    if layout == "nonunit-c":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(layout)


def _scale(batch, seed=0):
    """float64 per-sample branch factors as stochastic depth makes them (0: dropped; 1 / keep:
    kept, keep 0.9), plus one that is neither (0.6), in an order the seed picks."""
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([0.0, 1 / 0.9, 0.6], dtype=torch.float64)
    return values[torch.randint(3, (batch,), generator=g)] if batch > 3 else values[:batch]


def _run(fn, tensors, dtypes, device, layout="contig", use=("residual", "normed"), frozen=(), scale=None):
    """fn's (residual, normed) and the gradients of <residual, d_res> + <normed, d_normed>
    (only the outputs in ``use``) w.r.t. x, branch, weight and bias (not those ``frozen``).
    dtypes: (x, branch or None, weight/bias, out_dtype or None); float64 everywhere when all
    are float64. ``scale``: the float64 branch_scale, passed in fp32 (float64 when x is)."""
    x_dt, b_dt, w_dt, out_dt = dtypes
    x, branch, weight, bias, d_res, d_normed = tensors
    if scale is not None:
        s_dt = torch.float64 if x_dt == torch.float64 else FP32
        fn = functools.partial(fn, branch_scale=scale.to(device=device, dtype=s_dt))
    leaves = [
        x.to(device=device, dtype=x_dt, copy=True).requires_grad_("x" not in frozen),
        None
        if b_dt is None
        else branch.to(device=device, dtype=b_dt, copy=True).requires_grad_("branch" not in frozen),
        weight.to(device=device, dtype=w_dt, copy=True).requires_grad_(),
        bias.to(device=device, dtype=w_dt, copy=True).requires_grad_(),
    ]
    xv = _layout(leaves[0], layout)
    bv = None if b_dt is None else _layout(leaves[1], layout)
    residual, normed = fn(xv, bv, leaves[2], leaves[3], 1e-6, out_dt)
    if b_dt is None:  # x itself, or with autograd a view of it (one node gets both gradients)
        assert residual is xv or residual._base is (xv._base if xv._is_view() else xv)
        assert (residual.data_ptr(), residual.stride()) == (xv.data_ptr(), xv.stride())
    outs, grads_out = [], []
    if "residual" in use:
        outs.append(residual)
        grads_out.append(_layout(d_res.to(device=device, dtype=residual.dtype), layout))
    if "normed" in use:
        outs.append(normed)
        grads_out.append(_layout(d_normed.to(device=device, dtype=normed.dtype), layout))
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    found = iter(torch.autograd.grad(outs, wanted, grads_out, allow_unused=True))
    grads = [next(found) if t is not None and t.requires_grad else None for t in leaves]
    return residual, normed, grads


def _round(tensors, dtypes):
    """The same rounded inputs for the kernel, the eager run and the float64 reference."""
    x_dt, b_dt, w_dt, _ = dtypes
    x, branch, weight, bias, d_res, d_normed = tensors
    res_dt = x_dt if b_dt is None else torch.promote_types(x_dt, b_dt)
    out_dt = dtypes[3] or res_dt
    return [
        x.to(x_dt).double(),
        branch.to(b_dt or x_dt).double(),
        weight.to(w_dt).double(),
        bias.to(w_dt).double(),
        d_res.to(res_dt).double(),
        d_normed.to(out_dt).double(),
    ]


def _check_parity(shape, dtypes, device, layout="contig", seed=0, use=("residual", "normed"), frozen=(), scale=False):
    """Kernel vs float64 reference vs eager in the same dtypes: both outputs and all gradients
    (of the inputs not ``frozen``); ``scale``: with a branch_scale (``_scale``)."""
    x_dt, b_dt, w_dt, out_dt = dtypes
    tensors = _round(_inputs(shape, seed), dtypes)
    kw = dict(use=use, frozen=frozen, scale=_scale(shape[0], seed) if scale else None)
    res, normed, grads = _run(add_layer_norm, tensors, dtypes, device, layout, **kw)
    f64 = (torch.float64, None if b_dt is None else torch.float64, torch.float64, None)
    ref_res, ref_normed, ref_grads = _run(reference.add_layer_norm, tensors, f64, "cpu", "contig", **kw)
    eager_res, eager_normed, eager_grads = _run(reference.add_layer_norm, tensors, dtypes, device, "contig", **kw)
    res_dt = x_dt if b_dt is None else torch.promote_types(x_dt, b_dt)
    assert normed.dtype == (out_dt or res_dt) and normed.shape == shape and normed.is_contiguous()
    if b_dt is not None:
        assert res.dtype == res_dt and res.shape == shape and res.is_contiguous()
        assert_close("residual", res, ref_res, eager_res)
    assert_close("normed", normed, ref_normed, eager_normed)
    for name, a, r, e, dt in zip(GRAD_NAMES, grads, ref_grads, eager_grads, (x_dt, b_dt, w_dt, w_dt)):
        if dt is None or name[1:] in frozen:
            assert a is None, name
            continue
        if name in ("dweight", "dbias") and "normed" not in use:
            assert a is None, name  # no path from the parameters to the used outputs
            continue
        assert a is not None and a.dtype == dt, (name, a.dtype if a is not None else None, dt)
        assert_close(name, a, r, e)


# (shape, (x, branch, weight, out_dtype), layout). C in {1, 3, 20, 48, 96, 768, 4096}: tiny,
# not a power of 2, the model's widths, the largest; leading dims 0-D to 3-D; the autocast
# mixes (fp32 stream + 16-bit branch, 16-bit out; 16-bit x with fp32 parameters); branch=None.
SHAPES = [
    pytest.param((2, 7, 48), (FP32, FP32, FP32, None), "contig", id="B2N7C48-fp32"),
    pytest.param((3, 5, 96), (FP16, FP16, FP16, None), "contig", id="B3N5C96-fp16"),
    pytest.param((2, 9, 20), (FP32, FP32, FP32, None), "channel-slice", id="C20-channel-slice-fp32"),
    pytest.param((2, 6, 48), (FP16, FP16, FP16, None), "token-slice", id="C48-token-slice-fp16"),
    pytest.param((3, 4, 24), (FP32, FP32, FP32, None), "nonunit-c", id="C24-nonunit-c-fp32"),
    pytest.param((2, 3, 4, 40), (FP32, FP32, FP32, None), "contig", id="4d-C40-fp32"),
    pytest.param((48,), (FP32, FP32, FP32, None), "contig", id="1d-C48-fp32"),
    pytest.param((5, 3), (FP32, FP32, FP32, None), "contig", id="C3-fp32"),
    pytest.param((4, 1), (FP32, FP32, FP32, None), "contig", id="C1-fp32"),
    pytest.param((3, 768), (FP16, FP16, FP16, None), "contig", id="C768-fp16"),
    pytest.param((2, 4096), (FP32, FP32, FP32, None), "contig", id="C4096-fp32"),
    pytest.param((2, 5, 96), (FP32, FP16, FP32, FP16), "contig", id="autocast-x32-b16-out16"),
    pytest.param((2, 5, 64), (FP32, FP16, FP32, FP16), "channel-slice", id="autocast-x32-b16-out16-slice"),
    pytest.param((2, 5, 48), (FP16, FP16, FP32, None), "contig", id="x16-b16-params32"),
    pytest.param((2, 5, 48), (FP16, FP32, FP32, FP16), "contig", id="x16-b32-out16"),
    pytest.param((2, 7, 48), (FP32, None, FP32, None), "contig", id="no-branch-fp32"),
    pytest.param((2, 7, 96), (FP16, None, FP16, None), "channel-slice", id="no-branch-fp16-slice"),
    pytest.param((2, 7, 96), (FP32, None, FP32, FP16), "contig", id="no-branch-x32-out16"),
]


@pytest.mark.parametrize("shape,dtypes,layout", SHAPES)
def test_parity(shape, dtypes, layout, device, nan_buffers):
    _check_parity(shape, dtypes, device, layout)
    R, C = math.prod(shape[:-1]), shape[-1]
    res_dt = dtypes[0] if dtypes[1] is None else torch.promote_types(dtypes[0], dtypes[1])
    # forward: normed, residual, mean, rstd; backward: dx, dx2, partial sums (all NaN-filled)
    assert len(nan_buffers) == 7, nan_buffers
    assert nan_buffers[0] == (shape, dtypes[3] or res_dt)
    assert nan_buffers[2:4] == [((R,), FP32)] * 2
    assert nan_buffers[6][0][1:] == (2, C) and nan_buffers[6][1] == FP32


@pytest.mark.parametrize(
    "shape,dtypes",
    [
        pytest.param((3, 13, 20), (FP32, FP32, FP32, None), id="C20-fp32"),
        pytest.param((2, 11, 48), (FP32, FP16, FP32, FP16), id="C48-mixed"),
        pytest.param((2, 9, 24), (FP32, None, FP32, None), id="C24-no-branch"),
    ],
)
def test_parity_small_tiles(shape, dtypes, device):
    """Tiles of 2 rows and 5 backward programs: programs straddle the batch, each walks
    several row blocks, the last one partly masked."""
    with plans.forced(add_ln_fwd=dict(block_r=2, num_warps=1), add_ln_bwd=dict(block_r=2, num_warps=1, programs=5)):
        plan = plans.add_layer_norm_bwd_plan(shape[0] * shape[1], shape[2], FP32, plans.INTERPRETER)
        assert plan.split > 1 and plan.blocks_per_split > 1
        _check_parity(shape, dtypes, device, "channel-slice")


@pytest.mark.parametrize("shape", [(2, 9, 96), (3, 1024)], ids=["C96", "C1024"])
def test_parity_gpu_tiles(shape, device):
    """The tiles and program counts an H100 would pick."""
    with plans.using_target("sm_90"):
        _check_parity(shape, (FP32, FP32, FP32, None), device)


@pytest.mark.parametrize(
    "use,dtypes",
    [
        pytest.param(("normed",), (FP32, FP32, FP32, None), id="normed-only"),
        pytest.param(("residual",), (FP32, FP32, FP32, None), id="residual-only"),
        pytest.param(("residual",), (FP32, FP16, FP32, FP16), id="residual-only-mixed"),
        pytest.param(("residual",), (FP32, None, FP32, None), id="residual-only-no-branch"),
    ],
)
def test_one_output_used(use, dtypes, device, nan_buffers):
    """Only one output reaches the loss: no d_residual read (normed-only), or no backward
    kernel at all (residual-only: the gradient passes through to x and branch)."""
    _check_parity((2, 5, 48), dtypes, device, use=use)
    assert len(nan_buffers) == (7 if use == ("normed",) else 4)


# stochastic depth fused into the add: (shape, dtypes, layout); the batch's factors mix 0
# (dropped), 1 / keep and 0.6 (``_scale``); rows per sample 1 to 21, leading dims 2-D and 3-D
SCALED = [
    pytest.param((4, 7, 48), (FP32, FP32, FP32, None), "contig", id="fp32"),
    pytest.param((5, 3, 96), (FP16, FP16, FP16, None), "channel-slice", id="fp16-channel-slice"),
    pytest.param((4, 5, 96), (FP32, FP16, FP32, FP16), "contig", id="autocast-x32-b16-out16"),
    pytest.param((3, 6, 48), (FP16, FP16, FP16, None), "token-slice", id="fp16-token-slice"),
    pytest.param((4, 3, 7, 40), (FP32, FP32, FP32, None), "contig", id="4d-fp32"),
    pytest.param((2, 9, 20), (FP32, FP32, FP32, None), "contig", id="B2-fp32"),
    pytest.param((6, 1, 24), (FP32, FP32, FP32, None), "contig", id="one-row-per-sample"),
]


@pytest.mark.parametrize("shape,dtypes,layout", SCALED)
def test_parity_branch_scale(shape, dtypes, layout, device, nan_buffers):
    """A factor per sample on the branch: the residual is x + branch * factor, x's gradient
    is the norm's plus d_residual, the branch's that times its factor, both from one kernel."""
    _check_parity(shape, dtypes, device, layout, scale=True)
    assert len(nan_buffers) == 7, nan_buffers
    assert [s for s, _ in nan_buffers[4:6]] == [shape, shape]  # dx and the branch's (scaled) gradient


@pytest.mark.parametrize(
    "use,frozen",
    [
        pytest.param(("residual",), (), id="residual-only"),
        pytest.param(("normed",), (), id="normed-only"),
        pytest.param(("residual", "normed"), ("x",), id="x-frozen"),
        pytest.param(("normed",), ("x",), id="normed-only-x-frozen"),
        pytest.param(("residual", "normed"), ("branch",), id="branch-frozen"),
    ],
)
def test_branch_scale_some_gradients(use, frozen, device, nan_buffers):
    """Only some gradients asked for: the scaled branch gradient is written alone where x is
    frozen, not at all where the branch is, and passes through (times its factor) where only
    the residual is used."""
    _check_parity((4, 5, 48), (FP32, FP16, FP32, FP16), device, use=use, frozen=frozen, scale=True)
    if "normed" in use:
        written = [s for s, _ in nan_buffers[4:6]]
        assert written == [(0,) if "x" in frozen else (4, 5, 48), (0,) if "branch" in frozen else (4, 5, 48)]


def test_branch_scale_small_tiles(device):
    """Row blocks of 4 rows over samples of 3: a block holds rows of two samples, each with its
    own factor; 3 backward programs walk several blocks each."""
    with plans.forced(add_ln_fwd=dict(block_r=4, num_warps=1), add_ln_bwd=dict(block_r=4, num_warps=1, programs=3)):
        _check_parity((5, 3, 20), (FP32, FP32, FP32, None), device, "channel-slice", scale=True)


@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "x-frozen"])
def test_no_branch_one_backward(x_grad, device):
    """Without a branch, x's two uses (the residual itself and the norm's input) meet in the
    backward kernel (d_residual + LN_backward, one pass): autograd adds no [R, C] gradients.
    Where x needs no gradient the residual is x itself, as eager's."""
    x, _, weight, bias, d_res, d_normed = (t.float().to(device) for t in _inputs((2, 5, 24), seed=8))
    x.requires_grad_(x_grad)
    weight.requires_grad_()
    residual, normed = add_layer_norm(x, None, weight, bias)
    assert (residual is x) == (not x_grad) and residual.data_ptr() == x.data_ptr()
    assert residual.requires_grad == x_grad
    with RecordShapes() as rec:
        torch.autograd.backward([normed, residual * d_res][: 1 + x_grad], [d_normed, torch.ones_like(x)][: 1 + x_grad])
    adds = [shape for op, shape in rec.made if op in (torch.ops.aten.add, torch.ops.aten.add_)]
    assert tuple(x.shape) not in adds
    ref = x.detach().double().requires_grad_(x_grad)
    ref_w = weight.detach().double().requires_grad_()
    ref_res, ref_normed = reference.add_layer_norm(ref, None, ref_w, bias.double())
    torch.autograd.backward(
        [ref_normed, ref_res * d_res.double()][: 1 + x_grad], [d_normed.double(), torch.ones_like(ref)][: 1 + x_grad]
    )
    assert_close("dweight", weight.grad, ref_w.grad)
    if x_grad:
        assert_close("dx", x.grad, ref.grad)


def test_strided_grads(device):
    """A stride-0 (expanded) d_normed, from normed.sum(): copied by the launcher."""
    tensors = _inputs((2, 5, 24), seed=2)

    def grads(fn, dtype, dev):
        leaves = [t.to(device=dev, dtype=dtype, copy=True).requires_grad_() for t in tensors[:4]]
        res, normed = fn(*leaves)
        (normed.sum() + (res * tensors[4].to(res)).sum()).backward()
        return [t.grad for t in leaves]

    for name, a, r, e in zip(
        GRAD_NAMES,
        grads(add_layer_norm, FP32, device),
        grads(reference.add_layer_norm, torch.float64, "cpu"),
        grads(reference.add_layer_norm, FP32, device),
    ):
        assert_close(name, a, r, e)


def test_only_parameter_grads(device, nan_buffers):
    """x and branch frozen: the backward writes no input gradient (no [R, C] buffer)."""
    tensors = _inputs((2, 6, 48), seed=4)
    x, branch, weight, bias, d_res, d_normed = (t.float().to(device) for t in tensors)
    weight.requires_grad_()
    bias.requires_grad_()
    _, normed = add_layer_norm(x, branch, weight, bias)
    dw, db = torch.autograd.grad(normed, (weight, bias), d_normed)
    refw, refb = (t.clone().requires_grad_() for t in tensors[2:4])
    _, ref = reference.add_layer_norm(tensors[0], tensors[1], refw, refb)
    rdw, rdb = torch.autograd.grad(ref, (refw, refb), tensors[5])
    assert_close("dweight", dw, rdw)
    assert_close("dbias", db, rdb)
    assert [s for s, _ in nan_buffers[4:6]] == [(0,), (0,)]  # dx, dx2 not allocated


@pytest.mark.parametrize("branch", [True, False], ids=["branch", "no-branch"])
def test_inference_skips_stats(branch, device, nan_buffers):
    """Under no_grad (and with nothing requiring grad) mean and rstd are not written."""
    tensors = _inputs((2, 5, 48), seed=1)
    x, b, weight, bias = (t.float().to(device) for t in tensors[:4])
    b = b if branch else None
    with torch.no_grad():
        res, normed = add_layer_norm(x.requires_grad_(), b, weight, bias)
    assert normed.grad_fn is None and (res is x) == (not branch)
    ref_res, ref_normed = reference.add_layer_norm(*(None if t is None else t.double() for t in (x, b, weight, bias)))
    assert_close("normed", normed, ref_normed, reference.add_layer_norm(x, b, weight, bias)[1])
    assert_close("residual", res, ref_res)
    assert [s for s, _ in nan_buffers[2:]] == [(0,), (0,)]


def test_empty_rows(device):
    x = torch.empty(0, 3, 16, device=device, requires_grad=True)
    weight = torch.ones(16, device=device, requires_grad=True)
    bias = torch.zeros(16, device=device, requires_grad=True)
    res, normed = add_layer_norm(x, x.detach(), weight, bias)
    assert res.shape == normed.shape == (0, 3, 16)
    normed.sum().backward()
    assert torch.equal(weight.grad, torch.zeros(16)) and x.grad.shape == x.shape


def test_deterministic(device):
    """Two backward runs give bitwise-identical gradients (no atomics, fixed split)."""
    tensors = _inputs((3, 17, 48), seed=5)
    dtypes = (FP32, FP32, FP32, None)
    with plans.forced(add_ln_bwd=dict(block_r=4, programs=3)):
        first = _run(add_layer_norm, tensors, dtypes, device)[2]
        second = _run(add_layer_norm, tensors, dtypes, device)[2]
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), name


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 3),
    N=st.integers(1, 20),
    C=st.sampled_from([1, 7, 16, 33, 64, 100]),
    has_branch=st.booleans(),
    scaled=st.booleans(),
    layout=st.sampled_from(["contig", "channel-slice", "token-slice"]),
    block_r=st.sampled_from([1, 2, 4, None]),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(B, N, C, has_branch, scaled, layout, block_r, seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (FP32, FP32 if has_branch else None, FP32, None)
    with plans.forced(add_ln_fwd=dict(block_r=block_r), add_ln_bwd=dict(block_r=block_r, programs=3)):
        _check_parity((B, N, C), dtypes, device, layout, seed=seed, scale=has_branch and scaled)


def test_launchers_on_meta_tensors():
    """On meta tensors under plans.recording(), the launchers record the plan functions'
    launches (what the GPU target check compiles), for a batch far above CUDA's grid y/z cap."""
    B, N, C = 4096, 3136, 96
    x = torch.empty(B, N, C, device="meta", dtype=FP32)
    branch = torch.empty(B, N, 2 * C, device="meta", dtype=BF16)[..., :C]
    weight, bias = (torch.empty(C, device="meta", dtype=FP32) for _ in range(2))
    target = plans.TARGETS["sm_90"]
    with plans.using_target(target), plans.recording() as seen:
        res, normed, mean, rstd = kernels._fwd(x, branch, weight, bias, 1e-6, BF16, True)
        out = kernels._bwd(torch.empty_like(normed), torch.empty_like(res), res, mean, rstd, weight, FP32, BF16)
    R = B * N
    bwd = plans.add_layer_norm_bwd_plan(R, C, FP32, target)
    assert [r.plan for r in seen] == [plans.add_layer_norm_fwd_plan(R, C, FP32, target), bwd.launch]
    assert seen[0].args[1].stride(0) == 2 * C  # the branch slice is read in place
    assert res.dtype == FP32 and normed.dtype == BF16 and out[0].dtype == FP32 and out[1].dtype == BF16
    assert bwd.split <= 2 * target.sm_count and all(len(r.plan.grid) == 1 for r in seen)
    scale = torch.empty(B, device="meta", dtype=FP32)
    with plans.using_target(target), plans.recording() as scaled:
        res, normed, mean, rstd = kernels._fwd(x, branch, weight, bias, 1e-6, BF16, True, scale)
        kernels._bwd(torch.empty_like(normed), torch.empty_like(res), res, mean, rstd, weight, FP32, BF16, scale)
    assert [r.plan for r in scaled] == [r.plan for r in seen]  # the same plans
    # the factors and the rows of each sample
    # (fwd: x2, branch, scale, ..., R, C, S; bwd: ..., weight, scale, ..., R, C, S)
    assert scaled[0].args[2] is scale and scaled[0].args[11] == N
    assert scaled[1].args[6] is scale and scaled[1].args[12] == N
    with pytest.raises(ValueError, match="32-bit row indices"):
        plans.add_layer_norm_fwd_plan(2**31, C, FP32, target)


def test_custom_ops_trace(device):
    """The fake implementations: torch.compile traces the op (forward and backward) in one
    graph with no compiler (aot_eager), matching eager, with and without a branch."""
    tensors = [t.float().to(device) for t in _inputs((2, 5, 24), seed=6)]

    scale = _scale(2).float().to(device)

    def f(x, branch, weight, bias):
        res, normed = add_layer_norm(x * 2, branch, weight, bias, 1e-5, FP16)
        _, normed2 = add_layer_norm(res, None, weight, bias)
        res3, normed3 = add_layer_norm(res, branch, weight, bias, branch_scale=scale)
        out = res.sum() + (normed.float() * tensors[5]).sum() + (normed2 * tensors[4]).sum()
        return out + (res3 * tensors[4]).sum() + (normed3 * tensors[5]).sum()

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in tensors[:4]]
        out = fn(*leaves)
        out.backward()
        return [out] + [t.grad for t in leaves]

    compiled = grads(torch.compile(f, backend="aot_eager", fullgraph=True))
    eager = grads(f)
    for name, a, e in zip(("out", *GRAD_NAMES), compiled, eager):
        assert_close(name, a, e.double())


def test_custom_ops_opcheck(device):
    """torch.library.opcheck (schema, fake tensors, AOT dispatch with dynamic shapes) of both ops."""
    x, branch, weight, bias, d_res, d_normed = (t.float().to(device) for t in _inputs((2, 3, 16)))
    fwd, bwd = torch.ops.restv2.add_layer_norm_fwd.default, torch.ops.restv2.add_layer_norm_bwd.default
    torch.library.opcheck(fwd, (x, branch.half(), weight, bias, 1e-6, FP16, True))
    torch.library.opcheck(fwd, (x[..., :8], None, weight[:8], bias[:8], 1e-6, None, False))
    res, normed, mean, rstd = fwd(x, branch, weight, bias, 1e-6, None, True)
    torch.library.opcheck(bwd, (d_normed, d_res, res, mean, rstd, weight, FP32, FP16))
    torch.library.opcheck(bwd, (d_normed, None, res, mean, rstd, weight, None, None))
    scale = _scale(2).float().to(device)
    torch.library.opcheck(fwd, (x, branch.half(), weight, bias, 1e-6, FP16, True, scale))
    torch.library.opcheck(bwd, (d_normed, d_res, res, mean, rstd, weight, FP32, FP32, scale))


def _good(device, C=16):
    return dict(
        x=torch.randn(2, 3, C, device=device),
        branch=torch.randn(2, 3, C, device=device),
        weight=torch.ones(C, device=device),
        bias=torch.zeros(C, device=device),
    )


@pytest.mark.parametrize(
    "change,error,match",
    [
        pytest.param(
            lambda a: a.update(x=a["x"].double(), branch=a["branch"].double()), TypeError, "fp16/bf16/fp32", id="fp64"
        ),
        pytest.param(
            lambda a: a.update(weight=a["weight"].double()), TypeError, "weight in torch.float64", id="weight-fp64"
        ),
        pytest.param(lambda a: a.update(out_dtype=torch.float64), TypeError, "out_dtype", id="out-fp64"),
        pytest.param(lambda a: a.update(out_dtype="float16"), TypeError, "out_dtype", id="out-str"),
        pytest.param(lambda a: a.update(x=a["x"].int()), TypeError, "x has dtype", id="x-int"),
        pytest.param(lambda a: a.update(x=a["x"].tolist()), TypeError, "x must be a torch.Tensor", id="not-tensor"),
        pytest.param(lambda a: a.update(branch=a["branch"][:1]), ValueError, "branch .* must have", id="branch-shape"),
        pytest.param(
            lambda a: a.update(weight=a["weight"][:3]), ValueError, "weight must have shape", id="weight-shape"
        ),
        pytest.param(lambda a: a.update(bias=a["bias"][None]), ValueError, "bias must have shape", id="bias-shape"),
        pytest.param(lambda a: a.update(eps=-1.0), ValueError, "eps", id="eps-negative"),
        pytest.param(
            lambda a: a.update(x=torch.tensor(1.0, device=a["x"].device)),
            ValueError,
            "at least one dimension",
            id="x-0d",
        ),
        pytest.param(
            lambda a: a.update(branch=None, branch_scale=torch.ones(2, device=a["x"].device)),
            ValueError,
            "branch is None",
            id="scale-without-branch",
        ),
        pytest.param(
            lambda a: a.update(branch_scale=torch.ones(3, device=a["x"].device)),
            ValueError,
            r"branch_scale must have shape \(B,\)",
            id="scale-shape",
        ),
        pytest.param(
            lambda a: a.update(
                x=a["x"][0, 0], branch=a["branch"][0, 0], branch_scale=torch.ones(16, device=a["x"].device)
            ),
            ValueError,
            r"branch_scale must have shape \(B,\)",
            id="scale-1d-x",
        ),
        pytest.param(
            lambda a: a.update(branch_scale=torch.ones(2, dtype=torch.int64, device=a["x"].device)),
            TypeError,
            "branch_scale has dtype",
            id="scale-int",
        ),
        pytest.param(
            lambda a: a.update(branch_scale=torch.ones(2, device=a["x"].device, requires_grad=True)),
            ValueError,
            "branch_scale is a constant",
            id="scale-requires-grad",
        ),
        pytest.param(lambda a: a.update(branch_scale=[1.0, 1.0]), TypeError, "branch_scale must be", id="scale-list"),
    ],
)
def test_errors(change, error, match, device):
    args = _good(device)
    change(args)
    with pytest.raises(error, match=match):
        add_layer_norm(**args)


def test_error_too_many_channels(device):
    with pytest.raises(ValueError, match="channels"):
        add_layer_norm(**_good(device, C=kernels.MAX_C + 1))


def test_error_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        add_layer_norm(**_good("cpu"))


# ----------------------------------------------------------------------------- the model's widths

BOTH, COMPILED = pytest.mark.bf16, pytest.mark.cuda  # bf16: in the interpreter too (bf16 emulated)


@pytest.mark.parametrize(
    "shape,dtypes",
    [
        pytest.param((4, 3136, 64), (BF16, BF16, BF16, None), id="C64-bf16", marks=BOTH),
        pytest.param((4, 784, 128), (FP16, FP16, FP16, None), id="C128-fp16", marks=COMPILED),
        pytest.param((4, 196, 256), (FP32, BF16, FP32, BF16), id="C256-autocast-bf16", marks=BOTH),
        pytest.param((4, 49, 512), (BF16, BF16, FP32, None), id="C512-bf16-params32", marks=BOTH),
        pytest.param((4, 49, 1024), (FP32, FP32, FP32, None), id="C1024-fp32", marks=COMPILED),
        pytest.param((4, 49, 1000), (BF16, None, BF16, None), id="C1000-bf16-no-branch", marks=BOTH),
        pytest.param((8, 4096), (BF16, BF16, BF16, None), id="C4096-bf16", marks=BOTH),
    ],
)
def test_parity_model_widths(shape, dtypes, device):
    """At the model's widths: bf16 in the interpreter too (bf16 emulated), fp16 and fp32 compiled."""
    _check_parity(shape, dtypes, device, "channel-slice")
    if dtypes[1] is not None:  # with stochastic depth's factors
        _check_parity(shape, dtypes, device, "channel-slice", scale=True)


# ----------------------------------------------------------------------------- compiled only


@pytest.mark.cuda
@pytest.mark.inductor
def test_torch_compile_inductor(device):
    """torch.compile(fullgraph=True) with inductor around the op, in the autocast dtypes
    (fp32 stream, bf16 branch, bf16 normed), forward and backward."""
    tensors = _inputs((4, 49, 96), seed=7)
    dts = (FP32, BF16, FP32, FP32)

    def f(fn, out_dtype):
        def g(x, branch, weight, bias):
            res, normed = fn(x * 0.5, branch, weight, bias, 1e-6, out_dtype)
            return F.gelu(normed.to(res.dtype)) + res

        return g

    def grads(fn, dtypes, dev):
        leaves = [t.to(device=dev, dtype=dt, copy=True).requires_grad_() for t, dt in zip(tensors[:4], dtypes)]
        out = fn(*leaves)
        out.backward(tensors[5].to(device=dev, dtype=out.dtype))
        return [out] + [t.grad for t in leaves]

    tensors = [t.to(dt).double() for t, dt in zip(tensors, (*dts, FP32, FP32))]
    compiled = grads(torch.compile(f(add_layer_norm, BF16), fullgraph=True), dts, device)
    eager = grads(f(reference.add_layer_norm, BF16), dts, device)
    ref64 = grads(f(reference.add_layer_norm, None), (torch.float64,) * 4, "cpu")
    for name, a, r, e in zip(("out", *GRAD_NAMES), compiled, ref64, eager):
        assert_close(name, a, r, e)
