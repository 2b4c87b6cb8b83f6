"""slurm/copd_8branch.sh on a local Slurm, at time limits shorter than the run.

- A 2-branch CPU job with ``--time=2`` whose 8 steps take ~20 s each (``debug.slow_step_s``): the
  trainer reads its allocation's end from Slurm (squeue), stops with a checkpoint before a step
  it could not finish and save, the script requeues it, and over several allocations it ends
  with the metrics, evaluation and final weights of the same job run uninterrupted.
- ``debug.fail_at_step`` on global rank 1 under srun: every rank ends within a minute of the
  error and the job's output holds the one-line error once.
"""

from __future__ import annotations

import time

import pytest
from lost_cases import assert_same_run, error_lines
from slurm_local import local_slurm_fixture
from test_slurm import CONFIG, CPU_OVERRIDES, REPO, SCRIPT, _clean_env

from copd_mega.parallel.dist import free_port
from multiproc import spawn

pytestmark = pytest.mark.multiproc

STEPS = 8
# The script's config cut to 2 one-rank branches (text hub and a spoke) of a tiny text model.
COMMON = [*CPU_OVERRIDES, "parallel.tp=1", "parallel.pp=1", "schedule.cycles=2",
          "schedule.rl_steps=3", "schedule.opd_steps=1", "optim.lr=0.01",
          "optim.weight_decay=0.1", "checkpoint.keep_last=1", "eval.base=false",
          "logging.progress=false", "checkpoint.end_margin_s=5"]  # fmt: skip


def _whole(rank: int, overrides: list[str]) -> None:
    """The same job uninterrupted, from the same config file (one process per rank)."""
    from copd_mega.config import load_config
    from copd_mega.trainer.train import train

    train(load_config(REPO / CONFIG, overrides))


# The allocation: one CPU node, 2 tasks (one rank per branch). The script's SIGUSR1 is replaced by
# SIGURG to the batch shell, which ignores it: Slurm delivers `--signal` up to a minute early, so
# with SIGUSR1 it would stop these short allocations before the trainer's own prediction does.
ALLOC = [
    "--nodes=1",
    "--ntasks-per-node=2",
    "--gpus-per-node=0",
    "--signal=B:URG@1",
    "--open-mode=append",
]  # every allocation's output in one file


slurm = local_slurm_fixture(cpus=2, what="the requeue tests")


def _submit(slurm, tmp_path, minutes: int, overrides: list[str]) -> tuple[int, object]:
    out = tmp_path / "job.out"
    job = slurm.sbatch(
        [*ALLOC, f"--time={minutes}", f"--output={out}", str(SCRIPT), *overrides],
        cwd=REPO,
        env=_clean_env(COPD_RUN_DIR=str(tmp_path / "run"), MASTER_PORT=str(free_port()),
                       WANDB_MODE="disabled"),
    )  # fmt: skip
    return job, out


def test_a_job_longer_than_its_time_limit_finishes_over_several_allocations(slurm, tmp_path):
    whole = tmp_path / "whole"
    spawn(_whole, 2, [*COMMON, f"run_dir={whole}"])
    slow = ["debug.slow_branch=image", "debug.slow_step_s=20"]  # 8 steps: > 160 s
    job, out = _submit(slurm, tmp_path, 2, [*COMMON, *slow])
    state, code = slurm.wait(job, 1500)
    text = out.read_text() if out.exists() else "(no output)"
    restarts = int(slurm.run("scontrol", "-o", "show", "job", str(job)).split("Restarts=")[1]
                   .split()[0])  # fmt: skip
    assert (state, code) == ("COMPLETED", "0:0"), f"{state} {code}:\n{text[-3000:]}"
    assert restarts >= 1, text[-3000:]  # requeued at least once: two allocations or more
    run = tmp_path / "run"
    assert "(time limit: " in text and "requeueing job" in text, text[-3000:]
    assert "resumed from" in text and "final model (merged) saved to" in text
    assert_same_run(whole, run, rows=2 * STEPS)


def test_an_error_on_one_rank_ends_every_rank_under_srun(slurm, tmp_path):
    job, out = _submit(slurm, tmp_path, 10, [*COMMON, "debug.fail_at_step=1", "debug.fail_rank=1"])
    failed_at, deadline = None, time.monotonic() + 600
    while True:
        state, code = slurm.job_state(job)
        if failed_at is None and out.exists() and ": error: " in out.read_text():
            failed_at = time.monotonic()
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            break
        assert time.monotonic() < deadline, f"job {job} still {state}"
        time.sleep(1)
    ended = time.monotonic()
    text = out.read_text()
    assert state == "FAILED" and failed_at is not None, f"{state} {code}:\n{text[-3000:]}"
    assert ended - failed_at < 60, f"the job lived {ended - failed_at:.0f}s past the error"
    (line,) = [x for x in error_lines(text) if x.startswith("copd ")]  # srun adds its own
    assert "debug.fail_at_step=1: a data error injected on global rank 1" in line, line
    assert "Traceback" not in text, text[-3000:]
    assert "requeueing" not in text
