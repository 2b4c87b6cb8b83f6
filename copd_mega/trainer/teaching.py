"""Mutual OPD between branches: rollouts to the teachers, teacher scores back.

Round 1 sends each student's rollouts (tokens, prompt lengths, lengths, and for vision rows the
same pixels) to the same-coordinate rank of its teacher; the teacher scores them with its
**current** weights (log-probs and top-k ids per sampled token); round 2 returns the scores
from the teacher's last PP stage to the student's. Every rank of every branch on an edge takes
part (``parallel.exchange``).
"""

from __future__ import annotations

import torch

from copd_mega.models.multimodal import RowMedia
from copd_mega.parallel.exchange import (
    pack_rollouts,
    return_scores,
    send_media,
    send_rollouts,
    unpack_rollouts,
)
from copd_mega.rl.batches import Rows, opd_rows
from copd_mega.rl.logprobs import logprob_chunk
from copd_mega.rl.sampling import Rollouts
from copd_mega.rl.schedule import StepPlan
from copd_mega.rl.teacher_scores import score_sequences
from copd_mega.trainer.job import BranchJob
from copd_mega.trainer.rollouts import rollout_peer


def exchange_rollouts(
    job: BranchJob, peer_out: dict[str, Rollouts], students: list[str]
) -> dict[str, Rollouts]:
    """Round 1: send ``peer_out`` (teacher -> this branch's rollouts on its prompts) and receive
    each student's rollouts, with their media when ``vision.enabled`` (collective over both
    branches of every edge). Returns student -> Rollouts (tokens ``[N, L]``, lengths, ``media``; sampler log-probs 0:
    not sent)."""
    topo, dev = job.rt.topo, job.rt.device
    out = {t: pack_rollouts(r.tokens, r.prompt_lens, r.lengths) for t, r in peer_out.items()}
    incoming = send_rollouts(topo, out, students, dev)
    pixels = {}
    if job.cfg.vision.enabled:  # every branch of the job agrees: all post or none
        pixels = send_media(topo, {t: r.media.pack() for t, r in peer_out.items()}, students, dev)
    got = {}
    for s in students:
        tokens, prompt_lens, lengths = unpack_rollouts(incoming[s])
        media = RowMedia.unpack(*pixels[s], tokens.shape[0]) if s in pixels else None
        unknown = torch.zeros(tokens.shape, device=tokens.device)  # the student's sampler's
        got[s] = Rollouts(tokens, prompt_lens, lengths, unknown, media)
    return got


def peer_scoring(job: BranchJob, peer_out: dict[str, Rollouts], students: list[str]) -> dict:
    """Exchange rollouts with peers; score each student's with this branch's current weights.
    ``peer_out``: teacher -> this branch's Rollouts on that teacher's prompts.

    Returns teacher -> (log-probs [N, L], top-k [N, L, k]) on this branch's last-stage ranks.
    """
    if not peer_out and not students:
        return {}
    topo, cfg, dev = job.rt.topo, job.cfg, job.rt.device
    with job.timed("exchange"):
        incoming = exchange_rollouts(job, peer_out, students)
    mine = {}
    with job.timed("teacher"):
        for s, rolls in incoming.items():
            res = score_sequences(job.bm, topo, rolls.tokens, cfg.opd.top_k,
                                  cfg.model.vocab_size, cfg.parallel.micro_batch_size,
                                  logprob_chunk(cfg), dev, rolls.media, rolls.lengths)  # fmt: skip
            if res is not None:
                mine[s] = res
    expected = {t: tuple(r.tokens.shape) for t, r in peer_out.items()}
    with job.timed("exchange"):
        return return_scores(topo, mine, expected, cfg.opd.top_k, dev)


def placeholder_scores(r: Rollouts) -> tuple[torch.Tensor, None]:
    """Teacher scores on ranks that do not compute the loss (not the last PP stage): zero
    log-probs and no top-k."""
    return torch.zeros(r.tokens.shape, device=r.tokens.device), None


def opd_step_rows(job: BranchJob, plan: StepPlan) -> list[Rows]:
    """The OPD half of an "opd" step: this branch samples on each teacher's prompts, serves as
    teacher to its students, and returns one set of OPD rows per edge it learns on (teacher
    scores valid on the last PP stage, placeholders elsewhere)."""
    me = job.name
    teachers = [t for s, t in plan.edges if s == me]
    students = [s for s, t in plan.edges if t == me]
    with job.timed("rollout"):
        peer_out = {t: rollout_peer(job, t, plan.step) for t in teachers}
    scores = peer_scoring(job, peer_out, students)
    beta = job.cfg.branches[job.cfg.branch_names.index(me)].beta
    parts = []
    for t, r in peer_out.items():
        logp, topk = scores.get(t, placeholder_scores(r))
        parts.append(opd_rows(r.tokens, r.prompt_lens, r.lengths, logp, topk, beta,
                              job.edges.index((me, t)), r.sampler_logprobs, r.media))  # fmt: skip
    return parts
