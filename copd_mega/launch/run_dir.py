"""One job per run directory, for a job of many ranks: global rank 0 takes the lock.

Only global rank 0 takes ``RUN/.copd.lock`` (:mod:`copd_mega.files.run_lock`), before the job
writes anything; the other ranks learn the outcome from one broadcast, so when another job holds
the directory every rank raises the same one-line error (printed once, by rank 0) and the job
exits non-zero before it reads or writes a checkpoint. Rank 0 holds the lock until it exits; if
any rank dies the launcher ends the job's other processes, rank 0 with them, and the kernel
releases the lock. Jobs on other hosts see the lock as far as the filesystem passes ``flock`` on
(see :mod:`copd_mega.files.run_lock`).
"""

from __future__ import annotations

import torch.distributed as dist

from copd_mega.ckpt.sharded_state import everywhere
from copd_mega.config import Config
from copd_mega.files.run_lock import RunDirBusy, RunDirError, lock_dir
from copd_mega.parallel import comm
from copd_mega.parallel.dist import init_distributed


def claim_run_dir(cfg: Config) -> None:
    """Start the process group and lock ``cfg.run_dir`` for this job (collective over the
    world). Raises RunDirBusy (or RunDirError when run_dir is a file) on every rank alike."""
    init_distributed(cfg.parallel.backend, seed=cfg.seed)
    error = None
    if dist.get_rank() == 0:
        try:
            lock_dir(cfg.run_dir)
        except RunDirError as e:
            error = (type(e).__name__, str(e))
    error = comm.broadcast_object(error)
    if error is not None:
        comm.destroy_process_group()  # the job ends here, on every rank
        kind = RunDirBusy if error[0] == RunDirBusy.__name__ else RunDirError
        raise everywhere(kind(error[1]))
