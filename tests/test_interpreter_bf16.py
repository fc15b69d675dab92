"""restv2_kernels.interpreter_bf16, which every launch in Triton's interpreter installs (and
conftest.py at the start): bf16 casts and ops compute what torch's bf16 computes (torch rounds
each op's fp32 result to nearest even, as a GPU does), bit for bit, and without it they do not;
where it cannot be installed, a bf16 launch is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from helpers import assert_close

import restv2_kernels
from restv2_kernels import interpreter_bf16, reference

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels run compiled where CUDA is present")

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def emulated():
    assert interpreter_bf16.installed(), "conftest.py installs it where the interpreter runs"


@triton.jit
def _cast_kernel(X, O, n, RTZ: tl.constexpr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(X + i, mask=i < n)
    if RTZ:
        y = x.to(tl.bfloat16, fp_downcast_rounding="rtz")
    else:
        y = x.to(O.dtype.element_ty)
    tl.store(O + i, y, mask=i < n)


def _cast(x: torch.Tensor, dtype: torch.dtype, rtz: bool = False) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=dtype)
    _cast_kernel[(1,)](x, out, x.numel(), RTZ=rtz, N=triton.next_power_of_2(x.numel()))
    return out


@triton.jit
def _binary_kernel(A, B, O, OP: tl.constexpr, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(A + i)
    b = tl.load(B + i)
    if OP == "add":
        out = a + b
    elif OP == "sub":
        out = a - b
    elif OP == "mul":
        out = a * b
    elif OP == "div":
        out = a / b
    elif OP == "maximum":
        out = tl.maximum(a, b)
    elif OP == "minimum":
        out = tl.minimum(a, b)
    elif OP == "where_lt":
        out = tl.where(a < b, a, b * 2.0)
    elif OP == "neg_abs":
        out = -tl.abs(a)
    else:  # OP == "fma": the multiply-add bf16 code writes (a * b + a); one fma on a GPU may round once
        out = tl.fma(a, b, a)
    tl.store(O + i, out)


@triton.jit
def _unary_fp32_kernel(A, O, OP: tl.constexpr, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(A + i)
    if OP == "exp":
        out = tl.exp(a)
    elif OP == "erf":
        out = tl.math.erf(a)
    else:  # OP == "rsqrt"
        out = tl.math.rsqrt(tl.abs(a) + 1.0)
    tl.store(O + i, out)


@triton.jit
def _dot_kernel(A, B, O, N: tl.constexpr):
    rows = tl.arange(0, N)[:, None] * N
    cols = tl.arange(0, N)[None, :]
    a = tl.load(A + rows + cols)
    b = tl.load(B + rows + cols)
    tl.store(O + rows + cols, tl.dot(a, b))


@triton.jit
def _reduce_kernel(X, O, I, N: tl.constexpr):
    rows = tl.arange(0, N)[:, None] * N
    cols = tl.arange(0, N)[None, :]
    x = tl.load(X + rows + cols)
    tl.store(O + tl.arange(0, N), tl.sum(x, axis=1))
    tl.store(O + N + tl.arange(0, N), tl.max(x, axis=1))
    tl.store(O + 2 * N + tl.arange(0, N), tl.min(x, axis=0))
    tl.store(O + 3 * N, tl.max(tl.max(x, axis=1), axis=0))
    tl.store(I + tl.arange(0, N), tl.argmax(x, axis=1))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _assert_same_bits(out: torch.Tensor, expected: torch.Tensor, signed_zeros: bool = True) -> None:
    """Bit for bit, NaN for NaN (any payload: a GPU's is its own); ``signed_zeros=False``: -0 as +0."""
    if not signed_zeros:
        out, expected = out + 0.0, expected + 0.0  # -0 + +0 is +0
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(_bits(out)[~nan], _bits(expected)[~nan]), (out - expected).abs().max()


def _fp32_bits(bits: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.array(bits, dtype=np.uint32).view(np.float32))


def _special_fp32() -> torch.Tensor:
    """fp32 values that a bf16 rounding must get right: ties to even both ways, values just off
    a tie, the largest finite values (round up to inf), subnormals, signed zeros, inf, NaN."""
    ties = _fp32_bits([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7F7FFFFF, 0x7F7F7FFF])
    tiny = _fp32_bits([0x00000001, 0x00008000, 0x00018000, 0x807FFFFF])
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4e38, -1e-40])
    torch.manual_seed(0)
    rand = torch.randn(1024 - 16) * torch.logspace(-30, 30, 1024 - 16)
    return torch.cat([ties, -ties, tiny, special, rand])


