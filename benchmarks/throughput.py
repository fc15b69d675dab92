"""End-to-end throughput of the ResTv2 (and ResTv1) backbones: images/s and peak memory.

Backends, each a row per model:
  reference          the eager path, numerically the published code (backend="reference")
  reference+compile  the same under torch.compile
  kernels            the fused Triton kernels (backend="triton"; needs a CUDA GPU)
  kernels+compile    the kernels under torch.compile
Peers (timm, pretrained=False) run under the same protocol and compile setting, next to the
ResTv2 model of similar size, as backend "timm" / "timm+compile".

Protocols:
  paper   fp32, batch 64, 50 warm-up + 30 timed iterations, no_grad (as Swin and ResT measured)
  modern  AMP (--precision, default bf16), batch 256 halved on CUDA out-of-memory (the batch
          used is recorded), 20 warm-up + 30 timed iterations, inference_mode
Modes: classification inference (default), --train (forward + backward + optimizer step),
--features (the dense-prediction backbone, forward_intermediates with num_classes=0, forward
and forward + backward; e.g. --resolution 800x1333 --features). The modes that train build the
model with the stochastic depth it trains with (restv2.DROP_PATH, restv2_tiny's 0.1; a peer
takes its ResT model's; --drop-path sets another rate).

Timing: the first call (which compiles, under torch.compile) is timed on its own; then the
remaining warm-up calls; then each timed iteration between CUDA events (perf_counter on the
CPU). Rows report median and mean images/s; every sample goes to the JSON. Peak memory:
torch.cuda.max_memory_allocated after reset_peak_memory_stats (null on the CPU). A failing row
(compile error, unsupported size, ...) is recorded with its error; the run goes on.

Without CUDA the default is a short CPU run: restv2_tiny, reference and reference+compile,
batch 8, 224x224, 1 warm-up + 3 timed iterations; the kernel rows are listed as skipped.

Floor: each measured ResT inference and training row is also counted by the traffic model
(benchmarks/traffic.py: bytes and matmul FLOPs of every op) and its median time printed over the
floor at the copy bandwidth and matmul rate measured in the same run ("x floor"; 1.0 = at the floor).

Output: a table on stdout; JSON (rows, raw samples, config, environment) and a PNG chart in
benchmarks/results/throughput_<device>_<date>.json/.png (--out-dir, --tag).

Examples:
  python benchmarks/throughput.py                          # GPU: modern, 4 ResTv2, 4 backends, peers
  python benchmarks/throughput.py --protocol both --no-peers
  python benchmarks/throughput.py --models restv2_tiny --backends reference kernels --train
  python benchmarks/throughput.py --resolution 800x1333 --features --batch 8
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import pathlib
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

_HERE = pathlib.Path(__file__).resolve().parent
for _p in (str(_HERE.parent), str(_HERE)):  # the tree's restv2 and common, installed or not
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402
import traffic  # noqa: E402

from restv2 import DROP_PATH, MODELS  # noqa: E402

V2_MODELS = ["restv2_tiny", "restv2_small", "restv2_base", "restv2_large"]
V1_MODELS = ["rest_lite", "rest_small", "rest_base", "rest_large"]
BACKENDS = ["reference", "reference+compile", "kernels", "kernels+compile"]
# timm peers, each next to the ResTv2 of similar size (params: ResTv2 T/S/B/L 30/41/56/87M;
# Swin/ConvNeXt T/S/B 28/50/88M; PVTv2 b2/b3/b4/b5 25/45/63/82M), each measured once.
PEERS = {
    "restv2_tiny": ["swin_tiny_patch4_window7_224", "convnext_tiny", "pvt_v2_b2"],
    "restv2_small": ["pvt_v2_b3"],
    "restv2_base": ["swin_small_patch4_window7_224", "convnext_small", "pvt_v2_b4"],
    "restv2_large": ["swin_base_patch4_window7_224", "convnext_base", "pvt_v2_b5"],
}
PROTOCOLS = {
    # name: (batch, warmup, iters)
    "paper": (64, 50, 30),
    "modern": (256, 20, 30),
}
CPU_DEFAULTS = dict(
    models=["restv2_tiny"],
    backends=list(BACKENDS),  # kernel rows: listed as skipped
    batch=8,
    warmup=1,
    iters=3,
    protocol="paper",
    peers=False,
)
FEATURES_BATCH = 16  # default batch for --features (dense prediction at large resolution)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KERNELS_NEED_CUDA = "the Triton kernels need a CUDA GPU (none found)"


@dataclass
class Row:
    """One measurement: a model under one backend, protocol and mode, and what came of it."""

    model: str
    family: str  # "restv2", "restv1" or "peer"
    backend: str  # "reference", "kernels" or "timm"
    compile: bool
    protocol: str  # "paper" or "modern"
    mode: str  # "infer", "train", "features-fwd" or "features-fwd+bwd"
    precision: str  # "fp32", "bf16" or "fp16" (autocast unless fp32)
    resolution: tuple[int, int]
    batch_requested: int
    warmup: int
    iters: int
    anchor: str | None = None  # the ResTv2 model a peer stands next to
    compile_mode: str = "default"  # torch.compile mode of +compile rows
    optimizer: str | None = None  # "adamw" or "sgd" for train rows
    drop_path: float | None = None  # stochastic depth the model is built with (None: ``drop_path_rate``)
    status: str = "pending"  # "ok", "skipped" or "error"
    reason: str | None = None
    batch: int | None = None  # the batch actually used (after halving on out-of-memory)
    oom_batches: list[int] = field(default_factory=list)
    first_call_s: float | None = None  # the first call: compile time + one step, if compiled
    times_s: list[float] = field(default_factory=list)  # per timed iteration
    wall_s: float | None = None  # all timed iterations, host clock, synchronised
    peak_mem_mib: float | None = None
    speedup: float | None = None  # median images/s over the reference-eager row's
    traffic_gb: float | None = None  # bytes one step moves, by the traffic model (benchmarks/traffic.py)
    floor_ms: float | None = None  # the traffic model's roofline floor of one step at the rates measured here
    x_floor: float | None = None  # median step time over floor_ms (1.0 = at the floor)

    @classmethod
    def from_label(cls, model: str, label: str, **fields) -> Row:
        """The row of a ResT ``model`` (``V2_MODELS`` or ``V1_MODELS``) under a ``BACKENDS`` label."""
        family = "restv2" if model in V2_MODELS else "restv1"
        return cls(model, family, label.split("+")[0], label.endswith("+compile"), **fields)

    @property
    def label(self) -> str:
        return self.backend + ("+compile" if self.compile else "")

    @property
    def drop_path_rate(self) -> float:
        """The stochastic depth the row's model is built with: ``drop_path`` where set, else in
        the modes that train (train, features-fwd+bwd) the rate the ResT model trains with
        (``restv2.DROP_PATH``; a peer takes its anchor's), else 0."""
        if self.drop_path is not None:
            return self.drop_path
        if self.mode not in ("train", "features-fwd+bwd"):
            return 0.0
        return DROP_PATH.get(self.anchor if self.family == "peer" else self.model, 0.0)

    @property
    def ips_median(self) -> float | None:
        return self.batch / statistics.median(self.times_s) if self.times_s else None

    @property
    def ips_mean(self) -> float | None:
        return self.batch / statistics.mean(self.times_s) if self.times_s else None

    @property
    def compile_s(self) -> float | None:
        """Compile time: the first call less one timed iteration (median)."""
        if not (self.compile and self.times_s and self.first_call_s):
            return None
        return max(0.0, self.first_call_s - statistics.median(self.times_s))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            label=self.label,
            compile_s=self.compile_s,
            images_per_s_median=self.ips_median,
            images_per_s_mean=self.ips_mean,
            images_per_s_wall=self.batch * self.iters / self.wall_s if self.wall_s else None,
        )
        return d


