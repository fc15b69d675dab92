"""CPU checks of the kernel microbenchmarks (benchmarks/bench_attention.py, bench_upsample.py,
bench_attention_mixed.py).

No GPU needed: the command line, the no-GPU exit, the byte/FLOP counts and the roofline floor
on hand-computed shapes, and the timing/table/JSON loop run on the CPU with a stand-in for
``triton.testing.do_bench``.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from helpers import load_benchmark

from restv2_kernels import plans


@pytest.fixture(scope="module")
def attention():
    return load_benchmark("bench_attention")


@pytest.fixture(scope="module")
def upsample():
    return load_benchmark("bench_upsample")


@pytest.fixture(scope="module")
def mixed():
    return load_benchmark("bench_attention_mixed")


@pytest.fixture(params=["bench_attention", "bench_upsample", "bench_attention_mixed"])
def script(request, attention, upsample, mixed):
    return {"bench_attention": attention, "bench_upsample": upsample, "bench_attention_mixed": mixed}[request.param]


def test_help(script, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--dtype" in out and "--shapes" in out and "Floor" in out


def test_main_without_gpu_exits_zero(script, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert script.main([]) == 0
    out = capsys.readouterr().out
    if script.__name__.endswith("mixed"):  # the memory report instead of timings
        assert "no CUDA GPU, so no timings" in out and "det-large-s2-800x1333" in out and "small-s2" not in out
    else:
        assert "a CUDA GPU is needed" in out


def test_mixed_counts(mixed):
    B, N, M, h, d, elt = 2, 16, 4, 3, 8, 2
    assert mixed.minimal_bytes(B, N, M, h, d, elt, "fwd") == 3840  # as emsa_attention's
    U, X = 2 * B * h * N * M * d, 2 * B * h * h * N * M  # 6144, 2304
    assert (U, X) == (6144, 2304)
    assert mixed.flops(B, N, M, h, d, "fwd") == 2 * U + X == 14592
    assert mixed.flops(B, N, M, h, d, "bwd") == 5 * U + 3 * X == 37632
    assert mixed.flops(B, N, M, h, d, "fwd+bwd") == 14592 + 37632
    assert mixed.SHAPES["det-large-s3-800x1333"] == (2, 4200, 1050, 4, 96)


def test_mixed_memory_rows(mixed):
    """The maps by hand; the kernels' scratch from the sm_90 plans, O(B h N): far below a map."""
    from restv2_kernels import plans

    shape = (2, 4200, 1050, 4, 96)
    (row,) = mixed.memory_rows({"s3": shape}, torch.bfloat16)
    S = 2 * 4 * 4200 * 1050 * 2
    assert (row["map_bytes"], row["eager_fwd"], row["eager_saved"], row["eager_train"]) == (S, 2 * S, 3 * S, 5 * S)
    assert row["kernel_saved"] == 4 * (2 * 2 * 4 * 4200 + 2 * 2 * 4)  # row max and sum, (rstd, shift)
    fwd = plans.attention_mixed_fwd_plan(*shape, torch.bfloat16, plans.TARGETS["sm_90"])
    assert row["kernel_fwd"] == row["kernel_saved"] + 4 * (2 * 4 * fwd.n_qblocks * 2 + 2 * 4 * 96)
    assert row["kernel_saved"] < row["kernel_fwd"] < row["kernel_train"] < row["map_bytes"] / 4


def test_unknown_shape_is_an_error(script):
    with pytest.raises(SystemExit) as exc:
        script.main(["--shapes", "no-such-shape"])
    assert exc.value.code not in (0, None)


def test_attention_counts(attention):
    B, N, M, h, d, elt = 2, 16, 4, 3, 8, 2
    q, kv = B * N * h * d * elt, B * M * h * d * elt  # 1536, 384
    assert (q, kv) == (1536, 384)
    assert attention.minimal_bytes(B, N, M, h, d, elt, "fwd") == 3840  # q, k, v in; o out
    assert attention.minimal_bytes(B, N, M, h, d, elt, "bwd") == 6144  # q, k, v, dO in; dq, dk, dv out
    assert attention.minimal_bytes(B, N, M, h, d, elt, "fwd+bwd") == 3840 + 6144
    # one N x M x d matmul over B*h: 2*2*3*16*4*8 = 6144 flops
    assert attention.flops(B, N, M, h, d, "fwd") == 4 * B * h * N * M * d == 12288
    assert attention.flops(B, N, M, h, d, "bwd") == 10 * B * h * N * M * d == 30720
    assert attention.flops(B, N, M, h, d, "fwd+bwd") == 43008
    tiny_s1 = attention.SHAPES["tiny-s1-224"]
    assert tiny_s1 == (128, 3136, 49, 1, 96)
    assert attention.SHAPES["det-s1-800x1333"] == (2, 66800, 1050, 1, 96)


