"""`copd data synth` / `pack` through `main(argv)`, read back with ShardReader."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from copd_mega.data.cli import main
from copd_mega.data.reader import ShardReader
from copd_mega.data.tokenizer import load_tokenizer


def _synth(out, capability: str, *extra: str) -> int:
    argv = [
        "synth",
        "--capability",
        capability,
        "--out",
        str(out),
        "--n-train",
        "12",
        "--n-eval",
        "4",
    ]
    return main([*argv, "--seed", "3", "--samples-per-shard", "5", *extra])


def test_synth_text_writes_shards_and_tokenizer(tmp_path):
    assert (
        _synth(tmp_path, "text", "--tokenizer", str(tmp_path / "tokenizer.json"), "--digits", "3")
        == 0
    )
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    for cap in ("arith", "reverse", "sort"):
        train = sorted((tmp_path / cap).glob("train-*.tar"))
        assert len(train) == 3 and len(list((tmp_path / cap).glob("eval-*.tar"))) == 1
        reader = ShardReader(train, 0, 2, seed=0)
        samples = reader.next_batch(6)
        assert reader.num_samples == 12 and {s["capability"] for s in samples} == {cap}
        assert all(tok.decode(tok.encode(s["prompt"]).ids) == s["prompt"] for s in samples)


@pytest.mark.parametrize("capability,check", [("image", "images"), ("video", "frames")])
def test_synth_media_reads_back(tmp_path, capability, check):
    assert _synth(tmp_path, capability, "--video-frames", "8") == 0
    paths = sorted((tmp_path / capability).glob("*.tar"))
    assert [p.name for p in paths] == [
        "eval-000000.tar",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    samples = ShardReader(paths, 1, 2, seed=1, num_frames=4, image_size=16).next_batch(8)
    if check == "images":
        assert all(len(s["images"]) == 1 and s["images"][0].shape == (3, 16, 16) for s in samples)
    else:
        assert all(
            s["frames"].shape == (4, 3, 16, 16) and s["reward_type"] == "exact" for s in samples
        )


def test_synth_refuses_to_mix_with_old_shards(tmp_path, capsys):
    assert _synth(tmp_path, "arith") == 0
    assert _synth(tmp_path, "arith") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert _synth(tmp_path, "arith", "--overwrite") == 0


def test_pack_and_argument_errors(tmp_path, capsys):
    media = tmp_path / "media"
    media.mkdir()
    Image.new("RGB", (8, 8)).save(media / "x.png")
    record = {"prompt": "p", "answer": "a", "reward_type": "exact", "images": "x.png"}
    (tmp_path / "d.jsonl").write_text(
        json.dumps(record) + "\n" + json.dumps({**record, "images": "y.png"}) + "\n"
    )
    argv = [
        "pack",
        "--jsonl",
        str(tmp_path / "d.jsonl"),
        "--media",
        str(media),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--samples-per-shard", "4"]) == 1
    assert "d.jsonl:2: images file" in capsys.readouterr().err
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    assert main([*argv, "--samples-per-shard", "4"]) == 0
    assert (
        ShardReader(sorted((tmp_path / "o").glob("*.tar")), 0, 1, seed=0).next_batch(1)[0]["id"]
        == "d-1"
    )
    assert main(["synth", "--capability", "poetry", "--out", str(tmp_path)]) == 2
    assert "copd data synth" in capsys.readouterr().err
