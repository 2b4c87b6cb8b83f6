"""Metrics: JSONL always, wandb when enabled (offline without a network), progress with ETA
(``report.progress``, rich).

Each branch leader owns ``RUN/metrics/<branch>.jsonl``: one JSON object per step with the
schedule position, the branch's scalars and, for OPD steps, ``edge/<student><-<teacher>/...``
scalars. Files are appended and flushed per step, so a killed job keeps every finished step;
a resumed job first cuts its file back to the step it resumes at (``cut_back``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from copd_mega.report.progress import StepProgress


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact visible
    return v


class MetricsLogger:
    """Per-branch metrics sink on the branch leader; a no-op elsewhere."""

    def __init__(
        self,
        run_dir: str | Path,
        branch: str,
        active: bool,
        total_steps: int,
        wandb_mode: str = "disabled",
        wandb_project: str = "copd-mega",
        config: dict | None = None,
        progress: bool = True,
    ) -> None:
        self.active, self.branch, self.total = active, branch, total_steps
        self._progress = StepProgress(branch, total_steps) if progress and active else None
        self._wandb = None
        self._file = None
        if not active:
            return
        path = Path(run_dir) / "metrics" / f"{branch}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a")
        if wandb_mode != "disabled":
            self._wandb = _start_wandb(run_dir, branch, wandb_mode, wandb_project, config)

    def cut_back(self, next_step: int) -> None:
        """Drop the rows of steps >= ``next_step`` (a resumed job re-runs them; a fresh start,
        ``next_step=0``, empties the file). Rewritten beside and swapped in."""
        if not self.active:
            return
        path = Path(self._file.name)
        self._file.close()
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < next_step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a torn line of a killed job
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        self._file = path.open("a")

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Write one step's record (``step`` is 0-based global) and update the progress line."""
        if not self.active:
            return
        row = {"step": step, "branch": self.branch, "time": time.time()}
        row.update({k: _clean(v) for k, v in record.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self._wandb.log(scalars, step=step)
        if self._progress is not None:
            self._progress.update(step, record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(run_dir, branch, mode, project, config):
    """wandb run for one branch. Without network use ``logging.wandb=offline``."""
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    import wandb

    return wandb.init(
        project=project,
        name=f"{Path(run_dir).name}-{branch}",
        group=Path(run_dir).name,
        dir=str(run_dir),
        mode=mode,
        config=config or {},
        reinit="create_new",
    )


def read_metrics(run_dir: str | Path) -> dict[str, list[dict]]:
    """All branches' JSONL records of a run: branch -> list of rows in step order."""
    out: dict[str, list[dict]] = {}
    for path in sorted((Path(run_dir) / "metrics").glob("*.jsonl")):
        rows = []
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                # A job killed mid-write leaves a torn last line; anything else is corruption.
                if i == len(lines) - 1:
                    break
                raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from e
        # A resumed run re-logs steps after its checkpoint: keep the last record of each step.
        by_step = {r["step"]: r for r in rows}
        out[path.stem] = [by_step[s] for s in sorted(by_step)]
    return out
