"""Per-rank bodies of the vLLM engine tests (import-safe; run under multiproc.spawn)."""

from __future__ import annotations

import torch

# head_dim 32: vLLM's CPU attention kernels take head sizes of 32 and up
MODEL = ["model.hidden_size=64", "model.num_attention_heads=2", "model.num_query_groups=2",
         "model.tie_embeddings=false", "model.init_std=0.1", "checkpoint.random_init=true"]  # fmt: skip
ENGINE = ["rollout.engine=vllm", "rollout.kv_cache_gb=0.02", "rollout.max_batch_size=16"]
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [9, 9, 9, 9, 9], [30, 31], [12, 40, 7]]


def after_update(rank: int, overrides: list[str]) -> dict:
    """One GRPO update on rollouts from the vLLM engine, weights synced, then greedy tokens of
    the engine and the Megatron sampler on the updated model, and a second update's logp gap."""
    from copd_mega.config import load_config
    from copd_mega.rl.batches import grpo_rows
    from copd_mega.rl.objective import make_loss_fn, unpack_metrics
    from copd_mega.rl.rollout import MegatronSampler
    from copd_mega.rl.sampling import SamplingParams
    from copd_mega.rl.vllm_engine import sync_engine
    from copd_mega.trainer.job import build_job
    from copd_mega.trainer.train import update

    cfg = load_config(
        None, [*MODEL, *ENGINE, "grpo.group_size=2", "schedule.mode=expert", *overrides]
    )
    job = build_job(cfg)
    topo, engine = job.rt.topo, job.sampler
    sync_engine(job)  # the starting weights, as copd train does
    loss_fn = make_loss_fn(cfg, topo, job.edges)
    sample = SamplingParams(max_new_tokens=12, temperature=1.0, pad_id=0)
    greedy = SamplingParams(max_new_tokens=12, temperature=0, pad_id=0)
    before = engine.generate(PROMPTS, greedy, 0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0])

    def grpo_update(seed: int) -> dict:
        rolls = engine.generate(PROMPTS, sample, seed)
        rows = grpo_rows(rolls.tokens, rolls.prompt_lens, rolls.lengths, adv,
                         rolls.sampler_logprobs)  # fmt: skip
        vec, _ = update(job, rows, loss_fn)
        sync_engine(job)  # after every optimizer step, as copd train does
        return {"metrics": unpack_metrics(vec.tolist(), job.edges), "rolls": rolls}

    first = grpo_update(1)
    out = {"coords": (topo.tp_rank, topo.pp_rank), "first": first["metrics"],
           "sync_s": job.timings["rollout/sync_s"], "tis_cap": cfg.rollout.tis_cap}  # fmt: skip
    out["vllm"] = engine.generate(PROMPTS, greedy, 0)
    out["megatron"] = MegatronSampler(job.bm.model, topo, cfg).generate(PROMPTS, greedy, 0)
    out["before"] = before
    out["vllm_sample"] = engine.generate(PROMPTS, sample, 3)
    out["vllm_sample_again"] = engine.generate(PROMPTS, sample, 3)
    out["second"] = grpo_update(2)["metrics"]
    job.judge.close()
    return out
