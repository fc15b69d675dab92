"""bf16 arithmetic in Triton's CPU interpreter, as a GPU computes it.

NumPy has no bfloat16, so the interpreter keeps a bf16 value as its raw 16 bits and hands
those to NumPy: ``a * b + a`` on two bf16 blocks multiplies and adds integers, ``tl.dot``,
``tl.sum`` and ``tl.maximum`` work on bit patterns, and its fp32 -> bf16 cast truncates where
a GPU rounds to nearest even. Only the cast from bf16 to fp32 is right: this package's kernels
gave wrong numbers in bf16 on CPU tensors (``backend="triton"`` under ``TRITON_INTERPRET=1``),
without an error, and bf16 could be checked only by compiling, its numbers only on a GPU.

``plans.launch`` calls ``prepare()`` before every launch in the interpreter: it installs the
patch once, or, where it does not fit the installed Triton's interpreter, refuses a launch with
a bf16 tensor (a RuntimeError saying so) instead of computing on the bits. ``install()`` makes
the interpreter's builder compute on the values the bits stand for:

- a cast to bf16 rounds to nearest even (``cvt.rn.bf16.f32``; NaN stays NaN, an explicit
  ``rtz`` truncates); from bf16 it is exact (to an integer: towards zero, ``cvt.rzi``);
- an arithmetic op, math function, comparison or min/max on bf16 operands computes on their
  fp32 values and rounds a bf16 result once (a product of two bf16 values is exact in fp32;
  a sum can round twice, which moves it by one bf16 ulp only in rare ties);
- ``tl.dot`` of bf16 operands multiplies their values exactly and accumulates in the
  accumulator's dtype, fp32 as on the tensor cores;
- ``tl.sum``, ``tl.max`` and ``tl.min`` of a bf16 block reduce its fp32 values and round the
  result once (a GPU rounds at each step of its tree: this is the more accurate of the two, so
  a kernel that sums bf16 blocks gets no slack here that a GPU would not need).

Bit operations (``&``, ``|``, ``^``, shifts, bitcasts, ``tl.where``, loads and stores) stay on
the bits, as on a GPU. fp16 and fp32 are untouched (NumPy has them), but for NumPy's warnings
of what IEEE arithmetic does (overflow, 0/0), which the patched ops silence: a GPU computes
those silently. Triton 3.6's interpreter has no bf16 constants (``get_bf16``): they are added,
rounded as the cast above. The kernels' bf16 tests (the ``bf16`` marker) run on this; where
the interpreter is built otherwise (another Triton), ``install()`` changes nothing and returns
False, and tests/conftest.py skips them. ``tests/test_interpreter_bf16.py`` checks each op
against torch's bf16, bit for bit. Nothing here runs on a GPU: compiled kernels never reach it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
import torch

_BITWISE = (np.bitwise_and, np.bitwise_or, np.bitwise_xor, np.left_shift, np.right_shift)
_BUILDER = (
    "cast_impl",
    "create_fp_to_fp",
    "binary_op",
    "ternary_op",
    "unary_op",
    "create_fma",
    "create_dot",
    "create_erf",
    "create_rsqrt",
)
_REDUCE = ("sum", "min_max")


def bf16_to_f32(bits) -> np.ndarray:
    """The fp32 values of raw bf16 bits (exact)."""
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(values, truncate: bool = False) -> np.ndarray:
    """Raw bf16 bits of ``values`` (as fp32), rounded to nearest even (``truncate``: towards
    zero); a NaN stays a quiet NaN of the same sign."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    if truncate:
        rounded = bits >> np.uint32(16)
    else:
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x0040), rounded).astype(np.uint16)


def _quiet(fn):
    """NumPy warns of what IEEE arithmetic does (overflow to inf, 0/0 to NaN); a GPU does it silently."""

    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return fn(*args, **kwargs)

    return quiet


