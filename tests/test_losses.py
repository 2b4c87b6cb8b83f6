"""CPU unit tests of copd_mega.rl.losses against hand-computed numbers."""

import math

import pytest
import torch

from copd_mega.rl.losses import (
    clipped_surrogate,
    expand_sequence_advantages,
    grpo_advantages,
    loss_normalizer,
    masked_mean,
    opd_advantages,
    topk_overlap,
    truncated_importance_weights,
)

INF = float("inf")
NAN = float("nan")


def clipped_surrogate_loss(*args, **kwargs):
    """``clipped_surrogate`` with its metrics as Python floats."""
    loss, stats = clipped_surrogate(*args, **kwargs)
    return loss, {k: float(v) for k, v in stats.items()}


def close(a, b, tol=1e-5):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64),
        torch.as_tensor(b, dtype=torch.float64),
        atol=tol,
        rtol=0,
    )


# --- GRPO advantages -------------------------------------------------------------------------


def test_grpo_advantages_hand_computed():
    # Group 1 [1,0,0,1]: mean 0.5, population std 0.5 -> +-0.5/0.5 = +-1.
    # Group 2 [1,1,1,1]: all equal -> exactly 0.
    # Group 3 [1,0,0,0]: mean 0.25, var (0.75^2 + 3*0.25^2)/4 = 0.1875, std = sqrt(3)/4
    #   -> 0.75/(sqrt(3)/4) = sqrt(3) = 1.7320508, -0.25/(sqrt(3)/4) = -1/sqrt(3) = -0.5773503.
    r = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.float32)
    adv = grpo_advantages(r, group_size=4, eps=0.0)
    s3, i3 = math.sqrt(3), 1 / math.sqrt(3)
    assert close(adv, [1, -1, -1, 1, 0, 0, 0, 0, s3, -i3, -i3, -i3])
    assert adv.dtype == torch.float32
    # The default eps shrinks them a hair: 0.5 / (0.5 + 1e-6).
    assert close(grpo_advantages(r, 4)[0], 0.5 / 0.500001, tol=1e-7)


def test_grpo_advantages_unscaled_and_equal_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert close(grpo_advantages(r, 4, scale_by_std=False), [0.75, -0.25, -0.25, -0.25])
    # 0.1 is not exactly representable; the mean of three of them may differ from 0.1 by an ulp,
    # which (r - mean) / (0 + eps) would blow up to ~1e-11. Equal groups must be exactly 0.
    eq = grpo_advantages(torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7]), 3)
    assert torch.equal(eq, torch.zeros(6))
    assert grpo_advantages(torch.tensor([1, 0]), 2).dtype == torch.float32  # int rewards ok


def test_grpo_group_size_error_names_field():
    with pytest.raises(ValueError, match="grpo.group_size"):
        grpo_advantages(torch.zeros(10), group_size=4)
    with pytest.raises(ValueError, match="grpo.group_size"):
        grpo_advantages(torch.zeros(4), group_size=0)


# --- OPD advantages --------------------------------------------------------------------------


def test_opd_advantages_hand_computed():
    # beta 0.5: (-1 - -1.5) * 0.5 = 0.25; (-2 - -1) * 0.5 = -0.5; masked -inf -> 0.
    teacher = torch.tensor([[-1.0, -2.0, -INF]])
    student = torch.tensor([[-1.5, -1.0, -INF]])
    mask = torch.tensor([[1, 1, 0]])
    adv = opd_advantages(teacher, student, 0.5, mask)
    assert torch.equal(adv, torch.tensor([[0.25, -0.5, 0.0]]))
    # Per-row beta: row 0 beta 0.5 -> as above; row 1 beta 2: (-3 - -1) * 2 = -4, masked NaN -> 0.
    teacher2 = torch.tensor([[-1.0, -2.0, -INF], [-3.0, NAN, 5.0]])
    student2 = torch.tensor([[-1.5, -1.0, -INF], [-1.0, -INF, NAN]])
    mask2 = torch.tensor([[True, True, False], [True, False, False]])
    adv2 = opd_advantages(teacher2, student2, torch.tensor([0.5, 2.0]), mask2)
    assert torch.equal(adv2, torch.tensor([[0.25, -0.5, 0.0], [-4.0, 0.0, 0.0]]))


