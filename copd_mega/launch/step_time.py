"""Predicted seconds of one CoPD step, phase by phase and branch by branch (``copd plan
--predict``, ``copd report scaling --predict``). Pure arithmetic on the config, the step plan,
stated hardware (:mod:`copd_mega.launch.hardware`) and stated efficiencies (:class:`Assume`).

The phases are the ones a run times (``time/<phase>`` in ``RUN/metrics/<branch>.jsonl``), in the
order an OPD step runs them; an RL step has only rollout, reward and train (+ merge/checkpoint).
Per DP replica of a branch (its prompts split over ``dp_of[branch]`` replicas as the trainer
splits them), with P = ``data.max_prompt_tokens`` (the prompt bound), R = the mean response
(``mean_response``, default ``rollout.max_new_tokens``: an upper bound), S = P + R, a forward of
one row of S positions = :func:`~copd_mega.launch.flops.prefill_flops` (2NS + 2LqS^2):

* **rollout**: :mod:`copd_mega.launch.gen_time` (native prompts x ``grpo.group_size``, and
  ``opd.prompts_per_peer`` x ``opd.samples_per_prompt`` on each teacher's prompts) on the
  engine (``Setting.engine``); a vllm engine (``Setting.gen_shape``: continuous batching within
  its KV budget) also copies the step's new weights in once (the rank's weight bytes at
  ``optimizer_bw_eff`` of memory bandwidth, colocated).
* **reward**: ``reward_row_s`` per native rollout (the judge runs on the host).
* **teacher**: one forward of each row a student sends (``prompts_per_peer`` x
  ``samples_per_prompt`` per student; a hub scores B-1 students'), at ``score_mfu``.
* **exchange**: two transfers per edge, rollouts to the teacher (S int64 token ids a row) and
  scores back (R fp32 log-probs + ``opd.top_k`` x (fp32 value + int64 index) a row), over the
  interconnect at ``net_eff`` plus ``latency_s`` a message; and the **wait**: both transfers are
  collectives of all branches, so a branch waits there for the slowest branch to reach them
  (the spokes for the hub's longer rollout, then for its longer scoring).
* **train**: ``updates_per_batch`` x (forward + backward = 3 forwards) of every row it trains
  on (native + peer), +1 forward for old log-probs when ``updates_per_batch`` > 1 and +1 for
  the reference with ``grpo.kl_coef`` > 0, at ``train_mfu``; a pipeline of m micro-batches over
  PP stages takes (m + PP - 1) / m of the compute; the optimizer reads and writes 32 bytes per
  parameter of its DP shard at ``optimizer_bw_eff`` of HBM bandwidth, + ``optimizer_fixed_s``;
  gradients are all-reduced
  over DP (ring: 2 (DP-1)/DP x 4 bytes per parameter of the rank's stage, over NVLink).
* **merge** (``schedule.merge_every_cycle``, at a cycle's last step): a ring all-reduce of the
  rank's fp32 masters (4 bytes per stage parameter) over its peer group of B ranks, over the
  interconnect.
* **checkpoint** (each ``checkpoint.every`` steps): the rank's weights (bf16/fp32) and fp32
  master + Adam moments (12 bytes per parameter, distributed over DP) at ``ckpt_bytes_per_s``,
  + ``ckpt_fixed_s``. With ``checkpoint.every_minutes`` a save follows the first step that ends
  that many minutes after the last one: :func:`predict_run` spreads one save per
  ``every_minutes`` of predicted steps (at most one a step) over every step.
* the merge (else the save, whose bookkeeping has barriers over all branches) also holds the
  **wait** for the last branch to finish its update (a hub trains on more rows).

Fixed costs: ``pass_overhead_s`` per micro-batch forward per stage (a backward counts 2), the
engine's ``forward_overhead_s`` per decode step (gen_time). On a CPU (``Hardware.cores`` > 0)
the ranks share the cores: every compute and host term is multiplied by
:attr:`Setting.slowdown` (world / cores on an idle machine), and the fixed costs come from
measurements (:mod:`copd_mega.launch.measure`).
Not counted: TP/PP activation traffic (inside the MFUs), norms/softmax/sampling FLOPs, the
vision tower, evaluation, other jobs on the machine.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from copd_mega.config import Config
from copd_mega.launch.flops import TokenCost, prefill_flops
from copd_mega.launch.gen_time import (
    Engine,
    EngineShape,
    PhaseTime,
    branch_calls,
    call_time,
)
from copd_mega.launch.hardware import Hardware
from copd_mega.launch.memory import stage_params
from copd_mega.rl.schedule import StepPlan

PHASES = ("rollout", "reward", "teacher", "exchange", "train", "merge", "checkpoint")


@dataclass(frozen=True)
class Assume:
    """Efficiencies and fixed costs the step model assumes (``--step-assume FIELD=VALUE``)."""

    train_mfu: float = 0.40  # fraction of peak FLOP/s in the update's forward + backward
    score_mfu: float = 0.45  # fraction of peak FLOP/s in teacher scoring (forward only)
    optimizer_bw_eff: float = 0.60  # fraction of HBM bandwidth in the optimizer step
    net_eff: float = 0.70  # fraction of link bandwidth a collective reaches
    latency_s: float = 20e-6  # one message (hardware.latency_s replaces it where measured)
    pass_overhead_s: float = 2e-3  # fixed cost of one micro-batch forward on one stage
    reward_row_s: float = 2e-4  # host cost of judging one rollout
    ckpt_bytes_per_s: float = 2e9  # what one rank writes a second to the checkpoint store
    ckpt_fixed_s: float = 1.0  # fixed cost of one save on a rank (metadata, barriers, rename)
    optimizer_fixed_s: float = 5e-3  # fixed cost of one optimizer step (launches, clip, checks)
    mean_response: float = 0.0  # expected response tokens (0: rollout.max_new_tokens)

    def why(self) -> str:
        return ("assumed, not measured: MFUs of a Megatron update/forward at this size, "
                "NCCL ring efficiency, a parallel file system's per-rank write rate")  # fmt: skip


ASSUMED = tuple(f.name for f in dataclasses.fields(Assume))


def assume_with(overrides: list[str], base: Assume | None = None) -> Assume:
    """``base`` (default :class:`Assume`) with ``FIELD=VALUE`` items applied; ValueError naming
    ``--step-assume`` and the fields for a bad item."""
    a = base or Assume()
    for item in overrides:
        key, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or key not in ASSUMED or not 0 <= number < math.inf:
            raise ValueError(
                f"--step-assume {item!r}: use FIELD=VALUE (a number >= 0) with FIELD one of "
                f"{', '.join(ASSUMED)}"
            )
        a = dataclasses.replace(a, **{key: number})
    return a


@dataclass(frozen=True)
class Setting:
    """Everything the step model reads besides the config: the hardware, the generation
    engine, the assumptions, the world size, and each branch's DP (default ``parallel.dp``;
    a load-balanced hub gets more)."""

    hw: Hardware
    engine: Engine
    assume: Assume
    world: int
    dp_of: dict[str, int] = field(default_factory=dict)
    gen_shape: EngineShape | None = None  # a continuous engine's shape (gen_time.engine_shape)
    gen_split: int = 1  # engines per DP replica

    @property
    def slowdown(self) -> float:
        """CPU: how much slower a rank runs than the one process that measured the costs, both
        sharing the cores with ``background_load`` other runnable processes:
        max(1, (load + world) / cores) / max(1, (load + 1) / cores). 1 on GPUs."""
        if not self.hw.cores:
            return 1.0
        load, cores = self.hw.background_load, self.hw.cores
        return max(1.0, (load + self.world) / cores) / max(1.0, (load + 1) / cores)

    @property
    def latency_s(self) -> float:
        return self.hw.latency_s or self.assume.latency_s


@dataclass(frozen=True)
class BranchStep:
    """One branch's predicted seconds per phase in one step, and the work behind them."""

    phase_s: dict[str, float]
    flops: float = 0.0  # model FLOPs per rank (rollout, teacher, train)
    bytes_sent: float = 0.0  # exchange + merge bytes per rank

    @property
    def total_s(self) -> float:
        return sum(self.phase_s.values())


