"""Predicted generation time of a CoPD step, per branch and per engine (``copd plan``).

Pure arithmetic on the config, the step plan and stated hardware (``launch/hardware.py``) and
engine assumptions (:class:`Engine`); :mod:`copd_mega.launch.flops` counts FLOPs and bytes.
The result is a :class:`PhaseTime` per branch: seconds split into prefill, decode and fixed
per-forward overhead, with the FLOPs and bytes behind them, so further phases (teacher scoring,
the update, the exchange, the merge) can be added beside it.

**The work.** In a step each learning branch samples ``grpo.group_size`` rollouts for each of
its native prompts (``rollout.prompts_per_step``, split over its DP replicas); in an OPD step it
also samples ``opd.samples_per_prompt`` rollouts on ``opd.prompts_per_peer`` prompts of each
teacher it learns from, one ``generate`` call per teacher (a hub learning from B-1 spokes makes
B-1 such calls, its extra work). Every prompt is taken at the longest prompt bound (P,
``data.max_prompt_tokens``) and a response is ``rollout.max_new_tokens`` (R) long at most and
``mean_response`` long on average (by default R: an upper bound). DP replicas (and the branches)
generate at once, so a branch's time is one engine's share and the step's is the slowest branch.

**Time of a call** on an engine whose ``gpus`` GPUs work on each forward together (FLOP/s and
bandwidth add up): prefill = its FLOPs / (gpus x peak x ``prefill_mfu``) (compute-bound);
decode = max(FLOPs / (gpus x peak x ``decode_mfu``), bytes / (gpus x HBM x ``decode_bw_eff``))
where the bytes are the weights read once per decode step plus each row's KV cache read at
every step (memory-bound at RL batch sizes); plus ``forward_overhead_s`` per forward (launches,
collectives, host syncs) on each pipeline stage it passes through. The engines differ in:

* **megatron** (``rl/rollout.py``): micro-batches of ``rollout.max_batch_size`` rows, one after
  another; a micro-batch runs R - 1 decode steps (taken as reaching the cap: no refill, so its
  longest row sets its length) while compaction drops finished rows (the KV reads and FLOPs
  follow the mean length); every row prefills its own prompt; PP stages run one after another
  per position, so only TP GPUs work at once.
* **vllm**: continuous batching: as many rows run at once as the KV budget holds at prompt +
  mean response (``vllm_concurrency``), refilled as rows finish, so the decode steps are the
  call's tokens / that concurrency (at least R - 1); prefix caching prefills each distinct
  prompt once (its G rollouts share it); the engine spans ``gpus`` = its generation TP.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from copd_mega.config import Config
from copd_mega.launch.flops import (
    TokenCost,
    decode_flops,
    decode_kv_bytes,
    prefill_flops,
)
from copd_mega.launch.hardware import Hardware
from copd_mega.rl.schedule import StepPlan


@dataclass(frozen=True)
class Engine:
    """What a generation engine is assumed to reach (fractions of the GPU's peaks)."""

    name: str
    prefill_mfu: float  # fraction of peak FLOP/s in the prefill
    decode_mfu: float  # fraction of peak FLOP/s when a decode step is compute-bound
    decode_bw_eff: float  # fraction of peak HBM bandwidth in decode
    forward_overhead_s: float  # fixed cost of one forward on one pipeline stage
    continuous: bool  # finished rows are refilled (continuous batching)
    prefix_cache: bool  # the rollouts of one prompt share its prefill
    kv_memory_fraction: float  # share of GPU memory the engine may fill (vLLM's utilization)
    why: str  # one line: where the numbers come from


ENGINES: dict[str, Engine] = {
    "megatron": Engine(
        "megatron", 0.40, 0.40, 0.50, 3e-3, False, False, 0.0,
        "static micro-batches, no refill, no CUDA graphs, one TP/PP broadcast and a "
        "full-vocabulary softmax per position; efficiencies assumed, not measured on a GPU",
    ),
    "vllm": Engine(
        "vllm", 0.55, 0.50, 0.70, 0.5e-3, True, True, 0.90,
        "paged KV cache, continuous batching, prefix caching, CUDA graphs; KV memory = "
        "vLLM's default gpu_memory_utilization; efficiencies assumed, not measured on a GPU",
    ),
}  # fmt: skip

TUNABLE = ("prefill_mfu", "decode_mfu", "decode_bw_eff", "forward_overhead_s", "kv_memory_fraction")


def engine_with(name: str, overrides: list[str]) -> Engine:
    """Preset ``name`` with ``ENGINE.FIELD=VALUE`` overrides for this engine applied
    (``megatron.decode_bw_eff=0.6``; others' are skipped). ValueError naming the bad item."""
    eng = ENGINES[name]
    for item in overrides:
        key, sep, value = item.partition("=")
        who, _, field = key.partition(".")
        if not sep or who not in ENGINES or field not in TUNABLE:
            raise ValueError(
                f"--gen-assume {item!r}: use ENGINE.FIELD=VALUE with ENGINE one of "
                f"{', '.join(ENGINES)} and FIELD one of {', '.join(TUNABLE)}"
            )
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not 0 < number < math.inf or (field != "forward_overhead_s" and number > 1):
            raise ValueError(
                f"--gen-assume {item!r}: {field} must be a number in (0, 1]"
                + (" (seconds)" if field == "forward_overhead_s" else "")
            )
        if who == name:
            eng = dataclasses.replace(eng, **{field: number})
    return eng


@dataclass(frozen=True)
class GenCall:
    """One ``generate`` call on one engine: ``prompts`` distinct prompts x ``samples`` each."""

    what: str  # "native" or "peer <teacher>"
    prompts: int
    samples: int
    prompt_len: int  # P (positions, text + media)
    max_response: int  # R
    mean_response: float  # expected response length (<= R)

    @property
    def rows(self) -> int:
        return self.prompts * self.samples


@dataclass(frozen=True)
class PhaseTime:
    """Seconds of one phase on one engine, and the FLOPs and bytes behind them."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    overhead_s: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    forwards: float = 0.0

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s + self.overhead_s

    def __add__(self, other: PhaseTime) -> PhaseTime:
        pairs = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return PhaseTime(*(a + b for a, b in pairs))


@dataclass(frozen=True)
class EngineShape:
    """How one engine sits on the GPUs: ``gpus`` work on each forward at once, a forward
    passes ``stages`` pipeline stages one after another, and at most ``batch`` rows run at
    once (megatron: ``rollout.max_batch_size``; vllm: :func:`vllm_concurrency`)."""

    gpus: int
    stages: int
    batch: int


def _decode(
    c: TokenCost,
    hw: Hardware,
    eng: Engine,
    shape: EngineShape,
    call: GenCall,
    rows: int,
    steps: int,
) -> PhaseTime:
    """``rows`` rows decoding their mean response after the prefill's first token, in
    ``steps`` steps that each read the weights once."""
    p, n = call.prompt_len + 1, call.mean_response - 1
    flops = rows * decode_flops(c, p, n)
    nbytes = steps * c.weight_bytes + rows * decode_kv_bytes(c, p, n)
    sec = max(flops / (shape.gpus * hw.peak_flops * eng.decode_mfu),
              nbytes / (shape.gpus * hw.hbm_bytes_per_s * eng.decode_bw_eff))  # fmt: skip
    return PhaseTime(decode_s=sec, flops=flops, bytes=nbytes, forwards=steps)


def _prefill(
    c: TokenCost,
    hw: Hardware,
    eng: Engine,
    shape: EngineShape,
    prompts: int,
    length: int,
    forwards: int,
) -> PhaseTime:
    flops = prompts * prefill_flops(c, length)
    nbytes = forwards * c.weight_bytes
    sec = max(flops / (shape.gpus * hw.peak_flops * eng.prefill_mfu),
              nbytes / (shape.gpus * hw.hbm_bytes_per_s * eng.decode_bw_eff))  # fmt: skip
    return PhaseTime(prefill_s=sec, flops=flops, bytes=nbytes, forwards=forwards)


def call_time(
    c: TokenCost, hw: Hardware, eng: Engine, shape: EngineShape, call: GenCall
) -> PhaseTime:
    """Predicted time of ``call`` on one engine (module docstring)."""
    if call.rows == 0:
        return PhaseTime()
    steps_min = call.max_response - 1  # the longest row's decode steps after its prefill
    if not eng.continuous:  # static micro-batches, one after another
        full, rest = divmod(call.rows, shape.batch)
        out = PhaseTime()
        for n, count in ((shape.batch, full), (rest, 1 if rest else 0)):
            one = _prefill(c, hw, eng, shape, n, call.prompt_len, 1)
            one += _decode(c, hw, eng, shape, call, n, steps_min)
            for _ in range(count):
                out += one
    else:
        unique = call.prompts if eng.prefix_cache else call.rows
        out = _prefill(c, hw, eng, shape, unique, call.prompt_len, 1)
        tokens = call.rows * (call.mean_response - 1)
        steps = max(math.ceil(tokens / min(shape.batch, call.rows)), steps_min)
        out += _decode(c, hw, eng, shape, call, call.rows, steps)
    overhead = out.forwards * shape.stages * eng.forward_overhead_s
    return dataclasses.replace(out, overhead_s=overhead)


def vllm_concurrency(
    c: TokenCost, kv_budget_bytes: float, prompt: int, mean_response: float
) -> int:
    """Rows an engine can run at once: its KV budget over one row's cache at prompt + mean
    response positions (0 when not even one fits)."""
    return int(kv_budget_bytes // (c.kv_bytes_per_position * (prompt + mean_response)))


def vllm_kv_budget(
    gpu_bytes: float, resident_bytes: float, c: TokenCost, gpus: int, eng: Engine
) -> float:
    """KV bytes of one engine of ``gpus`` GPUs colocated with training: per GPU
    ``kv_memory_fraction`` x memory - the training state that stays resident during
    generation (``resident_bytes``) - the engine's weight shard, times ``gpus``."""
    per_gpu = eng.kv_memory_fraction * gpu_bytes - resident_bytes - c.weight_bytes / gpus
    return max(per_gpu, 0.0) * gpus


def vllm_setup(
    cfg: Config, c: TokenCost, eng: Engine, gpu_bytes: float, resident_bytes: float, gen_tp: int = 0
) -> tuple[int, float]:
    """``(generation TP, KV budget bytes per engine)`` of the vllm engines the trainer would run
    for ``cfg``: ``gen_tp`` when given, else ``rollout.tp`` (the trainer's: one engine per rank
    at 1, each holding the whole model). A config that runs vllm reserves its
    ``rollout.kv_cache_gb`` per engine; for a megatron config (``--engine vllm``: what switching
    would give) the budget is what the resident training state leaves (:func:`vllm_kv_budget`)."""
    gen_tp = gen_tp or cfg.rollout.tp
    if cfg.rollout.engine == "vllm":
        return gen_tp, cfg.rollout.kv_cache_gb * 2**30
    return gen_tp, vllm_kv_budget(gpu_bytes, resident_bytes, c, gen_tp, eng)


def branch_calls(
    cfg: Config, branch: str, step: StepPlan, mean_response: float, prompt_len: int, split: int = 1
) -> list[GenCall]:
    """The ``generate`` calls of one engine of ``branch`` in ``step`` (none when the branch
    neither learns nor distils). A DP replica's prompts (``max(n // dp, 1)``, as the trainer
    splits them) are shared by its ``split`` engines."""
    dp, r = cfg.parallel.dp, cfg.rollout

    def share(n: int) -> int:
        return math.ceil(max(n // dp, 1) / split)

    calls = []
    if branch in step.learners:
        calls.append(GenCall("native", share(r.prompts_per_step), cfg.grpo.group_size,
                             prompt_len, r.max_new_tokens, mean_response))  # fmt: skip
    for student, teacher in step.edges:
        if student == branch:
            calls.append(GenCall(f"peer {teacher}", share(cfg.opd.prompts_per_peer),
                                 cfg.opd.samples_per_prompt, prompt_len, r.max_new_tokens,
                                 mean_response))  # fmt: skip
    return calls


@dataclass(frozen=True)
class StepKind:
    """Steps of the run that generate alike (same phase, learners and edges): ``count`` of
    them, each branch's calls on one engine and their time."""

    phase: str
    count: int
    calls: dict[str, list[GenCall]]
    times: dict[str, PhaseTime]

    def slowest(self) -> tuple[str, PhaseTime]:
        """The branch the step waits for, and its time."""
        return max(self.times.items(), key=lambda kv: kv[1].total_s)


@dataclass(frozen=True)
class GenerationPlan:
    """Predicted generation of a whole run on one engine kind."""

    engine: Engine
    shape: EngineShape
    split: int  # engines per DP replica
    kinds: list[StepKind]

    @property
    def run_s(self) -> float:
        """Seconds of generation over the run (each step waits for its slowest branch)."""
        return sum(k.count * k.slowest()[1].total_s for k in self.kinds)


def engine_shape(
    cfg: Config,
    eng: Engine,
    c: TokenCost,
    prompt_len: int,
    mean_response: float,
    kv_budget_bytes: float = 0.0,
    gen_tp: int = 0,
) -> tuple[EngineShape, int]:
    """``(shape, engines per DP replica)``: megatron runs one sampler per replica (TP GPUs at
    once, PP stages in turn, ``rollout.max_batch_size`` rows); vllm one engine per ``gen_tp``
    GPUs (0: the training TP) holding :func:`vllm_concurrency` rows of ``kv_budget_bytes``
    (per engine). ValueError when ``gen_tp`` does not divide a replica or no row fits."""
    p = cfg.parallel
    if not eng.continuous:
        return EngineShape(p.tp, p.pp, cfg.rollout.max_batch_size), 1
    gen_tp = gen_tp or cfg.rollout.tp
    if (p.tp * p.pp) % gen_tp:
        raise ValueError(
            f"generation TP {gen_tp} does not divide a model replica's {p.tp * p.pp} GPUs "
            "(parallel.tp x parallel.pp)"
        )
    rows = vllm_concurrency(c, kv_budget_bytes, prompt_len, mean_response)
    if rows < 1:
        raise ValueError(
            f"the vllm KV budget ({kv_budget_bytes / 2**30:.1f} GiB per engine) holds no row of "
            f"{prompt_len} + {mean_response:g} positions; raise rollout.kv_cache_gb, use a larger GPU "
            "or shorten rollout.max_new_tokens"
        )
    return EngineShape(gen_tp, 1, rows), p.tp * p.pp // gen_tp


def predict_generation(
    cfg: Config,
    steps: list[StepPlan],
    c: TokenCost,
    hw: Hardware,
    eng: Engine,
    shape: EngineShape,
    split: int,
    mean_response: float,
    prompt_len: int,
) -> GenerationPlan:
    """Every branch's generation time in each kind of step of ``steps`` (the run's plan)."""
    counts: dict[tuple, list] = {}
    for s in steps:
        key = (s.phase, s.learners, s.edges)
        counts.setdefault(key, [s, 0])[1] += 1
    kinds = []
    for step, count in counts.values():
        calls = {b: branch_calls(cfg, b, step, mean_response, prompt_len, split)
                 for b in cfg.branch_names}  # fmt: skip
        times = {b: sum((call_time(c, hw, eng, shape, x) for x in cs), PhaseTime())
                 for b, cs in calls.items()}  # fmt: skip
        kinds.append(StepKind(step.phase, count, calls, times))
    return GenerationPlan(eng, shape, split, kinds)
