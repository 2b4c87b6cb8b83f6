"""Everything one rank of a training job holds, built once: ``build_job(cfg) -> BranchJob``.

Also the end of a job: evaluation spread over the branches, the in-place merge and the final
checkpoints (``RUN/final/branch_<name>`` before merging, ``RUN/final/model`` after).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from copd_mega.ckpt.checkpoint import (
    CheckpointError,
    everywhere,
    incomplete_reason,
    load_latest,
    load_model,
    require_model_dir,
    save_model,
    scan_steps,
    write_text_atomic,
)
from copd_mega.config import Config, to_dict
from copd_mega.data.reader import ShardReader
from copd_mega.hf.hf_dir import copy_hf_files
from copd_mega.hf.init_from_hf import hf_init_dir
from copd_mega.hf.llava_extra import CARRIED_FILES
from copd_mega.launch.datasets import ChatCodec, capabilities_of, make_reader
from copd_mega.launch.runtime import Runtime, start
from copd_mega.launch.validate import schedule_plan, validate_job
from copd_mega.models.branch import BranchModel, build_branch_model
from copd_mega.models.gpt import build_gpt
from copd_mega.models.multimodal import media_spec
from copd_mega.models.step import prepare_for_training
from copd_mega.parallel import comm
from copd_mega.report.metrics import MetricsLogger
from copd_mega.rl.judge import Judge
from copd_mega.rl.sampling import RolloutEngine
from copd_mega.rl.schedule import ScheduleState, StepPlan
from copd_mega.rl.vllm_engine import make_rollout_engine
from copd_mega.trainer.evaluate import evaluate, format_table


class RuntimeView:
    """``cfg`` and per-phase wall times (``timings["time/<phase>"]``) of a dataclass holding
    ``rt`` (a ``Runtime``) and ``timings``: a training job, or checkpoints loaded to probe."""

    @property
    def cfg(self) -> Config:
        return self.rt.cfg

    @contextmanager
    def timed(self, phase: str):
        """Accumulate wall time of ``phase`` into this step's ``time/<phase>``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{phase}"
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0


@dataclass
class BranchJob(RuntimeView):
    """This rank's share of the job: its branch's model, data streams, schedule and sinks."""

    rt: Runtime
    bm: BranchModel
    sampler: RolloutEngine  # MegatronSampler, VLMSampler (vision.enabled) or VLLMEngine
    judge: Judge
    native: ShardReader  # the branch's own training data
    peers: dict[str, ShardReader]  # teacher branch -> reader of that teacher's prompts
    plan: list[StepPlan]
    state: ScheduleState
    edges: list[tuple[str, str]]  # every edge the plan uses, in telemetry order
    logger: MetricsLogger
    ref: BranchModel | None = None  # frozen reference policy, only when grpo.kl_coef > 0
    timings: dict[str, float] = field(default_factory=dict)
    # final evaluation per problem: table row -> capability -> sample id -> 1/0 (every rank)
    problems: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    clock_state: dict = field(default_factory=dict)  # measured step/save times (trainer.clock)

    @property
    def name(self) -> str:
        return self.rt.topo.branch.name


def init_checkpoint(cfg: Config) -> str:
    """The model checkpoint every branch starts from: ``checkpoint.init_from``, or the converted
    ``checkpoint.init_from_hf`` (``RUN/hf_init``, made by ``prepare_data``), or "" (fresh)."""
    if cfg.checkpoint.init_from_hf:
        return str(hf_init_dir(cfg))
    return cfg.checkpoint.init_from


