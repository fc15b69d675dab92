"""Parity, gradients, strided views, errors and determinism of ResTv1's fused attention with the
heads' interaction (1x1 conv across heads, softmax, InstanceNorm).

Every comparison goes through ``helpers.assert_close``: the kernel against a float64 reference
on the same (dtype-rounded) inputs, judged by the error of eager PyTorch in the kernel's dtype.
Without a GPU these run in Triton's interpreter (see conftest.py).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import assert_close, copies_made_by, nan_buffers_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from restv2_kernels import plans, reference
from restv2_kernels.attention_mixed import triton as kernels
from restv2_kernels.attention_mixed.triton import emsa_attention_mixed

NAMES = ("out", "dq", "dk", "dv", "dweight", "dbias")


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an unwritten element fails."""
    return nan_buffers_for(monkeypatch, kernels)


def _small_blocks():
    """16 x 16 blocks and one query block per split: many key blocks (the two-pass softmax and
    the separate delta pass) and many splits on small shapes."""
    blocks = dict(block_n=16, block_m=16)
    return plans.forced(mixed_fwd=blocks, mixed_bwd=dict(blocks, min_blocks_per_split=1))


def _run(fn, inputs, grad):
    """fn(*inputs) and the gradients of <fn(*inputs), grad> w.r.t. the inputs (None stays None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return [out] + [t.grad for t in leaves if t is not None]


def _check_parity(q, k, v, weight, bias, grad, scale=None, eps=1e-5):
    """Kernel vs float64 reference vs eager in the same dtype: output and every gradient."""
    inputs = (q, k, v, weight, bias)

    def fn(op):
        return lambda *t: op(*t, scale=scale, eps=eps)

    kernel = _run(fn(emsa_attention_mixed), inputs, grad)
    ref64 = _run(fn(reference.emsa_attention_mixed), [None if t is None else t.double() for t in inputs], grad.double())
    eager = _run(fn(reference.emsa_attention_mixed), inputs, grad)
    assert kernel[0].is_contiguous()
    for name, a, r, e in zip(NAMES, kernel, ref64, eager):
        assert_close(name, a, r, e)
    return kernel


def _inputs(B, N, M, h, d, dtype, device, seed=0, param_dtype=None):
    """q, k, v, weight [h, h, 1, 1], bias [h], upstream gradient. The weight is the 1x1 conv's
    init scale (kaiming, fan-out); the bias is non-zero."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, h, d, generator=g) for L in (N, M, M))
    weight = torch.randn(h, h, 1, 1, generator=g) * (2.0 / h) ** 0.5
    bias = torch.randn(h, generator=g)
    grad = torch.randn(B, N, h, d, generator=g)
    q, k, v, grad = (t.to(device=device, dtype=dtype) for t in (q, k, v, grad))
    weight, bias = (t.to(device=device, dtype=param_dtype or dtype) for t in (weight, bias))
    return q, k, v, weight, bias, grad


FP32, FP16 = torch.float32, torch.float16

# The zoo's stage shapes at 224 (28^2, 14^2, 7^2 maps over 7^2 reduced maps; heads 2, 4, 8;
# head dims 64 (lite/small) and 96 (base/large)), odd N and M, one key, one query, several key
# blocks (M > 64), heads up to 16 (the zoo's: 2, 4, 8), odd head counts and head dims
# (24, 200, 256).
PARITY_SHAPES = [
    pytest.param(1, 784, 49, 2, 64, id="N784-M49-h2-d64"),
    pytest.param(1, 196, 49, 4, 96, id="N196-M49-h4-d96"),
    pytest.param(2, 49, 49, 8, 64, id="N49-M49-h8-d64"),
    pytest.param(2, 97, 13, 3, 16, id="N97-M13-h3-d16"),
    pytest.param(1, 45, 30, 5, 24, id="N45-M30-h5-d24"),
    pytest.param(1, 21, 11, 12, 64, id="N21-M11-h12-d64"),
    pytest.param(1, 9, 5, 16, 16, id="N9-M5-h16-d16"),
    pytest.param(1, 1, 2, 2, 16, id="N1-M2-h2-d16"),
    pytest.param(2, 1, 7, 3, 32, id="N1-M7-h3-d32"),
    pytest.param(1, 70, 130, 2, 32, id="N70-M130-h2-d32"),
    pytest.param(1, 150, 90, 4, 48, id="N150-M90-h4-d48"),
    pytest.param(1, 33, 20, 2, 200, id="N33-M20-h2-d200"),
    pytest.param(1, 17, 9, 4, 256, id="N17-M9-h4-d256"),
    pytest.param(1, 25, 6, 1, 32, id="N25-M6-h1-d32"),
]


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, N, M, h, d", PARITY_SHAPES)
def test_parity(B, N, M, h, d, dtype, device):
    _check_parity(*_inputs(B, N, M, h, d, dtype, device))


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
def test_parity_small_blocks(dtype, device):
    """Forced 16 x 16 blocks: two-pass softmax over many key blocks, the delta pass, many splits."""
    with _small_blocks():
        _check_parity(*_inputs(2, 75, 37, 3, 32, dtype, device, seed=1))


