"""Launch plans (restv2_kernels/plans.py): grid limits for any batch, one source of truth for the
launchers and the target check, targets, overrides, and the real GPUs' geometry in the interpreter.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from restv2_kernels import plans
from restv2_kernels.attention import triton as attention
from restv2_kernels.plans import MAX_GRID, TARGETS
from restv2_kernels.upsample import triton as upsample

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_TARGETS = (*TARGETS.values(), plans.INTERPRETER)


def _launches(B, H, dtype, target):
    """Every launch of both ops at B images x H heads: the 224-px stage-1 shape, and a detection
    one where it fits in memory (B * H <= 1024)."""
    out = []
    for N, M, D in ((3136, 49, 96), (66800, 1050, 64))[: 1 if B * H > 1024 else 2]:
        out.append(plans.attention_fwd_plan(B, N, M, H, D, dtype, target))
        bwd = plans.attention_bwd_plan(B, N, M, H, D, dtype, target)
        out += [launch for launch in (bwd.dq, bwd.dkdv) if launch is not None]
    for Hr, Wr, C, sr in ((7, 7, 96, 8), (7, 7, 768, 1), (25, 42, 96, 8))[: 2 if B > 1024 else 3]:
        out.append(plans.upsample_fwd_plan(B, Hr, Wr, C, sr, dtype, target))
        bwd = plans.upsample_bwd_plan(B, Hr, Wr, C, sr, dtype, target)
        out += [bwd.g, bwd.dv]
    return out


def _within_limits(launch):
    return len(launch.grid) <= 3 and all(1 <= g <= limit for g, limit in zip(launch.grid, MAX_GRID))


@pytest.mark.parametrize(
    "B, H",
    [(1, 1), (8192, 16), (65536, 1), (4096, 32), (1 << 17, 8)],
    ids=["1x1", "8192x16", "65536x1", "4096x32", "131072x8"],
)
def test_grids_within_cuda_limits_for_any_batch(B, H):
    """B * heads far above CUDA's 65,535 cap on grid y/z: every grid is 1-D and within limits."""
    for dtype, target in itertools.product(DTYPES, ALL_TARGETS):
        for launch in _launches(B, H, dtype, target):
            assert len(launch.grid) == 1, launch
            assert _within_limits(launch), launch


def test_launch_refuses_grids_over_cuda_limits():
    with pytest.raises(ValueError, match="grid dimension x = 2147483648"):
        plans.Launch("k", (2**31,), (), 4, 1)
    with pytest.raises(ValueError, match="grid dimension y = 65536"):
        plans.Launch("k", (1, 65536), (), 4, 1)
    with pytest.raises(ValueError, match="too large for one launch"):  # more programs than a 1-D grid holds
        plans.attention_fwd_plan(1 << 22, 66800, 1050, 16, 64, torch.float16, TARGETS["sm_90"])
    with pytest.raises(ValueError, match="do not fit 32-bit indices"):
        plans.upsample_fwd_plan(1 << 26, 7, 7, 96, 8, torch.float16, TARGETS["sm_90"])


def test_launchers_record_what_the_plans_say():
    """On meta tensors under plans.recording(), the launchers launch nothing and record the plan
    functions' launches: the target check compiles exactly what a launch would run."""
    B, N, M, H, D = 8192, 49, 49, 16, 64  # B * H = 131072 (b, h) pairs
    q = torch.empty(B, N, H * D, device="meta", dtype=torch.float16).view(B, N, H, D)
    kv = torch.empty(B, M, 2, H, D, device="meta", dtype=torch.float16)
    target = TARGETS["sm_89"]
    with plans.using_target(target), plans.recording() as seen:
        o, lse = attention.attention_fwd(q, kv[:, :, 0], kv[:, :, 1], 0.125)
        attention.attention_bwd(torch.empty_like(o), q, kv[:, :, 0], kv[:, :, 1], o, lse, 0.125)
    bwd = plans.attention_bwd_plan(B, N, M, H, D, torch.float16, target)
    assert [r.plan for r in seen] == [plans.attention_fwd_plan(B, N, M, H, D, torch.float16, target), bwd.dkdv]
    assert o.device.type == "meta" and all(_within_limits(r.plan) for r in seen)

    B, Hr, Wr, C, sr = 70000, 7, 7, 96, 8
    x = torch.empty(B, Hr * sr, Wr * sr, C, device="meta", dtype=torch.bfloat16)
    v = torch.empty(B, Hr, Wr, 2 * C, device="meta", dtype=torch.bfloat16)[..., C:]
    params = [
        torch.empty(s, device="meta", dtype=torch.bfloat16)
        for s in ((sr * sr * C, 1, 3, 3), (sr * sr * C,), (C,), (C,))
    ]
    with plans.using_target(target), plans.recording() as seen:
        out = upsample._fwd(x, v, *params, sr, 1e-6)
        upsample._bwd(torch.empty_like(out), v, *params, sr, 1e-6)
    bwd = plans.upsample_bwd_plan(B, Hr, Wr, C, sr, torch.bfloat16, target)
    assert [r.plan for r in seen] == [plans.upsample_fwd_plan(B, Hr, Wr, C, sr, torch.bfloat16, target), bwd.g, bwd.dv]


