"""Launch plans: the geometry of every kernel launch, as pure functions of shapes, dtype and target.

One source of truth. The launchers in ``attention/triton.py`` and ``upsample/triton.py`` ask
these functions for their grid, block constexprs, ``num_warps``, ``num_stages`` and splits,
and launch through ``launch()``; the GPU target check (``restv2_kernels.targets``) records
the same launches and compiles exactly them for GPUs that are not here.

- ``Target``: what a plan needs to know of a GPU (SM count, opt-in shared memory per block,
  the per-SM limits of the occupancy estimate). ``TARGETS`` holds the GPUs users run on;
  ``device_target(device)`` gives the live GPU's (its own SM count and shared memory, the
  tables of the nearest known architecture), or ``INTERPRETER`` for CPU tensors.
- Plan functions: ``attention_fwd_plan``, ``attention_bwd_plan``, ``attention_mixed_fwd_plan``,
  ``attention_mixed_bwd_plan``, ``upsample_fwd_plan``, ``upsample_bwd_plan`` (and the rest below). Their block tables are per target (``_ATTN_FWD`` ...): the
  ``"default"`` row serves every target without a row of its own.
- Grids are one-dimensional. CUDA caps grid dimensions y and z at 65,535 and Triton does not
  check, so everything that grows with the batch (B * heads, splits, key blocks) is folded
  into x (limit 2**31 - 1) and unfolded in the kernel. ``Launch`` refuses a grid over CUDA's
  limits with a ValueError, before anything reaches the driver.
- ``forced(...)`` and ``using_target(...)`` override the tables or the target inside a
  ``with`` block: the tests run the interpreter on small blocks or on a real GPU's plans, and
  the GPU sweep (``benchmarks/gpu_suite.py --phase sweep``) times candidate blocks.
- ``recording()``: inside it, ``launch()`` records each launch (kernel, plan, arguments)
  instead of running it. The target check runs the real launchers on meta tensors this way.

Nothing here imports Triton or touches the GPU at import.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

# CUDA's grid limits (every compute capability Triton supports).
MAX_GRID = (2**31 - 1, 65535, 65535)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# ---------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What the plans and the occupancy estimate need to know of one GPU.

    ``tables``: the name of the row of the plan tables this target uses (its own name when it
    has rows, else ``"default"``). ``smem_per_block``: the opt-in maximum of shared memory per
    block (what a Triton kernel may use); ``smem_per_sm``: per multiprocessor, of which each
    resident block reserves ``smem_reserved``.
    """

    name: str  # "sm_90", or "interpreter"
    arch: int  # compute capability as 10 * major + minor; 0 for the interpreter
    gpu: str  # the GPU the numbers are from
    sm_count: int
    smem_per_block: int
    smem_per_sm: int
    max_threads_per_sm: int
    max_blocks_per_sm: int
    regs_per_sm: int = 65536
    smem_reserved: int = 1024
    tensor_cores: str = "mma"  # what a 16-bit tl.dot becomes: "mma" (HMMA), "wgmma" (HGMMA), "fma"
    tables: str = "default"

    @property
    def interpreter(self) -> bool:
        return self.arch == 0


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        # Triton 3.2+ lowers tl.dot to FMA on Volta: no tensor cores there.
        Target(
            "sm_70",
            70,
            "Tesla V100-SXM2",
            80,
            98304,
            98304,
            2048,
            32,
            smem_reserved=0,
            tensor_cores="fma",
            tables="sm_70",
        ),
        Target("sm_80", 80, "A100-SXM4", 108, 166912, 167936, 2048, 32),
        Target("sm_86", 86, "GeForce RTX 3090", 82, 101376, 102400, 1536, 16),
        Target("sm_89", 89, "GeForce RTX 4090", 128, 101376, 102400, 1536, 24, tables="sm_89"),
        Target("sm_90", 90, "H100 SXM5", 132, 232448, 233472, 2048, 32, tensor_cores="wgmma", tables="sm_90"),
    )
}
# CPU tensors under TRITON_INTERPRET=1: the attention plans of the default tables with an
# H100's SM count; the upsample kernels take large tiles (the interpreter pays per op).
INTERPRETER = Target("interpreter", 0, "Triton interpreter (CPU)", 132, 232448, 233472, 2048, 32)

_target_override: contextvars.ContextVar[Target | None] = contextvars.ContextVar("restv2_target", default=None)


def known_target(arch: int) -> Target:
    """The entry of ``TARGETS`` for compute capability ``arch`` (86 for 8.6), or the nearest
    one below it (a newer GPU takes the newest tables it can run)."""
    below = [t for t in TARGETS.values() if t.arch <= arch]
    if not below:
        raise ValueError(f"compute capability {arch // 10}.{arch % 10} is older than any supported target (7.0)")
    return max(below, key=lambda t: t.arch)


@functools.cache
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    arch = 10 * props.major + props.minor
    base = known_target(arch)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or base.smem_per_block
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 0) or base.smem_per_sm
    return dataclasses.replace(
        base,
        name=f"sm_{arch}",
        arch=arch,
        gpu=props.name,
        sm_count=props.multi_processor_count,
        smem_per_block=smem,
        smem_per_sm=smem_sm,
        tables=base.name if base.tables == "default" else base.tables,
    )


def device_target(device: torch.device) -> Target:
    """The target the plans are made for: the live GPU of a CUDA ``device`` (SM count and shared
    memory read off it), ``INTERPRETER`` otherwise; ``using_target`` overrides both."""
    forced_target = _target_override.get()
    if forced_target is not None:
        return forced_target
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER


@contextlib.contextmanager
def using_target(target: Target | str) -> Iterator[Target]:
    """Plans inside the block are made for ``target`` (a ``Target`` or a name in ``TARGETS``),
    whatever the tensors' device: the interpreter runs a real GPU's geometry this way."""
    target = TARGETS[target] if isinstance(target, str) else target
    token = _target_override.set(target)
    try:
        yield target
    finally:
        _target_override.reset(token)


# ---------------------------------------------------------------------------------------
# Launches
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """One kernel launch: grid, constexpr arguments, ``num_warps`` and ``num_stages``."""

    kernel: str
    grid: tuple[int, ...]
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        if not 1 <= len(self.grid) <= 3:
            raise ValueError(f"{self.kernel}: a grid has 1 to 3 dimensions, got {self.grid}")
        for axis, (size, limit) in enumerate(zip(self.grid, MAX_GRID)):
            if not 1 <= size <= limit:
                raise ValueError(
                    f"{self.kernel}: grid dimension {'xyz'[axis]} = {size} is outside CUDA's limit 1..{limit}; "
                    "the input is too large for one launch (split the batch)"
                )

    @property
    def options(self) -> dict[str, Any]:
        """The keyword arguments of ``kernel[grid](...)``: constexprs, warps and stages."""
        return {**dict(self.constexprs), "num_warps": self.num_warps, "num_stages": self.num_stages}

    def describe(self) -> str:
        """``BLOCK_N=128 BLOCK_M=64 ... w8 s3``: the plan, without the grid."""
        meta = " ".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{meta} w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class Recorded:
    """A launch seen by ``recording()``: the kernel object, its plan and its positional arguments."""

    fn: Any
    plan: Launch
    args: tuple


