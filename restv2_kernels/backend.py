"""Which implementation of the EMSAv2 ops runs: ``"auto"``, ``"triton"`` or ``"reference"``.

- ``"auto"``: the Triton kernels when the activations are CUDA tensors and a Triton that can
  run them is installed (3.6 or later; and no ONNX export is tracing), the eager reference
  otherwise.
- ``"triton"``: always the kernels; a clear error where they cannot run. CPU tensors are
  allowed when ``TRITON_INTERPRET=1`` (Triton's interpreter), which is how the CPU tests run.
- ``"reference"``: always the eager path.

The default comes from the ``RESTV2_BACKEND`` environment variable, else ``"auto"``.
Nothing here touches the GPU or imports Triton at import time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "RESTV2_BACKEND"


def check_backend(name: str) -> str:
    """Returns ``name`` if it is a known backend, else raises ValueError."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def default_backend() -> str:
    """The backend from ``RESTV2_BACKEND``, or ``"auto"`` when it is unset."""
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {name!r}")
    return name


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _major_minor(package: str) -> tuple[str, tuple[int, int]] | None:
    """An installed package's version and its (major, minor) (``"3.6.0+git1a2b"`` -> (3, 6)),
    without importing it; None when it is not installed."""
    try:
        text = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = re.match(r"(\d+)\.(\d+)", text)
    return (text, (int(parts[1]), int(parts[2]))) if parts else None


MIN_TRITON = (3, 6)  # the oldest Triton the kernels are tested with (torch 2.10 and 2.11 pin 3.6.0)


def triton_problem() -> str | None:
    """Why the installed Triton cannot run the kernels, or None (nothing is imported).

    Triton before 3.6 (what torch 2.9 and older pin) is not tested, and 3.1 (torch 2.5's) fails
    inside the kernels: its interpreter reads a ``tl.constexpr`` annotation written under
    ``from __future__ import annotations`` as a plain argument, and takes a ``range`` loop's
    index for a Python int. A Triton installed under another distribution name (no version to
    read) is taken as it is.
    """
    if importlib.util.find_spec("triton") is None:
        return "the Triton kernels need the `triton` package, which is not installed"
    triton = _major_minor("triton")
    if triton and triton[1] < MIN_TRITON:
        return (
            f"the Triton kernels need Triton {MIN_TRITON[0]}.{MIN_TRITON[1]} or later (torch 2.10 and later "
            f"install it), found Triton {triton[0]}; or use backend='reference'"
        )
    return None


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels with the installed packages, or None.

    Triton before 3.7 reads a loop bound computed from ``tl.program_id`` as ``int()`` of a
    one-element array, which NumPy 2.4 made a TypeError (triton-lang/triton#9171, fixed in 3.7):
    every kernel with such a loop fails inside the interpreter. torch 2.11 pins Triton 3.6.
    Compiled kernels (a GPU) are not affected.
    """
    triton, numpy = _major_minor("triton"), _major_minor("numpy")
    if triton and numpy and triton[1] < (3, 7) and numpy[1] >= (2, 4):
        return (
            f"Triton {triton[0]}'s CPU interpreter cannot run with NumPy {numpy[0]} "
            "(triton-lang/triton#9171, fixed in Triton 3.7): install numpy<2.4, or triton>=3.7"
        )
    return None


# Looked up once, without importing triton (plain constants, so torch.compile traces them).
_TRITON_PROBLEM = triton_problem()
_INTERPRETER_PROBLEM = interpreter_problem()


def triton_available() -> bool:
    """True when an installed Triton can run the kernels (``triton_problem`` is None); it is
    not imported here."""
    return _TRITON_PROBLEM is None


def check_kernel_device(*tensors: torch.Tensor) -> None:
    """Raises unless the Triton kernels can run on these tensors' device."""
    if _TRITON_PROBLEM:
        raise RuntimeError(_TRITON_PROBLEM)
    for t in tensors:
        # meta tensors carry shapes only: the custom ops' fake implementations run (tracing,
        # the traffic model, the GPU target check); nothing is launched
        if not (t.is_cuda or t.is_meta or (t.device.type == "cpu" and interpreter_enabled())):
            raise ValueError(
                f"the Triton kernels need CUDA tensors, got a tensor on {t.device} "
                "(set TRITON_INTERPRET=1 before importing triton to run them on the CPU "
                "in Triton's interpreter, or use backend='reference')"
            )
        if t.device.type == "cpu" and _INTERPRETER_PROBLEM:
            raise RuntimeError(_INTERPRETER_PROBLEM)


def use_kernels(backend: str, x: torch.Tensor) -> bool:
    """Whether ``backend`` runs the Triton kernels for activations like ``x``.

    ``"triton"`` raises where the kernels cannot run, rather than falling back silently. Under
    ``torch.onnx.export`` ``"auto"`` runs the reference (the kernels are not ONNX ops), and
    ``"triton"`` raises.
    """
    if backend == "reference":
        return False
    if backend == "auto":  # the ONNX flag only where the kernels would run: it imports torch.onnx
        return x.is_cuda and triton_available() and not torch.onnx.is_in_onnx_export()
    check_backend(backend)
    if torch.onnx.is_in_onnx_export():
        raise ValueError(
            "backend='triton' cannot be exported to ONNX: the Triton kernels are custom ops, not ONNX "
            "operators; export the model with backend='reference' (or 'auto'), which computes the same function"
        )
    check_kernel_device(x)
    return True
