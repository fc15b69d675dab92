"""Where a step's time goes: per-kernel GPU time of a throughput.py row, by torch.profiler.

    python benchmarks/kernel_profile.py                                   # restv2_tiny bf16 b256 inference
    python benchmarks/kernel_profile.py --mode train --batch 128 --trace-dir /tmp/traces
    python benchmarks/kernel_profile.py --mode features-fwd+bwd --batch 2 --resolution 800x1333

Each backend (``--backends``, default reference and kernels) builds the step ``throughput.py`` times
(same model, input, autocast, optimizer), runs ``--warmup`` steps (the first compiles, under
``+compile``), then ``--steps`` steps under ``torch.profiler``, and reads the profiler's trace:

- every GPU kernel (and memcpy/memset) with its calls and milliseconds per step and its share of
  the GPU's busy time; the busy time (the union of the kernels' intervals) against the host's
  wall time per step shows a launch-bound step (busy well under wall);
- the kernels grouped into categories (``CATEGORIES``): this package's Triton kernels by family
  (``restv2.attention``, ``restv2.upsample``, ...), torch.compile's generated kernels, convolution,
  GEMM, attention/softmax, normalisation, optimizer, copy/layout, reduction, elementwise, other;
- next to the first backend, each other backend's category times and their differences.

On a CPU (no CUDA) the "kernels" are the profiler's CPU operators, by self time: the same tables,
for checking the pipeline. Timings under a profiler carry its overhead; the step times to quote
are ``throughput.py``'s. ``gpu_suite.py --phase profile`` runs this on the speed targets' rows.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

import torch

_HERE = pathlib.Path(__file__).resolve().parent
for _p in (str(_HERE.parent), str(_HERE)):  # the tree's restv2 and the sibling scripts, installed or not
    if _p not in sys.path:
        sys.path.insert(0, _p)

import report  # noqa: E402
import throughput  # noqa: E402

KERNEL_PACKAGES = (
    "attention",
    "attention_mixed",
    "upsample",
    "layernorm",
    "ffn",
    "pa",
    "bn_relu",
)  # restv2_kernels.<pkg>.triton
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")  # the trace's device-side activity
# (category, lower-case name fragments), first match wins; this package's kernels and torch.compile's
# (``triton_*``) are named before these are tried. Convolutions come before GEMMs: cuDNN's implicit-GEMM
# convolutions carry "gemm" in their names too, and norms before elementwise ("vectorized_layer_norm").
CATEGORIES = (
    ("conv", ("fprop", "dgrad", "wgrad", "conv", "cudnn", "depthwise")),
    ("gemm", ("gemm", "nvjet", "cutlass", "matmul", "cublas", "xmma", "addmm", "bmm", "aten::mm")),
    ("attention/softmax", ("flash", "fmha", "attention", "softmax")),
    ("norm", ("norm", "gammabeta")),
    ("optimizer", ("multi_tensor_apply", "adam", "sgd")),
    (
        "copy/layout",
        ("copy", "memcpy", "memset", "transpose", "permute", "nchwtonhwc", "nhwctonchw", "shuffle", "index", "fill"),
    ),
    ("reduce", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "gelu")),
)
TOP = 40  # kernels kept by name per row; the rest are summed into one "(other kernels)" entry


def our_kernels() -> dict[str, str]:
    """This package's Triton kernels: {kernel name: ``restv2.<family>``} (imports Triton). A compiled
    kernel is named after its function; under the interpreter they never reach the profiler."""
    names = {}
    for pkg in KERNEL_PACKAGES:
        module = importlib.import_module(f"restv2_kernels.{pkg}.triton")
        for name, obj in vars(module).items():  # @triton.jit objects (JITFunction, or the interpreter's)
            if name.endswith("_kernel") and type(obj).__module__.startswith("triton."):
                names[name] = f"restv2.{pkg}"
    return names


def kernel_category(name: str, ours: dict[str, str]) -> str:
    """The category of a kernel (or, on a CPU, an operator) named ``name``."""
    if name in ours:
        return ours[name]
    low = name.lower()
    if low.startswith("triton_"):  # torch.compile's generated kernels: triton_poi_*, triton_red_*, triton_tem_*, ...
        return "compiled (inductor)"
    for category, fragments in CATEGORIES:
        if any(f in low for f in fragments):
            return category
    return "other"


def _self_times(ops: list[dict]) -> list[tuple[str, float, float]]:
    """(name, start µs, self µs) of one thread's operators, nested by their intervals."""
    out: list[tuple[str, float, float]] = []
    stack: list[list] = []  # [name, start, end, time of its children]
    for e in sorted(ops, key=lambda e: (float(e["ts"]), -float(e["dur"]))) + [None]:
        start = float("inf") if e is None else float(e["ts"])
        while stack and stack[-1][2] <= start:
            name, begin, end, children = stack.pop()
            out.append((name, begin, max(0.0, end - begin - children)))
        if e is not None:
            if stack:
                stack[-1][3] += float(e["dur"])
            stack.append([e["name"], start, start + float(e["dur"]), 0.0])
    return out


