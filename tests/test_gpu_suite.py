"""CPU checks of the GPU runner (benchmarks/gpu_suite.py): what it writes, and its parts that need no GPU.

- Every phase's ``--dry-run``: exit 0, at most 3 files with names the remote tool brings back, two
  folders deep under ``$OUT`` (``$OUT/<phase>/<phase>.json``), JSON with the phase, ``dry_run``, the
  environment, provenance and the phase's own keys; the summary printed last.
- Without ``--dry-run`` and without CUDA a phase refuses, with a clear message and no files.
- The JUnit parsing of the tests phase, the budget plan, the worker supervision (a crash, a hang),
  and the sweep and e2e workers' code on the device at hand (the interpreter on the CPU).
"""

from __future__ import annotations

import ast
import collections
import contextlib
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch
from helpers import load_benchmark

PHASES = ("env", "tests", "kernels", "e2e", "sweep", "profile")
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
COMMON_KEYS = {
    "suite",
    "phase",
    "tag",
    "dry_run",
    "status",
    "command",
    "argv",
    "started",
    "wall_s",
    "budget_s",
    "git_commit",
    "git_changed",
    "tree_sha256",
    "environment",
    "files",
    "work",
    "summary",
}


@pytest.fixture(scope="module")
def suite():
    return load_benchmark("gpu_suite")


@pytest.fixture(scope="module")
def dry_runs(suite, tmp_path_factory):
    """Every phase's dry run into one $OUT, as a GPU session would lay it out: {phase: (rc, stdout)}."""
    out = tmp_path_factory.mktemp("OUT")
    results = {}
    for phase in PHASES:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc = suite.main(["--phase", phase, "--out", str(out / phase), "--dry-run"])
        results[phase] = (rc, stdout.getvalue())
    return out, results


@pytest.mark.parametrize("phase", PHASES)
def test_dry_run_files(dry_runs, phase):
    out, results = dry_runs
    rc, stdout = results[phase]
    assert rc == 0, stdout
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.relative_to(out).parts[0] == phase)
    assert 2 <= len(files) <= 3, files  # JSON + log (+ PNG or zip)
    for path in files:
        rel = path.relative_to(out)
        assert len(rel.parts) == 2, rel  # $OUT/<phase>/<file>: within the remote tool's two folders
        assert all(NAME.match(part) for part in rel.parts), rel
        assert path.stat().st_size <= 16 << 20
    assert {p.name for p in files} <= {f"{phase}.json", f"{phase}.log", f"{phase}.png", f"{phase}.zip"}
    data = json.loads((out / phase / f"{phase}.json").read_text())
    assert COMMON_KEYS <= set(data) and phase in data
    assert data["phase"] == phase and data["dry_run"] is True and data["status"] == "complete"
    assert data["environment"]["torch"] == torch.__version__ and "gpu" in data["environment"]
    assert sorted(data["files"]) == sorted(p.name for p in files)
    assert "--dry-run" in data["command"] and data["wall_s"] < 60
    assert all(item["status"] in ("planned", "skipped") for item in data["work"]), data["work"]
    assert data["summary"]
    # the summary comes last: the remote tool returns only the last 12,000 characters
    tail = stdout.rstrip().splitlines()
    assert tail[-1].startswith("files: ") and f"gpu_suite {phase} (dry run): complete" in stdout[-12000:]
    assert (out / phase / f"{phase}.log").read_text().rstrip().endswith(tail[-1])


def test_all_phases_fit_the_remote_limits(dry_runs):
    out, _ = dry_runs
    per_phase = {phase: [p for p in (out / phase).iterdir()] for phase in PHASES}
    assert all(len(files) <= 3 for files in per_phase.values())  # one phase a command, 8 files a command at most
    assert not [p for p in out.rglob("*") if len(p.relative_to(out).parts) > 2]


