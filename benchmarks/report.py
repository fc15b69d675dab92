"""A GPU run's scorecard and README tables, read from the files ``gpu_suite.py`` wrote.

    python benchmarks/report.py benchmarks/results/nvidia-h100-80gb-hbm3 [--dtype bf16] [--json PATH]

Reads every ``gpu_suite`` phase file (``<phase>.json``) among the paths given (files, or folders
searched recursively) and prints markdown:

1. The scorecard: each speed target of the project (``TARGETS``) as a ratio of two measurements
   taken in one run (one kernel benchmark's child, or one e2e phase), against its threshold:
   ``met``, ``missed`` (and by how much), or ``not measured`` (and why: no row, an error, a
   skipped row, or a dry run).
2. The Performance tables: per kernel, shape, dtype and mode (ms, GB/s, % of the copy bandwidth
   measured in that run, multiple of the roofline floor, speed-up over eager and over the fastest
   other implementation), and the end-to-end rows (images/s, speed-up, peak memory, multiple of
   the traffic floor), each headed by the GPU, versions, date and commit they were measured at.
3. The profiles (``--phase profile``), where a profile phase file is among them: per profiled row,
   the backends' ms per step by kernel category side by side, and their largest kernels.

The kernel targets are read at ``--dtype`` (default bf16, the precision of every end-to-end
target). Where one measurement was made more than once (a phase re-run, or two folders), the
run that started last counts. ``gpu_suite.py`` prints the scorecard lines its phase measured
at the end of the kernels and e2e phases, and keeps them in its JSON (``"scorecard"``).

Importing this module touches no GPU and imports neither Triton nor matplotlib.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import pathlib
import sys
from collections.abc import Iterable

SUITE = "benchmarks/gpu_suite.py"  # what a phase file names as its writer
STAGE1 = "tiny-s1-224"  # the kernel benchmarks' restv2_tiny stage-1 shape at 224 px, batch 128
TINY, CONVNEXT, SWIN = "restv2_tiny", "convnext_tiny", "swin_tiny_patch4_window7_224"


@dataclasses.dataclass(frozen=True)
class Target:
    """One speed target: a measured value against ``threshold`` with ``op`` (``>=`` or ``<=``).

    Kernel targets (``phase="kernels"``): ``bench``, ``mode`` at the ``STAGE1`` shape; ``against``
    is ``"copy"`` (triton's % of the copy bandwidth) or the implementation whose ms over triton's
    is the ratio (``"sdpa-*"``: the fastest SDPA backend). End-to-end targets (``phase="e2e"``):
    restv2_tiny bf16 rows of ``mode`` at ``batch`` and ``resolution``; ``against`` is the label
    whose images/s (or, with ``measure="peak_mem_mib"``, peak memory) divides ``label``'s, or a
    timm model's name, against which the best restv2_tiny row at ``label``'s compile setting counts.
    """

    name: str
    phase: str
    op: str
    threshold: float
    mode: str
    against: str
    bench: str | None = None
    label: str | None = None
    batch: int | None = None
    resolution: tuple[int, int] | None = None
    measure: str = "images_per_s_median"


def _kernel_targets() -> list[Target]:
    out = []
    for bench, others in (
        ("attention", [("sdpa-*", 1.0, "the best SDPA backend")]),
        ("upsample", [("eager", 4.0, "the eager chain"), ("compile", 1.3, "the chain under torch.compile")]),
    ):
        for mode in ("fwd", "bwd"):
            out.append(
                Target(f"{bench} {STAGE1} {mode}: % of copy bandwidth", "kernels", ">=", 70.0, mode, "copy", bench)
            )
            out += [
                Target(f"{bench} {STAGE1} {mode}: vs {what}", "kernels", ">=", need, mode, other, bench)
                for other, need, what in others
            ]
    return out


_INFER = {"mode": "infer", "batch": 256, "resolution": (224, 224)}
_DET = {"mode": "features-fwd+bwd", "batch": 2, "resolution": (800, 1333)}
TARGETS: list[Target] = [
    *_kernel_targets(),
    Target(
        f"{TINY} bf16 b256 inference: kernels vs reference",
        "e2e",
        ">=",
        1.5,
        label="kernels",
        against="reference",
        **_INFER,
    ),
    Target(
        f"{TINY} bf16 b256 inference: kernels+compile vs reference+compile",
        "e2e",
        ">=",
        1.25,
        label="kernels+compile",
        against="reference+compile",
        **_INFER,
    ),
    *(
        Target(
            f"{TINY} bf16 b256 inference, {'compiled' if c else 'eager'}: best {TINY} path vs {peer}",
            "e2e",
            ">=",
            need,
            label="kernels+compile" if c else "kernels",
            against=peer,
            **_INFER,
        )
        for c in (False, True)
        for peer, need in ((CONVNEXT, 1.2), (SWIN, 1.5))
    ),
    Target(
        f"{TINY} bf16 b128 training step: kernels vs reference",
        "e2e",
        ">=",
        1.3,
        "train",
        "reference",
        label="kernels",
        batch=128,
        resolution=(224, 224),
    ),
    Target(
        f"{TINY} 800x1333 b2 features fwd+bwd: peak memory, kernels / reference",
        "e2e",
        "<=",
        0.7,
        label="kernels",
        against="reference",
        measure="peak_mem_mib",
        **_DET,
    ),
    Target(
        f"{TINY} 800x1333 b2 features fwd+bwd: kernels vs reference",
        "e2e",
        ">=",
        1.3,
        label="kernels",
        against="reference",
        **_DET,
    ),
]


@dataclasses.dataclass
class Check:
    """A target as measured: ``status`` is ``met``, ``missed`` or ``not measured``."""

    target: Target
    value: float | None = None
    status: str = "not measured"
    detail: str = ""  # the two measurements, or why there is no value
    source: str | None = None  # the file (and run) the measurements came from

    @property
    def unit(self) -> str:
        return "%" if self.target.against == "copy" else "x"

    @property
    def shortfall(self) -> float | None:
        """How far a missed target is from its threshold, as a fraction of the threshold."""
        t = self.target
        if self.status != "missed":
            return None
        return (t.threshold - self.value) / t.threshold if t.op == ">=" else (self.value - t.threshold) / t.threshold

    def to_dict(self) -> dict:
        t = self.target
        return {
            "name": t.name,
            "phase": t.phase,
            "op": t.op,
            "threshold": t.threshold,
            "unit": self.unit,
            "value": self.value,
            "status": self.status,
            "shortfall": self.shortfall,
            "detail": self.detail,
            "source": self.source,
        }


# ---------------------------------------------------------------------------------------
# Reading the phase files
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Results:
    """What the phase files hold: the records in start order, and their measured rows, each tagged
    with the file it came from; a later run's row replaces an earlier one's of the same key."""

    records: list[dict] = dataclasses.field(default_factory=list)
    kernel_rows: dict[tuple, dict] = dataclasses.field(default_factory=dict)  # (bench, dtype, shape, mode, impl)
    e2e_rows: dict[tuple, dict] = dataclasses.field(default_factory=dict)  # _e2e_key: model, label, mode, batch, ...


def load(paths: Iterable[pathlib.Path]) -> Results:
    """The ``*.json`` files among ``paths`` (folders searched recursively) that gpu_suite wrote,
    taken in the order their runs started (``collect``)."""
    records = []
    for path in map(pathlib.Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        for file in sorted(path.rglob("*.json")) if path.is_dir() else [path]:
            try:
                data = json.loads(file.read_text())
            except (OSError, ValueError):  # not JSON, or cut short
                continue
            if isinstance(data, dict) and data.get("suite") == SUITE and data.get("phase"):
                records.append({**data, "_file": str(file)})
    return collect(records)


def collect(records: list[dict]) -> Results:
    """The measured rows of phase records (each with ``_file``, its path), taken in start order."""
    records = sorted(records, key=lambda r: r.get("started") or "")
    res = Results(records=records)
    for record in records:
        source = f"{pathlib.Path(record['_file']).name} ({record.get('started')})"
        if record.get("dry_run"):
            continue
        rows = (record.get("kernels") or {}).get("rows", [])
        # one bench child measures every impl of a (bench, dtype, shape) together: a later run's
        # measurement of that group replaces the earlier one whole, so pairs never mix two runs
        groups = {(r["bench"], r["dtype"], r["shape"]) for r in rows}
        res.kernel_rows = {k: r for k, r in res.kernel_rows.items() if k[:3] not in groups}
        for row in rows:
            key = (row["bench"], row["dtype"], row["shape"], row["mode"], row["impl"])
            res.kernel_rows[key] = {**row, "_source": f"{source} {row['bench']}/{row['dtype']}"}
        for row in (record.get("e2e") or {}).get("rows", []):
            if row.get("status") in ("planned", "skipped") and _e2e_key(row) in res.e2e_rows:
                continue  # a later run that did not get to this row keeps the earlier measurement
            res.e2e_rows[_e2e_key(row)] = {**row, "_source": source}
    return res


def _e2e_key(row: dict) -> tuple:
    return (
        row["model"],
        row["label"],
        row["mode"],
        row["batch_requested"],
        tuple(row["resolution"]),
        row.get("precision"),
    )


# ---------------------------------------------------------------------------------------
# The scorecard
# ---------------------------------------------------------------------------------------


def _why_not(row: dict | None, what: str) -> str:
    if row is None:
        return f"no {what} row"
    reason = (row.get("error") or row.get("reason") or "").splitlines()
    return f"{what}: {row.get('status') or 'error'}" + (f" ({reason[0][:160]})" if reason else "")


def _kernel_ok(row: dict | None) -> bool:
    return row is not None and "error" not in row and row.get("ms") is not None


def _e2e_ok(row: dict | None) -> bool:
    return row is not None and row.get("status") == "ok" and bool(row.get("images_per_s_median"))


def _ratio(check: Check, num: dict, den: dict, key: str, text: str) -> None:
    """``check.value = num[key] / den[key]`` where both rows come from one run; ``text`` formats them."""
    if num["_source"] != den["_source"]:
        check.detail = f"not from one run: {num['_source']} and {den['_source']}"
        return
    check.value, check.source = num[key] / den[key], num["_source"]
    check.detail = text.format(num=num[key], den=den[key])


def _kernel_check(t: Target, res: Results, dtype: str) -> Check:
    check = Check(t)
    rows = {k[4]: row for k, row in res.kernel_rows.items() if k[:4] == (t.bench, dtype, STAGE1, t.mode)}
    ours = rows.get("triton")
    if not _kernel_ok(ours):
        check.detail = _why_not(ours, f"triton {dtype}")
        return check
    if t.against == "copy":
        check.value, check.source = ours["pct_copy"], ours["_source"]
        check.detail = f"{ours['gbps']:.0f} GB/s in {ours['ms']:.3f} ms"
    else:
        others = [r for impl, r in rows.items() if fnmatch.fnmatch(impl, t.against) and _kernel_ok(r)]
        if not others:
            failed = [r for impl, r in rows.items() if fnmatch.fnmatch(impl, t.against)]
            check.detail = "; ".join(_why_not(r, r["impl"]) for r in failed) or _why_not(None, t.against)
            return check
        other = min(others, key=lambda r: r["ms"])
        _ratio(check, other, ours, "ms", f"{other['impl']} {{num:.3f}} ms / triton {{den:.3f}} ms")
    _judge(check)
    return check


def _e2e_check(t: Target, res: Results) -> Check:
    check = Check(t)
    rows = _e2e_rows(res, TINY, t)
    if t.against in (CONVNEXT, SWIN):  # the best restv2_tiny row at one compile setting against a peer's
        compiled = t.label.endswith("+compile")
        ours = [r for label, r in rows.items() if label.endswith("+compile") == compiled and _e2e_ok(r)]
        peer_label = "timm+compile" if compiled else "timm"
        peer = _e2e_rows(res, t.against, t).get(peer_label)
        if not ours:
            check.detail = f"no {TINY} row measured " + ("under compile" if compiled else "in eager")
        elif not _e2e_ok(peer):
            check.detail = _why_not(peer, f"{t.against} {peer_label}")
        else:
            best = max(ours, key=lambda r: r[t.measure])
            _ratio(check, best, peer, t.measure, f"{best['label']} {{num:.0f}} / {peer_label} {{den:.0f}} images/s")
        _judge(check)
        return check
    num, den = rows.get(t.label), rows.get(t.against)
    for row, label in ((num, t.label), (den, t.against)):
        if not _e2e_ok(row):
            check.detail = _why_not(row, label)
            return check
    if not (num.get(t.measure) and den.get(t.measure)):
        check.detail = f"no {t.measure} recorded"
        return check
    unit = "MiB" if t.measure == "peak_mem_mib" else "images/s"
    _ratio(check, num, den, t.measure, f"{t.label} {{num:.0f}} / {t.against} {{den:.0f}} {unit}")
    if check.value is not None and num.get("batch") != den.get("batch"):
        check.detail += f" (batches {num.get('batch')} and {den.get('batch')}, after out-of-memory)"
    _judge(check)
    return check


def _e2e_rows(res: Results, model: str, t: Target) -> dict[str, dict]:
    """``model``'s bf16 rows of ``t``'s mode, batch and resolution, by label."""
    return {
        k[1]: row
        for k, row in res.e2e_rows.items()
        if k[0] == model and k[2:] == (t.mode, t.batch, tuple(t.resolution), "bf16")
    }


def _judge(check: Check) -> None:
    t = check.target
    if check.value is not None:
        met = check.value >= t.threshold if t.op == ">=" else check.value <= t.threshold
        check.status = "met" if met else "missed"


def scorecard(res: Results, dtype: str = "bf16", phases: Iterable[str] = ("kernels", "e2e")) -> list[Check]:
    """Every target of ``phases``, measured from ``res`` (kernel targets at ``dtype``)."""
    phases = set(phases)
    return [
        _kernel_check(t, res, dtype) if t.phase == "kernels" else _e2e_check(t, res)
        for t in TARGETS
        if t.phase in phases
    ]


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.1f}%" if unit == "%" else f"{value:.2f}{unit}"


def _result(c: Check) -> str:
    return c.status + (f" by {100 * c.shortfall:.0f}%" if c.shortfall is not None else "")


def check_lines(checks: list[Check]) -> list[str]:
    """One plain line per check, for a console (``gpu_suite`` prints these)."""
    return [
        f"{_result(c).upper():<16} {_fmt(c.value, c.unit):>7} (need {c.target.op} "
        f"{_fmt(c.target.threshold, c.unit)}) {c.target.name}: {c.detail}"
        for c in checks
    ]


def scorecard_markdown(checks: list[Check]) -> list[str]:
    lines = ["| target | measured | needed | result | measurements |", "|---|---:|---:|---|---|"]
    lines += [
        f"| {c.target.name} | {_fmt(c.value, c.unit)} | {c.target.op} {_fmt(c.target.threshold, c.unit)} | "
        f"{_result(c)} | {c.detail} |"
        for c in checks
    ]
    return lines


# ---------------------------------------------------------------------------------------
# The Performance tables
# ---------------------------------------------------------------------------------------


def run_header(record: dict) -> str:
    """GPU, versions, date and commit of one phase file, for the line above its table."""
    env = record.get("environment") or {}
    commit = (record.get("git_commit") or "unknown")[:7]
    dirty = " (with uncommitted changes)" if record.get("git_changed") else ""
    date = (record.get("started") or env.get("date") or "")[:10]
    return (
        f"{env.get('gpu') or 'no GPU'}, driver {env.get('driver')}, torch {env.get('torch')}, "
        f"triton {env.get('triton')}, CUDA {env.get('cuda')}; {date}, commit {commit}{dirty}"
    )


def kernel_table(res: Results) -> list[str]:
    lines = [
        "| kernel | shape | dtype | mode | ms | GB/s | % of copy | x floor | vs eager | vs fastest other |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    groups = dict.fromkeys(k[:4] for k in res.kernel_rows)
    for bench, dtype, shape, mode in groups:
        rows = {k[4]: r for k, r in res.kernel_rows.items() if k[:4] == (bench, dtype, shape, mode)}
        ours = rows.get("triton")
        if not _kernel_ok(ours):
            lines.append(f"| {bench} | {shape} | {dtype} | {mode} | {_why_not(ours, 'triton')} | | | | | |")
            continue
        others = [r for impl, r in rows.items() if impl != "triton" and _kernel_ok(r)]
        eager = rows.get("eager")
        vs_eager = f"{eager['ms'] / ours['ms']:.2f}x" if _kernel_ok(eager) else "-"
        best = min(others, key=lambda r: r["ms"]) if others else None
        vs_best = f"{best['ms'] / ours['ms']:.2f}x {best['impl']}" if best else "-"
        lines.append(
            f"| {bench} | {shape} | {dtype} | {mode} | {ours['ms']:.3f} | {ours['gbps']:.0f} | "
            f"{ours['pct_copy']:.1f} | {ours['x_floor']:.2f} | {vs_eager} | {vs_best} |"
        )
    return lines


def e2e_table(res: Results) -> list[str]:
    lines = [
        "| model | backend | mode | precision | batch | resolution | images/s | speed-up | peak MiB | x floor |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    rows = list(res.e2e_rows.values())
    for row in rows:
        res_text = "x".join(map(str, row["resolution"]))
        mode = row["mode"] + (f", drop path {row['drop_path']:g}" if row.get("drop_path") else "")
        if not _e2e_ok(row):
            lines.append(
                f"| {row['model']} | {row['label']} | {mode} | {row['precision']} | "
                f"{row['batch_requested']} | {res_text} | {_why_not(row, 'row')} | | | |"
            )
            continue
        speed = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"  # throughput.add_speedups, in its run
        mem = f"{row['peak_mem_mib']:.0f}" if row.get("peak_mem_mib") is not None else "-"
        floor = f"{row['x_floor']:.2f}" if row.get("x_floor") else "-"
        lines.append(
            f"| {row['model']} | {row['label']} | {mode} | {row['precision']} | {row['batch']} | "
            f"{res_text} | {row['images_per_s_median']:.1f} | {speed} | {mem} | {floor} |"
        )
    return lines


# ---------------------------------------------------------------------------------------
# Profiles (gpu_suite.py --phase profile, kernel_profile.py)
# ---------------------------------------------------------------------------------------

PROFILE_TOP = 8  # kernels listed per backend


def profile_lines(title: str, results: dict[str, dict], top: int = PROFILE_TOP) -> list[str]:
    """Markdown: one profiled step per backend (``kernel_profile.summarize``'s summaries, the first
    the baseline): its host wall and GPU busy time, kernels and categories in ms per step side by
    side, each other backend's difference from the first, and each backend's largest kernels."""
    labels = list(results)
    if not labels:
        return [f"**{title}**: nothing profiled"]
    base = labels[0]
    deltas = labels[1:]
    head = [
        "| ms per step | " + " | ".join(labels) + "".join(f" | {lab} - {base}" for lab in deltas) + " |",
        "|---|" + "---:|" * (len(labels) + len(deltas)),
    ]

    def row(text: str, values: list[float | None], digits: int = 2) -> str:
        cells = [f"{v:.{digits}f}" if v is not None else "-" for v in values]
        diffs = [f"{v - values[0]:+.{digits}f}" if v is not None and values[0] is not None else "-" for v in values[1:]]
        return f"| {text} | " + " | ".join(cells + diffs) + " |"

    lines = [f"**{title}** (under torch.profiler; {results[base]['steps']} steps)", "", *head]
    lines.append(row("host wall", [results[lab]["wall_ms"] for lab in labels]))
    lines.append(row("device busy", [results[lab]["busy_ms"] for lab in labels]))
    lines.append(row("kernels (count)", [results[lab]["launches"] for lab in labels], digits=0))
    categories = list(dict.fromkeys(c for lab in labels for c in results[lab]["categories"]))
    categories.sort(key=lambda c: -max(results[lab]["categories"].get(c, 0.0) for lab in labels))
    lines += [row(c, [results[lab]["categories"].get(c, 0.0) for lab in labels]) for c in categories]
    lines += ["", "| backend | kernel | category | calls | ms | share |", "|---|---|---|---:|---:|---:|"]
    for lab in labels:
        for k in results[lab]["kernels"][:top]:
            name = k["name"] if len(k["name"]) <= 80 else k["name"][:77] + "..."
            name = name.replace("|", "/")
            lines.append(
                f"| {lab} | `{name}` | {k['category']} | {k['calls']:.0f} | {k['ms']:.3f} | {100 * k['share']:.1f}% |"
            )
    return lines


def profile_groups(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """The profile phase's rows (id, status, spec, result) grouped by what was profiled:
    {title: {backend label: its summary}}, in row order; a row not measured adds no label."""
    groups: dict[str, dict[str, dict]] = {}
    for row in rows:
        spec = row["spec"]
        if "op" in spec:
            title, label = f"{spec['op']} {spec['shape']} {spec['dtype']} fwd+bwd", "triton"
        else:
            res = "x".join(map(str, spec["resolution"]))
            compiled = " compiled" if spec["compile"] else ""
            title = (
                f"{spec['model']} {spec['mode']}{compiled} {spec['precision']} batch {spec['batch_requested']} {res}"
            )
            label = spec["backend"] + ("+compile" if spec["compile"] else "")
        group = groups.setdefault(title, {})
        if row["status"] == "ok" and row.get("result"):
            group[label] = row["result"]
    return groups


def profile_markdown(res: Results) -> list[str]:
    """The profile phase's tables, the latest run's of each profiled group."""
    groups: dict[str, dict[str, dict]] = {}
    for record in res.records:
        if record.get("dry_run") or record.get("phase") != "profile":
            continue
        for title, results in profile_groups((record.get("profile") or {}).get("rows", [])).items():
            if results:
                groups[title] = results
    out = []
    for title, results in groups.items():
        out += [*profile_lines(title, results), ""]
    return out


def markdown(res: Results, checks: list[Check], dtype: str = "bf16") -> str:
    measured = [r for r in res.records if not r.get("dry_run")]
    out = [f"### Scorecard (kernel targets at {dtype})", "", *scorecard_markdown(checks), ""]
    for phase, title, table in (("kernels", "Kernels", kernel_table), ("e2e", "End to end", e2e_table)):
        records = [r for r in measured if r["phase"] == phase]
        if not records:
            continue
        out += [f"### {title}", ""]
        out += [f"Measured on {run_header(r)} ({pathlib.Path(r['_file']).name})." for r in records]
        out += ["", *table(res), ""]
    profiles = profile_markdown(res)
    if profiles:
        records = [r for r in measured if r["phase"] == "profile"]
        out += [
            "### Profiles",
            "",
            *(f"Measured on {run_header(r)} ({pathlib.Path(r['_file']).name})." for r in records),
            "",
            *profiles,
        ]
    if not measured:
        out.append("No measured phase file (only dry runs, or none) among the paths given.")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="report.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("paths", nargs="+", type=pathlib.Path, help="gpu_suite phase files, or folders holding them")
    parser.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="the kernel targets' dtype (default: bf16)"
    )
    parser.add_argument("--json", type=pathlib.Path, help="also write the scorecard here")
    args = parser.parse_args(argv)
    try:
        res = load(args.paths)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    if not res.records:
        parser.error(f"no gpu_suite phase file under {' '.join(map(str, args.paths))}")
    checks = scorecard(res, args.dtype)
    print(markdown(res, checks, args.dtype), end="")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "dtype": args.dtype,
                    "files": [r["_file"] for r in res.records],
                    "scorecard": [c.to_dict() for c in checks],
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
