"""A branch's rollouts of one step and their verifiable rewards.

Prompts come from the branch's own reader (native, GRPO) or from a teaching peer's reader (OPD);
the sampler returns :class:`~copd_mega.rl.sampling.Rollouts` that own their media (vision rows:
the reader's pixels, unchanged), so everything after this module treats text and vision rows
alike. Rewards are scored on one rank per model replica and become GRPO rows on the device.
"""

from __future__ import annotations

import dataclasses

import torch

from copd_mega.launch.validate import check_prompts
from copd_mega.models.gpt import branch_seed
from copd_mega.models.multimodal import RowMedia, generate, prompts_and_media
from copd_mega.parallel.exchange import pack_rollouts
from copd_mega.rl.batches import Rows, grpo_rows
from copd_mega.rl.losses import grpo_advantages
from copd_mega.rl.rewards import gold_of, is_correct
from copd_mega.rl.sampling import Rollouts, SamplingParams
from copd_mega.trainer.job import BranchJob

REWARD_KEYS = ("reward_sum", "correct", "count", "response_len_sum", "timeouts", "errors")


def rollout_native(job: BranchJob, step: int) -> tuple[list[dict], Rollouts]:
    """G rollouts for each of this DP rank's native prompts (rows grouped by prompt)."""
    cfg = job.cfg
    per_rank = max(cfg.rollout.prompts_per_step // job.rt.topo.layout.dp, 1)
    samples = job.native.next_batch(per_rank)
    seed = branch_seed(cfg, job.rt.topo.branch.index) * 7919 + step
    return samples, generate_rollouts(job, samples, cfg.grpo.group_size, seed)


def rollout_peer(job: BranchJob, teacher: str, step: int) -> Rollouts:
    """The student's own rollouts on prompts x' drawn from ``teacher``'s data."""
    o = job.cfg.opd
    per_rank = max(o.prompts_per_peer // job.rt.topo.layout.dp, 1)
    samples = job.peers[teacher].next_batch(per_rank)
    seed = branch_seed(job.cfg, job.rt.topo.branch.index) * 7919 + 104729 * (1 + step)
    seed += job.cfg.branch_names.index(teacher)
    return generate_rollouts(job, samples, o.samples_per_prompt, seed)


def generate_rollouts(job, samples: list[dict], repeat: int, seed: int) -> Rollouts:
    """Rollouts of ``samples`` (each ``repeat`` times) that own their media (vision.enabled).
    ``job``: anything with ``cfg``, ``rt`` and ``sampler`` (a ``BranchJob``, a probe's view)."""
    vision = job.cfg.vision.enabled
    prompts, media = prompts_and_media(job.rt.codec, samples, repeat, vision)
    check_prompts(job.cfg, prompts, media, job.rt.codec.image)
    rolls = generate(job.sampler, prompts, media, sampling(job), seed)
    if not vision:
        return rolls
    return dataclasses.replace(rolls, media=RowMedia.from_lists(media, job.cfg.vision.image_size))


def sampling(job: BranchJob) -> SamplingParams:
    return SamplingParams.from_config(job.cfg, job.rt.codec.eos, job.rt.codec.pad)


def reward_and_advantages(job: BranchJob, samples: list[dict], rolls: Rollouts):
    """Verifiable rewards of the native rollouts and their GRPO rows (on the device).

    Returns (rows, reward sums ``[len(REWARD_KEYS)]`` on the device, this rank's; summed over
    the branch by the loop's telemetry). The responses come to the host once, as text for the
    verifiers.
    """
    g, dev = job.cfg.grpo, job.rt.device
    host = pack_rollouts(rolls.tokens, rolls.prompt_lens, rolls.lengths).cpu()
    responses = [row[2 + int(row[0]) : 2 + int(row[1])].tolist() for row in host]
    texts = [job.rt.codec.decode(r) for r in responses]
    gold = [s for s in samples for _ in range(g.group_size)]
    items = [(t, gold_of(s), s["reward_type"]) for t, s in zip(texts, gold, strict=True)]
    rewards, status = job.judge.score(items)
    rewards = rewards.to(dev)
    adv = grpo_advantages(rewards, g.group_size, g.adv_eps)
    rows: Rows = grpo_rows(rolls.tokens, rolls.prompt_lens, rolls.lengths, adv,
                           rolls.sampler_logprobs, rolls.media)  # fmt: skip
    resp_len = (rolls.lengths - rolls.prompt_lens).float()
    counts = torch.tensor([len(items), status["timeout"], status["error"]], dtype=torch.float32)
    counts = counts.to(dev)
    sums = torch.stack([rewards.sum(), is_correct(rewards).float().sum(), counts[0], resp_len.sum(),
                        counts[1], counts[2]])  # fmt: skip
    return rows, sums
