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

A step is used only when every file the loader reads is there and reads back with the size and
checksum recorded at save (``verify.incomplete_reason``); anything else is named in one line and
skipped, so a job killed mid-save, or a step damaged later, resumes from the previous step. A
failed save (a full disk) ends every rank with one line and removes the uncommitted folder.
Retention deletes nothing until a newer step is complete, and never deletes a committed step
that lacks files or does not read back (a damaged copy). Nothing is overwritten in place: a
step folder saved again is first renamed aside, a model directory is written as ``PATH.partial``
and swapped in.
Layer ``_extra_state`` objects (TransformerEngine FP8 metadata) are not saved: no FP8 is used.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from copd_mega.ckpt.rng_state import capture_rng, restore_rng
from copd_mega.ckpt.sharded_state import (
    CONFIG_FILE,
    CheckpointError,
    agreed_write,
    everywhere,
    load_dir,
    load_module,
    model_sharded_state_dict,
    restore_adam_step,
    save_dir,
    to_savable,
    train_sharded_state_dict,
)
from copd_mega.ckpt.verify import COMPLETE_FILE, MANIFEST_KEY, TRAINER_DIR, file_manifest
from copd_mega.ckpt.verify import incomplete_reason as incomplete_reason
from copd_mega.config import Config, save_config
from copd_mega.parallel import comm

TOKENIZER_FILE = "tokenizer.json"
LATEST_FILE = "latest"


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
    staged = path.with_name(f".{path.name}.partial")  # written beside, swapped in when complete
    leader = topo.rank == topo.branch.first_rank
    if leader:
        if staged.exists():
            shutil.rmtree(staged)  # a save that never finished
        staged.mkdir(parents=True)
        _write_sidecars(staged, cfg, tokenizer)
    comm.barrier(topo.branch_group)
    save_dir(staged, {"model": model_sharded_state_dict(model, topo)}, topo.branch_group)
    if leader:
        swap_in(staged, path)
    comm.barrier(topo.branch_group)
    return path


