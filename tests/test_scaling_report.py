"""``copd report scaling`` on synthetic metrics: warm-up dropped, per-rank throughput, phase
split, exchange share, the markdown table, the plot and errors that say what to pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from copd_mega.config import load_config, save_config
from copd_mega.report.scaling import main, summarize, summarize_run

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _row(step: int, seconds: float, exchange: float = 0.0, tokens: float = 100.0) -> dict:
    return {"step": step, "time/step": seconds, "time/rollout": seconds / 2,
            "time/exchange": exchange, "time/train": seconds / 4, "train_tokens": tokens}  # fmt: skip


def _write_run(root: Path, branches: int, tp: int = 1, warmup_s: float = 50.0) -> Path:
    """A run dir with ``branches`` metrics files (3 steps each) and a saved config."""
    run = root / f"b{branches}"
    (run / "metrics").mkdir(parents=True)
    for b in range(branches):
        rows = [_row(0, warmup_s), _row(1, 2.0 * branches, 0.5 * b), _row(2, 2.0 * branches)]
        (run / "metrics" / f"x{b}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(CONFIGS / "tiny_cpu.yaml", [f"parallel.tp={tp}"])
    (run / "final" / "model").mkdir(parents=True)
    save_config(cfg, run / "final" / "model" / "config.yaml")
    return run


def test_summary_drops_warmup_and_splits_phases():
    metrics = {
        "a": [_row(0, 99.0, 9.0), _row(1, 2.0, 0.25, 40.0), _row(2, 4.0, 0.25, 80.0)],
        "b": [_row(0, 99.0, 9.0), _row(1, 2.0, 0.5, 20.0), _row(2, 2.0, 0.5, 20.0)],
    }
    s = summarize(metrics, ranks_per_branch=2)
    assert (s.branches, s.world_size, s.steps) == (2, 4, 2)
    assert s.step_time_s == pytest.approx(2.5)
    # branch a: 120 tokens / 6 s = 20/s, b: 40 / 4 = 10/s; per rank: mean / 2 ranks
    assert s.tokens_per_s == pytest.approx(30.0)
    assert s.tokens_per_s_per_rank == pytest.approx(7.5)
    assert s.phase_s["exchange"] == pytest.approx(0.375)
    assert s.phase_s["rollout"] == pytest.approx(1.25)
    assert s.phase_s["merge"] == 0.0 and s.phase_s["teacher"] == 0.0
    assert s.exchange_share == pytest.approx(0.15)
    assert s.other_s == pytest.approx(2.5 - 1.25 - 0.375 - 0.625)
    assert s.save_s == 0.0 and s.step_without_save_s == pytest.approx(2.5)


def test_summary_reports_one_save_and_the_step_without_it():
    saved = {**_row(2, 5.0), "time/checkpoint": 3.0}
    metrics = {"a": [_row(0, 9.0), _row(1, 2.0), saved], "b": [_row(0, 9.0), _row(1, 2.0), saved]}
    s = summarize(metrics, ranks_per_branch=1)
    assert s.save_s == pytest.approx(3.0)  # one save, not spread over the steps
    assert s.phase_s["checkpoint"] == pytest.approx(1.5)
    assert s.step_without_save_s == pytest.approx(3.5 - 1.5)


def test_summary_needs_a_step_after_warmup():
    with pytest.raises(ValueError, match="at least 2 steps"):
        summarize({"a": [_row(0, 1.0)]}, 1, "runs/x")


def test_run_reads_ranks_per_branch_from_the_saved_config(tmp_path):
    s = summarize_run(_write_run(tmp_path, 2, tp=2))
    assert (s.branches, s.ranks_per_branch, s.world_size) == (2, 2, 4)


def test_missing_config_says_what_to_pass(tmp_path):
    run = _write_run(tmp_path, 1)
    (run / "final" / "model" / "config.yaml").unlink()
    with pytest.raises(ValueError, match="--ranks-per-branch"):
        summarize_run(run)
    assert summarize_run(run, ranks_per_branch=3).world_size == 3


def test_cli_writes_table_and_plot(tmp_path, capsys):
    runs = [_write_run(tmp_path, n) for n in (4, 1, 2)]
    png, table = tmp_path / "out" / "s.png", tmp_path / "out" / "s.md"
    assert main([*map(str, runs), "--png", str(png), "--table", str(table)]) == 0
    text = table.read_text()
    lines = text.strip().splitlines()
    assert lines[0].startswith("| branches | ranks | steps | step (s) | tokens/s/rank")
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["1", "2", "4"]
    assert "exchange share" in lines[0] and "checkpoint (s)" in lines[0]
    assert lines[0].endswith("| save (s) | step w/o save (s) |")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert text.strip() in capsys.readouterr().out
    # defaults: next to the runs
    assert main([str(r) for r in runs]) == 0
    assert (tmp_path / "scaling.md").is_file() and (tmp_path / "scaling.png").is_file()


def test_cli_error_names_the_directory(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 1
    assert "RUN_DIR" in capsys.readouterr().err


def test_dispatched_from_copd_report(tmp_path):
    from copd_mega.report.plots import main as report_main

    run = _write_run(tmp_path, 1)
    assert report_main(["scaling", str(run), "--png", str(tmp_path / "p.png")]) == 0