def trace_events(trace: dict, device_type: str) -> list[tuple[str, float, float]]:
    """(name, start µs, µs) of the work in a chrome trace: the GPU's kernels, copies and sets; on a
    CPU, each operator's self time (its time less its child operators', which are nested in it)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    if device_type == "cuda":
        return [(e["name"], float(e["ts"]), float(e["dur"])) for e in events if e.get("cat") in DEVICE_CATS]
    threads: dict[tuple, list[dict]] = {}
    for e in events:
        if e.get("cat") == "cpu_op":
            threads.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    return [ev for ops in threads.values() for ev in _self_times(ops)]


def busy_us(events: Iterable[tuple[str, float, float]]) -> float:
    """The union of the events' intervals: time the device had work (overlapping streams count once)."""
    total, end = 0.0, float("-inf")
    for _, start, dur in sorted(events, key=lambda e: e[1]):
        if start + dur > end:
            total += start + dur - max(start, end)
            end = start + dur
    return total


def summarize(
    events: list[tuple[str, float, float]], steps: int, wall_s: float, ours: dict[str, str], top: int = TOP
) -> dict:
    """Per-step tables of ``events`` (``trace_events``) over ``steps`` steps that took ``wall_s``."""
    by_name: dict[str, list[float]] = {}
    for name, _, dur in events:
        entry = by_name.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += dur
    total_us = sum(us for _, us in by_name.values()) or 1.0
    kernels = sorted(
        (
            {
                "name": name,
                "category": kernel_category(name, ours),
                "calls": calls / steps,
                "ms": us / steps / 1e3,
                "share": us / total_us,
            }
            for name, (calls, us) in by_name.items()
        ),
        key=lambda k: -k["ms"],
    )
    categories: dict[str, float] = {}
    for k in kernels:
        categories[k["category"]] = categories.get(k["category"], 0.0) + k["ms"]
    rest = kernels[top:]
    kernels = kernels[:top]
    if rest:
        kernels.append(
            {
                "name": f"(other kernels: {len(rest)})",
                "category": "other",
                "calls": sum(k["calls"] for k in rest),
                "ms": sum(k["ms"] for k in rest),
                "share": sum(k["share"] for k in rest),
            }
        )
    return {
        "steps": steps,
        "wall_ms": wall_s / steps * 1e3,
        "busy_ms": busy_us(events) / steps / 1e3,
        "kernel_ms": total_us / steps / 1e3 if events else 0.0,
        "launches": len(events) / steps,
        "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
        "kernels": kernels,
    }


def profile_step(
    step: Callable[[], None],
    device: torch.device,
    steps: int,
    ours: dict[str, str],
    trace_path: pathlib.Path | None = None,
) -> dict:
    """``steps`` calls of ``step`` (already warm) under torch.profiler: ``summarize``'s tables."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    throughput.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            with torch.profiler.record_function("step"):
                step()
        throughput.synchronize(device)
        wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="kernel_profile_") as tmp:
        path = trace_path or pathlib.Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    return summarize(trace_events(trace, device.type), steps, wall, ours)


def profile_row(
    row: throughput.Row,
    device: torch.device,
    steps: int = 3,
    ours: dict[str, str] | None = None,
    trace_path: pathlib.Path | None = None,
) -> dict:
    """Builds ``row``'s model and step as ``throughput.py`` does, warms it up (``row.warmup`` calls,
    the first timed: it compiles) and profiles ``steps`` more; the row's batch as asked (no halving)."""
    ours = our_kernels() if ours is None else ours
    model = throughput.build_model(row, device)
    x = torch.randn(row.batch_requested, 3, *row.resolution, device=device)
    step = throughput.STEPS[row.mode](model, row, x, device)
    t0 = time.perf_counter()
    step()
    throughput.synchronize(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, row.warmup - 1)):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = profile_step(step, device, steps, ours, trace_path)
    result.update(
        first_call_s=first,
        batch=row.batch_requested,
        peak_mem_mib=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kernel_profile.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--model", default="restv2_tiny", choices=throughput.V2_MODELS + throughput.V1_MODELS)
    parser.add_argument("--backends", nargs="+", choices=throughput.BACKENDS, default=["reference", "kernels"])
    parser.add_argument("--mode", choices=list(throughput.STEPS), default="infer")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--resolution", type=throughput.parse_resolution, default=(224, 224))
    parser.add_argument("--precision", choices=list(throughput.DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=3, help="steps before profiling (default 3; the first compiles)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    parser.add_argument("--trace-dir", type=pathlib.Path, help="also write each backend's chrome trace here")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.warmup < 1:
        parser.error("--batch, --steps and --warmup must be at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as throughput.py
    ours = our_kernels()
    if args.trace_dir:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for label in args.backends:
        row = throughput.Row.from_label(
            args.model,
            label,
            protocol="modern",
            mode=args.mode,
            precision=args.precision,
            resolution=args.resolution,
            batch_requested=args.batch,
            warmup=args.warmup,
            iters=args.steps,
            optimizer="adamw" if args.mode == "train" else None,
        )
        reason = throughput.skip_reason(row, device.type == "cuda")
        if reason:
            print(f"{label}: skipped ({reason})")
            continue
        trace = args.trace_dir / f"{args.model}_{args.mode}_{label}.json" if args.trace_dir else None
        results[label] = profile_row(row, device, args.steps, ours, trace)
        throughput.free_memory(device)
    title = f"{args.model} {args.mode} {args.precision} batch {args.batch} {args.resolution[0]}x{args.resolution[1]}"
    print("\n".join(report.profile_lines(title, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
