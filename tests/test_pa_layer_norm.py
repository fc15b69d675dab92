"""PA + LayerNorm in one pass (``pixel_attention_layer_norm``, what a stem or patch embed runs
at inference): parity, output dtype and layout, the gradient path, the custom op, errors.

Every comparison goes through ``helpers.assert_close``: the kernel against a float64 reference
on the same (dtype-rounded) inputs, judged by the error of eager PyTorch in the kernel's dtype.
Without a GPU these run in Triton's interpreter (see conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, nan_buffers_for

from restv2_kernels import plans, reference
from restv2_kernels.pa import triton as kernels
from restv2_kernels.pa.triton import pixel_attention_layer_norm

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
CL = torch.channels_last
EPS = 1e-6


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an unwritten element fails."""
    return nan_buffers_for(monkeypatch, kernels)


def _inputs(B, C, H, W, seed=0, x_bias=True):
    """float64 CPU tensors: x ([B, C, H, W]), the PA conv's weight and bias, x's bias (or None),
    and the LayerNorm's weight and bias, all random (the conv scaled into the sigmoid's curved
    range, the norm's weight around 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    weight = torch.randn(C, 1, 3, 3, generator=g) / 2
    bias = torch.randn(C, generator=g) / 2
    xb = torch.randn(C, generator=g) if x_bias else None
    nw = 1 + torch.randn(C, generator=g) / 4
    nb = torch.randn(C, generator=g) / 4
    return [None if t is None else t.double() for t in (x, weight, bias, xb, nw, nb)]


def _cast(tensors, dtype, norm_dtype, device):
    x, weight, bias, xb, nw, nb = tensors
    pa = [None if t is None else t.to(device=device, dtype=dtype) for t in (x, weight, bias, xb)]
    return [*pa, nw.to(device=device, dtype=norm_dtype), nb.to(device=device, dtype=norm_dtype)]


def _check(shape, dtype, device, out_dtype=None, norm_dtype=None, x_bias=True, layout="channels_last", seed=0):
    """Kernel (no gradient) vs float64 reference vs eager in the kernel's dtype."""
    norm_dtype = norm_dtype or out_dtype or dtype
    tensors = [None if t is None else t.to(dtype).double() for t in _inputs(*shape, seed=seed, x_bias=x_bias)]
    args = _cast(tensors, dtype, norm_dtype, device)
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    args[0] = args[0].contiguous(memory_format=fmt)
    with torch.no_grad():
        out = pixel_attention_layer_norm(*args, EPS, out_dtype)
    ref = reference.pixel_attention_layer_norm(*_cast(tensors, torch.float64, torch.float64, "cpu"), EPS)
    eager = reference.pixel_attention_layer_norm(*args, EPS, out_dtype)
    assert out.shape == shape and out.dtype == (out_dtype or dtype)
    assert out.is_contiguous(memory_format=CL), out.stride()
    assert_close("out", out, ref, eager)
    return out


@pytest.mark.parametrize(
    "shape,dtype,out_dtype,norm_dtype,x_bias,layout",
    [
        pytest.param((2, 48, 7, 7), FP32, None, None, True, "channels_last", id="C48-fp32"),
        pytest.param((2, 48, 7, 7), FP32, None, None, False, "nchw", id="C48-fp32-no-x-bias-nchw"),
        pytest.param((1, 96, 5, 9), FP16, FP32, None, True, "channels_last", id="C96-fp16-out-fp32"),
        pytest.param((1, 96, 5, 9), FP16, None, None, True, "channels_last", id="C96-fp16"),
        pytest.param((1, 96, 5, 9), FP16, None, FP32, True, "channels_last", id="C96-fp16-norm-fp32"),
        pytest.param((3, 5, 4, 6), FP32, None, None, True, "nchw", id="C5-4x6"),
        pytest.param((1, 20, 1, 11), FP16, FP32, None, False, "channels_last", id="C20-1x11"),
        pytest.param((1, 1024, 3, 3), FP32, None, None, True, "channels_last", id="C1024-3x3"),
    ],
)  # fmt: skip
def test_parity(shape, dtype, out_dtype, norm_dtype, x_bias, layout, device, nan_buffers):
    _check(shape, dtype, device, out_dtype, norm_dtype, x_bias, layout)
    B, C, H, W = shape
    assert nan_buffers == [((B, H, W, C), out_dtype or dtype)]  # one pass, one buffer: PA's output is never stored


def test_parity_small_tiles(device):
    """4-pixel tiles: blocks straddle rows and images, each row normalised on its own."""
    with plans.forced(pixel_attention_fwd=dict(block_p=4, num_warps=1)):
        _check((2, 24, 5, 7), FP32, device)


def test_parity_gpu_tiles(device):
    """The tiles a GPU would pick (BLOCK_P 2 at C = 1024, 32 at C = 96)."""
    with plans.using_target("sm_90"):
        _check((1, 1024, 2, 3), FP16, device, FP32)
        _check((2, 96, 5, 7), FP16, device)


def test_rows_are_normalised_over_their_channels_only(device):
    """A constant row normalises to the norm's bias; a row's scale does not leak into the next
    pixel's (a program's rows are reduced one by one, padded channels left out)."""
    B, C, H, W = 1, 12, 2, 3
    x = torch.zeros(B, C, H, W, device=device).contiguous(memory_format=CL)
    x[0, :, 0, 0] = 1000.0
    weight = torch.zeros(C, 1, 3, 3, device=device)
    bias = torch.full((C,), 30.0, device=device)  # sigmoid(30) == 1 in fp32: PA passes x through
    nw, nb = torch.ones(C, device=device), torch.arange(C, dtype=FP32, device=device)
    with torch.no_grad():
        out = pixel_attention_layer_norm(x, weight, bias, None, nw, nb, EPS)
    assert torch.equal(out, nb.view(1, C, 1, 1).expand(B, C, H, W))


