"""`copd study` end to end at a tiny size: shared base, runs per mode and seed, report, plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from lost_cases import TINY, TWO, copd, write_config

pytestmark = pytest.mark.multiproc

SMALL = [*TINY, TWO, "schedule.cycles=2", "schedule.rl_steps=1", "schedule.opd_steps=1",
         "data.n_eval=8", "pretrain.steps=4", "pretrain.eval_every=0", "pretrain.eval_limit=4",
         "eval.limit=4", "eval.overlap_prompts=2", "eval.every=2", "eval.overlap_every=2"]  # fmt: skip


def _study(tmp_path: Path, out: Path, modes: str, seeds: str, timeout: float = 600):
    cfg = write_config(tmp_path / "c.yaml", SMALL)
    res = copd("study", "--config", str(cfg), "--modes", modes, "--seeds", seeds,
               "--out", str(out), timeout=timeout)  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res


def _cell(values: list[float]) -> str:
    m = statistics.fmean(values)
    return f"{100 * m:.1f} ± {100 * statistics.stdev(values):.1f}"


def _check_table(out: Path, report: str) -> None:
    """Every checked row of report.md and summary.json is what the runs' eval.json files say."""
    evals = {(m, s): json.loads((out / "runs" / m / f"seed{s}" / "eval.json").read_text())
             for m in ("copd", "expert") for s in (1, 2)}  # fmt: skip
    caps = ["arith", "reverse"]
    expect = {
        "CoPD merged": [evals[("copd", s)]["merged"] for s in (1, 2)],
        "experts, merged": [evals[("expert", s)]["merged"] for s in (1, 2)],
        "CoPD branch arith (not merged)": [evals[("copd", s)]["branch arith"] for s in (1, 2)],
    }
    summary = json.loads((out / "summary.json").read_text())
    for name, rows in expect.items():
        means = [statistics.fmean(r[c] for c in caps) for r in rows]
        cells = [_cell([r[c] for r in rows]) for c in caps] + [_cell(means)]
        assert f"| {name} | " + " | ".join(cells) + " |" in report.replace("**", ""), name
        assert summary["rows"][name]["mean"]["mean"] == pytest.approx(statistics.fmean(means))
    own = [evals[("expert", s)]["branch reverse"]["reverse"] for s in (1, 2)]
    assert f"| expert reverse, own domain | - | {_cell(own)} | - |" in report


def _check_comparisons(out: Path, report: str) -> None:
    """The headline pairs: per-seed differences recomputed from the runs' eval_problems.json,
    an interval around their mean, and the row in report.md before the accuracy table."""
    summary = {c["pair"]: c for c in json.loads((out / "summary.json").read_text())["comparisons"]}
    assert sorted(summary) == ["CoPD branch arith - base, own domain",
                               "CoPD branch arith - expert arith, own domain",
                               "CoPD branch reverse - base, own domain",
                               "CoPD branch reverse - expert reverse, own domain",
                               "CoPD merged - base", "CoPD merged - base (arith)",
                               "CoPD merged - base (reverse)",
                               "CoPD merged - experts merged",
                               "expert arith - base, own domain",
                               "expert reverse - base, own domain",
                               "experts merged - base", "experts merged - base (arith)",
                               "experts merged - base (reverse)"]  # fmt: skip

    def problems(mode: str, s: int) -> dict:
        return json.loads((out / "runs" / mode / f"seed{s}" / "eval_problems.json").read_text())

    def diff(a: dict, b: dict) -> float:
        assert a.keys() == b.keys() and len(a) == 8
        return statistics.fmean(a[k] - b[k] for k in a)

    merged = summary["CoPD merged - experts merged"]
    per_seed = [statistics.fmean(diff(problems("copd", s)["merged"][c],
                                      problems("expert", s)["merged"][c])
                                 for c in ("arith", "reverse")) for s in (1, 2)]  # fmt: skip
    assert merged["per_seed"] == pytest.approx(per_seed)
    assert merged["lo"] <= merged["mean"] == pytest.approx(statistics.fmean(per_seed))
    assert merged["mean"] <= merged["hi"]
    own = summary["CoPD branch arith - expert arith, own domain"]
    assert own["capabilities"] == ["arith"]
    assert own["per_seed"] == pytest.approx([diff(problems("copd", s)["branch arith"]["arith"],
                                                  problems("expert", s)["branch arith"]["arith"])
                                             for s in (1, 2)])  # fmt: skip
    # the shared base was evaluated once (in one run); every seed is paired with it
    (base,) = [json.loads(f.read_text())["base"] for f in (out / "runs").glob("*/seed*/eval_problems.json")
               if "base" in json.loads(f.read_text())]  # fmt: skip
    gained = summary["CoPD merged - base (reverse)"]
    assert gained["capabilities"] == ["reverse"]
    assert gained["per_seed"] == pytest.approx(
        [diff(problems("copd", s)["merged"]["reverse"], base["reverse"]) for s in (1, 2)]
    )
    lost = summary["experts merged - base (arith)"]
    assert lost["per_seed"] == pytest.approx(
        [diff(problems("expert", s)["merged"]["arith"], base["arith"]) for s in (1, 2)]
    )
    head = report.index("| CoPD merged - experts merged | arith, reverse | ")
    assert head < report.index("## Accuracy")
    row = report[head:].splitlines()[0]
    assert ("no difference shown" in row) == merged["contains_zero"]