def test_upsample_counts(upsample):
    shape = (1, 5, 6, 4, 2, 3, 3)  # a 6x6 upsampled map cropped to 5x6
    n, r, p = 1 * 5 * 6 * 4, 1 * 3 * 3 * 4, 10 * 2 * 2 * 4 + 2 * 4  # 120, 36, 168
    assert upsample.minimal_bytes(*shape, 4, "fwd") == (2 * n + r + p) * 4 == 1776
    assert upsample.minimal_bytes(*shape, 4, "bwd") == (n + 2 * r + 2 * p) * 4 == 2112
    assert upsample.minimal_bytes(*shape, 4, "fwd+bwd") == 1776 + 2112
    assert upsample.flops(*shape, "fwd") == 28 * n == 3360
    assert upsample.flops(*shape, "bwd") == 74 * n == 8880
    assert upsample.flops(*shape, "fwd+bwd") == 102 * n
    assert upsample.SHAPES["det-s1-800x1333"] == (2, 200, 334, 96, 8, 25, 42)


def test_roofline_floor(attention):
    common = attention.common
    # 2 GB at 1000 GB/s = 2 ms; 1 TFLOP at 100 TFLOP/s = 10 ms -> compute-bound, 10 ms
    assert common.roofline_floor_ms(2e9, 1e12, 1000.0, 100.0) == pytest.approx(10.0)
    assert common.roofline_floor_ms(2e9, 1e10, 1000.0, 100.0) == pytest.approx(2.0)
    cols = common.roofline_columns(4.0, 2e9, 1e10, {"copy_gbps": 1000.0, "matmul_tflops": 100.0})
    assert cols["gbps"] == pytest.approx(500.0)
    assert cols["pct_copy"] == pytest.approx(50.0)
    assert cols["tflops"] == pytest.approx(2.5)
    assert cols["floor_ms"] == pytest.approx(2.0)
    assert cols["x_floor"] == pytest.approx(2.0)
    assert cols["bound"] == "memory"
    cols = common.roofline_columns(20.0, 2e9, 1e12, {"copy_gbps": 1000.0, "matmul_tflops": 100.0})
    assert cols["bound"] == "compute" and cols["x_floor"] == pytest.approx(2.0)


def test_roofline_rates_measure_fp32_without_tf32(attention, monkeypatch):
    common = attention.common
    seen = []
    monkeypatch.setattr(common, "matmul_tflops", lambda device, dtype: seen.append(plans.tf32_allowed()) or 50.0)
    monkeypatch.setattr(common, "copy_bandwidth_gbps", lambda device: 3000.0)
    with plans.tf32_matmuls(True):  # as a training script may have set it
        rates = common.roofline_rates("cpu", torch.float32)
        assert seen == [False] and plans.tf32_allowed()  # off for the measurement, restored after
    assert rates["copy_gbps"] == 3000.0 and rates["matmul_tflops"] == 50.0 and rates["matmul_dtype"] == "float32"


def _cpu_bench(common):
    return lambda fn: common.time_ms(fn, "cpu", reps=2, warmup=0)


def test_time_fwd_bwd_reports_each_mode(attention):
    common = attention.common
    x = torch.randn(8, 8, requires_grad=True)
    times = common.time_fwd_bwd(_cpu_bench(common), lambda: (x @ x).relu(), (x,), torch.ones(8, 8))
    assert set(times) == set(common.MODES)
    assert all(isinstance(t, float) and t > 0 for t in times.values())

    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("no backward here\nsecond line")

    times = common.time_fwd_bwd(_cpu_bench(common), lambda: NoBackward.apply(x), (x,), torch.ones(8, 8))
    assert isinstance(times["fwd"], float)
    assert times["bwd"] == times["fwd+bwd"] == "RuntimeError: no backward here"


