"""Triton kernel for the stems' bias + ReLU: ``out = relu(x + bias)``, bias per channel, in one
pass.

Where it runs: at inference the kernel path folds each stem BatchNorm into the conv before it
(``restv2.layers.conv_bn_relu``). The folded conv has a bias, and cuDNN convs take none:
PyTorch would add it in a pass of its own over the conv's output (a read and a write), then
the ReLU would make another. This kernel makes one (x read, out written: 2 + 2 bytes an
element in 16 bits), on the conv's output without its bias.

Layout: x dense in NCHW or channels-last memory (a conv's output is one or the other); the
kernel walks the storage flat and finds each element's channel as ``(i // INNER) % C``
(``INNER`` = 1 channels-last, H * W in NCHW). Other layouts cost one channels-last copy. out
has x's layout. The sum is in fp32 and rounded once, as eager's add; NaN propagates, as in
``torch.relu``.

Backward: aten (``threshold_backward`` on the saved output, then the bias gradient's sum), as
the unfused ops' backward is: the op runs where the BatchNorm is frozen (inference, or a
detector fine-tuned with frozen BatchNorm statistics), not in a training step of the
classifier.
"""

import contextlib

import torch
import triton
import triton.language as tl

from .. import plans
from ..backend import check_kernel_device
from .reference import check_bias_relu_inputs

__all__ = ["bias_relu"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# The sizes only bound the mask and the channel index: not specialised, so a new image size
# reuses the compiled kernel.
@triton.jit(do_not_specialize=["N", "C", "INNER"])
def _bias_relu_kernel(x_ptr, bias_ptr, out_ptr, N, C, INNER, BLOCK: tl.constexpr):
    """x, out: N elements, dense; bias: [C]. out[i] = relu(x[i] + bias[(i // INNER) % C])."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    c = (offs // INNER) % C
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = v + tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
    v = tl.where(v < 0.0, 0.0, v)  # NaN stays NaN (tl.maximum would drop it)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launcher


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernel writes is allocated here (tests patch it to fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _dense(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x or a channels-last copy of it, INNER): x dense in channels-last or NCHW memory."""
    B, C, H, W = x.shape
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, 1
    if x.is_contiguous():
        return x, H * W
    return x.contiguous(memory_format=torch.channels_last), 1


def _fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x: [B, C, H, W] -> out: [B, C, H, W] in x's memory format (channels-last if x is neither)."""
    x, inner = _dense(x)
    B, C, H, W = x.shape
    if inner == 1:  # channels-last: a [B, H, W, C] buffer seen as [B, C, H, W]
        out = _empty((B, H, W, C), x.dtype, x.device).permute(0, 3, 1, 2)
    else:
        out = _empty((B, C, H, W), x.dtype, x.device)
    n = x.numel()
    if n == 0:
        return out
    plan = plans.bias_relu_plan(n, x.dtype, plans.device_target(x.device))
    with _device_ctx(x):
        plans.launch(_bias_relu_kernel, plan, x, bias.contiguous(), out, n, C, inner)
    return out


@torch.library.custom_op("restv2::bias_relu_fwd", mutates_args=())
def bias_relu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _fwd(x, bias)


@bias_relu_fwd.register_fake
def _(x, bias):
    dense = x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous()
    return torch.empty_like(x) if dense else torch.empty_like(x, memory_format=torch.channels_last)


class _BiasReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        out = torch.ops.restv2.bias_relu_fwd(x, bias)
        ctx.save_for_backward(out)  # as an in-place ReLU keeps its output
        return out

    @staticmethod
    def backward(ctx, dout):
        (out,) = ctx.saved_tensors
        dx = torch.ops.aten.threshold_backward(dout, out, 0)
        dbias = dx.sum((0, 2, 3)) if ctx.needs_input_grad[1] else None
        return dx, dbias


# ----------------------------------------------------------------------------- public


def bias_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``relu(x + bias)`` with ``bias`` [C] per channel of x [B, C, H, W], in one Triton pass.

    fp16, bf16 or fp32 (the add in fp32, rounded once). Returns x's memory format when x is
    NCHW or channels-last (else channels-last). Differentiable w.r.t. both.
    """
    check_bias_relu_inputs(x, bias)
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"bias_relu: the Triton kernel takes fp16/bf16/fp32, got {x.dtype} (use the reference for fp64)"
        )
    check_kernel_device(x, bias)
    return _BiasReLU.apply(x, bias)
