"""Checkpoints by the clock and the allocation's end: when to save, when to stop.

At every step boundary global rank 0 decides from its own clock and measurements (every rank
then follows it, ``preemption.Preemption.agreed``):
- save when ``checkpoint.every_minutes`` have passed since the last save (or the job's start);
- stop with a checkpoint when the next step could not finish and be saved before the end:
  ``now + longest measured step of the next step's phase + longest measured save +
  checkpoint.end_margin_s > end``. The end is the Slurm allocation's (``squeue -h -j JOB -o %e``,
  else ``SLURM_JOB_END_TIME``), or ``checkpoint.time_limit_minutes`` after the job started,
  whichever is sooner. Measurements travel in the step checkpoints, so a requeued job predicts
  its first step from the previous allocation's.
Before the first step an allocation too short for one step and a save is an error (a requeue
would only repeat it).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field

from copd_mega.config import Config, ConfigError

SQUEUE_TIMEOUT_S = 10.0  # rank 0 waits this long for squeue at a boundary, then uses the env
REQUERY_S = 600.0  # how often rank 0 asks Slurm again (an administrator may move the end)


def slurm_end(environ: dict[str, str] | None = None) -> float | None:
    """The running Slurm job's end (epoch seconds), or None outside Slurm / without a limit.

    Asks ``squeue`` first (it reflects a time limit changed after the start), then falls back on
    ``SLURM_JOB_END_TIME``.
    """
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        res = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True,
                             text=True, timeout=SQUEUE_TIMEOUT_S, env=dict(env))  # fmt: skip
        text = res.stdout.strip() if res.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    if text and text[0].isdigit():
        try:
            return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))  # local time
        except ValueError:
            pass
    value = env.get("SLURM_JOB_END_TIME", "")
    return float(value) if value.isdigit() and int(value) > 0 else None


def next_boundary(
    now: float,
    last_save: float,
    end: float | None,
    next_step_s: float | None,
    save_s: float,
    every_minutes: float,
    margin_s: float,
) -> tuple[bool, bool, str]:
    """(save, stop, why) at a step boundary; pure. ``next_step_s``: the predicted length of the
    next step (None: nothing measured yet, so it starts)."""  # fmt: skip
    if end is not None and next_step_s is not None:
        need = next_step_s + save_s + margin_s
        if now + need > end:
            return True, True, (f"time limit: {end - now:.0f}s left, the next step and a save "
                                f"need {need:.0f}s")  # fmt: skip
    if every_minutes > 0 and now - last_save >= 60.0 * every_minutes:
        return True, False, f"checkpoint.every_minutes={every_minutes:g}"
    return False, False, ""


@dataclass
class StepClock:
    """Rank 0's view of time: the job's start, the last save, the allocation's end and the
    longest measured step (per phase) and save, in seconds."""

    cfg: Config
    leader: bool = True  # global rank 0: only it asks Slurm (the others' decisions are unused)
    started: float = field(default_factory=time.time)
    last_save: float = 0.0
    end: float | None = None
    asked: float = 0.0
    step_s: dict[str, float] = field(default_factory=dict)
    save_s: float = 0.0

    def __post_init__(self) -> None:
        self.last_save = self.started
        self.refresh_end(force=True)

    def refresh_end(self, force: bool = False) -> None:
        """Read the allocation's end again (at most every REQUERY_S)."""
        now = time.time()
        if not self.leader or (not force and now - self.asked < REQUERY_S):
            return
        self.asked = now
        ends = [e for e in (slurm_end(),) if e is not None]
        if self.cfg.checkpoint.time_limit_minutes > 0:
            ends.append(self.started + 60.0 * self.cfg.checkpoint.time_limit_minutes)
        self.end = min(ends) if ends else None

    def state_dict(self) -> dict:
        return {"step_s": dict(self.step_s), "save_s": self.save_s}

    def load_state_dict(self, state: dict) -> None:
        self.step_s = {k: float(v) for k, v in state.get("step_s", {}).items()}
        self.save_s = float(state.get("save_s", 0.0))

    def record_step(self, phase: str, seconds: float) -> None:
        """A step of ``phase`` took ``seconds`` (its slowest rank, up to the boundary)."""
        self.step_s[phase] = max(self.step_s.get(phase, 0.0), seconds)

    def saved(self, seconds: float) -> None:
        """A step checkpoint was just written in ``seconds``."""
        self.save_s = max(self.save_s, seconds)
        self.last_save = time.time()

    def predict(self, phase: str, last: bool = False) -> float | None:
        """Seconds the next step of ``phase`` will take (None: nothing measured). Before the
        last step, the end of the job too: a final evaluation (about one more step) and a save
        per branch plus the merged model's."""
        step = self.step_s.get(phase, max(self.step_s.values(), default=None))
        if step is None or not last:
            return step
        return 2 * step + (len(self.cfg.branches) + 1) * self.save_s

    def decide(self, next_phase: str, last: bool = False) -> tuple[bool, bool, str]:
        """(save, stop, why) before a step of ``next_phase`` (``last``: the job's last step);
        meaningful on global rank 0."""
        self.refresh_end()
        ck = self.cfg.checkpoint
        return next_boundary(time.time(), self.last_save, self.end, self.predict(next_phase, last),
                             self.save_s, ck.every_minutes, ck.end_margin_s)  # fmt: skip

    def check_first_step(self, next_phase: str, last: bool = False) -> None:
        """Raise when the allocation cannot hold even the next step and its save."""
        save, stop, why = self.decide(next_phase, last)
        if stop:
            raise ConfigError(
                f"this allocation cannot finish one more step before its end ({why}); give the "
                "job a longer time limit (sbatch --time) or lower checkpoint.end_margin_s"
            )
