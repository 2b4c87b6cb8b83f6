"""What ``copd plan --predict`` prints: the predicted seconds of each phase of a step and the
step total, per kind of step and per group of alike branches, with every number it assumes.

The arithmetic is :mod:`copd_mega.launch.step_time`; this module turns the command line into
a :class:`~copd_mega.launch.step_time.Setting` (``--gpu h100|h200|a100|cpu``, where ``cpu``
measures this machine, :mod:`copd_mega.launch.measure`) and formats the result.
"""

from __future__ import annotations

import argparse
import dataclasses

from copd_mega.config import Config
from copd_mega.launch.flops import token_cost
from copd_mega.launch.gen_time import ENGINES, engine_shape, engine_with, vllm_setup
from copd_mega.launch.hardware import hardware
from copd_mega.launch.measure import LAYERS_OUTSIDE, cpu_costs, measure_cpu, measured_costs
from copd_mega.launch.memory import GIB, memory_parts, stage_params
from copd_mega.launch.predict import RESIDENT
from copd_mega.launch.step_time import (
    PHASES,
    Setting,
    assume_with,
    predict_run,
    predict_step,
    ring_allreduce_s,
)
from copd_mega.launch.validate import prompt_positions_bound, schedule_plan
from copd_mega.parallel.topology import teaching_edges


def add_args(ap: argparse.ArgumentParser) -> None:
    """The step-time options of ``copd plan`` and ``copd report scaling --predict``."""
    ap.add_argument("--predict", action="store_true", help="predict seconds per phase of a step")
    ap.add_argument(
        "--interconnect-gbps", type=float, default=0.0,
        help="per-GPU network between branches (nodes), Gb/s (default: the --gpu preset's)",
    )  # fmt: skip
    ap.add_argument(
        "--step-assume", action="append", default=[], metavar="FIELD=VALUE",
        help="override a step-model assumption, e.g. train_mfu=0.5 or ckpt_bytes_per_s=5e9",
    )  # fmt: skip
    ap.add_argument(
        "--cpu-costs", default="",
        help="with --gpu cpu: JSON of measured fixed costs (bench/bench_step_costs.py) in place "
        "of the layer-count estimate",
    )  # fmt: skip
    ap.add_argument(
        "--engine", choices=sorted(ENGINES), default=None,
        help="generation engine (default: the config's rollout.engine, else megatron)",
    )  # fmt: skip


def config_engine(cfg: Config, args: argparse.Namespace) -> str:
    """``--engine``, else the config's ``rollout.engine`` where the config has one."""
    return args.engine or getattr(cfg.rollout, "engine", "megatron")


def make_setting(cfg: Config, world: int, args: argparse.Namespace, hw=None) -> Setting:
    """The hardware, engine and assumptions of the command line for ``cfg`` on ``world``
    ranks (``hw``: an already measured CPU, else measured now for ``--gpu cpu``).
    ValueError naming the option for a bad value."""
    name = config_engine(cfg, args)
    engine = engine_with(name, getattr(args, "gen_assume", []))
    assume = assume_with([])
    gpu = getattr(args, "gpu", None) or "h100"
    if gpu == "cpu":
        m = cfg.model
        hw = hw or measure_cpu(m.hidden_size, m.num_attention_heads, m.ffn_hidden_size)
        engine, assume = cpu_costs(m.num_layers, hw, engine, assume)
        if args.cpu_costs:
            engine, assume, hw = measured_costs(args.cpu_costs, engine, assume, hw)
    else:
        hw = hardware(gpu, getattr(args, "peak_tflops", 0.0), getattr(args, "hbm_tbps", 0.0),
                      args.interconnect_gbps)  # fmt: skip
    assume = assume_with(args.step_assume, assume)
    if not engine.continuous:
        return Setting(hw, engine, assume, world)
    c = token_cost(cfg, cfg.parallel.tp)
    resident = sum(x.bytes for x in memory_parts(cfg) if x.name in RESIDENT)
    gen_tp, budget = vllm_setup(
        cfg, c, engine, hw.memory_gib * GIB, resident, getattr(args, "gen_tp", 0)
    )
    mean = assume.mean_response or cfg.rollout.max_new_tokens
    shape, split = engine_shape(cfg, engine, c, prompt_positions_bound(cfg), mean, budget, gen_tp)
    return Setting(hw, engine, assume, world, gen_shape=shape, gen_split=split)


