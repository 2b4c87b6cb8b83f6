"""``copd train``: CoPD and its baselines in one loop that reads as the algorithm.

Per global step, on every rank of every branch (see ``docs/architecture.md``):
  phase -> rollout (native prompts, and peer prompts in OPD steps) -> reward -> advantages
  -> peer scoring (rollouts out, teacher log-probs + top-k back) -> one clipped-surrogate loss
  over GRPO + OPD rows -> optimizer step -> telemetry -> checkpoint.
At the end: evaluate every branch, merge in place (copd/expert) or keep the student
(static_opd/mopd), evaluate the final model, save it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from copd_mega.ckpt.checkpoint import CheckpointError, save_step, write_text_atomic
from copd_mega.config import Config, load_config
from copd_mega.data.reader import DataError
from copd_mega.launch.run_dir import claim_run_dir
from copd_mega.launch.runtime import shutdown
from copd_mega.models.step import all_finite, optimizer_step, run_microbatches
from copd_mega.parallel import comm
from copd_mega.parallel.dist import read_launch_env
from copd_mega.parallel.merge import merge_in_place
from copd_mega.rl.batches import Rows, concat_rows, microbatches
from copd_mega.rl.logprobs import logprob_chunk
from copd_mega.rl.objective import make_loss_fn, metric_width, unpack_metrics
from copd_mega.rl.schedule import StepPlan, remaining_steps
from copd_mega.rl.teacher_scores import row_logprobs
from copd_mega.rl.vllm_engine import sync_engine
from copd_mega.trainer.clock import StepClock
from copd_mega.trainer.job import (
    BranchJob,
    build_job,
    evaluate_all_branches,
    evaluate_shared_model,
    resume,
    save_final,
    start_mode,
    trainer_state,
    write_eval,
)  # fmt: skip
from copd_mega.trainer.periodic_eval import after_step
from copd_mega.trainer.preemption import Preemption
from copd_mega.trainer.rollouts import REWARD_KEYS, reward_and_advantages, rollout_native
from copd_mega.trainer.teaching import opd_step_rows


def train(cfg: Config, retrain: bool = False) -> dict[str, dict[str, float]]:
    """Run the configured job to the end, or until it stops early with a checkpoint; returns
    the evaluation table (on global rank 0). See :func:`run_training`."""
    return run_training(cfg, retrain)[0]


def run_training(cfg: Config, retrain: bool = False) -> tuple[dict[str, dict[str, float]], str]:
    """(evaluation table on global rank 0, why the job stopped early with a checkpoint or "").

    How it starts (resume / fresh / already finished) is ``job.start_mode``. At each step
    boundary every rank agrees on saving and stopping (``Preemption.agreed``: signals, and global
    rank 0's ``checkpoint.every_minutes`` and time-limit decisions, ``trainer.clock``)."""
    claim_run_dir(cfg)  # one job per run directory, before anything is read or written
    mode, message = start_mode(cfg, retrain)
    if mode == "finished" or mode == "fresh":
        _say(message)
    if mode == "finished":
        return {}, ""
    stopped = ""
    with Preemption() as preempted:
        clock = StepClock(cfg, leader=read_launch_env().rank == 0)  # the job's start: now
        job = build_job(cfg)
        table = _start(job, mode == "resume")
        clock.load_state_dict(job.clock_state)
        loss_fn = _with_faults(make_loss_fn(cfg, job.rt.topo, job.edges), job)
        stop = cfg.schedule.stop_after
        for done, plan in enumerate(remaining_steps(job.plan, job.state), start=1):
            if done == 1 and clock.leader:
                clock.check_first_step(plan.phase, plan.step == len(job.plan) - 1)
            job.timings = {}
            t0 = time.perf_counter()
            record = cycle_step(job, plan, loss_fn)
            record.update(after_step(job, plan))  # telemetry only: weights stay as they are
            job.state.advance()
            if plan.end_of_cycle and cfg.schedule.merge_every_cycle and len(cfg.branches) > 1:
                with job.timed("merge"):
                    merge_branches(job)
            every, more = cfg.checkpoint.every, job.state.next_step < len(job.plan)
            stopping = stop and done >= stop and more
            signalled, by_clock, out_of_time, why = (
                _boundary(job, clock, preempted, t0) if more else (False, False, False, "")
            )
            if (every and job.state.next_step % every == 0) or stopping or signalled or by_clock:
                with job.timed("checkpoint"):
                    save_step(Path(cfg.run_dir) / "checkpoints", plan.step, job.bm, job.rt.topo,
                              cfg, {**trainer_state(job), "clock": clock.state_dict()})  # fmt: skip
                clock.saved(job.timings["time/checkpoint"])
            record.update(job.timings, **{"time/step": time.perf_counter() - t0})
            record["tokens_per_s"] = record.get("train_tokens", 0.0) / record["time/step"]
            job.logger.log(plan.step, record)
            if stopping or signalled or out_of_time:
                stopped = (f"{preempted.name}: preempted" if signalled else
                           (why or "time limit") if out_of_time else "schedule.stop_after")  # fmt: skip
                _say(f"stopping after step {plan.step} ({stopped}); saved "
                     f"step_{plan.step:06d}, continue with --resume=auto")  # fmt: skip
                break
        else:
            finish(job, table)
    job.logger.close()
    job.judge.close()
    return table, stopped


def _boundary(job: BranchJob, clock: StepClock, preempted: Preemption, t0: float):
    """Collective over the world at a step boundary, before the next step: (any rank signalled,
    save by the clock, stop for the time limit, why: rank 0's reason). Global rank 0 records the
    slowest rank's step time and decides; every rank follows."""
    why = [""]

    def decide(slowest_s: float) -> tuple[bool, bool]:
        clock.record_step(job.plan[job.state.next_step - 1].phase, slowest_s)
        nxt = job.state.next_step
        save, stop, why[0] = clock.decide(job.plan[nxt].phase, nxt == len(job.plan) - 1)
        return save, stop

    with job.timed("wait"):
        signalled, save, stop = preempted.agreed(job.rt.device, time.perf_counter() - t0, decide)
    return signalled, save or stop, stop, why[0]


def _say(message: str) -> None:
    """Print once per job: on global rank 0 (read from the launcher before the process group)."""
    rank = dist.get_rank() if dist.is_initialized() else read_launch_env().rank
    if rank == 0:
        print(f"copd train: {message}", flush=True)


def _start(job: BranchJob, resuming: bool) -> dict[str, dict[str, float]]:
    """Restore the job when resuming (else cut its metrics back to step 0 and evaluate the base
    model); the evaluation table so far (the base row, kept in RUN/eval_base.json, and its
    per-problem results in RUN/eval_base_problems.json for the final eval_problems.json)."""
    cfg = job.cfg
    base_file = Path(cfg.run_dir) / "eval_base.json"
    problems_file = Path(cfg.run_dir) / "eval_base_problems.json"
    if resuming:
        resumed = resume(job)
        sync_engine(job)  # the engine generates with the restored weights
        if not resumed:
            raise CheckpointError(f"{cfg.run_dir}/checkpoints: the checkpoint to resume from "
                                  "disappeared while the job started")  # fmt: skip
        _say(f"resumed from {Path(cfg.run_dir) / 'checkpoints'}/step_"
             f"{job.state.next_step - 1:06d}: continuing at step {job.state.next_step} of "
             f"{len(job.plan)}")  # fmt: skip
        if problems_file.exists():
            job.problems["base"] = json.loads(problems_file.read_text())
        return json.loads(base_file.read_text()) if base_file.exists() else {}
    job.logger.cut_back(0)
    sync_engine(job)  # the starting weights (fresh or checkpoint.init_from)
    if not cfg.eval.base:
        return {}
    table = evaluate_shared_model(job, "base")
    if dist.get_rank() == 0:  # the problems first: a table on disk always has them
        write_text_atomic(problems_file, json.dumps(job.problems["base"], sort_keys=True))
        write_text_atomic(base_file, json.dumps(table, indent=2))
    return table


def _debug_faults(job: BranchJob, plan: StepPlan, where: str) -> None:
    """``debug.slow_branch``: that branch sleeps ``debug.slow_step_s`` at the start of each step;
    ``debug.fail_at_step=N``: global rank ``debug.fail_rank`` raises a data error after step N's
    rollout (its peers are in the step's collectives by then)."""
    d = job.cfg.debug
    if where == "start" and d.slow_branch == job.name and d.slow_step_s > 0:
        time.sleep(d.slow_step_s)
    if where == "after rollout" and plan.step == d.fail_at_step and dist.get_rank() == d.fail_rank:
        raise DataError(f"debug.fail_at_step={plan.step}: a data error injected on global rank "
                        f"{d.fail_rank} in the middle of the step")  # fmt: skip


def _with_faults(loss_fn, job: BranchJob):
    """``loss_fn``, or with ``debug.nan_loss_at_step=N`` one whose loss is NaN in step N."""
    at = job.cfg.debug.nan_loss_at_step
    if at < 0:
        return loss_fn

    def poisoned(mb: dict, logits: torch.Tensor):
        loss, units, metrics = loss_fn(mb, logits)
        return (loss * float("nan") if job.state.next_step == at else loss), units, metrics

    return poisoned


def cycle_step(job: BranchJob, plan: StepPlan, loss_fn) -> dict:
    """One global step for this rank's branch; returns its telemetry (valid on every rank).

    An "rl" step: each learner's GRPO rows. An "opd" step adds, per teaching edge, the student's
    rollouts on its teacher's prompts scored by the teacher (OPD rows); GRPO and OPD rows go
    into one update. Rows own their tokens, masks, advantages, teacher scores and (vision rows)
    media, so text and vision steps read the same. Rollouts, rows and teacher scores stay on
    the device; telemetry accumulates there and is summed over the branch and brought to the
    host once, at the end of the step.
    """
    me = job.name
    learner = me in plan.learners
    record: dict = {"cycle": plan.cycle, "phase": plan.phase, "learner": int(learner)}
    parts: list[Rows] = []
    _debug_faults(job, plan, "start")
    if learner:
        with job.timed("rollout"):
            samples, rolls = rollout_native(job, plan.step)
        _debug_faults(job, plan, "after rollout")
        with job.timed("reward"):
            rows, reward_sums = reward_and_advantages(job, samples, rolls)
        parts.append(rows)
    if plan.phase == "opd":
        parts += opd_step_rows(job, plan)
    if learner:
        with job.timed("wait"):  # DP ranks' rollouts differ in length: no deadline here
            comm.wait_group(job.rt.topo.branch_group)
        with job.timed("train"):
            metrics_vec, stats = update(job, concat_rows(parts, pad_id=job.rt.codec.pad), loss_fn)
        sync_engine(job)  # rollouts of the next step come from the updated weights
        record.update(stats)
        record.update(_telemetry_to_host(job, reward_sums, metrics_vec))
    return record


def _telemetry_to_host(job: BranchJob, reward_sums: torch.Tensor, metrics_vec: torch.Tensor):
    """Branch sums of the step's device telemetry, in one all-reduce and one host sync.

    ``reward_sums`` count once per DP replica (its first rank adds), ``metrics_vec`` once per
    replica's last stage (TP rank 0 adds).
    """
    topo = job.rt.topo
    reward_owner = topo.tp_rank == 0 and topo.pp_rank == 0
    metric_owner = topo.is_last_stage and topo.tp_rank == 0
    vec = torch.cat([reward_sums if reward_owner else torch.zeros_like(reward_sums),
                     metrics_vec if metric_owner else torch.zeros_like(metrics_vec)])  # fmt: skip
    comm.all_reduce(vec, group=topo.branch_group)
    values = vec.tolist()  # the step's one telemetry sync
    r = dict(zip(REWARD_KEYS, values[: len(REWARD_KEYS)], strict=True))
    n = max(r["count"], 1.0)
    out = {"reward": r["reward_sum"] / n, "accuracy": r["correct"] / n,
           "response_len": r["response_len_sum"] / n, "reward_timeouts": r["timeouts"],
           "reward_errors": r["errors"]}  # fmt: skip
    out.update(unpack_metrics(values[len(REWARD_KEYS) :], job.edges))
    overlaps = [v for k, v in out.items() if k.endswith("/overlap")]
    if overlaps:
        out["overlap"] = sum(overlaps) / len(overlaps)
    return out


def update(job: BranchJob, rows: Rows, loss_fn):
    """Optimizer step(s) on the combined GRPO + OPD rows.

    Returns (the last update's summed loss/edge telemetry ``[metric_width]`` on the device,
    this rank's share; {"grad_norm", "skipped_step"} host floats). With
    ``grpo.updates_per_batch`` > 1 the old-policy log-probs are computed once, before the first
    update; with ``grpo.kl_coef`` > 0 the frozen reference model scores the rows too.
    """
    topo, cfg, dev = job.rt.topo, job.cfg, job.rt.device
    extra = {}
    if cfg.grpo.updates_per_batch > 1:
        extra["old_logp"] = _row_logprobs(job, job.bm, rows)
    if job.ref is not None:
        extra["ref_logp"] = _row_logprobs(job, job.ref, rows)
    vec, stats = torch.zeros(metric_width(len(job.edges)), device=dev), {}
    for _ in range(cfg.grpo.updates_per_batch):
        mbs = microbatches(rows, cfg.parallel.micro_batch_size, dev, extra, cfg.parallel.by_length)
        out = run_microbatches(job.bm, topo, mbs, loss_fn)
        vec = sum(
            (o["metrics"] for o in out), torch.zeros(metric_width(len(job.edges)), device=dev)
        )
        stats = optimizer_step(job.bm, all_finite(vec[:1], topo.branch_group))
    return vec, {"grad_norm": stats["grad_norm"], "skipped_step": stats["skipped"]}


def _row_logprobs(job: BranchJob, bm, rows: Rows) -> torch.Tensor:
    """Token-aligned log-probs ``[N, L]`` of the rows under ``bm`` (zeros off the last stage),
    on the device."""
    cfg = job.cfg
    return row_logprobs(bm, job.rt.topo, rows, cfg.model.vocab_size,
                        cfg.parallel.micro_batch_size, logprob_chunk(cfg), job.rt.device)  # fmt: skip


def merge_branches(job: BranchJob) -> None:
    """Weighted in-place merge of every branch's fp32 masters (uniform by default) over the peer
    groups; Adam's moments follow ``merge.optimizer_state``."""
    weights = [b.merge_weight for b in job.cfg.branches]
    merge_in_place(job.bm.model, job.bm.optimizer, job.rt.topo, weights,
                   job.cfg.merge.optimizer_state)  # fmt: skip
    sync_engine(job)


def finish(job: BranchJob, table: dict[str, dict[str, float]]) -> None:
    """Evaluate each branch, build and evaluate the final model, save both; add rows to
    ``table``, print it, and write the final phases' times to RUN/timings.json. Collective."""
    cfg = job.cfg
    job.timings = {}
    with job.timed("final_eval"):
        table.update(evaluate_all_branches(job, lambda name: f"branch {name}"))
    with job.timed("final_save"):
        for name in cfg.branch_names:
            save_final(job, f"branch_{name}", name)
    mode = cfg.schedule.mode
    final_branch = cfg.schedule.student if mode in ("static_opd", "mopd") else cfg.branch_names[0]
    label = f"final ({final_branch})"
    if mode in ("copd", "expert") and len(cfg.branches) > 1:
        label = "merged"
        with job.timed("merge"):
            merge_branches(job)
        with job.timed("final_eval"):
            table.update(evaluate_shared_model(job, label))
    else:
        table[label] = table[f"branch {final_branch}"]
        job.problems[label] = job.problems[f"branch {final_branch}"]
    with job.timed("final_save"):
        path = save_final(job, "model", final_branch)
        comm.barrier()  # one branch writes it: every rank returns once it is on disk
    write_eval(job, table)
    if dist.get_rank() == 0:
        write_text_atomic(Path(cfg.run_dir, "timings.json"), json.dumps(job.timings, indent=2))
    job.rt.log(f"final model ({label}) saved to {path}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="copd train", description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument(
        "--resume",
        action="store_const",
        const="required",
        help="continue from RUN/checkpoints; an error when there is no checkpoint",
    )
    ap.add_argument("--resume=auto", dest="resume", action="store_const", const="auto",
                    help="continue if RUN/checkpoints holds a complete step, else start fresh "
                    "(requeued jobs); says which in one line")  # fmt: skip
    ap.add_argument("--retrain", action="store_true",
                    help="start over even when RUN holds checkpoints or a finished run")  # fmt: skip
    ap.add_argument("--stopped-file", default="", metavar="FILE",
                    help="when the job stops before the end with a checkpoint to continue from "
                    "(time limit, signal, schedule.stop_after), global rank 0 writes the reason "
                    "to FILE; slurm/copd_8branch.sh requeues the job when it exists")  # fmt: skip
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.resume:
        cfg.checkpoint.resume = args.resume
    _, stopped = run_training(cfg, retrain=args.retrain)
    if stopped and args.stopped_file and dist.get_rank() == 0:
        write_text_atomic(Path(args.stopped_file), stopped + "\n")
    shutdown()
    return 0
