"""CPU checks of the scorecard and README tables of a GPU run (benchmarks/report.py).

Phase files are made here as ``gpu_suite.py`` writes them: kernel rows through
``common.roofline_columns`` at chosen speeds, e2e rows as ``throughput.Row.to_dict()`` of the
core part's specs with chosen times. Each target's ratio, its verdict and its shortfall are
checked against hand-computed values, with the ways a measurement can be absent.
"""

from __future__ import annotations

import json
import pathlib

import pytest
from helpers import load_benchmark

COPY_GBPS = 3000.0


@pytest.fixture(scope="module")
def report():
    return load_benchmark("report")


@pytest.fixture(scope="module")
def suite():
    return load_benchmark("gpu_suite")


@pytest.fixture(scope="module")
def benches():
    return {name: load_benchmark(f"bench_{name}") for name in ("attention", "upsample")}


def record(phase: str, started: str, body: dict, commit: str = "abc1234def") -> dict:
    env = {
        "gpu": "NVIDIA H100 80GB HBM3",
        "driver": "580.159.04",
        "torch": "2.11.0+cu130",
        "triton": "3.6.0",
        "cuda": "13.0",
        "date": started,
    }
    return {
        "suite": "benchmarks/gpu_suite.py",
        "phase": phase,
        "dry_run": False,
        "started": started,
        "git_commit": commit,
        "git_changed": [],
        "environment": env,
        phase: body,
    }


def kernel_rows(benches, bench: str, shape: str, dtype: str, speeds: dict) -> list[dict]:
    """Rows of one bench child: ``speeds[(mode, impl)]`` is the % of copy bandwidth it reaches
    (None: an error row); its ms follow from the minimal bytes of the shape."""
    module = benches[bench]
    common = module.common
    dims = module.SHAPES[shape]
    rows = []
    for (mode, impl), pct in speeds.items():
        nbytes, nflops = module.minimal_bytes(*dims, 2, mode), module.flops(*dims, mode)
        row = {
            "bench": bench,
            "dtype": dtype,
            "shape": shape,
            "dims": dims,
            "mode": mode,
            "impl": impl,
            "bytes": nbytes,
            "flops": nflops,
        }
        if pct is None:
            row["error"] = "RuntimeError: No available kernel. Aborting execution."
        else:
            ms = nbytes / (pct / 100 * COPY_GBPS) / 1e6
            row.update(common.roofline_columns(ms, nbytes, nflops, {"copy_gbps": COPY_GBPS, "matmul_tflops": 800.0}))
        rows.append(row)
    return rows


def e2e_rows(suite, ips: dict, mem: dict | None = None, status: dict | None = None) -> list[dict]:
    """The core part's rows as phase_e2e records them (speed-ups added); ``ips[id]`` images/s
    (absent: skipped for budget), ``mem[id]`` peak MiB."""
    tp = suite.load_script("throughput")
    rows = []
    for item in suite.e2e_items("core", tp):
        row = tp.Row(**{**item["spec"], "resolution": tuple(item["spec"]["resolution"])})
        if item["id"] in ips:
            row.status, row.batch = (status or {}).get(item["id"], "ok"), row.batch_requested
            row.drop_path = row.drop_path_rate  # as throughput.attempt records it
            row.times_s, row.first_call_s = [row.batch / ips[item["id"]]] * 3, 1.0
            row.peak_mem_mib = (mem or {}).get(item["id"], 1000.0)
            if row.status != "ok":
                row.reason = "RuntimeError: CUDA out of memory\nmore"
        else:
            row.status, row.reason = "skipped", "budget: 60 s left"
        rows.append(row)
    tp.add_speedups(rows)
    return [row.to_dict() for row in rows]


