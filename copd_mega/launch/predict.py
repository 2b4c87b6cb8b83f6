"""What ``copd plan`` prints about time: the predicted generation time per step, per engine,
with every number it assumes (``--gpu``, ``--mean-response-tokens``, ``--gen-assume``).

The arithmetic is in :mod:`copd_mega.launch.gen_time` (and ``flops``, ``hardware``); this
module reads the config and the command line and formats the result.
"""

from __future__ import annotations

import argparse

from copd_mega.config import Config, ConfigError
from copd_mega.launch.flops import token_cost
from copd_mega.launch.gen_time import (
    ENGINES,
    GenerationPlan,
    PhaseTime,
    engine_shape,
    engine_with,
    predict_generation,
    vllm_setup,
)
from copd_mega.launch.hardware import GPUS, hardware
from copd_mega.launch.memory import GIB, memory_parts, vision_params
from copd_mega.launch.validate import prompt_positions_bound, schedule_plan
from copd_mega.parallel.topology import Layout

# Memory parts that stay on the GPU while a colocated engine generates (the training state).
RESIDENT = (
    "weights",
    "gradients (fp32 buffer)",
    "optimizer (distributed over DP)",
    "runtime reserve",
)


def add_args(ap: argparse.ArgumentParser) -> None:
    """The time-prediction options of ``copd plan``."""
    ap.add_argument(
        "--gpu", choices=[*sorted(GPUS), "cpu"], default=None,
        help="predict generation time per step on this GPU (also printed, for h100, with "
        "--gpu-memory-gb); cpu (--predict only): this machine, measured",
    )  # fmt: skip
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="override the GPU's bf16 peak")
    ap.add_argument("--hbm-tbps", type=float, default=0.0, help="override its HBM TB/s")
    ap.add_argument(
        "--mean-response-tokens", type=float, default=0.0,
        help="expected response length (default rollout.max_new_tokens: an upper bound)",
    )  # fmt: skip
    ap.add_argument(
        "--gen-assume", action="append", default=[], metavar="ENGINE.FIELD=VALUE",
        help="override an engine assumption, e.g. megatron.decode_bw_eff=0.6 or "
        "vllm.forward_overhead_s=0.001",
    )  # fmt: skip
    ap.add_argument(
        "--gen-tp",
        type=int,
        default=0,
        help="vllm generation TP (default rollout.tp: one engine per rank)",
    )