def test_fp16_activations_fp32_parameters(device):
    """As autocast runs the model: fp16 q, k, v from the Linears, the conv's fp32 parameters.
    The gradients come back in each input's dtype; the reference casts the conv to fp16."""
    q, k, v, weight, bias, grad = _inputs(2, 60, 20, 4, 32, FP16, device, seed=2, param_dtype=FP32)
    kernel = _check_parity(q, k, v, weight, bias, grad)
    assert kernel[4].dtype == FP32 and kernel[5].dtype == FP32 and kernel[1].dtype == FP16


@pytest.mark.parametrize("weight_2d", [False, True], ids=["conv-weight", "matrix"])
def test_no_bias_and_matrix_weight(weight_2d, device):
    q, k, v, weight, _, grad = _inputs(1, 40, 12, 3, 32, FP32, device, seed=3)
    if weight_2d:
        weight = weight.reshape(3, 3)
    kernel = _check_parity(q, k, v, weight, None, grad)
    assert kernel[4].shape == weight.shape


def test_custom_scale_and_eps(device):
    _check_parity(*_inputs(1, 50, 20, 2, 32, FP32, device, seed=4), scale=0.3, eps=1e-3)


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M", [23, 100], ids=["one-key-block", "several-key-blocks"])
def test_near_uniform_attention(M, dtype, device):
    """Tiny scores: every softmax row is nearly uniform, so p ~ 1/M everywhere, the variance is
    far below eps and 1/sqrt(var + eps) ~ 316 amplifies every rounding of p - mean. Centring
    on 1/M keeps the kernel as exact as eager (see the module docstring)."""
    q, k, v, weight, bias, grad = _inputs(2, 40, M, 2, 32, FP32, device, seed=5)
    _check_parity(
        (0.01 * q).to(dtype), (0.01 * k).to(dtype), v.to(dtype), weight.to(dtype), bias.to(dtype), grad.to(dtype)
    )


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M", [23, 100], ids=["one-key-block", "several-key-blocks"])
def test_large_scores(M, dtype, device):
    """Large mixed scores (|t| ~ 60) over padded key blocks: exp over- / underflows unless the
    row max is subtracted, and a padded key must get no weight."""
    q, k, v, weight, bias, grad = _inputs(1, 40, M, 2, 32, FP32, device, seed=6)
    _check_parity(
        (2.0 + 0.1 * q).to(dtype),
        (1.0 + 0.1 * k).to(dtype),
        v.to(dtype),
        weight.to(dtype),
        bias.to(dtype),
        grad.to(dtype),
        scale=1.0,
    )


def test_one_key_gives_zeros(device):
    """M = 1: softmax rows are exactly 1, the normalised map exactly 0: the output and every
    gradient are exactly zero, as the reference's (no InstanceNorm rounding)."""
    q, k, v, weight, bias, grad = _inputs(2, 9, 1, 2, 16, FP32, device, seed=7)
    for t in _check_parity(q, k, v, weight, bias, grad):
        assert not t.any()