def test_casts_to_bf16_round_to_nearest_even_as_torch():
    x = _special_fp32()
    _assert_same_bits(_cast(x, BF16), x.to(BF16))
    half = x[x.abs() < 6e4].half()  # from fp16, through fp32
    out = _cast(half, BF16)
    assert torch.equal(_bits(out), _bits(half.to(BF16)))


def test_rtz_cast_truncates():
    x = _special_fp32()[:16]
    out = _cast(x, BF16, rtz=True)
    finite = x.isfinite()
    assert torch.equal(_bits(out)[finite], (x.view(torch.int32)[finite] >> 16).to(torch.int16))


@pytest.mark.parametrize("dst", [torch.float32, torch.float16, torch.int32], ids=["fp32", "fp16", "int32"])
def test_casts_from_bf16_as_torch(dst):
    x = _special_fp32()
    if dst != torch.float32:
        x = x[x.abs() < 6e4]  # within fp16's range and int32's
    x = x.to(BF16)
    torch.testing.assert_close(_cast(x, dst), x.to(dst), rtol=0, atol=0, equal_nan=True)  # int32: towards zero


def test_int_to_bf16_rounds_as_torch():
    x = torch.tensor([0, 1, -1, 255, 257, 259, 65535, 65537, -(2**31), 2**31 - 1] + list(range(1000, 2014)))
    out = _cast(x.to(torch.int32), BF16)
    assert torch.equal(_bits(out), _bits(x.to(torch.int32).to(BF16)))


# Triton divides bf16 in fp32, the interpreter's own op, which warns of the 0/0 below
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "maximum", "minimum", "where_lt", "neg_abs"])
def test_elementwise_ops_as_torch_bit_for_bit(op):
    torch.manual_seed(1)
    a = (torch.randn(1024) * torch.logspace(-3, 3, 1024)).to(BF16)
    b = torch.randn(1024).to(BF16)
    a[:4] = torch.tensor([1.0, -0.0, float("inf"), 3.0e38])
    b[:4] = torch.tensor([2**-9, 0.0, 1.0, 3.0e38])  # a + b ties at 1 + 2^-9: to even (1.0)
    out = torch.empty_like(a)
    _binary_kernel[(1,)](a, b, out, OP=op, N=a.numel())
    expected = {
        "add": lambda: a + b,
        "sub": lambda: a - b,
        "mul": lambda: a * b,
        "div": lambda: a / b,
        "maximum": lambda: torch.maximum(a, b),
        "minimum": lambda: torch.minimum(a, b),
        "where_lt": lambda: torch.where(a < b, a, b * 2),
        "neg_abs": lambda: -a.abs(),
    }[op]()
    # Triton 3.6 negates as 0 - x (+0 where torch gives -0), in its compiler as in its interpreter
    _assert_same_bits(out, expected, signed_zeros=op != "neg_abs")


def test_fma_rounds_once():
    torch.manual_seed(2)
    a, b = torch.randn(1024).to(BF16), torch.randn(1024).to(BF16)
    out = torch.empty_like(a)
    _binary_kernel[(1,)](a, b, out, OP="fma", N=a.numel())
    exact = a.double() * b.double() + a.double()
    assert torch.equal(_bits(out), _bits(exact.float().to(BF16)))


@pytest.mark.parametrize("op", ["exp", "erf", "rsqrt"])
def test_math_in_fp32_after_an_exact_upcast(op):
    """The kernels upcast before their math: bf16 -> fp32 is exact, then fp32 as before."""
    torch.manual_seed(3)
    a = torch.randn(1024).to(BF16)
    up = _cast(a, torch.float32)
    out = torch.empty(a.shape)
    _unary_fp32_kernel[(1,)](up, out, OP=op, N=a.numel())
    expected = {"exp": torch.exp, "erf": torch.erf, "rsqrt": lambda t: torch.rsqrt(t.abs() + 1)}[op](a.float())
    torch.testing.assert_close(out, expected, rtol=2e-7, atol=0)


