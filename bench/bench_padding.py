"""Update time on long-tailed response lengths: every micro-batch at the step's longest row
(before) against micro-batches cut to their own longest row, rows ordered by length and the
log-prob chunk sized from memory (after), side by side in one run.

Builds one branch with the trainer's code (megatron GPTModel, DDP, distributed optimizer; one
rank, gloo on CPU or NCCL on a GPU), makes GRPO rows whose response lengths follow a long tail
(most short, a few up to ``--max-response``), and times whole updates (``rl.batches.microbatches``
-> ``step.run_microbatches`` with the real objective -> ``step.optimizer_step``), alternating
before and after, after ``--warmup`` untimed ones each. Both settings see the same rows and
must give the same loss (checked). Prints the median times and their ratio::

    python bench/bench_padding.py            # small model, CPU-sized
    python bench/bench_padding.py --gpu-size # ~0.3B model, longer rows (for a GPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32, help="rows per update")
    ap.add_argument("--mbs", type=int, default=4, help="rows per micro-batch")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    ap.add_argument("--max-response", type=int, default=496)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3, help="timed updates per setting")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu-size", action="store_true", help="~0.3B model, 32 rows up to 4k")
    a = ap.parse_args(argv)
    if a.gpu_size:
        a.layers, a.hidden, a.vocab, a.max_response, a.mbs = 16, 1024, 32000, 4080, 2
    return a


def long_tail_lengths(n: int, longest: int, seed: int) -> torch.Tensor:
    """``n`` response lengths in ``[4, longest]``: log-normal (median ~longest/16), one row at
    ``longest`` (the step's longest row, as a long reasoning trace sets it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * 0.8) * (longest / 16)
    out = x.round().long().clamp(4, longest)
    out[int(torch.randint(n, (1,), generator=g))] = longest
    return out


def config(a: argparse.Namespace, after: bool):
    from copd_mega.config import load_config

    seq = a.prompt + a.max_response
    over = [
        f"model.num_layers={a.layers}", f"model.hidden_size={a.hidden}",
        f"model.ffn_hidden_size={4 * a.hidden}", f"model.num_attention_heads={a.hidden // 32}",
        f"model.num_query_groups={a.hidden // 32}", f"model.vocab_size={a.vocab}",
        f"model.max_seq_length={seq}", f"parallel.micro_batch_size={a.mbs}",
        f"parallel.by_length={str(after).lower()}", "optim.lr=1e-5",
        f"rollout.logprob_chunk={0 if after else 64}",
    ]  # fmt: skip
    return load_config(None, over)


def make_rows(a: argparse.Namespace, device: torch.device, with_lengths: bool):
    from copd_mega.rl.batches import grpo_rows

    g = torch.Generator().manual_seed(a.seed)
    resp = long_tail_lengths(a.rows, a.max_response, a.seed)
    lengths = resp + a.prompt
    width = int(lengths.max())
    tokens = torch.randint(1, a.vocab, (a.rows, width), generator=g)
    tokens[torch.arange(width)[None, :] >= lengths[:, None]] = 0
    adv = torch.randn(a.rows, generator=g)
    rows = grpo_rows(tokens.to(device), torch.full((a.rows,), a.prompt, device=device),
                     lengths.to(device), adv.to(device))  # fmt: skip
    if not with_lengths:
        rows.lengths = None  # the old path: every micro-batch at the step's longest row
    return rows, resp


def main(argv: list[str] | None = None) -> int:
    from copd_mega.models.branch import build_branch_model
    from copd_mega.models.step import optimizer_step, prepare_for_training, run_microbatches
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology
    from copd_mega.rl.batches import microbatches
    from copd_mega.rl.logprobs import logprob_chunk
    from copd_mega.rl.objective import make_loss_fn

    a = parse_args(argv)
    init_distributed()
    cfgs = {"before": config(a, False), "after": config(a, True)}
    topo = build_topology(cfgs["before"])
    bm = build_branch_model(cfgs["before"], topo)
    prepare_for_training(bm, topo)
    dev = next(bm.module.parameters()).device
    # the same weights for both: zero lr keeps them (Adam's state moves, the weights do not)
    for o in getattr(bm.optimizer, "chained_optimizers", [bm.optimizer]):
        for group in o.optimizer.param_groups:
            group["lr"] = 0.0
    rows = {"before": make_rows(a, dev, False)[0], "after": make_rows(a, dev, True)[0]}
    resp = make_rows(a, dev, True)[1]

    def update(name: str) -> tuple[float, float]:
        cfg = cfgs[name]
        loss_fn = make_loss_fn(cfg, topo, [])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        mbs = microbatches(rows[name], a.mbs, dev, None, cfg.parallel.by_length)
        out = run_microbatches(bm, topo, mbs, loss_fn)
        vec = sum(o["metrics"] for o in out)
        optimizer_step(bm)
        loss = float(vec[0] / vec[1])
        return time.perf_counter() - t0, loss

    times: dict[str, list[float]] = {"before": [], "after": []}
    losses: dict[str, float] = {}
    for i in range(a.warmup + a.steps):
        for name in ("before", "after"):
            dt, losses[name] = update(name)
            if i >= a.warmup:
                times[name].append(dt)
    if abs(losses["before"] - losses["after"]) > 1e-4 * max(1.0, abs(losses["before"])):
        print(f"loss differs: {losses}", file=sys.stderr)
        return 1
    med = {k: statistics.median(v) for k, v in times.items()}
    q = torch.quantile(resp.float(), torch.tensor([0.5, 0.9, 1.0])).tolist()
    print(f"device {dev.type}; {a.rows} rows x micro-batches of {a.mbs}; model {a.layers} layers "
          f"x {a.hidden}, vocab {a.vocab}")  # fmt: skip
    print(f"response lengths: median {q[0]:.0f}, p90 {q[1]:.0f}, max {q[2]:.0f} (+{a.prompt} "
          f"prompt); padded positions: before {a.rows * int(resp.max() + a.prompt)}, after "
          f"{_after_positions(resp + a.prompt, a.mbs)}")  # fmt: skip
    print(f"log-prob chunk: before 64 positions, after {logprob_chunk(cfgs['after'])}")
    print(f"update time (median of {a.steps}): before {med['before']:.3f}s, after "
          f"{med['after']:.3f}s, ratio before/after {med['before'] / med['after']:.2f}x; "
          f"loss {losses['after']:.6f} both")  # fmt: skip
    return 0


def _after_positions(lengths: torch.Tensor, mbs: int) -> int:
    ordered = sorted(lengths.tolist(), reverse=True)
    return sum(
        max(ordered[i : i + mbs]) * len(ordered[i : i + mbs]) for i in range(0, len(ordered), mbs)
    )


if __name__ == "__main__":
    sys.exit(main())
