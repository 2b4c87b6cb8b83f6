"""Batched sampling from a branch's Megatron GPTModel with a KV cache, behind a narrow engine API.

The trainer sees only :class:`RolloutEngine` (``generate(prompts, params, seed) -> Rollouts``), so
a GPU engine (megatron's dynamic engine, vLLM) can replace :class:`MegatronSampler` later.

How :class:`MegatronSampler` works (it follows megatron's static-batching text generation):

* **Variable prompt lengths: right padding, stepped through.** Prompts sit right-padded in one
  ``[b, max_prompt + max_new_tokens]`` buffer, so every row's token t is at cache position t.
  (megatron's RoPE takes positions from the cache offset, not ``position_ids``, so left padding
  would shift the rotary phase.) The prefill runs the shortest prompt length ``min_len`` in one
  forward (causal mask); after that the model takes one position per forward: a row still inside
  its prompt is fed its own prompt token (its sample is discarded), the other rows feed their
  last sampled token. No attention mask is needed and each row sees exactly its own prefix.
* **KV cache:** megatron's ``StaticInferenceContext``. Prefill mode while any row still consumes
  prompt tokens, decode mode once all rows generate; ``increment_sequence_len_offset`` by the
  tokens fed after each forward; the model is called with ``runtime_gather_output=True`` and
  returns only the last position's full-vocabulary logits, on every TP rank. Once the offset
  is past 0 megatron drops the causal mask, so every forward after the prefill must feed exactly
  one position; that and the offset bookkeeping are what keep cached output equal to a full
  recompute (the modes themselves only switch flash-decode / CUDA-graph paths).
* **Same token on every TP rank:** every TP rank of a branch samples with a ``torch.Generator``
  seeded identically from ``(seed, dp_rank)``, from identical all-gathered logits; the sampled
  ids are then broadcast from TP rank 0 so the ranks can never diverge (a divergent EOS would
  leave ranks in different numbers of forwards and hang the TP collectives). DP ranks generate
  their own prompts with different streams (the seed mixes in ``dp_rank``).
* **Sampler log-probs** (diagnostics; the trainer recomputes old log-probs with a forward pass):
  log-softmax of the *plain model distribution at temperature 1* over the real vocabulary,
  gathered at the sampled token, whatever temperature/top-k/top-p was used to draw it. This is
  what ``copd_mega.logprobs.response_logprobs`` recomputes, so the two compare directly
  (KV-cache vs full-forward mismatch).
* PP > 1 is refused at construction; eval mode and ``torch.no_grad`` during generation (not
  ``inference_mode``, as a precaution: megatron's RoPE memoises its tables with ``lru_cache``
  and training reuses them, so generation should not leave inference tensors there); the
  model's train/eval mode is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from copd_mega.config import Config
from copd_mega.parallel import comm
from copd_mega.parallel.topology import Topology


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` are off."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # stop a sequence after it samples this id, or any of these ids (kept in the response)
    eos_id: int | tuple[int, ...] | None = None
    pad_id: int = 0  # fills positions after each sequence's end

    @classmethod
    def from_config(
        cls, cfg: Config, eos_id: int | tuple[int, ...] | None, pad_id: int
    ) -> SamplingParams:
        r = cfg.rollout
        return cls(r.max_new_tokens, r.temperature, r.top_p, r.top_k, eos_id, pad_id)

    def check(self, vocab_size: int) -> None:
        """Raise ValueError naming the ``rollout.*`` setting that is out of range."""
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p={self.top_p} must be in (0, 1]")
        if not 0 <= self.top_k <= vocab_size:
            raise ValueError(f"rollout.top_k={self.top_k} must be in [0, {vocab_size}] (0 = off)")
        eos = self.eos_id if isinstance(self.eos_id, tuple) else (self.eos_id,)
        for name, tok in [("eos_id", e) for e in eos] + [("pad_id", self.pad_id)]:
            if tok is not None and not 0 <= tok < vocab_size:
                raise ValueError(f"{name}={tok} is not a token id below vocab_size={vocab_size}")


@dataclass
class Rollouts:
    """Generated sequences, right-padded, one row per prompt (in the order the prompts came).

    All tensors on the model's device. Valid on every rank of the branch that generated them (every TP rank holds the same rows).
    """

    tokens: Tensor  # [N, L] long: prompt + response, pad_id after ``lengths``
    prompt_lens: Tensor  # [N] long
    lengths: Tensor  # [N] long: prompt + response length (response includes its EOS)
    sampler_logprobs: Tensor  # [N, L] float32: at response positions, 0 elsewhere

    def response_mask(self) -> Tensor:
        """[N, L] bool, True at response token positions ``prompt_len <= t < length``."""
        t = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return (t >= self.prompt_lens[:, None]) & (t < self.lengths[:, None])

    def responses(self) -> list[list[int]]:
        """The response ids of each row as Python lists (for reward scoring)."""
        ends = zip(self.prompt_lens.tolist(), self.lengths.tolist(), strict=True)
        return [row[p:n].tolist() for row, (p, n) in zip(self.tokens, ends, strict=True)]


class RolloutEngine(Protocol):
    """What the trainer needs from a generator. Each DP rank passes its own prompts."""

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Rollouts: ...


# ----------------------------------------------------------------------------- sampling (pure)


def sample_tokens(
    logits: Tensor, vocab_size: int, params: SamplingParams, generator: torch.Generator
) -> Tensor:
    """Draw one token per row from full-vocabulary logits.

    Args:
        logits: [b, V_pad] float (rows >= ``vocab_size`` are padding, never drawn).
        generator: the sampling stream (same device as ``logits``); unused when greedy.

    Returns:
        [b] long ids. Greedy (argmax, first of ties) at ``temperature == 0``; otherwise
        temperature, then top-k, then top-p (smallest set whose mass reaches ``top_p``).
    """
    x = logits[:, :vocab_size].float()  # padding rows dropped: ids below stay the same
    if params.temperature == 0:
        return x.argmax(dim=-1)
    x = x / params.temperature
    if params.top_k > 0:
        kth = x.topk(params.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def model_logprob(logits: Tensor, tokens: Tensor, vocab_size: int) -> Tensor:
    """[b] float32: log-softmax at temperature 1 over the real vocabulary, at ``tokens``."""
    x = logits[:, :vocab_size].float()
    return torch.log_softmax(x, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def stream_seed(seed: int, dp_rank: int) -> int:
    """The sampling generator's seed: the caller's seed, distinct per DP rank, same over TP."""
    return (seed * 1_000_003 + 7919 * dp_rank) % (2**63)


# ----------------------------------------------------------------------------- the decode loop

StepFn = Callable[[int, int, bool], Tensor]  # (start, end, decode) -> [b, V_pad] logits at end-1


@dataclass
class PromptBatch:
    """Prompts packed for the decode loop (built by :func:`pack_prompts`)."""

    tokens: Tensor  # [b, L] long, right-padded prompts, pad_id elsewhere
    prompt_lens: Tensor  # [b] long


def pack_prompts(prompts: list[list[int]], params: SamplingParams) -> PromptBatch:
    """Right-pad ``prompts`` into a CPU ``[b, max_prompt + max_new_tokens]`` buffer of pad_id."""
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    buf = torch.full((len(prompts), int(lens.max()) + params.max_new_tokens), params.pad_id)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    return PromptBatch(buf, lens)


def decode_loop(
    batch: PromptBatch,
    step: StepFn,
    params: SamplingParams,
    vocab_size: int,
    generator: torch.Generator,
    tp_group: dist.ProcessGroup | None,
) -> Rollouts:
    """Fill ``batch.tokens`` position by position from ``step``'s logits (see module docstring).

    ``step(start, end, decode)`` must feed ``tokens[:, start:end]`` (all of ``[:end]`` when it has
    no cache) and return the logits at position ``end - 1``. Every TP rank must call this.
    """
    buf, plen = batch.tokens, batch.prompt_lens.to(batch.tokens.device)
    b, total = buf.shape
    logprobs = torch.zeros(b, total, dtype=torch.float32, device=buf.device)
    lengths, done = plen.clone(), torch.zeros(b, dtype=torch.bool, device=buf.device)
    last = plen + params.max_new_tokens  # exclusive end of each row's response
    start, max_plen = int(plen.min()), int(plen.max())
    fed = 0
    for t in range(start, total):
        # ``t`` is the position being filled; the forward feeds positions [fed, t).
        logits = step(fed, t, t - 1 >= max_plen)
        fed = t
        tok = sample_tokens(logits, vocab_size, params, generator)
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            comm.broadcast(tok, group=tp_group, group_src=0)
        gen = (t >= plen) & ~done
        buf[:, t] = torch.where(gen, tok, buf[:, t])
        logprobs[:, t] = torch.where(gen, model_logprob(logits, tok, vocab_size), 0.0)
        lengths += gen.long()
        if params.eos_id is not None:
            done |= gen & torch.isin(tok, torch.tensor(params.eos_id, device=tok.device))
        done |= gen & (t + 1 >= last)
        if bool(done.all()):
            break
    end = int(lengths.max())
    return Rollouts(buf[:, :end], plen, lengths, logprobs[:, :end])


# ----------------------------------------------------------------------------- the Megatron engine


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP/Float16Module wrappers."""
    from megatron.core.models.gpt import GPTModel

    while not isinstance(model, GPTModel) and hasattr(model, "module"):
        model = model.module
    return model


