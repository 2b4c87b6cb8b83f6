"""Generation speed, measured side by side in one run, as three ratios (and the text KV cache's):

1. **PP2 / PP1** new tokens/s of the same text model, seed and prompts: two gloo ranks (one
   pipeline stage each) against one rank; tokens must be identical.
2. **compaction / none** on mixed-length outputs: sampled with an EOS, so rows end at different
   positions; the compacted run drops finished rows from the batch and the KV cache, the other
   keeps computing them; tokens must be identical.
3. **VLM KV-cached / full recompute**: images and a video per batch; the cached path encodes the
   media once in the prefill, the full recompute at every position; tokens must be identical.

Plus the text model's KV cache / full recompute, and with vLLM installed
``bench_vllm.py``'s vLLM / Megatron sampler tokens/s and weight sync / RL step. Each measurement is the best of ``--repeats``
runs; one intra-op thread per rank (on a busy 2-core machine more threads wait on each other)::

    .venv/bin/python bench/bench_generation.py [--layers 4 --hidden 128 --batch 16 ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=48, help="longest prompt (shortest: half)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--mixed-batch", type=int, default=32, help="rows of the compaction case")
    ap.add_argument("--mixed-new-tokens", type=int, default=128)
    ap.add_argument("--vlm-batch", type=int, default=6)
    ap.add_argument("--vlm-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per path (best is kept)")
    return ap.parse_args(argv)


def text_config(a: argparse.Namespace, pp: int, vocab: int):
    from copd_mega.config import load_config

    return load_config(None, [
        f"model.num_layers={a.layers}", f"model.hidden_size={a.hidden}",
        f"model.ffn_hidden_size={4 * a.hidden}", "model.num_attention_heads=4",
        "model.num_query_groups=2", f"model.vocab_size={vocab}", "model.max_seq_length=256",
        "model.tie_embeddings=false", "model.init_std=0.3", f"parallel.pp={pp}",
        f"rollout.max_batch_size={max(a.batch, a.mixed_batch)}",
    ])  # fmt: skip


def best_of(repeats: int, fns: dict) -> dict:
    """``{name: (best seconds, last result)}``, the callables timed alternately."""
    out = {name: (float("inf"), None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            res = fn()
            sec = time.perf_counter() - t0
            out[name] = (min(sec, out[name][0]), res)
    return out


def prompts_for(n: int, longest: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lens = torch.linspace(longest // 2, longest, n).long().tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lens]


def text_cases(rank: int, a: argparse.Namespace, pp: int) -> dict:
    """PP=``pp`` text model on this process group: greedy timing; at PP1 also KV vs full and
    compaction vs none. Results valid on every rank."""
    from copd_mega.models.gpt import build_gpt
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology
    from copd_mega.rl.rollout import MegatronSampler
    from copd_mega.rl.sampling import SamplingParams

    cfg = text_config(a, pp, a.vocab)
    init_distributed()
    topo = build_topology(cfg)
    model = build_gpt(cfg, topo)
    prompts = prompts_for(a.batch, a.prompt_len, a.vocab)
    greedy = SamplingParams(max_new_tokens=a.new_tokens, temperature=0.0)
    kv = MegatronSampler(model, topo, cfg)
    kv.generate(prompts[:2], SamplingParams(max_new_tokens=4, temperature=0.0), 0)  # warm-up
    fns = {"kv": lambda: kv.generate(prompts, greedy, 0)}
    if pp == 1:
        full = MegatronSampler(model, topo, cfg, use_kv_cache=False)
        fns["full"] = lambda: full.generate(prompts, greedy, 0)
    out = {"greedy": best_of(a.repeats, fns)}
    if pp == 1:
        out["mixed"] = mixed_lengths(a, topo)
    return out


def mixed_lengths(a: argparse.Namespace, topo) -> dict:
    """Sampled rows that end at different positions (EOS = the model's most frequent sampled
    token), with and without compaction, on a small-vocabulary model."""
    import torch

    from copd_mega.models.gpt import build_gpt
    from copd_mega.rl.rollout import MegatronSampler
    from copd_mega.rl.sampling import SamplingParams

    vocab = 64
    cfg = text_config(a, 1, vocab)
    model = build_gpt(cfg, topo)
    prompts = prompts_for(a.mixed_batch, a.prompt_len // 2, vocab, seed=1)
    pilot = MegatronSampler(model, topo, cfg).generate(prompts, SamplingParams(16), 5)
    eos = int(torch.bincount(pilot.tokens[pilot.response_mask()]).argmax())
    params = SamplingParams(a.mixed_new_tokens, temperature=1.0, eos_id=eos)
    on = MegatronSampler(model, topo, cfg, compact=True)
    off = MegatronSampler(model, topo, cfg, compact=False)
    res = best_of(a.repeats, {"compact": lambda: on.generate(prompts, params, 3),
                              "none": lambda: off.generate(prompts, params, 3)})  # fmt: skip
    res["stats"] = (on.last_stats, off.last_stats)
    return res


def vlm_cases(rank: int, a: argparse.Namespace) -> dict:
    """Tiny vision-language model: KV-cached vs full-recompute generation with media."""
    import torch

    from copd_mega.config import load_config
    from copd_mega.data.tokenizer import build_tokenizer, special_ids
    from copd_mega.models.vlm import build_vlm
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology
    from copd_mega.rl.sampling import SamplingParams
    from copd_mega.rl.vlm_sampler import VLMSampler

    cfg = load_config(None, [
        "vision.enabled=true", "vision.num_layers=2", "vision.hidden_size=64",
        "vision.ffn_hidden_size=256", "vision.num_attention_heads=4",
        f"model.num_layers={a.layers}", f"model.hidden_size={a.hidden}",
        f"model.ffn_hidden_size={4 * a.hidden}", "model.max_seq_length=160",
        "model.vocab_size=128", "model.tie_embeddings=false", "model.init_std=0.3",
    ])  # fmt: skip
    init_distributed()
    topo = build_topology(cfg)
    model = build_vlm(cfg, topo)
    ids = special_ids(build_tokenizer())
    g = torch.Generator().manual_seed(0)
    prompts, media = [], []
    for i in range(a.vlm_batch):  # alternating: one image, a 4-frame video
        shape = (3, 32, 32) if i % 2 == 0 else (4, 3, 32, 32)
        item = torch.rand(*shape, generator=g)
        text = torch.randint(10, 100, (8 + i,), generator=g).tolist()
        prompts.append([ids["bos"], ids["image"], *text])
        media.append([item])
    params = SamplingParams(max_new_tokens=a.vlm_new_tokens, temperature=0.0)
    kv = VLMSampler(model, topo, cfg, ids["image"], use_kv_cache=True)
    full = VLMSampler(model, topo, cfg, ids["image"], use_kv_cache=False)
    kv.generate(prompts[:1], SamplingParams(max_new_tokens=2, temperature=0.0), 0, media[:1])
    return best_of(a.repeats, {"kv": lambda: kv.generate(prompts, params, 0, media),
                               "full": lambda: full.generate(prompts, params, 0, media)})  # fmt: skip


def _entry(rank: int, fn, world: int, port: int, outdir: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    res = fn(rank, *args)
    if rank == 0:
        torch.save(res, os.path.join(outdir, "out.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def spawn(fn, world: int, *args):
    """Run ``fn(rank, *args)`` on ``world`` gloo ranks; return rank 0's result."""
    import torch
    import torch.multiprocessing as mp

    from copd_mega.parallel.dist import free_port

    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_entry, args=(fn, world, free_port(), outdir, args), nprocs=world,
                           start_method="spawn")  # fmt: skip
        return torch.load(os.path.join(outdir, "out.pt"), weights_only=False)