def _h(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _parts(t: PhaseTime) -> str:
    return f"prefill {_h(t.prefill_s)}, decode {_h(t.decode_s)}, overhead {_h(t.overhead_s)}"


def format_engine(plan: GenerationPlan) -> list[str]:
    """One engine's assumptions and its time per kind of step, grouped by equal branches."""
    e, s = plan.engine, plan.shape
    stages = f", its {s.stages} PP stages in turn" if s.stages > 1 else ""
    where = (
        f"one sampler per DP replica: TP{s.gpus} GPUs at once{stages}, micro-batches of "
        f"{s.batch} rows, one after another"
        if not e.continuous
        else f"{plan.split} engine(s) per DP replica of TP{s.gpus}, up to {s.batch} rows at "
        "once (KV budget)"
    )
    lines = [
        f"  {e.name}: {where}",
        f"    assumes prefill {e.prefill_mfu:.0%} of peak FLOP/s, decode {e.decode_bw_eff:.0%} of "
        f"HBM bandwidth ({e.decode_mfu:.0%} of FLOP/s when compute-bound), "
        f"{e.forward_overhead_s * 1e3:g} ms per forward per stage"
        + (f", KV memory {e.kv_memory_fraction:.0%} of the GPU" if e.continuous else ""),
        f"    ({e.why})",
    ]
    for k in plan.kinds:
        name, slow = k.slowest()
        groups: dict[float, list[str]] = {}
        for b, t in k.times.items():
            groups.setdefault(round(t.total_s, 3), []).append(b)
        others = "; ".join(f"{', '.join(bs)} {_h(sec)}" for sec, bs in groups.items()
                           if name not in bs)  # fmt: skip
        lines.append(
            f"    {k.phase} step (x{k.count}): {_h(slow.total_s)}, slowest branch {name} "
            f"({_parts(slow)})" + (f"; {others}" if others else "")
        )
    lines.append(
        f"    run: {_h(plan.run_s)} of generation over {sum(k.count for k in plan.kinds)} steps"
    )
    return lines


def _work(cfg: Config, plan: GenerationPlan) -> list[str]:
    """The calls of one megatron sampler per kind of step, grouped by equal branches."""
    lines = []
    for k in plan.kinds:
        groups: dict[str, list[str]] = {}
        for b, calls in k.calls.items():
            text = " + ".join(f"{c.what} {c.prompts}x{c.samples}" for c in calls) or "none"
            groups.setdefault(text, []).append(b)
        shown = "; ".join(f"{', '.join(bs)}: {text}" for text, bs in groups.items())
        lines.append(f"  {k.phase} step, per DP replica (prompts x rollouts): {shown}")
    return lines


def format_generation(cfg: Config, layout: Layout, args: argparse.Namespace) -> list[str]:
    """The predicted generation time per step for ``cfg`` on ``args.gpu`` (lines).
    ValueError naming the option for a bad ``--gpu``/``--gen-assume``/``--mean-response-tokens``."""
    hw = hardware(args.gpu or "h100", args.peak_tflops, args.hbm_tbps)
    engines = {n: engine_with(n, args.gen_assume) for n in ENGINES}
    if args.mean_response_tokens and args.mean_response_tokens < 1:
        raise ValueError(f"--mean-response-tokens {args.mean_response_tokens:g} must be >= 1")
    try:
        prompt = prompt_positions_bound(cfg)
    except ConfigError as e:  # only when the prompt bound is unknown (not a training job)
        return [f"generation per step: unknown ({e})"]
    r = cfg.rollout
    mean = min(args.mean_response_tokens or r.max_new_tokens, r.max_new_tokens)
    c = token_cost(cfg, cfg.parallel.tp)
    steps = schedule_plan(cfg, layout.edges)
    gpu_bytes = (args.gpu_memory_gb or hw.memory_gib) * GIB
    resident = sum(x.bytes for x in memory_parts(cfg) if x.name in RESIDENT)
    lines = [
        f"generation per step (predicted; --gpu {args.gpu or 'h100'}: {hw.name}, "
        f"{hw.peak_flops / 1e12:g} TFLOP/s bf16 dense, {hw.hbm_bytes_per_s / 1e12:g} TB/s HBM "
        f"per GPU, {hw.source}):",
        f"  per token: 2 x {c.matmul_params / 1e9:.2f}B matmul params + 4 x {c.layers} layers x "
        f"{c.q_dim} x context FLOPs; a forward reads {c.weight_bytes / 1e9:.1f} GB of weights, "
        f"a row {c.kv_bytes_per_position / 2**10:g} KiB of KV cache per cached position",
        f"  prompts at {prompt} positions, responses {r.max_new_tokens} tokens at most, {mean:g} "
        "on average"
        + (
            ""
            if args.mean_response_tokens
            else " (--mean-response-tokens; default the maximum: an upper bound)"
        ),  # fmt: skip
    ]
    if cfg.vision.enabled:
        lines.append(f"  not counted: the vision tower ({vision_params(cfg) / 1e6:.0f}M params) "
                     "on the prompts' media, teacher scoring, the update")  # fmt: skip
    else:
        lines.append("  not counted: teacher scoring, the update")
    plans = []
    for eng in engines.values():
        gen_tp, budget = vllm_setup(cfg, c, eng, gpu_bytes, resident, args.gen_tp)
        try:
            shape, split = engine_shape(cfg, eng, c, prompt, mean, budget, gen_tp)
        except ValueError as e:
            plans.append([f"  {eng.name}: unknown ({e})"])
            continue
        plan = predict_generation(cfg, steps, c, hw, eng, shape, split, mean, prompt)
        if not plans:
            lines += _work(cfg, plan)
        plans.append(format_engine(plan))
    for p in plans:
        lines += p
    return lines