class MegatronSampler:
    """Batched generation on this rank's branch model (``RolloutEngine``).

    Every TP rank of a DP replica calls :meth:`generate` with the same prompts and seed and gets
    the same :class:`Rollouts`. Requires ``parallel.pp=1``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        topo: Topology,
        cfg: Config,
        max_batch_size: int = 0,
        use_kv_cache: bool = True,
    ) -> None:
        """``model``: a bare GPTModel or its DDP wrapper. ``max_batch_size``: prompts per
        forward batch (0 = all at once). ``use_kv_cache=False`` recomputes the whole prefix at
        every step (the reference the tests and the benchmark compare against)."""
        if topo.layout.pp > 1:
            raise ValueError(
                f"MegatronSampler needs parallel.pp=1, got parallel.pp={topo.layout.pp}: the "
                "built-in sampler does not pipeline generation across stages. Set parallel.pp=1 "
                "(use TP for larger models) or plug in another RolloutEngine."
            )
        self.model, self.gpt, self.topo = model, _unwrap(model), topo
        self.vocab_size = cfg.model.vocab_size
        self.max_seq_length = cfg.model.max_seq_length
        self.max_batch_size, self.use_kv_cache = max_batch_size, use_kv_cache

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Rollouts:
        """Sample a response for every prompt (lists of token ids, each non-empty).

        Returns right-padded :class:`Rollouts` in prompt order, on every TP rank. Long batches
        are split into ``max_batch_size`` groups of similar prompt length.
        """
        self._check(prompts, params)
        if not prompts:
            empty = torch.empty(0, 0, dtype=torch.long, device=self._device())
            return Rollouts(empty, empty[:, 0], empty[:, 0], empty.float())
        gen = torch.Generator(device=self._device())
        gen.manual_seed(stream_seed(seed, self.topo.dp_rank))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        size = self.max_batch_size or max(len(prompts), 1)
        parts = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for i in range(0, len(order), size):
                    batch = pack_prompts([prompts[j] for j in order[i : i + size]], params)
                    batch.tokens = batch.tokens.to(self._device())
                    parts.append(self._generate_batch(batch, params, gen))
        finally:
            self.model.train(was_training)
        return _reorder(_concat(parts, params.pad_id), order)

    def _device(self) -> torch.device:
        return next(self.gpt.parameters()).device

    def _check(self, prompts: list[list[int]], params: SamplingParams) -> None:
        params.check(self.vocab_size)
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise ValueError(
                    f"prompt {i} has token ids outside [0, model.vocab_size={self.vocab_size})"
                )
        longest = max((len(p) for p in prompts), default=0) + params.max_new_tokens
        if longest > self.max_seq_length:
            raise ValueError(
                f"longest prompt + rollout.max_new_tokens = {longest} exceeds "
                f"model.max_seq_length={self.max_seq_length}; shorten the prompts, lower "
                "rollout.max_new_tokens or raise model.max_seq_length"
            )

    def _generate_batch(
        self, batch: PromptBatch, params: SamplingParams, gen: torch.Generator
    ) -> Rollouts:
        step = self._kv_step(batch.tokens) if self.use_kv_cache else self._full_step(batch.tokens)
        return decode_loop(batch, step, params, self.vocab_size, gen, self.topo.pg.tp)

    def _kv_step(self, tokens: Tensor) -> StepFn:
        from megatron.core.inference.contexts import StaticInferenceContext

        b, total = tokens.shape
        ctx = StaticInferenceContext(max_batch_size=b, max_sequence_length=total)
        ctx.reset()

        def step(start: int, end: int, decode: bool) -> Tensor:
            if decode:
                ctx.enable_decode_mode()
            else:
                ctx.enable_prefill_mode()
            pos = torch.arange(start, end, device=tokens.device).expand(b, -1)
            logits = self.gpt(
                tokens[:, start:end], pos, None,
                inference_context=ctx, runtime_gather_output=True,
            )  # fmt: skip
            ctx.increment_sequence_len_offset(end - start)
            return logits[:, -1]

        return step

    def _full_step(self, tokens: Tensor) -> StepFn:
        b = tokens.shape[0]

        def step(start: int, end: int, decode: bool) -> Tensor:
            pos = torch.arange(end, device=tokens.device).expand(b, -1)
            logits = self.gpt(tokens[:, :end], pos, None, runtime_gather_output=True)
            return logits[:, -1]

        return step


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
    return MegatronSampler(model, topo, cfg, use_kv_cache=False).generate(prompts, params, seed)


# ----------------------------------------------------------------------------- batching helpers


def _concat(parts: list[Rollouts], pad_id: int) -> Rollouts:
    width = max(p.tokens.shape[1] for p in parts)

    def pad(x: Tensor, value: float) -> Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    return Rollouts(
        torch.cat([pad(p.tokens, pad_id) for p in parts]),
        torch.cat([p.prompt_lens for p in parts]),
        torch.cat([p.lengths for p in parts]),
        torch.cat([pad(p.sampler_logprobs, 0.0) for p in parts]),
    )


def _reorder(r: Rollouts, order: list[int]) -> Rollouts:
    """Undo the length sort: row ``k`` of ``r`` belongs to prompt ``order[k]``."""
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    inv = inv.to(r.tokens.device)
    return Rollouts(r.tokens[inv], r.prompt_lens[inv], r.lengths[inv], r.sampler_logprobs[inv])
