"""Parity, gradients, strided views, errors and determinism of the fused upsample branch.

Every comparison goes through ``helpers.assert_close``: the kernel against a float64
reference on the same (dtype-rounded) inputs, judged by the error of eager PyTorch in the
kernel's dtype. Without a GPU these run in Triton's interpreter (see conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, model_width_dtypes, nan_buffers_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from restv2_kernels import plans, reference
from restv2_kernels.upsample import triton as kernels
from restv2_kernels.upsample.triton import upsample_add

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
GRAD_NAMES = ("dx", "dv", "dweight", "dbias", "dnorm_weight", "dnorm_bias")


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an unwritten element fails."""
    return nan_buffers_for(monkeypatch, kernels)


def _small_tiles():
    """4-pixel tiles and many splits: program boundaries inside rows and images, several
    blocks per reduction program, on small shapes."""
    tile = dict(block_p=4, num_warps=1)
    return plans.forced(upsample_fwd=tile, upsample_bwd=dict(tile, programs=12), upsample_bwd_dv=tile)


def _inputs(B, Hr, Wr, H, W, C, sr, seed=0):
    """float64 CPU tensors: x, kv (V is its second half), weight, bias, norm params, dout.
    Bias and norm parameters are random, not the identity init, so every term is tested."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, W, C, generator=g)
    kv = torch.randn(B, Hr, Wr, 2 * C, generator=g)
    weight = torch.randn(sr * sr * C, 1, 3, 3, generator=g) / 3
    bias = torch.randn(sr * sr * C, generator=g) / 2
    norm_weight = 1 + torch.randn(C, generator=g) / 2
    norm_bias = torch.randn(C, generator=g) / 2
    dout = torch.randn(B, H, W, C, generator=g)
    return [t.double() for t in (x, kv, weight, bias, norm_weight, norm_bias, dout)]


def _run(fn, tensors, sr, dtype, device, kv_view):
    """fn's output and the gradients of <out, dout> w.r.t. x, v (via kv when kv_view), the
    weight, bias and norm parameters; also kv.grad itself (None without kv_view)."""
    x, kv, weight, bias, nw, nb, dout = (t.to(device=device, dtype=dtype, copy=True) for t in tensors)
    B, Hr, Wr, C2 = kv.shape
    C = C2 // 2
    if kv_view:
        kv = kv.requires_grad_()
        v = kv.view(B, Hr, Wr, 2, C)[..., 1, :]  # strided, read in place
        leaves = [x, weight, bias, nw, nb]
    else:
        v = kv.view(B, Hr, Wr, 2, C)[..., 1, :].contiguous()
        leaves = [x, v, weight, bias, nw, nb]
    for t in leaves:
        t.requires_grad_()
    out = fn(x, v, weight, bias, nw, nb, sr)
    out.backward(dout)
    dv = kv.grad.view(B, Hr, Wr, 2, C)[..., 1, :] if kv_view else v.grad
    grads = [x.grad, dv, weight.grad, bias.grad, nw.grad, nb.grad]
    return out, grads, (kv.grad if kv_view else None)


def _check_parity(shape, sr, dtype, device, kv_view=True, seed=0):
    """Kernel vs float64 reference vs eager in the same dtype: output and all six gradients."""
    tensors = _inputs(*shape, sr, seed=seed)
    tensors = [t.to(dtype).double() for t in tensors]  # the same rounded inputs for all three
    out, grads, kv_grad = _run(upsample_add, tensors, sr, dtype, device, kv_view)
    ref_out, ref_grads, _ = _run(reference.upsample_add, tensors, sr, torch.float64, "cpu", kv_view)
    eager_out, eager_grads, _ = _run(reference.upsample_add, tensors, sr, dtype, device, kv_view)
    assert out.is_contiguous() and out.dtype == dtype and out.shape == tensors[0].shape
    assert_close("out", out, ref_out, eager_out)
    for name, a, r, e in zip(GRAD_NAMES, grads, ref_grads, eager_grads):
        assert a is not None and a.dtype == dtype, name
        assert_close(name, a, r, e)
    if kv_view:
        B, Hr, Wr, C2 = kv_grad.shape
        k_half = kv_grad.view(B, Hr, Wr, 2, C2 // 2)[..., 0, :]
        assert torch.equal(k_half, torch.zeros_like(k_half)), "dv leaked into the K half of kv"


# (B, Hr, Wr, H, W, C), sr. Every sr in {1, 2, 3, 4, 8}, every C in {16, 48, 96, 128}, sizes that
# divide (the 224-px stages: 7x7 -> 56x56 at sr 8, 28x28 at sr 4, 14x14 at sr 2, 7x7 at sr 1),
# ones that need the crop (4x5 -> 25x33 at sr 8: the 97x131 input's stage 1), 1x1 maps, and
# the widest channel rows (768, 1024); V read in place from a kv tensor unless "contig".
SHAPES = [
    pytest.param((2, 7, 7, 7, 7, 96), 1, FP32, True, id="sr1-C96-7x7-kv-fp32"),
    pytest.param((1, 7, 7, 7, 7, 768), 1, FP16, True, id="sr1-C768-7x7-kv-fp16"),
    pytest.param((1, 3, 3, 3, 3, 1024), 1, FP32, True, id="sr1-C1024-3x3-kv-fp32"),
    pytest.param((1, 1, 1, 1, 1, 16), 1, FP32, False, id="sr1-C16-1x1-contig-fp32"),
    pytest.param((1, 7, 7, 14, 14, 48), 2, FP16, True, id="sr2-C48-7x7to14x14-kv-fp16"),
    pytest.param((2, 4, 5, 7, 9, 128), 2, FP32, False, id="sr2-C128-4x5to7x9crop-contig-fp32"),
    pytest.param((1, 3, 4, 8, 11, 48), 3, FP32, True, id="sr3-C48-3x4to8x11crop-kv-fp32"),
    pytest.param((2, 2, 3, 6, 9, 16), 3, FP16, False, id="sr3-C16-2x3to6x9-contig-fp16"),
    pytest.param((1, 7, 7, 28, 28, 96), 4, FP16, True, id="sr4-C96-7x7to28x28-kv-fp16"),
    pytest.param((1, 2, 3, 5, 10, 128), 4, FP32, True, id="sr4-C128-2x3to5x10crop-kv-fp32"),
    pytest.param((1, 7, 7, 56, 56, 16), 8, FP32, True, id="sr8-C16-7x7to56x56-kv-fp32"),
    pytest.param((2, 4, 5, 25, 33, 96), 8, FP16, True, id="sr8-C96-4x5to25x33crop-kv-fp16"),
    pytest.param((1, 1, 1, 1, 1, 48), 8, FP32, False, id="sr8-C48-1x1-contig-fp32"),
]


@pytest.mark.parametrize("shape,sr,dtype,kv_view", SHAPES)
def test_parity(shape, sr, dtype, kv_view, device, nan_buffers):
    _check_parity(shape, sr, dtype, device, kv_view)
    # out, then dv, g scratch and the partial sums of the backward: all NaN-filled
    assert len(nan_buffers) == 4, nan_buffers
    B, Hr, Wr, H, W, C = shape
    assert nan_buffers[0] == ((B, H, W, C), dtype)
    assert ((B, Hr, Wr, C), dtype) in nan_buffers and ((B, H, W, C), FP32) in nan_buffers


@pytest.mark.parametrize(
    "shape,sr",
    [
        pytest.param((2, 4, 5, 7, 9, 48), 2, id="sr2-C48-4x5to7x9crop"),
        pytest.param((2, 3, 3, 8, 7, 24), 3, id="sr3-C24-3x3to8x7crop"),
    ],
)
def test_parity_small_tiles(shape, sr, device):
    """Tiles of 4 reduced pixels: blocks straddle rows and images, each split owns several."""
    with _small_tiles():
        _check_parity(shape, sr, FP32, device, kv_view=True)


@pytest.mark.parametrize(
    "shape,sr",
    [
        pytest.param((2, 4, 5, 7, 10, 96), 2, id="sr2-C96-4x5to7x10crop"),
        pytest.param((1, 3, 3, 3, 3, 1024), 1, id="sr1-C1024-3x3"),
    ],
)
def test_parity_gpu_tiles(shape, sr, device):
    """The tile sizes and split counts a GPU would pick (BLOCK_P 1 or 2 at C = 1024)."""
    with plans.using_target("sm_90"):
        _check_parity(shape, sr, FP32, device, kv_view=True)


def test_parity_identity_norm(device):
    """The model's init: zero conv bias, LayerNorm weight 1 and bias 0."""
    B, Hr, Wr, H, W, C, sr = 1, 3, 3, 6, 5, 48, 2
    tensors = _inputs(B, Hr, Wr, H, W, C, sr, seed=3)
    tensors[3].zero_()
    tensors[4].fill_(1)
    tensors[5].zero_()
    out, grads, _ = _run(upsample_add, tensors, sr, FP32, device, True)
    ref_out, ref_grads, _ = _run(reference.upsample_add, tensors, sr, torch.float64, "cpu", True)
    eager_out, eager_grads, _ = _run(reference.upsample_add, tensors, sr, FP32, device, True)
    assert_close("out", out, ref_out, eager_out)
    for name, a, r, e in zip(GRAD_NAMES, grads, ref_grads, eager_grads):
        assert_close(name, a, r, e)