def install() -> bool:
    """Patch the interpreter in this process; True where it was patched (or already was)."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    reduce_ops = getattr(interpreter, "ReduceOps", None)
    handle = getattr(interpreter, "TensorHandle", None)
    helpers = ("_get_np_dtype", "np_erf_fp32", "_ir")
    if builder is None or reduce_ops is None or handle is None or not all(hasattr(interpreter, h) for h in helpers):
        return False
    if not all(hasattr(builder, n) for n in _BUILDER) or not all(hasattr(reduce_ops, n) for n in _REDUCE):
        return False
    if installed():
        return True
    bf16, rtz = tl.bfloat16, getattr(interpreter._ir.ROUNDING_MODE, "RTZ", None)
    original = {n: getattr(builder, n) for n in _BUILDER}
    original_reduce = {n: getattr(reduce_ops, n) for n in _REDUCE}

    def is_bf16(h) -> bool:
        return h is not None and h.dtype.scalar == bf16

    def values(h) -> np.ndarray:
        """A handle's numbers: bf16 bits as their fp32 values, anything else as it is."""
        return bf16_to_f32(h.data) if is_bf16(h) else h.data

    def rounded(data, truncate: bool = False):
        return handle(f32_to_bf16(data, truncate), bf16)

    # casting ops (create_fp_trunc, create_fp_ext, create_si_to_fp ... call self.cast_impl)
    def cast_impl(self, src, dst_type):
        dst = dst_type.scalar
        if not (is_bf16(src) or dst == bf16):
            return original["cast_impl"](self, src, dst_type)
        if dst == bf16:
            return rounded(values(src))
        data = values(src)
        np_dtype = interpreter._get_np_dtype(dst)
        if np.issubdtype(np_dtype, np.integer) or np_dtype == np.bool_:
            data = np.trunc(data)
        return handle(data.astype(np_dtype), dst)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar == bf16 and not is_bf16(src):
            return rounded(values(src), truncate=rtz is not None and rounding_mode == rtz)
        if is_bf16(src):
            return cast_impl(self, src, dst_type)
        return original["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    # arithmetic (create_fadd, create_fmul, create_fcmpOLT, create_maximumf ... call self.binary_op)
    def binary_op(self, lhs, rhs, op):
        if not (is_bf16(lhs) or is_bf16(rhs)) or op in _BITWISE:
            return original["binary_op"](self, lhs, rhs, op)
        out = op(values(lhs), values(rhs))
        return handle(out, lhs.dtype.scalar) if out.dtype == np.bool_ else rounded(out)

    def ternary_op(self, lhs, rhs, other, op):
        if op is np.where or not is_bf16(other):  # a select moves bits
            return original["ternary_op"](self, lhs, rhs, other, op)
        return rounded(op(values(lhs), values(rhs), values(other)))

    def unary_op(self, arg, op):
        if not is_bf16(arg):
            return original["unary_op"](self, arg, op)
        return rounded(op(values(arg)))

    def create_fma(self, x, y, z):
        if not (is_bf16(x) or is_bf16(y) or is_bf16(z)):
            return original["create_fma"](self, x, y, z)
        return rounded((np.multiply(values(x), values(y), dtype=np.float64) + values(z)).astype(np.float32))

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (is_bf16(a) or is_bf16(b) or is_bf16(d)):
            return original["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)
        product = np.matmul(values(a).astype(np.float32), values(b).astype(np.float32), dtype=np.float32)
        out = product + values(d)
        return rounded(out) if is_bf16(d) else handle(out.astype(d.data.dtype), d.dtype.scalar)

    def create_erf(self, arg):
        if not is_bf16(arg):
            return original["create_erf"](self, arg)
        return rounded(interpreter.np_erf_fp32(values(arg)))

    def create_rsqrt(self, arg):
        if not is_bf16(arg):
            return original["create_rsqrt"](self, arg)
        return rounded(1 / np.sqrt(values(arg)))

    # reductions: tl.sum, tl.max and tl.min take these fast paths; a custom combine_fn already
    # goes through the ops above
    def as_fp32(t):
        return tl.core.tensor(handle(bf16_to_f32(t.handle.data), tl.float32), t.type.with_element_ty(tl.float32))

    def back_to_bf16(t):
        return tl.core.tensor(rounded(t.handle.data), t.type.with_element_ty(bf16))

    def reduce_sum(self, input):
        if input.dtype.scalar != bf16:
            return original_reduce["sum"](self, input)
        return back_to_bf16(original_reduce["sum"](self, as_fp32(input)))

    def min_max(self, input, val_reduce_op, idx_reduce_op=None):
        value = input[0] if isinstance(input, tuple) else input
        if value.dtype.scalar != bf16:
            return original_reduce["min_max"](self, input, val_reduce_op, idx_reduce_op)
        result = original_reduce["min_max"](self, as_fp32(value), val_reduce_op, idx_reduce_op)
        if val_reduce_op is None:  # the index alone
            return result
        if idx_reduce_op is None:
            return back_to_bf16(result)
        return back_to_bf16(result[0]), result[1]

    for cls, originals, patches in (
        (builder, original, dict(zip(_BUILDER, (cast_impl, create_fp_to_fp, binary_op, ternary_op, unary_op)))),
        (builder, original, dict(create_fma=create_fma, create_dot=create_dot)),
        (builder, original, dict(create_erf=create_erf, create_rsqrt=create_rsqrt)),
        (reduce_ops, original_reduce, dict(sum=reduce_sum, min_max=min_max)),
    ):
        for name, fn in patches.items():
            patched = functools.wraps(originals[name])(_quiet(fn))
            patched.restv2_bf16_original = originals[name]
            setattr(cls, name, patched)
    if not hasattr(builder, "get_bf16"):  # Triton 3.6's has none: a bf16 constant (x * 2.0) failed
        builder.get_bf16 = _added_get_bf16
    return True


def _added_get_bf16(self, value):
    return self.create_fp_trunc(self.get_fp32(value), self.get_bf16_ty())


def uninstall() -> None:
    """Undo ``install()`` (the tests show what the interpreter computes without it)."""
    from triton.runtime import interpreter

    if not installed():
        return
    for cls, names in ((interpreter.InterpreterBuilder, _BUILDER), (interpreter.ReduceOps, _REDUCE)):
        for name in names:
            setattr(cls, name, getattr(cls, name).restv2_bf16_original)
    if interpreter.InterpreterBuilder.__dict__.get("get_bf16") is _added_get_bf16:
        del interpreter.InterpreterBuilder.get_bf16


def installed() -> bool:
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    return getattr(getattr(builder, "binary_op", None), "restv2_bf16_original", None) is not None


def prepare(args: Iterable) -> None:
    """Before a launch in Triton's interpreter: ``install()``; where it does not fit this
    Triton, a launch with a bf16 tensor among ``args`` raises instead of computing on the bits."""
    if install():
        return
    if any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
        import triton

        raise RuntimeError(
            "Triton's CPU interpreter computes bf16 on raw 16-bit integers (NumPy has no bfloat16), and "
            f"restv2_kernels.interpreter_bf16 does not fit Triton {triton.__version__}'s interpreter to make it "
            "compute on the values: run bf16 on a GPU, fp16 or fp32 on the CPU, or use backend='reference'"
        )
