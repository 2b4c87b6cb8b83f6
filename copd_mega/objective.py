"""The one clipped-surrogate objective over GRPO and OPD rows, as megatron's loss function.

For a microbatch of rows (see :mod:`copd_mega.batches`), on the last PP stage, every TP rank:
  logp_t = log pi_theta(y_t)                          (vocab-parallel, chunked)
  A_t    = adv (GRPO rows)  |  beta * (teacher_logp_t - old_logp_t)   (OPD rows; no grad)
  loss   = sum_t -min(rho_t A_t, clip(rho_t, 1-eps_low, 1+eps_high) A_t)
returned as a **sum** with its unit count (tokens for token_mean, sequences for seq_mean), so
megatron's per-token scaling makes the gradient the exact global mean over microbatches and DP.
Telemetry comes back as sums (never means of means): loss, clip fraction, entropy, and per
teaching edge the top-k overlap and mean delta over the student's own response tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from copd_mega.config import Config
from copd_mega.logprobs import response_logprobs, token_entropy
from copd_mega.losses import (
    clipped_surrogate_loss,
    expand_sequence_advantages,
    loss_normalizer,
    opd_advantages,
    topk_overlap,
)
from copd_mega.parallel.topology import Topology
from copd_mega.scoring import aligned_topk

BASE_KEYS = ("loss_sum", "units", "clip_sum", "tokens", "entropy_sum", "kl_sum", "refkl_sum")
EDGE_KEYS = ("overlap_sum", "delta_sum", "count")


def metric_width(num_edges: int) -> int:
    return len(BASE_KEYS) + len(EDGE_KEYS) * num_edges


def unpack_metrics(vec: Tensor, edges: list[tuple[str, str]]) -> dict[str, float]:
    """Turn summed metric vectors into means: loss, clip_frac, entropy, per-edge overlap/delta."""
    v = vec.tolist()
    base = dict(zip(BASE_KEYS, v[: len(BASE_KEYS)], strict=True))
    tokens = max(base["tokens"], 1.0)
    out = {
        "loss": base["loss_sum"] / max(base["units"], 1.0),
        "clip_frac": base["clip_sum"] / tokens,
        "entropy": base["entropy_sum"] / tokens,
        "approx_kl": base["kl_sum"] / tokens,
        "train_tokens": base["tokens"],
    }
    if base["refkl_sum"]:
        out["kl_to_ref"] = base["refkl_sum"] / tokens
    for i, (s, t) in enumerate(edges):
        o = len(BASE_KEYS) + len(EDGE_KEYS) * i
        ov, dl, n = v[o : o + 3]
        if n > 0:
            out[f"edge/{s}<-{t}/overlap"] = ov / n
            out[f"edge/{s}<-{t}/delta"] = dl / n
    return out


def make_loss_fn(cfg: Config, topo: Topology, edges: list[tuple[str, str]]):
    """Build ``loss_fn(mb, logits) -> (loss_sum, units, {"metrics": vec})`` for :mod:`step`.

    ``edges`` fixes the order of per-edge telemetry (``mb["edge"]`` indexes into it).
    """
    g, vocab, chunk, k = cfg.grpo, cfg.model.vocab_size, cfg.rollout.logprob_chunk, cfg.opd.top_k

    def loss_fn(mb: dict, logits: Tensor):
        mask = mb["mask"]
        logp = response_logprobs(logits, mb["tokens"], topo.pg.tp, vocab, chunk)
        old = mb["old_logp"] if "old_logp" in mb else logp.detach()
        adv = torch.where(
            mb["opd"][:, None],
            opd_advantages(mb["teacher_logp"], old, mb["beta"], mask),
            expand_sequence_advantages(mb["adv"], mask),
        )
        loss, stats = clipped_surrogate_loss(
            logp, old, adv, mask, g.eps_low, g.eps_high, g.loss_agg, normalizer=1.0,
            ref_logp=mb.get("ref_logp"), kl_coef=g.kl_coef,
        )  # fmt: skip
        units = torch.tensor(loss_normalizer(mask, g.loss_agg))
        with torch.no_grad():
            vec = _telemetry(mb, logits, logp, loss, units, stats, topo, vocab, chunk, k, edges)
        return loss, units, {"metrics": vec}

    return loss_fn


def _telemetry(mb, logits, logp, loss, units, stats, topo, vocab, chunk, k, edges) -> Tensor:
    mask = mb["mask"]
    ntok = mask.sum().float()
    ent = token_entropy(logits[:, :-1], topo.pg.tp, vocab, chunk)
    ent = torch.nn.functional.pad(ent, (1, 0))
    vec = [
        loss.detach().float(),
        units.float().to(ntok.device),
        stats["clip_frac"] * ntok,
        ntok,
        (ent * mask).sum(),
        stats["approx_kl"] * ntok,
        stats.get("kl", 0.0) * ntok,
    ]
    if edges and bool(mb["opd"].any()):
        student_topk = aligned_topk(logits, k, topo.pg.tp, vocab, chunk)
    for i in range(len(edges)):
        rows = mb["edge"] == i
        if not bool(rows.any()):
            vec += [ntok.new_zeros(())] * 3
            continue
        m = mask & rows[:, None]
        n = m.sum().float()
        overlap = topk_overlap(student_topk, mb["teacher_topk"], m) * n
        delta = ((mb["teacher_logp"] - logp.detach()) * m).sum()
        vec += [overlap, delta, n]
    return torch.stack([v.float().reshape(()) for v in vec]).cpu()
