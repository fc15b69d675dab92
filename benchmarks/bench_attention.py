"""Microbenchmark of the fused EMSA attention against eager PyTorch and every SDPA backend.

Shapes (B, N queries, M keys, h heads, d head dim): the four 224-px restv2_tiny stages at
B=128 (N = 56^2, 28^2, 14^2, 7^2 over M = 7^2 keys, h = 1, 2, 4, 8, d = 96) and stage 1 at
800x1333, B=2 (200x334 -> N=66,800; 25x42 -> M=1,050; h=1, d=96). q and k/v are the
model's strided views of a q Linear output [B, N, C] and a kv Linear output [B, M, 2C];
gradients are taken with respect to those two buffers, as in the model.

Implementations: ``triton`` (``restv2_kernels.emsa_attention``), ``eager``
(``restv2_kernels.reference.emsa_attention``) and ``F.scaled_dot_product_attention`` under
each ``sdpa_kernel`` backend (``sdpa-flash``, ``sdpa-efficient``, ``sdpa-math``,
``sdpa-cudnn``). SDPA wants [B, h, L, d]: 3 transposed views in (no copy) and one permute
copy out (``.transpose(1, 2).contiguous()``), which its timings include. A backend that
rejects a shape or dtype gets an error row.

Modes (``common.time_fwd_bwd``, ``triton.testing.do_bench`` median): ``fwd`` (no grad),
``bwd`` (backward alone, on a retained graph) and ``fwd+bwd`` (one training step).

Bytes, the minimum any implementation must move (e = element size, Q = B*N*h*d, K = B*M*h*d):
  fwd: read q, k, v, write o                    = (2Q + 2K) e
  bwd: read q, k, v, dO, write dq, dk, dv       = (3Q + 4K) e  (softmax recomputed from q, k)
  fwd+bwd: the sum.
Not counted, as the Triton kernel's own choices: the fp32 lse it writes in the forward
(4 B per query row per head), and, when M spans several key blocks (the 800x1333 shape),
the o, lse reads and fp32 delta/partials of its two-pass backward.

FLOPs (matmul flops only; one N x M x d matmul per (b, h) is 2*N*M*d, U = 2*B*h*N*M*d):
  fwd: S = q k^T, O = P v                                   = 2U = 4*B*h*N*M*d
  bwd: S recomputed, dP = dO v^T, dV = P^T dO, dS k -> dQ, dS^T q -> dK
                                                            = 5U = 10*B*h*N*M*d
  fwd+bwd: 7U. This is what the Triton backward does when M fits one key block (every 224
  shape: dq fused into the dk/dv pass); with several key blocks (800x1333) its dq pass
  recomputes S and dP once more (7U in the backward), which the floor does not credit.

Floor (``common.roofline_floor_ms``): max(bytes / copy bandwidth, FLOPs / matmul rate), both
measured in the same run (``dst.copy_(src)`` of 1 GiB; an 8192^3 matmul in the benchmark's
dtype, fp32 with TF32 off since the kernel's fp32 dots are IEEE). Each row reports ms,
GB/s over the minimal bytes, % of the copy bandwidth, TFLOP/s, the floor and ms / floor.
Raw rows and the environment go to ``benchmarks/results/attention_<gpu>_<date>.json``.

    PYTHONPATH=. python benchmarks/bench_attention.py [--dtype fp16|bf16|fp32]
        [--shapes tiny det tiny-s1-224 ...] [--impls triton eager sdpa-flash ...] [--out PATH]

Both kernel benchmarks: ``for b in attention upsample; do python benchmarks/bench_$b.py; done``.
"""

from __future__ import annotations

import functools
import pathlib
import sys

import torch
import torch.nn.functional as F

_HERE = pathlib.Path(__file__).resolve().parent
for _p in (str(_HERE.parent), str(_HERE)):  # the tree's restv2_kernels and common, installed or not
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402

SHAPES = {  # name: (B, N, M, h, d)
    "tiny-s1-224": (128, 56 * 56, 7 * 7, 1, 96),
    "tiny-s2-224": (128, 28 * 28, 7 * 7, 2, 96),
    "tiny-s3-224": (128, 14 * 14, 7 * 7, 4, 96),
    "tiny-s4-224": (128, 7 * 7, 7 * 7, 8, 96),
    "det-s1-800x1333": (2, 200 * 334, 25 * 42, 1, 96),
}
SDPA_BACKENDS = ("flash", "efficient", "math", "cudnn")
IMPLS = ("triton", "eager") + tuple(f"sdpa-{b}" for b in SDPA_BACKENDS)


def minimal_bytes(B: int, N: int, M: int, h: int, d: int, elt: int, mode: str) -> int:
    """Bytes any implementation must move for ``mode`` in ``common.MODES`` (see the module docstring)."""
    q, kv = B * N * h * d * elt, B * M * h * d * elt
    fwd = 2 * q + 2 * kv  # read q, k, v; write o
    bwd = 3 * q + 4 * kv  # read q, k, v, dO; write dq, dk, dv
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def flops(B: int, N: int, M: int, h: int, d: int, mode: str) -> int:
    """Matmul FLOPs of ``mode``: 2, 5 and 7 N x M x d matmuls per (batch, head) (see the docstring)."""
    matmul = 2 * B * h * N * M * d
    return {"fwd": 2, "bwd": 5, "fwd+bwd": 7}[mode] * matmul


def attention_fns() -> dict:
    """impl -> fn(q, k, v) with q [B, N, h, d] and k, v [B, M, h, d] -> [B, N, h, d]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from restv2_kernels import emsa_attention, reference

    def sdpa(backend):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return o.transpose(1, 2).contiguous()

        return fn

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    fns = {"triton": emsa_attention, "eager": reference.emsa_attention}
    fns.update({f"sdpa-{name}": sdpa(backends[name]) for name in SDPA_BACKENDS})
    return fns


def time_impl(bench, fn, shape: tuple, dtype: torch.dtype, device: str = "cuda") -> dict:
    """``{mode: ms or error}`` of ``fn`` on fresh inputs of ``shape`` (``common.time_fwd_bwd``)."""
    B, N, M, h, d = shape
    C = h * d
    q_buf = torch.randn(B, N, C, device=device, dtype=dtype, requires_grad=True)
    kv_buf = torch.randn(B, M, 2 * C, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, N, h, d, device=device, dtype=dtype)

    def forward():
        kv = kv_buf.view(B, M, 2, h, d)
        return fn(q_buf.view(B, N, h, d), kv[:, :, 0], kv[:, :, 1])

    return common.time_fwd_bwd(bench, forward, (q_buf, kv_buf), grad)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark (``--help`` for the options); without a CUDA GPU, says so and returns 0."""
    fns = functools.cache(attention_fns)
    return common.kernel_bench_main(
        argv,
        kind="attention",
        doc=__doc__,
        shapes=SHAPES,
        impls=IMPLS,
        make_fns=lambda impls: fns(),
        time_impl=time_impl,
        count_bytes=minimal_bytes,
        count_flops=flops,
        counts={
            "bytes": "fwd (2Q+2K)e, bwd (3Q+4K)e; Q=B*N*h*d, K=B*M*h*d",
            "flops": "fwd 4, bwd 10, fwd+bwd 14 x B*h*N*M*d",
            "dims": "B, N, M, h, d",
        },
    )


if __name__ == "__main__":
    sys.exit(main())
