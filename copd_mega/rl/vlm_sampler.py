"""Sampling from the vision-language model: :class:`VLMSampler`, a ``RolloutEngine`` with media.

**KV-cached** (default): the image/video tokens are computed once, in the prefill. A prompt with
media occupies ``c_i`` positions of the *combined* sequence (its text tokens plus
``tiles x (image_size / patch_size)^2`` per medium, :func:`copd_mega.models.vlm_inputs.prepare_inputs`). The
decode loop runs in those combined coordinates, exactly like the text sampler with prompt
length ``c_i``:

* the prefill is one ``LLaVAModel`` forward over the prompts with megatron's
  ``StaticInferenceContext``: its ViT, projector and text embedding build the combined prompt
  embeddings ``[C, b, h]``, of which the language model runs (and caches) only the shortest
  combined prompt; the embeddings are kept;
* every later forward calls the language model directly with one position: a row still inside
  its combined prompt feeds its kept prompt embedding at that position, the others the
  embedding of their last sampled token (``language_model.embedding``);
* the result is mapped back to text coordinates (prompt ids, then the response).

``use_kv_cache=False`` is the full-recompute reference: at every position the whole prefix,
media included, runs forward again and the logits at the last text position (gathered with
``text_positions``) are sampled.

Shared with :class:`copd_mega.rl.rollout.MegatronSampler`: the micro-batching driver
(:func:`copd_mega.rl.micro_batches.generate_in_micro_batches`: length-sorted micro-batches of
``rollout.max_batch_size`` rows, per-row sampling streams, reassembly in prompt order),
``decode_loop`` (compaction of finished rows), and the sampled ids broadcast from TP rank 0, so
every TP rank holds the same rollouts. Departure: the ``<image>`` id is never sampled (its logit
is masked), since a medium slot in a response would have no pixels; sampler log-probs are taken
over the masked distribution. Requires ``parallel.pp=1`` (refused at construction).
"""

from __future__ import annotations

import torch
from torch import Tensor

from copd_mega.config import Config
from copd_mega.models.vlm_inputs import prepare_inputs
from copd_mega.parallel.topology import Topology
from copd_mega.rl.micro_batches import (
    MicroBatch,
    check_batch_size,
    generate_in_micro_batches,
    generation_mode,
)
from copd_mega.rl.pipeline_step import compact_cache, share_from_last_stage
from copd_mega.rl.rollout import MegatronSampler, PromptBatch, decode_loop, pack_prompts
from copd_mega.rl.sampling import Rollouts, SamplingParams


def _unwrap_llava(model: torch.nn.Module) -> torch.nn.Module:
    from megatron.core.models.multimodal.llava_model import LLaVAModel

    while not isinstance(model, LLaVAModel) and hasattr(model, "module"):
        model = model.module
    return model


