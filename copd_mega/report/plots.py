"""``copd report RUN_DIR``: PNG plots of reward, accuracy, overlap and delta per branch over steps.

``copd report scaling RUN_DIR...`` is in :mod:`copd_mega.report.scaling`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from copd_mega.report.metrics import read_metrics
from copd_mega.report.scaling import main as scaling_main
from copd_mega.report.telemetry import plot_telemetry

PANELS = [
    ("reward", "mean reward (native batch)"),
    ("accuracy", "accuracy (native batch)"),
    ("overlap", "top-10 overlap with teacher (OPD steps)"),
    ("delta", "mean log pi_teacher - log pi_student"),
]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a scalar, skipping steps that lack it."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def edge_keys(rows: list[dict], metric: str) -> list[str]:
    """Per-edge keys ``edge/<student><-<teacher>/<metric>`` present in the rows."""
    keys = {k for r in rows for k in r if k.startswith("edge/") and k.endswith("/" + metric)}
    return sorted(keys)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw one PNG per panel under RUN/plots; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_metrics(run_dir)
    if not data:
        raise FileNotFoundError(
            f"no metrics under {Path(run_dir) / 'metrics'}; pass the run directory of a "
            "`copd train` or `copd demo` run"
        )
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title in PANELS:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        drawn = 0
        for branch, rows in data.items():
            keys = edge_keys(rows, key) if key in ("overlap", "delta") else [key]
            for k in keys:
                xs, ys = series(rows, k)
                if xs:
                    label = branch if k == key else k.split("/")[1]
                    ax.plot(xs, ys, marker=".", label=label)
                    drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / f"{key}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written + plot_telemetry(data, out_dir)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "scaling":
        return scaling_main(argv[1:])
    ap = argparse.ArgumentParser(prog="copd report", description=__doc__)
    ap.add_argument("run_dir")
    args = ap.parse_args(argv)
    try:
        paths = plot_run(args.run_dir)
    except FileNotFoundError as e:
        print(f"copd report: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0
