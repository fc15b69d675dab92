"""Parity, gradients, layouts and errors of the stems' fused bias + ReLU (inference) and
BatchNorm + ReLU (training).

The kernel against a float64 reference on the same (dtype-rounded) inputs, judged by the
error of eager PyTorch in the kernel's dtype (``helpers.assert_close``). Without a GPU these
run in Triton's interpreter (see conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, model_width_dtypes, nan_buffers_for

from restv2_kernels import plans, reference
from restv2_kernels.bn_relu import triton as kernels
from restv2_kernels.bn_relu.triton import batch_norm_relu, bias_relu

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


@pytest.mark.parametrize("dtype", model_width_dtypes(BF16, FP16))
def test_parity_16bit(dtype, device):
    """bf16 (in the interpreter too, bf16 emulated) and fp16 (compiled) at a stem's width: equal
    to eager's add and ReLU, which also round the fp32 sum once."""
    x = torch.randn(4, 48, 56, 57, device=device, dtype=dtype).contiguous(memory_format=CL)
    bias = torch.randn(48, device=device, dtype=dtype)
    torch.testing.assert_close(bias_relu(x, bias), torch.relu(x + bias.view(1, -1, 1, 1)), rtol=0, atol=0)


# ----------------------------------------------------------------------------- BatchNorm + ReLU


def _run_bn(fn, x, params, dout, dtype, device, layout, mode, param_dtype=None):
    """(out, dx, dweight, dbias, running_mean, running_var) of ``fn`` in ``mode``: "train"
    (batch statistics, running ones updated), "eval" (running statistics) or "untracked"
    (batch statistics, no running ones); parameters and statistics in ``param_dtype`` (as
    autocast leaves them: fp32) or x's dtype."""
    param_dtype = param_dtype or dtype
    x = _layout(x.to(device=device, dtype=dtype, copy=True), layout).detach().requires_grad_()
    weight, bias, running_mean, running_var = (p.to(device=device, dtype=param_dtype, copy=True) for p in params)
    weight.requires_grad_(), bias.requires_grad_()
    if mode == "untracked":
        running_mean = running_var = None
    out = fn(x, running_mean, running_var, weight, bias, mode != "eval", 0.1, 1e-5)
    out.backward(dout.to(device=device, dtype=dtype))
    return out, x.grad, weight.grad, bias.grad, running_mean, running_var


def _bn_inputs(shape, seed=0, loc=0.5, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g) * spread + loc
    dout = torch.randn(shape, generator=g)
    params = (
        torch.randn(C, generator=g),  # weight: some negative, so the ReLU masks either side
        torch.randn(C, generator=g),
        torch.randn(C, generator=g),  # running_mean
        torch.rand(C, generator=g) + 0.5,  # running_var
    )
    return x, params, dout


@pytest.mark.parametrize(
    "shape,dtype,layout,mode",
    [
        pytest.param((2, 24, 7, 9), FP32, "channels_last", "train", id="C24-7x9-cl-fp32-train"),
        pytest.param((3, 5, 4, 6), FP32, "nchw", "train", id="C5-4x6-nchw-fp32-train"),
        pytest.param((2, 7, 3, 5), FP32, "strided", "train", id="C7-3x5-strided-fp32-train"),
        pytest.param((2, 48, 5, 3), FP16, "channels_last", "train", id="C48-5x3-cl-fp16-train"),
        pytest.param((1, 200, 3, 2), FP32, "channels_last", "eval", id="C200-3x2-cl-fp32-eval"),
        pytest.param((2, 16, 4, 5), FP16, "nchw", "eval", id="C16-4x5-nchw-fp16-eval"),
        pytest.param((2, 6, 5, 5), FP32, "channels_last", "untracked", id="C6-5x5-cl-fp32-untracked"),
    ],
)
def test_batch_norm_relu_parity(shape, dtype, layout, mode, device, nan_buffers):
    """Output, the three gradients and the updated running statistics against float64 on the
    same rounded inputs; the 16-bit cases keep fp32 parameters and statistics, as autocast."""
    x, params, dout = _bn_inputs(shape)
    param_dtype = FP32 if dtype == FP16 else dtype
    x = x.to(dtype).double()
    params = tuple(p.to(param_dtype).double() for p in params)
    got = _run_bn(batch_norm_relu, x, params, dout, dtype, device, layout, mode, param_dtype)
    ref = _run_bn(reference.batch_norm_relu, x, params, dout, torch.float64, "cpu", layout, mode)
    eager = _run_bn(reference.batch_norm_relu, x, params, dout, dtype, device, layout, mode, param_dtype)
    out = got[0]
    assert out.dtype == dtype and out.shape == shape and out.is_contiguous(memory_format=CL)
    names = ("out", "dx", "dweight", "dbias", "running_mean", "running_var")
    for name, a, r, e in zip(names, got, ref, eager):
        if r is None:
            assert a is None, name
            continue
        assert_close(name, a, r, e)
    # out and dx, and the fp32 partial sums of the statistics (train) and of the gradient sums
    written = [s for s, _ in nan_buffers]
    assert written.count((shape[0], shape[2], shape[3], shape[1])) == 2, written


