"""Advantages, the clipped policy-gradient surrogate and the behavioural-overlap diagnostic.

Pure functions of tensors: no collectives, no optimizer, no model. Every loss returns
``(loss, metrics)`` where ``loss`` is a 0-dim tensor carrying the graph and ``metrics`` holds
detached Python floats. They run wherever the log-probs live (last PP stage, every TP rank,
with vocab-parallel log-probs already gathered to the sampled token).

How this departs from, or pins down, the paper (see docs/method.md):
- GRPO normalises with the *population* std of the group (``unbiased=False``); a group whose
  rewards are all equal gets exactly 0 advantage (no learning signal), not ``0 / eps``.
- The OPD token advantage ``beta * (log pi_teacher - log pi_student)`` goes through the same
  clipped surrogate as GRPO (our default), so GRPO and OPD rows can share one batch.
- ``token_mean`` takes a caller-supplied ``normalizer`` so that summing the per-microbatch
  losses over microbatches and DP ranks gives the true global token mean (instead of a mean of
  per-microbatch means, which over-weights short microbatches).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["token_mean", "seq_mean"]
AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean")


def _float_dtype(t: Tensor) -> torch.dtype:
    """The dtype numerics run in: at least float32 (bf16/fp16/int inputs are upcast)."""
    return torch.promote_types(t.dtype, torch.float32)


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"these tensors must have the same [N, T] shape, got {shapes}")
    first = next(iter(shapes.values()))
    if len(first) != 2:
        raise ValueError(f"expected 2-D [N, T] tensors, got shapes {shapes}")


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is nonzero.

    Args:
        x: any float tensor; positions outside the mask may hold -inf/NaN (they are ignored).
        mask: same shape as ``x``, bool or 0/1 numeric.

    Returns:
        0-dim tensor (dtype of ``x``, at least float32); 0.0 when the mask is empty.
    """
    m = mask.bool()
    vals = torch.where(m, x.to(_float_dtype(x)), 0.0)
    return vals.sum() / m.sum().clamp(min=1)