def test_dot_multiplies_exactly_and_accumulates_in_fp32():
    torch.manual_seed(4)
    a, b = torch.randn(32, 32).to(BF16), torch.randn(32, 32).to(BF16)
    out = torch.empty(32, 32)
    _dot_kernel[(1,)](a, b, out, N=32)
    exact = a.double() @ b.double()
    # fp32 accumulation of 32 exact products: within 32 fp32 roundings of the exact sums
    bound = 32 * 2**-24 * (a.double().abs() @ b.double().abs())
    assert ((out.double() - exact).abs() <= bound).all()
    torch.testing.assert_close(out, a.float() @ b.float(), rtol=1e-6, atol=1e-6)


def test_reductions_on_values():
    torch.manual_seed(5)
    x = torch.randn(16, 16).to(BF16)
    x[3, 7] = -0.0
    out = torch.empty(3 * 16 + 1, dtype=BF16)
    idx = torch.empty(16, dtype=torch.int32)
    _reduce_kernel[(1,)](x, out, idx, N=16)
    # the sum in fp32, rounded once (a GPU's tree of bf16 adds rounds at each step)
    assert torch.equal(_bits(out[:16]), _bits(x.float().sum(1).to(BF16)))
    assert torch.equal(_bits(out[16:32]), _bits(x.amax(1)))
    assert torch.equal(_bits(out[32:48]), _bits(x.amin(0)))
    assert out[48] == x.max()
    assert torch.equal(idx, x.float().argmax(1).int())


def test_without_it_the_interpreter_computes_on_bits():
    """What the emulation is for: the interpreter's own bf16 add and cast are wrong."""
    a, b = torch.randn(64).to(BF16), torch.randn(64).to(BF16)
    x = _special_fp32()[:4]  # ties: the interpreter's own cast truncates them
    interpreter_bf16.uninstall()
    try:
        assert not interpreter_bf16.installed()
        out = torch.empty_like(a)
        _binary_kernel[(1,)](a, b, out, OP="add", N=64)
        cast = _cast(x, BF16)
    finally:
        assert interpreter_bf16.install()
    assert not torch.allclose(out.float(), (a + b).float(), rtol=0.1, atol=0.1)
    assert not torch.equal(_bits(cast), _bits(x.to(BF16)))


def _attention_bf16() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The package's attention in bf16 on CPU tensors, its float64 reference and eager's bf16."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, L, 2, 64, generator=g, dtype=torch.float64) for L in (97, 13, 13))
    out = restv2_kernels.emsa_attention(*(t.to(BF16) for t in (q, k, v)))
    return out, reference.emsa_attention(q, k, v), reference.emsa_attention(*(t.to(BF16) for t in (q, k, v)))


def test_a_launch_in_the_interpreter_installs_it():
    """A user's bf16 CPU tensors under TRITON_INTERPRET=1 (backend="triton"): the first launch
    patches the interpreter, so the kernels give the reference's numbers, not the bits'."""
    interpreter_bf16.uninstall()
    try:
        out, ref, eager = _attention_bf16()
        assert interpreter_bf16.installed()
    finally:
        interpreter_bf16.install()
    assert_close("attention bf16", out, ref, eager)


def test_a_bf16_launch_is_refused_where_it_does_not_fit(monkeypatch):
    """Where the patch does not fit the installed Triton's interpreter, a bf16 launch raises
    instead of computing on the bits; fp32 still runs."""
    interpreter_bf16.uninstall()
    monkeypatch.setattr(interpreter_bf16, "install", lambda: False)
    try:
        with pytest.raises(RuntimeError, match="computes bf16 on raw 16-bit integers"):
            _attention_bf16()
        q = torch.randn(1, 5, 1, 16)
        torch.testing.assert_close(restv2_kernels.emsa_attention(q, q, q), reference.emsa_attention(q, q, q))
    finally:
        monkeypatch.undo()
        interpreter_bf16.install()