def build_job(cfg: Config) -> BranchJob:
    """Start the process group and build this rank's branch job (resuming when asked)."""
    rt = start(cfg, validate_job)
    topo = rt.topo
    plan = schedule_plan(cfg, topo.layout.edges)
    edges = list(dict.fromkeys(e for p in plan for e in p.edges))
    bm = build_branch_model(cfg, topo)
    bm.media_spec = media_spec(cfg, rt.codec)
    prepare_for_training(bm, topo)
    ref = None
    init = init_checkpoint(cfg)
    if init:  # every branch starts from the same base
        load_model(init, bm, topo)
    if cfg.grpo.kl_coef > 0:  # the reference is the starting policy, frozen
        gpt = build_gpt(cfg, topo)
        if init:
            load_model(init, gpt, topo)
        ref = BranchModel(gpt, None, gpt.config)
    names = cfg.branch_names
    me = topo.branch.name
    data_of = {b.name: b.data for b in cfg.branches}
    dp, dp_rank = topo.layout.dp, topo.dp_rank
    native = make_reader(cfg, data_of[me], "train", dp_rank, dp, salt=names.index(me))
    peers = {
        t: make_reader(cfg, data_of[t], "train", dp_rank, dp, salt=100 + 10 * names.index(me)
                       + names.index(t))
        for s, t in edges if s == me
    }  # fmt: skip
    job = BranchJob(
        rt=rt, bm=bm, sampler=make_rollout_engine(bm.model, topo, cfg, rt.codec), judge=Judge.from_config(topo, rt.device, cfg.rewards),
        native=native, peers=peers, plan=plan, state=ScheduleState(), edges=edges, ref=ref,
        logger=MetricsLogger(
            cfg.run_dir, me, topo.is_branch_leader, len(plan), cfg.logging.wandb,
            cfg.logging.wandb_project, to_dict(cfg), cfg.logging.progress,
        ),
    )  # fmt: skip
    return job