# attention: triton at 80% of copy fwd (sdpa-flash errors, sdpa-efficient takes 0.9x its time); bwd at
# 60%, 1.2x the best SDPA. upsample: fwd 75% (eager 5x slower, compile 1.25x slower), bwd 71%, eager 3x, compile 2x
ATTN = {
    ("fwd", "triton"): 80.0,
    ("fwd", "sdpa-flash"): None,
    ("fwd", "sdpa-efficient"): 80.0 / 0.9,
    ("fwd", "eager"): 10.0,
    ("bwd", "triton"): 60.0,
    ("bwd", "sdpa-flash"): 50.0,
    ("bwd", "sdpa-math"): 5.0,
}
UPS = {
    ("fwd", "triton"): 75.0,
    ("fwd", "eager"): 15.0,
    ("fwd", "compile"): 60.0,
    ("bwd", "triton"): 71.0,
    ("bwd", "eager"): 71.0 / 3,
    ("bwd", "compile"): 35.5,
}
IPS = {
    "infer/restv2_tiny/reference": 4000.0,
    "infer/restv2_tiny/kernels": 5600.0,
    "infer/restv2_tiny/reference+compile": 5000.0,
    "infer/restv2_tiny/kernels+compile": 6500.0,
    "infer/convnext_tiny/timm": 5000.0,
    "infer/swin_tiny_patch4_window7_224/timm": 3000.0,
    "infer/convnext_tiny/timm+compile": 5000.0,
    "infer/swin_tiny_patch4_window7_224/timm+compile": 4000.0,
    "train/restv2_tiny/reference": 1000.0,
    "train/restv2_tiny/kernels": 1400.0,
    "features-fwd+bwd/restv2_tiny/reference": 10.0,
    "features-fwd+bwd/restv2_tiny/kernels": 12.0,
}
MEM = {"features-fwd+bwd/restv2_tiny/reference": 9000.0, "features-fwd+bwd/restv2_tiny/kernels": 5400.0}
EXPECTED = {  # target name: (value, status, shortfall)
    "attention tiny-s1-224 fwd: % of copy bandwidth": (80.0, "met", None),
    "attention tiny-s1-224 fwd: vs the best SDPA backend": (0.9, "missed", 0.1),
    "attention tiny-s1-224 bwd: % of copy bandwidth": (60.0, "missed", 10 / 70),
    "attention tiny-s1-224 bwd: vs the best SDPA backend": (1.2, "met", None),
    "upsample tiny-s1-224 fwd: % of copy bandwidth": (75.0, "met", None),
    "upsample tiny-s1-224 fwd: vs the eager chain": (5.0, "met", None),
    "upsample tiny-s1-224 fwd: vs the chain under torch.compile": (1.25, "missed", 0.05 / 1.3),
    "upsample tiny-s1-224 bwd: % of copy bandwidth": (71.0, "met", None),
    "upsample tiny-s1-224 bwd: vs the eager chain": (3.0, "missed", 0.25),
    "upsample tiny-s1-224 bwd: vs the chain under torch.compile": (2.0, "met", None),
    "restv2_tiny bf16 b256 inference: kernels vs reference": (1.4, "missed", 0.1 / 1.5),
    "restv2_tiny bf16 b256 inference: kernels+compile vs reference+compile": (1.3, "met", None),
    "restv2_tiny bf16 b256 inference, eager: best restv2_tiny path vs convnext_tiny": (1.12, "missed", 0.08 / 1.2),
    "restv2_tiny bf16 b256 inference, eager: best restv2_tiny path vs swin_tiny_patch4_window7_224": (
        5600 / 3000,
        "met",
        None,
    ),
    "restv2_tiny bf16 b256 inference, compiled: best restv2_tiny path vs convnext_tiny": (1.3, "met", None),
    "restv2_tiny bf16 b256 inference, compiled: best restv2_tiny path vs swin_tiny_patch4_window7_224": (
        6500 / 4000,
        "met",
        None,
    ),
    "restv2_tiny bf16 b128 training step: kernels vs reference": (1.4, "met", None),
    "restv2_tiny 800x1333 b2 features fwd+bwd: peak memory, kernels / reference": (0.6, "met", None),
    "restv2_tiny 800x1333 b2 features fwd+bwd: kernels vs reference": (1.2, "missed", 0.1 / 1.3),
}


def measured_run(report, suite, benches, tmp_path, **e2e) -> list[pathlib.Path]:
    kernels = [
        *kernel_rows(benches, "attention", "tiny-s1-224", "bf16", ATTN),
        *kernel_rows(benches, "upsample", "tiny-s1-224", "bf16", UPS),
        *kernel_rows(benches, "attention", "tiny-s1-224", "fp16", {("fwd", "triton"): 10.0}),
    ]
    files = []
    for phase, body in (("kernels", {"rows": kernels}), ("e2e", {"rows": e2e_rows(suite, IPS, MEM, **e2e)})):
        path = tmp_path / phase / f"{phase}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record(phase, f"2026-12-01T10:0{len(files)}:00+00:00", body)))
        files.append(path)
    return files


