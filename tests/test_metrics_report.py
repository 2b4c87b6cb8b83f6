"""Metrics sinks and plots: JSONL always, wandb offline, `copd report` PNGs, resumed-run dedup."""

import json

import pytest

from copd_mega.report.metrics import MetricsLogger, read_metrics
from copd_mega.report.plots import main as report_main


def _log_run(run_dir, wandb="disabled"):
    for branch, edge in (("arith", "arith<-sort"), ("sort", "sort<-arith")):
        log = MetricsLogger(run_dir, branch, True, 4, wandb_mode=wandb, progress=False)
        for step in range(4):
            rec = {"phase": "rl" if step < 2 else "opd", "reward": 0.1 * step,
                   "accuracy": 0.05 * step, "loss": float("nan") if step == 1 else 0.5}  # fmt: skip
            if step >= 2:
                rec[f"edge/{edge}/overlap"] = 0.9
                rec[f"edge/{edge}/delta"] = -0.01
            log.log(step, rec)
        log.close()


def test_jsonl_rows_and_plots(tmp_path, capsys):
    _log_run(tmp_path)
    data = read_metrics(tmp_path)
    assert set(data) == {"arith", "sort"} and [r["step"] for r in data["arith"]] == [0, 1, 2, 3]
    assert data["arith"][1]["loss"] == "nan"  # non-finite values stay visible, JSON stays valid
    assert report_main([str(tmp_path)]) == 0
    written = capsys.readouterr().out.split()
    names = {p.rsplit("/", 1)[-1] for p in written}
    assert names == {"reward.png", "accuracy.png", "overlap.png", "delta.png"}
    for p in written:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_resumed_steps_and_torn_last_line(tmp_path):
    _log_run(tmp_path)
    path = tmp_path / "metrics" / "arith.jsonl"
    with path.open("a") as f:  # a resumed job re-logs step 3, then dies mid-line
        f.write(json.dumps({"step": 3, "branch": "arith", "reward": 9.0}) + "\n")
        f.write('{"step": 4, "bra')
    rows = read_metrics(tmp_path)["arith"]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[-1]["reward"] == 9.0


def test_report_without_metrics_says_what_to_pass(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 1
    assert "run directory" in capsys.readouterr().err


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log_run(tmp_path, wandb="offline")
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb offline run directory"
    assert len(read_metrics(tmp_path)["sort"]) == 4
