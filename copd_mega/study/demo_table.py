"""The comparison ``copd demo`` can afford: CoPD against experts trained for the same steps.

The demo's CoPD run is in ``RUN``; the expert baseline (every branch GRPO only, the same base,
data, seed and number of steps, ``schedule.mode=expert``) in ``RUN/expert``. The table puts the
experts (each in its own domain), the merged experts and CoPD (branches, merged) side by side,
every number read from the two runs' ``eval.json``. ``copd study`` runs every mode over seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

from copd_mega.config import Config
from copd_mega.launch.datasets import capabilities_of

STUDY_HINT = ("the full comparison (mixed, static OPD, MOPD too; mean ± std over seeds 1, 2, 3): "
              "copd study --modes copd,expert,mixed,static_opd,mopd --seeds 1,2,3 --out "
              "runs/study")  # fmt: skip


def expert_overrides(run: Path) -> list[str]:
    """The expert baseline of the demo's CoPD run: its own folder, no second base evaluation."""
    return [f"run_dir={run / 'expert'}", "schedule.mode=expert", "eval.base=false",
            "schedule.merge_every_cycle=false"]  # fmt: skip


def comparison_rows(cfg: Config, run: Path) -> dict[str, dict[str, float]]:
    """Table rows (model -> capability -> accuracy) from ``RUN/eval.json`` and
    ``RUN/expert/eval.json``; an expert shows only its own capabilities."""
    copd_eval = json.loads((run / "eval.json").read_text())
    expert_eval = json.loads((run / "expert" / "eval.json").read_text())
    rows: dict[str, dict[str, float]] = {}
    if "base" in copd_eval:
        rows["base"] = copd_eval["base"]
    for b in cfg.branches:
        own = capabilities_of(b.data)
        rows[f"expert {b.name} (own domain)"] = {
            c: v for c, v in expert_eval[f"branch {b.name}"].items() if c in own
        }
    rows["experts merged"] = expert_eval["merged"]
    for b in cfg.branches:
        rows[f"CoPD branch {b.name}"] = copd_eval[f"branch {b.name}"]
    rows["CoPD merged"] = copd_eval["merged"]
    return rows
