"""The vision-language model's inputs (:mod:`copd_mega.models.vlm`): ``<image>`` placeholders
in the token ids, CLIP-normalised tiles, and the :class:`VLMBatch` one ``LLaVAModel.forward``
takes (:func:`prepare_inputs` for a sampler's prompts, :func:`batch_inputs` for training rows).

One ``<image>`` placeholder per medium; an image is one tile, a video of N frames is one medium
of N tiles, so its placeholder becomes ``N * T`` positions (T = :func:`image_token_count`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from copd_mega.config import Config
from copd_mega.config_llava import CLIP_MEAN, CLIP_STD
from copd_mega.models.gpt import compute_dtype

PLACEHOLDER = -200  # megatron's image position id inside input_ids (DEFAULT_IMAGE_TOKEN_INDEX)


def image_token_count(cfg: Config) -> int:
    """Language-model positions one image (one video frame) occupies: the ViT's patches."""
    return (cfg.vision.image_size // cfg.vision.patch_size) ** 2


@dataclass
class VLMBatch:
    """One microbatch for ``LLaVAModel.forward`` (every rank of the branch passes the same).

    ``images [N, 3, H, W]`` float, CLIP-normalised, every medium's tiles in order (sample 0's
    media in placeholder order, then sample 1's ...); N = 0 for a text-only batch.
    ``num_image_tiles [N_media]`` int32: 1 per image, the frame count per video.
    ``input_ids [B, S]`` long, :data:`PLACEHOLDER` where a medium goes, right-padded.
    ``position_ids [B, S]``: 0..S-1 (RoPE positions come from the combined sequence).
    ``text_positions [B, S]`` long: where token j of sample b lands in the combined sequence of
    length ``combined_length`` (the model's logits ``[B, combined_length, V/TP]``); for a
    placeholder, the position of its medium's last image token.
    """

    images: torch.Tensor
    num_image_tiles: torch.Tensor
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    text_positions: torch.Tensor
    combined_length: int

    def forward_kwargs(self) -> dict:
        """Keyword arguments of ``LLaVAModel.forward`` (attention mask None: causal)."""
        return dict(
            images=self.images, input_ids=self.input_ids, position_ids=self.position_ids,
            attention_mask=None, num_image_tiles=self.num_image_tiles,
        )  # fmt: skip


def normalize_images(pixels: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> ``(x - mean) / std`` per channel (``vision.image_mean``/
    ``image_std``: the image processor's; CLIP's by default)."""
    mean = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def with_placeholders(
    token_ids: list[int], num_media: int, image_token_id: int, bos_id: int | None = None
) -> list[int]:
    """Prompt ids with one ``<image>`` per medium at the front (after a leading ``bos_id``).

    The data pipeline's prompts carry no placeholder; LLaVA puts the media before the text.
    """
    ids = list(token_ids)
    head = 1 if bos_id is not None and ids[:1] == [bos_id] else 0
    return ids[:head] + [image_token_id] * num_media + ids[head:]


def _media_tiles(item: torch.Tensor, size: int, where: str) -> torch.Tensor:
    """One medium as ``[tiles, 3, size, size]``; an image is one tile, a video one per frame."""
    tiles = item.unsqueeze(0) if item.dim() == 3 else item
    if tiles.dim() != 4 or tuple(tiles.shape[1:]) != (3, size, size) or tiles.shape[0] < 1:
        raise ValueError(
            f"{where}: shape {tuple(item.shape)}; give an image [3, {size}, {size}] or a video "
            f"[frames, 3, {size}, {size}] (resize to vision.image_size={size} when reading data)"
        )
    lo, hi = float(tiles.min()), float(tiles.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"{where}: pixel values span [{lo:.3g}, {hi:.3g}]; pass floats in [0, 1] "
            "(prepare_inputs applies the CLIP normalisation itself)"
        )
    return tiles.float()


def prepare_inputs(
    cfg: Config,
    prompts: list[list[int]],
    media: list[list[torch.Tensor]],
    image_token_id: int,
    pad_id: int = 0,
    device: torch.device | str | None = None,
) -> VLMBatch:
    """Build a :class:`VLMBatch` from token ids with ``<image>`` placeholders and their media.

    ``prompts[b]``: sample b's ids, with ``image_token_id`` once per medium (see
    :func:`with_placeholders`); samples are right-padded with ``pad_id``. ``media[b]``: its media
    in placeholder order, each an image ``[3, H, W]`` or a video's frames ``[N, 3, H, W]``, float
    in [0, 1] at ``H = W = vision.image_size``; ``[]`` for a text-only sample. Images land in
    the compute dtype (bf16 on GPU); ids are int64. Raises ValueError naming the fix.
    """
    if len(prompts) != len(media):
        raise ValueError(
            f"{len(prompts)} prompts but {len(media)} media lists; give one per prompt"
        )
    size = cfg.vision.image_size
    seq = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), seq), pad_id, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    slots = (ids == image_token_id).sum(dim=1).tolist()  # host ids: no device sync
    tiles = []
    for b, items in enumerate(media):
        if slots[b] != len(items):
            raise ValueError(
                f"sample {b}: {slots[b]} <image> placeholders (id {image_token_id}) for "
                f"{len(items)} media; put one placeholder per image or video (with_placeholders)"
            )
        tiles += [
            _media_tiles(item, size, f"sample {b} medium {k}") for k, item in enumerate(items)
        ]
    pixels = torch.cat(tiles) if tiles else torch.zeros(0, 3, size, size)
    counts = torch.tensor([t.shape[0] for t in tiles], dtype=torch.long)
    per_row = torch.tensor([len(items) for items in media], dtype=torch.long)
    ids = ids.to(torch.device(device) if device is not None else torch.device("cpu"))
    return batch_inputs(
        cfg, ids, pixels, counts, per_row, image_token_id, [len(p) for p in prompts]
    )


def batch_inputs(
    cfg: Config,
    ids: torch.Tensor,
    pixels: torch.Tensor,
    tiles: torch.Tensor,
    per_row: torch.Tensor,
    image_token_id: int,
    lengths: list[int] | None = None,
) -> VLMBatch:
    """A :class:`VLMBatch` from rows already on the device, without a host sync or per-token work.

    ``ids [B, S]`` long on the compute device, ``image_token_id`` once per medium; ``pixels
    [T, 3, H, W]`` float in [0, 1] (host), every medium's tiles in row order; ``tiles [M]`` and
    ``per_row [B]`` long (host): tiles per medium and media per row. ``lengths``: each row's real
    length (host ints; None: all S). Only the real positions must fit ``model.max_seq_length``:
    a short media row padded to a long text row's width S is truncated after its real end, as
    megatron's ``LLaVAModel`` truncates the combined sequence (its padding positions' logits are
    then read at the last kept position; their mask is 0). Raises ValueError naming the fix.
    """
    size, per_tile, limit = cfg.vision.image_size, image_token_count(cfg), cfg.model.max_seq_length
    rows, seq = ids.shape
    dev = ids.device
    if tuple(pixels.shape[1:]) != (3, size, size):
        raise ValueError(f"media tiles of shape {tuple(pixels.shape[1:])}; give images [3, {size}, "
                         f"{size}] (resize to vision.image_size={size} when reading data)")  # fmt: skip
    if pixels.numel():
        lo, hi = (float(x) for x in pixels.aminmax())  # host pixels: no device sync
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"pixel values span [{lo:.3g}, {hi:.3g}]; pass floats in [0, 1] "
                             "(prepare_inputs applies the CLIP normalisation itself)")  # fmt: skip
    owner = torch.repeat_interleave(torch.arange(rows), per_row)  # positions media add per row
    extra = torch.zeros(rows, dtype=torch.long).index_add_(0, owner, tiles.long() * per_tile - 1)
    real = torch.tensor(lengths if lengths is not None else [seq] * rows, dtype=torch.long)
    need = int((real + extra).max()) if rows else 0
    if need > limit:
        raise ValueError(
            f"the batch needs {need} positions ({per_tile} per image/frame) but "
            f"model.max_seq_length={limit}; raise it, or use fewer frames "
            "(vision.frames_per_video) or a smaller vision.image_size"
        )
    combined = min(seq + int(extra.max()) if rows else seq, limit)
    is_slot = ids == image_token_id
    lens = torch.ones_like(ids)
    if tiles.numel():  # the k-th placeholder (row-major) takes medium k's positions
        counts = (tiles.long() * per_tile).to(dev, non_blocking=True)
        order = (is_slot.flatten().cumsum(0) - 1).clamp(0, tiles.numel() - 1).view(rows, seq)
        lens = torch.where(is_slot, counts[order], lens)
    text_positions = (lens.cumsum(dim=1) - 1).clamp(max=combined - 1)
    return VLMBatch(
        images=normalize_images(pixels.float(), cfg.vision.image_mean, cfg.vision.image_std).to(
            device=dev, dtype=compute_dtype(cfg)
        ),
        num_image_tiles=tiles.to(torch.int32).to(dev, non_blocking=True),
        input_ids=ids.masked_fill(is_slot, PLACEHOLDER),
        position_ids=torch.arange(seq, device=dev).unsqueeze(0).expand(rows, seq),
        text_positions=text_positions,
        combined_length=combined,
    )
