"""The GPU target check in CI: every plan the model zoo launches, compiled for sm_80, sm_89 and
sm_90 on this CPU-only machine, must fit its GPU.

One run of ``python -m restv2.targets`` in a subprocess (without TRITON_INTERPRET, so the kernels
compile; Triton's on-disk cache is shared with the command line), then the rules on its rows:
every plan compiles; shared memory within the target's opt-in limit; no local memory in 16-bit
plans (fp32 plans: at most the bytes listed in ``FP32_LOCAL_BYTES``); tensor-core instructions in
every 16-bit ``tl.dot`` kernel; at least one program fits an SM. The judging functions are also
checked on rows made by hand, so each rule is seen to fail.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time
import types

import pytest
import torch
from helpers import once_per_session

from restv2_kernels import targets
from restv2_kernels.plans import TARGETS

ROOT = pathlib.Path(__file__).resolve().parents[1]
READINGS = ROOT / "tests" / "data" / "target_readings.json"  # python -m restv2.targets --readings ... --update-readings
CHECKED = ("sm_80", "sm_89", "sm_90")
KERNELS = (
    "attn_fwd",
    "attn_bwd_dq",
    "attn_bwd_dkdv",
    "mixed_fwd",
    "mixed_norm",
    "mixed_bwd_stats",
    "mixed_bwd_dq",
    "mixed_bwd_dkdv",
    "upsample_fwd",
    "upsample_bwd_g",
    "upsample_bwd_dv",
    "add_ln_fwd",
    "add_ln_bwd",
    "linear_gelu_fwd",
    "linear_gelu_bwd",
    "pixel_attention_fwd",
    "pixel_attention_bwd_g",
    "pixel_attention_bwd_dx",
    "bias_relu",
    "bn_stats",
    "bn_relu_fwd",
    "bn_relu_bwd_sums",
    "bn_relu_bwd_dx",
)
DOT_KERNELS = (
    "attn_fwd",
    "attn_bwd_dq",
    "attn_bwd_dkdv",
    "mixed_fwd",
    "mixed_bwd_stats",
    "mixed_bwd_dq",
    "mixed_bwd_dkdv",
    "linear_gelu_fwd",
    "linear_gelu_bwd",
)

# The documented exception: fp32 attention dots are IEEE, which Triton lowers to FMA with large
# per-thread operand arrays; on the several-key-block path (inputs of 384 px and more) at
# head dim 96/128 the least-spilling tiles found still spill this much (bytes a thread, the most
# seen with Triton 3.6, the GPU image's, and 3.9, CI's).
FP32_LOCAL_BYTES = {
    ("attn_fwd", "sm_80"): 24,
    ("attn_fwd", "sm_89"): 448,
    ("attn_fwd", "sm_90"): 376,
    ("attn_bwd_dq", "sm_80"): 296,
    ("attn_bwd_dq", "sm_89"): 288,
    ("attn_bwd_dq", "sm_90"): 312,
    # ResTv1's mixed attention at head dim 96 (rest_base, rest_large): the fp32 FMA dots of the
    # per-head [16, 128] tiles beside the seven [16, 16 or 32] score tiles of the backward
    ("mixed_fwd", "sm_80"): 8,
    ("mixed_fwd", "sm_89"): 24,
    ("mixed_fwd", "sm_90"): 8,
    ("mixed_bwd_stats", "sm_89"): 8,
    ("mixed_bwd_dq", "sm_80"): 24,
    ("mixed_bwd_dkdv", "sm_80"): 16,
    # the pixel attention forward's [2, 512] fp32 tile at 4 warps (no x_bias), with Triton 3.6 only
    ("pixel_attention_fwd", "sm_90"): 8,
}


def compiling_env() -> dict[str, str]:
    """The environment of a subprocess that compiles the kernels: no TRITON_INTERPRET, this tree
    importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """The command line's exit status, output, rows and readings summary for the whole zoo on the
    checked targets, with the committed readings, once per session (also under pytest-xdist:
    ``helpers.once_per_session``)."""
    out = tmp_path_factory.mktemp("targets") / "targets.json"

    def run() -> dict:
        env = compiling_env()
        proc = subprocess.run(
            [
                *(sys.executable, "-m", "restv2.targets", "--targets", ",".join(CHECKED)),
                *("--readings", str(READINGS), "--json", str(out)),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        written = json.loads(out.read_text()) if out.exists() else {}
        return {
            "returncode": proc.returncode,
            "stdout": proc.stdout[-4000:],
            "stderr": proc.stderr[-4000:],
            "rows": written.get("rows", []),
            "readings": written.get("readings"),
        }

    result = once_per_session(tmp_path_factory, "targets-check", run)
    return types.SimpleNamespace(**result), result["rows"]


def test_command_passes(check):
    proc, rows = check
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert rows


def test_every_kernel_dtype_and_target_is_compiled(check):
    _, rows = check
    seen = {(r["kernel"], r["dtype"], r["target"]) for r in rows}
    assert seen == set(itertools.product(KERNELS, ("fp32", "fp16", "bf16"), CHECKED))
    assert all(r["uses"] for r in rows)


def test_committed_readings_cover_every_plan(check):
    """CI on a machine with an empty Triton cache compiles only what changed: every plan's reading
    is committed for this Triton build (``tests/data/target_readings.json``), under the key
    Triton's own cache would use. A kernel, plan or specialisation changed without refreshing the
    file fails here; under another Triton build every plan is compiled, which is correct, only slow."""
    proc, rows = check
    summary = proc.readings
    if not summary["build_in_file"]:
        pytest.skip(f"the committed readings are for other Triton builds than this one ({summary['build']})")
    compiled = [
        f"{r['kernel']} {r['dtype']} {r['target']} {r['plan']} ({r['uses'][0]})"
        for r in rows
        if r["reading"] == "compiled"
    ]
    assert not compiled, (
        f"{len(compiled)} plans have no committed reading; refresh the file with\n"
        "  python -m restv2.targets --readings tests/data/target_readings.json --update-readings\n"
        "and commit it:\n" + "\n".join(compiled[:20])
    )


def test_one_committed_reading_a_kernel_is_compiled_afresh(check):
    """Of the reused readings, one a kernel is compiled again with Triton's cache empty and must
    read the same (a mismatch is a problem in ``test_every_plan_fits_its_gpu``); every compile's
    Triton cache key must be the one the readings are filed under."""
    proc, rows = check
    reused = {r["kernel"] for r in rows if r["reading"].startswith("committed")}
    verified = [r["kernel"] for r in rows if r["reading"] == "committed, verified"]
    assert sorted(verified) == sorted(reused)
    assert proc.readings["committed, verified"] == len(reused)
    if proc.readings["build_in_file"]:
        assert reused == set(KERNELS)


def _reading(registers: int) -> dict:
    return dict(registers=registers, local_bytes=0, spill_instructions=0, shared_bytes=4096, dots=2, ptx_mma=8)


def test_readings_are_filed_by_build_and_key(tmp_path, monkeypatch):
    """The readings file: one group a Triton build, each reading under its compile's cache key;
    ``save`` replaces this build's group with this run's readings and keeps the others'; a group
    written with other fields is not used."""
    build = ["build-a"]
    monkeypatch.setattr(targets, "build_id", lambda: build[0])
    monkeypatch.setattr(targets, "_cuobjdump_version", lambda: "cuobjdump\nCuda compilation tools 13.1")
    path = tmp_path / "readings.json"
    key1, key2 = "1" * 64, "2" * 64
    first = targets.Readings(path)  # no file yet: nothing stored
    assert not first.has_build and first.get(key1) is None
    first.put(key1, _reading(100))
    first.put(key2, {"error": "PTXASError: out of resources"})
    first.put(None, _reading(7))  # a Triton without cache keys: nothing to file it under
    first.save()
    again = targets.Readings(path)
    assert again.has_build
    assert again.get(key1) == _reading(100)
    assert again.get(key2) == {"error": "PTXASError: out of resources"}
    assert again.get("3" * 64) is None and again.get(None) is None
    refresh = targets.Readings(path, reuse=False)  # --update-readings: every job compiled
    assert refresh.has_build and refresh.get(key1) is None
    assert len(path.read_text().splitlines()) == 6  # the head, the group's head, a line a reading, the ends

    build[0] = "build-b"  # another Triton: its own group, the first kept
    other = targets.Readings(path)
    assert not other.has_build and other.get(key1) is None
    other.put(key1, _reading(120))
    other.save()
    build[0] = "build-a"
    assert targets.Readings(path).get(key1) == _reading(100)
    build[0] = "build-b"
    assert targets.Readings(path).get(key1) == _reading(120)

    rerun = targets.Readings(path)  # a rerun of build b files only what it saw
    rerun.put(key2, _reading(90))
    rerun.save()
    assert targets.Readings(path).get(key1) is None and targets.Readings(path).get(key2) == _reading(90)

    data = json.loads(path.read_text())
    data["builds"]["build-b"]["fields"] = data["builds"]["build-b"]["fields"][:-1]  # another layout
    path.write_text(json.dumps(data))
    assert not targets.Readings(path).has_build and targets.Readings(path).get(key2) is None


def test_reading_mismatch_names_the_fields():
    assert targets.reading_mismatch(_reading(100), _reading(100)) is None
    assert targets.reading_mismatch(_reading(100), _reading(104)) == "registers 100 committed, 104 compiled"
    found = targets.reading_mismatch({"error": "PTXASError: x"}, _reading(100))
    assert (
        "registers None committed, 100 compiled" in found and "error 'PTXASError: x' committed, None compiled" in found
    )


def test_pa_layer_norm_is_compiled(check):
    """PA + LayerNorm (``NORM``: the stems and patch embeds without gradients) is compiled in
    every dtype on every checked target, and as autocast calls it (16-bit map, fp32 output)."""
    _, rows = check
    fused = [r for r in rows if r["kernel"] == "pixel_attention_fwd" and "NORM=1" in r["specialization"]]
    assert {(r["dtype"], r["target"]) for r in fused} == set(itertools.product(("fp32", "fp16", "bf16"), CHECKED))
    assert all("eval pixel_attention_layer_norm fwd" in u for r in fused for u in r["uses"])
    assert {r["dtype"] for r in fused if any("autocast" in u for u in r["uses"])} == {"fp16", "bf16"}


def _tf32(row: dict) -> bool:
    return targets.is_tf32(types.SimpleNamespace(**row))


def test_tf32_plans_are_compiled(check):
    """The fp32 GEMMs are also compiled as launched where PyTorch allows TF32 (tensor cores, the
    operands rounded first), forward and backward, on every checked target, and only those."""
    _, rows = check
    tf32 = [r for r in rows if _tf32(r)]
    assert {(r["kernel"], r["target"]) for r in tf32} == set(
        itertools.product(("linear_gelu_fwd", "linear_gelu_bwd"), CHECKED)
    )
    assert all(u.endswith("TF32 allowed") for r in tf32 for u in r["uses"])
    assert not [r for r in rows if not _tf32(r) and any(u.endswith("TF32 allowed") for u in r["uses"])]


def test_every_plan_fits_its_gpu(check):
    _, rows = check
    bad = []
    for r in rows:
        name = f"{r['kernel']} {r['dtype']} {r['target']} {r['plan']} [{r['specialization']}] ({r['uses'][0]})"
        if r["error"]:
            bad.append(f"{name}: does not compile: {r['error']}")
            continue
        if r["shared_bytes"] > TARGETS[r["target"]].smem_per_block:
            bad.append(f"{name}: {r['shared_bytes']} B of shared memory")
        allowed = FP32_LOCAL_BYTES.get((r["kernel"], r["target"]), 0) if r["dtype"] == "fp32" else 0
        if r["local_bytes"] > allowed:
            bad.append(f"{name}: {r['local_bytes']} B of local memory, {allowed} allowed")
        if r["kernel"] in DOT_KERNELS and (r["dtype"] != "fp32" or _tf32(r)):
            mma = r["hgmma"] + r["hmma"] if r["target"] == "sm_90" else r["hmma"]
            if not (r["dots"] and mma):
                bad.append(f"{name}: 16-bit or TF32 tl.dot without tensor cores ({r['dots']} dots, {mma} MMA)")
        if r["programs_per_sm"] < 1:
            bad.append(f"{name}: no program fits an SM")
    assert not bad, "\n".join(bad)


def _row(**fields):
    base = dict(
        kernel="attn_fwd",
        dtype="bf16",
        plan="BLOCK_N=128",
        target="sm_89",
        num_warps=8,
        num_stages=3,
        registers=128,
        local_bytes=0,
        spill_instructions=0,
        shared_bytes=64 << 10,
        shared_limit=101376,
        dots=2,
        hmma=12,
        hgmma=0,
        programs_per_sm=1,
    )
    return targets.Row(**{**base, **fields})


@pytest.mark.parametrize(
    "fields, problem",
    [
        (dict(shared_bytes=110 << 10), "shared memory 112640 B over the limit 101376 B"),
        (dict(local_bytes=48), "48 B of local memory (spills) in a 16-bit plan"),
        (dict(target="sm_80", hmma=0), "16-bit tl.dot without tensor-core instructions"),
        (dict(dtype="fp32", plan="BLOCK_M=64 DOT_PRECISION=tf32 w8 s3", hmma=0), "TF32 tl.dot without tensor-core"),
        (dict(error="PTXASError: ..."), "does not compile"),
    ],
)
def test_rules_fail_on_bad_rows(fields, problem):
    assert targets.problems(_row()) == []
    found = targets.problems(_row(**fields))
    assert len(found) == 1 and problem in found[0]
    assert targets.problems(_row(dtype="fp32", local_bytes=48)) == []  # fp32 spills: reported by the test's list
    assert targets.problems(_row(dtype="fp32", plan="DOT_PRECISION=ieee", hmma=0)) == []  # IEEE fp32: FMA


def test_markdown_summary_lists_tf32_plans_apart():
    """The README table gives the fp32 GEMM's TF32 plans a row of their own, beside its IEEE ones."""
    from restv2.targets import markdown_summary

    plain = dict(kernel="linear_gelu_fwd", dtype="fp32", target="sm_80", shared_bytes=16 << 10)
    rows = [
        _row(**plain, plan="BLOCK_M=64 DOT_PRECISION=ieee w8 s3", registers=106, hmma=0, ptx_mma=0),
        _row(**plain, plan="BLOCK_M=64 DOT_PRECISION=tf32 w8 s3", registers=62, hmma=8),
    ]
    table = markdown_summary(rows, ["sm_80"]).splitlines()
    assert table[2:] == [
        "| linear_gelu_fwd | fp32 | 106 regs, 16 KB, FMA |",
        "| linear_gelu_fwd | tf32 | 62 regs, 16 KB, HMMA |",
    ]


def test_occupancy_estimate():
    sm90, sm89 = TARGETS["sm_90"], TARGETS["sm_89"]
    assert targets.programs_per_sm(sm90, 255, 0, 8) == (1, "registers")  # 255 -> 256 regs x 256 threads
    assert targets.programs_per_sm(sm90, 64, 0, 4) == (8, "registers")
    assert targets.programs_per_sm(sm90, 32, 0, 1) == (32, "blocks")
    assert targets.programs_per_sm(sm89, 32, 0, 8) == (6, "threads")  # 1536 threads an SM
    assert targets.programs_per_sm(sm89, 64, 60 << 10, 4) == (1, "shared")


def test_sass_counts(tmp_path, monkeypatch):
    sass = """
        /*0a50*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0a60*/              @!P0 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0a70*/                   STL.64 [R1+0x8], R2 ;
        /*0a80*/                   LDL R5, [R1+0x4] ;
        /*0a90*/                   FFMA R3, R4, R5, R3 ;
    """
    monkeypatch.setattr(targets.subprocess, "run", lambda *a, **k: type("P", (), {"stdout": sass})())
    assert targets._sass_counts(tmp_path / "k.cubin") == {"hmma": 1, "hgmma": 1, "spills": 2}


def test_the_check_runs_once_per_session_across_xdist_workers(tmp_path, monkeypatch):
    """Two xdist workers ask for the check at once (the GPU runner's tests phase runs -n 4): one runs
    it, the other waits and reads its result. Without xdist the folder is the session's own."""
    calls = []

    def produce():
        calls.append(1)
        time.sleep(0.5)  # long enough for the other worker to arrive while this one runs
        return {"rows": [len(calls)]}

    class Factory:  # a worker's tmp_path_factory: basetemp <session>/popen-gwN
        def __init__(self, worker):
            self.basetemp = tmp_path / f"popen-{worker}"
            self.basetemp.mkdir(exist_ok=True)

        def getbasetemp(self):
            return self.basetemp

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda w: once_per_session(Factory(w), "check", produce), ["gw0", "gw1"]))
    assert calls == [1] and results == [{"rows": [1]}] * 2
    assert (tmp_path / "check.json").exists()
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert once_per_session(Factory("solo"), "check", produce) == {"rows": [2]}  # a session of its own
    assert (tmp_path / "popen-solo" / "check.json").exists()