def _share(n: int, dp: int) -> int:
    return max(n // dp, 1)


def forward_time(
    c: TokenCost, cfg: Config, s: Setting, rows: int, seq: float, passes: float, mfu: float
) -> tuple[float, float]:
    """(seconds, FLOPs) of ``passes`` forwards of ``rows`` rows of ``seq`` positions on one DP
    replica (TP x PP GPUs): compute over the replica's GPUs, the pipeline's fill and drain
    ((m + PP - 1) / m for m micro-batches), ``pass_overhead_s`` per micro-batch per stage."""
    if rows <= 0:
        return 0.0, 0.0
    p = cfg.parallel
    m = math.ceil(rows / p.micro_batch_size)
    flops = passes * rows * prefill_flops(c, seq)
    compute = flops / (p.tp * p.pp * s.hw.peak_flops * mfu) * (m + p.pp - 1) / m
    overhead = passes * (m + p.pp - 1) * s.assume.pass_overhead_s
    return (compute + overhead) * s.slowdown, flops / (p.tp * p.pp)


def ring_allreduce_s(nbytes: float, ranks: int, bw: float, s: Setting) -> float:
    """A ring all-reduce of ``nbytes`` over ``ranks`` at ``bw`` bytes/s: 2 (n-1)/n x bytes
    at ``net_eff`` of the link, plus 2 (n-1) message latencies."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    steps = 2 * (ranks - 1)
    return steps / ranks * nbytes / (bw * s.assume.net_eff) + steps * s.latency_s


def exchange_bytes(cfg: Config, rows: int, prompt: int, response: float) -> tuple[float, float]:
    """(bytes to the teacher, bytes back) of ``rows`` rollouts of one edge: int64 token ids
    of prompt + response; fp32 log-probs and top-k fp32 values + int64 indices per response
    token."""
    to_teacher = rows * (prompt + response) * 8
    back = rows * response * (4 + cfg.opd.top_k * 12)
    return float(to_teacher), float(back)


def generation(
    cfg: Config, s: Setting, c: TokenCost, branch: str, step: StepPlan, prompt: int
) -> PhaseTime:
    """The branch's rollout time in ``step`` on ``s.engine`` (gen_time's model, at the branch's
    DP and with ``forward_overhead_s`` and the peaks scaled by the CPU's sharing)."""
    dp = s.dp_of.get(branch, cfg.parallel.dp)
    bcfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=dp))
    hw = dataclasses.replace(
        s.hw,
        peak_flops=s.hw.peak_flops / s.slowdown,
        hbm_bytes_per_s=s.hw.hbm_bytes_per_s / s.slowdown,
    )
    eng = dataclasses.replace(s.engine, forward_overhead_s=s.engine.forward_overhead_s * s.slowdown)
    shape = s.gen_shape or EngineShape(cfg.parallel.tp, cfg.parallel.pp, cfg.rollout.max_batch_size)
    mean = s.assume.mean_response or cfg.rollout.max_new_tokens
    calls = branch_calls(bcfg, branch, step, mean, prompt, s.gen_split if s.gen_shape else 1)
    out = sum((call_time(c, hw, eng, shape, x) for x in calls), PhaseTime())
    if eng.continuous and calls:  # the engine's copy of the new weights, once per step
        sync = c.weight_bytes / (cfg.parallel.tp * cfg.parallel.pp)
        out += PhaseTime(overhead_s=sync / (hw.hbm_bytes_per_s * s.assume.optimizer_bw_eff))
    return out


