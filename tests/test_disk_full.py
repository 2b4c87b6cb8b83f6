"""A full disk at checkpoint save, HF export and data pack: one line naming the path and the
fix, and nothing lost (``latest`` and the previous step kept, no partial output left).

The disks are real: small ``tmpfs`` filesystems mounted for the test, which needs root (or the
capability to mount); elsewhere the tests skip and say why."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from lost_cases import TINY, copd, error_lines, write_config

from copd_mega.ckpt.checkpoint import incomplete_reason, read_latest

SAVED = [*TINY, "schedule.rl_steps=3", "checkpoint.every=1", "checkpoint.keep_last=0"]


@contextlib.contextmanager
def small_disk(path: Path, kib: int):
    """A tmpfs of ``kib`` KiB mounted at ``path`` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _kib(folder: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4 for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def data_and_step(tmp_path_factory) -> tuple[Path, Path, Path, int]:
    """Shards and a config on the ordinary disk, a run stopped after its first step, and the
    KiB that step checkpoint takes (measured, so the small disks fit one step)."""
    tmp = tmp_path_factory.mktemp("full")
    data = tmp / "data"
    res = copd("data", "synth", "--capability", "arith", "--out", str(data), "--n-train", "64",
               "--n-eval", "4", "--tokenizer", str(data / "tokenizer.json"))  # fmt: skip
    assert res.returncode == 0, res.stderr
    run = tmp / "run"
    cfg = write_config(tmp / "c.yaml", [*SAVED, f"run_dir={run}", f"data.dir={data}",
                                        "data.max_prompt_tokens=40"])  # fmt: skip
    res = copd("train", "--config", str(cfg), "schedule.stop_after=1")
    assert res.returncode == 0, res.stderr[-3000:]
    return data, cfg, run, _kib(run / "checkpoints" / "step_000000")


def test_disk_full_at_a_checkpoint_save_is_one_line_and_keeps_latest(data_and_step, tmp_path):
    data, cfg, _, step_kib = data_and_step
    with small_disk(tmp_path / "disk", step_kib * 3 // 2) as disk:  # room for one step only
        run = disk / "run"
        res = copd("train", "--config", str(cfg), f"run_dir={run}")
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
        (line,) = error_lines(res.stderr)
        root = run / "checkpoints"
        assert "no space left" in line and str(root / "step_000001") in line, line
        assert f"{root / 'latest'} still names step_000000" in line and str(disk) in line
        assert (
            read_latest(root) == "step_000000" and incomplete_reason(root / "step_000000") is None
        )
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000000"]


def test_disk_full_at_export_is_one_line_and_leaves_nothing(data_and_step, tmp_path):
    run = data_and_step[2]
    with small_disk(tmp_path / "disk", 64) as disk:
        out = disk / "hf"
        res = copd("export-hf", "--ckpt", str(run / "checkpoints" / "latest"), "--out", str(out),
                   "--no-progress")  # fmt: skip
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
        (line,) = error_lines(res.stderr)
        assert "no space left" in line and str(out) in line and str(disk) in line, line
        assert sorted(p.name for p in disk.iterdir()) == []


def test_disk_full_at_data_pack_is_one_line_and_keeps_the_old_shards(tmp_path):
    jsonl = tmp_path / "s.jsonl"
    row = {"prompt": "x" * 2000, "answer": "y", "reward_type": "exact"}
    jsonl.write_text(json.dumps(row) + "\n")
    with small_disk(tmp_path / "disk", 256) as disk:
        out = disk / "shards"
        res = copd("data", "pack", "--jsonl", str(jsonl), "--media", str(tmp_path), "--out",
                   str(out))  # fmt: skip
        assert res.returncode == 0, res.stderr
        old = (out / "train-000000.tar").read_bytes()
        jsonl.write_text((json.dumps(row) + "\n") * 400)  # ~1 MB: does not fit
        res = copd("data", "pack", "--jsonl", str(jsonl), "--media", str(tmp_path), "--out",
                   str(out), "--overwrite", "--samples-per-shard", "50")  # fmt: skip
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
        (line,) = error_lines(res.stderr)
        assert "no space left" in line and str(out) in line, line
        assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar"]
        assert (out / "train-000000.tar").read_bytes() == old
    shutil.rmtree(tmp_path / "disk", ignore_errors=True)


def test_disk_full_is_recognised_in_every_form_it_takes(tmp_path):
    import errno

    import torch
    from torch.distributed.checkpoint.api import CheckpointException

    from copd_mega.files.disk_full import disk_full

    full = OSError(errno.ENOSPC, "No space left on device")
    assert disk_full(full, tmp_path) and disk_full(OSError(errno.EDQUOT, "quota"), tmp_path)
    wrapped = CheckpointException("save", {0: (full, None)})  # what dcp raises, per rank
    assert disk_full(wrapped, tmp_path)
    text = "Error while serializing: IoError(Os { code: 28, kind: StorageFull })"  # safetensors
    assert disk_full(Exception(text), tmp_path)
    try:
        raise RuntimeError("boom") from OSError(errno.EIO, "I/O error")
    except RuntimeError as e:
        assert not disk_full(e, tmp_path)
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert not disk_full(short, tmp_path)  # a short write with room left is no full disk
    with small_disk(tmp_path / "disk", 64) as disk:
        with pytest.raises(BaseException) as caught:  # torch's zip writer on a full disk
            torch.save(torch.zeros(64 * 1024), disk / "t.pt")
        assert disk_full(caught.value, disk / "t.pt"), repr(caught.value)


def test_disk_full_when_a_step_is_saved_again_puts_the_old_copy_back(data_and_step, tmp_path):
    from lost_cases import snapshot

    data, cfg, _, step_kib = data_and_step
    with small_disk(tmp_path / "disk", step_kib * 3 // 2) as disk:  # room for one step only
        run = disk / "run"
        res = copd("train", "--config", str(cfg), f"run_dir={run}", "schedule.stop_after=1")
        assert res.returncode == 0, res.stderr[-3000:]
        before = snapshot(run / "checkpoints")
        res = copd("train", "--config", str(cfg), f"run_dir={run}", "--retrain")
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
        (line,) = error_lines(res.stderr)
        assert "no space left" in line and "still names step_000000" in line, line
        assert snapshot(run / "checkpoints") == before  # set aside during the save, put back
