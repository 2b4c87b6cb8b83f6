"""copd_mega.rl.rollout: the sampling rules and decode loop (pure), then the Megatron sampler on gloo.

Pipeline-parallel generation, micro-batches and compaction at TP x PP: ``test_rollout_pp.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from copd_mega.config import load_config
from copd_mega.rl.rollout import MegatronSampler, PromptBatch, decode_loop, pack_prompts
from copd_mega.rl.sampling import Rollouts, SamplingParams, row_uniforms, sample_tokens
from multiproc import spawn

V = 20


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unif(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, generator=gen(seed), dtype=torch.float64)


# --- sampling rules --------------------------------------------------------------------------


def test_padding_rows_are_never_sampled():
    logits = torch.zeros(64, V + 4)
    logits[:, V:] = 100.0
    for p in (SamplingParams(temperature=0), SamplingParams(temperature=1.0)):
        assert sample_tokens(logits, V, p, unif(64)).max() < V


def test_greedy_topk1_and_tiny_topp_pick_the_argmax():
    logits = torch.randn(32, V, generator=gen(1))
    best = logits.argmax(-1)
    u = unif(32)
    assert torch.equal(sample_tokens(logits, V, SamplingParams(temperature=0), u), best)
    assert torch.equal(sample_tokens(logits, V, SamplingParams(top_k=1), u), best)
    assert torch.equal(sample_tokens(logits, V, SamplingParams(top_p=1e-6), u), best)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.randn(1, V, generator=gen(2)).expand(4000, V)
    top3 = set(logits[0].topk(3).indices.tolist())
    drawn = sample_tokens(logits, V, SamplingParams(top_k=3, temperature=2.0), unif(4000))
    assert set(drawn.tolist()) == top3  # all three show up, nothing else
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    # smallest prefix whose mass reaches 0.5
    n = int((probs[order].cumsum(0) < 0.5).sum()) + 1
    drawn = sample_tokens(logits, V, SamplingParams(top_p=0.5), unif(4000))
    assert set(drawn.tolist()) == set(order[:n].tolist())


def test_inverse_cdf_follows_the_distribution_and_skips_zero_mass():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.25, 0.0])
    logits = probs.log().expand(7, -1)
    u = torch.tensor([0.0, 0.2, 0.26, 0.5, 0.74, 0.76, 1.0 - 2**-53], dtype=torch.float64)
    drawn = sample_tokens(logits, 6, SamplingParams(temperature=1.0), u)
    assert drawn.tolist() == [1, 1, 3, 3, 3, 4, 4]
    # the empirical distribution matches
    many = sample_tokens(logits[:1].expand(20000, -1), 6, SamplingParams(), unif(20000))
    freq = torch.bincount(many, minlength=6).double() / 20000
    assert (freq - probs.double()).abs().max() < 0.015


def test_row_uniforms_are_per_row_streams():
    a = row_uniforms(5, 0, [0, 1, 2, 3], 8)
    assert torch.equal(row_uniforms(5, 0, [2, 0], 8), a[[2, 0]])  # a row's draws: its own
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(row_uniforms(5, 1, [0], 8)[0], a[0])  # DP ranks differ
    assert not torch.equal(row_uniforms(6, 0, [0], 8)[0], a[0])  # seeds differ
    assert a.dtype == torch.float64 and ((a >= 0) & (a < 1)).all()


def test_sampling_params_errors_name_the_setting():
    with pytest.raises(ValueError, match="rollout.top_p"):
        SamplingParams(top_p=0.0).check(V)
    with pytest.raises(ValueError, match="rollout.top_k"):
        SamplingParams(top_k=V + 1).check(V)
    with pytest.raises(ValueError, match="eos_id"):
        SamplingParams(eos_id=V).check(V)
    cfg = load_config(None, ["rollout.top_k=5", "rollout.temperature=0.7"])
    p = SamplingParams.from_config(cfg, eos_id=2, pad_id=0)
    assert (p.top_k, p.temperature, p.eos_id, p.max_new_tokens) == (5, 0.7, 2, 16)


def test_max_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="rollout.max_batch_size=0"):
        MegatronSampler(torch.nn.Linear(1, 1), SimpleNamespace(), load_config(None, []), 0)


# --- the decode loop with a toy model (next token = prefix sum mod V) ------------------------


TABLE = torch.randn(V, V + 4, generator=gen(9)) * 3  # toy logits, a function of the prefix sum


class ToyStep:
    """Toy model: logits = TABLE[prefix sum mod V] (one-hot x 10 when ``peaked``). ``cached``
    keeps a running sum per running row (like a KV cache: it must see every position exactly
    once and follow compaction); otherwise the whole prefix is summed at every call."""

    def __init__(self, b: int, cached: bool, peaked: bool = True):
        self.state, self.cached, self.peaked = torch.zeros(b, dtype=torch.long), cached, peaked
        self.calls: list[tuple[int, int, int, bool]] = []

    def __call__(self, tokens, rows, start, end, decode):
        self.calls.append((rows.numel(), start, end, decode))
        if self.cached:
            self.state.add_(tokens[rows, start:end].sum(1))
            ids = self.state
        else:
            ids = tokens[rows, :end].sum(1)
        if self.peaked:
            return torch.nn.functional.one_hot(ids % V, V + 4).float() * 10
        return TABLE[ids % V]

    def compact(self, keep):
        self.state = self.state[keep]


def toy_draws(prompts, params, seed=0):
    return row_uniforms(seed, 0, list(range(len(prompts))), params.max_new_tokens)


def expected_toy(prompt: list[int], n: int, eos: int | None) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(sum(seq) % V)
        if seq[-1] == eos:
            break
    return seq


@pytest.mark.parametrize("eos", [None, 7])
def test_decode_loop_variable_lengths_eos_and_padding(eos):
    prompts = [[3], [1, 2, 3, 4, 5], [9, 9], [4, 0, 6]]
    params = SamplingParams(max_new_tokens=6, temperature=0, eos_id=eos, pad_id=V - 1)
    for cached in (True, False):
        batch = pack_prompts(prompts, params, toy_draws(prompts, params))
        r = decode_loop(batch, ToyStep(len(prompts), cached), params, V)
        for i, p in enumerate(prompts):
            want = expected_toy(p, 6, eos)
            n = int(r.lengths[i])
            assert r.tokens[i, :n].tolist() == want
            assert (r.tokens[i, n:] == V - 1).all()  # padded after the end
            assert r.responses()[i] == want[len(p) :]
        mask = r.response_mask()
        assert torch.equal(mask.sum(1), r.lengths - r.prompt_lens)
        assert (r.sampler_logprobs[~mask] == 0).all() and (r.sampler_logprobs[mask] < 0).all()


def test_decode_loop_feeds_one_position_per_step_after_prefill():
    batch = PromptBatch(torch.zeros(2, 9, dtype=torch.long), torch.tensor([3, 5]),
                        torch.zeros(2, 4, dtype=torch.float64))  # fmt: skip
    step = ToyStep(2, cached=True)
    decode_loop(batch, step, SamplingParams(max_new_tokens=4, temperature=0), V)
    calls = [(s, e, d) for _, s, e, d in step.calls]
    assert calls[0] == (0, 3, False)  # prefill of the shortest prompt
    assert all(e - s == 1 for s, e, _ in calls[1:])
    # decode mode once every row feeds a generated token (position >= longest prompt)
    assert [d for _, _, d in calls] == [s >= 5 for s, _, _ in calls]


def test_compaction_drops_finished_rows_and_keeps_the_tokens():
    """Sampled, EOS in the middle: compacted and full-batch runs give the same rows, and the
    compacted run feeds fewer rows once some have finished."""
    prompts = [[1 + i % 5] * (1 + i % 4) for i in range(24)]
    params = SamplingParams(max_new_tokens=40, temperature=1.0, eos_id=3, pad_id=V - 1)
    runs = {}
    for cached, compact in ((True, True), (True, False), (False, True)):
        batch = pack_prompts(prompts, params, toy_draws(prompts, params, seed=4))
        step, stats = ToyStep(len(prompts), cached, peaked=False), {}
        runs[cached, compact] = decode_loop(batch, step, params, V, None, compact, stats), stats
    (a, sa), (b, sb), (c, _) = runs[True, True], runs[True, False], runs[False, True]
    resp = a.lengths - a.prompt_lens
    assert resp.min() < 10 and resp.max() == 40  # mixed lengths: some rows hit EOS early
    for r in (b, c):
        assert torch.equal(a.tokens, r.tokens) and torch.equal(a.lengths, r.lengths)
        assert torch.equal(a.sampler_logprobs, r.sampler_logprobs)
    assert sa["forwards"] == sb["forwards"]  # the longest row sets the number of forwards
    ideal = int((a.lengths - a.prompt_lens.min()).sum())  # each row only while it runs
    assert ideal <= sa["row_forwards"] < 0.8 * sb["row_forwards"]
    # a row's tokens do not depend on the rows next to it
    sub = [prompts[i] for i in (5, 2)]
    batch = pack_prompts(sub, params, row_uniforms(4, 0, [5, 2], 40))
    r = decode_loop(batch, ToyStep(2, True, peaked=False), params, V)
    for k, i in enumerate((5, 2)):
        n = int(a.lengths[i])
        assert r.tokens[k, :n].tolist() == a.tokens[i, :n].tolist()


def test_rollouts_mask():
    r = Rollouts(
        torch.zeros(2, 6, dtype=torch.long), torch.tensor([2, 1]), torch.tensor([5, 2]),
        torch.zeros(2, 6),
    )  # fmt: skip
    assert r.response_mask().long().tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]]


# --- the Megatron sampler on gloo ------------------------------------------------------------

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [9, 9, 9, 9, 9], [30, 31]]
# Untied output layer and a wide init: a random model whose greedy output is not "repeat the last
# token", so a wrong cache position changes tokens, not only logits.
MODEL = ["model.vocab_size=100", "model.tie_embeddings=false", "model.init_std=0.3"]


def sampler_cases(rank: int, tp: int) -> dict:
    """Every generation case on one rank of a TP=``tp`` branch (DDP-wrapped model)."""
    from copd_mega.models.branch import build_branch_model
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology
    from copd_mega.rl.logprobs import response_logprobs
    from copd_mega.rl.rollout import full_recompute_generate

    cfg = load_config(None, [*MODEL, f"parallel.tp={tp}"])
    init_distributed()
    topo = build_topology(cfg)
    bm = build_branch_model(cfg, topo)
    bm.model.train()
    sampler = MegatronSampler(bm.model, topo, cfg)
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    out = {"greedy": sampler.generate(PROMPTS, greedy, seed=0)}
    out["train_mode_restored"] = bm.model.training and bm.module.training
    out["full"] = full_recompute_generate(bm.model, topo, cfg, PROMPTS, greedy, seed=0)
    out["batched"] = MegatronSampler(bm.model, topo, cfg, max_batch_size=2).generate(
        PROMPTS, greedy, seed=0
    )
    out["batched_sample"] = MegatronSampler(bm.model, topo, cfg, max_batch_size=2).generate(
        PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0), seed=11
    )
    out["topk1"] = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=10, top_k=1), seed=3)
    sample = SamplingParams(max_new_tokens=10, temperature=1.0)
    out["sample"] = sampler.generate(PROMPTS, sample, seed=11)
    out["sample_again"] = sampler.generate(PROMPTS, sample, seed=11)
    r0 = out["greedy"]
    eos = int(r0.tokens[0, int(r0.prompt_lens[0]) + 2])
    out["eos_id"] = eos
    out["eos"] = sampler.generate(PROMPTS, SamplingParams(10, 0.0, eos_id=eos, pad_id=99), seed=0)
    # The trainer's view: a training forward + backward on the sampled rows (vocab-parallel
    # logits). Its length equals the generation buffer's, so it reuses the RoPE table megatron
    # cached during generation.
    r = out["sample"]
    pos = torch.arange(r.tokens.shape[1]).expand_as(r.tokens)
    lp = response_logprobs(bm.model(r.tokens, pos, None), r.tokens, topo.pg.tp, 100, chunk=4)
    lp[r.response_mask()].sum().backward()
    out["recomputed"] = lp.detach()
    out["grads_finite"] = all(
        torch.isfinite(p.main_grad).all() for p in bm.module.parameters() if p.requires_grad
    )
    return out


@pytest.fixture(scope="module")
def tp2():
    return spawn(sampler_cases, 2, 2, timeout=180)


@pytest.mark.multiproc
def test_kv_cache_greedy_equals_full_recompute(tp2):
    for res in tp2:
        kv, full = res["greedy"], res["full"]
        assert torch.equal(kv.tokens, full.tokens) and torch.equal(kv.lengths, full.lengths)
        assert (kv.sampler_logprobs - full.sampler_logprobs).abs().max() < 1e-5
        assert torch.equal(kv.prompt_lens, torch.tensor([len(p) for p in PROMPTS]))
        assert (kv.lengths == kv.prompt_lens + 10).all()
        for i, p in enumerate(PROMPTS):
            assert kv.tokens[i, : len(p)].tolist() == p
        assert torch.equal(res["batched"].tokens, kv.tokens)  # length-sorted groups, reordered
        assert res["train_mode_restored"]


@pytest.mark.multiproc
def test_tp_ranks_sample_identical_tokens_and_seed_repeats(tp2):
    a, b = tp2[0]["sample"], tp2[1]["sample"]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.sampler_logprobs, b.sampler_logprobs)
    assert torch.equal(a.tokens, tp2[0]["sample_again"].tokens)
    assert torch.equal(a.tokens, tp2[0]["batched_sample"].tokens)  # micro-batches: same draws
    assert not torch.equal(a.tokens, tp2[0]["greedy"].tokens)  # really sampled
    assert a.tokens.max() < 100


@pytest.mark.multiproc
def test_top_k1_equals_greedy(tp2):
    for res in tp2:
        assert torch.equal(res["topk1"].tokens, res["greedy"].tokens)


@pytest.mark.multiproc
def test_eos_stops_each_sequence_and_pads(tp2):
    res = tp2[0]
    greedy, r, eos = res["greedy"], res["eos"], res["eos_id"]
    assert int(r.lengths[0]) == int(r.prompt_lens[0]) + 3  # stopped at the EOS it emitted
    for i in range(len(PROMPTS)):
        g = greedy.tokens[i, : int(greedy.lengths[i])].tolist()
        p = len(PROMPTS[i])
        resp = g[p:]
        cut = resp.index(eos) + 1 if eos in resp else len(resp)
        n = int(r.lengths[i])
        assert r.tokens[i, :n].tolist() == g[: p + cut]
        assert (r.tokens[i, n:] == 99).all()
        assert (r.sampler_logprobs[i, n:] == 0).all()


@pytest.mark.multiproc
def test_sampler_logprobs_match_trainer_recompute(tp2):
    for res in tp2:
        r = res["sample"]
        mask = r.response_mask()
        assert (res["recomputed"][mask] - r.sampler_logprobs[mask]).abs().max() < 1e-5
        assert res["grads_finite"]


@pytest.mark.multiproc
def test_tp2_generation_equals_tp1(tp2):
    (tp1,) = spawn(sampler_cases, 1, 1, timeout=180)
    assert torch.equal(tp1["greedy"].tokens, tp2[0]["greedy"].tokens)
    assert torch.equal(tp1["sample"].tokens, tp2[0]["sample"].tokens)
    assert (tp1["sample"].sampler_logprobs - tp2[0]["sample"].sampler_logprobs).abs().max() < 1e-5
