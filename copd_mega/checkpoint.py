"""Checkpoints: Megatron ``torch_dist`` directories, the per-step resume layout, offline access.

**One directory per branch.** Branches hold different weights under identical Megatron keys, and
``dist_checkpointing.save/load`` are collectives over the whole world coordinated by global rank
0. So each branch is written to its own directory *in turn*: every rank calls save for every
branch, ranks outside the branch pass ``{}``. Megatron's ``common.pt`` is written by global rank 0
only, so a branch's non-tensor state (optimizer hyper-parameters, sharding type) is stored as one
``ShardedObject`` owned by the branch's first rank instead. Each branch directory is a complete
Megatron checkpoint on its own: it loads at any TP/PP split (Megatron reshards; a padded vocabulary
loads with ``allow_shape_mismatch``) and the offline tools read it without a process group.

Layout of a resume root (``RUN/checkpoints``)::

    step_000120/branch_<name>/    model + distributed optimizer (+ config.yaml)
    step_000120/trainer_state/    rank_00003.pt per global rank (trainer dict + RNG), config.yaml
    step_000120/complete.json     written after every rank finished
    latest                        "step_000120", written last (temp file + os.replace)

A step is used only when ``complete.json`` and every branch's ``metadata.json`` exist; anything
else is named in a warning and skipped, so a job killed mid-save resumes from the previous step.
Layer ``_extra_state`` objects (TransformerEngine FP8 metadata) are not saved: no FP8 is used.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from copd_mega.config import Config, save_config

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
COMPLETE_FILE = "complete.json"
LATEST_FILE = "latest"
TRAINER_DIR = "trainer_state"
OPTIM_FORMAT = "dp_reshardable"  # megatron default; resume keeps TP and PP
_COMMON = "__branch_common__"


class CheckpointError(RuntimeError):
    """A missing, incomplete or mismatched checkpoint; the message names the path and the fix."""


def _raise_everywhere(error: str | None) -> None:
    """Collective: raise CheckpointError on every rank if any rank found ``error`` (instead of
    leaving the others waiting in the next collective)."""
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def branch_dir_name(branch: str) -> str:
    return f"branch_{branch}"


def require_model_dir(path: str | Path) -> Path:
    """``path`` if it holds a finished model checkpoint, else a CheckpointError saying why."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(
            f"{p}: no such checkpoint directory; expected a model checkpoint made by save_model, "
            "`copd merge`, `copd import-hf`, or a step's branch_<name> folder"
        )
    if not (p / "metadata.json").is_file() or not (p / ".metadata").is_file():
        raise CheckpointError(
            f"{p} is not a complete model checkpoint: metadata.json/.metadata are missing (a save "
            "that did not finish, or not a torch_dist checkpoint). Use the previous step or re-save."
        )
    return p


# ----------------------------------------------------------------------------- sharded state


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


def _restore_adam_step(optimizer, loaded: Any) -> None:
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


def _train_sharded_state_dict(bm, topo, loading: bool) -> dict:
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


def _to_savable(nested: dict, topo) -> dict:
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


def _save_dir(path: Path, state: dict | None) -> None:
    """Collective over the world: ``state`` on the directory's branch, ``None`` elsewhere."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    dist_checkpointing.save(state or {}, str(path), sharded_strategy=strategy)


def _load_dir(path: Path, template: dict | None, topo) -> dict | None:
    """Collective over the world; returns ``template``'s structure filled from ``path``."""
    from megatron.core import dist_checkpointing

    # No access-integrity check: it wants one main replica per shard across the world, but
    # every branch may load the same checkpoint (a base model for all branches).
    if template is None:
        _raise_everywhere(None)
        dist_checkpointing.load({}, str(path), validate_access_integrity=False)
        return None
    flat = _to_savable(template, topo)
    _raise_everywhere(_shape_error(path, flat))
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


def _load_module(model: Any, loaded: dict, path: Path) -> None:
    missing, unexpected = _gpt(model).load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing {missing[:5]} / unexpected {unexpected[:5]}")


# ----------------------------------------------------------------------------- model checkpoints


def _write_sidecars(path: Path, cfg: Config, tokenizer: str | Path | None) -> None:
    save_config(cfg, path / CONFIG_FILE)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, path / TOKENIZER_FILE)