@pytest.mark.parametrize("layout", ["channel-slice", "nchw-permute"])
def test_strided_x(layout, device):
    """x with unusual strides: a channel slice of a wider map (read in place) and an NCHW
    tensor viewed channels-last (non-unit channel stride: copied by the launcher)."""
    B, Hr, Wr, H, W, C, sr = 2, 3, 2, 5, 4, 16, 2
    x, kv, weight, bias, nw, nb, dout = (t.float().to(device) for t in _inputs(B, Hr, Wr, H, W, C, sr))
    if layout == "channel-slice":
        wide = torch.randn(B, H, W, C + 8, device=device)
        wide[..., 3 : 3 + C] = x
        xs = wide[..., 3 : 3 + C]
    else:
        xs = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
        assert xs.stride(-1) != 1
    v = kv.view(B, Hr, Wr, 2, C)[..., 1, :]
    out = upsample_add(xs, v, weight, bias, nw, nb, sr)
    ref = reference.upsample_add(*(t.double() for t in (x, v, weight, bias, nw, nb)), sr)
    eager = reference.upsample_add(x, v, weight, bias, nw, nb, sr)
    assert out.is_contiguous()
    assert_close("out", out, ref, eager)


def test_grad_only_x(device, nan_buffers):
    """Only x needs a gradient: dx is dout and no backward kernel runs."""
    B, Hr, Wr, H, W, C, sr = 1, 2, 2, 3, 4, 16, 2
    x, kv, weight, bias, nw, nb, dout = (t.float().to(device) for t in _inputs(B, Hr, Wr, H, W, C, sr))
    x.requires_grad_()
    upsample_add(x, kv[..., C:], weight, bias, nw, nb, sr).backward(dout)
    assert torch.equal(x.grad, dout)
    assert len(nan_buffers) == 1  # the forward's output only


