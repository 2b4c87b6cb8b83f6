"""Megatron sharded state of a branch, written to and read from one torch_dist directory.

The plumbing under :mod:`copd_mega.ckpt.checkpoint`: sharded state dicts of the model and the
distributed optimizer (with the fixes megatron-core 0.16.1 needs on CPU and for several
branches), saving and loading a directory over the branch's own process group (so all branches
save and load at once), loading with shape checks that fail on every rank of the branch at once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from copd_mega.files.disk_full import disk_full, disk_full_message
from copd_mega.parallel import comm

BACKEND = "torch_dist"  # megatron's name for the torch.distributed.checkpoint format
CONFIG_FILE = "config.yaml"  # the resolved config beside every model directory
OPTIM_FORMAT = "dp_reshardable"  # megatron default; resume keeps TP and PP
_COMMON = "__branch_common__"


class CheckpointError(RuntimeError):
    """A missing, incomplete or mismatched checkpoint; the message names the path and the fix."""


def everywhere(error: Exception) -> Exception:
    """Mark ``error`` as raised alike on every rank (``copd`` then prints it on rank 0 only)."""
    error.everywhere = True
    return error


def raise_everywhere(error: str | None, group: dist.ProcessGroup | None = None) -> None:
    """Collective over ``group`` (default: the world): raise CheckpointError on every rank if any
    rank found ``error`` (instead of leaving the others waiting in the next collective)."""
    first = next((e for e in comm.all_gather_object(error, group) if e), None)
    if first:
        raise everywhere(CheckpointError(first))


@contextmanager
def agreed_write(path: Path, group: dist.ProcessGroup | None = None, kept: str = "",
                 on_failure: Callable[[], None] | None = None):  # fmt: skip
    """Run the block's writes under ``path``; collective over ``group`` (default: the world)
    when it ends: if the block raised on any rank, every rank raises the same one-line
    CheckpointError (a full disk says so, with ``kept``: what is still intact), after
    ``on_failure()`` ran on the group's first rank. No rank is left waiting in a collective."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    error = None
    try:
        yield
    except (Exception, CheckpointException) as e:
        error = e
    text = None if error is None else _describe(error, path, kept)
    first = next((t for t in comm.all_gather_object(text, group) if t), None)
    if first is None:
        return
    if on_failure is not None and dist.get_rank(group) == 0:
        on_failure()
    raise everywhere(CheckpointError(first)) from error


def _describe(error: BaseException, path: Path, kept: str) -> str:
    if disk_full(error, path):  # also one an inner group already agreed on: say it for path
        fix = "lower checkpoint.keep_last, or move run_dir to a larger filesystem"
        return disk_full_message(path, "a checkpoint", kept or "nothing was replaced", fix)
    if getattr(error, "everywhere", False):
        return str(error)  # already agreed by an inner group
    text = " ".join(str(error).split())[:300]
    return f"writing {path} failed on rank {dist.get_rank()}: {type(error).__name__}: {text}"


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


def save_dir(path: Path, state: dict, group: dist.ProcessGroup) -> None:
    """Write one branch's flat sharded ``state`` to the existing directory ``path``.

    Collective over ``group`` (the branch's ranks) only, so every branch writes its own
    directory at the same time. megatron-core 0.16.1's ``dist_checkpointing.save`` cannot do
    that: global rank 0 writes ``common.pt`` and ``metadata.json``, it ends in a world barrier,
    and its torch_dist strategy plans over the default group with coordinator rank 0. The same
    steps are composed here with the group: megatron's preprocessing, MCore-to-torch translation
    and save planner, ``torch.distributed.checkpoint.save(process_group=group)``, then the
    group's first rank writes ``common.pt`` and ``metadata.json`` (the format and files
    ``dist_checkpointing.load`` reads; ``metadata.json`` last, as the completion mark).
    """
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    sharded, common = save_preprocess(state, validate_access_integrity=False)
    by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
    with agreed_write(path, group):  # one rank's failure stops the whole branch
        dcp.save(
            mcore_to_pyt_state_dict(by_key, is_loading=False),
            storage_writer=dcp.FileSystemWriter(str(path), thread_count=1),
            planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False),
            process_group=group,
        )
    with agreed_write(path, group):
        if dist.get_rank(group) == 0:
            torch.save(common, path / COMMON_STATE_FNAME)
            save_config(CheckpointingConfig(BACKEND, 1), str(path))


def _group_load_strategy(group: dist.ProcessGroup):
    """megatron's torch_dist load strategy with the reads planned over ``group``.

    ``TorchDistLoadShardedStrategy.load`` in megatron-core 0.16.1 calls torch's loader without a
    process group (the whole world). This subclass runs the same steps with ``group``: megatron's
    key translation and ``MCoreLoadPlanner`` (global-shape checks, ``allow_shape_mismatch``).
    """
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import torch as mtorch

    class GroupLoadStrategy(mtorch.TorchDistLoadShardedStrategy):
        def load(self, sharded_state_dict: dict, checkpoint_dir) -> dict:
            tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
            by_key, flat_map, renames = mtorch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict
            )
            pyt = mtorch.mcore_to_pyt_state_dict(by_key, True)
            planner = mtorch.MCoreLoadPlanner(
                shapes_validation_sharded_tensors=[
                    t for t in tensors if not t.allow_shape_mismatch
                ],
                allow_shape_mismatch_sharded_tensors={
                    t.key: t for t in tensors if t.allow_shape_mismatch
                },
            )
            reader = dcp.FileSystemReader(str(checkpoint_dir))
            dcp.load(pyt, storage_reader=reader, planner=planner, process_group=group)
            out = {k: mtorch._unwrap_pyt_sharded_tensor(v) for k, v in pyt.items()}
            out = mtorch._replace_sharded_keys_with_state_dict_keys(out, flat_map, renames)
            mtorch._restore_dict_types(out, sharded_state_dict)
            return out

    return GroupLoadStrategy()


def load_dir(path: Path, template: dict, topo) -> dict:
    """Fill ``template``'s structure from ``path``. Collective over this rank's branch only."""
    from megatron.core import dist_checkpointing

    flat = to_savable(template, topo)
    raise_everywhere(_shape_error(path, flat), topo.branch_group)
    # No access-integrity check: it wants one main replica per shard across the world, but
    # every branch may load the same checkpoint (a base model for all branches).
    loaded = dist_checkpointing.load(
        flat,
        str(path),
        sharded_strategy=_group_load_strategy(topo.branch_group),
        validate_access_integrity=False,
    )
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
