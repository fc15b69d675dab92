"""The GPU runner: prepared commands (plans) for a GPU lease, each a few phases within one time budget.

GPUs come to this project by chance, for a lease of 15 minutes of device time (the machine's start,
every command, the transfers and idle waits all count), at most 10 minutes a command, through a remote
tool that runs one shell command in a copy of the repository and brings back the files under ``$OUT``
(at most 8 a command, at most two folders deep). Nothing can be installed there, so the tree runs in
place. A lease holds the machine's start and two plans, each run with the tool's ``timeout_s=360``
(``--list`` prints the whole schedule, two plans a lease, most important first):

    PYTHONPATH=. python benchmarks/gpu_suite.py --plan first --out $OUT
    PYTHONPATH=. python benchmarks/gpu_suite.py --plan targets --out $OUT

A plan runs its steps in order, each a child ``--phase P --tag T --out $OUT/T`` with what is left of
the plan's budget (``--budget-s``, default 300 s; at most the step's cap), and prints every step's
summary last. A step that fails or crashes leaves the next ones to run. One phase runs on its own too:

    PYTHONPATH=. python benchmarks/gpu_suite.py --phase env --out $OUT/env

Phases (``--phase``); each writes ``<phase>.json`` (everything), ``<phase>.log`` (what it printed)
and, where a chart helps (kernels, e2e), ``<phase>.png`` (profile: ``<phase>.zip``, the traces) into ``--out``:

  env      GPU, driver, torch, triton, CUDA, SM count, L2, memory, compute capability, the plans'
           target (``plans.device_target``), copy bandwidth and matmul rates measured now, the first
           (compiling) call of both kernels, nvidia-smi.
  tests    ``pytest -m "(cuda or bf16) and not inductor"`` (compiled Triton, bf16, CUDA graphs), then
           ``-m "cuda and inductor"`` (torch.compile's Inductor: minutes), then ``-m "not cuda and not bf16"``
           (on a GPU conftest sets no TRITON_INTERPRET, so every kernel runs compiled), ``--runs``
           choosing; the target check (tests/test_targets.py, no GPU needed) is left to CI; counts per
           run and each failure's node id and message, from the JUnit XML; what each run compiled
           into Triton's cache (part of its wall time).
  kernels  ``bench_attention.py``, ``bench_upsample.py`` (restv2_tiny) and ``bench_attention_mixed.py``
           (rest_small, rest_large) for bf16, fp16, fp32 (in that order), the 224 px stage shapes
           at batch 128 and the 800x1333 stages at batch 2 (``--groups``; ``s1``: the targets' stage-1
           shape alone), forward and backward, against eager, SDPA and torch.compile, merged into one JSON.
  e2e      ``throughput.py`` rows: ``--part core`` (restv2_tiny with the four backends, the ConvNeXt
           and Swin peers, training, 800x1333 features) or ``--part zoo`` (restv2_small/base/large);
           first, the kernel rows' launch plans compiled on every core (``precompile``).
  sweep    candidate launch plans of each kernel family (``plans.forced``) on the stage shapes: every
           candidate's time, and the best plan per shape next to the current plan's (attention,
           ResTv1's mixed-head attention, upsample, the MLP's linear + GELU GEMM, add + LayerNorm,
           PA (+ LayerNorm), the stems' bias + ReLU and BatchNorm + ReLU; all but the attention and
           upsample families with the eager ops they replace timed beside the current plan).
  profile  where the time goes, for a missed target: the e2e target rows (restv2_tiny inference,
           training, 800x1333 features; reference and kernels side by side) and the attention and
           upsample ops at the stage-1 shape under ``torch.profiler`` (``kernel_profile.py``): each
           kernel's ms per step, by category, and the chrome traces in ``<phase>.zip``.

The kernels and e2e phases end with the speed targets they measure (``report.py``'s scorecard:
met, missed by how much, or not measured and why), printed and kept in their JSON.

Budget (``--budget-s``, default 300): a phase is a list of work items in order of importance, each
with an estimate. An item starts only if its estimate fits what is left of the budget, and a child
still running when the budget ends is stopped. What does not run is recorded as skipped, with why.
The JSON is rewritten after every item, so a command killed from outside still leaves its results.

Isolation: pytest, the kernel benchmarks, the e2e rows and the sweep candidates run in child
processes (e2e and sweep children are this script with ``--worker``). A CUDA error, a hang or a crash
ends that child; the parent records it and starts another for the items left.

``--dry-run`` (every phase and plan) runs on a CPU-only machine in seconds: no CUDA call, the same files with
the same structure, measurements null and ``"dry_run": true``, and the plan printed (command lines,
rows and candidates with their estimates). Without it, a machine without CUDA is refused. The
summary is printed last: the remote tool returns only the last 12,000 characters of output.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import fnmatch
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, TextIO

import torch

_HERE = pathlib.Path(__file__).resolve().parent
ROOT = _HERE.parent
for _p in (str(ROOT), str(_HERE)):  # the tree's restv2_kernels and common, installed or not
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402

# plans: pure functions; targets: Triton imported only where a function needs it; neither asks the GPU
from restv2_kernels import plans, targets  # noqa: E402

PHASES = ("env", "tests", "kernels", "e2e", "sweep", "profile")
# A lease is 15 minutes of device time, all counted: the machine's start (a minute or two), each
# command, the transfers and idle waits. It holds the start and two commands of this budget, each
# run with the remote tool's timeout_s=360, and leaves room to re-run one that broke early.
LEASE_S = 900
WARM_S = 30  # how long the machine stays held after a call before it goes back
DEFAULT_BUDGET_S = 300.0
FILE_EXTS = ("json", "log", "png", "zip")
PHASE_EXTRA_FILE = {"kernels": "png", "e2e": "png", "profile": "zip"}  # beside each phase's JSON and log
REMOTE_MAX_FILES = 8  # what the remote tool brings back of one command
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")  # what the remote tool brings back
STOP_GRACE_S = 20.0  # a child told to stop (SIGINT) gets this long to write its report before SIGKILL
WORKER_CUDA_LOST = 3  # a worker's exit code when its CUDA context is gone (the parent starts another)
DEVICE = "cuda"  # the workers' device; the CPU test points it at "cpu" (Triton's interpreter)


# ---------------------------------------------------------------------------------------
# The run: output folder, clock, budget, record (the JSON), log
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One phase's command: what it writes where, its clock and budget, and its record (the JSON)."""

    phase: str
    out: pathlib.Path
    args: argparse.Namespace
    argv: list[str]
    record: dict = dataclasses.field(default_factory=dict)
    items: list[dict] = dataclasses.field(default_factory=list)  # the work items, in order
    t0: float = dataclasses.field(default_factory=time.monotonic)
    log: TextIO | None = None

    @property
    def dry_run(self) -> bool:
        return bool(self.args.dry_run)

    @property
    def stem(self) -> str:
        return self.args.tag or self.phase

    def path(self, ext: str) -> pathlib.Path:
        return self.out / f"{self.stem}.{ext}"

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def deadline(self) -> float:
        """The end of the budget on the wall clock (``time.time()``), which children share."""
        return time.time() + self.left()

    def log_only(self, line: str) -> None:
        """A line for the log file, not the console (the chatter of parallel children)."""
        if self.log is not None:
            self.log.write(line + "\n")
            self.log.flush()

    def save(self, status: str | None = None) -> None:
        """Rewrites the JSON: the record, the work items' states, the files present, the wall time."""
        if status:
            self.record["status"] = status
        self.record["wall_s"] = round(self.elapsed(), 2)
        self.record["work"] = [_work_view(item) for item in self.items]
        self.record["files"] = [self.path(ext).name for ext in FILE_EXTS if ext == "json" or self.path(ext).exists()]
        common.write_json(self.path("json"), self.record)


def _work_view(item: dict) -> dict:
    return {k: item.get(k) for k in ("id", "estimate_s", "status", "wall_s", "reason", "plan")}


def work_item(item_id: str, estimate_s: float, **extra: Any) -> dict:
    """A unit of work: ``status`` goes pending -> running -> ok | error | timeout | skipped (| planned)."""
    return {
        "id": item_id,
        "estimate_s": round(float(estimate_s), 1),
        "status": "pending",
        "wall_s": None,
        "reason": None,
        "plan": None,
        **extra,
    }


def skip(item: dict, reason: str) -> None:
    item.update(status="skipped", reason=reason)


def fits(run: Run, item: dict) -> bool:
    """Whether the item may start: its estimate (or its ``min_s``) fits what is left of the budget."""
    return run.left() >= item.get("min_s", item["estimate_s"])


def plan_budget(items: list[dict], budget_s: float) -> float:
    """Dry run: marks each item ``plan = "run"`` or ``"skip (budget)"`` from the estimates, in order,
    as the real run decides; returns the estimated seconds of the items that would run."""
    used = 0.0
    for item in items:
        if budget_s - used >= item.get("min_s", item["estimate_s"]):
            item["plan"] = "run"
            used += item["estimate_s"]
        else:
            item["plan"] = "skip (budget)"
        item["status"] = "planned"
    return used


def format_plan(items: list[dict]) -> list[str]:
    return [f"  [{item['plan'] or '':<13}] ~{item['estimate_s']:>5.0f}s  {item['id']}" for item in items]


class _Tee:
    """A stream writing to several (the console and the log), a line at a time across threads."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            for stream in self.streams:
                stream.write(text)
                stream.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


def _error(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {str(exc).strip()}"
    return text if len(text) <= limit else text[:limit] + " ..."


def display(cmd: list[str]) -> str:
    """A command line as one would type it: ``python`` for the interpreter, paths relative to the tree."""
    parts = ["python" if c == sys.executable else c.replace(str(ROOT) + os.sep, "") for c in cmd]
    return " ".join(f"'{p}'" if (" " in p or not p) else p for p in parts)


def load_script(name: str):
    """A sibling script (``throughput``, ``bench_attention``) as a module, by path, as the tests load them."""
    spec = importlib.util.spec_from_file_location(f"_gpu_suite_{name}", _HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------------------
# Provenance: git commit, changed files, a hash of the sources (no git on the GPU machine)
# ---------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    exe = shutil.which("git")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def tree_sha256() -> str:
    """SHA-256 over the Python sources of the tree (paths and contents): ties results to code without git."""
    digest = hashlib.sha256()
    for folder in ("restv2", "restv2_kernels", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def base_record(run: Run) -> dict:
    device = torch.device("cpu" if run.dry_run else "cuda")
    status = _git("status", "--porcelain")
    return {
        "suite": "benchmarks/gpu_suite.py",
        "phase": run.phase,
        "tag": run.args.tag,
        "dry_run": run.dry_run,
        "status": "running",
        "command": display([sys.executable, "benchmarks/gpu_suite.py", *run.argv]),
        "argv": list(run.argv),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "wall_s": 0.0,
        "budget_s": run.args.budget_s,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_changed": status.splitlines()[:100] if status else ([] if status is not None else None),
        "tree_sha256": tree_sha256(),
        "environment": common.environment(device),
        "files": [],
        "work": [],
        run.phase: {},
        "summary": [],
    }


# ---------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------

_CHILDREN: set[subprocess.Popen] = set()


def child_env() -> dict[str, str]:
    """This environment without TRITON_INTERPRET (compiled kernels), with the tree on PYTHONPATH."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(cmd: list[str], echo: Callable[[str], None]) -> tuple[subprocess.Popen, threading.Thread, collections.deque]:
    """Starts ``cmd`` in the tree's root in its own process group; a thread echoes its output lines.
    Returns the process, the thread and the last 60 lines (kept for the JSON).

    A process group, not a session: ``stop`` signals the whole group (pytest and its workers), and
    the remote tool, which ends whatever a command leaves running except processes in a session
    of their own, still ends a child whose driver it killed at its limit (an orphan would hold the
    GPU through the next command's timings). Python 3.10 has no ``process_group``: a session there."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        **({"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}),
    )
    _CHILDREN.add(proc)
    tail: collections.deque = collections.deque(maxlen=60)

    def pump() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            echo(line.rstrip("\n"))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return proc, thread, tail


def stop(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGINT to the child's process group (pytest then writes its report), SIGKILL after ``grace`` s."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


def _reap(proc: subprocess.Popen, thread: threading.Thread) -> None:
    thread.join(5)
    _CHILDREN.discard(proc)


def run_command(
    cmd: list[str], timeout_s: float, echo: Callable[[str], None] = print, grace: float = STOP_GRACE_S
) -> dict:
    """Runs ``cmd`` to the end or for ``timeout_s``; its output echoed line by line."""
    t0 = time.monotonic()
    echo(f"$ {display(cmd)}")
    proc, thread, tail = spawn(cmd, echo)
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        echo(f"[gpu_suite] the budget ran out after {timeout_s:.0f} s: stopping the child")
        stop(proc, grace)
    _reap(proc, thread)
    return {
        "argv": display(cmd),
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "wall_s": round(time.monotonic() - t0, 2),
        "tail": list(tail)[-40:],
    }


# ---------------------------------------------------------------------------------------
# Workers: this script with --worker runs items and reports each as a JSON line
# ---------------------------------------------------------------------------------------


def _start_worker(
    kind: str,
    shared: dict,
    items: list[dict],
    deadline: float,
    tmp: pathlib.Path,
    index: int,
    echo: Callable[[str], None],
) -> tuple[subprocess.Popen, threading.Thread, pathlib.Path]:
    spec_path, events = tmp / f"worker{index}.json", tmp / f"worker{index}.events"
    spec_path.write_text(
        json.dumps(
            {
                "kind": kind,
                "shared": shared,
                "events": str(events),
                "items": [
                    {
                        "id": it["id"],
                        "estimate_s": it["estimate_s"],
                        "group": it.get("group", ""),
                        "deadline": min(it.get("deadline", deadline), deadline),
                        "spec": it["spec"],
                    }
                    for it in items
                ],
            }
        )
    )
    proc, thread, _ = spawn([sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", str(spec_path)], echo)
    return proc, thread, events


class _Events:
    """Reads a worker's event file as it grows: complete lines only."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path, self.offset = path, 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [json.loads(line) for line in data[:end].decode().splitlines() if line.strip()]


def supervise(
    run: Run,
    kind: str,
    items: list[dict],
    *,
    shared: dict,
    item_timeout: Callable[[dict], float],
    on_done: Callable[[dict], None] = lambda item: None,
    max_workers: int = 6,
) -> None:
    """Runs the pending ``items`` in order in one worker child at a time, until the budget ends.

    A worker that dies (a crash, a lost CUDA context) or hangs past ``item_timeout(item)`` takes
    the item it was on with it (status error / timeout); another worker starts for the items left.
    Each item gets status, wall_s, reason and the worker's ``result``.
    """
    by_id = {it["id"]: it for it in items}
    for attempt in range(max_workers):
        pending = [it for it in items if it["status"] == "pending"]
        if not pending or run.left() <= 0:
            break
        with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
            proc, thread, path = _start_worker(kind, shared, pending, run.deadline(), pathlib.Path(tmp), attempt, print)
            events, current, started = _Events(path), None, 0.0
            while True:
                exited = proc.poll() is not None
                for ev in events.read():
                    item = by_id[ev["id"]]
                    if ev["event"] == "start":
                        current, started = item, time.monotonic()
                        item["status"] = "running"
                    elif ev["event"] == "skip":
                        skip(item, ev["reason"])
                    else:
                        item.update(
                            status=ev["status"], wall_s=ev["wall_s"], reason=ev.get("reason"), result=ev.get("result")
                        )
                        current = None
                        on_done(item)
                if exited:
                    break
                if current is not None and time.monotonic() - started > item_timeout(current):
                    stop(proc, grace=5.0)
                    current.update(
                        status="timeout",
                        wall_s=round(time.monotonic() - started, 1),
                        reason=f"no result after {item_timeout(current):.0f} s: the worker was stopped",
                    )
                    current = None
                elif run.left() < -STOP_GRACE_S:
                    stop(proc, grace=5.0)
                    if current is not None:
                        current.update(status="timeout", reason="the budget ran out during this item")
                        current = None
                time.sleep(0.2)
            _reap(proc, thread)
            if current is not None:  # it died on this item
                why = (
                    "lost its CUDA context"
                    if proc.returncode == WORKER_CUDA_LOST
                    else f"exited with code {proc.returncode}"
                )
                current.update(
                    status="error",
                    wall_s=round(time.monotonic() - started, 1),
                    reason=f"the worker {why} during this item",
                )
                on_done(current)
    for it in items:
        if it["status"] in ("pending", "running"):
            skip(it, "budget" if run.left() <= 0 else f"{max_workers} workers died before reaching it")


