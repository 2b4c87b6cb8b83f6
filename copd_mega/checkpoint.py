"""Checkpoints: Megatron ``torch_dist`` directories, the per-step resume layout, offline access.

**One directory per branch, all at once.** Branches hold different weights under identical
Megatron keys, so each branch is written to its own directory, and each branch saves and loads
over its own process group (``topo.branch_group``): all branches write at the same time and the
save time does not grow with the branch count (``sharded_state.save_dir``). A branch's non-tensor
state (optimizer hyper-parameters, sharding type) is stored as one ``ShardedObject`` owned by the
branch's first rank. Each branch directory is a complete Megatron checkpoint on its own: it loads
at any TP/PP split (Megatron reshards; a padded vocabulary loads with ``allow_shape_mismatch``)
and the offline tools read it without a process group.

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
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from copd_mega.config import Config, save_config
from copd_mega.parallel import comm
from copd_mega.rng_state import capture_rng, restore_rng
from copd_mega.sharded_state import (
    CONFIG_FILE,
    CheckpointError,
    load_dir,
    load_module,
    model_sharded_state_dict,
    raise_everywhere,
    restore_adam_step,
    save_dir,
    to_savable,
    train_sharded_state_dict,
)

TOKENIZER_FILE = "tokenizer.json"
COMPLETE_FILE = "complete.json"
LATEST_FILE = "latest"
TRAINER_DIR = "trainer_state"


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
    """Write ``branch``'s weights (model only) to ``path``. Collective over that branch's ranks;
    every other rank returns at once, so saves of different branches run concurrently.

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
    if topo.branch.name != branch:
        return path
    if topo.rank == topo.branch.first_rank:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        _write_sidecars(path, cfg, tokenizer)
    comm.barrier(topo.branch_group)
    save_dir(path, {"model": model_sharded_state_dict(model, topo)}, topo.branch_group)
    return path


@torch.no_grad()
def load_model(path: str | Path, model: Any, topo, *, branch: str | None = None) -> None:
    """Load model weights from ``path`` into ``model`` on every rank (or only ``branch``'s).

    Collective over each loading branch's ranks (branches load at the same time). Works at any
    TP/PP split. Given a BranchModel, the optimizer's fp32 main parameters are refreshed from
    the loaded weights.
    """
    path = require_model_dir(path)
    if branch is not None and topo.branch.name != branch:
        return
    loaded = load_dir(path, {"model": model_sharded_state_dict(model, topo)}, topo)
    load_module(model, loaded["model"], path)
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
    raise_everywhere(error)


def save_step(root: str | Path, step: int, bm, topo, cfg: Config, trainer_state: dict) -> Path:
    """Save every branch's model + optimizer, this rank's ``trainer_state`` and RNG for ``step``.

    Collective over the whole world; each branch writes its directory over its own group, all
    branches at once. ``trainer_state`` (schedule, data cursor, step, ...) is
    torch-saved per global rank with :func:`capture_rng`. ``latest`` moves only after every rank
    finished; then complete steps beyond ``cfg.checkpoint.keep_last`` are deleted.
    """
    rng = capture_rng()
    root = Path(root)
    step_dir = root / step_dir_name(step)
    names = [b.name for b in topo.layout.branches]
    _prepare_step_dir(root, step_dir, names)
    state = to_savable(train_sharded_state_dict(bm, topo, loading=False), topo)
    save_dir(step_dir / branch_dir_name(topo.branch.name), state, topo.branch_group)
    rank = dist.get_rank()
    record = {"step": step, "branch": topo.branch.name, "rank": rank, "rng": rng}
    rank_file = step_dir / TRAINER_DIR / f"rank_{rank:05d}.pt"
    torch.save({**record, "trainer_state": trainer_state}, rank_file.with_suffix(".tmp"))
    os.replace(rank_file.with_suffix(".tmp"), rank_file)
    if rank == topo.branch.first_rank:  # every branch's leader, at the same time
        save_config(cfg, step_dir / branch_dir_name(topo.branch.name) / CONFIG_FILE)
    if rank == 0:
        save_config(cfg, step_dir / TRAINER_DIR / CONFIG_FILE)
    comm.barrier()  # every rank's files are in place
    if rank == 0:
        lay = topo.layout
        info = {"step": step, "branches": names, "world_size": dist.get_world_size()}
        info["tp_pp_dp"] = [lay.tp, lay.pp, lay.dp]
        _atomic_write(step_dir / COMPLETE_FILE, json.dumps({**info, "time": time.time()}))
        _atomic_write(root / LATEST_FILE, step_dir.name + "\n")
        _apply_retention(root, step_dir, cfg.checkpoint.keep_last)
    comm.barrier()
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

    Collective over the world (global rank 0 chooses the step, warning about skipped ones); each
    branch then loads its directory over its own group, all branches at once. Returns the
    ``trainer_state`` dict this rank saved, or None when ``root`` holds no complete step.
    """
    step_dir = comm.broadcast_object(find_resume_step(root) if dist.get_rank() == 0 else None)
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
    path = step_dir / branch_dir_name(topo.branch.name)
    loaded = load_dir(path, train_sharded_state_dict(bm, topo, loading=True), topo)
    load_module(bm, loaded["model"], path)
    bm.optimizer.load_state_dict(loaded["optimizer"])
    restore_adam_step(bm.optimizer, loaded["optimizer"])
    record = torch.load(rank_file, weights_only=False)
    if restore_rng_state:
        restore_rng(record["rng"])
    return record["trainer_state"]
