"""``copd report scaling --predict``: the step-time model (:mod:`copd_mega.launch.step_time`)
against branch count, and beside measured runs.

Without run directories: for each B of ``--branches`` and each teaching graph (pairwise,
hub-and-spoke with the config's first branch as hub), the config with B branches (its own
branches cycled, each keeping its TP x PP x DP; one branch runs GRPO alone) is predicted on
``--gpu``: the mean step of the slowest branch over one cycle, per phase. For hub-and-spoke it
also prints how long the spokes wait for the hub inside the exchange (the hub rolls out on B-1
spokes' prompts and scores B-1 spokes' rollouts) and what a load-balanced hub buys: the hub
with k x ``parallel.dp`` replicas, k raised through :data:`BALANCE_DP` while each step up
shortens the step by more than 1% (k = 1 when none does), its step and GPUs. The hub counts as the bottleneck where the spokes wait more than
:data:`HUB_BOUND_SHARE` of the step.

With run directories (``copd report scaling --predict --gpu cpu RUN_DIR...``): each run's saved
config predicted on this machine (measured) beside its measured phase means
(:func:`copd_mega.report.scaling.summarize_run`, first step left out), with the error.
Writes a markdown table (``--table``) and a PNG (``--png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from copd_mega.config import Config, ConfigError, load_config
from copd_mega.launch.flops import token_cost
from copd_mega.launch.measure import measure_cpu
from copd_mega.launch.predict import add_args as add_gen_args
from copd_mega.launch.step_report import add_args as add_step_args
from copd_mega.launch.step_report import describe, make_setting
from copd_mega.launch.step_time import PHASES, Setting, predict_run
from copd_mega.launch.validate import prompt_positions_bound, schedule_plan
from copd_mega.parallel.topology import teaching_edges
from copd_mega.report.scaling import saved_config_path, summarize_run

HUB_BOUND_SHARE = 0.10
BALANCE_DP = (2, 4, 8)
GRAPHS = ("pairwise", "hub_spoke")


def with_branches(cfg: Config, n: int, graph: str) -> Config:
    """``cfg`` with ``n`` branches (its own, cycled; copies renamed ``<name>_<i>``), ``graph``
    with the first branch as hub; one branch runs GRPO alone (``schedule.mode=expert``)."""
    base = cfg.branches
    out = []
    for i in range(n):
        b = base[i % len(base)]
        out.append(dataclasses.replace(b, name=b.name if i < len(base) else f"{b.name}_{i}"))
    teaching = dataclasses.replace(cfg.teaching, graph=graph, hub=out[0].name)
    sched = dataclasses.replace(cfg.schedule, mode="expert" if n == 1 else cfg.schedule.mode)
    return dataclasses.replace(cfg, branches=out, teaching=teaching, schedule=sched)


def branch_means(cfg: Config, s: Setting, skip_first: bool) -> dict[str, dict[str, float]]:
    """Mean seconds per phase per branch over the run's steps (or its first cycle)."""
    t = cfg.teaching
    edges = teaching_edges(cfg.branch_names, t.graph, t.hub)
    steps = schedule_plan(cfg, edges)
    if not skip_first:  # a projection: one cycle stands for all
        steps = [st for st in steps if st.cycle == steps[0].cycle]
    c = token_cost(cfg, cfg.parallel.tp)
    return predict_run(cfg, s, c, steps, prompt_positions_bound(cfg), skip_first)


@dataclass
class Point:
    """One projected (graph, B): the slowest branch's mean phases and what the hub costs."""

    graph: str
    branches: int
    gpus: int
    phase_s: dict[str, float]
    hub_wait_s: float = 0.0  # a spoke's mean wait for the hub inside the exchange
    balanced_k: int = 1  # hub DP multiple that balances it
    balanced_gpus: int = 0
    balanced_step_s: float = 0.0

    @property
    def step_s(self) -> float:
        return sum(self.phase_s.values())


def project(cfg: Config, n: int, graph: str, args: argparse.Namespace, hw=None) -> Point:
    """The predicted mean step of ``cfg`` with ``n`` branches on ``graph`` (module docstring)."""
    c = with_branches(cfg, n, graph)
    ranks = cfg.ranks_per_branch
    s = make_setting(c, n * ranks, args, hw)
    means = branch_means(c, s, skip_first=False)
    slow = max(means.values(), key=lambda m: sum(m.values()))
    point = Point(graph, n, n * ranks, slow, balanced_gpus=n * ranks, balanced_step_s=0.0)
    point.balanced_step_s = point.step_s
    if graph != "hub_spoke" or n < 2:
        return point
    hub, spoke = means[c.branch_names[0]], means[c.branch_names[1]]
    point.hub_wait_s = max(spoke["exchange"] - hub["exchange"], 0.0)
    for k in BALANCE_DP:  # more hub DP while it buys more than 1%
        gpus = (n + k - 1) * ranks
        bal = dataclasses.replace(s, world=gpus, dp_of={c.branch_names[0]: cfg.parallel.dp * k})
        step = max(sum(m.values()) for m in branch_means(c, bal, False).values())
        if step < point.balanced_step_s * 0.99:
            point.balanced_k, point.balanced_gpus, point.balanced_step_s = k, gpus, step
    return point


