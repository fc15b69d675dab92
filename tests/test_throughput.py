"""Smoke test of benchmarks/throughput.py: a tiny run into a temporary folder, no compiler needed."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types

import pytest
import torch
from helpers import load_benchmark


@pytest.fixture(scope="module")
def throughput():
    return load_benchmark("throughput")


def test_tiny_run_writes_json(throughput, tmp_path, capsys):
    argv = [
        "--models",
        "restv2_tiny",
        "--backends",
        "reference",
        "kernels",
        "--protocol",
        "paper",
        "--batch",
        "1",
        "--resolution",
        "64x64",
        "--warmup",
        "1",
        "--iters",
        "2",
        "--no-peers",
        "--out-dir",
        str(tmp_path),
        "--tag",
        "smoke",
    ]
    assert throughput.main(argv) == 0
    out = capsys.readouterr().out
    assert "restv2_tiny" in out and "img/s" in out

    (path,) = tmp_path.glob("throughput_*_smoke.json")
    data = json.loads(path.read_text())
    env = data["environment"]
    for key in ("date", "command", "python", "platform", "torch", "triton", "cuda", "gpu", "driver"):
        assert key in env
    assert data["config"]["models"] == ["restv2_tiny"]

    rows = {r["label"]: r for r in data["rows"]}
    assert set(rows) == {"reference", "kernels"}
    ref = rows["reference"]
    assert ref["status"] == "ok", ref["reason"]
    assert ref["batch"] == 1 and ref["resolution"] == [64, 64]
    assert len(ref["times_s"]) == 2 and all(t > 0 for t in ref["times_s"])
    assert ref["images_per_s_median"] > 0 and ref["speedup"] == pytest.approx(1.0)
    assert ref["first_call_s"] > 0
    if torch.cuda.is_available():
        assert ref["peak_mem_mib"] > 0
    else:
        assert ref["peak_mem_mib"] is None
        assert rows["kernels"]["status"] == "skipped" and "CUDA" in rows["kernels"]["reason"]

    if importlib.util.find_spec("matplotlib") is not None:
        assert path.with_suffix(".png").stat().st_size > 0


def test_features_rows(throughput, tmp_path):
    argv = [
        "--models",
        "restv2_tiny",
        "--backends",
        "reference",
        "--features",
        "--batch",
        "1",
        "--resolution",
        "32x48",
        "--warmup",
        "1",
        "--iters",
        "1",
        "--no-peers",
        "--no-plot",
        "--out-dir",
        str(tmp_path),
    ]
    assert throughput.main(argv) == 0
    (path,) = tmp_path.glob("throughput_*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["features-fwd", "features-fwd+bwd"]
    assert all(r["status"] == "ok" for r in rows), [r["reason"] for r in rows]


def test_plan_puts_peers_after_their_model(throughput):
    args = throughput.build_parser().parse_args(
        [
            "--models",
            "restv2_tiny",
            "restv2_base",
            "--backends",
            "reference",
            "reference+compile",
            "--protocol",
            "both",
            "--peers",
        ]
    )
    rows = throughput.plan_rows(throughput.resolve(args, cuda=True))
    first = [(r.model, r.label) for r in rows if r.protocol == "paper"]
    assert first[:4] == [
        ("restv2_tiny", "reference"),
        ("restv2_tiny", "reference+compile"),
        ("swin_tiny_patch4_window7_224", "timm"),
        ("swin_tiny_patch4_window7_224", "timm+compile"),
    ]
    assert {r.protocol for r in rows} == {"paper", "modern"}
    paper, modern = rows[0], next(r for r in rows if r.protocol == "modern")
    assert (paper.precision, paper.batch_requested, paper.warmup, paper.iters) == ("fp32", 64, 50, 30)
    assert (modern.precision, modern.batch_requested) == ("bf16", 256)


def test_training_rows_run_at_the_models_stochastic_depth(throughput, tmp_path):
    """The modes that train build the model with the drop path it trains with (a peer: its ResT
    model's), inference rows with none, ``--drop-path`` any other; the JSON records the rate."""
    args = throughput.resolve(
        throughput.build_parser().parse_args(["--models", "restv2_tiny", "restv2_base", "--train", "--peers"]), True
    )
    rates = {(r.model, r.mode): r.drop_path_rate for r in throughput.plan_rows(args)}
    assert rates[("restv2_tiny", "train")] == 0.1 and rates[("restv2_base", "train")] == 0.3
    assert rates[("convnext_tiny", "train")] == 0.1 and rates[("convnext_small", "train")] == 0.3
    args.drop_path = 0.0
    assert {r.drop_path_rate for r in throughput.plan_rows(args)} == {0.0}
    infer = throughput.plan_rows(throughput.resolve(throughput.build_parser().parse_args([]), cuda=True))
    assert {r.drop_path_rate for r in infer} == {0.0}
    row = throughput.Row.from_label(
        "restv2_tiny", "reference", mode="features-fwd+bwd", protocol="modern", precision="fp32",
        resolution=(32, 32), batch_requested=1, warmup=1, iters=1,
    )  # fmt: skip
    drops = [m.drop_prob for m in throughput.build_model(row, torch.device("cpu")).modules() if hasattr(m, "drop_prob")]
    assert max(drops) == pytest.approx(0.1)
    throughput.attempt(row, 1, torch.device("cpu"), lambda text: None)
    assert row.to_dict()["drop_path"] == 0.1


def test_cpu_defaults_are_reduced(throughput):
    args = throughput.resolve(throughput.build_parser().parse_args([]), cuda=False)
    rows = throughput.plan_rows(args)
    assert {r.model for r in rows} == {"restv2_tiny"} and not args.peers
    assert all(r.batch_requested == 8 and r.resolution == (224, 224) for r in rows)
    assert {r.label for r in rows} == set(throughput.BACKENDS)
    assert all(throughput.skip_reason(r, cuda=False) for r in rows if r.backend == "kernels")


def test_resolution_and_flags(throughput):
    assert throughput.parse_resolution("800x1333") == (800, 1333)
    assert throughput.parse_resolution("224") == (224, 224)
    with pytest.raises(SystemExit):
        throughput.main(["--train", "--features"])


def test_results_path_never_overwrites(tmp_path):
    common = sys.modules.get("common") or load_benchmark("common")
    first = common.results_path("throughput", "json", device="cpu", out_dir=tmp_path)
    assert first.name.startswith("throughput_cpu_") and first.suffix == ".json"
    first.write_text("{}")
    second = common.results_path("throughput", "json", device="cpu", out_dir=tmp_path)
    assert second != first and not second.exists()


def _fake_timm() -> types.ModuleType:
    """A stand-in for timm: tiny conv nets; swin fails at non-224 sizes, as the real one may."""
    timm = types.ModuleType("timm")
    timm.__spec__ = importlib.machinery.ModuleSpec("timm", None)

    class Tiny(torch.nn.Module):
        def __init__(self, features_only: bool):
            super().__init__()
            self.features_only = features_only
            self.convs = torch.nn.ModuleList(torch.nn.Conv2d(3 if i == 0 else 8, 8, 3, 2, 1) for i in range(4))
            self.head = torch.nn.Linear(8, 1000)

        def forward(self, x):
            maps = []
            for conv in self.convs:
                x = conv(x)
                maps.append(x)
            return maps if self.features_only else self.head(x.mean((2, 3)))

    def create_model(name, pretrained=False, features_only=False, img_size=None, **kwargs):
        assert not pretrained
        if name.startswith("swin") and img_size is not None:
            raise ValueError(f"{name}: input size {img_size} not supported")
        return Tiny(features_only)

    timm.create_model = create_model
    return timm


@pytest.mark.parametrize("features", [False, True], ids=["infer", "features"])
def test_peers_run_and_record_errors(throughput, tmp_path, monkeypatch, features):
    monkeypatch.setitem(sys.modules, "timm", _fake_timm())
    # kernels: skipped without CUDA, so only the stand-in peers run here (their speed-up is against timm eager)
    argv = [
        "--models",
        "restv2_tiny",
        "--backends",
        "kernels",
        "--peers",
        "--batch",
        "1",
        "--resolution",
        "64x64",
        "--warmup",
        "1",
        "--iters",
        "1",
        "--no-plot",
        "--out-dir",
        str(tmp_path),
    ]
    assert throughput.main(argv + (["--features"] if features else [])) == 0
    (path,) = tmp_path.glob("throughput_*.json")
    rows = json.loads(path.read_text())["rows"]
    by = {(r["model"], r["mode"]): r for r in rows}
    mode = "features-fwd" if features else "infer"
    swin = by[("swin_tiny_patch4_window7_224", mode)]
    assert swin["status"] == "error" and "not supported" in swin["reason"]
    for peer in ("convnext_tiny", "pvt_v2_b2"):
        row = by[(peer, mode)]
        assert row["status"] == "ok" and row["anchor"] == "restv2_tiny" and row["label"] == "timm"
        assert row["speedup"] == pytest.approx(1.0)


def test_oom_halves_the_batch(throughput, monkeypatch):
    tried = []

    def fake_attempt(row, batch, device, progress):
        tried.append(batch)
        if batch > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        row.batch, row.times_s, row.first_call_s = batch, [0.5], 1.0

    monkeypatch.setattr(throughput, "attempt", fake_attempt)
    monkeypatch.setattr(throughput, "free_memory", lambda device: None)
    row = throughput.Row(
        "restv2_tiny",
        "restv2",
        "reference",
        False,
        "modern",
        "infer",
        "bf16",
        (224, 224),
        batch_requested=64,
        warmup=1,
        iters=1,
    )
    throughput.run_row(row, torch.device("cuda"), lambda text: None)
    assert tried == [64, 32, 16] and row.oom_batches == [64, 32]
    assert row.status == "ok" and row.batch == 16 and row.ips_median == 32
