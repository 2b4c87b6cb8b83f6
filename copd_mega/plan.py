"""``copd plan``: the rank layout for N ranks, with no processes and no GPUs.

The same text is printed by ``copd train`` on global rank 0 before any model is built, so a
dry run on a laptop shows exactly what the Slurm job will do.
"""

from __future__ import annotations

import argparse
import sys

from copd_mega.config import Config, ConfigError, load_config
from copd_mega.model import count_parameters
from copd_mega.parallel.topology import Layout, plan_layout


def _fmt_groups(groups: list[list[int]], limit: int = 4) -> str:
    shown = " ".join("[" + ",".join(map(str, g)) + "]" for g in groups[:limit])
    return shown + (f" ... (+{len(groups) - limit})" if len(groups) > limit else "")


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def memory_per_gpu_gib(cfg: Config, params: int) -> float:
    """Weights (model dtype) + fp32 grads on every rank, fp32 master + Adam moments over DP.

    Per rank the model holds params/(TP*PP); the distributed optimizer shards its 12 bytes per
    parameter (fp32 master, exp_avg, exp_avg_sq) over DP. Activations are not included.
    """
    p = cfg.parallel
    local = params / (p.tp * p.pp)
    weight_bytes = 4 if cfg.model.dtype == "fp32" else 2
    return local * (weight_bytes + 4 + 12 / p.dp) / 2**30


def format_layout(cfg: Config, layout: Layout) -> str:
    """Human-readable rank layout: branches, groups, peer groups, teaching edges, sizes."""
    p = cfg.parallel
    params = count_parameters(cfg)
    lines = [
        f"copd-mega layout: world {layout.world_size} = {len(layout.branches)} branches x "
        f"(TP{p.tp} x PP{p.pp} x DP{p.dp} = {layout.ranks_per_branch} ranks)",
        f"mode {cfg.schedule.mode}, teaching graph {cfg.teaching.graph}"
        + (f" (hub {cfg.teaching.hub})" if cfg.teaching.graph == "hub_spoke" else ""),
        f"model {cfg.model.family}: {_human(params)} parameters, "
        f"~{memory_per_gpu_gib(cfg, params):.3g} GiB per GPU for weights, grads and optimizer "
        "(activations excluded)",
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


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="copd plan", description=__doc__)
    ap.add_argument("--config", required=True, help="YAML config, e.g. configs/copd_8branch.yaml")
    ap.add_argument("--world-size", type=int, required=True, help="total ranks (GPUs)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        layout = plan_layout(cfg, args.world_size)
    except ConfigError as e:
        print(f"copd plan: {e}", file=sys.stderr)
        return 1
    print(format_layout(cfg, layout))
    return 0