def test_cubin_readings_are_kept_by_cubin_kernel_and_tool(tmp_path, monkeypatch):
    """cuobjdump's reading of a cubin (most of the check's time on a warm Triton cache) is read
    from disk when the same bytes, kernel name and tool version come again, and only then; a
    damaged file is read again."""
    read = []

    def read_cubin(cubin_bytes, kernel):
        read.append((cubin_bytes, kernel))
        return {"usage": {"REG": len(cubin_bytes)}, "sass": {"hmma": 1, "hgmma": None, "spills": 0}, "sass_error": None}

    version = ["cuobjdump 13.1"]
    monkeypatch.setattr(targets, "_read_cubin", read_cubin)
    monkeypatch.setattr(targets, "_facts_dir", lambda: tmp_path / "facts")
    monkeypatch.setattr(targets, "_cuobjdump_version", lambda: version[0])
    first = targets.cubin_facts(b"cubin-a", "attn_fwd")
    assert first == ({"REG": 7}, {"hmma": 1, "hgmma": None, "spills": 0}, None)
    assert targets.cubin_facts(b"cubin-a", "attn_fwd") == first and len(read) == 1
    targets.cubin_facts(b"cubin-bb", "attn_fwd")
    targets.cubin_facts(b"cubin-a", "attn_bwd_dq")
    version[0] = "cuobjdump 12.8"
    targets.cubin_facts(b"cubin-a", "attn_fwd")
    assert len(read) == 4
    for path in (tmp_path / "facts").glob("*.json"):
        path.write_text('{"usage": ')  # cut short
    assert targets.cubin_facts(b"cubin-a", "attn_fwd") == first and len(read) == 5
    assert targets.cubin_facts(b"cubin-a", "attn_fwd") == first and len(read) == 5


