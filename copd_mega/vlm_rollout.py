"""Sampling from the vision-language model: :class:`VLMSampler`, a ``RolloutEngine`` with media.

A **full-recompute** generation loop over ``LLaVAModel`` (no KV cache): at every position the
whole prefix, media included, runs forward again and the logits at the last text position
(gathered with ``text_positions``) are sampled. That is quadratic in the response length but
exact and simple; it is meant for the tiny CPU models of the tests and ``make demo-mm`` (a GPU
engine with a cache can replace it behind the same interface).

Conventions shared with :class:`copd_mega.rollout.MegatronSampler` (same ``decode_loop``):
right-padded prompts stepped through, one ``torch.Generator`` per call seeded with
``stream_seed(seed, dp_rank)`` on every TP rank, full-vocabulary logits on every TP rank
(``runtime_gather_output``) and the sampled ids broadcast from TP rank 0, so every TP rank
holds the same rollouts. Departure: the ``<image>`` id is never sampled (its logit is masked),
since a medium slot in a response would have no pixels; sampler log-probs are taken over the
masked distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor

from copd_mega.config import Config
from copd_mega.parallel.topology import Topology
from copd_mega.pipeline_step import share_from_last_stage
from copd_mega.rollout import (
    PromptBatch,
    Rollouts,
    SamplingParams,
    decode_loop,
    pack_prompts,
    row_uniforms,
)


def _unwrap_llava(model: torch.nn.Module) -> torch.nn.Module:
    from megatron.core.models.multimodal.llava_model import LLaVAModel

    while not isinstance(model, LLaVAModel) and hasattr(model, "module"):
        model = model.module
    return model


class VLMSampler:
    """Batched generation with media on this rank's ``LLaVAModel`` (``RolloutEngine`` + media).

    Every TP rank of a DP replica calls :meth:`generate` with the same prompts, media and seed
    and gets the same :class:`Rollouts`. Requires ``parallel.pp=1`` (checked by the VLM build).
    """

    takes_media = True

    def __init__(self, model: torch.nn.Module, topo: Topology, cfg: Config, image_id: int):
        self.model, self.llava, self.topo, self.cfg = model, _unwrap_llava(model), topo, cfg
        self.vocab_size, self.image_id = cfg.model.vocab_size, image_id

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        seed: int,
        media: list[list[Tensor]] | None = None,
    ) -> Rollouts:
        """Sample a response per prompt; ``media[i]`` are prompt i's media in placeholder order
        (images ``[3, H, W]``, videos ``[F, 3, H, W]``, float in [0, 1]; ``[]`` or None: text).

        Returns right-padded :class:`Rollouts` in prompt order on every TP rank.
        """
        params.check(self.vocab_size)
        media = media if media is not None else [[] for _ in prompts]
        if len(media) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(media)} media lists")
        dev = next(self.llava.parameters()).device
        if not prompts:
            empty = torch.empty(0, 0, dtype=torch.long, device=dev)
            return Rollouts(empty, empty[:, 0], empty[:, 0], empty.float())
        draws = row_uniforms(seed, self.topo.dp_rank, list(range(len(prompts))),
                             params.max_new_tokens)  # fmt: skip
        batch = pack_prompts(prompts, params, draws)
        batch.tokens = batch.tokens.to(dev)
        share = lambda x: share_from_last_stage(x, self.topo)  # noqa: E731
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                step = self._full_step(batch, media, params.pad_id)
                return decode_loop(batch, step, params, self.vocab_size, share, compact=False)
        finally:
            self.model.train(was_training)

    def _full_step(self, batch: PromptBatch, media: list[list[Tensor]], pad_id: int):
        return _FullStep(self, media, pad_id)


class _FullStep:
    """Full-recompute VLM forward: the whole prefix, media included, at every position."""

    def __init__(self, sampler: VLMSampler, media: list[list[Tensor]], pad_id: int):
        self.s, self.media, self.pad_id = sampler, media, pad_id

    def __call__(self, tokens: Tensor, rows: Tensor, start: int, end: int, decode: bool):
        from copd_mega.vlm import prepare_inputs

        s = self.s
        media = [self.media[i] for i in rows.tolist()]
        vb = prepare_inputs(s.cfg, tokens[rows, :end].tolist(), media, s.image_id, self.pad_id,
                            tokens.device)  # fmt: skip
        out, _ = s.llava(**vb.forward_kwargs(), runtime_gather_output=True)
        idx = torch.arange(rows.numel(), device=tokens.device)
        logits = out[idx, vb.text_positions[:, end - 1]].float()
        logits[:, s.image_id] = float("-inf")
        return logits

    def compact(self, keep: Tensor) -> None:
        pass  # rows are re-selected at every forward


def make_sampler(model: torch.nn.Module, topo: Topology, cfg: Config, codec):
    """The branch's rollout engine: :class:`VLMSampler` when ``vision.enabled``, else the
    KV-cached text :class:`~copd_mega.rollout.MegatronSampler`."""
    from copd_mega.rollout import MegatronSampler

    if cfg.vision.enabled:
        return VLMSampler(model, topo, cfg, codec.image)
    return MegatronSampler(model, topo, cfg, max_batch_size=cfg.rollout.max_batch_size)
