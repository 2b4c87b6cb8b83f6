"""Per-rank bodies of the tests that the vision path learns (import-safe; run under spawn)."""

from __future__ import annotations

import torch

# one image branch of the real LLaVA model, small enough to train on one CPU core in seconds
VISION_TASK = [
    "vision.enabled=true", "vision.num_layers=1", "vision.hidden_size=32",
    "vision.ffn_hidden_size=64", "vision.num_attention_heads=2", "vision.frames_per_video=4",
    "model.hidden_size=48", "model.ffn_hidden_size=96", "model.num_layers=1",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.max_seq_length=96",
    "model.vocab_size=128", "data.n_train=512", "data.n_eval=96", "optim.weight_decay=0.0",
    "parallel.micro_batch_size=32", "logging.progress=false", "teaching.graph=none",
    "schedule.mode=expert", "branches=[{name: image, data: image}]",
]  # fmt: skip
TRAINED = [
    "pretrain.steps=400", "pretrain.batch_size=32", "pretrain.lr=3.0e-3",
    "pretrain.warmup_steps=20", "pretrain.eval_every=20", "pretrain.eval_limit=48",
    "pretrain.capability_target=0.75",
]  # fmt: skip


def vision_weights(model) -> dict[str, torch.Tensor]:
    """Copies of the ViT's and the projector's parameters, by name."""
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if ".vision_model." in f".{n}" or ".vision_projection." in f".{n}"
    }


def grpo_step_on_images(rank: int, overrides: list[str]) -> dict:
    """Image rollouts of the real sampler, then two GRPO steps on them: first with every reward
    equal (zero advantages), then with rewards that differ inside each group.

    Returns the vision/projector weights before, after the zero-advantage step and after the
    second step.
    """
    from copd_mega.config import load_config
    from copd_mega.rl.batches import grpo_rows
    from copd_mega.rl.losses import grpo_advantages
    from copd_mega.rl.objective import make_loss_fn
    from copd_mega.trainer.job import build_job
    from copd_mega.trainer.rollouts import generate_rollouts
    from copd_mega.trainer.train import update

    job = build_job(load_config(None, ["checkpoint.random_init=true", *overrides]))
    cfg, g = job.cfg, job.cfg.grpo.group_size
    loss_fn = make_loss_fn(cfg, job.rt.topo, job.edges)
    samples = job.native.next_batch(cfg.rollout.prompts_per_step)
    rolls = generate_rollouts(job, samples, g, seed=5)
    assert int(rolls.media.per_row.sum()) == len(samples) * g  # every row carries its image

    def step(rewards: torch.Tensor) -> dict:
        adv = grpo_advantages(rewards, g)
        rows = grpo_rows(
            rolls.tokens, rolls.prompt_lens, rolls.lengths, adv, rolls.sampler_logprobs, rolls.media
        )
        update(job, rows, loss_fn)
        return vision_weights(job.bm.model)

    before = vision_weights(job.bm.model)
    flat = step(torch.ones(len(samples) * g))
    after = step((torch.arange(len(samples) * g) % 2).float())
    job.judge.close()
    return {"before": before, "flat": flat, "after": after}


def _accuracy(job, samples: list[dict]) -> float:
    """Greedy exact-match accuracy of ``job``'s model on ``samples`` (their media as given)."""
    from copd_mega.models.multimodal import generate, prompts_and_media
    from copd_mega.rl.sampling import SamplingParams

    codec = job.rt.codec
    prompts, media = prompts_and_media(codec, samples, 1, True)
    params = SamplingParams(job.cfg.rollout.max_new_tokens, 0.0, 1.0, 0, codec.eos, codec.pad)
    texts = [codec.decode(r) for r in generate(job.sampler, prompts, media, params, 0).responses()]
    rewards, _ = job.judge.score(
        [(t, s["answer"], s["reward_type"]) for t, s in zip(texts, samples, strict=True)]
    )
    return float((rewards > 0.5).float().mean())


def shuffle_pixels(samples: list[dict], seed: int = 0) -> list[dict]:
    """The samples with every image's pixel positions permuted (one fixed permutation of the
    H*W positions, all channels alike): colours and their amounts stay, the layout goes."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in samples:
        images = []
        for img in s["images"]:
            c, h, w = img.shape
            perm = torch.randperm(h * w, generator=gen)
            images.append(img.reshape(c, h * w)[:, perm].reshape(c, h, w))
        out.append({**s, "images": images})
    return out


def trained_then_shuffled(rank: int, overrides: list[str]) -> dict:
    """Pretrain the image branch to ``pretrain.capability_target``, then score the held-out
    images as they are and with shuffled pixels.

    Returns {"accuracy", "shuffled", "answers": the eval answers}.
    """
    from copd_mega.config import load_config
    from copd_mega.launch.datasets import make_reader
    from copd_mega.trainer.job import build_job
    from copd_mega.trainer.pretrain import run_pretrain

    cfg = load_config(None, overrides)
    base = run_pretrain(cfg)
    job = build_job(load_config(None, [*overrides, f"checkpoint.init_from={base}"]))
    reader = make_reader(job.cfg, "image", "eval", 0, 1)
    samples = reader.next_batch(reader.samples_per_epoch)
    out = {
        "accuracy": _accuracy(job, samples),
        "shuffled": _accuracy(job, shuffle_pixels(samples)),
        "answers": [s["answer"] for s in samples],
    }
    job.judge.close()
    return out