@pytest.mark.parametrize(
    "args",
    [
        ["--update-readings"],  # where to?
        ["--readings", "r.json", "--update-readings", "--models", "restv2_tiny"],
        ["--readings", "r.json", "--update-readings", "--dtypes", "bf16"],
        ["--readings", "r.json", "--update-readings", "--force", "attn_fwd.block_n=64"],
        ["--readings", "r.json", "--update-readings", "--targets", "sm_90"],
        ["--readings", "r.json", "--update-readings", "--inputs", "224x224x128"],
    ],
)
def test_update_readings_needs_the_whole_zoo(args, tmp_path, monkeypatch, capsys):
    """A partial run would replace this build's readings with a part of them: refused before
    anything is compiled, and the file is not written."""
    from restv2.targets import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert (
        exc.value.code == 2 and "--update-readings needs --readings FILE and the whole zoo" in capsys.readouterr().err
    )
    assert not (tmp_path / "r.json").exists()


def test_inputs_choose_what_is_traced(monkeypatch, capsys):
    """``--inputs HxWxB ...`` reaches the enumeration in place of the default sizes (the GPU
    runner compiles its rows' plans so); a malformed or too small input is refused by name."""
    import restv2.targets as cli

    seen = {}

    def fake_run_check(models, dtypes, inputs, targets, *_):
        seen.update(models=models, dtypes=dtypes, inputs=inputs, targets=targets)
        return []

    monkeypatch.setattr(cli, "run_check", fake_run_check)
    argv = ["--targets", "sm_90", "--models", "restv2_tiny", "--dtypes", "bf16"]
    assert cli.main([*argv, "--inputs", "224x224x128", "800X1333x2"]) == 0
    assert seen == dict(
        models=["restv2_tiny"], dtypes=["bf16"], inputs=[(224, 224, 128), (800, 1333, 2)], targets=["sm_90"]
    )
    assert cli.main(argv) == 0 and seen["inputs"] == list(cli.INPUTS)
    for bad, message in (("224x224", "HEIGHTxWIDTHxBATCH"), ("16x224x1", "at least 32x32"), ("224x224x0", "batch")):
        with pytest.raises(SystemExit) as exc:
            cli.main([*argv, "--inputs", bad])
        assert exc.value.code == 2 and message in capsys.readouterr().err


