"""``copd pretrain``: next-token training on (prompt, answer) pairs that makes a base model.

No pretrained weights can be downloaded here, so a run starts by teaching a tiny model the
capabilities' format and a partial skill: supervised NLL of ``answer + <eos>`` given
``<bos> + prompt``. Every branch's data (or ``pretrain.capabilities``) is mixed; the result is a
normal model checkpoint at ``RUN/base`` that ``checkpoint.init_from`` points every branch at.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch import Tensor

from copd_mega.ckpt.checkpoint import save_model
from copd_mega.config import BranchConfig, Config, ConfigError, TeachingConfig, load_config
from copd_mega.launch.datasets import capabilities_of, make_reader
from copd_mega.launch.run_dir import claim_run_dir
from copd_mega.launch.runtime import Runtime, shutdown, start
from copd_mega.models.branch import build_branch_model
from copd_mega.models.multimodal import RowMedia, media_spec, prompt_with_media
from copd_mega.models.step import all_finite, optimizer_step, prepare_for_training, run_microbatches
from copd_mega.rl.batches import split_microbatches
from copd_mega.rl.judge import Judge
from copd_mega.rl.logprobs import logprob_chunk, response_logprobs
from copd_mega.rl.vlm_sampler import make_sampler
from copd_mega.trainer.evaluate import evaluate


def pretrain_config(cfg: Config) -> tuple[Config, list[str]]:
    """The one-branch config of the pretrain job and the capabilities it mixes."""
    caps = cfg.pretrain.capabilities or sorted(
        {c for b in cfg.branches for c in capabilities_of(b.data)}
    )
    one = dataclasses.replace(
        cfg,
        branches=[BranchConfig(name="base", data="+".join(caps))],
        teaching=TeachingConfig(graph="none"),
    )
    return one, caps


def sft_rows(rt: Runtime, samples: list[dict]) -> dict[str, Tensor]:
    """tokens ``[N, L]`` (``<bos> [<image>...] prompt answer <eos>``, right-padded) and the
    answer mask; with ``vision.enabled`` also ``media`` (a ``RowMedia``, not a tensor)."""
    seqs, masks, media = [], [], []
    for s in samples:
        p, m = prompt_with_media(rt.codec, s, rt.cfg.vision.enabled)
        a = rt.codec.answer_ids(s["answer"])
        media.append(m)
        seqs.append(p + a)
        masks.append([False] * len(p) + [True] * len(a))
    width = max(len(x) for x in seqs)
    if width > rt.cfg.model.max_seq_length:
        raise ConfigError(
            f"a pretraining sequence has {width} tokens > model.max_seq_length="
            f"{rt.cfg.model.max_seq_length}; raise model.max_seq_length"
        )
    tokens = torch.full((len(seqs), width), rt.codec.pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (x, m) in enumerate(zip(seqs, masks, strict=True)):
        tokens[i, : len(x)] = torch.tensor(x)
        mask[i, : len(m)] = torch.tensor(m)
    out = {"tokens": tokens, "mask": mask}
    if rt.cfg.vision.enabled:
        out["media"] = RowMedia.from_lists(media, rt.cfg.vision.image_size)
    return out


class CapabilityMix:
    """Training batches for ``pretrain.capability_target``: one reader per capability, rows
    shared by weight: 3 for a capability below the target, 1 within ``BAND`` above it (rehearsed
    so that it is not forgotten), 0 further above (it pauses until it falls back). So fast
    capabilities wait near the target for the slow ones instead of running to 100%."""

    BAND = 0.15

    def __init__(self, cfg: Config, caps: list[str], dp_rank: int, dp_size: int) -> None:
        self.readers = {c: make_reader(cfg, c, "train", dp_rank, dp_size) for c in caps}
        self.weights = dict.fromkeys(caps, 3)

    def next_batch(self, n: int) -> list[dict]:
        w = list(self.weights.values())
        ends = [n * sum(w[: i + 1]) // sum(w) for i in range(len(w))]
        out, start = [], 0
        for reader, end in zip(self.readers.values(), ends, strict=True):
            out += reader.next_batch(end - start) if end > start else []
            start = end
        return out

    def update(self, accs: dict[str, float], target: float) -> bool:
        """Re-weight from held-out accuracies; True when every capability reached ``target``."""
        self.weights = {
            c: 3 if accs[c] < target else 1 if accs[c] < target + self.BAND else 0
            for c in self.readers
        }
        return all(accs[c] >= target for c in self.readers)


def nll_loss_fn(rt: Runtime):
    cfg = rt.cfg

    def loss_fn(mb: dict, logits: Tensor):
        logp = response_logprobs(
            logits, mb["tokens"], rt.topo.pg.tp, cfg.model.vocab_size, logprob_chunk(cfg)
        )
        mask = mb["mask"]
        nll = -(logp * mask).sum()
        n = mask.sum()
        return nll, n, {"nll": torch.stack([nll.detach(), n.float()])}

    return loss_fn


def run_pretrain(cfg: Config, out_dir: Path | None = None) -> Path:
    """Train the base model and save it (collective over the job). Returns its directory."""
    pcfg, caps = pretrain_config(cfg)
    claim_run_dir(pcfg)  # one job per run directory
    rt = start(pcfg)
    topo, p = rt.topo, pcfg.pretrain
    out_dir = Path(out_dir or Path(cfg.run_dir) / "base")
    bm = build_branch_model(pcfg, topo, lr=p.lr, min_lr=p.lr / 10)
    bm.media_spec = media_spec(pcfg, rt.codec)
    prepare_for_training(bm, topo)
    sched = OptimizerParamScheduler(
        bm.optimizer, init_lr=0.0, max_lr=p.lr, min_lr=p.lr / 10,
        lr_warmup_steps=min(p.warmup_steps, p.steps - 1), lr_decay_steps=p.steps,
        lr_decay_style="cosine", start_wd=pcfg.optim.weight_decay,
        end_wd=pcfg.optim.weight_decay, wd_incr_steps=p.steps, wd_incr_style="constant",
    )  # fmt: skip
    sampler = make_sampler(bm.model, topo, pcfg, rt.codec)
    judge = Judge.from_config(topo, rt.device, cfg.rewards)
    if p.capability_target:
        reader = CapabilityMix(pcfg, caps, topo.dp_rank, topo.layout.dp)
    else:
        reader = make_reader(pcfg, pcfg.branches[0].data, "train", topo.dp_rank, topo.layout.dp)
    per_rank = max(p.batch_size // topo.layout.dp, 1)
    loss_fn, t0 = nll_loss_fn(rt), time.monotonic()
    for step in range(p.steps):
        rows = sft_rows(rt, reader.next_batch(per_rank))
        media = rows.pop("media", None)
        mbs = split_microbatches(rows, pcfg.parallel.micro_batch_size, rt.device, media)
        out = run_microbatches(bm, topo, mbs, loss_fn)
        tot = sum(o["nll"] for o in out) if out else torch.zeros(2, device=rt.device)
        stats = optimizer_step(bm, all_finite(tot[:1], topo.branch_group))
        sched.step(1)
        last = step + 1 == p.steps
        if (p.eval_every and (step + 1) % p.eval_every == 0) or last:
            accs = evaluate(rt, sampler, judge, caps, p.eval_limit)
            mean = sum(accs.values()) / len(accs)
            shown = " ".join(f"{c}={100 * a:.1f}%" for c, a in accs.items())
            rt.log(
                f"pretrain step {step + 1}/{p.steps} nll={float(tot[0] / max(tot[1], 1)):.3f} "
                f"grad_norm={stats['grad_norm']:.4f} eval {shown} "
                f"({time.monotonic() - t0:.0f}s)"
            )
            if p.target_accuracy and mean >= p.target_accuracy:
                rt.log(f"pretrain reached target accuracy {p.target_accuracy:.2f}; stopping")
                break
            if p.capability_target and reader.update(accs, p.capability_target):
                rt.log(f"pretrain: every capability reached {p.capability_target:.2f}; stopping")
                break
    save_model(out_dir, bm, topo, pcfg, tokenizer=rt.codec.path)
    rt.log(f"base model saved to {out_dir}")
    judge.close()
    return out_dir


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="copd pretrain", description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", help="model directory (default RUN/base)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run_pretrain(cfg, Path(args.out) if args.out else None)
    except ConfigError as e:
        print(f"copd pretrain: {e}", file=sys.stderr)
        return 1
    shutdown()
    return 0
