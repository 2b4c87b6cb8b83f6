"""Per-token log-probs, entropy and top-k ids from vocab-parallel logits, chunked along the sequence.

Every function takes the logits one TP rank holds, ``[b, s, v_local]`` (TP rank r holds global
vocabulary rows ``[r * v_local, (r + 1) * v_local)``; megatron's layout), and the TP group
explicitly; the only collectives are over that group. Rows ``>= vocab_size`` are vocabulary
padding: they are masked to -inf and never counted. Work runs in fp32 one chunk of ``chunk``
sequence positions at a time, so fp32 copies of the logits exist for one chunk only.

Valid data: call on the **last PP stage, every TP rank of the group** (all ranks of the group
must call, with the same ``b, s`` and ``chunk``); every rank gets the same result.

Alignment: logits at position t score the token at position t+1. ``token_logprobs`` takes the
targets already shifted. :func:`response_logprobs` does the shift for a right-padded sequence
batch and returns values aligned with the tokens, ``out[:, t] = log p(tokens[:, t] | tokens[:, :t])``
and ``out[:, 0] = 0``, which is the layout of ``Rollouts.tokens``/``Rollouts.response_mask()`` in
:mod:`copd_mega.rl.rollout`. A trainer does::

    lp = response_logprobs(logits, batch["tokens"], topo.pg.tp, cfg.model.vocab_size, chunk)
    mask = batch["response_mask"]  # [b, s] bool, True at response tokens

For entropy and top-k at token positions, compute on ``logits[:, :-1]`` and pad one column on the
left (they describe the distribution the token at t+1 was drawn from).

Why a custom autograd function: the loss is identical on every TP rank, so an all-reduce with
autograd (``torch.distributed.nn``) would sum TP identical gradients and scale them by TP. Here the
gradient of a log-prob w.r.t. the local shard is local: ``onehot - softmax`` on that shard, with
the softmax recomputed per chunk in backward from the saved logits and logsumexp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from copd_mega.config import Config
from copd_mega.models.gpt import padded_vocab_size
from copd_mega.parallel import comm


def positions_per_chunk(rows: int, vocab_local: int, budget_bytes: float) -> int:
    """Sequence positions per chunk so that a chunk's fp32 logits copy and its softmax temporary
    (``rows x chunk x vocab_local x 4`` bytes each) fit ``budget_bytes``; at least 1."""
    return max(1, int(budget_bytes // (rows * vocab_local * 4 * 2)))


def logprob_chunk(cfg: Config) -> int:
    """The chunk (sequence positions) every log-prob/entropy/top-k call of a job uses:
    ``rollout.logprob_chunk`` when > 0, else sized from ``rollout.logprob_chunk_mib`` for a
    micro-batch of ``parallel.micro_batch_size`` rows and this TP rank's vocabulary shard."""
    r, m, p = cfg.rollout, cfg.model, cfg.parallel
    if r.logprob_chunk > 0:
        return r.logprob_chunk
    v_local = padded_vocab_size(m.vocab_size, m.pad_vocab_to, p.tp) // p.tp
    return positions_per_chunk(p.micro_batch_size, v_local, r.logprob_chunk_mib * 2**20)


def _tp_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> Tensor:
    if _tp_rank_size(group)[1] > 1:
        comm.all_reduce(t, op=op, group=group)
    return t


def _shard_info(logits: Tensor, group, vocab_size: int) -> tuple[int, Tensor | None]:
    """(first global vocabulary id of this shard, bool [v_local] of padding columns or None)."""
    rank, size = _tp_rank_size(group)
    v_local = logits.shape[-1]
    if v_local * size < vocab_size:
        raise ValueError(
            f"logits hold {v_local} x {size} TP ranks = {v_local * size} vocabulary rows but "
            f"model.vocab_size={vocab_size}; pass the tokenizer's vocabulary size and the TP group "
            "the logits are split over"
        )
    start = rank * v_local
    if start + v_local <= vocab_size:
        return start, None
    ids = torch.arange(start, start + v_local, device=logits.device)
    return start, ids >= vocab_size


