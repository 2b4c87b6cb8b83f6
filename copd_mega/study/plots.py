"""The plots of ``copd study``: held-out accuracy and cross-branch overlap over training, one
line per mode (the mean over seeds), from the runs' metrics."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from copd_mega.config import Config
from copd_mega.report.metrics import read_metrics
from copd_mega.trainer.job import eval_caps


def caps_of(cfg: Config) -> list[str]:
    """The capabilities the study's table and plots cover (the runs' evaluation set)."""
    return eval_caps(cfg)


def curves(run_dir: Path, branch_keys: list[tuple[str, str]]) -> dict[int, float]:
    """step -> mean over ``(branch, key)`` pairs present in that step's rows."""
    data = read_metrics(run_dir) if (run_dir / "metrics").is_dir() else {}
    acc: dict[int, list[float]] = {}
    for branch, key in branch_keys:
        for r in data.get(branch, []):
            if isinstance(r.get(key), (int, float)):
                acc.setdefault(r["step"], []).append(r[key])
    return {s: statistics.fmean(v) for s, v in sorted(acc.items())}


def save_png(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)


def final_model_keys(run, cfg: Config, cap: str) -> list[tuple[str, str]]:
    """Where the final model's periodic accuracy on ``cap`` is logged: the merged branches for
    copd/expert, the one branch for mixed, the student for static_opd/mopd."""
    if run.mode in ("copd", "expert"):
        return [(cfg.branch_names[0], f"eval/merged/{cap}")]
    if run.mode == "mixed":
        return [("mixed", f"eval/{cap}")]
    return [(run.student, f"eval/{cap}")]


def _over_seeds(per_seed: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    """Steps every seed logged, and the mean over seeds there."""
    steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
    return steps, [statistics.fmean(c[s] for c in per_seed) for s in steps]


def _groups(runs) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in runs:
        if not r.same_as:
            out.setdefault(r.label, []).append(r)
    return out


def plot_curves(out: Path, cfg: Config, runs) -> list[Path]:
    """Write ``plots/accuracy.png`` (a panel per capability and the mean) and
    ``plots/overlap.png``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = caps_of(cfg)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, len(caps) + 1, figsize=(4.2 * (len(caps) + 1), 3.8), squeeze=False)
    for label, group in _groups(runs).items():
        per_cap = []
        for cap in caps:
            xs, ys = _over_seeds([curves(r.path, final_model_keys(r, cfg, cap)) for r in group])
            per_cap.append(dict(zip(xs, ys, strict=True)))
        for ax, c in zip(axes[0], per_cap, strict=False):
            if c:
                ax.plot(list(c), [100 * v for v in c.values()], marker=".", label=label)
        xs, ys = _over_seeds(per_cap)
        if xs:
            axes[0][-1].plot(xs, [100 * v for v in ys], marker=".", label=label)
    for ax, title in zip(axes[0], [*caps, "mean over capabilities"], strict=True):
        ax.set_title(f"held-out accuracy (%): {title}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, plots / "accuracy.png")
    plt.close(fig)
    written.append(plots / "accuracy.png")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, group in _groups(runs).items():
        names = ["mixed"] if group[0].mode == "mixed" else cfg.branch_names
        xs, ys = _over_seeds([curves(r.path, [(b, "probe/overlap") for b in names])
                              for r in group])  # fmt: skip
        if xs:
            ax.plot(xs, ys, marker=".", label=label)
    ax.set_title(f"top-{cfg.opd.top_k} overlap between branches (on-policy probe)", fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, plots / "overlap.png")
    plt.close(fig)
    written.append(plots / "overlap.png")
    return written
