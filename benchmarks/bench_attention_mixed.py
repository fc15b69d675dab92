"""Microbenchmark of ResTv1's fused attention with the heads' interaction against eager PyTorch.

The op (``restv2_kernels.emsa_attention_mixed``): per head g, ``t_g = sum_h W[g, h] scale q_h k_h^T
+ b_g``, softmax over the keys, InstanceNorm over the whole [N, M] map, times v_g. Shapes
(B, N queries, M keys, h heads, d head dim), the stages that run it (every stage with h > 1):
rest_small (h = 2, 4, 8, d = 64) and rest_large (h = 2, 4, 8, d = 96) at 224 px, B=128
(N = 28^2, 14^2, 7^2 over M = 7^2), and rest_large at 800x1333, B=2 (stage 2: 100x167 over
25x42, stage 3: 50x84 over 25x42, stage 4: 25x42 over itself). q and k/v are the model's
strided views of the q and kv Linear outputs; the conv's weight [h, h, 1, 1] and bias stay
fp32, as under autocast; gradients are taken with respect to the two Linear buffers and the
conv's parameters.

Implementations: ``triton`` (``restv2_kernels.emsa_attention_mixed``), ``eager``
(``restv2_kernels.reference.emsa_attention_mixed``, the published chain: matmul, 1x1 conv,
softmax, InstanceNorm, matmul) and ``compiled`` (that reference under ``torch.compile``, which
may fuse the elementwise steps but still writes [B, h, N, M] maps).

Modes (``common.time_fwd_bwd``, ``triton.testing.do_bench`` median): ``fwd`` (no grad),
``bwd`` (backward alone, on a retained graph) and ``fwd+bwd`` (one training step).

Bytes, the minimum any implementation must move (e = element size, Q = B*N*h*d, K = B*M*h*d):
fwd (2Q + 2K) e, bwd (3Q + 4K) e, as for ``bench_attention.py`` (the h*h conv parameters are
negligible). FLOPs, with U = 2*B*h*N*M*d (one N x M x d matmul per head) and X = 2*B*h*h*N*M
(the heads' mix of every score): fwd 2U + X (q k^T, p v, the mix); bwd 5U + 3X (scores again,
dA = dO v^T, dv, dq, dk; the mix, its transpose for ds, and dW); fwd+bwd 7U + 4X. The Triton
kernels recompute more than this (each program rebuilds the scores of every head it needs,
see restv2_kernels/attention_mixed/triton.py): the floor does not credit that.

Floor (``common.roofline_floor_ms``): max(bytes / copy bandwidth, FLOPs / matmul rate), both
measured in the same run. Raw rows and the environment go to
``benchmarks/results/attention_mixed_<gpu>_<date>.json``.

Without a GPU it prints the memory the kernels save, computed from the shapes (no timing):
per call, the [B, h, N, M] maps of the eager path (``S`` bytes each, in the benchmark's dtype)
against the kernels' scratch, which is O(B*h*N) (see ``memory_rows``).

    PYTHONPATH=. python benchmarks/bench_attention_mixed.py [--dtype fp16|bf16|fp32]
        [--shapes small large det ...] [--impls triton eager compiled] [--out PATH]
"""

from __future__ import annotations

import pathlib
import sys

import torch

_HERE = pathlib.Path(__file__).resolve().parent
for _p in (str(_HERE.parent), str(_HERE)):  # the tree's restv2_kernels and common, installed or not
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402
from bench_attention import minimal_bytes  # noqa: E402  (the same minimum: q, k, v in, o out; and back)

SHAPES = {  # name: (B, N, M, h, d)
    "small-s2-224": (128, 28 * 28, 7 * 7, 2, 64),
    "small-s3-224": (128, 14 * 14, 7 * 7, 4, 64),
    "small-s4-224": (128, 7 * 7, 7 * 7, 8, 64),
    "large-s2-224": (128, 28 * 28, 7 * 7, 2, 96),
    "large-s3-224": (128, 14 * 14, 7 * 7, 4, 96),
    "large-s4-224": (128, 7 * 7, 7 * 7, 8, 96),
    "det-large-s2-800x1333": (2, 100 * 167, 25 * 42, 2, 96),
    "det-large-s3-800x1333": (2, 50 * 84, 25 * 42, 4, 96),
    "det-large-s4-800x1333": (2, 25 * 42, 25 * 42, 8, 96),
}
IMPLS = ("triton", "eager", "compiled")


def flops(B: int, N: int, M: int, h: int, d: int, mode: str) -> int:
    """Matmul and mixing FLOPs of ``mode`` (see the module docstring)."""
    U, X = 2 * B * h * N * M * d, 2 * B * h * h * N * M
    return {"fwd": 2 * U + X, "bwd": 5 * U + 3 * X, "fwd+bwd": 7 * U + 4 * X}[mode]


