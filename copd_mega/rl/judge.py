"""Reward scoring for a model replica: one rank scores, the others receive the same rewards.

Every TP (and PP) rank of a DP replica holds the same rollouts, but a verification that times
out on one rank and not another would desynchronise the replica. So only rank 0 of the replica's
model-parallel group runs the :class:`~copd_mega.rl.reward_pool.RewardPool` (``rewards.workers`` worker
processes with a hard deadline of ``rewards.timeout_s`` per item, hanging items scored in
parallel) and broadcasts the rewards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from copd_mega.config import RewardsConfig
from copd_mega.parallel import comm
from copd_mega.parallel.topology import Topology
from copd_mega.rl.reward_pool import RewardPool


class Judge:
    """Scores (response, gold, reward_type) items identically on every rank of a replica."""

    def __init__(
        self,
        topo: Topology,
        device: torch.device,
        num_workers: int = 1,
        timeout_s: float = 5.0,
    ) -> None:
        self.device = device
        self.group = topo.pg.mp
        self.src = dist.get_global_rank(self.group, 0)
        self.is_scorer = dist.get_rank() == self.src
        self.pool = (
            RewardPool(num_workers=num_workers, timeout_s=timeout_s) if self.is_scorer else None
        )

    @classmethod
    def from_config(cls, topo: Topology, device: torch.device, rewards: RewardsConfig) -> Judge:
        """A judge with ``rewards.workers`` worker processes and ``rewards.timeout_s`` per item."""
        return cls(topo, device, rewards.workers, rewards.timeout_s)

    def score(self, items: list[tuple[str, str, str]]) -> tuple[torch.Tensor, dict[str, int]]:
        """Rewards ``[len(items)]`` float32 and this call's status counts, on every replica rank."""
        buf = torch.zeros(len(items) + 3)
        if self.is_scorer:
            scores, counts = self.pool.score_with_metrics(items)
            buf[: len(items)] = torch.tensor(scores, dtype=torch.float32)
            buf[len(items) :] = torch.tensor([counts["ok"], counts["timeout"], counts["error"]])
        if dist.get_world_size(self.group) > 1:
            buf = buf.to(self.device)
            comm.wait_group(self.group)  # scoring takes up to items x timeout / workers
            comm.broadcast(buf, src=self.src, group=self.group)
            buf = buf.cpu()
        ok, timeout, error = (int(x) for x in buf[len(items) :].tolist())
        call = {"ok": ok, "timeout": timeout, "error": error}
        return buf[: len(items)], call

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
