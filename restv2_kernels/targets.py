"""The GPU target check: compile recorded launches for real NVIDIA GPUs on a machine without one.

Triton's interpreter proves the maths; only the compiler says whether a plan fits a GPU. The
Triton wheel compiles for any NVIDIA target without a GPU and ships ``cuobjdump``, so this
module takes launches recorded by ``plans.recording()`` (the real launchers, run on meta
tensors) and, per target:

1. **Specialises** each launch as a JIT launch of those arguments would: the kernel's own
   ``JITFunction.run`` binds the arguments under a stand-in driver that reports the target,
   and its compile step is intercepted. Pointers get Triton's divisibility-by-16 flag from
   their address (a 512-byte-aligned allocation plus the view's storage offset, as PyTorch's
   caching allocator gives), ints from their value, and ints equal to 1 become constants.
   ``jit_compiles`` checks the other way round that a JIT launch finds what was compiled so
   in Triton's cache (its warm-up compiles nothing more).
2. **Dedupes** the compile keys and **compiles** each once with ``triton.compile`` in a
   process pool, sharing Triton's on-disk cache (``TRITON_CACHE_DIR``) between runs.
3. **Reads** the cubin with ``cuobjdump``: registers and stack/local bytes (``-res-usage``),
   tensor-core instructions (``HMMA``, ``HGMMA`` in ``-sass``), spill loads/stores
   (``LDL``/``STL``); shared memory is Triton's dynamic allocation plus the static one. The
   readings are kept beside Triton's cache, keyed by the cubin's bytes (``cubin_facts``).
4. **Judges** each row (``problems``): compiled, shared memory within the target's opt-in
   limit, no local memory in 16-bit plans, tensor cores in every 16-bit ``tl.dot`` kernel
   on the targets that have them; and estimates occupancy (programs per SM from registers,
   shared memory, threads and the block limit).
5. **Keeps readings** (``Readings``, optional): what each compile read, committed to a file under
   the key Triton's own cache would use (``triton_hash``), so that a machine with an empty Triton
   cache compiles only the jobs whose key changed; one reused job a kernel is compiled afresh
   and must read the same.

Compiling needs the compiled ``triton.jit`` kernels: run it in a process without
``TRITON_INTERPRET=1`` (the command line drops the variable itself). The model zoo's
launches and the command line are in ``restv2.targets`` (``python -m restv2.targets``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import multiprocessing
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .plans import TARGETS, Recorded, Target

CHECKED_TARGETS = ("sm_80", "sm_89", "sm_90")  # what CI holds every plan to
INFO_TARGETS = ("sm_70",)  # compiled and shown, never failing: tl.dot is FMA there (Triton >= 3.2)
_ALLOC_ALIGNMENT = 512  # PyTorch's CUDA caching allocator hands out 512-byte-aligned blocks
_BASE_ADDRESS = 1 << 32


# ---------------------------------------------------------------------------------------
# 1. Specialisation: what a JIT launch of the recorded arguments compiles
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointerArg:
    """What ``JITFunction.run`` reads of a tensor argument: its dtype and address."""

    dtype: torch.dtype
    address: int

    def data_ptr(self) -> int:
        return self.address


def jit_arguments(args: Iterable[Any]) -> tuple:
    """Tensors (meta or real) -> ``PointerArg`` at an aligned base plus the view's byte offset."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = PointerArg(a.dtype, _BASE_ADDRESS + a.storage_offset() * a.element_size())
        out.append(a)
    return tuple(out)


class _TargetDriver:
    """The part of Triton's active driver that ``JITFunction.run`` asks, for a GPU not here."""

    def __init__(self, gpu_target: Any):
        self.target = gpu_target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"restv2-target-check-{self.target.arch}"  # keys the kernel's per-device caches

    def get_current_stream(self, device=None):
        return 0


