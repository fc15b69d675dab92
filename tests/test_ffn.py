"""Parity, gradients, strided inputs, plans and errors of the fused Linear + exact GELU.

Every comparison goes through ``helpers.assert_close``: the kernel against a float64
reference on the same (dtype-rounded) inputs, judged by the error of eager PyTorch in the
kernel's dtype. Without a GPU these run in Triton's interpreter (see conftest.py).
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
import triton
import triton.language as tl
from helpers import assert_close, model_width_dtypes, nan_buffers_for

from restv2_kernels import plans, reference
from restv2_kernels.ffn import triton as kernels
from restv2_kernels.ffn.triton import _round_to_tf32, linear_gelu

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
GRAD_NAMES = ("dx", "dweight", "dbias")


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an unwritten element fails."""
    return nan_buffers_for(monkeypatch, kernels)


def _tiles(block_m=16, block_n=16, block_k=16, group_m=2):
    """16x16x16 tiles, groups of 2 row blocks: M, N and K boundaries, several K steps and a
    short last group on small shapes."""
    return plans.forced(linear_gelu_fwd=dict(block_m=block_m, block_n=block_n, block_k=block_k, group_m=group_m))


def _inputs(lead, K, N, seed=0):
    """float64 CPU tensors x [*lead, K], weight [N, K], bias [N], dout [*lead, N]; the weight
    scaled by 1/sqrt(K) so the pre-activations span GELU's curved region (|a| of a few)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g)
    weight = torch.randn(N, K, generator=g) / K**0.5 * 1.5
    bias = torch.randn(N, generator=g) / 2
    dout = torch.randn(*lead, N, generator=g)
    return [t.double() for t in (x, weight, bias, dout)]


def _run(fn, tensors, dtype, device, with_bias=True, x_view=None):
    """fn's output and the gradients of <out, dout> w.r.t. x, weight, bias (None without bias).
    ``x_view(x)`` gives the (strided) tensor passed as x; gradients flow back to x."""
    x, weight, bias, dout = (t.to(device=device, dtype=dtype, copy=True).requires_grad_() for t in tensors)
    xin = x_view(x) if x_view else x
    out = fn(xin, weight, bias if with_bias else None)
    out.backward(dout.detach())
    return out, [x.grad, weight.grad, bias.grad if with_bias else None]


def _check_parity(lead, K, N, dtype, device, with_bias=True, x_view=None, seed=0):
    """Kernel vs float64 reference vs eager in the same dtype: output and every gradient."""
    tensors = [t.to(dtype).double() for t in _inputs(lead, K, N, seed)]  # the same rounded inputs for all
    out, grads = _run(linear_gelu, tensors, dtype, device, with_bias, x_view)
    ref_out, ref_grads = _run(reference.linear_gelu, tensors, torch.float64, "cpu", with_bias, x_view)
    eager_out, eager_grads = _run(reference.linear_gelu, tensors, dtype, device, with_bias, x_view)
    assert out.is_contiguous() and out.dtype == dtype and out.shape == ref_out.shape
    assert_close("out", out, ref_out, eager_out)
    for name, a, r, e in zip(GRAD_NAMES, grads, ref_grads, eager_grads):
        if r is None:
            assert a is None, name
            continue
        assert a is not None and a.dtype == dtype, name
        assert_close(name, a, r, e)


# (lead dims, K, N_out, dtype, small tiles). Small tiles: M = 37 rows -> 3 row blocks (the last
# group of GROUP_M = 2 has one), N 48..96 -> 3..6 column blocks, K = 24 (two K steps, the
# second masked) or 32 (two unmasked steps). Default (interpreter) tiles: the tile clipped to
# the problem, one program. K = 40: no power of 2 >= 16 divides it, one masked step of 64.
CASES = [
    pytest.param((37,), 24, 96, FP32, True, id="M37-K24-N96-fp32-tiles"),
    pytest.param((37,), 32, 80, FP16, True, id="M37-K32-N80-fp16-tiles"),
    pytest.param((37,), 24, 48, FP16, True, id="M37-K24-N48-fp16-tiles"),
    pytest.param((2, 19), 32, 128, FP32, True, id="B2xN19-K32-N128-fp32-tiles"),
    pytest.param((3, 7), 40, 72, FP32, False, id="B3xN7-K40-N72-fp32"),
    pytest.param((3, 7), 64, 256, FP16, False, id="B3xN7-K64-N256-fp16"),
    pytest.param((1,), 16, 16, FP32, False, id="M1-K16-N16-fp32"),
]


@pytest.mark.parametrize("lead,K,N,dtype,small", CASES)
def test_parity(lead, K, N, dtype, small, device, nan_buffers):
    with _tiles() if small else plans.forced():
        _check_parity(lead, K, N, dtype, device)
    M = 1
    for s in lead:
        M *= s
    # training: act and pre, both [M, N] in x's dtype, both NaN-filled before the kernel
    assert nan_buffers == [((M, N), dtype), ((M, N), dtype)], nan_buffers


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
def test_parity_no_bias(dtype, device):
    with _tiles():
        _check_parity((37,), 24, 64, dtype, device, with_bias=False)


@pytest.mark.parametrize(
    "layout",
    ["row-slice", "token-slice", "transposed"],
)
def test_strided_x(layout, device):
    """Row-strided x, read in place (a slice of wider rows: the model's qkv-like views; every
    other token of [B, N, K]: rows do not flatten into one stride, a copy), and a transposed
    one (inner stride != 1: copied). Gradients flow back through the view."""
    B, T, K, N = 2, 9, 24, 48
    views = {
        "row-slice": lambda x: torch.cat([x, x[..., :8]], dim=-1)[..., :K],
        "token-slice": lambda x: torch.cat([x, x], dim=1)[:, ::2],
        "transposed": lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2),
    }
    with _tiles():
        _check_parity((B, T), K, N, FP32, device, x_view=views[layout])


def test_row_strided_view_read_in_place():
    """A row-strided [B, T, K] view is handed to the kernel as is: no copy, row stride K + 8."""
    B, T, K, N = 2, 5, 24, 48
    wide = torch.randn(B, T, K + 8)
    x = wide[..., 4 : 4 + K]
    weight, bias = torch.randn(N, K), torch.randn(N)
    with plans.recording() as seen:
        kernels._fwd(x, weight, bias, False)
    (rec,) = seen
    x_arg, w_arg = rec.args[0], rec.args[1]
    assert x_arg.data_ptr() == x.data_ptr() and x_arg.stride() == (K + 8, 1)
    assert w_arg is weight  # read as its transpose through the strides, no copy
    assert rec.args[10:14] == (K + 8, 1, K, 1)


@pytest.mark.parametrize("ctx", ["no_grad", "no_requires_grad"])
def test_inference_writes_no_pre(ctx, device, nan_buffers):
    """Without a gradient only the activation is allocated and written."""
    tensors = [t.float() for t in _inputs((37,), 24, 48)]
    x, weight, bias = (t.to(device).requires_grad_(ctx == "no_grad") for t in tensors[:3])
    with _tiles(), torch.set_grad_enabled(ctx != "no_grad"):
        out = linear_gelu(x, weight, bias)
    assert nan_buffers == [((37, 48), FP32)], nan_buffers
    assert not out.requires_grad
    assert_close(
        "out",
        out,
        reference.linear_gelu(*(t.double() for t in tensors[:3])),
        reference.linear_gelu(*(t.float() for t in tensors[:3])),
    )


def test_grad_only_x(device):
    """Frozen weight and bias: only dx is computed."""
    x, weight, bias, dout = (t.float().to(device) for t in _inputs((37,), 24, 48))
    x.requires_grad_()
    with _tiles():
        out = linear_gelu(x, weight, bias)
    out.backward(dout)
    xr = x.detach().double().requires_grad_()
    reference.linear_gelu(xr, weight.double(), bias.double()).backward(dout.double())
    xe = x.detach().clone().requires_grad_()
    reference.linear_gelu(xe, weight, bias).backward(dout)
    assert weight.grad is None and bias.grad is None
    assert_close("dx", x.grad, xr.grad, xe.grad)


def test_empty_rows(device, nan_buffers):
    """M = 0: no launch, an empty result of the right shape."""
    x = torch.randn(2, 0, 16, device=device)
    out = linear_gelu(x, torch.randn(32, 16, device=device), torch.randn(32, device=device))
    assert out.shape == (2, 0, 32)


def test_meta_launch_recorded():
    """The launcher on meta tensors under recording (the GPU target check): one launch, the
    1-D grid covers every output tile, pre stored only when asked."""
    M, K, N = 3136, 96, 384
    x = torch.empty(M, K, device="meta", dtype=FP16)
    w = torch.empty(N, K, device="meta", dtype=FP16)
    b = torch.empty(N, device="meta", dtype=FP16)
    with plans.recording() as seen, plans.using_target("sm_90"):
        act, pre = kernels._fwd(x, w, b, True)
        act2, pre2 = kernels._fwd(x, w, None, False)
    assert act.shape == pre.shape == act2.shape == (M, N) and pre2.numel() == 0
    first, second = seen
    meta = dict(first.plan.constexprs)
    assert first.plan.grid == (plans.cdiv(M, meta["BLOCK_M"]) * plans.cdiv(N, meta["BLOCK_N"]),)
    assert meta["EVEN_K"] and K % meta["BLOCK_K"] == 0
    # HAS_BIAS, STORE_PRE; no row sums and no GELU stored again (the backward's flags)
    assert first.args[-4:] == (True, True, False, False) and second.args[-4:] == (False, False, False, False)


# ----------------------------------------------------------------------------- plans


@pytest.mark.parametrize("target", sorted(plans.TARGETS))
@pytest.mark.parametrize("dtype", [FP16, BF16, FP32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("K", [64, 96, 192, 384, 768, 1024])
def test_plan_model_shapes(target, dtype, K):
    """Every model width: BLOCK_K divides K (unmasked K loop), tl.dot's minimum of 16, the
    pipeline's stages within the target's shared memory, the grid within CUDA's limit."""
    t = plans.TARGETS[target]
    M, N = 256 * 56 * 56, 4 * K
    plan = plans.linear_gelu_fwd_plan(M, N, K, dtype, t)
    meta = dict(plan.constexprs)
    assert meta["EVEN_K"] and K % meta["BLOCK_K"] == 0
    assert min(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]) >= 16
    stage = (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"] * dtype.itemsize
    assert plan.num_stages * stage <= t.smem_per_block
    assert plan.grid[0] == plans.cdiv(M, meta["BLOCK_M"]) * plans.cdiv(N, meta["BLOCK_N"])
    if t.tensor_cores == "fma" or dtype == FP32:  # FMA dots: the small fp32 tile
        assert meta["BLOCK_M"] * meta["BLOCK_N"] <= 64 * 64


def test_plan_clips_and_precision():
    """Tiles clip to small problems; fp32 dots are IEEE unless TF32 is allowed on a GPU with
    TF32 tensor cores (never on sm_70, never in the interpreter)."""
    sm80, sm70 = plans.TARGETS["sm_80"], plans.TARGETS["sm_70"]
    meta = dict(plans.linear_gelu_fwd_plan(5, 24, 10, FP16, sm80).constexprs)
    assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], meta["EVEN_K"]) == (16, 32, 16, False)
    blocks_k = {
        K: dict(plans.linear_gelu_fwd_plan(4096, 256, K, FP16, sm80).constexprs)["BLOCK_K"]
        for K in (24, 48, 96, 1000, 2048)
    }
    assert blocks_k == {24: 32, 48: 16, 96: 32, 1000: 64, 2048: 64}
    prec = {
        (t.name, tf32): dict(plans.linear_gelu_fwd_plan(64, 64, 64, FP32, t, tf32).constexprs)["DOT_PRECISION"]
        for t in (sm80, sm70, plans.INTERPRETER)
        for tf32 in (False, True)
    }
    assert prec == {
        ("sm_80", False): "ieee",
        ("sm_80", True): "tf32",
        ("sm_70", False): "ieee",
        ("sm_70", True): "ieee",
        ("interpreter", False): "ieee",
        ("interpreter", True): "ieee",
    }
    with pytest.raises(ValueError, match="grid dimension x"):
        plans.linear_gelu_fwd_plan(2**40, 4096, 1024, FP16, sm80)


