"""Merge branches in place on the optimizer's fp32 masters: a weighted all-reduce over peer groups.

Ranks in a peer group hold the same (tp, pp, dp) coordinate in every branch, hence the same
shard of megatron's distributed optimizer (same parameters, same flat ranges). Each rank scales
its fp32 master shard by its branch's normalised weight, the group sums, and the result is
copied into the model parameters (``_copy_main_params_to_model_params``, then the DP all-gather
megatron runs after every step). The masters are never rounded through the bf16 model weights,
no rank gathers a full model, and every DP replica reduces only its own shard.

Tensors travel flattened into a few buckets (at most ``bucket_numel`` elements each), not one
collective per parameter. The Adam moments follow ``merge.optimizer_state``:

- ``average``: the moments are merged with the same weights (one preconditioner for the one
  merged model; every branch then holds the identical optimizer state);
- ``reset``: moments and step counts are zeroed (Adam restarts, with its bias correction);
- ``keep``: each branch keeps its own moments.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from copd_mega.parallel import comm
from copd_mega.parallel.topology import Topology

OPTIMIZER_STATE_POLICIES = ("average", "reset", "keep")
MOMENTS = ("exp_avg", "exp_avg_sq")


def normalise_weights(
    weights: list[float], setting: str = "branches.*.merge_weight"
) -> list[float]:
    """Merge weights scaled to sum to one; raises naming ``setting`` when none is positive."""
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"merge weights {weights} must be >= 0 with a positive sum: set {setting}")
    return [w / total for w in weights]


def inner_optimizers(optimizer) -> list:
    """The megatron (distributed) optimizers behind ``optimizer`` (a ChainedOptimizer or one)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def master_shards(optimizer) -> list[torch.Tensor]:
    """This rank's fp32 master shards, in the optimizer's fixed order (same on every branch).

    With bf16 weights these are the distributed optimizer's fp32 copies; with fp32 weights they
    are views of the model parameters' shards.
    """
    return [p for o in inner_optimizers(optimizer) for g in o.optimizer.param_groups
            for p in g["params"]]  # fmt: skip


def moment_tensors(optimizer) -> list[torch.Tensor]:
    """Adam's first and second moments of every master shard, in a fixed order.

    torch's Adam allocates its state at the first step; a branch that has not stepped yet gets
    zero moments (step 0) here, so every branch of a peer group passes the same tensors.
    """
    out = []
    for o in inner_optimizers(optimizer):
        state = o.optimizer.state
        for g in o.optimizer.param_groups:
            for p in g["params"]:
                st = state[p]  # torch optimizers keep a defaultdict(dict)
                st.setdefault("step", torch.tensor(0.0))
                out += [st.setdefault(k, torch.zeros_like(p)) for k in MOMENTS]
    return out


def buckets(tensors: list[torch.Tensor], bucket_numel: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of ``tensors`` holding at most ``bucket_numel`` elements each (a tensor
    larger than that gets a bucket of its own)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        if not out or size + t.numel() > bucket_numel:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel()
    return out


@torch.no_grad()
def weighted_all_reduce(
    tensors: list[torch.Tensor], weight: float, group: dist.ProcessGroup, bucket_numel: int
) -> None:
    """In place: every tensor becomes the sum over ``group`` of ``weight * tensor``.

    Collective over ``group``; every rank passes tensors of the same shapes and dtype, in the
    same order, on its compute device. One all-reduce per bucket, after a store wait for the
    group without a deadline (branches reach a merge at different times).
    """
    comm.wait_group(group)
    for bucket in buckets(tensors, bucket_numel):
        flat = _flatten_dense_tensors(bucket).mul_(weight)
        comm.all_reduce(flat, group=group)
        for t, merged in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
            t.copy_(merged)


def reset_moments(optimizer) -> None:
    """Zero Adam's moments and step counts (per-parameter ``step`` or a group's ``step``)."""
    for t in moment_tensors(optimizer):
        t.zero_()
    for o in inner_optimizers(optimizer):
        for st in o.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"].zero_()
        for g in o.optimizer.param_groups:
            if "step" in g:
                g["step"] = 0


@torch.no_grad()
def merge_in_place(
    model: torch.nn.Module,
    optimizer,
    topo: Topology,
    weights: list[float],
    optimizer_state: str = "average",
    bucket_numel: int = 1 << 26,
) -> None:
    """Replace this branch's fp32 masters (and model weights) by the weighted mean over branches.

    ``model``: this rank's megatron DDP chunk; ``optimizer``: its distributed optimizer;
    ``weights``: one per branch in branch order; ``optimizer_state``: average | reset | keep.
    Collective over ``topo.peer_group`` (then over the branch's DP group for the parameter
    all-gather): every rank calls it. Afterwards every branch holds the merged weights.
    """
    if optimizer_state not in OPTIMIZER_STATE_POLICIES:
        raise ValueError(
            f"merge.optimizer_state={optimizer_state!r}: use one of "
            f"{', '.join(OPTIMIZER_STATE_POLICIES)}"
        )
    w = normalise_weights(weights)[topo.branch.index]
    tensors = master_shards(optimizer)
    if optimizer_state == "average":
        tensors += moment_tensors(optimizer)
    weighted_all_reduce(tensors, w, topo.peer_group, bucket_numel)
    if optimizer_state == "reset":
        reset_moments(optimizer)
    for o in inner_optimizers(optimizer):
        o._copy_main_params_to_model_params()
    model.start_param_sync(force_sync=True)  # DP all-gather of the updated shards
