"""The one clipped-surrogate objective over GRPO and OPD rows, as megatron's loss function.

For a microbatch of rows (see :mod:`copd_mega.rl.batches`), on the last PP stage, every TP rank:
  logp_t = log pi_theta(y_t)                          (vocab-parallel, chunked)
  A_t    = adv (GRPO rows)  |  beta * (teacher_logp_t - old_logp_t)   (OPD rows; no grad)
  loss   = sum_t -min(rho_t A_t, clip(rho_t, 1-eps_low, 1+eps_high) A_t)
returned as a **sum** with its unit count (tokens for token_mean, sequences for seq_mean), so
megatron's per-token scaling makes the gradient the exact global mean over microbatches and DP.
Telemetry comes back as sums (never means of means), on the device: loss, clip fraction,
entropy, the train/inference gap ``rollout/logp_gap`` = mean over response tokens of
``|log pi_sampler - log pi_old|`` (the sampler's log-prob of the token it drew, at temperature 1,
against the trainer's old-policy log-prob of the same token), and per teaching edge the top-k
overlap and mean delta over the student's own response tokens. Optional truncated importance
sampling (``rollout.tis_cap`` = C > 0) weights each token's policy term by
``min(pi_old / pi_sampler, C)`` (``losses.truncated_importance_weights``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from copd_mega.config import Config
from copd_mega.parallel.topology import Topology
from copd_mega.rl.logprobs import logprob_chunk, response_logprobs, token_entropy
from copd_mega.rl.losses import (
    clipped_surrogate,
    expand_sequence_advantages,
    loss_units,
    opd_advantages,
    topk_overlap,
    truncated_importance_weights,
)
from copd_mega.rl.teacher_scores import aligned_topk

BASE_KEYS = ("loss_sum", "units", "clip_sum", "tokens", "entropy_sum", "kl_sum", "refkl_sum",
             "gap_sum", "gap_tokens", "tis_sum")  # fmt: skip
EDGE_KEYS = ("overlap_sum", "delta_sum", "count")


def metric_width(num_edges: int) -> int:
    return len(BASE_KEYS) + len(EDGE_KEYS) * num_edges


def unpack_metrics(values: list[float], edges: list[tuple[str, str]]) -> dict[str, float]:
    """Turn summed metric values (host floats) into means: loss, clip_frac, entropy,
    ``rollout/logp_gap`` (and ``rollout/tis_weight`` with TIS), per-edge overlap/delta."""
    v = list(values)
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
    if base["gap_tokens"]:
        out["rollout/logp_gap"] = base["gap_sum"] / base["gap_tokens"]
    if base["tis_sum"]:
        out["rollout/tis_weight"] = base["tis_sum"] / max(base["gap_tokens"], 1.0)
    for i, (s, t) in enumerate(edges):
        o = len(BASE_KEYS) + len(EDGE_KEYS) * i
        ov, dl, n = v[o : o + 3]
        if n > 0:
            out[f"edge/{s}<-{t}/overlap"] = ov / n
            out[f"edge/{s}<-{t}/delta"] = dl / n
    return out


def make_loss_fn(cfg: Config, topo: Topology, edges: list[tuple[str, str]]):
    """Build ``loss_fn(mb, logits) -> (loss_sum, units, {"metrics": vec})`` for :mod:`step`.

    ``edges`` fixes the order of per-edge telemetry (``mb["edge"]`` indexes into it). ``vec``
    ``[metric_width]`` float32 stays on the logits' device (summed and synced once per step).
    With ``rollout.tis_cap`` > 0 the policy term of each token is weighted by
    ``min(pi_old / pi_sampler, tis_cap)`` (rows must carry ``sampler_logp``).
    """
    g, vocab, chunk, k = cfg.grpo, cfg.model.vocab_size, logprob_chunk(cfg), cfg.opd.top_k
    cap = cfg.rollout.tis_cap

    def loss_fn(mb: dict, logits: Tensor):
        mask = mb["mask"]
        logp = response_logprobs(logits, mb["tokens"], topo.pg.tp, vocab, chunk)
        old = mb["old_logp"] if "old_logp" in mb else logp.detach()
        adv = torch.where(
            mb["opd"][:, None],
            opd_advantages(mb["teacher_logp"], old, mb["beta"], mask),
            expand_sequence_advantages(mb["adv"], mask),
        )
        weight = None
        if cap > 0:
            if "sampler_logp" not in mb:
                raise ValueError("rollout.tis_cap > 0 needs the sampler's log-probs in the rows")
            weight = truncated_importance_weights(old, mb["sampler_logp"], cap, mask)
        loss, stats = clipped_surrogate(
            logp, old, adv, mask, g.eps_low, g.eps_high, g.loss_agg, normalizer=1.0,
            ref_logp=mb.get("ref_logp"), kl_coef=g.kl_coef, token_weight=weight,
        )  # fmt: skip
        units = loss_units(mask, g.loss_agg)
        with torch.no_grad():
            vec = _telemetry(mb, logits, logp, old, loss, units, stats, weight, topo, vocab,
                             chunk, k, edges)  # fmt: skip
        return loss, units, {"metrics": vec}

    return loss_fn


def _telemetry(mb, logits, logp, old, loss, units, stats, weight, topo, vocab, chunk, k, edges):
    """The metric vector of one microbatch, on the device. Which rows are OPD rows and which
    edges they belong to comes from host metadata (``mb["opd_rows"]``, ``mb["edges"]``)."""
    mask = mb["mask"]
    ntok = mask.sum().float()
    zero = ntok.new_zeros(())
    ent = token_entropy(logits[:, :-1], topo.pg.tp, vocab, chunk)
    ent = torch.nn.functional.pad(ent, (1, 0))
    gap, gap_tokens = zero, zero
    if "sampler_logp" in mb:  # |log pi_sampler - log pi_old| over response tokens
        gap = torch.where(mask, (mb["sampler_logp"] - old).abs(), 0.0).sum()
        gap_tokens = ntok
    vec = [
        loss.detach().float(),
        units.float(),
        stats["clip_frac"] * ntok,
        ntok,
        (ent * mask).sum(),
        stats["approx_kl"] * ntok,
        stats.get("kl", zero) * ntok,
        gap,
        gap_tokens,
        zero if weight is None else (weight * mask).sum(),
    ]
    opd_rows = mb.get("opd_rows", [])
    has_topk = edges and opd_rows and "teacher_topk" in mb
    if has_topk:
        idx = mb["opd_index"] if "opd_index" in mb else torch.tensor(opd_rows, device=logits.device)
        student_topk = aligned_topk(logits[idx], k, topo.pg.tp, vocab, chunk)
    for i in range(len(edges)):
        if i not in mb.get("edges", []):
            vec += [zero] * 3
            continue
        m = mask & (mb["edge"] == i)[:, None]
        n = m.sum().float()
        delta = ((mb["teacher_logp"] - logp.detach()) * m).sum()
        overlap = zero
        if has_topk:
            overlap = topk_overlap(student_topk, mb["teacher_topk"], m[idx]) * n
        vec += [overlap, delta, n]
    return torch.stack([v.float().reshape(()) for v in vec])
