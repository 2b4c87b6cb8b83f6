"""A checkpoint is complete only if it can be read: a file of the newest step cut to half size
(or changed) makes resume fall back to the previous step with one line naming the file;
retention keeps what is newer than the newest verified step; ``copd export-hf`` takes a run, a
step or ``latest``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from lost_cases import TINY, copd, error_lines, fake_step, torch_dist_dir, write_config

from copd_mega.ckpt.checkpoint import (
    CheckpointError,
    _apply_retention,
    find_resume_step,
    incomplete_reason,
    scan_steps,
)
from copd_mega.ckpt.targets import resolve_model_dir

DAMAGED = ["branch_text/__0_0.distcp", "branch_text/common.pt", "trainer_state/rank_00000.pt"]
SAVED = [*TINY, "schedule.rl_steps=3", "checkpoint.every=1", "checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> tuple[Path, Path]:
    """A one-rank run stopped after 3 of its 4 steps: step_000000..step_000002, latest = 2."""
    tmp = tmp_path_factory.mktemp("saved")
    run = tmp / "run"
    cfg = write_config(tmp / "c.yaml", [*SAVED, f"run_dir={run}"])
    res = copd("train", "--config", str(cfg), "schedule.stop_after=3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"
    return run, cfg


def _copy(saved: Path, dest: Path) -> Path:
    shutil.copytree(saved, dest)
    return dest


def _cut_to_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", DAMAGED)
def test_a_file_cut_to_half_falls_back_to_the_previous_step_in_one_line(
    saved_run, tmp_path, capsys, name
):
    root = _copy(saved_run[0], tmp_path / "run") / "checkpoints"
    assert incomplete_reason(root / "step_000002") is None
    _cut_to_half(root / "step_000002" / name)
    reason = incomplete_reason(root / "step_000002")
    assert reason is not None and reason.startswith(name), reason
    assert find_resume_step(root).name == "step_000001"
    (line,) = capsys.readouterr().err.splitlines()
    assert str(root / "step_000002") in line and name in line and "step_000001" in line


def test_a_changed_byte_of_the_same_size_fails_its_checksum(saved_run, tmp_path):
    root = _copy(saved_run[0], tmp_path / "run") / "checkpoints"
    path = root / "step_000002" / "trainer_state" / "rank_00000.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    reason = incomplete_reason(root / "step_000002")
    assert reason is not None and "rank_00000.pt" in reason and "checksum" in reason
    assert scan_steps(root)[0].name == "step_000001"


@pytest.mark.parametrize(
    "name,flag", [(DAMAGED[0], "--resume"), (DAMAGED[1], "--resume=auto"), (DAMAGED[2], "--resume")]
)
def test_train_resumes_from_the_step_before_a_damaged_one(saved_run, tmp_path, name, flag):
    run = _copy(saved_run[0], tmp_path / "run")
    _cut_to_half(run / "checkpoints" / "step_000002" / name)
    res = copd("train", "--config", str(saved_run[1]), flag, f"run_dir={run}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and not error_lines(res.stderr)
    (line,) = [ln for ln in res.stderr.splitlines() if "skipping checkpoint" in ln]
    assert name in line and "resuming from step_000001" in line
    assert (run / "eval.json").is_file()  # ran to the end from step 2
    assert incomplete_reason(run / "checkpoints" / "step_000002") is None  # saved again


def test_retention_never_deletes_past_the_newest_verified_step(tmp_path):
    for s in (1, 2, 3):
        fake_step(tmp_path, s)
    _cut_to_half(tmp_path / "step_000003" / "branch_a" / "common.pt")
    assert _apply_retention(tmp_path, tmp_path / "step_000003", keep_last=1) == []
    fake_step(tmp_path, 4)
    with pytest.warns(UserWarning, match="step_000003.*common.pt"):
        deleted = _apply_retention(tmp_path, tmp_path / "step_000004", keep_last=1)
    assert sorted(p.name for p in deleted) == ["step_000001", "step_000002"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000003", "step_000004"]


# ----------------------------------------------------------------------------- export-hf targets


def test_export_targets_of_a_run_a_step_and_latest(saved_run, tmp_path):
    run = saved_run[0]
    step = run / "checkpoints" / "step_000002"
    assert resolve_model_dir(run / "checkpoints" / "latest") == step / "branch_text"
    assert resolve_model_dir(step) == step / "branch_text"  # the only branch
    assert resolve_model_dir(run, "text") == step / "branch_text"  # not finished: newest step
    with pytest.raises(CheckpointError, match=r"no merged model.*--branch text"):
        resolve_model_dir(run)  # the run has not finished
    with pytest.raises(CheckpointError, match=r"no branch 'code'.*--branch text"):
        resolve_model_dir(step, "code")
    two = fake_step(tmp_path / "r2" / "checkpoints", 5)  # branches a and b
    with pytest.raises(CheckpointError, match=r"--branch a or --branch b.*copd merge --inputs"):
        resolve_model_dir(two)
    assert resolve_model_dir(two, "b") == two / "branch_b"
    torch_dist_dir(tmp_path / "r2" / "final" / "model")
    torch_dist_dir(tmp_path / "r2" / "final" / "branch_a")
    assert resolve_model_dir(tmp_path / "r2") == tmp_path / "r2" / "final" / "model"
    assert resolve_model_dir(tmp_path / "r2", "a") == tmp_path / "r2" / "final" / "branch_a"
    _cut_to_half(two / "branch_a" / "common.pt")
    with pytest.raises(CheckpointError, match="branch_a/common.pt"):
        resolve_model_dir(two, "a")


def test_export_hf_of_latest_and_a_one_line_choice_otherwise(saved_run, tmp_path):
    run = saved_run[0]
    res = copd("export-hf", "--ckpt", str(run / "checkpoints" / "latest"), "--out",
               str(tmp_path / "hf"), "--no-progress")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "hf" / "config.json").is_file() and "step_000002/branch_text" in res.stdout
    res = copd("export-hf", "--ckpt", str(run), "--out", str(tmp_path / "hf2"), "--no-progress")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    (line,) = error_lines(res.stderr)
    assert str(run) in line and "--branch text" in line
    assert not (tmp_path / "hf2").exists()
