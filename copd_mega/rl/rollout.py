"""Batched sampling from a branch's Megatron GPTModel with a KV cache, behind a narrow engine API.

The trainer sees only :class:`~copd_mega.rl.sampling.RolloutEngine` (``generate(prompts, params, seed) -> Rollouts``), so
a GPU engine (megatron's dynamic engine, vLLM) can replace :class:`MegatronSampler` later.

How :class:`MegatronSampler` works (it follows megatron's static-batching text generation):

* **Micro-batches** (:mod:`copd_mega.rl.micro_batches`, shared with the VLM sampler): the rows of
  a call are sorted by prompt length and generated ``rollout.max_batch_size`` at a time; each
  micro-batch's KV cache holds its rows x (its longest prompt + ``max_new_tokens``) positions,
  never all rows of the call.
* **Variable prompt lengths: right padding, stepped through.** Prompts sit right-padded in one
  ``[b, max_prompt + max_new_tokens]`` buffer, so every row's token t is at cache position t.
  (megatron's RoPE takes positions from the cache offset, not ``position_ids``, so left padding
  would shift the rotary phase.) The prefill runs the shortest prompt length in one forward
  (causal mask); after that the model takes one position per forward: a row still inside its
  prompt is fed its own prompt token (its sample is discarded), the other rows feed their last
  sampled token. No attention mask is needed and each row sees exactly its own prefix.
* **KV cache and pipeline stages:** :class:`copd_mega.rl.pipeline_step.GPTStep` runs each forward
  through the branch's PP stages (hidden states sent stage to stage, every stage caching its own
  layers in megatron's ``StaticInferenceContext``); the last stage returns full-vocabulary logits
  (``runtime_gather_output``) on every TP rank and samples.
* **Same tokens on every rank of the replica:** the last stage's TP rank 0 broadcasts the sampled
  ids and their log-probs to every TP x PP rank of its replica, in one collective per position;
  every rank then updates the same buffers, so the :class:`Rollouts` are valid on every rank.
* **Compaction:** every ``CHECK_EVERY`` positions (the only host syncs of the loop) rows that
  ended (EOS or length) are dropped from the running batch and from every stage's KV cache once
  they are at least ``1/COMPACT_FRACTION`` of it, so they stop costing compute; all rows done
  ends the micro-batch.
* **Randomness independent of batching:** row i's draw at response position k uses its own
  uniform ``U[i, k]`` (:func:`row_uniforms`: seeded by the call's seed, the DP rank and the row's
  index in the call) through the inverse CDF of the filtered distribution. So the tokens do not
  depend on micro-batch size, compaction, TP or PP: only on seed, prompts and logits.
* **Sampler log-probs** (diagnostics; the trainer recomputes old log-probs with a forward pass):
  log-softmax of the *plain model distribution at temperature 1* over the real vocabulary,
  gathered at the sampled token, whatever temperature/top-k/top-p was used to draw it. This is
  what ``copd_mega.rl.logprobs.response_logprobs`` recomputes, so the two compare directly.
* Eval mode and ``torch.no_grad`` during generation (not ``inference_mode``, as a precaution:
  megatron's RoPE memoises its tables with ``lru_cache`` and training reuses them); the model's
  train/eval mode is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from copd_mega.config import Config
from copd_mega.parallel.topology import Topology
from copd_mega.rl.micro_batches import (
    MicroBatch,
    check_batch_size,
    generate_in_micro_batches,
    generation_mode,
)
from copd_mega.rl.pipeline_step import GPTStep, share_from_last_stage
from copd_mega.rl.sampling import (
    Rollouts,
    SamplingParams,
    model_logprob,
    sample_tokens,
)

CHECK_EVERY = 8  # positions between host checks for finished rows (compaction, early stop)
COMPACT_FRACTION = 8  # compact once finished rows are at least 1/8 of the running batch


# ----------------------------------------------------------------------------- the decode loop


class Step(Protocol):
    """A model forward of the running rows (see :func:`decode_loop`)."""

    def __call__(
        self, tokens: Tensor, rows: Tensor, start: int, end: int, decode: bool
    ) -> Tensor | None: ...

    def compact(self, keep: Tensor) -> None: ...


ShareFn = Callable[[Tensor], None]  # in-place broadcast from the sampling rank to the replica


@dataclass
class PromptBatch:
    """Prompts packed for the decode loop (built by :func:`pack_prompts`)."""

    tokens: Tensor  # [b, L] long, right-padded prompts, pad_id elsewhere
    prompt_lens: Tensor  # [b] long
    uniforms: Tensor  # [b, max_new_tokens] float64: each row's sampling draws


def pack_prompts(prompts: list[list[int]], params: SamplingParams, uniforms: Tensor) -> PromptBatch:
    """Right-pad ``prompts`` into a CPU ``[b, max_prompt + max_new_tokens]`` buffer of pad_id."""
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    buf = torch.full((len(prompts), int(lens.max()) + params.max_new_tokens), params.pad_id)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    return PromptBatch(buf, lens, uniforms)


def decode_loop(
    batch: PromptBatch,
    step: Step,
    params: SamplingParams,
    vocab_size: int,
    share: ShareFn | None = None,
    compact: bool = True,
    stats: dict | None = None,
) -> Rollouts:
    """Fill ``batch.tokens`` position by position from ``step``'s logits (module docstring).

    ``step(tokens, rows, start, end, decode)`` feeds ``tokens[rows, start:end]`` of the running
    ``rows`` (all of ``[:end]`` when it has no cache) and returns the logits ``[n, V_pad]`` at
    ``end - 1`` on the sampling rank (None elsewhere); ``step.compact(keep)`` keeps running rows
    ``keep``. ``share`` broadcasts the sampled ``[2, n]`` float64 (ids, log-probs) in place.
    Every rank of the replica calls this; ``stats`` (if given) counts ``forwards`` and
    ``row_forwards`` (running rows summed over forwards).
    """
    buf, dev = batch.tokens, batch.tokens.device
    plen, draws = batch.prompt_lens.to(dev), batch.uniforms.to(dev)
    b, total = buf.shape
    logprobs = torch.zeros(b, total, dtype=torch.float32, device=dev)
    lengths, done = plen.clone(), torch.zeros(b, dtype=torch.bool, device=dev)
    last = plen + params.max_new_tokens  # exclusive end of each row's response
    rows = torch.arange(b, device=dev)
    eos = None if params.eos_id is None else torch.tensor(params.eos_id, device=dev).reshape(-1)
    start, max_plen = int(plen.min()), int(plen.max())
    fed = 0
    for t in range(start, total):
        # ``t`` is the position being filled; the forward feeds positions [fed, t).
        logits = step(buf, rows, fed, t, t - 1 >= max_plen)
        fed, n, p = t, rows.numel(), plen[rows]
        out = torch.zeros(2, n, dtype=torch.float64, device=dev)
        if logits is not None:
            u = draws[rows, (t - p).clamp(0, params.max_new_tokens - 1)]
            tok = sample_tokens(logits, vocab_size, params, u)
            out[0], out[1] = tok, model_logprob(logits, tok, vocab_size)
        if share is not None:
            share(out)
        tok, lp = out[0].long(), out[1].float()
        gen = (t >= p) & ~done[rows]
        buf[rows, t] = torch.where(gen, tok, buf[rows, t])
        logprobs[rows, t] = torch.where(gen, lp, 0.0)
        lengths[rows] += gen.long()
        ended = gen & (t + 1 >= last[rows])
        if eos is not None:
            ended |= gen & torch.isin(tok, eos)
        done[rows] |= ended
        if stats is not None:
            stats["forwards"] = stats.get("forwards", 0) + 1
            stats["row_forwards"] = stats.get("row_forwards", 0) + n
        if (t - start) % CHECK_EVERY == CHECK_EVERY - 1:
            live = ~done[rows]
            n_live = int(live.sum())  # the host sync, once per CHECK_EVERY positions
            if n_live == 0:
                break
            if compact and (n - n_live) * COMPACT_FRACTION >= n:
                keep = live.nonzero().squeeze(1)
                rows = rows[keep]
                step.compact(keep)
    end = int(lengths.max())
    return Rollouts(buf[:, :end], plen, lengths, logprobs[:, :end])


# ----------------------------------------------------------------------------- the Megatron engine


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP/Float16Module wrappers."""
    from megatron.core.models.gpt import GPTModel

    while not isinstance(model, GPTModel) and hasattr(model, "module"):
        model = model.module
    return model