def test_dry_run_phase_contents(dry_runs):
    out, results = dry_runs

    def load(phase: str) -> dict:
        return json.loads((out / phase / f"{phase}.json").read_text())[phase]

    env = load("env")
    assert {"sm_count", "l2_cache_mib", "target", "copy_gbps", "matmul_tflops", "nvidia_smi"} <= set(env)
    assert env["copy_gbps"] is None and env["target"] is None

    tests = load("tests")
    assert [r["marker"] for r in tests["runs"]] == [
        "(cuda or bf16) and not inductor",
        "cuda and inductor",
        "not cuda and not bf16",
    ]
    for run in tests["runs"]:
        assert "-p no:cacheprovider" in run["argv"] and "--junitxml=" in run["argv"] and "-rfE" in run["argv"]
        assert "-x" not in run["argv"].split() and run["counts"] is None
        assert "--ignore=tests/test_targets.py" in run["argv"].split()
    assert "TRITON_INTERPRET removed" in results["tests"][1]

    kernels = load("kernels")
    assert [r["id"] for r in kernels["runs"]][:4] == [
        "attention/bf16/224",
        "upsample/bf16/224",
        "attention_mixed/bf16/224",
        "attention/bf16/det",
    ]
    assert len(kernels["runs"]) == 3 * 3 * 2 and kernels["rows"] == []
    assert {r["dtype"] for r in kernels["runs"]} == {"bf16", "fp16", "fp32"}

    e2e = load("e2e")
    ids = [f"{r['mode']}/{r['model']}/{r['label']}" for r in e2e["rows"]]
    assert ids[:4] == [
        f"infer/restv2_tiny/{b}" for b in ("reference", "kernels", "reference+compile", "kernels+compile")
    ]
    assert {"train/restv2_tiny/kernels", "features-fwd/restv2_tiny/kernels", "infer/convnext_tiny/timm+compile"} <= set(
        ids
    )
    assert all(r["status"] == "planned" and r["images_per_s_median"] is None for r in e2e["rows"])
    assert "skip (budget)" in results["e2e"][1]  # the compile rows past the budget are listed, not dropped
    # the kernel rows' plans compiled first (counted in the plan), by the target check on this GPU's target
    assert (
        e2e["precompile"]["status"] == "planned" and "--dtypes bf16 --models restv2_tiny" in e2e["precompile"]["argv"]
    )
    assert "would first compile the kernel rows' launch plans" in results["e2e"][1]

    sweep = load("sweep")
    families = {
        "attn_fwd",
        "attn_bwd",
        "mixed_fwd",
        "mixed_bwd",
        "upsample_fwd",
        "upsample_bwd",
        "upsample_bwd_dv",
        "linear_gelu_fwd",
        "linear_gelu_bwd",
        "add_ln_fwd",
        "add_ln_bwd",
        "pixel_attention_fwd",
        "pixel_attention_bwd",
        "pixel_attention_bwd_dx",
        "bias_relu",
        "bn_stats",
        "bn_relu_fwd",
        "bn_relu_bwd_sums",
        "bn_relu_bwd_dx",
    }
    assert {b["family"] for b in sweep["best"]} == families
    stem = {"bias_relu", "bn_stats", "bn_relu_fwd", "bn_relu_bwd_sums", "bn_relu_bwd_dx"}  # 4 stem maps
    mixed = {"mixed_fwd", "mixed_bwd"}  # rest_small's and rest_large's three stages, and one at 800x1333
    assert len(sweep["best"]) == (len(families) - len(stem) - len(mixed)) * 5 + len(stem) * 4 + len(mixed) * 7 and all(
        b["current_ms"] is None and b["current_plan"] for b in sweep["best"]
    )
    assert {c["cid"] for c in sweep["candidates"] if c["family"] == "attn_fwd"} >= {"current", "n128.m64.w8.s3"}
    assert sweep["dry_run_counts"]["upsample_fwd/tiny-s4-224-b256"]["pruned"] > 0
    assert re.search(r"^family +\| shape +\| dtype \| current plan", results["sweep"][1], re.M)
    assert "more shapes in sweep.json" in results["sweep"][1]  # all families at once: the table is cut

    profile = load("profile")
    ids = [r["id"] for r in profile["rows"]]
    assert ids[:2] == ["infer/restv2_tiny/reference", "infer/restv2_tiny/kernels"]
    assert {
        "train/restv2_tiny/kernels",
        "features-fwd+bwd/restv2_tiny/kernels",
        "op/attention/tiny-s1-224-b256",
        "infer/restv2_tiny/kernels+compile",
    } <= set(ids)
    assert all(r["status"] == "planned" and r["result"] is None for r in profile["rows"])
    assert profile["precompile"]["inputs"] == {"restv2_tiny": ["224x224x256", "224x224x128", "800x1333x2"]}
    assert "restv2_tiny train bf16 batch 128 224x224: not profiled" in results["profile"][1]


def test_kernel_items_select_their_scripts_shapes(suite):
    """Each kernels item's ``--shapes`` picks, in its own script, the shapes of its group: a wrong
    name would surface only on a GPU, as an item that ends without results."""
    import common

    args = suite.build_parser().parse_args(["--phase", "kernels", "--out", "unused", "--dry-run"])
    assert args.groups == ["224", "det"]
    args.dtypes, args.groups = suite.PHASE_DTYPES["kernels"], list(suite.SHAPE_GROUPS)
    items = suite.kernel_items(args, suite.pathlib.Path("unused"))
    assert {(it["bench"], it["group"]) for it in items} == set(suite.KERNEL_SHAPES)
    for item in items:
        script = load_benchmark(f"bench_{item['bench']}")
        wanted = item["cmd"][item["cmd"].index("--shapes") + 1 : item["cmd"].index("--out")]
        chosen = common.select_shapes(script.SHAPES, wanted)
        if item["group"] == "det":
            assert all(name.startswith("det") and dims[0] == 2 for name, dims in chosen.items()), item["id"]
        elif item["group"] == "s1":  # the kernel targets' shape (report.STAGE1), alone
            assert list(chosen) == ["tiny-s1-224"] and chosen["tiny-s1-224"][0] == 128, item["id"]
        else:
            assert all(name.endswith("-224") and dims[0] == 128 for name, dims in chosen.items()), item["id"]
    mixed = common.select_shapes(
        load_benchmark("bench_attention_mixed").SHAPES, suite.KERNEL_SHAPES["attention_mixed", "224"]
    )
    assert len(mixed) == 6  # rest_small's and rest_large's three mixed stages


# ----------------------------------------------------------------------------- plans


def test_plans_fit_the_lease(suite):
    """Every plan of the schedule: at most 8 files (what the remote tool brings back of a command),
    step tags unique across the schedule (their folders meet under benchmarks/results/<gpu-slug>/)
    and named as the tool brings back, each step's arguments taken by its phase and choosing work,
    at most two plans a lease, listed in lease order."""
    tp = suite.load_script("throughput")
    tags = [step.tag for plan in suite.PLANS.values() for step in plan.steps]
    assert len(tags) == len(set(tags)) and all(NAME.match(tag) for tag in tags)
    leases = [plan.lease for plan in suite.PLANS.values()]
    assert leases == sorted(leases) and max(collections.Counter(leases).values()) <= 2
    for plan in suite.PLANS.values():
        assert plan.files() <= suite.REMOTE_MAX_FILES, plan.name
        for step in plan.steps:
            args = _step_args(suite, step)
            assert (args.phase, args.tag, args.budget_s, args.dry_run) == (step.phase, step.tag, 100, True)
            assert step.phase not in ("kernels", "e2e") or _step_work(suite, tp, step), step.tag