def branch_work(
    cfg: Config, s: Setting, c: TokenCost, branch: str, step: StepPlan, prompt: int
) -> dict[str, tuple[float, float]]:
    """Per phase (seconds, FLOPs per rank) of the branch's own work in ``step``: everything but
    the exchange's wait, the merge and the checkpoint."""
    p, r = cfg.parallel, cfg.rollout
    dp = s.dp_of.get(branch, p.dp)
    mean = s.assume.mean_response or r.max_new_tokens
    seq = prompt + mean
    learner = branch in step.learners
    gen = generation(cfg, s, c, branch, step, prompt)
    native = _share(r.prompts_per_step, dp) * cfg.grpo.group_size if learner else 0
    peer_rows = _share(cfg.opd.prompts_per_peer, dp) * cfg.opd.samples_per_prompt
    learns = sum(1 for st, _ in step.edges if st == branch)
    teaches = sum(1 for _, t in step.edges if t == branch)
    g = cfg.grpo
    passes = g.updates_per_batch * 3 + (g.updates_per_batch > 1) + (g.kl_coef > 0)
    train_s, train_f = (0.0, 0.0)
    if learner:
        train_s, train_f = forward_time(c, cfg, s, native + learns * peer_rows, seq, passes,
                                        s.assume.train_mfu)  # fmt: skip
        params = stage_params(cfg)
        opt = 32 * params / dp / (s.hw.hbm_bytes_per_s * s.assume.optimizer_bw_eff)
        grads = ring_allreduce_s(4 * params, dp, s.hw.nvlink_bytes_per_s or s.hw.hbm_bytes_per_s, s)
        fixed = s.assume.optimizer_fixed_s
        train_s += g.updates_per_batch * ((opt + fixed) * s.slowdown + grads)
    teach_s, teach_f = forward_time(c, cfg, s, teaches * peer_rows, seq, 1, s.assume.score_mfu)
    return {
        "rollout": (gen.total_s, gen.flops / (p.tp * p.pp)),
        "reward": (native * s.assume.reward_row_s * s.slowdown, 0.0),
        "teacher": (teach_s, teach_f),
        "train": (train_s, train_f),
    }


def _link(s: Setting) -> float:
    return s.hw.interconnect_bytes_per_s or s.hw.hbm_bytes_per_s