def memory_rows(shapes: dict, dtype: torch.dtype, target: str = "sm_90") -> list[dict]:
    """Bytes of attention working memory per call, eager vs the kernels, from the shapes alone.

    Eager (the reference, in ``dtype``), in maps of S = B*h*N*M*e bytes:
    - ``eager_fwd``: 2 S, an op's input and output map (matmul -> conv -> softmax -> InstanceNorm
      -> matmul each read one map and write the next);
    - ``eager_saved``: 3 S kept for the backward by every block until its backward runs (the
      conv's input, the softmax output, which InstanceNorm also saves as its input, and the
      normalised map the last matmul saves);
    - ``eager_train``: 5 S at the backward's peak, the 3 saved maps and two gradient maps.
    Kernels (``plans`` for ``target``, an H100 by default), all fp32:
    - ``kernel_fwd``: the row statistics [2, B, h, N] (kept for the backward), the partial sums
      [B, h, query blocks, 2], vsum [B, h, d] and norm [B, h, 2];
    - ``kernel_saved``: the row statistics and norm;
    - ``kernel_train``: those, the backward's row means [2, B, h, N], dA * a partials, dW
      partials [B, query blocks, h, h], and the dk/dv partials [S, B, M, h, d] when the plan
      splits the queries (S > 1).
    """
    from restv2_kernels import plans

    elt = torch.finfo(dtype).bits // 8
    tgt = plans.TARGETS[target]
    rows = []
    for name, (B, N, M, h, d) in shapes.items():
        S = B * h * N * M * elt
        fwd_plan = plans.attention_mixed_fwd_plan(B, N, M, h, d, dtype, tgt)
        bwd_plan = plans.attention_mixed_bwd_plan(B, N, M, h, d, dtype, tgt)
        saved = 4 * (2 * B * h * N + 2 * B * h)
        fwd = saved + 4 * (B * h * fwd_plan.n_qblocks * 2 + B * h * d)
        partials = 2 * 4 * bwd_plan.splits * B * M * h * d if bwd_plan.splits > 1 else 0
        train = (
            saved + 4 * (2 * B * h * N + B * h * bwd_plan.n_stats_blocks + B * bwd_plan.n_qblocks * h * h) + partials
        )
        rows.append(
            {
                "shape": name,
                "dims": (B, N, M, h, d),
                "map_bytes": S,
                "eager_fwd": 2 * S,
                "eager_saved": 3 * S,
                "eager_train": 5 * S,
                "kernel_fwd": fwd,
                "kernel_saved": saved,
                "kernel_train": train,
            }
        )
    return rows


def memory_report(dtype: torch.dtype, shapes: dict) -> list[str]:
    """The lines printed without a GPU: ``memory_rows`` in MiB and the eager / kernel ratios."""
    mib = 2**20
    lines = [
        f"attention working memory per call, computed from the shapes ({dtype}; kernels planned for sm_90)",
        f"{'shape':<22} {'map MiB':>9} {'fwd: eager':>11} {'kernel':>8} {'saved: eager':>13} {'kernel':>8} "
        f"{'train: eager':>13} {'kernel':>8} {'train x less':>13}",
    ]
    for r in memory_rows(shapes, dtype):
        lines.append(
            f"{r['shape']:<22} {r['map_bytes'] / mib:9.1f} {r['eager_fwd'] / mib:11.1f} {r['kernel_fwd'] / mib:8.2f} "
            f"{r['eager_saved'] / mib:13.1f} {r['kernel_saved'] / mib:8.2f} {r['eager_train'] / mib:13.1f} "
            f"{r['kernel_train'] / mib:8.2f} {r['eager_train'] / r['kernel_train']:12.0f}x"
        )
    lines.append("(eager saved maps stay alive per block until its backward: a stage of L blocks holds L times that)")
    return lines


def attention_fns() -> dict:
    """impl -> fn(q, k, v, weight, bias) with q [B, N, h, d] and k, v [B, M, h, d] -> [B, N, h, d]."""
    from restv2_kernels import emsa_attention_mixed, reference

    return {
        "triton": emsa_attention_mixed,
        "eager": reference.emsa_attention_mixed,
        "compiled": torch.compile(reference.emsa_attention_mixed),
    }


def time_impl(bench, fn, shape: tuple, dtype: torch.dtype, device: str = "cuda") -> dict:
    """``{mode: ms or error}`` of ``fn`` on fresh inputs of ``shape`` (``common.time_fwd_bwd``)."""
    B, N, M, h, d = shape
    C = h * d
    q_buf = torch.randn(B, N, C, device=device, dtype=dtype, requires_grad=True)
    kv_buf = torch.randn(B, M, 2 * C, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(h, h, 1, 1, device=device) * (2.0 / h) ** 0.5).requires_grad_()
    bias = torch.randn(h, device=device).requires_grad_()
    grad = torch.randn(B, N, h, d, device=device, dtype=dtype)

    def forward():
        kv = kv_buf.view(B, M, 2, h, d)
        return fn(q_buf.view(B, N, h, d), kv[:, :, 0], kv[:, :, 1], weight, bias)

    return common.time_fwd_bwd(bench, forward, (q_buf, kv_buf, weight, bias), grad)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark (``--help`` for the options); without a CUDA GPU, prints the memory report."""
    return common.kernel_bench_main(
        argv,
        kind="attention_mixed",
        doc=__doc__,
        shapes=SHAPES,
        impls=IMPLS,
        make_fns=lambda impls: attention_fns(),
        time_impl=time_impl,
        count_bytes=minimal_bytes,
        count_flops=flops,
        counts={
            "bytes": "fwd (2Q+2K)e, bwd (3Q+4K)e; Q=B*N*h*d, K=B*M*h*d",
            "flops": "U=2*B*h*N*M*d, X=2*B*h*h*N*M: fwd 2U+X, bwd 5U+3X, fwd+bwd 7U+4X",
            "dims": "B, N, M, h, d",
        },
        no_gpu=memory_report,
        no_gpu_shapes="det",
    )


if __name__ == "__main__":
    sys.exit(main())
