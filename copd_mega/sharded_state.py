"""Megatron sharded state of a branch, written to and read from one torch_dist directory.

The plumbing under :mod:`copd_mega.checkpoint`: sharded state dicts of the model and the
distributed optimizer (with the fixes megatron-core 0.16.1 needs on CPU and for several
branches), saving a directory with ranks outside the branch passing nothing, loading with shape
checks that fail on every rank at once.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

CONFIG_FILE = "config.yaml"  # the resolved config beside every model directory
OPTIM_FORMAT = "dp_reshardable"  # megatron default; resume keeps TP and PP
_COMMON = "__branch_common__"


class CheckpointError(RuntimeError):
    """A missing, incomplete or mismatched checkpoint; the message names the path and the fix."""


def everywhere(error: Exception) -> Exception:
    """Mark ``error`` as raised alike on every rank (``copd`` then prints it on rank 0 only)."""
    error.everywhere = True
    return error


def raise_everywhere(error: str | None) -> None:
    """Collective: raise CheckpointError on every rank if any rank found ``error`` (instead of
    leaving the others waiting in the next collective)."""
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise everywhere(CheckpointError(first))


def _gpt(model: Any) -> torch.nn.Module:
    """The bare GPTModel inside a BranchModel or megatron DDP wrapper."""
    model = getattr(model, "module", model)  # BranchModel.module / DDP.module
    return getattr(model, "module", model)


@contextmanager
def _branch_dp_rank(topo):
    """Megatron reads its global DP rank for the tied output layer on the last PP stage; give it
    this branch's (the only global state touched, restored on exit)."""
    from megatron.core import parallel_state

    old = parallel_state._MPU_DATA_PARALLEL_RANK
    parallel_state._MPU_DATA_PARALLEL_RANK = dist.get_rank(topo.pg.dp_cp)
    try:
        yield
    finally:
        parallel_state._MPU_DATA_PARALLEL_RANK = old


def model_sharded_state_dict(model: Any, topo) -> dict:
    """This rank's model ShardedTensors (global keys and shapes), layer extra state dropped."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    with _branch_dp_rank(topo):
        sd = _gpt(model).sharded_state_dict(metadata={"dp_cp_group": topo.pg.dp_cp})
    return {
        k: v
        for k, v in sd.items()
        if not (isinstance(v, ShardedObject) and k.endswith("_extra_state"))
    }


def _inner_optimizers(optimizer) -> list:
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def _ensure_adam_state(optimizer) -> None:
    """Allocate torch Adam's lazy state (step 0, zero moments) before any step: megatron's
    optimizer state_dict needs it on the CPU path (no TE/Apex fused Adam)."""
    for inner in _inner_optimizers(optimizer):
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW) or inner.state:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p)}
                st["exp_avg_sq"] = torch.zeros_like(p)
                if group.get("amsgrad"):
                    st["max_exp_avg_sq"] = torch.zeros_like(p)
                inner.state[p] = st


def restore_adam_step(optimizer, loaded: Any) -> None:
    """Give every parameter its own torch Adam ``step`` equal to the saved one (megatron 0.16
    saves it in param_groups, loads one tensor shared by all parameters, which foreach Adam then
    increments once per parameter, and copies the template's stale step over it)."""
    inners = _inner_optimizers(optimizer)
    states = [loaded] if len(inners) == 1 else [loaded[i] for i in range(len(inners))]
    for inner, sd in zip(inners, states, strict=True):
        steps = {g["step"] for g in sd["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for st in inner.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = torch.tensor(step, dtype=st["step"].dtype)


def train_sharded_state_dict(bm, topo, loading: bool) -> dict:
    _ensure_adam_state(bm.optimizer)
    model_sd = model_sharded_state_dict(bm, topo)
    opt_sd = bm.optimizer.sharded_state_dict(
        model_sd, is_loading=loading, metadata={"distrib_optim_sharding_type": OPTIM_FORMAT}
    )
    return {"model": model_sd, "optimizer": opt_sd}


def _flatten(x: Any, path: str = "") -> dict[str, Any]:
    if isinstance(x, (dict, list)) and x:
        items = x.items() if isinstance(x, dict) else enumerate(x)
        return {k: v for key, val in items for k, v in _flatten(val, f"{path}/{key}").items()}
    return {path: x}


def _unflatten_like(template: Any, flat: dict[str, Any], path: str = "") -> Any:
    if isinstance(template, dict) and template:
        return {k: _unflatten_like(v, flat, f"{path}/{k}") for k, v in template.items()}
    if isinstance(template, list) and template:
        return [_unflatten_like(v, flat, f"{path}/{i}") for i, v in enumerate(template)]
    return flat[path]


def to_savable(nested: dict, topo) -> dict:
    """Flat ShardedBase dict; non-tensor leaves go into one ShardedObject owned by the branch's
    first rank (common.pt would only hold global rank 0's)."""
    from megatron.core.dist_checkpointing.mapping import (
        LocalNonpersistentObject,
        ShardedBase,
        ShardedObject,
    )

    kept = (ShardedBase, LocalNonpersistentObject)  # megatron handles these itself
    flat = _flatten(nested)
    out = {k: v for k, v in flat.items() if isinstance(v, kept)}
    common = {k: v for k, v in flat.items() if not isinstance(v, kept)}
    if common:
        local = topo.rank - topo.branch.first_rank
        out[_COMMON] = ShardedObject("branch_common", common, (1,), (0,), replica_id=(0, 0, local))
    return out


def save_dir(path: Path, state: dict | None) -> None:
    """Collective over the world: ``state`` on the directory's branch, ``None`` elsewhere."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    dist_checkpointing.save(state or {}, str(path), sharded_strategy=strategy)


def load_dir(path: Path, template: dict | None, topo) -> dict | None:
    """Collective over the world; returns ``template``'s structure filled from ``path``."""
    from megatron.core import dist_checkpointing

    # No access-integrity check: it wants one main replica per shard across the world, but
    # every branch may load the same checkpoint (a base model for all branches).
    if template is None:
        raise_everywhere(None)
        dist_checkpointing.load({}, str(path), validate_access_integrity=False)
        return None
    flat = to_savable(template, topo)
    raise_everywhere(_shape_error(path, flat))
    loaded = dist_checkpointing.load(flat, str(path), validate_access_integrity=False)
    loaded.update(loaded.pop(_COMMON, {}))
    return _unflatten_like(template, loaded)


def _shape_error(path: Path, flat: dict) -> str | None:
    """The first model key missing from ``path`` or of another shape, with a hint at the fix."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for sh in flat.values():
        if not isinstance(sh, ShardedTensor) or sh.key.startswith("optimizer."):
            continue
        if sh.key not in saved:
            return (
                f"{path}: checkpoint has no tensor {sh.key}; it was saved from a different model "
                f"(compare its {CONFIG_FILE} with model.* here, e.g. model.tie_embeddings)"
            )
        got = tuple(saved[sh.key].size)
        if got != tuple(sh.global_shape) and not sh.allow_shape_mismatch:
            return (
                f"{path}: {sh.key} has shape {got} but this model expects "
                f"{tuple(sh.global_shape)}; make model.* match the checkpoint's {CONFIG_FILE}"
            )
    return None


def load_module(model: Any, loaded: dict, path: Path) -> None:
    missing, unexpected = _gpt(model).load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing {missing[:5]} / unexpected {unexpected[:5]}")
