"""Images and video in the CoPD loop: the media that rows own, and how the VLM reads them.

A sample's media are its images (``[3, H, W]`` each) and its video's frames (``[F, 3, H, W]``,
sampled once by the reader with ``data.media.frame_indices``; one medium of F tiles). The prompt
gets one ``<image>`` token per medium after ``<bos>`` (:func:`copd_mega.models.vlm_inputs.with_placeholders`).
From then on the **same pixel tensors** are part of the rows: ``Rollouts.media`` ->
``Rows.media`` (GRPO/OPD rows) -> the exchange to the teacher -> each microbatch's ``media``,
so no frame is ever sampled or decoded twice and the loop treats text and vision rows alike.

:class:`RowMedia` holds the media of N rows as raw ``[0, 1]`` float32 (the CLIP normalisation
is applied by :func:`copd_mega.models.vlm_inputs.batch_inputs` at each forward, identically everywhere).
A VLM branch model carries a :class:`MediaSpec` (``BranchModel.media_spec``) that turns a
microbatch's tokens and media into ``LLaVAModel`` inputs; :func:`text_logits` runs the model and
gathers its logits at ``text_positions``, so the result is token-aligned like a GPT's and
``response_logprobs``/top-k/the objective are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from copd_mega.config import Config, ConfigError
from copd_mega.models.vlm_inputs import VLMBatch, batch_inputs


@dataclass
class RowMedia:
    """Media of N rows (valid on every rank of the branch that holds the rows).

    pixels [T, 3, H, W] float32 in [0, 1]: every medium's tiles, row 0's media first;
    tiles [M] long: tiles per medium (1 per image, F per video); per_row [N] long: media per row
    (0 for a text row).
    """

    pixels: Tensor
    tiles: Tensor
    per_row: Tensor

    def __len__(self) -> int:
        return int(self.per_row.numel())

    @classmethod
    def from_lists(cls, media: list[list[Tensor]], size: int) -> RowMedia:
        """From per-row lists of media (images ``[3, H, W]`` or videos ``[F, 3, H, W]``)."""
        flat = [m.unsqueeze(0) if m.dim() == 3 else m for row in media for m in row]
        pixels = torch.cat([m.float() for m in flat]) if flat else torch.zeros(0, 3, size, size)
        return cls(
            pixels=pixels.contiguous(),
            tiles=torch.tensor([m.shape[0] for m in flat], dtype=torch.long),
            per_row=torch.tensor([len(row) for row in media], dtype=torch.long),
        )

    def to_lists(self) -> list[list[Tensor]]:
        """Per-row lists of media ``[tiles, 3, H, W]`` (views into ``pixels``)."""
        out, m, t = [], 0, 0
        tiles = self.tiles.tolist()
        for n in self.per_row.tolist():
            row = []
            for k in tiles[m : m + n]:
                row.append(self.pixels[t : t + k])
                t += k
            m += n
            out.append(row)
        return out

    def rows(self, start: int, end: int) -> RowMedia:
        """The media of rows ``[start, end)``: slices of the tensors (host arithmetic only)."""
        m0 = int(self.per_row[:start].sum())
        m1 = m0 + int(self.per_row[start:end].sum())
        t0 = int(self.tiles[:m0].sum())
        t1 = t0 + int(self.tiles[m0:m1].sum())
        return RowMedia(self.pixels[t0:t1], self.tiles[m0:m1], self.per_row[start:end])

    def select(self, order: list[int]) -> RowMedia:
        """The media of rows ``order`` (a permutation or subset of row indices), in that order."""
        m_end = self.per_row.cumsum(0)
        t_end = self.tiles.cumsum(0)
        media, tiles = [], []
        for r in order:
            m1 = int(m_end[r])
            m0 = m1 - int(self.per_row[r])
            media += range(m0, m1)
        for m in media:
            t1 = int(t_end[m])
            tiles += range(t1 - int(self.tiles[m]), t1)
        idx = torch.tensor(media, dtype=torch.long)
        return RowMedia(self.pixels[torch.tensor(tiles, dtype=torch.long)], self.tiles[idx],
                        self.per_row[torch.tensor(order, dtype=torch.long)])  # fmt: skip

    @staticmethod
    def cat(parts: list[RowMedia]) -> RowMedia:
        return RowMedia(
            pixels=torch.cat([p.pixels for p in parts]),
            tiles=torch.cat([p.tiles for p in parts]),
            per_row=torch.cat([p.per_row for p in parts]),
        )

    def pack(self) -> tuple[Tensor, Tensor]:
        """``(pixels [T, 3, H, W] float32, meta [N + M] long = per_row ++ tiles)`` to send."""
        return self.pixels.float().contiguous(), torch.cat([self.per_row, self.tiles]).long()

    @classmethod
    def unpack(cls, pixels: Tensor, meta: Tensor, n_rows: int) -> RowMedia:
        """Inverse of :meth:`pack` for ``n_rows`` rows (tensors moved to CPU)."""
        meta = meta.cpu()
        return cls(pixels.cpu(), meta[n_rows:].clone(), meta[:n_rows].clone())


def sample_media(sample: dict) -> list[Tensor]:
    """A reader sample's media in placeholder order: its images, then its video (if any)."""
    media = list(sample.get("images") or [])
    if sample.get("frames") is not None:
        media.append(sample["frames"])
    return media


