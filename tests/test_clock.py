"""When a step boundary saves and stops (``trainer.clock``): every_minutes, the allocation's end
predicted from measured step and save times, the finish counted before the last step."""

from __future__ import annotations

import time

import pytest

from copd_mega.config import ConfigError, load_config
from copd_mega.trainer.clock import StepClock, next_boundary, slurm_end


def test_next_boundary_saves_by_the_clock_and_stops_before_the_end():
    # 30 min since the last save, every 20 min: save; no end known: never stop
    assert next_boundary(5000, 3200, None, 600, 60, 20, 60)[:2] == (True, False)
    assert next_boundary(5000, 4000, None, 600, 60, 20, 60)[:2] == (False, False)
    assert next_boundary(5000, 0, None, 600, 60, 0, 60)[:2] == (False, False)  # off
    # 1000 s left: a 600 s step + 60 s save + 60 s margin fits; a 900 s one does not
    assert next_boundary(5000, 4000, 6000, 600, 60, 0, 60)[:2] == (False, False)
    save, stop, why = next_boundary(5000, 4000, 6000, 900, 60, 0, 60)
    assert (save, stop) == (True, True) and why.startswith("time limit: 1000s left")
    # nothing measured yet: the step starts
    assert next_boundary(5000, 4000, 5001, None, 0, 0, 60)[:2] == (False, False)


def test_step_clock_predicts_per_phase_and_counts_the_finish():
    cfg = load_config(None, ["checkpoint.time_limit_minutes=10", "checkpoint.end_margin_s=0"])
    clock = StepClock(cfg)
    assert clock.end == pytest.approx(clock.started + 600, abs=1)
    clock.record_step("rl", 100.0)
    clock.record_step("opd", 250.0)
    clock.record_step("rl", 80.0)
    clock.saved(20.0)
    assert clock.predict("rl") == 100.0 and clock.predict("opd") == 250.0
    assert clock.predict("rl", last=True) == 2 * 100.0 + 2 * 20.0  # one branch + merged: 2 saves
    assert clock.decide("opd") [:2] == (False, False)  # fmt: skip
    restored = StepClock(cfg)
    restored.load_state_dict(clock.state_dict())
    assert restored.predict("opd") == 250.0 and restored.save_s == 20.0
    restored.started -= 500  # 100 s left: a 250 s step cannot start, and nothing ran here yet
    restored.refresh_end(force=True)
    assert restored.decide("opd")[:2] == (True, True)
    with pytest.raises(ConfigError, match=r"cannot finish one more step.*sbatch --time"):
        restored.check_first_step("opd")


def test_slurm_end_reads_the_environment_when_squeue_cannot_answer():
    assert slurm_end({}) is None
    end = int(time.time()) + 3600
    assert slurm_end({"SLURM_JOB_ID": "999999", "SLURM_JOB_END_TIME": str(end),
                      "SLURM_CONF": "/nonexistent"}) == end  # fmt: skip
