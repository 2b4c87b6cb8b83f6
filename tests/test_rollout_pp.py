"""Generation through pipeline stages (PP2, TP2 x PP2) against the single-stage run, micro-batches
sized by ``rollout.max_batch_size`` and compaction of finished rows, on gloo."""

from __future__ import annotations

import pytest
import torch

from copd_mega.config import load_config
from copd_mega.parallel.topology import plan_layout
from copd_mega.rl.pipeline_step import last_stage_source
from multiproc import spawn

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [9, 9, 9, 9, 9], [30, 31]]
# Untied output layer and a wide init: greedy output is not "repeat the last token", so a wrong
# cache position or a wrong stage input changes tokens, not only logits.
MODEL = ["model.vocab_size=100", "model.tie_embeddings=false", "model.init_std=0.3",
         "model.num_layers=4"]  # fmt: skip
NEW = 16


def pp_cases(rank: int, tp: int, pp: int) -> dict:
    """Every generation case on one rank of a TP=``tp`` x PP=``pp`` branch (DDP-wrapped)."""
    from copd_mega.models.branch import build_branch_model
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology
    from copd_mega.rl.rollout import MegatronSampler
    from copd_mega.rl.sampling import SamplingParams

    cfg = load_config(None, [*MODEL, f"parallel.tp={tp}", f"parallel.pp={pp}"])
    init_distributed()
    topo = build_topology(cfg)
    bm = build_branch_model(cfg, topo)
    bm.model.train()

    def run(params, seed, **kw):
        sampler = MegatronSampler(bm.model, topo, cfg, **kw)
        return sampler.generate(PROMPTS, params, seed), sampler.last_stats

    greedy = SamplingParams(max_new_tokens=NEW, temperature=0)
    sample = SamplingParams(max_new_tokens=NEW, temperature=1.0, top_p=0.95)
    out = {"coords": (topo.tp_rank, topo.pp_rank)}
    out["greedy"], out["greedy_all_stats"] = run(greedy, 0)
    out["sample"], _ = run(sample, 11)
    out["sample_full"], _ = run(sample, 11, use_kv_cache=False)
    out["train_mode_restored"] = bm.model.training and bm.module.training
    # An EOS each row may sample: the greedy token of row 0 at its third response position.
    r0 = out["greedy"]
    eos = int(r0.tokens[0, len(PROMPTS[0]) + 2])
    out["eos_id"] = eos
    for name, params, seed in (("greedy", greedy, 0), ("sample", sample, 11)):
        p = SamplingParams(NEW, params.temperature, params.top_p, eos_id=eos, pad_id=99)
        out[f"{name}_eos"], out[f"{name}_eos_stats"] = run(p, seed, max_batch_size=3)
        out[f"{name}_eos_nocompact"], out[f"{name}_eos_nocompact_stats"] = run(
            p, seed, max_batch_size=3, compact=False
        )
        out[f"{name}_eos_full"], _ = run(p, seed, use_kv_cache=False, compact=False)
    return out


@pytest.fixture(scope="module")
def pp1():
    return spawn(pp_cases, 1, 1, 1, timeout=240)[0]


@pytest.fixture(scope="module")
def pp2():
    return spawn(pp_cases, 2, 1, 2, timeout=300)


@pytest.fixture(scope="module")
def tp2pp2():
    return spawn(pp_cases, 4, 2, 2, timeout=420)


KEYS = ["greedy", "sample", "sample_full", "greedy_eos", "sample_eos", "greedy_eos_nocompact",
        "sample_eos_nocompact", "greedy_eos_full", "sample_eos_full"]  # fmt: skip


def assert_same(a, b, exact_logprobs: bool) -> None:
    assert torch.equal(a.tokens, b.tokens), (a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.prompt_lens, b.prompt_lens)
    if exact_logprobs:
        assert torch.equal(a.sampler_logprobs, b.sampler_logprobs)
    else:
        assert (a.sampler_logprobs - b.sampler_logprobs).abs().max() < 1e-4


def test_last_stage_source_is_tp0_of_the_last_stage_of_the_same_replica():
    cfg = load_config(None, [*MODEL, "parallel.tp=2", "parallel.pp=2", "parallel.dp=2"])
    layout = plan_layout(cfg, 8)
    for rank in range(8):
        topo = type("T", (), {})()
        topo.layout, topo.branch = layout, layout.branch_of(rank)
        topo.dp_rank = layout.coords(rank)[2]
        assert layout.coords(last_stage_source(topo)) == (0, 1, topo.dp_rank)


@pytest.mark.multiproc
def test_pp1_reference_is_sound(pp1):
    """The single-stage run: KV equals full recompute; EOS rows stop; compaction changes
    nothing; the KV cache is sized for the micro-batch, not for every row."""
    assert_same(pp1["sample"], pp1["sample_full"], exact_logprobs=False)
    assert not torch.equal(pp1["sample"].tokens, pp1["greedy"].tokens)
    assert pp1["train_mode_restored"]
    for name in ("greedy", "sample"):
        eos, nocompact, full = (pp1[f"{name}_eos{s}"] for s in ("", "_nocompact", "_full"))
        assert_same(eos, nocompact, exact_logprobs=False)
        assert_same(eos, full, exact_logprobs=False)
    stats = pp1["greedy_eos_stats"]
    # 5 rows, max_batch_size=3: micro-batches of 3 and 2 rows sorted by prompt length
    # ([4], [30, 31], [1, 2, 3] | [9]*5, [5..11]).
    # The largest allocated KV memory: 3 rows; the second micro-batch's longest prompt + NEW.
    assert stats["micro_batches"] == 2
    assert (stats["cache_rows"], stats["cache_len"]) == (3, 7 + NEW)
    assert pp1["greedy_all_stats"]["cache_rows"] == len(PROMPTS)  # max_batch_size >= rows
    assert stats["cache_layers"] == 4
    r = pp1["greedy_eos"]
    assert int(r.lengths[0]) == len(PROMPTS[0]) + 3  # stopped at the EOS it emitted
    assert (r.lengths - r.prompt_lens).max() == NEW  # and some row ran to the length limit


@pytest.mark.multiproc
def test_pp2_generation_equals_pp1(pp1, pp2):
    """Same weights, seed and prompts: PP2 gives PP1's tokens and log-probs on both stages."""
    for res in pp2:
        for key in KEYS:
            assert_same(res[key], pp1[key], exact_logprobs=False)
        assert res["train_mode_restored"]
        assert res["greedy_eos_stats"]["cache_layers"] == 2  # each stage caches its own layers


@pytest.mark.multiproc
def test_tp2_pp2_generation_equals_tp1_pp1_and_compaction_changes_nothing(pp1, tp2pp2):
    """TP2 x PP2 on every one of its 4 ranks: PP1's tokens, KV and full recompute, with and
    without compaction; compaction runs fewer row-forwards."""
    assert sorted(r["coords"] for r in tp2pp2) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for res in tp2pp2:
        for key in KEYS:
            assert_same(res[key], pp1[key], exact_logprobs=False)
        for name in ("greedy", "sample"):
            on, off = res[f"{name}_eos_stats"], res[f"{name}_eos_nocompact_stats"]
            assert on["row_forwards"] < off["row_forwards"]
            assert on["cache_rows"] == off["cache_rows"] == 3
            assert on["cache_layers"] == 2
    first = tp2pp2[0]
    for res in tp2pp2[1:]:  # bit-identical rollouts on every rank of the replica
        for key in KEYS:
            assert_same(res[key], first[key], exact_logprobs=True)
