"""``copd plan``: the rank layout and the per-GPU memory plan for N ranks, with no processes
and no GPUs.

It runs ``validate.validate_job``, the same checks ``copd train`` runs at start-up, and the same
text is printed by ``copd train`` on global rank 0 before any model is built, so a dry run on a
laptop shows exactly what the Slurm job will do. With ``--gpu-memory-gb G`` it exits 1, in one
line naming the setting to change, when the memory plan (``copd_mega.launch.memory``) exceeds G GiB.
With ``--gpu NAME`` or ``--gpu-memory-gb`` it also prints the predicted generation time per
step for each engine, with every number it assumes (``copd_mega.launch.predict``).
"""

from __future__ import annotations

import argparse
import math
import sys

from copd_mega.config import Config, ConfigError, load_config
from copd_mega.launch.memory import GIB, fit_error, memory_parts, stage_params, vision_params
from copd_mega.launch.predict import add_args as add_predict_args
from copd_mega.launch.predict import format_generation
from copd_mega.launch.step_report import add_args as add_step_args
from copd_mega.launch.step_report import format_step_time
from copd_mega.launch.validate import start_line, validate_job
from copd_mega.models.gpt import count_parameters
from copd_mega.parallel.topology import Layout


def _fmt_groups(groups: list[list[int]], limit: int = 4) -> str:
    shown = " ".join("[" + ",".join(map(str, g)) + "]" for g in groups[:limit])
    return shown + (f" ... (+{len(groups) - limit})" if len(groups) > limit else "")


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _bytes(n: float) -> str:
    for unit, div in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:10.2f} {unit}"
    return f"{n:10.0f} B"


def format_memory(cfg: Config) -> list[str]:
    """The per-GPU memory plan as lines (``copd_mega.launch.memory`` states every formula)."""
    try:
        parts = memory_parts(cfg)
    except ConfigError as e:  # only when the prompt bound is unknown (not a training job)
        return [f"memory per GPU: unknown ({e})"]
    total = sum(x.bytes for x in parts)
    lines = ["memory per GPU (most loaded stage, upper bounds):"]
    lines += [f"  {x.name:<34}{_bytes(x.bytes)}" for x in parts]
    lines.append(f"  {'total':<34}{_bytes(total)}")
    return lines


def format_layout(cfg: Config, layout: Layout) -> str:
    """Human-readable rank layout: branches, groups, peer groups, teaching edges, sizes."""
    p = cfg.parallel
    params = count_parameters(cfg)
    lines = [
        f"copd-mega layout: world {layout.world_size} = {len(layout.branches)} branches x "
        f"(TP{p.tp} x PP{p.pp} x DP{p.dp} = {layout.ranks_per_branch} ranks)",
        start_line(cfg),
        f"mode {cfg.schedule.mode}, teaching graph {cfg.teaching.graph}"
        + (f" (hub {cfg.teaching.hub})" if cfg.teaching.graph == "hub_spoke" else ""),
        f"model {cfg.model.family}: {_human(params)} parameters"
        + (f" + vision {_human(vision_params(cfg))}" if cfg.vision.enabled else "")
        + f", {_human(stage_params(cfg))} per GPU; generation micro-batch "
        f"{cfg.rollout.max_batch_size} sequences",
        *format_memory(cfg),
    ]
    for b in layout.branches:
        lines.append(
            f"branch {b.index} {b.name!r} data={cfg.branches[b.index].data!r}: "
            f"ranks {b.first_rank}-{b.first_rank + b.size - 1}"
        )
        lines.append(f"  tp groups {_fmt_groups(b.tp_groups)}")
        lines.append(f"  pp groups {_fmt_groups(b.pp_groups)}")
        lines.append(f"  dp groups {_fmt_groups(b.dp_groups)}")
    lines.append(f"peer groups ({len(layout.peer_groups)}): {_fmt_groups(layout.peer_groups)}")
    edges = ", ".join(f"{s}<-{t}" for s, t in layout.edges) or "none"
    lines.append(f"teaching edges (student<-teacher): {edges}")
    return "\n".join(lines)


def check_plan_args(world_size: int, gpu_memory_gb: float | None) -> None:
    """``--world-size`` >= 1; ``--gpu-memory-gb``, when given, finite and > 0."""
    if world_size < 1:
        raise ConfigError(f"--world-size {world_size} must be >= 1: the total number of ranks "
                          "(GPUs), e.g. --world-size 8")  # fmt: skip
    if gpu_memory_gb is not None and not (math.isfinite(gpu_memory_gb) and gpu_memory_gb > 0):
        raise ConfigError(f"--gpu-memory-gb {gpu_memory_gb:g} must be a finite number of GiB > 0 "
                          "(e.g. 80 for an 80 GB GPU); leave it out to skip the check")  # fmt: skip


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="copd plan", description=__doc__)
    ap.add_argument("--config", required=True, help="YAML config, e.g. configs/copd_8branch.yaml")
    ap.add_argument("--world-size", type=int, required=True, help="total ranks (GPUs)")
    ap.add_argument(
        "--gpu-memory-gb", type=float, default=None,
        help="GPU memory in GiB (80 for an 80 GB GPU): exit 1 when the memory plan exceeds it",
    )  # fmt: skip
    add_predict_args(ap)
    add_step_args(ap)
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = ap.parse_args(argv)
    try:
        check_plan_args(args.world_size, args.gpu_memory_gb)
        cfg = load_config(args.config, args.overrides)
        layout = validate_job(cfg, args.world_size)  # exactly what `copd train` checks
    except ConfigError as e:
        print("copd plan: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    generation = []
    try:
        if (
            args.gpu or args.gpu_memory_gb is not None
        ) and args.gpu != "cpu":  # generation per engine
            generation = format_generation(cfg, layout, args)
        if args.predict:  # every phase of a step (copd_mega.launch.step_report)
            generation += format_step_time(cfg, args.world_size, layout.edges, args)
    except ValueError as e:
        print(f"copd plan: {e}", file=sys.stderr)
        return 1
    print("\n".join([format_layout(cfg, layout), *generation]))
    if args.gpu_memory_gb is not None:
        error = fit_error(cfg, memory_parts(cfg), args.gpu_memory_gb)
        if error:
            print(f"copd plan: {error}", file=sys.stderr)
            return 1
        print(f"fits --gpu-memory-gb {args.gpu_memory_gb:g}")
    return 0