def test_batch_norm_relu_many_programs(device, nan_buffers):
    """Tiles of 4 pixels x 16 channels, 3 reduction programs: 3 channel blocks (the last one
    partial) and program boundaries inside the pixel range; the statistics combine 3 slots."""
    shape = (3, 40, 5, 7)
    x, params, dout = _bn_inputs(shape, seed=1)
    x = x.double()
    tiles = dict(block_p=4, block_c=16)
    with plans.forced(
        bn_stats=dict(programs=3, **tiles),
        bn_relu_fwd=tiles,
        bn_relu_bwd_sums=dict(programs=3, **tiles),
        bn_relu_bwd_dx=tiles,
    ):
        got = _run_bn(batch_norm_relu, x, params, dout, FP32, device, "channels_last", "train")
    ref = _run_bn(reference.batch_norm_relu, x, params, dout, torch.float64, "cpu", "channels_last", "train")
    eager = _run_bn(reference.batch_norm_relu, x, params, dout, FP32, device, "channels_last", "train")
    for name, a, r, e in zip(("out", "dx", "dweight", "dbias", "running_mean", "running_var"), got, ref, eager):
        assert_close(name, a, r, e)
    assert ((3, 3, 40), FP32) in nan_buffers and ((3, 2, 40), FP32) in nan_buffers


def test_batch_norm_relu_statistics_with_a_large_mean(device):
    """x = 1000 + N(0, 1e-3 ** 2) in fp32: the variance from a sum and a sum of squares would
    lose every digit to cancellation (fp32 keeps about 7); the per-block centred sums keep it
    as close to float64 as eager's BatchNorm."""
    shape = (4, 8, 9, 11)
    x, params, dout = _bn_inputs(shape, seed=2, loc=1000.0, spread=1e-3)
    x = x.double()
    got = _run_bn(batch_norm_relu, x, params, dout, FP32, device, "channels_last", "train")
    ref = _run_bn(reference.batch_norm_relu, x, params, dout, torch.float64, "cpu", "channels_last", "train")
    eager = _run_bn(reference.batch_norm_relu, x, params, dout, FP32, device, "channels_last", "train")
    for name, a, r, e in zip(("out", "running_var"), got[::5], ref[::5], eager[::5]):
        assert_close(name, a, r, e)


def test_batch_norm_relu_empty_batch(device):
    """As F.batch_norm: an empty output, zero gradients, the running statistics unchanged."""
    x = torch.randn(0, 4, 3, 3, device=device, requires_grad=True)
    weight = torch.randn(4, device=device, requires_grad=True)
    mean, var = torch.randn(4, device=device), torch.rand(4, device=device)
    before = mean.clone(), var.clone()
    out = batch_norm_relu(x, mean, var, weight, None, True)
    out.sum().backward()
    assert out.shape == (0, 4, 3, 3) and x.grad.shape == (0, 4, 3, 3)
    assert weight.grad.eq(0).all() and mean.equal(before[0]) and var.equal(before[1])


def test_batch_norm_relu_one_value_per_channel(device):
    """Training on one value a channel is refused with F.batch_norm's message; eval runs."""
    x = torch.randn(1, 4, 1, 1, device=device)
    mean, var = torch.zeros(4, device=device), torch.ones(4, device=device)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_relu(x, mean, var, training=True)
    torch.testing.assert_close(batch_norm_relu(x, mean, var), torch.relu(x / (1 + 1e-5) ** 0.5))


def test_batch_norm_relu_custom_ops_opcheck(device):
    x = torch.randn(2, 8, 3, 5, device=device).contiguous(memory_format=CL)
    dout = torch.randn_like(x)
    vectors = [torch.randn(8, device=device) for _ in range(4)]
    mean, rstd, weight, bias = vectors[0], vectors[1].abs() + 0.5, vectors[2], vectors[3]
    torch.library.opcheck(torch.ops.restv2.bn_stats.default, (x,))
    torch.library.opcheck(torch.ops.restv2.bn_relu_fwd.default, (x, mean, rstd, weight, bias))
    torch.library.opcheck(torch.ops.restv2.bn_relu_bwd_sums.default, (dout, x, mean, rstd, weight, bias))
    sums = torch.randn(2, 8, device=device)
    args = (dout, x, mean, rstd, weight, bias, sums[0], sums[1], True)
    torch.library.opcheck(torch.ops.restv2.bn_relu_bwd_dx.default, args)


