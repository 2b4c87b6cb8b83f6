"""A CoPD job stopped after some steps and resumed reproduces the uninterrupted run exactly."""

import json

import pytest
from copd_cases import run_mode
from test_copd import TINY, TWO

from multiproc import spawn

pytestmark = pytest.mark.multiproc

KEYS = ("loss", "reward", "accuracy", "grad_norm", "response_len", "entropy")


def _rows(run_dir):
    out = {}
    for path in sorted((run_dir / "metrics").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out[(r["branch"], r["step"])] = r
    return out


def test_resume_equals_uninterrupted(tmp_path):
    common = [*TINY, TWO, "schedule.mode=copd", "schedule.rl_steps=2", "schedule.opd_steps=2",
              "checkpoint.every=0", "checkpoint.keep_last=1", "data.n_eval=4"]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    spawn(run_mode, 2, [*common, f"run_dir={whole}"])
    spawn(run_mode, 2, [*common, f"run_dir={parts}", "schedule.stop_after=3"])
    assert (parts / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert not (parts / "eval.json").exists()  # the first job stopped before the end
    spawn(run_mode, 2, [*common, f"run_dir={parts}", "checkpoint.resume=true"])
    a, b = _rows(whole), _rows(parts)
    assert sorted(a) == sorted(b) and len(a) == 8
    for key in a:
        for k in KEYS:
            assert a[key][k] == b[key][k], (key, k, a[key][k], b[key][k])
        edge = [k for k in a[key] if k.startswith("edge/")]
        for k in edge:
            assert a[key][k] == b[key][k], (key, k)
    ta = json.loads((whole / "eval.json").read_text())
    tb = json.loads((parts / "eval.json").read_text())
    assert ta["merged"] == tb["merged"]
    assert ta["base"] == tb["base"]  # the base row survives the resume