def test_deterministic(device):
    """Two backward runs give bitwise-identical gradients (no atomics, fixed split)."""
    tensors = _inputs(2, 4, 3, 7, 6, 48, 2, seed=5)
    first = _run(upsample_add, tensors, 2, FP32, device, True)[1]
    second = _run(upsample_add, tensors, 2, FP32, device, True)[1]
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), name


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 2),
    C=st.sampled_from([16, 24, 48, 80]),
    sr=st.integers(1, 4),
    Hr=st.integers(1, 4),
    Wr=st.integers(1, 4),
    crop=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    kv_view=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(B, C, sr, Hr, Wr, crop, kv_view, seed):
    """Any valid shape: 1 <= H <= Hr*sr, 1 <= W <= Wr*sr, cropped top-left."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    H = 1 + int(crop[0] * (Hr * sr - 1))
    W = 1 + int(crop[1] * (Wr * sr - 1))
    _check_parity((B, Hr, Wr, H, W, C), sr, FP32, device, kv_view, seed=seed)


def test_custom_ops_trace(device):
    """The custom ops' fake implementations: torch.compile traces the op (forward and
    backward) in one graph with no compiler (aot_eager), matching eager."""
    B, Hr, Wr, H, W, C, sr = 1, 2, 3, 4, 5, 16, 2
    tensors = [t.float().to(device) for t in _inputs(B, Hr, Wr, H, W, C, sr)]

    def f(x, kv, weight, bias, nw, nb):
        v = kv.view(B, Hr, Wr, 2, C)[..., 1, :]
        return upsample_add(x, v, weight, bias, nw, nb, sr) * 2

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in tensors[:6]]
        out = fn(*leaves)
        out.backward(tensors[6])
        return [out] + [t.grad for t in leaves]

    compiled = grads(torch.compile(f, backend="aot_eager", fullgraph=True))
    eager = grads(f)
    for name, a, e in zip(("out", "dx", "dkv", *GRAD_NAMES[2:]), compiled, eager):
        assert_close(name, a, e.double())


def test_custom_ops_opcheck(device):
    """torch.library.opcheck (schema, autograd registration, fake tensors, AOT dispatch with
    dynamic shapes) of both custom ops, on a strided V."""
    B, Hr, Wr, H, W, C, sr = 1, 2, 2, 3, 4, 16, 2
    x, kv, weight, bias, nw, nb, dout = (t.float().to(device) for t in _inputs(B, Hr, Wr, H, W, C, sr))
    v = kv.view(B, Hr, Wr, 2, C)[..., 1, :]
    torch.library.opcheck(torch.ops.restv2.upsample_add_fwd.default, (x, v, weight, bias, nw, nb, sr, 1e-6))
    torch.library.opcheck(torch.ops.restv2.upsample_add_bwd.default, (dout, v, weight, bias, nw, nb, sr, 1e-6))


def _good(device, dtype=FP32, C=16, sr=2):
    B, Hr, Wr, H, W = 1, 2, 2, 3, 4
    return dict(
        x=torch.randn(B, H, W, C, device=device, dtype=dtype),
        v=torch.randn(B, Hr, Wr, C, device=device, dtype=dtype),
        weight=torch.randn(sr * sr * C, 1, 3, 3, device=device, dtype=dtype),
        bias=torch.randn(sr * sr * C, device=device, dtype=dtype),
        norm_weight=torch.ones(C, device=device, dtype=dtype),
        norm_bias=torch.zeros(C, device=device, dtype=dtype),
        sr=sr,
    )


@pytest.mark.parametrize(
    "change,error,match",
    [
        pytest.param(
            lambda a: a.update({k: t.double() for k, t in a.items() if torch.is_tensor(t)}),
            TypeError,
            "fp16/bf16/fp32",
            id="fp64",
        ),
        pytest.param(lambda a: a.update(v=a["v"].half()), TypeError, "v has dtype", id="dtype-mismatch"),
        pytest.param(lambda a: a.update(x=a["x"].tolist()), TypeError, "x must be a torch.Tensor", id="not-tensor"),
        pytest.param(lambda a: a.update(x=a["x"][0]), ValueError, "4-D", id="x-3d"),
        pytest.param(lambda a: a.update(v=a["v"][..., :8]), ValueError, "v .* must be", id="v-channels"),
        pytest.param(lambda a: a.update(sr=0), ValueError, "sr must be a positive int", id="sr0"),
        pytest.param(lambda a: a.update(sr=2.0), ValueError, "sr must be a positive int", id="sr-float"),
        pytest.param(lambda a: a.update(sr=1), ValueError, "smaller than x", id="crop-too-small"),
        pytest.param(
            lambda a: a.update(weight=a["weight"][:16]), ValueError, "weight must have shape", id="weight-vs-sr"
        ),
        pytest.param(lambda a: a.update(bias=a["bias"][:5]), ValueError, "bias must have shape", id="bias-shape"),
        pytest.param(
            lambda a: a.update(norm_weight=a["norm_weight"][:3]),
            ValueError,
            "norm_weight must have shape",
            id="norm-shape",
        ),
        pytest.param(lambda a: a.update(eps=-1.0), ValueError, "eps", id="eps-negative"),
    ],
)
def test_errors(change, error, match, device):
    args = _good(device)
    change(args)
    with pytest.raises(error, match=match):
        upsample_add(**args)


def test_error_too_many_channels(device):
    args = _good(device, C=kernels.MAX_C + 1, sr=1)
    args["x"] = args["x"][:, :2, :2]  # sr=1: H, W <= Hr, Wr
    with pytest.raises(ValueError, match="channels"):
        upsample_add(**args)


def test_error_cpu_without_interpreter(monkeypatch):
    """CPU tensors with the interpreter off: a clear error before any launch."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        upsample_add(**_good("cpu"))


