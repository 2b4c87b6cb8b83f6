"""One-GPU bench: bf16 train steps of a ~1B Llama-style model (MFU) and generation tokens/s.

Builds the model with the trainer's own code (``build_branch_model``: megatron GPTModel, DDP,
distributed optimizer; one rank), times ``--steps`` optimizer steps of a masked next-token loss
through ``step.run_microbatches`` after ``--warmup`` untimed ones, then times KV-cached sampling
with ``MegatronSampler``. Prints a Markdown block for docs/gpu.md::

    python bench/bench_gpu_step.py                 # ~1.1B model (TinyLlama shape), GPU
    python bench/bench_gpu_step.py --dry           # tiny model on CPU: checks the script runs

MFU = model FLOPs per second / the GPU's dense bf16 peak (``--peak-tflops``, default from the
device name: 989 for H100/H200 SXM). Model FLOPs per token (fwd + bwd) follow megatron's count:
``6 * params + 12 * layers * hidden * seq`` (the attention score and value products, causal
masking not discounted), counted on every token whether or not the loss masks it.
"""

from __future__ import annotations

import argparse
import time

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=2048, help="tokens per training sequence")
    ap.add_argument("--mbs", type=int, default=2, help="sequences per microbatch")
    ap.add_argument("--micro", type=int, default=4, help="microbatches per optimizer step")
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    ap.add_argument("--gen-batch", type=int, default=64, help="prompts per generation batch")
    ap.add_argument("--gen-prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--gen-tokens", type=int, default=256, help="new tokens per prompt")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="0: from the device name")
    ap.add_argument("--dry", action="store_true", help="tiny model, fp32 on CPU (smoke run)")
    a = ap.parse_args(argv)
    if a.dry:
        a.layers, a.hidden, a.ffn, a.heads, a.kv_heads, a.vocab = 2, 64, 128, 4, 2, 128
        a.seq, a.mbs, a.micro, a.steps, a.warmup = 32, 2, 2, 2, 1
        a.gen_batch, a.gen_prompt, a.gen_tokens = 4, 8, 8
    return a


def model_flops_per_token(params: int, layers: int, hidden: int, seq: int) -> float:
    """Training FLOPs per token (forward + backward): ``6 N + 12 L h s``."""
    return 6.0 * params + 12.0 * layers * hidden * seq


def peak_tflops(name: str, given: float) -> float:
    """The dense bf16 peak of the device called ``name`` (``given`` wins when > 0; 0 unknown)."""
    if given > 0:
        return given
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


def build(a: argparse.Namespace):
    """The config, topology and branch model of one rank (bf16 on GPU, fp32 on CPU)."""
    from copd_mega.config import load_config
    from copd_mega.models.branch import build_branch_model
    from copd_mega.models.step import prepare_for_training
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    cfg = load_config(None, [
        f"model.num_layers={a.layers}", f"model.hidden_size={a.hidden}",
        f"model.ffn_hidden_size={a.ffn}", f"model.num_attention_heads={a.heads}",
        f"model.num_query_groups={a.kv_heads}", f"model.vocab_size={a.vocab}",
        f"model.max_seq_length={max(a.seq, a.gen_prompt + a.gen_tokens)}",
        "model.tie_embeddings=false", f"parallel.micro_batch_size={a.mbs}",
        "optim.lr=1e-5", "rollout.logprob_chunk=512",
    ])  # fmt: skip
    init_distributed()
    topo = build_topology(cfg)
    bm = build_branch_model(cfg, topo)
    prepare_for_training(bm, topo)
    return cfg, topo, bm


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def train_steps(a, cfg, topo, bm, device) -> dict:
    """Seconds per optimizer step (best of the timed ones) and the last loss."""
    import torch

    from copd_mega.models.step import optimizer_step, run_microbatches
    from copd_mega.rl.logprobs import response_logprobs

    g = torch.Generator().manual_seed(0)

    def loss_fn(mb, logits):
        lp = response_logprobs(logits, mb["tokens"], topo.pg.tp, a.vocab, cfg.rollout.logprob_chunk)
        mask = torch.ones_like(lp, dtype=torch.bool)
        mask[:, 0] = False
        return -(lp * mask).sum(), mask.sum(), {"nll": -(lp * mask).sum().detach()}

    mbs = []
    for _ in range(a.micro):
        tokens = torch.randint(0, a.vocab, (a.mbs, a.seq), generator=g).to(device)
        pos = torch.arange(a.seq, device=device).expand(a.mbs, -1)
        mbs.append({"tokens": tokens, "position_ids": pos})
    times, stats = [], {}
    for i in range(a.warmup + a.steps):
        sync(device)
        t0 = time.perf_counter()
        run_microbatches(bm, topo, mbs, loss_fn)
        stats = optimizer_step(bm)
        sync(device)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return {"step_s": min(times), "grad_norm": stats["grad_norm"]}