def test_gradient_path(device, nan_buffers):
    """Where a gradient is needed: PA's kernels, then the LayerNorm in fp32, differentiable
    w.r.t. every tensor (PA's output is stored: the LayerNorm's backward reads it)."""
    tensors = _inputs(2, 16, 5, 6)
    leaves = [t.float().to(device).requires_grad_() for t in tensors]
    out = pixel_attention_layer_norm(*leaves, EPS)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_leaves = [t.clone().requires_grad_() for t in tensors]
    ref = reference.pixel_attention_layer_norm(*ref_leaves, EPS)
    ref.backward(dout.double().cpu())
    assert_close("out", out, ref)
    for name, a, r in zip(("dx", "dweight", "dbias", "dx_bias", "dnorm_weight", "dnorm_bias"), leaves, ref_leaves):
        assert_close(name, a.grad, r.grad)
    assert (out.shape[0], *out.shape[2:], out.shape[1]) in [s for s, _ in nan_buffers]  # PA's output stored


def test_custom_op_opcheck(device):
    """torch.library.opcheck of the fused forward (schema, fake tensor, AOT dispatch with dynamic
    shapes), on a strided channels-last view, with and without x_bias, in fp32 and to fp32."""
    x, weight, bias, xb, nw, nb = (t.float().to(device) for t in _inputs(1, 16, 3, 4))
    wide = torch.randn(1, 3, 4, 20, device=device)
    wide[..., 1:17] = x.permute(0, 2, 3, 1)
    xl = wide[..., 1:17]
    for x_bias in (None, xb):
        torch.library.opcheck(
            torch.ops.restv2.pixel_attention_ln_fwd.default, (xl, weight, bias, x_bias, nw, nb, EPS, FP32)
        )


def test_launchers_record_on_meta():
    """On meta tensors under plans.recording(): one launch, the forward's plan."""
    B, H, W, C = 256, 56, 56, 96
    x = torch.empty(B, H, W, C, device="meta", dtype=BF16)
    weight, bias = torch.empty(C, 1, 3, 3, device="meta", dtype=BF16), torch.empty(C, device="meta", dtype=BF16)
    nw = torch.empty(C, device="meta")
    target = plans.TARGETS["sm_90"]
    with plans.using_target(target), plans.recording() as seen:
        out = kernels._fwd(x, weight, bias, bias, (nw, nw, EPS), FP32)
    assert [r.plan for r in seen] == [plans.pixel_attention_fwd_plan(B, H, W, C, BF16, target)]
    assert out.shape == (B, H, W, C) and out.dtype == FP32


def _good(device, C=16):
    x, weight, bias, xb, nw, nb = (t.float().to(device) for t in _inputs(1, C, 3, 4))
    return dict(x=x, weight=weight, bias=bias, x_bias=xb, norm_weight=nw, norm_bias=nb)


@pytest.mark.parametrize(
    "change,error,match",
    [
        pytest.param(lambda a: a.update(norm_weight=a["norm_weight"][:5]), ValueError, "norm_weight must have shape", id="nw-shape"),
        pytest.param(lambda a: a.update(norm_bias=None), TypeError, "norm_bias must be a torch.Tensor", id="nb-none"),
        pytest.param(lambda a: a.update(norm_bias=a["norm_bias"].int()), TypeError, "norm_bias has dtype", id="nb-int"),
        pytest.param(lambda a: a.update(norm_weight=a["norm_weight"].to("meta")), ValueError, "norm_weight is on meta", id="nw-device"),
        pytest.param(lambda a: a.update(eps=-1.0), ValueError, "eps must be a non-negative number", id="eps"),
        pytest.param(lambda a: a.update(out_dtype=torch.int32), TypeError, "out_dtype", id="out-int"),
        pytest.param(lambda a: a.update(out_dtype=torch.float64), TypeError, "write fp16/bf16/fp32", id="out-fp64"),
        pytest.param(lambda a: a.update(x=a["x"].double()), TypeError, "dtype", id="x-fp64"),
        pytest.param(lambda a: a.update(weight=a["weight"][:8]), ValueError, "weight must have shape", id="weight-shape"),
    ],
)  # fmt: skip
def test_errors(change, error, match, device):
    args = _good(device)
    change(args)
    with pytest.raises(error, match=match), torch.no_grad():
        pixel_attention_layer_norm(**args)


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((2, 96, 56, 56), id="C96-56x56"),
        pytest.param((2, 192, 28, 29), id="C192-28x29"),
        pytest.param((2, 384, 14, 14), id="C384-14x14"),
        pytest.param((2, 768, 7, 7), id="C768-7x7"),
        pytest.param((2, 1024, 5, 5), id="C1024-5x5"),
    ],
)
@pytest.mark.parametrize(
    "dtype,out_dtype",
    [
        pytest.param(BF16, None, id="bf16", marks=pytest.mark.bf16),
        pytest.param(BF16, FP32, id="bf16-out32", marks=pytest.mark.bf16),
        pytest.param(FP16, None, id="fp16", marks=pytest.mark.cuda),
        pytest.param(FP32, None, id="fp32", marks=pytest.mark.cuda),
    ],
)
def test_parity_model_widths(shape, dtype, out_dtype, device):
    """At the model's widths: bf16 in the interpreter too (bf16 emulated), fp16 and fp32 compiled."""
    _check(shape, dtype, device, out_dtype)