def test_targets_name_what_the_runner_measures(report, suite, benches):
    """Every target's shape is the benches' and the runner's kernels phase selects it; every
    end-to-end target's rows are core e2e rows, and they come first in its order."""
    common = benches["attention"].common
    for bench in ("attention", "upsample"):
        assert report.STAGE1 in common.select_shapes(benches[bench].SHAPES, suite.KERNEL_SHAPES[bench, "224"])
    tp = suite.load_script("throughput")
    items = suite.e2e_items("core", tp)
    spec_keys = [
        (
            s["model"],
            s["backend"] + ("+compile" if s["compile"] else ""),
            s["mode"],
            s["batch_requested"],
            tuple(s["resolution"]),
            s["precision"],
        )
        for s in (it["spec"] for it in items)
    ]
    needed = set()
    for t in report.TARGETS:
        if t.phase != "e2e":
            continue
        base = (t.mode, t.batch, tuple(t.resolution), "bf16")
        if t.against in (report.CONVNEXT, report.SWIN):
            suffix = "+compile" if t.label.endswith("+compile") else ""
            keys = [(report.TINY, b + suffix, *base) for b in ("reference", "kernels")] + [
                (t.against, "timm" + suffix, *base)
            ]
        else:
            keys = [(report.TINY, t.label, *base), (report.TINY, t.against, *base)]
        assert set(keys) <= set(spec_keys), t.name
        needed.update(keys)
    order = [key in needed for key in spec_keys]
    assert order == sorted(order, reverse=True), [it["id"] for it in items]  # every needed row before the others


def test_scorecard_of_a_measured_run(report, suite, benches, tmp_path, capsys):
    measured_run(report, suite, benches, tmp_path)
    assert report.main([str(tmp_path), "--json", str(tmp_path / "scorecard.json")]) == 0
    checks = json.loads((tmp_path / "scorecard.json").read_text())["scorecard"]
    assert [c["name"] for c in checks] == list(EXPECTED)
    for c in checks:
        value, status, shortfall = EXPECTED[c["name"]]
        assert c["value"] == pytest.approx(value, rel=1e-9), c
        assert c["status"] == status, c
        assert c["shortfall"] == (pytest.approx(shortfall, rel=1e-9) if shortfall is not None else None), c
    by_name = {c["name"]: c for c in checks}
    assert by_name["attention tiny-s1-224 fwd: vs the best SDPA backend"]["detail"].startswith("sdpa-efficient ")
    assert (
        "kernels+compile 6500 / timm+compile 5000"
        in by_name["restv2_tiny bf16 b256 inference, compiled: best restv2_tiny path vs convnext_tiny"]["detail"]
    )

    out = capsys.readouterr().out
    assert "| attention tiny-s1-224 bwd: % of copy bandwidth | 60.0% | >= 70.0% | missed by 14% |" in out
    assert (
        "Measured on NVIDIA H100 80GB HBM3, driver 580.159.04, torch 2.11.0+cu130, triton 3.6.0, CUDA 13.0; "
        "2026-12-01, commit abc1234 (kernels.json)." in out
    )
    # the kernel table: triton's columns, and its speed-up over eager and over the fastest other impl
    assert "| attention | tiny-s1-224 | bf16 | fwd | " in out and "| 8.00x | 0.90x sdpa-efficient |" in out
    assert "| attention | tiny-s1-224 | fp16 | fwd | " in out
    assert "| restv2_tiny | kernels | infer | bf16 | 256 | 224x224 | 5600.0 | 1.40x | 1000 |" in out
    assert "| convnext_tiny | timm+compile | infer | bf16 | 256 | 224x224 | 5000.0 | 1.00x |" in out
    assert "| restv2_tiny | kernels+compile | train | bf16 | 128 | 224x224 | budget: 60 s left" not in out
    # the training rows ran at restv2_tiny's stochastic depth, and say so
    assert "| restv2_tiny | kernels | train, drop path 0.1 | bf16 | 128 | 224x224 | 1400.0 | 1.40x |" in out
    assert "skipped (budget: 60 s left)" in out