@dataclass(frozen=True)
class CompileJob:
    """One distinct compilation: kernel, target, and Triton's signature/constexprs/attrs/options."""

    module: str
    qualname: str
    kernel: str  # the plan's kernel name: "attn_fwd", ...
    plan: str  # ``Launch.describe()``
    num_warps: int
    num_stages: int
    target: str
    arch: int
    signature: tuple
    constexprs: tuple
    attrs: tuple
    options: tuple
    unspecialized: tuple[str, ...] = ()  # the kernel's do_not_specialize arguments

    @property
    def key(self) -> str:
        return json.dumps(
            [self.module, self.qualname, self.arch, self.signature, self.constexprs, self.attrs, self.options],
            default=str,
        )

    @property
    def dtype(self) -> str:
        """The data's element type: ``bf16`` or ``fp16`` when a pointer argument has it (scratch
        and partial buffers are fp32 in every plan), else ``fp32``."""
        pointers = {ty[1:] for _, ty in self.signature if ty.startswith("*")}
        return next((dt for dt in ("bf16", "fp16") if dt in pointers), "fp32")

    @property
    def specialization(self) -> str:
        """How the arguments specialised the kernel, beyond the plan: ints equal to 1 made
        constants (``H=1``) and the pointers and ints not divisible by 16 (``not16: V``)."""
        plan_names = set(re.findall(r"(\w+)=", self.plan))
        index = {name: i for i, (name, _) in enumerate(self.signature)}
        constexprs = dict(self.constexprs)
        attrs = dict(self.attrs)
        ones = [
            name
            for name, ty in self.signature
            if ty == "constexpr" and name not in plan_names and constexprs.get((index[name],)) == 1
        ]
        odd = [
            name
            for name, ty in self.signature
            if ty.startswith(("*", "i"))
            and name not in self.unspecialized
            and not any(a[0] == "tt.divisibility" for a in attrs.get((index[name],), ()))
        ]
        other = {}  # pointers of another dtype than the data's (fp32 scratch, lse, partial sums)
        for name, ty in self.signature:
            if ty.startswith("*") and ty[1:] != self.dtype:
                other.setdefault(ty[1:], []).append(name)
        parts = [" ".join(f"{n}=1" for n in ones)] if ones else []
        parts += [f"{dt}: {','.join(names)}" for dt, names in other.items()]
        return " ".join(parts + ([f"not16: {','.join(odd)}"] if odd else []))


def _require_compiled(fn: Any) -> None:
    if not hasattr(fn, "run") or type(fn).__name__ != "JITFunction":
        raise RuntimeError(
            "the target check compiles Triton kernels, which are interpreted in this process "
            "(TRITON_INTERPRET=1 was set before triton was imported); run it in a process without it, "
            "e.g. `python -m restv2.targets`"
        )


