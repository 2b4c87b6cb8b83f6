"""Assemble rollouts into the rows of one update and cut them into microbatches.

A training row is one sequence ``[L]`` (prompt + response, right-padded) with a response mask.
GRPO rows carry a sequence advantage; OPD rows carry the teacher's token log-probs, the beta of
the student branch and the id of their teaching edge. Both kinds go into **one** update: the
clipped surrogate sees ``[N, L]`` advantages (sequence advantage repeated, or beta * delta).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Rows:
    """Rows of one update (every tensor has N rows; L is the padded length).

    tokens [N, L] long; mask [N, L] bool (response positions, token-aligned); adv [N] float
    (GRPO rows, 0 on OPD rows); opd [N] bool; teacher_logp [N, L] float32 (OPD rows, 0 elsewhere);
    teacher_topk [N, L, k] long (OPD rows); beta [N] float; edge [N] long (edge index, -1 GRPO).
    """

    tokens: Tensor
    mask: Tensor
    adv: Tensor
    opd: Tensor
    teacher_logp: Tensor
    teacher_topk: Tensor
    beta: Tensor
    edge: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]


def response_mask(prompt_lens: Tensor, lengths: Tensor, width: int) -> Tensor:
    """[N, width] bool, True at token positions ``prompt_len <= t < length``."""
    t = torch.arange(width)
    return (t >= prompt_lens[:, None]) & (t < lengths[:, None])


def pad_to(x: Tensor, width: int, value: float = 0) -> Tensor:
    """Right-pad dim 1 of ``x`` to ``width``."""
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    pad_shape = (x.shape[0], extra, *x.shape[2:])
    return torch.cat([x, x.new_full(pad_shape, value)], dim=1)


def grpo_rows(tokens: Tensor, prompt_lens: Tensor, lengths: Tensor, adv: Tensor, k: int) -> Rows:
    """Rows for the native GRPO batch: ``adv`` [N] sequence advantages."""
    n, width = tokens.shape
    return Rows(
        tokens=tokens.long(),
        mask=response_mask(prompt_lens, lengths, width),
        adv=adv.float(),
        opd=torch.zeros(n, dtype=torch.bool),
        teacher_logp=torch.zeros(n, width),
        teacher_topk=torch.zeros(n, width, k, dtype=torch.long),
        beta=torch.zeros(n),
        edge=torch.full((n,), -1, dtype=torch.long),
    )


def opd_rows(
    tokens: Tensor,
    prompt_lens: Tensor,
    lengths: Tensor,
    teacher_logp: Tensor,
    teacher_topk: Tensor,
    beta: float,
    edge: int,
) -> Rows:
    """Rows for one teaching edge: the student's rollouts on the teacher's prompts."""
    n, width = tokens.shape
    return Rows(
        tokens=tokens.long(),
        mask=response_mask(prompt_lens, lengths, width),
        adv=torch.zeros(n),
        opd=torch.ones(n, dtype=torch.bool),
        teacher_logp=teacher_logp.float(),
        teacher_topk=teacher_topk.long(),
        beta=torch.full((n,), float(beta)),
        edge=torch.full((n,), edge, dtype=torch.long),
    )


def concat_rows(parts: list[Rows], width: int | None = None, pad_id: int = 0) -> Rows:
    """Concatenate row sets, right-padding every tensor to the longest (or ``width``)."""
    width = width or max(p.tokens.shape[1] for p in parts)

    def cat(name: str, value: float = 0) -> Tensor:
        return torch.cat([pad_to(getattr(p, name), width, value) for p in parts])

    return Rows(
        tokens=cat("tokens", pad_id),
        mask=cat("mask", False),
        adv=torch.cat([p.adv for p in parts]),
        opd=torch.cat([p.opd for p in parts]),
        teacher_logp=cat("teacher_logp"),
        teacher_topk=cat("teacher_topk"),
        beta=torch.cat([p.beta for p in parts]),
        edge=torch.cat([p.edge for p in parts]),
    )


def split_microbatches(
    tensors: dict[str, Tensor], size: int, device: torch.device
) -> list[dict[str, Tensor]]:
    """Cut row-aligned tensors (``tokens`` [N, L] among them) into dicts of at most ``size`` rows.

    Adds ``position_ids``; every microbatch keeps the width L (megatron's pipeline schedule
    needs one shape). Tensors move to ``device``.
    """
    n, width = tensors["tokens"].shape
    out = []
    for start in range(0, n, size):
        mb = {k: v[start : start + size].to(device) for k, v in tensors.items()}
        rows = mb["tokens"].shape[0]
        mb["position_ids"] = torch.arange(width, device=device).unsqueeze(0).expand(rows, -1)
        out.append(mb)
    return out


def microbatches(
    rows: Rows, size: int, device: torch.device, extra: dict[str, Tensor] | None = None
) -> list[dict[str, Tensor]]:
    """Training microbatches of :class:`Rows` plus row-aligned ``extra`` tensors
    (``old_logp`` / ``ref_logp`` ``[N, L]``)."""
    names = ("tokens", "mask", "adv", "opd", "teacher_logp", "teacher_topk", "beta", "edge")
    tensors = {k: getattr(rows, k) for k in names} | dict(extra or {})
    return split_microbatches(tensors, size, device)


def sequence_microbatches(tokens: Tensor, size: int, device: torch.device) -> list[dict]:
    """Forward-only microbatches of bare sequences ``[N, L]`` (teacher scoring)."""
    return split_microbatches({"tokens": tokens}, size, device)
