"""Parity, gradients, strided views, errors and determinism of the fused EMSA attention.

Every comparison goes through ``helpers.assert_close``: the kernel against a float64
reference on the same (dtype-rounded) inputs, judged by the error of eager PyTorch in the
kernel's dtype. Without a GPU these run in Triton's interpreter (see conftest.py).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from helpers import RecordShapes, assert_close, copies_made_by, nan_buffers_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from restv2_kernels import plans, reference
from restv2_kernels.attention import triton as kernels
from restv2_kernels.attention.triton import emsa_attention, emsa_attention_kv


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an unwritten element fails."""
    return nan_buffers_for(monkeypatch, kernels)


def _small_blocks():
    """16 x 16 blocks and one query block per split: many key blocks and splits on small shapes."""
    blocks = dict(block_n=16, block_m=16, num_warps=4, num_stages=1)
    return plans.forced(attn_fwd=blocks, attn_bwd=dict(blocks, min_blocks_per_split=1))


def _run(fn, inputs, grad):
    """fn(*inputs) and the gradients of <fn(*inputs), grad> w.r.t. the inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return [out] + [t.grad for t in leaves]


def _check_parity(q, k, v, grad, scale=None, names=("out", "dq", "dk", "dv")):
    """Kernel vs float64 reference vs eager in the same dtype, output and all gradients."""
    kernel = _run(lambda *t: emsa_attention(*t, scale=scale), (q, k, v), grad)
    ref64 = _run(lambda *t: reference.emsa_attention(*t, scale=scale), [t.double() for t in (q, k, v)], grad.double())
    eager = _run(lambda *t: reference.emsa_attention(*t, scale=scale), (q, k, v), grad)
    assert kernel[0].is_contiguous()
    for name, a, r, e in zip(names, kernel, ref64, eager):
        assert a.dtype == q.dtype
        assert_close(name, a, r, e)


def _inputs(B, N, M, h, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, h, d, generator=g) for L in (N, M, M))
    grad = torch.randn(B, N, h, d, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, grad)]


FP32, FP16 = torch.float32, torch.float16

# Every listed (N, M), d in {16, 64, 96, 128} and h in {1, 2, 3}, the model's stage shapes
# (56^2, 28^2, 14^2, 7^2 maps over a 7^2 reduced map), several key blocks (M > 64),
# non-powers of two (24, 48, 200) and d = 256; each in fp32 and fp16.
PARITY_SHAPES = [
    pytest.param(1, 3136, 49, 1, 96, id="N3136-M49-d96-h1"),
    pytest.param(1, 3136, 49, 2, 64, id="N3136-M49-d64-h2"),
    pytest.param(1, 784, 49, 2, 96, id="N784-M49-d96-h2"),
    pytest.param(1, 196, 49, 3, 96, id="N196-M49-d96-h3"),
    pytest.param(2, 49, 49, 3, 128, id="N49-M49-d128-h3"),
    pytest.param(2, 97, 13, 3, 16, id="N97-M13-d16-h3"),
    pytest.param(1, 97, 13, 1, 96, id="N97-M13-d96-h1"),
    pytest.param(1, 1, 1, 1, 16, id="N1-M1-d16-h1"),
    pytest.param(3, 1, 1, 2, 128, id="N1-M1-d128-h2"),
    pytest.param(1, 200, 1, 3, 64, id="N200-M1-d64-h3"),
    pytest.param(2, 70, 130, 2, 64, id="N70-M130-d64-h2"),
    pytest.param(1, 300, 200, 1, 48, id="N300-M200-d48-h1"),
    pytest.param(1, 45, 30, 3, 24, id="N45-M30-d24-h3"),
    pytest.param(1, 65, 70, 1, 256, id="N65-M70-d256-h1"),
    pytest.param(1, 33, 20, 2, 200, id="N33-M20-d200-h2"),
]


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, N, M, h, d", PARITY_SHAPES)
def test_parity(B, N, M, h, d, dtype, device):
    q, k, v, grad = _inputs(B, N, M, h, d, dtype, device)
    _check_parity(q, k, v, grad)


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
def test_parity_small_blocks(dtype, device):
    """Forced 16 x 16 blocks: online softmax over many key blocks, dq pass, many splits."""
    q, k, v, grad = _inputs(2, 75, 37, 2, 32, dtype, device, seed=1)
    with _small_blocks():
        _check_parity(q, k, v, grad)


def test_custom_scale(device):
    q, k, v, grad = _inputs(1, 50, 20, 2, 32, FP32, device, seed=2)
    _check_parity(q, k, v, grad, scale=0.3)


@pytest.mark.parametrize(
    "M, q_mean, scale",
    [
        pytest.param(23, 2.0, 2.3, id="fused-scores147"),
        pytest.param(23, -2.0, 2.3, id="fused-scores-147"),
        pytest.param(100, 1.0, 1.0, id="dq-pass-scores32"),
        pytest.param(100, -1.0, 1.0, id="dq-pass-scores-32"),
    ],
)
@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
def test_large_scores(M, q_mean, scale, dtype, device):
    """Large scores (q . k * scale ~ 32 * q_mean * scale) over a padded key block, with keys
    sharing a large common part (so dq cancels heavily): finite and as exact as eager.

    At +-147, exp over- / underflows fp32 unless the max is subtracted, and a padded key
    scored 0 gets exp(0 - lse) = inf unless masked. The separate-dq path (M > 64) rebuilds
    P from the saved lse, whose fp32 rounding costs ~|s| * 1e-7 (see the module docstring),
    so it is held to realistic large scores (+-32); the fused path to +-147.
    """
    q, k, v, grad = _inputs(1, 40, M, 2, 32, FP32, device, seed=11)
    q, k = (q_mean + 0.1 * q).to(dtype), (1.0 + 0.1 * k).to(dtype)
    _check_parity(q, k, v.to(dtype), grad.to(dtype), scale=scale)


def test_very_negative_scores_dq_pass(device):
    """Scores ~ -96 on the separate-dq path: a padded key (score 0) would get
    exp(0 - lse) = inf in the dq loop and turn dq into NaN unless masked."""
    q, k, v, grad = _inputs(1, 40, 100, 2, 32, FP32, device, seed=12)
    _check_parity(-3.0 + 0.1 * q, 1.0 + 0.3 * k, v, grad, scale=1.0)


@pytest.mark.parametrize(
    "B, N, M, h, d, dtype",
    [
        pytest.param(2, 56, 9, 2, 48, FP32, id="N56-M9-d48-h2-fp32"),
        pytest.param(1, 196, 49, 3, 96, FP16, id="N196-M49-d96-h3-fp16"),
        pytest.param(1, 60, 100, 2, 64, FP32, id="N60-M100-d64-h2-fp32"),
    ],
)
def test_linear_views(B, N, M, h, d, dtype, device, monkeypatch):
    """q, k, v as the model makes them: views of the q and kv Linear outputs, read in place.

    The gradients must land in the Linears' weights (k in the first C rows of the kv
    weight, v in the last C) exactly as with the reference.
    """
    copies = copies_made_by(monkeypatch, kernels)
    C = h * d
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, N, C, generator=g)
    xr = torch.randn(B, M, C, generator=g)
    grad = torch.randn(B, N, h, d, generator=g)
    q_lin, kv_lin = torch.nn.Linear(C, C), torch.nn.Linear(C, 2 * C)

    def run(attn, dt):
        ql, kvl = (torch.nn.Linear(m.in_features, m.out_features).to(device, dt) for m in (q_lin, kv_lin))
        ql.load_state_dict(q_lin.state_dict())
        kvl.load_state_dict(kv_lin.state_dict())
        xs = x.to(device, dt).detach().requires_grad_()
        xrs = xr.to(device, dt).detach().requires_grad_()
        q = ql(xs).view(B, N, h, d)
        kv = kvl(xrs).view(B, M, 2, h, d)
        k, v = kv[:, :, 0], kv[:, :, 1]
        assert not (k.is_contiguous() or v.is_contiguous())  # q's view is contiguous, k and v are not
        out = attn(q, k, v)
        out.backward(grad.to(device, dt))
        return [out, ql.weight.grad, ql.bias.grad, kvl.weight.grad, kvl.bias.grad, xs.grad, xrs.grad]

    kernel = run(emsa_attention, dtype)
    assert copies and not any(copies), "a strided view with unit stride on d was copied"
    ref64 = run(reference.emsa_attention, torch.float64)
    eager = run(reference.emsa_attention, dtype)
    names = ["out", "q.weight.grad", "q.bias.grad", "kv.weight.grad", "kv.bias.grad", "x.grad", "x_reduced.grad"]
    for name, a, r, e in zip(names, kernel, ref64, eager):
        assert_close(name, a, r, e)


def test_non_unit_last_stride(device, monkeypatch):
    """A last dim with stride != 1 is the one case the launcher copies; results still match."""
    q, k, v, grad = _inputs(1, 40, 12, 2, 32, FP32, device, seed=4)
    wide = torch.stack([q, q], dim=-1).flatten(-2)  # [B, N, h, 2d]
    q_strided = wide[..., ::2]
    assert q_strided.stride(-1) == 2
    _check_parity(q_strided, k, v, grad)


def test_expanded_grad(device):
    """out.sum().backward() hands the kernel a stride-0 upstream gradient."""
    q, k, v, _ = _inputs(2, 30, 9, 2, 32, FP32, device, seed=10)

    def summed(fn):
        return lambda *t: fn(*t).sum()

    kernel = _run(summed(emsa_attention), (q, k, v), None)
    ref64 = _run(summed(reference.emsa_attention), [t.double() for t in (q, k, v)], None)
    eager = _run(summed(reference.emsa_attention), (q, k, v), None)
    for name, a, r, e in zip(("sum", "dq", "dk", "dv"), kernel, ref64, eager):
        assert_close(name, a, r, e)


def test_nan_fill_is_exercised(nan_buffers, device):
    """The NaN-filled buffers really are the ones the kernels write: out, lse, dq, dk/dv partials."""
    q, k, v, grad = _inputs(1, 20, 5, 2, 16, FP32, device)
    _check_parity(q, k, v, grad)
    shapes = [shape for shape, _ in nan_buffers]
    assert (1, 20, 2, 16) in shapes  # out, dq
    assert (1, 2, 20) in shapes  # lse
    assert any(len(s) == 5 and s[1:] == (1, 5, 2, 16) for s in shapes)  # dk/dv partials


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 2),
    N=st.integers(1, 80),
    M=st.integers(1, 40),
    h=st.integers(1, 3),
    d=st.sampled_from([16, 24, 32, 48, 64, 96]),
    fp16=st.booleans(),
    small_blocks=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(B, N, M, h, d, fp16, small_blocks, seed, device):
    q, k, v, grad = _inputs(B, N, M, h, d, FP16 if fp16 else FP32, device, seed=seed)
    with _small_blocks() if small_blocks else contextlib.nullcontext():
        _check_parity(q, k, v, grad)


@pytest.mark.parametrize("N, M", [pytest.param(300, 40, id="fused-dq"), pytest.param(300, 100, id="separate-dq")])
def test_backward_deterministic(N, M, device):
    """Bitwise-identical gradients run to run and under torch.use_deterministic_algorithms."""
    q, k, v, grad = _inputs(1, N, M, 2, 32, FP32, device, seed=5)
    fn = emsa_attention
    first = _run(fn, (q, k, v), grad)
    second = _run(fn, (q, k, v), grad)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        third = _run(fn, (q, k, v), grad)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b, c in zip(first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c)


def _bad(shape_q=(1, 8, 2, 16), shape_k=(1, 4, 2, 16), shape_v=None, dtype=FP32, q_dtype=None, q_device="cpu"):
    """CPU q, k, v (fine but for what the arguments change)."""
    q = torch.ones(shape_q, dtype=q_dtype or dtype, device=q_device)
    k = torch.ones(shape_k, dtype=dtype)
    v = torch.ones(shape_v or shape_k, dtype=dtype)
    return q, k, v


BAD_INPUTS = [
    pytest.param(dict(shape_q=(8, 2, 16)), ValueError, "q must be 4-D", id="rank"),
    pytest.param(dict(shape_v=(1, 5, 2, 16)), ValueError, "k and v must have the same shape", id="kv-shape"),
    pytest.param(dict(shape_q=(2, 8, 2, 16)), ValueError, "batch sizes differ", id="batch"),
    pytest.param(dict(shape_q=(1, 8, 3, 16)), ValueError, "head counts differ", id="heads"),
    pytest.param(dict(shape_q=(1, 8, 2, 32)), ValueError, "head dims differ", id="head-dim"),
    pytest.param(dict(shape_q=(1, 8, 2, 20), shape_k=(1, 4, 2, 20)), ValueError, "multiple of 8", id="d20"),
    pytest.param(dict(shape_q=(1, 8, 2, 8), shape_k=(1, 4, 2, 8)), ValueError, "multiple of 8 from 16 to 256", id="d8"),
    pytest.param(
        dict(shape_q=(1, 8, 1, 264), shape_k=(1, 4, 1, 264)), ValueError, "multiple of 8 from 16 to 256", id="d264"
    ),
    pytest.param(dict(q_dtype=FP16), TypeError, "share a dtype", id="mixed-dtype"),
    pytest.param(dict(q_device="meta"), ValueError, "one device", id="mixed-device"),
    pytest.param(dict(dtype=torch.float64), TypeError, "fp16/bf16/fp32", id="fp64"),
    pytest.param(dict(dtype=torch.int32), TypeError, "dtype", id="int"),
]


@pytest.mark.parametrize("bad, error, match", BAD_INPUTS)
def test_bad_inputs(bad, error, match, interpreter_on_and_off):
    with pytest.raises(error, match=match):
        emsa_attention(*_bad(**bad))


def test_not_a_tensor(interpreter_on_and_off):
    q, k, v = _bad()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        emsa_attention(q.numpy(), k, v)


def test_bad_scale(interpreter_on_and_off):
    with pytest.raises(ValueError, match="scale must be finite"):
        emsa_attention(*_bad(), scale=float("inf"))


def test_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        emsa_attention(*_bad())


def test_empty_batch(device):
    q, k, v, grad = _inputs(0, 10, 4, 2, 16, FP32, device)
    out, dq, dk, dv = _run(emsa_attention, (q, k, v), grad)
    assert out.shape == q.shape and dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_custom_ops_opcheck(device):
    """The registered ops' schemas and fake implementations agree with the real ones."""
    q, k, v, grad = _inputs(1, 20, 6, 2, 16, FP32, device, seed=6)
    out, lse = torch.ops.restv2.emsa_attention_fwd(q, k, v, 0.25)
    torch.library.opcheck(torch.ops.restv2.emsa_attention_fwd.default, (q, k, v, 0.25))
    torch.library.opcheck(torch.ops.restv2.emsa_attention_bwd.default, (grad, q, k, v, out, lse, 0.25))


