"""Image and video branches: media that travel with the rows, teacher scores over the exchange
on the same pixels, video frames sampled once, a 3-branch multimodal CoPD job end to end."""

from __future__ import annotations

import json

import pytest
import torch
from copd_cases import run_mode
from mm_cases import TINY_MM, mm_exchange

from multiproc import spawn


def test_row_media_pack_and_slices():
    from copd_mega.models.multimodal import RowMedia

    img, vid = torch.rand(3, 8, 8), torch.rand(4, 3, 8, 8)
    media = RowMedia.from_lists([[img], [], [vid], [img, vid]], 8)
    assert media.pixels.shape == (10, 3, 8, 8) and media.per_row.tolist() == [1, 0, 1, 2]
    back = RowMedia.unpack(*media.pack(), 4)
    assert all(torch.equal(getattr(back, k), getattr(media, k)) for k in ("pixels", "tiles"))
    rows = back.rows(2, 4).to_lists()
    assert torch.equal(rows[0][0], vid) and torch.equal(rows[1][0][0], img)
    cat = RowMedia.cat([media.rows(0, 2), media.rows(2, 4)])
    assert torch.equal(cat.pixels, media.pixels) and torch.equal(cat.per_row, media.per_row)


def test_video_frames_sampled_once_identical_in_rollout_and_training(tmp_path):
    """The reader samples ``frame_indices`` once per video; the same tensors reach the
    training microbatch (CLIP-normalised there) after a pack/unpack as in the exchange."""
    from copd_mega.config import load_config
    from copd_mega.data.media import frame_indices
    from copd_mega.data.reader import ShardReader
    from copd_mega.launch.datasets import PromptCodec, make_reader, prepare_data, shard_paths
    from copd_mega.models.multimodal import MediaSpec, RowMedia, prompts_and_media
    from copd_mega.models.vlm_inputs import normalize_images
    from copd_mega.rl.batches import sequence_microbatches

    cfg = load_config(None, [*TINY_MM, f"run_dir={tmp_path}"])
    codec = PromptCodec(prepare_data(cfg))
    samples = make_reader(cfg, "video", "train", 0, 1).next_batch(3)
    every = ShardReader(shard_paths(cfg, "video", "train"), 0, 1, seed=cfg.data.seed,
                        image_size=cfg.vision.image_size).next_batch(3)  # fmt: skip
    for s, full in zip(samples, every, strict=True):
        assert s["frames"].shape == (4, 3, 32, 32)
        assert torch.equal(s["frames"], full["frames"][frame_indices(len(full["frames"]), 4)])
    prompts, media = prompts_and_media(codec, samples, 2, vision=True)
    assert all(p.count(codec.image) == 1 and p[1] == codec.image for p in prompts)
    rows = RowMedia.unpack(*RowMedia.from_lists(media, 32).pack(), len(prompts))
    width = max(len(p) for p in prompts)
    tokens = torch.tensor([p + [codec.pad] * (width - len(p)) for p in prompts])
    spec = MediaSpec(cfg, codec.image, codec.pad)
    mbs = sequence_microbatches(tokens, 4, torch.device("cpu"), rows)
    fed = [spec.inputs(mb["tokens"], mb["media"]) for mb in mbs]
    want = torch.cat([normalize_images(s["frames"]) for s in samples for _ in range(2)])
    assert torch.equal(torch.cat([b.images for b in fed]), want)
    assert [int(t) for b in fed for t in b.num_image_tiles] == [4] * 6


@pytest.mark.multiproc
def test_image_and_video_scores_over_the_exchange(tmp_path):
    res = spawn(mm_exchange, 3, [*TINY_MM, f"run_dir={tmp_path}"])
    by = {r["branch"]: r for r in res}
    for student, teacher in (("image", "text"), ("video", "text"), ("text", "image"),
                             ("text", "video")):  # fmt: skip
        tokens, media = by[student]["sent"][teacher]
        got_tokens, got_media = by[teacher]["incoming"][student]
        assert torch.equal(got_tokens, tokens.cpu())
        assert torch.equal(got_media.pixels, media.pixels)  # the very same pixels
        assert torch.equal(got_media.tiles, media.tiles)
        logp, topk = by[student]["received"][teacher]
        t_logp, t_topk = by[teacher]["local"][student]
        assert (logp - t_logp).abs().max() <= 1e-6 and torch.equal(topk, t_topk)
        if student == "text":  # on image/video prompts the pixels change the teacher's scores
            blank = by[teacher]["blank"][student][0]
            assert (blank - t_logp).abs().max() > 1e-4
    # the hub samples on the spokes' prompts (with media); spokes on text prompts (none)
    assert by["text"]["sent"]["image"][1].tiles.tolist() == [1, 1]
    assert by["text"]["sent"]["video"][1].tiles.tolist() == [4, 4]
    assert by["image"]["sent"]["text"][1].per_row.tolist() == [0, 0]
    assert by["text"]["incoming"]["image"][1].pixels.numel() == 0  # text rows: zero images


@pytest.mark.multiproc
def test_three_branch_multimodal_job_end_to_end(tmp_path):
    table = spawn(run_mode, 3, [*TINY_MM, f"run_dir={tmp_path}"])[0]
    assert set(table) == {"base", "branch text", "branch image", "branch video", "merged"}
    assert all(set(row) == {"arith", "image", "video"} for row in table.values())
    assert (tmp_path / "final" / "model" / "config.yaml").exists()
    rows = [json.loads(line) for p in (tmp_path / "metrics").glob("*.jsonl")
            for line in p.read_text().splitlines()]  # fmt: skip
    opd = [r for r in rows if r["phase"] == "opd"]
    keys = {k for r in opd for k in r if k.endswith("/overlap")}
    assert keys == {
        f"edge/{s}<-{t}/overlap"
        for s, t in (("text", "image"), ("text", "video"), ("image", "text"), ("video", "text"))
    }
    assert all(r["skipped_step"] == 0 for r in rows if "skipped_step" in r)
