"""Assemble rollouts into the rows of one update and cut them into microbatches.

A training row is one sequence ``[L]`` (prompt + response, right-padded) with a response mask.
GRPO rows carry a sequence advantage; OPD rows carry the teacher's token log-probs and top-k
ids (only OPD rows hold top-k: no dense zero top-k for GRPO rows), the beta of the student branch
and the id of their teaching edge. Every row may carry the sampler's log-probs of its tokens
(train/inference mismatch telemetry and truncated importance sampling). Both kinds go into
**one** update: the clipped surrogate sees ``[N, L]`` advantages (sequence advantage repeated,
or beta * delta). Rows stay on the device the rollouts came from; only the microbatch
bookkeeping (which rows are OPD rows, which edges) is on the host, so no step syncs for it.
Vision rows own their media (``Rows.media``, a ``RowMedia``): they are joined, cut and carried
into every microbatch with the tokens, so a text row and an image row look the same to the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from copd_mega.models.multimodal import RowMedia


@dataclass
class Rows:
    """Rows of one update (every tensor has N rows; L is the padded length), on one device.

    tokens [N, L] long; mask [N, L] bool (response positions, token-aligned); adv [N] float
    (GRPO rows, 0 on OPD rows); opd [N] bool; teacher_logp [N, L] float32 (OPD rows, 0 elsewhere);
    beta [N] float; edge [N] long (edge index, -1 GRPO). ``row_edges`` is ``edge`` as a host list,
    so microbatching decides which edges a microbatch holds without a device sync.
    teacher_topk [M, L, k] long holds the teacher's top-k ids of the M OPD rows only, in row
    order (None without OPD rows, or where no teacher scores exist: off the last PP stage).
    sampler_logp [N, L] float32: the sampler's log-probs of the same tokens (None when unknown).
    media: the rows' images/video (``vision.enabled``; on the host), None for the text model.
    """

    tokens: Tensor
    mask: Tensor
    adv: Tensor
    opd: Tensor
    teacher_logp: Tensor
    beta: Tensor
    edge: Tensor
    row_edges: list[int]
    teacher_topk: Tensor | None = None
    sampler_logp: Tensor | None = None
    media: RowMedia | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]


def response_mask(prompt_lens: Tensor, lengths: Tensor, width: int) -> Tensor:
    """[N, width] bool, True at token positions ``prompt_len <= t < length`` (their device)."""
    t = torch.arange(width, device=lengths.device)
    return (t >= prompt_lens[:, None]) & (t < lengths[:, None])


def pad_to(x: Tensor, width: int, value: float = 0) -> Tensor:
    """Right-pad dim 1 of ``x`` to ``width``."""
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    pad_shape = (x.shape[0], extra, *x.shape[2:])
    return torch.cat([x, x.new_full(pad_shape, value)], dim=1)


def _rows(
    tokens, prompt_lens, lengths, adv, teacher_logp, beta, edge, topk, sampler, media
) -> Rows:
    n, width = tokens.shape
    dev = tokens.device
    return Rows(
        tokens=tokens.long(),
        mask=response_mask(prompt_lens.to(dev), lengths.to(dev), width),
        adv=adv.float().to(dev),
        opd=torch.full((n,), edge >= 0, dtype=torch.bool, device=dev),
        teacher_logp=teacher_logp.float().to(dev),
        beta=torch.full((n,), float(beta), device=dev),
        edge=torch.full((n,), edge, dtype=torch.long, device=dev),
        row_edges=[edge] * n,
        teacher_topk=None if topk is None else topk.long().to(dev),
        sampler_logp=None if sampler is None else sampler.float().to(dev),
        media=media,
    )


def grpo_rows(
    tokens: Tensor,
    prompt_lens: Tensor,
    lengths: Tensor,
    adv: Tensor,
    sampler_logp: Tensor | None = None,
    media: RowMedia | None = None,
) -> Rows:
    """Rows for the native GRPO batch: ``adv`` [N] sequence advantages (no top-k)."""
    n, width = tokens.shape
    zeros = torch.zeros(n, width, device=tokens.device)
    return _rows(tokens, prompt_lens, lengths, adv, zeros, 0.0, -1, None, sampler_logp, media)


def opd_rows(
    tokens: Tensor,
    prompt_lens: Tensor,
    lengths: Tensor,
    teacher_logp: Tensor,
    teacher_topk: Tensor | None,
    beta: float,
    edge: int,
    sampler_logp: Tensor | None = None,
    media: RowMedia | None = None,
) -> Rows:
    """Rows for one teaching edge (``edge`` >= 0): the student's rollouts on the teacher's
    prompts, with the teacher's log-probs ``[N, L]`` and top-k ids ``[N, L, k]`` (or None)."""
    n = tokens.shape[0]
    adv = torch.zeros(n, device=tokens.device)
    return _rows(tokens, prompt_lens, lengths, adv, teacher_logp, beta, edge, teacher_topk,
                 sampler_logp, media)  # fmt: skip


