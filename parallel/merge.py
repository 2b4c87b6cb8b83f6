"""Merge branches in place: a weighted all-reduce of every parameter shard over its peer group.

Ranks in a peer group hold the same (tp, pp, dp) coordinate, hence the same parameter shards, in
every branch; each scales its shard by its branch's normalised weight and the group sums. No rank
ever gathers a full model. Afterwards every branch holds the merged weights; the optimizer's fp32
master copies are refreshed from them so training can continue (``merge_every_cycle``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from copd_mega.parallel.topology import Topology


def normalise_weights(
    weights: list[float], setting: str = "branches.*.merge_weight"
) -> list[float]:
    """Merge weights scaled to sum to one; raises naming ``setting`` when none is positive."""
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"merge weights {weights} must be >= 0 with a positive sum: set {setting}")
    return [w / total for w in weights]


@torch.no_grad()
def merge_in_place(model: torch.nn.Module, topo: Topology, weights: list[float]) -> None:
    """Replace this branch's parameters by the weighted mean over all branches.

    ``model`` is this rank's (possibly DDP-wrapped) chunk; ``weights`` holds one weight per
    branch in branch order. Collective over ``topo.peer_group``: every rank calls it.
    """
    w = normalise_weights(weights)[topo.branch.index]
    for _, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        buf = param.data.float() * w
        dist.all_reduce(buf, group=topo.peer_group)
        param.data.copy_(buf.to(param.dtype))


def refresh_optimizer_master(optimizer) -> None:
    """Copy merged model weights into the optimizer's fp32 master copies (bf16 training)."""
    optimizer.reload_model_params()