@contextlib.contextmanager
def _stand_in_driver(target: Target):
    """Triton's active driver replaced by a ``_TargetDriver`` for ``target`` (yielded) while inside."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    previous = driver._active  # None until something asks for the driver; keep it so (no GPU here)
    stand_in = _TargetDriver(GPUTarget("cuda", target.arch, 32))
    driver.set_active(stand_in)
    try:
        yield stand_in
    finally:
        driver._active = previous


def specialize(rec: Recorded, target: Target) -> CompileJob:
    """The compile job a JIT launch of ``rec`` on ``target`` would start (nothing is compiled)."""
    fn = rec.fn
    _require_compiled(fn)
    captured = {}

    def capture(key, signature, device, constexprs, options, attrs, warmup):
        captured.update(signature=signature, constexprs=constexprs, options=options, attrs=attrs)

    fn._do_compile = capture  # an instance attribute shadows the method for this call only
    try:
        with _stand_in_driver(target):
            fn.run(*jit_arguments(rec.args), grid=rec.plan.grid, warmup=True, **rec.plan.options)
    finally:
        del fn._do_compile
    if not captured:  # the capture stores nothing in the JIT's cache, so every run reaches it
        raise RuntimeError(f"{rec.plan.kernel}: Triton did not reach its compile step")
    options = captured["options"]
    return CompileJob(
        module=fn.fn.__module__,
        qualname=fn.fn.__qualname__,
        kernel=rec.plan.kernel,
        plan=rec.plan.describe(),
        num_warps=rec.plan.num_warps,
        num_stages=rec.plan.num_stages,
        target=target.name,
        arch=target.arch,
        signature=tuple(captured["signature"].items()),
        constexprs=tuple(sorted(captured["constexprs"].items())),
        attrs=tuple(sorted((k, tuple(tuple(a) for a in v)) for k, v in captured["attrs"].items())),
        options=tuple(sorted(vars(options).items())),  # what JITFunction passes: options.__dict__
        unspecialized=tuple(p.name for p in fn.params if p.do_not_specialize),
    )


# ---------------------------------------------------------------------------------------
# 2-3. Compilation and what the cubin says
# ---------------------------------------------------------------------------------------


@dataclass
class Row:
    """One compiled plan on one target, and the launches that use it."""

    kernel: str
    dtype: str
    plan: str
    target: str
    num_warps: int
    num_stages: int
    specialization: str = ""  # CompileJob.specialization
    uses: list[str] = field(default_factory=list)
    registers: int | None = None
    local_bytes: int | None = None  # stack frame + local memory per thread (spills)
    spill_instructions: int | None = None  # LDL + STL in the SASS
    shared_bytes: int | None = None  # Triton's dynamic allocation + static
    shared_limit: int | None = None
    dots: int | None = None  # tt.dot ops in the Triton IR
    ptx_mma: int | None = None  # mma.sync / wgmma.mma_async in the PTX (tensor cores, before ptxas)
    hmma: int | None = None  # in the SASS; None where cuobjdump cannot disassemble the target
    hgmma: int | None = None
    sass_error: str | None = None
    programs_per_sm: int | None = None
    occupancy_limit: str | None = None  # what bounds programs_per_sm
    error: str | None = None
    problems: list[str] = field(default_factory=list)
    reading: str = "compiled"  # or "committed" (``Readings``), "committed, verified" (compiled afresh too)


def _tool(name: str) -> str:
    """A CUDA binary tool shipped with Triton's NVIDIA backend, else from PATH."""
    try:
        import triton.backends.nvidia as nv

        path = pathlib.Path(nv.__file__).parent / "bin" / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found (Triton's NVIDIA backend ships it in triton/backends/nvidia/bin)")
    return found


def _res_usage(cubin: pathlib.Path, kernel: str) -> dict[str, int]:
    out = subprocess.run(
        [_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Function " + re.escape(kernel) + r":\s*\n\s*(.*)", out)
    fields = dict(re.findall(r"(\w+):(\d+)", match.group(1) if match else out))
    return {k: int(v) for k, v in fields.items()}


def _sass_counts(cubin: pathlib.Path) -> dict[str, int]:
    """Tensor-core (HMMA, HGMMA) and spill (LDL, STL) instructions in the cubin's SASS.

    Raises ``subprocess.CalledProcessError`` where this cuobjdump cannot disassemble the target
    (CUDA 13's tools refuse sm_70)."""
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, flags=re.MULTILINE)

    def count(prefix: str) -> int:
        return sum(op.startswith(prefix) for op in ops)

    return {"hmma": count("HMMA"), "hgmma": count("HGMMA"), "spills": count("LDL") + count("STL")}


def _read_cubin(cubin_bytes: bytes, kernel: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(tmp) / "kernel.cubin"
        cubin.write_bytes(cubin_bytes)
        usage = _res_usage(cubin, kernel)
        try:
            sass, sass_error = _sass_counts(cubin), None
        except subprocess.CalledProcessError as exc:
            sass, sass_error = {"hmma": None, "hgmma": None, "spills": None}, (exc.stderr or "").strip()[:200]
    return {"usage": usage, "sass": sass, "sass_error": sass_error}


@functools.cache
def _cuobjdump_version() -> str:
    return subprocess.run([_tool("cuobjdump"), "--version"], capture_output=True, text=True, check=True).stdout


def triton_cache_dir() -> pathlib.Path:
    """Triton's on-disk cache, where ``triton.compile`` and the JIT look before compiling:
    ``TRITON_CACHE_DIR``, else ``.triton/cache`` under ``TRITON_HOME`` or the home folder."""
    try:
        import triton

        return pathlib.Path(triton.knobs.cache.dir)
    except (ImportError, AttributeError):  # Triton < 3.4 has no knobs
        home = os.environ.get("TRITON_HOME") or os.path.expanduser("~")
        return pathlib.Path(os.environ.get("TRITON_CACHE_DIR") or os.path.join(home, ".triton", "cache"))


def cache_entries() -> set[str]:
    """The entries (folders) of Triton's on-disk cache now: what was compiled between two calls
    is the difference (``cached_kernels`` names it)."""
    cache = triton_cache_dir()
    return set(os.listdir(cache)) if cache.is_dir() else set()


def cached_kernels(cache: pathlib.Path, entries: Iterable[str] | None = None) -> dict[str, int]:
    """Compiled kernels in Triton's on-disk cache ``cache`` by name (one ``__grp__<name>.json``
    an entry), counted over ``entries`` (folder names; None: all)."""
    names: collections.Counter = collections.Counter()
    if not cache.is_dir():
        return {}
    for entry in sorted(entries if entries is not None else os.listdir(cache)):
        for group in (cache / entry).glob("__grp__*.json"):
            names[group.name[len("__grp__") : -len(".json")]] += 1
    return dict(sorted(names.items()))


def jit_compiles(recorded: Iterable[Recorded], target: Target) -> dict[str, int]:
    """What a JIT launch of each of ``recorded`` on ``target`` compiles, by kernel name: the
    entries its warm-up adds to Triton's on-disk cache (``JITFunction.run(..., warmup=True)``
    under the stand-in driver: bound, specialised and compiled through that cache, not launched;
    the JIT's in-memory kernels are set aside, so that the disk decides). Empty where ``check``
    compiled the same launches: its cache keys are the JIT's, and a GPU's first launches find its
    compiles there (what ``benchmarks/gpu_suite.py``'s precompile relies on)."""
    before = cache_entries()
    with _stand_in_driver(target) as stand_in:
        device = stand_in.get_current_device()  # keys the JIT's in-memory kernels
        for rec in recorded:
            fn = rec.fn
            _require_compiled(fn)
            fn.device_caches.pop(device, None)
            try:
                fn.run(*jit_arguments(rec.args), grid=rec.plan.grid, warmup=True, **rec.plan.options)
            finally:
                fn.device_caches.pop(device, None)
    return cached_kernels(triton_cache_dir(), cache_entries() - before)


def _facts_dir() -> pathlib.Path:
    """Beside Triton's own cache."""
    return triton_cache_dir() / "restv2-cubin-facts"


def cubin_facts(cubin_bytes: bytes, kernel: str) -> tuple[dict[str, int], dict[str, int | None], str | None]:
    """``cuobjdump``'s reading of a cubin: (resource usage, SASS counts, SASS error or None).

    Disassembly costs about 0.25 s a cubin, most of the check's time once Triton's cache holds
    the compiled kernels; the reading is a function of the cubin's bytes, the kernel's name and
    the tool's version, so it is kept on disk under that key, beside Triton's cache."""
    key = hashlib.sha256(b"\0".join([cubin_bytes, kernel.encode(), _cuobjdump_version().encode()])).hexdigest()
    path = _facts_dir() / f"{key}.json"
    try:
        facts = json.loads(path.read_text())
        return facts["usage"], facts["sass"], facts["sass_error"]
    except (OSError, ValueError, KeyError, TypeError):  # absent, or cut short: read it again
        facts = _read_cubin(cubin_bytes, kernel)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(facts))
            os.replace(tmp, path)  # atomic: a worker never reads another's half-written file
        except OSError:
            pass  # a read-only cache only costs time
    return facts["usage"], facts["sass"], facts["sass_error"]


def _source(job: CompileJob) -> Any:
    """The ``triton.compiler.ASTSource`` that ``triton.compile`` takes for ``job``."""
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job.module), job.qualname)
    _require_compiled(fn)
    return ASTSource(fn, dict(job.signature), dict(job.constexprs), {k: [list(a) for a in v] for k, v in job.attrs})


