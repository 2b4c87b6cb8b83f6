"""Branches whose steps differ in length never time out, and one rank's error ends every rank.

- Two branches on gloo, one sleeping longer per step than the collective timeout
  (``debug.slow_branch``, ``parallel.collective_timeout_s``): the job finishes with the metrics,
  evaluation and final weights of the same job without the sleep (its p2p exchange, step-end
  agreement, merge, final evaluation and saves wait in ``comm.wait_for``, not in a collective).
- ``debug.fail_at_step`` makes global rank 1 raise in the middle of a step under torchrun: every
  rank ends within a minute of the error (the collective timeout is 600 s), the one-line error
  appears once. (The same under srun: ``tests/test_slurm_requeue.py``.)
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from copd_cases import run_mode
from lost_cases import TINY, TWO, _env, assert_same_run, error_lines, write_config

from copd_mega.parallel.dist import free_port
from multiproc import spawn

pytestmark = pytest.mark.multiproc

# One RL and one OPD step (the OPD step exchanges rollouts and scores between the branches).
COMMON = [*TINY, TWO, "schedule.mode=copd", "schedule.cycles=1", "schedule.rl_steps=1",
          "schedule.opd_steps=1", "optim.lr=0.01", "optim.weight_decay=0.1"]  # fmt: skip
TIMEOUT_S = 5.0  # a collective's deadline in the uneven run
SLOW_S = 12.0  # the slow branch's extra time per step: well past the deadline


def test_a_branch_slower_than_the_collective_timeout_changes_nothing(tmp_path):
    even, uneven = tmp_path / "even", tmp_path / "uneven"
    spawn(run_mode, 2, [*COMMON, f"run_dir={even}"])
    slow = [f"parallel.collective_timeout_s={TIMEOUT_S}", "debug.slow_branch=reverse",
            f"debug.slow_step_s={SLOW_S}"]  # fmt: skip
    spawn(run_mode, 2, [*COMMON, *slow, f"run_dir={uneven}"])
    b = assert_same_run(even, uneven, rows=4)
    # the fast branch really waited longer than a collective may: at the step boundary (RL
    # step) or for the exchange with the slow branch (OPD step)
    waits = [b["arith", s].get("time/wait", 0) + b["arith", s].get("time/exchange", 0)
             for s in (0, 1)]  # fmt: skip
    assert all(w > TIMEOUT_S for w in waits), waits


def test_an_error_on_one_rank_ends_every_rank_under_torchrun(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", [*COMMON, f"run_dir={tmp_path / 'run'}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", "-m", "copd_mega.cli", "train", "--config", str(cfg),
           "debug.fail_at_step=1", "debug.fail_rank=1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env())  # fmt: skip
    lines, failed_at = [], None
    try:
        for line in proc.stdout:  # until every rank and torchrun ended
            lines.append(line)
            if failed_at is None and ": error: " in line:
                failed_at = time.monotonic()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    ended = time.monotonic()
    out = "".join(lines)
    assert proc.returncode != 0 and failed_at is not None, out[-3000:]
    assert ended - failed_at < 60, f"ranks lived {ended - failed_at:.0f}s past the error"
    (line,) = error_lines(out)
    assert line.startswith("copd train: error: debug.fail_at_step=1: a data error injected on "
                           "global rank 1"), line  # fmt: skip
    assert "Traceback" not in out.split(line)[0], out[-3000:]  # no rank printed a traceback
