"""Overlap probes and periodic held-out evaluation are telemetry only; `copd overlap` offline
gives the in-training number; the probe at TP2 x PP2 equals the single-rank one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from copd_cases import run_mode
from lost_cases import TINY, TWO, copd, metrics_rows, model_tensors, write_config
from study_cases import merged_eval_case, perturbed_start

from multiproc import spawn

pytestmark = pytest.mark.multiproc

MOVING = ["optim.lr=0.01", "optim.weight_decay=0.1"]
COMMON = [*TINY, *MOVING, TWO, "model.num_layers=2", "schedule.mode=copd", "schedule.cycles=2", "schedule.rl_steps=1",
          "schedule.opd_steps=1", "data.n_eval=8"]  # fmt: skip
RESUME = ["checkpoint.resume=auto"]
TELEMETRY = ["eval.every=2", "eval.limit=4", "eval.overlap_every=2", "eval.overlap_prompts=4"]
TRAINING_KEYS = ("loss", "reward", "accuracy", "grad_norm", "entropy")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same job twice, without and with the telemetry, both resumed from one step-0
    checkpoint whose branches differ (so overlap < 1, delta != 0 and the merge matters)."""
    root = tmp_path_factory.mktemp("telemetry")
    start, plain, probed = root / "start", root / "plain", root / "probed"
    spawn(perturbed_start, 2, [*COMMON, f"run_dir={start}"])
    for run in (plain, probed):
        shutil.copytree(start / "checkpoints", run / "checkpoints")
    spawn(run_mode, 2, [*COMMON, *RESUME, f"run_dir={plain}"])
    spawn(run_mode, 2, [*COMMON, *RESUME, *TELEMETRY, f"run_dir={probed}"])
    return plain, probed


def test_probes_and_evaluation_leave_training_bit_identical(runs):
    plain, probed = runs
    for sub in ("branch_arith", "branch_reverse", "model"):
        a, b = model_tensors(plain / "final" / sub), model_tensors(probed / "final" / sub)
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)
    ra, rb = metrics_rows(plain), metrics_rows(probed)
    assert sorted(ra) == sorted(rb) and len(ra) == 6  # steps 1-3 of both branches
    for key in ra:
        for k in [*TRAINING_KEYS, *(k for k in ra[key] if k.startswith("edge/"))]:
            assert ra[key][k] == rb[key][k], (key, k)
        assert not any(k.startswith(("probe/", "eval/")) for k in ra[key])
    for (branch, step), row in rb.items():
        due = (step + 1) % 2 == 0
        other = "reverse" if branch == "arith" else "arith"
        assert (f"probe/{branch}<-{other}/overlap" in row) == due, (branch, step)
        assert ("eval/merged/mean" in row) == due and ("eval/arith" in row) == due
        if due:  # the branches disagree: a probe that measured nothing would read 1 and 0
            assert 0.0 <= row[f"probe/{branch}<-{other}/overlap"] < 1.0
            assert row[f"probe/{branch}<-{other}/delta"] != 0.0
            assert row["probe/overlap"] == row[f"probe/{branch}<-{other}/overlap"]
            assert 0.0 <= row["eval/merged/mean"] <= 1.0
    last = [rb[(b, 3)]["eval/merged/mean"] for b in ("arith", "reverse")]
    assert last[0] == last[1]  # every branch logs the one merged model's accuracy
    assert json.loads((probed / "eval.json").read_text()) == json.loads(
        (plain / "eval.json").read_text()
    )


def test_merge_for_evaluation_restores_every_weight(tmp_path):
    out = spawn(merged_eval_case, 2, [*COMMON, f"run_dir={tmp_path}"])
    by = {o["branch"]: o for o in out}
    a, r = by["arith"], by["reverse"]
    for k in a["before"]:
        assert not torch.equal(a["before"][k], r["before"][k]), k  # the branches differ
        mean = (a["before"][k] + r["before"][k]) / 2
        for o in (a, r):
            torch.testing.assert_close(o["inside"][k], mean)
            assert torch.equal(o["after"][k], o["before"][k]), k
    assert a["masters_equal"] and r["masters_equal"]


def _offline(run, *extra: str, ranks: int = 0) -> dict:
    out = copd("overlap", "--student", str(run / "final" / "branch_arith"), "--teacher",
               str(run / "final" / "branch_reverse"), "--data", "reverse", "eval.overlap_prompts=4",
               *extra, ranks=ranks, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_copd_overlap_offline_equals_the_in_training_probe(runs):
    _, probed = runs
    row = metrics_rows(probed)[("arith", 3)]  # weights after the last step = final/branch_*
    got = _offline(probed)
    assert got["overlap"] == pytest.approx(row["probe/arith<-reverse/overlap"], abs=1e-6)
    assert got["delta"] == pytest.approx(row["probe/arith<-reverse/delta"], abs=1e-5)


def test_copd_overlap_at_tp2_pp2_equals_single_rank(runs):
    _, probed = runs
    one = _offline(probed)
    split = _offline(probed, "parallel.tp=2", "parallel.pp=2", "parallel.micro_batch_size=4")
    assert split["overlap"] == pytest.approx(one["overlap"], abs=1e-6)
    assert split["delta"] == pytest.approx(one["delta"], abs=1e-4)


def test_copd_overlap_names_a_missing_checkpoint(tmp_path):
    out = copd("overlap", "--student", str(tmp_path / "nope"), "--teacher", str(tmp_path),
               "--data", "arith")  # fmt: skip
    assert out.returncode == 1
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "--student" in lines[0] and "nope" in lines[0], out.stderr


def test_eval_settings_are_checked(tmp_path):
    out = copd("plan", "--config", str(write_config(tmp_path / "c.yaml", COMMON)),
               "--world-size", "2", "eval.every=-1")  # fmt: skip
    assert out.returncode == 1 and "eval.every=-1" in out.stderr, out.stderr


def test_copd_report_plots_the_periodic_telemetry(runs):
    _, probed = runs
    out = copd("report", str(probed))
    assert out.returncode == 0, out.stderr
    for name in ("heldout.png", "probe_overlap.png", "probe_delta.png"):
        assert (probed / "plots" / name).read_bytes()[:4] == b"\x89PNG", name
        assert str(probed / "plots" / name) in out.stdout
