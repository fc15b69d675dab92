"""The GPU target check over the model zoo: every kernel launch the 8 models make, compiled for
real GPUs on a machine without one.

    python -m restv2.targets                       # sm_80, sm_89, sm_90 checked; sm_70 shown
    python -m restv2.targets --json targets.json --targets sm_90 --models restv2_tiny
    python -m restv2.targets --markdown            # the README's "GPU targets" table

What it enumerates: each model (``--models``, default all 8) in fp32, fp16 and bf16, at 224²
(batch 1 and 256), 384² (batch 1 and 256), 800x1333 (batch 2) and 1024x2048 (batch 1), forward
and backward. The model runs on meta tensors (nothing is allocated) with its calls of the two
ops intercepted; each distinct call goes through the real launchers under
``plans.recording()``, once per target (the plans depend on it), so the check compiles exactly
what a launch on that GPU would run. ``restv2_kernels.targets`` specialises, dedupes, compiles
and judges; this module prints the table, writes ``--json`` rows, and exits 1 when a checked
target has a problem (a plan that does not compile, shared memory over the opt-in limit,
local memory in a 16-bit plan, a 16-bit ``tl.dot`` without tensor cores).
An fp32 plan that spills is reported, not failed (the CI test lists those it accepts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from unittest import mock

import torch

from restv2_kernels import plans, reference
from restv2_kernels.plans import TARGETS, Recorded
from restv2_kernels.targets import (
    CHECKED_TARGETS,
    INFO_TARGETS,
    Row,
    check,
    format_table,
    tensor_core_label,
    to_json,
)

from . import MODELS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (height, width, batch): the classification sizes at the batches users run, and the detection
# and segmentation sizes at theirs.
INPUTS = ((224, 224, 1), (224, 224, 256), (384, 384, 1), (384, 384, 256), (800, 1333, 2), (1024, 2048, 1))


@dataclass(frozen=True)
class OpCall:
    """One call of ``emsa_attention`` or ``upsample_add`` as the model makes it (meta tensors)."""

    op: str  # "attention" or "upsample"
    args: tuple
    use: str  # "restv2_tiny bf16 224x224 b256"

    def to(self, dtype: str) -> OpCall:
        """The same call in ``dtype`` (a key of ``DTYPES``): same shapes, strides and offsets."""

        def convert(a):
            if not isinstance(a, torch.Tensor):
                return a
            size = a.storage_offset() + sum((n - 1) * st for n, st in zip(a.shape, a.stride())) + 1
            base = torch.empty(size, dtype=DTYPES[dtype], device="meta")
            return base.as_strided(a.shape, a.stride(), a.storage_offset())

        return OpCall(self.op, tuple(convert(a) for a in self.args), self.use.replace("{dtype}", dtype))

    @property
    def key(self) -> tuple:
        return (self.op,) + tuple(
            (tuple(a.shape), a.stride(), a.storage_offset(), a.dtype) if isinstance(a, torch.Tensor) else a
            for a in self.args
        )


def model_calls(model_name: str, inputs: Sequence[tuple[int, int, int]]) -> list[OpCall]:
    """The kernel-path calls of one fp32 forward per (height, width, batch) in ``inputs``, in
    order, traced on meta tensors (``OpCall.to`` gives them in another dtype).

    The model runs with ``backend="reference"``, whose calls take the very views the kernel
    path passes (q and kv straight out of their Linear layers); each call's output is a meta
    tensor of the kernel's layout (contiguous), as the kernel path gets.
    """
    calls: list[OpCall] = []
    use = ""

    def attention(q, k, v, scale=None):
        calls.append(OpCall("attention", (q, k, v, scale), use))
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)

    def upsample(x, v, weight, bias, norm_weight, norm_bias, sr, eps=1e-6):
        calls.append(OpCall("upsample", (x, v, weight, bias, norm_weight, norm_bias, sr, eps), use))
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    with torch.device("meta"):
        model = MODELS[model_name](backend="reference")
    with mock.patch.object(reference, "emsa_attention", attention), \
            mock.patch.object(reference, "upsample_add", upsample), torch.no_grad():
        for height, width, batch in inputs:
            use = f"{model_name} {{dtype}} {height}x{width} b{batch}"
            model(torch.empty(batch, 3, height, width, device="meta"))
    return calls


def zoo_calls(models: Sequence[str], dtypes: Sequence[str], inputs: Sequence[tuple[int, int, int]]) -> list[OpCall]:
    """Every distinct kernel-path call of ``models`` x ``dtypes`` x ``inputs``; ``use`` names
    the first model/input that made it. The views do not depend on the dtype: each model is
    traced once, in fp32."""
    unique: dict[tuple, OpCall] = {}
    for name in models:
        traced = model_calls(name, inputs)
        for dt in dtypes:
            for call in traced:
                call = call.to(dt)
                unique.setdefault(call.key, call)
    return list(unique.values())


def record_launches(calls: Sequence[OpCall], target: str) -> list[tuple[Recorded, str]]:
    """The launches the launchers make for ``calls`` on ``target``, forward and backward:
    (recorded launch, "<use> <op> fwd|bwd")."""
    from restv2_kernels.attention import triton as attention
    from restv2_kernels.upsample import triton as upsample

    out: list[tuple[Recorded, str]] = []
    with plans.using_target(target):
        for call in calls:
            with plans.recording() as fwd:
                if call.op == "attention":
                    q, k, v, scale = call.args
                    scale = q.shape[-1] ** -0.5 if scale is None else scale
                    o, lse = attention.attention_fwd(q, k, v, scale)
                else:
                    o = upsample._fwd(*call.args)
            with plans.recording() as bwd:
                do = torch.empty(o.shape, dtype=o.dtype, device=o.device)  # autograd's gradients are contiguous
                if call.op == "attention":
                    attention.attention_bwd(do, q, k, v, o, lse, scale)
                else:
                    _, v, weight, bias, nw, nb, sr, eps = call.args
                    upsample._bwd(do, v, weight, bias, nw, nb, sr, eps)
            out += [(rec, f"{call.use} {call.op} fwd") for rec in fwd]
            out += [(rec, f"{call.use} {call.op} bwd") for rec in bwd]
    return out


def run_check(
    models: Sequence[str] = tuple(MODELS),
    dtypes: Sequence[str] = tuple(DTYPES),
    inputs: Sequence[tuple[int, int, int]] = INPUTS,
    targets: Sequence[str] = CHECKED_TARGETS + INFO_TARGETS,
    jobs: int | None = None,
    log=print,
) -> list[Row]:
    """Enumerates the zoo's calls, records their launches per target, compiles and judges them."""
    t0 = time.perf_counter()
    calls = zoo_calls(models, dtypes, inputs)
    launches = {target: record_launches(calls, target) for target in targets}
    log(f"{len(calls)} distinct op calls ({len(models)} models x {len(dtypes)} dtypes x {len(inputs)} inputs), "
        f"{sum(map(len, launches.values()))} launches on {len(targets)} targets "
        f"({time.perf_counter() - t0:.1f}s)")

    def progress(done: int, total: int, job) -> None:
        if done == total or done % 50 == 0:
            log(f"  compiled {done}/{total} distinct plans ({time.perf_counter() - t0:.0f}s)")

    return check(launches, jobs=jobs, progress=progress)


