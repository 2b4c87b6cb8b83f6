"""KV-cached generation of the vision-language model equals its full recompute (greedy and
sampled, images, video and text rows in one batch) at TP1 and TP2, on gloo."""

from __future__ import annotations

import pytest
import torch

from copd_mega.config import load_config
from multiproc import spawn

VLM = [
    "vision.enabled=true", "vision.num_layers=1", "vision.hidden_size=32",
    "vision.ffn_hidden_size=64", "vision.num_attention_heads=2", "model.hidden_size=32",
    "model.ffn_hidden_size=64", "model.num_layers=2", "model.max_seq_length=96",
    "model.vocab_size=128", "model.tie_embeddings=false", "model.init_std=0.3",
]  # fmt: skip
NEW = 12


def vlm_cases(rank: int, tp: int) -> dict:
    """Every VLM generation case on one rank of a TP=``tp`` branch (DDP-wrapped LLaVA)."""
    from llava_cases import prompts, tokenizer_ids

    from copd_mega.models.branch import build_branch_model
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology
    from copd_mega.rl.sampling import SamplingParams
    from copd_mega.rl.vlm_sampler import VLMSampler

    cfg = load_config(None, [*VLM, f"parallel.tp={tp}"])
    init_distributed()
    topo = build_topology(cfg)
    bm = build_branch_model(cfg, topo)
    ids, media = prompts()  # image + text, text only, video + text
    ids, media = ids + [ids[1][:3], ids[0]], media + [[], media[0]]
    image = tokenizer_ids()["image"]
    out = {}
    cases = {
        "greedy": (SamplingParams(NEW, temperature=0.0), 0),
        "sample": (SamplingParams(NEW, temperature=1.0), 7),
    }
    vit_calls = []
    bm.module.vision_model.register_forward_hook(lambda *_: vit_calls.append(1))
    for name, (params, seed) in cases.items():
        for kv in (True, False):
            sampler = VLMSampler(bm.model, topo, cfg, image, use_kv_cache=kv)
            vit_calls.clear()
            out[name, kv] = sampler.generate(ids, params, seed, media=media)
            out["vit_calls", name, kv] = len(vit_calls)
    # EOS mid-way (compaction) and micro-batches of 2 rows: row 0's second sampled token
    r = out["sample", True]
    eos = int(r.tokens[0, int(r.prompt_lens[0]) + 1])
    p = SamplingParams(NEW, temperature=1.0, eos_id=eos, pad_id=0)
    for kv in (True, False):
        sampler = VLMSampler(bm.model, topo, cfg, image, max_batch_size=2, use_kv_cache=kv)
        out["eos", kv] = sampler.generate(ids, p, 7, media=media)
    out["prompts"] = ids
    return out


@pytest.fixture(scope="module")
def tp1():
    return spawn(vlm_cases, 1, 1, timeout=300)[0]


@pytest.fixture(scope="module")
def tp2():
    return spawn(vlm_cases, 2, 2, timeout=400)


def check_kv_equals_full(res: dict) -> None:
    for name in ("greedy", "sample", "eos"):
        kv, full = res[name, True], res[name, False]
        assert torch.equal(kv.tokens, full.tokens), (name, kv.tokens, full.tokens)
        assert torch.equal(kv.lengths, full.lengths)
        assert (kv.sampler_logprobs - full.sampler_logprobs).abs().max() < 1e-4
    for i, p in enumerate(res["prompts"]):
        assert res["greedy", True].tokens[i, : len(p)].tolist() == p
    assert not torch.equal(res["greedy", True].tokens, res["sample", True].tokens)
    assert (res["greedy", True].lengths - res["greedy", True].prompt_lens == NEW).all()
    # the media are encoded once, in the prefill (one micro-batch), not at every position
    assert res["vit_calls", "greedy", True] == 1 and res["vit_calls", "greedy", False] > NEW


@pytest.mark.multiproc
def test_vlm_kv_cache_equals_full_recompute_tp1(tp1):
    check_kv_equals_full(tp1)
    r = tp1["eos", True]
    assert (r.lengths - r.prompt_lens).min() < NEW  # some rows stopped at the EOS


@pytest.mark.multiproc
def test_vlm_kv_cache_equals_full_recompute_tp2_and_tp1(tp1, tp2):
    for res in tp2:
        check_kv_equals_full(res)
        for key in (("greedy", True), ("sample", True)):
            assert torch.equal(res[key].tokens, tp1[key].tokens)


def test_vlm_sampler_refuses_pp2():
    from types import SimpleNamespace

    from copd_mega.rl.vlm_sampler import VLMSampler

    topo = SimpleNamespace(layout=SimpleNamespace(pp=2))
    with pytest.raises(ValueError, match="parallel.pp=2"):
        VLMSampler(torch.nn.Linear(1, 1), topo, load_config(None, []), image_id=3)