def test_absent_measurements_are_not_judged(report, suite, benches, tmp_path):
    """An error row, a skipped row, no row at all, or the two rows of a ratio from different runs:
    ``not measured``, with why; never a verdict from half a measurement."""
    measured_run(report, suite, benches, tmp_path, status={"train/restv2_tiny/kernels": "error"})
    res = report.load([tmp_path])
    checks = {c.target.name: c for c in report.scorecard(res, "bf16")}
    train = checks["restv2_tiny bf16 b128 training step: kernels vs reference"]
    assert (train.status, train.value) == ("not measured", None)
    assert train.detail == "kernels: error (RuntimeError: CUDA out of memory)"

    fp16 = {c.target.name: c for c in report.scorecard(res, "fp16", phases=["kernels"])}
    assert fp16["attention tiny-s1-224 fwd: % of copy bandwidth"].status == "missed"
    assert fp16["attention tiny-s1-224 fwd: % of copy bandwidth"].value == pytest.approx(10.0)
    sdpa = fp16["attention tiny-s1-224 fwd: vs the best SDPA backend"]
    assert (sdpa.status, sdpa.detail) == ("not measured", "no sdpa-* row")
    assert fp16["upsample tiny-s1-224 bwd: vs the eager chain"].detail == "no triton fp16 row"

    # a later e2e run that measured only the reference: its row replaces the earlier one, the
    # kernels row is the earlier run's, so the ratio would mix two runs
    later = e2e_rows(suite, {"infer/restv2_tiny/reference": 4100.0})
    (tmp_path / "e2e-again").mkdir()
    (tmp_path / "e2e-again" / "e2e.json").write_text(
        json.dumps(record("e2e", "2026-12-02T09:00:00+00:00", {"rows": later}))
    )
    checks = {c.target.name: c for c in report.scorecard(report.load([tmp_path]))}
    mixed = checks["restv2_tiny bf16 b256 inference: kernels vs reference"]
    assert mixed.status == "not measured" and mixed.detail.startswith("not from one run: ")
    kept = checks["restv2_tiny bf16 b128 training step: kernels vs reference"]  # skipped later: the earlier rows stand
    assert kept.detail == "kernels: error (RuntimeError: CUDA out of memory)"


def test_a_later_kernel_run_replaces_the_whole_group(report, suite, benches, tmp_path):
    measured_run(report, suite, benches, tmp_path)
    again = kernel_rows(
        benches, "attention", "tiny-s1-224", "bf16", {("fwd", "triton"): 90.0, ("fwd", "sdpa-math"): 9.0}
    )
    (tmp_path / "kernels-again").mkdir()
    (tmp_path / "kernels-again" / "kernels.json").write_text(
        json.dumps(record("kernels", "2026-12-02T09:00:00+00:00", {"rows": again}))
    )
    checks = {c.target.name: c for c in report.scorecard(report.load([tmp_path]), phases=["kernels"])}
    assert checks["attention tiny-s1-224 fwd: % of copy bandwidth"].value == pytest.approx(90.0)
    assert checks["attention tiny-s1-224 fwd: vs the best SDPA backend"].value == pytest.approx(10.0)
    assert checks["attention tiny-s1-224 bwd: % of copy bandwidth"].detail == "no triton bf16 row"  # not the old 60%
    assert checks["upsample tiny-s1-224 fwd: % of copy bandwidth"].value == pytest.approx(75.0)  # untouched


def test_command_line_errors(report, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path / "missing")])
    assert exc.value.code == 2 and "no such file or folder" in capsys.readouterr().err
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path)])
    assert exc.value.code == 2 and "no gpu_suite phase file" in capsys.readouterr().err


def test_dry_runs_measure_nothing(report, suite, tmp_path, capsys):
    for phase in ("kernels", "e2e"):
        assert suite.main(["--phase", phase, "--out", str(tmp_path / phase), "--dry-run", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "scorecard (bf16; a dry run measures nothing)" in out
    data = json.loads((tmp_path / "e2e" / "e2e.json").read_text())
    assert {c["phase"] for c in data["scorecard"]} == {"e2e"} and len(data["scorecard"]) == 9
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("| not measured |") == len(report.TARGETS)
    assert "No measured phase file" in out