def test_opd_advantages_detached():
    teacher = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    student = torch.tensor([[-1.5, -1.0]], requires_grad=True)
    adv = opd_advantages(teacher, student, 1.0, torch.ones(1, 2))
    assert not adv.requires_grad


def test_expand_sequence_advantages():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = expand_sequence_advantages(torch.tensor([2.0, -1.0]), mask)
    assert torch.equal(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


# --- clipped surrogate -----------------------------------------------------------------------

# Six tokens, old_logp = 0, eps_low 0.2, eps_high 0.28 (clip range [0.8, 1.28]):
#   rho  A    min(rho*A, clip(rho)*A)        loss_t  clipped?  d loss_t / d logp_t
#   1.5  +1   min(1.5, 1.28)   = 1.28        -1.28   yes       0
#   0.5  +1   min(0.5, 0.8)    = 0.5         -0.5    no        -A*rho = -0.5
#   1.1  -1   min(-1.1, -1.1)  = -1.1        +1.1    no        +1.1
#   0.7  -1   min(-0.7, -0.8)  = -0.8        +0.8    yes       0
#   1.5  -1   min(-1.5, -1.28) = -1.5        +1.5    no        +1.5
#   1.0  +2   min(2, 2)        = 2           -2.0    no        -2.0
# token_mean = (-1.28 - 0.5 + 1.1 + 0.8 + 1.5 - 2.0) / 6 = -0.38 / 6 = -0.0633333
# clip_frac = 2/6; ratio_mean = 6.3/6 = 1.05
# approx_kl = mean(-ln rho) = -(ln1.5 + ln0.5 + ln1.1 + ln0.7 + ln1.5 + 0)/6
#           = -(0.405465 - 0.693147 + 0.095310 - 0.356675 + 0.405465)/6 = 0.143582/6 = 0.0239303
RHO = [1.5, 0.5, 1.1, 0.7, 1.5, 1.0]
ADV = [1.0, 1.0, -1.0, -1.0, -1.0, 2.0]


def _six_tokens():
    logp = torch.log(torch.tensor([RHO])).requires_grad_(True)
    old = torch.zeros(1, 6, requires_grad=True)
    adv = torch.tensor([ADV], requires_grad=True)
    return logp, old, adv, torch.ones(1, 6)


def test_clipped_surrogate_hand_computed_both_sides():
    logp, old, adv, mask = _six_tokens()
    loss, metrics = clipped_surrogate_loss(logp, old, adv, mask)
    assert close(loss, -0.38 / 6)
    assert close(metrics["clip_frac"], 2 / 6)
    assert close(metrics["ratio_mean"], 1.05)
    assert close(metrics["approx_kl"], 0.0239303)
    assert "kl" not in metrics
    assert all(isinstance(v, float) for v in metrics.values())


def test_gradient_flows_only_through_logp():
    logp, old, adv, mask = _six_tokens()
    loss, _ = clipped_surrogate_loss(logp, old, adv, mask)
    loss.backward()
    # Clipped tokens get no gradient; unclipped ones get -A*rho / 6 (see table above).
    assert close(logp.grad, [[0.0, -0.5 / 6, 1.1 / 6, 0.0, 1.5 / 6, -2.0 / 6]])
    assert old.grad is None and adv.grad is None


def test_sequence_advantages_broadcast_like_expanded():
    # Row advantage [N] is the same as repeating it on each token.
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.1, 0.7]]))
    mask = torch.ones(2, 2)
    a = torch.tensor([1.0, -1.0])
    l1, m1 = clipped_surrogate_loss(logp, torch.zeros(2, 2), a, mask)
    l2, m2 = clipped_surrogate_loss(
        logp, torch.zeros(2, 2), expand_sequence_advantages(a, mask), mask
    )
    assert torch.equal(l1, l2) and m1 == m2
    # rho*A with clipping: row 0 -> min(1.5,1.28)=1.28, min(0.5,0.8)=0.5; row 1 -> -1.1, -0.8
    assert close(l1, -(1.28 + 0.5 - 1.1 - 0.8) / 4)