def generation(a, cfg, topo, bm) -> dict:
    """Generated tokens per second of the KV-cached sampler (fixed length: no EOS)."""
    import torch

    from copd_mega.rl.rollout import MegatronSampler
    from copd_mega.rl.sampling import SamplingParams

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, a.vocab, (a.gen_prompt,), generator=g).tolist()
               for _ in range(a.gen_batch)]  # fmt: skip
    sampler = MegatronSampler(bm.model, topo, cfg)
    params = SamplingParams(max_new_tokens=a.gen_tokens, temperature=1.0)
    sampler.generate(prompts[:2], SamplingParams(max_new_tokens=2), seed=0)  # warm-up
    device = next(bm.module.parameters()).device
    sync(device)
    t0 = time.perf_counter()
    out = sampler.generate(prompts, params, seed=0)
    sync(device)
    seconds = time.perf_counter() - t0
    new = int((out.lengths - out.prompt_lens).sum())
    return {"gen_tokens": new, "gen_s": seconds, "gen_tok_s": new / seconds}


def main(argv: list[str] | None = None) -> dict:
    import torch

    from copd_mega.models.gpt import compute_dtype, count_parameters

    a = parse_args(argv)
    if not a.dry and not torch.cuda.is_available():
        raise SystemExit("bench_gpu_step.py needs CUDA; use --dry for a CPU smoke run")
    cfg, topo, bm = build(a)
    device = next(bm.module.parameters()).device
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    params = count_parameters(cfg)
    train = train_steps(a, cfg, topo, bm, device)
    tokens = a.mbs * a.micro * a.seq
    flops = model_flops_per_token(params, a.layers, a.hidden, a.seq) * tokens / train["step_s"]
    peak = peak_tflops(name, a.peak_tflops)
    gen = generation(a, cfg, topo, bm)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    mfu = f"{100 * flops / (peak * 1e12):.1f}%" if peak else "n/a (pass --peak-tflops)"
    attention = type(bm.module.decoder.layers[0].self_attention.core_attention).__name__
    print(
        f"\n### {name}, torch {torch.__version__}, one rank\n\n"
        f"| what | value |\n|---|---|\n"
        f"| model | {params / 1e6:.0f}M params, {a.layers} layers, hidden {a.hidden}, "
        f"{compute_dtype(cfg)}, attention {attention} |\n"
        f"| train step | {a.micro} x {a.mbs} x {a.seq} tokens in {train['step_s']:.3f} s "
        f"({tokens / train['step_s']:.0f} tokens/s), peak memory {mem:.1f} GiB |\n"
        f"| MFU | {mfu} ({flops / 1e12:.1f} model TFLOP/s) |\n"
        f"| generation | {gen['gen_tok_s']:.0f} tokens/s (batch {a.gen_batch}, prompt "
        f"{a.gen_prompt}, {a.gen_tokens} new tokens, KV cache) |\n",
        flush=True,
    )
    return {"params": params, **train, **gen, "tflops": flops / 1e12}


if __name__ == "__main__":
    main()
