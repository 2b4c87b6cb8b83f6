"""What a rollout is and how one token is drawn (pure): sampling settings, the
:class:`Rollouts` batch, the engine interface, per-row inverse-CDF draws.

Randomness is independent of batching: row i's draw at response position k uses its own uniform
``U[i, k]`` (:func:`row_uniforms`, seeded by the call's seed, the DP rank and the row's index in
the call) through the inverse CDF of the filtered distribution, so tokens depend only on seed,
prompts and logits (``copd_mega.rl.rollout`` runs the decode loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from copd_mega.config import Config
from copd_mega.models.multimodal import RowMedia


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

    All tensors on the model's device. Valid on every rank (every TP and PP rank) of the model
    replica that generated them.
    """

    tokens: Tensor  # [N, L] long: prompt + response, pad_id after ``lengths``
    prompt_lens: Tensor  # [N] long
    lengths: Tensor  # [N] long: prompt + response length (response includes its EOS)
    sampler_logprobs: Tensor  # [N, L] float32: at response positions, 0 elsewhere
    media: RowMedia | None = None  # the rows' images/video (vision.enabled), on the host

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


def sample_tokens(
    logits: Tensor, vocab_size: int, params: SamplingParams, uniforms: Tensor
) -> Tensor:
    """Draw one token per row from full-vocabulary logits.

    Args:
        logits: [b, V_pad] float (rows >= ``vocab_size`` are padding, never drawn).
        uniforms: [b] float64 in [0, 1), one per row (same device); unused when greedy.

    Returns:
        [b] long ids. Greedy (argmax, first of ties) at ``temperature == 0``; otherwise
        temperature, then top-k, then top-p (smallest set whose mass reaches ``top_p``), then
        the inverse CDF at ``uniforms`` (a token of probability 0 is never drawn).
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
    cdf = torch.softmax(x, dim=-1).double().cumsum(dim=-1)
    total = cdf[:, -1:]
    # Strictly below the total, so the first index whose CDF exceeds it has positive mass.
    target = torch.minimum(uniforms.double()[:, None] * total, total.nextafter(total.new_zeros(())))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def model_logprob(logits: Tensor, tokens: Tensor, vocab_size: int) -> Tensor:
    """[b] float32: log-softmax at temperature 1 over the real vocabulary, at ``tokens``."""
    x = logits[:, :vocab_size].float()
    return torch.log_softmax(x, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def stream_seed(seed: int, dp_rank: int) -> int:
    """The sampling streams' base seed: the caller's seed, distinct per DP rank, same over TP/PP."""
    return (seed * 1_000_003 + 7919 * dp_rank) % (2**63)


def row_uniforms(seed: int, dp_rank: int, rows: list[int], n: int) -> Tensor:
    """``[len(rows), n]`` float64 CPU uniforms: row ``rows[k]``'s draws for response positions
    0..n-1, from a generator seeded by (seed, dp_rank, row index); the same on every TP/PP rank."""
    base = stream_seed(seed, dp_rank)
    out = torch.empty(len(rows), n, dtype=torch.float64)
    for k, row in enumerate(rows):
        gen = torch.Generator().manual_seed((base + 104_729 * (row + 1)) % (2**63))
        out[k] = torch.rand(n, generator=gen, dtype=torch.float64)
    return out