def test_compile_traces_fullgraph(device):
    """Dynamo traces the autograd.Function and both custom ops without a graph break."""
    q, k, v, grad = _inputs(1, 30, 7, 2, 16, FP32, device, seed=7)

    def fn(q, k, v):
        return emsa_attention(q * 2, k, v).sin()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for a, b in zip(_run(compiled, (q, k, v), grad), _run(fn, (q, k, v), grad)):
        assert torch.equal(a, b)


# --- packed keys and values: emsa_attention_kv ---------------------------------------------


def _run_kv(fn, q, kv, grads, scale=None):
    """(out, v) = fn(q, kv) and the gradients w.r.t. q and kv of <out, grads[0]> + <v, grads[1]>
    (a None grad: that output reaches no loss; "sum": its plain sum, an expanded gradient)."""
    q, kv = (t.detach().clone().requires_grad_() for t in (q, kv))
    out, v = fn(q, kv, scale)
    assert v.data_ptr() == kv[:, :, 1].data_ptr() and v.stride() == kv[:, :, 1].stride()  # v is a view of kv
    loss = 0
    for t, g in zip((out, v), grads):
        if isinstance(g, str):
            loss = loss + t.sum()
        elif g is not None:
            loss = loss + (t * g).sum()
    loss.backward()
    return [out, v, q.grad, kv.grad]


