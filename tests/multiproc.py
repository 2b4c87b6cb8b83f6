"""Run a function on N gloo ranks in spawned processes (free port; stall guard; errors re-raised).

``spawn(fn, nprocs, *args)`` sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for each child, calls
``fn(rank, *args)`` there and returns the list of per-rank return values (pickled via torch.save).
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.multiprocessing as mp
from progress import Stall

from copd_mega.parallel.dist import free_port


def _entry(rank: int, fn, world: int, port: int, outdir: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1", WANDB_MODE="disabled",
    )  # fmt: skip
    torch.set_num_threads(1)
    result = fn(rank, *args)
    torch.save(result, os.path.join(outdir, f"{rank}.pt"))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def spawn(fn, nprocs: int, *args, timeout: float = 600.0) -> list:
    """Run ``fn(rank, *args)`` on ``nprocs`` processes; raise if any fails, or once the ranks
    made no progress (used no CPU) for ``timeout`` seconds: a slow run on a busy machine is
    waited for, a hung one is not."""
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(
            _entry, args=(fn, nprocs, free_port(), outdir, args), nprocs=nprocs,
            join=False, start_method="spawn",
        )  # fmt: skip
        stall = Stall(lambda: [p.pid for p in ctx.processes], timeout,
                      f"{fn.__name__} on {nprocs} ranks")  # fmt: skip
        while not ctx.join(timeout=1.0):
            try:
                stall.check()
            except TimeoutError:
                for p in ctx.processes:
                    p.kill()
                raise
        return [
            torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False) for r in range(nprocs)
        ]