class VLMSampler:
    """Batched generation with media on this rank's ``LLaVAModel`` (``RolloutEngine`` + media).

    Every TP rank of a DP replica calls :meth:`generate` with the same prompts, media and seed
    and gets the same :class:`Rollouts`.
    """

    takes_media = True

    def __init__(
        self,
        model: torch.nn.Module,
        topo: Topology,
        cfg: Config,
        image_id: int,
        max_batch_size: int | None = None,
        use_kv_cache: bool = True,
    ):
        if topo.layout.pp > 1:
            raise ValueError(
                f"the vision-language sampler runs with parallel.pp=1, got "
                f"parallel.pp={topo.layout.pp}; set parallel.pp=1 (scale it with TP/DP)"
            )
        size = check_batch_size(
            cfg.rollout.max_batch_size if max_batch_size is None else max_batch_size
        )
        self.model, self.llava, self.topo, self.cfg = model, _unwrap_llava(model), topo, cfg
        self.vocab_size, self.image_id = cfg.model.vocab_size, image_id
        self.max_batch_size, self.use_kv_cache = size, use_kv_cache

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        seed: int,
        media: list[list[Tensor]] | None = None,
    ) -> Rollouts:
        """Sample a response per prompt; ``media[i]`` are prompt i's media in placeholder order
        (images ``[3, H, W]``, videos ``[F, 3, H, W]``, float in [0, 1]; ``[]`` or None: text).

        Returns right-padded :class:`Rollouts` (text coordinates) in prompt order on every TP
        rank.
        """
        params.check(self.vocab_size)
        media = media if media is not None else [[] for _ in prompts]
        if len(media) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(media)} media lists")
        dev = next(self.llava.parameters()).device

        def run(mb: MicroBatch) -> Rollouts:
            return self._micro_batch(mb, [media[j] for j in mb.rows], params, dev)

        with generation_mode(self.model):
            return generate_in_micro_batches(
                prompts, params, seed, self.topo.dp_rank, self.max_batch_size, run, dev
            )

    def _micro_batch(self, mb: MicroBatch, media, params: SamplingParams, dev) -> Rollouts:
        def share(x: Tensor) -> None:
            share_from_last_stage(x, self.topo)

        prompts, draws = mb.prompts, mb.uniforms
        if not self.use_kv_cache:
            batch = pack_prompts(prompts, params, draws)
            batch.tokens = batch.tokens.to(dev)
            step = _FullStep(self, media, params.pad_id)
            return decode_loop(batch, step, params, self.vocab_size, share)
        vb = prepare_inputs(self.cfg, prompts, media, self.image_id, params.pad_id, dev)
        text = pack_prompts(prompts, params, draws)
        ends = text.prompt_lens.to(dev)[:, None] - 1
        comb = vb.text_positions.gather(1, ends).squeeze(1) + 1  # combined prompt lengths [b]
        total = int(comb.max()) + params.max_new_tokens
        if total > self.cfg.model.max_seq_length:
            raise ValueError(
                f"a prompt with its media takes {int(comb.max())} positions, plus "
                f"rollout.max_new_tokens={params.max_new_tokens} exceeds "
                f"model.max_seq_length={self.cfg.model.max_seq_length}; raise it or lower "
                "rollout.max_new_tokens"
            )
        buf = torch.full((len(prompts), total), params.pad_id, dtype=torch.long, device=dev)
        batch = PromptBatch(buf, comb, draws)
        step = _KVStep(self, vb, comb, total)
        out = decode_loop(batch, step, params, self.vocab_size, share)
        step.close()
        return to_text_coordinates(out, text.tokens.to(dev), text.prompt_lens.to(dev), comb)

    def _masked(self, logits: Tensor) -> Tensor:
        logits = logits.float()
        logits[:, self.image_id] = float("-inf")
        return logits


def to_text_coordinates(r: Rollouts, text: Tensor, plen: Tensor, comb: Tensor) -> Rollouts:
    """Rollouts of the combined sequence -> text coordinates.

    ``r``: tokens/log-probs ``[b, Lc]`` with the response at ``comb[i] <= p < r.lengths[i]``;
    ``text [b, Lt]``: right-padded prompt ids (``Lt`` >= longest prompt + response);
    ``plen``/``comb`` ``[b]``: text and combined prompt lengths. Pure.
    """
    lengths = plen + (r.lengths - comb)
    j = torch.arange(text.shape[1], device=text.device).expand_as(text)
    src = (j - plen[:, None] + comb[:, None]).clamp(0, r.tokens.shape[1] - 1)
    resp = (j >= plen[:, None]) & (j < lengths[:, None])
    tokens = torch.where(resp, r.tokens.gather(1, src), text)
    logprobs = torch.where(resp, r.sampler_logprobs.gather(1, src), 0.0)
    end = int(lengths.max())
    return Rollouts(tokens[:, :end], plen, lengths, logprobs[:, :end])