def projection_table(points: list[Point]) -> str:
    """Markdown: one row per (graph, B)."""
    head = ["graph", "branches", "GPUs", *[f"{p} (s)" for p in PHASES], "step (s)",
            "spokes wait for hub (s)", "hub-bound", "balanced hub: DP x", "GPUs", "step (s)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for p in points:
        hubby = p.graph == "hub_spoke" and p.branches > 1
        bound = p.hub_wait_s > HUB_BOUND_SHARE * p.step_s
        cells = [p.graph, str(p.branches), str(p.gpus)]
        cells += [f"{p.phase_s[k]:.1f}" for k in PHASES] + [f"{p.step_s:.1f}"]
        cells += ([f"{p.hub_wait_s:.1f}", "yes" if bound else "no", str(p.balanced_k),
                   str(p.balanced_gpus), f"{p.balanced_step_s:.1f}"] if hubby else ["-"] * 5)  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_projection(points: list[Point], path: Path) -> Path:
    """Two panels against B: hub-and-spoke step by phase (bars) with the balanced hub's step
    (line); pairwise against hub-and-spoke step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hs = [p for p in points if p.graph == "hub_spoke"]
    pw = [p for p in points if p.graph == "pairwise"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    xs = list(range(len(hs)))
    bottom = [0.0] * len(hs)
    for name in PHASES:
        ys = [p.phase_s[name] for p in hs]
        if any(ys):
            ax.bar(xs, ys, bottom=bottom, label=name, width=0.6)
            bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.plot(xs, [p.balanced_step_s for p in hs], "k--o", label="balanced hub")
    ax.set_title("hub-and-spoke: slowest branch's step by phase (s)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax2.plot(xs, [p.step_s for p in hs], marker="o", label="hub-and-spoke")
    ax2.plot(xs, [p.step_s for p in pw], marker="s", label="pairwise")
    ax2.plot(xs, [p.balanced_step_s for p in hs], "k--", label="hub-and-spoke, balanced hub")
    ax2.set_yscale("log")
    ax2.set_title("step time (s)", fontsize=10)
    ax2.legend(fontsize=8)
    for a in (ax, ax2):
        a.set_xticks(xs, [str(p.branches) for p in hs])
        a.set_xlabel("branches")
        a.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def validation_table(run_dirs: list[str], args: argparse.Namespace, hw=None) -> str:
    """Markdown: per run, predicted / measured seconds per phase and the step, with the error
    of the step ((predicted - measured) / measured). ``hw``: measured CPU (``--gpu cpu``)."""
    head = ["run", "branches", "TPxPPxDP", "ranks"]
    head += [f"{p} pred / meas (s)" for p in PHASES] + ["step pred / meas (s)", "step error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    errors = []
    for run in run_dirs:
        path = saved_config_path(run)
        if path is None:
            raise ValueError(f"{run} holds no saved config; pass finished `copd train` runs")
        cfg = load_config(path)
        meas = summarize_run(run, cfg.ranks_per_branch)
        world = len(cfg.branches) * cfg.ranks_per_branch
        means = branch_means(cfg, make_setting(cfg, world, args, hw), skip_first=True)
        pred = {p: sum(m[p] for m in means.values()) / len(means) for p in PHASES}
        step = sum(pred.values())
        p = cfg.parallel
        cells = [Path(run).name, str(len(cfg.branches)), f"{p.tp}x{p.pp}x{p.dp}", str(world)]
        cells += [f"{pred[k]:.3f} / {meas.phase_s[k]:.3f}" for k in PHASES]
        err = (step - meas.step_time_s) / meas.step_time_s
        cells += [f"{step:.3f} / {meas.step_time_s:.3f}", f"{100 * err:+.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
        errors.append(abs(err))
    lines.append(f"\nstep error: mean |predicted - measured| / measured {100 * sum(errors) / len(errors):.0f}%, "
                 f"largest {100 * max(errors):.0f}% over {len(errors)} run(s)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="copd report scaling --predict", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    ap.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="measured runs to compare")
    ap.add_argument("--config", default="configs/copd_8branch.yaml", help="job to project")
    ap.add_argument("--branches", default="1,2,4,8,16,32,64", help="branch counts to project")
    ap.add_argument("--table", help="markdown table path (default: none)")
    ap.add_argument("--png", help="plot path of the projection (default: none)")
    add_gen_args(ap)
    add_step_args(ap)
    args = ap.parse_args(argv)
    try:
        hw = None
        if args.gpu == "cpu":
            cfg0 = load_config(args.config) if not args.run_dirs else None
            m = (cfg0 or load_config(saved_config_path(args.run_dirs[0]))).model
            hw = measure_cpu(m.hidden_size, m.num_attention_heads, m.ffn_hidden_size)
        if args.run_dirs:
            cfg = load_config(saved_config_path(args.run_dirs[0]))
            table = validation_table(args.run_dirs, args, hw)
            head = describe(make_setting(cfg, cfg.ranks_per_branch, args, hw))
        else:
            cfg = load_config(args.config)
            counts = [int(x) for x in args.branches.split(",")]
            points = [project(cfg, n, g, args, hw) for g in GRAPHS for n in counts]
            table = projection_table(points)
            head = describe(make_setting(cfg, cfg.ranks_per_branch, args, hw))
            if args.png:
                print(f"plot: {plot_projection(points, Path(args.png))}")
    except (ValueError, ConfigError, TypeError) as e:
        print(f"copd report scaling --predict: {e}", file=sys.stderr)
        return 1
    text = "assumptions (per rank):\n" + "\n".join(head) + "\n\n" + table
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(text + "\n")
    print(text)
    return 0
