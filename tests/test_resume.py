"""Jobs stopped and resumed reproduce the uninterrupted run: preemption by SIGUSR1 under torchrun
(2 branches) with ``--resume=auto``; a NaN loss and a kill inside a save, injected end to end."""

import json
import signal
import time

import psutil
import pytest
import torch
from copd_cases import run_mode
from lost_cases import (
    TINY,
    TWO,
    assert_same_run,
    copd,
    copd_killed,
    copd_popen,
    metrics_rows,
    model_tensors,
    write_config,
)
from progress import Stall, communicate_until_stalled

from multiproc import spawn

pytestmark = pytest.mark.multiproc

# Weight decay moves the weights in every applied step (a random tiny policy earns no reward,
# so GRPO advantages, and with them the gradients, are mostly zero).
MOVING = ["optim.lr=0.01", "optim.weight_decay=0.1"]
COMMON = [*TINY, *MOVING, TWO, "schedule.mode=copd", "schedule.cycles=2", "schedule.rl_steps=2",
          "schedule.opd_steps=2", "checkpoint.every=0", "checkpoint.keep_last=1"]  # fmt: skip


def _wait_for_rows(run_dir, n: int, proc, stall_s: float = 300) -> None:
    """Until every branch's JSONL holds ``n`` rows (the job is past its first steps); fails
    when the job exits first or uses no CPU for ``stall_s`` seconds."""
    stall = Stall(lambda: [proc.pid], stall_s, "the job")
    while proc.poll() is None:
        files = list((run_dir / "metrics").glob("*.jsonl"))
        if len(files) == 2 and all(len(f.read_text().splitlines()) >= n for f in files):
            return
        stall.check()
        time.sleep(0.1)
    raise AssertionError(f"the job did not log {n} steps (exit code {proc.poll()})")


def test_preempted_job_resumes_to_the_uninterrupted_result(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    spawn(run_mode, 2, [*COMMON, f"run_dir={whole}"])
    cfg = write_config(tmp_path / "c.yaml", COMMON)
    job = copd_popen("train", "--config", str(cfg), "--resume=auto", f"run_dir={parts}", ranks=2)
    try:
        _wait_for_rows(parts, 1, job)
        for rank in psutil.Process(job.pid).children():  # what Slurm signals: every task
            rank.send_signal(signal.SIGUSR1)
        out, _ = communicate_until_stalled(job, 300)
    finally:
        job.kill()
    assert job.returncode == 0, out[-3000:]
    assert "starting fresh: no checkpoint under" in out
    assert "SIGUSR1: preempted" in out and "continue with --resume=auto" in out
    assert not (parts / "eval.json").exists()  # stopped before the end
    stopped = int((parts / "checkpoints" / "latest").read_text().strip()[5:])
    res = copd("train", "--config", str(cfg), "--resume=auto", f"run_dir={parts}", ranks=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resumed from {parts / 'checkpoints'}/step_{stopped:06d}" in res.stdout
    assert_same_run(whole, parts, rows=16)  # metrics_rows: no step logged twice


def test_nan_loss_is_skipped_and_a_kill_inside_a_save_resumes_from_the_previous_step(tmp_path):
    """Step 1's loss is NaN (debug.nan_loss_at_step): it is skipped and the weights stay as
    after step 0. Every rank is killed inside the save of step 2 (debug.crash_in_save_at_step):
    ``--resume=auto`` continues from step 1, re-saves step 2 and finishes."""
    run = tmp_path / "run"
    over = [*TINY, *MOVING, "checkpoint.every=1", "checkpoint.keep_last=0", f"run_dir={run}"]
    cfg = write_config(tmp_path / "c.yaml", over)
    debug = ["debug.nan_loss_at_step=1", "debug.crash_in_save_at_step=2"]
    code, out = copd_killed("train", "--config", str(cfg), *debug)
    assert code == -signal.SIGKILL, out[-3000:]
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_000001"
    assert not (ckpt / "step_000002" / "complete.json").exists()
    w0, w1 = (model_tensors(ckpt / f"step_00000{s}" / "branch_text") for s in (0, 1))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # the NaN step changed nothing
    res = copd("train", "--config", str(cfg), "--resume=auto")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resumed from {ckpt}/step_000001" in res.stdout
    rows = metrics_rows(run)
    assert [rows["text", s]["skipped_step"] for s in range(3)] == [0.0, 1.0, 0.0]
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "latest",
        *(f"step_00000{s}" for s in range(3)),
    ]
    final = model_tensors(run / "final" / "model")
    assert all(torch.isfinite(t).all() for t in final.values())
    assert any(not torch.equal(final[k], w1[k]) for k in w1)  # an applied step moves them
    assert json.loads((run / "eval.json").read_text())