@contextlib.contextmanager
def _allow_tf32(allowed, api="legacy"):
    """TF32 for cuBLAS fp32 matmuls on or off inside the block, through the legacy flag
    (``allow_tf32``), ``set_float32_matmul_precision`` or the newer per-backend flag
    (``torch.backends.cuda.matmul.fp32_precision``); restored after (properties: no monkeypatch)."""
    if api == "fp32_precision":
        with plans.tf32_matmuls(allowed):
            yield
        return
    before = torch.get_float32_matmul_precision()
    if api == "legacy":
        torch.backends.cuda.matmul.allow_tf32 = allowed
    else:
        torch.set_float32_matmul_precision("high" if allowed else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("api", ["legacy", "matmul_precision", "fp32_precision"])
def test_tf32_flag_reaches_the_kernel(api):
    """Both launchers of the GEMM (the forward, and the MLP backward's GELU-gradient GEMM) ask
    PyTorch whether fp32 matmuls may use TF32, however that was set. Under torch >= 2.9, reading
    the legacy ``allow_tf32`` after the new ``fp32_precision`` API set it raises a RuntimeError
    (mixed APIs): a launcher that read it would fail in the backward."""
    x, w = torch.empty(64, 32, device="meta"), torch.empty(128, 32, device="meta")
    dy, w2, pre = (
        torch.empty(64, 32, device="meta"),
        torch.empty(32, 128, device="meta"),
        torch.empty(64, 128, device="meta"),
    )
    seen_prec = []
    for allowed in (False, True):
        with _allow_tf32(allowed, api), plans.recording() as seen, plans.using_target("sm_80"):
            kernels._fwd(x, w, None, False)
            kernels._gelu_grad(dy, w2, pre)
        assert [r.plan.kernel for r in seen] == ["linear_gelu_fwd", "linear_gelu_bwd"]
        seen_prec.append([dict(r.plan.constexprs)["DOT_PRECISION"] for r in seen])
    assert seen_prec == [["ieee", "ieee"], ["tf32", "tf32"]]
    assert not plans.tf32_allowed()  # restored
    assert torch.backends.cuda.matmul.allow_tf32 is False  # and the legacy flag readable again


def _tf32_reference(t):
    """fp32 -> the nearest TF32 value, ties away from zero (PTX's ``cvt.rna.tf32.f32``), in
    float64 arithmetic and independent of the kernel's bit trick: 11 significant bits, or
    multiples of 2**-136 (TF32's subnormal step) below 2**-126; past TF32's largest value, inf."""
    t = t.double()
    _, exp = torch.frexp(t)  # |t| = m * 2**exp, 0.5 <= m < 1
    step = torch.pow(2.0, (exp - 11).clamp(min=-136).double())
    r = torch.floor(t.abs() / step + 0.5) * step
    r = torch.where(r > 2.0**128 * (1 - 2.0**-11), torch.inf, r)
    return torch.where(t.isfinite(), torch.copysign(r, t), t).float()  # the sign of zeros kept


def test_tf32_reference_rounds():
    """The test's yardstick on known cases: ties away from zero, subnormals, overflow, NaN."""
    one = 1.0
    cases = {
        one + 2**-11: one + 2**-10,
        one + 2**-11 - 2**-23: one,
        -(one + 2**-11): -(one + 2**-10),
        one + 3 * 2**-11: one + 2**-9,
        2.0**-137: 2.0**-136,
        2.0**-138: 0.0,
        3.4028234663852886e38: math.inf,
        -3.4028234663852886e38: -math.inf,
        2.0**-126 * (1 + 2**-11): 2.0**-126 * (1 + 2**-10),
    }
    got = _tf32_reference(torch.tensor(list(cases), dtype=torch.float32))
    assert got.tolist() == list(cases.values())
    assert _tf32_reference(torch.tensor([math.nan])).isnan().all()


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, _round_to_tf32(tl.load(x_ptr + offs, mask=mask)), mask=mask)


