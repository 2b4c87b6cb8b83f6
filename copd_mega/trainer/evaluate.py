"""Greedy pass@1 per capability on held-out data; ``copd eval`` for saved model checkpoints.

Each DP rank of a branch evaluates its share of the eval split (read in file order); sums are
reduced over the branch's DP group, so every rank returns the same accuracies. A response is
correct when its reward is 1.0 (``rewards.is_correct``). With ``problems`` given, every rank also
gets the per-problem results (sample id -> 1/0), gathered over the DP group: the paired
comparisons of ``copd study`` resample them.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from copd_mega.ckpt.checkpoint import load_model
from copd_mega.config import ConfigError, load_config
from copd_mega.launch.datasets import capabilities_of, make_reader
from copd_mega.launch.runtime import Runtime, shutdown, start
from copd_mega.models.gpt import build_gpt
from copd_mega.models.multimodal import generate, prompts_and_media
from copd_mega.models.vlm import build_vlm
from copd_mega.parallel import comm
from copd_mega.rl.judge import Judge
from copd_mega.rl.rewards import gold_of, is_correct
from copd_mega.rl.sampling import SamplingParams
from copd_mega.rl.vlm_sampler import make_sampler


@torch.no_grad()
def evaluate(
    rt: Runtime,
    sampler,
    judge: Judge,
    caps: list[str],
    limit: int = 0,
    problems: dict | None = None,
) -> dict:
    """Greedy accuracy per capability (``{cap: float}``) on this rank's branch model.

    ``limit`` caps the samples per capability (0 = the whole eval split). ``problems``, when
    given, receives ``{cap: {sample id: 1 or 0}}`` (the branch's whole evaluation, every rank).
    Collective over the branch (every rank of it calls).
    """
    topo, cfg = rt.topo, rt.cfg
    dp, dp_rank = topo.layout.dp, topo.dp_rank
    params = SamplingParams(cfg.rollout.max_new_tokens, 0.0, 1.0, 0, rt.codec.eos, rt.codec.pad)
    out = {}
    for cap in caps:
        reader = make_reader(cfg, cap, "eval", dp_rank, dp)
        n = (
            reader.samples_per_epoch
            if not limit
            else min(reader.samples_per_epoch, -(-limit // dp))
        )
        samples = reader.next_batch(n) if n else []
        correct, mine = torch.zeros(2), {}
        if samples:
            prompts, media = prompts_and_media(rt.codec, samples, 1, cfg.vision.enabled)
            rolls = generate(sampler, prompts, media, params, 0)
            texts = [rt.codec.decode(r) for r in rolls.responses()]
            items = [(t, gold_of(s), s["reward_type"]) for t, s in zip(texts, samples, strict=True)]
            rewards, _ = judge.score(items)
            right = is_correct(rewards)
            correct += torch.tensor([float(right.sum()), float(len(samples))])
            mine = {s["id"]: int(r) for s, r in zip(samples, right.tolist(), strict=True)}
        if dp > 1:
            correct = correct.to(rt.device)
            comm.wait_group(topo.pg.dp)  # DP ranks' generations differ in length: no deadline
            comm.all_reduce(correct, group=topo.pg.dp)
        if problems is not None:
            parts = comm.all_gather_object(mine, group=topo.pg.dp) if dp > 1 else [mine]
            problems[cap] = {k: v for part in parts for k, v in part.items()}
        out[cap] = float(correct[0] / max(correct[1], 1.0))
    return out


def format_table(rows: dict[str, dict[str, float]], caps: list[str]) -> str:
    """Accuracy table: one row per model, one column per capability (percent); '-' where a row
    has no number (e.g. an expert outside its domain), and then no mean."""
    width = max(len(r) for r in rows) + 2
    cols = [max(10, len(c) + 2) for c in caps]  # long names (rg:basic_arithmetic) stay apart
    head = "model".ljust(width) + "".join(c.rjust(w) for c, w in zip(caps, cols, strict=True))
    head += "      mean"
    lines = [head, "-" * len(head)]
    for name, accs in rows.items():
        cells = "".join(f"{100 * accs[c]:{w}.1f}" if c in accs else "-".rjust(w)
                        for c, w in zip(caps, cols, strict=True))  # fmt: skip
        full = all(c in accs for c in caps)
        mean = f"{100 * sum(accs[c] for c in caps) / len(caps):10.1f}" if full else "-".rjust(10)
        lines.append(name.ljust(width) + cells + mean)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``copd eval --config C --ckpt DIR [DIR...] [overrides]``: one process group, each ckpt."""
    ap = argparse.ArgumentParser(prog="copd eval", description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--ckpt", nargs="+", required=True, help="model checkpoint directories")
    ap.add_argument("--capabilities", nargs="*", help="default: every branch's data")
    ap.add_argument("--limit", type=int, default=0, help="samples per capability (0 = all)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        src = load_config(args.config, args.overrides)
        caps = args.capabilities or sorted(
            {c for b in src.branches for c in capabilities_of(b.data)}
        )
        one = f"branches=[{{name: eval, data: {'+'.join(caps)}}}]"
        cfg = load_config(args.config, [*args.overrides, one, "teaching.graph=none"])
    except ConfigError as e:
        print(f"copd eval: {e}", file=sys.stderr)
        return 1
    rt = start(cfg)
    if cfg.vision.enabled:
        model = build_vlm(cfg, rt.topo)
    else:
        model = build_gpt(cfg, rt.topo)
    sampler = make_sampler(model, rt.topo, cfg, rt.codec)
    judge = Judge.from_config(rt.topo, rt.device, cfg.rewards)
    rows = {}
    for ckpt in args.ckpt:
        load_model(ckpt, model, rt.topo)
        rows[ckpt] = evaluate(rt, sampler, judge, caps, args.limit)
    if dist.get_rank() == 0:
        print(format_table(rows, caps))
    judge.close()
    shutdown()
    return 0