_recorder: contextvars.ContextVar[list[Recorded] | None] = contextvars.ContextVar("restv2_recorder", default=None)


@contextlib.contextmanager
def recording() -> Iterator[list[Recorded]]:
    """Inside the block ``launch()`` records instead of launching; yields the list it fills.

    The launchers run as usual around it (allocation, strides, the torch sums of the second
    passes), so on meta tensors they record every launch a real call would make.
    """
    seen: list[Recorded] = []
    token = _recorder.set(seen)
    try:
        yield seen
    finally:
        _recorder.reset(token)


def launch(fn: Any, plan: Launch, *args: Any) -> None:
    """``fn[plan.grid](*args, **plan.options)``: the one place a kernel of this package is launched.
    In Triton's CPU interpreter, bf16 is made to compute on its values first (``interpreter_bf16``)."""
    seen = _recorder.get()
    if seen is not None:
        seen.append(Recorded(fn, plan, args))
        return
    if type(fn).__name__ == "InterpretedFunction":  # TRITON_INTERPRET=1: CPU tensors
        from . import interpreter_bf16

        interpreter_bf16.prepare(args)
    fn[plan.grid](*args, **plan.options)


# ---------------------------------------------------------------------------------------
# Table overrides (tests, sweeps)
# ---------------------------------------------------------------------------------------

_forced: contextvars.ContextVar[dict[str, dict[str, Any]] | None] = contextvars.ContextVar(
    "restv2_forced", default=None
)


# kernel family -> the fields ``forced`` may override; each section below adds its own
_FAMILIES: dict[str, frozenset[str]] = {}


def _forced_fields(family: str) -> dict[str, Any]:
    return (_forced.get() or {}).get(family, {})


@contextlib.contextmanager
def forced(**overrides: dict[str, Any]) -> Iterator[None]:
    """Overrides fields of the tables inside the block, per kernel family:

    ``forced(attn_fwd=dict(block_n=16, block_m=16, num_stages=1), attn_bwd=dict(...),
    upsample_fwd=dict(block_p=4, num_warps=1), upsample_bwd=dict(block_p=4, programs=12),
    upsample_bwd_dv=dict(block_p=4))``. Fields: those of ``AttnBlocks`` (+ ``min_blocks_per_split``
    for ``attn_bwd``) and of ``UpsampleTile`` (+ ``programs`` for ``upsample_bwd``, the g kernel).
    """
    unknown = set(overrides) - set(_FAMILIES)
    if unknown:
        raise ValueError(f"forced: unknown kernel families {sorted(unknown)}; known: {sorted(_FAMILIES)}")
    merged = {k: dict(v) for k, v in (_forced.get() or {}).items()}
    for family, fields in overrides.items():
        bad = set(fields) - _FAMILIES[family]
        if bad:
            raise ValueError(f"forced: {family} has no fields {sorted(bad)}; known: {sorted(_FAMILIES[family])}")
        merged.setdefault(family, {}).update(fields)
    token = _forced.set(merged)
    try:
        yield
    finally:
        _forced.reset(token)


def _apply_forced(family: str, config: Any) -> Any:
    fields = {k: v for k, v in _forced_fields(family).items() if k in _fields(type(config))}
    return dataclasses.replace(config, **fields) if fields else config