def test_grpo_and_opd_rows_in_one_batch():
    # Row 0 (GRPO): sequence advantage 0.5 on 2 of 3 tokens; row 1 (OPD): per-token advantages.
    # With rho = 1 the loss is -mean(A) over masked tokens = -(0.5 + 0.5 + 0.25 - 0.5 + 1)/5.
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    grpo = expand_sequence_advantages(torch.tensor([0.5]), mask[:1])
    opd = opd_advantages(
        torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -1.0, -1.0]]), 0.5, mask[1:]
    )
    adv = torch.cat([grpo, opd])  # [[0.5, 0.5, 0], [0.25, -0.5, 0.5]]
    logp = torch.zeros(2, 3)
    loss, _ = clipped_surrogate_loss(logp, logp, adv, mask)
    assert close(loss, -(0.5 + 0.5 + 0.25 - 0.5 + 0.5) / 5)


def test_token_mean_vs_seq_mean():
    # rho = 1 everywhere, so loss_t = -A_t. Row 0: one token with loss 1. Row 1: three tokens
    # with loss 2. token_mean = (1 + 2 + 2 + 2) / 4 = 1.75; seq_mean = (1 + 2) / 2 = 1.5.
    logp = torch.zeros(2, 3)
    adv = torch.tensor([[-1.0, 9.0, 9.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    tok, _ = clipped_surrogate_loss(logp, logp, adv, mask, agg="token_mean")
    seq, _ = clipped_surrogate_loss(logp, logp, adv, mask, agg="seq_mean")
    assert close(tok, 1.75) and close(seq, 1.5)
    with pytest.raises(ValueError, match="agg"):
        clipped_surrogate_loss(logp, logp, adv, mask, agg="sum")


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_normalizer_two_halves_sum_to_whole(agg):
    g = torch.Generator().manual_seed(0)
    logp = (0.3 * torch.randn(4, 5, generator=g)).requires_grad_(True)
    old = 0.3 * torch.randn(4, 5, generator=g)
    adv = torch.randn(4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    whole, _ = clipped_surrogate_loss(logp, old, adv, mask, agg=agg)
    (grad_whole,) = torch.autograd.grad(whole, logp)
    total = loss_normalizer(mask[:2], agg) + loss_normalizer(mask[2:], agg)  # "all-reduce"
    assert total == (11 if agg == "token_mean" else 4)
    halves = [
        clipped_surrogate_loss(logp[s], old[s], adv[s], mask[s], agg=agg, normalizer=total)[0]
        for s in (slice(0, 2), slice(2, 4))
    ]
    (grad_halves,) = torch.autograd.grad(halves[0] + halves[1], logp)
    assert close(halves[0] + halves[1], whole, tol=1e-6)
    assert close(grad_halves, grad_whole, tol=1e-7)
    with pytest.raises(ValueError, match="normalizer"):
        clipped_surrogate_loss(logp, old, adv, mask, agg=agg, normalizer=0)


def test_k3_kl_term():
    # A = 0 and rho = 1, so only the KL term remains. Token 0: logp = ln 0.5, ref = 0:
    # d = ref - logp = ln 2 = 0.693147, k3 = e^d - d - 1 = 2 - 0.693147 - 1 = 0.306853.
    # Token 1: logp = ref -> k3 = 0. token_mean loss = 0.1 * 0.306853 / 2 = 0.0153426.
    logp = torch.tensor([[math.log(0.5), 0.0]], requires_grad=True)
    ref = torch.zeros(1, 2)
    loss, metrics = clipped_surrogate_loss(
        logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), ref_logp=ref, kl_coef=0.1
    )
    assert close(loss, 0.0153426)
    assert close(metrics["kl"], 0.1534265)
    # d k3 / d logp = 1 - e^d = 1 - 2 = -1 -> grad = 0.1 * -1 / 2 = -0.05 on token 0.
    loss.backward()
    assert close(logp.grad, [[-0.05, 0.0]])
    _, no_kl = clipped_surrogate_loss(
        logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), ref_logp=ref
    )
    assert "kl" not in no_kl


def test_nan_safety_under_masked_inf():
    logp = torch.tensor([[-0.5, -INF, -INF], [-1.0, -0.2, NAN]], requires_grad=True)
    old = torch.tensor([[-0.4, -INF, 3.0], [-1.1, -0.1, -INF]])
    ref = torch.tensor([[-0.6, NAN, -INF], [-1.0, -0.3, INF]])
    adv = torch.tensor([[1.0, NAN, INF], [-1.0, 2.0, NAN]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    for agg in ("token_mean", "seq_mean"):
        loss, metrics = clipped_surrogate_loss(
            logp, old, adv, mask, agg=agg, ref_logp=ref, kl_coef=0.1
        )
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert torch.equal(grad[mask == 0], torch.zeros(3))
        assert all(math.isfinite(v) for v in metrics.values())


def test_empty_mask_gives_zero_loss_with_graph():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, metrics = clipped_surrogate_loss(logp, logp.detach(), torch.ones(2), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 3))
    assert metrics["clip_frac"] == 0.0


# --- overlap and masked mean -----------------------------------------------------------------


def test_topk_overlap_hand_computed():
    # pos (0,0): {1,2,3} vs {3,1,9} -> {1,3} -> 2/3
    # pos (0,1): {4,5,6} vs {7,8,9} -> {}    -> 0
    # pos (1,0): {3,2,1} vs {1,2,3} -> all   -> 1 (order irrelevant)
    # pos (1,1): masked out (full overlap, must not count)
    # mean over the 3 masked positions = (2/3 + 0 + 1) / 3 = 5/9
    s = torch.tensor([[[1, 2, 3], [4, 5, 6]], [[3, 2, 1], [7, 7, 7]]])
    t = torch.tensor([[[3, 1, 9], [7, 8, 9]], [[1, 2, 3], [7, 7, 7]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    out = topk_overlap(s, t, mask)
    assert out.dim() == 0 and out.dtype == torch.float32
    assert close(out, 5 / 9)


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, -INF], [4.0, NAN, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert close(masked_mean(x, mask), (1 + 2 + 6) / 3)
    assert masked_mean(x, torch.zeros(2, 3)).item() == 0.0


# --- truncated importance sampling -----------------------------------------------------------


def test_truncated_importance_weights_hand_computed():
    # ratio pi_trainer / pi_sampler = exp(trainer - sampler):
    # (0,0): exp(-1.0 - -1.5) = exp(0.5) = 1.6487 -> capped at 1.5
    # (0,1): exp(-2.0 - -1.0) = exp(-1)  = 0.3679 (below the cap: kept)
    # (1,0): exp(-0.3 - -0.3) = 1
    # (1,1): masked out (sampler -inf there): weight 0
    trainer = torch.tensor([[-1.0, -2.0], [-0.3, -1.0]])
    sampler = torch.tensor([[-1.5, -1.0], [-0.3, -INF]])
    mask = torch.tensor([[1, 1], [1, 0]])
    w = truncated_importance_weights(trainer, sampler, 1.5, mask)
    assert torch.allclose(w, torch.tensor([[1.5, math.exp(-1.0)], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="tis_cap"):
        truncated_importance_weights(trainer, sampler, 0.0, mask)


def test_token_weight_scales_each_tokens_policy_term():
    # rho = 1, A = 1 on 3 tokens: loss = -(w0 + w1 + w2) / 3 with w = (1.5, 0.5, 1.0)
    logp = torch.zeros(1, 3, requires_grad=True)
    mask = torch.ones(1, 3)
    weight = torch.tensor([[1.5, 0.5, 1.0]])
    loss, _ = clipped_surrogate_loss(logp, logp.detach(), torch.ones(1), mask, token_weight=weight)
    assert close(loss, -(1.5 + 0.5 + 1.0) / 3)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(grad, -weight / 3)  # d(rho*A)/dlogp = rho*A = 1, times the weight