def test_round_to_tf32(device):
    """The kernels' bit trick against the float64 yardstick, bit for bit: signed zeros, ties,
    subnormals, the largest finite values (to inf), infinities, NaN and 2**16 random bit patterns
    (every exponent)."""
    special = torch.tensor(
        [
            0.0,
            -0.0,
            1 + 2**-11,
            -(1 + 2**-11),
            1 + 2**-11 - 2**-23,
            2.0**-137,
            2.0**-149,
            2.0**-126 - 2.0**-149,
            3.4028234663852886e38,
            -3.4028234663852886e38,
            math.inf,
            -math.inf,
            math.nan,
        ]
    )
    bits = torch.randint(-(2**31), 2**31, (2**16,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    x = torch.cat([special, bits.to(torch.int32).view(torch.float32)])
    y = torch.empty_like(x, device=device)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(device), y, x.numel(), BLOCK=1024)
    y, want = y.cpu(), _tf32_reference(x)
    nan = x.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int32), want[~nan].view(torch.int32))


def _tf32_bound(a, b):
    """|fp32 sum of the K exact TF32 products - the exact sum| <= K * 2**-23 * sum |a_k b_k|: one
    unit in the last place per addition, wide enough for tensor cores that do not round to
    nearest when they add."""
    return a.shape[-1] * 2.0**-23 * (a.double().abs() @ b.double().abs().T)