def test_bias_is_never_added(device):
    """The conv's bias shifts whole softmax rows, so the kernels leave it out: any bias gives the
    same bits (eager adds it, and its rounding at the bias's size shows up after the InstanceNorm)."""
    q, k, v, weight, bias, _ = _inputs(1, 30, 9, 2, 32, FP32, device, seed=15)
    out = emsa_attention_mixed(q, k, v, weight, bias)
    assert torch.equal(out, emsa_attention_mixed(q, k, v, weight, 100 * bias))
    assert torch.equal(out, emsa_attention_mixed(q, k, v, weight, None))


@pytest.mark.parametrize(
    "B, N, M, h, d, dtype",
    [
        pytest.param(2, 56, 9, 2, 48, FP32, id="N56-M9-h2-d48-fp32"),
        pytest.param(1, 196, 49, 4, 64, FP16, id="N196-M49-h4-d64-fp16"),
        pytest.param(1, 60, 100, 2, 32, FP32, id="N60-M100-h2-d32-fp32"),
    ],
)
def test_linear_views(B, N, M, h, d, dtype, device, monkeypatch):
    """q, k, v as ResTv1 makes them: views of the q and kv Linear outputs, read in place, with
    the conv's parameters. The gradients land in the Linears and the conv as with the reference."""
    copies = copies_made_by(monkeypatch, kernels)
    C = h * d
    g = torch.Generator().manual_seed(8)
    x = torch.randn(B, N, C, generator=g)
    xr = torch.randn(B, M, C, generator=g)
    grad = torch.randn(B, N, h, d, generator=g)
    q_lin, kv_lin, conv = torch.nn.Linear(C, C), torch.nn.Linear(C, 2 * C), torch.nn.Conv2d(h, h, 1)

    def run(attn, dt):
        ql, kvl, cv = (
            type(m)(*args).to(device, dt) for m, args in ((q_lin, (C, C)), (kv_lin, (C, 2 * C)), (conv, (h, h, 1)))
        )
        for new, old in ((ql, q_lin), (kvl, kv_lin), (cv, conv)):
            new.load_state_dict(old.state_dict())
        xs = x.to(device, dt).detach().requires_grad_()
        xrs = xr.to(device, dt).detach().requires_grad_()
        q = ql(xs).view(B, N, h, d)
        kv = kvl(xrs).view(B, M, 2, h, d)
        k, v = kv[:, :, 0], kv[:, :, 1]
        assert not (k.is_contiguous() or v.is_contiguous())
        out = attn(q, k, v, cv.weight, cv.bias)
        out.backward(grad.to(device, dt))
        return [out, ql.weight.grad, kvl.weight.grad, kvl.bias.grad, cv.weight.grad, cv.bias.grad, xs.grad, xrs.grad]

    kernel = run(emsa_attention_mixed, dtype)
    assert copies and not any(copies), "a strided view with unit stride on d was copied"
    ref64 = run(reference.emsa_attention_mixed, torch.float64)
    eager = run(reference.emsa_attention_mixed, dtype)
    names = [
        "out",
        "q.weight.grad",
        "kv.weight.grad",
        "kv.bias.grad",
        "conv.weight.grad",
        "conv.bias.grad",
        "x.grad",
        "x_reduced.grad",
    ]
    for name, a, r, e in zip(names, kernel, ref64, eager):
        assert_close(name, a, r, e)


def test_non_unit_last_stride(device):
    """A last dim with stride != 1 is the one case the launcher copies; results still match."""
    q, k, v, weight, bias, grad = _inputs(1, 40, 12, 2, 32, FP32, device, seed=9)
    q_strided = torch.stack([q, q], dim=-1).flatten(-2)[..., ::2]
    assert q_strided.stride(-1) == 2
    _check_parity(q_strided, k, v, weight, bias, grad)


def test_expanded_grad(device):
    """out.sum().backward() hands the kernel a stride-0 upstream gradient."""
    q, k, v, weight, bias, _ = _inputs(2, 30, 9, 2, 32, FP32, device, seed=10)

    def summed(fn):
        return lambda *t: fn(*t).sum()

    inputs = (q, k, v, weight, bias)
    kernel = _run(summed(emsa_attention_mixed), inputs, None)
    ref64 = _run(summed(reference.emsa_attention_mixed), [t.double() for t in inputs], None)
    eager = _run(summed(reference.emsa_attention_mixed), inputs, None)
    for name, a, r, e in zip(("sum",) + NAMES[1:], kernel, ref64, eager):
        assert_close(name, a, r, e)


