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
    lengths [N] long: each row's real length (prompt + response); None: every row is L long.
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
    lengths: Tensor | None = None

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
        lengths=lengths.long().to(dev),
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
        lengths=torch.cat([p.lengths for p in parts])
        if all(p.lengths is not None for p in parts) else None,
    )  # fmt: skip


def split_microbatches(
    tensors: dict[str, Tensor],
    size: int,
    device: torch.device,
    media: RowMedia | None = None,
    lengths: list[int] | None = None,
    multiple: int = 1,
) -> list[dict]:
    """Cut row-aligned tensors (``tokens`` [N, L] among them) into dicts of at most ``size`` rows.

    ``lengths`` (host ints, one per row): each microbatch is cut to its own longest row, rounded
    up to ``multiple`` (TP under sequence parallelism; zero-padded past L if needed); every
    ``[N, L, ...]`` tensor is cut with the tokens. A causal model's logits at a real position do
    not depend on the padding after it, so the cut changes no real value. None: every
    microbatch keeps the width L. Adds ``position_ids`` and ``row_lengths`` (host ints, with
    ``lengths``). Tensors move to ``device``. ``media`` (the N rows' images/video): each
    microbatch gets its rows' as ``media``.
    """
    n, full = tensors["tokens"].shape
    out = []
    for start in range(0, n, size):
        end = min(start + size, n)
        width = full
        if lengths is not None:
            width = -(-max(1, *lengths[start:end]) // multiple) * multiple
        mb = {k: _fit(v[start:end], full, width).to(device) for k, v in tensors.items()}
        mb["position_ids"] = torch.arange(width, device=device).unsqueeze(0).expand(end - start, -1)
        if lengths is not None:
            mb["row_lengths"] = lengths[start:end]
        out.append(mb)
    return _with_media(out, media, size)


def _fit(v: Tensor, full: int, width: int) -> Tensor:
    """``v`` cut (or zero-padded) along dim 1 to ``width`` when it is a per-position tensor."""
    if v.dim() < 2 or v.shape[1] != full or width == full:
        return v
    return v[:, :width] if width < full else pad_to(v, width)


def length_order(rows: Rows) -> list[int]:
    """Row indices longest first (stable): microbatches of similar lengths pad least."""
    lengths = rows.lengths.tolist()
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def select_rows(rows: Rows, order: list[int], extra: dict[str, Tensor]) -> tuple[Rows, dict]:
    """``rows`` (and the row-aligned ``extra``) in the row order ``order`` (a permutation);
    ``teacher_topk`` follows its OPD rows."""
    idx = torch.tensor(order, dtype=torch.long, device=rows.tokens.device)
    topk = rows.teacher_topk
    if topk is not None:
        rank, k = {}, 0
        for i, e in enumerate(rows.row_edges):
            if e >= 0:
                rank[i], k = k, k + 1
        topk = topk[torch.tensor([rank[i] for i in order if i in rank], dtype=torch.long,
                                 device=topk.device)]  # fmt: skip

    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[idx.to(t.device)]

    out = Rows(
        tokens=pick(rows.tokens), mask=pick(rows.mask), adv=pick(rows.adv), opd=pick(rows.opd),
        teacher_logp=pick(rows.teacher_logp), beta=pick(rows.beta), edge=pick(rows.edge),
        row_edges=[rows.row_edges[i] for i in order], teacher_topk=topk,
        sampler_logp=pick(rows.sampler_logp),
        media=None if rows.media is None else rows.media.select(order), lengths=pick(rows.lengths),
    )  # fmt: skip
    return out, {k: pick(v) for k, v in extra.items()}


def microbatches(
    rows: Rows,
    size: int,
    device: torch.device,
    extra: dict[str, Tensor] | None = None,
    by_length: bool = False,
    multiple: int = 1,
) -> list[dict]:
    """Training microbatches of :class:`Rows` plus row-aligned ``extra`` tensors
    (``old_logp`` / ``ref_logp`` ``[N, L]``).

    Each microbatch is as wide as its longest row (``rows.lengths``; one host sync per call),
    rounded up to ``multiple``. ``by_length``: rows are ordered longest first before cutting
    (the loss is a sum over rows, so the order changes no result beyond float summation).
    Each microbatch also carries host metadata: ``opd_rows`` (its rows that are OPD rows, local
    indices) and ``opd_index`` (the same on the device, made before the forward), ``edges`` (the
    teaching edges it holds) and, when the rows have top-k ids, ``teacher_topk``
    ``[len(opd_rows), W, k]`` for exactly those rows; vision rows' ``media`` (a ``RowMedia`` of
    its rows).
    """
    extra = dict(extra or {})
    if by_length and rows.lengths is not None:
        rows, extra = select_rows(rows, length_order(rows), extra)
    names = ("tokens", "mask", "adv", "opd", "teacher_logp", "beta", "edge")
    tensors = {k: getattr(rows, k) for k in names} | extra
    if rows.sampler_logp is not None:
        tensors["sampler_logp"] = rows.sampler_logp
    lengths = rows.lengths.tolist() if rows.lengths is not None else None
    out = split_microbatches(tensors, size, device, rows.media, lengths, multiple)
    seen = 0  # OPD rows before this microbatch: its offset into teacher_topk
    full = rows.tokens.shape[1]
    for i, mb in enumerate(out):
        own = rows.row_edges[i * size : i * size + mb["tokens"].shape[0]]
        mb["opd_rows"] = [j for j, e in enumerate(own) if e >= 0]
        mb["opd_index"] = torch.tensor(mb["opd_rows"], dtype=torch.long).to(device)
        mb["edges"] = sorted({e for e in own if e >= 0})
        if rows.teacher_topk is not None:
            topk = rows.teacher_topk[seen : seen + len(mb["opd_rows"])]
            mb["teacher_topk"] = _fit(topk, full, mb["tokens"].shape[1]).to(device)
        seen += len(mb["opd_rows"])
    return out


def sequence_microbatches(
    tokens: Tensor,
    size: int,
    device: torch.device,
    media: RowMedia | None = None,
    lengths: list[int] | None = None,
    multiple: int = 1,
) -> list[dict]:
    """Forward-only microbatches of sequences ``[N, L]`` and their media (teacher scoring), each
    as wide as its longest row when ``lengths`` (host ints) are given."""
    return split_microbatches({"tokens": tokens}, size, device, media, lengths, multiple)


def _with_media(mbs: list[dict], media: RowMedia | None, size: int) -> list[dict]:
    """Give each microbatch of ``size`` rows the ``media`` of its rows (None: text rows)."""
    if media is not None:
        for i, mb in enumerate(mbs):
            mb["media"] = media.rows(i * size, i * size + mb["tokens"].shape[0])
    return mbs
