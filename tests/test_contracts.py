"""Every public op of ``restv2_kernels`` and its eager reference take the same arguments.

For a valid call and each change to one of its arguments (a dtype, a dimension dropped, added,
emptied or off by one, a list instead of a tensor, a tensor on another device, a bad scalar),
both must refuse with a TypeError or ValueError that names the op, or both must run and give
the same numbers. The only refusals of the kernels alone are their own limits (fp64), which say
so ("Triton"). No other exception, from PyTorch or Triton, may escape either. (A mutation fuzz
found the references crashing inside PyTorch where the kernels refused or ran, and a tensor
``scale`` that needed a gradient silently not differentiated by the kernels.)

The per-op tests (``test_errors`` in each module) check the messages; the parity tests the
numbers. This one checks that the two functions of each pair agree on every argument.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import ATOL

import restv2_kernels
from restv2_kernels import reference

FP16, FP32, FP64 = torch.float16, torch.float32, torch.float64


def _calls(device: str) -> dict[str, tuple[list, dict]]:
    """A small valid call of each op: (positional tensors, keyword scalars)."""
    g = torch.Generator().manual_seed(0)

    def rn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    B, N, M, H, D, C = 2, 12, 5, 2, 16, 8
    return {
        "emsa_attention": ([rn(B, N, H, D), rn(B, M, H, D), rn(B, M, H, D)], {"scale": None}),
        "emsa_attention_kv": ([rn(B, N, H, D), rn(B, M, 2, H, D)], {"scale": None}),
        "emsa_attention_mixed": (
            [rn(B, N, H, D), rn(B, M, H, D), rn(B, M, H, D), rn(H, H, 1, 1), rn(H)],
            {"scale": None, "eps": 1e-5},
        ),
        "upsample_add": (
            [rn(B, 7, 6, C), rn(B, 4, 3, C), rn(4 * C, 1, 3, 3), rn(4 * C), rn(C), rn(C)],
            {"sr": 2, "eps": 1e-6},
        ),
        "add_layer_norm": (
            [rn(B, 5, C), rn(B, 5, C), rn(C), rn(C)],
            {"eps": 1e-6, "out_dtype": None, "branch_scale": None},
        ),
        "linear_gelu": ([rn(B, 5, C), rn(12, C), rn(12)], {}),
        "mlp": ([rn(B, 5, C), rn(12, C), rn(12), rn(C, 12), rn(C)], {}),
        "pixel_attention": ([rn(B, C, 5, 6), rn(C, 1, 3, 3), rn(C), rn(C)], {}),
        "pixel_attention_layer_norm": (
            [rn(B, C, 5, 6), rn(C, 1, 3, 3), rn(C), rn(C), rn(C), rn(C)],
            {"eps": 1e-6, "out_dtype": None},
        ),
        "bias_relu": ([rn(B, C, 5, 6), rn(C)], {}),
        "batch_norm_relu": (
            [rn(B, C, 5, 6), rn(C), rn(C).abs() + 0.5, rn(C), rn(C)],
            {"training": True, "momentum": 0.1, "eps": 1e-5},
        ),
    }


def _tensor_changes(t: torch.Tensor) -> list[tuple[str, object]]:
    changes: list[tuple[str, object]] = [(f"{dt}", t.to(dt)) for dt in (FP64, FP16, torch.int64)]
    changes += [("bool", t > 0), ("list", t.tolist()), ("meta", t.to("meta"))]
    changes += [("a dim dropped", t[..., 0]), ("a dim added", t.unsqueeze(0))]
    for d in range(t.dim()):
        for size in (0, t.shape[d] + 1):
            shape = list(t.shape)
            shape[d] = size
            changes.append((f"dim {d} = {size}", torch.randn(shape, generator=torch.Generator().manual_seed(d)).to(t)))
    return changes


_SCALAR_CHANGES = {
    "scale": [0.5, float("inf"), float("nan"), "0.5", True, torch.tensor(0.5), torch.ones(2), torch.tensor(0.5).requires_grad_()],
    "eps": [0.0, -1.0, float("nan"), True, "1e-6", None],
    "sr": [0, 1, 3, 2.0, True, None],
    "out_dtype": [FP16, FP64, torch.int32, "float32"],
    "branch_scale": [torch.ones(2), torch.ones(3), torch.ones(2, 1), torch.ones(2, dtype=torch.int64), [1.0, 1.0]],
    "training": [False, 1, None],
    "momentum": [-0.1, float("nan"), None, 0.0],
}  # fmt: skip


def _changes(op: str, device: str) -> list[tuple[str, list, dict]]:
    """The valid call, then each change to one argument: (label, args, kwargs)."""
    args, kwargs = _calls(device)[op]
    out = [("valid call", args, kwargs)]
    for i, t in enumerate(args):
        out += [(f"arg {i}: {label}", args[:i] + [new] + args[i + 1 :], kwargs) for label, new in _tensor_changes(t)]
    for name, values in _SCALAR_CHANGES.items():
        if name in kwargs:
            out += [(f"{name}={v!r}", args, {**kwargs, name: v}) for v in values]
    return out


def _fresh(value: object, needs_grad: bool) -> object:
    """Each call gets its own copy (batch_norm_relu updates the running statistics in place)."""
    if not isinstance(value, torch.Tensor):
        return value
    copy = value.detach().clone()
    if needs_grad and copy.is_floating_point() and not copy.is_meta:
        copy.requires_grad_()
    return copy


def _run(fn: Callable, op: str, args: list, kwargs: dict) -> tuple[object, BaseException | None]:
    # the weights need gradients (the training path), the running statistics may not
    no_grad = {1, 2} if op == "batch_norm_relu" else set()
    args = [_fresh(a, i not in no_grad) for i, a in enumerate(args)]
    kwargs = {k: (v if k == "scale" else _fresh(v, False)) for k, v in kwargs.items()}
    try:
        out = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- every exception is judged below
        return None, e
    outs = list(out) if isinstance(out, tuple) else [out]
    if op == "batch_norm_relu":
        outs += [t for t in args[1:3] if isinstance(t, torch.Tensor)]  # updated in place
    return outs, None


def _differ(kernel_outs: list, ref_outs: list) -> str | None:
    for i, (k, r) in enumerate(zip(kernel_outs, ref_outs)):
        if (k.shape, k.dtype) != (r.shape, r.dtype):
            return f"output {i}: {tuple(k.shape)} {k.dtype} vs the reference's {tuple(r.shape)} {r.dtype}"
        if k.is_meta:
            continue
        kd, rd = k.detach().double().cpu(), r.detach().double().cpu()
        precision = FP32 if k.dtype == FP64 else k.dtype  # the kernels compute in fp32 at best (fp64 statistics)
        bound = 2 * ATOL[precision] * max(1.0, rd.abs().max().item() if rd.numel() else 1.0)
        if not torch.allclose(kd, rd, rtol=0, atol=bound, equal_nan=True):
            return f"output {i}: max error {(kd - rd).abs().max().item():.3g} > {bound:.3g}"
    return None


@pytest.mark.parametrize("op", list(_calls("cpu")))
def test_kernel_and_reference_take_the_same_arguments(op, device):
    kernel, ref = getattr(restv2_kernels, op), getattr(reference, op)
    problems = []
    for label, args, kwargs in _changes(op, device):
        ref_outs, ref_err = _run(ref, op, args, kwargs)
        kernel_outs, kernel_err = _run(kernel, op, args, kwargs)
        escaped = [
            f"{label}: the {who} raised {type(err).__name__}: {err}"
            for who, err in (("reference", ref_err), ("kernel", kernel_err))
            if err is not None and not (isinstance(err, (TypeError, ValueError)) and op in str(err))
        ]
        if escaped:
            problems += escaped
        elif ref_err is None and kernel_err is not None and "Triton" not in str(kernel_err):
            problems.append(f"{label}: only the kernel refused: {kernel_err}")
        elif ref_err is not None and kernel_err is None:
            problems.append(f"{label}: only the reference refused: {ref_err}")
        elif ref_err is None and kernel_err is None:
            difference = _differ(kernel_outs, ref_outs)
            if difference:
                problems.append(f"{label}: {difference}")
    assert not problems, f"{op}:\n" + "\n".join(problems)