def markdown_summary(rows: Sequence[Row], targets: Sequence[str] = CHECKED_TARGETS + INFO_TARGETS) -> str:
    """Per kernel and dtype, per target: registers a thread, shared memory, local memory where
    there is any, and what ``tl.dot`` became (ranges over the kernel's plans), for the README."""
    lines = ["| kernel | dtype | " + " | ".join(targets) + " |", "|---|---|" + "---|" * len(targets)]
    groups: dict[tuple[str, str], dict[str, list[Row]]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.dtype), {}).setdefault(r.target, []).append(r)

    def span(values) -> str:
        lo, hi = min(values), max(values)
        return f"{lo}" if lo == hi else f"{lo}-{hi}"

    for (kernel, dtype), per_target in sorted(groups.items()):
        cells = []
        for t in targets:
            rs = [r for r in per_target.get(t, []) if r.error is None]
            if not rs:
                cells.append("does not compile" if per_target.get(t) else "")
                continue
            mma = "/".join(sorted({tensor_core_label(r).split(" ")[0] for r in rs}))
            local = [r.local_bytes for r in rs]
            cells.append(f"{span([r.registers for r in rs])} regs, {span([round(r.shared_bytes / 1024) for r in rs])} KB"
                         + (f", {span(local)} B local" if any(local) else "") + ("" if mma == "-" else f", {mma}"))
        lines.append(f"| {kernel} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m restv2.targets", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(CHECKED_TARGETS + INFO_TARGETS),
                        help=f"comma-separated, of {', '.join(TARGETS)}; failures count on {', '.join(CHECKED_TARGETS)} "
                             "(and sm_86) only (default: %(default)s)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: the CPU count)")
    parser.add_argument("--json", type=str, default=None, help="write the rows here")
    parser.add_argument("--markdown", action="store_true", help="also print the per-kernel summary table")
    parser.add_argument("--force", action="append", default=[], metavar="FAMILY.FIELD=INT",
                        help="override a plan-table field, e.g. attn_bwd.num_stages=1 (see plans.forced); repeatable")
    args = parser.parse_args(argv)
    overrides: dict[str, dict[str, int]] = {}
    for item in args.force:
        try:
            key, value = item.split("=")
            family, name = key.split(".")
            overrides.setdefault(family, {})[name] = int(value)
        except ValueError:
            parser.error(f"--force takes FAMILY.FIELD=INT, got {item!r}")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    # the kernels must be compiled ones: the interpreter's decorator is chosen at import
    if "restv2_kernels.attention.triton" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET", None)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # Triton 3.9's notice, not a finding

    try:
        with plans.forced(**overrides):
            rows = run_check(args.models, args.dtypes, INPUTS, targets, args.jobs, log=lambda m: print(m, flush=True))
    except ValueError as exc:  # an unknown family or field in --force
        parser.error(str(exc))
    print(format_table(rows))
    if args.markdown:
        print()
        print(markdown_summary(rows, targets))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"targets": {t: dataclasses.asdict(TARGETS[t]) for t in targets}, "rows": to_json(rows)}, f,
                      indent=1)
    failing = [r for r in rows if r.problems and r.target not in INFO_TARGETS]  # fp32 spills are no problem
    spilling = [r for r in rows if r.dtype == "fp32" and r.local_bytes and r.target not in INFO_TARGETS]
    print(f"\n{len(rows)} compiled plans on {', '.join(targets)}: {len(failing)} with problems"
          + (f", {len(spilling)} fp32 plans with local memory (reported, not failed)" if spilling else ""))
    for r in failing:
        print(f"  {r.kernel} {r.dtype} {r.target} {r.plan}: {'; '.join(r.problems)} (e.g. {r.uses[0]})")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
