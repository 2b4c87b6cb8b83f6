"""Preemption: SIGTERM or SIGUSR1 asks the job to save at the next step boundary and exit 0.

Slurm sends ``SIGUSR1`` ahead of the time limit with ``#SBATCH --signal=USR1@120`` (and SIGTERM
when it preempts or cancels a job); a requeued job then continues with ``--resume=auto``. The
handler only records the signal. At each step boundary every rank first waits for all others
in the store (``comm.wait_group``: no deadline, so a branch whose step ran tens of minutes longer
times nothing out), then joins one MAX all-reduce over the world of that flag and of global rank
0's clock decisions (save / stop, ``trainer.clock``), so all ranks save and stop after the same
step even when the signal reached only some of them.

Ctrl-C (SIGINT) keeps its own handler (the command's: a KeyboardInterrupt where the rank is),
chained behind one that remembers it: a rank whose KeyboardInterrupt was swallowed on the way
(a broad ``except`` in a library) raises it again at its next step boundary, before it waits
for any other rank. An ignored SIGINT (a job started in the background by a non-interactive
shell) stays ignored, as the command leaves it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from copd_mega.parallel import comm

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Context manager installing the handlers (main thread only); the old ones come back on exit."""

    def __init__(self) -> None:
        self.name = ""  # the signal received, or "" (set on a peer's request by ``agreed``)
        self.interrupted = False  # a SIGINT reached this process
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.name = signal.Signals(signum).name

    def _interrupt(self, signum: int, frame) -> None:
        """Remember the Ctrl-C, then the handler that was there decides (KeyboardInterrupt)."""
        self.interrupted = True
        old = self._old.get(signal.SIGINT)
        if callable(old):
            old(signum, frame)
        elif old != signal.SIG_IGN:
            signal.default_int_handler(signum, frame)

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
            if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:  # an ignored Ctrl-C stays so
                self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def agreed(
        self, device: torch.device, step_s: float, decide: Callable[[float], tuple[bool, bool]]
    ) -> tuple[bool, bool, bool]:
        """Collective over the world: (any rank signalled, save, stop), the same on every rank.

        ``step_s``: this rank's time since its step started. After every rank arrived, global
        rank 0 calls ``decide(slowest rank's step_s)`` -> (save, stop) and broadcasts it.
        ``device``: the rank's compute device (the tensors live there, as NCCL requires).
        """
        if self.interrupted:  # its KeyboardInterrupt was swallowed: end here, before any wait
            raise KeyboardInterrupt
        flag = torch.tensor([1.0 if self.name else 0.0, step_s], device=device)
        many = dist.is_initialized() and dist.get_world_size() > 1
        if many:
            comm.wait_group()  # the slowest branch's step may run long: wait without a deadline
            comm.all_reduce(flag, op=dist.ReduceOp.MAX)
        signalled, slowest = flag.tolist()
        leader = not dist.is_initialized() or dist.get_rank() == 0
        verdict = torch.tensor([float(v) for v in decide(slowest)] if leader else [0.0, 0.0],
                               device=device)  # fmt: skip
        if many:
            comm.broadcast(verdict, src=0)
        if signalled > 0 and not self.name:
            self.name = "a signal to another rank"
        save, stop = (v > 0 for v in verdict.tolist())
        return signalled > 0, save, stop
