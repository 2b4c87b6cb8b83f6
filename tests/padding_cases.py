"""Per-rank bodies of the padding / memory-setting tests (import-safe; run under multiproc.spawn)."""

from __future__ import annotations

import torch
from exact_cases import full_reduced_grads, masked_nll, setup

# rows of one update: real lengths differ (the longest is the full width)
WIDTH, LENGTHS = 12, [12, 5, 9, 3, 7, 11]

# a tiny LLaVA: 16x16 images of 8x8 patches are 4 positions each; 40 positions in all
VLM = [
    "vision.enabled=true", "vision.image_size=16", "vision.patch_size=8", "vision.num_layers=1",
    "vision.hidden_size=32", "vision.ffn_hidden_size=64", "vision.num_attention_heads=2",
    "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=1",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.max_seq_length=40",
    "model.tie_embeddings=false", "parallel.micro_batch_size=3",
]  # fmt: skip
IMAGE_ID, PAD_ID = 5, 0


def _meta(bm) -> dict:
    from copd_mega.models.gpt import global_param_names

    return {
        k: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", -1),
            getattr(p, "partition_stride", 1))
        for k, p in global_param_names(bm.module).items()
    }  # fmt: skip


def text_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens [6, WIDTH]`` (0 after each row's length) and the loss mask (positions 1..len-1)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 100, (len(LENGTHS), WIDTH), generator=g)
    t = torch.arange(WIDTH)
    lengths = torch.tensor(LENGTHS)
    tokens[t[None, :] >= lengths[:, None]] = 0
    mask = (t[None, :] >= 1) & (t[None, :] < lengths[:, None])
    return tokens, mask


def trimmed_gradients(rank: int, overrides: list[str], trim: bool) -> dict:
    """Reduced gradients, grad norm and summed loss of one update over ``text_rows`` in
    micro-batches of 2 rows; ``trim``: each micro-batch cut to its longest row."""
    from copd_mega.models.step import optimizer_step, run_microbatches
    from copd_mega.rl.batches import split_microbatches

    cfg, topo, bm = setup(overrides)
    tokens, mask = text_rows()
    mbs = split_microbatches({"tokens": tokens, "mask": mask}, 2, torch.device("cpu"),
                             lengths=LENGTHS if trim else None)  # fmt: skip
    out = run_microbatches(bm, topo, mbs, masked_nll(topo))
    loss = sum(float(o["nll"]) for o in out) if out else None
    grads = full_reduced_grads(bm, topo)
    norm = optimizer_step(bm)["grad_norm"]
    return {"grads": grads, "norm": norm, "meta": _meta(bm), "tp": topo.layout.tp,
            "tp_rank": topo.tp_rank, "loss": loss, "widths": [mb["tokens"].shape[1] for mb in mbs],
            "last_stage": topo.is_last_stage, "recompute": bm.config.recompute_granularity,
            "sp_after": bm.config.sequence_parallel}  # fmt: skip


def mixed_rows():
    """Two 12-token image rows and a 40-token text row in one update (the text row is the
    longest: the micro-batch is 40 wide). Returns (Rows, the image tensors)."""
    from copd_mega.models.multimodal import RowMedia
    from copd_mega.rl.batches import grpo_rows

    g = torch.Generator().manual_seed(3)
    tokens = torch.full((3, 40), PAD_ID, dtype=torch.long)
    tokens[0, :12] = torch.randint(10, 100, (12,), generator=g)
    tokens[1] = torch.randint(10, 100, (40,), generator=g)
    tokens[2, :12] = torch.randint(10, 100, (12,), generator=g)
    tokens[[0, 2], 1] = IMAGE_ID  # <bos>, <image>, text
    images = [torch.rand(3, 16, 16, generator=g) for _ in range(2)]
    media = RowMedia.from_lists([[images[0]], [], [images[1]]], 16)
    rows = grpo_rows(tokens, torch.tensor([6, 20, 5]), torch.tensor([12, 40, 12]),
                     torch.tensor([1.0, -0.5, 0.75]), media=media)  # fmt: skip
    return rows


def mixed_update(rank: int, overrides: list[str]) -> dict:
    """One GRPO update (the real objective) on :func:`mixed_rows` in one micro-batch; the image
    row's log-probs alone and inside the mixed micro-batch; the padded form's error."""
    from copd_mega.models.multimodal import MediaSpec
    from copd_mega.models.step import run_microbatches
    from copd_mega.models.vlm_inputs import batch_inputs
    from copd_mega.rl.batches import microbatches
    from copd_mega.rl.objective import make_loss_fn
    from copd_mega.rl.teacher_scores import score_sequences

    cfg, topo, bm = setup([*VLM, *overrides])
    bm.media_spec = MediaSpec(cfg, IMAGE_ID, PAD_ID)
    rows = mixed_rows()
    dev = torch.device("cpu")
    m = rows.media
    try:  # every row padded to the text row's width, as before
        batch_inputs(cfg, rows.tokens, m.pixels, m.tiles, m.per_row, IMAGE_ID)
        padded_error = ""
    except ValueError as e:
        padded_error = str(e)
    vocab = cfg.model.vocab_size
    alone = score_sequences(bm, topo, rows.tokens[:1, :12], 0, vocab, 1, 0, dev, m.rows(0, 1))
    mixed = score_sequences(bm, topo, rows.tokens, 0, vocab, 3, 0, dev, m, rows.lengths)
    mbs = microbatches(rows, 3, dev)
    out = run_microbatches(bm, topo, mbs, make_loss_fn(cfg, topo, []))
    vec = sum(o["metrics"] for o in out)
    grads = full_reduced_grads(bm, topo)
    return {"grads": grads, "meta": _meta(bm), "tp": topo.layout.tp, "tp_rank": topo.tp_rank,
            "loss": float(vec[0]), "units": float(vec[1]), "padded_error": padded_error,
            "alone": alone[0][0], "mixed": mixed[0][0], "width": mbs[0]["tokens"].shape[1]}  # fmt: skip
