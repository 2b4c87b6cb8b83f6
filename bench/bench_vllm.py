"""vLLM (``rollout.engine=vllm``) against the Megatron sampler, side by side in one run: the same
text model (weights synced from the Megatron branch into the engine), prompts and lengths;
new tokens/s of each and their ratio, whether the greedy tokens agree, and the weight sync's
share of an RL step (vLLM generation + one GRPO update + sync). One rank, one intra-op thread
for the trainer; vLLM's CPU build when that is what is installed (``bench_generation.py`` runs
this too)::

    .venv/bin/python bench/bench_vllm.py [--layers 4 --hidden 128 --batch 16 ...]
"""

from __future__ import annotations

import argparse
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)  # 4 heads: head_dim 32 (vLLM CPU >= 32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=48, help="longest prompt (shortest: half)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per path (best is kept)")
    return ap.parse_known_args(argv)[0]


def vllm_cases(rank: int, a: argparse.Namespace) -> dict:
    """Timings on one rank: Megatron sampler and vLLM generation (greedy, no EOS), one RL step."""
    import torch

    from copd_mega.config import load_config
    from copd_mega.rl.batches import grpo_rows
    from copd_mega.rl.objective import make_loss_fn
    from copd_mega.rl.rollout import MegatronSampler
    from copd_mega.rl.sampling import SamplingParams
    from copd_mega.rl.vllm_engine import sync_engine
    from copd_mega.trainer.job import build_job
    from copd_mega.trainer.train import update

    cfg = load_config(None, [
        f"model.num_layers={a.layers}", f"model.hidden_size={a.hidden}",
        f"model.ffn_hidden_size={4 * a.hidden}", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.max_seq_length=256", "model.tie_embeddings=false",
        "model.init_std=0.3", f"rollout.max_batch_size={a.batch}", "rollout.engine=vllm",
        "rollout.kv_cache_gb=0.25", "schedule.mode=expert", "grpo.group_size=2",
    ])  # fmt: skip
    job = build_job(cfg)
    sync_engine(job)
    vocab = cfg.model.vocab_size
    g = torch.Generator().manual_seed(0)
    lens = torch.linspace(a.prompt_len // 2, a.prompt_len, a.batch).long().tolist()
    prompts = [torch.randint(1, vocab, (k,), generator=g).tolist() for k in lens]
    greedy = SamplingParams(max_new_tokens=a.new_tokens, temperature=0.0)
    megatron = MegatronSampler(job.bm.model, job.rt.topo, cfg)
    engine = job.sampler
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, temperature=0.0), 0)
    best = {"megatron": (float("inf"), None), "vllm": (float("inf"), None)}
    for _ in range(a.repeats):
        for name, sampler in (("megatron", megatron), ("vllm", engine)):
            t0 = time.perf_counter()
            res = sampler.generate(prompts, greedy, 0)
            best[name] = (min(best[name][0], time.perf_counter() - t0), res)
    # one RL step through the vLLM engine: sample, one GRPO update, sync the new weights
    loss_fn = make_loss_fn(cfg, job.rt.topo, job.edges)
    sample = SamplingParams(max_new_tokens=a.new_tokens, temperature=1.0)
    t0 = time.perf_counter()
    rolls = engine.generate(prompts, sample, 1)
    t_gen = time.perf_counter() - t0
    adv = torch.tensor([1.0, -1.0] * (a.batch // 2))
    rows = grpo_rows(rolls.tokens, rolls.prompt_lens, rolls.lengths, adv, rolls.sampler_logprobs)
    t0 = time.perf_counter()
    update(job, rows, loss_fn)
    t_train = time.perf_counter() - t0
    t_sync = engine.sync_weights()
    job.judge.close()
    return {"best": best, "step": (t_gen, t_train, t_sync)}


def report(a: argparse.Namespace, out: dict) -> None:
    n_new = a.batch * a.new_tokens
    (t_m, r_m), (t_v, r_v) = out["best"]["megatron"], out["best"]["vllm"]
    same = sum(x == y for x, y in zip(r_m.responses(), r_v.responses(), strict=True))
    print(f"vLLM vs Megatron sampler: {a.layers} layers, hidden {a.hidden}; {a.batch} rows, "
          f"prompts {a.prompt_len // 2}-{a.prompt_len} tokens, {a.new_tokens} new tokens each")  # fmt: skip
    print(f"{'case':<34}{'seconds':>9}{'new tok/s':>11}")
    for name, sec in (("Megatron sampler (KV cache)", t_m), ("vLLM engine", t_v)):
        print(f"{name:<34}{sec:>9.3f}{n_new / sec:>11.1f}")
    t_gen, t_train, t_sync = out["step"]
    step = t_gen + t_train + t_sync
    print(f"RL step with vLLM: generate {t_gen:.3f} s, update {t_train:.3f} s, sync {t_sync:.3f} s")
    print("ratios:")
    print(f"  vLLM / Megatron sampler (tok/s) {t_m / t_v:6.2f}x  "
          f"[greedy rows identical: {same}/{a.batch}]")  # fmt: skip
    print(f"  weight sync / RL step           {t_sync / step:6.3f}")


def main() -> None:
    from bench_generation import spawn

    a = parse_args()
    report(a, spawn(vllm_cases, 1, a))


if __name__ == "__main__":
    main()