def test_tf32_dot_rounds_its_operands(device):
    """With TF32 allowed, the GEMM's operands are rounded to TF32 to nearest, as cuBLAS's TF32
    GEMMs round them (Triton's ``input_precision="tf32"`` alone lets the tensor cores ignore the
    13 low bits: a truncation, twice the error; triton-lang/triton#4574), in the forward (x and
    weight) and in the MLP backward's GELU-gradient GEMM (dy and fc2's weight). On CUDA the plan
    is the device's; in the interpreter, which computes ``tl.dot`` in fp32 whatever the precision,
    a TF32 GPU's plan is forced: both must give the product of the rounded operands."""
    g = torch.Generator().manual_seed(3)
    M, K, N = 40, 96, 48
    x, w, dy = (torch.randn(*shape, generator=g).to(device) for shape in ((M, K), (N, K), (M, K)))

    def target():
        return contextlib.nullcontext() if device == "cuda" else plans.using_target("sm_80")

    with _allow_tf32(True), target(), plans.recording() as seen:
        kernels._fwd(x, w, None, True)
        kernels._gelu_grad(dy, w.t(), torch.zeros(M, N, device=device))
    assert [dict(r.plan.constexprs)["DOT_PRECISION"] for r in seen] == ["tf32", "tf32"]
    with _allow_tf32(True), target():
        _, pre = kernels._fwd(x, w, None, True)
        # pre = 0: gelu'(0) = Phi(0) + 0 = 1/2 exactly, so d_pre = (dy @ w^T) / 2
        d_pre, _, _ = kernels._gelu_grad(dy, w.t(), torch.zeros(M, N, device=device))
    for name, got, a, b, scale in (("pre", pre, x, w, 1.0), ("d_pre", d_pre, dy, w, 0.5)):
        a, b, got = a.cpu(), b.cpu(), got.cpu().double() / scale
        want = _tf32_reference(a).double() @ _tf32_reference(b).double().T
        bound = _tf32_bound(a, b)
        err = ((got - want).abs() / bound).max().item()
        assert err <= 1, f"{name}: {err:.3g} times the bound away from the product of the rounded operands"
        # the data tell rounding apart: the unrounded product is far outside the bound
        assert ((a.double() @ b.double().T - want).abs() / bound).max() > 10


