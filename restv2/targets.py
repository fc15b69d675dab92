"""The GPU target check over the model zoo: every kernel launch the 8 models make, compiled for
real GPUs on a machine without one.

    python -m restv2.targets                       # sm_80, sm_89, sm_90 checked; sm_70 shown
    python -m restv2.targets --json targets.json --targets sm_90 --models restv2_tiny
    python -m restv2.targets --targets sm_90 --models restv2_tiny --dtypes bf16 --inputs 224x224x128
                                                   # one GPU's plans for one model, dtype and size
    python -m restv2.targets --markdown            # the README's "GPU targets" table
    python -m restv2.targets --readings tests/data/target_readings.json [--update-readings]
                                                   # reuse (refresh) the committed readings, as CI does

What it enumerates: each model (``--models``, default all 8) in fp32, fp16 and bf16
(``--dtypes``), at 224² (batch 1 and 256), 384² (batch 1 and 256), 800x1333 (batch 2) and
1024x2048 (batch 1) (``--inputs``), forward and backward in training mode (with stochastic depth,
whose factors the add + LayerNorm takes), forward in eval mode without gradients (where the stems
fold their BatchNorm and PA fuses the LayerNorm after it); the fp32 GEMMs (linear + GELU, the
MLP's GELU-gradient GEMM) also as launched where PyTorch allows TF32. The model runs on meta
tensors (nothing is allocated) on the kernel path with its calls of the fused ops intercepted
(attention, ResTv1's attention with the heads' interaction, upsample branch, residual add +
LayerNorm, linear + GELU and the MLP's GELU-gradient GEMM, pixel attention, PA + LayerNorm, the
stems' bias + ReLU; the add + LayerNorm also as autocast calls it, on an fp32 stream); each
distinct call goes through the real launchers under ``plans.recording()``, once per target (the
plans depend on it), so the check compiles exactly what a launch on that GPU would run.
``restv2_kernels.targets`` specialises, dedupes, compiles and judges; this module prints the
table, writes ``--json`` rows, and exits 1 when a checked target has a problem (a plan that does
not compile, shared memory over the opt-in limit, local memory in a 16-bit plan, a 16-bit
``tl.dot`` without tensor cores). An fp32 plan that spills is reported, not failed (the CI test
lists those it accepts).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from unittest import mock

import torch

import restv2_kernels
from restv2_kernels import plans
from restv2_kernels.plans import TARGETS, Recorded
from restv2_kernels.targets import (
    CHECKED_TARGETS,
    INFO_TARGETS,
    Readings,
    Row,
    check,
    format_table,
    is_tf32,
    tensor_core_label,
    to_json,
)

from . import MODELS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (height, width, batch): the classification sizes at the batches users run, and the detection
# and segmentation sizes at theirs.
INPUTS = ((224, 224, 1), (224, 224, 256), (384, 384, 1), (384, 384, 256), (800, 1333, 2), (1024, 2048, 1))


# The fused ops the models call, by name: the module of their launchers.
KERNEL_MODULES = {
    "emsa_attention": "restv2_kernels.attention.triton",
    "emsa_attention_kv": "restv2_kernels.attention.triton",
    "emsa_attention_mixed": "restv2_kernels.attention_mixed.triton",
    "upsample_add": "restv2_kernels.upsample.triton",
    "add_layer_norm": "restv2_kernels.layernorm.triton",
    "linear_gelu": "restv2_kernels.ffn.triton",
    "mlp": "restv2_kernels.ffn.triton",
    "pixel_attention": "restv2_kernels.pa.triton",
    "pixel_attention_layer_norm": "restv2_kernels.pa.triton",
    "bias_relu": "restv2_kernels.bn_relu.triton",
    "batch_norm_relu": "restv2_kernels.bn_relu.triton",
}


# The ops whose fp32 launches change when PyTorch allows TF32 matmuls (their launchers read
# PyTorch's flag): the check records them both ways.
TF32_OPS = ("linear_gelu", "mlp")


# Arguments whose dtype the model fixes, whatever the activations' (op -> position -> dtype):
# stochastic depth's per-sample factors are fp32.
FIXED_DTYPES = {"add_layer_norm": {6: torch.float32}}


def _meta_like(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A meta tensor of ``a``'s shape, strides and offset in ``dtype``."""
    size = a.storage_offset() + sum((n - 1) * st for n, st in zip(a.shape, a.stride())) + 1
    return torch.empty(size, dtype=dtype, device="meta").as_strided(a.shape, a.stride(), a.storage_offset())


