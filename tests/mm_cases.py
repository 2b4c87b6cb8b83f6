"""Per-rank bodies of the multimodal tests (import-safe; run under multiproc.spawn)."""

from __future__ import annotations

MM_THREE = (
    "branches=[{name: text, data: arith}, {name: image, data: image}, {name: video, data: video}]"
)
TINY_MM = [
    "vision.enabled=true", "vision.num_layers=1", "vision.hidden_size=32",
    "vision.ffn_hidden_size=64", "vision.num_attention_heads=2", "vision.frames_per_video=4",
    "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=1",
    "model.max_seq_length=160", "model.vocab_size=128", "data.n_train=32", "data.n_eval=4",
    "rollout.prompts_per_step=2", "rollout.max_new_tokens=4", "grpo.group_size=2",
    "opd.prompts_per_peer=2", "opd.samples_per_prompt=1", "schedule.cycles=1",
    "schedule.rl_steps=1", "schedule.opd_steps=1", "logging.progress=false",
    "teaching.graph=hub_spoke", "teaching.hub=text", MM_THREE,
]  # fmt: skip


def mm_exchange(rank: int, overrides: list[str]) -> dict:
    """Every branch samples its own rollouts on each teacher's prompts (with their media), sends
    tokens and pixels, scores its students' with the received pixels and returns the scores.

    Returns what it sent, what it received, its local teacher scores, and (as a control) its
    scores of the same tokens with blank pixels.
    """
    from copd_cases import perturb

    from copd_mega.config import load_config
    from copd_mega.models.multimodal import RowMedia
    from copd_mega.parallel.exchange import pack_rollouts, return_scores, send_media, send_rollouts
    from copd_mega.rl.teacher_scores import score_sequences
    from copd_mega.trainer.job import build_job
    from copd_mega.trainer.rollouts import rollout_peer

    job = build_job(load_config(None, ["checkpoint.random_init=true", *overrides]))
    topo, cfg, dev = job.rt.topo, job.cfg, job.rt.device
    perturb(job.bm, topo)
    me = job.name
    teachers = [t for s, t in topo.layout.edges if s == me]
    students = [s for s, t in topo.layout.edges if t == me]
    sent = {t: rollout_peer(job, t, step=0) for t in teachers}
    packed = {t: pack_rollouts(r.tokens, r.prompt_lens, r.lengths) for t, r in sent.items()}
    incoming = send_rollouts(topo, packed, students, dev)
    pixels = send_media(topo, {t: r.media.pack() for t, r in sent.items()}, students, dev)

    def score(tokens, media):
        return score_sequences(job.bm, topo, tokens, cfg.opd.top_k, cfg.model.vocab_size,
                               cfg.parallel.micro_batch_size, cfg.rollout.logprob_chunk, dev,
                               media)  # fmt: skip

    local, blank, got_media = {}, {}, {}
    for s in students:
        tokens = incoming[s][:, 2:]
        media = RowMedia.unpack(*pixels[s], tokens.shape[0])
        got_media[s] = media
        local[s] = score(tokens, media)
        blank[s] = score(tokens, RowMedia(media.pixels * 0, media.tiles, media.per_row))
    expected = {t: tuple(r.tokens.shape) for t, r in sent.items()}
    received = return_scores(topo, local, expected, cfg.opd.top_k, dev)
    job.judge.close()
    return {
        "branch": me, "received": received, "local": local, "blank": blank,
        "sent": {t: (r.tokens, r.media) for t, r in sent.items()},
        "incoming": {s: (incoming[s][:, 2:], got_media[s]) for s in students},
    }  # fmt: skip