def describe(s: Setting) -> list[str]:
    """Every number the setting assumes, as lines."""
    hw, a, e = s.hw, s.assume, s.engine
    lines = [
        f"  hardware: {hw.name}: {hw.peak_flops / 1e12:.4g} TFLOP/s, memory {hw.hbm_bytes_per_s / 1e9:.4g} GB/s, "
        f"in-node link {hw.nvlink_bytes_per_s / 1e9:.4g} GB/s, between branches "
        f"{hw.interconnect_bytes_per_s / 1e9:.4g} GB/s ({hw.interconnect_bytes_per_s * 8 / 1e9:.4g} Gb/s) "
        f"a direction; {hw.source}",
    ]
    if hw.cores and "bench" in hw.source:
        lines.append(
            f"  cpu: {hw.cores} cores shared by {s.world} ranks and a background load of "
            f"{hw.background_load:.1f} (x{s.slowdown:.3g} on every compute and host term); "
            f"fixed costs measured by bench/bench_step_costs.py "
            f"(below); one gloo collective {hw.latency_s * 1e3:.3g} ms; efficiencies 1"
        )
    elif hw.cores:
        lines.append(
            f"  cpu: {hw.cores} cores shared by {s.world} ranks (x{s.slowdown:g} on every "
            f"compute and host term); one layer's forward {hw.op_overhead_s * 1e3:.3f} ms, so "
            f"a forward's fixed cost = (layers + {LAYERS_OUTSIDE}) x that; message "
            f"{hw.latency_s * 1e6:.1f} us; efficiencies 1 (the measured rates are reached)"
        )
    lines += [
        f"  generation ({e.name}): prefill {e.prefill_mfu:.0%} / decode {e.decode_mfu:.0%} of "
        f"FLOP/s, decode {e.decode_bw_eff:.0%} of memory bandwidth, "
        f"{e.forward_overhead_s * 1e3:.3g} ms per forward per stage",
        f"  update {a.train_mfu:.0%} and teacher scoring {a.score_mfu:.0%} of FLOP/s, "
        f"{a.pass_overhead_s * 1e3:.3g} ms per micro-batch forward per stage; optimizer "
        f"{a.optimizer_bw_eff:.0%} of memory bandwidth + {a.optimizer_fixed_s * 1e3:.3g} ms; "
        f"collectives {a.net_eff:.0%} of link "
        f"bandwidth + {s.latency_s * 1e6:.3g} us a message; reward {a.reward_row_s * 1e3:.3g} "
        f"ms a rollout; checkpoint {a.ckpt_bytes_per_s / 1e9:.3g} GB/s per rank + "
        f"{a.ckpt_fixed_s:.3g} s; responses "
        + (f"{a.mean_response:g} tokens" if a.mean_response else "at rollout.max_new_tokens "
           "(an upper bound; --step-assume mean_response=N)"),
    ]  # fmt: skip
    if not hw.cores:
        lines.append(f"  ({a.why()}; generation: {e.why})")
    return lines


def _row(label: str, phases: dict[str, float]) -> str:
    cells = " ".join(f"{phases[p]:>10.3f}" for p in PHASES)
    return f"    {label:<22}{cells} {sum(phases.values()):>10.3f}"


def format_step_time(cfg: Config, world: int, edges: list, args: argparse.Namespace) -> list[str]:
    """``copd plan --predict``: per kind of step, each group of alike branches' phase seconds
    and total; then the mean step and the run. ValueError naming the option for bad input."""
    s = make_setting(cfg, world, args)
    c = token_cost(cfg, cfg.parallel.tp)
    prompt = prompt_positions_bound(cfg)
    steps = schedule_plan(cfg, edges)
    lines = [f"step time (predicted, seconds; --gpu {getattr(args, 'gpu', None) or 'h100'}):",
             *describe(s)]  # fmt: skip
    lines.append(f"    {'step / branches':<22}" + " ".join(f"{p:>10}" for p in PHASES)
                 + f" {'total':>10}")  # fmt: skip
    seen: dict[tuple, int] = {}
    for st in steps:
        key = (st.phase, st.learners, st.edges, st.end_of_cycle)
        seen[key] = seen.get(key, 0) + 1
    done = set()
    for st in steps:
        key = (st.phase, st.learners, st.edges, st.end_of_cycle)
        if key in done:
            continue
        done.add(key)
        plain = dataclasses.replace(st, step=-2)  # no checkpoint in the per-kind rows
        pred = predict_step(cfg, s, c, plain, prompt)
        groups: dict[tuple, list[str]] = {}
        for b, bs in pred.items():
            groups.setdefault(tuple(round(bs.phase_s[p], 4) for p in PHASES), []).append(b)
        tail = ", cycle end" if st.end_of_cycle else ""
        total = max(bs.total_s for bs in pred.values())
        lines.append(f"  {st.phase} step{tail} (x{seen[key]}): {total:.3f} s (slowest branch)")
        for vals, bs in groups.items():
            label = bs[0] if len(bs) == 1 else f"{bs[0]} +{len(bs) - 1} alike"
            lines.append(_row(label, dict(zip(PHASES, vals, strict=True))))
    mean = predict_run(cfg, s, c, steps, prompt, skip_first=False)
    avg = {p: sum(m[p] for m in mean.values()) / len(mean) for p in PHASES}
    slow = max(sum(m.values()) for m in mean.values())
    lines.append(_row("mean step (all branches)", avg))
    lines.append(
        f"  step total: {slow:.3f} s (slowest branch, checkpoints spread over steps); "
        f"run of {len(steps)} steps: {slow * len(steps) / 3600:.3g} h"
    )
    if len(cfg.branches) > 1:
        link = s.hw.interconnect_bytes_per_s or s.hw.hbm_bytes_per_s
        final = ring_allreduce_s(4 * stage_params(cfg), len(cfg.branches), link, s)
        lines.append(f"  final merge (once, after the last step): {final:.3f} s")
    return lines


def job_edges(cfg: Config) -> list[tuple[str, str]]:
    """The teaching edges of ``cfg`` (as the layout computes them)."""
    t = cfg.teaching
    return teaching_edges(cfg.branch_names, t.graph, t.hub)