def swap_in(staged: Path, path: Path) -> None:
    """Replace folder ``path`` by the finished folder ``staged``: the old one is renamed aside
    first and deleted only after the new one is in place."""
    old = path.with_name(f".{path.name}.old")  # hidden: globs such as branch_* skip both
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(staged, path)
    shutil.rmtree(old, ignore_errors=True)


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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` beside ``path`` and swap it in (a reader sees the old or the new file)."""
    path = Path(path)
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


def _num(step_dir: Path) -> int:
    return int(step_dir.name[5:].split(".")[0])


def read_latest(root: str | Path) -> str | None:
    """The step directory name in ``root/latest``, or None."""
    p = Path(root) / LATEST_FILE
    return p.read_text().strip() if p.is_file() else None


def scan_steps(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """``(step to resume from, [(skipped step, why)])``: ``latest`` if complete, else the newest
    complete step not newer than ``latest``. Pure filesystem reads (no collectives)."""
    root = Path(root)
    if not root.is_dir():
        return None, []
    latest = read_latest(root)
    skipped: list[tuple[Path, str]] = []
    if latest is not None and not (root / latest).is_dir():
        skipped.append((root / LATEST_FILE, f"names {latest}, which does not exist"))
        latest = None
    for step_dir in reversed(_steps(root)):
        if latest is not None and _num(step_dir) > int(latest[5:]):
            skipped.append((step_dir, f"newer than {LATEST_FILE} ({latest}): never committed"))
            continue
        reason = incomplete_reason(step_dir)
        if reason is None:
            return step_dir, skipped
        skipped.append((step_dir, reason))
    return None, skipped


def find_resume_step(root: str | Path) -> Path | None:
    """The step to resume from (see :func:`scan_steps`); each skipped folder is named in one
    line on stderr, with the file that made it unusable."""
    chosen, skipped = scan_steps(root)
    then = f"resuming from {chosen.name}" if chosen is not None else "no step left to resume"
    for path, why in skipped:
        print(f"copd: skipping checkpoint {path}: {why}; {then}", file=sys.stderr, flush=True)
    return chosen


def _set_aside(step_dir: Path) -> Path:
    """Rename ``step_dir`` to ``<name>.replaced-<k>`` (deleted by retention once a complete step
    at least as new exists)."""
    k = 0
    while (aside := step_dir.with_name(f"{step_dir.name}.replaced-{k}")).exists():
        k += 1
    os.replace(step_dir, aside)
    return aside


def _prepare_step_dir(root: Path, step_dir: Path, names: list[str]) -> None:
    """Rank 0 sets a folder of the same step aside (never deletes it) and creates the layout."""
    if dist.get_rank() == 0:
        if step_dir.exists():
            aside = _set_aside(step_dir)
            warnings.warn(f"{step_dir} existed: kept as {aside} until this save completes",
                          stacklevel=3)  # fmt: skip
        for name in names:
            (step_dir / branch_dir_name(name)).mkdir(parents=True)
        (step_dir / TRAINER_DIR).mkdir()
    comm.barrier()


def save_failures(root: Path, step_dir: Path):
    """Collective over the world around a part of a save: if any rank failed (a full disk, an
    I/O error), every rank raises one CheckpointError naming it and rank 0 removes the
    uncommitted ``step_dir``; ``latest`` and every committed step stay as they were."""
    latest = read_latest(root) or "no step yet"

    def discard() -> None:
        (step_dir / COMPLETE_FILE).unlink(missing_ok=True)
        shutil.rmtree(step_dir, ignore_errors=True)
        (root / (LATEST_FILE + ".tmp")).unlink(missing_ok=True)
        asides = sorted(
            root.glob(f"{step_dir.name}.replaced-*"), key=lambda p: int(p.name.rsplit("-", 1)[1])
        )
        if asides:  # the copy this save set aside goes back in place
            os.replace(asides[-1], step_dir)

    kept = f"nothing was lost: {root / LATEST_FILE} still names {latest} (the partial " \
        f"{step_dir.name} was removed)"  # fmt: skip
    return agreed_write(step_dir, None, kept, discard)


def save_step(root: str | Path, step: int, bm, topo, cfg: Config, trainer_state: dict) -> Path:
    """Save every branch's model + optimizer, this rank's ``trainer_state`` and RNG for ``step``.

    Collective over the whole world; each branch writes its directory over its own group, all
    branches at once. ``trainer_state`` (schedule, data cursor, step, ...) is
    torch-saved per global rank with :func:`capture_rng`. ``latest`` moves only after every rank
    finished; then :func:`_apply_retention` removes what the new step makes redundant.
    ``cfg.debug.crash_in_save_at_step`` kills every rank after the weights are written (tests).
    """
    rng = capture_rng()
    root = Path(root)
    step_dir = root / step_dir_name(step)
    names = [b.name for b in topo.layout.branches]
    _prepare_step_dir(root, step_dir, names)
    with save_failures(root, step_dir):
        _write_rank_files(step_dir, step, bm, topo, cfg, trainer_state, rng)
    rank = dist.get_rank()
    with save_failures(root, step_dir):  # every rank's files are in place
        if rank == 0:
            lay = topo.layout
            info = {"step": step, "branches": names, "world_size": dist.get_world_size()}
            info["tp_pp_dp"] = [lay.tp, lay.pp, lay.dp]
            info[MANIFEST_KEY] = file_manifest(step_dir)  # sizes and checksums, read on resume
            write_text_atomic(step_dir / COMPLETE_FILE, json.dumps({**info, "time": time.time()}))
            write_text_atomic(root / LATEST_FILE, step_dir.name + "\n")
    if rank == 0:
        _apply_retention(root, step_dir, cfg.checkpoint.keep_last)
    comm.barrier()
    return step_dir


def _write_rank_files(step_dir: Path, step: int, bm, topo, cfg: Config, trainer_state: dict,
                      rng: dict) -> None:  # fmt: skip
    """This rank's part of a step: its branch's shards (over the branch group), its trainer
    state and RNG, and the config files of branch leaders and rank 0."""
    state = to_savable(train_sharded_state_dict(bm, topo, loading=False), topo)
    save_dir(step_dir / branch_dir_name(topo.branch.name), state, topo.branch_group)
    if cfg.debug.crash_in_save_at_step == step:
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection: a kill during the save
    rank = dist.get_rank()
    record = {"step": step, "branch": topo.branch.name, "rank": rank, "rng": rng}
    rank_file = step_dir / TRAINER_DIR / f"rank_{rank:05d}.pt"
    torch.save({**record, "trainer_state": trainer_state}, rank_file.with_suffix(".tmp"))
    os.replace(rank_file.with_suffix(".tmp"), rank_file)
    if rank == topo.branch.first_rank:  # every branch's leader, at the same time
        save_config(cfg, step_dir / branch_dir_name(topo.branch.name) / CONFIG_FILE)
    if rank == 0:
        save_config(cfg, step_dir / TRAINER_DIR / CONFIG_FILE)


def _apply_retention(root: Path, newest: Path, keep_last: int) -> list[Path]:
    """After ``newest`` was committed: delete complete steps older than it beyond the last
    ``keep_last`` (0 keeps all), folders of killed saves older than it, and set-aside copies of
    steps up to it. Returns what was deleted.

    Never deletes ``newest``, anything newer than it, or an older step that was committed but
    lacks files (a damaged copy whose weights may be intact: named in a warning instead), and
    deletes nothing at all unless ``newest`` itself is complete.
    """
    reason = incomplete_reason(newest)
    if reason is not None:
        warnings.warn(f"retention skipped: {newest} is not complete ({reason})", stacklevel=2)
        return []
    n = _num(newest)
    older = [s for s in _steps(root) if _num(s) < n]
    complete = [s for s in older if incomplete_reason(s) is None]
    doomed = complete[: max(len(complete) - (keep_last - 1), 0)] if keep_last > 0 else []
    for s in older:
        if not (s / COMPLETE_FILE).is_file():
            doomed.append(s)  # a save killed before it committed; a newer complete one exists
        elif s not in complete:
            warnings.warn(f"keeping damaged checkpoint {s} ({incomplete_reason(s)}): repair or "
                          "remove it by hand", stacklevel=2)  # fmt: skip
    doomed += [p for p in root.glob("step_*.replaced-*") if p.is_dir() and _num(p) <= n]
    for s in doomed:
        (s / COMPLETE_FILE).unlink(missing_ok=True)  # a half-deleted step reads incomplete
        shutil.rmtree(s, ignore_errors=True)
    return doomed


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
        raise everywhere(
            CheckpointError(
                f"{step_dir} holds branches {saved['branches']} but this run has {names}; resume with "
                "the same branches, or start fresh from a merged model via checkpoint.init_from"
            )
        )
    split = [topo.layout.tp, topo.layout.pp, topo.layout.dp]
    if saved.get("tp_pp_dp", split) != split:
        raise everywhere(
            CheckpointError(
                f"{step_dir} was saved at TP/PP/DP {saved['tp_pp_dp']}, this run is {split}; resume "
                "with the same parallel.tp/pp/dp, or start from a model checkpoint (init_from)"
            )
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