JIT_KEYS = """
import json
from restv2 import targets as zoo
from restv2_kernels import targets
from restv2_kernels.plans import TARGETS


def one_launch_a_kernel(target):
    calls = zoo.zoo_calls(["restv2_tiny", "rest_lite"], ["bf16"], [(64, 64, 2), (384, 384, 1)])
    first = {}
    for rec, use in zoo.record_launches(calls, target):
        first.setdefault(rec.plan.kernel, rec)
    return first


if __name__ == "__main__":
    launches = one_launch_a_kernel("sm_90")
    rows = targets.check({"sm_90": [(rec, kernel) for kernel, rec in launches.items()]})
    control = list(one_launch_a_kernel("sm_80").values())[:2]
    print(json.dumps({
        "kernels": sorted(launches),
        "problems": [r.problems for r in rows if r.problems],
        "after_check": targets.jit_compiles(launches.values(), TARGETS["sm_90"]),
        "control": targets.jit_compiles(control, TARGETS["sm_80"]),
        "control_kernels": sorted(rec.fn.fn.__name__ for rec in control),
    }))
"""


def test_the_jit_finds_what_the_check_compiled(tmp_path):
    """A JIT launch finds the target check's compiles in Triton's cache, under Triton's own keys:
    one launch of each of the zoo's kernels is compiled by ``check`` into an empty cache, then
    warmed up through the kernel's JIT (``jit_compiles``), which compiles none of them again. (The
    GPU runner's precompile relies on it, as does every reading filed under a cache key.) The
    control, two launches of the same kernels for sm_80, compiled by nobody, shows that the JIT's
    compiles are seen."""
    env = compiling_env()
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-c", JIT_KEYS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["after_check"] == {}
    assert found["kernels"] == sorted(KERNELS) and found["problems"] == []
    assert found["control"] == {name: 1 for name in found["control_kernels"]}


