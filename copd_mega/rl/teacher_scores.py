"""A branch scores sequences with its **current** weights: per-token log-probs and top-k ids.

This is the teacher side of mutual OPD (and the student's own top-k for the overlap metric).
It is the same megatron forward pass, in the same precision, as training: log-probs computed
by another engine would disagree numerically with the student's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from copd_mega.models.branch import BranchModel
from copd_mega.models.multimodal import RowMedia
from copd_mega.models.step import run_microbatches
from copd_mega.parallel.topology import Topology
from copd_mega.rl.batches import Rows, sequence_microbatches
from copd_mega.rl.logprobs import response_logprobs, token_topk


def aligned_topk(logits: Tensor, k: int, tp_group, vocab_size: int, chunk: int) -> Tensor:
    """[b, s, k] top-k ids of the distribution that predicted token t, at position t (0 at t=0).

    Same alignment as :func:`copd_mega.rl.logprobs.response_logprobs`.
    """
    ids = token_topk(logits[:, :-1], k, tp_group, vocab_size, chunk)
    return torch.nn.functional.pad(ids, (0, 0, 1, 0))


@torch.no_grad()
def score_sequences(
    bm: BranchModel,
    topo: Topology,
    tokens: Tensor,
    top_k: int,
    vocab_size: int,
    micro_batch_size: int,
    chunk: int,
    device: torch.device,
    media: RowMedia | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor] | None:
    """Log-probs ``[N, L]`` fp32 and top-k ids ``[N, L, k]`` of ``tokens`` ``[N, L]``
    (``top_k=0``: log-probs only, the ids come back as ``[N, L, 0]``).

    Token-aligned (position t scores token t given tokens < t; position 0 is 0). Every rank of
    the branch calls it with the same tokens; the result is valid on the **last PP stage, every
    TP rank**; other stages get ``None``. ``media``: the rows' images/video (vision rows; the
    branch model's ``media_spec`` turns them into VLM inputs), None for text rows.
    ``lengths [N]``: the rows' real lengths; each microbatch then runs at its longest row's
    width and positions past a row's length come back as 0.
    """

    def loss_fn(mb: dict, logits: Tensor):
        logp = response_logprobs(logits, mb["tokens"], topo.pg.tp, vocab_size, chunk)
        if top_k:
            topk = aligned_topk(logits, top_k, topo.pg.tp, vocab_size, chunk)
        else:  # log-probs only (old / reference policy): no top-k work
            topk = torch.zeros(*logp.shape, 0, dtype=torch.long, device=logp.device)
        zero = logits.new_zeros(())
        return zero, torch.ones((), dtype=torch.int), {"logp": logp.float(), "topk": topk}

    host_lengths = None if lengths is None else lengths.tolist()
    bm.model.eval()
    try:
        mbs = sequence_microbatches(tokens, micro_batch_size, device, media, host_lengths)
        out = run_microbatches(bm, topo, mbs, loss_fn, forward_only=True)
    finally:
        bm.model.train()
    if not topo.is_last_stage:
        return None
    n, width = tokens.shape  # at PP > 1 the last microbatch may carry padding rows: cut them
    logp = torch.cat([_to_width(o["logp"], width) for o in out])[:n]
    return logp, torch.cat([_to_width(o["topk"], width) for o in out])[:n]


def _to_width(x: Tensor, width: int) -> Tensor:
    """``x [b, w, ...]`` cut or zero-padded along dim 1 to ``width``."""
    if x.shape[1] >= width:
        return x[:, :width]
    return torch.cat([x, x.new_zeros((x.shape[0], width - x.shape[1], *x.shape[2:]))], dim=1)


def row_logprobs(
    bm: BranchModel,
    topo: Topology,
    rows: Rows,
    vocab_size: int,
    micro_batch_size: int,
    chunk: int,
    device: torch.device,
) -> Tensor:
    """Token-aligned log-probs ``[N, L]`` of ``rows`` (with their media) under ``bm``: valid on
    the last PP stage, zeros elsewhere; on ``device`` (old-policy and reference log-probs)."""
    res = score_sequences(bm, topo, rows.tokens, 0, vocab_size, micro_batch_size, chunk, device,
                          rows.media, rows.lengths)  # fmt: skip
    return res[0] if res is not None else torch.zeros(rows.tokens.shape, device=device)
