"""Progress display, drawn with rich: bytes of an offline tool, steps of a training run.

:class:`progress_bar` is a live bar over bytes (checkpoint merge, HF export). A training run's
branch leaders run in several processes whose output is usually a log file, so
:class:`StepProgress` prints one line per step (rich's bar, step count, elapsed time, ETA and
the step's headline scalars) instead of a live display that processes would overwrite.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

HEADLINE = ("phase", "reward", "accuracy", "overlap", "loss")


class progress_bar:
    """A rich progress bar over bytes (ETA included) or a no-op; yields ``advance(nbytes)``."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled, self.bar = label, total, enabled, None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(),
        )  # fmt: skip
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


class StepProgress:
    """One line per training step of a branch: ``[branch] [bar] step/total elapsed ETA summary``.

    The ETA is measured from the first step this process logged (a resumed job does not count
    the steps it did not run).
    """

    def __init__(self, branch: str, total: int, file=None):
        self.branch, self.total = branch, total
        console = Console(file=file or sys.stdout, width=1000, highlight=False)
        self.bar = Progress(
            TextColumn(r"\[{task.description}] \["), BarColumn(bar_width=20),
            TextColumn("] step"), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[summary]}"),
            console=console, auto_refresh=False, speed_estimate_period=1e9,
        )  # fmt: skip
        self.task = None

    def update(self, step: int, record: dict[str, Any]) -> None:
        """Show step ``step`` (0-based global) as done, with ``record``'s headline scalars."""
        summary = " ".join(
            f"{k}={record[k]:.3f}" if isinstance(record[k], float) else f"{k}={record[k]}"
            for k in HEADLINE
            if k in record
        )
        if self.task is None:
            self.task = self.bar.add_task(self.branch, total=self.total, completed=step,
                                          summary="")  # fmt: skip
        self.bar.update(self.task, completed=step + 1, summary=summary)
        self.bar.console.print(self.bar.make_tasks_table(self.bar.tasks))
        self.bar.console.file.flush()
