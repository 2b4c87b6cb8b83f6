"""Step-checkpoint save time against branch count, with the CPU time it costs.

Each branch saves over its own process group, so on hardware with a core (or GPU) per rank the
wall time of ``save_step`` should not grow with the branch count. On a machine with fewer cores
than ranks, the ranks share the cores: this prints, per branch count, the wall time of one
``save_step`` (median of ``--repeats``) and the CPU seconds all ranks spent in it together, so
``cpu / cores`` is the wall time the cores alone impose::

    .venv/bin/python bench/bench_checkpoint.py [--branches 1 2 4 8] [--config C] [--repeats 3]

Every branch count runs as one spawned gloo job (one rank per branch, the config's model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

NAMES = ["text", "image", "video", "chart", "geometry", "code", "science", "ocr"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--branches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--config", default="configs/scaling_cpu.yaml")
    ap.add_argument("--repeats", type=int, default=3, help="timed saves per branch count")
    return ap.parse_args()


def _rank(rank: int, n: int, port: int, config: str, repeats: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from copd_mega.ckpt.checkpoint import save_step
    from copd_mega.config import load_config
    from copd_mega.models.branch import build_branch_model
    from copd_mega.models.step import prepare_for_training
    from copd_mega.parallel import comm
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    spec = ", ".join(f'{{"name": "{b}", "data": "arith"}}' for b in NAMES[:n])
    cfg = load_config(config, [f"branches=[{spec}]", "teaching.hub=text", "checkpoint.keep_last=1"])
    init_distributed()
    topo = build_topology(cfg)
    bm = build_branch_model(cfg, topo)
    prepare_for_training(bm, topo)
    walls, cpus = [], []
    for step in range(repeats + 1):  # the first save is warm-up
        comm.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        save_step(os.path.join(tmp, "checkpoints"), step, bm, topo, cfg, {"step": step})
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if step:
            walls.append(max(comm.all_gather_object(wall)))
            cpus.append(sum(comm.all_gather_object(cpu)))
    if rank == 0:
        with open(os.path.join(tmp, "r.json"), "w") as f:
            json.dump({"wall": walls, "cpu": cpus}, f)
    comm.barrier()
    comm.destroy_process_group()


def main() -> None:
    a = parse_args()
    from copd_mega.parallel.dist import free_port

    cores = len(os.sched_getaffinity(0))
    print(f"cores: {cores}, load average: {os.getloadavg()}")
    print("branches  save wall (s)  cpu all ranks (s)  cpu / cores (s)")
    for n in a.branches:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_rank, args=(n, free_port(), a.config, a.repeats, tmp), nprocs=n)
            with open(os.path.join(tmp, "r.json")) as f:
                r = json.load(f)
        wall, cpu = statistics.median(r["wall"]), statistics.median(r["cpu"])
        print(f"{n:8d}  {wall:13.2f}  {cpu:17.2f}  {cpu / cores:15.2f}", flush=True)


if __name__ == "__main__":
    main()
