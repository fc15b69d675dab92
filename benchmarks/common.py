"""Helpers shared by the benchmarks: environment record, hardware floors, result files.

- ``environment()``: the device and versions every result file carries.
- ``copy_bandwidth_gbps(device)``: measured ``dst.copy_(src)`` rate (read + write bytes),
  the ceiling a memory-bound kernel is judged against.
- ``matmul_tflops(device, dtype)``: measured large-matmul rate, the compute ceiling.
- ``results_path(kind, ext)``: ``benchmarks/results/<kind>_<device-slug>_<YYYY-MM-DD>.<ext>``.
- ``write_json(path, obj)``.

Importing this module touches no GPU and imports neither Triton nor matplotlib.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def _version(package: str) -> str | None:
    """The installed version of ``package`` without importing it, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi(query: str) -> str | None:
    """One ``nvidia-smi --query-gpu`` field of the first GPU, or None if it cannot be had."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.strip().splitlines()
    return lines[0].strip() if lines else None


def _proc_driver_version() -> str | None:
    """The NVIDIA kernel-module version from /proc (Linux), or None."""
    try:
        text = pathlib.Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    return match.group(1) if match else None


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name, or the CPU's (``platform.processor()``, else ``"cpu"``)."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def default_device() -> torch.device:
    """``cuda`` when a CUDA GPU is present, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_slug(device: torch.device | str | None = None) -> str:
    """A file-name-safe name of the device: ``"nvidia-h100-80gb-hbm3"``, ``"cpu"``."""
    device = torch.device(device) if device is not None else default_device()
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower() or "cuda"


def environment(device: torch.device | str | None = None) -> dict:
    """Device, driver and versions, command line and date, as a JSON-ready dict.

    Every field that cannot be had (no GPU, no ``nvidia-smi``, no Triton) is None.
    """
    device = torch.device(device) if device is not None else default_device()
    env: dict = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": device.type,
        "gpu": None,
        "gpu_count": 0,
        "gpu_memory_gib": None,
        "compute_capability": None,
        "driver": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 2),
            compute_capability=f"{props.major}.{props.minor}",
            driver=_nvidia_smi("driver_version") or _proc_driver_version(),
        )
    return env


def describe(env: dict) -> str:
    """One line for the top of a table: device | torch | triton | CUDA | driver."""
    dev = env["gpu"] or f"CPU ({env['cpu'] or 'unknown'}, {env['cpu_count']} cores)"
    return (f"{dev} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} "
            f"| driver {env['driver']} | Python {env['python']}")


def time_ms(fn: Callable[[], object], device: torch.device | str, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()``: CUDA events on a GPU, ``perf_counter`` on the CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbps(device: torch.device | str, nbytes: int | None = None) -> float:
    """Measured GB/s (1e9 bytes/s) of ``dst.copy_(src)``, counting read + write bytes.

    ``nbytes`` per buffer: 1 GiB on a GPU (far past the L2 cache), 256 MiB on the CPU.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 1 << 28
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    del src, dst
    return 2 * nbytes / ms / 1e6


def matmul_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int | None = None) -> float:
    """Measured TFLOP/s of an ``n x n @ n x n`` matmul (2 n^3 flops); n = 8192 on a GPU, 1024 on the CPU."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)
    del a, b
    return 2 * n**3 / ms / 1e9


def results_path(
    kind: str,
    ext: str,
    *,
    device: torch.device | str | None = None,
    out_dir: str | os.PathLike | None = None,
    tag: str | None = None,
) -> pathlib.Path:
    """``<out_dir>/<kind>_<device-slug>_<YYYY-MM-DD>[_<tag>].<ext>``, not yet existing.

    ``out_dir`` defaults to ``benchmarks/results/`` (created). If the file exists, the time
    (``_HHMMSS``) is appended. Write sibling files (a chart beside the JSON) with
    ``path.with_suffix(".png")`` so they share the name.
    """
    out = pathlib.Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now()
    stem = f"{kind}_{device_slug(device)}_{now.date().isoformat()}"
    if tag:
        stem += "_" + re.sub(r"[^A-Za-z0-9._-]+", "-", tag)
    path = out / f"{stem}.{ext.lstrip('.')}"
    if path.exists():
        path = out / f"{stem}_{now.strftime('%H%M%S')}.{ext.lstrip('.')}"
    return path


def write_json(path: str | os.PathLike, obj: object) -> pathlib.Path:
    """Writes ``obj`` as indented JSON (non-JSON values, e.g. dtypes, as strings); returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return path
