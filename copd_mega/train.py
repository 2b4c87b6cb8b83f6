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
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from copd_mega.batches import Rows, concat_rows, grpo_rows, microbatches, opd_rows
from copd_mega.checkpoint import save_step
from copd_mega.config import Config, ConfigError, load_config
from copd_mega.job import (
    BranchJob,
    build_job,
    evaluate_all_branches,
    evaluate_shared_model,
    resume,
    save_final,
    trainer_state,
    write_eval,
)  # fmt: skip
from copd_mega.losses import grpo_advantages
from copd_mega.model import branch_seed
from copd_mega.multimodal import MediaSpec, RowMedia, generate, prompts_and_media
from copd_mega.objective import make_loss_fn, metric_width, unpack_metrics
from copd_mega.parallel.exchange import pack_rollouts, return_scores, send_media, send_rollouts
from copd_mega.parallel.merge import merge_in_place, refresh_optimizer_master
from copd_mega.rollout import Rollouts, SamplingParams
from copd_mega.runtime import shutdown
from copd_mega.schedule import StepPlan, remaining_steps
from copd_mega.scoring import score_sequences
from copd_mega.step import all_finite, optimizer_step, run_microbatches
from copd_mega.validate import check_prompts


def train(cfg: Config) -> dict[str, dict[str, float]]:
    """Run the configured job to the end; returns the evaluation table (on global rank 0)."""
    job = build_job(cfg)
    table: dict[str, dict[str, float]] = {}
    base_file = Path(cfg.run_dir) / "eval_base.json"
    if cfg.checkpoint.resume and resume(job):
        if base_file.exists():  # the base row of the table survives a resume
            table.update(json.loads(base_file.read_text()))
    else:
        table.update(evaluate_shared_model(job, "base"))
        if dist.get_rank() == 0:
            base_file.write_text(json.dumps(table, indent=2))
    loss_fn = make_loss_fn(cfg, job.rt.topo, job.edges)
    stop = cfg.schedule.stop_after
    for done, plan in enumerate(remaining_steps(job.plan, job.state), start=1):
        job.timings = {}
        t0 = time.perf_counter()
        record = cycle_step(job, plan, loss_fn)
        job.state.advance()
        if plan.end_of_cycle and cfg.schedule.merge_every_cycle and len(cfg.branches) > 1:
            with job.timed("merge"):
                merge_branches(job)
        every = cfg.checkpoint.every
        stopping = stop and done >= stop and job.state.next_step < len(job.plan)
        if (every and job.state.next_step % every == 0) or stopping:
            with job.timed("checkpoint"):
                save_step(Path(cfg.run_dir) / "checkpoints", plan.step, job.bm, job.rt.topo,
                          cfg, trainer_state(job))  # fmt: skip
        record.update(job.timings, **{"time/step": time.perf_counter() - t0})
        record["tokens_per_s"] = record.get("train_tokens", 0.0) / record["time/step"]
        job.logger.log(plan.step, record)
        if stopping:
            job.rt.log(f"stopping after {done} steps (schedule.stop_after); resume with --resume")
            break
    else:
        finish(job, table)
    job.logger.close()
    job.judge.close()
    return table


def cycle_step(job: BranchJob, plan: StepPlan, loss_fn) -> dict:
    """One global step for this rank's branch; returns its telemetry (valid on every rank)."""
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
            rows, reward_metrics = reward_and_advantages(job, samples, rolls)
        parts.append(rows)
        media.append(m)
        record.update(reward_metrics)
    with job.timed("rollout"):
        peer_out = {t: rollout_peer(job, t, plan.step) for t in teachers}
    peer_rolls = {t: r for t, (r, _) in peer_out.items()}
    scores = peer_scoring(job, peer_out, students)
    for t in teachers:
        r = peer_rolls[t]
        media.append(peer_out[t][1])
        logp, topk = scores.get(t, _placeholder(r, job.cfg.opd.top_k))
        beta = job.cfg.branches[job.cfg.branch_names.index(me)].beta
        parts.append(opd_rows(r.tokens.cpu(), r.prompt_lens.cpu(), r.lengths.cpu(), logp.cpu(),
                              topk.cpu(), beta, job.edges.index((me, t))))  # fmt: skip
    if learner:
        with job.timed("train"):
            rows = concat_rows(parts, pad_id=job.rt.codec.pad)
            all_media = RowMedia.cat(media) if job.cfg.vision.enabled else None
            record.update(update(job, rows, loss_fn, all_media))
    return record


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
    """Verifiable rewards of the native rollouts and their GRPO rows; reward telemetry."""
    g = job.cfg.grpo
    texts = [job.rt.codec.decode(r) for r in rolls.responses()]
    gold = [s for s in samples for _ in range(g.group_size)]
    items = [(t, s["answer"], s["reward_type"]) for t, s in zip(texts, gold, strict=True)]
    rewards, status = job.judge.score(items)
    adv = grpo_advantages(rewards, g.group_size, g.adv_eps)
    rows = grpo_rows(rolls.tokens.cpu(), rolls.prompt_lens.cpu(), rolls.lengths.cpu(), adv,
                     job.cfg.opd.top_k)  # fmt: skip
    resp_len = (rolls.lengths - rolls.prompt_lens).float()
    sums = torch.tensor([rewards.sum(), (rewards > 0.5).float().sum(), len(items),
                         resp_len.sum(), status["timeout"], status["error"]])  # fmt: skip
    s = _branch_sum(job, sums, owner=job.rt.topo.tp_rank == 0 and job.rt.topo.pp_rank == 0)
    n = max(float(s[2]), 1.0)
    return rows, {"reward": float(s[0]) / n, "accuracy": float(s[1]) / n,
                  "response_len": float(s[3]) / n, "reward_timeouts": float(s[4]),
                  "reward_errors": float(s[5])}  # fmt: skip


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


