"""Distributed start-up from torchrun or Slurm (``srun``) environment variables.

NCCL with CUDA, gloo without (and then the CPU compatibility layer is entered). The rendezvous is
``MASTER_ADDR``/``MASTER_PORT`` (env://), which torchrun sets and the sbatch script exports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from copd_mega.parallel import comm, monitor
from copd_mega.parallel.cpu import enter_cpu_mode


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" | "slurm" | "single"


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Read rank, world size and local rank from torchrun or Slurm variables (torchrun wins)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun"
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            "slurm",
        )
    return LaunchEnv(0, 1, 0, "single")


def choose_backend(requested: str = "auto") -> str:
    """``nccl`` when CUDA is present, else ``gloo``; an explicit request is checked."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise RuntimeError(
            "runtime.backend=nccl but CUDA is not available on this node; "
            "set runtime.backend=auto (or gloo) to run on CPU."
        )
    if requested not in ("nccl", "gloo"):
        raise ValueError(f"runtime.backend={requested!r}: use one of auto, nccl, gloo")
    return requested


def init_distributed(backend: str = "auto", timeout_s: float = 600.0, seed: int = 0) -> LaunchEnv:
    """Initialise torch.distributed for this process and return its launch environment.

    Single-process runs get a world of one (``MASTER_ADDR``/``MASTER_PORT`` default to a
    loopback rendezvous on a free port). Without CUDA the CPU compatibility layer is entered.
    ``timeout_s`` (``parallel.collective_timeout_s``) bounds each collective; waits for uneven
    work go through ``comm.wait_for``, which has no deadline. Multi-rank jobs start this rank's
    ``monitor`` (heartbeat; another rank's failure ends this one).
    """
    launch = read_launch_env()
    chosen = choose_backend(backend)
    if chosen == "gloo":
        enter_cpu_mode(seed)
    else:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    if dist.is_initialized():
        return launch
    if launch.launcher == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not set: export them before srun (slurm/copd_8branch.sh "
            "derives MASTER_ADDR from the node list) or start with torchrun."
        )
    comm.init_process_group(chosen, launch.rank, launch.world_size, timeout_s)
    os.environ["WORLD_SIZE"] = str(launch.world_size)  # HyperCommGrid reads it
    monitor.start()
    return launch


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    """The device this process computes on: its CUDA device, or CPU under gloo."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
