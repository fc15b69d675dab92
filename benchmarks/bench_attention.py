"""Microbenchmark of the fused EMSA attention against eager PyTorch and every SDPA backend.

Shapes: the four 224-px restv2_tiny stages at B=128 (N = 56^2, 28^2, 14^2, 7^2 over
M = 7^2 keys, h = 1, 2, 4, 8, d = 96) and stage 1 at 800x1333, B=2 (200x334 -> N=66,800;
25x42 -> M=1,050; h=1, d=96). q and k/v are the model's strided views of a q Linear
output [B, N, C] and a kv Linear output [B, M, 2C]. Gradients are taken with respect to
those two buffers, as in the model (so the k/v grads are assembled into one kv grad).

Providers: ``triton`` (emsa_attention), ``eager`` (the reference), and
``F.scaled_dot_product_attention`` under each ``sdpa_kernel`` backend (flash, efficient,
math, cudnn). SDPA wants [B, h, L, d]: 3 transposed views in (no copy) and 1 permute copy
out (``.transpose(1, 2).contiguous()``), which the timings include.

Reported per row: median ms (``triton.testing.do_bench``), achieved GB/s over the minimal
bytes, and % of the copy bandwidth measured in the same run (``dst.copy_(src)``, 2x bytes).
Minimal bytes: forward reads q, k, v and writes o and the fp32 lse; forward+backward adds
reading q, k, v, o, dO, lse and writing dq, dk, dv. Raw rows go to
``benchmarks/results/attention_<gpu>_<date>.json``.

    python benchmarks/bench_attention.py [--dtype fp16|bf16|fp32] [--shapes tiny|det|all]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import re
import sys

import torch
import torch.nn.functional as F

SHAPES = {  # name: (B, N, M, h, d)
    "tiny-s1-N3136": (128, 3136, 49, 1, 96),
    "tiny-s2-N784": (128, 784, 49, 2, 96),
    "tiny-s3-N196": (128, 196, 49, 4, 96),
    "tiny-s4-N49": (128, 49, 49, 8, 96),
    "det800x1333-s1": (2, 200 * 334, 25 * 42, 1, 96),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SDPA_BACKENDS = ("flash", "efficient", "math", "cudnn")
PERMUTES = {"triton": "none", "eager": "3 transposed views in, 1 copy out (inside the reference)"}
PERMUTES.update({f"sdpa-{b}": "3 transposed views in, 1 copy out" for b in SDPA_BACKENDS})


def attention_fns() -> dict:
    """provider -> fn(q, k, v) with q [B, N, h, d] and k, v [B, M, h, d] -> [B, N, h, d]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from restv2_kernels import emsa_attention, reference

    def sdpa(backend):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return o.transpose(1, 2).contiguous()

        return fn

    fns = {"triton": emsa_attention, "eager": reference.emsa_attention}
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
    fns.update({f"sdpa-{name}": sdpa(backends[name]) for name in SDPA_BACKENDS})
    return fns


def minimal_bytes(B: int, N: int, M: int, h: int, d: int, elt: int, backward: bool) -> int:
    q, kv, lse = B * N * h * d * elt, B * M * h * d * elt, B * h * N * 4
    fwd = q + 2 * kv + q + lse  # read q, k, v; write o, lse
    bwd = 3 * q + 2 * kv + lse + q + 2 * kv  # read q, o, dO, k, v, lse; write dq, dk, dv
    return fwd + bwd if backward else fwd


def copy_bandwidth(do_bench) -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def bench_row(do_bench, fn, shape, dtype, backward: bool) -> float:
    B, N, M, h, d = shape
    C = h * d
    q_buf = torch.randn(B, N, C, device="cuda", dtype=dtype, requires_grad=backward)
    kv_buf = torch.randn(B, M, 2 * C, device="cuda", dtype=dtype, requires_grad=backward)

    def forward():
        kv = kv_buf.view(B, M, 2, h, d)
        return fn(q_buf.view(B, N, h, d), kv[:, :, 0], kv[:, :, 1])

    if not backward:
        with torch.no_grad():
            return do_bench(forward)
    grad = torch.randn(B, N, h, d, device="cuda", dtype=dtype)
    return do_bench(lambda: torch.autograd.grad(forward(), (q_buf, kv_buf), grad))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--shapes", choices=("tiny", "det", "all"), default="all")
    parser.add_argument("--providers", nargs="+", default=None, help="subset of: triton eager sdpa-<backend>")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_attention: a CUDA GPU is needed to run this benchmark; nothing to do.")
        return 0

    import triton
    from triton.testing import do_bench

    dtype = DTYPES[args.dtype]
    shapes = {n: s for n, s in SHAPES.items() if args.shapes == "all" or n.startswith(args.shapes)}
    fns = attention_fns()
    providers = args.providers or list(fns)
    gpu = torch.cuda.get_device_name()
    env = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "dtype": args.dtype}
    copy_gbs = copy_bandwidth(do_bench)
    print(f"{gpu} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | {args.dtype} | "
          f"copy bandwidth {copy_gbs:.0f} GB/s")
    print(f"{'shape':<16} {'mode':<8} {'provider':<15} {'ms':>9} {'GB/s':>8} {'%copy':>6}  permutes")

    rows = []
    elt = torch.finfo(dtype).bits // 8
    for name, shape in shapes.items():
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            nbytes = minimal_bytes(*shape, elt, backward)
            for provider in providers:
                row = {"shape": name, "B_N_M_h_d": shape, "mode": mode, "provider": provider,
                       "bytes": nbytes, "permutes": PERMUTES.get(provider, "")}
                try:
                    ms = bench_row(do_bench, fns[provider], shape, dtype, backward)
                    row.update(ms=ms, gbs=nbytes / ms / 1e6, pct_copy=100 * nbytes / ms / 1e6 / copy_gbs)
                    print(f"{name:<16} {mode:<8} {provider:<15} {ms:9.3f} {row['gbs']:8.0f} "
                          f"{row['pct_copy']:5.0f}%  {row['permutes']}")
                except (RuntimeError, torch.OutOfMemoryError) as e:  # unsupported backend or shape
                    row["error"] = str(e).splitlines()[0][:200]
                    print(f"{name:<16} {mode:<8} {provider:<15} {'n/a':>9}  {row['error'][:60]}")
                rows.append(row)
                torch.cuda.empty_cache()

    out = args.out or (pathlib.Path(__file__).parent / "results"
                       / f"attention_{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}_{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "copy_gbs": copy_gbs, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
