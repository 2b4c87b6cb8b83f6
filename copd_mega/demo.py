"""``copd demo``: the embedded default job, end to end on CPU.

1. synthesise the built-in text capabilities and a tokenizer (``RUN/data``);
2. pretrain a tiny base to partial accuracy (``copd pretrain``, one process);
3. run CoPD with 2 branches on two different capabilities (``copd train`` under torchrun,
   one process per branch), merge them, evaluate base / each branch / merged on each
   capability and print the table;
4. run the experts for the same steps from the same base (``RUN/expert``, ``schedule.mode=
   expert``), merge and evaluate them;
5. draw the plots (``copd report``) into ``RUN/plots`` and print CoPD against the experts
   (``copd_mega.study.demo_table``); ``copd study`` gives every mode over seeds.
Each stage is a subprocess with its own process group; a stage that already finished (its
output exists) is skipped, so a re-run continues where an interrupted one stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from copd_mega.config import ConfigError, default_config_path, load_config, save_config
from copd_mega.parallel.dist import free_port
from copd_mega.study.demo_table import (
    STUDY_HINT,
    comparison_rows,
    expert_overrides,
)
from copd_mega.trainer.evaluate import format_table
from copd_mega.trainer.job import eval_caps


def _run(argv: list[str], what: str) -> None:
    print(f"\n=== {what}: {' '.join(argv)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.setdefault("WANDB_MODE", "disabled")
    result = subprocess.run(argv, env=env)
    if result.returncode != 0:
        raise SystemExit(f"copd demo: {what} failed with exit code {result.returncode}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="copd demo", description=__doc__)
    ap.add_argument("--out", default="runs/demo", help="run directory")
    ap.add_argument("--config", default=None, help="config (default: the embedded demo.yaml)")
    ap.add_argument("--no-experts", dest="experts", action="store_false",
                    help="skip the expert baseline (and the comparison with it)")  # fmt: skip
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = ap.parse_args(argv)
    run = Path(args.out).resolve()
    try:
        cfg = load_config(args.config or default_config_path(), [*args.overrides, f"run_dir={run}"])
    except ConfigError as e:
        print(f"copd demo: {e}", file=sys.stderr)
        return 1
    run.mkdir(parents=True, exist_ok=True)
    config = run / "config.yaml"
    save_config(cfg, config)
    py = sys.executable
    t0 = time.monotonic()
    base = run / "base"
    if not (base / "config.yaml").exists():
        _run([py, "-m", "copd_mega.cli", "pretrain", "--config", str(config)], "pretrain base")
    n = len(cfg.branches) * cfg.ranks_per_branch
    torchrun = [py, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
                f"--master-port={free_port()}", "-m", "copd_mega.cli"]  # fmt: skip
    resume = ["--resume"] if (run / "checkpoints" / "latest").exists() else []
    _run([*torchrun, "train", "--config", str(config), *resume,
          f"checkpoint.init_from={base}"], f"CoPD, {len(cfg.branches)} branches")  # fmt: skip
    compare = args.experts and len(cfg.branches) > 1
    if compare:
        torchrun[-3] = f"--master-port={free_port()}"
        _run([*torchrun, "train", "--config", str(config), "--resume=auto",
              f"checkpoint.init_from={base}", *expert_overrides(run)],
             f"experts, {len(cfg.branches)} branches, the same steps")  # fmt: skip
    _run([py, "-m", "copd_mega.cli", "report", str(run)], "plots")
    print(f"\ncopd demo finished in {time.monotonic() - t0:.0f}s; run directory {run}")
    if compare:
        print("\nheld-out greedy accuracy (%), CoPD against experts trained for the same steps\n"
              + format_table(comparison_rows(cfg, run), eval_caps(cfg)))  # fmt: skip
        print(f"\n{STUDY_HINT}")
    tables = [run / "eval.json", *([run / "expert" / "eval.json"] if compare else [])]
    print(f"  evaluation tables: {', '.join(map(str, tables))}; plots: {run / 'plots'}")
    return 0
