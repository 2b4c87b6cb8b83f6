"""ShardReader: seeded order, DP split, exact resume, bad-input policy (real tar files in tmp_path)."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from copd_mega.data.reader import DataError, ShardReader
from copd_mega.data.shards import write_shards


def _record(i: int) -> dict:
    return {
        "id": f"s{i}",
        "prompt": f"Q: {i}+1=?\nA:",
        "answer": str(i + 1),
        "reward_type": "math",
        "capability": "arith",
    }


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    """5 shards of 7 text samples (35 in all, so DP spans are uneven)."""
    return write_shards((_record(i) for i in range(35)), tmp_path / "text", "train", 7)


def _ids(reader: ShardReader, n: int, batch: int = 4) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        out += [s["id"] for s in reader.next_batch(min(batch, n - len(out)))]
    return out


def test_same_seed_same_order_and_epochs_are_permutations(shards):
    a = _ids(ShardReader(shards, 0, 1, seed=7), 105)
    b = _ids(ShardReader(list(reversed(shards)), 0, 1, seed=7), 105)
    assert a == b
    assert _ids(ShardReader(shards, 0, 1, seed=7, index_cache_shards=0), 105) == a  # re-indexing
    everything = {f"s{i}" for i in range(35)}
    epochs = [a[i : i + 35] for i in range(0, 105, 35)]
    assert all(sorted(e) == sorted(everything) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert _ids(ShardReader(shards, 0, 1, seed=8), 35) != epochs[0]
    assert _ids(ShardReader(shards, 0, 1, seed=7, shuffle=False), 35) == [
        f"s{i}" for i in range(35)
    ]


@pytest.mark.parametrize("dp_size,window", [(2, 1), (3, 4), (4, 2)])
def test_dp_ranks_disjoint_and_cover_epoch(shards, dp_size, window):
    for epoch in range(2):
        seen = []
        for rank in range(dp_size):
            reader = ShardReader(shards, rank, dp_size, seed=3, shuffle_window=window)
            n = reader.samples_per_epoch
            ids = _ids(reader, n * (epoch + 1))[n * epoch :]
            seen.append(set(ids))
            assert len(ids) == len(set(ids))
        assert sum(len(s) for s in seen) == 35
        assert set().union(*seen) == {f"s{i}" for i in range(35)}


@pytest.mark.parametrize(
    "dp_rank,dp_size,consumed", [(0, 1, 10), (0, 1, 35), (0, 1, 33), (1, 2, 17), (1, 2, 40)]
)
def test_resume_matches_uninterrupted_stream(shards, dp_rank, dp_size, consumed):
    kwargs = dict(dp_rank=dp_rank, dp_size=dp_size, seed=11, shuffle_window=2)
    reference = _ids(ShardReader(shards, **kwargs), consumed + 50, batch=5)
    first = ShardReader(shards, **kwargs)
    head = _ids(first, consumed, batch=5)
    state = first.state_dict()
    assert 0 <= state["position"] < first.samples_per_epoch  # never an exhausted epoch
    resumed = ShardReader(shards, **kwargs)
    resumed.load_state_dict(state)
    tail = _ids(resumed, 50, batch=5)  # batches of 5 cross the epoch boundary
    assert head + tail == reference


def test_state_at_epoch_boundary_points_to_next_epoch(shards):
    reader = ShardReader(shards, 0, 1, seed=0)
    reader.next_batch(35)
    assert (reader.state_dict()["epoch"], reader.state_dict()["position"]) == (1, 0)
    assert len(reader.next_batch(3)) == 3


def test_cursor_for_other_layout_is_rejected(shards):
    state = ShardReader(shards, 0, 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="dp_size=2"):
        ShardReader(shards, 0, 4, seed=0).load_state_dict(state)


def test_missing_shard_errors_at_construction(shards, tmp_path):
    missing = tmp_path / "nowhere" / "train-000009.tar"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ShardReader([*shards, missing], 0, 1, seed=0)
    with pytest.raises(ValueError, match="no shard paths"):
        ShardReader([], 0, 1, seed=0)
    with pytest.raises(ValueError, match="dp_size=64"):
        ShardReader(shards, 0, 64, seed=0)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_raw(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)


def _json(i: int) -> bytes:
    import json

    return json.dumps(_record(i)).encode()


def _corrupt_header(path: Path, member: str) -> None:
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset
    raw = bytearray(path.read_bytes())
    raw[offset + 148 : offset + 156] = b"garbage!"  # the header checksum field
    path.write_bytes(bytes(raw))


def test_bad_samples_are_skipped_logged_and_counted(tmp_path, caplog):
    samples = [{"__key__": f"{i:04d}", "json": _json(i), "0.png": _png(i)} for i in range(12)]
    samples[5]["json"] = b"{not json"  # corrupt member content
    samples[7]["0.png"] = b"\x89PNG\r\n\x1a\n but not an image"  # undecodable image
    del samples[9]["json"]  # no .json member
    path = tmp_path / "bad-000000.tar"
    _write_raw(path, samples)
    # corrupt tar header: the lost range, and the samples on both sides of it, become unusable
    _corrupt_header(path, "0002.json")
    with caplog.at_level(logging.WARNING, logger="copd_mega.data"):
        reader = ShardReader([path], 0, 1, seed=0, shuffle=False, name="math dp0")
        got = [s["id"] for s in reader.next_batch(6)]
    assert got == ["s0", "s1", "s4", "s6", "s8", "s10"]
    assert reader.stats == {
        "samples": 6, "bad": 6, "bad_tar": 3, "bad_json": 2, "bad_image": 1, "bad_video": 0,
    }  # fmt: skip
    assert all(s["images"][0].shape == (3, 8, 8) for s in reader.next_batch(2))
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert str(path) in messages and "key 0007" in messages and "math dp0" in messages


def test_consecutive_bad_samples_raise_naming_the_shard(tmp_path, shards):
    path = tmp_path / "broken-000000.tar"
    _write_raw(
        path, [{"__key__": f"{i:04d}", "json": _json(i), "0.png": b"junk"} for i in range(20)]
    )
    reader = ShardReader([*shards, path], 0, 1, seed=0, shuffle=False, max_consecutive_bad=5)
    with pytest.raises(DataError, match=f"5 bad samples in a row.*{path}.*byte offset"):
        reader.next_batch(40)
    assert reader.stats["bad_image"] == 5
    with pytest.raises(DataError, match=str(path)):
        ShardReader([path], 0, 1, seed=0).next_batch(1)  # default limit 16 < 20 bad


def test_truncated_shard_keeps_its_intact_samples(tmp_path):
    path = tmp_path / "cut-000000.tar"
    _write_raw(
        path, [{"__key__": f"{i:04d}", "json": _json(i), "0.png": _png(i)} for i in range(6)]
    )
    with tarfile.open(path) as tar:
        cut = tar.getmember("0004.json").offset_data + 3
    path.write_bytes(path.read_bytes()[:cut])
    reader = ShardReader([path], 0, 1, seed=0, shuffle=False)
    assert [s["id"] for s in reader.next_batch(5)] == ["s0", "s1", "s2", "s3", "s0"]
    assert reader.stats["bad_tar"] == 1