def save_model(
    path: str | Path,
    model: Any,
    topo,
    cfg: Config,
    *,
    branch: str | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write ``branch``'s weights (model only) to ``path``. Collective over the whole world.

    ``model``: a BranchModel, DDP or GPTModel. ``branch`` may be omitted when the job has one
    branch. ``config.yaml`` (and ``tokenizer.json`` when given) are written beside the weights.
    """
    names = [b.name for b in topo.layout.branches]
    if branch is None and len(names) > 1:
        raise ValueError(f"save_model: name the branch to write (branch=one of {names})")
    branch = branch or names[0]
    if branch not in names:
        raise ValueError(f"save_model: branch {branch!r} is not one of {names}")
    path = Path(path)
    if dist.get_rank() == 0:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        _write_sidecars(path, cfg, tokenizer)
    dist.barrier()
    mine = topo.branch.name == branch
    _save_dir(path, {"model": model_sharded_state_dict(model, topo)} if mine else None)
    return path


@torch.no_grad()
def load_model(path: str | Path, model: Any, topo, *, branch: str | None = None) -> None:
    """Load model weights from ``path`` into ``model`` on every rank (or only ``branch``'s).

    Collective over the world. Works at any TP/PP split. Given a BranchModel, the optimizer's
    fp32 main parameters are refreshed from the loaded weights.
    """
    path = require_model_dir(path)
    mine = branch is None or topo.branch.name == branch
    template = {"model": model_sharded_state_dict(model, topo)} if mine else None
    loaded = _load_dir(path, template, topo)
    if loaded is not None:
        _load_module(model, loaded["model"], path)
        if hasattr(model, "optimizer"):
            model.optimizer.reload_model_params()


# ----------------------------------------------------------------------------- step checkpoints


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _steps(root: Path) -> list[Path]:
    """Step directories under ``root``, oldest first."""
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def incomplete_reason(step_dir: Path) -> str | None:
    """Why ``step_dir`` cannot be resumed from, or None when it is complete."""
    marker = step_dir / COMPLETE_FILE
    if not marker.is_file():
        return f"no {COMPLETE_FILE} (the save did not finish)"
    for name in json.loads(marker.read_text())["branches"]:
        if not (step_dir / branch_dir_name(name) / "metadata.json").is_file():
            return f"{branch_dir_name(name)}/metadata.json is missing"
    if not (step_dir / TRAINER_DIR).is_dir():
        return f"{TRAINER_DIR}/ is missing"
    return None


def read_latest(root: str | Path) -> str | None:
    """The step directory name in ``root/latest``, or None."""
    p = Path(root) / LATEST_FILE
    return p.read_text().strip() if p.is_file() else None


def find_resume_step(root: str | Path) -> Path | None:
    """The step to resume from: ``latest`` if complete, else the newest complete step.

    Every skipped directory is named in a warning. Pure filesystem reads (no collectives).
    """
    root = Path(root)
    if not root.is_dir():
        return None
    latest = read_latest(root)
    steps = _steps(root)
    if latest is not None and not (root / latest).is_dir():
        warnings.warn(f"{root / LATEST_FILE} names {latest}, which does not exist", stacklevel=2)
        latest = None
    for step_dir in reversed(steps):
        if latest is not None and int(step_dir.name[5:]) > int(latest[5:]):
            warnings.warn(
                f"skipping checkpoint {step_dir}: newer than {root / LATEST_FILE} ({latest}), "
                "a save that never committed",
                stacklevel=2,
            )
            continue
        reason = incomplete_reason(step_dir)
        if reason is None:
            return step_dir
        warnings.warn(f"skipping incomplete checkpoint {step_dir}: {reason}", stacklevel=2)
    return None


def _prepare_step_dir(root: Path, step_dir: Path, names: list[str]) -> None:
    """Rank 0 clears a leftover folder of the same step and creates the layout. Collective."""
    error = None
    if dist.get_rank() == 0:
        is_latest = read_latest(root) == step_dir.name
        if step_dir.exists() and is_latest and incomplete_reason(step_dir) is None:
            error = (
                f"{step_dir} is the latest complete checkpoint and would be overwritten; resume "
                "from it (load_latest) or point the run at another directory"
            )
        elif step_dir.exists():
            warnings.warn(f"replacing leftover {step_dir}", stacklevel=3)
            shutil.rmtree(step_dir)
        if error is None:
            for name in names:
                (step_dir / branch_dir_name(name)).mkdir(parents=True)
            (step_dir / TRAINER_DIR).mkdir()
    _raise_everywhere(error)


def save_step(root: str | Path, step: int, bm, topo, cfg: Config, trainer_state: dict) -> Path:
    """Save every branch's model + optimizer, this rank's ``trainer_state`` and RNG for ``step``.

    Collective over the whole world. ``trainer_state`` (schedule, data cursor, step, ...) is
    torch-saved per global rank with :func:`capture_rng`. ``latest`` moves only after every rank
    finished; then complete steps beyond ``cfg.checkpoint.keep_last`` are deleted.
    """
    rng = capture_rng()
    root = Path(root)
    step_dir = root / step_dir_name(step)
    names = [b.name for b in topo.layout.branches]
    _prepare_step_dir(root, step_dir, names)
    state = _to_savable(_train_sharded_state_dict(bm, topo, loading=False), topo)
    for name in names:
        _save_dir(step_dir / branch_dir_name(name), state if topo.branch.name == name else None)
    rank = dist.get_rank()
    record = {"step": step, "branch": topo.branch.name, "rank": rank, "rng": rng}
    rank_file = step_dir / TRAINER_DIR / f"rank_{rank:05d}.pt"
    torch.save({**record, "trainer_state": trainer_state}, rank_file.with_suffix(".tmp"))
    os.replace(rank_file.with_suffix(".tmp"), rank_file)
    if rank == 0:
        save_config(cfg, step_dir / TRAINER_DIR / CONFIG_FILE)
        for name in names:
            save_config(cfg, step_dir / branch_dir_name(name) / CONFIG_FILE)
    dist.barrier()  # every rank's files are in place
    if rank == 0:
        lay = topo.layout
        info = {"step": step, "branches": names, "world_size": dist.get_world_size()}
        info["tp_pp_dp"] = [lay.tp, lay.pp, lay.dp]
        _atomic_write(step_dir / COMPLETE_FILE, json.dumps({**info, "time": time.time()}))
        _atomic_write(root / LATEST_FILE, step_dir.name + "\n")
        _apply_retention(root, step_dir, cfg.checkpoint.keep_last)
    dist.barrier()
    return step_dir


def _apply_retention(root: Path, newest: Path, keep_last: int) -> None:
    """Delete complete steps up to ``newest`` beyond the last ``keep_last``, and every incomplete
    step (leftovers of killed saves; this job is the only writer)."""
    if keep_last <= 0:
        return
    steps = _steps(root)
    complete = [s for s in steps if incomplete_reason(s) is None]
    upto = [s for s in complete if int(s.name[5:]) <= int(newest.name[5:])]
    keep = set(upto[-keep_last:]) | {s for s in complete if s not in upto}
    for s in steps:
        if s not in keep:
            (s / COMPLETE_FILE).unlink(missing_ok=True)  # a half-deleted step reads incomplete
            shutil.rmtree(s, ignore_errors=True)


@torch.no_grad()
def load_latest(root: str | Path, bm, topo, *, restore_rng_state: bool = True) -> dict | None:
    """Restore every branch's model + optimizer and this rank's RNG from the newest complete step.

    Collective over the world. Returns the ``trainer_state`` dict this rank saved, or None when
    ``root`` holds no complete step. Global rank 0 chooses the step (warning about skipped ones).
    """
    choice = [find_resume_step(root) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    step_dir = choice[0]
    if step_dir is None:
        return None
    names = [b.name for b in topo.layout.branches]
    saved = json.loads((step_dir / COMPLETE_FILE).read_text())
    if saved["branches"] != names:
        raise CheckpointError(
            f"{step_dir} holds branches {saved['branches']} but this run has {names}; resume with "
            "the same branches, or start fresh from a merged model via checkpoint.init_from"
        )
    split = [topo.layout.tp, topo.layout.pp, topo.layout.dp]
    if saved.get("tp_pp_dp", split) != split:
        raise CheckpointError(
            f"{step_dir} was saved at TP/PP/DP {saved['tp_pp_dp']}, this run is {split}; resume "
            "with the same parallel.tp/pp/dp, or start from a model checkpoint (init_from)"
        )
    rank_file = step_dir / TRAINER_DIR / f"rank_{dist.get_rank():05d}.pt"
    template = _train_sharded_state_dict(bm, topo, loading=True)
    for name in names:
        path = step_dir / branch_dir_name(name)
        loaded = _load_dir(path, template if topo.branch.name == name else None, topo)
        if loaded is not None:
            _load_module(bm, loaded["model"], path)
            bm.optimizer.load_state_dict(loaded["optimizer"])
            _restore_adam_step(bm.optimizer, loaded["optimizer"])
    record = torch.load(rank_file, weights_only=False)
    if restore_rng_state:
        restore_rng(record["rng"])
    return record["trainer_state"]


# ----------------------------------------------------------------------------- RNG


def _cuda_rng_usable() -> bool:
    from copd_mega.parallel.cpu import cpu_mode_active

    return torch.cuda.is_available() or cpu_mode_active()


def capture_rng() -> dict:
    """Python, numpy, torch CPU, CUDA (or the CPU layer's stand-in) and megatron's TP tracker."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if _cuda_rng_usable() else None,
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }


def restore_rng(state: dict) -> None:
    """Inverse of :func:`capture_rng`."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and _cuda_rng_usable():
        torch.cuda.set_rng_state(state["cuda"])
    if state["tracker"]:
        get_cuda_rng_tracker().set_states(state["tracker"])