def check_prompts(prompts: list[list[int]], vocab_size: int, extra: int, limit: int) -> None:
    """Raise ValueError for an empty prompt, an id outside the vocabulary, or a prompt that
    with ``extra`` more positions (``max_new_tokens``) exceeds ``limit`` (max_seq_length)."""
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, model.vocab_size={vocab_size})")
    longest = max((len(p) for p in prompts), default=0) + extra
    if longest > limit:
        raise ValueError(
            f"longest prompt + rollout.max_new_tokens = {longest} exceeds "
            f"model.max_seq_length={limit}; shorten the prompts, lower "
            "rollout.max_new_tokens or raise model.max_seq_length"
        )


class MegatronSampler:
    """Batched generation on this rank's branch model (``RolloutEngine``), any TP x PP.

    Every TP and PP rank of a DP replica calls :meth:`generate` with the same prompts and seed
    and gets the same :class:`Rollouts`. ``last_stats`` describes the last call: micro-batches,
    the largest KV cache (rows, positions) and the forwards run.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        topo: Topology,
        cfg: Config,
        max_batch_size: int | None = None,
        use_kv_cache: bool = True,
        compact: bool = True,
    ) -> None:
        """``model``: a bare GPTModel (this PP stage's chunk) or its DDP wrapper.
        ``max_batch_size``: rows per generation micro-batch (None: ``rollout.max_batch_size``).
        ``use_kv_cache=False`` recomputes the whole prefix at every step and ``compact=False``
        keeps finished rows in the running batch (the references tests and benchmark use)."""
        size = check_batch_size(
            cfg.rollout.max_batch_size if max_batch_size is None else max_batch_size
        )
        self.model, self.gpt, self.topo = model, _unwrap(model), topo
        self.vocab_size = cfg.model.vocab_size
        self.max_seq_length = cfg.model.max_seq_length
        self.max_batch_size, self.use_kv_cache, self.compact = size, use_kv_cache, compact
        self.last_stats: dict = {}

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Rollouts:
        """Sample a response for every prompt (lists of token ids, each non-empty).

        Returns right-padded :class:`Rollouts` in prompt order, on every TP and PP rank. Rows
        run in ``max_batch_size`` micro-batches of similar prompt length
        (:func:`~copd_mega.rl.micro_batches.generate_in_micro_batches`).
        """
        params.check(self.vocab_size)
        check_prompts(prompts, self.vocab_size, params.max_new_tokens, self.max_seq_length)
        dev = next(self.gpt.parameters()).device
        stats: dict = {"micro_batches": 0, "cache_rows": 0, "cache_len": 0, "cache_layers": 0}

        def run(mb: MicroBatch) -> Rollouts:
            batch = pack_prompts(mb.prompts, params, mb.uniforms)
            batch.tokens = batch.tokens.to(dev)
            return self._micro_batch(batch, params, stats)

        with generation_mode(self.model):
            out = generate_in_micro_batches(
                prompts, params, seed, self.topo.dp_rank, self.max_batch_size, run, dev
            )
        self.last_stats = stats
        return out

    def _micro_batch(self, batch: PromptBatch, params: SamplingParams, stats: dict) -> Rollouts:
        def share(x: Tensor) -> None:
            share_from_last_stage(x, self.topo)

        b, length = batch.tokens.shape
        step = GPTStep(self.gpt, self.topo, b, length, self.use_kv_cache)
        try:
            out = decode_loop(batch, step, params, self.vocab_size, share, self.compact, stats)
            rows, positions = step.cache_shape()
            stats["cache_layers"] = step.layers
        finally:
            step.close()
        stats["micro_batches"] += 1
        stats["cache_rows"] = max(stats["cache_rows"], rows)
        stats["cache_len"] = max(stats["cache_len"], positions)
        return out


def full_recompute_generate(
    model: torch.nn.Module,
    topo: Topology,
    cfg: Config,
    prompts: list[list[int]],
    params: SamplingParams,
    seed: int,
) -> Rollouts:
    """Reference generation without a KV cache: the whole prefix is recomputed at every step.

    Same sampling, seeding and layout as :class:`MegatronSampler` (tests and benchmarks).
    """
    sampler = MegatronSampler(model, topo, cfg, use_kv_cache=False)
    return sampler.generate(prompts, params, seed)