def _kv_inputs(B, N, M, h, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, grad = (torch.randn(B, N, h, d, generator=g) for _ in range(2))
    kv, grad_v = torch.randn(B, M, 2, h, d, generator=g), torch.randn(B, M, h, d, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, kv, grad, grad_v)]


def _check_kv_parity(q, kv, grads, scale=None):
    """emsa_attention_kv against the float64 reference and eager: out, v, dq and dkv."""
    kernel = _run_kv(emsa_attention_kv, q, kv, grads, scale)
    grads64 = [g.double() if isinstance(g, torch.Tensor) else g for g in grads]
    ref64 = _run_kv(reference.emsa_attention_kv, q.double(), kv.double(), grads64, scale)
    eager = _run_kv(reference.emsa_attention_kv, q, kv, grads, scale)
    for name, a, r, e in zip(("out", "v", "dq", "dkv"), kernel, ref64, eager):
        if r is None:  # q's gradient when only v reached the loss
            assert a is None, name
            continue
        assert a.dtype == q.dtype, name
        assert_close(name, a, r, e)


KV_SHAPES = [
    pytest.param(2, 97, 13, 3, 16, False, id="fused-dq"),
    pytest.param(2, 75, 37, 2, 32, True, id="small-blocks-splits"),
    pytest.param(1, 60, 100, 2, 64, False, id="separate-dq"),
    pytest.param(1, 196, 49, 3, 96, False, id="stage3"),
]