def grpo_advantages(
    rewards: Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True
) -> Tensor:
    """GRPO sequence advantages ``A_i = (r_i - mean(group)) / (std(group) + eps)``.

    Groups are consecutive blocks of ``group_size`` rollouts of the same prompt. ``std`` is the
    population std (``unbiased=False``). A group whose rewards are all equal gets exactly 0.

    Args:
        rewards: [P*G] rewards, any real dtype.
        group_size: G, rollouts per prompt.
        eps: added to the std.
        scale_by_std: if False, return only the centred reward ``r_i - mean(group)``.

    Returns:
        [P*G] advantages, float32 (float64 if ``rewards`` is float64). No grad.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [P*G], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"grpo.group_size={group_size} does not divide the {rewards.numel()} rewards; "
            "pass rewards as whole groups of grpo.group_size rollouts per prompt"
        )
    r = rewards.detach().to(_float_dtype(rewards)).view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    adv = centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps) if scale_by_std else centred
    all_equal = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(adv), adv).view(-1)


def opd_advantages(
    teacher_logp: Tensor, student_logp: Tensor, beta: float | Tensor, mask: Tensor
) -> Tensor:
    """On-policy-distillation token advantages ``A_t = beta * (teacher_logp - student_logp)``.

    Both log-probs are of the *sampled* token under teacher and student. The result is detached
    (no grad into either model) and exactly 0 where ``mask`` is 0, even if masked positions hold
    -inf or NaN.

    Args:
        teacher_logp: [N, T] float.
        student_logp: [N, T] float.
        beta: scalar, or [N] per-row coefficient (e.g. the student branch's beta_k per row).
        mask: [N, T] bool or 0/1, nonzero on response tokens.

    Returns:
        [N, T] float32 (or wider) advantages.
    """
    _check_same_shape(teacher_logp=teacher_logp, student_logp=student_logp, mask=mask)
    dtype = torch.promote_types(_float_dtype(teacher_logp), _float_dtype(student_logp))
    m = mask.bool()
    delta = torch.where(m, teacher_logp.detach().to(dtype) - student_logp.detach().to(dtype), 0.0)
    if isinstance(beta, Tensor):
        if beta.dim() == 1:
            if beta.numel() != delta.shape[0]:
                raise ValueError(f"beta has {beta.numel()} rows, log-probs have {delta.shape[0]}")
            beta = beta[:, None]
        beta = beta.detach().to(dtype)
    return torch.where(m, beta * delta, 0.0)


def expand_sequence_advantages(adv: Tensor, mask: Tensor) -> Tensor:
    """Broadcast per-sequence advantages to tokens: ``out[i, t] = adv[i]`` on masked tokens.

    Args:
        adv: [N] float sequence advantages (e.g. from ``grpo_advantages``).
        mask: [N, T] bool or 0/1.

    Returns:
        [N, T] advantages (dtype of ``adv``, at least float32), 0 outside the mask.
    """
    if adv.dim() != 1 or mask.dim() != 2 or adv.shape[0] != mask.shape[0]:
        raise ValueError(
            f"expected adv [N] and mask [N, T], got {tuple(adv.shape)}, {tuple(mask.shape)}"
        )
    a = adv.detach().to(_float_dtype(adv))[:, None].expand(mask.shape)
    return torch.where(mask.bool(), a, 0.0)


def loss_units(mask: Tensor, agg: Aggregation = "token_mean") -> Tensor:
    """This rank's share of the ``normalizer`` as a 0-dim int64 tensor on ``mask``'s device
    (no host sync): masked tokens (``token_mean``) or rows with a masked token (``seq_mean``)."""
    m = mask.bool()
    if agg == "token_mean":
        return m.sum()
    if agg == "seq_mean":
        return m.any(dim=1).sum()
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def loss_normalizer(mask: Tensor, agg: Aggregation = "token_mean") -> int:
    """This rank's share of the ``normalizer`` for ``clipped_surrogate``.

    ``token_mean``: number of masked tokens. ``seq_mean``: number of rows with at least one
    masked token. Sum it over microbatches and DP ranks (at the call site) and pass the total as
    ``normalizer`` to make the summed losses equal the global mean. :func:`loss_units` is the
    same count as a device tensor.
    """
    return int(loss_units(mask, agg).item())


def truncated_importance_weights(
    trainer_logp: Tensor, sampler_logp: Tensor, cap: float, mask: Tensor
) -> Tensor:
    """Truncated importance sampling weights ``min(pi_trainer / pi_sampler, cap)`` per token.

    Corrects for the sampler (inference engine, KV cache, other kernels) and the trainer
    assigning different probabilities to the same sampled token: the rollout came from
    ``pi_sampler``, the surrogate assumes ``pi_trainer`` (old policy). The weight multiplies
    the per-token loss, detached; ``cap`` bounds its variance.

    Args:
        trainer_logp: [N, T] the trainer's old-policy log-probs of the sampled tokens.
        sampler_logp: [N, T] the sampler's log-probs of the same tokens.
        cap: C > 0, the truncation.
        mask: [N, T] bool or 0/1; positions outside get weight 0 (inputs there may be -inf/NaN).

    Returns:
        [N, T] float32 (or wider) weights in [0, cap], no grad.
    """
    _check_same_shape(trainer_logp=trainer_logp, sampler_logp=sampler_logp, mask=mask)
    if not cap > 0:
        raise ValueError(f"rollout.tis_cap={cap} must be > 0 to weight tokens (0 turns TIS off)")
    m = mask.bool()
    dtype = torch.promote_types(_float_dtype(trainer_logp), _float_dtype(sampler_logp))
    log_ratio = torch.where(
        m, trainer_logp.detach().to(dtype) - sampler_logp.detach().to(dtype), 0.0
    )
    return torch.where(m, torch.exp(log_ratio).clamp(max=cap), 0.0)


def _aggregate(per_token: Tensor, m: Tensor, agg: str, normalizer: float | None) -> Tensor:
    """Reduce a masked [N, T] per-token loss (already 0 outside ``m``) to a scalar."""
    if normalizer is not None and not normalizer > 0:
        raise ValueError(
            f"normalizer must be > 0 (a global count of tokens/sequences), got {normalizer}"
        )
    if agg == "token_mean":
        denom = normalizer if normalizer is not None else m.sum().clamp(min=1)
        return per_token.sum() / denom
    if agg == "seq_mean":
        per_seq = per_token.sum(dim=1) / m.sum(dim=1).clamp(min=1)
        denom = normalizer if normalizer is not None else m.any(dim=1).sum().clamp(min=1)
        return per_seq.sum() / denom
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    agg: Aggregation = "token_mean",
    normalizer: float | Tensor | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    token_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy-gradient surrogate shared by GRPO and OPD rows.

    Per token: ``rho = exp(logp - old_logp)``,
    ``loss_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)``, plus
    ``kl_coef * k3`` with ``k3 = exp(ref - logp) - (ref - logp) - 1`` when ``ref_logp`` is given
    and ``kl_coef > 0``; the policy term is multiplied by ``token_weight`` when given (truncated
    importance sampling, :func:`truncated_importance_weights`). Gradient flows only through
    ``logp``.

    Aggregation: ``token_mean`` = sum over masked tokens / (``normalizer`` or the local masked
    token count); ``seq_mean`` = sum over rows of the row's masked token mean / (``normalizer``
    or the local number of rows with any masked token). See ``loss_normalizer``.

    Args:
        logp: [N, T] float log-prob of the sampled token under the current policy (with grad).
        old_logp: [N, T] float log-prob under the rollout-time policy.
        advantages: [N] per-sequence or [N, T] per-token float advantages (GRPO rows repeat the
            sequence advantage, OPD rows hold per-token advantages).
        mask: [N, T] bool or 0/1, nonzero on response tokens. Masked-out positions may hold
            -inf/NaN in any input; they contribute 0 to the loss and to the gradient.
        ref_logp: optional [N, T] float reference-policy log-prob.
        token_weight: optional [N, T] non-negative per-token weight of the policy term.

    Returns:
        ``(loss, metrics)``: loss is a 0-dim float32 tensor; metrics are detached 0-dim tensors
        over this call's masked tokens (no host sync): ``clip_frac``, ``approx_kl`` (mean of
        old_logp - logp), ``ratio_mean`` and ``kl`` (mean k3) when the KL term is used.
    """
    _check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    m = mask.bool()
    dtype = _float_dtype(logp)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(logp.shape)
    if advantages.shape != logp.shape:
        raise ValueError(
            f"advantages must be [N] or [N, T]={tuple(logp.shape)}, got {tuple(advantages.shape)}"
        )
    # Zero every masked-out input *before* arithmetic: where() blocks NaN in the forward pass,
    # but a NaN/inf operand would still turn the zero upstream gradient into NaN.
    adv = torch.where(m, advantages.detach().to(dtype), 0.0)
    log_ratio = torch.where(m, logp.to(dtype) - old_logp.detach().to(dtype), 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if token_weight is not None:
        _check_same_shape(logp=logp, token_weight=token_weight)
        per_token = per_token * torch.where(m, token_weight.detach().to(dtype), 0.0)

    use_kl = ref_logp is not None and kl_coef > 0
    if use_kl:
        _check_same_shape(logp=logp, ref_logp=ref_logp)
        d = torch.where(m, ref_logp.detach().to(dtype) - logp.to(dtype), 0.0)
        k3 = torch.exp(d) - d - 1.0
        per_token = per_token + kl_coef * k3
    loss = _aggregate(torch.where(m, per_token, 0.0), m, agg, normalizer)

    with torch.no_grad():
        stats = [
            masked_mean((clipped < unclipped).to(dtype), m),
            masked_mean(-log_ratio, m),
            masked_mean(ratio, m),
        ]
        names = ["clip_frac", "approx_kl", "ratio_mean"]
        if use_kl:
            stats.append(masked_mean(k3, m))
            names.append("kl")
    return loss, dict(zip(names, stats, strict=True))


def topk_overlap(student_topk: Tensor, teacher_topk: Tensor, mask: Tensor) -> Tensor:
    """Behavioural overlap: mean over masked positions of ``|TopK(s) ∩ TopK(t)| / k``.

    Order inside each top-k list is irrelevant; ids within one list are assumed distinct.
    Counted by sorting the 2k ids of a position and counting equal neighbours, which needs
    O(2k) memory per position instead of the O(k^2) of a pairwise comparison.

    Args:
        student_topk: [N, T, k] int64 token ids of the student's top-k at each position.
        teacher_topk: [N, T, k] int64 token ids of the teacher's top-k at the same positions.
        mask: [N, T] bool or 0/1, nonzero on positions to average over.

    Returns:
        0-dim float32 tensor in [0, 1]; 0.0 when the mask is empty.
    """
    if student_topk.shape != teacher_topk.shape or student_topk.dim() != 3:
        raise ValueError(
            f"expected equal [N, T, k] top-k tensors, got {tuple(student_topk.shape)} "
            f"and {tuple(teacher_topk.shape)}"
        )
    if tuple(mask.shape) != tuple(student_topk.shape[:2]):
        raise ValueError(
            f"mask must be [N, T]={tuple(student_topk.shape[:2])}, got {tuple(mask.shape)}"
        )
    k = student_topk.shape[-1]
    ids, _ = torch.sort(torch.cat([student_topk, teacher_topk], dim=-1), dim=-1)
    shared = (ids[..., 1:] == ids[..., :-1]).sum(dim=-1)
    return masked_mean(shared.to(torch.float32) / k, mask)