# ----------------------------------------------------------------------------- torch integration


def test_custom_op_opcheck(device):
    """torch.library.opcheck (schema, fake tensor, AOT dispatch with dynamic shapes) of the op,
    with and without the pre-activation, on a row-strided x."""
    x = torch.randn(2, 5, 40, device=device)[..., 4:28]
    w, b = torch.randn(48, 24, device=device), torch.randn(48, device=device)
    with _tiles(block_m=32, block_n=64, block_k=32):
        torch.library.opcheck(torch.ops.restv2.linear_gelu_fwd.default, (x, w, b, True))
        torch.library.opcheck(torch.ops.restv2.linear_gelu_fwd.default, (x, w, None, False))


def test_torch_compile_trace(device):
    """torch.compile (aot_eager, fullgraph) traces the op and its aten backward in one graph."""
    tensors = [t.float().to(device) for t in _inputs((2, 7), 24, 48)]

    def f(x, w, b):
        return linear_gelu(x * 2, w, b).sum(-1)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in tensors[:3]]
        out = fn(*leaves)
        out.backward(tensors[3].sum(-1))
        return [out] + [t.grad for t in leaves]

    compiled = grads(torch.compile(f, backend="aot_eager", fullgraph=True))
    eager = grads(f)
    for name, a, e in zip(("out", *GRAD_NAMES), compiled, eager):
        assert_close(name, a, e.double())