@pytest.mark.parametrize("uses", ["both", "out", "v", "v-summed"])
@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, N, M, h, d, small", KV_SHAPES)
def test_kv_parity(B, N, M, h, d, small, dtype, uses, device):
    """out and both gradients as the reference (unbind, then emsa_attention): v's other gradient
    joins the attention's own (added in split 0 of the backward kernel; with several splits,
    once), with v used or not, and as an expanded (stride 0) gradient."""
    q, kv, grad, grad_v = _kv_inputs(B, N, M, h, d, dtype, device, seed=13)
    grads = {"both": (grad, grad_v), "out": (grad, None), "v": (None, grad_v), "v-summed": (grad, "sum")}[uses]
    with _small_blocks() if small else contextlib.nullcontext():
        if small:  # the forced plan really splits the queries
            assert plans.attention_bwd_plan(B, N, M, h, d, dtype, plans.TARGETS["sm_90"]).splits > 1
        _check_kv_parity(q, kv, grads)


def test_kv_custom_scale_and_strided_kv(device, monkeypatch):
    """A kv whose rows are wider than 2 * H * D (a slice of a wider Linear's output) is read in
    place, and a custom scale reaches every kernel."""
    copies = copies_made_by(monkeypatch, kernels)
    q, kv, grad, grad_v = _kv_inputs(1, 50, 20, 2, 32, FP32, device, seed=14)
    wide = torch.cat([kv, kv[:, :, :1]], dim=2)[:, :, :2]  # [B, M, 2, h, d] with 3 * h * d per row
    assert not wide.is_contiguous() and torch.equal(wide, kv)
    _check_kv_parity(q, wide, (grad, grad_v), scale=0.3)
    assert copies and not any(copies), "a view with unit stride on d was copied"


