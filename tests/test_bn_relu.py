"""Parity, gradients, layouts and errors of the stems' fused bias + ReLU.

The kernel against a float64 reference on the same (dtype-rounded) inputs, judged by the
error of eager PyTorch in the kernel's dtype (``helpers.assert_close``). Without a GPU these
run in Triton's interpreter (see conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, nan_buffers_for

from restv2_kernels import plans, reference
from restv2_kernels.bn_relu import triton as kernels
from restv2_kernels.bn_relu.triton import bias_relu

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
CL = torch.channels_last


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """The output starts as NaN, so an element the kernel leaves unwritten fails."""
    return nan_buffers_for(monkeypatch, kernels)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x as a conv writes it (channels_last, nchw), or strided (a crop of a wider map)."""
    if layout == "channels_last":
        return x.contiguous(memory_format=CL)
    if layout == "nchw":
        return x.contiguous()
    wide = torch.zeros(x.shape[0], x.shape[1] + 3, x.shape[2] + 1, x.shape[3], dtype=x.dtype, device=x.device)
    wide = wide.contiguous(memory_format=CL)
    view = wide[:, 1 : 1 + x.shape[1], 1:]
    view.copy_(x)
    return view


def _run(fn, x, bias, dout, dtype, device, layout):
    x = _layout(x.to(device=device, dtype=dtype, copy=True), layout).detach().requires_grad_()
    bias = bias.to(device=device, dtype=dtype, copy=True).requires_grad_()
    out = fn(x, bias)
    out.backward(dout.to(device=device, dtype=dtype))
    return out, x.grad, bias.grad


@pytest.mark.parametrize(
    "shape,dtype,layout",
    [
        pytest.param((2, 24, 7, 9), FP32, "channels_last", id="C24-7x9-cl-fp32"),
        pytest.param((2, 48, 5, 3), FP16, "channels_last", id="C48-5x3-cl-fp16"),
        pytest.param((3, 5, 4, 6), FP32, "nchw", id="C5-4x6-nchw-fp32"),
        pytest.param((1, 96, 1, 1), FP16, "nchw", id="C96-1x1-fp16"),
        pytest.param((2, 7, 3, 5), FP32, "strided", id="C7-3x5-strided-fp32"),
    ],
)
def test_parity(shape, dtype, layout, device, nan_buffers):
    g = torch.Generator().manual_seed(0)
    x, dout = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    bias = torch.randn(shape[1], generator=g)
    x, bias = x.to(dtype).double(), bias.to(dtype).double()  # the same rounded inputs everywhere
    out, dx, dbias = _run(bias_relu, x, bias, dout, dtype, device, layout)
    ref = _run(reference.bias_relu, x, bias, dout, torch.float64, "cpu", layout)
    eager = _run(reference.bias_relu, x, bias, dout, dtype, device, layout)
    assert out.dtype == dtype and out.shape == shape
    # a conv's layout is kept; a strided x comes back channels-last (the one copy)
    assert out.is_contiguous(memory_format=torch.contiguous_format if layout == "nchw" else CL)
    for name, a, r, e in zip(("out", "dx", "dbias"), (out, dx, dbias), ref, eager):
        assert_close(name, a, r, e)
    assert [(torch.Size(s).numel(), dt) for s, dt in nan_buffers] == [(out.numel(), dtype)]  # out, NaN-filled


def test_many_programs(device):
    """Blocks of 64 elements: program boundaries inside channel rows and images."""
    x = torch.randn(2, 6, 5, 7, device=device).contiguous(memory_format=CL)
    bias = torch.randn(6, device=device)
    with plans.forced(bias_relu=dict(block=64)):
        out = bias_relu(x, bias)
    torch.testing.assert_close(out, torch.relu(x + bias.view(1, -1, 1, 1)), rtol=0, atol=0)


def test_nan_propagates(device):
    """NaN stays NaN, as through torch.relu (a max with 0 would drop it)."""
    x = torch.tensor([float("nan"), -1.0, 2.0, float("-inf")], device=device).view(1, 4, 1, 1)
    out = bias_relu(x, torch.zeros(4, device=device))
    assert torch.isnan(out[0, 0]).item() and out.flatten()[1:].tolist() == [0.0, 2.0, 0.0]


def test_empty_batch(device):
    x = torch.randn(0, 4, 3, 3, device=device)
    assert bias_relu(x, torch.randn(4, device=device)).shape == (0, 4, 3, 3)


def test_custom_op_opcheck(device):
    x = torch.randn(2, 8, 3, 5, device=device).contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.restv2.bias_relu_fwd.default, (x, torch.randn(8, device=device)))


def test_launcher_records_on_meta():
    """On meta tensors under plans.recording(), the launcher records the plan's launch (what
    the GPU target check compiles): one program per 1024 elements on a GPU."""
    x = torch.empty(256, 48, 112, 112, device="meta", dtype=BF16).contiguous(memory_format=CL)
    with plans.using_target("sm_90"), plans.recording() as seen:
        out = kernels._fwd(x, torch.empty(48, device="meta", dtype=BF16))
    assert [r.plan for r in seen] == [plans.bias_relu_plan(x.numel(), BF16, plans.TARGETS["sm_90"])]
    assert seen[0].plan.grid == (x.numel() // 1024,) and seen[0].args[-1] == 1  # INNER: channels-last
    assert out.is_contiguous(memory_format=CL)


@pytest.mark.parametrize(
    "change,error,match",
    [
        pytest.param(dict(x=lambda x: x.double()), TypeError, "bias has dtype", id="dtype-mismatch"),
        pytest.param(dict(bias=lambda b: b[:3]), ValueError, "bias must have shape", id="bias-shape"),
        pytest.param(dict(x=lambda x: x[0]), ValueError, "4-D", id="x-3d"),
        pytest.param(dict(x=lambda x: x.tolist()), TypeError, "x must be a torch.Tensor", id="not-tensor"),
        pytest.param(dict(x=lambda x: x.double(), bias=lambda b: b.double()), TypeError, "fp16/bf16/fp32", id="fp64"),
    ],
)
def test_errors(change, error, match, device):
    args = dict(x=torch.randn(1, 4, 3, 3, device=device), bias=torch.randn(4, device=device))
    args = {k: change.get(k, lambda t: t)(t) for k, t in args.items()}
    with pytest.raises(error, match=match):
        bias_relu(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_parity_compiled_16bit(dtype, device):
    """Compiled, in bf16 (which the interpreter cannot run) and fp16: equal to eager's add and
    ReLU, which also round the fp32 sum once."""
    x = torch.randn(4, 48, 56, 57, device=device, dtype=dtype).contiguous(memory_format=CL)
    bias = torch.randn(48, device=device, dtype=dtype)
    torch.testing.assert_close(bias_relu(x, bias), torch.relu(x + bias.view(1, -1, 1, 1)), rtol=0, atol=0)