@dataclass(frozen=True)
class OpCall:
    """One call of a fused op (a key of ``KERNEL_MODULES``) as the model makes it (meta tensors)."""

    op: str
    args: tuple
    use: str  # "restv2_tiny bf16 224x224 b256"
    final: bool = False  # the model's final norm (an add_layer_norm call that asks no output dtype)

    def to(self, dtype: str) -> OpCall:
        """The same call in ``dtype`` (a key of ``DTYPES``): same shapes, strides and offsets."""
        fixed = FIXED_DTYPES.get(self.op, {})
        args = tuple(
            _meta_like(a, fixed.get(i, DTYPES[dtype])) if isinstance(a, torch.Tensor) else a
            for i, a in enumerate(self.args)
        )
        return dataclasses.replace(self, args=args, use=self.use.replace("{dtype}", dtype))

    def autocast_variants(self, dtype: str) -> list[OpCall]:
        """The call as CUDA's autocast makes it in ``dtype`` where that differs from a plain cast.

        - The residual add + LayerNorm: the kernel path passes the LayerNorm's own fp32 weight and
          bias, and a Linear's 16-bit branch (or none), on an fp32 stream (ResTv2's: a LayerNorm,
          which autocast runs in fp32, starts each stage) or a 16-bit one (ResTv1's: a conv, a
          BatchNorm or PA starts it); a block's norm writes the next Linear's 16-bit dtype, the
          final norm asks none (the stream's, or fp32 with a 16-bit branch). Both streams are
          listed for every call: the trace, on meta tensors, cannot run autocast.
        - ResTv1's mixed attention on 16-bit q, k, v with the conv's fp32 weight and bias.
        - PA + LayerNorm on a 16-bit map with the norm's fp32 weight and bias, writing fp32.
        - A stem's BatchNorm + ReLU on a 16-bit map with fp32 parameters and running statistics.
        """
        if dtype == "fp32":
            return []
        if self.op == "batch_norm_relu":
            x, *vectors = self.args[:5]
            f32 = [None if t is None else _meta_like(t, torch.float32) for t in vectors]
            args = (_meta_like(x, DTYPES[dtype]), *f32, *self.args[5:])
            return [self._autocast(args, dtype)]
        if self.op == "pixel_attention_layer_norm":
            x, weight, bias, x_bias, nw, nb, eps, _ = self.args
            half = [None if t is None else _meta_like(t, DTYPES[dtype]) for t in (x, weight, bias, x_bias)]
            f32 = torch.float32
            args = (*half, _meta_like(nw, f32), _meta_like(nb, f32), eps, f32)
            return [self._autocast(args, dtype)]
        if self.op == "emsa_attention_mixed":
            q, k, v, weight, bias, scale, eps = self.args
            f32 = torch.float32
            args = (
                *(_meta_like(t, DTYPES[dtype]) for t in (q, k, v)),
                _meta_like(weight, f32),
                _meta_like(bias, f32),
                scale,
                eps,
            )
            return [self._autocast(args, dtype)]
        if self.op != "add_layer_norm":
            return []
        x, branch, weight, bias, eps, _, *scale = self.args
        f32, half = torch.float32, DTYPES[dtype]
        return [
            self._autocast(
                (
                    _meta_like(x, stream),
                    None if branch is None else _meta_like(branch, half),
                    _meta_like(weight, f32),
                    _meta_like(bias, f32),
                    eps,
                    None if self.final else half,
                    *(_meta_like(t, f32) for t in scale),
                ),
                dtype,
            )
            for stream in (f32, half)
        ]

    def _autocast(self, args: tuple, dtype: str) -> OpCall:
        return dataclasses.replace(self, args=args, use=self.use.replace("{dtype}", f"autocast-{dtype}"))

    @property
    def key(self) -> tuple:
        """What makes two calls launch the same: the op, its arguments' layouts and dtypes, and
        whether it is the final norm (whose backward may also run without the residual's gradient)."""
        return (self.op, self.final) + tuple(
            (tuple(a.shape), a.stride(), a.storage_offset(), a.dtype) if isinstance(a, torch.Tensor) else a
            for a in self.args
        )


