"""Preemption: SIGTERM or SIGUSR1 asks the job to save at the next step boundary and exit 0.

Slurm sends ``SIGUSR1`` ahead of the time limit with ``#SBATCH --signal=USR1@120`` (and SIGTERM
when it preempts or cancels a job); a requeued job then continues with ``--resume=auto``. The
handler only records the signal. At each step boundary every rank joins one MAX all-reduce of
that flag over the world, so all ranks stop after the same step even when the signal reached
only some of them.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from copd_mega.parallel import comm

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Context manager installing the handlers (main thread only); the old ones come back on exit."""

    def __init__(self) -> None:
        self.name = ""  # the signal received, or "" (set on a peer's request by ``agreed``)
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.name = signal.Signals(signum).name

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def agreed(self, device: torch.device) -> bool:
        """Collective over the world: True on every rank when any rank was signalled.

        ``device``: the rank's compute device (the flag tensor lives there, as NCCL requires).
        """
        flag = torch.tensor([1.0 if self.name else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            comm.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and not self.name:
            self.name = "a signal to another rank"
        return bool(flag.item() > 0)