# ---------------------------------------------------------------------------- arguments


def parse_resolution(text: str) -> tuple[int, int]:
    """``"224"`` -> (224, 224); ``"800x1333"`` -> (800, 1333) (height x width)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be N or HxW, got {text!r}") from None
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 1:
        raise argparse.ArgumentTypeError(f"resolution must be N or HxW, got {text!r}")
    return hw  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        metavar="MODEL",
        help=f"models to run (default: the four ResTv2, {' '.join(V2_MODELS)}; "
        f"on the CPU restv2_tiny); choices: {' '.join(MODELS)}",
    )
    parser.add_argument("--v1", action="store_true", help=f"also run the ResTv1 models ({' '.join(V1_MODELS)})")
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        metavar="BACKEND",
        help=f"backends (default: all four, {' '.join(BACKENDS)}; the kernel rows are skipped without CUDA)",
    )
    parser.add_argument(
        "--protocol",
        choices=["paper", "modern", "both"],
        help="paper: fp32, batch 64, 50+30 iterations, no_grad; modern: AMP, batch 256 "
        "(halved on OOM), 20+30 iterations, inference_mode (default: modern on a GPU, "
        "paper with the reduced CPU settings on the CPU)",
    )
    parser.add_argument(
        "--precision",
        choices=["bf16", "fp16", "fp32"],
        default="bf16",
        help="autocast dtype of the modern protocol (default bf16; paper is always fp32)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        help="batch size, overriding the protocol's (64 paper, 256 modern, "
        f"{FEATURES_BATCH} with --features, 8 on the CPU); halved on CUDA OOM",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="warm-up iterations, the first (compiling) one included (default: 50 paper, 20 modern, 1 on the CPU)",
    )
    parser.add_argument("--iters", type=int, help="timed iterations (default: 30; 3 on the CPU)")
    parser.add_argument(
        "--resolution",
        type=parse_resolution,
        default=(224, 224),
        metavar="HxW",
        help="input size, N or HxW (default 224x224; e.g. 800x1333 with --features)",
    )
    parser.add_argument(
        "--train",
        action="store_true",
        help="time training steps (forward + backward + optimizer step) instead of inference",
    )
    parser.add_argument(
        "--optimizer", choices=["adamw", "sgd"], default="adamw", help="optimizer of --train (default adamw)"
    )
    parser.add_argument(
        "--drop-path",
        type=float,
        help="stochastic depth of the modes that train (default: the ResT model's training rate, "
        "restv2.DROP_PATH; a peer takes its ResT model's)",
    )
    parser.add_argument(
        "--features",
        action="store_true",
        help="time the dense-prediction backbone (forward_intermediates, num_classes=0; "
        "timm peers with features_only=True), forward and forward + backward",
    )
    parser.add_argument(
        "--peers",
        dest="peers",
        action="store_true",
        default=None,
        help="run the timm peers (default on a GPU when timm is importable)",
    )
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="do not run the timm peers")
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode for the +compile backends (default 'default'; e.g. max-autotune)",
    )
    parser.add_argument(
        "--out-dir", type=pathlib.Path, default=None, help="where the JSON and PNG go (default benchmarks/results/)"
    )
    parser.add_argument("--tag", help="appended to the file names: throughput_<device>_<date>_<tag>")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG chart")
    return parser


def resolve(args: argparse.Namespace, cuda: bool) -> argparse.Namespace:
    """Fills the defaults that depend on the device (reduced settings without CUDA)."""
    args.cpu_reduced = not cuda
    base = (
        CPU_DEFAULTS
        if not cuda
        else dict(
            models=list(V2_MODELS),
            backends=list(BACKENDS),
            batch=None,
            warmup=None,
            iters=None,
            protocol="modern",
            peers=importlib.util.find_spec("timm") is not None,
        )
    )
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.v1:
        args.models = args.models + [m for m in V1_MODELS if m not in args.models]
    if args.features and args.batch is None:
        args.batch = FEATURES_BATCH
    args.protocols = ["paper", "modern"] if args.protocol == "both" else [args.protocol]
    return args


# ---------------------------------------------------------------------------- plan


def plan_rows(args: argparse.Namespace) -> list[Row]:
    """Every row the run will measure, in table order (peers right after their anchor)."""
    if args.train:
        modes = ["train"]
    elif args.features:
        modes = ["features-fwd", "features-fwd+bwd"]
    else:
        modes = ["infer"]
    compile_settings = sorted({b.endswith("+compile") for b in args.backends})
    rows = []
    for protocol in args.protocols:
        batch, warmup, iters = PROTOCOLS[protocol]
        precision = "fp32" if protocol == "paper" else args.precision
        common_fields = dict(
            protocol=protocol,
            precision=precision,
            resolution=tuple(args.resolution),
            batch_requested=args.batch or batch,
            warmup=max(1, args.warmup or warmup),
            iters=max(1, args.iters or iters),
            compile_mode=args.compile_mode,
            optimizer=args.optimizer if args.train else None,
            drop_path=args.drop_path,
        )
        for mode in modes:
            for name in args.models:
                rows += [Row.from_label(name, b, mode=mode, **common_fields) for b in args.backends]
                for peer in PEERS.get(name, []) if args.peers else []:
                    for compiled in compile_settings:
                        rows.append(Row(peer, "peer", "timm", compiled, mode=mode, anchor=name, **common_fields))
    return rows


def skip_reason(row: Row, cuda: bool) -> str | None:
    """Why a row cannot run here, or None."""
    if row.backend == "kernels" and not cuda:
        return KERNELS_NEED_CUDA
    if row.backend == "kernels" and importlib.util.find_spec("triton") is None:
        return "the Triton kernels need the `triton` package, which is not installed"
    if row.family == "peer" and importlib.util.find_spec("timm") is None:
        return "timm is not installed"
    return None


# ---------------------------------------------------------------------------- models


def build_model(row: Row, device: torch.device) -> nn.Module:
    """The row's model on ``device``, randomly initialised (timm: pretrained=False)."""
    features = row.mode.startswith("features")
    if row.family == "peer":
        import timm

        kwargs: dict = {"pretrained": False, "drop_path_rate": row.drop_path_rate}  # not timm's defaults
        if features:
            kwargs["features_only"] = True
        if row.model.startswith("swin") and row.resolution != (224, 224):
            kwargs["img_size"] = row.resolution  # swin's window layout is fixed at construction
        model = timm.create_model(row.model, **kwargs)
    else:
        backend = "triton" if row.backend == "kernels" else "reference"
        model = MODELS[row.model](
            backend=backend, num_classes=0 if features else 1000, drop_path_rate=row.drop_path_rate
        )
    return model.to(device)


