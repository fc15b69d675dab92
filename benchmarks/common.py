"""Helpers shared by the benchmarks: environment record, hardware floors, result files.

- ``environment()``: the device and versions every result file carries.
- ``copy_bandwidth_gbps(device)``: measured ``dst.copy_(src)`` rate (read + write bytes),
  the ceiling a memory-bound kernel is judged against.
- ``matmul_tflops(device, dtype)``: measured large-matmul rate, the compute ceiling.
- ``results_path(kind, ext)``: ``benchmarks/results/<kind>_<device-slug>_<YYYY-MM-DD>.<ext>``.
- ``write_json(path, obj)``.

For the kernel microbenchmarks (``bench_attention.py``, ``bench_upsample.py``):

- ``roofline_rates(device, dtype)``: both ceilings measured now (fp32 matmul with TF32 off).
- ``roofline_floor_ms(nbytes, flops, copy_gbps, tflops)``: max(bytes / copy rate, flops / matmul rate).
- ``roofline_columns(ms, nbytes, flops, rates)``: GB/s, % of copy, floor ms, multiple of the floor.
- ``time_fwd_bwd(bench, forward, inputs, grad)``: forward, backward alone and the whole step.
- ``kernel_bench_main(argv, ...)``: the command line, table and JSON both scripts share.

Importing this module touches no GPU and imports neither Triton nor matplotlib.
"""

from __future__ import annotations

import argparse
import datetime
import functools
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

from restv2_kernels import plans  # pure functions: no Triton, no GPU at import

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
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
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
    return (
        f"{dev} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} "
        f"| driver {env['driver']} | Python {env['python']}"
    )


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
    return 2 * nbytes / ms / 1e6  # the buffers are freed on return