# ----------------------------------------------------------------------------- the model's widths


@pytest.mark.parametrize(
    "shape,sr",
    [
        pytest.param((2, 7, 7, 56, 56, 96), 8, id="sr8-C96-7x7to56x56"),
        pytest.param((2, 4, 5, 25, 33, 96), 8, id="sr8-C96-4x5to25x33crop"),
        pytest.param((2, 7, 7, 28, 28, 192), 4, id="sr4-C192-7x7to28x28"),
        pytest.param((2, 4, 4, 7, 8, 48), 3, id="sr3-C48-4x4to7x8crop"),
        pytest.param((2, 7, 7, 14, 14, 384), 2, id="sr2-C384-7x7to14x14"),
        pytest.param((2, 7, 7, 7, 7, 768), 1, id="sr1-C768-7x7"),
        pytest.param((2, 5, 5, 5, 5, 1024), 1, id="sr1-C1024-5x5"),
    ],
)
@pytest.mark.parametrize("dtype", model_width_dtypes(BF16, FP16, FP32))
def test_parity_model_widths(shape, sr, dtype, device):
    """At the model's widths: bf16 in the interpreter too (bf16 emulated), fp16 and fp32 compiled."""
    _check_parity(shape, sr, dtype, device, kv_view=True)


# ----------------------------------------------------------------------------- compiled only