def finished(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a finished run: ``eval.json`` and a complete ``final/model``."""
    run = Path(run_dir)
    try:
        require_model_dir(run / "final" / "model")
    except CheckpointError:
        return False
    return (run / "eval.json").is_file()


def start_mode(cfg: Config, retrain: bool = False) -> tuple[str, str]:
    """How this job starts, from the files alone (same answer on every rank, no collectives):
    ``("finished" | "resume" | "fresh", one-line message)``.

    ``checkpoint.resume``: ``required`` errors without a complete checkpoint; ``auto`` resumes
    the newest complete one or starts fresh when there is none; ``never`` refuses to start over
    checkpoints it would overwrite. A finished run is left untouched unless ``retrain``; a
    committed checkpoint that lacks files is never silently started over (errors say why).
    """
    run, root = Path(cfg.run_dir), Path(cfg.run_dir) / "checkpoints"
    if retrain:
        return "fresh", f"starting fresh in {run} (--retrain)"
    if finished(run):
        return "finished", (f"{run} holds a finished run (eval.json, final/model); nothing to do. "
                            "Pass --retrain to train it again")  # fmt: skip
    chosen, skipped = scan_steps(root)
    reasons = "; ".join(f"{p.name}: {w}" for p, w in skipped[:3])
    damaged = [p for p, _ in skipped if (p / "complete.json").is_file()]
    mode = cfg.checkpoint.resume
    if chosen is not None and mode != "never":
        return "resume", f"resuming from {chosen}"
    if chosen is not None:
        why = f"{root} holds checkpoint {chosen.name}: continue it with --resume (or --resume=auto)"
        raise everywhere(CheckpointError(f"{why}, or pass --retrain to start over"))
    if mode == "required":
        why = f"--resume: no complete checkpoint under {root}" + (
            f" ({reasons})" if reasons else ""
        )
        raise everywhere(
            CheckpointError(f"{why}; start fresh without --resume or with --resume=auto")
        )
    if damaged:
        why = f"{root}: no loadable checkpoint, but {damaged[0].name} was committed and is damaged"
        raise everywhere(CheckpointError(
            f"{why} ({incomplete_reason(damaged[0])}); restore that file, or pass "
            "--retrain to start over (damaged folders are kept)"
        ))  # fmt: skip
    return "fresh", f"starting fresh: no checkpoint under {root}"


def resume(job: BranchJob) -> bool:
    """Restore models, optimizers, RNG, schedule and data cursors from the newest complete step,
    if any, and cut the metrics JSONL back to the step the job resumes at."""
    saved = load_latest(Path(job.cfg.run_dir) / "checkpoints", job.bm, job.rt.topo)
    if saved is None:
        job.logger.cut_back(0)
        return False
    job.state.load_state_dict(saved["schedule"])
    job.clock_state = saved.get("clock", {})
    job.native.load_state_dict(saved["native"])
    for t, reader in job.peers.items():
        if t in saved["peers"]:
            reader.load_state_dict(saved["peers"][t])
        elif any((job.name, t) in p.edges for p in job.plan[: job.state.next_step]):
            raise CheckpointError(f"{job.cfg.run_dir}/checkpoints holds no data cursor for "
                                  f"teacher {t!r} that steps before it used; resume with the "
                                  "schedule it was saved with")  # fmt: skip
        # else: the checkpoint's steps never read that stream (a static_opd/mopd job resumed
        # from its experts' stage): it starts at the beginning, as in an uninterrupted job
    job.logger.cut_back(job.state.next_step)
    return True


def trainer_state(job: BranchJob) -> dict:
    """What a step checkpoint stores for this rank besides model, optimizer and RNG."""
    return {
        "schedule": job.state.state_dict(),
        "native": job.native.state_dict(),
        "peers": {t: r.state_dict() for t, r in job.peers.items()},
    }


def eval_caps(cfg: Config) -> list[str]:
    return sorted({c for b in cfg.branches for c in capabilities_of(b.data)})


def evaluate_all_branches(job: BranchJob, tag_of_branch) -> dict[str, dict[str, float]]:
    """Every branch evaluates its own model on every capability; every rank gets every row.

    ``tag_of_branch(name)`` names the table row of a branch (e.g. ``"branch arith"``).
    Collective over the world.
    """
    tag, problems = tag_of_branch(job.name), {}
    accs = evaluate(job.rt, job.sampler, job.judge, eval_caps(job.cfg), job.cfg.data.n_eval,
                    problems)  # fmt: skip
    job.problems.update(_gather_rows(job, {tag: problems}))
    return _gather_rows(job, {tag: accs})


def evaluate_shared_model(job: BranchJob, label: str) -> dict[str, dict[str, float]]:
    """Evaluate a model every branch holds (the base, the merged model) in one row.

    The capabilities are spread over the branches, so B branches finish B times sooner.
    """
    caps = eval_caps(job.cfg)
    idx, nb = job.rt.topo.branch.index, len(job.cfg.branches)
    problems: dict = {}
    accs = evaluate(job.rt, job.sampler, job.judge, caps[idx::nb], job.cfg.data.n_eval, problems)
    merged, per_problem = _gather_rows(job, accs), _gather_rows(job, problems)
    job.problems[label] = {c: per_problem[c] for c in caps}
    return {label: {c: merged[c] for c in caps}}


def _gather_rows(job: BranchJob, mine: dict) -> dict:
    """Union of every branch leader's dict, on every rank (collective over the world)."""
    rows = comm.all_gather_object(mine if job.rt.topo.is_branch_leader else {})
    merged: dict = {}
    for r in rows:
        merged.update(r)
    return merged


def write_eval(job: BranchJob, table: dict[str, dict[str, float]]) -> None:
    """Print the evaluation table and save it as RUN/eval.json, and the per-problem results of
    its rows (``job.problems``: row -> capability -> sample id -> 1/0) as
    RUN/eval_problems.json, written first (global rank 0)."""
    if dist.get_rank() != 0:
        return
    caps = eval_caps(job.cfg)
    print("\nheld-out greedy accuracy (%)\n" + format_table(table, caps), flush=True)
    run = Path(job.cfg.run_dir)
    write_text_atomic(run / "eval_problems.json", json.dumps(job.problems, sort_keys=True))
    write_text_atomic(run / "eval.json", json.dumps(table, indent=2))


def save_final(job: BranchJob, sub: str, branch: str | None = None) -> Path:
    """Model-only checkpoint of ``branch`` (default: this job's first branch) under RUN/final.

    With an HF tokenizer its files (chat template, generation config; for a LLaVA the image
    processor and the ViT layers the model does not use, ``hf.llava_extra``) go beside the
    weights, so ``copd export-hf`` gives the model back with them."""
    path = Path(job.cfg.run_dir) / "final" / sub
    branch = branch or job.cfg.branch_names[0]
    topo = job.rt.topo
    save_model(path, job.bm, topo, job.cfg, branch=branch, tokenizer=job.rt.codec.path)
    # save_model returns on the writing branch once the folder is in place (other ranks at once)
    writer = topo.branch.name == branch and topo.rank == topo.branch.first_rank
    if isinstance(job.rt.codec, ChatCodec) and writer:
        copy_hf_files(job.rt.codec.hf_dir, path, CARRIED_FILES)  # tokenizer, processor, ViT
    return path