def concat_rows(parts: list[Rows], width: int | None = None, pad_id: int = 0) -> Rows:
    """Concatenate row sets, right-padding every tensor to the longest (or ``width``).

    ``teacher_topk`` joins the parts that have one; ``sampler_logp`` is kept only when every
    part has it; ``media`` joins in row order (every part has media, or none has).
    """
    width = width or max(p.tokens.shape[1] for p in parts)
    has_media = [p.media is not None for p in parts]
    if any(has_media) and not all(has_media):
        raise ValueError("concat_rows: some parts carry media and some do not; every branch of "
                         "a vision job builds rows with media")  # fmt: skip

    def cat(name: str, value: float = 0) -> Tensor:
        return torch.cat([pad_to(getattr(p, name), width, value) for p in parts])

    topk = [pad_to(p.teacher_topk, width) for p in parts if p.teacher_topk is not None]
    return Rows(
        tokens=cat("tokens", pad_id),
        mask=cat("mask", False),
        adv=torch.cat([p.adv for p in parts]),
        opd=torch.cat([p.opd for p in parts]),
        teacher_logp=cat("teacher_logp"),
        beta=torch.cat([p.beta for p in parts]),
        edge=torch.cat([p.edge for p in parts]),
        row_edges=[e for p in parts for e in p.row_edges],
        teacher_topk=torch.cat(topk) if topk else None,
        sampler_logp=cat("sampler_logp") if all(p.sampler_logp is not None for p in parts)
        else None,
        media=RowMedia.cat([p.media for p in parts]) if all(has_media) else None,
    )  # fmt: skip


def split_microbatches(
    tensors: dict[str, Tensor],
    size: int,
    device: torch.device,
    media: RowMedia | None = None,
) -> list[dict]:
    """Cut row-aligned tensors (``tokens`` [N, L] among them) into dicts of at most ``size`` rows.

    Adds ``position_ids``; every microbatch keeps the width L (megatron's pipeline schedule
    needs one shape). Tensors move to ``device``. ``media`` (the N rows' images/video): each
    microbatch gets its rows' as ``media``.
    """
    n, width = tensors["tokens"].shape
    out = []
    for start in range(0, n, size):
        mb = {k: v[start : start + size].to(device) for k, v in tensors.items()}
        rows = mb["tokens"].shape[0]
        mb["position_ids"] = torch.arange(width, device=device).unsqueeze(0).expand(rows, -1)
        out.append(mb)
    return _with_media(out, media, size)


def microbatches(
    rows: Rows, size: int, device: torch.device, extra: dict[str, Tensor] | None = None
) -> list[dict]:
    """Training microbatches of :class:`Rows` plus row-aligned ``extra`` tensors
    (``old_logp`` / ``ref_logp`` ``[N, L]``).

    Each microbatch also carries host metadata: ``opd_rows`` (its rows that are OPD rows, local
    indices), ``edges`` (the teaching edges it holds) and, when the rows have top-k ids,
    ``teacher_topk`` ``[len(opd_rows), L, k]`` for exactly those rows; vision rows' ``media``
    (a ``RowMedia`` of its rows).
    """
    names = ("tokens", "mask", "adv", "opd", "teacher_logp", "beta", "edge")
    tensors = {k: getattr(rows, k) for k in names} | dict(extra or {})
    if rows.sampler_logp is not None:
        tensors["sampler_logp"] = rows.sampler_logp
    out = split_microbatches(tensors, size, device, rows.media)
    seen = 0  # OPD rows before this microbatch: its offset into teacher_topk
    for i, mb in enumerate(out):
        own = rows.row_edges[i * size : i * size + mb["tokens"].shape[0]]
        mb["opd_rows"] = [j for j, e in enumerate(own) if e >= 0]
        mb["edges"] = sorted({e for e in own if e >= 0})
        if rows.teacher_topk is not None:
            mb["teacher_topk"] = rows.teacher_topk[seen : seen + len(mb["opd_rows"])].to(device)
        seen += len(mb["opd_rows"])
    return out


def sequence_microbatches(
    tokens: Tensor, size: int, device: torch.device, media: RowMedia | None = None
) -> list[dict]:
    """Forward-only microbatches of sequences ``[N, L]`` and their media (teacher scoring)."""
    return split_microbatches({"tokens": tokens}, size, device, media)


def _with_media(mbs: list[dict], media: RowMedia | None, size: int) -> list[dict]:
    """Give each microbatch of ``size`` rows the ``media`` of its rows (None: text rows)."""
    if media is not None:
        for i, mb in enumerate(mbs):
            mb["media"] = media.rows(i * size, i * size + mb["tokens"].shape[0])
    return mbs