COVERAGE = """
import contextlib, json, sys
sys.path.insert(0, "benchmarks")
import traffic
from restv2 import targets as zoo
from restv2_kernels import plans, targets
from restv2_kernels.plans import TARGETS

MODELS = ("restv2_tiny", "rest_lite")
SIZE = (224, 224, 1)
TARGET = TARGETS["sm_90"]
made = []
recording = plans.recording


@contextlib.contextmanager
def keep():
    with recording() as launches:
        yield launches
    made.extend(launches)


def jobs(recorded):
    return {targets.specialize(r, TARGET).key: f"{r.plan.kernel} {r.plan.describe()}" for r in recorded}


if __name__ == "__main__":
    calls = zoo.zoo_calls(MODELS, ["bf16"], [SIZE])
    enumerated = jobs(r for r, _ in zoo.record_launches(calls, TARGET.name))
    plans.recording = keep  # traffic's launchers record through it
    missing = {}
    for model in MODELS:
        for train, features in ((True, False), (True, True), (False, False), (False, True)):
            made.clear()
            traffic.count_model(
                model, "triton", SIZE[2], SIZE[:2], "bf16", train, features=features, target=TARGET,
                drop_path=0.1 if train else 0.0,
            )
            for key, what in jobs(made).items():
                if key not in enumerated:
                    missing.setdefault(what, f"{model} train={train} features={features}")
    print(json.dumps({"missing": missing, "enumerated": len(enumerated)}))
"""