def compile_job(job: CompileJob) -> dict[str, Any]:
    """Compiles one job (in a worker process) and reads its cubin: a dict of ``Row`` fields, and
    under ``"triton_hash"`` the key Triton's cache filed the compile under (None: it failed)."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = _source(job)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=dict(job.options))
    except Exception as exc:  # noqa: BLE001 - a plan that does not compile is a finding, not a crash
        lines = str(exc).strip().splitlines() or [""]
        return {"error": f"{type(exc).__name__}: {lines[-1][:300]}", "triton_hash": None}  # nothing cached
    usage, sass, sass_error = cubin_facts(compiled.asm["cubin"], compiled.metadata.name)
    ptx = compiled.asm["ptx"]
    return {
        "triton_hash": compiled.hash,
        "registers": usage.get("REG"),
        "local_bytes": usage.get("STACK", 0) + usage.get("LOCAL", 0),
        "spill_instructions": sass["spills"],
        "shared_bytes": compiled.metadata.shared + usage.get("SHARED", 0),
        "dots": compiled.asm["ttir"].count("tt.dot "),
        "ptx_mma": len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\b", ptx)),
        "hmma": sass["hmma"],
        "hgmma": sass["hgmma"],
        "sass_error": sass_error,
    }


# ---------------------------------------------------------------------------------------
# 5. Committed readings: what earlier runs read, keyed as Triton keys its cache
# ---------------------------------------------------------------------------------------

READING_FIELDS = (
    "registers",
    "local_bytes",
    "spill_instructions",
    "shared_bytes",
    "dots",
    "ptx_mma",
    "hmma",
    "hgmma",
    "sass_error",
    "error",
)


def triton_hash(job: CompileJob) -> str | None:
    """The key under which Triton's on-disk cache files ``job``'s compile, computed as
    ``triton.compile`` computes it, without compiling: a hash of Triton's own sources and
    library, the kernel's source and the functions and globals it uses, the signature,
    constants and attributes, the backend (ptxas version, target), the options and the
    cache-invalidating environment variables. None where this Triton has no such function."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import compiler

        src = _source(job)
        backend = compiler.make_backend(GPUTarget("cuda", job.arch, 32))
        options = backend.parse_options(dict(dict(job.options), **src.parse_options()))
        key = compiler.get_cache_key(src, backend, options, env_vars=compiler.get_cache_invalidating_env_vars())
    except (ImportError, AttributeError, TypeError):
        return None
    return hashlib.sha256(key.encode()).hexdigest()


