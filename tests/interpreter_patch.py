"""Triton's CPU interpreter, without its per-call cost of device functions.

The interpreter runs a launch by patching ``triton.language`` in the kernel's globals (its
``_patch_lang``: a few thousand ``setattr`` calls, about 2 ms), running every program, and
restoring. A call of a ``@triton.jit`` device function inside a program, ``tl.sum`` and
``tl.zeros`` included, patches the language of that function's globals again and never
restores it. Within one launch every such call after the first from the same module sets the
same attributes to equal values: nothing changes but the time. In the whole-model parity tests
those calls were about a quarter of the interpreter's time (12,000 of them in one restv2_tiny
forward and backward).

``install()`` keeps the first patch of each module's globals in a launch and skips the rest;
the launch's own patch and its restore are untouched. The kernels compute exactly what they
computed without it (``tests/test_interpreter_patch.py`` runs them both ways and compares them
bit for bit). Where the interpreter is not built this way (another Triton), ``install()``
changes nothing and returns False.
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


def uninstall() -> None:
    """Undo ``install()`` (the tests compare kernels run both ways)."""
    from triton.runtime import interpreter

    if installed():
        interpreter._patch_lang = interpreter._patch_lang.restv2_original
        interpreter.GridExecutor.__call__ = interpreter.GridExecutor.__call__.restv2_original


def installed() -> bool:
    from triton.runtime import interpreter

    return getattr(interpreter._patch_lang, "restv2_original", None) is not None
