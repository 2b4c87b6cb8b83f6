"""copd_mega.rl.logprobs against a direct full-vocabulary log-softmax, at TP1 and on 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from copd_mega.rl.logprobs import response_logprobs, token_entropy, token_logprobs, token_topk
from multiproc import spawn

VOCAB = 100  # real vocabulary; the logits carry 112 rows (padded to a multiple of 8 x TP2)
PADDED = 112
B, S = 3, 10


def make_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(full logits [B, S, PADDED] fp32 with large padding rows, targets [B, S], grad_out [B, S])."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, PADDED, generator=g) * 3
    logits[..., VOCAB:] = 50.0  # would dominate every softmax if padding leaked in
    targets = torch.randint(0, VOCAB, (B, S), generator=g)
    return logits, targets, torch.randn(B, S, generator=g)


def direct_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[..., :VOCAB].double(), -1).gather(-1, targets[..., None])[
        ..., 0
    ]


def direct_grad(logits: torch.Tensor, targets: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = logits.double().requires_grad_()
    (direct_logprobs(x, targets) * g.double()).sum().backward()
    return x.grad.float()


# --- TP1 (no process group) ------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, 1, 3, 64])
def test_logprobs_match_direct_log_softmax_with_padded_vocab(chunk):
    logits, targets, g = make_case()
    x = logits.clone().requires_grad_()
    lp = token_logprobs(x, targets, None, VOCAB, chunk)
    assert lp.dtype == torch.float32 and lp.shape == (B, S)
    assert (lp.double() - direct_logprobs(logits, targets)).abs().max() < 1e-5
    (lp * g).sum().backward()
    assert (x.grad - direct_grad(logits, targets, g)).abs().max() < 1e-6
    assert x.grad[..., VOCAB:].abs().max() == 0  # padding rows get no gradient


def test_chunked_equals_unchunked_exactly_per_position():
    logits, targets, g = make_case(1)
    outs, grads = [], []
    for chunk in (0, 4):
        x = logits.clone().requires_grad_()
        lp = token_logprobs(x, targets, None, VOCAB, chunk)
        (lp * g).sum().backward()
        outs.append(lp.detach())
        grads.append(x.grad)
    assert torch.allclose(outs[0], outs[1], atol=1e-6, rtol=0)
    assert torch.allclose(grads[0], grads[1], atol=1e-7, rtol=0)


def test_gradcheck_float64():
    logits, targets, _ = make_case(2)
    x = logits[:, :4].double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a: token_logprobs(a, targets[:, :4], None, VOCAB, 3), (x,)
    )


def test_ignored_targets_give_zero_and_no_grad():
    logits, targets, _ = make_case(3)
    targets[0, 2], targets[1, 5] = -100, VOCAB + 3  # ignore label, padding row
    x = logits.clone().requires_grad_()
    lp = token_logprobs(x, targets, None, VOCAB, 3)
    assert lp[0, 2] == 0 and lp[1, 5] == 0 and torch.isfinite(lp).all()
    lp.sum().backward()
    assert x.grad[0, 2].abs().max() == 0 and x.grad[1, 5].abs().max() == 0
    assert torch.isfinite(x.grad).all()


def test_bf16_logits_keep_dtype_of_grad_and_fp32_output():
    logits, targets, _ = make_case(4)
    x = logits.bfloat16().requires_grad_()
    lp = token_logprobs(x, targets, None, VOCAB, 4)
    lp.sum().backward()
    assert lp.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert (lp.double() - direct_logprobs(logits.bfloat16().float(), targets)).abs().max() < 1e-4


def test_response_logprobs_are_token_aligned():
    logits, tokens, _ = make_case(5)
    lp = response_logprobs(logits, tokens, None, VOCAB, 4)
    assert lp.shape == (B, S) and (lp[:, 0] == 0).all()
    # position t holds log p(tokens[t] | tokens[:t]), scored by the logits at t-1
    expect = direct_logprobs(logits[:, :-1], tokens[:, 1:])
    assert (lp[:, 1:].double() - expect).abs().max() < 1e-5


def test_entropy_and_topk_match_direct():
    logits, _, _ = make_case(6)
    p = torch.softmax(logits[..., :VOCAB].double(), -1)
    ent = -(p * p.log()).sum(-1)
    assert (token_entropy(logits, None, VOCAB, 3).double() - ent).abs().max() < 1e-5
    top = token_topk(logits, 5, None, VOCAB, 3)
    assert torch.equal(top, logits[..., :VOCAB].topk(5, dim=-1).indices)
    assert top.max() < VOCAB


def test_bad_shapes_and_k_are_rejected():
    logits, targets, _ = make_case()
    with pytest.raises(ValueError, match="vocab_size"):
        token_logprobs(logits, targets, None, PADDED + 1, 0)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits, targets[:, :3], None, VOCAB, 0)
    with pytest.raises(ValueError, match="opd.top_k"):
        token_topk(logits, VOCAB + 1, None, VOCAB, 0)


# --- TP2 on 2 gloo ranks ---------------------------------------------------------------------


def tp2_shard_results(rank: int) -> dict:
    """Every function on this rank's half of the vocabulary (TP group = the 2-rank world)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")  # rendezvous from the spawn helper's environment
    group = dist.new_group([0, 1])
    logits, targets, g = make_case()
    shard = logits.chunk(2, dim=-1)[rank].clone()  # rank 1 holds rows 56..111: 44 real, 12 pad
    out = {}
    for chunk in (0, 3):
        x = shard.clone().requires_grad_()
        lp = token_logprobs(x, targets, group, VOCAB, chunk)
        (lp * g).sum().backward()
        out[chunk] = {"lp": lp.detach(), "grad": x.grad}
    out["resp"] = response_logprobs(shard, targets, group, VOCAB, 4)
    out["entropy"] = token_entropy(shard, group, VOCAB, 3)
    out["topk"] = token_topk(shard, 7, group, VOCAB, 3)
    out["topk_big"] = token_topk(shard, 60, group, VOCAB, 0)  # more than a shard's real rows
    return out


