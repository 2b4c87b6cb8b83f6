"""One rank's error ends every rank within seconds, under torchrun as under srun.

Every rank of a multi-rank job runs a :class:`Monitor` thread (started by
``dist.init_distributed``) on its own connection to the job's rendezvous store
(``comm.store()``). Every :data:`BEAT_S` it adds to the rank's heartbeat counter (what
``comm.wait_for`` checks) and looks for the job's failure flag.

When a command fails on a rank, ``copd`` calls :func:`claim_failure`: the first rank to fail
raises the flag and prints the one-line error (the only one the job prints); a rank that fails
after it (e.g. a collective broken because the first one left) exits without a word. The
monitors of all other ranks see the flag within :data:`BEAT_S`, acknowledge it and end their
process at once (``os._exit``), also when their main thread is blocked inside a collective,
which no exception or signal would interrupt. The failing rank waits up to :data:`ACK_WAIT_S`
for those acknowledgements before it exits, so its store (rank 0 hosts it under srun) outlives
the others' last look. torchrun and srun (``--kill-on-bad-exit``) then see non-zero exits.

If the store itself goes away (its host died), the monitor stops quietly: the launcher ends the
job, and a wait that depends on the dead rank fails in ``comm``.

The monitor is stopped at interpreter exit (``atexit``) when nothing stopped it before: a daemon
thread still inside a store call while Python finalizes is ended by ``pthread_exit`` when it
takes the GIL back, whose unwinding through the binding's C++ aborts the process ("terminate
called without an active exception", SIGABRT) after the rank's work is done.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import torch.distributed as dist

from copd_mega.parallel import comm

BEAT_S = 1.0
ACK_WAIT_S = 10.0
ABORT_EXIT = 1  # exit code of the ranks ended by another rank's failure
FLAG, ACKS = "abort/count", "abort/acks"

_monitor: Monitor | None = None


class Monitor(threading.Thread):
    """Heartbeat and failure watch of this rank (a daemon thread with its own store client)."""

    def __init__(self, store: dist.Store, rank: int, world: int) -> None:
        super().__init__(name="copd-monitor", daemon=True)
        self.store, self.rank, self.world = store, rank, world
        self.quiet = threading.Event()  # set: this rank is failing or ending on its own

    def run(self) -> None:
        alive = comm.ALIVE_KEY.format(self.rank)
        try:
            while not self.quiet.is_set():
                self.store.add(alive, 1)
                if self.store.check([FLAG]) and not self.quiet.is_set():
                    self.store.add(ACKS, 1)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(ABORT_EXIT)  # the failing rank prints the error; this one ends
                self.quiet.wait(BEAT_S)  # wakes at once when stopped
        except Exception:  # the store is gone (its host ended): the launcher ends the job
            return


def start() -> None:
    """Start this rank's monitor (multi-rank jobs with a store; once per process group)."""
    global _monitor
    st = comm.store()
    if st is None or dist.get_world_size() < 2:
        return
    stop()
    _monitor = Monitor(st.clone(), dist.get_rank(), dist.get_world_size())
    _monitor.start()


def stop() -> None:
    """Stop the monitor before an orderly end (``runtime.shutdown``; at interpreter exit
    otherwise, see the module docstring). A no-op when none runs."""
    global _monitor
    if _monitor is not None:
        _monitor.quiet.set()
        _monitor.join(timeout=2 * BEAT_S + 5)
        _monitor = None


def claim_failure() -> bool | None:
    """This rank failed: raise the job's failure flag. True when this rank failed first (it
    reports the error), False when another rank already had (this one stays silent), None
    outside a multi-rank job with a monitor (the caller reports as a single process would)."""
    mon = _monitor
    if mon is None:
        return None
    mon.quiet.set()
    try:
        first = int(mon.store.add(FLAG, 1)) == 1
        if not first:
            mon.store.add(ACKS, 1)  # the first one waits for every other rank's word
        return first
    except Exception:  # the store is gone: the job is ending anyway; report here
        return True


def await_acknowledgements(timeout_s: float = ACK_WAIT_S) -> None:
    """After :func:`claim_failure` returned True: wait until every other rank acknowledged the
    flag (they exit right after) or ``timeout_s`` passed."""
    mon = _monitor
    if mon is None:
        return
    end = time.monotonic() + timeout_s
    try:
        while int(mon.store.add(ACKS, 0)) < mon.world - 1 and time.monotonic() < end:
            time.sleep(0.1)
    except Exception:
        return


atexit.register(stop)  # before finalization, whoever forgot to stop the monitor