def _fields(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


def _table_row(table: dict[str, Any], target: Target) -> Any:
    return table.get(target.tables, table["default"])


# ---------------------------------------------------------------------------------------
# Attention (restv2_kernels/attention/triton.py)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttnBlocks:
    """Queries per block, keys per block, warps, software-pipeline stages."""

    block_n: int
    block_m: int
    num_warps: int
    num_stages: int


# Rows: (precision, head-dim class); the target check (python -m restv2.targets) holds each to
# its GPU's limits: no local memory in 16-bit plans, shared memory within the opt-in maximum.
# fp32 dots are IEEE, which Triton lowers to FMA with large per-thread operand arrays: the
# fp32 tiles are the smallest that keep spills low (some remain; the check lists them).
# Forward: the q rows stay in registers while key blocks stream; 8 warps for 16-bit [128, D].
_ATTN_FWD: dict[str, dict[tuple[str, str], AttnBlocks]] = {
    "default": {
        ("16bit", "d<=64"): AttnBlocks(128, 64, 8, 3),
        ("16bit", "d128"): AttnBlocks(128, 64, 8, 3),
        ("16bit", "d256"): AttnBlocks(64, 32, 8, 2),
        ("fp32", "d<=64"): AttnBlocks(16, 64, 4, 2),
        ("fp32", "d128"): AttnBlocks(16, 64, 8, 2),
        ("fp32", "d256"): AttnBlocks(16, 32, 8, 1),
    },
}
# Backward: a key block and its fp32 dk/dv accumulators stay on chip while [BLOCK_N, D] tiles
# of q and dO stream past; 32 queries a step (64 spill on sm_80/sm_89 when dq is fused in).
_ATTN_BWD: dict[str, dict[tuple[str, str], AttnBlocks]] = {
    "default": {
        ("16bit", "d<=64"): AttnBlocks(32, 64, 4, 2),
        ("16bit", "d128"): AttnBlocks(32, 64, 8, 2),
        ("16bit", "d256"): AttnBlocks(32, 32, 8, 2),
        ("fp32", "d<=64"): AttnBlocks(16, 64, 8, 1),
        ("fp32", "d128"): AttnBlocks(16, 64, 8, 1),
        ("fp32", "d256"): AttnBlocks(16, 32, 8, 1),
    },
}


def _fma_rows(table: dict) -> dict:
    """Every precision on the fp32 tiles: for targets where tl.dot is FMA whatever the dtype."""
    return {(prec, d): table["default"][("fp32", d)] for prec, d in table["default"]}


# sm_70: tl.dot is FMA for every dtype (Triton >= 3.2), and the tensor-core tiles spill
# kilobytes a thread there.
_ATTN_FWD["sm_70"] = _fma_rows(_ATTN_FWD)
_ATTN_BWD["sm_70"] = _fma_rows(_ATTN_BWD)

MIN_BLOCKS_PER_SPLIT = 4  # each dk/dv program walks >= 4 query blocks to amortise its partial write
PARTIAL_BYTES_CAP = 256 << 20  # at most 256 MiB of fp32 partial dk + dv


def _precision(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: fp32 stays IEEE; 16-bit inputs use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _attn_blocks(
    table: dict, family: str, D: int, M: int, dtype: torch.dtype, target: Target
) -> tuple[AttnBlocks, int]:
    """The table's blocks for (dtype, D), forced fields applied, BLOCK_M clipped to M."""
    block_d = max(16, next_power_of_2(D))
    d_class = "d<=64" if block_d <= 64 else f"d{block_d}"
    blocks = _apply_forced(family, _table_row(table, target)[(_precision(dtype), d_class)])
    # M = 49 -> 64: every key in one block, no loop (tl.dot needs blocks of at least 16)
    return dataclasses.replace(blocks, block_m=min(blocks.block_m, max(16, next_power_of_2(M)))), block_d


def attention_fwd_plan(B: int, N: int, M: int, H: int, D: int, dtype: torch.dtype, target: Target) -> Launch:
    """``_attn_fwd_kernel``: one program per (query block, batch * head), folded into x."""
    blocks, block_d = _attn_blocks(_ATTN_FWD, "attn_fwd", D, M, dtype, target)
    return Launch(
        "attn_fwd",
        (cdiv(N, blocks.block_n) * B * H,),
        (
            ("BLOCK_N", blocks.block_n),
            ("BLOCK_M", blocks.block_m),
            ("BLOCK_D", block_d),
            ("ONE_BLOCK", M <= blocks.block_m),
            ("DOT_PRECISION", dot_precision(dtype)),
        ),
        blocks.num_warps,
        blocks.num_stages,
    )


@dataclass(frozen=True)
class AttentionBwdPlan:
    """The backward's launches: ``dq`` (None when dq is fused into the dk/dv pass, M in one
    key block) and ``dkdv`` over (key blocks x ``splits`` x batch * heads); each split walks
    ``blocks_per_split`` query blocks and writes fp32 partials (dk, dv directly when splits = 1)."""

    dq: Launch | None
    dkdv: Launch
    splits: int
    blocks_per_split: int

    @property
    def fuse_dq(self) -> bool:
        return self.dq is None


def attention_splits(
    n_qblocks: int,
    n_kblocks: int,
    bh: int,
    M: int,
    D: int,
    target: Target,
    min_blocks_per_split: int = MIN_BLOCKS_PER_SPLIT,
) -> int:
    """Query splits S of the dk/dv pass: about 4 programs per SM, each split at least
    ``min_blocks_per_split`` query blocks long, fp32 partials at most ``PARTIAL_BYTES_CAP``."""
    splits = 4 * target.sm_count // max(1, n_kblocks * bh)
    splits = min(splits, cdiv(n_qblocks, min_blocks_per_split))
    splits = min(splits, PARTIAL_BYTES_CAP // max(1, 8 * bh * M * D))
    splits = max(1, splits)
    return cdiv(n_qblocks, cdiv(n_qblocks, splits))  # no empty split


def attention_bwd_plan(B: int, N: int, M: int, H: int, D: int, dtype: torch.dtype, target: Target) -> AttentionBwdPlan:
    """``_attn_bwd_dq_kernel`` (several key blocks only) and ``_attn_bwd_dkdv_kernel``."""
    blocks, block_d = _attn_blocks(_ATTN_BWD, "attn_bwd", D, M, dtype, target)
    n_qblocks, n_kblocks = cdiv(N, blocks.block_n), cdiv(M, blocks.block_m)
    min_per_split = _forced_fields("attn_bwd").get("min_blocks_per_split", MIN_BLOCKS_PER_SPLIT)
    splits = attention_splits(n_qblocks, n_kblocks, B * H, M, D, target, min_per_split)
    meta = (
        ("BLOCK_N", blocks.block_n),
        ("BLOCK_M", blocks.block_m),
        ("BLOCK_D", block_d),
        ("DOT_PRECISION", dot_precision(dtype)),
    )
    fuse_dq = n_kblocks == 1
    dq = None if fuse_dq else Launch("attn_bwd_dq", (n_qblocks * B * H,), meta, blocks.num_warps, blocks.num_stages)
    dkdv = Launch(
        "attn_bwd_dkdv",
        (n_kblocks * splits * B * H,),
        meta + (("FUSE_DQ", fuse_dq),),
        blocks.num_warps,
        blocks.num_stages,
    )
    return AttentionBwdPlan(dq, dkdv, splits, cdiv(n_qblocks, splits))


# ---------------------------------------------------------------------------------------
# Attention with the heads' interaction, ResTv1 (restv2_kernels/attention_mixed/triton.py)
# ---------------------------------------------------------------------------------------


# Every program holds per-head [BLOCK_N, BLOCK_D] / [BLOCK_M, BLOCK_D] tiles, as the plain
# attention's do, whatever the head count: the forward as ``_ATTN_FWD``'s footprint; the
# backward's dq and dk/dv programs keep about seven fp32 [BLOCK_N, BLOCK_M] score tiles live
# (t, p, a, dA, dt, their head mix ds, and s_h or a_h), so their blocks are smaller.
_MIXED_FWD: dict[str, dict[tuple[str, str], AttnBlocks]] = {
    "default": {
        ("16bit", "d<=64"): AttnBlocks(64, 64, 4, 2),
        ("16bit", "d128"): AttnBlocks(64, 64, 8, 2),
        ("16bit", "d256"): AttnBlocks(64, 32, 8, 2),
        ("fp32", "d<=64"): AttnBlocks(16, 32, 4, 1),
        ("fp32", "d128"): AttnBlocks(16, 32, 8, 1),
        ("fp32", "d256"): AttnBlocks(16, 16, 8, 1),
    },
}
_MIXED_BWD: dict[str, dict[tuple[str, str], AttnBlocks]] = {
    "default": {
        ("16bit", "d<=64"): AttnBlocks(32, 32, 4, 2),
        ("16bit", "d128"): AttnBlocks(32, 32, 4, 2),
        ("16bit", "d256"): AttnBlocks(32, 32, 8, 1),
        ("fp32", "d<=64"): AttnBlocks(16, 32, 4, 1),
        ("fp32", "d128"): AttnBlocks(16, 16, 8, 1),
        ("fp32", "d256"): AttnBlocks(16, 16, 8, 1),
    },
}
_MIXED_FWD["sm_70"] = _fma_rows(_MIXED_FWD)
_MIXED_BWD["sm_70"] = _fma_rows(_MIXED_BWD)
# sm_89/sm_90: at d <= 64 the 16-bit 32 x 32 tiles of dq and dk/dv spill 8-24 B under Triton 3.6
# (the GPU image's; ptxas holds them to 168 registers), 32 x 16 fit under 3.6 and 3.9; on sm_80
# it is the other way round (32 x 16 spill 8 B under both).
_MIXED_BWD.update(
    {name: {**_MIXED_BWD["default"], ("16bit", "d<=64"): AttnBlocks(32, 16, 4, 2)} for name in ("sm_89", "sm_90")}
)
# The interpreter pays per op and per program, and each program here loops over heads twice
# over: 64 x 64 blocks for every dtype (tests force small blocks where they want many).
_MIXED_INTERPRETER = AttnBlocks(64, 64, 4, 1)
_MIXED_NORM_BLOCK = 1024  # elements a program of the elementwise rescale (8 a thread at 4 warps)
_MIXED_NORM_BLOCK_INTERPRETER = 1 << 16


def _mixed_blocks(table: dict, family: str, D: int, M: int, dtype: torch.dtype, target: Target):
    """``_attn_blocks`` of the mixed tables; in the interpreter ``_MIXED_INTERPRETER``'s blocks."""
    if target.interpreter:
        table = {"default": {key: _MIXED_INTERPRETER for key in table["default"]}}
    return _attn_blocks(table, family, D, M, dtype, target)


@dataclass(frozen=True)
class AttentionMixedFwdPlan:
    """``main`` over (query blocks x heads x batch); ``norm`` rescales o in place, elementwise."""

    main: Launch
    norm: Launch
    n_qblocks: int


def attention_mixed_fwd_plan(
    B: int, N: int, M: int, H: int, D: int, dtype: torch.dtype, target: Target
) -> AttentionMixedFwdPlan:
    blocks, block_d = _mixed_blocks(_MIXED_FWD, "mixed_fwd", D, M, dtype, target)
    n_qblocks = cdiv(N, blocks.block_n)
    main = Launch(
        "mixed_fwd",
        (n_qblocks * H * B,),
        (
            ("BLOCK_N", blocks.block_n),
            ("BLOCK_M", blocks.block_m),
            ("BLOCK_D", block_d),
            ("ONE_BLOCK", M <= blocks.block_m),
            ("DOT_PRECISION", dot_precision(dtype)),
        ),
        blocks.num_warps,
        blocks.num_stages,
    )
    block = _MIXED_NORM_BLOCK_INTERPRETER if target.interpreter else _MIXED_NORM_BLOCK
    block = min(block, max(128, next_power_of_2(B * N * H * D)))
    norm = Launch("mixed_norm", (cdiv(B * N * H * D, block),), (("BLOCK", block),), 4, 1)
    return AttentionMixedFwdPlan(main, norm, n_qblocks)


@dataclass(frozen=True)
class AttentionMixedBwdPlan:
    """``stats`` and ``dq`` over (query blocks x heads x batch), then ``dkdv`` over (key blocks
    x ``splits`` x heads x batch), each split walking ``blocks_per_split`` query blocks as in
    ``AttentionBwdPlan``."""

    stats: Launch
    dq: Launch
    dkdv: Launch
    splits: int
    blocks_per_split: int
    n_qblocks: int
    n_stats_blocks: int


def attention_mixed_bwd_plan(
    B: int, N: int, M: int, H: int, D: int, dtype: torch.dtype, target: Target
) -> AttentionMixedBwdPlan:
    blocks, block_d = _mixed_blocks(_MIXED_BWD, "mixed_bwd", D, M, dtype, target)
    block_n, block_m = blocks.block_n, blocks.block_m
    meta = (("BLOCK_N", block_n), ("BLOCK_M", block_m), ("BLOCK_D", block_d), ("DOT_PRECISION", dot_precision(dtype)))
    n_qblocks, n_kblocks = cdiv(N, block_n), cdiv(M, block_m)
    min_per_split = _forced_fields("mixed_bwd").get("min_blocks_per_split", MIN_BLOCKS_PER_SPLIT)
    splits = attention_splits(n_qblocks, n_kblocks, B * H, M, D, target, min_per_split)
    warps, stages = blocks.num_warps, blocks.num_stages
    return AttentionMixedBwdPlan(
        Launch("mixed_bwd_stats", (n_qblocks * H * B,), meta, warps, stages),
        Launch("mixed_bwd_dq", (n_qblocks * H * B,), meta + (("HEADS_P2", next_power_of_2(H)),), warps, stages),
        Launch("mixed_bwd_dkdv", (n_kblocks * splits * H * B,), meta, warps, stages),
        splits,
        cdiv(n_qblocks, splits),
        n_qblocks,
        n_qblocks,
    )


_FAMILIES.update(
    {
        "mixed_fwd": _fields(AttnBlocks),
        "mixed_bwd": _fields(AttnBlocks) | {"min_blocks_per_split"},
    }
)


# ---------------------------------------------------------------------------------------
# Upsample branch (restv2_kernels/upsample/triton.py)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpsampleTile:
    """A [block_p reduced pixels, BLOCK_C channels] register tile of about ``per_thread``
    fp32 values a thread; ``block_p`` (a cap, or exact when forced) and ``num_warps`` derive
    from it unless forced."""

    per_thread: int
    max_block_p: int
    num_stages: int = 3
    block_p: int | None = None
    num_warps: int | None = None


# The forward and the g kernel keep 9 tap tiles live plus a few working tiles (g also 12
# [BLOCK_C] sums): 8 (forward) or 4 (g) values a thread keeps them within the register file.
# The dv gather unrolls its sr*sr sub-pixel loads per tap: 2 a thread (4 spills at sr = 2 on
# sm_89/sm_90).
_UPSAMPLE_FWD = {"default": UpsampleTile(per_thread=8, max_block_p=64)}
_UPSAMPLE_BWD = {"default": UpsampleTile(per_thread=4, max_block_p=64)}
_UPSAMPLE_BWD_DV = {"default": UpsampleTile(per_thread=2, max_block_p=64)}
_INTERPRETER_TILE = 8192  # elements per program in the interpreter: few, large programs
UPSAMPLE_MAX_C = 4096  # one pixel's channel row lives in registers
UPSAMPLE_BWD_PROGRAMS = 2  # reduction programs per SM of the backward's first kernel


def _upsample_tile(family: str, table: dict, C: int, NP: int, target: Target) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps, num_stages) of a kernel over NP reduced pixels of C channels."""
    tile = _apply_forced(family, _table_row(table, target))
    block_c = next_power_of_2(max(C, 1))
    if target.interpreter:
        size, cap = _INTERPRETER_TILE, 256
    else:
        size, cap = tile.per_thread * 256, tile.max_block_p
    block_p = tile.block_p or max(1, min(size // block_c, cap, next_power_of_2(max(NP, 1))))
    num_warps = tile.num_warps or max(1, min(8, block_p * block_c // (32 * tile.per_thread)))
    return block_p, block_c, num_warps, tile.num_stages


def _check_pixels(NP: int) -> None:
    if NP >= 2**31:
        raise ValueError(f"upsample_add: {NP} reduced pixels (B * Hr * Wr) do not fit 32-bit indices; split the batch")


def upsample_fwd_plan(B: int, Hr: int, Wr: int, C: int, sr: int, dtype: torch.dtype, target: Target) -> Launch:
    """``_upsample_fwd_kernel``: one program per BLOCK_P reduced pixels (all sr*sr sub-pixels)."""
    NP = B * Hr * Wr
    _check_pixels(NP)
    block_p, block_c, num_warps, stages = _upsample_tile("upsample_fwd", _UPSAMPLE_FWD, C, NP, target)
    return Launch(
        "upsample_fwd",
        (cdiv(NP, block_p),),
        (("SR", sr), ("BLOCK_P", block_p), ("BLOCK_C", block_c)),
        num_warps,
        stages,
    )


@dataclass(frozen=True)
class UpsampleBwdPlan:
    """``g``: (sr*sr sub-pixels x ``split``) programs, each over ``blocks_per_split`` pixel
    blocks, writing the g scratch and [split, sr*sr, 12, C] fp32 partial sums; ``dv``: one
    program per pixel block of its own tile."""

    g: Launch
    dv: Launch
    split: int
    blocks_per_split: int


def upsample_bwd_plan(B: int, Hr: int, Wr: int, C: int, sr: int, dtype: torch.dtype, target: Target) -> UpsampleBwdPlan:
    NP = B * Hr * Wr
    _check_pixels(NP)
    block_p, block_c, num_warps, stages = _upsample_tile("upsample_bwd", _UPSAMPLE_BWD, C, NP, target)
    n_blocks = cdiv(NP, block_p)
    S = sr * sr
    # SPLIT slots per sub-pixel bound the partial-sum buffer; sr*sr*SPLIT programs, about
    # UPSAMPLE_BWD_PROGRAMS per SM (8 in all in the interpreter)
    programs = 8 if target.interpreter else UPSAMPLE_BWD_PROGRAMS * target.sm_count
    programs = _forced_fields("upsample_bwd").get("programs", programs)
    split = max(1, min(n_blocks, cdiv(programs, S)))
    per_split = cdiv(n_blocks, split)
    split = cdiv(n_blocks, per_split)  # no empty split
    dv_p, _, dv_warps, dv_stages = _upsample_tile("upsample_bwd_dv", _UPSAMPLE_BWD_DV, C, NP, target)
    return UpsampleBwdPlan(
        Launch(
            "upsample_bwd_g", (S * split,), (("SR", sr), ("BLOCK_P", block_p), ("BLOCK_C", block_c)), num_warps, stages
        ),
        Launch(
            "upsample_bwd_dv",
            (cdiv(NP, dv_p),),
            (("SR", sr), ("BLOCK_P", dv_p), ("BLOCK_C", block_c)),
            dv_warps,
            dv_stages,
        ),
        split,
        per_split,
    )


_FAMILIES.update(
    {
        "attn_fwd": _fields(AttnBlocks),
        "attn_bwd": _fields(AttnBlocks) | {"min_blocks_per_split"},
        "upsample_fwd": _fields(UpsampleTile),
        "upsample_bwd": _fields(UpsampleTile) | {"programs"},
        "upsample_bwd_dv": _fields(UpsampleTile),
    }
)


# ---------------------------------------------------------------------------------------
# Residual add + LayerNorm (restv2_kernels/layernorm/triton.py)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddLayerNormTile:
    """A [block_r rows, BLOCK_C = next_pow2(C)] register tile of about ``per_thread`` fp32
    values a thread; ``block_r`` (capped by ``max_block_r``, exact when forced) and
    ``num_warps`` derive from it unless forced."""

    per_thread: int
    max_block_r: int
    num_stages: int = 1
    block_r: int | None = None
    num_warps: int | None = None
    max_warps: int = 8


# Forward: x, branch and the fp32 sum live per row, one pass; 8 values a thread. Backward:
# residual, d_normed, d_residual, xhat and the two [block_r, BLOCK_C] parameter-gradient
# accumulators live across the loop over row blocks; 2 values a thread on up to 16 warps (4 a
# thread spilled 8-16 B at C = 1024 on sm_80/sm_89 when both input dtypes are written), 2
# stages to prefetch the next block's rows.
_ADD_LN_FWD = {"default": AddLayerNormTile(per_thread=8, max_block_r=64)}
_ADD_LN_BWD = {"default": AddLayerNormTile(per_thread=2, max_block_r=64, num_stages=2, max_warps=16)}
_ADD_LN_INTERPRETER_TILE = 8192  # elements per program in the interpreter: few, large programs
ADD_LN_MAX_C = 4096  # one row lives in registers (16 fp32 values a thread at 8 warps)
ADD_LN_BWD_PROGRAMS = 2  # backward programs per SM, each walking a contiguous range of row blocks
_ADD_LN_INTERPRETER_PROGRAMS = 4


def _add_ln_tile(family: str, table: dict, R: int, C: int, target: Target) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps, num_stages) of a kernel over R rows of C channels."""
    if R >= 2**31:
        raise ValueError(f"add_layer_norm: {R} rows do not fit 32-bit row indices; split the batch")
    tile = _apply_forced(family, _table_row(table, target))
    block_c = next_power_of_2(max(C, 1))
    if target.interpreter:
        size, cap = _ADD_LN_INTERPRETER_TILE, 256
    else:
        size, cap = tile.per_thread * 256, tile.max_block_r
    block_r = tile.block_r or max(1, min(size // block_c, cap, next_power_of_2(max(R, 1))))
    num_warps = tile.num_warps or max(1, min(tile.max_warps, block_r * block_c // (32 * tile.per_thread)))
    return block_r, block_c, num_warps, tile.num_stages


def add_layer_norm_fwd_plan(R: int, C: int, dtype: torch.dtype, target: Target) -> Launch:
    """``_add_ln_fwd_kernel``: one program per BLOCK_R rows."""
    block_r, block_c, num_warps, stages = _add_ln_tile("add_ln_fwd", _ADD_LN_FWD, R, C, target)
    return Launch(
        "add_ln_fwd", (cdiv(max(R, 1), block_r),), (("BLOCK_R", block_r), ("BLOCK_C", block_c)), num_warps, stages
    )


@dataclass(frozen=True)
class AddLayerNormBwdPlan:
    """``launch``: ``split`` programs, each over ``blocks_per_split`` consecutive row blocks,
    writing the input gradient and one [2, C] fp32 slot of partial dweight/dbias sums."""

    launch: Launch
    split: int
    blocks_per_split: int


def add_layer_norm_bwd_plan(R: int, C: int, dtype: torch.dtype, target: Target) -> AddLayerNormBwdPlan:
    """``_add_ln_bwd_kernel``: about ``ADD_LN_BWD_PROGRAMS`` programs per SM (4 in the interpreter)."""
    block_r, block_c, num_warps, stages = _add_ln_tile("add_ln_bwd", _ADD_LN_BWD, R, C, target)
    n_blocks = cdiv(max(R, 1), block_r)
    programs = _ADD_LN_INTERPRETER_PROGRAMS if target.interpreter else ADD_LN_BWD_PROGRAMS * target.sm_count
    programs = _forced_fields("add_ln_bwd").get("programs", programs)
    per_split = cdiv(n_blocks, max(1, min(n_blocks, programs)))
    split = cdiv(n_blocks, per_split)  # no empty split
    return AddLayerNormBwdPlan(
        Launch("add_ln_bwd", (split,), (("BLOCK_R", block_r), ("BLOCK_C", block_c)), num_warps, stages),
        split,
        per_split,
    )


_FAMILIES.update(
    {
        "add_ln_fwd": _fields(AddLayerNormTile),
        "add_ln_bwd": _fields(AddLayerNormTile) | {"programs"},
    }
)


# ---------------------------------------------------------------------------------------
# Pixel attention (restv2_kernels/pa/triton.py)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelAttnTile:
    """A [block_p pixels, BLOCK_C channels] register tile of about ``per_thread`` fp32 values a
    thread; ``block_p`` (a cap, or exact when forced) and ``num_warps`` derive from it unless
    forced."""

    per_thread: int
    max_block_p: int
    num_stages: int = 2
    block_p: int | None = None
    num_warps: int | None = None


# The forward and the dx kernel stream the 9 taps into one accumulator (the forward keeps the
# centre tap, dx also a g accumulator). The g kernel keeps the 9 tap tiles live for the dweight
# sums, plus 10 [BLOCK_C] partial sums: 4 values a thread. The forward's and dx's tiles are ones
# with which ptxas used no local memory at any width (64..1024 channels, with and without
# x_bias), on sm_80, sm_89 and sm_90, with Triton 3.6 and 3.9 (``python -m restv2.targets
# --force``): the forward 512 elements at 4 warps (2048 at 8 warps spilled 24 B at C = 96 on
# sm_90 with Triton 3.6, and at 4 warps took 255 registers with 3.9; 1024 at 8 warps spilled 8 B
# on sm_80, 512 at 8 warps on sm_89), dx 512 at 8 warps (1024 at 4 or 8 warps spilled 8 B on sm_80). ptxas
# spills a 64-bit value at 48 registers as readily as at 255: small tiles are no guarantee.
_PA_FWD = {"default": PixelAttnTile(per_thread=4, max_block_p=64, num_warps=4)}
_PA_BWD = {"default": PixelAttnTile(per_thread=4, max_block_p=64)}
_PA_BWD_DX = {"default": PixelAttnTile(per_thread=2, max_block_p=64)}
_PA_INTERPRETER_TILE = 8192  # elements per program in the interpreter: few, large programs
PIXEL_ATTENTION_MAX_C = 4096  # one pixel's channel row lives in registers
PIXEL_ATTENTION_BWD_PROGRAMS = 2  # reduction programs per SM of the backward's first kernel
PIXEL_ATTENTION_INTERPRETER_PROGRAMS = 4


def _pa_tile(family: str, table: dict, C: int, NP: int, target: Target) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps, num_stages) of a kernel over NP pixels of C channels."""
    tile = _apply_forced(family, _table_row(table, target))
    block_c = next_power_of_2(max(C, 1))
    if target.interpreter:
        size, cap = _PA_INTERPRETER_TILE, 256
    else:
        size, cap = tile.per_thread * 256, tile.max_block_p
    block_p = tile.block_p or max(1, min(size // block_c, cap, next_power_of_2(max(NP, 1))))
    num_warps = tile.num_warps or max(1, min(8, block_p * block_c // (32 * tile.per_thread)))
    # pixel indices are int32 in the kernels, the last block's padding included
    if NP >= 2**31 or cdiv(NP, block_p) * block_p >= 2**31:
        raise ValueError(f"pixel_attention: {NP} pixels (B * H * W) do not fit 32-bit pixel indices; split the batch")
    return block_p, block_c, num_warps, tile.num_stages


def pixel_attention_fwd_plan(B: int, H: int, W: int, C: int, dtype: torch.dtype, target: Target) -> Launch:
    """``_pa_fwd_kernel``: one program per BLOCK_P pixels (flattened over (b, y, x)) x all C."""
    NP = B * H * W
    block_p, block_c, num_warps, stages = _pa_tile("pixel_attention_fwd", _PA_FWD, C, NP, target)
    return Launch(
        "pixel_attention_fwd", (cdiv(NP, block_p),), (("BLOCK_P", block_p), ("BLOCK_C", block_c)), num_warps, stages
    )


@dataclass(frozen=True)
class PixelAttentionBwdPlan:
    """``g``: ``programs`` programs, each over ``blocks_per_program`` consecutive pixel blocks,
    writing the fp32 g scratch and its own [10, C] slot of fp32 partial sums; ``dx``: one
    program per pixel block of its own tile."""

    g: Launch
    dx: Launch
    programs: int
    blocks_per_program: int


def pixel_attention_bwd_plan(
    B: int, H: int, W: int, C: int, dtype: torch.dtype, target: Target
) -> PixelAttentionBwdPlan:
    NP = B * H * W
    block_p, block_c, num_warps, stages = _pa_tile("pixel_attention_bwd", _PA_BWD, C, NP, target)
    n_blocks = cdiv(NP, block_p)
    programs = (
        PIXEL_ATTENTION_INTERPRETER_PROGRAMS if target.interpreter else PIXEL_ATTENTION_BWD_PROGRAMS * target.sm_count
    )
    programs = _forced_fields("pixel_attention_bwd").get("programs", programs)
    programs = max(1, min(n_blocks, programs))
    per_program = cdiv(n_blocks, programs)
    programs = cdiv(n_blocks, per_program)  # no empty program
    dx_p, _, dx_warps, dx_stages = _pa_tile("pixel_attention_bwd_dx", _PA_BWD_DX, C, NP, target)
    meta = (("BLOCK_C", block_c),)
    return PixelAttentionBwdPlan(
        Launch("pixel_attention_bwd_g", (programs,), (("BLOCK_P", block_p),) + meta, num_warps, stages),
        Launch("pixel_attention_bwd_dx", (cdiv(NP, dx_p),), (("BLOCK_P", dx_p),) + meta, dx_warps, dx_stages),
        programs,
        per_program,
    )


_FAMILIES.update(
    {
        "pixel_attention_fwd": _fields(PixelAttnTile),
        "pixel_attention_bwd": _fields(PixelAttnTile) | {"programs"},
        "pixel_attention_bwd_dx": _fields(PixelAttnTile),
    }
)


# ---------------------------------------------------------------------------------------
# Linear + GELU (restv2_kernels/ffn/triton.py)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearTile:
    """A [block_m, block_n] output tile of a GEMM, a K loop of block_k, ``group_m`` row blocks
    per group of the 1-D grid's ordering (L2 reuse), warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# Rows: precision class. 16-bit: Triton's matmul-tutorial tiles (tensor cores: HMMA on sm_80+,
# HGMMA on sm_90); starting points, to be tuned by the GPU sweep. fp32 with IEEE dots is FMA:
# a small tile, a short K step and 8 warps keep a thread's accumulators and operand fragments
# in registers (target check: 80 registers, no spills; 16-bit operands on sm_70's FMA dot take
# 128, where BLOCK_K = 32 with 4 warps spills ~370 B). tf32, when PyTorch allows it, takes the
# same tile on the tensor cores.
_LINEAR_GELU_FWD: dict[str, dict[str, LinearTile]] = {
    "default": {
        "16bit": LinearTile(128, 128, 64, 8, 8, 4),
        "fp32": LinearTile(64, 64, 16, 8, 8, 3),
    },
}
# sm_70: tl.dot is FMA for every dtype (Triton >= 3.2): the fp32 tiles, as the attention plans.
_LINEAR_GELU_FWD["sm_70"] = {prec: _LINEAR_GELU_FWD["default"]["fp32"] for prec in ("16bit", "fp32")}
# The MLP backward's GEMM (GELU_GRAD): its epilogue holds the pre tile, the GELU's terms and
# the accumulator at once, and stores d_pre, gelu(pre) and the column sums; at 16 bits a 128 x
# 128 tile on 8 warps spills 400-460 B on sm_80-sm_90 (255 registers), 64 x 128 takes 172-220
# registers and spills nothing (target check). With K = C (96 ... 768) the GEMM is memory-bound:
# the tile's height changes no byte from HBM (dy is read once per column tile).
_LINEAR_GELU_BWD: dict[str, dict[str, LinearTile]] = {
    "default": {"16bit": LinearTile(64, 128, 64, 8, 8, 4), "fp32": _LINEAR_GELU_FWD["default"]["fp32"]},
    "sm_70": _LINEAR_GELU_FWD["sm_70"],
}
# The interpreter pays per program and per op, not per element: few, large tiles.
_LINEAR_GELU_INTERPRETER = LinearTile(256, 256, 128, 8, 4, 1)


def tf32_allowed() -> bool:
    """Whether PyTorch lets cuBLAS run fp32 matmuls in TF32 (what the GEMM launchers pass to
    ``linear_dot_precision``). ``fp32_precision`` reflects every way of setting it (``allow_tf32``,
    ``set_float32_matmul_precision``, the new API). Reading ``allow_tf32`` instead raises a
    RuntimeError (torch 2.13) once the new API has set it ("mix of the legacy and new APIs")."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """PyTorch's fp32 matmuls in TF32 (``enabled``) or IEEE fp32 inside the block, restored after;
    set through ``fp32_precision``, so that no legacy read of the flag is needed, and restored to
    "none" again, which clears PyTorch's mixed-API state."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def linear_dot_precision(dtype: torch.dtype, allow_tf32: bool, target: Target) -> str:
    """fp32: IEEE unless PyTorch allows cuBLAS TF32 (``allow_tf32``: the launcher reads
    ``torch.backends.cuda.matmul``) on a GPU with TF32 tensor cores (not sm_70, not the
    interpreter); 16-bit inputs use the tensor cores whatever this says."""
    if dtype == torch.float32:
        return "tf32" if allow_tf32 and target.tensor_cores != "fma" and not target.interpreter else "ieee"
    return "tf32"


def linear_gelu_bwd_plan(
    M: int, N: int, K: int, dtype: torch.dtype, target: Target, allow_tf32: bool = False
) -> Launch:
    """The MLP backward's ``d_pre = (dy @ fc2.weight) * gelu'(pre)``: the same GEMM kernel (and
    tiles) in its GELU_GRAD mode, over [M, K=C] @ [K, N=4C]."""
    return _linear_plan("linear_gelu_bwd", M, N, K, dtype, target, allow_tf32)


def linear_gelu_fwd_plan(
    M: int, N: int, K: int, dtype: torch.dtype, target: Target, allow_tf32: bool = False
) -> Launch:
    """``_linear_gelu_fwd_kernel``: see ``_linear_plan``."""
    return _linear_plan("linear_gelu_fwd", M, N, K, dtype, target, allow_tf32)


def _linear_plan(family: str, M: int, N: int, K: int, dtype: torch.dtype, target: Target, allow_tf32: bool) -> Launch:
    """``_linear_gelu_fwd_kernel`` for ``[M, K] @ [N, K]^T``: one program per [BLOCK_M, BLOCK_N]
    output tile, all cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N) of them on x in grouped order.

    The table's tile is clipped to the problem (no block over the next power of 2 of its
    dimension, none under 16: ``tl.dot``'s minimum); BLOCK_K is halved (down to 16) until it
    divides K, so that the model's K (64 ... 1024, 96 * 2**i) runs an unmasked K loop
    (EVEN_K; a K no power of 2 >= 16 divides keeps the table's step, masked); the stages are
    cut to what fits the target's shared memory per block (assuming one buffer per stage;
    Triton 3.9 allocates num_stages - 1, so there is headroom).
    """
    if target.interpreter:
        tile = _apply_forced(family, _LINEAR_GELU_INTERPRETER)
    else:
        table = _LINEAR_GELU_BWD if family == "linear_gelu_bwd" else _LINEAR_GELU_FWD
        tile = _apply_forced(family, _table_row(table, target)[_precision(dtype)])
    block_m = min(tile.block_m, max(16, next_power_of_2(M)))
    block_n = min(tile.block_n, max(16, next_power_of_2(N)))
    block_k = min(tile.block_k, max(16, next_power_of_2(K)))
    divisor = block_k
    while divisor > 16 and K % divisor:
        divisor //= 2
    block_k = divisor if K % divisor == 0 else block_k  # K = 24, 1000: the table's step, masked
    stage_bytes = (block_m + block_n) * block_k * dtype.itemsize
    num_stages = max(1, min(tile.num_stages, target.smem_per_block // stage_bytes))
    num_warps = max(1, min(tile.num_warps, block_m * block_n // 256))  # 16x16: 1 warp, 64x64: up to 8
    meta = (
        ("BLOCK_M", block_m),
        ("BLOCK_N", block_n),
        ("BLOCK_K", block_k),
        ("GROUP_M", tile.group_m),
        ("EVEN_K", K % block_k == 0),
        ("DOT_PRECISION", linear_dot_precision(dtype, allow_tf32, target)),
    )
    if family == "linear_gelu_bwd":
        meta += (("GELU_GRAD", True),)
    return Launch(family, (cdiv(M, block_m) * cdiv(N, block_n),), meta, num_warps, num_stages)


_FAMILIES.update({"linear_gelu_fwd": _fields(LinearTile), "linear_gelu_bwd": _fields(LinearTile)})


# ---------------------------------------------------------------------------------------
# Bias + ReLU (restv2_kernels/bn_relu/triton.py)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ElementwiseTile:
    """``block`` elements a program (8 a thread at 4 warps: 16-byte 16-bit accesses)."""

    block: int
    num_warps: int
    num_stages: int = 1


_BIAS_RELU = {"default": ElementwiseTile(block=1024, num_warps=4)}
_BIAS_RELU_INTERPRETER_BLOCK = 1 << 16  # few, large programs in the interpreter


def bias_relu_plan(n: int, dtype: torch.dtype, target: Target) -> Launch:
    """``_bias_relu_kernel``: one program per ``block`` consecutive elements of n."""
    tile = _apply_forced("bias_relu", _table_row(_BIAS_RELU, target))
    block = tile.block
    if target.interpreter and "block" not in _forced_fields("bias_relu"):
        block = min(_BIAS_RELU_INTERPRETER_BLOCK, next_power_of_2(max(n, 1)))
    return Launch("bias_relu", (cdiv(n, block),), (("BLOCK", block),), tile.num_warps, tile.num_stages)


_FAMILIES.update({"bias_relu": _fields(ElementwiseTile)})


# ---------------------------------------------------------------------------------------
# BatchNorm (batch statistics) + ReLU (restv2_kernels/bn_relu/triton.py)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelTile:
    """A [block_p pixels, block_c channels] tile of a channels-last map, about ``per_thread``
    fp32 values a thread at ``num_warps``; ``block_c`` is the channels rounded up to a power of
    two, at most ``max_block_c`` (wider maps take more channel blocks: the grid's second axis).
    ``block_p`` and ``block_c`` are exact when forced."""

    per_thread: int
    max_block_c: int
    num_warps: int
    num_stages: int = 1
    block_p: int | None = None
    block_c: int | None = None


# The normalisation and the reductions (the statistics, the gradient sums): 8 values a thread
# at 4 warps, an [8, 128] or [16, 64] tile; a channel row of 64 16-bit values is 128 contiguous
# bytes. dx, which holds the most per element (x, dout, x_hat, the mask), 4 a thread at 8 warps:
# at 8 a thread at 4 warps ptxas spilled 8 B at 48 registers in 16 bits on sm_80 and sm_89 (C =
# 96, Triton 3.9). Starting points, untimed.
_BN_FWD = {"default": ChannelTile(per_thread=8, max_block_c=128, num_warps=4)}
_BN_BWD_DX = {"default": ChannelTile(per_thread=4, max_block_c=128, num_warps=8)}
_BN_REDUCE = {"default": ChannelTile(per_thread=8, max_block_c=128, num_warps=4)}
_BN_INTERPRETER_TILE = 8192  # elements per program in the interpreter: few, large programs
BN_REDUCE_PROGRAMS = 2  # reduction programs per SM (all channel blocks together)
_BN_INTERPRETER_PROGRAMS = 4


def _bn_tile(family: str, table: dict, P: int, C: int, target: Target) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps, num_stages) of a kernel over P pixels of C channels."""
    tile = _apply_forced(family, _table_row(table, target))
    block_c = tile.block_c or min(next_power_of_2(max(C, 1)), tile.max_block_c)
    size = _BN_INTERPRETER_TILE if target.interpreter else tile.per_thread * 32 * tile.num_warps
    block_p = tile.block_p or max(1, min(size // block_c, next_power_of_2(max(P, 1))))
    if P >= 2**31 or cdiv(P, block_p) * block_p >= 2**31:
        raise ValueError(f"batch_norm_relu: {P} pixels (B * H * W) do not fit 32-bit pixel indices; split the batch")
    return block_p, block_c, tile.num_warps, tile.num_stages


@dataclass(frozen=True)
class ChannelReducePlan:
    """A reduction over the pixels: ``programs`` programs per channel block, each over
    ``blocks_per_program`` consecutive pixel blocks, writing its own slot of fp32 partials."""

    launch: Launch
    programs: int
    blocks_per_program: int


def _bn_reduce_plan(family: str, P: int, C: int, target: Target) -> ChannelReducePlan:
    block_p, block_c, num_warps, stages = _bn_tile(family, _BN_REDUCE, P, C, target)
    n_blocks = cdiv(max(P, 1), block_p)
    c_blocks = cdiv(max(C, 1), block_c)
    if target.interpreter:
        programs = _BN_INTERPRETER_PROGRAMS
    else:
        programs = max(1, BN_REDUCE_PROGRAMS * target.sm_count // c_blocks)
    programs = max(1, min(n_blocks, _forced_fields(family).get("programs", programs)))
    per_program = cdiv(n_blocks, programs)
    programs = cdiv(n_blocks, per_program)  # no empty program
    meta = (("BLOCK_P", block_p), ("BLOCK_C", block_c))
    return ChannelReducePlan(Launch(family, (programs, c_blocks), meta, num_warps, stages), programs, per_program)


def bn_stats_plan(P: int, C: int, dtype: torch.dtype, target: Target) -> ChannelReducePlan:
    """``_bn_stats_kernel``: each program's count, mean and centred sum of squares per channel."""
    return _bn_reduce_plan("bn_stats", P, C, target)


def bn_relu_fwd_plan(P: int, C: int, dtype: torch.dtype, target: Target) -> Launch:
    """``_bn_relu_fwd_kernel``: one program per [BLOCK_P, BLOCK_C] tile."""
    block_p, block_c, num_warps, stages = _bn_tile("bn_relu_fwd", _BN_FWD, P, C, target)
    meta = (("BLOCK_P", block_p), ("BLOCK_C", block_c))
    return Launch("bn_relu_fwd", (cdiv(max(P, 1), block_p), cdiv(max(C, 1), block_c)), meta, num_warps, stages)


@dataclass(frozen=True)
class BatchNormReluBwdPlan:
    """``sums``: the reduction of the ReLU-masked gradient and its product with x-hat; ``dx``:
    one program per tile."""

    sums: ChannelReducePlan
    dx: Launch


def bn_relu_bwd_plan(P: int, C: int, dtype: torch.dtype, target: Target) -> BatchNormReluBwdPlan:
    block_p, block_c, num_warps, stages = _bn_tile("bn_relu_bwd_dx", _BN_BWD_DX, P, C, target)
    meta = (("BLOCK_P", block_p), ("BLOCK_C", block_c))
    grid = (cdiv(max(P, 1), block_p), cdiv(max(C, 1), block_c))
    return BatchNormReluBwdPlan(
        _bn_reduce_plan("bn_relu_bwd_sums", P, C, target), Launch("bn_relu_bwd_dx", grid, meta, num_warps, stages)
    )


_FAMILIES.update(
    {
        "bn_stats": _fields(ChannelTile) | {"programs"},
        "bn_relu_fwd": _fields(ChannelTile),
        "bn_relu_bwd_sums": _fields(ChannelTile) | {"programs"},
        "bn_relu_bwd_dx": _fields(ChannelTile),
    }
)