def _spans(seq_len: int, chunk: int) -> list[tuple[int, int]]:
    step = seq_len if chunk <= 0 else chunk
    return [(i, min(i + step, seq_len)) for i in range(0, seq_len, step)]


def _acc_dtype(logits: Tensor) -> torch.dtype:
    """The dtype the numerics run in: float32, or float64 for float64 logits."""
    return torch.promote_types(logits.dtype, torch.float32)


def _fp32(x: Tensor, pad: Tensor | None) -> Tensor:
    """fp32 (or fp64) copy of a logits chunk with padding columns at -inf."""
    x = x.to(_acc_dtype(x))
    return x if pad is None else x.masked_fill(pad, float("-inf"))


def _local_index(targets: Tensor, start: int, v_local: int) -> tuple[Tensor, Tensor]:
    """(index into this shard clamped to range, bool: the target lives on this shard)."""
    local = targets - start
    inside = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), inside


class _TokenLogProb(torch.autograd.Function):
    """log softmax(logits)[target] over all TP shards; backward is local to each shard."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, group, vocab_size: int, chunk: int):
        start, pad = _shard_info(logits, group, vocab_size)
        b, s, v = logits.shape
        out = torch.zeros(b, s, dtype=_acc_dtype(logits), device=logits.device)
        lse = torch.zeros_like(out)
        valid = (targets >= 0) & (targets < vocab_size)
        for i, j in _spans(s, chunk):
            x = _fp32(logits[:, i:j], pad)
            m = _all_reduce(x.amax(dim=-1), dist.ReduceOp.MAX, group)
            idx, inside = _local_index(targets[:, i:j], start, v)
            tgt = torch.where(inside, x.gather(-1, idx.unsqueeze(-1)).squeeze(-1), 0.0)
            # One all-reduce for both sums: sum-exp over the shard and the target logit.
            sums = torch.stack([torch.exp(x - m.unsqueeze(-1)).sum(-1), tgt])
            sums = _all_reduce(sums, dist.ReduceOp.SUM, group)
            lse[:, i:j] = m + torch.log(sums[0])
            out[:, i:j] = torch.where(valid[:, i:j], sums[1] - lse[:, i:j], 0.0)
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk, ctx.start, ctx.pad, ctx.vocab_size = chunk, start, pad, vocab_size
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, targets, lse = ctx.saved_tensors
        b, s, v = logits.shape
        grad = torch.empty_like(logits)
        valid = (targets >= 0) & (targets < ctx.vocab_size)
        g_all = torch.where(valid, grad_out.to(lse.dtype), 0.0)
        for i, j in _spans(s, ctx.chunk):
            x = _fp32(logits[:, i:j], ctx.pad)
            g = g_all[:, i:j]
            gi = torch.exp(x - lse[:, i:j].unsqueeze(-1)).mul_(-g.unsqueeze(-1))
            idx, inside = _local_index(targets[:, i:j], ctx.start, v)
            gi.scatter_add_(-1, idx.unsqueeze(-1), torch.where(inside, g, 0.0).unsqueeze(-1))
            grad[:, i:j] = gi.to(grad.dtype)
        return grad, None, None, None, None


def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    tp_group: dist.ProcessGroup | None,
    vocab_size: int,
    chunk: int = 0,
) -> Tensor:
    """Log-prob of each target under the full-vocabulary softmax of vocab-parallel logits.

    Args:
        logits: [b, s, v_local] this TP rank's shard (any float dtype); may require grad.
        targets: [b, s] long global vocabulary ids, already aligned with ``logits`` (the caller
            shifts). Ids outside ``[0, vocab_size)`` (e.g. -100 ignore labels) give 0 and no grad.
        tp_group: the group the vocabulary is split over (None: unsplit).
        vocab_size: real vocabulary size; rows at or above it are padding and never counted.
        chunk: sequence positions per fp32 chunk (<= 0: the whole sequence at once).

    Returns:
        [b, s] float32 (float64 for float64 logits), identical on every TP rank; differentiable w.r.t. ``logits`` with
        gradient ``grad_out * (onehot - softmax)`` on each shard (no TP scaling).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logprobs wants logits [b, s, v_local] and targets [b, s]; got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    return _TokenLogProb.apply(logits, targets.long(), tp_group, vocab_size, chunk)