def _step_args(suite, step):
    """The arguments a step's child command parses, with a budget of 100 s, as a dry run."""
    return suite.build_parser().parse_args(suite.step_command(step, pathlib.Path("o"), 100, True)[2:])


def _step_work(suite, tp, step) -> set[str]:
    """What a step measures: e2e row ids, or kernels (bench, dtype, group)."""
    args = _step_args(suite, step)
    if step.phase == "e2e":
        return {it["id"] for it in suite.select_rows(suite.e2e_items(args.part, tp), args.rows)}
    if step.phase == "kernels":
        args.dtypes = args.dtypes or suite.PHASE_DTYPES["kernels"]
        return {f"{it['bench']}/{it['dtype']}/{it['group']}" for it in suite.kernel_items(args, pathlib.Path("u"))}
    return set()


def test_the_first_leases_measure_every_target(suite):
    """Lease 1 measures every kernel target and every eager end-to-end target, lease 2 the compiled
    ones; the rows a target divides come from one step (report.py takes a ratio within one run)."""
    report = load_benchmark("report")
    tp = suite.load_script("throughput")
    steps = {lease: [s for p in suite.PLANS.values() if p.lease == lease for s in p.steps] for lease in (1, 2)}
    for target in report.TARGETS:
        compiled = (target.label or "").endswith("+compile")
        lease = 2 if compiled else 1
        if target.phase == "kernels":
            needed = {f"{target.bench}/bf16/s1"}
        elif target.against in (report.CONVNEXT, report.SWIN):
            needed = {f"infer/{report.TINY}/{target.label}", f"infer/{target.against}/timm{'+compile' * compiled}"}
        else:
            needed = {f"{target.mode}/{report.TINY}/{label}" for label in (target.label, target.against)}
        assert any(needed <= _step_work(suite, tp, step) for step in steps[lease]), (target.name, needed)


def test_plan_dry_run(suite, tmp_path, capsys):
    """``--plan first --dry-run``: each step a child dry run into $OUT/<tag>/, with its cap or what
    the steps before it leave by their estimates; the files within the remote tool's limits; the
    recap (each step's summary) last."""
    out = tmp_path / "OUT"
    assert suite.main(["--plan", "first", "--out", str(out), "--dry-run"]) == 0
    stdout = capsys.readouterr().out
    plan = suite.PLANS["first"]
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    charts = [f"{step.tag}/{step.tag}.png" for step in plan.steps if step.files() == 3]  # where matplotlib is
    expected = [f"{step.tag}/{step.tag}.{ext}" for step in plan.steps for ext in ("json", "log")]
    assert sorted(map(str, files)) == sorted(expected + (charts if suite._has("matplotlib") else []))
    assert len(expected + charts) == plan.files() <= 8
    assert all(len(f.parts) == 2 and all(NAME.match(part) for part in f.parts) for f in files), files
    records = {step.tag: json.loads((out / step.tag / f"{step.tag}.json").read_text()) for step in plan.steps}
    assert all(r["dry_run"] and r["status"] == "complete" for r in records.values())
    assert records["env"]["budget_s"] == 60 and records["tests-cuda"]["budget_s"] == 150  # their caps
    assert records["tests-cuda"]["tests"]["runs"][0]["marker"] == "(cuda or bf16) and not inductor"
    assert records["kernels-s1"]["budget_s"] < 300 - 60  # what the estimates of the steps before leave
    recap = stdout[stdout.index("== gpu_suite plan first (dry run): 3 steps") :]
    assert len(recap) < 12000 and stdout.rstrip().splitlines()[-1].startswith("files under ")
    for step in plan.steps:
        assert f"-- {step.tag}: complete" in recap
    assert "attention/bf16/s1" in recap and "next in the schedule: --plan targets" in recap


