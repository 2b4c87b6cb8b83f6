"""A hang-proof pool of reward worker processes (``rewards.workers``, ``rewards.timeout_s``).

``RewardPool`` runs :func:`copd_mega.rl.rewards.score_one` in worker *processes*; a worker that
overruns ``timeout_s`` on an item (math-verify can spend minutes on e.g. ``9^{9^{9^{9^{9}}}}``) or
dies is killed and replaced; the item scores 0 and is counted as ``timeout`` or ``error``. Items
run on every worker at once, so a batch of H hanging items costs about ceil(H / workers)
timeouts.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
import weakref
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from copd_mega.rl.rewards import Item, check_reward_type, score_one

_MAX_START_FAILURES = 3


# --- worker process --------------------------------------------------------------------------


def _exit_when_orphaned(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this worker when its parent thread exits, even mid C-level
    hang (a polling thread could not run then: the hung C code holds the GIL)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: rely on close() / exit handlers
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker_main(conn: Connection, parent_pid: int) -> None:
    """Worker loop: receive ``(index, response, gold, type)``, send ``(index, score, status)``."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        # The pool owner decides when workers stop (a preempted trainer still finishes its step)
        signal.signal(sig, signal.SIG_IGN)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _exit_when_orphaned(parent_pid)
    score_one("\\boxed{1}", "1", "math")  # warm math-verify's lazy imports before the clock runs
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, response, gold, reward_type = msg
        try:
            conn.send((index, score_one(response, gold, reward_type), "ok", ""))
        except Exception as e:  # a scoring failure is a 0 reward, not a dead worker
            conn.send((index, 0.0, "error", f"{type(e).__name__}: {e}"[:500]))


@dataclass
class _Worker:
    proc: BaseProcess
    conn: Connection
    started: float
    ready: bool = False
    item: int | None = None
    deadline: float = field(default=float("inf"))


def _stop_workers(workers: list[_Worker]) -> None:
    """Ask each worker to exit, kill what has not within a second, close every pipe."""
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 1.0
    for w in workers:
        w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()
        w.conn.close()
    workers.clear()


class RewardPool:
    """Scores ``(response, gold, reward_type)`` items in worker processes with a per-item deadline.

    A worker that overruns ``timeout_s`` on an item is killed and replaced (item scores 0,
    counted as ``timeout``); a worker that dies mid-item is replaced (item scores 0, counted as
    ``error``, as is an exception raised by ``score_one``). Workers use the ``spawn`` start
    method by default (never ``fork``: the trainer holds torch and gloo threads). Use as a
    context manager or call ``close()``; workers are also stopped at interpreter exit, and on
    Linux the kernel kills them if the process dies (``PR_SET_PDEATHSIG``). That signal follows
    the *thread* that started a worker, so create and call the pool from a long-lived thread
    (a worker lost that way is replaced, like a crash). Not thread-safe: one caller at a time.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        start_method: str = "spawn",
        start_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 1 or not timeout_s > 0:
            raise ValueError(
                f"reward pool needs num_workers >= 1 and timeout_s > 0, got {num_workers}, {timeout_s}"
            )
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(
                f"start_method must be 'spawn' or 'forkserver' (not fork), got {start_method!r}"
            )
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        self._stats: Counter[str] = Counter(ok=0, timeout=0, error=0, replaced=0)
        self.last_error = ""
        self._start_failures = 0
        self._workers.extend(self._spawn() for _ in range(num_workers))

    # -- public --

    @property
    def stats(self) -> dict[str, int]:
        """Cumulative counts: ``ok``, ``timeout``, ``error`` items and ``replaced`` workers."""
        return dict(self._stats)

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def wait_ready(self) -> None:
        """Block until every worker has started (e.g. before the first training step)."""
        self._check_open()
        while not all(w.ready for w in self._workers):
            self._collect([], Counter())

    def score(self, items: Sequence[Item]) -> list[float]:
        """Scores (1.0/0.0) in the order of ``items``."""
        return self.score_with_metrics(items)[0]

    def score_with_metrics(self, items: Sequence[Item]) -> tuple[list[float], dict[str, int]]:
        """Scores plus this batch's counts of ``ok``, ``timeout`` and ``error`` items."""
        self._check_open()
        for _, _, reward_type in items:
            check_reward_type(reward_type)  # fail before any work, in the caller's process
        scores = [0.0] * len(items)
        counts: Counter[str] = Counter(ok=0, timeout=0, error=0)
        todo = deque(range(len(items)))
        while todo or any(w.item is not None for w in self._workers):
            self._dispatch(todo, items)
            self._collect(scores, counts)
        self._stats.update(counts)
        return scores, dict(counts)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("RewardPool is closed")

    def _spawn(self) -> _Worker:
        self._check_open()  # close() from another thread or at exit: never start new workers
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main, args=(child_conn, os.getpid()), name="reward-worker", daemon=True
        )
        proc.start()
        child_conn.close()
        return _Worker(proc, parent_conn, started=time.monotonic())

    def _replace(self, i: int) -> None:
        w = self._workers[i]
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join()
        w.conn.close()
        self._workers[i] = self._spawn()
        self._stats["replaced"] += 1

    def _dispatch(self, todo: deque[int], items: Sequence[Item]) -> None:
        for i, w in enumerate(self._workers):
            if not todo or not w.ready or w.item is not None:
                continue
            index = todo.popleft()
            try:
                w.conn.send((index, *items[index]))
            except (OSError, ValueError):  # died while idle: nothing was lost, retry elsewhere
                todo.appendleft(index)
                self._replace(i)
                continue
            w.item, w.deadline = index, time.monotonic() + self.timeout_s

    def _collect(self, scores: list[float], counts: Counter[str]) -> None:
        """Wait for the next message, death or deadline, and account for it."""
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.item is not None]
        deadlines += [w.started + self.start_timeout_s for w in self._workers if not w.ready]
        waitables = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
        ready = set(wait(waitables, timeout=max(0.0, min(deadlines, default=now + 1.0) - now)))
        for i, w in enumerate(self._workers):
            if w.conn in ready and self._receive(i, scores, counts):
                continue
            if w.proc.sentinel in ready and not w.conn.poll():
                self._on_death(i, counts, f"worker exited with code {w.proc.exitcode}")
        now = time.monotonic()
        for i, w in enumerate(self._workers):
            if w.item is not None and now >= w.deadline:
                counts["timeout"] += 1
                self._replace(i)
            elif not w.ready and now >= w.started + self.start_timeout_s:
                raise RuntimeError(f"reward worker did not start within {self.start_timeout_s} s")

    def _receive(self, i: int, scores: list[float], counts: Counter[str]) -> bool:
        """Handle one message from worker ``i``; True if the worker died (already handled)."""
        w = self._workers[i]
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            self._on_death(i, counts, f"worker pipe closed (exit code {w.proc.exitcode})")
            return True
        if msg[0] == "ready":
            w.ready = True
            self._start_failures = 0
            return False
        index, score, status, error = msg
        if index == w.item:
            scores[index] = score
            counts[status] += 1
            if error:
                self.last_error = error
            w.item, w.deadline = None, float("inf")
        return False

    def _on_death(self, i: int, counts: Counter[str], why: str) -> None:
        w = self._workers[i]
        if not w.ready:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:  # broken environment, not bad luck
                raise RuntimeError(
                    f"reward workers failed to start {self._start_failures} times in a row: {why}"
                )
        if w.item is not None:
            counts["error"] += 1
            self.last_error = why
        self._replace(i)