def response_logprobs(
    logits: Tensor,
    tokens: Tensor,
    tp_group: dist.ProcessGroup | None,
    vocab_size: int,
    chunk: int = 0,
) -> Tensor:
    """Token-aligned log-probs of a batch of sequences from the logits of that same batch.

    Args:
        logits: [b, s, v_local] vocab-parallel logits of ``model(tokens, ...)``.
        tokens: [b, s] long, the sequences (right-padded; pad ids must be real ids or
            outside ``[0, vocab_size)``).

    Returns:
        [b, s] float32 with ``out[:, t] = log p(tokens[:, t] | tokens[:, :t])`` for t >= 1 and
        ``out[:, 0] = 0``; same layout as ``Rollouts.sampler_logprobs``. Select response tokens
        with ``Rollouts.response_mask()``. Differentiable w.r.t. ``logits``.
    """
    lp = token_logprobs(logits[:, :-1], tokens[:, 1:], tp_group, vocab_size, chunk)
    return torch.nn.functional.pad(lp, (1, 0))


@torch.no_grad()
def token_entropy(
    logits: Tensor, tp_group: dist.ProcessGroup | None, vocab_size: int, chunk: int = 0
) -> Tensor:
    """Entropy (nats) of the full-vocabulary softmax at every position; no grad.

    Args:
        logits: [b, s, v_local] this TP rank's shard.

    Returns:
        [b, s] float32 (float64 for float64 logits), identical on every TP rank. Padding rows
        excluded.
    """
    start, pad = _shard_info(logits, tp_group, vocab_size)
    b, s, _ = logits.shape
    out = torch.empty(b, s, dtype=_acc_dtype(logits), device=logits.device)
    for i, j in _spans(s, chunk):
        x = _fp32(logits[:, i:j], pad)
        m = _all_reduce(x.amax(dim=-1), dist.ReduceOp.MAX, tp_group)
        z = x - m.unsqueeze(-1)  # -inf at padding columns
        e = torch.exp(z)
        # H = log Z - sum(e^z * z) / Z with Z = sum(e^z); padding terms are 0 * -inf, so drop them.
        ez = torch.where(e > 0, e * z, 0.0)
        sums = _all_reduce(torch.stack([e.sum(-1), ez.sum(-1)]), dist.ReduceOp.SUM, tp_group)
        out[:, i:j] = torch.log(sums[0]) - sums[1] / sums[0]
    return out


@torch.no_grad()
def token_topk(
    logits: Tensor, k: int, tp_group: dist.ProcessGroup | None, vocab_size: int, chunk: int = 0
) -> Tensor:
    """Global vocabulary ids of the ``k`` largest logits at every position, largest first.

    Local top-k on each shard, all-gather over TP, top-k of the union. No grad.

    Args:
        logits: [b, s, v_local] this TP rank's shard.
        k: 1 <= k <= vocab_size.

    Returns:
        [b, s, k] long, identical on every TP rank. Never a padding row.
    """
    if not 1 <= k <= vocab_size:
        raise ValueError(f"token_topk k={k} must be in [1, vocab_size={vocab_size}] (opd.top_k)")
    start, pad = _shard_info(logits, tp_group, vocab_size)
    _, size = _tp_rank_size(tp_group)
    b, s, v = logits.shape
    k_local = min(k, v)
    out = torch.empty(b, s, k, dtype=torch.long, device=logits.device)
    for i, j in _spans(s, chunk):
        vals, idx = _fp32(logits[:, i:j], pad).topk(k_local, dim=-1)
        idx = idx + start
        if size > 1:
            all_vals = [torch.empty_like(vals) for _ in range(size)]
            all_idx = [torch.empty_like(idx) for _ in range(size)]
            comm.all_gather(all_vals, vals.contiguous(), group=tp_group)
            comm.all_gather(all_idx, idx.contiguous(), group=tp_group)
            vals, idx = torch.cat(all_vals, dim=-1), torch.cat(all_idx, dim=-1)
        best = vals.topk(k, dim=-1).indices
        out[:, i:j] = idx.gather(-1, best)
    return out