def predict_step(
    cfg: Config, s: Setting, c: TokenCost, step: StepPlan, prompt: int
) -> dict[str, BranchStep]:
    """Every branch's predicted phase seconds in ``step`` (module docstring), the exchange's
    wait included: each transfer ends when the slowest branch has reached it."""
    names = cfg.branch_names
    work = {b: branch_work(cfg, s, c, b, step, prompt) for b in names}
    mean = s.assume.mean_response or cfg.rollout.max_new_tokens
    rows = {b: _share(cfg.opd.prompts_per_peer, s.dp_of.get(b, cfg.parallel.dp))
            * cfg.opd.samples_per_prompt for b in names}  # fmt: skip
    sent = dict.fromkeys(names, 0.0)
    xfer = dict.fromkeys(names, 0.0)
    for student, _ in step.edges:
        to_t, back = exchange_bytes(cfg, rows[student], prompt, mean)
        sent[student] += to_t + back
    for b in names:  # each branch's ranks move its edges' bytes over their own links
        if sent[b] or any(t == b for _, t in step.edges):
            xfer[b] = sent[b] / (cfg.parallel.tp * cfg.parallel.pp) / (
                _link(s) * s.assume.net_eff
            ) + 2 * s.latency_s * max(1, len(names) - 1)
    opd = bool(step.edges)
    before = {b: work[b]["rollout"][0] + work[b]["reward"][0] for b in names}
    t1 = max(before.values()) if opd else 0.0
    t2 = max(t1 + work[b]["teacher"][0] for b in names) if opd else 0.0
    params = stage_params(cfg)
    merge = 0.0
    if step.end_of_cycle and cfg.schedule.merge_every_cycle and len(names) > 1:
        merge = ring_allreduce_s(4 * params, len(names), _link(s), s)
    ckpt = 0.0
    every = cfg.checkpoint.every
    if every and (step.step + 1) % every == 0:
        ckpt = save_s(cfg, s, names[0])
    # the merge (else the save's barriers) starts when the last branch has trained
    done = {b: (t2 + xfer[b] if opd else before[b]) + work[b]["train"][0] for b in names}
    last = max(done.values())
    out = {}
    for b in names:
        w = work[b]
        wait = (t1 - before[b]) + (t2 - t1 - w["teacher"][0]) if opd else 0.0
        late = last - done[b] if len(names) > 1 else 0.0
        phase_s = {k: w[k][0] for k in ("rollout", "reward", "teacher", "train")}
        phase_s.update(
            exchange=xfer[b] + wait,
            merge=merge + late if merge else 0.0,
            checkpoint=ckpt + late if ckpt and not merge else ckpt,
        )
        flops = sum(v[1] for v in w.values())
        extra = 8 / 3 * params if merge else 0.0  # ring bytes out of a rank, fp32 x 2(n-1)/n
        out[b] = BranchStep({k: phase_s[k] for k in PHASES}, flops, sent[b] + extra)
    return out


def save_s(cfg: Config, s: Setting, branch: str) -> float:
    """Seconds of one checkpoint save on a rank of ``branch``: its stage's weights in the model
    dtype and its DP share of the fp32 master and Adam moments, at ``ckpt_bytes_per_s``, plus
    ``ckpt_fixed_s``."""
    elem = 4 if cfg.model.dtype == "fp32" else 2
    per_rank = stage_params(cfg) * (elem + 12 / s.dp_of.get(branch, cfg.parallel.dp))
    return (per_rank / s.assume.ckpt_bytes_per_s + s.assume.ckpt_fixed_s) * s.slowdown


def predict_run(
    cfg: Config, s: Setting, c: TokenCost, steps: list[StepPlan], prompt: int, skip_first: bool
) -> dict[str, dict[str, float]]:
    """Mean seconds per phase per branch over ``steps`` (the first left out with
    ``skip_first``, as ``copd report scaling`` leaves out the warm-up step)."""
    kept = steps[1:] if skip_first and len(steps) > 1 else steps
    sums = {b: dict.fromkeys(PHASES, 0.0) for b in cfg.branch_names}
    cache: dict[tuple, dict[str, BranchStep]] = {}
    for st in kept:
        key = (
            st.phase,
            st.learners,
            st.edges,
            st.end_of_cycle,
            (st.step + 1) % max(cfg.checkpoint.every, 1) == 0,
        )
        if key not in cache:
            cache[key] = predict_step(cfg, s, c, st, prompt)
        for b, bs in cache[key].items():
            for k in PHASES:
                sums[b][k] += bs.phase_s[k]
    means = {b: {k: v / len(kept) for k, v in ph.items()} for b, ph in sums.items()}
    minutes = cfg.checkpoint.every_minutes
    if minutes > 0:  # one save per `minutes` of (slowest-branch) steps, spread over the steps
        step_s = max(sum(m.values()) for m in means.values())
        share = min(1.0, step_s / (60.0 * minutes))
        for b, m in means.items():
            m["checkpoint"] += share * save_s(cfg, s, b)
    return means