def _empty_out(shape, dtype, device, channels_last: bool = False) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def model_calls(model_name: str, inputs: Sequence[tuple[int, int, int]]) -> list[OpCall]:
    """The kernel-path calls of one fp32 forward per (height, width, batch) in ``inputs``, in
    order, in training mode with gradients and then in eval mode without (the stems fold their
    BatchNorm only there, and call ``bias_relu``, in training ``batch_norm_relu``; PA and the
    LayerNorm after it fuse only without gradients), traced on meta tensors (``OpCall.to``
    gives them in another dtype).

    The model runs with ``backend="triton"`` on meta tensors with the fused ops replaced by
    stand-ins that record their arguments (the very views the kernel path passes) and return
    meta tensors of the kernels' output layouts. The last add + LayerNorm of each forward is the
    final norm (``OpCall.final``).
    """
    calls: list[OpCall] = []
    use = ""

    def recorder(op: str, output):
        def fn(*args):
            calls.append(OpCall(op, args, use))
            return output(*args)

        return fn

    def add_layer_norm_out(x, branch, weight, bias, eps=1e-6, out_dtype=None, branch_scale=None):
        dtype = x.dtype if branch is None else torch.promote_types(x.dtype, branch.dtype)
        residual = x if branch is None else _empty_out(x.shape, dtype, x.device)
        return residual, _empty_out(x.shape, out_dtype or dtype, x.device)

    outputs = {
        "emsa_attention": lambda q, k, v, scale=None: _empty_out(q.shape, q.dtype, q.device),
        "emsa_attention_kv": lambda q, kv, scale=None: (_empty_out(q.shape, q.dtype, q.device), kv[:, :, 1]),
        "emsa_attention_mixed": lambda q, *_: _empty_out(q.shape, q.dtype, q.device),
        "upsample_add": lambda x, *_: _empty_out(x.shape, x.dtype, x.device),
        "add_layer_norm": add_layer_norm_out,
        "linear_gelu": lambda x, w, b=None: _empty_out((*x.shape[:-1], w.shape[0]), x.dtype, x.device),
        "mlp": lambda x, w1, b1, w2, b2: _empty_out((*x.shape[:-1], w2.shape[0]), x.dtype, x.device),
        "pixel_attention": lambda x, *_: _empty_out(x.shape, x.dtype, x.device, channels_last=True),
        "pixel_attention_layer_norm": lambda x, *a: _empty_out(x.shape, a[-1] or x.dtype, x.device, channels_last=True),
        "bias_relu": lambda x, bias: torch.empty_like(x),
        "batch_norm_relu": lambda x, *_: _empty_out(x.shape, x.dtype, x.device, channels_last=True),
    }
    with torch.device("meta"):  # with stochastic depth: its factors are an argument of add_layer_norm
        model = MODELS[model_name](backend="triton", drop_path_rate=0.1)
    with contextlib.ExitStack() as stack:
        for op, output in outputs.items():
            stack.enter_context(mock.patch.object(restv2_kernels, op, recorder(op, output), create=True))
        for training in (True, False):
            model.train(training)
            for height, width, batch in inputs:
                use = f"{model_name} {{dtype}} {height}x{width} b{batch}" + ("" if training else " eval")
                start = len(calls)
                with torch.set_grad_enabled(training):
                    model(torch.empty(batch, 3, height, width, device="meta"))
                final = [i for i in range(start, len(calls)) if calls[i].op == "add_layer_norm"][-1:]
                for i in final:  # the final norm, after every block
                    calls[i] = dataclasses.replace(calls[i], final=True)
    return calls


def zoo_calls(models: Sequence[str], dtypes: Sequence[str], inputs: Sequence[tuple[int, int, int]]) -> list[OpCall]:
    """Every distinct kernel-path call of ``models`` x ``dtypes`` x ``inputs`` (and the autocast
    variants of the 16-bit dtypes); ``use`` names the first model/input that made it. The views
    do not depend on the dtype: each model is traced once, in fp32."""
    unique: dict[tuple, OpCall] = {}
    for name in models:
        traced = model_calls(name, inputs)
        for dt in dtypes:
            for call in traced:
                for variant in (call.to(dt), *call.autocast_variants(dt)):
                    unique.setdefault(variant.key, variant)
    return list(unique.values())


