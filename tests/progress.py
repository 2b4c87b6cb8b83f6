"""Waiting on progress instead of on fixed short timeouts (the test machine is shared).

A test that waits for child processes fails only when they *stop making progress*: no CPU time
used by the processes or any of their descendants for ``stall_s`` seconds (a deadlock, a lost
peer, a process waiting on something that never comes). A job that is merely slow because other
work shares the cores keeps accumulating CPU time and is waited for.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable

import psutil

MIN_CPU_S = 0.05  # CPU seconds that count as progress (an idle process uses ~0)


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of ``pids`` and all their live descendants."""
    total, seen = 0.0, set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
    return total


class Stall:
    """``check()`` raises TimeoutError once ``pids()`` have used no CPU for ``stall_s`` seconds."""

    def __init__(self, pids: Callable[[], Iterable[int]], stall_s: float, what: str) -> None:
        self.pids, self.stall_s, self.what = pids, stall_s, what
        self.cpu = tree_cpu_seconds(pids())
        self.mark = time.monotonic()

    def check(self) -> None:
        cpu = tree_cpu_seconds(self.pids())
        now = time.monotonic()
        if cpu - self.cpu >= MIN_CPU_S:
            self.cpu, self.mark = cpu, now
        elif now - self.mark > self.stall_s:
            raise TimeoutError(f"{self.what}: no progress (CPU time) for {self.stall_s:.0f}s")


def communicate_until_stalled(proc: subprocess.Popen, stall_s: float, what: str = "") -> tuple:
    """``proc.communicate()``, waiting as long as ``proc`` (with its descendants) uses CPU;
    TimeoutError after ``stall_s`` seconds without (the caller kills ``proc``)."""
    stall = Stall(lambda: [proc.pid], stall_s, what or f"process {proc.pid}")
    while True:
        try:
            return proc.communicate(timeout=2.0)
        except subprocess.TimeoutExpired:
            stall.check()


def run_until_stalled(
    cmd: list[str], stall_s: float, what: str = "", **popen
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` that waits as long as the command
    (with its descendants) keeps using CPU; killed and TimeoutError after ``stall_s`` idle."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    stall = Stall(lambda: [proc.pid], stall_s, what or " ".join(cmd[:4]))
    while True:
        try:
            out, err = proc.communicate(timeout=2.0)
            return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            try:
                stall.check()
            except TimeoutError:
                try:
                    for p in psutil.Process(proc.pid).children(recursive=True):
                        p.kill()
                except psutil.Error:
                    pass
                proc.kill()
                proc.communicate()
                raise
