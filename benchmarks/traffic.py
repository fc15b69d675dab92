"""Traffic model: the bytes every op of one forward (or forward + backward) reads and writes,
its FLOPs, and the fastest a GPU could run it, counted on the CPU.

    python benchmarks/traffic.py                                   # restv2_tiny, b256, bf16, 224²
    python benchmarks/traffic.py --model restv2_large --train      # forward + backward (drop path 0.5)
    python benchmarks/traffic.py --backend reference --top 30 --json traffic.json
    python benchmarks/traffic.py --top 0                           # totals and ratios only (CI)
    python benchmarks/traffic.py --features --train --batch 2 --resolution 800x1333   # detection

What is counted: a ``TorchDispatchMode`` sees every aten op, and each of this package's custom
ops as ONE op, and counts

- bytes read: the footprint of each distinct tensor argument (expanded dims count once, a
  strided view counts only its elements); bytes written: each output (an in-place op's
  mutated argument is both read and written; fills and ``zeros`` write only);
- nothing for views and allocations (``view``, ``permute``, ``_unsafe_view``, ``empty`` ...);
  a layout copy (``clone``, ``contiguous``, ``_to_copy``) counts like any other op;
- a convolution's bias as PyTorch runs it on CUDA: cuDNN convolutions take no bias, so a
  conv with one costs a pass of its own adding it (``conv bias add (cuDNN)``: the output read
  and written), unless it is a depthwise conv on an NCHW map (PyTorch's own kernel adds it);
  in the backward, its gradient is a sum over grad_output (``conv bias grad (sum)``: one read);
- an out-of-place ``addmm`` whose added matrix is not a bias cuBLASLt takes (a [N] vector on
  contiguous operands): PyTorch copies it into the output first and the GEMM reads it back as
  C (``addmm C copy (CUDA)``: the output written and read once more); an in-place ``addmm_``
  reads and writes its matrix once, as counted;
- a custom op of this package as its launcher runs it, for the launch plans of the GPU (this
  machine's, else an H100's, sm_90): the launcher runs on the op's meta arguments with its
  launches recorded (``plans.recording``), not made. Each launch moves each of its distinct
  tensor arguments once, read where it views one of the op's inputs or an earlier launch
  wrote it, else written (a kernel that reads and writes one tensor counts it once); the torch
  ops around the launches (a reduction's second stage, small copies) count as above. So the
  scratch between two kernels (an fp32 gradient map written by one, read by the next) and the
  inputs both kernels read are counted, not only the op's inputs and outputs;
- FLOPs of matmuls and convolutions (``torch.utils.flop_counter``'s formulas) and of the fused
  ops (their matmuls); elementwise FLOPs are ignored.

Every op (every launch of a custom op) is assumed to move its bytes from and to HBM exactly
once (no cache reuse between ops, none lost inside one: a conv's halo and a GEMM's tiles come
through the cache): what a memory-bound GPU pays, and what fusion saves.

Peak memory: the same pass counts the bytes alive, per storage (views share it), from the op
that creates it until its last tensor is gone, autograd's saved tensors included; parameters,
buffers and the input are alive from the start, as ``torch.cuda.max_memory_allocated`` counts
them after a reset. The peak, the op after which it is reached and what is alive then, by
the op that made it, are printed. A custom op's tensors (its scratch and its outputs) are alive
while it runs. Not counted: the caching allocator's rounding (512 bytes) and what the libraries
allocate inside an op (cuBLAS and cuDNN workspaces).

The model runs on meta tensors (nothing is allocated, nothing computed): a batch of 256 at 224²
counts in seconds. ``--dtype bf16`` casts the
model and its input to bf16 (deployment precision); autocast, which keeps fp32 weights and an
fp32 residual stream, moves more bytes, so the floor below remains a lower bound for it.
``--train`` builds the model with the stochastic depth it trains with (``restv2.DROP_PATH``,
restv2_tiny's 0.1; ``--drop-path`` sets another rate): the reference's ``DropPath`` scales each
branch in passes of its own, forward and backward; the kernel path inside the adds.

Floor: per op, ``max(bytes / copy bandwidth, FLOPs / matmul rate)``, summed. Both rates are
measured when a CUDA GPU is present, else taken from ``--copy-gbps`` / ``--tflops`` (defaults:
an H100 SXM's measured copy bandwidth and dense bf16 peak, stated as assumed).
``throughput.py`` prints measured time against this floor.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._library import custom_ops
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.module_tracker import ModuleTracker

_HERE = pathlib.Path(__file__).resolve().parent
for _p in (str(_HERE.parent), str(_HERE)):  # the tree's restv2 and common, installed or not
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402

from restv2 import DROP_PATH, MODELS  # noqa: E402
from restv2_kernels import plans  # noqa: E402

aten = torch.ops.aten
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Assumed rates when no GPU is present: an H100 SXM (copy: read + write bytes of a 1 GiB
# device-to-device copy as benchmarks/common.py measures it; matmul: dense bf16 peak).
ASSUMED_COPY_GBPS = 3000.0
ASSUMED_TFLOPS = 989.0

# No data moves: views, aliases and allocations.
_FREE = {
    aten._unsafe_view,
    aten.detach,
    aten.alias,
    aten.lift_fresh,
    aten._reshape_alias,
    aten.empty,
    aten.empty_strided,
    aten.empty_like,
    aten.new_empty,
    aten.new_empty_strided,
    aten.set_,
    aten.resize_,
}
# Write their output without reading an input's values.
_WRITE_ONLY = {
    aten.zero_,
    aten.fill_,
    aten.zeros,
    aten.ones,
    aten.full,
    aten.zeros_like,
    aten.ones_like,
    aten.full_like,
    aten.new_zeros,
    aten.new_ones,
    aten.new_full,
    aten.scalar_tensor,
    aten.randint,
    aten.bernoulli_,
    aten.uniform_,
    aten.normal_,
}


def _attention_flops(q, k, *_, **__) -> int:
    B, N, H, D = q.shape
    return 4 * B * N * k.shape[1] * H * D  # q k^T and P v


def _attention_bwd_flops(do, q, k, *_, **__) -> int:
    B, N, H, D = q.shape
    return 10 * B * N * k.shape[1] * H * D  # S recomputed, dP, dV, dK, dQ


def _mixed_flops(q, k, *_, **__) -> int:
    B, N, H, D = q.shape
    return 2 * B * N * k.shape[1] * H * (2 * D + H)  # q k^T, P v and the heads' mix


def _mixed_bwd_flops(do, q, k, *_, **__) -> int:
    B, N, H, D = q.shape
    return 2 * B * N * k.shape[1] * H * (5 * D + 3 * H)  # S, dA, dV, dK, dQ; the mix, its transpose, dW


def _linear_flops(x, weight, *_, **__) -> int:
    return 2 * x.numel() // x.shape[-1] * weight.shape[0] * weight.shape[1]


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def conv_bias_passes(func, args: tuple, out) -> list[tuple[str, int, int]]:
    """The passes a CUDA convolution's bias costs beyond the conv itself, as PyTorch runs it:
    ``(op, read, written)`` each. cuDNN convolutions take no bias, so PyTorch adds it after the
    conv in a pass of its own over the output (``aten/src/ATen/native/Convolution.cpp``); only
    a depthwise conv on an NCHW map runs PyTorch's own kernel, which adds it in the conv
    (channels-last depthwise convs go to cuDNN). In the backward, the bias gradient is a sum
    over grad_output, a read of its own, whatever the conv."""
    packet = func._overloadpacket
    if packet is aten.convolution:
        x, weight, bias = args[:3]
        groups = args[8]
        depthwise = groups > 1 and groups == x.shape[1]
        if bias is None or depthwise and not (_channels_last(x) or _channels_last(weight)):
            return []
        y = footprint(out)
        return [("conv bias add (cuDNN)", y + footprint(bias), y)]  # in place: read and written
    if packet is aten.convolution_backward and args[10][2]:
        return [("conv bias grad (sum)", footprint(args[0]), 0)]  # grad_bias is counted with the op
    return []


def addmm_copy_passes(func, args: tuple, kwargs: dict, out) -> list[tuple[str, int, int]]:
    """The pass an out-of-place ``addmm(self, mat1, mat2)`` costs on CUDA beyond its operands and
    its output: ``(op, read, written)``. Only a bias on cuBLASLt's path is added in the GEMM's
    epilogue (``isInputCompliesAddmmCudaLt`` in ``aten/src/ATen/native/cuda/Blas.cpp``: beta 1, a
    contiguous [N] self, a contiguous output, both matrices larger than one row and column).
    Any other self (a [M, N] matrix, a broadcast one) is copied into the output, which the GEMM
    then reads as C with beta: the output is written once more and read once. Zero beta reads
    no self, and ``addmm_`` (the output is self) copies nothing."""
    if func._overloadpacket is not aten.addmm:
        return []
    self, mat1, mat2 = args[:3]
    beta = kwargs.get("beta", 1)  # keyword-only in aten's schema
    if beta == 0:
        return []
    lt = (
        beta == 1
        and self.dim() == 1
        and self.is_contiguous()
        and out.is_contiguous()
        and min(*mat1.shape, *mat2.shape) > 1
    )
    if lt:
        return []
    y = footprint(out)
    return [("addmm C copy (CUDA)", y, y)]


# In-place ops whose FLOPs are their out-of-place twin's (torch.utils.flop_counter has only those)
_FLOPS_AS = {aten.addmm_: aten.addmm}

# FLOPs of this package's custom ops (their matmuls), by op name; other custom ops count 0.
CUSTOM_FLOPS: dict[str, Callable[..., int]] = {
    "restv2::emsa_attention_fwd": _attention_flops,
    "restv2::emsa_attention_bwd": _attention_bwd_flops,
    "restv2::emsa_attention_kv_bwd": lambda do, q, kv, *_, **__: _attention_bwd_flops(do, q, kv[:, :, 0]),
    "restv2::emsa_attention_mixed_fwd": _mixed_flops,
    "restv2::emsa_attention_mixed_bwd": _mixed_bwd_flops,
    "restv2::linear_gelu_fwd": _linear_flops,
    "restv2::mlp_gelu_grad": lambda dy, weight2, *_, **__: _linear_flops(dy, weight2.t()),
}


def footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor argument addresses (broadcast dims once)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


@dataclass
class OpCount:
    """One op call: what it moved and computed, and where (innermost module, forward or backward)."""

    op: str
    module: str  # fully qualified name of the innermost module, "" at top level
    module_type: str  # its class name
    phase: str  # "fwd" or "bwd"
    read: int
    written: int
    flops: int

    @property
    def bytes(self) -> int:
        return self.read + self.written


def _op_name(func) -> str:
    packet = func._overloadpacket
    return f"{packet._qualified_op_name}" if hasattr(packet, "_qualified_op_name") else str(packet)


class LiveBytes:
    """The bytes of the storages alive now, and at their peak: a storage counts from the op that
    creates it (or from ``hold``) until the last tensor viewing it is gone (autograd's saved
    tensors included), at its full size, once however many views share it."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[StorageWeakRef, int, str]] = {}  # storage -> (ref, bytes, creator)
        self.now = 0
        self.peak = 0
        self.peak_after = ""  # the op after which the peak was reached
        self.peak_by: dict[str, int] = {}  # what was alive then: bytes by creator

    def hold(self, tensors: Iterable[torch.Tensor], creator: str) -> None:
        """Adds the storages of ``tensors`` not yet counted, as made by ``creator``."""
        for t in tensors:
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref.cdata not in self.live:
                self.live[ref.cdata] = (ref, storage.nbytes(), creator)
                self.now += storage.nbytes()

    def transient(self, nbytes: int, creator: str, op: str) -> None:
        """Records a new peak if ``nbytes`` more than what is alive now (an op's tensors, alive
        only while it runs) reach it, during ``op``."""
        if self.now + nbytes > self.peak:
            self.peak, self.peak_after = self.now + nbytes, op
            by: dict[str, int] = collections.defaultdict(int)
            for _, size, made_by in self.live.values():
                by[made_by] += size
            by[creator] += nbytes
            self.peak_by = dict(by)

    def update(self, op: str) -> None:
        """Drops the storages freed since the last update; records a new peak, reached after ``op``."""
        for key in [k for k, (ref, _, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        if self.now > self.peak:
            self.peak, self.peak_after = self.now, op
            by: dict[str, int] = collections.defaultdict(int)
            for _, nbytes, creator in self.live.values():
                by[creator] += nbytes
            self.peak_by = dict(by)


def kernel_target() -> plans.Target:
    """The GPU the launch plans are counted for: this machine's, else the assumed H100 (sm_90)."""
    if torch.cuda.is_available():
        return plans.device_target(torch.device("cuda"))
    return plans.TARGETS["sm_90"]


def op_bytes(func, args: tuple, kwargs: dict, out) -> tuple[int, int]:
    """``(read, written)`` of one dispatched op: nothing for views and allocations; each distinct
    tensor argument's footprint read (not for ops that only write); each output written."""
    packet = func._overloadpacket
    if func.is_view or packet in _FREE:
        return 0, 0
    read = 0
    if packet not in _WRITE_ONLY:
        seen: set[int] = set()
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                read += footprint(t)
    written = sum(footprint(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
    return read, written


def real_implementation(func) -> Callable | None:
    """The Python function behind one of this package's custom ops (its launcher), None for any
    other op or where torch.library does not keep it (``CustomOpDef._init_fn``, private)."""
    name = _op_name(func)
    if not name.startswith("restv2::"):
        return None
    opdef = getattr(custom_ops, "OPDEFS", {}).get(name)
    return getattr(opdef, "_init_fn", None)


class _InsideOp(TorchDispatchMode):
    """The aten ops a custom op's launcher runs around its kernels (allocations, the torch sums
    of two-stage reductions, small copies): their bytes, and the most bytes its tensors hold."""

    def __init__(self) -> None:
        super().__init__()
        self.read = self.written = 0
        self.memory = LiveBytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.memory.hold([t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)], "inside")
        self.memory.update("")
        read, written = op_bytes(func, args, kwargs, out)
        self.read += read
        self.written += written
        return out


def launch_bytes(launches: Iterable[plans.Recorded], inputs: Iterable[torch.Tensor]) -> tuple[int, int]:
    """``(read, written)`` of recorded kernel launches: each launch moves each of its distinct
    tensor arguments once (a view: its footprint). An argument is read if it views one of the
    op's inputs or an earlier launch wrote it, else written: a kernel that reads and writes the
    same tensor counts it once. Tiles a kernel loads more than once (a conv's halo, the blocks
    of a GEMM) count once, as through a perfect cache."""
    outside = {StorageWeakRef(t.untyped_storage()).cdata for t in inputs}
    made: set[tuple] = set()
    read = written = 0
    for rec in launches:
        seen: set[tuple] = set()
        for a in rec.args:
            if not isinstance(a, torch.Tensor):
                continue
            key = (StorageWeakRef(a.untyped_storage()).cdata, a.storage_offset(), tuple(a.shape), a.stride())
            if key in seen:
                continue
            seen.add(key)
            if key[0] in outside or key in made:
                read += footprint(a)
            else:
                made.add(key)
                written += footprint(a)
    return read, written


def count_inside(func, args: tuple, kwargs: dict, target: plans.Target) -> tuple[int, int, int] | None:
    """``(read, written, most bytes held)`` of one call of this package's custom op ``func`` as
    its launcher runs it for ``target``: on the meta arguments, with the launches recorded
    (``plans.recording``), not made. None for any other op."""
    fn = real_implementation(func)
    if fn is None:
        return None
    inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    inside = _InsideOp()
    with plans.using_target(target), plans.recording() as launches, inside:
        fn(*args, **kwargs)
    read, written = launch_bytes(launches, inputs)
    return inside.read + read, inside.written + written, inside.memory.peak


class TrafficMode(TorchDispatchMode):
    """Counts every dispatched op (see the module docstring) into ``self.ops``, and the bytes
    alive at the peak into ``self.memory``."""

    def __init__(self, module_types: dict[str, str] | None = None, target: plans.Target | None = None):
        super().__init__()
        self.ops: list[OpCount] = []
        self.tracker = ModuleTracker()
        self.module_types = module_types or {}
        self.memory = LiveBytes()
        self.target = target or kernel_target()

    def __enter__(self):
        self.tracker.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.tracker.__exit__(*exc)

    def _where(self) -> str:
        """The innermost module's name as ``named_modules`` gives it (the tracker prefixes the
        root's class name)."""
        parents = [p for p in self.tracker.parents if p != "Global"]
        if not parents:
            return ""
        inner = max(parents, key=lambda p: (p.count("."), len(p)))
        return inner.partition(".")[2]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        name = _op_name(func)
        where = self._where()
        phase = "bwd" if self.tracker.is_bw else "fwd"
        creator = f"{phase} {name} @ {self.module_types.get(where) or '(top level)'}"
        inside = count_inside(func, args, kwargs, self.target)
        if inside is not None:  # its kernels' and torch's bytes, its scratch alive while it runs
            read, written, held = inside
            self.memory.update(name)
            self.memory.transient(held, f"{creator}, while it runs", name)
        else:
            read, written = op_bytes(func, args, kwargs, out)
        self.memory.hold(outputs, creator)
        self.memory.update(name)
        if func.is_view or packet in _FREE:
            return out
        counted = _FLOPS_AS.get(packet, packet)
        if counted in flop_registry:
            flops = int(flop_registry[counted](*args, **kwargs, out_val=out))
        elif name in CUSTOM_FLOPS:
            flops = int(CUSTOM_FLOPS[name](*args, **kwargs))
        else:
            flops = 0
        module_type = self.module_types.get(where, "")
        self.ops.append(OpCount(name, where, module_type, phase, read, written, flops))
        for extra, extra_read, extra_written in conv_bias_passes(func, args, out) + addmm_copy_passes(
            func, args, kwargs, out
        ):
            self.ops.append(OpCount(extra, where, module_type, phase, extra_read, extra_written, 0))
        return out


# ---------------------------------------------------------------------------------------
# Counting a model
# ---------------------------------------------------------------------------------------


@dataclass
class Count:
    """One counted run: its configuration, every op, and the totals."""

    model: str
    backend: str
    batch: int
    resolution: tuple[int, int]
    dtype: str
    train: bool
    ops: list[OpCount] = field(repr=False)
    features: bool = False  # the four stage maps (forward_intermediates), not the classifier
    drop_path: float = 0.0  # the stochastic-depth rate the model was built with
    held_bytes: int = 0  # parameters, buffers and the input, alive before the first op
    peak_bytes: int = 0  # the most bytes alive at once, held_bytes included
    peak_after: str = ""  # the op after which they were
    peak_by: dict[str, int] = field(default_factory=dict, repr=False)  # alive at the peak, by creator
    target: str = ""  # the GPU whose launch plans the custom ops were counted with

    @property
    def bytes(self) -> int:
        return sum(o.bytes for o in self.ops)

    @property
    def flops(self) -> int:
        return sum(o.flops for o in self.ops)

    def floor_ms(self, copy_gbps: float, tflops: float) -> float:
        """The roofline floor: per op the larger of its memory and matmul time, summed."""
        return sum(common.roofline_floor_ms(o.bytes, o.flops, copy_gbps, tflops) for o in self.ops)

    def by(self, key: Callable[[OpCount], str]) -> list[tuple[str, int, int, int]]:
        """(group, calls, bytes, flops) per group, largest bytes first."""
        groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
        for o in self.ops:
            g = groups[key(o)]
            g[0] += 1
            g[1] += o.bytes
            g[2] += o.flops
        return sorted(((k, *v) for k, v in groups.items()), key=lambda r: -r[2])


def count_model(
    model_name: str,
    backend: str = "reference",
    batch: int = 256,
    resolution: tuple[int, int] = (224, 224),
    dtype: str = "bf16",
    train: bool = False,
    model_kwargs: dict | None = None,
    model: nn.Module | None = None,
    features: bool = False,
    target: plans.Target | None = None,
    drop_path: float = 0.0,
) -> Count:
    """Counts one forward (``train``: forward, cross-entropy, backward) of a zoo model on meta
    tensors, with ``backend`` ("reference" or "triton") in ``dtype``. ``features``: the dense
    backbone instead, as ``throughput.py --features`` times it: the four stage maps
    (``forward_intermediates``, no classifier) and, with ``train``, a backward from the sum of
    their fp32 means. ``model`` replaces the zoo model (any module taking an image batch; with
    ``features``, one with ``forward_intermediates``), for tests. ``target``: the GPU whose launch
    plans the custom ops are counted with (``kernel_target()`` by default). ``drop_path``: the zoo
    model's stochastic-depth rate (active with ``train``: each block's mask costs no bytes, its
    multiplies do)."""
    dt = DTYPES[dtype]
    if model is None:
        with torch.device("meta"):
            kwargs = {"num_classes": 0} if features else {}
            kwargs["drop_path_rate"] = drop_path
            model = MODELS[model_name](backend=backend, **kwargs, **(model_kwargs or {}))
    model = model.to(device="meta", dtype=dt).train(train)
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    x = torch.empty(batch, 3, *resolution, device="meta", dtype=dt)
    mode = TrafficMode(types, target)
    mode.memory.hold([*model.parameters(), *model.buffers(), x], "held: parameters, buffers, input")
    mode.memory.update("")
    with mode, torch.set_grad_enabled(train):
        if features:
            maps = model.forward_intermediates(x, intermediates_only=True)
            if train:
                loss = sum(m.float().mean() for m in maps)
                del maps  # as throughput.py's step: the loss holds what the backward needs
                loss.backward()
        elif train:
            target = torch.empty(batch, dtype=torch.long, device="meta")
            F.cross_entropy(model(x), target).backward()
        else:
            model(x)
    m = mode.memory
    return Count(
        model_name,
        backend,
        batch,
        tuple(resolution),
        dtype,
        train,
        mode.ops,
        features=features,
        drop_path=drop_path,
        held_bytes=m.peak_by["held: parameters, buffers, input"],
        peak_bytes=m.peak,
        peak_after=m.peak_after,
        peak_by=m.peak_by,
        target=mode.target.name,
    )


def compare(counts: Iterable[Count], key: Callable[[Count], int] = lambda c: c.bytes) -> dict[str, float]:
    """Ratios of every count to the reference count among them: of the bytes moved, or ``key``."""
    counts = list(counts)
    ref = next((c for c in counts if c.backend == "reference"), None)
    return {c.backend: key(c) / key(ref) for c in counts} if ref else {}


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / 1e9:8.3f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def format_count(c: Count, rates: dict, top: int = 15) -> str:
    mode = "forward + backward" if c.train else "forward"
    mode += f" (drop path {c.drop_path:g})" if c.train and c.drop_path else ""
    what = "stage maps" if c.features else "classifier"
    lines = [
        f"{c.model} {c.backend}: {what}, {mode}, batch {c.batch}, {c.resolution[0]}x{c.resolution[1]}, {c.dtype}",
        f"  {len(c.ops)} ops, {_gb(c.bytes).strip()} GB moved, {c.flops / 1e12:.3f} TFLOP, floor "
        f"{c.floor_ms(rates['copy_gbps'], rates['matmul_tflops']):.2f} ms",
        f"  peak alive {_mib(c.peak_bytes)} ({_mib(c.held_bytes)} held: parameters, buffers, input), "
        f"after {c.peak_after or 'no op'}",
    ]
    groups = (("by op", lambda o: o.op), ("by module type", lambda o: o.module_type or "(top level)"))
    for title, key in groups if top > 0 else ():
        lines.append(f"  {title}:{'':<34} calls        GB     TFLOP")
        for name, calls, nbytes, flops in c.by(key)[:top]:
            lines.append(f"    {name:<44} {calls:5d} {_gb(nbytes)} {flops / 1e12:9.4f}")
    if top > 0:
        lines.append("  alive at the peak, by the op (and module type) that made it:")
        for creator, nbytes in sorted(c.peak_by.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {creator:<60} {nbytes / 2**20:9.1f} MiB")
    return "\n".join(lines)


def rates_for(args: argparse.Namespace) -> dict:
    """Measured on a CUDA GPU (unless given), else the given or assumed rates."""
    if torch.cuda.is_available() and args.copy_gbps is None and args.tflops is None:
        return {**common.roofline_rates(torch.device("cuda"), DTYPES[args.dtype]), "source": "measured"}
    return {
        "copy_gbps": args.copy_gbps or ASSUMED_COPY_GBPS,
        "matmul_tflops": args.tflops or ASSUMED_TFLOPS,
        "source": "given" if (args.copy_gbps or args.tflops) else "assumed (H100 SXM)",
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="restv2_tiny", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--resolution", default="224x224", help="HxW or one side (default 224x224)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--backend", default="both", choices=("both", "reference", "triton"))
    p.add_argument("--train", action="store_true", help="forward + cross-entropy + backward")
    p.add_argument(
        "--drop-path",
        type=float,
        help="stochastic-depth rate of --train (default: the model's training recipe's, restv2.DROP_PATH)",
    )
    p.add_argument(
        "--features",
        action="store_true",
        help="the dense backbone: the four stage maps, no classifier (with --train: backward from their means)",
    )
    p.add_argument(
        "--copy-gbps", type=float, help=f"copy bandwidth, GB/s (default: measured, else {ASSUMED_COPY_GBPS})"
    )
    p.add_argument("--tflops", type=float, help=f"matmul rate, TFLOP/s (default: measured, else {ASSUMED_TFLOPS})")
    p.add_argument("--top", type=int, default=15, help="rows per table (0: totals only)")
    p.add_argument("--json", type=pathlib.Path, help="write totals, groups and ratios here")
    return p


def parse_resolution(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"resolution must be HxW or one side, got {text!r}")
    h, w = int(parts[0]), int(parts[-1])
    return h, w


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    resolution = parse_resolution(args.resolution)
    backends = ("reference", "triton") if args.backend == "both" else (args.backend,)
    rates = rates_for(args)
    drop_path = args.drop_path if args.drop_path is not None else DROP_PATH[args.model] if args.train else 0.0
    counts = [
        count_model(
            args.model, b, args.batch, resolution, args.dtype, args.train, features=args.features, drop_path=drop_path
        )
        for b in backends
    ]
    for c in counts:
        print(format_count(c, rates, args.top))
        print()
    ratios = compare(counts)
    peak_ratios = compare(counts, key=lambda c: c.peak_bytes)
    print(
        f"rates ({rates['source']}): copy {rates['copy_gbps']:.0f} GB/s, matmul {rates['matmul_tflops']:.0f} "
        f"TFLOP/s; launch plans: {counts[0].target}"
    )
    for c in counts:
        floor = c.floor_ms(rates["copy_gbps"], rates["matmul_tflops"])
        ratio = f", {ratios[c.backend]:.3f}x the reference's bytes" if c.backend in ratios else ""
        peak = f" ({peak_ratios[c.backend]:.3f}x)" if c.backend in peak_ratios else ""
        print(
            f"{c.backend:>10}: {c.bytes / 1e9:.2f} GB, floor {floor:.2f} ms "
            f"({c.batch / floor * 1e3:.0f} images/s){ratio}; peak alive {_mib(c.peak_bytes)}{peak}"
        )
    if args.json:
        report = {
            "config": {**vars(args), "json": str(args.json), "resolution": resolution},
            "rates": rates,
            "counts": [
                {
                    **{k: v for k, v in asdict(c).items() if k != "ops"},
                    "bytes": c.bytes,
                    "flops": c.flops,
                    "floor_ms": c.floor_ms(rates["copy_gbps"], rates["matmul_tflops"]),
                    "by_op": c.by(lambda o: o.op),
                    "by_module_type": c.by(lambda o: o.module_type),
                }
                for c in counts
            ],
            "ratios": ratios,
            "peak_ratios": peak_ratios,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
