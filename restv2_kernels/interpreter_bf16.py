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
the bits, as on a GPU. fp16, fp32 and integers go to the interpreter's own ops, untouched
(NumPy has them); the bf16 ones leave NumPy's warnings of IEEE arithmetic (overflow, 0/0)
unsaid, as a GPU computes them silently. Triton 3.6's interpreter has no bf16 constants
(``get_bf16``): they are added, rounded as the cast above. The kernels' bf16 tests (the ``bf16`` marker) run on this; where
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
_IEEE = dict(over="ignore", invalid="ignore", divide="ignore")  # overflow to inf, 0/0 to NaN: silent, as on a GPU


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


def _interpreter():
    """Triton's interpreter module and its language, or None where Triton is not installed."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return None
    return interpreter, tl


def install() -> bool:
    """Patch the interpreter in this process; True where it was patched (or already was)."""
    if installed():
        return True
    found = _interpreter()
    if found is None:
        return False
    interpreter, tl = found
    builder = getattr(interpreter, "InterpreterBuilder", None)
    reduce_ops = getattr(interpreter, "ReduceOps", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or reduce_ops is None or handle is None:
        return False
    if not all(hasattr(interpreter, h) for h in ("_get_np_dtype", "np_erf_fp32", "_ir")):
        return False
    bf16, rtz = tl.bfloat16, getattr(interpreter._ir.ROUNDING_MODE, "RTZ", None)

    def is_bf16(h) -> bool:
        return h is not None and h.dtype.scalar == bf16

    def values(h) -> np.ndarray:
        """A handle's numbers: bf16 bits as their fp32 values, anything else as it is."""
        return bf16_to_f32(h.data) if is_bf16(h) else h.data

    def rounded(data, truncate: bool = False):
        return handle(f32_to_bf16(data, truncate), bf16)

    # casting ops (create_fp_trunc, create_fp_ext, create_si_to_fp ... call self.cast_impl)
    def cast(self, src, dst_type, rounding_mode=None):
        dst = dst_type.scalar
        if dst == bf16:
            return rounded(values(src), truncate=rtz is not None and rounding_mode == rtz)
        np_dtype = interpreter._get_np_dtype(dst)
        data = values(src)
        if np.issubdtype(np_dtype, np.integer) or np_dtype == np.bool_:
            data = np.trunc(data)
        return handle(data.astype(np_dtype), dst)

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        product = np.matmul(values(a).astype(np.float32), values(b).astype(np.float32), dtype=np.float32)
        out = product + values(d)
        return rounded(out) if is_bf16(d) else handle(out.astype(d.data.dtype), d.dtype.scalar)

    # reductions: tl.sum, tl.max and tl.min take these fast paths; a custom combine_fn already
    # goes through the ops above
    def as_fp32(t):
        return tl.core.tensor(handle(bf16_to_f32(t.handle.data), tl.float32), t.type.with_element_ty(tl.float32))

    def back_to_bf16(t):
        return tl.core.tensor(rounded(t.handle.data), t.type.with_element_ty(bf16))

    def reduce_sum(self, input):
        return back_to_bf16(original_sum(self, as_fp32(input)))

    def min_max(self, input, val_reduce_op, idx_reduce_op=None):
        value = input[0] if isinstance(input, tuple) else input
        result = original_min_max(self, as_fp32(value), val_reduce_op, idx_reduce_op)
        if val_reduce_op is None:  # the index alone
            return result
        if idx_reduce_op is None:
            return back_to_bf16(result)
        return back_to_bf16(result[0]), result[1]

    def reduced(input, *_, **__) -> bool:
        return (input[0] if isinstance(input, tuple) else input).dtype.scalar == bf16

    # (class, method, where the bf16 version applies, the bf16 version); elsewhere the original
    # runs untouched (arithmetic: create_fadd, create_fcmpOLT, create_maximumf ... call
    # self.binary_op; create_fneg, create_exp ... self.unary_op; a select is a ternary np.where)
    patches = [
        (builder, "cast_impl", lambda src, dst_type: is_bf16(src) or dst_type.scalar == bf16, cast),
        (builder, "create_fp_to_fp", lambda src, dst_type, *_: is_bf16(src) or dst_type.scalar == bf16, cast),
        (
            builder,
            "binary_op",
            lambda lhs, rhs, op: (is_bf16(lhs) or is_bf16(rhs)) and op not in _BITWISE,
            lambda self, lhs, rhs, op: (
                handle(out, lhs.dtype.scalar)
                if (out := op(values(lhs), values(rhs))).dtype == np.bool_
                else rounded(out)
            ),
        ),
        (
            builder,
            "ternary_op",
            lambda lhs, rhs, other, op: op is not np.where and is_bf16(other),
            lambda self, lhs, rhs, other, op: rounded(op(values(lhs), values(rhs), values(other))),
        ),
        (builder, "unary_op", lambda arg, op: is_bf16(arg), lambda self, arg, op: rounded(op(values(arg)))),
        (
            builder,
            "create_fma",
            lambda x, y, z: is_bf16(x) or is_bf16(y) or is_bf16(z),
            lambda self, x, y, z: rounded(np.multiply(values(x), values(y), dtype=np.float64) + values(z)),
        ),
        (builder, "create_dot", lambda a, b, d, *_: is_bf16(a) or is_bf16(b) or is_bf16(d), dot),
        (builder, "create_erf", is_bf16, lambda self, arg: rounded(interpreter.np_erf_fp32(values(arg)))),
        (builder, "create_rsqrt", is_bf16, lambda self, arg: rounded(1 / np.sqrt(values(arg)))),
        (reduce_ops, "sum", reduced, reduce_sum),
        (reduce_ops, "min_max", reduced, min_max),
    ]
    if not all(hasattr(cls, name) for cls, name, _, _ in patches):
        return False
    original_sum, original_min_max = reduce_ops.sum, reduce_ops.min_max
    for cls, name, applies, bf16_version in patches:
        setattr(cls, name, _patched(getattr(cls, name), applies, bf16_version))
    if not hasattr(builder, "get_bf16"):  # Triton 3.6's has none: a bf16 constant (x * 2.0) failed
        builder.get_bf16 = _added_get_bf16
    return True


def _patched(original, applies, bf16_version):
    """``original`` where ``applies`` is false (untouched: fp16, fp32, integers, bit operations),
    else ``bf16_version``, with NumPy's IEEE warnings silenced as a GPU computes silently."""

    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        if not applies(*args, **kwargs):
            return original(self, *args, **kwargs)
        with np.errstate(**_IEEE):
            return bf16_version(self, *args, **kwargs)

    patched.restv2_bf16_original = original
    return patched


def _added_get_bf16(self, value):
    return self.create_fp_trunc(self.get_fp32(value), self.get_bf16_ty())


def uninstall() -> None:
    """Undo ``install()`` (the tests show what the interpreter computes without it)."""
    found = _interpreter()
    if found is None:
        return
    interpreter = found[0]
    for cls in (interpreter.InterpreterBuilder, interpreter.ReduceOps):
        for name, attr in list(vars(cls).items()):
            if hasattr(attr, "restv2_bf16_original"):
                setattr(cls, name, attr.restv2_bf16_original)
    if vars(interpreter.InterpreterBuilder).get("get_bf16") is _added_get_bf16:
        del interpreter.InterpreterBuilder.get_bf16


def installed() -> bool:
    found = _interpreter()
    builder = getattr(found[0], "InterpreterBuilder", None) if found else None
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