def report(a: argparse.Namespace, pp1: dict, pp2: dict, vlm: dict) -> None:
    import torch

    n_new = a.batch * a.new_tokens
    (t_kv, r_kv), (t_full, r_full) = pp1["greedy"]["kv"], pp1["greedy"]["full"]
    t_pp2, r_pp2 = pp2["greedy"]["kv"]
    print(f"text model: {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}; {a.batch} rows, "
          f"prompts {a.prompt_len // 2}-{a.prompt_len} tokens, {a.new_tokens} new tokens each")  # fmt: skip
    print(f"{'case':<34}{'seconds':>9}{'new tok/s':>11}")
    for name, sec in (("PP1 KV cache (1 rank)", t_kv), ("PP1 full recompute (1 rank)", t_full),
                      ("PP2 KV cache (2 ranks)", t_pp2)):  # fmt: skip
        print(f"{name:<34}{sec:>9.3f}{n_new / sec:>11.1f}")
    (t_on, r_on), (t_off, r_off) = pp1["mixed"]["compact"], pp1["mixed"]["none"]
    s_on, s_off = pp1["mixed"]["stats"]
    resp = (r_on.lengths - r_on.prompt_lens).float()
    mixed_new = int(resp.sum())
    print(
        f"mixed lengths: {a.mixed_batch} rows, response length mean {resp.mean():.1f}, "
        f"min {int(resp.min())}, max {int(resp.max())} of {a.mixed_new_tokens}"
    )
    for name, sec, st in (("compaction", t_on, s_on), ("no compaction", t_off, s_off)):
        print(f"{name:<34}{sec:>9.3f}{mixed_new / sec:>11.1f}   row-forwards {st['row_forwards']}")
    (t_vkv, v_kv), (t_vfull, v_full) = vlm["kv"], vlm["full"]
    v_new = a.vlm_batch * a.vlm_new_tokens
    print(
        f"VLM: {a.vlm_batch} rows (image or 4-frame video, 16 positions per frame), "
        f"{a.vlm_new_tokens} new tokens each"
    )
    for name, sec in (("VLM KV cache", t_vkv), ("VLM full recompute", t_vfull)):
        print(f"{name:<34}{sec:>9.3f}{v_new / sec:>11.1f}")
    same = {
        "pp2": torch.equal(r_pp2.tokens, r_kv.tokens),
        "compaction": torch.equal(r_on.tokens, r_off.tokens),
        "vlm": torch.equal(v_kv.tokens, v_full.tokens),
        "kv": torch.equal(r_kv.tokens, r_full.tokens),
    }
    print("ratios (tokens/s of the first over the second; identical tokens in brackets):")
    print(f"  PP2 / PP1 (KV cache)            {t_kv / t_pp2:6.2f}x  [{same['pp2']}]")
    print(f"  compaction / none (mixed)       {t_off / t_on:6.2f}x  [{same['compaction']}]")
    print(f"  VLM KV cache / full recompute   {t_vfull / t_vkv:6.2f}x  [{same['vlm']}]")
    print(f"  text KV cache / full recompute  {t_full / t_kv:6.2f}x  [{same['kv']}]")


def main() -> None:
    a = parse_args()
    pp1 = spawn(text_cases, 1, a, 1)
    pp2 = spawn(text_cases, 2, a, 2)
    vlm = spawn(vlm_cases, 1, a)
    report(a, pp1, pp2, vlm)
    if importlib.util.find_spec("vllm") is not None:  # vLLM vs the Megatron sampler
        import bench_vllm

        bench_vllm.report(a, spawn(bench_vllm.vllm_cases, 1, bench_vllm.parse_args()))


if __name__ == "__main__":
    main()