def test_kv_backward_makes_one_kv_gradient(device):
    """The kernel path's backward neither stacks dk and dv nor adds v's two gradients: kv's
    gradient comes out of the backward op whole (the reference stacks and adds: the test can
    fail). The loss's own backward (expand, mul) is left out."""
    q, kv, grad, grad_v = _kv_inputs(1, 40, 12, 2, 32, FP32, device, seed=15)

    def kv_sized_made(fn):
        qq, kk = (t.detach().clone().requires_grad_() for t in (q, kv))
        out, v = fn(qq, kk)
        loss = (out * grad).sum() + (v * grad_v).sum()
        with RecordShapes() as rec:
            loss.backward()
        per_tensor = kv[:, :, 0].numel()
        return [(op, shape) for op, shape in rec.made if math.prod(shape) in (per_tensor, 2 * per_tensor)]

    loss_ops = {torch.ops.aten.expand, torch.ops.aten.mul, torch.ops.aten.detach}
    made = [(op, shape) for op, shape in kv_sized_made(emsa_attention_kv) if op not in loss_ops]
    assert made == [(torch.ops.restv2.emsa_attention_kv_bwd, tuple(kv.shape))], made
    reference_made = {op for op, _ in kv_sized_made(reference.emsa_attention_kv)}
    assert torch.ops.aten.stack in reference_made and torch.ops.aten.add in reference_made


KV_BAD = [
    pytest.param(lambda q, kv: (q, kv[:, :, 0]), ValueError, "kv must be 5-D", id="4-D"),
    pytest.param(lambda q, kv: (q, torch.cat([kv, kv], 2)), ValueError, r"kv must be 5-D \(B, M, 2", id="not-2"),
    pytest.param(lambda q, kv: (q, kv.numpy()), TypeError, "kv must be a torch.Tensor", id="not-a-tensor"),
    pytest.param(lambda q, kv: (q.half(), kv), TypeError, "share a dtype", id="mixed-dtype"),
    pytest.param(lambda q, kv: (q[:, :, :1], kv), ValueError, "head counts differ", id="heads"),
]


@pytest.mark.parametrize("fn", [emsa_attention_kv, reference.emsa_attention_kv], ids=["kernels", "reference"])
@pytest.mark.parametrize("bad, error, match", KV_BAD)
def test_kv_bad_inputs(fn, bad, error, match, interpreter_on_and_off):
    q, k, _ = _bad()
    kv = torch.stack([k, k], dim=2)
    with pytest.raises(error, match=match):
        fn(*bad(q, kv))


def test_kv_fp64_and_scale_errors(interpreter_on_and_off):
    q, k, _ = _bad()
    kv = torch.stack([k, k], dim=2)
    with pytest.raises(TypeError, match="emsa_attention_kv: the Triton kernels take fp16/bf16/fp32"):
        emsa_attention_kv(q.double(), kv.double())
    with pytest.raises(ValueError, match="emsa_attention_kv: scale must be finite"):
        emsa_attention_kv(q, kv, scale=float("nan"))