def test_study_two_modes_two_seeds_writes_the_report_from_the_runs(tmp_path):
    out = tmp_path / "study"
    _study(tmp_path, out, "copd,expert", "1,2")
    report = (out / "report.md").read_text()
    for png in ("accuracy.png", "overlap.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{png}" in report
    # one shared base, evaluated once (the first run); every run started from it
    assert (out / "base" / "base" / "config.yaml").exists()
    evals = list((out / "runs").glob("*/seed*/eval.json"))
    assert len(evals) == 4 and sum("base" in json.loads(f.read_text()) for f in evals) == 1
    _check_table(out, report)
    _check_comparisons(out, report)
    assert "| copd |" in report and "| expert |" in report  # wall time per mode
    # curves: the copd run logged probes and merged evaluations every 2 steps
    path = out / "runs/copd/seed1/metrics/arith.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in rows if "probe/overlap" in r] == [1, 3]
    assert [r["step"] for r in rows if "eval/merged/mean" in r] == [1, 3]
    # A second call finds every run finished (skipped) and rewrites the report from the eval
    # files: given distinct numbers there, the table shows exactly those.
    for i, f in enumerate(sorted(evals)):
        table = json.loads(f.read_text())
        for j, row in enumerate(table.values()):
            for k, cap in enumerate(sorted(row)):
                row[cap] = (1 + i + 7 * j + 31 * k) / 1000
        f.write_text(json.dumps(table))
    again = _study(tmp_path, out, "copd,expert", "1,2", timeout=120)
    assert again.stdout.count("finished before: skipped") == 4
    _check_table(out, (out / "report.md").read_text())
    assert (out / "report.md").read_text() != report
    # The same study continued with only the mode whose runs did not evaluate the base: its
    # report still pairs every run with the shared base (found in the other mode's run).
    (with_base,) = [f.parent.parent.name for f in evals if "base" in json.loads(f.read_text())]
    other = "expert" if with_base == "copd" else "copd"
    _study(tmp_path, out, other, "1,2", timeout=120)
    rows = {c["pair"]: c for c in json.loads((out / "summary.json").read_text())["comparisons"]}
    merged = "CoPD merged - base" if other == "copd" else "experts merged - base"
    assert "missing" not in rows[merged] and len(rows[merged]["per_seed"]) == 2, rows[merged]
    assert "| base |" in (out / "report.md").read_text()


def test_study_names_bad_input_in_one_line(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", SMALL)
    cases = [(["--modes", "copd,bogus"], "--modes"), (["--seeds", "1,x"], "--seeds"),
             (["--modes", "copd", "branches=[{name: a, data: arith}]"], "branches")]  # fmt: skip
    for extra, needle in cases:
        res = copd("study", "--config", str(cfg), "--out", str(tmp_path / "s"), *extra)
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert res.returncode == 1 and len(lines) == 1 and needle in lines[0], res.stderr


def test_distillation_runs_resumed_from_the_expert_stage_equal_runs_from_scratch(tmp_path):
    """A study with distillation modes (in ``make test``: it once crashed planning stage 1):
    static_opd reuses the expert run's first cycles * rl_steps steps; the result is the
    static_opd run trained from the base on its own, bit for bit. mopd (2 branches) is the
    static_opd run. copd runs beside them."""
    from lost_cases import metrics_rows, model_tensors
    from study_cases import train_from_file

    from multiproc import spawn

    out = tmp_path / "study"
    res = _study(tmp_path, out, "copd,expert,static_opd,mopd", "1")
    assert res.stdout.count("same run as static_opd") == 2
    assert json.loads((out / "runs" / "copd" / "seed1" / "eval.json").read_text())["merged"]
    reused = out / "runs" / "static_opd-arith" / "seed1"
    assert json.loads((reused / "stage1_from.json").read_text())["steps"] == 2
    scratch = tmp_path / "scratch"
    spawn(train_from_file, 2, str(reused / "final" / "model" / "config.yaml"),
          [f"run_dir={scratch}"])  # fmt: skip
    a, b = model_tensors(reused / "final" / "model"), model_tensors(scratch / "final" / "model")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((reused / "eval.json").read_text()) == json.loads(
        (scratch / "eval.json").read_text()
    )
    ra, rb = metrics_rows(reused), metrics_rows(scratch)
    assert sorted(ra) == sorted(rb)
    # probes in stage 1 (copied from the expert run) and stage 2, on both branches
    for branch in ("arith", "reverse"):
        probed = [s for (b, s), r in sorted(ra.items()) if b == branch and "probe/overlap" in r]
        assert probed == [1, 3], (branch, probed)
    for key in ra:
        for k in ("cycle", "phase", "loss", "reward", "grad_norm", "probe/overlap", "eval/mean"):
            assert ra[key].get(k) == rb[key].get(k), (key, k)
    report = (out / "report.md").read_text()
    assert "| MOPD, student arith |" in report and "| static OPD, student arith |" in report
    assert "| CoPD merged |" in report.replace("**", "")


def test_a_failing_run_ends_the_study_with_one_line_naming_it(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", SMALL)
    res = copd("study", "--config", str(cfg), "--modes", "copd,expert", "--seeds", "1",
               "--out", str(tmp_path / "s"), "rollout.max_new_tokens=60")  # fmt: skip
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == 1 and len(lines) == 1, res.stdout[-2000:] + res.stderr
    assert "failed with exit code" in lines[0] and "max_seq_length" in lines[0], lines[0]
    assert "study.log" in lines[0]


def test_stage1_of_the_distillation_modes_is_the_expert_run_s_first_rl_steps():
    from copd_mega.config import load_config
    from copd_mega.study.run import stage1_steps

    cfg = load_config(None, SMALL)
    assert stage1_steps(cfg) == cfg.schedule.cycles * cfg.schedule.rl_steps == 2
    three = "branches=[{name: a, data: arith}, {name: r, data: reverse}, {name: s, data: sort}]"
    assert stage1_steps(load_config(None, [*SMALL, three])) == 2