# ----------------------------------------------------------------------------- errors


def _good(device, dtype=FP32):
    return dict(
        x=torch.randn(3, 16, device=device, dtype=dtype),
        weight=torch.randn(32, 16, device=device, dtype=dtype),
        bias=torch.randn(32, device=device, dtype=dtype),
    )


@pytest.mark.parametrize(
    "change,error,match",
    [
        pytest.param(lambda a: a.update({k: t.double() for k, t in a.items()}), TypeError, "reference", id="fp64"),
        pytest.param(lambda a: a.update(bias=a["bias"].half()), TypeError, "bias has dtype", id="dtype-mismatch"),
        pytest.param(lambda a: a.update(x=a["x"].tolist()), TypeError, "x must be a torch.Tensor", id="not-tensor"),
        pytest.param(lambda a: a.update(weight=a["weight"][:, :8]), ValueError, "does not take", id="weight-K"),
        pytest.param(lambda a: a.update(weight=a["weight"][0]), ValueError, r"weight \(N, K\)", id="weight-1d"),
        pytest.param(lambda a: a.update(bias=a["bias"][:5]), ValueError, "bias must have shape", id="bias-shape"),
        pytest.param(lambda a: a.update(x=a["x"].to(torch.int32)), TypeError, "supported", id="int"),
    ],
)
def test_errors(change, error, match, device):
    args = _good(device)
    change(args)
    with pytest.raises(error, match=match):
        linear_gelu(**args)


def test_error_cpu_without_interpreter(monkeypatch):
    """CPU tensors with the interpreter off: a clear error before any launch."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        linear_gelu(**_good("cpu"))


# ----------------------------------------------------------------------------- the model's widths


@pytest.mark.parametrize(
    "lead,K", [((2, 3136), 96), ((2, 784), 192), ((4, 196), 384), ((3, 49), 768), ((2, 49), 1024), ((5, 37), 64)]
)
@pytest.mark.parametrize("dtype", model_width_dtypes(BF16, FP16, FP32))
def test_parity_model_widths(lead, K, dtype, device):
    """At the model's widths (N = 4K): bf16 in the interpreter too (bf16 emulated), fp16 and fp32 compiled."""
    _check_parity(lead, K, 4 * K, dtype, device)


# ----------------------------------------------------------------------------- compiled only


@pytest.mark.cuda
def test_tf32_compiled(device):
    """allow_tf32: the kernel's TF32 dot is within twice cuBLAS's TF32 error."""
    with _allow_tf32(True):
        _check_parity((2, 784), 192, 768, FP32, device)


@pytest.mark.cuda
@pytest.mark.inductor
def test_torch_compile_inductor(device):
    """torch.compile(fullgraph=True) with inductor around the op, forward and backward."""
    tensors = [t.to(device=device, dtype=FP16) for t in _inputs((2, 196), 96, 384)]

    def f(x, w, b):
        return linear_gelu(x * 0.5, w, b) * 2

    def grads(fn, ts=tensors):
        leaves = [t.detach().clone().requires_grad_() for t in ts[:3]]
        out = fn(*leaves)
        out.backward(ts[3])
        return [out] + [t.grad for t in leaves]

    compiled = grads(torch.compile(f, fullgraph=True))
    eager = grads(f)
    # float64 leaves: with fp16 leaves, autograd would round the float64 gradients back to fp16
    ref64 = grads(lambda x, w, b: reference.linear_gelu(x * 0.5, w, b) * 2, [t.double() for t in tensors])
    for name, a, r, e in zip(("out", *GRAD_NAMES), compiled, ref64, eager):
        assert_close(name, a, r, e)