def prompt_with_media(codec, sample: dict, vision: bool) -> tuple[list[int], list[Tensor]]:
    """``(prompt ids, media)`` of a sample: one ``<image>`` per medium where the codec puts it
    (after ``<bos>``; an HF chat template's image parts in the user turn).

    Raises ConfigError when a sample has media but ``vision.enabled`` is false.
    """
    media = sample_media(sample)
    if media and not vision:
        raise ConfigError(
            f"a {sample.get('capability', '?')!r} sample carries images/video but "
            "vision.enabled=false; set vision.enabled=true to train on media"
        )
    return codec.prompt_ids(sample["prompt"], len(media)), media


def prompts_and_media(
    codec, samples: list[dict], repeat: int, vision: bool
) -> tuple[list[list[int]], list[list[Tensor]]]:
    """Prompt ids and media of ``samples``, each repeated ``repeat`` times (GRPO groups)."""
    pairs = [prompt_with_media(codec, s, vision) for s in samples]
    prompts = [p for p, _ in pairs for _ in range(repeat)]
    media = [m for _, m in pairs for _ in range(repeat)]
    return prompts, media


def generate(sampler, prompts, media, params, seed: int):
    """``sampler.generate`` with media for a VLM sampler, without for the text sampler."""
    if getattr(sampler, "takes_media", False):
        return sampler.generate(prompts, params, seed, media=media)
    return sampler.generate(prompts, params, seed)


@dataclass(frozen=True)
class MediaSpec:
    """What building VLM inputs needs: the config, the ``<image>`` id, the pad id."""

    cfg: Config
    image_id: int
    pad_id: int

    def inputs(self, tokens: Tensor, media: RowMedia, lengths: list[int] | None = None) -> VLMBatch:
        """``LLaVAModel`` inputs of rows ``tokens [B, S]`` (on the compute device) with their
        ``media`` (B rows, host) and real lengths (host ints; None: all S), on the tokens'
        device: no host sync, no per-token Python (:func:`copd_mega.models.vlm_inputs.batch_inputs`)."""
        return batch_inputs(self.cfg, tokens, media.pixels, media.tiles, media.per_row,
                            self.image_id, lengths)  # fmt: skip


def media_spec(cfg: Config, codec) -> MediaSpec | None:
    """The :class:`MediaSpec` of a branch model with ``vision.enabled`` (None for the GPT)."""
    return MediaSpec(cfg, codec.image, codec.pad) if cfg.vision.enabled else None


def text_logits(model, batch) -> Tensor:
    """Token-aligned logits ``[B, S, V/TP]`` of a :class:`~copd_mega.models.vlm_inputs.VLMBatch`.

    Runs ``LLaVAModel`` (logits ``[B, combined, V/TP]``, every TP rank its vocab shard) and
    gathers position ``text_positions[b, j]``, the logit that predicts token j+1 of row b.
    """
    out, _ = model(**batch.forward_kwargs())
    idx = batch.text_positions.unsqueeze(-1).expand(-1, -1, out.shape[-1])
    return out.gather(1, idx)
