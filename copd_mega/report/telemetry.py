"""``copd report`` panels of the periodic telemetry (:mod:`copd_mega.trainer.periodic_eval`):
``heldout.png`` (each branch's ``eval/mean`` and the merged branches' ``eval/merged/mean``)
and ``probe_overlap.png`` / ``probe_delta.png`` (``probe/<s><-<t>/overlap`` and ``/delta``)."""

from __future__ import annotations

from pathlib import Path


def _lines(data: dict[str, list[dict]], metric: str) -> list[tuple[str, list, list]]:
    """(label, steps, values) per series of one panel."""
    out = []
    if metric == "heldout":
        for branch, rows in data.items():
            out.append((branch, *_series(rows, "eval/mean")))
        first = next(iter(data.values()), [])
        out.append(("merged", *_series(first, "eval/merged/mean")))
        return [(lab, xs, [100 * y for y in ys]) for lab, xs, ys in out if xs]
    for rows in data.values():
        keys = sorted({k for r in rows for k in r if k.startswith("probe/") and
                       k.endswith("/" + metric) and k.count("/") == 2})  # fmt: skip
        out += [(k.split("/")[1], *_series(rows, k)) for k in keys]
    return [s for s in out if s[1]]


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


PANELS = [
    ("heldout", "heldout.png", "held-out greedy accuracy (%), mean over capabilities"),
    ("overlap", "probe_overlap.png", "top-k overlap with each other branch (probe rollouts)"),
    ("delta", "probe_delta.png", "probe: mean log pi_teacher - log pi_student"),
]


def plot_telemetry(data: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """The panels that have data, as PNGs in ``out_dir``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, name, title in PANELS:
        lines = _lines(data, metric)
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for label, xs, ys in lines:
            ax.plot(xs, ys, marker=".", label=label)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)
    return written