@pytest.fixture(scope="module")
def tp2():
    return spawn(tp2_shard_results, 2, timeout=120)


@pytest.mark.multiproc
@pytest.mark.parametrize("chunk", [0, 3])
def test_tp2_logprobs_equal_tp1_and_direct(tp2, chunk):
    logits, targets, _ = make_case()
    tp1 = token_logprobs(logits, targets, None, VOCAB, chunk)
    for r in tp2:
        assert (r[chunk]["lp"] - tp1).abs().max() < 1e-5
        assert (r[chunk]["lp"].double() - direct_logprobs(logits, targets)).abs().max() < 1e-5
    assert torch.equal(tp2[0][chunk]["lp"], tp2[1][chunk]["lp"])  # ranks agree exactly


@pytest.mark.multiproc
@pytest.mark.parametrize("chunk", [0, 3])
def test_tp2_gradient_equals_tp1_gradient(tp2, chunk):
    logits, targets, g = make_case()
    x = logits.clone().requires_grad_()
    (token_logprobs(x, targets, None, VOCAB, chunk) * g).sum().backward()
    full = torch.cat([tp2[0][chunk]["grad"], tp2[1][chunk]["grad"]], dim=-1)
    assert (full - x.grad).abs().max() < 1e-6  # no TP scaling of the gradient
    assert (full - direct_grad(logits, targets, g)).abs().max() < 1e-6


@pytest.mark.multiproc
def test_tp2_entropy_topk_and_response_logprobs(tp2):
    logits, targets, _ = make_case()
    resp = response_logprobs(logits, targets, None, VOCAB, 0)
    ent = token_entropy(logits, None, VOCAB, 0)
    for r in tp2:
        assert (r["resp"] - resp).abs().max() < 1e-5
        assert (r["entropy"] - ent).abs().max() < 1e-5
        assert torch.equal(r["topk"], logits[..., :VOCAB].topk(7, dim=-1).indices)
        assert torch.equal(r["topk_big"], logits[..., :VOCAB].topk(60, dim=-1).indices)
