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

from copd_mega.batches import Rows, concat_rows, grpo_rows, microbatches, opd_rows
from copd_mega.checkpoint import CheckpointError, save_step, write_text_atomic
from copd_mega.config import Config, load_config
from copd_mega.job import (
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
from copd_mega.losses import grpo_advantages
from copd_mega.model import branch_seed
from copd_mega.multimodal import MediaSpec, RowMedia, generate, prompts_and_media
from copd_mega.objective import make_loss_fn, metric_width, unpack_metrics
from copd_mega.parallel import comm
from copd_mega.parallel.dist import read_launch_env
from copd_mega.parallel.exchange import pack_rollouts, return_scores, send_media, send_rollouts
from copd_mega.parallel.merge import merge_in_place
from copd_mega.periodic_eval import after_step
from copd_mega.preemption import Preemption
from copd_mega.rollout import Rollouts, SamplingParams
from copd_mega.runtime import shutdown
from copd_mega.schedule import StepPlan, remaining_steps
from copd_mega.scoring import score_sequences
from copd_mega.step import all_finite, optimizer_step, run_microbatches
from copd_mega.validate import check_prompts


def train(cfg: Config, retrain: bool = False) -> dict[str, dict[str, float]]:
    """Run the configured job to the end, or until preempted; returns the evaluation table (on
    global rank 0). How it starts (resume / fresh / already finished) is ``job.start_mode``."""
    mode, message = start_mode(cfg, retrain)
    if mode == "finished" or mode == "fresh":
        _say(message)
    if mode == "finished":
        return {}
    with Preemption() as preempted:
        job = build_job(cfg)
        table = _start(job, mode == "resume")
        loss_fn = _with_faults(make_loss_fn(cfg, job.rt.topo, job.edges), job)
        stop = cfg.schedule.stop_after
        for done, plan in enumerate(remaining_steps(job.plan, job.state), start=1):
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
            signalled = more and preempted.agreed(job.rt.device)
            if (every and job.state.next_step % every == 0) or stopping or signalled:
                with job.timed("checkpoint"):
                    save_step(Path(cfg.run_dir) / "checkpoints", plan.step, job.bm, job.rt.topo,
                              cfg, trainer_state(job))  # fmt: skip
            record.update(job.timings, **{"time/step": time.perf_counter() - t0})
            record["tokens_per_s"] = record.get("train_tokens", 0.0) / record["time/step"]
            job.logger.log(plan.step, record)
            if stopping or signalled:
                why = f"{preempted.name}: preempted" if signalled else "schedule.stop_after"
                _say(f"stopping after step {plan.step} ({why}); saved step_{plan.step:06d}, "
                     "continue with --resume=auto")  # fmt: skip
                break
        else:
            finish(job, table)
    job.logger.close()
    job.judge.close()
    return table


def _say(message: str) -> None:
    """Print once per job: on global rank 0 (read from the launcher before the process group)."""
    rank = dist.get_rank() if dist.is_initialized() else read_launch_env().rank
    if rank == 0:
        print(f"copd train: {message}", flush=True)


def _start(job: BranchJob, resuming: bool) -> dict[str, dict[str, float]]:
    """Restore the job when resuming (else cut its metrics back to step 0 and evaluate the base
    model); the evaluation table so far (the base row, kept in RUN/eval_base.json)."""
    cfg = job.cfg
    base_file = Path(cfg.run_dir) / "eval_base.json"
    if resuming:
        if not resume(job):
            raise CheckpointError(f"{cfg.run_dir}/checkpoints: the checkpoint to resume from "
                                  "disappeared while the job started")  # fmt: skip
        _say(f"resumed from {Path(cfg.run_dir) / 'checkpoints'}/step_"
             f"{job.state.next_step - 1:06d}: continuing at step {job.state.next_step} of "
             f"{len(job.plan)}")  # fmt: skip
        return json.loads(base_file.read_text()) if base_file.exists() else {}
    job.logger.cut_back(0)
    if not cfg.eval.base:
        return {}
    table = evaluate_shared_model(job, "base")
    if dist.get_rank() == 0:
        write_text_atomic(base_file, json.dumps(table, indent=2))
    return table


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

    Rollouts, rows and teacher scores stay on the device; telemetry accumulates there and is
    summed over the branch and brought to the host once, at the end of the step.
    """
    me = job.name
    learner = me in plan.learners
    teachers = [t for s, t in plan.edges if s == me]
    students = [s for s, t in plan.edges if t == me]
    record: dict = {"cycle": plan.cycle, "phase": plan.phase, "learner": int(learner)}
    parts: list[Rows] = []
    media: list[RowMedia] = []  # per part, with vision.enabled
    if learner:
        with job.timed("rollout"):
            samples, rolls, m = rollout_native(job, plan.step)
        with job.timed("reward"):
            rows, reward_sums = reward_and_advantages(job, samples, rolls)
        parts.append(rows)
        media.append(m)
    with job.timed("rollout"):
        peer_out = {t: rollout_peer(job, t, plan.step) for t in teachers}
    scores = peer_scoring(job, peer_out, students)
    beta = job.cfg.branches[job.cfg.branch_names.index(me)].beta
    for t in teachers:
        r, m = peer_out[t]
        media.append(m)
        logp, topk = scores.get(t, _placeholder(r))
        parts.append(opd_rows(r.tokens, r.prompt_lens, r.lengths, logp, topk, beta,
                              job.edges.index((me, t)), r.sampler_logprobs))  # fmt: skip
    if learner:
        with job.timed("train"):
            rows = concat_rows(parts, pad_id=job.rt.codec.pad)
            all_media = RowMedia.cat(media) if job.cfg.vision.enabled else None
            metrics_vec, stats = update(job, rows, loss_fn, all_media)
        record.update(stats)
        record.update(_telemetry_to_host(job, reward_sums, metrics_vec))
    return record


REWARD_KEYS = ("reward_sum", "correct", "count", "response_len_sum", "timeouts", "errors")


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


def rollout_native(job: BranchJob, step: int) -> tuple[list[dict], Rollouts, RowMedia | None]:
    """G rollouts for each of this DP rank's native prompts (rows grouped by prompt), and the
    rows' media (with ``vision.enabled``; the reader's pixels, unchanged, else None)."""
    cfg = job.cfg
    per_rank = max(cfg.rollout.prompts_per_step // job.rt.topo.layout.dp, 1)
    samples = job.native.next_batch(per_rank)
    seed = branch_seed(cfg, job.rt.topo.branch.index) * 7919 + step
    rolls, media = _generate(job, samples, cfg.grpo.group_size, seed)
    return samples, rolls, media


def rollout_peer(job: BranchJob, teacher: str, step: int) -> tuple[Rollouts, RowMedia | None]:
    """The student's own rollouts on prompts x' drawn from ``teacher``'s data, and their media."""
    o = job.cfg.opd
    per_rank = max(o.prompts_per_peer // job.rt.topo.layout.dp, 1)
    samples = job.peers[teacher].next_batch(per_rank)
    seed = branch_seed(job.cfg, job.rt.topo.branch.index) * 7919 + 104729 * (1 + step)
    seed += job.cfg.branch_names.index(teacher)
    return _generate(job, samples, o.samples_per_prompt, seed)


def _generate(job: BranchJob, samples: list[dict], repeat: int, seed: int):
    vision = job.cfg.vision.enabled
    prompts, media = prompts_and_media(job.rt.codec, samples, repeat, vision)
    check_prompts(job.cfg, prompts, media, job.rt.codec.image)
    rolls = generate(job.sampler, prompts, media, _sampling(job), seed)
    return rolls, RowMedia.from_lists(media, job.cfg.vision.image_size) if vision else None


def _media_spec(job: BranchJob) -> MediaSpec:
    return MediaSpec(job.cfg, job.rt.codec.image, job.rt.codec.pad)


def _vlm(job: BranchJob, media: RowMedia | None):
    """Microbatch hook adding the rows' VLM inputs (None for the text model)."""
    if media is None:
        return None
    size = job.cfg.parallel.micro_batch_size
    return lambda mbs: _media_spec(job).attach(mbs, media, size)


def _sampling(job: BranchJob) -> SamplingParams:
    return SamplingParams.from_config(job.cfg, job.rt.codec.eos, job.rt.codec.pad)


def reward_and_advantages(job: BranchJob, samples: list[dict], rolls: Rollouts):
    """Verifiable rewards of the native rollouts and their GRPO rows (on the device).

    Returns (rows, reward sums ``[len(REWARD_KEYS)]`` on the device, this rank's; summed over
    the branch by :func:`_telemetry_to_host`). The responses come to the host once, as text
    for the verifiers.
    """
    g, dev = job.cfg.grpo, job.rt.device
    host = pack_rollouts(rolls.tokens, rolls.prompt_lens, rolls.lengths).cpu()
    responses = [row[2 + int(row[0]) : 2 + int(row[1])].tolist() for row in host]
    texts = [job.rt.codec.decode(r) for r in responses]
    gold = [s for s in samples for _ in range(g.group_size)]
    items = [(t, s["answer"], s["reward_type"]) for t, s in zip(texts, gold, strict=True)]
    rewards, status = job.judge.score(items)
    rewards = rewards.to(dev)
    adv = grpo_advantages(rewards, g.group_size, g.adv_eps)
    rows = grpo_rows(rolls.tokens, rolls.prompt_lens, rolls.lengths, adv, rolls.sampler_logprobs)
    resp_len = (rolls.lengths - rolls.prompt_lens).float()
    counts = torch.tensor([len(items), status["timeout"], status["error"]], dtype=torch.float32)
    counts = counts.to(dev)
    sums = torch.stack([rewards.sum(), (rewards > 0.5).float().sum(), counts[0], resp_len.sum(),
                        counts[1], counts[2]])  # fmt: skip
    return rows, sums


def peer_scoring(job: BranchJob, peer_out: dict, students: list[str]) -> dict:
    """Exchange rollouts (and, with vision, their pixels) with peers; score each student's with
    this branch's current weights. ``peer_out``: teacher -> (Rollouts, RowMedia | None).

    Returns teacher -> (log-probs [N, L], top-k [N, L, k]) on this branch's last-stage ranks.
    """
    if not peer_out and not students:
        return {}
    topo, cfg, dev = job.rt.topo, job.cfg, job.rt.device
    peer_rolls = {t: r for t, (r, _) in peer_out.items()}
    out = {t: pack_rollouts(r.tokens, r.prompt_lens, r.lengths) for t, r in peer_rolls.items()}
    with job.timed("exchange"):
        incoming = send_rollouts(topo, out, students, dev)
        pixels = {}
        if cfg.vision.enabled:
            packed = {t: m.pack() for t, (_, m) in peer_out.items()}
            pixels = send_media(topo, packed, students, dev)
    mine = {}
    with job.timed("teacher"):
        for s in students:
            tokens = incoming[s][:, 2:]
            media = RowMedia.unpack(*pixels[s], tokens.shape[0]) if s in pixels else None
            res = score_sequences(
                job.bm,
                topo,
                tokens,
                cfg.opd.top_k,
                cfg.model.vocab_size,
                cfg.parallel.micro_batch_size,
                cfg.rollout.logprob_chunk,
                dev,
                _vlm(job, media),
            )
            if res is not None:
                mine[s] = res  # fmt: skip
    expected = {t: tuple(r.tokens.shape) for t, r in peer_rolls.items()}
    with job.timed("exchange"):
        return return_scores(topo, mine, expected, cfg.opd.top_k, dev)


def _placeholder(r: Rollouts) -> tuple[torch.Tensor, None]:
    """Teacher scores on ranks that do not compute the loss (not the last PP stage): zero
    log-probs and no top-k."""
    return torch.zeros(r.tokens.shape, device=r.tokens.device), None


def update(job: BranchJob, rows: Rows, loss_fn, media: RowMedia | None = None):
    """Optimizer step(s) on the combined GRPO + OPD rows.

    Returns (the last update's summed loss/edge telemetry ``[metric_width]`` on the device,
    this rank's share; {"grad_norm", "skipped_step"} host floats). With
    ``grpo.updates_per_batch`` > 1 the old-policy log-probs are computed once, before the first
    update; with ``grpo.kl_coef`` > 0 the frozen reference model scores the rows too.
    ``media``: the rows' media (``vision.enabled``), attached to every microbatch.
    """
    topo, cfg, dev = job.rt.topo, job.cfg, job.rt.device
    extra = {}
    if cfg.grpo.updates_per_batch > 1:
        extra["old_logp"] = _row_logprobs(job, job.bm, rows, media)
    if job.ref is not None:
        extra["ref_logp"] = _row_logprobs(job, job.ref, rows, media)
    vec, stats = torch.zeros(metric_width(len(job.edges)), device=dev), {}
    for _ in range(cfg.grpo.updates_per_batch):
        mbs = microbatches(rows, cfg.parallel.micro_batch_size, dev, extra)
        if media is not None:
            mbs = _media_spec(job).attach(mbs, media, cfg.parallel.micro_batch_size)
        out = run_microbatches(job.bm, topo, mbs, loss_fn)
        vec = sum(
            (o["metrics"] for o in out), torch.zeros(metric_width(len(job.edges)), device=dev)
        )
        stats = optimizer_step(job.bm, all_finite(vec[:1], topo.branch_group))
    return vec, {"grad_norm": stats["grad_norm"], "skipped_step": stats["skipped"]}


def _row_logprobs(job: BranchJob, bm, rows: Rows, media: RowMedia | None) -> torch.Tensor:
    """Token-aligned log-probs ``[N, L]`` of the rows under ``bm`` (zeros off the last stage),
    on the device."""
    cfg = job.cfg
    res = score_sequences(
        bm,
        job.rt.topo,
        rows.tokens,
        0,  # log-probs only
        cfg.model.vocab_size,
        cfg.parallel.micro_batch_size,
        cfg.rollout.logprob_chunk,
        job.rt.device,
        _vlm(job, media),
    )
    return res[0] if res is not None else torch.zeros(rows.tokens.shape, device=job.rt.device)


def merge_branches(job: BranchJob) -> None:
    """Weighted in-place merge of every branch's fp32 masters (uniform by default) over the peer
    groups; Adam's moments follow ``merge.optimizer_state``."""
    weights = [b.merge_weight for b in job.cfg.branches]
    merge_in_place(job.bm.model, job.bm.optimizer, job.rt.topo, weights,
                   job.cfg.merge.optimizer_state)  # fmt: skip


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
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.resume:
        cfg.checkpoint.resume = args.resume
    train(cfg, retrain=args.retrain)
    shutdown()
    return 0
