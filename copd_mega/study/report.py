"""The report of ``copd study``: ``STUDY/report.md``, ``STUDY/summary.json``, ``STUDY/plots``.

Every accuracy in the table is read from a run's ``eval.json`` (the held-out greedy pass@1 its
``copd train`` wrote at the end, on ``data.n_eval`` problems per capability); ``summary.json``
names the file and row of each number. Mean and sample standard deviation (n - 1) over seeds,
in percent; a row's ``mean`` is the mean over the capabilities, per seed, then over seeds.
Curves come from the runs' metrics (``eval/...`` and ``probe/overlap``, :mod:`periodic_eval`).

The headline is the paired comparisons (:func:`comparisons`): for each pair of models that
matters, the per-seed difference, its mean and a 95% paired-bootstrap interval over seeds and
eval problems (:mod:`copd_mega.study.intervals`), from the runs' ``eval_problems.json``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from copd_mega.ckpt.checkpoint import write_text_atomic
from copd_mega.config import Config
from copd_mega.launch.datasets import capabilities_of
from copd_mega.study.intervals import align, paired_bootstrap
from copd_mega.study.plots import caps_of, plot_curves


def row_specs(cfg: Config, runs) -> list[tuple[str, str, str, list[str] | None]]:
    """(table row, run label, eval.json row, capabilities shown or None for all), in order."""

    labels = {r.label for r in runs}
    specs = []
    if "expert" in labels:
        for b in cfg.branches:
            specs.append((f"expert {b.name}, own domain", "expert", f"branch {b.name}",
                          capabilities_of(b.data)))  # fmt: skip
        specs.append(("experts, merged", "expert", "merged", None))
    if "mixed" in labels:
        specs.append(("mixed (one policy, union data)", "mixed", "final (mixed)", None))
    for mode, name in (("static_opd", "static OPD"), ("mopd", "MOPD")):
        for b in cfg.branch_names:
            if f"{mode}-{b}" in labels:
                specs.append((f"{name}, student {b}", f"{mode}-{b}", f"final ({b})", None))
    if "copd" in labels:
        for b in cfg.branch_names:
            specs.append((f"CoPD branch {b} (not merged)", "copd", f"branch {b}", None))
        specs.append(("CoPD merged", "copd", "merged", None))
    return specs


def _source(run) -> Path:
    """The run directory holding ``run``'s results (the shared run's for ``same_as``)."""
    return run.path.parent.parent / run.same_as / run.path.name if run.same_as else run.path


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else None)


def base_run(out: Path, runs) -> Path:
    """The run directory that evaluated the shared base: the study's first run, else (a study
    continued with other modes, whose first run evaluated it) any run under ``out/runs`` whose
    eval.json has the base row; every run of a study starts from the same base."""
    first = next(r for r in runs if not r.same_as).path
    for d in [first, *sorted((out / "runs").glob("*/seed*"))]:
        f = d / "eval.json"
        if f.exists() and "base" in json.loads(f.read_text()):
            return d
    return first


def collect(out: Path, cfg: Config, runs, base_dir: Path) -> dict:
    """Every table number per seed, read from the runs' eval.json files (the base's from
    ``base_dir``, :func:`base_run`)."""
    caps = caps_of(cfg)
    by = {(r.label, r.seed): r for r in runs}
    seeds = sorted({r.seed for r in runs})
    rows: dict = {}
    base_file = base_dir / "eval.json"
    base = json.loads(base_file.read_text()).get("base") if base_file.exists() else None
    if base:
        src = str(base_file.relative_to(out))
        rows["base"] = {"per_seed": {"-": {**base, "mean": statistics.fmean(base[c] for c in caps)}},
                        "source": {"-": f"{src}: base"}}  # fmt: skip
    for name, label, key, shown in row_specs(cfg, runs):
        per_seed, source = {}, {}
        for s in seeds:
            f = _source(by[(label, s)]) / "eval.json"
            accs = json.loads(f.read_text())[key]
            vals = {c: accs[c] for c in (shown or caps)}
            if shown is None:
                vals["mean"] = statistics.fmean(accs[c] for c in caps)
            per_seed[str(s)], source[str(s)] = vals, f"{f.relative_to(out)}: {key}"
        rows[name] = {"per_seed": per_seed, "source": source}
    for row in rows.values():
        cols = next(iter(row["per_seed"].values())).keys()
        stats = {c: _mean_std([v[c] for v in row["per_seed"].values()]) for c in cols}
        row["mean"] = {c: m for c, (m, _) in stats.items()}
        row["std"] = {c: sd for c, (_, sd) in stats.items()}
    return {"capabilities": caps, "seeds": seeds, "rows": rows}


def _vs_base(cfg: Config, label: str, title: str, merged_title: str) -> list:
    """Each branch of run ``label`` against the shared base in its own domain, and its merged
    model against the base overall and per capability."""
    caps, base = caps_of(cfg), (BASE, "base")
    specs = [(f"{title} {b.name} - base, own domain", (label, f"branch {b.name}"), base,
              capabilities_of(b.data)) for b in cfg.branches]  # fmt: skip
    specs.append((f"{merged_title} - base", (label, "merged"), base, caps))
    if len(caps) > 1:
        specs += [(f"{merged_title} - base ({c})", (label, "merged"), base, [c]) for c in caps]
    return specs


def pair_specs(cfg: Config, runs) -> list[tuple[str, tuple[str, str], tuple[str, str], list]]:
    """(name, (run label, eval row) of A, of B, capabilities) of every pair that matters: each
    CoPD branch (and each expert) against the base in its own domain, CoPD merged (and the
    merged experts) against the base overall and per capability; CoPD merged against mixed,
    static OPD and the merged experts; each CoPD branch against the expert of its own domain."""
    labels, caps = {r.label for r in runs}, caps_of(cfg)
    # Against the shared base (evaluated once, see base_run): what each branch gained in its own
    # domain, and whether the merge kept every capability (one row per capability).
    specs = _vs_base(cfg, "copd", "CoPD branch", "CoPD merged") if "copd" in labels else []
    if "expert" in labels:
        specs += _vs_base(cfg, "expert", "expert", "experts merged")
    if "copd" not in labels:
        return specs
    merged = ("copd", "merged")
    if "mixed" in labels:
        specs.append(("CoPD merged - mixed", merged, ("mixed", "final (mixed)"), caps))
    for b in cfg.branch_names:
        if f"static_opd-{b}" in labels:
            specs.append((f"CoPD merged - static OPD (student {b})", merged,
                          (f"static_opd-{b}", f"final ({b})"), caps))  # fmt: skip
    if "expert" in labels:
        specs.append(("CoPD merged - experts merged", merged, ("expert", "merged"), caps))
        for b in cfg.branches:
            specs.append((f"CoPD branch {b.name} - expert {b.name}, own domain",
                          ("copd", f"branch {b.name}"), ("expert", f"branch {b.name}"),
                          capabilities_of(b.data)))  # fmt: skip
    return specs


BASE = "<base>"  # pair_specs' run label of the shared base (its evaluation: base_run)


def comparisons(cfg: Config, runs, base_dir: Path) -> list[dict]:
    """Every pair of :func:`pair_specs` with its paired differences and 95% interval (fractions);
    a pair whose runs lack ``eval_problems.json`` has ``missing`` instead. ``base_dir``: the run
    that evaluated the shared base (:func:`base_run`)."""
    by = {(r.label, r.seed): r for r in runs}
    seeds = sorted({r.seed for r in runs})

    def problems(label: str, s: int) -> Path:
        return (base_dir if label == BASE else _source(by[(label, s)])) / "eval_problems.json"

    rows = []
    for name, (la, ra), (lb, rb), caps in pair_specs(cfg, runs):
        files = [(problems(la, s), problems(lb, s)) for s in seeds]
        missing = [str(f) for pair in files for f in pair if not f.exists()]
        if missing:
            rows.append({"pair": name, "capabilities": caps, "missing": missing})
            continue
        loaded = [(json.loads(fa.read_text()), json.loads(fb.read_text())) for fa, fb in files]
        absent = [f"{f}: row {r!r}" for (fa, fb), (ja, jb) in zip(files, loaded, strict=True)
                  for f, j, r in ((fa, ja, ra), (fb, jb, rb)) if r not in j]  # fmt: skip
        if absent:  # e.g. the base, with eval.base=false
            rows.append({"pair": name, "capabilities": caps, "missing": absent})
            continue
        diffs = [[align(ja[ra][c], jb[rb][c], f"{name}, {c}") for c in caps] for ja, jb in loaded]
        d = paired_bootstrap(diffs)
        rows.append({"pair": name, "capabilities": caps, "seeds": seeds, "mean": d.mean,
                     "lo": d.lo, "hi": d.hi, "per_seed": list(d.per_seed),
                     "contains_zero": d.contains_zero})  # fmt: skip
    return rows


def reading(c: dict) -> str:
    """The interval in words: which side wins, or that it contains 0."""
    a, b = (x.strip() for x in c["pair"].split(" - ", 1))
    if c["contains_zero"]:
        return "interval contains 0: no difference shown"
    return f"{a} ahead" if c["lo"] > 0 else f"{a} behind {b}"


def comparison_lines(comps: list[dict]) -> list[str]:
    """The headline table (points: percent of problems)."""
    lines = [
        "| comparison (A - B) | capabilities | per seed | mean | 95% interval | reading |",
        "|---|---|---|---|---|---|",
    ]
    for c in comps:
        caps = ", ".join(c["capabilities"])
        if "missing" in c:
            lines.append(f"| {c['pair']} | {caps} | - | - | - | no per-problem results "
                         f"({len(c['missing'])} missing: {c['missing'][0]}) |")  # fmt: skip
            continue
        per = " / ".join(f"{100 * v:+.1f}" for v in c["per_seed"])
        lines.append(f"| {c['pair']} | {caps} | {per} | {100 * c['mean']:+.1f} | "
                     f"[{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}] | {reading(c)} |")  # fmt: skip
    return lines


def wall_times(out: Path, runs) -> dict:
    """Seconds per mode: mean over seeds of the sum of the mode's runs (``study_time.json``)."""
    per: dict[str, dict[int, float]] = {}
    notes: dict[str, str] = {}
    for r in runs:
        mode = r.mode
        if r.same_as:
            notes[mode] = f"the same runs as {r.same_as.split('-')[0]} (identical plan)"
            continue
        t = r.path / "study_time.json"
        secs = json.loads(t.read_text())["total"] if t.exists() else 0.0
        per.setdefault(mode, {}).setdefault(r.seed, 0.0)
        per[mode][r.seed] += secs
        if (r.path / "stage1_from.json").exists():
            notes[mode] = "stage 1 reused from the expert run (its time is counted there)"
    out_t = {m: {"per_seed": v, "mean_s": statistics.fmean(v.values())} for m, v in per.items()}
    base = out / "base" / "study_time.json"
    if base.exists():
        out_t["base pretraining"] = {"mean_s": json.loads(base.read_text())["total"]}
    return {"modes": out_t, "notes": notes}


