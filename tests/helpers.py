"""One comparison helper for every parity test, the loader of the benchmark scripts, the
importer of optional dependencies, and a dispatch-mode recorder of the ops a run makes.

The kernel's error against a float64 reference must be at most twice the error of eager
PyTorch in the same dtype, plus a small absolute slack scaled by the reference's
magnitude (flash-attention's rule). The slack is stated once per dtype, here. Where eager's
own error is unstable (full-width ResTv1's gradients), the test passes the farthest of several
eager runs as ``eager`` (tests/test_model_kernels.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pathlib
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from filelock import FileLock  # a dependency of torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Absolute slack per dtype, relative to max(1, |reference|.max()).
ATOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def model_width_dtypes(*dtypes: torch.dtype) -> list:
    """The dtype cases of a parity test at the model's widths. bf16 runs everywhere (the
    ``bf16`` marker: in Triton's interpreter, ``restv2_kernels.interpreter_bf16``, where CUDA
    is absent; compiled on a GPU); fp16 and fp32 run compiled only (``cuda``): the interpreter
    runs them at the smaller shapes of the op's other tests."""
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    return [
        pytest.param(dt, id=names[dt], marks=pytest.mark.bf16 if dt == torch.bfloat16 else pytest.mark.cuda)
        for dt in dtypes
    ]


def assert_close(
    name: str,
    actual: torch.Tensor,
    reference: torch.Tensor,
    eager: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    eager_factor: float = 2.0,
) -> None:
    """Fails unless ``|actual - reference|.max() <= eager_factor * |eager - reference|.max() + atol``.

    ``reference`` is the float64 result; ``eager`` is plain PyTorch in the tested dtype on
    the same inputs (None: judge by ``atol`` alone). ``dtype`` picks the slack and
    defaults to ``actual.dtype``. ``eager_factor`` stays 2 for this package's kernels; only a
    foreign runtime, with a reason stated at the call, gets more. NaN anywhere in ``actual`` fails.
    """
    dtype = dtype or actual.dtype
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    a = actual.detach().double().cpu()
    r = reference.detach().double().cpu()
    err = (a - r).abs()
    scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
    bound = ATOL[dtype] * scale
    if eager is not None:
        bound += eager_factor * (eager.detach().double().cpu() - r).abs().max().item()
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        rms = ((a - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp_min(1e-30)).item()
        raise AssertionError(
            f"{name}: max abs error {err.nan_to_num(float('inf')).max().item():.3e} > bound {bound:.3e} "
            f"(dtype {dtype}), relative RMS error {rms:.3e}, {int(bad.sum())} bad of {bad.numel()}, "
            f"first bad index {first}: got {a[first].item()!r}, expected {r[first].item()!r}"
        )


def load_benchmark(name: str) -> types.ModuleType:
    """``benchmarks/<name>.py`` as a module (the scripts are not a package), registered in
    ``sys.modules`` so that their dataclasses find their module."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def require(module: str) -> types.ModuleType:
    """An optional dependency of an integration test (timm, torchvision, onnx, ...): the test
    skips without it, except where ``RESTV2_REQUIRE_EXTRAS=1`` (CI's integration environment,
    which installs every extra), where its absence fails."""
    if os.environ.get("RESTV2_REQUIRE_EXTRAS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


def once_per_session(tmp_path_factory: pytest.TempPathFactory, name: str, produce: Callable[[], Any]) -> Any:
    """``produce()`` (JSON-able) run once per test session, also under pytest-xdist (the GPU runner's
    tests phase runs ``-n 8``), where a module-scoped fixture would otherwise run once in every worker
    that draws one of its module's tests: the first to get here runs it under a lock in the folder
    that all the session's workers share, the others wait and read its result."""
    folder = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        folder = folder.parent  # each worker's basetemp is a folder of the session's one
    path = folder / f"{name}.json"
    with FileLock(f"{path}.lock"):
        if not path.exists():
            path.write_text(json.dumps(produce()))
        return json.loads(path.read_text())


def nan_buffers_for(
    monkeypatch: pytest.MonkeyPatch, kernels: types.ModuleType
) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Makes every buffer ``kernels._empty`` allocates start as NaN, so that an element a kernel
    leaves unwritten fails the test; returns the list of ``(shape, dtype)`` allocated."""
    allocated = []

    def empty(shape, dtype, device):
        allocated.append((tuple(shape), dtype))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_empty", empty)
    return allocated


def copies_made_by(monkeypatch: pytest.MonkeyPatch, kernels: types.ModuleType) -> list[bool]:
    """Spies on ``kernels._unit_last`` (the one place a launcher may copy an input): returns the
    list it fills, one bool per call, True where the call made a copy instead of a view."""
    copies = []
    unit_last = kernels._unit_last

    def spy(t):
        out = unit_last(t)
        copies.append(out is not t)
        return out

    monkeypatch.setattr(kernels, "_unit_last", spy)
    return copies


class RecordShapes(TorchDispatchMode):
    """Records the op and the shape of every tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[object, tuple[int, ...]]] = []  # (aten overload packet, shape)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [shape for _, shape in self.made]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.made.append((func.overloadpacket, tuple(t.shape)))
        return out