def matmul_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int | None = None) -> float:
    """Measured TFLOP/s of an ``n x n @ n x n`` matmul (2 n^3 flops); n = 8192 on a GPU, 1024 on the CPU."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)
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


# ---------------------------------------------------------------------------------------
# Kernel microbenchmarks: roofline floor, fwd/bwd timing, table rows
# ---------------------------------------------------------------------------------------


def roofline_rates(device: torch.device | str, dtype: torch.dtype) -> dict:
    """The two ceilings of a roofline floor, measured now on ``device``.

    ``copy_gbps``: ``copy_bandwidth_gbps(device)``; ``matmul_tflops``: ``matmul_tflops(device, dtype)``,
    for fp32 with TF32 off (the kernels compute fp32 dots in IEEE fp32, so TF32 tensor cores are
    no ceiling for them).
    """
    with plans.tf32_matmuls(False):  # IEEE fp32, as the kernels' fp32 dots
        tflops = matmul_tflops(device, dtype)
    return {
        "copy_gbps": copy_bandwidth_gbps(device),
        "matmul_tflops": tflops,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_tf32": False,
    }


def roofline_floor_ms(nbytes: float, flops: float, copy_gbps: float, tflops: float) -> float:
    """The fastest an op can be: ``max(nbytes / copy bandwidth, flops / matmul rate)``, in ms.

    GB/s is 1e9 bytes/s, TFLOP/s 1e12 flop/s: 1 GB at 1000 GB/s is 1 ms, 1 TFLOP at 1000 TFLOP/s is 1 ms.
    """
    return max(nbytes / (copy_gbps * 1e6), flops / (tflops * 1e9))


def roofline_columns(ms: float, nbytes: float, flops: float, rates: dict) -> dict:
    """The columns of one timing: achieved GB/s and TFLOP/s, % of the copy bandwidth, the floor.

    ``x_floor`` = ms / floor_ms (1.0 = at the floor); ``bound`` names the larger floor term.
    """
    copy_gbps, tflops = rates["copy_gbps"], rates["matmul_tflops"]
    floor = roofline_floor_ms(nbytes, flops, copy_gbps, tflops)
    gbps = nbytes / ms / 1e6
    return {
        "ms": ms,
        "gbps": gbps,
        "pct_copy": 100 * gbps / copy_gbps,
        "tflops": flops / ms / 1e9,
        "floor_ms": floor,
        "x_floor": ms / floor,
        "bound": "memory" if nbytes / (copy_gbps * 1e6) >= flops / (tflops * 1e9) else "compute",
    }


MODES = ("fwd", "bwd", "fwd+bwd")


def _error_text(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:200]}"


def time_fwd_bwd(
    bench: Callable[[Callable[[], object]], float],
    forward: Callable[[], torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    grad: torch.Tensor,
) -> dict[str, float | str]:
    """``{mode: ms}`` for the three ``MODES``, or ``{mode: "Error: ..."}`` where a mode fails.

    - ``fwd``: ``forward()`` under ``torch.no_grad()``.
    - ``bwd``: ``torch.autograd.grad(out, inputs, grad, retain_graph=True)`` on one recorded graph.
    - ``fwd+bwd``: ``torch.autograd.grad(forward(), inputs, grad)``, one training step of the op.

    ``bench(fn)`` times ``fn`` (``triton.testing.do_bench``: synchronises, flushes L2). Each fn is
    called once first, so compilation and autotuning stay out of the timing. ``autograd.grad``
    accumulates into no ``.grad``, so repeated calls do the same work.
    """
    times: dict[str, float | str] = {}

    def attempt(mode: str, fn: Callable[[], object]) -> None:
        try:
            fn()
            times[mode] = bench(fn)
        except Exception as exc:  # an unsupported backend, shape or dtype must not hide the others
            times[mode] = _error_text(exc)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    with torch.no_grad():
        attempt("fwd", forward)
    out = None
    try:
        out = forward()
    except Exception as exc:
        times["bwd"] = _error_text(exc)
    if out is not None:
        attempt("bwd", lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True))
        del out
    attempt("fwd+bwd", lambda: torch.autograd.grad(forward(), inputs, grad))
    return times


def select_shapes(shapes: dict, wanted: list[str] | None) -> dict:
    """The entries of ``shapes`` whose name is in ``wanted`` or starts with one of them (all if empty)."""
    if not wanted:
        return dict(shapes)
    chosen = {name: s for name, s in shapes.items() if any(name == w or name.startswith(w) for w in wanted)}
    if not chosen:
        raise SystemExit(f"no shape matches {wanted}; known: {', '.join(shapes)}")
    return chosen


ROOFLINE_HEADER = (
    f"{'shape':<16} {'mode':<7} {'impl':<15} {'ms':>9} {'GB/s':>7} {'%copy':>6} "
    f"{'TFLOP/s':>8} {'floor ms':>9} {'x floor':>8}  bound"
)


def format_roofline_row(shape: str, mode: str, impl: str, row: dict) -> str:
    """One table line under ``ROOFLINE_HEADER``: the ``roofline_columns`` of a row, or its error."""
    head = f"{shape:<16} {mode:<7} {impl:<15}"
    if "error" in row:
        return f"{head} {'n/a':>9}  {row['error'][:80]}"
    return (
        f"{head} {row['ms']:9.3f} {row['gbps']:7.0f} {row['pct_copy']:5.0f}% {row['tflops']:8.1f} "
        f"{row['floor_ms']:9.3f} {row['x_floor']:7.2f}x  {row['bound']}"
    )


def format_speedups(rows: list[dict], shape: str, ours: str = "triton") -> list[str]:
    """Lines ``<shape> <mode>: triton vs eager 2.10x, ...`` (other impl's ms / ours) for one shape."""
    lines = []
    for mode in MODES:
        timed = {r["impl"]: r["ms"] for r in rows if r["shape"] == shape and r["mode"] == mode and "ms" in r}
        if ours in timed and len(timed) > 1:
            vs = ", ".join(f"{impl} {ms / timed[ours]:.2f}x" for impl, ms in timed.items() if impl != ours)
            lines.append(f"{'':<16} {mode:<7} {ours} speed-up vs {vs}")
    return lines


KERNEL_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def kernel_bench_main(
    argv: list[str] | None,
    *,
    kind: str,
    doc: str,
    shapes: dict[str, tuple],
    impls: tuple[str, ...],
    make_fns: Callable[[list[str]], dict],
    time_impl: Callable[..., dict],
    count_bytes: Callable[..., int],
    count_flops: Callable[..., int],
    counts: dict,
    no_gpu: Callable[[torch.dtype, dict], list[str]] | None = None,
    no_gpu_shapes: str | None = None,
) -> int:
    """The main of a kernel microbenchmark: parse ``argv``, time every impl at every shape, print, write JSON.

    ``make_fns(impls)`` -> {impl: fn}, called once per shape (a fresh ``torch.compile`` each time);
    ``time_impl(bench, fn, shape, dtype)`` -> ``time_fwd_bwd``'s dict (on ``cuda``); ``count_bytes(*shape, elt, mode)``
    and ``count_flops(*shape, mode)`` give the minimal bytes and the FLOPs; ``counts`` describes
    them in the JSON. Without a CUDA GPU: prints that one is needed, or ``no_gpu(dtype, shapes)``'s
    lines (for the ``--shapes`` asked, else those starting with ``no_gpu_shapes``), and returns 0.
    """
    parser = argparse.ArgumentParser(
        prog=f"bench_{kind}.py",
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[-1],
    )
    parser.add_argument("--dtype", choices=sorted(KERNEL_DTYPES), default="fp16")
    parser.add_argument("--shapes", nargs="*", metavar="NAME", help=f"names or prefixes of: {' '.join(shapes)}")
    parser.add_argument("--impls", nargs="+", choices=impls, default=list(impls))
    parser.add_argument(
        "--out", type=pathlib.Path, help=f"JSON path (default: benchmarks/results/{kind}_<gpu>_<date>.json)"
    )
    args = parser.parse_args(argv)
    shapes = select_shapes(shapes, args.shapes)

    if not torch.cuda.is_available():
        if no_gpu is None:
            print(f"bench_{kind}: a CUDA GPU is needed to run this benchmark; nothing to do.")
        else:
            print(f"bench_{kind}: no CUDA GPU, so no timings; what can be computed without one:")
            wanted = args.shapes or ([no_gpu_shapes] if no_gpu_shapes else None)
            print("\n".join(no_gpu(KERNEL_DTYPES[args.dtype], select_shapes(shapes, wanted))))
        return 0

    from triton.testing import do_bench  # synchronises, flushes L2 between reps

    bench = functools.partial(do_bench, return_mode="median")
    device, dtype = torch.device("cuda"), KERNEL_DTYPES[args.dtype]
    elt = torch.finfo(dtype).bits // 8
    env = environment(device)
    rates = roofline_rates(device, dtype)
    print(f"{describe(env)} | {args.dtype}")
    print(f"copy {rates['copy_gbps']:.0f} GB/s | {args.dtype} matmul {rates['matmul_tflops']:.1f} TFLOP/s (no TF32)")
    print(ROOFLINE_HEADER)

    rows: list[dict] = []
    for name, shape in shapes.items():
        fns = make_fns(args.impls)
        for impl in args.impls:
            times = time_impl(bench, fns[impl], shape, dtype)
            for mode in MODES:
                nbytes, nflops = count_bytes(*shape, elt, mode), count_flops(*shape, mode)
                row = {"shape": name, "dims": shape, "mode": mode, "impl": impl, "bytes": nbytes, "flops": nflops}
                if isinstance(times[mode], str):
                    row["error"] = times[mode]
                else:
                    row.update(roofline_columns(times[mode], nbytes, nflops, rates))
                rows.append(row)
                print(format_roofline_row(name, mode, impl, row))
            torch.cuda.empty_cache()
        for line in format_speedups(rows, name):
            print(line)

    out = write_json(
        args.out or results_path(kind, "json", device=device),
        {
            "environment": env,
            "dtype": args.dtype,
            "rates": rates,
            "counts": counts,
            "rows": rows,
        },
    )
    print(f"wrote {out}")
    return 0
