"""KV-cached generation against full recompute on the same Megatron model, batch and prompts.

Single process (world size 1, TP1). Greedy, no EOS, so both paths generate exactly
``--new-tokens`` tokens per sequence; the script checks they produce the same tokens and prints
generated tokens per second for each and the speed-up::

    .venv/bin/python bench/bench_generation.py [--layers 4 --hidden 128 --batch 16 --new-tokens 64]

The two paths are timed alternately and the best run of each is kept, so load from other
processes on a shared machine biases neither. One intra-op thread by default: on a busy 2-core
machine more threads wait on each other and make timings erratic (``--threads`` changes it).
On CPU a one-token step is dominated by per-module Python overhead, so the speed-up grows with
batch and sequence length (full recompute costs grow with both, a cached step barely does).
"""

from __future__ import annotations

import argparse
import time


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64, help="longest prompt (shortest is half)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per path (best is kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return ap.parse_args()


def main() -> None:
    import torch

    from copd_mega.config import load_config
    from copd_mega.model import build_gpt
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology
    from copd_mega.rollout import MegatronSampler, SamplingParams

    a = parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(None, [
        f"model.num_layers={a.layers}", f"model.hidden_size={a.hidden}",
        f"model.ffn_hidden_size={4 * a.hidden}", "model.num_attention_heads=4",
        "model.num_query_groups=2", f"model.vocab_size={a.vocab}",
        f"model.max_seq_length={a.prompt_len + a.new_tokens}",
        "model.tie_embeddings=false", "model.init_std=0.3",
    ])  # fmt: skip
    init_distributed()
    topo = build_topology(cfg)
    model = build_gpt(cfg, topo)
    g = torch.Generator().manual_seed(0)
    lens = torch.linspace(a.prompt_len // 2, a.prompt_len, a.batch).long().tolist()
    prompts = [torch.randint(0, a.vocab, (n,), generator=g).tolist() for n in lens]
    params = SamplingParams(max_new_tokens=a.new_tokens, temperature=0.0)
    n_new = a.batch * a.new_tokens
    print(
        f"model: {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}; batch {a.batch}, "
        f"prompts {min(lens)}-{max(lens)} tokens, {a.new_tokens} new tokens each, "
        f"torch threads {torch.get_num_threads()}"
    )
    samplers = {
        "kv-cache": MegatronSampler(model, topo, cfg, use_kv_cache=True),
        "full-recompute": MegatronSampler(model, topo, cfg, use_kv_cache=False),
    }
    results = {name: (float("inf"), None) for name in samplers}
    for sampler in samplers.values():  # warm-up: allocator, RoPE tables
        sampler.generate(prompts[:2], SamplingParams(max_new_tokens=4, temperature=0.0), 0)
    for _ in range(a.repeats):
        for name, sampler in samplers.items():
            t0 = time.perf_counter()
            out = sampler.generate(prompts, params, seed=0)
            sec = time.perf_counter() - t0
            assert int((out.lengths - out.prompt_lens).sum()) == n_new
            results[name] = (min(sec, results[name][0]), out)
    same = torch.equal(results["kv-cache"][1].tokens, results["full-recompute"][1].tokens)
    print(f"{'path':<16}{'seconds':>10}{'new tokens/s':>16}")
    for name, (sec, _) in results.items():
        print(f"{name:<16}{sec:>10.3f}{n_new / sec:>16.1f}")
    ratio = results["full-recompute"][0] / results["kv-cache"][0]
    print(f"speed-up kv-cache / full-recompute: {ratio:.2f}x; identical tokens: {same}")


if __name__ == "__main__":
    main()