def build_id() -> str | None:
    """This Triton build (its sources and library, the cache-invalidating environment) and this
    ``cuobjdump``: the readings of one build are filed together. None where Triton has no key."""
    try:
        from triton.compiler import compiler
        from triton.runtime.cache import triton_key

        parts = [triton_key(), str(sorted(compiler.get_cache_invalidating_env_vars().items())), _cuobjdump_version()]
    except (ImportError, AttributeError, RuntimeError, OSError, subprocess.CalledProcessError):
        return None
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def reading_mismatch(stored: dict[str, Any], fresh: dict[str, Any]) -> str | None:
    """How a committed reading differs from a fresh compile's (None: it does not)."""
    diffs = [
        f"{name} {stored.get(name)!r} committed, {fresh.get(name)!r} compiled"
        for name in READING_FIELDS
        if stored.get(name) != fresh.get(name)
    ]
    return "; ".join(diffs) or None


class Readings:
    """What the check read of each compile, committed to a JSON file so that a machine with an
    empty Triton cache (CI on a fresh machine) compiles only what changed.

    A reading is used only under the key Triton's own cache would use (``triton_hash``): a change
    to a kernel, a function it calls, a plan, the arguments' specialisation, Triton, ptxas or the
    cache-invalidating environment changes the key, and that job is compiled. Readings are
    grouped by build (``build_id``: Triton, ``cuobjdump``); ``save`` rewrites this build's group
    with the readings of this run and keeps the other builds'. ``check`` compiles a sample of the
    reused readings afresh and fails on any difference. ``reuse=False`` (to refresh the file)
    reuses none: every job is compiled (Triton's local cache still serves what it holds).
    """

    def __init__(self, path: str | os.PathLike, reuse: bool = True):
        self.path = pathlib.Path(path)
        self.build = build_id()
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            data = {}
        self.builds: dict[str, dict] = data.get("builds", {})
        group = self.builds.get(self.build) if self.build else None
        usable = group is not None and tuple(group.get("fields", ())) == READING_FIELDS
        self.stored: dict[str, list] = group["readings"] if usable and reuse else {}
        self.has_build = usable  # the file holds this build's readings (False: every job compiles)
        self.seen: dict[str, dict[str, Any]] = {}

    def get(self, key: str | None) -> dict[str, Any] | None:
        values = self.stored.get(key[:32]) if key else None
        if values is None:
            return None
        return {name: value for name, value in zip(READING_FIELDS, values) if value is not None}

    def put(self, key: str | None, reading: dict[str, Any]) -> None:
        if key:
            self.seen[key[:32]] = {name: reading.get(name) for name in READING_FIELDS}

    def save(self) -> None:
        """This build's group becomes this run's readings; the file has one reading a line."""
        if self.build is None:
            raise RuntimeError("this Triton has no cache key to file readings under")
        import triton

        self.builds[self.build] = {
            "triton": triton.__version__,
            "cuobjdump": _cuobjdump_version().strip().splitlines()[-1],
            "fields": list(READING_FIELDS),
            "readings": {k: [r.get(name) for name in READING_FIELDS] for k, r in sorted(self.seen.items())},
        }
        lines = ['{"builds": {']
        for i, (build, group) in enumerate(sorted(self.builds.items())):
            head = {k: v for k, v in group.items() if k != "readings"}
            lines.append(f" {json.dumps(build)}: {json.dumps(head)[:-1]}, " + '"readings": {')
            items = sorted(group["readings"].items())
            lines += [
                f"  {json.dumps(k)}: {json.dumps(v)}" + ("," if j < len(items) - 1 else "")
                for j, (k, v) in enumerate(items)
            ]
            lines.append(" }}" + ("," if i < len(self.builds) - 1 else ""))
        lines.append("}}")
        self.path.write_text("\n".join(lines) + "\n")


