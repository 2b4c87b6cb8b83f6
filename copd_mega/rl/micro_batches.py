"""The micro-batching driver every rollout engine shares: which rows generate together, with
which draws, and how the parts come back in the caller's order.

An engine's ``generate(prompts, params, seed)`` hands :func:`generate_in_micro_batches` one
callable that generates a :class:`MicroBatch`; the driver

* sorts the rows by prompt length (similar lengths share a micro-batch, so its buffers and KV
  cache are sized by prompts of about its own length),
* slices ``size`` rows at a time (``rollout.max_batch_size``: the KV cache's rows),
* gives each micro-batch its rows' own sampling draws (:func:`~copd_mega.rl.sampling.row_uniforms`,
  keyed by the row's index in the call, so the tokens do not depend on ``size``),
* right-pads the parts to one width and puts every row back where its prompt was.

What happens inside a micro-batch (the decode loop, finished-row compaction, the KV cache) is
the engine's: :class:`copd_mega.rl.rollout.MegatronSampler` (text, any TP x PP) and
:class:`copd_mega.rl.vlm_sampler.VLMSampler` (images and video) both run
:func:`copd_mega.rl.rollout.decode_loop`. An engine that draws its own random numbers passes
``draws=False`` and keys its per-request seeds by :attr:`MicroBatch.rows`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from copd_mega.rl.sampling import Rollouts, SamplingParams, row_uniforms


@dataclass
class MicroBatch:
    """Rows of one call that generate together (built by :func:`generate_in_micro_batches`)."""

    rows: list[int]  # indices into the call's prompts, shortest prompt first
    prompts: list[list[int]]  # those rows' prompts, same order
    # [n, max_new_tokens] float64 on the host: row rows[k]'s draws for response positions
    # 0..max_new_tokens-1 (row_uniforms); None when the driver was told draws=False
    uniforms: Tensor | None


MicroBatchFn = Callable[[MicroBatch], Rollouts]  # Rollouts of batch.rows, in that order


def check_batch_size(size: int) -> int:
    """``size`` if it is a valid ``rollout.max_batch_size`` (>= 1), else ValueError."""
    if size < 1:
        raise ValueError(f"rollout.max_batch_size={size} must be >= 1 (rows per micro-batch)")
    return size


def length_order(prompts: list[list[int]]) -> list[int]:
    """Row indices sorted by prompt length (stable: equal lengths keep the call's order)."""
    return sorted(range(len(prompts)), key=lambda i: len(prompts[i]))


def micro_batches(order: list[int], size: int) -> Iterator[list[int]]:
    """Consecutive slices of ``order`` of ``size`` rows (the last may be shorter)."""
    for i in range(0, len(order), size):
        yield order[i : i + size]


def empty_rollouts(device: torch.device) -> Rollouts:
    """Rollouts of no rows (``[0, 0]`` tokens and log-probs) on ``device``."""
    empty = torch.empty(0, 0, dtype=torch.long, device=device)
    none = torch.empty(0, dtype=torch.long, device=device)
    return Rollouts(empty, none, none.clone(), empty.float())


def generate_in_micro_batches(
    prompts: list[list[int]],
    params: SamplingParams,
    seed: int,
    dp_rank: int,
    size: int,
    run: MicroBatchFn,
    device: torch.device,
    draws: bool = True,
) -> Rollouts:
    """Generate ``prompts`` ``size`` rows at a time through ``run`` (module docstring).

    ``run(batch)`` returns the :class:`Rollouts` of ``batch.rows`` in that order (any width,
    right-padded with ``params.pad_id``). ``seed`` and ``dp_rank`` key the rows' draws.
    Returns right-padded Rollouts in prompt order, on ``device`` (the parts' device), valid
    wherever ``run``'s results are (every rank of the replica for the Megatron samplers).
    """
    if not prompts:
        return empty_rollouts(device)
    order = length_order(prompts)
    parts = []
    for rows in micro_batches(order, size):
        u = row_uniforms(seed, dp_rank, rows, params.max_new_tokens) if draws else None
        parts.append(run(MicroBatch(rows, [prompts[j] for j in rows], u)))
    return reorder(concat(parts, params.pad_id), order)


@contextmanager
def generation_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and ``torch.no_grad`` for the block; the model's train/eval mode is restored
    afterwards (also on error). Not ``inference_mode``: megatron's RoPE memoises its tables
    with ``lru_cache`` and training reuses them."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def concat(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """Stack micro-batches' Rollouts row-wise, right-padding tokens with ``pad_id`` and
    log-probs with 0 to the widest part."""
    width = max(p.tokens.shape[1] for p in parts)

    def pad(x: Tensor, value: float) -> Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    return Rollouts(
        torch.cat([pad(p.tokens, pad_id) for p in parts]),
        torch.cat([p.prompt_lens for p in parts]),
        torch.cat([p.lengths for p in parts]),
        torch.cat([pad(p.sampler_logprobs, 0.0) for p in parts]),
    )


def reorder(r: Rollouts, order: list[int]) -> Rollouts:
    """Undo the length sort: row ``k`` of ``r`` belongs to prompt ``order[k]``."""
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    inv = inv.to(r.tokens.device)
    return Rollouts(r.tokens[inv], r.prompt_lens[inv], r.lengths[inv], r.sampler_logprobs[inv])
