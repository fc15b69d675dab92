"""Triton's CPU interpreter, without its per-call cost of device functions and of dtype lookups.

The interpreter runs a launch by patching ``triton.language`` in the kernel's globals (its
``_patch_lang``: a few thousand ``setattr`` calls, about 2 ms), running every program, and
restoring. A call of a ``@triton.jit`` device function inside a program, ``tl.sum`` and
``tl.zeros`` included, patches the language of that function's globals again and never
restores it. Within one launch every such call after the first from the same module sets the
same attributes to equal values: nothing changes but the time. In the whole-model parity tests
those calls were about a quarter of the interpreter's time (12,000 of them in one restv2_tiny
forward and backward).

``install()`` keeps the first patch of each module's globals in a launch and skips the rest;
the launch's own patch and its restore are untouched.

It also remembers the interpreter's ``_get_np_dtype``: the NumPy dtype that holds a Triton type's
values, looked up by every load, store, splat and cast. Each call built a dict of 17 NumPy dtypes
to read one (150,000 calls in one restv2_tiny forward and backward at 64x64, batch 2; that
step took 15.4 s before and 13.0 s after). The answer depends on the scalar type alone (a block
type answers for its element type, and every pointer type is ``uint64``), so the first answer
per scalar type (one for all pointer types) is kept; the original computes each first answer,
and raises as before for a type it does not know.

The kernels compute exactly what they computed without either (``tests/test_interpreter_patch.py``
runs them both ways and compares them bit for bit, and holds the lookup to the original's
answers). Where the interpreter is not built this way (another Triton), ``install()`` changes
nothing and returns False.
"""

from __future__ import annotations

import functools
import types


class _Skipped:
    """What a skipped patch returns: the interpreter never restores a device call's patch."""

    def restore(self) -> None:
        pass


def install() -> bool:
    """Patch the interpreter in this process; True where it was patched (or already was)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    executor = getattr(interpreter, "GridExecutor", None)
    patch_lang = getattr(interpreter, "_patch_lang", None)
    if executor is None or patch_lang is None or not hasattr(interpreter, "InterpretedFunction"):
        return False
    if installed():
        return True
    np_dtype = getattr(interpreter, "_get_np_dtype", None)
    if np_dtype is not None:
        interpreter._get_np_dtype = _remembered(np_dtype)
    launch = types.SimpleNamespace(active=False, patched=set())

    @functools.wraps(patch_lang)
    def once_a_module(fn):
        if not launch.active:  # outside a launch: as before
            return patch_lang(fn)
        key = id(fn.__globals__)
        if key in launch.patched:
            return _Skipped()
        launch.patched.add(key)
        return patch_lang(fn)

    run = executor.__call__

    @functools.wraps(run)
    def run_once_patched(self, *args, **kwargs):
        if launch.active:  # no launch inside a launch: leave it to the original
            return run(self, *args, **kwargs)
        launch.active, launch.patched = True, set()
        try:
            return run(self, *args, **kwargs)
        finally:
            launch.active, launch.patched = False, set()

    once_a_module.restv2_original = patch_lang
    run_once_patched.restv2_original = run
    interpreter._patch_lang = once_a_module
    executor.__call__ = run_once_patched
    return True


def _remembered(np_dtype):
    """``np_dtype`` (the interpreter's ``_get_np_dtype``) answering from memory after the first
    call per scalar type; every pointer type shares one answer, as in the original."""
    import triton.language as tl

    memory = {}

    @functools.wraps(np_dtype)
    def remembered(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        key = tl.pointer_type if isinstance(scalar, tl.pointer_type) else scalar
        try:
            return memory[key]
        except KeyError:
            answer = memory[key] = np_dtype(tt_dtype)
            return answer

    remembered.restv2_original = np_dtype
    return remembered


def uninstall() -> None:
    """Undo ``install()`` (the tests compare kernels run both ways)."""
    from triton.runtime import interpreter

    if installed():
        interpreter._patch_lang = interpreter._patch_lang.restv2_original
        interpreter.GridExecutor.__call__ = interpreter.GridExecutor.__call__.restv2_original
        original = getattr(getattr(interpreter, "_get_np_dtype", None), "restv2_original", None)
        if original is not None:
            interpreter._get_np_dtype = original


def installed() -> bool:
    from triton.runtime import interpreter

    return getattr(interpreter._patch_lang, "restv2_original", None) is not None
