"""Parity, gradients, layouts, errors and determinism of the fused pixel attention (PA).

Every comparison goes through ``helpers.assert_close``: the kernel against a float64
reference on the same (dtype-rounded) inputs, judged by the error of eager PyTorch in the
kernel's dtype. Without a GPU these run in Triton's interpreter (see conftest.py).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import assert_close, model_width_dtypes, nan_buffers_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from restv2_kernels import plans, reference
from restv2_kernels.pa import triton as kernels
from restv2_kernels.pa.triton import pixel_attention

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
CL = torch.channels_last
GRAD_NAMES = ("dx", "dweight", "dbias")


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an unwritten element fails."""
    return nan_buffers_for(monkeypatch, kernels)


def _small_tiles(programs=5):
    """4-pixel tiles and several reduction programs: program boundaries inside rows and images,
    each reduction program over several blocks, on small shapes."""
    tile = dict(block_p=4, num_warps=1)
    return plans.forced(
        pixel_attention_fwd=tile, pixel_attention_bwd=dict(tile, programs=programs), pixel_attention_bwd_dx=tile
    )


def _inputs(B, C, H, W, seed=0, x_bias=False):
    """float64 CPU tensors x, weight, bias, dout ([B, C, H, W] NCHW-contiguous maps), and with
    ``x_bias`` x's bias last. The conv is scaled so that z spans the sigmoid's curved range;
    the biases are random, not zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    weight = torch.randn(C, 1, 3, 3, generator=g) / 2
    bias = torch.randn(C, generator=g) / 2
    dout = torch.randn(B, C, H, W, generator=g)
    extra = [torch.randn(C, generator=g)] if x_bias else []
    return [t.double() for t in (x, weight, bias, dout, *extra)]


def _layout(x, layout):
    """(leaf, view): x laid out as the model or a user might pass it; ``view(t)`` maps a
    leaf-shaped tensor (the leaf, its gradient) to the [B, C, H, W] map the op sees.

    channels_last: a conv output, the model's case. nchw: contiguous NCHW (the launcher
    copies it channels-last). cl-slice: a channel slice of a wider channels-last map (unit
    channel stride, batch/row/column strides of the wide map). cl-crop: every other row and a
    column window of a larger channels-last map (odd row and batch strides).
    """
    B, C, H, W = x.shape
    if layout in ("channels_last", "nchw"):
        leaf = x.contiguous(memory_format=CL if layout == "channels_last" else torch.contiguous_format)
        return leaf, lambda t: t
    if layout == "cl-slice":
        leaf = torch.randn(B, C + 5, H, W, dtype=x.dtype, device=x.device).contiguous(memory_format=CL)
        view = lambda t: t[:, 2 : 2 + C]  # noqa: E731
    elif layout == "cl-crop":
        leaf = torch.randn(B, C, 2 * H + 1, W + 3, dtype=x.dtype, device=x.device).contiguous(memory_format=CL)
        view = lambda t: t[:, :, 1::2, 1 : 1 + W]  # noqa: E731
    else:
        raise AssertionError(layout)
    with torch.no_grad():
        view(leaf).copy_(x)
    return leaf, view


def _run(fn, tensors, dtype, device, layout="channels_last", dout_layout="channels_last"):
    """fn's output and the gradients of <out, dout> w.r.t. x (through its layout), weight,
    bias (and x_bias, when ``tensors`` has one)."""
    x, weight, bias, dout, *x_bias = (t.to(device=device, dtype=dtype, copy=True) for t in tensors)
    dout = dout.contiguous(memory_format=CL if dout_layout == "channels_last" else torch.contiguous_format)
    leaf, view = _layout(x, layout)
    params = [weight, bias, *x_bias]
    for t in (leaf, *params):
        t.requires_grad_()
    out = fn(view(leaf), *params)
    out.backward(dout)
    outside = leaf.grad.clone()
    view(outside).zero_()
    assert torch.equal(outside, torch.zeros_like(outside)), "dx leaked outside the view of x"
    return out, [view(leaf.grad)] + [t.grad for t in params]


def _check_parity(shape, dtype, device, layout="channels_last", dout_layout="channels_last", seed=0, x_bias=False):
    """Kernel vs float64 reference vs eager in the same dtype: output and every gradient."""
    tensors = [t.to(dtype).double() for t in _inputs(*shape, seed=seed, x_bias=x_bias)]  # the same rounded inputs
    out, grads = _run(pixel_attention, tensors, dtype, device, layout, dout_layout)
    ref_out, ref_grads = _run(reference.pixel_attention, tensors, torch.float64, "cpu", layout, dout_layout)
    eager_out, eager_grads = _run(reference.pixel_attention, tensors, dtype, device, layout, dout_layout)
    assert out.shape == shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=CL), out.stride()
    assert_close("out", out, ref_out, eager_out)
    assert len(grads) == len(ref_grads) == 3 + x_bias
    for name, a, r, e in zip(GRAD_NAMES + ("dx_bias",), grads, ref_grads, eager_grads):
        assert a is not None and a.dtype == dtype and a.shape == r.shape, name
        assert_close(name, a, r, e)


# (B, C, H, W), dtype, x layout, dout layout. The zoo's widths (48 .. 1024) and C not a power
# of two, 1xW and Hx1 maps, a 1x1 map, odd sizes; every x layout and both dout layouts.
SHAPES = [
    pytest.param((2, 48, 7, 7), FP32, "channels_last", "channels_last", id="C48-7x7-cl-fp32"),
    pytest.param((1, 96, 5, 9), FP16, "nchw", "nchw", id="C96-5x9-nchw-fp16"),
    pytest.param((2, 20, 1, 11), FP32, "cl-slice", "channels_last", id="C20-1x11-slice-fp32"),
    pytest.param((1, 24, 9, 1), FP16, "cl-crop", "channels_last", id="C24-9x1-crop-fp16"),
    pytest.param((3, 5, 4, 6), FP16, "cl-crop", "nchw", id="C5-4x6-crop-fp16"),
    pytest.param((1, 48, 1, 1), FP32, "nchw", "channels_last", id="C48-1x1-nchw-fp32"),
    pytest.param((1, 1024, 3, 3), FP32, "channels_last", "nchw", id="C1024-3x3-cl-fp32"),
    pytest.param((1, 768, 2, 3), FP16, "cl-slice", "channels_last", id="C768-2x3-slice-fp16"),
]


@pytest.mark.parametrize("shape,dtype,layout,dout_layout", SHAPES)
def test_parity(shape, dtype, layout, dout_layout, device, nan_buffers):
    _check_parity(shape, dtype, device, layout, dout_layout)
    # out, then the g scratch, the partial sums and dx of the backward: all NaN-filled
    B, C, H, W = shape
    assert len(nan_buffers) == 4, nan_buffers
    out, g, part, dx = nan_buffers
    assert out == dx == ((B, H, W, C), dtype) and g == ((B, H, W, C), FP32)
    assert part[0][1:] == (10, C) and part[1] == FP32


@pytest.mark.parametrize(
    "shape,programs",
    [
        pytest.param((2, 24, 5, 7), 5, id="C24-5x7-5programs"),
        pytest.param((3, 10, 1, 7), 3, id="C10-1x7-3programs"),
        pytest.param((2, 12, 6, 1), 64, id="C12-6x1-one-block-each"),
    ],
)
def test_parity_small_tiles(shape, programs, device):
    """Tiles of 4 pixels: blocks straddle rows and images; reduction programs own several blocks
    (or one each, when there are more programs than blocks)."""
    with _small_tiles(programs):
        _check_parity(shape, FP32, device, "cl-crop")


@pytest.mark.parametrize(
    "shape,dtype,layout,small_tiles",
    [
        pytest.param((2, 48, 7, 7), FP32, "channels_last", False, id="C48-7x7-cl-fp32"),
        pytest.param((3, 5, 4, 6), FP16, "cl-crop", False, id="C5-4x6-crop-fp16"),
        pytest.param((2, 24, 5, 7), FP32, "nchw", True, id="C24-5x7-nchw-small-tiles"),
    ],
)
def test_parity_x_bias(shape, dtype, layout, small_tiles, device, nan_buffers):
    """``x_bias``, the bias of the conv that made x, added inside the kernels: the conv pads
    x + x_bias with zeros (so a border tap sees no bias), and x_bias's gradient is the sum of
    dx, from per-program partial sums (many programs with 4-pixel tiles)."""
    with _small_tiles() if small_tiles else contextlib.nullcontext():
        _check_parity(shape, dtype, device, layout, x_bias=True)
    B, C, H, W = shape
    assert len(nan_buffers) == 5, nan_buffers  # out; g, the partial sums, dx, x_bias's partial sums
    xb_part = nan_buffers[-1]
    assert xb_part[0][1:] == (C,) and xb_part[0][0] > (1 if small_tiles else 0) and xb_part[1] == FP32


@pytest.mark.parametrize(
    "shape", [pytest.param((2, 96, 5, 7), id="C96-5x7"), pytest.param((1, 1024, 2, 3), id="C1024-2x3")]
)
def test_parity_gpu_tiles(shape, device):
    """The tile sizes and program counts a GPU would pick (BLOCK_P 2 at C = 1024)."""
    with plans.using_target("sm_90"):
        _check_parity(shape, FP16, device, "channels_last")


def test_tokens_view(device):
    """The model's use: a channels-last conv output in, the result viewed as tokens
    [B, H*W, C] with no copy, the tokens' gradient flowing back channels-last."""
    B, C, H, W = 2, 48, 3, 5
    x, weight, bias, dout = (t.float().to(device) for t in _inputs(B, C, H, W))
    conv = torch.nn.Conv2d(C, C, 1).to(device).to(memory_format=CL)
    x = x.contiguous(memory_format=CL).requires_grad_()
    weight.requires_grad_()
    y = conv(x)
    assert y.is_contiguous(memory_format=CL)
    out = pixel_attention(y, weight, bias)
    tokens = out.flatten(2).transpose(1, 2)
    assert tokens.is_contiguous() and tokens.data_ptr() == out.data_ptr()
    dtok = dout.permute(0, 2, 3, 1).reshape(B, H * W, C)
    tokens.backward(dtok)

    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    conv64 = torch.nn.Conv2d(C, C, 1).double().to(device)
    conv64.load_state_dict(conv.state_dict())
    ref = reference.pixel_attention(conv64(x64), w64, bias.double()).flatten(2).transpose(1, 2)
    ref.backward(dtok.double())
    assert_close("tokens", tokens, ref)
    assert_close("dx", x.grad, x64.grad)
    assert_close("dweight", weight.grad, w64.grad)