@pytest.mark.cuda
@pytest.mark.inductor
def test_torch_compile_inductor(device):
    """torch.compile(fullgraph=True) with inductor around the op, forward and backward."""
    B, Hr, Wr, H, W, C, sr = 2, 4, 5, 25, 33, 96, 8
    tensors = [t.to(device=device, dtype=FP16) for t in _inputs(B, Hr, Wr, H, W, C, sr)]

    def f(x, kv, weight, bias, nw, nb):
        v = kv.view(B, Hr, Wr, 2, C)[..., 1, :]
        return torch.nn.functional.gelu(upsample_add(x * 0.5, v, weight, bias, nw, nb, sr))

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in tensors[:6]]
        out = fn(*leaves)
        out.backward(tensors[6])
        return [out] + [t.grad for t in leaves]

    compiled = grads(torch.compile(f, fullgraph=True))
    eager = grads(f)
    tensors = [t.double() for t in tensors]
    ref64 = grads(
        lambda x, kv, *p: torch.nn.functional.gelu(
            reference.upsample_add(x * 0.5, kv.view(B, Hr, Wr, 2, C)[..., 1, :], *p, sr)
        )
    )
    for name, a, r, e in zip(("out", "dx", "dkv", *GRAD_NAMES[2:]), compiled, ref64, eager):
        assert_close(name, a, r, e)


@pytest.mark.cuda
def test_second_gpu():
    """Tensors on cuda:1 launch on cuda:1 (no reliance on the current device)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _check_parity((2, 4, 5, 25, 33, 48), 8, FP16, "cuda:1", kv_view=True)


@pytest.mark.cuda
def test_int64_offsets(device):
    """More than 2**31 elements in x, out and the g scratch: 64-bit offsets. The last
    images are checked against the reference on their own."""
    B, Hr, Wr, H, W, C, sr = 7200, 7, 7, 56, 56, 96, 8  # 2.17e9 elements per map
    need = B * H * W * C * (2 + 2 + 2 + 4 + 2) + (1 << 30)
    if torch.cuda.get_device_properties(device).total_memory < need:
        pytest.skip("not enough GPU memory")
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, H, W, C, device=device, dtype=FP16, generator=g)
    kv = torch.randn(B, Hr, Wr, 2 * C, device=device, dtype=FP16, generator=g)
    _, _, weight, bias, nw, nb, _ = (t.to(device=device, dtype=FP16) for t in _inputs(1, Hr, Wr, H, W, C, sr))
    v = kv.view(B, Hr, Wr, 2, C)[..., 1, :].contiguous().requires_grad_()
    out = upsample_add(x, v, weight, bias, nw, nb, sr)
    dout = torch.ones_like(out)
    (dv,) = torch.autograd.grad(out, v, dout)
    tail = slice(B - 2, B)
    ref_out = reference.upsample_add(
        *(t[tail].double() for t in (x, v)), *(t.double() for t in (weight, bias, nw, nb)), sr
    )
    eager_out = reference.upsample_add(x[tail], v[tail], weight, bias, nw, nb, sr)
    assert_close("out[-2:]", out[tail], ref_out, eager_out)
    vt = v[tail].detach().double().requires_grad_()
    ref = reference.upsample_add(x[tail].double(), vt, *(t.detach().double() for t in (weight, bias, nw, nb)), sr)
    (ref_dv,) = torch.autograd.grad(ref, vt, dout[tail].double())
    assert_close("dv[-2:]", dv[tail], ref_dv)