class _KVStep:
    """KV-cached VLM forwards of one micro-batch in combined coordinates (module docstring).

    ``vb``: the prompts' ``VLMBatch``; ``comb [b]``: combined prompt lengths; ``total``: the
    cache's positions (longest combined prompt + max_new_tokens).
    """

    def __init__(self, sampler: VLMSampler, vb, comb: Tensor, total: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.s, self.vb, self.comb = sampler, vb, comb
        self.ctx = StaticInferenceContext(comb.numel(), total)
        self.ctx.reset()
        self.emb: Tensor | None = None  # [C, n, h] combined prompt embeddings of running rows

    def __call__(self, tokens: Tensor, rows: Tensor, start: int, end: int, decode: bool):
        self.ctx.enable_decode_mode() if decode else self.ctx.enable_prefill_mode()
        if self.emb is None:
            out = self._prefill(end)
        else:
            lm = self.s.llava.language_model
            x = lm.embedding(input_ids=tokens[rows, start:end], position_ids=None)  # [s, n, h]
            k = min(end, self.emb.shape[0]) - start  # positions some prompt may still cover
            if k > 0:
                p = torch.arange(start, start + k, device=tokens.device)
                inside = (p[:, None] < self.comb[None, :]).unsqueeze(-1)  # [k, n, 1]
                x[:k] = torch.where(inside, self.emb[start : start + k], x[:k])
            out = lm(input_ids=None, position_ids=None, attention_mask=None, decoder_input=x,
                     inference_context=self.ctx, runtime_gather_output=True)  # fmt: skip
        self.ctx.increment_sequence_len_offset(end - start)
        return self.s._masked(out[:, -1])

    def _prefill(self, end: int) -> Tensor:
        """LLaVA forward over the prompts; its language model runs only positions [0, end)."""

        def keep_and_trim(module, args, kwargs):
            self.emb = kwargs["decoder_input"]
            kwargs["decoder_input"] = self.emb[:end]
            return args, kwargs

        llava = self.s.llava
        hook = llava.language_model.register_forward_pre_hook(keep_and_trim, with_kwargs=True)
        try:
            out, _ = llava(**self.vb.forward_kwargs(), inference_context=self.ctx,
                           runtime_gather_output=True)  # fmt: skip
        finally:
            hook.remove()
        return out

    def compact(self, keep: Tensor) -> None:
        compact_cache(self.ctx, keep)
        self.comb = self.comb[keep]
        if self.emb is not None:
            self.emb = self.emb[:, keep]

    def close(self) -> None:
        self.ctx, self.emb = None, None


class _FullStep:
    """Full-recompute VLM forward: the whole prefix, media included, at every position."""

    def __init__(self, sampler: VLMSampler, media: list[list[Tensor]], pad_id: int):
        self.s, self.media, self.pad_id = sampler, media, pad_id

    def __call__(self, tokens: Tensor, rows: Tensor, start: int, end: int, decode: bool):
        s = self.s
        media = [self.media[i] for i in rows.tolist()]
        vb = prepare_inputs(s.cfg, tokens[rows, :end].tolist(), media, s.image_id, self.pad_id,
                            tokens.device)  # fmt: skip
        out, _ = s.llava(**vb.forward_kwargs(), runtime_gather_output=True)
        idx = torch.arange(rows.numel(), device=tokens.device)
        return s._masked(out[idx, vb.text_positions[:, end - 1]])

    def compact(self, keep: Tensor) -> None:
        pass  # the running rows are re-selected at every forward


def make_sampler(model: torch.nn.Module, topo: Topology, cfg: Config, codec):
    """The branch's rollout engine: :class:`VLMSampler` when ``vision.enabled``, else the
    KV-cached text :class:`~copd_mega.rl.rollout.MegatronSampler`; both generate
    ``rollout.max_batch_size`` rows at a time."""
    size = cfg.rollout.max_batch_size
    if cfg.vision.enabled:
        return VLMSampler(model, topo, cfg, codec.image, max_batch_size=size)
    return MegatronSampler(model, topo, cfg, max_batch_size=size)