@pytest.mark.cuda
def test_int64_offsets(device):
    """More than 2**31 output elements: 64-bit output offsets. The last rows are checked."""
    M, K, N = 700_000, 768, 3072  # 2.15e9 outputs
    if torch.cuda.get_device_properties(device).total_memory < M * (K + N) * 2 + (2 << 30):
        pytest.skip("not enough GPU memory")
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=FP16, generator=g)
    w = torch.randn(N, K, device=device, dtype=FP16, generator=g) / K**0.5
    b = torch.randn(N, device=device, dtype=FP16, generator=g)
    with torch.no_grad():
        out = linear_gelu(x, w, b)
    tail = slice(M - 64, M)
    assert_close(
        "out[-64:]",
        out[tail],
        reference.linear_gelu(x[tail].double(), w.double(), b.double()),
        reference.linear_gelu(x[tail], w, b),
    )


# ----------------------------------------------------------------------------- the whole MLP


def _mlp_inputs(lead, C, N, seed=0):
    """float64: x [*lead, C], fc1 [N, C] + bias, fc2 [C, N] + bias, dy [*lead, C]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, C, generator=g, dtype=torch.float64)
    w1 = torch.randn(N, C, generator=g, dtype=torch.float64) / C**0.5 * 1.5
    b1 = torch.randn(N, generator=g, dtype=torch.float64) / 2
    w2 = torch.randn(C, N, generator=g, dtype=torch.float64) / N**0.5
    b2 = torch.randn(C, generator=g, dtype=torch.float64) / 2
    dy = torch.randn(*lead, C, generator=g, dtype=torch.float64)
    return x, w1, b1, w2, b2, dy


def _run_mlp(fn, tensors, dtype, device, with_bias=True, trains=(True,) * 5):
    """out and the gradients of x, w1, b1, w2, b2 (None for those not in ``trains``)."""
    x, w1, b1, w2, b2, dy = (t.to(dtype).double().to(device=device, dtype=dtype, copy=True) for t in tensors)
    leaves = [t.requires_grad_(train) for t, train in zip((x, w1, b1, w2, b2), trains)]
    out = fn(x, w1, b1 if with_bias else None, w2, b2 if with_bias else None)
    out.backward(dy)
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("lead,C,N", [((37,), 24, 40), ((2, 9), 32, 128)])
@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_mlp_parity(lead, C, N, dtype, with_bias, device, nan_buffers):
    """fc2(gelu(fc1(x))) and all five gradients; the backward's d_pre comes from the GELU_GRAD
    GEMM (dy @ fc2.weight times gelu'(pre), d_act never stored): small tiles, several K steps."""
    tensors = _mlp_inputs(lead, C, N)
    tiles = dict(block_m=16, block_n=16, block_k=16, group_m=2)
    with plans.forced(linear_gelu_fwd=tiles, linear_gelu_bwd=tiles):
        out, grads = _run_mlp(kernels.mlp, tensors, dtype, device, with_bias)
    ref_out, ref_grads = _run_mlp(reference.mlp, tensors, torch.float64, "cpu", with_bias)
    eager_out, eager_grads = _run_mlp(reference.mlp, tensors, dtype, device, with_bias)
    assert_close("out", out, ref_out, eager_out)
    for name, a, r, e in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, ref_grads, eager_grads):
        if r is None:
            assert a is None, name
            continue
        assert_close(name, a, r, e)
    M = int(torch.tensor(lead).prod())
    # [M, N]: act and pre in the forward; d_pre and gelu(pre) (fc2's weight gradient reads it) in the backward
    assert nan_buffers.count(((M, N), dtype)) == 4
    # db1: the GEMM's column sums of each 16-row block (the last one partly past M), not a pass over d_pre
    assert (((plans.cdiv(M, 16), N), FP32) in nan_buffers) == with_bias


