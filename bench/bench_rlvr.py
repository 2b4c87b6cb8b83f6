"""GRPO on one capability: held-out accuracy of the base and after RLVR, and the time taken.

Runs ``copd pretrain`` then ``copd train`` (mode expert, one branch) with
``configs/tiny_rlvr.yaml`` on CPU and prints base accuracy, trained accuracy, the gain in points
and the wall time of each stage, side by side from one run.

    python bench/bench_rlvr.py [--out runs/bench_rlvr] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(argv: list[str]) -> float:
    t0 = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    subprocess.run(argv, check=True, env=env)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/bench_rlvr")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny_rlvr.yaml"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    common = ["--config", args.config, f"run_dir={out}", *args.overrides]
    cli = [sys.executable, "-m", "copd_mega.cli"]
    t_pre = run([*cli, "pretrain", *common])
    t_rl = run([*cli, "train", "--retrain", *common, f"checkpoint.init_from={out / 'base'}"])
    table = json.loads((out / "eval.json").read_text())
    final = next(k for k in table if k.startswith("final"))
    print("\ncapability   base %   after GRPO %   gain (points)")
    for cap, base in table["base"].items():
        after = table[final][cap]
        print(f"{cap:<12}{100 * base:7.1f}{100 * after:15.1f}{100 * (after - base):+16.1f}")
    print(f"time: pretrain {t_pre:.0f}s, GRPO {t_rl:.0f}s, total {t_pre + t_rl:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
