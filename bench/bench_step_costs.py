"""The fixed costs of the step model's terms on this CPU, measured on one rank of a config's
model (whose FLOPs are negligible at the CPU study's size): one decode step of the sampler, one
micro-batch forward, one micro-batch forward + backward, one optimizer step, and one gloo
all-reduce between two local processes (this one and one it starts). Prints them and writes JSON that
``copd report scaling --predict --gpu cpu --cpu-costs FILE`` (and ``copd plan --predict --gpu
cpu --cpu-costs FILE``) uses in place of the layer-count estimate of launch/measure.py.

    .venv/bin/python bench/bench_step_costs.py --config configs/scaling_cpu.yaml --out costs.json

Each number is the median of ``--repeats`` timings after a warm-up call: the cost under the
machine's load at the time, which is printed beside them and which the step model takes as
the background its ranks share the cores with.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from copd_mega.config import load_config
from copd_mega.launch.measure import RunnableSampler, median_time
from copd_mega.models.branch import build_branch_model
from copd_mega.models.step import optimizer_step, prepare_for_training, run_microbatches
from copd_mega.parallel.dist import free_port, init_distributed
from copd_mega.parallel.topology import build_topology
from copd_mega.rl.rollout import MegatronSampler
from copd_mega.rl.sampling import SamplingParams


def best(fn, repeats: int) -> float:
    """The median of ``repeats`` timings after one warm-up call (launch/measure.py)."""
    return median_time(fn, repeats, warmup=True)


def loss(mb: dict, logits: torch.Tensor):
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), mb["labels"].reshape(-1), reduction="sum"
    )
    return nll, torch.tensor(mb["labels"].numel()), {"nll": nll.detach()}


def model_costs(cfg_path: str, repeats: int) -> dict:
    """Per-term fixed costs on one rank (world 1)."""
    init_distributed()
    one = ["parallel.tp=1", "parallel.pp=1", "parallel.dp=1", "schedule.mode=expert"]
    cfg = load_config(cfg_path, one)
    cfg.branches = cfg.branches[:1]
    topo = build_topology(cfg)
    bm = build_branch_model(cfg, topo)
    sampler = MegatronSampler(bm.model, topo, cfg, max_batch_size=1)
    prompt = [[3, 4, 5, 6]]

    def gen(n: int) -> None:
        sampler.generate(prompt, SamplingParams(max_new_tokens=n), seed=0)

    short, long = 2, 2 + 16
    decode_s = (best(lambda: gen(long), repeats) - best(lambda: gen(short), repeats)) / 16
    prepare_for_training(bm, topo)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 8))
    mb = {"tokens": tokens, "position_ids": torch.arange(8).unsqueeze(0),
          "labels": torch.roll(tokens, -1, 1)}  # fmt: skip
    fwd_s = best(lambda: run_microbatches(bm, topo, [mb], loss, forward_only=True), repeats)
    fwdbwd_s = best(lambda: run_microbatches(bm, topo, [mb], loss), repeats)
    opt_s = best(lambda: optimizer_step(bm), repeats)
    dist.destroy_process_group()
    return {"decode_step_s": decode_s, "forward_s": fwd_s, "forward_backward_s": fwdbwd_s,
            "optimizer_step_s": opt_s}  # fmt: skip


def _collective(rank: int, port: int, repeats: int) -> float:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    x = torch.zeros(1)
    calls = 100
    t = best(lambda: [dist.all_reduce(x) for _ in range(calls)], repeats) / calls
    dist.barrier()
    dist.destroy_process_group()
    return t


def collective_s(repeats: int) -> float:
    """One gloo all-reduce of one float between this process and one other."""
    port = free_port()
    peer = mp.get_context("spawn").Process(target=_collective, args=(1, port, repeats))
    peer.start()
    t = _collective(0, port, repeats)
    peer.join()
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/scaling_cpu.yaml")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", required=True, help="JSON path")
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1, as torchrun starts each rank of a multi-rank job)",
    )  # fmt: skip
    args = ap.parse_args()
    # The point of this bench: one rank's costs. More threads than a loaded machine can run
    # at once make tiny matmuls wait for descheduled threads (measured: 114 ms against 5 ms
    # for one forward of the CPU study's model at load 16 with 2 threads against 1).
    torch.set_num_threads(args.threads)
    with RunnableSampler() as beside:
        costs = model_costs(args.config, args.repeats)
        costs["collective_s"] = collective_s(args.repeats)
    costs["background_runnable"] = beside.background
    costs["load_average"] = os.getloadavg()[0]
    costs["config"] = args.config
    costs["threads"] = args.threads
    for k, v in costs.items():
        print(f"{k:>20}: {v * 1e3:.3f} ms" if k.endswith("_s") else f"{k:>20}: {v}")
    with open(args.out + ".tmp", "w") as f:
        json.dump(costs, f, indent=1)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
