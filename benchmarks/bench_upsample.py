"""Microbenchmark of the fused upsample branch (``restv2_kernels.upsample_add``) on a GPU.

Shapes (B, H, W, C, sr, Hr, Wr): the four stages of restv2_tiny at 224 px, B=128 (56/28/14/7
maps, C 96/192/384/768, sr 8/4/2/1, 7x7 reduced maps) and stage 1 of an 800x1333 input at
B=2 (200x334 map, 25x42 reduced, sr 8: the crop path). V is read in place from a kv tensor
[B, Hr, Wr, 2C], as in the model; gradients are taken with respect to x, kv and the four
parameters.

Implementations: ``triton`` (``restv2_kernels.upsample_add``), ``eager``
(``restv2_kernels.reference.upsample_add``) and ``compile`` (``torch.compile`` of the eager
chain, static shapes, compiled afresh per shape).

Modes (``common.time_fwd_bwd``, ``triton.testing.do_bench`` median): ``fwd`` (no grad),
``bwd`` (backward alone, on a retained graph) and ``fwd+bwd`` (one training step).

Bytes, the minimum any implementation must move (e = element size, N = B*H*W*C output
elements, R = B*Hr*Wr*C reduced elements, P = 10*sr*sr*C + 2*C parameters):
  fwd: read x, v, params, write out             = (2N + R + P) e
  bwd: read dout, v, params, write dv, dparams  = (N + 2R + 2P) e  (dx is dout itself)
  fwd+bwd: the sum.
Not counted: the Triton backward's fp32 scratch g (N*4 bytes written, then read) and its
fp32 parameter partials; they show as a larger multiple of the floor.

FLOPs per output element (CUDA-core arithmetic, approximate; the conv is counted only for
kept, i.e. uncropped, pixels):
  fwd: conv 2*9 + 1 (bias) + LayerNorm 8 (mean 1, variance 3, normalise 2, affine 2)
       + residual add 1                                                   = 28 N
  bwd: recompute conv and LN statistics 19 + 6, xhat 1, dxhat 1, two row sums 3,
       d(LN input) 4, dweight 2*9, dbias 1, dnorm_weight 2, dnorm_bias 1,
       dv gather 2*9                                                      = 74 N (~2.6x fwd)
  fwd+bwd: 102 N.
The op is memory-bound: N*e bytes carry ~28 flops, far below any GPU's flops-per-byte ratio,
so the FLOP term of the floor only matters as a check.

Floor (``common.roofline_floor_ms``): max(bytes / copy bandwidth, FLOPs / matmul rate), both
measured in the same run (``dst.copy_(src)`` of 1 GiB; an 8192^3 matmul in the benchmark's
dtype, fp32 with TF32 off). Each row reports ms, GB/s over the minimal bytes, % of the
copy bandwidth, TFLOP/s, the floor and ms / floor. Raw rows and the environment go to
``benchmarks/results/upsample_<gpu>_<date>.json``.

    PYTHONPATH=. python benchmarks/bench_upsample.py [--dtype fp16|bf16|fp32]
        [--shapes tiny det tiny-s1-224 ...] [--impls triton eager compile] [--out PATH]

Both kernel benchmarks: ``for b in attention upsample; do python benchmarks/bench_$b.py; done``.
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

SHAPES = {  # name: (B, H, W, C, sr, Hr, Wr)
    "tiny-s1-224": (128, 56, 56, 96, 8, 7, 7),
    "tiny-s2-224": (128, 28, 28, 192, 4, 7, 7),
    "tiny-s3-224": (128, 14, 14, 384, 2, 7, 7),
    "tiny-s4-224": (128, 7, 7, 768, 1, 7, 7),
    "det-s1-800x1333": (2, 200, 334, 96, 8, 25, 42),
}
IMPLS = ("triton", "eager", "compile")
FWD_FLOPS_PER_ELEMENT = 2 * 9 + 1 + 8 + 1  # conv, bias, LayerNorm, residual add
BWD_FLOPS_PER_ELEMENT = (19 + 6) + 1 + 1 + 3 + 4 + 2 * 9 + 1 + 2 + 1 + 2 * 9  # the terms of the docstring's bwd line


def minimal_bytes(B: int, H: int, W: int, C: int, sr: int, Hr: int, Wr: int, elt: int, mode: str) -> int:
    """Bytes any implementation must move for ``mode`` in ``common.MODES`` (see the module docstring)."""
    n, r, p = B * H * W * C, B * Hr * Wr * C, 10 * sr * sr * C + 2 * C
    fwd = (2 * n + r + p) * elt  # read x, v, params; write out
    bwd = (n + 2 * r + 2 * p) * elt  # read dout, v, params; write dv, dparams
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def flops(B: int, H: int, W: int, C: int, sr: int, Hr: int, Wr: int, mode: str) -> int:
    """Approximate FLOPs of ``mode``: 28, 74 and 102 per output element (see the module docstring)."""
    per = {
        "fwd": FWD_FLOPS_PER_ELEMENT,
        "bwd": BWD_FLOPS_PER_ELEMENT,
        "fwd+bwd": FWD_FLOPS_PER_ELEMENT + BWD_FLOPS_PER_ELEMENT,
    }[mode]
    return per * B * H * W * C


def upsample_fns(compile_fresh: bool) -> dict:
    """impl -> fn(x, v, weight, bias, norm_weight, norm_bias, sr) -> out."""
    from restv2_kernels import reference, upsample_add

    fns = {"triton": upsample_add, "eager": reference.upsample_add}
    if compile_fresh:
        # a fresh, static-shape compile per shape: dynamo's recompile limit and automatic
        # dynamic shapes would otherwise turn later shapes into eager or dynamic kernels
        torch._dynamo.reset()
        fns["compile"] = torch.compile(reference.upsample_add, dynamic=False)
    return fns


def time_impl(bench, fn, shape: tuple, dtype: torch.dtype, device: str = "cuda") -> dict:
    """``{mode: ms or error}`` of ``fn`` on fresh inputs of ``shape`` (``common.time_fwd_bwd``)."""
    B, H, W, C, sr, Hr, Wr = shape

    def leaf(*size, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*size, device=device, dtype=dtype)).requires_grad_()

    x, kv = leaf(B, H, W, C), leaf(B, Hr, Wr, 2 * C)
    weight, bias = leaf(sr * sr * C, 1, 3, 3, scale=0.2), leaf(sr * sr * C, scale=0.1)
    norm_weight, norm_bias = leaf(C, scale=0.1, shift=1.0), leaf(C, scale=0.1)
    dout = torch.randn(B, H, W, C, device=device, dtype=dtype)

    def forward():
        v = kv.view(B, Hr, Wr, 2, C)[..., 1, :]
        return fn(x, v, weight, bias, norm_weight, norm_bias, sr)

    return common.time_fwd_bwd(bench, forward, (x, kv, weight, bias, norm_weight, norm_bias), dout)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark (``--help`` for the options); without a CUDA GPU, says so and returns 0."""
    return common.kernel_bench_main(
        argv,
        kind="upsample",
        doc=__doc__,
        shapes=SHAPES,
        impls=IMPLS,
        make_fns=lambda impls: upsample_fns(compile_fresh="compile" in impls),
        time_impl=time_impl,
        count_bytes=minimal_bytes,
        count_flops=flops,
        counts={
            "bytes": "fwd (2N+R+P)e, bwd (N+2R+2P)e; N=B*H*W*C, R=B*Hr*Wr*C, P=10*sr*sr*C+2C",
            "flops": f"fwd {FWD_FLOPS_PER_ELEMENT}, bwd {BWD_FLOPS_PER_ELEMENT} per output element",
            "dims": "B, H, W, C, sr, Hr, Wr",
        },
    )


if __name__ == "__main__":
    sys.exit(main())
