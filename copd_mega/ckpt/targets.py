"""Which model checkpoint a user means by a run directory, a step, ``latest`` or a model folder.

``copd export-hf --ckpt X [--branch NAME]`` accepts:

- a model checkpoint (``RUN/final/model``, ``RUN/final/branch_<name>``, a step's
  ``branch_<name>``, a ``copd merge`` or ``copd import-hf`` output): itself;
- a run directory: its merged model ``RUN/final/model``, or with ``--branch NAME``
  ``RUN/final/branch_NAME`` (a run that has not finished: that branch in its newest complete
  step);
- a step folder ``RUN/checkpoints/step_N``, or ``RUN/checkpoints/latest`` (the step it names):
  steps hold one folder per branch and no merged model, so the branch named by ``--branch`` (the
  only one of a one-branch run without it). To export the merged model of a step, merge its
  branches first (``copd merge --inputs STEP --out M``).

Anything else is a one-line CheckpointError listing what the path holds to choose from.
Pure filesystem reads.
"""

from __future__ import annotations

from pathlib import Path

from copd_mega.ckpt.checkpoint import scan_steps
from copd_mega.ckpt.sharded_state import CheckpointError
from copd_mega.ckpt.verify import COMPLETE_FILE, TRAINER_DIR, incomplete_reason


def _is_model(p: Path) -> bool:
    return (p / "metadata.json").is_file() and (p / ".metadata").is_file()


def _branches(folder: Path) -> list[str]:
    return sorted(d.name[7:] for d in folder.glob("branch_*") if _is_model(d))


def _is_step(p: Path) -> bool:
    return (p / COMPLETE_FILE).is_file() or (p / TRAINER_DIR).is_dir()


def _from_step(step: Path, branch: str | None) -> Path:
    reason = incomplete_reason(step)
    if reason is not None:
        raise CheckpointError(f"{step} is not a usable step checkpoint: {reason}; export "
                              "another step (RUN/checkpoints/step_*)")  # fmt: skip
    names = _branches(step)
    if branch is None and len(names) == 1:
        return step / f"branch_{names[0]}"
    if branch is not None and branch in names:
        return step / f"branch_{branch}"
    choices = " or ".join(f"--branch {n}" for n in names)
    why = f"has no branch {branch!r}" if branch else "holds one folder per branch, no merged model"
    raise CheckpointError(f"{step} {why}: pass {choices}, or merge its branches first "
                          f"(copd merge --inputs {step} --out M) and export M")  # fmt: skip


def _from_run(run: Path, branch: str | None) -> Path:
    final = run / "final"
    if branch is None and _is_model(final / "model"):
        return final / "model"
    if branch is not None and _is_model(final / f"branch_{branch}"):
        return final / f"branch_{branch}"
    step, _ = scan_steps(run / "checkpoints")
    if branch is not None and step is not None and branch in _branches(step):
        return step / f"branch_{branch}"
    names = sorted(set(_branches(final)) | set(_branches(step) if step is not None else []))
    where = "no merged model (final/model: the run has not finished)" if branch is None else (
        f"no branch {branch!r}")  # fmt: skip
    if not names:
        raise CheckpointError(f"{run} holds {where} and no branch checkpoint to export; "
                              "finish or resume the run first")  # fmt: skip
    of = f" ({step.name})" if step is not None and not _branches(final) else ""
    choices = " or ".join(f"--branch {n}" for n in names)
    raise CheckpointError(f"{run} holds {where}: pass {choices} to export that branch{of}")


def resolve_model_dir(path: str | Path, branch: str | None = None) -> Path:
    """The model checkpoint folder ``path`` (and ``branch``) mean; see the module docstring."""
    p = Path(path)
    if p.is_file():  # RUN/checkpoints/latest: a file holding the step's name
        name = p.read_text().strip()
        if not (name.startswith("step_") and (p.parent / name).is_dir()):
            raise CheckpointError(f"{p} is a file, not a checkpoint (it names {name[:40]!r}, "
                                  "which is no step folder beside it); pass a run, a step or a "
                                  "model directory")  # fmt: skip
        return _from_step(p.parent / name, branch)
    if _is_model(p):
        if branch is not None and p.name != f"branch_{branch}":
            raise CheckpointError(f"{p} is one model checkpoint; --branch applies to a run "
                                  "directory or a step: drop --branch, or pass the run")  # fmt: skip
        return p
    if _is_step(p):
        return _from_step(p, branch)
    if (p / "final").is_dir() or (p / "checkpoints").is_dir():
        return _from_run(p, branch)
    return p  # the reader names what is missing