def test_nan_fill_is_exercised(nan_buffers, device):
    """The NaN-filled buffers are the ones the kernels write: out, row statistics (the forward's
    and the backward's), partials, dq, dk/dv partials."""
    with _small_blocks():
        _check_parity(*_inputs(1, 40, 20, 2, 16, FP32, device))
    shapes = [shape for shape, _ in nan_buffers]
    assert (1, 40, 2, 16) in shapes  # out, dq
    assert shapes.count((2, 1, 2, 40)) == 2  # rows (max, sum) and the backward's (p . dA, p . a)
    assert (1, 2, 16) in shapes  # vsum
    assert any(len(s) == 5 and s[1:] == (1, 20, 2, 16) for s in shapes)  # dk/dv partials


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 2),
    N=st.integers(1, 70),
    M=st.integers(1, 40),
    h=st.integers(2, 5),  # the interpreter's cost grows as h^3 (head counts to 16: PARITY_SHAPES)
    d=st.sampled_from([16, 24, 32, 48, 64]),
    fp16=st.booleans(),
    small_blocks=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(B, N, M, h, d, fp16, small_blocks, seed, device):
    with _small_blocks() if small_blocks else contextlib.nullcontext():
        _check_parity(*_inputs(B, N, M, h, d, FP16 if fp16 else FP32, device, seed=seed))


@pytest.mark.parametrize("N, M", [pytest.param(300, 40, id="one-key-block"), pytest.param(300, 100, id="several")])
def test_backward_deterministic(N, M, device):
    """Bitwise-identical gradients run to run and under torch.use_deterministic_algorithms."""
    q, k, v, weight, bias, grad = _inputs(1, N, M, 2, 32, FP32, device, seed=11)
    inputs = (q, k, v, weight, bias)
    first = _run(emsa_attention_mixed, inputs, grad)
    second = _run(emsa_attention_mixed, inputs, grad)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        third = _run(emsa_attention_mixed, inputs, grad)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b, c in zip(first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c)


def _bad(
    shape_q=(1, 8, 2, 16),
    shape_k=(1, 4, 2, 16),
    weight_shape=(2, 2, 1, 1),
    bias_shape=(2,),
    dtype=FP32,
    weight_dtype=None,
    weight_device="cpu",
):
    """CPU arguments (fine but for what the arguments change)."""
    q = torch.ones(shape_q, dtype=dtype)
    k = torch.ones(shape_k, dtype=dtype)
    weight = torch.ones(weight_shape, dtype=weight_dtype or dtype, device=weight_device)
    return q, k, k.clone(), weight, torch.ones(bias_shape, dtype=dtype)


BAD_INPUTS = [
    pytest.param(dict(shape_q=(8, 2, 16)), ValueError, "emsa_attention_mixed: q must be 4-D", id="rank"),
    pytest.param(dict(shape_q=(2, 8, 2, 16)), ValueError, "batch sizes differ", id="batch"),
    pytest.param(dict(shape_q=(1, 8, 2, 20), shape_k=(1, 4, 2, 20)), ValueError, "multiple of 8", id="d20"),
    pytest.param(dict(weight_shape=(3, 3, 1, 1)), ValueError, r"weight must be .* heads = 2", id="weight-heads"),
    pytest.param(dict(weight_shape=(2, 2, 3, 3)), ValueError, "weight must be", id="weight-kernel"),
    pytest.param(dict(bias_shape=(3,)), ValueError, "bias must have shape", id="bias-shape"),
    pytest.param(dict(weight_dtype=torch.int64), TypeError, "weight has dtype", id="weight-int"),
    pytest.param(dict(weight_dtype=torch.float64), TypeError, "fp16/bf16/fp32 weight", id="weight-fp64"),
    pytest.param(dict(weight_device="meta"), ValueError, "weight is on meta", id="weight-device"),
    pytest.param(dict(dtype=torch.float64), TypeError, "fp16/bf16/fp32", id="fp64"),
]


