"""Start-up shared by every job: distributed init, topology, layout print-out, data, tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from copd_mega.config import Config
from copd_mega.launch.datasets import ChatCodec, PromptCodec, make_codec, prepare_data
from copd_mega.launch.plan import format_layout
from copd_mega.launch.validate import check_vocab
from copd_mega.parallel import comm, monitor
from copd_mega.parallel.dist import device, init_distributed
from copd_mega.parallel.topology import Layout, Topology, build_topology, plan_layout


@dataclass
class Runtime:
    """What every rank of a job holds after start-up."""

    cfg: Config
    topo: Topology
    device: torch.device
    codec: PromptCodec | ChatCodec

    def log(self, msg: str) -> None:
        """Print on the branch leader (or every rank with ``logging.log_all_ranks``)."""
        if self.topo.is_branch_leader or self.cfg.logging.log_all_ranks:
            print(f"[{self.topo.branch.name} r{self.topo.rank}] {msg}", flush=True)


def start(cfg: Config, check: Callable[[Config, int], Layout] = plan_layout) -> Runtime:
    """Initialise the process group and everything every job needs, in a fixed order.

    ``check(cfg, world_size)`` validates the job and returns its layout (``copd train`` passes
    ``validate.validate_job``, what ``copd plan`` runs). Global rank 0 prints the rank layout
    (the same text as ``copd plan``) before any model is built. Checks the tokenizer fits
    ``model.vocab_size`` before any model exists.
    """
    init_distributed(cfg.parallel.backend, cfg.parallel.collective_timeout_s, seed=cfg.seed)
    world = dist.get_world_size()
    layout = check(cfg, world)  # raises a ConfigError naming the fix
    if dist.get_rank() == 0:
        print(format_layout(cfg, layout), flush=True)
    topo = build_topology(cfg, world)
    tok_path = prepare_data(cfg)
    codec = make_codec(cfg, tok_path)
    check_vocab(cfg, codec.vocab_size, f"tokenizer {tok_path}")
    return Runtime(cfg, topo, device(), codec)


def shutdown() -> None:
    monitor.stop()  # an orderly end: the store's host may leave once the barrier is passed
    if dist.is_initialized():
        comm.barrier()
        comm.destroy_process_group()
