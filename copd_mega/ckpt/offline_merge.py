"""``copd merge --inputs A B [...] [--weights w ...] --out M`` is the weighted mean of checkpoints,
tensor by tensor (weights normalised to sum 1, uniform by default). An input may also be a run
directory (or its ``final/``) holding ``branch_<name>`` checkpoints: each branch is one input.
Optimizer tensors in step checkpoints are ignored; the config is copied from the first input.

This offline merge works on the **model weights** as saved (a bf16 checkpoint is averaged from
its bf16 weights, accumulated in fp32): the fp32 master copies and Adam moments of step
checkpoints are not merged. The in-place merge of a running job (``parallel/merge.py``) works on
the distributed optimizer's fp32 masters instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from copd_mega.ckpt.checkpoint import (
    CheckpointError,
    require_model_dir,
)
from copd_mega.ckpt.offline import CheckpointReader, TensorSpec, write_checkpoint
from copd_mega.parallel.merge import normalise_weights


def merge_weights(weights: list[float] | None, n: int) -> list[float]:
    """Normalise ``weights`` (uniform when None) to sum 1; errors name the fix."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"--weights has {len(weights)} values for {n} inputs; give one per input")
    return normalise_weights(weights, "--weights")


def expand_inputs(paths: list[str | Path]) -> list[Path]:
    """Model checkpoint directories; a run directory (or its ``final/``) expands to its branches."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "metadata.json").is_file():
            out.append(p)
            continue
        for base in (p, p / "final"):
            branches = sorted(d for d in base.glob("branch_*") if (d / "metadata.json").is_file())
            if branches:
                out += branches
                break
        else:
            out.append(require_model_dir(p))  # raises with the reason
    return out


def check_same_layout(readers: list[CheckpointReader]) -> None:
    """Every input must have the first input's keys, shapes and dtypes."""
    first = readers[0]
    for r in readers[1:]:
        for key in sorted(set(first.specs) ^ set(r.specs)):
            has, lacks = (first, r) if key in first.specs else (r, first)
            raise CheckpointError(
                f"{key} is in {has.path} but not in {lacks.path}: merge needs one model shape"
            )
        for key, spec in first.specs.items():
            if r.specs[key].shape != spec.shape:
                raise CheckpointError(
                    f"{key}: shape {spec.shape} in {first.path} but {r.specs[key].shape} in {r.path}"
                    " (different model or padded vocabulary): merge needs one model shape"
                )


def merge_checkpoints(
    inputs: list[str | Path],
    out: str | Path,
    weights: list[float] | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Write ``sum_i w_i * input_i`` (fp32 accumulation, first input's dtypes) to ``out``."""
    readers = [CheckpointReader(p) for p in expand_inputs(inputs)]
    if len(readers) < 2:
        raise ValueError(
            f"merge needs at least two checkpoints, got {[str(r.path) for r in readers]}"
        )
    check_same_layout(readers)
    ws = merge_weights(weights, len(readers))

    def produce(spec: TensorSpec, start: int, stop: int) -> torch.Tensor:
        acc = None
        for w, r in zip(ws, readers, strict=False):
            part = r.read({spec.key: (start, stop)})[spec.key].float() * w
            acc = part if acc is None else acc.add_(part)
        return acc

    first = readers[0]
    specs = list(first.specs.values())
    return write_checkpoint(
        out,
        specs,
        produce,
        first.config(),
        tokenizer=first.tokenizer,
        progress=progress,
        label="merge",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="copd merge", description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", nargs="+", required=True, help="checkpoints or run directories")
    ap.add_argument("--weights", nargs="+", type=float, default=None, help="one per checkpoint")
    ap.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        path = merge_checkpoints(args.inputs, args.out, args.weights, progress=not args.no_progress)
    except (CheckpointError, ValueError, FileExistsError) as e:
        print(f"copd merge: {e}")
        return 2
    print(f"merged {len(expand_inputs(args.inputs))} checkpoints into {path}")
    return 0
