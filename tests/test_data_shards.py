"""Shard writer and JSONL packer: member layout, media, and errors that name line and file."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from copd_mega.data.media import encode_mp4
from copd_mega.data.reader import ShardReader
from copd_mega.data.shards import pack_jsonl, write_shards

BASE = {"prompt": "Q: how many?\nA:", "answer": "2", "reward_type": "exact", "capability": "image"}


def _members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_write_shards_layout(tmp_path):
    images = [np.zeros((8, 8, 3), np.uint8), Image.new("RGB", (8, 8), "red")]
    samples = [{**BASE, "id": f"x{i}", "images": images, "extra": {"level": i}} for i in range(5)]
    paths = write_shards(samples, tmp_path, "train", 2)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert _members(paths[0]) == [
        "00000000.0.png", "00000000.1.png", "00000000.json",
        "00000001.0.png", "00000001.1.png", "00000001.json",
    ]  # fmt: skip
    with tarfile.open(paths[2]) as tar:
        record = json.loads(tar.extractfile("00000004.json").read())
    assert record == {**BASE, "id": "x4", "extra": {"level": 4}}
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="overwrite"):
        write_shards(samples, tmp_path, "train", 2)
    assert len(write_shards(samples[:1], tmp_path, "train", 2, overwrite=True)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]


def test_write_shards_is_all_or_nothing(tmp_path):
    samples = [
        {**BASE, "id": "ok"},
        {**BASE, "id": "ok2"},
        {**BASE, "id": "bad", "reward_type": "fuzzy"},
    ]
    with pytest.raises(ValueError, match="reward_type 'fuzzy'"):
        write_shards(samples, tmp_path, "train", 1)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def media(tmp_path: Path) -> Path:
    folder = tmp_path / "media"
    folder.mkdir()
    Image.new("RGB", (12, 12), "blue").save(folder / "a.png")
    Image.new("RGB", (12, 12), "green").save(folder / "b.jpg")
    Image.new("RGB", (12, 12), "white").save(folder / "c.bmp")
    frames = [np.full((16, 16, 3), 40 * t, np.uint8) for t in range(6)]
    (folder / "clip.mp4").write_bytes(encode_mp4(frames))
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"f{t}.png")
    return folder


def _write_jsonl(path: Path, records: list[dict | str]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_pack_jsonl_round_trip(tmp_path, media):
    jsonl = _write_jsonl(
        tmp_path / "shapes.jsonl",
        [
            {**BASE, "images": ["a.png", "b.jpg", "c.bmp"]},
            "",
            {**BASE, "id": "clip", "video": "clip.mp4", "answer": "up", "reward_type": "choice"},
            {**BASE, "id": "seq", "video": [f"f{t}.png" for t in range(6)]},
        ],
    )
    paths = pack_jsonl(jsonl, media, tmp_path / "out", samples_per_shard=2)
    assert len(paths) == 2
    assert _members(paths[0])[:3] == ["00000000.0.png", "00000000.1.jpg", "00000000.2.png"]
    got = ShardReader(paths, 0, 1, seed=0, shuffle=False, num_frames=3, image_size=8).next_batch(3)
    assert [s["id"] for s in got] == ["shapes-1", "clip", "seq"]
    assert [tuple(t.shape) for t in got[0]["images"]] == [(3, 8, 8)] * 3
    assert got[0]["images"][0][2].mean() > 0.9  # blue channel of the blue image
    assert got[1]["frames"].shape == got[2]["frames"].shape == (3, 3, 8, 8)


@pytest.mark.parametrize(
    "record,error,match",
    [
        (
            {**BASE, "images": ["a.png", "nope.png"]},
            FileNotFoundError,
            r"bad.jsonl:2: images file .*nope.png not found",
        ),
        (
            {**BASE, "video": "gone.mp4"},
            FileNotFoundError,
            r"bad.jsonl:2: video file .*gone.mp4 not found",
        ),
        ({**BASE, "video": "a.png"}, ValueError, r"bad.jsonl:2: video .*a.png is not .mp4"),
        ({**BASE, "answer": 3}, ValueError, r"bad.jsonl:2: field 'answer' must be a string"),
        ('{"prompt": "x", ', ValueError, r"bad.jsonl:2: invalid JSON"),
    ],
)
def test_pack_jsonl_errors_name_line_and_file(tmp_path, media, record, error, match):
    jsonl = _write_jsonl(tmp_path / "bad.jsonl", [{**BASE, "images": "a.png"}, record])
    with pytest.raises(error, match=match):
        pack_jsonl(jsonl, media, tmp_path / "out", samples_per_shard=1)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_pack_jsonl_rejects_undecodable_image(tmp_path, media):
    (media / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    jsonl = _write_jsonl(tmp_path / "x.jsonl", [{**BASE, "images": "broken.png"}])
    with pytest.raises(ValueError, match=r"x.jsonl:1: image file .*broken.png cannot be decoded"):
        pack_jsonl(jsonl, media, tmp_path / "out", samples_per_shard=1)
