"""``copd report scaling RUN_DIR...``: step time, throughput and phase split against branch count.

Each RUN_DIR is one finished (or killed) ``copd train`` run. Its branch count is the number of
``RUN/metrics/<branch>.jsonl`` files; its ranks per branch (TP x PP x DP) come from the config
it saved (``RUN/final/model/config.yaml``, else the newest checkpoint's). The first step of every
run is warm-up (first calls compile and fill caches) and is left out of every number.

Per run, over the remaining steps of every branch:
  step time       mean ``time/step`` of a branch's step
  tokens/s/rank   a branch's trained tokens / its summed step time / its ranks (mean over branches)
  tokens/s        the same summed over branches: the job's training throughput
  phases          mean seconds per step in rollout, reward, teacher scoring, exchange, train,
                  merge (``schedule.merge_every_cycle``) and checkpoint; ``other`` is the rest
  exchange share  exchange time / step time
  save            mean seconds of one checkpoint save (over the steps that saved, every branch)
  step w/o save   step time less the checkpoint's share of it
The final merge after the last step is not in the metrics, so ``merge`` counts only merges
during training.

Prints the table, writes it as markdown (``--table``) and draws one PNG (``--png``) with step
time, tokens/s per rank, exchange share and checkpoint save time against branch count.

``copd report scaling --predict ...`` runs the step-time model instead
(``copd_mega.launch.scaling_predict``; ``--predict --help`` lists its options).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from copd_mega.config import ConfigError, load_config
from copd_mega.report.metrics import read_metrics

PHASES = ("rollout", "reward", "teacher", "exchange", "train", "merge", "checkpoint")


@dataclass
class RunSummary:
    """One run's scaling numbers (means over every branch's steps after the first)."""

    run_dir: str
    branches: int
    ranks_per_branch: int
    steps: int  # measured steps per branch
    step_time_s: float
    tokens_per_s_per_rank: float
    tokens_per_s: float
    phase_s: dict[str, float]  # phase -> mean seconds per step
    save_s: float = 0.0  # mean seconds of one checkpoint save (0: no save after warm-up)

    @property
    def world_size(self) -> int:
        return self.branches * self.ranks_per_branch

    @property
    def other_s(self) -> float:
        return max(self.step_time_s - sum(self.phase_s.values()), 0.0)

    @property
    def step_without_save_s(self) -> float:
        return self.step_time_s - self.phase_s["checkpoint"]

    @property
    def exchange_share(self) -> float:
        return self.phase_s["exchange"] / self.step_time_s if self.step_time_s > 0 else 0.0


def summarize(
    metrics: dict[str, list[dict]], ranks_per_branch: int, run_dir: str = ""
) -> RunSummary:
    """Scaling numbers of one run from its per-branch metric rows (``read_metrics`` output).

    Pure: ``metrics`` maps branch -> rows in step order. Raises ValueError when a branch has
    fewer than two steps (nothing is left once the warm-up step is dropped).
    """
    if not metrics:
        raise ValueError(f"{run_dir or 'run'}: no metrics; pass run directories of `copd train`")
    first = min(r["step"] for rows in metrics.values() for r in rows)
    per_branch, step_sum, phase_sum, rates = {}, 0.0, dict.fromkeys(PHASES, 0.0), []
    saves = []
    for branch, rows in metrics.items():
        kept = [
            r for r in rows if r["step"] != first and isinstance(r.get("time/step"), (int, float))
        ]
        if not kept:
            raise ValueError(
                f"{run_dir or 'run'}: branch {branch!r} has {len(rows)} step(s) and the first is "
                "warm-up; run at least 2 steps (schedule.cycles / rl_steps / opd_steps)"
            )
        per_branch[branch] = len(kept)
        seconds = sum(r["time/step"] for r in kept)
        step_sum += seconds
        for p in PHASES:
            phase_sum[p] += sum(float(r.get(f"time/{p}", 0.0)) for r in kept)
        saves += [float(r["time/checkpoint"]) for r in kept if r.get("time/checkpoint", 0) > 0]
        tokens = sum(float(r.get("train_tokens", 0.0)) for r in kept)
        rates.append(tokens / seconds if seconds > 0 else 0.0)
    n = sum(per_branch.values())
    return RunSummary(
        run_dir=run_dir,
        branches=len(metrics),
        ranks_per_branch=ranks_per_branch,
        steps=min(per_branch.values()),
        step_time_s=step_sum / n,
        tokens_per_s_per_rank=sum(rates) / len(rates) / ranks_per_branch,
        tokens_per_s=sum(rates),
        phase_s={p: phase_sum[p] / n for p in PHASES},
        save_s=sum(saves) / len(saves) if saves else 0.0,
    )


def saved_config_path(run_dir: str | Path) -> Path | None:
    """The config a run saved: its final model's, else the newest checkpoint's; None if neither."""
    run = Path(run_dir)
    final = run / "final" / "model" / "config.yaml"
    if final.is_file():
        return final
    saved = sorted((run / "checkpoints").glob("step_*/trainer_state/config.yaml"))
    return saved[-1] if saved else None


def summarize_run(run_dir: str | Path, ranks_per_branch: int | None = None) -> RunSummary:
    """Read a run directory and summarise it (``ranks_per_branch`` overrides the saved config)."""
    metrics = read_metrics(run_dir)
    if not metrics:
        raise ValueError(
            f"no metrics under {Path(run_dir) / 'metrics'}; pass the run directory of a "
            "`copd train` run (RUN_DIR, not RUN_DIR/metrics)"
        )
    if ranks_per_branch is None:
        path = saved_config_path(run_dir)
        if path is None:
            raise ValueError(
                f"{run_dir} holds no saved config (final/model/config.yaml or "
                "checkpoints/step_*/trainer_state/config.yaml), so its ranks per branch are "
                "unknown: pass --ranks-per-branch N (TP x PP x DP)"
            )
        ranks_per_branch = load_config(path).ranks_per_branch
    return summarize(metrics, ranks_per_branch, str(run_dir))


HEADER = (
    ["branches", "ranks", "steps", "step (s)", "tokens/s/rank", "tokens/s"]
    + [f"{p} (s)" for p in PHASES]
    + ["other (s)", "exchange share", "save (s)", "step w/o save (s)"]
)


def format_table(runs: list[RunSummary]) -> str:
    """A markdown table, one row per run in branch-count order."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---:|" * len(HEADER)]
    for r in sorted(runs, key=lambda r: (r.branches, r.run_dir)):
        cells = [str(r.branches), str(r.world_size), str(r.steps), f"{r.step_time_s:.3f}",
                 f"{r.tokens_per_s_per_rank:.1f}", f"{r.tokens_per_s:.1f}"]  # fmt: skip
        cells += [f"{r.phase_s[p]:.3f}" for p in PHASES]
        cells += [f"{r.other_s:.3f}", f"{100 * r.exchange_share:.1f}%", f"{r.save_s:.2f}"]
        cells.append(f"{r.step_without_save_s:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[RunSummary], path: str | Path) -> Path:
    """One PNG, four panels against branch count: step time stacked by phase, tokens/s per
    rank, exchange share of step time, seconds of one checkpoint save. Runs sit at evenly spaced positions labelled by count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(runs, key=lambda r: (r.branches, r.run_dir))
    xs = list(range(len(runs)))
    fig, (ax_t, ax_r, ax_x, ax_s) = plt.subplots(1, 4, figsize=(17, 3.8))
    bottom = [0.0] * len(runs)
    for name in (*PHASES, "other"):
        ys = [r.other_s if name == "other" else r.phase_s[name] for r in runs]
        if any(ys):
            ax_t.bar(xs, ys, bottom=bottom, label=name, width=0.6)
            bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax_t.legend(fontsize=7, ncol=2)
    ax_r.plot(xs, [r.tokens_per_s_per_rank for r in runs], marker="o")
    ax_x.plot(xs, [100 * r.exchange_share for r in runs], marker="o")
    ax_s.plot(xs, [r.save_s for r in runs], marker="o")
    titles = ("mean step time by phase (s)", "tokens/s per rank", "exchange share of step time (%)",
              "one checkpoint save (s)")  # fmt: skip
    for ax, title in zip((ax_t, ax_r, ax_x, ax_s), titles, strict=True):
        ax.set_xticks(xs, [str(r.branches) for r in runs])
        ax.set_xlabel("branches")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="copd report scaling", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one run per branch count")
    ap.add_argument("--table", help="markdown table path (default: <common dir>/scaling.md)")
    ap.add_argument("--png", help="plot path (default: <common dir>/scaling.png)")
    ap.add_argument("--ranks-per-branch", type=int, help="TP x PP x DP when no config was saved")
    args = ap.parse_args(argv)
    try:
        runs = [summarize_run(d, args.ranks_per_branch) for d in args.run_dirs]
    except (ValueError, ConfigError) as e:
        print(f"copd report scaling: {e}", file=sys.stderr)
        return 1
    common = Path(os.path.commonpath([os.path.abspath(d) for d in args.run_dirs]))
    table = format_table(runs)
    table_path = Path(args.table or common / "scaling.md")
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(table + "\n")
    png = plot(runs, args.png or common / "scaling.png")
    print(table)
    print(f"\ntable: {table_path}\nplot: {png}")
    return 0