def _grad_of(t: torch.Tensor) -> torch.Tensor:
    """The gradient autograd passes for an output like ``t``: contiguous."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _launch_call(call: OpCall) -> tuple[list[Recorded], list[Recorded]]:
    """The forward launches (inference and training variants) and backward launches of one call."""
    kernels = importlib.import_module(KERNEL_MODULES[call.op])
    with plans.recording() as fwd:
        if call.op in ("emsa_attention", "emsa_attention_kv"):
            q, *kv, scale = call.args
            k, v = kv if len(kv) == 2 else kv[0].unbind(2)
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            o, lse = kernels.attention_fwd(q, k, v, scale)
        elif call.op == "emsa_attention_mixed":
            q, k, v, weight, _, scale, eps = call.args  # the bias never reaches the kernels
            o, rows, norm = kernels.attention_mixed_fwd(q, k, v, weight, scale, eps)
        elif call.op == "upsample_add":
            o = kernels._fwd(*call.args)
        elif call.op == "add_layer_norm":
            x, branch, weight, bias, eps, out_dtype, *scale = call.args
            scale = scale[0] if scale else None
            kernels._fwd(x, branch, weight, bias, eps, out_dtype, False, scale)
            residual, normed, mean, rstd = kernels._fwd(x, branch, weight, bias, eps, out_dtype, True, scale)
        elif call.op == "linear_gelu":
            kernels._fwd(*call.args, False)
            kernels._fwd(*call.args, True)
        elif call.op == "mlp":
            x, w1, b1, w2, b2 = call.args
            kernels._fwd(x, w1, b1, False)
            _, pre = kernels._fwd(x, w1, b1, True)
        elif call.op == "bias_relu":  # its backward is aten: no launch
            kernels._fwd(*call.args)
        elif call.op == "batch_norm_relu":  # the batch's statistics (in training), then the pass
            x, running_mean, running_var, weight, bias, batch_stats, *_ = call.args
            mean, rstd = kernels._stats(x) if batch_stats else (running_mean.float(), running_var.float())
            kernels._bn_relu(x, mean, rstd, weight, bias)  # (meta: the values do not matter)
        elif call.op == "pixel_attention_layer_norm":  # no gradient: no backward
            x, weight, bias, x_bias, nw, nb, eps, out_dtype = call.args
            kernels._fwd(x.permute(0, 2, 3, 1), weight, bias, x_bias, (nw, nb, eps), out_dtype)
        else:  # pixel_attention, on the [B, H, W, C] view as the public function passes it
            x, weight, bias, *x_bias = call.args  # x_bias: the conv's, where PA adds it
            o = kernels._fwd(x.permute(0, 2, 3, 1), weight, bias, *x_bias)
    with plans.recording() as bwd:
        if call.op == "emsa_attention":
            kernels.attention_bwd(_grad_of(o), q, k, v, o, lse, scale)
        elif call.op == "emsa_attention_kv":  # v used elsewhere (EMSAv2's upsample branch) or not (ResTv1)
            kernels.attention_kv_bwd(_grad_of(o), q, kv[0], o, lse, scale, _grad_of(v))
            kernels.attention_kv_bwd(_grad_of(o), q, kv[0], o, lse, scale, None)
        elif call.op == "emsa_attention_mixed":
            kernels.attention_mixed_bwd(_grad_of(o), q, k, v, weight, rows, norm, scale)
        elif call.op == "upsample_add":
            _, v, weight, bias, nw, nb, sr, eps = call.args
            kernels._bwd(_grad_of(o), v, weight, bias, nw, nb, sr, eps)
        elif call.op == "add_layer_norm":  # the outputs _AddLayerNorm.backward asks for
            saved = x if branch is None else residual
            # the branch's gradient is a second output in its own dtype, or scaled (drop path)
            second = None if branch is None or (branch.dtype == x.dtype and scale is None) else branch.dtype
            # with the residual's gradient (a block's norms, a stage map a detector takes), and for
            # the final norm also without (a classifier's: only the normed tokens reach the loss)
            grads = (None,) if branch is None else (_grad_of(residual), None) if call.final else (_grad_of(residual),)
            for dres in grads:
                kernels._bwd(_grad_of(normed), dres, saved, mean, rstd, weight, x.dtype, second, scale)
        elif call.op == "pixel_attention":
            kernels._bwd(_grad_of(o), x.permute(0, 2, 3, 1), weight, bias, *x_bias)
        elif call.op == "batch_norm_relu":  # dout as the next conv's backward writes it: channels-last
            dout = torch.empty_like(x)
            sums = kernels._bwd_sums(dout, x, mean, rstd, weight, bias)
            kernels._bwd_dx(dout, x, mean, rstd, weight, bias, sums[0], sums[1], batch_stats)
        elif call.op == "mlp":  # d_pre = (dy @ fc2.weight) * gelu'(pre), db1 and gelu(pre); the rest is cuBLAS
            dy = torch.empty((*x.shape[:-1], w2.shape[0]), dtype=x.dtype, device=x.device)
            kernels._gelu_grad(dy, w2, pre, b1 is not None, True)
        # linear_gelu alone: the backward is aten (gelu_backward and cuBLAS GEMMs), no launch
    return fwd, bwd


def record_launches(calls: Sequence[OpCall], target: str) -> list[tuple[Recorded, str]]:
    """The launches the launchers make for ``calls`` on ``target``, forward and backward:
    (recorded launch, "<use> <op> fwd|bwd")."""
    out: list[tuple[Recorded, str]] = []
    with plans.using_target(target):
        for call in calls:
            fwd, bwd = _launch_call(call)
            out += [(rec, f"{call.use} {call.op} fwd") for rec in fwd]
            out += [(rec, f"{call.use} {call.op} bwd") for rec in bwd]
            if call.op in TF32_OPS and call.args[0].dtype == torch.float32:
                # fp32 where PyTorch allows TF32 (training scripts set allow_tf32): tensor-core
                # plans that round their operands first, launched only then
                with plans.tf32_matmuls(True):
                    fwd, bwd = _launch_call(call)
                out += [(rec, f"{call.use} {call.op} fwd, TF32 allowed") for rec in fwd]
                out += [(rec, f"{call.use} {call.op} bwd, TF32 allowed") for rec in bwd]
    return out


def run_check(
    models: Sequence[str] = tuple(MODELS),
    dtypes: Sequence[str] = tuple(DTYPES),
    inputs: Sequence[tuple[int, int, int]] = INPUTS,
    targets: Sequence[str] = CHECKED_TARGETS + INFO_TARGETS,
    jobs: int | None = None,
    log=print,
    readings: Readings | None = None,
) -> list[Row]:
    """Enumerates the zoo's calls, records their launches per target, compiles and judges them
    (with ``readings``: compiles only the jobs without a committed reading, and a sample)."""
    t0 = time.perf_counter()
    calls = zoo_calls(models, dtypes, inputs)
    launches = {target: record_launches(calls, target) for target in targets}
    log(
        f"{len(calls)} distinct op calls ({len(models)} models x {len(dtypes)} dtypes x {len(inputs)} inputs), "
        f"{sum(map(len, launches.values()))} launches on {len(targets)} targets "
        f"({time.perf_counter() - t0:.1f}s)"
    )

    def progress(done: int, total: int, job) -> None:
        if done == total or done % 50 == 0:
            log(f"  compiled {done}/{total} distinct plans ({time.perf_counter() - t0:.0f}s)")

    return check(launches, jobs=jobs, progress=progress, readings=readings)


def markdown_summary(rows: Sequence[Row], targets: Sequence[str] = CHECKED_TARGETS + INFO_TARGETS) -> str:
    """Per kernel and dtype (``tf32``: the fp32 plans with TF32 dots), per target: registers a
    thread, shared memory, local memory where there is any, and what ``tl.dot`` became (ranges
    over the kernel's plans), for the README."""
    lines = ["| kernel | dtype | " + " | ".join(targets) + " |", "|---|---|" + "---|" * len(targets)]
    groups: dict[tuple[str, str], dict[str, list[Row]]] = {}
    for r in rows:  # the fp32 GEMM's TF32 plans (PyTorch allows TF32) apart from its IEEE ones
        groups.setdefault((r.kernel, "tf32" if is_tf32(r) else r.dtype), {}).setdefault(r.target, []).append(r)

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
            cells.append(
                f"{span([r.registers for r in rs])} regs, {span([round(r.shared_bytes / 1024) for r in rs])} KB"
                + (f", {span(local)} B local" if any(local) else "")
                + ("" if mma == "-" else f", {mma}")
            )
        lines.append(f"| {kernel} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_input(text: str) -> tuple[int, int, int]:
    """``"HxWxB"`` -> (height, width, batch): at least 32x32 (the models' least input), a batch of at least 1."""
    try:
        height, width, batch = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"an input is HEIGHTxWIDTHxBATCH, e.g. 224x224x128, got {text!r}") from None
    if min(height, width) < 32 or batch < 1:
        raise argparse.ArgumentTypeError(f"an input is at least 32x32, with a batch of at least 1, got {text!r}")
    return height, width, batch


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m restv2.targets",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--targets",
        default=",".join(CHECKED_TARGETS + INFO_TARGETS),
        help=f"comma-separated, of {', '.join(TARGETS)}; failures count on {', '.join(CHECKED_TARGETS)} "
        "(and sm_86) only (default: %(default)s)",
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument(
        "--inputs",
        nargs="+",
        type=parse_input,
        default=list(INPUTS),
        metavar="HxWxB",
        help="the input sizes and batches to trace, e.g. 224x224x128 800x1333x2 (default: "
        + " ".join(f"{h}x{w}x{b}" for h, w, b in INPUTS)
        + ")",
    )
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: the CPU count)")
    parser.add_argument("--json", type=str, default=None, help="write the rows here")
    parser.add_argument("--markdown", action="store_true", help="also print the per-kernel summary table")
    parser.add_argument(
        "--readings",
        type=str,
        default=None,
        metavar="FILE",
        help="reuse the readings committed in FILE where Triton's cache key matches (compiling one a kernel "
        "afresh to confirm them), e.g. tests/data/target_readings.json, which CI uses",
    )
    parser.add_argument(
        "--update-readings",
        action="store_true",
        help="compile every plan (Triton's cache serves what it holds) and write the readings into --readings "
        "FILE, as this Triton build's group; needs the whole zoo",
    )
    parser.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="FAMILY.FIELD=INT",
        help="override a plan-table field, e.g. attn_bwd.num_stages=1 (see plans.forced); repeatable",
    )
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
    if args.update_readings:  # the file keeps one group a build: a partial run would drop readings
        partial = args.force or set(args.models) != set(MODELS) or set(args.dtypes) != set(DTYPES)
        partial = partial or set(args.inputs) != set(INPUTS)
        if args.readings is None or partial or not set(CHECKED_TARGETS) <= set(targets):
            parser.error(
                "--update-readings needs --readings FILE and the whole zoo: every model, dtype and input, "
                f"no --force, and the targets {', '.join(CHECKED_TARGETS)}"
            )
    readings = Readings(args.readings, reuse=not args.update_readings) if args.readings else None
    # the kernels must be compiled ones: the interpreter's decorator is chosen at import
    if not any(m in sys.modules for m in KERNEL_MODULES.values()):
        os.environ.pop("TRITON_INTERPRET", None)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # Triton 3.9's notice, not a finding

    try:
        with plans.forced(**overrides):
            rows = run_check(
                args.models, args.dtypes, args.inputs, targets, args.jobs, lambda m: print(m, flush=True), readings
            )
    except ValueError as exc:  # an unknown family or field in --force
        parser.error(str(exc))
    print(format_table(rows))
    if args.markdown:
        print()
        print(markdown_summary(rows, targets))
    summary = None
    if readings is not None:
        summary = {
            "file": args.readings,
            "build": readings.build,
            "build_in_file": readings.has_build,
            **{how: sum(r.reading == how for r in rows) for how in ("committed", "committed, verified", "compiled")},
        }
        print(
            f"\nreadings ({args.readings}, build {readings.build}"
            + ("" if readings.has_build else ", not in the file")
            + f"): {summary['committed'] + summary['committed, verified']} of {len(rows)} plans committed, "
            f"{summary['committed, verified']} of them compiled afresh to confirm; {summary['compiled']} compiled"
        )
        if args.update_readings:
            readings.save()
            print(f"wrote {len(readings.seen)} readings to {args.readings}")
    if args.json:
        with open(args.json, "w") as f:
            targets_json = {t: dataclasses.asdict(TARGETS[t]) for t in targets}
            json.dump({"targets": targets_json, "readings": summary, "rows": to_json(rows)}, f, indent=1)
    failing = [r for r in rows if r.problems and r.target not in INFO_TARGETS]  # fp32 spills are no problem
    spilling = [r for r in rows if r.dtype == "fp32" and r.local_bytes and r.target not in INFO_TARGETS]
    print(
        f"\n{len(rows)} compiled plans on {', '.join(targets)}: {len(failing)} with problems"
        + (f", {len(spilling)} fp32 plans with local memory (reported, not failed)" if spilling else "")
    )
    for r in failing:
        print(f"  {r.kernel} {r.dtype} {r.target} {r.plan}: {'; '.join(r.problems)} (e.g. {r.uses[0]})")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