def test_interpreter_many_heads_and_batches(device):
    """The (query block, b, h) and (key block, split, b, h) unfolding in the kernels: many (b, h)
    pairs, several query blocks and splits, against the reference (small N keeps the interpreter quick)."""
    from helpers import assert_close

    from restv2_kernels import emsa_attention, reference

    g = torch.Generator().manual_seed(3)
    B, N, M, H, D = 8, 40, 20, 5, 16
    q, k, v = (torch.randn(B, L, H, D, generator=g, dtype=torch.float64) for L in (N, M, M))
    grad = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)

    def run(fn, dtype, dev):
        leaves = [t.to(device=dev, dtype=dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad.to(device=dev, dtype=dtype))
        return [out] + [t.grad for t in leaves]

    blocks = dict(block_n=16, block_m=16, num_warps=4, num_stages=1)
    with plans.forced(attn_fwd=blocks, attn_bwd=dict(blocks, min_blocks_per_split=1)):
        plan = plans.attention_bwd_plan(B, N, M, H, D, torch.float32, plans.INTERPRETER)
        assert plan.splits == 3 and not plan.fuse_dq  # 3 query blocks in 3 splits, 2 key blocks, 40 (b, h)
        kernel = run(emsa_attention, torch.float32, device)
    for name, a, r, e in zip(
        ("out", "dq", "dk", "dv"),
        kernel,
        run(reference.emsa_attention, torch.float64, "cpu"),
        run(reference.emsa_attention, torch.float32, "cpu"),
    ):
        assert_close(name, a, r, e)


def _grads(fn, inputs, grad, device, dtype):
    leaves = [t.to(device=device, dtype=dtype, copy=True).requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad.to(device=device, dtype=dtype))
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("target", ["sm_80", "sm_89", "sm_90"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gpu_plans_in_the_interpreter(target, dtype, device):
    """Each checked GPU's own plans (blocks, warps, splits) give the reference's numbers, forward
    and backward, for both ops (several key blocks; a cropped upsample)."""
    from helpers import assert_close

    from restv2_kernels import emsa_attention, reference, upsample_add

    g = torch.Generator().manual_seed(4)
    attn = [torch.randn(2, L, 2, 64, generator=g).to(dtype).double() for L in (150, 70, 70)]
    attn_grad = torch.randn(2, 150, 2, 64, generator=g).to(dtype).double()
    B, Hr, Wr, C, sr = 2, 3, 4, 96, 4
    up = [
        torch.randn(*shape, generator=g).to(dtype).double() / 2
        for shape in ((B, Hr * sr - 1, Wr * sr, C), (B, Hr, Wr, C), (sr * sr * C, 1, 3, 3), (sr * sr * C,), (C,), (C,))
    ]
    up_grad = torch.randn(B, Hr * sr - 1, Wr * sr, C, generator=g).to(dtype).double()

    def upsample(fn):
        return lambda *t: fn(*t, sr)

    for name, fused, ref, inputs, grad in (
        ("attention", emsa_attention, reference.emsa_attention, attn, attn_grad),
        ("upsample", upsample(upsample_add), upsample(reference.upsample_add), up, up_grad),
    ):
        with plans.using_target(target):
            kernel = _grads(fused, inputs, grad, device, dtype)
        ref64 = _grads(ref, inputs, grad, "cpu", torch.float64)
        eager = _grads(ref, inputs, grad, "cpu", dtype)
        for i, (a, r, e) in enumerate(zip(kernel, ref64, eager)):
            assert_close(f"{name}[{i}]", a, r, e)


def test_targets_table():
    """The opt-in shared memory per block of each target, as CUDA documents it."""
    assert {n: t.smem_per_block for n, t in TARGETS.items()} == {
        "sm_70": 98304,
        "sm_80": 166912,
        "sm_86": 101376,
        "sm_89": 101376,
        "sm_90": 232448,
    }
    assert plans.known_target(89) is TARGETS["sm_89"]
    assert plans.known_target(120) is TARGETS["sm_90"]  # a newer GPU takes the newest tables
    assert plans.known_target(75) is TARGETS["sm_70"]
    with pytest.raises(ValueError, match="older than any supported target"):
        plans.known_target(61)


def test_device_target():
    assert plans.device_target(torch.device("cpu")) is plans.INTERPRETER
    with plans.using_target("sm_80") as t:
        assert plans.device_target(torch.device("cpu")) is t is TARGETS["sm_80"]
    assert plans.device_target(torch.device("cpu")) is plans.INTERPRETER
    props = SimpleNamespace(
        major=8,
        minor=6,
        multi_processor_count=84,
        name="NVIDIA RTX A6000",
        shared_memory_per_block_optin=101376,
        shared_memory_per_multiprocessor=102400,
    )
    plans._cuda_target.cache_clear()
    try:
        with mock.patch.object(torch.cuda, "get_device_properties", lambda index: props):
            t = plans.device_target(torch.device("cuda", 0))
    finally:
        plans._cuda_target.cache_clear()
    assert (t.name, t.sm_count, t.gpu, t.smem_per_block, t.max_threads_per_sm) == (
        "sm_86",
        84,
        props.name,
        101376,
        1536,
    )


def test_forced_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown kernel families"):
        with plans.forced(attention=dict(block_n=16)):
            pass
    with pytest.raises(ValueError, match="attn_fwd has no fields"):
        with plans.forced(attn_fwd=dict(block_p=16)):
            pass
    with plans.forced(attn_fwd=dict(block_n=32)):
        assert plans.attention_fwd_plan(1, 100, 49, 1, 64, torch.float16, TARGETS["sm_90"]).constexprs[0] == (
            "BLOCK_N",
            32,
        )
    assert plans.attention_fwd_plan(1, 100, 49, 1, 64, torch.float16, TARGETS["sm_90"]).constexprs[0] == (
        "BLOCK_N",
        128,
    )