def _cell(row: dict, c: str) -> str:
    if c not in row["mean"]:
        return "-"
    m, sd = row["mean"][c], row["std"][c]
    return f"{100 * m:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def markdown(data: dict, times: dict, plots: list[str], shared: int, comps: list[dict]) -> str:
    caps = data["capabilities"]
    seeds = ", ".join(str(s) for s in data["seeds"])
    lines = [
        "# copd study", "",
        f"Paired differences A - B in held-out greedy pass@1 (points), seeds {seeds}: per seed, "
        "their mean, and a 95% paired-bootstrap interval over seeds and eval problems (the same "
        "problems for A and B; `copd_mega/study/intervals.py`). A pair whose interval contains 0 "
        "shows no difference.", "",
        *comparison_lines(comps), "",
        "## Accuracy", "",
        f"Held-out greedy pass@1 (%), mean ± sample std over seeds {seeds}; each number is read "
        "from a run's `eval.json` (`summary.json` names the file and row of each).", "",
        "| model | " + " | ".join(caps) + " | mean |",
        "|---|" + "---|" * (len(caps) + 1),
    ]  # fmt: skip
    for name, row in data["rows"].items():
        bold = f"**{name}**" if name == "CoPD merged" else name
        lines.append(f"| {bold} | " + " | ".join(_cell(row, c) for c in [*caps, "mean"]) + " |")
    lines += ["", "## Wall time", "", "| mode | seconds per seed (mean) | note |", "|---|---|---|"]
    for mode, t in times["modes"].items():
        lines.append(f"| {mode} | {t['mean_s']:.0f} | {times['notes'].get(mode, '')} |")
    for mode, note in times["notes"].items():
        if mode not in times["modes"]:
            lines.append(f"| {mode} | - | {note} |")
    if shared:
        lines += ["", f"static_opd/mopd stage 1 = the expert run's first {shared} steps (the same "
                  "steps: resumed from a copy of its checkpoint)."]  # fmt: skip
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    lines += ["", "`probe/overlap`: mean top-k overlap between the branches on on-policy rollouts "
              "(held-out prompts, no gradient); a one-branch mode (mixed) has none."]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(out: Path, cfg: Config, runs, shared: int) -> Path:
    """Write summary.json, the plots and report.md (each beside, then swapped in)."""

    base_dir = base_run(out, runs)  # read once: every eval.json until one has the base row
    data = collect(out, cfg, runs, base_dir)
    comps = comparisons(cfg, runs, base_dir)
    times = wall_times(out, runs)
    plots = plot_curves(out, cfg, runs)
    summary = {**data, "comparisons": comps, "wall_time": times}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    report = out / "report.md"
    write_text_atomic(report, markdown(data, times, [str(p.relative_to(out)) for p in plots],
                                       shared, comps))  # fmt: skip
    return report
