"""benchmarks/kernel_profile.py: the trace reading and tables on made-up events, and a real profiled
step on the device at hand (on a CPU the operators stand in for kernels)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_benchmark


@pytest.fixture(scope="module")
def kp():
    return load_benchmark("kernel_profile")


OURS = {"_attn_fwd_kernel": "restv2.attention", "_upsample_bwd_g_kernel": "restv2.upsample"}


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("_attn_fwd_kernel", "restv2.attention"),
        ("triton_poi_fused_add_gelu_0", "compiled (inductor)"),
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_cudnn", "conv"),
        ("void conv_depthwise2d_forward_kernel<c10::BFloat16>", "conv"),
        ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNN", "gemm"),
        ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", "gemm"),
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96, 128, 64, 4>>", "attention/softmax"),
        ("void cunn_SoftMaxForward<4, c10::BFloat16, float, float>", "attention/softmax"),
        ("void at::native::vectorized_layer_norm_kernel<c10::BFloat16, float, true>", "norm"),
        ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor>", "optimizer"),
        ("void at::native::elementwise_kernel<128, 2, gpu_kernel_impl_nocast<direct_copy_kernel_cuda>>", "copy/layout"),
        ("Memset (Device)", "copy/layout"),
        ("void at::native::reduce_kernel<512, 1, ReduceOp<float, MeanOps<float, float>>>", "reduce"),
        ("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>", "elementwise"),
        ("some_new_kernel", "other"),
    ],
)
def test_kernel_category(kp, name, category):
    assert kp.kernel_category(name, OURS) == category


def test_our_kernels_are_the_packages_triton_kernels(kp):
    pytest.importorskip("triton")
    ours = kp.our_kernels()
    assert ours["_attn_bwd_dkdv_kernel"] == "restv2.attention" and ours["_upsample_fwd_kernel"] == "restv2.upsample"
    assert set(ours.values()) == {f"restv2.{p}" for p in kp.KERNEL_PACKAGES}


def test_busy_time_counts_overlaps_once(kp):
    events = [("a", 0.0, 10.0), ("b", 5.0, 10.0), ("c", 30.0, 5.0), ("d", 31.0, 1.0)]
    assert kp.busy_us(events) == 20.0  # [0, 15] and [30, 35]
    assert kp.busy_us([]) == 0.0


def test_summarize_per_step_tables(kp):
    events = [
        ("_attn_fwd_kernel", 0.0, 300.0),
        ("nvjet_gemm", 400.0, 100.0),  # step 1
        ("_attn_fwd_kernel", 1000.0, 300.0),
        ("nvjet_gemm", 1400.0, 100.0),
        ("tiny", 1600.0, 2.0),
    ]  # step 2
    s = kp.summarize(events, steps=2, wall_s=2e-3, ours=OURS, top=1)
    assert s["wall_ms"] == pytest.approx(1.0) and s["busy_ms"] == pytest.approx(0.401)
    assert s["kernel_ms"] == pytest.approx(0.401) and s["launches"] == 2.5
    assert s["categories"] == pytest.approx({"restv2.attention": 0.3, "gemm": 0.1, "other": 0.001})
    assert list(s["categories"]) == ["restv2.attention", "gemm", "other"]  # largest first
    first, rest = s["kernels"]
    assert (first["name"], first["calls"], first["ms"]) == ("_attn_fwd_kernel", 1.0, pytest.approx(0.3))
    assert first["share"] == pytest.approx(600 / 802)
    assert rest["name"] == "(other kernels: 2)" and rest["calls"] == 1.5 and rest["ms"] == pytest.approx(0.101)


def test_cpu_trace_self_times(kp):
    """Nested operators: each keeps its own time only; threads are nested separately."""
    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "cpu_op", "name": "outer", "pid": 1, "tid": 1, "ts": 0, "dur": 100},
            {"ph": "X", "cat": "cpu_op", "name": "inner", "pid": 1, "tid": 1, "ts": 10, "dur": 30},
            {"ph": "X", "cat": "cpu_op", "name": "leaf", "pid": 1, "tid": 1, "ts": 15, "dur": 10},
            {"ph": "X", "cat": "cpu_op", "name": "next", "pid": 1, "tid": 1, "ts": 50, "dur": 20},
            {"ph": "X", "cat": "cpu_op", "name": "other_thread", "pid": 1, "tid": 2, "ts": 20, "dur": 40},
            {"ph": "X", "cat": "user_annotation", "name": "step", "pid": 1, "tid": 1, "ts": 0, "dur": 100},
            {"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 7, "ts": 5, "dur": 8},
        ]
    }
    cpu = {name: (start, dur) for name, start, dur in kp.trace_events(trace, "cpu")}
    assert cpu == {"outer": (0, 50), "inner": (10, 20), "leaf": (15, 10), "next": (50, 20), "other_thread": (20, 40)}
    assert kp.trace_events(trace, "cuda") == [("k", 5.0, 8.0)]


def test_profile_row_on_the_device(kp, tmp_path, device):
    """Real profiled steps of the reference model: tables and a chrome trace that read back."""
    tp = kp.throughput
    row = tp.Row(
        model="restv2_tiny",
        family="restv2",
        backend="reference",
        compile=False,
        protocol="modern",
        mode="infer",
        precision="fp32",
        resolution=(32, 32),
        batch_requested=2,
        warmup=1,
        iters=1,
    )
    trace = tmp_path / "trace.json"
    s = kp.profile_row(row, torch.device(device), steps=2, ours=OURS, trace_path=trace)
    assert s["steps"] == 2 and s["batch"] == 2 and s["first_call_s"] > 0 and s["wall_ms"] > 0
    assert 0 < s["busy_ms"] and s["kernel_ms"] >= s["busy_ms"] * 0.999
    assert sum(s["categories"].values()) == pytest.approx(s["kernel_ms"])
    assert sum(k["share"] for k in s["kernels"]) == pytest.approx(1.0)
    assert {"conv", "gemm", "norm"} <= set(s["categories"])  # the patch embed, the linears, the LayerNorms
    if device == "cpu":
        assert {"aten::mkldnn_convolution", "aten::native_layer_norm"} & {k["name"] for k in s["kernels"]}
    assert json.loads(trace.read_text())["traceEvents"]


def test_main_prints_tables(kp, capsys):
    assert (
        kp.main(
            [
                "--batch",
                "1",
                "--resolution",
                "32x32",
                "--warmup",
                "1",
                "--steps",
                "1",
                "--backends",
                "reference",
                "kernels",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "**restv2_tiny infer bf16 batch 1 32x32**" in out and "| host wall |" in out and "| reference |" in out
    if not torch.cuda.is_available():
        assert "kernels: skipped" in out