@pytest.mark.parametrize("bad, error, match", BAD_INPUTS)
def test_bad_inputs(bad, error, match, interpreter_on_and_off):
    with pytest.raises(error, match=match):
        emsa_attention_mixed(*_bad(**bad))


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), "1e-5"])
def test_bad_eps(eps, interpreter_on_and_off):
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        emsa_attention_mixed(*_bad(), eps=eps)
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        reference.emsa_attention_mixed(*_bad(), eps=eps)


def test_not_a_tensor(interpreter_on_and_off):
    q, k, v, weight, bias = _bad()
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        emsa_attention_mixed(q, k, v, weight.tolist(), bias)


def test_bad_scale(interpreter_on_and_off):
    with pytest.raises(ValueError, match="scale must be finite"):
        emsa_attention_mixed(*_bad(), scale=float("inf"))


def test_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        emsa_attention_mixed(*_bad())


def test_empty_batch(device):
    q, k, v, weight, bias, grad = _inputs(0, 10, 4, 2, 16, FP32, device)
    out, dq, dk, dv, dw, db = _run(emsa_attention_mixed, (q, k, v, weight, bias), grad)
    assert out.shape == q.shape and dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert not dw.any() and not db.any()


def test_custom_ops_opcheck(device):
    """The registered ops' schemas and fake implementations agree with the real ones."""
    q, k, v, weight, _, grad = _inputs(1, 20, 6, 2, 16, FP32, device, seed=12)
    args = (q, k, v, weight, 0.25, 1e-5)
    out, rows, norm = torch.ops.restv2.emsa_attention_mixed_fwd(*args)
    torch.library.opcheck(torch.ops.restv2.emsa_attention_mixed_fwd.default, args)
    torch.library.opcheck(torch.ops.restv2.emsa_attention_mixed_bwd.default, (grad, q, k, v, weight, rows, norm, 0.25))


def test_compile_traces_fullgraph(device):
    """Dynamo traces the autograd.Function and both custom ops without a graph break."""
    q, k, v, weight, bias, grad = _inputs(1, 30, 7, 2, 16, FP32, device, seed=13)

    def fn(q, k, v, weight, bias):
        return emsa_attention_mixed(q * 2, k, v, weight, bias).sin()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    inputs = (q, k, v, weight, bias)
    for a, b in zip(_run(compiled, inputs, grad), _run(fn, inputs, grad)):
        assert torch.equal(a, b)


# --- bf16: in the interpreter (restv2_kernels/interpreter_bf16.py) and compiled on a GPU ---


@pytest.mark.bf16
@pytest.mark.parametrize(
    "B, N, M, h, d",
    [
        pytest.param(2, 784, 49, 2, 64, id="N784-M49-h2-d64"),
        # compiled only: 15 s and 36 s in the interpreter, where the shapes above and the fp16
        # and fp32 tests cover the same code
        pytest.param(2, 49, 49, 8, 96, id="N49-M49-h8-d96", marks=pytest.mark.cuda),
        pytest.param(1, 97, 13, 3, 64, id="N97-M13-h3-d64"),
        pytest.param(1, 1000, 300, 4, 64, id="N1000-M300-h4-d64", marks=pytest.mark.cuda),
    ],
)
def test_parity_bf16(B, N, M, h, d, device):
    _check_parity(*_inputs(B, N, M, h, d, torch.bfloat16, device, param_dtype=torch.float32))


# --- compiled only ---------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.inductor
def test_torch_compile_inductor():
    """torch.compile(fullgraph=True) with Inductor: forward and backward as good as eager."""
    q, k, v, weight, bias, grad = _inputs(2, 196, 49, 4, 64, FP16, "cuda", seed=14, param_dtype=FP32)

    def fn(q, k, v, weight, bias, attention=emsa_attention_mixed):
        return attention(q * 2, k, v, weight, bias).sin()

    inputs = (q, k, v, weight, bias)
    compiled = _run(torch.compile(fn, fullgraph=True), inputs, grad)
    eager = _run(fn, inputs, grad)
    ref64 = _run(
        lambda *t: fn(*t, attention=reference.emsa_attention_mixed), [t.double() for t in inputs], grad.double()
    )
    for name, a, r, e in zip(NAMES, compiled, ref64, eager):
        assert_close(name, a, r, e, dtype=FP16)