def forward_fn(model: nn.Module, row: Row) -> Callable[[torch.Tensor], object]:
    """What one forward is: the classifier, or the four stage maps for --features."""
    if row.mode.startswith("features") and row.family != "peer":
        return functools.partial(model.forward_intermediates, intermediates_only=True)
    return model


# ---------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], row: Row, device: torch.device, progress: Callable[[str], None]) -> None:
    """Warm-up (the first call timed alone, as it compiles), then ``row.iters`` timed steps."""
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    row.first_call_s = time.perf_counter() - t0
    for i in range(row.warmup - 1):
        progress(f"warm-up {i + 2}/{row.warmup}")
        step()
    synchronize(device)
    progress(f"timing {row.iters} iterations")
    times = []
    t0 = time.perf_counter()
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(row.iters)
        ]
        for start, end in events:  # no host sync between iterations: the queue stays full
            start.record()
            step()
            end.record()
        synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(row.iters):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    row.wall_s = time.perf_counter() - t0
    row.times_s = times


def compiled(fn: Callable, row: Row) -> Callable:
    """``torch.compile(fn)`` in the row's mode; compilation itself happens on the first call."""
    return torch.compile(fn, mode=None if row.compile_mode == "default" else row.compile_mode)


def autocast(row: Row, device: torch.device):
    dtype = DTYPES[row.precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def inference_step(model: nn.Module, row: Row, x: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """Classification or dense forward: no_grad (paper) or inference_mode (modern)."""
    model.eval()
    fn = forward_fn(model, row)
    fn = compiled(fn, row) if row.compile else fn
    grad_off = torch.no_grad if row.protocol == "paper" else torch.inference_mode

    def step() -> None:
        with grad_off(), autocast(row, device):
            fn(x)

    return step


def train_step(model: nn.Module, row: Row, x: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """Forward, cross-entropy on random labels, backward, optimizer step (GradScaler under fp16)."""
    model.train()
    fn = compiled(model, row) if row.compile else model
    target = torch.randint(0, 1000, (x.shape[0],), device=device)
    if row.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=row.precision == "fp16")

    def step() -> None:
        with autocast(row, device):
            loss = F.cross_entropy(fn(x), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def features_backward_step(model: nn.Module, row: Row, x: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """Dense backbone forward + backward (a mean over each stage map as the loss), no step."""
    model.train()
    fn = forward_fn(model, row)
    fn = compiled(fn, row) if row.compile else fn

    def step() -> None:
        with autocast(row, device):
            maps = fn(x)
        loss = sum(m.float().mean() for m in maps)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


STEPS = {  # mode -> the builder of one step (model, row, input, device) -> step(); the first call compiles
    "infer": inference_step,
    "features-fwd": inference_step,
    "features-fwd+bwd": features_backward_step,
    "train": train_step,
}


# ---------------------------------------------------------------------------- one row


def free_memory(device: torch.device) -> None:
    """Drops compiled graphs and cached blocks between rows and attempts."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """CUDA out-of-memory, also when torch.compile wraps it in another exception."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def short_error(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def attempt(row: Row, batch: int, device: torch.device, progress) -> None:
    """Builds the model and input for ``batch`` and runs the row's measurement."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress(f"building (batch {batch})")
    row.drop_path = row.drop_path_rate  # recorded
    model = build_model(row, device)
    x = torch.randn(batch, 3, *row.resolution, device=device)
    time_steps(STEPS[row.mode](model, row, x, device), row, device, progress)
    row.batch = batch
    if device.type == "cuda":
        row.peak_mem_mib = torch.cuda.max_memory_allocated(device) / 2**20


def run_row(row: Row, device: torch.device, progress) -> None:
    """Measures one row, halving the batch on CUDA out-of-memory; records any error on the row."""
    batch = row.batch_requested
    while True:
        error, oom = None, False
        try:
            attempt(row, batch, device, progress)
        except Exception as exc:  # a failing row (compile, unsupported size, OOM) must not end the run
            error, oom = short_error(exc), is_oom(exc) and device.type == "cuda" and batch > 1
        free_memory(device)  # after the except block, so the traceback's tensors are gone
        if error is None:
            row.status = "ok"
            return
        row.times_s, row.first_call_s, row.wall_s, row.peak_mem_mib = [], None, None, None
        if not oom:
            row.status, row.reason = "error", error
            return
        row.oom_batches.append(batch)
        batch //= 2


def add_speedups(rows: list[Row]) -> None:
    """Speed-up of each row over the reference-eager row (timm eager for peers) of the same model."""
    base = {(r.model, r.protocol, r.mode): r for r in rows if not r.compile and r.backend in ("reference", "timm")}
    for r in rows:
        ref = base.get((r.model, r.protocol, r.mode))
        if r.ips_median and ref is not None and ref.ips_median:
            r.speedup = r.ips_median / ref.ips_median


def add_floors(rows: list[Row], device: torch.device, write: Callable[[str], None]) -> dict | None:
    """The traffic model's floor of each measured ResT row (classification inference, training
    forward + backward; not the optimizer step) at the copy bandwidth and matmul rate measured
    now, and the measured time against it. Returns the rates (None when no row qualifies)."""
    todo = [r for r in rows if r.status == "ok" and r.family != "peer" and r.mode in ("infer", "train")]
    if not todo:
        return None
    rates: dict[str, dict] = {}
    for r in todo:
        if r.precision not in rates:
            rates[r.precision] = common.roofline_rates(device, traffic.DTYPES[r.precision])
        rate = rates[r.precision]
        backend = "triton" if r.backend == "kernels" else "reference"
        try:
            count = traffic.count_model(
                r.model, backend, r.batch, r.resolution, r.precision, r.mode == "train", drop_path=r.drop_path_rate
            )
        except Exception as exc:  # the floor is extra information: never fail the run for it
            write(f"traffic model of {r.model} {r.label}: {short_error(exc)}")
            continue
        r.traffic_gb = count.bytes / 1e9
        r.floor_ms = count.floor_ms(rate["copy_gbps"], rate["matmul_tflops"])
        r.x_floor = 1e3 * statistics.median(r.times_s) / r.floor_ms
    return rates


# ---------------------------------------------------------------------------- output


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def format_table(rows: list[Row]) -> str:
    header = (
        f"{'model':<30} {'backend':<10} {'compile':<7} {'protocol':<8} {'mode':<16} {'prec':<5} {'batch':>5} "
        f"{'img/s med':>10} {'img/s mean':>10} {'speed-up':>8} {'peak MiB':>9} {'x floor':>7}  note"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.status == "ok":
            note = f"compile {r.compile_s:.1f}s" if r.compile else f"first call {r.first_call_s:.1f}s"
            if r.oom_batches:
                note += f"; OOM at {r.oom_batches}"
            speed = f"{r.speedup:.2f}x" if r.speedup else "-"
            mem = f"{r.peak_mem_mib:.0f}" if r.peak_mem_mib is not None else "-"
            floor = f"{r.x_floor:.2f}" if r.x_floor else "-"
            lines.append(
                f"{r.model:<30} {r.backend:<10} {_yes(r.compile):<7} {r.protocol:<8} {r.mode:<16} "
                f"{r.precision:<5} {r.batch:>5} "
                f"{r.ips_median:>10.1f} {r.ips_mean:>10.1f} {speed:>8} {mem:>9} {floor:>7}  {note}"
            )
        else:
            reason = (r.reason or "").splitlines()[0][:100]
            lines.append(
                f"{r.model:<30} {r.backend:<10} {_yes(r.compile):<7} {r.protocol:<8} {r.mode:<16} "
                f"{r.precision:<5} {r.batch_requested:>5} {r.status.upper():>10} {'':>10} {'':>8} {'':>9} "
                f"{'':>7}  {reason}"
            )
    return "\n".join(lines)


def plot(rows: list[Row], path: pathlib.Path, title: str) -> pathlib.Path | None:
    """Images/s bars grouped by model, coloured by backend, one panel per protocol and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = list(dict.fromkeys((r.protocol, r.mode) for r in rows))
    labels = list(dict.fromkeys(r.label for r in rows))
    colours = {lab: plt.get_cmap("tab10")(i % 10) for i, lab in enumerate(labels)}
    width_in = max(8.0, 1.6 * len({r.model for r in rows}) + 3)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width_in, 4.2 * len(panels)), squeeze=False)
    for ax, (protocol, mode) in zip(axes[:, 0], panels):
        sub = [r for r in rows if (r.protocol, r.mode) == (protocol, mode)]
        models = list(dict.fromkeys(r.model for r in sub))
        groups = [[r for r in sub if r.model == model] for model in models]
        width = 0.8 / max(len(group) for group in groups)
        for g, group in enumerate(groups):
            for k, r in enumerate(group):
                xpos = g + width * (k + 0.5 - len(group) / 2)  # each group centred on its tick
                if r.status == "ok":
                    ax.bar(xpos, r.ips_median, width, color=colours[r.label], label=r.label)
                    value = f"{r.ips_median:.0f}" if r.ips_median >= 100 else f"{r.ips_median:.3g}"
                    ax.text(xpos, r.ips_median, value, ha="center", va="bottom", fontsize=7)
                else:
                    ax.bar(xpos, 0, width, color=colours[r.label], label=r.label)
                    ax.text(xpos, 0, r.status, ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("images/s (median)")
        batches = sorted({r.batch for r in sub if r.batch})
        ax.set_title(
            f"{protocol} protocol, {mode}, {sub[0].precision}, "
            f"{sub[0].resolution[0]}x{sub[0].resolution[1]}, batch {batches or '-'}",
            fontsize=9,
        )
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(textwrap.fill(title, width=int(width_in * 14)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_progress(
    total: int,
) -> tuple[Callable[[Row], None], Callable[[str], None], Callable[[str], None], Callable[[], None]]:
    """(start row, show a step, print a line, close): a tqdm bar on a terminal, plain lines otherwise."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if not sys.stderr.isatty():  # a log file gets one line per row, not bar redraws
        tqdm = None
    if tqdm is None:
        count = [0]

        def start(row: Row) -> None:
            count[0] += 1
            print(f"[{count[0]}/{total}] {row.model} {row.label} {row.protocol} {row.mode}", flush=True)

        return start, lambda text: None, lambda text: print(text, flush=True), lambda: None
    bar = tqdm(total=total, unit="row", dynamic_ncols=True)
    state: dict = {"row": None}

    def start_tqdm(row: Row) -> None:
        if state["row"] is not None:
            bar.update(1)
        state["row"] = row
        bar.set_description(f"{row.model} {row.label} {row.protocol} {row.mode}")

    def close() -> None:
        if state["row"] is not None:
            bar.update(1)
        bar.close()

    return start_tqdm, lambda text: bar.set_postfix_str(text), lambda text: bar.write(text), close


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train and args.features:
        parser.error("--train and --features exclude each other (--features already times forward + backward)")
    for flag in ("batch", "warmup", "iters"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args = resolve(args, cuda)

    if cuda:
        torch.backends.cudnn.benchmark = True  # as timm's benchmark script: best conv algorithms per shape
    env = common.environment(device)
    env.update(
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
    )
    print(common.describe(env))
    if not cuda:
        print(
            f"No CUDA GPU: {KERNELS_NEED_CUDA.split(' (')[0]}, so the kernel rows are skipped. "
            "torch.compile on the CPU needs a C++ compiler; a failure is recorded on its row."
        )
        if args.cpu_reduced:
            print(
                f"Reduced CPU run (unless flags say otherwise): models {args.models}, backends {args.backends}, "
                f"batch {args.batch}, {args.resolution[0]}x{args.resolution[1]}, "
                f"{args.warmup} warm-up + {args.iters} timed iterations."
            )

    rows = plan_rows(args)
    todo = []
    for row in rows:
        reason = skip_reason(row, cuda)
        if reason:
            row.status, row.reason = "skipped", reason
        else:
            todo.append(row)
    skipped = [r for r in rows if r.status == "skipped"]
    if skipped:
        print(f"Skipping {len(skipped)} row(s):")
        for r in skipped:
            print(f"  {r.model} {r.label} {r.protocol} {r.mode}: {r.reason}")

    start, step_text, write, close = make_progress(len(todo))
    t_run = time.perf_counter()
    try:
        for row in todo:
            start(row)
            run_row(row, device, step_text)
            if row.status == "ok":
                write(
                    f"{row.model} {row.label} {row.protocol} {row.mode}: {row.ips_median:.1f} img/s "
                    f"(batch {row.batch}, first call {row.first_call_s:.1f}s)"
                )
            else:
                write(f"{row.model} {row.label} {row.protocol} {row.mode}: ERROR {row.reason.splitlines()[0][:200]}")
    finally:
        close()
    run_s = time.perf_counter() - t_run
    add_speedups(rows)
    floor_rates = add_floors(rows, device, write)

    print()
    print(common.describe(env))
    print(format_table(rows))
    if floor_rates:
        measured = ", ".join(
            f"{p}: copy {r['copy_gbps']:.0f} GB/s, matmul {r['matmul_tflops']:.1f} TFLOP/s"
            for p, r in floor_rates.items()
        )
        print(
            f"x floor: median step time over the traffic model's floor (benchmarks/traffic.py: every op's bytes "
            f"at the copy bandwidth, its matmul FLOPs at the matmul rate, both measured now: {measured}; "
            "counted with the model in the row's dtype, which autocast exceeds; train rows: forward + backward, "
            "no optimizer step)"
        )

    json_path = common.results_path("throughput", "json", device=device, out_dir=args.out_dir, tag=args.tag)
    config = {k: v for k, v in vars(args).items() if k not in ("out_dir",)}
    config.update(
        out_dir=str(json_path.parent),
        device=str(device),
        run_s=run_s,
        protocol_defaults={k: dict(zip(("batch", "warmup", "iters"), v)) for k, v in PROTOCOLS.items()},
        peers_table=PEERS,
        floor_rates=floor_rates,
    )
    common.write_json(json_path, {"environment": env, "config": config, "rows": [r.to_dict() for r in rows]})
    print(f"\nraw timings: {json_path}")
    if not args.no_plot:
        png = plot(rows, json_path.with_suffix(".png"), common.describe(env))
        print(f"chart:       {png}" if png else "chart:       skipped (matplotlib is not installed)")
    print(f"total time:  {run_s:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