def test_grad_weight_only(device, nan_buffers):
    """x without a gradient (a frozen input): weight and bias gradients only."""
    B, C, H, W = 1, 16, 3, 4
    x, weight, bias, dout = (t.float().to(device) for t in _inputs(B, C, H, W))
    weight.requires_grad_()
    pixel_attention(x, weight, bias).backward(dout)
    w64 = weight.detach().double().requires_grad_()
    reference.pixel_attention(x.double(), w64, bias.double()).backward(dout.double())
    assert_close("dweight", weight.grad, w64.grad)
    assert bias.grad is None and x.grad is None


def test_empty_batch(device, nan_buffers):
    """B = 0: no launch, empty output and zero parameter gradients."""
    x = torch.randn(0, 8, 3, 3, device=device).contiguous(memory_format=CL).requires_grad_()
    weight = torch.randn(8, 1, 3, 3, device=device, requires_grad=True)
    bias = torch.randn(8, device=device, requires_grad=True)
    out = pixel_attention(x, weight, bias)
    assert out.shape == x.shape
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


def test_deterministic(device):
    """Two backward runs give bitwise-identical gradients (no atomics, fixed program count)."""
    tensors = _inputs(2, 24, 5, 6, seed=5)
    with _small_tiles(3):
        first = _run(pixel_attention, tensors, FP32, device)[1]
        second = _run(pixel_attention, tensors, FP32, device)[1]
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), name


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 2),
    C=st.sampled_from([3, 16, 24, 48]),
    H=st.integers(1, 6),
    W=st.integers(1, 6),
    layout=st.sampled_from(["channels_last", "nchw", "cl-slice", "cl-crop"]),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(B, C, H, W, layout, seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_parity((B, C, H, W), FP32, device, layout, seed=seed)


def test_custom_ops_trace(device):
    """The custom ops' fake implementations: torch.compile traces the op (forward and
    backward) in one graph with no compiler (aot_eager), matching eager."""
    B, C, H, W = 1, 16, 3, 4
    x, weight, bias, dout = (t.float().to(device) for t in _inputs(B, C, H, W))
    x = x.contiguous(memory_format=CL)

    def f(x, weight, bias):
        return pixel_attention(x, weight, bias) * 2

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        out = fn(*leaves)
        out.backward(dout)
        return [out] + [t.grad for t in leaves]

    compiled = grads(torch.compile(f, backend="aot_eager", fullgraph=True))
    eager = grads(f)
    for name, a, e in zip(("out", *GRAD_NAMES), compiled, eager):
        assert_close(name, a, e.double())


def test_custom_ops_opcheck(device):
    """torch.library.opcheck (schema, autograd registration, fake tensors, AOT dispatch with
    dynamic shapes) of both custom ops, on a strided channels-last view."""
    B, C, H, W = 1, 16, 3, 4
    x, weight, bias, dout = (t.float().to(device) for t in _inputs(B, C, H, W))
    wide = torch.randn(B, H, W, C + 4, device=device)
    wide[..., 1 : 1 + C] = x.permute(0, 2, 3, 1)
    xl = wide[..., 1 : 1 + C]
    x_bias = torch.randn(C, device=device)
    for xb in (None, x_bias):
        torch.library.opcheck(torch.ops.restv2.pixel_attention_fwd.default, (xl, weight, bias, xb))
        torch.library.opcheck(
            torch.ops.restv2.pixel_attention_bwd.default, (dout.permute(0, 2, 3, 1), xl, weight, bias, xb)
        )


def test_plans_refuse_too_many_pixels():
    """2**31 pixels do not fit the kernels' 32-bit pixel indices: a ValueError from the plans,
    also when the launchers run on meta tensors."""
    for target in (plans.TARGETS["sm_90"], plans.INTERPRETER):
        with pytest.raises(ValueError, match="pixel_attention: 2147483648 pixels"):
            plans.pixel_attention_fwd_plan(1 << 15, 256, 256, 48, FP16, target)
        with pytest.raises(ValueError, match="do not fit 32-bit"):
            plans.pixel_attention_bwd_plan(1 << 15, 256, 256, 48, FP16, target)
    x = torch.empty(1 << 15, 256, 256, 48, device="meta", dtype=FP16)
    weight, bias = torch.empty(48, 1, 3, 3, device="meta", dtype=FP16), torch.empty(48, device="meta", dtype=FP16)
    with pytest.raises(ValueError, match="do not fit 32-bit"):
        kernels._fwd(x, weight, bias)


def test_launchers_record_on_meta():
    """On meta tensors under plans.recording(), the launchers record the plan functions'
    launches (what the GPU target check compiles); large batches stay within grid limits."""
    B, H, W, C = 4096, 56, 56, 96
    x = torch.empty(B, H, W, C + 8, device="meta", dtype=BF16)[..., :C]
    weight, bias = torch.empty(C, 1, 3, 3, device="meta", dtype=BF16), torch.empty(C, device="meta", dtype=BF16)
    target = plans.TARGETS["sm_89"]
    with plans.using_target(target), plans.recording() as seen:
        out = kernels._fwd(x, weight, bias)
        dx, dw, db, dxb = kernels._bwd(torch.empty_like(out), x, weight, bias)
    bwd = plans.pixel_attention_bwd_plan(B, H, W, C, BF16, target)
    assert [r.plan for r in seen] == [plans.pixel_attention_fwd_plan(B, H, W, C, BF16, target), bwd.g, bwd.dx]
    block_p = dict(bwd.g.constexprs)["BLOCK_P"]
    assert bwd.g.grid == (bwd.programs,) and bwd.programs <= 2 * target.sm_count
    assert (
        (bwd.programs - 1) * bwd.blocks_per_program * block_p
        < B * H * W
        <= bwd.programs * bwd.blocks_per_program * block_p
    )
    assert out.shape == dx.shape == (B, H, W, C) and dw.shape == weight.shape and db.shape == bias.shape
    assert dxb.shape == (0,)  # no x_bias


def _good(device, dtype=FP32, C=16):
    return dict(
        x=torch.randn(1, C, 3, 4, device=device, dtype=dtype),
        weight=torch.randn(C, 1, 3, 3, device=device, dtype=dtype),
        bias=torch.randn(C, device=device, dtype=dtype),
    )


@pytest.mark.parametrize(
    "change,error,match",
    [
        pytest.param(lambda a: a.update({k: t.double() for k, t in a.items()}), TypeError, "fp16/bf16/fp32", id="fp64"),
        pytest.param(lambda a: a.update(bias=a["bias"].half()), TypeError, "bias has dtype", id="dtype-mismatch"),
        pytest.param(lambda a: a.update(x=a["x"].tolist()), TypeError, "x must be a torch.Tensor", id="not-tensor"),
        pytest.param(lambda a: a.update(x=a["x"][0]), ValueError, "4-D", id="x-3d"),
        pytest.param(
            lambda a: a.update(weight=a["weight"][:8]), ValueError, "weight must have shape", id="weight-shape"
        ),
        pytest.param(
            lambda a: a.update(weight=a["weight"].view(16, 9, 1, 1)),
            ValueError,
            "weight must have shape",
            id="weight-1x1",
        ),
        pytest.param(lambda a: a.update(bias=a["bias"][:5]), ValueError, "bias must have shape", id="bias-shape"),
        pytest.param(lambda a: a.update(x_bias=a["bias"][:5]), ValueError, "x_bias must have shape", id="x-bias-shape"),
        pytest.param(lambda a: a.update(x_bias=a["bias"].half()), TypeError, "x_bias has dtype", id="x-bias-dtype"),
        pytest.param(
            lambda a: a.update(x=a["x"][:, :0], weight=a["weight"][:0], bias=a["bias"][:0]),
            ValueError,
            "channels",
            id="C0",
        ),
    ],
)
def test_errors(change, error, match, device):
    args = _good(device)
    change(args)
    with pytest.raises(error, match=match):
        pixel_attention(**args)


def test_error_too_many_channels(device):
    with pytest.raises(ValueError, match="channels"):
        pixel_attention(**_good(device, C=kernels.MAX_C + 1))


def test_error_cpu_without_interpreter(monkeypatch):
    """CPU tensors with the interpreter off: a clear error before any launch."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        pixel_attention(**_good("cpu"))


# ----------------------------------------------------------------------------- the model's widths


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((2, 48, 56, 56), id="C48-56x56"),
        pytest.param((2, 96, 57, 43), id="C96-57x43"),
        pytest.param((2, 192, 28, 28), id="C192-28x28"),
        pytest.param((2, 384, 14, 15), id="C384-14x15"),
        pytest.param((2, 768, 7, 7), id="C768-7x7"),
        pytest.param((2, 1024, 5, 5), id="C1024-5x5"),
    ],
)
@pytest.mark.parametrize("dtype", model_width_dtypes(BF16, FP16, FP32))
@pytest.mark.parametrize(
    "layout",
    [
        "cl-crop",
        # compiled only, bf16 too: in the interpreter the cropped view (the harder strides)
        # covers bf16 at these widths, and the smaller shapes above the plain layout
        pytest.param("channels_last", marks=pytest.mark.cuda),
    ],
)
def test_parity_model_widths(shape, dtype, layout, device):
    """At the model's widths: bf16 in the interpreter too (bf16 emulated), fp16 and fp32 compiled."""
    _check_parity(shape, dtype, device, layout)


# ----------------------------------------------------------------------------- compiled only


@pytest.mark.cuda
@pytest.mark.inductor
def test_torch_compile_inductor(device):
    """torch.compile(fullgraph=True) with inductor around the op, forward and backward."""
    B, C, H, W = 2, 96, 25, 33
    tensors = [t.to(device=device, dtype=FP16) for t in _inputs(B, C, H, W)]
    tensors[0] = tensors[0].contiguous(memory_format=CL)

    def f(x, weight, bias):
        return torch.nn.functional.gelu(pixel_attention(x * 0.5, weight, bias)).flatten(2).transpose(1, 2)

    def grads(fn, ts):
        leaves = [t.detach().clone().requires_grad_() for t in ts[:3]]
        out = fn(*leaves)
        out.backward(ts[3].flatten(2).transpose(1, 2))
        return [out] + [t.grad for t in leaves]

    compiled = grads(torch.compile(f, fullgraph=True), tensors)
    eager = grads(f, tensors)

    def f64(x, weight, bias):
        return torch.nn.functional.gelu(reference.pixel_attention(x * 0.5, weight, bias)).flatten(2).transpose(1, 2)

    ref64 = grads(f64, [t.double() for t in tensors])
    for name, a, r, e in zip(("out", *GRAD_NAMES), compiled, ref64, eager):
        assert_close(name, a, r, e)


@pytest.mark.cuda
def test_int64_offsets(device):
    """More than 2**31 elements in x, out, the g scratch and dx: 64-bit offsets. The last
    images are checked against the reference on their own."""
    B, C, H, W = 200, 96, 336, 336  # 2.17e9 elements per map
    need = B * H * W * C * (2 + 2 + 2 + 4 + 2) + (1 << 30)
    if torch.cuda.get_device_properties(device).total_memory < need:
        pytest.skip("not enough GPU memory")
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, H, W, C, device=device, dtype=FP16, generator=g).permute(0, 3, 1, 2).requires_grad_()
    _, weight, bias, _ = (t.to(device=device, dtype=FP16) for t in _inputs(1, C, 1, 1))
    out = pixel_attention(x, weight, bias)
    dout = torch.ones_like(out)
    (dx,) = torch.autograd.grad(out, x, dout)
    tail = slice(B - 2, B)
    xt = x[tail].detach().double().requires_grad_()
    ref = reference.pixel_attention(xt, weight.double(), bias.double())
    eager = reference.pixel_attention(x[tail].detach(), weight, bias)
    assert_close("out[-2:]", out[tail], ref, eager)
    (ref_dx,) = torch.autograd.grad(ref, xt, dout[tail].double())
    assert_close("dx[-2:]", dx[tail], ref_dx)