def test_plan_goes_on_past_a_crash_and_a_hang(suite, monkeypatch, tmp_path, capsys):
    """A step that crashes or outlives its budget is recorded as such; the steps after it still run."""
    scripts = {
        "crash": "import sys; print('boom'); sys.exit(3)",
        "hang": "import time; time.sleep(60)",
        "fine": "import json, pathlib, sys; d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True); "
        "(d / 'fine.json').write_text(json.dumps({'status': 'complete', 'summary': ['all good'], 'files': []}))",
    }
    steps = (suite.Step("crash", "env"), suite.Step("hang", "env", cap_s=2), suite.Step("fine", "env"))
    monkeypatch.setitem(suite.PLANS, "fake", suite.Plan("fake", 99, "a crash, a hang, a step that works", steps))
    monkeypatch.setattr(
        suite, "step_command", lambda step, out, *_: [sys.executable, "-c", scripts[step.tag], str(out / step.tag)]
    )
    monkeypatch.setattr(suite, "STOP_GRACE_S", 1.0)
    monkeypatch.setattr(suite, "STEP_RESERVE_S", 1.0)
    monkeypatch.setattr(suite, "STEP_MIN_S", 1.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the plan itself makes no CUDA call
    t0 = time.monotonic()
    assert suite.main(["--plan", "fake", "--out", str(tmp_path), "--budget-s", "60"]) == 1
    assert time.monotonic() - t0 < 30
    recap = capsys.readouterr().out.split("== gpu_suite plan fake")[1]
    assert re.search(r"^crash +env +error ", recap, re.M) and "-- crash: no JSON (rc 3): boom" in recap
    assert re.search(r"^hang +env +error ", recap, re.M) and "-- hang: no JSON" in recap
    assert re.search(r"^fine +env +complete ", recap, re.M) and "-- fine: complete\nall good" in recap


def test_sigterm_stops_a_plan_and_its_step(tmp_path):
    """The remote tool's timeout ends a plan with SIGTERM: the step running gets SIGINT and writes its
    JSON, nothing is left running, and the recap still comes, with the steps not reached. The step
    has a process group of its own (stopped as one) in the plan's session: the remote tool ends
    what a command leaves running, except processes in a new session."""
    step = (
        "import json, os, pathlib, sys, time\n"
        "d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True)\n"
        "def save(status): (d / 'slow.json').write_text(json.dumps(\n"
        "    {'status': status, 'pid': os.getpid(), 'pgid': os.getpgid(0), 'sid': os.getsid(0)}))\n"
        # 'running' inside the try: on a loaded machine the SIGINT can come while it is written
        "try:\n    save('running')\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    save('interrupted')\n"
    )
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(f"""\
        import sys, torch
        sys.path.insert(0, {str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks")!r})
        import gpu_suite as suite
        steps = (suite.Step("slow", "env"), suite.Step("after", "env"))
        suite.PLANS["fake"] = suite.Plan("fake", 99, "a step that sleeps, and one after it", steps)
        suite.step_command = lambda step, out, *_: [sys.executable, "-c", {step!r}, str(out / step.tag)]
        torch.cuda.is_available = lambda: True
        sys.exit(suite.main(["--plan", "fake", "--out", {str(tmp_path / "OUT")!r}, "--budget-s", "100"]))
        """)
    )
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    record = tmp_path / "OUT" / "slow" / "slow.json"
    t0 = time.monotonic()
    while not record.exists() and time.monotonic() - t0 < 60:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    data = json.loads(record.read_text())
    assert data["status"] == "interrupted", out
    if sys.version_info >= (3, 11):
        assert data["pgid"] == data["pid"] and data["sid"] == os.getsid(0), data
    with pytest.raises(ProcessLookupError):
        os.kill(data["pid"], 0)
    recap = out.split("== gpu_suite plan fake")[1]
    assert re.search(r"^slow +env +interrupted \(stopped\)", recap, re.M), recap
    assert re.search(r"^after +env +not reached", recap, re.M), recap