def test_the_check_enumerates_every_launch_a_model_makes():
    """The check (and the GPU runner's precompile) compiles the launches it derives from the
    model's op calls: their forward, and their backward with the gradients autograd would pass.
    Here the models run for real, on meta tensors (``benchmarks/traffic.py``: autograd calls each
    op's launcher, recorded), as classifiers and as dense backbones, in training (at drop path
    0.1) and in eval mode, and every launch they make must be one the check compiles. It failed
    with the classifier's final norm, whose residual gets no gradient while its branch is
    dropped."""
    env = compiling_env()
    proc = subprocess.run(
        [sys.executable, "-c", COVERAGE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["enumerated"] > 100 and found["missing"] == {}


def test_autocast_variants_of_add_layer_norm():
    """Under autocast the kernel path hands add + LayerNorm the LayerNorm's own fp32 weight and
    bias and a Linear's 16-bit branch (or none), on an fp32 stream (ResTv2) or a 16-bit one
    (ResTv1): the check lists both streams for every call. A block's norm writes 16-bit, the
    final norm (the last of each forward) asks no dtype."""
    import restv2.targets as cli

    f32, bf16 = torch.float32, torch.bfloat16
    calls = [c for c in cli.model_calls("restv2_tiny", [(64, 64, 1)]) if c.op == "add_layer_norm"]
    finals = [c for c in calls if c.final]
    assert len(finals) == 2 and finals[-1] is calls[-1]  # training, then eval: each forward's last
    assert all(c.args[2].shape == (768,) and c.args[1] is not None for c in finals)
    first = next(c for c in calls if c.args[1] is None)  # a stage's first norm: nothing to add
    block = next(c for c in calls if c.args[1] is not None and not c.final)
    for call in (first, block, finals[0]):
        assert call.autocast_variants("fp32") == []
        variants = call.autocast_variants("bf16")
        assert [v.args[0].dtype for v in variants] == [f32, bf16]
        for v in variants:
            x, branch, weight, bias, _, out_dtype, *scale = v.args
            assert branch is None if call is first else branch.dtype == bf16
            assert weight.dtype == bias.dtype == f32 and all(s.dtype == f32 for s in scale)
            assert out_dtype == (None if call.final else bf16)
            assert "autocast-bf16" in v.use and v.final == call.final