def test_batch_norm_relu_launchers_record_on_meta():
    """restv2_tiny's first stem map at b256 (48 channels, 112x112) on sm_90: the statistics and
    the gradient sums on 2 programs per SM, the passes one program per [64, 64] tile."""
    x = torch.empty(256, 48, 112, 112, device="meta", dtype=BF16).contiguous(memory_format=CL)
    vec = torch.empty(48, device="meta")
    target = plans.TARGETS["sm_90"]
    P = 256 * 112 * 112
    with plans.using_target("sm_90"), plans.recording() as seen:
        kernels._stats(x)
        kernels._bn_relu(x, vec, vec, vec, vec)
        kernels._bwd_sums(x, x, vec, vec, vec, vec)
        kernels._bwd_dx(x, x, vec, vec, vec, vec, vec, vec, True)
    bwd = plans.bn_relu_bwd_plan(P, 48, BF16, target)
    expected = [plans.bn_stats_plan(P, 48, BF16, target).launch, plans.bn_relu_fwd_plan(P, 48, BF16, target)]
    assert [r.plan for r in seen] == expected + [bwd.sums.launch, bwd.dx]
    assert seen[0].plan.grid == (264, 1) and seen[1].plan.grid == (P // 16, 1)


@pytest.mark.parametrize(
    "change,error,match",
    [
        pytest.param(dict(x=lambda x: x[0]), ValueError, "4-D", id="x-3d"),
        pytest.param(dict(weight=lambda w: w[:3]), ValueError, "weight must have shape", id="weight-shape"),
        pytest.param(dict(running_var=lambda v: None), ValueError, "both be tensors or both be None", id="one-stat"),
        pytest.param(
            dict(running_mean=lambda v: None, running_var=lambda v: None, training=lambda t: False),
            ValueError,
            "running statistics are required",
            id="eval-without-stats",
        ),
        pytest.param(dict(eps=lambda e: -1.0), ValueError, "eps must be a non-negative", id="eps"),
        pytest.param(dict(momentum=lambda m: True), ValueError, "momentum must be", id="momentum-bool"),
        pytest.param(dict(training=lambda t: 1), TypeError, "training must be a bool", id="training-int"),
        pytest.param(dict(x=lambda x: x.double()), TypeError, "fp16/bf16/fp32", id="fp64"),
        pytest.param(dict(bias=lambda b: b.tolist()), TypeError, "bias must be a torch.Tensor", id="not-tensor"),
        pytest.param(dict(weight=lambda w: w.int()), TypeError, "weight has dtype", id="int-weight"),
    ],
)
def test_batch_norm_relu_errors(change, error, match, device):
    args = dict(
        x=torch.randn(2, 4, 3, 3, device=device),
        running_mean=torch.zeros(4, device=device),
        running_var=torch.ones(4, device=device),
        weight=torch.randn(4, device=device),
        bias=torch.randn(4, device=device),
        training=True,
        momentum=0.1,
        eps=1e-5,
    )
    args = {k: change.get(k, lambda t: t)(t) for k, t in args.items()}
    with pytest.raises(error, match=match):
        batch_norm_relu(**args)


@pytest.mark.parametrize("dtype", model_width_dtypes(BF16, FP16))
def test_batch_norm_relu_16bit(dtype, device):
    """bf16 (in the interpreter too, bf16 emulated) and fp16 (compiled) on a stem's map with fp32
    parameters, as autocast runs it: as close to float64 as cuDNN's BatchNorm and the ReLU."""
    shape = (4, 48, 56, 57)
    x, params, dout = _bn_inputs(shape, seed=3)
    x = x.to(dtype).double()
    got = _run_bn(batch_norm_relu, x, params, dout, dtype, device, "channels_last", "train", FP32)
    ref = _run_bn(reference.batch_norm_relu, x, params, dout, torch.float64, "cpu", "channels_last", "train")
    eager = _run_bn(reference.batch_norm_relu, x, params, dout, dtype, device, "channels_last", "train", FP32)
    for name, a, r, e in zip(("out", "dx", "dweight", "dbias", "running_mean", "running_var"), got, ref, eager):
        assert_close(name, a, r, e, dtype=dtype)
