"""Microbenchmark of the fused upsample branch (``restv2_kernels.upsample_add``) on a GPU.

Shapes: the four stages of restv2_tiny at 224 px, batch 128 (56/28/14/7 maps, C 96/192/384/768,
sr 8/4/2/1, 7x7 reduced maps) and stage 1 of an 800x1333 input at batch 2 (200x334 map, 25x42
reduced, sr 8: the crop path). V is read in place from a kv tensor, as in the model.

Implementations: the Triton kernels, the eager chain (``restv2_kernels.reference``) and
``torch.compile`` of the eager chain. Timings: ``triton.testing.do_bench`` (median, after
warm-up), forward alone and forward + backward (backward = the difference).

Bytes counted (the minimum any implementation must move; e = element size, N = B*H*W,
M = B*Hr*Wr, P = sr*sr*C*10 + 2*C parameters):
  forward:  read x (N*C*e) + read v (M*C*e) + read params (P*e) + write out (N*C*e)
  backward: read dout (N*C*e) + read v (M*C*e) + read params (P*e) + write dv (M*C*e)
            + write dparams (P*e); dx is dout itself (no bytes).
The Triton backward also writes and reads an fp32 scratch (N*C*4 each way), which is not
counted: it shows up as a lower fraction of the copy bandwidth.
The copy bandwidth is measured in the same run: ``dst.copy_(src)`` of 1 GiB, 2x bytes.

Usage: python benchmarks/bench_upsample.py [--dtype fp16] [--no-compile] [--out PATH]
Raw numbers go to benchmarks/results/upsample_<gpu>_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import sys

import torch

SHAPES = [
    # name, B, H, W, C, sr, Hr, Wr
    ("tiny-s1-224", 128, 56, 56, 96, 8, 7, 7),
    ("tiny-s2-224", 128, 28, 28, 192, 4, 7, 7),
    ("tiny-s3-224", 128, 14, 14, 384, 2, 7, 7),
    ("tiny-s4-224", 128, 7, 7, 768, 1, 7, 7),
    ("s1-800x1333", 2, 200, 334, 96, 8, 25, 42),
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _bytes(B, H, W, C, sr, Hr, Wr, e):
    n, m, p = B * H * W * C, B * Hr * Wr * C, sr * sr * C * 10 + 2 * C
    fwd = (2 * n + m + p) * e
    bwd = (n + 2 * m + 2 * p) * e
    return fwd, bwd


def _inputs(B, H, W, C, sr, Hr, Wr, dtype, device):
    x = torch.randn(B, H, W, C, device=device, dtype=dtype)
    kv = torch.randn(B, Hr, Wr, 2 * C, device=device, dtype=dtype)
    weight = torch.randn(sr * sr * C, 1, 3, 3, device=device, dtype=dtype) * 0.2
    bias = torch.randn(sr * sr * C, device=device, dtype=dtype) * 0.1
    norm_weight = 1 + 0.1 * torch.randn(C, device=device, dtype=dtype)
    norm_bias = 0.1 * torch.randn(C, device=device, dtype=dtype)
    dout = torch.randn(B, H, W, C, device=device, dtype=dtype)
    return x, kv, weight, bias, norm_weight, norm_bias, dout


def _copy_gbps(do_bench, device) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def _bench_one(fn, tensors, B, Hr, Wr, C, sr, do_bench):
    """(forward ms, forward+backward ms) of fn(x, v, weight, bias, norm_weight, norm_bias, sr)."""
    x, kv, weight, bias, nw, nb, dout = tensors

    def view(kv):
        return kv.view(B, Hr, Wr, 2, C)[..., 1, :]

    with torch.no_grad():
        fn(x, view(kv), weight, bias, nw, nb, sr)  # compile / autotune outside the timing
        fwd = do_bench(lambda: fn(x, view(kv), weight, bias, nw, nb, sr))
    leaves = [t.detach().clone().requires_grad_() for t in (x, kv, weight, bias, nw, nb)]
    lx, lkv, lw, lb, lnw, lnb = leaves

    def step():
        fn(lx, view(lkv), lw, lb, lnw, lnb, sr).backward(dout)

    step()
    both = do_bench(step, grad_to_none=leaves)
    return fwd, both


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--shapes", nargs="*", choices=[s[0] for s in SHAPES], help="a subset of the shapes")
    parser.add_argument("--out", type=pathlib.Path, help="JSON path (default: benchmarks/results/upsample_<gpu>_<date>.json)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_upsample: a CUDA GPU is needed to benchmark the kernels; nothing to do.")
        return 0

    import triton
    from triton.testing import do_bench

    from restv2_kernels import reference
    from restv2_kernels.upsample.triton import upsample_add

    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    e = torch.tensor([], dtype=dtype).element_size()
    gpu = torch.cuda.get_device_name(device)
    copy_gbps = _copy_gbps(do_bench, device)
    meta = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "copy_gbps": copy_gbps,
        "bytes_counted": "fwd: x + v + params + out; bwd: dout + v + params + dv + dparams (no scratch)",
    }
    print(f"{gpu} | torch {torch.__version__} | triton {triton.__version__} | CUDA {torch.version.cuda} | {args.dtype}")
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s (dst.copy_(src), 1 GiB, 2x bytes)")


    rows = []
    header = f"{'shape':<13} {'impl':<8} {'fwd ms':>8} {'GB/s':>7} {'%copy':>6} {'f+b ms':>8} {'bwd ms':>8} {'bwd GB/s':>8} {'%copy':>6}"
    print(header)
    for name, B, H, W, C, sr, Hr, Wr in SHAPES:
        if args.shapes and name not in args.shapes:
            continue
        tensors = _inputs(B, H, W, C, sr, Hr, Wr, dtype, device)
        impls = {"triton": upsample_add, "eager": reference.upsample_add}
        if not args.no_compile:
            # a fresh, static-shape compile per shape: dynamo's recompile limit and automatic
            # dynamic shapes would otherwise turn later shapes into eager or dynamic kernels
            torch._dynamo.reset()
            impls["compile"] = torch.compile(reference.upsample_add, dynamic=False)
        fwd_bytes, bwd_bytes = _bytes(B, H, W, C, sr, Hr, Wr, e)
        for impl, fn in impls.items():
            row = {"shape": name, "B": B, "H": H, "W": W, "C": C, "sr": sr, "Hr": Hr, "Wr": Wr, "impl": impl,
                   "fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes}
            try:
                fwd, both = _bench_one(fn, tensors, B, Hr, Wr, C, sr, do_bench)
            except Exception as exc:  # a failing baseline (e.g. compile) must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                print(f"{name:<13} {impl:<8} failed: {row['error'][:80]}")
                continue
            bwd = max(both - fwd, 1e-6)
            row.update(fwd_ms=fwd, fwdbwd_ms=both, bwd_ms=bwd,
                       fwd_gbps=fwd_bytes / fwd / 1e6, bwd_gbps=bwd_bytes / bwd / 1e6)
            row["fwd_pct_copy"] = 100 * row["fwd_gbps"] / copy_gbps
            row["bwd_pct_copy"] = 100 * row["bwd_gbps"] / copy_gbps
            rows.append(row)
            print(f"{name:<13} {impl:<8} {fwd:8.3f} {row['fwd_gbps']:7.0f} {row['fwd_pct_copy']:5.0f}% "
                  f"{both:8.3f} {bwd:8.3f} {row['bwd_gbps']:8.0f} {row['bwd_pct_copy']:5.0f}%")
        by = {r["impl"]: r for r in rows if r["shape"] == name and "error" not in r}
        if "triton" in by:
            for base in ("eager", "compile"):
                if base in by:
                    print(f"{'':<13} speed-up vs {base}: fwd {by[base]['fwd_ms'] / by['triton']['fwd_ms']:.2f}x, "
                          f"bwd {by[base]['bwd_ms'] / by['triton']['bwd_ms']:.2f}x, "
                          f"fwd+bwd {by[base]['fwdbwd_ms'] / by['triton']['fwdbwd_ms']:.2f}x")
        del tensors
        torch.cuda.empty_cache()

    out = args.out
    if out is None:
        tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
        out = pathlib.Path(__file__).parent / "results" / f"upsample_{tag}_{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"raw numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