def _worker_init(cache_dir: str | None = None) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    if cache_dir:  # a fresh compile: Triton's cache and the cubin readings start empty
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    # Triton 3.9 warns once a process that its fp-fusion default will change: not this check's news
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


# ---------------------------------------------------------------------------------------
# 4. Occupancy and the rules
# ---------------------------------------------------------------------------------------


def programs_per_sm(target: Target, registers: int, shared_bytes: int, num_warps: int) -> tuple[int, str]:
    """Resident programs per SM and what limits them (``registers``, ``shared``, ``threads``, ``blocks``).

    Registers are allocated per warp in units of 256; each resident block also reserves
    ``target.smem_reserved`` bytes of shared memory.
    """
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    limits = {
        "registers": (target.regs_per_sm // regs_per_warp) // num_warps,
        "threads": target.max_threads_per_sm // (32 * num_warps),
        "blocks": target.max_blocks_per_sm,
    }
    if shared_bytes:
        limits["shared"] = target.smem_per_sm // (shared_bytes + target.smem_reserved)
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def is_tf32(row: Row) -> bool:
    """An fp32 plan whose dots are TF32 (launched where PyTorch allows TF32 matmuls)."""
    return row.dtype == "fp32" and "DOT_PRECISION=tf32" in row.plan.split()


def problems(row: Row) -> list[str]:
    """What is wrong with a compiled plan on its target (empty: nothing)."""
    if row.error:
        return [f"does not compile: {row.error}"]
    found = []
    if row.shared_bytes > row.shared_limit:
        found.append(f"shared memory {row.shared_bytes} B over the limit {row.shared_limit} B")
    if row.local_bytes and row.dtype != "fp32":
        found.append(f"{row.local_bytes} B of local memory (spills) in a 16-bit plan")
    tensor_cores = TARGETS[row.target].tensor_cores != "fma"  # a 16-bit or TF32 tl.dot must show HMMA / HGMMA there
    if row.dots and (row.dtype != "fp32" or is_tf32(row)) and tensor_cores and not (row.hmma or row.hgmma):
        found.append(f"{'TF32' if is_tf32(row) else '16-bit'} tl.dot without tensor-core instructions (no HMMA/HGMMA)")
    if row.sass_error and tensor_cores:
        found.append(f"cuobjdump could not disassemble it: {row.sass_error}")
    if row.programs_per_sm == 0:
        found.append("no program fits on an SM")
    return found


# ---------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------


def check(
    launches: dict[str, Sequence[tuple[Recorded, str]]],
    jobs: int | None = None,
    progress: Any = None,
    readings: Readings | None = None,
) -> list[Row]:
    """Compiles every distinct plan of ``launches`` for its target and judges it.

    ``launches``: target name -> (launch recorded under ``plans.using_target(target)``, use
    label). Rows come sorted by kernel, dtype, target, plan; ``Row.uses`` lists the labels
    of the launches that compile to it. ``progress(done, total, job)`` is called as jobs finish.
    With ``readings``, a job whose Triton cache key has a committed reading is not compiled
    (``Row.reading == "committed"``), except one such job a kernel, the one with the lowest key,
    which is compiled afresh, with Triton's cache and the cubin readings empty, and must read the
    same (``"committed, verified"``); every compile's key is checked against Triton's own.
    """
    by_key: dict[str, tuple[CompileJob, list[str]]] = {}
    for name, recorded in launches.items():
        target = TARGETS[name]
        for rec, use in recorded:
            job = specialize(rec, target)
            entry = by_key.setdefault(job.key, (job, []))
            if use not in entry[1]:
                entry[1].append(use)
    hashes = {key: triton_hash(job) for key, (job, _) in by_key.items()} if readings else {}
    results: dict[str, dict] = {}
    how: dict[str, str] = {}
    for key in by_key:
        stored = readings.get(hashes[key]) if readings else None
        if stored is not None:
            results[key], how[key] = stored, "committed"
    sample = {}  # kernel -> the reused job with the lowest key: compiled afresh
    for key in sorted(results, key=lambda k: hashes[k]):
        sample.setdefault(by_key[key][0].kernel, key)
    todo = [job for key, (job, _) in by_key.items() if key not in results]
    fresh = [by_key[key][0] for key in sample.values()]
    key_problems: dict[str, str] = {}

    def run(batch: list[CompileJob], fresh_cache: bool) -> dict[str, dict]:
        if not batch:
            return {}
        out = {}
        ctx = multiprocessing.get_context("spawn")  # a clean process: no interpreter, no inherited MLIR state
        cache = tempfile.TemporaryDirectory(prefix="restv2-fresh-compile-") if fresh_cache else contextlib.nullcontext()
        with (
            cache as cache_dir,  # removed after the pool has stopped
            concurrent.futures.ProcessPoolExecutor(
                max_workers=min(len(batch), jobs or os.cpu_count() or 1),
                mp_context=ctx,
                initializer=_worker_init,
                initargs=(cache_dir,),
            ) as pool,
        ):
            futures = {pool.submit(compile_job, job): job for job in batch}
            for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
                job = futures[future]
                result = future.result()
                compiled_hash = result.pop("triton_hash")
                if compiled_hash and hashes.get(job.key) and compiled_hash != hashes[job.key]:
                    key_problems[job.key] = (
                        f"the readings' key {hashes[job.key]} is not Triton's cache key {compiled_hash}"
                    )
                out[job.key] = result
                if progress:
                    progress(i, len(futures), job)
        return out

    for key, result in run(todo, fresh_cache=False).items():
        results[key], how[key] = result, "compiled"
    verified = run(fresh, fresh_cache=True)
    rows = []
    for key, (job, uses) in by_key.items():
        target = TARGETS[job.target]
        row = Row(
            kernel=job.kernel,
            dtype=job.dtype,
            plan=job.plan,
            target=job.target,
            num_warps=job.num_warps,
            num_stages=job.num_stages,
            specialization=job.specialization,
            uses=uses,
            shared_limit=target.smem_per_block,
            reading=how[key],
            **results[key],
        )
        if row.error is None:
            row.programs_per_sm, row.occupancy_limit = programs_per_sm(
                target, row.registers, row.shared_bytes, row.num_warps
            )
        row.problems = problems(row)
        if key in verified:
            row.reading = "committed, verified"
            mismatch = reading_mismatch(results[key], verified[key])
            if mismatch:
                row.problems.append(f"the committed reading differs from a fresh compile: {mismatch}")
        if key in key_problems:
            row.problems.append(key_problems[key])
        if readings:
            readings.put(hashes[key], verified.get(key, results[key]))
        rows.append(row)
    rows.sort(key=lambda r: (r.kernel, r.dtype, r.target, r.plan))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """One line per row: kernel, dtype, plan, target, registers, local bytes, shared vs limit,
    tensor-core instructions, programs per SM, and the problems."""
    head = (
        f"{'kernel':<16} {'dtype':<5} {'target':<6} {'regs':>4} {'local':>6} {'shared KB':>12} "
        f"{'mma':>11} {'prog/SM':>9}  plan / problems"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.error:
            lines.append(
                f"{r.kernel:<16} {r.dtype:<5} {r.target:<6} {'':>4} {'':>6} {'':>12} {'':>11} {'':>9}  "
                f"{r.plan} [{r.specialization}]  !! COMPILE ERROR {r.error}"
            )
            continue
        mma = tensor_core_label(r)
        shared = f"{r.shared_bytes / 1024:.0f}/{r.shared_limit / 1024:.0f}"
        occ = f"{r.programs_per_sm} {r.occupancy_limit[:4]}"
        flag = ("  !! " + "; ".join(r.problems)) if r.problems else ""
        spec = f" [{r.specialization}]" if r.specialization else ""
        lines.append(
            f"{r.kernel:<16} {r.dtype:<5} {r.target:<6} {r.registers:>4} {r.local_bytes:>6} {shared:>12} "
            f"{mma:>11} {occ:>9}  {r.plan}{spec}{flag}"
        )
    return "\n".join(lines)


def tensor_core_label(r: Row) -> str:
    """What the row's ``tl.dot`` became: ``HGMMA n``, ``HMMA n``, ``FMA`` (no MMA in the PTX), or ``-``."""
    if not r.dots:
        return "-"
    if r.hgmma:
        return f"HGMMA {r.hgmma}"
    if r.hmma:
        return f"HMMA {r.hmma}"
    return "FMA" if r.ptx_mma == 0 else f"PTX mma {r.ptx_mma}"


def to_json(rows: Sequence[Row]) -> list[dict]:
    return [dataclasses.asdict(r) for r in rows]