def _fake_gpu_run(module, monkeypatch, tmp_path, shapes, argv):
    """Runs ``module.main`` through the whole table/JSON loop on the CPU, pretending a GPU is present."""
    triton_testing = pytest.importorskip("triton.testing")
    common = module.common
    # read before CUDA is faked: with a CUDA build of torch, cuDNN's version check would ask for devices
    env = {**common.environment("cpu"), "device": "cuda"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(
        triton_testing, "do_bench", lambda fn, return_mode="mean": common.time_ms(fn, "cpu", reps=2, warmup=0)
    )
    monkeypatch.setattr(common, "environment", lambda device=None: env)
    monkeypatch.setattr(common, "roofline_rates", lambda device, dtype: {"copy_gbps": 100.0, "matmul_tflops": 1.0})
    monkeypatch.setattr(module, "SHAPES", shapes)
    monkeypatch.setattr(module, "time_impl", functools.partial(module.time_impl, device="cpu"))
    out = tmp_path / "result.json"
    assert module.main(argv + ["--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_attention_loop_on_cpu(attention, monkeypatch, tmp_path, capsys):
    shapes = {"small-a": (2, 20, 6, 2, 16), "small-b": (1, 9, 9, 1, 16)}
    data = _fake_gpu_run(
        attention,
        monkeypatch,
        tmp_path,
        shapes,
        ["--dtype", "fp32", "--impls", "eager", "sdpa-math", "--shapes", "small"],
    )
    rows = data["rows"]
    assert len(rows) == 2 * 2 * 3
    for row in rows:
        assert "error" not in row, row
        B, N, M, h, d = row["dims"]
        assert row["bytes"] == attention.minimal_bytes(B, N, M, h, d, 4, row["mode"])
        assert row["floor_ms"] == pytest.approx(row["bytes"] / 1e8)  # 100 GB/s; FLOPs at 1 TFLOP/s are smaller
        assert row["x_floor"] == pytest.approx(row["ms"] / row["floor_ms"])
    assert data["dtype"] == "fp32" and data["environment"]["torch"] == torch.__version__
    out = capsys.readouterr().out
    assert "x floor" in out and "small-b          fwd+bwd sdpa-math" in out


def test_format_speedups(attention):
    common = attention.common
    rows = [
        {"shape": "s", "mode": "fwd", "impl": "triton", "ms": 2.0},
        {"shape": "s", "mode": "fwd", "impl": "eager", "ms": 5.0},
        {"shape": "s", "mode": "bwd", "impl": "triton", "error": "x"},
        {"shape": "s", "mode": "bwd", "impl": "eager", "ms": 1.0},
        {"shape": "t", "mode": "fwd", "impl": "eager", "ms": 9.0},
    ]
    (line,) = common.format_speedups(rows, "s")
    assert line.split() == ["fwd", "triton", "speed-up", "vs", "eager", "2.50x"]
    assert common.format_speedups(rows, "t") == []


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the Triton kernels on CPU tensors need the interpreter, which "
    "a GPU machine does not run (gpu_suite.py's kernels phase runs this script there, on the GPU)",
)
def test_mixed_loop_on_cpu(mixed, monkeypatch, tmp_path):
    """The timing loop over the kernel (Triton's interpreter here) and eager, every mode."""
    shapes = {"tiny": (1, 20, 6, 2, 16)}
    data = _fake_gpu_run(mixed, monkeypatch, tmp_path, shapes, ["--dtype", "fp32", "--impls", "triton", "eager"])
    rows = data["rows"]
    assert [(r["impl"], r["mode"]) for r in rows] == [
        (i, m) for i in ("triton", "eager") for m in ("fwd", "bwd", "fwd+bwd")
    ]
    assert all("error" not in r and r["ms"] > 0 and r["flops"] == mixed.flops(*r["dims"], r["mode"]) for r in rows)


def test_upsample_loop_on_cpu(upsample, monkeypatch, tmp_path):
    shapes = {"crop": (1, 5, 6, 4, 2, 3, 3), "sr1": (2, 3, 3, 8, 1, 3, 3)}
    data = _fake_gpu_run(upsample, monkeypatch, tmp_path, shapes, ["--dtype", "fp32", "--impls", "eager"])
    rows = data["rows"]
    assert [(r["shape"], r["mode"]) for r in rows] == [(s, m) for s in shapes for m in ("fwd", "bwd", "fwd+bwd")]
    assert all("error" not in r and r["ms"] > 0 and r["x_floor"] > 0 for r in rows)