def run_parallel(run: Run, kind: str, items: list[dict], *, shared: dict, workers: int, deadline: float) -> dict:
    """Runs ``items`` spread over ``workers`` children at once (round-robin: the first items first),
    until they finish or ``deadline``; their output goes to the log only. Returns event counts."""
    counts: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        procs = []
        for index in range(min(workers, len(items))):
            chunk = items[index::workers]
            proc, thread, path = _start_worker(
                kind,
                shared,
                chunk,
                deadline,
                pathlib.Path(tmp),
                index,
                lambda line, i=index: run.log_only(f"[w{i}] {line}"),
            )
            procs.append((proc, thread, _Events(path)))
        while any(p.poll() is None for p, _, _ in procs) and time.time() < deadline + 1:
            time.sleep(0.5)
        for proc, thread, events in procs:
            stop(proc, grace=2.0)
            _reap(proc, thread)
            for ev in events.read():
                counts[ev["event"] if ev["event"] != "done" else ev["status"]] += 1
            counts["exit_" + str(proc.returncode)] += 1
    return dict(counts)


class CudaLost(RuntimeError):
    """The worker's CUDA context is gone (an illegal address, a trap): nothing more can run in it."""


def _synchronize() -> None:
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.empty_cache()


def cuda_alive() -> bool:
    try:
        _synchronize()
        return float(torch.ones(1, device=DEVICE).add_(1).item()) == 2.0
    except Exception:  # noqa: BLE001  (any error here means the context is unusable)
        return False


def worker_main(spec_path: str) -> int:
    """The child side: runs each item (unless it no longer fits its deadline), one JSON event a line."""
    spec = json.loads(pathlib.Path(spec_path).read_text())
    handle = WORKERS[spec["kind"]](spec["shared"])
    taken: dict[str, list[float]] = collections.defaultdict(list)  # actual seconds per group: later estimates
    with open(spec["events"], "a") as events:

        def emit(**event: Any) -> None:
            events.write(json.dumps(event, default=str) + "\n")
            events.flush()

        for item in spec["items"]:
            group = item.get("group", "")
            need = statistics.mean(taken[group]) if taken[group] else item["estimate_s"]
            if time.time() + need > item["deadline"]:
                left = max(0.0, item["deadline"] - time.time())
                emit(event="skip", id=item["id"], reason=f"budget: ~{need:.0f} s needed, {left:.0f} s left")
                continue
            emit(event="start", id=item["id"])
            t0 = time.monotonic()
            lost = False
            try:
                status, result, reason = handle(item["spec"])
            except CudaLost as exc:
                status, result, reason, lost = "error", None, _error(exc), True
            except Exception as exc:  # noqa: BLE001  (one failing item must not take the others with it)
                status, result, reason = "error", None, _error(exc)
                lost = not cuda_alive()
            wall = time.monotonic() - t0
            taken[group].append(wall)
            emit(event="done", id=item["id"], status=status, result=result, reason=reason, wall_s=round(wall, 2))
            if lost:
                print("[worker] the CUDA context is lost; this worker stops", flush=True)
                return WORKER_CUDA_LOST
    return 0


# ---------------------------------------------------------------------------------------
# Phase env
# ---------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def _props_dict(props: Any) -> dict:
    return {
        k: _jsonable(getattr(props, k))
        for k in dir(props)
        if not k.startswith("_") and not callable(getattr(props, k, None))
    }


def _measure(record: dict, key: str, fn: Callable[[], Any]) -> None:
    """``record[key] = fn()``, or the error as ``record[key + "_error"]``: one failure hides nothing else."""
    try:
        record[key] = fn()
    except Exception as exc:  # noqa: BLE001  (recorded; the other measurements go on)
        record[key] = None
        record[key + "_error"] = _error(exc)