def _placeholder(r: Rollouts, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher scores on ranks that do not compute the loss (not the last PP stage)."""
    n, width = r.tokens.shape
    return torch.zeros(n, width), torch.zeros(n, width, k, dtype=torch.long)


def update(job: BranchJob, rows: Rows, loss_fn, media: RowMedia | None = None) -> dict:
    """Optimizer step(s) on the combined GRPO + OPD rows; loss and edge telemetry.

    With ``grpo.updates_per_batch`` > 1 the old-policy log-probs are computed once, before the
    first update; with ``grpo.kl_coef`` > 0 the frozen reference model scores the rows too.
    ``media``: the rows' media (``vision.enabled``), attached to every microbatch.
    """
    topo, cfg = job.rt.topo, job.cfg
    width = metric_width(len(job.edges))
    extra = {}
    if cfg.grpo.updates_per_batch > 1:
        extra["old_logp"] = _row_logprobs(job, job.bm, rows, media)
    if job.ref is not None:
        extra["ref_logp"] = _row_logprobs(job, job.ref, rows, media)
    metrics: dict = {}
    for _ in range(cfg.grpo.updates_per_batch):
        mbs = microbatches(rows, cfg.parallel.micro_batch_size, job.rt.device, extra)
        if media is not None:
            mbs = _media_spec(job).attach(mbs, media, cfg.parallel.micro_batch_size)
        out = run_microbatches(job.bm, topo, mbs, loss_fn)
        vec = sum((o["metrics"] for o in out), torch.zeros(width))
        finite = all_finite([float(vec[0])], job.rt.topo.branch_group)
        stats = optimizer_step(job.bm, finite)
        owner = topo.is_last_stage and topo.tp_rank == 0
        metrics = unpack_metrics(_branch_sum(job, vec, owner), job.edges)
        metrics.update(grad_norm=stats["grad_norm"], skipped_step=stats["skipped"])
        overlaps = [v for k, v in metrics.items() if k.endswith("/overlap")]
        if overlaps:
            metrics["overlap"] = sum(overlaps) / len(overlaps)
    return metrics


def _row_logprobs(job: BranchJob, bm, rows: Rows, media: RowMedia | None) -> torch.Tensor:
    """Token-aligned log-probs ``[N, L]`` of the rows under ``bm`` (zeros off the last stage)."""
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
    return res[0].cpu() if res is not None else torch.zeros(rows.tokens.shape)  # fmt: skip


def _branch_sum(job: BranchJob, vec: torch.Tensor, owner: bool) -> torch.Tensor:
    """Sum ``vec`` over the branch, counting each DP replica once (only ``owner`` ranks add)."""
    buf = (vec.float() if owner else torch.zeros_like(vec, dtype=torch.float32)).to(job.rt.device)
    dist.all_reduce(buf, group=job.rt.topo.branch_group)
    return buf.cpu()


def merge_branches(job: BranchJob) -> None:
    """Weighted in-place merge of every branch (uniform by default) over the peer groups."""
    weights = [b.merge_weight for b in job.cfg.branches]
    merge_in_place(job.bm.model, job.rt.topo, weights)
    refresh_optimizer_master(job.bm.optimizer)


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
    write_eval(job, table)
    if dist.get_rank() == 0:
        Path(cfg.run_dir, "timings.json").write_text(json.dumps(job.timings, indent=2))
    job.rt.log(f"final model ({label}) saved to {path}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="copd train", description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/latest")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cfg.checkpoint.resume = cfg.checkpoint.resume or args.resume
        train(cfg)
    except ConfigError as e:
        print(f"copd train: {e}", file=sys.stderr)
        return 1
    shutdown()
    return 0