def test_kv_empty_batch(device):
    q, kv, grad, grad_v = _kv_inputs(0, 10, 4, 2, 16, FP32, device)
    out, v, dq, dkv = _run_kv(emsa_attention_kv, q, kv, (grad, grad_v))
    assert out.shape == q.shape and dq.shape == q.shape and dkv.shape == kv.shape


def test_kv_custom_op_opcheck(device):
    """The packed backward's schema and fake implementation agree with the real op, with and
    without v's other gradient."""
    q, kv, grad, grad_v = _kv_inputs(1, 20, 6, 2, 16, FP32, device, seed=16)
    out, lse = torch.ops.restv2.emsa_attention_fwd(q, kv[:, :, 0], kv[:, :, 1], 0.25)
    for extra in (grad_v, None):
        torch.library.opcheck(torch.ops.restv2.emsa_attention_kv_bwd.default, (grad, q, kv, out, lse, 0.25, extra))


def test_kv_compile_traces_fullgraph(device):
    """Dynamo traces the two-output autograd.Function (v a view of its input) without a break."""
    q, kv, grad, grad_v = _kv_inputs(1, 30, 7, 2, 16, FP32, device, seed=17)

    def fn(q, kv, scale=None):
        out, v = emsa_attention_kv(q * 2, kv, scale)
        return out.sin(), v  # v: still a view of kv, also compiled

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for a, b in zip(_run_kv(compiled, q, kv, (grad, grad_v)), _run_kv(fn, q, kv, (grad, grad_v))):
        assert torch.equal(a, b)


# --- bf16: in the interpreter (restv2_kernels/interpreter_bf16.py) and compiled on a GPU ---


@pytest.mark.bf16
@pytest.mark.parametrize(
    "B, N, M, h, d",
    [
        pytest.param(2, 3136, 49, 1, 96, id="N3136-M49-d96-h1"),
        pytest.param(2, 784, 49, 2, 96, id="N784-M49-d96-h2"),
        pytest.param(1, 97, 13, 3, 64, id="N97-M13-d64-h3"),
        pytest.param(1, 1000, 300, 1, 96, id="N1000-M300-d96-h1"),
        pytest.param(1, 33, 20, 2, 256, id="N33-M20-d256-h2"),
    ],
)
def test_parity_bf16(B, N, M, h, d, device):
    q, k, v, grad = _inputs(B, N, M, h, d, torch.bfloat16, device)
    _check_parity(q, k, v, grad)


@pytest.mark.bf16
@pytest.mark.parametrize("uses", ["both", "out"])
@pytest.mark.parametrize(
    "B, N, M, h, d",
    [
        pytest.param(2, 3136, 49, 1, 96, id="N3136-M49-d96-h1"),
        pytest.param(2, 196, 49, 4, 96, id="N196-M49-d96-h4"),
        pytest.param(1, 1000, 300, 1, 96, id="N1000-M300-d96-h1"),
    ],
)
def test_kv_parity_bf16(B, N, M, h, d, uses, device):
    q, kv, grad, grad_v = _kv_inputs(B, N, M, h, d, torch.bfloat16, device)
    _check_kv_parity(q, kv, (grad, grad_v if uses == "both" else None))


# --- compiled only ---------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.inductor
def test_torch_compile_inductor():
    """torch.compile(fullgraph=True) with Inductor: forward and backward as good as eager."""
    q, k, v, grad = _inputs(2, 196, 49, 2, 64, FP16, "cuda", seed=8)

    def fn(q, k, v, attention=emsa_attention):
        return attention(q * 2, k, v).sin()

    compiled = _run(torch.compile(fn, fullgraph=True), (q, k, v), grad)
    eager = _run(fn, (q, k, v), grad)
    ref64 = _run(lambda *t: fn(*t, attention=reference.emsa_attention), [t.double() for t in (q, k, v)], grad.double())
    for name, a, r, e in zip(("out", "dq", "dk", "dv"), compiled, ref64, eager):
        assert_close(name, a, r, e)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu():
    """Tensors on cuda:1 run on cuda:1 while cuda:0 is current."""
    q, k, v, grad = _inputs(1, 100, 20, 2, 32, FP32, "cuda:1", seed=9)
    with torch.cuda.device(0):
        _check_parity(q, k, v, grad)