@pytest.mark.parametrize(
    "trains",
    [(False, False, False, True, True), (True, False, False, True, False), (False, True, True, False, False)],
    ids=["fc2-only", "x-and-fc2-weight", "fc1-only"],
)
def test_mlp_partial_gradients(trains, device, monkeypatch):
    """Only the gradients asked for, each as the reference's: fc2 alone (frozen fc1, frozen
    input) takes its weight gradient from F.gelu(pre), without the backward's GEMM."""
    tensors = _mlp_inputs((37,), 24, 40)
    seen, launch = [], plans.launch

    def recorded_launch(fn, plan, *args):
        seen.append(plan.kernel)
        launch(fn, plan, *args)

    monkeypatch.setattr(plans, "launch", recorded_launch)
    out, grads = _run_mlp(kernels.mlp, tensors, FP32, device, trains=trains)
    ref_out, ref_grads = _run_mlp(reference.mlp, tensors, torch.float64, "cpu", trains=trains)
    eager_out, eager_grads = _run_mlp(reference.mlp, tensors, FP32, device, trains=trains)
    for name, a, r, e in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, ref_grads, eager_grads):
        assert (a is None) == (r is None), name
        if r is not None:
            assert_close(name, a, r, e)
    assert seen == ["linear_gelu_fwd"] + ["linear_gelu_bwd"] * any(trains[:3])


def test_mlp_keeps_one_hidden_tensor(device):
    """From the forward to the backward the MLP keeps x, its weights and pre: one [M, N]
    tensor (the reference's F.gelu and fc2 keep two: pre and the activation)."""
    tensors = _mlp_inputs((37,), 24, 40)

    def saved_shapes(fn):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _run_mlp(fn, tensors, FP32, device)
        return shapes

    assert saved_shapes(kernels.mlp).count((37, 40)) == 1
    assert saved_shapes(reference.mlp).count((37, 40)) == 2


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
def test_gelu_stored_again_is_eager_gelu(dtype, device, nan_buffers):
    """The backward GEMM's STORE_GELU output is gelu(pre) of the stored pre, as F.gelu computes
    it, beside d_pre and db1 unchanged."""
    g = torch.Generator().manual_seed(5)
    M, C, N = 37, 24, 40
    dy, w2, pre = (torch.randn(*shape, generator=g).to(device, dtype) for shape in ((M, C), (C, N), (M, N)))
    pre = pre * 3  # GELU's curved region and both tails
    with plans.forced(linear_gelu_bwd=dict(block_m=16, block_n=16, block_k=16, group_m=2)):
        d_pre, db1, act = kernels._gelu_grad(dy, w2, pre, True, True)
        d_pre2, db12, empty = kernels._gelu_grad(dy, w2, pre, True, False)
    gelu = torch.nn.functional.gelu
    assert_close("gelu(pre)", act, gelu(pre.cpu().double()), gelu(pre))
    assert torch.equal(d_pre, d_pre2) and torch.equal(db1, db12) and empty.numel() == 0
    assert nan_buffers.count(((M, N), dtype)) == 3  # d_pre twice, act once


def test_mlp_inference_writes_only_act(device, nan_buffers):
    x, w1, b1, w2, b2, _ = (t.float().to(device) for t in _mlp_inputs((5,), 16, 32))
    with torch.no_grad():
        out = kernels.mlp(x, w1, b1, w2, b2)
    assert out.shape == (5, 16)
    assert nan_buffers == [((5, 32), FP32)]


def test_mlp_gelu_grad_opcheck(device):
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(6, 16, generator=g).to(device)
    w2 = torch.randn(16, 32, generator=g).to(device)
    pre = torch.randn(6, 32, generator=g).to(device)
    for sum_rows, store_gelu in itertools.product((False, True), repeat=2):
        torch.library.opcheck(
            torch.ops.restv2.mlp_gelu_grad,
            (dy, w2, pre, sum_rows, store_gelu),
            test_utils=("test_schema", "test_faketensor"),
        )


def test_mlp_errors(device):
    x, w1, b1, w2, b2, _ = (t.float().to(device) for t in _mlp_inputs((5,), 16, 32))
    with pytest.raises(ValueError, match="mlp: fc2_weight must be"):
        kernels.mlp(x, w1, b1, w2[:, :31], b2)
    with pytest.raises(TypeError, match="fp64"):
        kernels.mlp(x.double(), w1.double(), b1.double(), w2.double(), b2.double())
    with pytest.raises(TypeError, match="mlp: fc2_weight"):
        kernels.mlp(x, w1, b1, w2.half(), b2)