def test_inductor_tests_carry_the_marker():
    """The tests phase runs Inductor's compiles (minutes on a GPU) in a run of their own
    (``-m "cuda and inductor"``): a test that calls ``torch.compile`` with Inductor (no backend, or
    ``"inductor"``) carries the ``inductor`` and ``cuda`` marks, and an ``inductor`` test is ``cuda``."""

    def marks(decorators: list[ast.expr]) -> set[str]:
        names = set()
        for dec in decorators:
            node = dec.func if isinstance(dec, ast.Call) else dec
            if ast.unparse(node).startswith("pytest.mark."):
                names.add(node.attr)
        return names

    inductor = []
    for path in sorted(pathlib.Path(__file__).parent.rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        module = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
                value = node.value
                module |= marks(value.elts if isinstance(value, ast.List) else [value])
        for fn in ast.walk(tree):
            if not (isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_")):
                continue
            have = module | marks(fn.decorator_list)
            calls = [
                call
                for call in ast.walk(fn)
                if isinstance(call, ast.Call)
                and ast.unparse(call.func) == "torch.compile"
                and ast.unparse(next((k.value for k in call.keywords if k.arg == "backend"), ast.Constant("inductor")))
                in ("'inductor'", '"inductor"')
            ]
            where = f"{path.name}::{fn.name}"
            if calls:
                inductor.append(where)
                assert {"cuda", "inductor"} <= have, f"{where} compiles with Inductor: mark it cuda and inductor"
            if "inductor" in have:
                assert "cuda" in have, f"{where} is marked inductor, not cuda"
    assert len(inductor) >= 8, inductor  # the scan sees them: the ops', the model's, reduce-overhead's


def test_refuses_without_cuda(suite, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for what in [("--phase", phase) for phase in PHASES] + [("--plan", "first")]:
        assert suite.main([*what, "--out", str(tmp_path / what[1])]) == 2
        err = capsys.readouterr().err
        assert f"{' '.join(what)} needs a CUDA GPU" in err and "--dry-run" in err
        assert not (tmp_path / what[1]).exists()


def test_list_and_help(suite, capsys):
    assert suite.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "PYTHONPATH=. python benchmarks/gpu_suite.py --plan first --out $OUT" in out
    assert out.index("--plan first") < out.index("--plan targets") < out.index("lease 2:")
    assert all(f"--plan {name} --out $OUT" in out for name in suite.PLANS)
    assert "--phase P --out $OUT/P" in out and "benchmarks/results/<gpu-slug>/" in out
    assert f"warm only {suite.WARM_S} s after a call" in out and "send the second plan at once" in out
    with pytest.raises(SystemExit) as exc:
        suite.main(["--help"])
    assert exc.value.code == 0 and "--budget-s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        suite.main(["--phase", "env", "--out", "x", "--tag", "bad/name", "--dry-run"])


def test_parse_junit(suite, tmp_path):
    long_text = "\n".join(f"line {i}" for i in range(100))
    (tmp_path / "j.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<testsuites><testsuite name="pytest" tests="4">'
        '<testcase classname="tests.test_attention" name="test_ok[a]" time="0.1"/>'
        '<testcase classname="tests.test_attention.TestX" name="test_bad" time="0.2">'
        f'<failure message="assert 1 == 2">{long_text}</failure></testcase>'
        '<testcase classname="tests.test_upsample" name="test_err"><error message="fixture broke">tb</error></testcase>'
        '<testcase classname="tests.test_upsample" name="test_skip"><skipped message="needs a GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    parsed = suite.parse_junit(tmp_path / "j.xml")
    assert parsed["counts"] == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1, "total": 4}
    fail, err = parsed["failures"]
    assert fail["nodeid"] == "tests/test_attention.py::TestX::test_bad" and fail["message"] == "assert 1 == 2"
    assert len(fail["text"].splitlines()) == 40 and "line 0" in fail["text"] and "line 99" in fail["text"]
    assert err["nodeid"] == "tests/test_upsample.py::test_err" and err["kind"] == "error"


def test_tests_phase_counts_what_each_run_compiled(suite, monkeypatch, tmp_path):
    """Each pytest run of the tests phase (a stand-in here) records what it compiled into Triton's
    on-disk cache, which its workers share: this package's kernels by name, and the rest (Inductor's)
    as a count; the summary says it beside the wall time, which those compiles are part of."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))

    def entry(key: str, name: str) -> None:
        (cache / key).mkdir(parents=True)
        (cache / key / f"__grp__{name}.json").write_text("{}")

    entry("k0", "_attn_fwd_kernel")  # in the cache before the run: not the run's
    compiles = iter([[("k1", "_attn_fwd_kernel"), ("k2", "_attn_fwd_kernel"), ("k3", "triton_poi_fused_0")], []])

    def fake_run_command(cmd, timeout_s, echo=print):
        for key, name in next(compiles):
            entry(key, name)
        junit = next(a.split("=", 1)[1] for a in cmd if a.startswith("--junitxml="))
        pathlib.Path(junit).write_text(
            '<testsuites><testsuite><testcase classname="tests.test_a" name="t"/></testsuite></testsuites>'
        )
        return {"returncode": 0, "timed_out": False, "wall_s": 40.0, "tail": []}

    monkeypatch.setattr(suite, "run_command", fake_run_command)
    args = suite.build_parser().parse_args(
        ["--phase", "tests", "--out", str(tmp_path), "--budget-s", "600", "--runs", "cuda", "inductor"]
    )
    run = suite.Run("tests", tmp_path, args, [], record={"tests": {}})
    lines = suite.phase_tests(run)
    first, second = run.record["tests"]["runs"]
    assert first["compiled"] == {"by_kernel": {"_attn_fwd_kernel": 2}, "other": 1}
    assert second["compiled"] == {"by_kernel": {}, "other": 0}
    assert lines[0].endswith("(rc 0, 40.0 s); compiled 2 plans of this package's kernels, 1 other kernels")
    assert lines[1].endswith("; compiled 0 plans of this package's kernels, 0 other kernels")


def test_plan_budget(suite):
    items = [suite.work_item(name, est) for name, est in (("a", 100), ("b", 300), ("c", 200), ("d", 50))]
    assert suite.plan_budget(items, 480) == 450
    assert [it["plan"] for it in items] == ["run", "run", "skip (budget)", "run"]


def test_supervise_recovers_from_crash_and_hang(suite, monkeypatch, tmp_path):
    fake = tmp_path / "fake_worker.py"
    fake.write_text(
        textwrap.dedent("""\
        import json, sys, time
        spec = json.load(open(sys.argv[1]))
        events = open(spec["events"], "a")
        for item in spec["items"]:
            events.write(json.dumps({"event": "start", "id": item["id"]}) + "\\n"); events.flush()
            if item["spec"] == "crash":
                sys.exit(3)
            if item["spec"] == "hang":
                time.sleep(60)
            events.write(json.dumps({"event": "done", "id": item["id"], "status": "ok", "result": 1,
                                     "wall_s": 0.0}) + "\\n"); events.flush()
        """)
    )

    def start(kind, shared, items, deadline, tmp, index, echo):
        spec, events = tmp / f"w{index}.json", tmp / f"w{index}.events"
        spec.write_text(
            json.dumps({"events": str(events), "items": [{"id": i["id"], "spec": i["spec"]} for i in items]})
        )
        proc, thread, _ = suite.spawn([sys.executable, str(fake), str(spec)], echo)
        return proc, thread, events

    monkeypatch.setattr(suite, "_start_worker", start)
    monkeypatch.setattr(suite, "STOP_GRACE_S", 1.0)
    args = suite.build_parser().parse_args(["--phase", "sweep", "--out", str(tmp_path), "--budget-s", "60"])
    run = suite.Run("sweep", tmp_path, args, [])
    items = [suite.work_item(f"i{k}", 1.0, spec=s) for k, s in enumerate(["ok", "crash", "ok", "hang", "ok"])]
    t0 = time.monotonic()
    suite.supervise(run, "fake", items, shared={}, item_timeout=lambda item: 1.0)
    assert time.monotonic() - t0 < 20
    assert [it["status"] for it in items] == ["ok", "error", "ok", "timeout", "ok"]
    assert "CUDA" in items[1]["reason"] and "stopped" in items[3]["reason"]


@pytest.fixture
def sweep_on_device(suite, monkeypatch, device):
    """The sweep worker on this test's device, do_bench one plain timed call."""
    pytest.importorskip("triton")
    import triton.testing

    monkeypatch.setattr(suite, "DEVICE", device)
    monkeypatch.setattr(
        triton.testing,
        "do_bench",
        lambda fn, warmup=0, rep=0, return_mode="mean": suite.common.time_ms(fn, device, reps=1, warmup=0),
    )


def test_sweep_worker_times_candidates(suite, monkeypatch, sweep_on_device):
    """The sweep's worker on small shapes: current plan, a forced candidate, a duplicate, a pruned one."""
    monkeypatch.setitem(suite.SWEEP_FAMILIES, "attn_fwd", ({"tiny-x": (2, 40, 6, 2, 16)}, "fwd"))
    monkeypatch.setitem(suite.SWEEP_FAMILIES, "upsample_bwd", ({"tiny-x": (1, 3, 3, 3, 3, 16, 1)}, "bwd"))
    handle = suite._sweep_worker({"warmup_ms": 1, "rep_ms": 1})

    def shape(family, fields, dtype="fp32"):
        status, result, _ = handle(
            {"family": family, "dtype": dtype, "cid": suite.cid(fields), "fields": fields, "shapes": ["tiny-x"]}
        )
        assert status == "ok"
        return result["shapes"]["tiny-x"]

    current = shape("attn_fwd", None)
    assert current["status"] == "ok" and current["ms"] > 0 and current["rel_diff"] == 0.0
    forced = shape("attn_fwd", {"block_n": 16, "block_m": 16, "num_warps": 4, "num_stages": 1})
    assert forced["status"] == "ok" and forced["plan"].startswith("n16.m16.w4.s1") and forced["correct"]
    assert forced["key"] != current["key"]
    again = shape("attn_fwd", {"block_n": 16, "block_m": 32, "num_warps": 4, "num_stages": 1})  # M=6: m clipped to 16
    assert again["same_as"] == "n16.m16.w4.s1"
    assert shape("upsample_bwd", None)["status"] == "ok"
    pruned = shape("upsample_bwd", {"block_p": 64, "num_warps": 1})
    assert pruned["status"] == "pruned" and "spills" in pruned["reason"]
    grads = shape("upsample_bwd", {"block_p": 4, "num_warps": 1})
    assert grads["status"] == "ok" and grads["rel_diff"] <= grads["tolerance"]
    assert "eager_ms" not in current  # no eager twin in the attention and upsample sweeps (the kernels phase has them)


@pytest.mark.parametrize(
    ("family", "shape", "fields"),
    [
        (
            "linear_gelu_fwd",
            (48, 64, 32),
            {"block_m": 16, "block_n": 32, "block_k": 16, "num_warps": 1, "num_stages": 1},
        ),
        (
            "linear_gelu_bwd",
            (48, 64, 32),
            {"block_m": 32, "block_n": 16, "block_k": 16, "num_warps": 1, "num_stages": 2},
        ),
        ("add_ln_fwd", (37, 24), {"block_r": 2, "num_warps": 1}),
        ("add_ln_bwd", (37, 24), {"block_r": 4, "num_warps": 2, "num_stages": 1}),
        ("mixed_fwd", (2, 40, 6, 2, 16), {"block_n": 16, "block_m": 16, "num_warps": 4, "num_stages": 1}),
        ("mixed_bwd", (2, 40, 6, 2, 16), {"block_n": 16, "block_m": 16, "num_warps": 4, "num_stages": 1}),
        ("pixel_attention_fwd", (2, 5, 6, 24), {"block_p": 4, "num_warps": 1}),
        ("pixel_attention_bwd", (2, 5, 6, 24), {"block_p": 4, "num_warps": 2}),
        ("pixel_attention_bwd_dx", (2, 5, 6, 24), {"block_p": 2, "num_warps": 1}),
        ("bias_relu", (2, 24, 5, 6), {"block": 64, "num_warps": 1}),
        ("bn_stats", (2, 24, 5, 6), {"block_p": 8, "block_c": 16, "num_warps": 2}),
        ("bn_relu_fwd", (2, 24, 5, 6), {"block_p": 8, "block_c": 16, "num_warps": 2}),
        ("bn_relu_bwd_sums", (2, 24, 5, 6), {"block_p": 16, "block_c": 16, "num_warps": 4}),
        ("bn_relu_bwd_dx", (2, 24, 5, 6), {"block_p": 8, "block_c": 32, "num_warps": 2}),
    ],
)
def test_sweep_worker_other_families(suite, monkeypatch, sweep_on_device, family, shape, fields):
    """The mixed attention, MLP GEMM, add + LayerNorm, PA and stem families: the current plan (with
    its eager twin timed, all but the mixed attention's, which the kernels phase compares), and a
    forced candidate whose launch differs and whose result matches the current plan's."""
    monkeypatch.setitem(suite.SWEEP_FAMILIES, family, ({"tiny-x": shape}, suite.SWEEP_FAMILIES[family][1]))
    handle = suite._sweep_worker({"warmup_ms": 1, "rep_ms": 1})

    def run(fields):
        status, result, _ = handle(
            {"family": family, "dtype": "fp32", "cid": suite.cid(fields), "fields": fields, "shapes": ["tiny-x"]}
        )
        assert status == "ok"
        return result["shapes"]["tiny-x"]

    current = run(None)
    assert current["status"] == "ok" and current["ms"] > 0
    assert current["eager_ms"] > 0 if not family.startswith("mixed") else "eager_ms" not in current
    forced = run(fields)
    assert forced["status"] == "ok" and forced["correct"] and forced["key"] != current["key"], forced
    assert forced["plan"].startswith(suite.cid(fields).split(".w")[0])


def test_e2e_rows_round_trip(suite, monkeypatch):
    """Each e2e spec builds a ``throughput.Row`` in the worker, and its result one in the parent
    (``run_row`` itself is throughput's, tested in test_throughput.py; a stand-in here: no model)."""
    throughput = suite.load_script("throughput")

    def fake_run_row(row, device, progress):
        row.status, row.batch, row.times_s, row.first_call_s = "ok", row.batch_requested, [0.5, 0.25], 1.0

    monkeypatch.setattr(throughput, "run_row", fake_run_row)
    monkeypatch.setattr(suite, "load_script", lambda name: throughput)
    monkeypatch.setattr(suite, "DEVICE", "cpu")
    handle = suite._e2e_worker({})
    for part in ("core", "zoo"):
        items = suite.e2e_items(part, throughput)
        assert len({it["id"] for it in items}) == len(items)
        for item in items:
            status, result, _ = handle(item["spec"])
            assert status == "ok" and result["images_per_s_median"] == item["spec"]["batch_requested"] / 0.375
            item.update(status="ok", result=json.loads(json.dumps(result)))  # as it comes back from the worker
            row = suite._row_from_item(throughput, item)
            assert row.status == "ok" and row.resolution == tuple(item["spec"]["resolution"])
        rows = [suite._row_from_item(throughput, it) for it in items]
        throughput.add_speedups(rows)
        assert "restv2_tiny" in throughput.format_table(rows) or part == "zoo"


def test_profile_worker_and_tables(suite, monkeypatch, device, tmp_path):
    """The profile phase's worker on a small model row and a small attention op, then its traces'
    zip and the tables ``report.py`` prints from the phase's groups."""
    monkeypatch.setattr(suite, "DEVICE", device)
    monkeypatch.setitem(suite.ATTN_SHAPES, "tiny-x", (2, 40, 6, 2, 16))
    monkeypatch.setattr(suite, "PROFILE_OPS", {"attention": "tiny-x"})
    monkeypatch.setattr(suite, "PROFILE_WARMUP", 1)
    items = suite.profile_items(suite.load_script("throughput"), steps=1)
    items = [it for it in items if it["id"] in ("infer/restv2_tiny/reference", "op/attention/tiny-x")]
    items[0]["spec"].update(batch_requested=1, resolution=[32, 32], precision="fp32")
    items[1]["spec"]["dtype"] = "fp32"
    handle = suite._profile_worker({"trace_dir": str(tmp_path)})
    for item in items:
        status, result, _ = handle(item["spec"])
        assert status == "ok" and result["steps"] == 1 and result["kernels"] and result["wall_ms"] > 0
        item.update(status="ok", result=json.loads(json.dumps(result)))
    traces = sorted(tmp_path.glob("*.json"))
    assert [p.name for p in traces] == ["infer_restv2_tiny_reference.json", "op_attention_tiny-x.json"]

    kept, left = suite.zip_traces(traces, tmp_path / "profile.zip")
    assert (kept, left) == ([p.name for p in traces], [])
    assert (tmp_path / "profile.zip").stat().st_size <= suite.PROFILE_ZIP_MAX
    suite.zip_traces(traces[:1], tmp_path / "one.zip")
    one = (tmp_path / "one.zip").stat().st_size
    kept, left = suite.zip_traces(traces, tmp_path / "small.zip", limit=one)  # room for the first alone
    assert kept == [traces[0].name] and left == [traces[1].name]
    assert zipfile.ZipFile(tmp_path / "small.zip").namelist() == kept and (tmp_path / "small.zip").stat().st_size == one

    report = suite.load_script("report")
    skipped = {
        **items[0],
        "id": "infer/restv2_tiny/kernels",
        "status": "skipped",
        "result": None,
        "spec": {**items[0]["spec"], "backend": "kernels"},
    }
    rows = [{k: it[k] for k in ("id", "status", "reason", "spec", "result")} for it in [items[0], skipped, items[1]]]
    groups = report.profile_groups(rows)
    assert list(groups) == ["restv2_tiny infer fp32 batch 1 32x32", "attention tiny-x fp32 fwd+bwd"]
    assert list(groups["restv2_tiny infer fp32 batch 1 32x32"]) == ["reference"]  # the skipped row adds none
    assert list(groups["attention tiny-x fp32 fwd+bwd"]) == ["triton"]
    record = {
        "suite": report.SUITE,
        "phase": "profile",
        "dry_run": False,
        "started": "2026-11-24T12:00:00",
        "_file": str(tmp_path / "profile.json"),
        "profile": {"rows": rows},
    }
    text = report.markdown(report.collect([record]), [])
    assert "### Profiles" in text and "**attention tiny-x fp32 fwd+bwd**" in text and "| host wall |" in text


def test_sweep_fields_reach_the_launch_they_shape(suite):
    """Each sweep family is a ``plans.forced`` family that takes its grid's fields, and each field a
    candidate forces shows in the launch ``_main_launch`` picks (the one the candidate is named and
    pruned by), at every shape on sm_90; for the attention and GEMM families, as far as the
    problem's size allows (their blocks are clipped to it)."""
    target = suite.plans.TARGETS["sm_90"]
    clipped = {"attn_fwd", "attn_bwd", "mixed_fwd", "mixed_bwd", "linear_gelu_fwd", "linear_gelu_bwd"}
    for family, (shapes, _) in suite.SWEEP_FAMILIES.items():
        assert set(suite.SWEEP_GRIDS[family]) <= suite.plans._FAMILIES[family], family
        assert family in suite.SWEEP_WEIGHT and family in suite.SWEEP_COMPILE_S, family
        for fields in suite.sweep_candidates(family, shapes, target)[::7]:
            for name, shape in shapes.items():
                launches = suite.sweep_plan(family, shape, torch.bfloat16, target, fields)[2]
                launch = suite._main_launch(family, launches)
                got = {**dict(launch.constexprs), "NUM_WARPS": launch.num_warps, "NUM_STAGES": launch.num_stages}
                for key, value in fields.items():
                    if family in clipped:
                        assert got[key.upper()] <= value, (family, name, fields, got)
                    else:
                        assert got[key.upper()] == value, (family, name, fields, got)


def test_precompile_inputs_are_the_pending_kernel_rows(suite):
    """The models and ``HxWxB`` inputs of the kernel rows still to run, in row order; none without one."""
    tp = suite.load_script("throughput")
    core = suite.e2e_items("core", tp)
    assert suite.precompile_inputs(core) == {"restv2_tiny": ["224x224x256", "224x224x128", "800x1333x2"]}
    zoo = suite.e2e_items("zoo", tp)
    assert suite.precompile_inputs(zoo) == {m: ["224x224x256"] for m in ("restv2_small", "restv2_base", "restv2_large")}
    for item in core:
        if item["spec"]["mode"] != "train":
            item["status"] = "ok"  # measured: nothing left to compile for it
    assert suite.precompile_inputs(core) == {"restv2_tiny": ["224x224x128"]}
    assert suite.precompile_inputs([it for it in zoo if it["spec"]["backend"] != "kernels"]) == {}
    profile = suite.profile_items(tp, 3)  # its ops' items have no model: skipped
    assert suite.precompile_inputs(profile) == {"restv2_tiny": ["224x224x256", "224x224x128", "800x1333x2"]}


def test_precompile_compiles_before_the_rows_and_names_what_the_jit_still_compiled(
    suite, monkeypatch, tmp_path, capsys
):
    """One ``python -m restv2.targets`` for this GPU's target over the kernel rows' models and inputs
    in bf16 (a stand-in here: it writes the rows and the cache entries the real one would), within
    the budget; its plans, problems and new cache entries recorded. After the rows, this package's
    kernels compiled since (the JIT missed the precompiled entry) by name, apart from other compiles
    (Inductor's). A GPU without a target, or too little budget, skips it with the reason."""
    import restv2.targets as cli

    cache = tmp_path / "cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    assert suite.targets.triton_cache_dir() == cache and suite.targets.cached_kernels(cache) == {}

    def entry(key: str, name: str) -> None:
        (cache / key).mkdir(parents=True)
        (cache / key / f"__grp__{name}.json").write_text("{}")
        (cache / key / f"{name}.cubin").write_bytes(b"")

    calls = []

    def fake_run_command(cmd, timeout_s, echo=print):
        calls.append((cmd, timeout_s))
        argv = cmd[cmd.index("restv2.targets") + 1 :]
        seen = {}
        monkeypatch.setattr(cli, "run_check", lambda *a: seen.setdefault("args", a) and [])
        assert cli.main(argv[: argv.index("--json")]) == 0  # the real command line parses
        assert seen["args"][:4] == (["restv2_tiny"], ["bf16"], [(224, 224, 128), (224, 224, 256)], ["sm_90"])
        entry("k1", "_attn_fwd_kernel")
        entry("k2", "_add_ln_fwd_kernel")
        rows = [
            {"kernel": "attn_fwd", "plan": "BLOCK_M=64", "problems": []},
            {"kernel": "add_ln_fwd", "plan": "BLOCK_R=4", "problems": ["local memory 8 B"]},
            {"kernel": "add_ln_bwd", "plan": "BLOCK_R=2", "problems": []},  # cached before: no new entry
        ]
        pathlib.Path(argv[argv.index("--json") + 1]).write_text(json.dumps({"rows": rows}))
        return {"returncode": 1, "timed_out": False, "wall_s": 12.5, "tail": ["..."]}

    monkeypatch.setattr(suite, "run_command", fake_run_command)
    entry("k0", "_add_ln_bwd_kernel")
    args = suite.build_parser().parse_args(["--phase", "e2e", "--out", str(tmp_path), "--budget-s", "300"])
    run = suite.Run("e2e", tmp_path, args, [], record={"environment": {"compute_capability": "9.0"}})
    tp = suite.load_script("throughput")
    items = [it for it in suite.e2e_items("core", tp) if it["spec"]["mode"] in ("infer", "train")]
    rec = run.record["e2e"] = {}
    after = suite.precompile(run, items, rec)
    assert len(calls) == 1 and calls[0][1] <= 150
    pre = rec["precompile"]
    assert pre["status"] == "ok" and pre["target"] == "sm_90" and pre["plans"] == 3 and pre["compiled"] == 2
    assert pre["problems"] == ["add_ln_fwd BLOCK_R=4: local memory 8 B"] and pre["wall_s"] == 12.5
    assert (
        after == {"k0", "k1", "k2"}
        and "precompiled the kernel rows' plans for sm_90: 3 plans" in capsys.readouterr().out
    )
    entry("k3", "_attn_bwd_dq_kernel")  # what the rows' JIT compiled after all
    entry("k4", "triton_poi_fused_add_0")
    suite.precompile_followup(rec, after)
    assert pre["jit_compiled_after"] == {"_attn_bwd_dq_kernel": 1} and pre["other_compiled_after"] == 1
    assert suite.precompile_lines(rec) == [
        "precompile: 3 plans for sm_90 (2 compiled) in 12 s, 1 with problems; "
        "the rows' JIT compiled 1 more of this package's plans"
    ]
    assert json.loads((tmp_path / "e2e.json").read_text())["e2e"]["precompile"]["plans"] == 3  # saved before the rows

    for capability, budget, reason in (("12.0", 300, "no target"), ("9.0", 60, "budget")):
        run = suite.Run("e2e", tmp_path, args, [], record={"environment": {"compute_capability": capability}})
        run.args.budget_s = budget
        rec = {}
        assert suite.precompile(run, items, rec) is None and len(calls) == 1
        assert rec["precompile"]["status"] == "skipped" and reason in rec["precompile"]["reason"]
        assert suite.precompile_lines(rec)[0].startswith("precompile: skipped (")
    assert suite.precompile(run, [it for it in items if it["spec"]["backend"] != "kernels"], rec := {}) is None
    assert rec == {}