def _nvidia_smi(*args: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _first_calls(device: torch.device) -> dict:
    """Seconds of the first (compiling) call and ms of a later one, of both kernels, forward + backward."""
    from restv2_kernels import emsa_attention, upsample_add

    torch.manual_seed(0)
    q = torch.randn(8, 784, 2, 96, device=device, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(8, 49, 2, 2, 96, device=device, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(8, 28, 28, 192, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(8, 7, 7, 192, device=device, dtype=torch.bfloat16, requires_grad=True)
    params = [
        torch.randn(16 * 192, 1, 3, 3, device=device, dtype=torch.bfloat16, requires_grad=True),
        torch.randn(16 * 192, device=device, dtype=torch.bfloat16, requires_grad=True),
        torch.ones(192, device=device, dtype=torch.bfloat16, requires_grad=True),
        torch.zeros(192, device=device, dtype=torch.bfloat16, requires_grad=True),
    ]
    steps = {
        "attention": lambda: emsa_attention(q, kv[:, :, 0], kv[:, :, 1]).float().sum().backward(),
        "upsample": lambda: upsample_add(x, v, *params, 4).float().sum().backward(),
    }
    out = {}
    for name, step in steps.items():
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        out[f"{name}_first_call_s"] = round(time.perf_counter() - t0, 3)
        out[f"{name}_later_call_ms"] = round(common.time_ms(step, device, reps=10), 4)
    return out


def phase_env(run: Run) -> list[str]:
    rec = run.record["env"]
    keys = (
        "gpu",
        "driver",
        "torch",
        "triton",
        "cuda",
        "compute_capability",
        "sm_count",
        "l2_cache_mib",
        "memory_gib",
        "target",
        "triton_target",
        "copy_gbps",
        "matmul_tflops",
        "first_calls",
        "device_properties",
        "nvidia_smi",
        "nvidia_smi_query",
    )
    rec.update(dict.fromkeys(keys))
    env = run.record["environment"]
    rec.update(gpu=env["gpu"], driver=env["driver"], torch=env["torch"], triton=env["triton"], cuda=env["cuda"])
    rec["packages"] = {
        p: common._version(p)
        for p in (
            "torch",
            "triton",
            "timm",
            "numpy",
            "matplotlib",
            "pytest",
            "pytest-xdist",
            "pytest-timeout",
            "hypothesis",
            "tqdm",
        )
    }
    if run.dry_run:
        print(
            "would record: device properties (SM count, L2, memory, compute capability), "
            "plans.device_target(cuda), Triton's target, nvidia-smi;"
        )
        print(
            "would measure: copy bandwidth (1 GiB dst.copy_(src)), 8192^3 matmul TFLOP/s in bf16, fp16, "
            "fp32 (IEEE) and tf32, the first (compiling) call of emsa_attention and upsample_add."
        )
        return _env_summary(rec)

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    rec.update(
        compute_capability=f"{props.major}.{props.minor}",
        sm_count=props.multi_processor_count,
        l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 2) or None,
        memory_gib=round(props.total_memory / 2**30, 2),
        device_properties=_props_dict(props),
    )
    _measure(rec, "target", lambda: dataclasses.asdict(plans.device_target(device)))

    def triton_target() -> str:
        from triton.runtime import driver

        return str(driver.active.get_current_target())

    _measure(rec, "triton_target", triton_target)
    run.save()
    _measure(rec, "copy_gbps", lambda: round(common.copy_bandwidth_gbps(device), 1))
    rates: dict = {}
    for name, dtype, tf32 in (
        ("bf16", torch.bfloat16, False),
        ("fp16", torch.float16, False),
        ("fp32_ieee", torch.float32, False),
        ("tf32", torch.float32, True),
    ):

        def rate(dtype: torch.dtype = dtype, tf32: bool = tf32) -> float:
            with plans.tf32_matmuls(tf32):
                return round(common.matmul_tflops(device, dtype), 1)

        _measure(rates, name, rate)
    rec["matmul_tflops"] = rates
    run.save()
    _measure(rec, "first_calls", lambda: _first_calls(device))
    rec["nvidia_smi"] = _nvidia_smi()
    rec["nvidia_smi_query"] = _nvidia_smi(
        "--query-gpu=name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,"
        "power.draw,power.limit,temperature.gpu,memory.used,memory.total,mig.mode.current,ecc.mode.current",
        "--format=csv",
    )
    return _env_summary(rec)


def _env_summary(rec: dict) -> list[str]:
    rates = rec.get("matmul_tflops") or {}
    target = rec.get("target") or {}
    first = rec.get("first_calls") or {}
    return [
        (
            f"GPU {rec['gpu']} | cc {rec['compute_capability']} | {rec['sm_count']} SMs | L2 {rec['l2_cache_mib']} MiB "
            f"| {rec['memory_gib']} GiB | driver {rec['driver']}"
        ),
        f"torch {rec['torch']} | triton {rec['triton']} | CUDA {rec['cuda']} | triton target {rec['triton_target']}",
        (
            f"plans target: {target.get('name')} tables={target.get('tables')} sm_count={target.get('sm_count')} "
            f"smem/block={target.get('smem_per_block')} tensor_cores={target.get('tensor_cores')}"
        ),
        f"copy {rec['copy_gbps']} GB/s | matmul TFLOP/s: " + ", ".join(f"{k} {v}" for k, v in rates.items()),
        "first call (compile) s: " + ", ".join(f"{k} {v}" for k, v in first.items()),
    ]


# ---------------------------------------------------------------------------------------
# Phase tests
# ---------------------------------------------------------------------------------------

TEST_RUNS = (  # name, marker expression, estimate s, least budget left to start; the default order
    # compiled Triton parity, bf16 (the interpreter's run emulates it), CUDA graphs: Triton compiles.
    # A CPU rehearsal (the run's tests in the interpreter on sm_90's plans, each launch specialised as
    # the JIT does) counted 276 distinct compiles, 263 s on 2 CPU cores: ~35 s over 8 workers, plus the
    # launches only a GPU runs (CUDA graphs, int64 offsets). The summary says what a run compiled.
    ("cuda", "(cuda or bf16) and not inductor", 90.0, 30.0),
    ("inductor", "cuda and inductor", 150.0, 45.0),  # torch.compile's Inductor: the ops, whole models, reduce-overhead
    ("not-cuda", "not cuda and not bf16", 300.0, 45.0),  # the rest of the CPU suite, compiled: odd shapes and sizes
)
# needs no GPU: compiles every launch plan for sm_80/89/90 (about a minute on 16 cores, where Triton's
# build has no committed readings); CI runs it on every push
TEST_IGNORE = ("tests/test_targets.py",)


def pytest_command(args: argparse.Namespace, marker: str, junit: pathlib.Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests",
        "-m",
        marker,
        "-p",
        "no:cacheprovider",
        "-rfE",
        "--durations=25",
        f"--junitxml={junit}",
        *(f"--ignore={path}" for path in TEST_IGNORE),
    ]
    if _has("pytest_timeout"):
        cmd.append(f"--timeout={args.test_timeout}")
    if args.pytest_workers > 0 and _has("xdist"):
        cmd += ["-n", str(args.pytest_workers)]
    return cmd


def clip_lines(text: str | None, limit: int = 40) -> str:
    """The first ~``limit`` lines: the head and, for long text, the tail (where the assertion is)."""
    lines = (text or "").splitlines()
    if len(lines) <= limit:
        return "\n".join(lines)
    head, tail = 12, limit - 13
    return "\n".join(lines[:head] + [f"... ({len(lines) - head - tail} lines cut) ..."] + lines[-tail:])


def _node_id(case: ET.Element) -> str:
    """``tests/test_x.py::Class::test[param]`` from JUnit's dotted classname and name."""
    parts = (case.get("classname") or "").split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (ROOT / path).exists():
            return "::".join([path, *parts[i:], case.get("name", "")])
    return f"{case.get('classname')}::{case.get('name')}"


def parse_junit(path: pathlib.Path) -> dict:
    """Counts (passed, failed, errors, skipped, total) and each failure/error: node id, kind, message."""
    counts = dict.fromkeys(("passed", "failed", "errors", "skipped"), 0)
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        kind = (
            "failed"
            if "failure" in tags
            else "errors"
            if "error" in tags
            else "skipped"
            if "skipped" in tags
            else "passed"
        )
        counts[kind] += 1
        for child in case:
            if child.tag in ("failure", "error"):
                failures.append(
                    {
                        "nodeid": _node_id(case),
                        "kind": child.tag,
                        "time_s": case.get("time"),
                        "message": clip_lines(child.get("message"), 5),
                        "text": clip_lines(child.text, 40),
                    }
                )
    counts["total"] = sum(counts.values())
    return {"counts": counts, "failures": failures}


def phase_tests(run: Run) -> list[str]:
    rec = run.record["tests"]
    rec.update(
        runs=[],
        note="the GPU image has pytest-xdist and pytest-timeout; -n and --timeout are added when they are importable",
        ignored={path: "needs no GPU: the target check, which CI runs" for path in TEST_IGNORE},
    )
    tmp = pathlib.Path("<tmp>" if run.dry_run else tempfile.mkdtemp(prefix="gpu_suite_junit_"))
    runs = {entry[0]: entry for entry in TEST_RUNS}
    chosen = (runs[name] for name in run.args.runs)
    run.items = [work_item(name, est, min_s=least, marker=marker) for name, marker, est, least in chosen]
    for item in run.items:
        junit = tmp / f"junit-{item['id']}.xml"
        cmd = pytest_command(run.args, item["marker"], junit)
        entry = {
            "name": item["id"],
            "marker": item["marker"],
            "argv": display(cmd),
            "returncode": None,
            "timed_out": None,
            "wall_s": None,
            "counts": None,
            "failures": [],
        }
        rec["runs"].append(entry)
        if run.dry_run:
            continue
        if not fits(run, item):
            skip(item, f"budget: {run.left():.0f} s left")
            continue
        item["status"] = "running"
        run.save()
        before = targets.cache_entries()
        result = run_command(cmd, run.left())
        entry.update({k: result[k] for k in ("returncode", "timed_out", "wall_s", "tail")})
        ours, other = compiled_since(before)  # how much of wall_s went to compiling (the workers share the cache)
        entry["compiled"] = {"by_kernel": ours, "other": other}
        reason = None
        try:
            entry.update(parse_junit(junit))
        except (OSError, ET.ParseError) as exc:  # pytest killed before it wrote the report
            reason = f"no JUnit report: {_error(exc, 200)}"
        item.update(
            wall_s=result["wall_s"],
            reason=reason,
            status="timeout" if result["timed_out"] else "ok" if result["returncode"] in (0, 1, 5) else "error",
        )
        run.save()
    if run.dry_run:
        plan_budget(run.items, run.args.budget_s)
        print(
            "would run (one after the other, TRITON_INTERPRET removed from the environment; "
            f"pytest-timeout here: {_has('pytest_timeout')}, pytest-xdist here: {_has('xdist')}):"
        )
        for item, entry in zip(run.items, rec["runs"]):
            print(f"  [{item['plan']:<13}] ~{item['estimate_s']:>4.0f}s  {entry['argv']}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return _tests_summary(rec)


def _tests_summary(rec: dict) -> list[str]:
    lines = []
    for entry in rec["runs"]:
        c = entry.get("counts")
        counts = (
            f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
            if c
            else "no counts"
        )
        extra = " TIMED OUT" if entry.get("timed_out") else ""
        made = entry.get("compiled")
        if made:
            ours = sum(made["by_kernel"].values())
            extra += f"; compiled {ours} plans of this package's kernels, {made['other']} other kernels"
        lines.append(f"pytest -m {entry['marker']!r}: {counts} (rc {entry['returncode']}, {entry['wall_s']} s){extra}")
    failures = [f for entry in rec["runs"] for f in entry.get("failures", [])]
    for f in failures[:40]:
        first = (f["message"] or f["text"] or "").splitlines()[:1]
        lines.append(f"  {f['kind'].upper()} {f['nodeid']}: {first[0][:160] if first else ''}")
    if len(failures) > 40:
        lines.append(f"  ... and {len(failures) - 40} more in tests.json")
    return lines


# ---------------------------------------------------------------------------------------
# The scorecard of the kernels and e2e phases (benchmarks/report.py)
# ---------------------------------------------------------------------------------------


def scorecard_lines(run: Run, dtype: str = "bf16") -> list[str]:
    """The project's speed targets this phase measures, judged on its own record (``report.TARGETS``);
    kept in the JSON as ``"scorecard"``. ``report.py`` judges them over several phase files."""
    report = load_script("report")
    res = report.collect([{**run.record, "_file": str(run.path("json"))}])
    checks = report.scorecard(res, dtype, phases=[run.phase])
    run.record["scorecard"] = [c.to_dict() for c in checks]
    head = f"scorecard ({dtype}; a dry run measures nothing)" if run.dry_run else f"scorecard ({dtype}):"
    return [head, *report.check_lines(checks)]


# ---------------------------------------------------------------------------------------
# Phase kernels
# ---------------------------------------------------------------------------------------

KERNEL_BENCHES = ("attention", "upsample", "attention_mixed")
SHAPE_GROUPS = {  # --groups: the shapes of each (the default: 224 and det)
    "s1": "restv2_tiny's stage 1 at 224 px, batch 128: the kernel targets' shape (attention, upsample)",
    "224": "the 224 px stages at batch 128",
    "det": "the 800x1333 stages at batch 2",
}
KERNEL_SHAPES = {  # (bench, group): the --shapes (names or prefixes) its script takes for the group
    ("attention", "s1"): ["tiny-s1-224"],
    ("upsample", "s1"): ["tiny-s1-224"],
    ("attention", "224"): ["tiny"],
    ("attention", "det"): ["det"],  # restv2_tiny
    ("upsample", "224"): ["tiny"],
    ("upsample", "det"): ["det"],
    ("attention_mixed", "224"): ["small", "large"],
    ("attention_mixed", "det"): ["det"],  # rest_small, rest_large
}
KERNEL_ESTIMATE_S = {
    ("attention", "s1"): 35.0,
    ("upsample", "s1"): 50.0,
    ("attention", "224"): 60.0,
    ("attention", "det"): 35.0,
    ("upsample", "224"): 90.0,
    ("upsample", "det"): 35.0,
    ("attention_mixed", "224"): 90.0,
    ("attention_mixed", "det"): 45.0,
}  # fp32 runs take ~1.3x


def kernel_items(args: argparse.Namespace, tmp: pathlib.Path) -> list[dict]:
    items = []
    for dtype in args.dtypes:
        for group in args.groups:
            for bench in args.benches:
                if (bench, group) not in KERNEL_SHAPES:  # ResTv1's mixed attention has no stage 1
                    continue
                out = tmp / f"{bench}_{dtype}_{group}.json"
                cmd = [
                    sys.executable,
                    str(_HERE / f"bench_{bench}.py"),
                    "--dtype",
                    dtype,
                    "--shapes",
                    *KERNEL_SHAPES[bench, group],
                    "--out",
                    str(out),
                ]
                est = KERNEL_ESTIMATE_S[bench, group] * (1.3 if dtype == "fp32" else 1.0)
                items.append(
                    work_item(f"{bench}/{dtype}/{group}", est, bench=bench, dtype=dtype, group=group, cmd=cmd, json=out)
                )
    return items


def _read_json(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or cut short by a kill
        return None


def kernel_summary(rows: list[dict]) -> list[dict]:
    """Per (bench, dtype, shape) and mode: triton's ms and multiple of the floor, the fastest other impl."""
    out = []
    for bench, dtype, shape in dict.fromkeys((r["bench"], r["dtype"], r["shape"]) for r in rows):
        entry: dict = {"bench": bench, "dtype": dtype, "shape": shape}
        for mode in common.MODES:
            sub = [
                r
                for r in rows
                if (r["bench"], r["dtype"], r["shape"], r["mode"]) == (bench, dtype, shape, mode)
                and r.get("ms") is not None
            ]
            ours = next((r for r in sub if r["impl"] == "triton"), None)
            others = [r for r in sub if r["impl"] != "triton"]
            best = min(others, key=lambda r: r["ms"]) if others else None
            entry[mode] = {
                "triton_ms": ours["ms"] if ours else None,
                "x_floor": ours.get("x_floor") if ours else None,
                "best_other": best["impl"] if best else None,
                "best_other_ms": best["ms"] if best else None,
                "speedup": best["ms"] / ours["ms"] if ours and best else None,
            }
        out.append(entry)
    return out


def _kernel_line(entry: dict) -> str:
    parts = []
    for mode in common.MODES:
        m = entry[mode]
        if m["triton_ms"] is None:
            parts.append(f"{mode} n/a")
            continue
        vs = f" {m['speedup']:.2f}x vs {m['best_other']}" if m["speedup"] else ""
        floor = f" {m['x_floor']:.1f}xfloor" if m["x_floor"] else ""
        parts.append(f"{mode} {m['triton_ms']:.3f}ms{vs}{floor}")
    return f"{entry['bench']:<15} {entry['dtype']:<4} {entry['shape']:<21} " + " | ".join(parts)


def plot_kernels(summary: list[dict], path: pathlib.Path, title: str, note: str = "") -> pathlib.Path | None:
    """Triton's speed-up over the fastest other implementation, per shape and dtype; a panel per bench and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(
        len(KERNEL_BENCHES), len(common.MODES), figsize=(16, 4 * len(KERNEL_BENCHES)), squeeze=False
    )
    for i, bench in enumerate(KERNEL_BENCHES):
        for j, mode in enumerate(common.MODES):
            ax = axes[i][j]
            sub = [e for e in summary if e["bench"] == bench and e[mode]["speedup"]]
            shapes = list(dict.fromkeys(e["shape"] for e in sub))
            dtypes = list(dict.fromkeys(e["dtype"] for e in sub))
            width = 0.8 / max(1, len(dtypes))
            for k, dtype in enumerate(dtypes):
                xs = [s + width * (k + 0.5 - len(dtypes) / 2) for s in range(len(shapes))]
                ys = [
                    next((e[mode]["speedup"] for e in sub if e["shape"] == s and e["dtype"] == dtype), 0)
                    for s in shapes
                ]
                ax.bar(xs, ys, width, label=dtype)
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=20, ha="right", fontsize=7)
            ax.set_title(f"{bench} {mode}: triton vs the fastest other", fontsize=9)
            if sub:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, f"no measurements{note}", transform=ax.transAxes, ha="center", va="center")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def phase_kernels(run: Run) -> list[str]:
    args = run.args
    rec = run.record["kernels"]
    tmp = pathlib.Path("<tmp>" if run.dry_run else tempfile.mkdtemp(prefix="gpu_suite_kernels_"))
    run.items = kernel_items(args, tmp)
    rec.update(dtypes=args.dtypes, benches=args.benches, shape_groups=args.groups, runs=[], rows=[], summary=[])
    for item in run.items:
        entry = {
            "id": item["id"],
            "bench": item["bench"],
            "dtype": item["dtype"],
            "group": item["group"],
            "argv": display(item["cmd"]),
            "returncode": None,
            "wall_s": None,
            "rates": None,
            "counts": None,
        }
        rec["runs"].append(entry)
        if run.dry_run:
            continue
        if not fits(run, item):
            skip(item, f"budget: ~{item['estimate_s']:.0f} s needed, {run.left():.0f} s left")
            continue
        item["status"] = "running"
        run.save()
        result = run_command(item["cmd"], run.left())
        entry.update(returncode=result["returncode"], wall_s=result["wall_s"], tail=result["tail"])
        item["wall_s"] = result["wall_s"]
        data = _read_json(item["json"])
        if data is not None:
            entry.update(rates=data.get("rates"), counts=data.get("counts"))
            rec["rows"] += [{"bench": item["bench"], "dtype": item["dtype"], **row} for row in data.get("rows", [])]
            item["status"] = "ok"
        else:
            item.update(
                status="timeout" if result["timed_out"] else "error",
                reason=f"no JSON (rc {result['returncode']}): " + " / ".join(result["tail"][-3:])[-300:],
            )
        rec["summary"] = kernel_summary(rec["rows"])
        run.save()
    if not run.dry_run:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        used = plan_budget(run.items, args.budget_s)
        print(f"would run, in this order (~{used:.0f} s of the {args.budget_s:.0f} s budget):")
        for item, entry in zip(run.items, rec["runs"]):
            print(f"  [{item['plan']:<13}] ~{item['estimate_s']:>4.0f}s  {entry['argv']}")
    if not args.no_plot:
        plot_kernels(
            rec["summary"],
            run.path("png"),
            common.describe(run.record["environment"]),
            " (dry run)" if run.dry_run else "",
        )
    lines = [
        f"{it['id']:<25} {it['plan'] if run.dry_run else it['status']:<13} est {it['estimate_s']:>4.0f}s "
        f"took {it['wall_s'] or 0:>4.0f}s  {it['reason'] or ''}"[:200]
        for it in run.items
    ]
    lines.append(
        "triton ms per mode, its speed-up over the fastest other impl, and its multiple of the roofline floor:"
    )
    dtype = "bf16" if "bf16" in args.dtypes else args.dtypes[0]
    return lines + [_kernel_line(e) for e in rec["summary"]] + scorecard_lines(run, dtype)


# ---------------------------------------------------------------------------------------
# Phase e2e
# ---------------------------------------------------------------------------------------

_E2E_BASE_S = {"infer": 20.0, "train": 30.0, "features-fwd": 20.0, "features-fwd+bwd": 25.0}
_E2E_COMPILE_S = {"infer": 55.0, "train": 90.0, "features-fwd": 60.0, "features-fwd+bwd": 90.0}
_E2E_SIZE = {"tiny": 1.0, "small": 1.3, "base": 1.7, "large": 2.4}


def e2e_estimate(model: str, mode: str, compiled: bool) -> float:
    size = next((f for name, f in _E2E_SIZE.items() if model.endswith(name)), 1.0)
    return size * (_E2E_BASE_S[mode] + (_E2E_COMPILE_S[mode] if compiled else 0.0))


def e2e_items(part: str, tp: Any) -> list[dict]:
    """The rows of ``--part``, most important first, each a work item whose spec is a ``throughput.Row``."""
    _, warmup, iters = tp.PROTOCOLS["modern"]

    def row(
        model: str,
        label: str,
        mode: str = "infer",
        batch: int = 256,
        resolution: tuple = (224, 224),
        anchor: str | None = None,
    ) -> dict:
        backend, compiled = label.split("+")[0], label.endswith("+compile")
        spec = {
            "model": model,
            "family": "peer" if backend == "timm" else "restv2",
            "backend": backend,
            "compile": compiled,
            "protocol": "modern",
            "mode": mode,
            "precision": "bf16",
            "resolution": list(resolution),
            "batch_requested": batch,
            "warmup": warmup,
            "iters": iters,
            "anchor": anchor,
            "compile_mode": "default",
            "optimizer": "adamw" if mode == "train" else None,
        }
        return work_item(f"{mode}/{model}/{label}", e2e_estimate(model, mode, compiled), spec=spec)

    if part == "zoo":
        models = ["restv2_small", "restv2_base", "restv2_large"]
        return [row(m, b) for m in models for b in ("reference", "kernels")] + [
            row(m, b) for m in models for b in ("reference+compile", "kernels+compile")
        ]
    tiny = "restv2_tiny"
    peers = [p for p in tp.PEERS[tiny] if p.startswith(("convnext", "swin"))]
    det = {"batch": 2, "resolution": (800, 1333)}
    return [  # the rows the scorecard's targets need first (report.TARGETS; a test holds this order)
        *(row(tiny, b) for b in ("reference", "kernels", "reference+compile", "kernels+compile")),
        *(row(p, "timm", anchor=tiny) for p in peers),
        *(row(tiny, b, "train", batch=128) for b in ("reference", "kernels")),
        *(row(tiny, b, "features-fwd+bwd", **det) for b in ("reference", "kernels")),
        *(row(p, "timm+compile", anchor=tiny) for p in peers),
        *(row(tiny, b, "features-fwd", **det) for b in ("reference", "kernels")),
        *(row(tiny, b, "train", batch=128) for b in ("reference+compile", "kernels+compile")),
    ]


def _row_from_item(tp: Any, item: dict) -> Any:
    names = {f.name for f in dataclasses.fields(tp.Row)}
    data = item.get("result") if item["status"] in ("ok", "error") and item.get("result") else item["spec"]
    row = tp.Row(**{k: v for k, v in data.items() if k in names})
    row.resolution = tuple(row.resolution)
    if data is item["spec"]:  # never measured: skipped, timed out, crashed, or a dry run
        row.status = "planned" if item["status"] == "planned" else "skipped" if item["status"] == "skipped" else "error"
        row.reason = item["reason"] or (
            f"dry run: ~{item['estimate_s']:.0f} s, {item['plan']}" if item["plan"] else f"not run ({item['status']})"
        )
    return row


def select_rows(items: list[dict], patterns: list[str] | None) -> list[dict]:
    """The items whose id matches one of ``--rows``' globs (all without ``--rows``); none is an error."""
    if not patterns:
        return items
    chosen = [it for it in items if any(fnmatch.fnmatch(it["id"], pattern) for pattern in patterns)]
    if not chosen:
        raise SystemExit(f"--rows {patterns} match none of: {', '.join(it['id'] for it in items)}")
    return chosen


# The rows' launch plans, compiled up front: each kernel row's first call would otherwise JIT-compile
# its plans one at a time (173 for restv2_tiny's bf16 rows with their autocast variants) in the timed child.
PRECOMPILE_ESTIMATE_S = 30.0  # trace + 173 plans on 16 cores (about 1.5 s each; 184 took 65 s on 2 cores) + cubin reads
PRECOMPILE_LEAST_S = 90.0  # less budget left than this: the rows go first, each compiling its own


def precompile_inputs(items: list[dict]) -> dict[str, list[str]]:
    """model -> the ``HxWxB`` inputs (``restv2.targets --inputs``) of its pending kernel rows, in order."""
    out: dict[str, list[str]] = {}
    for item in items:
        spec = item["spec"]
        if item["status"] != "pending" or spec.get("backend") != "kernels":
            continue
        height, width = spec["resolution"]
        size = f"{height}x{width}x{spec['batch_requested']}"
        if size not in out.setdefault(spec["model"], []):
            out[spec["model"]].append(size)
    return out


def precompile(run: Run, items: list[dict], rec: dict) -> set[str] | None:
    """Compiles, before the rows and on every core, the launch plans the pending kernel rows will
    launch on this GPU into Triton's on-disk cache (``python -m restv2.targets`` for the GPU's
    target, with those rows' models and inputs, in bf16 and its autocast variants: how the rows
    run), so that each row's first call finds them instead of compiling them one at a time.
    Records ``rec["precompile"]``; returns the cache's entries after it (None: nothing ran), for
    ``precompile_followup`` to name what the rows still compiled."""
    inputs = precompile_inputs(items)
    if not inputs:
        return None
    env = run.record.get("environment") or {}
    capability = env.get("compute_capability")
    target = "sm_" + capability.replace(".", "") if capability else None
    cmd = [
        *(sys.executable, "-m", "restv2.targets", "--targets", target or "<this GPU's>", "--dtypes", "bf16"),
        *("--models", *inputs, "--inputs", *sorted({size for sizes in inputs.values() for size in sizes})),
    ]
    entry = rec["precompile"] = {"argv": display(cmd), "target": target, "inputs": inputs, "status": "planned"}
    if run.dry_run:
        print(f"would first compile the kernel rows' launch plans (~{PRECOMPILE_ESTIMATE_S:.0f} s): {display(cmd)}")
        return None
    if target not in plans.TARGETS:
        entry.update(status="skipped", reason=f"compute capability {capability} has no target in plans.TARGETS")
        return None
    if run.left() < PRECOMPILE_LEAST_S:
        entry.update(status="skipped", reason=f"budget: {run.left():.0f} s left, the rows go first")
        return None
    cache = targets.triton_cache_dir()
    before = targets.cache_entries()
    with tempfile.TemporaryDirectory(prefix="gpu_suite_precompile_") as tmp:
        out = pathlib.Path(tmp) / "targets.json"
        result = run_command([*cmd, "--json", str(out)], min(run.left() / 2, 4 * PRECOMPILE_ESTIMATE_S), run.log_only)
        written = json.loads(out.read_text()) if out.exists() else {}
    after = targets.cache_entries()
    rows = written.get("rows", [])
    entry.update(
        status="timeout" if result["timed_out"] else "ok" if rows else "error",
        returncode=result["returncode"],
        wall_s=result["wall_s"],
        plans=len(rows),
        compiled=len(after - before),  # the rest were in the cache already
        problems=[f"{r['kernel']} {r['plan']}: {'; '.join(r['problems'])}" for r in rows if r["problems"]][:20],
        cache=str(cache),
    )
    if not rows:
        entry["tail"] = result["tail"]
    print(
        f"precompiled the kernel rows' plans for {target}: {entry['plans']} plans ({entry['compiled']} compiled, "
        f"the rest cached) in {entry['wall_s']:.0f} s, {len(entry['problems'])} with problems",
        flush=True,
    )
    run.save()
    return after


def compiled_since(before: set[str]) -> tuple[dict[str, int], int]:
    """What was compiled into Triton's on-disk cache since ``before`` (``targets.cache_entries()``):
    this package's kernels (``_*_kernel``) by name, and how many others (Inductor's)."""
    names = targets.cached_kernels(targets.triton_cache_dir(), targets.cache_entries() - before)
    ours = {name: n for name, n in names.items() if name.startswith("_") and name.endswith("_kernel")}
    return ours, sum(names.values()) - sum(ours.values())


def precompile_followup(rec: dict, after: set[str] | None) -> None:
    """After the rows: the kernels of this package (``_*_kernel``) that the rows' JIT still compiled
    (Triton cache entries made since the precompile), by name: 0 when the precompile covered every
    launch, as its cache keys match the JIT's (checked on the CPU: ``targets.jit_compiles``, in
    ``tests/test_targets.py``; on a GPU the real allocations' alignment could still differ)."""
    if after is None:
        return
    ours, other = compiled_since(after)
    rec["precompile"].update(jit_compiled_after=ours, other_compiled_after=other)


def precompile_lines(rec: dict) -> list[str]:
    """The precompile's line for a phase's summary (none where it did not apply)."""
    pre = rec.get("precompile")
    if not pre:
        return []
    if pre["status"] != "ok":
        return [f"precompile: {pre['status']}" + (f" ({pre['reason']})" if pre.get("reason") else "")]
    after = pre.get("jit_compiled_after")
    late = "" if after is None else f"; the rows' JIT compiled {sum(after.values())} more of this package's plans"
    return [
        f"precompile: {pre['plans']} plans for {pre['target']} ({pre['compiled']} compiled) in {pre['wall_s']:.0f} s, "
        f"{len(pre['problems'])} with problems{late}"
    ]


def phase_e2e(run: Run) -> list[str]:
    args = run.args
    tp = load_script("throughput")
    items = select_rows(e2e_items(args.part, tp), args.rows)
    run.items = items
    rec = run.record["e2e"]
    rec.update(part=args.part, protocol="modern", precision="bf16", rows=[])
    after = precompile(run, items, rec)
    if run.dry_run:
        used = plan_budget(items, args.budget_s - (PRECOMPILE_ESTIMATE_S if "precompile" in rec else 0.0))
        print(
            f"would run these throughput.py rows in one worker child, in this order "
            f"(~{used:.0f} s of the {args.budget_s:.0f} s budget):"
        )
        print("\n".join(format_plan(items)))
    else:

        def done(item: dict) -> None:
            rec["rows"] = [_row_from_item(tp, it).to_dict() for it in items]
            run.save()

        supervise(run, "e2e", items, shared={}, item_timeout=lambda it: max(240.0, 3 * it["estimate_s"]), on_done=done)
        precompile_followup(rec, after)
    rows = [_row_from_item(tp, it) for it in items]
    tp.add_speedups(rows)
    rec["rows"] = [r.to_dict() for r in rows]
    if not args.no_plot and rows:
        tp.plot(rows, run.path("png"), common.describe(run.record["environment"]))
    return precompile_lines(rec) + tp.format_table(rows).splitlines() + scorecard_lines(run)


def _e2e_worker(shared: dict) -> Callable[[dict], tuple[str, Any, str | None]]:
    tp = load_script("throughput")
    device = torch.device(DEVICE)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as throughput.py: the best conv algorithms per shape

    def handle(spec: dict) -> tuple[str, Any, str | None]:
        row = tp.Row(**{**spec, "resolution": tuple(spec["resolution"])})
        tp.run_row(row, device, lambda text: None)
        if row.status == "ok":
            print(
                f"[e2e] {row.model} {row.label} {row.mode}: {row.ips_median:.1f} img/s (batch {row.batch}, "
                f"first call {row.first_call_s:.1f} s)",
                flush=True,
            )
        else:
            print(f"[e2e] {row.model} {row.label} {row.mode}: ERROR {(row.reason or '')[:300]}", flush=True)
            if not cuda_alive():
                raise CudaLost(row.reason or "CUDA context lost")
        return ("ok" if row.status == "ok" else "error"), row.to_dict(), row.reason

    return handle


# ---------------------------------------------------------------------------------------
# Phase sweep: candidate launch plans per kernel family
# ---------------------------------------------------------------------------------------

ATTN_SHAPES = {  # name: (B, N, M, h, d), restv2_tiny at 224 px batch 256, and 800x1333 batch 2 stage 1
    "tiny-s1-224-b256": (256, 56 * 56, 49, 1, 96),
    "tiny-s2-224-b256": (256, 28 * 28, 49, 2, 96),
    "tiny-s3-224-b256": (256, 14 * 14, 49, 4, 96),
    "tiny-s4-224-b256": (256, 7 * 7, 49, 8, 96),
    "det-s1-800x1333": (2, 200 * 334, 25 * 42, 1, 96),
}
UPSAMPLE_SHAPES = {  # name: (B, Hr, Wr, H, W, C, sr)
    "tiny-s1-224-b256": (256, 7, 7, 56, 56, 96, 8),
    "tiny-s2-224-b256": (256, 7, 7, 28, 28, 192, 4),
    "tiny-s3-224-b256": (256, 7, 7, 14, 14, 384, 2),
    "tiny-s4-224-b256": (256, 7, 7, 7, 7, 768, 1),
    "det-s1-800x1333": (2, 25, 42, 200, 334, 96, 8),
}
_TOKENS = {
    "tiny-s1-224-b256": 256 * 56 * 56,
    "tiny-s2-224-b256": 256 * 28 * 28,
    "tiny-s3-224-b256": 256 * 14 * 14,
    "tiny-s4-224-b256": 256 * 7 * 7,
    "det-s1-800x1333": 2 * 200 * 334,
}
_DIMS = {
    "tiny-s1-224-b256": 96,
    "tiny-s2-224-b256": 192,
    "tiny-s3-224-b256": 384,
    "tiny-s4-224-b256": 768,
    "det-s1-800x1333": 96,
}
LINEAR_SHAPES = {name: (_TOKENS[name], 4 * _DIMS[name], _DIMS[name]) for name in _TOKENS}  # (M, N, K): fc1 + GELU
ADD_LN_SHAPES = {name: (_TOKENS[name], _DIMS[name]) for name in _TOKENS}  # (R, C): a block's add + LayerNorm
PA_SHAPES = {  # name: (B, H, W, C), the map PA runs on: the stem's (stage 1) and the patch embeds' (2-4)
    "tiny-s1-224-b256": (256, 56, 56, 96),
    "tiny-s2-224-b256": (256, 28, 28, 192),
    "tiny-s3-224-b256": (256, 14, 14, 384),
    "tiny-s4-224-b256": (256, 7, 7, 768),
    "det-s1-800x1333": (2, 200, 334, 96),
}
MIXED_SHAPES = {  # name: (B, N, M, h, d), ResTv1's mixed-head attention: rest_small (d 64), rest_large (d 96)
    "small-s2-224-b256": (256, 28 * 28, 7 * 7, 2, 64),
    "small-s3-224-b256": (256, 14 * 14, 7 * 7, 4, 64),
    "small-s4-224-b256": (256, 7 * 7, 7 * 7, 8, 64),
    "large-s2-224-b256": (256, 28 * 28, 7 * 7, 2, 96),
    "large-s3-224-b256": (256, 14 * 14, 7 * 7, 4, 96),
    "large-s4-224-b256": (256, 7 * 7, 7 * 7, 8, 96),
    "det-large-s2-800x1333": (2, 100 * 167, 25 * 42, 2, 96),
}
STEM_SHAPES = {  # name: (B, C, H, W), the maps of the stem's two conv-BN-ReLU (restv2_tiny: 48 and 96 channels)
    "tiny-stem1-224-b256": (256, 48, 112, 112),
    "tiny-stem2-224-b256": (256, 96, 56, 56),
    "det-stem1-800x1333": (2, 48, 400, 667),
    "det-stem2-800x1333": (2, 96, 200, 334),
}
SWEEP_FAMILIES = {  # family: (shapes, mode)
    "attn_fwd": (ATTN_SHAPES, "fwd"),
    "attn_bwd": (ATTN_SHAPES, "bwd"),
    "upsample_fwd": (UPSAMPLE_SHAPES, "fwd"),
    "upsample_bwd": (UPSAMPLE_SHAPES, "bwd"),
    "upsample_bwd_dv": (UPSAMPLE_SHAPES, "bwd"),
    "linear_gelu_fwd": (LINEAR_SHAPES, "fwd"),  # the MLP's fc1 + GELU
    "linear_gelu_bwd": (LINEAR_SHAPES, "bwd"),  # the MLP backward's (dy @ fc2.weight) * gelu'(pre)
    "add_ln_fwd": (ADD_LN_SHAPES, "fwd"),
    "add_ln_bwd": (ADD_LN_SHAPES, "bwd"),
    "mixed_fwd": (MIXED_SHAPES, "fwd"),  # ResTv1's attention with the heads' interaction (stages 2-4)
    "mixed_bwd": (MIXED_SHAPES, "bwd"),
    "pixel_attention_fwd": (PA_SHAPES, "fwd"),  # PA + LayerNorm, as inference runs it (training's PA: same plan)
    "pixel_attention_bwd": (PA_SHAPES, "bwd"),  # the g kernel (the weight and bias sums)
    "pixel_attention_bwd_dx": (PA_SHAPES, "bwd"),
    "bias_relu": (STEM_SHAPES, "fwd"),  # the folded BatchNorm's bias + ReLU (inference)
    "bn_stats": (STEM_SHAPES, "fwd"),  # batch_norm_relu in training: the statistics ...
    "bn_relu_fwd": (STEM_SHAPES, "fwd"),  # ... and the normalisation + ReLU pass
    "bn_relu_bwd_sums": (STEM_SHAPES, "bwd"),
    "bn_relu_bwd_dx": (STEM_SHAPES, "bwd"),
}
_PIXEL_GRID = {"block_p": (1, 2, 4, 8, 16, 32, 64), "num_warps": (1, 2, 4, 8)}
# channels-last rows are contiguous: a channel block narrower than C only splits a pixel's row
_CHANNEL_GRID = {"block_p": (8, 16, 32, 64), "block_c": (32, 64, 128), "num_warps": (2, 4, 8)}
SWEEP_GRIDS = {  # the fields plans.forced takes, and their candidate values
    "attn_fwd": {"block_n": (64, 128, 256), "block_m": (32, 64), "num_warps": (4, 8), "num_stages": (1, 2, 3, 4)},
    "attn_bwd": {"block_n": (32, 64, 128), "block_m": (32, 64), "num_warps": (4, 8), "num_stages": (1, 2, 3)},
    "upsample_fwd": {"block_p": (1, 2, 4, 8, 16, 32, 64), "num_warps": (1, 2, 4, 8)},
    "upsample_bwd": {"block_p": (1, 2, 4, 8, 16, 32, 64), "num_warps": (1, 2, 4, 8)},
    "upsample_bwd_dv": {"block_p": (1, 2, 4, 8, 16, 32, 64), "num_warps": (1, 2, 4, 8)},
    "linear_gelu_fwd": {
        "block_m": (64, 128, 256),
        "block_n": (64, 128, 256),
        "block_k": (32, 64),
        "num_warps": (4, 8),
        "num_stages": (3, 4),
    },
    "linear_gelu_bwd": {
        "block_m": (64, 128, 256),
        "block_n": (64, 128, 256),
        "block_k": (32, 64),
        "num_warps": (4, 8),
        "num_stages": (3, 4),
    },
    "add_ln_fwd": {"block_r": (1, 2, 4, 8, 16, 32, 64), "num_warps": (1, 2, 4, 8)},
    "add_ln_bwd": {"block_r": (1, 2, 4, 8, 16, 32, 64), "num_warps": (2, 4, 8, 16), "num_stages": (1, 2)},
    "mixed_fwd": {"block_n": (16, 32, 64), "block_m": (16, 32, 64), "num_warps": (4, 8), "num_stages": (1, 2)},
    "mixed_bwd": {"block_n": (16, 32, 64), "block_m": (16, 32, 64), "num_warps": (4, 8), "num_stages": (1, 2)},
    "pixel_attention_fwd": _PIXEL_GRID,
    "pixel_attention_bwd": _PIXEL_GRID,
    "pixel_attention_bwd_dx": _PIXEL_GRID,
    "bias_relu": {"block": (256, 512, 1024, 2048, 4096, 8192), "num_warps": (1, 2, 4, 8)},
    "bn_stats": _CHANNEL_GRID,
    "bn_relu_fwd": _CHANNEL_GRID,
    "bn_relu_bwd_sums": _CHANNEL_GRID,
    "bn_relu_bwd_dx": _CHANNEL_GRID,
}
SWEEP_WEIGHT = {
    "attn_fwd": 1.0,
    "attn_bwd": 1.2,
    "upsample_fwd": 0.8,
    "upsample_bwd": 0.8,  # budget shares
    "upsample_bwd_dv": 0.5,
    "linear_gelu_fwd": 1.0,
    "linear_gelu_bwd": 1.0,
    "add_ln_fwd": 0.6,
    "add_ln_bwd": 0.8,
    "mixed_fwd": 1.0,
    "mixed_bwd": 1.2,
    "pixel_attention_fwd": 0.8,
    "pixel_attention_bwd": 0.8,
    "pixel_attention_bwd_dx": 0.5,
    "bias_relu": 0.3,
    "bn_stats": 0.5,
    "bn_relu_fwd": 0.5,
    "bn_relu_bwd_sums": 0.6,
    "bn_relu_bwd_dx": 0.6,
}
SWEEP_COMPILE_S = {
    "attn_fwd": 2.0,
    "attn_bwd": 3.0,
    "upsample_fwd": 1.5,
    "upsample_bwd": 2.5,  # a new plan, a shape
    "upsample_bwd_dv": 1.5,
    "linear_gelu_fwd": 3.0,
    "linear_gelu_bwd": 3.0,
    "add_ln_fwd": 1.5,
    "add_ln_bwd": 2.5,
    "mixed_fwd": 2.5,
    "mixed_bwd": 4.0,
    "pixel_attention_fwd": 2.0,
    "pixel_attention_bwd": 2.5,
    "pixel_attention_bwd_dx": 2.0,
    "bias_relu": 1.0,
    "bn_stats": 1.0,
    "bn_relu_fwd": 1.0,
    "bn_relu_bwd_sums": 1.0,
    "bn_relu_bwd_dx": 1.0,
}
SWEEP_TIME_S = 0.5  # do_bench and the output check of one plan at one shape, once compiled
SWEEP_FOLLOW_UP = 3  # candidates per family (besides the current plan) re-timed in the other dtypes
WRONG_ULPS = 4  # a candidate whose result differs from the current plan's by more (relative to the
#                 tensor's largest magnitude, in eps of the dtype; 1e-5 at least) is wrong, whatever its time
ATTN_MAX_REGS = 256  # fp32 accumulator + score values a thread: past this, a plan spills (pruned)
UPSAMPLE_MAX_PER_THREAD = 4  # x the table's per_thread values a thread of a [BLOCK_P, BLOCK_C] tile
#                              (and of add + LayerNorm's [BLOCK_R, BLOCK_C] tile, PA's, BatchNorm's, and
#                              bias + ReLU's [BLOCK] run, whose table holds 8 a thread)
LINEAR_MAX_ACC = 128  # fp32 accumulator values a thread of a [BLOCK_M, BLOCK_N] GEMM tile: past this it spills
LINEAR_BWD_MAX_ACC = 32  # the same in the MLP backward's GEMM: its epilogue holds 3 tiles (plans._LINEAR_GELU_BWD)
_ABBR = {
    "block_n": "n",
    "block_m": "m",
    "num_warps": "w",
    "num_stages": "s",
    "block_p": "p",
    "block_k": "k",
    "block_r": "r",
    "block_c": "c",
    "block": "b",
    "BLOCK_N": "n",
    "BLOCK_M": "m",
    "BLOCK_P": "p",
    "BLOCK_K": "k",
    "BLOCK_R": "r",
    "BLOCK_C": "c",
    "BLOCK": "b",
}


def cid(fields: dict | None) -> str:
    """A candidate's name: ``n128.m64.w8.s3``; the current plan is ``current``."""
    return "current" if fields is None else ".".join(f"{_ABBR[k]}{v}" for k, v in fields.items())


_LAST_LAUNCH = ("attn_bwd", "mixed_bwd", "upsample_bwd_dv", "pixel_attention_bwd_dx", "bn_relu_fwd", "bn_relu_bwd_dx")


def _main_launch(family: str, launches: list[plans.Launch]) -> plans.Launch:
    """The launch a family's fields shape (and name and prune a candidate by): the op's last for
    the dk/dv pass of attn_bwd and mixed_bwd (their fields shape the other passes too), the dv
    gather of upsample_bwd_dv, PA's dx pass and BatchNorm's normalising passes (after the
    statistics, after the gradient sums); the first for the others."""
    return launches[-1] if family in _LAST_LAUNCH else launches[0]


def sweep_plan(
    family: str, shape: tuple, dtype: torch.dtype, target: plans.Target, fields: dict | None = None
) -> tuple[str, str, list[plans.Launch]]:
    """The launches ``family`` makes at ``shape`` under ``plans.forced(family=fields)``: (key, short name, launches)."""
    ctx = plans.forced(**{family: fields}) if fields else contextlib.nullcontext()
    with ctx:
        if family.startswith("attn"):
            B, N, M, h, d = shape
            if family == "attn_fwd":
                launches, extra = [plans.attention_fwd_plan(B, N, M, h, d, dtype, target)], ""
            else:
                p = plans.attention_bwd_plan(B, N, M, h, d, dtype, target)
                launches = [lch for lch in (p.dq, p.dkdv) if lch is not None]
                extra = f" split{p.splits}" + ("" if p.fuse_dq else " 2pass")
        elif family == "mixed_fwd":
            p = plans.attention_mixed_fwd_plan(*shape, dtype, target)
            launches, extra = [p.main, p.norm], ""
        elif family == "mixed_bwd":
            p = plans.attention_mixed_bwd_plan(*shape, dtype, target)
            launches, extra = [p.stats, p.dq, p.dkdv], f" split{p.splits}"
        elif family.startswith("upsample"):
            B, Hr, Wr, _, _, C, sr = shape
            if family == "upsample_fwd":
                launches, extra = [plans.upsample_fwd_plan(B, Hr, Wr, C, sr, dtype, target)], ""
            else:
                p = plans.upsample_bwd_plan(B, Hr, Wr, C, sr, dtype, target)
                launches, extra = [p.g, p.dv], f" split{p.split}"
        elif family.startswith("linear_gelu"):
            plan = plans.linear_gelu_fwd_plan if family == "linear_gelu_fwd" else plans.linear_gelu_bwd_plan
            launches, extra = [plan(*shape, dtype, target)], ""
        elif family == "add_ln_fwd":
            launches, extra = [plans.add_layer_norm_fwd_plan(*shape, dtype, target)], ""
        elif family == "add_ln_bwd":
            p = plans.add_layer_norm_bwd_plan(*shape, dtype, target)
            launches, extra = [p.launch], f" split{p.split}"
        elif family == "pixel_attention_fwd":
            launches, extra = [plans.pixel_attention_fwd_plan(*shape, dtype, target)], ""
        elif family.startswith("pixel_attention_bwd"):
            p = plans.pixel_attention_bwd_plan(*shape, dtype, target)
            launches, extra = [p.g, p.dx], ""
        elif family == "bias_relu":
            launches, extra = [plans.bias_relu_plan(math.prod(shape), dtype, target)], ""
        else:  # batch_norm_relu in training: the statistics, then the pass; the gradient sums, then dx
            B, C, H, W = shape
            if family in ("bn_stats", "bn_relu_fwd"):
                launches = [plans.bn_stats_plan(B * H * W, C, dtype, target).launch]
                launches.append(plans.bn_relu_fwd_plan(B * H * W, C, dtype, target))
            else:
                p = plans.bn_relu_bwd_plan(B * H * W, C, dtype, target)
                launches = [p.sums.launch, p.dx]
            extra = ""
    key = " | ".join(f"{lch.kernel}{list(lch.grid)} {lch.describe()}" for lch in launches) + extra
    main = _main_launch(family, launches)
    short = ".".join(f"{_ABBR[k]}{v}" for k, v in main.constexprs if k in _ABBR)
    return key, f"{short}.w{main.num_warps}.s{main.num_stages}{extra}", launches


def prune_reason(family: str, launch: plans.Launch) -> str | None:
    """Why a candidate plan is not worth compiling at a shape (a register estimate), or None."""
    c, threads = dict(launch.constexprs), 32 * launch.num_warps
    if family in ("attn_fwd", "mixed_fwd"):  # o accumulator [BLOCK_N, BLOCK_D] + scores [BLOCK_N, BLOCK_M]
        regs = (c["BLOCK_N"] * c["BLOCK_D"] + c["BLOCK_N"] * c["BLOCK_M"]) / threads
    elif family == "attn_bwd":  # dk, dv accumulators [BLOCK_M, BLOCK_D] + scores [BLOCK_N, BLOCK_M]
        regs = (2 * c["BLOCK_M"] * c["BLOCK_D"] + c["BLOCK_N"] * c["BLOCK_M"]) / threads
    elif family == "mixed_bwd":  # dk, dv accumulators + the mixed scores and their gradient, 2 x [BLOCK_M, BLOCK_N]
        regs = (2 * c["BLOCK_M"] * c["BLOCK_D"] + 2 * c["BLOCK_N"] * c["BLOCK_M"]) / threads
    elif family.startswith("linear_gelu"):  # the fp32 accumulator [BLOCK_M, BLOCK_N]
        acc = c["BLOCK_M"] * c["BLOCK_N"] / threads
        limit = LINEAR_BWD_MAX_ACC if family == "linear_gelu_bwd" else LINEAR_MAX_ACC
        return f"{acc:.0f} fp32 accumulator values a thread (> {limit}): spills" if acc > limit else None
    else:
        table = {
            "upsample_fwd": plans._UPSAMPLE_FWD,
            "upsample_bwd": plans._UPSAMPLE_BWD,
            "upsample_bwd_dv": plans._UPSAMPLE_BWD_DV,
            "add_ln_fwd": plans._ADD_LN_FWD,
            "add_ln_bwd": plans._ADD_LN_BWD,
            "pixel_attention_fwd": plans._PA_FWD,
            "pixel_attention_bwd": plans._PA_BWD,
            "pixel_attention_bwd_dx": plans._PA_BWD_DX,
            "bias_relu": plans._BIAS_RELU,
            "bn_stats": plans._BN_REDUCE,
            "bn_relu_fwd": plans._BN_FWD,
            "bn_relu_bwd_sums": plans._BN_REDUCE,
            "bn_relu_bwd_dx": plans._BN_BWD_DX,
        }[family]
        row = table["default"]
        per_thread = getattr(row, "per_thread", None) or row.block // (32 * row.num_warps)  # bias_relu: 8
        per = c["BLOCK"] / threads if "BLOCK" in c else c.get("BLOCK_P", c.get("BLOCK_R")) * c["BLOCK_C"] / threads
        if per > UPSAMPLE_MAX_PER_THREAD * per_thread:
            return f"{per:.0f} values a thread per tile (> {UPSAMPLE_MAX_PER_THREAD} x {per_thread}): spills"
        if per < 0.25:
            return f"{per:.2f} values a thread per tile: most threads idle"
        return None
    return f"~{regs:.0f} fp32 values a thread (> {ATTN_MAX_REGS}): spills" if regs > ATTN_MAX_REGS else None


def sweep_candidates(family: str, shapes: dict, target: plans.Target) -> list[dict]:
    """The family's grid, nearest to the current plans first (fewest fields changed at any shape)."""
    grid = SWEEP_GRIDS[family]
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    currents = []
    for shape in shapes.values():
        launch = _main_launch(family, sweep_plan(family, shape, torch.bfloat16, target)[2])
        c = {**dict(launch.constexprs), "NUM_WARPS": launch.num_warps, "NUM_STAGES": launch.num_stages}
        currents.append({k: c.get(k.upper()) for k in grid})

    def distance(fields: dict) -> int:
        return min(sum(fields[k] != cur[k] for k in fields) for cur in currents)

    return sorted(combos, key=distance)  # stable: grid order within a distance


def select_sweep_shapes(family: str, wanted: list[str] | None) -> dict:
    return common.select_shapes(SWEEP_FAMILIES[family][0], wanted)


def sweep_items(args: argparse.Namespace, dtype: str, candidates: dict[str, list[dict]]) -> list[dict]:
    items = []
    for family, cands in candidates.items():
        shapes = list(select_sweep_shapes(family, args.shapes))
        per_shape = SWEEP_COMPILE_S[family] + SWEEP_TIME_S
        for fields in [None, *cands]:
            spec = {"family": family, "dtype": dtype, "cid": cid(fields), "fields": fields, "shapes": shapes}
            items.append(
                work_item(
                    f"{family}/{dtype}/{cid(fields)}", per_shape * len(shapes), group=f"{family}/{dtype}", spec=spec
                )
            )
    return items


def _compare(outs: Any, refs: Any, dtype: torch.dtype) -> dict:
    """The largest difference from the current plan's result, absolute and relative to each tensor's
    largest magnitude; ``correct`` if within ``WRONG_ULPS`` eps of the dtype and no new non-finite."""
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    refs = refs if isinstance(refs, (tuple, list)) else (refs,)
    worst_abs, worst_rel, finite = 0.0, 0.0, True
    for out, ref in zip(outs, refs):
        out, ref = out.float(), ref.float()
        ok = torch.isfinite(ref)
        finite = finite and not bool((~torch.isfinite(out) & ok).any())
        diff = (out - ref).abs()[ok]
        if diff.numel():
            worst_abs = max(worst_abs, float(diff.max()))
            worst_rel = max(worst_rel, float(diff.max()) / max(float(ref.abs()[ok].max()), 1e-30))
    tol = max(WRONG_ULPS * torch.finfo(dtype).eps, 1e-5)  # fp32: summation order alone moves a few eps
    return {"max_abs_diff": worst_abs, "rel_diff": worst_rel, "tolerance": tol, "correct": finite and worst_rel <= tol}


def _qkv(shape: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(q_buf, kv_buf, q, k, v): a q Linear's and a kv Linear's outputs, and the model's views of
    them, [B, N, h, d] and [B, M, h, d] (bench_attention.time_impl, bench_attention_mixed.time_impl)."""
    B, N, M, h, d = shape
    torch.manual_seed(0)
    q_buf = torch.randn(B, N, h * d, device=DEVICE, dtype=dtype, requires_grad=True)
    kv_buf = torch.randn(B, M, 2 * h * d, device=DEVICE, dtype=dtype, requires_grad=True)
    kv = kv_buf.view(B, M, 2, h, d)
    return q_buf, kv_buf, q_buf.view(B, N, h, d), kv[:, :, 0], kv[:, :, 1]


def _attention_case(shape: tuple, dtype: torch.dtype, bwd: bool) -> dict:
    """q and k/v as the model's views of a q Linear output and a kv Linear output (``_qkv``)."""
    from restv2_kernels import emsa_attention

    q_buf, kv_buf, q, k, v = _qkv(shape, dtype)
    if not bwd:
        return {"run": torch.no_grad()(lambda: emsa_attention(q, k, v)), "keep": (q_buf, kv_buf)}
    dout = torch.randn(q.shape, device=DEVICE, dtype=dtype)
    out = emsa_attention(q, k, v)  # one graph, the current forward plan; the backward alone is timed
    return {"run": lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), "keep": (q_buf, kv_buf, out)}


def _mixed_case(shape: tuple, dtype: torch.dtype, bwd: bool) -> dict:
    """ResTv1's views of its q and kv Linear outputs (``_qkv``), the heads' 1x1 conv in fp32 as
    under autocast (bench_attention_mixed.time_impl)."""
    from restv2_kernels import emsa_attention_mixed

    h = shape[3]
    q_buf, kv_buf, q, k, v = _qkv(shape, dtype)
    weight = (torch.randn(h, h, 1, 1, device=DEVICE) * (2.0 / h) ** 0.5).requires_grad_()
    bias = torch.randn(h, device=DEVICE).requires_grad_()
    leaves = (q_buf, kv_buf, weight, bias)
    if not bwd:
        return {"run": torch.no_grad()(lambda: emsa_attention_mixed(q, k, v, weight, bias)), "keep": leaves}
    dout = torch.randn(q.shape, device=DEVICE, dtype=dtype)
    out = emsa_attention_mixed(q, k, v, weight, bias)
    return {"run": lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True), "keep": (*leaves, out)}


def _leaf(*size: int, dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """``shift + scale * randn(size)`` in ``dtype``, requiring its gradient."""
    return (shift + scale * torch.randn(*size, device=DEVICE)).to(dtype).requires_grad_()


def _channels_last_map(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A [B, C, H, W] randn map in ``dtype``, channels-last in memory (as a conv writes it there)."""
    return torch.randn(*shape, device=DEVICE).to(dtype, memory_format=torch.channels_last)


def _upsample_case(shape: tuple, dtype: torch.dtype, bwd: bool) -> dict:
    """x, the V half of a kv tensor read in place, and the four parameters (bench_upsample.time_impl)."""
    from restv2_kernels import upsample_add

    B, Hr, Wr, H, W, C, sr = shape
    torch.manual_seed(0)
    leaf = functools.partial(_leaf, dtype=dtype)
    x, kv = leaf(B, H, W, C), leaf(B, Hr, Wr, 2 * C)
    weight, bias = leaf(sr * sr * C, 1, 3, 3, scale=0.2), leaf(sr * sr * C, scale=0.1)
    norm_weight, norm_bias = leaf(C, scale=0.1, shift=1.0), leaf(C, scale=0.1)
    v = kv.view(B, Hr, Wr, 2, C)[..., 1, :]
    args = (x, v, weight, bias, norm_weight, norm_bias, sr)
    if not bwd:
        return {"run": torch.no_grad()(lambda: upsample_add(*args)), "keep": args}
    dout = torch.randn(B, H, W, C, device=DEVICE, dtype=dtype)
    out = upsample_add(*args)
    return {
        "run": lambda: torch.autograd.grad(out, (v, weight, bias, norm_weight, norm_bias), dout, retain_graph=True),
        "keep": (*args, out),
    }


def _linear_case(shape: tuple, dtype: torch.dtype, bwd: bool) -> dict:
    """fc1 + GELU (``linear_gelu_fwd``) or the MLP backward's GEMM with fc1's bias gradient and
    the activation written again (``mlp_gelu_grad`` as the MLP's backward calls it) on their own,
    each beside the eager ops it replaces (cuBLAS, a GELU pass, and the bias sum; eager keeps
    the activation from the forward instead) as ``eager``."""
    from restv2_kernels.ffn.triton import linear_gelu_fwd, mlp_gelu_grad

    M, N, K = shape
    torch.manual_seed(0)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*size, device=DEVICE)).to(dtype)

    if not bwd:
        x, weight, bias = randn(M, K), randn(N, K, scale=K**-0.5), randn(N, scale=0.1)
        return {
            "run": lambda: linear_gelu_fwd(x, weight, bias, False)[0],
            "eager": lambda: torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias)),
            "keep": (x, weight, bias),
        }
    dy, weight2, pre = randn(M, K), randn(K, N, scale=N**-0.5), randn(M, N)

    def eager():
        d_pre = torch.ops.aten.gelu_backward(dy @ weight2, pre)
        return d_pre, d_pre.sum(0)

    return {  # with fc1's bias gradient and gelu(pre), as the MLP's backward asks for them
        "run": lambda: mlp_gelu_grad(dy, weight2, pre, True, True),
        "eager": eager,
        "keep": (dy, weight2, pre),
    }


def _add_ln_case(shape: tuple, dtype: torch.dtype, bwd: bool) -> dict:
    """A block's residual add + LayerNorm as the model calls it under autocast (fp32 parameters,
    the normed output in ``dtype``), beside the eager add and autocast's fp32 LayerNorm as ``eager``."""
    from restv2_kernels import add_layer_norm

    R, C = shape
    torch.manual_seed(0)
    x, branch = _leaf(R, C, dtype=dtype), _leaf(R, C, dtype=dtype)
    weight, bias = _leaf(C, dtype=torch.float32, scale=0.1, shift=1.0), _leaf(C, dtype=torch.float32, scale=0.1)
    leaves = (x, branch, weight, bias)

    def eager() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(torch.device(DEVICE).type, dtype=dtype, enabled=dtype != torch.float32):
            residual = x + branch
            return residual, torch.nn.functional.layer_norm(residual, (C,), weight, bias, 1e-6)

    if not bwd:
        return {
            "run": torch.no_grad()(lambda: add_layer_norm(x, branch, weight, bias, 1e-6, dtype)),
            "eager": torch.no_grad()(eager),
            "keep": leaves,
        }
    grads = (torch.randn(R, C, device=DEVICE).to(dtype), torch.randn(R, C, device=DEVICE).to(dtype))
    outs, eager_outs = add_layer_norm(x, branch, weight, bias, 1e-6, dtype), eager()
    return {
        "run": lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True),
        "eager": lambda: torch.autograd.grad(eager_outs, leaves, (grads[0], grads[1].float()), retain_graph=True),
        "keep": (*leaves, outs, eager_outs),
    }


def _autocast(dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast at ``dtype`` as the model's eager path runs under it (off for fp32)."""
    return torch.autocast(torch.device(DEVICE).type, dtype=dtype, enabled=dtype != torch.float32)


def _pa_case(shape: tuple, dtype: torch.dtype, bwd: bool) -> dict:
    """PA on a conv's channels-last output with that conv's bias added at each tap (``x_bias``),
    as the stem and the patch embeds call it: forward, PA + LayerNorm with no gradient (inference;
    fp32 out, as under autocast); backward, PA's (training, where the LayerNorm is eager). Beside
    the eager ops they replace as ``eager``: the conv's bias, the depthwise conv, the sigmoid and
    the product (and the LayerNorm, under autocast)."""
    from restv2_kernels import pixel_attention, pixel_attention_layer_norm

    B, H, W, C = shape
    torch.manual_seed(0)
    x = _channels_last_map((B, C, H, W), dtype).requires_grad_()
    weight, bias = _leaf(C, 1, 3, 3, dtype=dtype, scale=0.2), _leaf(C, dtype=dtype, scale=0.1)
    x_bias = _leaf(C, dtype=dtype, scale=0.1)
    leaves = (x, weight, bias, x_bias)

    def eager_pa() -> torch.Tensor:
        xb = x + x_bias.view(1, C, 1, 1)  # the conv's bias: cuDNN takes none, so a pass of its own
        return xb * torch.sigmoid(torch.nn.functional.conv2d(xb, weight, bias, padding=1, groups=C))

    if not bwd:
        norm = (_leaf(C, dtype=torch.float32, scale=0.1, shift=1.0), _leaf(C, dtype=torch.float32, scale=0.1), 1e-6)

        def eager() -> torch.Tensor:
            with _autocast(dtype):
                return torch.nn.functional.layer_norm(eager_pa().permute(0, 2, 3, 1), (C,), *norm)

        return {
            "run": torch.no_grad()(lambda: pixel_attention_layer_norm(*leaves, *norm, torch.float32)),
            "eager": torch.no_grad()(eager),
            "keep": (*leaves, *norm),
        }
    dout = _channels_last_map((B, C, H, W), dtype)
    out, eager_out = pixel_attention(*leaves), eager_pa()
    return {
        "run": lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True),
        "eager": lambda: torch.autograd.grad(eager_out, leaves, dout, retain_graph=True),
        "keep": (*leaves, out, eager_out),
    }


def _bias_relu_case(shape: tuple, dtype: torch.dtype, bwd: bool) -> dict:
    """The stem's conv output (channels-last) + the folded BatchNorm's bias, then ReLU (inference),
    beside what the reference runs there as ``eager``: BatchNorm with its running statistics,
    then an in-place ReLU."""
    from restv2_kernels import bias_relu

    C = shape[1]
    torch.manual_seed(0)
    x, bias = _channels_last_map(shape, dtype), (0.1 * torch.randn(C, device=DEVICE)).to(dtype)
    stats = (0.1 * torch.randn(C, device=DEVICE), 1 + torch.rand(C, device=DEVICE))
    affine = (1 + 0.1 * torch.randn(C, device=DEVICE), 0.1 * torch.randn(C, device=DEVICE))

    def eager() -> torch.Tensor:
        with _autocast(dtype):
            return torch.relu_(torch.nn.functional.batch_norm(x, *stats, *affine, False, 0.0, 1e-5))

    return {"run": torch.no_grad()(lambda: bias_relu(x, bias)), "eager": torch.no_grad()(eager), "keep": (x, bias)}


def _bn_case(shape: tuple, dtype: torch.dtype, bwd: bool) -> dict:
    """The stem's BatchNorm + ReLU in training (the batch's statistics, fp32 parameters and
    running statistics, a channels-last map): ``batch_norm_relu`` forward, or its backward alone;
    beside eager BatchNorm and an in-place ReLU under autocast as ``eager``."""
    from restv2_kernels import batch_norm_relu

    C = shape[1]
    torch.manual_seed(0)
    x = _channels_last_map(shape, dtype).requires_grad_()
    weight, bias = _leaf(C, dtype=torch.float32, scale=0.1, shift=1.0), _leaf(C, dtype=torch.float32, scale=0.1)
    running = [(torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)) for _ in range(2)]
    leaves = (x, weight, bias)

    def kernel() -> torch.Tensor:
        return batch_norm_relu(x, *running[0], weight, bias, True, 0.1, 1e-5)

    def eager() -> torch.Tensor:
        with _autocast(dtype):
            return torch.relu_(torch.nn.functional.batch_norm(x, *running[1], weight, bias, True, 0.1, 1e-5))

    if not bwd:
        return {"run": torch.no_grad()(kernel), "eager": torch.no_grad()(eager), "keep": leaves}
    dout = _channels_last_map(shape, dtype)
    out, eager_out = kernel(), eager()
    return {
        "run": lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True),
        "eager": lambda: torch.autograd.grad(eager_out, leaves, dout, retain_graph=True),
        "keep": (*leaves, out, eager_out),
    }


_CASES = {
    "attn": _attention_case,
    "mixed": _mixed_case,
    "upsample": _upsample_case,
    "linear_gelu": _linear_case,
    "add_ln": _add_ln_case,
    "pixel_attention": _pa_case,
    "bias_relu": _bias_relu_case,
    "bn_": _bn_case,
}


def _case(family: str, shape: tuple, dtype: torch.dtype, bwd: bool) -> dict:
    """The inputs and callables a family's candidates run on (``run``; ``eager``, where the sweep
    also times the eager ops the kernel replaces), by the family's prefix."""
    return next(make for prefix, make in _CASES.items() if family.startswith(prefix))(shape, dtype, bwd)


class _SweepState:
    """A worker's inputs and current-plan results per (family, dtype, shape); plans already timed."""

    def __init__(self, shared: dict) -> None:
        self.compile_only = shared.get("compile_only", False)
        self.warmup_ms, self.rep_ms = shared.get("warmup_ms", 10), shared.get("rep_ms", 40)
        self.key: tuple | None = None
        self.cases: dict[str, dict] = {}
        self.seen: dict[tuple, dict] = {}

    def case(self, family: str, dtype_name: str, shape_name: str) -> dict:
        if self.key != (family, dtype_name):  # one family at a time in memory
            self.key, self.cases = (family, dtype_name), {}
            _empty_cache()
        if shape_name not in self.cases:
            shapes, mode = SWEEP_FAMILIES[family]
            case = _case(family, shapes[shape_name], common.KERNEL_DTYPES[dtype_name], mode == "bwd")
            case["ref"] = case["run"]()  # the current plan's result: what every candidate must match
            self.cases[shape_name] = case
        return self.cases[shape_name]

    def measure(self, family: str, dtype_name: str, fields: dict | None, name: str, shape_name: str) -> dict:
        from triton.testing import do_bench

        dtype = common.KERNEL_DTYPES[dtype_name]
        target = plans.device_target(torch.device(DEVICE))
        key, short, launches = sweep_plan(family, SWEEP_FAMILIES[family][0][shape_name], dtype, target, fields)
        res: dict = {"plan": short, "key": key, "status": None, "ms": None, "reason": None}
        if fields is not None:
            reason = prune_reason(family, _main_launch(family, launches))
            if reason:
                return {**res, "status": "pruned", "reason": reason}
        seen = self.seen.get((family, dtype_name, shape_name, key))
        if seen is not None:  # the same launches as an earlier candidate (e.g. the current plan)
            return {**seen, "same_as": seen["cid"]}
        try:
            case = self.case(family, dtype_name, shape_name)
            with plans.forced(**{family: fields}) if fields else contextlib.nullcontext():
                outs = case["run"]()  # the first call compiles
                _synchronize()
                if self.compile_only:
                    return {**res, "status": "compiled"}
                res.update(_compare(outs, case["ref"], dtype))
                del outs
                res["ms"] = do_bench(case["run"], warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
                if fields is None and "eager" in case:  # the eager ops the kernel replaces, in the same run
                    res["eager_ms"] = do_bench(
                        case["eager"], warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"
                    )
            res["status"] = "ok" if res["correct"] else "wrong"
        except Exception as exc:  # compile errors, out of resources: recorded on the candidate
            res.update(status="error", reason=_error(exc))
            if not cuda_alive():
                raise CudaLost(f"{family} {name} at {shape_name}: {res['reason']}") from exc
            _empty_cache()
        self.seen[(family, dtype_name, shape_name, key)] = {**res, "cid": name}
        return res


def _sweep_worker(shared: dict) -> Callable[[dict], tuple[str, Any, str | None]]:
    state = _SweepState(shared)

    def handle(spec: dict) -> tuple[str, Any, str | None]:
        family, dtype, fields, name = spec["family"], spec["dtype"], spec["fields"], spec["cid"]
        shapes = {s: state.measure(family, dtype, fields, name, s) for s in spec["shapes"]}
        result: dict = {"shapes": shapes}
        if fields is None:
            result["target"] = dataclasses.asdict(plans.device_target(torch.device(DEVICE)))
        if not state.compile_only:
            times = " ".join(
                f"{s.split('-')[0]}-{s.split('-')[1]} " + (f"{r['ms']:.3f}" if r["ms"] is not None else r["status"])
                for s, r in shapes.items()
            )
            print(f"[sweep] {family} {dtype} {name}: {times}", flush=True)
        return "ok", result, None

    return handle


def sweep_best(items: list[dict]) -> tuple[list[dict], list[dict]]:
    """Best correct plan per (family, dtype, shape) next to the current plan's; and per (family, dtype)
    the one candidate with the least total time over the 224 px shapes (what a table row would hold)."""
    best, overall = [], []
    groups = dict.fromkeys((it["spec"]["family"], it["spec"]["dtype"]) for it in items)
    for family, dtype in groups:
        done = [
            it for it in items if (it["spec"]["family"], it["spec"]["dtype"]) == (family, dtype) and it.get("result")
        ]
        current = next((it for it in done if it["spec"]["fields"] is None), None)
        shapes = list(dict.fromkeys(s for it in done for s in it["result"]["shapes"]))
        for shape in shapes:
            cur = current["result"]["shapes"].get(shape, {}) if current else {}
            timed = [(it, it["result"]["shapes"][shape]) for it in done if shape in it["result"]["shapes"]]
            ok = [(it, r) for it, r in timed if r.get("status") == "ok" and r.get("ms") is not None]
            win_item, win = min(ok, key=lambda p: p[1]["ms"]) if ok else (None, None)
            best.append(
                {
                    "family": family,
                    "shape": shape,
                    "dtype": dtype,
                    "mode": SWEEP_FAMILIES[family][1],
                    "current_plan": cur.get("plan"),
                    "current_ms": cur.get("ms"),
                    "eager_ms": cur.get("eager_ms"),
                    "best_cid": win_item["spec"]["cid"] if win_item else None,
                    "best_fields": win_item["spec"]["fields"] if win_item else None,
                    "best_plan": win.get("plan") if win else None,
                    "best_ms": win.get("ms") if win else None,
                    "speedup": cur["ms"] / win["ms"] if win and cur.get("ms") else None,
                    "timed": len(ok),
                    "wrong": sum(r.get("status") == "wrong" for _, r in timed),
                    "errors": sum(r.get("status") == "error" for _, r in timed),
                    "pruned": sum(r.get("status") == "pruned" for _, r in timed),
                }
            )
        at_224 = [s for s in shapes if "-224" in s]

        def total(it: dict, at_224: list[str] = at_224) -> float | None:
            rs = [it["result"]["shapes"].get(s, {}) for s in at_224]
            ok = at_224 and all(r.get("status") == "ok" and r.get("ms") is not None for r in rs)
            return sum(r["ms"] for r in rs) if ok else None

        totals = [(it, total(it)) for it in done if total(it) is not None]
        if totals:
            win_item, win_total = min(totals, key=lambda p: p[1])
            cur_total = total(current) if current else None
            overall.append(
                {
                    "family": family,
                    "dtype": dtype,
                    "shapes": at_224,
                    "best_cid": win_item["spec"]["cid"],
                    "best_fields": win_item["spec"]["fields"],
                    "best_total_ms": win_total,
                    "current_total_ms": cur_total,
                    "speedup": cur_total / win_total if cur_total else None,
                }
            )
    return best, overall


SWEEP_TABLE_CHARS = 9000  # the printed table's budget: the summary must fit the remote tool's last 12,000 characters


def _sweep_table(best: list[dict], overall: list[dict], limit: int = SWEEP_TABLE_CHARS) -> list[str]:
    """The summary: first the one plan per (family, dtype) a table row would hold, then the best
    plan per shape; rows past ``limit`` characters are counted, not printed (the JSON has all)."""

    def ms(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "-"

    lines = []
    for o in overall:
        speed = f"{o['speedup']:.2f}x" if o["speedup"] else "-"
        lines.append(
            f"{o['family']} {o['dtype']}: one plan for the {len(o['shapes'])} 224 px shapes: {o['best_cid']} "
            f"{o['best_total_ms']:.4f} ms total vs current {ms(o['current_total_ms'])} ms ({speed})"
        )
    fam = max([6, *(len(b["family"]) for b in best)])
    shp = max([5, *(len(b["shape"]) for b in best)])
    header = (
        f"{'family':<{fam}} | {'shape':<{shp}} | {'dtype':<5} | {'current plan':<28} | {'current ms':>10} | "
        f"{'best plan':<28} | {'best ms':>10} | speed-up"
    )
    lines += [header, "-" * len(header)]
    used = sum(len(line) + 1 for line in lines)
    for i, b in enumerate(best):
        speed = f"{b['speedup']:.2f}x" if b["speedup"] else "-"
        line = (
            f"{b['family']:<{fam}} | {b['shape']:<{shp}} | {b['dtype']:<5} | {b['current_plan'] or '-':<28} | "
            f"{ms(b['current_ms']):>10} | {b['best_plan'] or '-':<28} | {ms(b['best_ms']):>10} | {speed}"
            + (f"  (eager {b['eager_ms']:.4f} ms)" if b.get("eager_ms") else "")
            + (f"  ({b['wrong']} wrong, {b['errors']} errors)" if b["wrong"] or b["errors"] else "")
        )
        if used + len(line) + 1 > limit:
            lines.append(f"... {len(best) - i} more shapes in sweep.json (sweep.best)")
            break
        lines.append(line)
        used += len(line) + 1
    return lines


def _dry_sweep(run: Run, items: list[dict], target: plans.Target, workers: int) -> None:
    """Fills each item's per-shape plans on ``target`` (pruned, duplicate launches) and prints the counts."""
    seen: dict[tuple, str] = {}
    counts: dict = collections.defaultdict(lambda: collections.Counter())
    for item in items:
        spec = item["spec"]
        family, fields = spec["family"], spec["fields"]
        shapes = {}
        for name in spec["shapes"]:
            shape = SWEEP_FAMILIES[family][0][name]
            key, short, launches = sweep_plan(family, shape, common.KERNEL_DTYPES[spec["dtype"]], target, fields)
            res: dict = {"plan": short, "key": key, "status": "planned", "ms": None, "reason": None}
            reason = prune_reason(family, _main_launch(family, launches)) if fields else None
            if reason:
                res.update(status="pruned", reason=reason)
            elif (family, name, key) in seen:
                res.update(status="same", same_as=seen[family, name, key])
            else:
                seen[family, name, key] = spec["cid"]
            counts[family, name][res["status"]] += 1
            shapes[name] = res
        item["result"] = {"shapes": shapes}
        compiles = sum(r["status"] == "planned" for r in shapes.values())
        item["estimate_s"] = round(compiles * (SWEEP_COMPILE_S[family] / max(1, workers) + SWEEP_TIME_S), 1)
    run.record["sweep"]["dry_run_counts"] = {f"{f}/{s}": dict(c) for (f, s), c in counts.items()}
    print(
        f"plans computed for target {target.name} ({target.gpu}); per family and shape: plans to time "
        f"(planned), pruned, duplicates of an earlier candidate's launches (same):"
    )
    for (family, name), c in counts.items():
        print(f"  {family:<13} {name:<17} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))


def phase_sweep(run: Run) -> list[str]:
    args = run.args
    rec = run.record["sweep"]
    assumed = plans.TARGETS["sm_90"]  # ordering and dry-run counts only; the worker plans for the live GPU
    candidates = {
        f: sweep_candidates(f, select_sweep_shapes(f, args.shapes), assumed)[: args.max_candidates]
        for f in args.families
    }
    first, *others = args.dtypes
    items = sweep_items(args, first, candidates)
    run.items = items
    rec.update(
        families=args.families,
        dtypes=args.dtypes,
        grids={f: SWEEP_GRIDS[f] for f in args.families},
        shapes={f: select_sweep_shapes(f, args.shapes) for f in args.families},
        tables={
            name: repr(getattr(plans, name, None))
            for name in (
                "_ATTN_FWD",
                "_ATTN_BWD",
                "_MIXED_FWD",
                "_MIXED_BWD",
                "_UPSAMPLE_FWD",
                "_UPSAMPLE_BWD",
                "_UPSAMPLE_BWD_DV",
                "_LINEAR_GELU_FWD",
                "_LINEAR_GELU_BWD",
                "_ADD_LN_FWD",
                "_ADD_LN_BWD",
                "_PA_FWD",
                "_PA_BWD",
                "_PA_BWD_DX",
                "_BIAS_RELU",
                "_BN_FWD",
                "_BN_BWD_DX",
                "_BN_REDUCE",
            )
        },
        rules={
            "wrong_if_rel_diff_above_eps_x": WRONG_ULPS,
            "attn_max_regs": ATTN_MAX_REGS,
            "linear_max_acc": LINEAR_MAX_ACC,
            "linear_bwd_max_acc": LINEAR_BWD_MAX_ACC,
            "upsample_max_per_thread_x_table": UPSAMPLE_MAX_PER_THREAD,
            "follow_up_per_family": SWEEP_FOLLOW_UP,
            "do_bench": {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "return_mode": "median"},
        },
        target=None,
        precompile=None,
        candidates=[],
        best=[],
        best_overall=[],
    )
    print(
        f"{first}: "
        + ", ".join(f"{f} {len(c)} candidates + current" for f, c in candidates.items())
        + (
            f"; then {', '.join(others)}: the current plan and the {SWEEP_FOLLOW_UP} best {first} candidates per family"
            if others
            else ""
        )
    )
    if run.dry_run:
        _dry_sweep(run, items, assumed, args.compile_workers)
        compile_s = sum(
            SWEEP_COMPILE_S[it["spec"]["family"]]
            * sum(r["status"] == "planned" for r in it["result"]["shapes"].values())
            for it in items
        )
        print(
            f"estimated: ~{compile_s:.0f} s of compiling (CPU) spread over {args.compile_workers} parallel "
            f"workers, ~{sum(it['estimate_s'] for it in items):.0f} s in all with the timing; the "
            f"{args.budget_s:.0f} s budget is shared by family ("
            + ", ".join(f"{f} {SWEEP_WEIGHT[f]}" for f in args.families)
            + ")"
        )
        plan_budget(items, args.budget_s)
        runs = collections.Counter((it["spec"]["family"], it["plan"]) for it in items)
        print(
            "would time: "
            + ", ".join(f"{f} {runs[f, 'run']}/{runs[f, 'run'] + runs[f, 'skip (budget)']}" for f in args.families)
        )
    else:
        _sweep_run(run, items, candidates, others)
    _sweep_record(run)
    return _sweep_table(rec["best"], rec["best_overall"])


def _sweep_record(run: Run) -> None:
    """Every candidate's per-shape results, and the best plans (from what is measured so far)."""
    rec = run.record["sweep"]
    rec["candidates"] = [
        {
            "family": it["spec"]["family"],
            "dtype": it["spec"]["dtype"],
            "cid": it["spec"]["cid"],
            "fields": it["spec"]["fields"],
            "status": it["status"],
            "wall_s": it["wall_s"],
            "reason": it["reason"],
            "shapes": (it.get("result") or {}).get("shapes"),
        }
        for it in run.items
    ]
    # a dry run lists the shapes and current plans (on the assumed target) with no times
    rec["best"], rec["best_overall"] = sweep_best(
        [it for it in run.items if it.get("result") and (run.dry_run or it["status"] == "ok")]
    )


def _sweep_run(run: Run, items: list[dict], candidates: dict, other_dtypes: list[str]) -> None:
    args, rec = run.args, run.record["sweep"]
    shared = {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms}
    if args.compile_workers > 0:  # Triton's disk cache then serves the timing worker
        deadline = time.time() + min(0.4 * run.left(), run.left() - 60)
        todo = [it for it in items if it["spec"]["fields"] is not None]
        for it in todo:
            it["deadline"] = deadline
        t0 = time.monotonic()
        print(
            f"compiling {len(todo)} candidates on {args.compile_workers} workers (at most "
            f"{max(0.0, deadline - time.time()):.0f} s; their output goes to the log)",
            flush=True,
        )
        counts = run_parallel(
            run, "sweep", todo, shared={**shared, "compile_only": True}, workers=args.compile_workers, deadline=deadline
        )
        rec["precompile"] = {
            "workers": args.compile_workers,
            "wall_s": round(time.monotonic() - t0, 1),
            "events": counts,
        }
        print(f"compiled in {time.monotonic() - t0:.0f} s: {counts}", flush=True)
    # the budget left, shared by family in order; time a family leaves unused passes to the next
    reserve = 0.15 * run.left() if other_dtypes else 0.0
    weights = sum(SWEEP_WEIGHT[f] for f in candidates)
    end = time.time()
    for family in candidates:
        end += (run.left() - reserve) * SWEEP_WEIGHT[family] / weights
        for it in items:
            if it["spec"]["family"] == family:
                it["deadline"] = end

    def done(item: dict) -> None:
        if item["spec"]["fields"] is None and item.get("result") and item["result"].get("target"):
            rec["target"] = item["result"]["target"]
        _sweep_record(run)
        run.save()

    def timeout(item: dict) -> float:
        return max(90.0, 6 * item["estimate_s"])

    supervise(run, "sweep", items, shared=shared, item_timeout=timeout, on_done=done)
    if not other_dtypes:
        return
    best, overall = sweep_best([it for it in items if it["status"] == "ok"])
    follow: dict[str, list[dict]] = {}
    for family in candidates:
        ranked = [o["best_fields"] for o in overall if o["family"] == family]
        ranked += [
            b["best_fields"]
            for b in sorted((b for b in best if b["family"] == family and b["speedup"]), key=lambda b: -b["speedup"])
        ]
        unique = [f for i, f in enumerate(ranked) if f and f not in ranked[:i]]
        follow[family] = unique[:SWEEP_FOLLOW_UP]
    extra = [it for dtype in other_dtypes for it in sweep_items(args, dtype, follow)]
    for it in extra:
        it["deadline"] = run.deadline()
    run.items = items + extra
    supervise(run, "sweep", extra, shared=shared, item_timeout=timeout, on_done=done)


# ---------------------------------------------------------------------------------------
# Phase profile: where a target's time goes
# ---------------------------------------------------------------------------------------

PROFILE_WARMUP = 3  # steps before profiling (the first compiles, under +compile)
PROFILE_OPS = {"attention": "tiny-s1-224-b256", "upsample": "tiny-s1-224-b256"}  # op: ATTN/UPSAMPLE_SHAPES name
PROFILE_OP_ESTIMATE_S = 15.0
PROFILE_ZIP_MAX = 12 << 20  # the traces' zip stays well inside the remote tool's 16 MiB a file


def profile_items(tp: Any, steps: int) -> list[dict]:
    """The speed targets' rows (``e2e_items``' spec, ``PROFILE_WARMUP`` + ``steps`` steps), reference
    before kernels, then the attention and upsample ops (Triton, forward + backward), then the
    compiled inference pair; in order of importance."""
    rows = {it["id"]: it for it in e2e_items("core", tp)}

    def row(item_id: str) -> dict:
        e2e = rows[item_id]
        return work_item(item_id, e2e["estimate_s"], spec={**e2e["spec"], "warmup": PROFILE_WARMUP, "iters": steps})

    tiny = "restv2_tiny"
    return [
        *(
            row(f"{mode}/{tiny}/{label}")
            for mode in ("infer", "train", "features-fwd+bwd")
            for label in ("reference", "kernels")
        ),
        *(
            work_item(
                f"op/{op}/{shape}",
                PROFILE_OP_ESTIMATE_S,
                spec={"op": op, "shape": shape, "dtype": "bf16", "iters": steps},
            )
            for op, shape in PROFILE_OPS.items()
        ),
        *(row(f"infer/{tiny}/{label}") for label in ("reference+compile", "kernels+compile")),
    ]


def phase_profile(run: Run) -> list[str]:
    args = run.args
    if args.profile_steps < 1:
        raise SystemExit(f"--profile-steps {args.profile_steps}: at least 1")
    tp = load_script("throughput")
    items = select_rows(profile_items(tp, args.profile_steps), args.rows)
    run.items = items
    rec = run.record["profile"]
    rec.update(steps=args.profile_steps, warmup=PROFILE_WARMUP, rows=[], traces=[], traces_left_out=[])
    after = precompile(run, items, rec)

    def rows() -> list[dict]:
        return [{k: it.get(k) for k in ("id", "status", "reason", "spec", "result")} for it in items]

    if run.dry_run:
        used = plan_budget(items, args.budget_s - (PRECOMPILE_ESTIMATE_S if "precompile" in rec else 0.0))
        print(
            f"would profile these in one worker child, in this order (~{used:.0f} s of the {args.budget_s:.0f} s budget):"
        )
        print("\n".join(format_plan(items)))
    else:

        def done(item: dict) -> None:
            rec["rows"] = rows()
            run.save()

        with tempfile.TemporaryDirectory(prefix="gpu_suite_traces_") as tmp:
            supervise(
                run,
                "profile",
                items,
                shared={"trace_dir": tmp},
                item_timeout=lambda it: max(240.0, 3 * it["estimate_s"]),
                on_done=done,
            )
            precompile_followup(rec, after)
            traces = [pathlib.Path(tmp) / trace_name(it["id"]) for it in items]  # the most important first
            rec["traces"], rec["traces_left_out"] = zip_traces([t for t in traces if t.exists()], run.path("zip"))
    rec["rows"] = rows()
    report = load_script("report")
    lines = precompile_lines(rec)
    for title, results in report.profile_groups(rec["rows"]).items():
        lines += [*(report.profile_lines(title, results, top=3) if results else [f"{title}: not profiled"]), ""]
    return lines


def trace_name(item_id: str) -> str:
    """A chrome trace's file name for an item id (``infer/restv2_tiny/kernels+compile``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", item_id.replace("+", "-")) + ".json"


def zip_traces(
    paths: list[pathlib.Path], dest: pathlib.Path, limit: int = PROFILE_ZIP_MAX
) -> tuple[list[str], list[str]]:
    """Deflates the traces, in order, into one zip of at most ``limit`` bytes: (names in, names left
    out, from the first that would pass the limit on)."""
    import zipfile

    kept: list[str] = []
    if not paths:
        return kept, []
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path in paths:
            zf.write(path, path.name)
            directory = sum(46 + len(name.encode()) for name in [*kept, path.name]) + 22  # written on close
            if zf.fp.tell() + directory > limit:
                break
            kept.append(path.name)
    if len(kept) < len(paths):  # written again without the one that passed the limit
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            for path in paths[: len(kept)]:
                zf.write(path, path.name)
    return kept, [p.name for p in paths[len(kept) :]]


def _profile_worker(shared: dict) -> Callable[[dict], tuple[str, Any, str | None]]:
    kp = load_script("kernel_profile")
    tp = kp.throughput  # the module profile_row builds with
    device = torch.device(DEVICE)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as throughput.py
    ours = kp.our_kernels()
    trace_dir = pathlib.Path(shared["trace_dir"])

    def handle(spec: dict) -> tuple[str, Any, str | None]:
        steps = spec["iters"]
        if "op" in spec:
            item_id = f"op/{spec['op']}/{spec['shape']}"
            shapes, make = (
                (ATTN_SHAPES, _attention_case) if spec["op"] == "attention" else (UPSAMPLE_SHAPES, _upsample_case)
            )
            dtype = common.KERNEL_DTYPES[spec["dtype"]]
            fwd, bwd = make(shapes[spec["shape"]], dtype, False), make(shapes[spec["shape"]], dtype, True)

            def step() -> None:
                fwd["run"]()
                bwd["run"]()

            for _ in range(PROFILE_WARMUP):
                step()
            result = kp.profile_step(step, device, steps, ours, trace_dir / trace_name(item_id))
            del fwd, bwd
        else:
            row = tp.Row(**{**spec, "resolution": tuple(spec["resolution"])})
            item_id = f"{row.mode}/{row.model}/{row.label}"
            try:
                result = kp.profile_row(row, device, steps, ours, trace_dir / trace_name(item_id))
            finally:
                tp.free_memory(device)
        cats = ", ".join(f"{c} {ms:.2f}" for c, ms in list(result["categories"].items())[:4])
        print(
            f"[profile] {item_id}: wall {result['wall_ms']:.2f} ms/step, busy {result['busy_ms']:.2f}; {cats}",
            flush=True,
        )
        return "ok", result, None

    return handle


WORKERS: dict[str, Callable[[dict], Callable[[dict], tuple[str, Any, str | None]]]] = {
    "e2e": _e2e_worker,
    "sweep": _sweep_worker,
    "profile": _profile_worker,
}


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------
# Plans: the prepared commands of a lease, several phases within one budget
# ---------------------------------------------------------------------------------------

STEP_RESERVE_S = 20.0  # kept back from each step's budget, of what is left: the child's imports and last writes
STEP_MIN_S = 20.0  # a step starts only with this much of a budget
STEP_START_S = 10.0  # a dry run's estimate of a step child's start (Python, torch, the tree) and last writes
ENV_ESTIMATE_S = 30.0  # the env phase's measurements (it has no work items)
PLAN_RECAP_CHARS = 8000  # the steps' summaries printed last, within the remote tool's last 12,000 characters


@dataclasses.dataclass(frozen=True)
class Step:
    """One phase of a plan, run as a child ``--phase`` command into ``<out>/<tag>/``."""

    tag: str
    phase: str
    args: tuple[str, ...] = ()
    cap_s: float | None = None  # at most this much of the plan's budget (None: what is left)

    def files(self) -> int:
        extra = PHASE_EXTRA_FILE.get(self.phase)  # a chart is drawn unless --no-plot
        return 3 if extra == "zip" or (extra == "png" and "--no-plot" not in self.args) else 2


@dataclasses.dataclass(frozen=True)
class Plan:
    """A prepared command: its steps in order of importance, within one budget (``--budget-s``)."""

    name: str
    lease: int  # the lease of the schedule it belongs to (two plans a lease)
    what: str
    steps: tuple[Step, ...]

    def files(self) -> int:
        return sum(step.files() for step in self.steps)


def _sweep_plan(name: str, lease: int, families: str) -> Plan:
    return Plan(name, lease, f"the sweep of {families}", (Step(name, "sweep", ("--families", *families.split())),))


_TARGET_KERNELS = ("--benches", "attention", "upsample")  # the kernel targets' benchmarks
PLANS = {
    plan.name: plan
    for plan in (
        Plan(
            "first",
            1,
            "correctness, then the kernel targets: env; the compiled tests without Inductor; "
            "attention and upsample at the stage-1 shape in bf16",
            (
                Step("env", "env", cap_s=60),
                Step("tests-cuda", "tests", ("--runs", "cuda"), cap_s=150),
                Step("kernels-s1", "kernels", ("--dtypes", "bf16", *_TARGET_KERNELS, "--groups", "s1")),
            ),
        ),
        Plan(
            "targets",
            1,
            "the end-to-end targets in eager (inference beside the peers, training, 800x1333 features); "
            "attention and upsample at 800x1333 in bf16",
            (
                Step(
                    "e2e-targets",
                    "e2e",
                    (
                        "--rows",
                        "infer/restv2_tiny/reference",
                        "infer/restv2_tiny/kernels",
                        "infer/*/timm",
                        "train/restv2_tiny/reference",
                        "train/restv2_tiny/kernels",
                        "features-fwd+bwd/*",
                    ),
                    cap_s=230,
                ),
                Step("kernels-det", "kernels", ("--dtypes", "bf16", *_TARGET_KERNELS, "--groups", "det")),
            ),
        ),
        Plan(
            "compiled",
            2,
            "the end-to-end inference targets under torch.compile: restv2_tiny and the peers, in one run",
            (Step("e2e-compiled", "e2e", ("--rows", "infer/*compile")),),
        ),
        Plan(
            "tests",
            2,
            "the CPU suite, compiled on the GPU",
            (Step("tests-not-cuda", "tests", ("--runs", "not-cuda")),),
        ),
        Plan(
            "inductor",
            3,
            "the tests that compile with Inductor; ResTv1's mixed-head attention in bf16",
            (
                Step("tests-inductor", "tests", ("--runs", "inductor"), cap_s=170),
                Step("kernels-mixed", "kernels", ("--dtypes", "bf16", "--benches", "attention_mixed")),
            ),
        ),
        Plan("profile", 3, "where the time goes, for the targets missed", (Step("profile", "profile"),)),
        _sweep_plan("sweep-attn", 4, "attn_fwd attn_bwd"),
        _sweep_plan("sweep-upsample", 4, "upsample_fwd upsample_bwd upsample_bwd_dv"),
        _sweep_plan("sweep-mlp", 5, "linear_gelu_fwd linear_gelu_bwd"),
        _sweep_plan("sweep-ln", 5, "add_ln_fwd add_ln_bwd"),
        _sweep_plan("sweep-pa", 6, "pixel_attention_fwd pixel_attention_bwd pixel_attention_bwd_dx"),
        _sweep_plan("sweep-bn", 6, "bias_relu bn_stats bn_relu_fwd bn_relu_bwd_sums bn_relu_bwd_dx"),
        _sweep_plan("sweep-mixed", 7, "mixed_fwd mixed_bwd"),
        Plan(
            "e2e-more",
            7,
            "800x1333 features forward; the training step under torch.compile",
            (Step("e2e-more", "e2e", ("--rows", "features-fwd/*", "train/*compile")),),
        ),
        Plan(
            "e2e-zoo",
            8,
            "restv2_small, base and large in eager",
            (Step("e2e-zoo", "e2e", ("--part", "zoo", "--rows", "*/reference", "*/kernels")),),
        ),
        Plan(
            "kernels-more",
            8,
            "attention and upsample at every 224 px stage in bf16, and at the stage-1 shape in fp16",
            (
                Step("kernels-224", "kernels", ("--dtypes", "bf16", *_TARGET_KERNELS, "--groups", "224"), cap_s=180),
                Step("kernels-fp16", "kernels", ("--dtypes", "fp16", *_TARGET_KERNELS, "--groups", "s1")),
            ),
        ),
        Plan(
            "e2e-zoo-compiled",
            9,
            "restv2_small, base and large under torch.compile",
            (Step("e2e-zoo-compiled", "e2e", ("--part", "zoo", "--rows", "*compile")),),
        ),
        Plan(
            "kernels-fp32",
            9,
            "attention and upsample at the targets' shapes in fp32",
            (Step("kernels-fp32", "kernels", ("--dtypes", "fp32", *_TARGET_KERNELS, "--groups", "s1", "det")),),
        ),
    )
}


def schedule_text() -> str:
    """The lease schedule (``--list``): every plan, two a lease, most important first."""
    lines = [
        f"The GPU schedule. A lease is {LEASE_S // 60} minutes of device time, all counted: the machine's start,",
        "each command, the transfers, idle waits. It holds the start and two plans. Run the first plans",
        "whose results are not yet under benchmarks/results/<gpu-slug>/, each as one command with the remote",
        "tool's timeout_s=360, then give the machine back. A plan stays within --budget-s (default",
        f"{DEFAULT_BUDGET_S:.0f} s) and writes at most {REMOTE_MAX_FILES} files: $OUT/<step>/<step>.json, .log",
        "(and .png or .zip). A step that does not fit is skipped and recorded: the next lease re-runs the plan.",
        f"The machine stays warm only {WARM_S} s after a call: copy the first plan's files from the reply's",
        "files_at and send the second plan at once, reading the results afterwards; a fresh start costs a",
        "minute or two of the lease.",
    ]
    for lease in dict.fromkeys(plan.lease for plan in PLANS.values()):
        lines += ["", f"lease {lease}:"]
        for plan in (p for p in PLANS.values() if p.lease == lease):
            lines.append(f"  PYTHONPATH=. python benchmarks/gpu_suite.py --plan {plan.name} --out $OUT")
            lines.append(f"      # {plan.what}")
            for step in plan.steps:
                cap = f" (at most {step.cap_s:.0f} s)" if step.cap_s else ""
                lines.append(f"      #   {step.tag}: --phase {step.phase} {' '.join(step.args)}".rstrip() + cap)
    lines += [
        "",
        "One phase alone: PYTHONPATH=. python benchmarks/gpu_suite.py --phase P --out $OUT/P (--help: each",
        "phase's options). Add --dry-run to any command to see, on any machine, what it would run.",
        "Afterwards copy each folder's files under benchmarks/results/<gpu-slug>/ (e.g. nvidia-h100-80gb-hbm3,",
        "the slug common.device_slug() gives; every JSON names the GPU it ran on), and run",
        "  python benchmarks/report.py benchmarks/results/<gpu-slug>/",
        "for the scorecard of the speed targets and the README's Performance tables (any machine).",
    ]
    return "\n".join(lines)


def step_command(step: Step, out: pathlib.Path, budget_s: float, dry_run: bool) -> list[str]:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--phase", step.phase, "--tag", step.tag]
    cmd += ["--out", str(out / step.tag), "--budget-s", f"{budget_s:.0f}", *step.args]
    return cmd + (["--dry-run"] if dry_run else [])


def run_plan(args: argparse.Namespace) -> int:
    """Runs ``args.plan``'s steps in order, each a child ``--phase`` command with what is left of the
    budget (at most its cap, less ``STEP_RESERVE_S``), into ``<out>/<tag>/``; a step that fails or
    crashes leaves the next ones to run; an interrupt (SIGINT, SIGTERM) stops the step running, which
    still writes its files. Prints each step's summary (from its JSON) last."""
    plan = PLANS[args.plan]
    t0, planned = time.monotonic(), 0.0  # a dry run's clock: the steps' estimates, not its own seconds
    print(f"gpu_suite plan {plan.name} (lease {plan.lease}): {plan.what}; budget {args.budget_s:.0f} s")
    done: list[dict] = []
    try:
        for step in plan.steps:
            left = args.budget_s - (planned if args.dry_run else time.monotonic() - t0)
            budget = min(step.cap_s or math.inf, left - STEP_RESERVE_S)
            entry = {"step": step, "budget_s": budget, "status": "skipped", "wall_s": 0.0, "record": None}
            done.append(entry)
            if budget < STEP_MIN_S:
                entry["reason"] = f"budget: {max(left, 0):.0f} s left"
                continue
            entry.update(status="running", started=time.monotonic(), result=None)
            entry["result"] = run_command(
                step_command(step, args.out, budget, args.dry_run), budget + STEP_RESERVE_S + 2 * STOP_GRACE_S
            )
            _read_step(entry, args.out)
            if args.dry_run:
                entry["wall_s"] = _planned_s(entry["record"] or {}, budget)
                planned += entry["wall_s"]
    except KeyboardInterrupt:
        for proc in list(_CHILDREN):  # the step's child writes its JSON on SIGINT
            stop(proc)
        if done and done[-1]["status"] == "running":
            _read_step(done[-1], args.out, interrupted=True)
    for step in plan.steps[len(done) :]:
        done.append({"step": step, "budget_s": 0.0, "status": "not reached", "wall_s": 0.0, "record": None})
    _print_plan_recap(plan, args, done, planned if args.dry_run else time.monotonic() - t0)
    return 0 if all(e["status"] == "complete" for e in done) else 1


def _read_step(entry: dict, out: pathlib.Path, interrupted: bool = False) -> None:
    """A finished (or interrupted) step's status and record, from its JSON."""
    step, result = entry["step"], entry.get("result") or {}
    record = _read_json(out / step.tag / f"{step.tag}.json")
    entry.update(wall_s=round(time.monotonic() - entry["started"], 1), record=record)
    if record is None:
        tail = " / ".join(result.get("tail", [])[-3:])
        entry.update(status="error", reason=f"no JSON (rc {result.get('returncode')}): {tail}")
    else:
        stopped = interrupted or result.get("timed_out")
        entry["status"] = record.get("status", "?") + (" (stopped)" if stopped else "")


def _planned_s(record: dict, budget_s: float) -> float:
    """A dry-run step's estimate: its child's start, and the work it plans within ``budget_s``."""
    work = ENV_ESTIMATE_S if record.get("phase") == "env" else 0.0
    work += PRECOMPILE_ESTIMATE_S if "precompile" in (record.get(record.get("phase")) or {}) else 0.0
    work += sum(item["estimate_s"] for item in record.get("work", []) if item.get("plan") == "run")
    return STEP_START_S + min(work, budget_s)


def _print_plan_recap(plan: Plan, args: argparse.Namespace, done: list[dict], wall_s: float) -> None:
    print()
    print(
        f"== gpu_suite plan {plan.name}{' (dry run)' if args.dry_run else ''}: {len(done)} steps, "
        f"{'~' if args.dry_run else ''}{wall_s:.0f} s of {args.budget_s:.0f} s | commit {_git('rev-parse', 'HEAD')} =="
    )
    print(f"{'step':<18} {'phase':<8} {'status':<20} {'est' if args.dry_run else 'took':>6} {'budget':>7}")
    for e in done:
        print(f"{e['step'].tag:<18} {e['step'].phase:<8} {e['status']:<20} {e['wall_s']:>5.0f}s {e['budget_s']:>6.0f}s")
    share = PLAN_RECAP_CHARS // max(1, len(done))
    for e in done:
        record = e["record"] or {}
        lines = [f"-- {e['step'].tag}: {e.get('reason') or e['status']}", *record.get("summary", [])]
        text = "\n".join(line[:200] for line in lines)
        print(
            text if len(text) <= share else text[: share - 40].rsplit("\n", 1)[0] + f"\n... (in {e['step'].tag}.json)"
        )
    names = list(PLANS)
    if plan.name in names[:-1]:
        following = PLANS[names[names.index(plan.name) + 1]]
        print(f"next in the schedule: --plan {following.name} (lease {following.lease}): {following.what}")
    files = [f"{e['step'].tag}/{name}" for e in done for name in (e["record"] or {}).get("files", [])]
    print(f"files under {args.out}: {', '.join(files)}")


PHASE_FNS: dict[str, Callable[[Run], list[str]]] = {
    "env": phase_env,
    "tests": phase_tests,
    "kernels": phase_kernels,
    "e2e": phase_e2e,
    "sweep": phase_sweep,
    "profile": phase_profile,
}
PHASE_DTYPES = {"kernels": ["bf16", "fp16", "fp32"], "sweep": ["bf16", "fp16"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_suite.py",
        description=__doc__.split("\n\n")[0],
        epilog=schedule_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--phase", choices=PHASES, help="one phase to run (--plan runs several)")
    parser.add_argument(
        "--plan",
        choices=list(PLANS),
        help="a prepared command of the lease schedule (--list): its phases in order, within --budget-s",
    )
    parser.add_argument("--out", type=pathlib.Path, help="the folder for <phase>.json, .log, .png (e.g. $OUT/env)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU work: write the files, print the plan")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"seconds of work (default {DEFAULT_BUDGET_S:.0f}); later items are skipped, recorded",
    )
    parser.add_argument("--tag", help="the files' name instead of the phase's: <tag>.json (letters, digits, . _ -)")
    parser.add_argument("--list", action="store_true", help="print the lease schedule: the plans to run, two a lease")
    parser.add_argument("--no-plot", action="store_true", help="no PNG (kernels, e2e)")
    group = parser.add_argument_group("tests")
    group.add_argument(
        "--runs",
        nargs="+",
        choices=[name for name, *_ in TEST_RUNS],
        default=[name for name, *_ in TEST_RUNS],
        help="the pytest runs, in this order (default: "
        + ", ".join(f"{name} = -m {marker!r}" for name, marker, *_ in TEST_RUNS)
        + ")",
    )
    group.add_argument(
        "--pytest-workers",
        type=int,
        default=8,
        help="pytest-xdist workers a run, if xdist is there (default 8, of the GPU machine's 16 cores; 0: none)",
    )
    group.add_argument(
        "--test-timeout", type=int, default=300, help="seconds per test, if pytest-timeout is there (default 300)"
    )
    group = parser.add_argument_group("kernels and sweep")
    group.add_argument(
        "--dtypes",
        nargs="+",
        choices=sorted(common.KERNEL_DTYPES),
        help="in order of importance (default: kernels bf16 fp16 fp32; sweep bf16 fp16, where "
        "the dtypes after the first re-time only the best candidates)",
    )
    group.add_argument("--benches", nargs="+", choices=KERNEL_BENCHES, default=list(KERNEL_BENCHES))
    group.add_argument(
        "--groups",
        nargs="+",
        choices=list(SHAPE_GROUPS),
        default=["224", "det"],
        help="kernels: the shape groups, in this order (default: 224 det); "
        + "; ".join(f"{name}: {what}" for name, what in SHAPE_GROUPS.items()),
    )
    group = parser.add_argument_group("e2e and profile")
    group.add_argument(
        "--part",
        choices=["core", "zoo"],
        default="core",
        help="core: restv2_tiny (4 backends, peers, train, 800x1333 features); zoo: small/base/large",
    )
    group.add_argument(
        "--rows",
        nargs="+",
        metavar="PATTERN",
        help="only the rows whose id matches a glob, e.g. 'train/*' 'infer/*/kernels*'",
    )
    group.add_argument("--profile-steps", type=int, default=3, help="profile: profiled steps a row (default 3)")
    group = parser.add_argument_group("sweep")
    group.add_argument("--families", nargs="+", choices=list(SWEEP_FAMILIES), default=list(SWEEP_FAMILIES))
    group.add_argument("--shapes", nargs="+", metavar="NAME", help=f"names or prefixes of: {' '.join(ATTN_SHAPES)}")
    group.add_argument("--max-candidates", type=int, help="at most this many candidates per family (nearest first)")
    group.add_argument(
        "--compile-workers",
        type=int,
        default=8,
        help="children compiling the candidates in parallel before timing (default 8; 0: none)",
    )
    group.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warm-up (default 10)")
    group.add_argument("--rep-ms", type=float, default=40.0, help="do_bench repetition time (default 40)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def _print_summary(run: Run, lines: list[str]) -> None:
    rec = run.record
    skipped = [it["id"] for it in run.items if it["status"] == "skipped"]
    failed = [f"{it['id']} ({it['status']})" for it in run.items if it["status"] in ("error", "timeout")]
    print()
    print(
        f"== gpu_suite {run.phase}{' (dry run)' if run.dry_run else ''}: {rec['status']}, "
        f"{rec.get('wall_s', 0):.0f} s of {run.args.budget_s:.0f} s | commit {rec.get('git_commit')} =="
    )
    if rec.get("environment"):
        print(common.describe(rec["environment"]))
    if rec.get("error"):
        print(f"ERROR: {rec['error'].strip().splitlines()[-1]}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    if skipped:
        print(f"skipped ({len(skipped)}): {', '.join(skipped[:12])}{' ...' if len(skipped) > 12 else ''}")
    for line in lines:
        print(line)
    print(f"files: {', '.join(str(run.out / name) for name in rec.get('files', []))}")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.list:
        print(schedule_text())
        return 0
    if bool(args.phase) == bool(args.plan) or args.out is None:
        parser.error("--phase or --plan, and --out, are needed (or --list)")
    if args.plan and args.tag:
        parser.error("--tag names one phase's files; a plan's steps have their own (--list)")
    if args.tag and not NAME_RE.match(args.tag):
        parser.error(f"--tag {args.tag!r}: only letters, digits, '.', '_' and '-'")
    if args.dtypes is None:
        args.dtypes = list(PHASE_DTYPES.get(args.phase, ["bf16"]))
    what = f"--phase {args.phase}" if args.phase else f"--plan {args.plan}"
    if not args.dry_run and not torch.cuda.is_available():
        print(
            f"gpu_suite: {what} needs a CUDA GPU and torch.cuda.is_available() is False here; "
            "nothing was run. Add --dry-run to see what it would run.",
            file=sys.stderr,
        )
        return 2
    if args.budget_s > 540:
        print(f"gpu_suite: warning: --budget-s {args.budget_s:.0f} leaves little of the remote tool's 600 s a command")

    with _sigterm_interrupts():
        return run_plan(args) if args.plan else run_phase(args, argv)


@contextlib.contextmanager
def _sigterm_interrupts():
    """In the main thread, SIGTERM (a timeout's kill) raises KeyboardInterrupt as SIGINT does: the
    children are stopped and the files written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_phase(args: argparse.Namespace, argv: list[str]) -> int:
    run = Run(args.phase, args.out, args, argv)
    run.out.mkdir(parents=True, exist_ok=True)
    status, lines = "complete", []
    with (
        open(run.path("log"), "w") as log,
        contextlib.redirect_stdout(_Tee(sys.stdout, log)),
        contextlib.redirect_stderr(_Tee(sys.stderr, log)),
    ):
        run.log = log
        try:
            run.record = base_record(run)
            print(f"gpu_suite {display([sys.executable, 'benchmarks/gpu_suite.py', *argv])}")
            print(common.describe(run.record["environment"]))
            run.save("running")
            lines = PHASE_FNS[args.phase](run)
        except KeyboardInterrupt:
            status = "interrupted"
        except Exception:  # noqa: BLE001  (recorded, and the files still written)
            status = "error"
            run.record["error"] = traceback.format_exc()
            print(run.record["error"])
        finally:
            for proc in list(_CHILDREN):
                stop(proc, grace=2.0)
        run.record["summary"] = lines
        run.save(status)
        _print_summary(run, lines)
        run.log = None
    return 0 if status == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
