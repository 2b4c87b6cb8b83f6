"""One job per run directory: the second job on a run directory stops at once in one line,
naming the holder, and the first runs exactly as it would alone; a killed holder's lock is
released by the kernel."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from lost_cases import TINY, TWO, _env, copd, error_lines, write_config

from copd_mega.files.run_lock import LOCK_FILE, RunDirBusy, RunDirError, held, lock_dir

TIME_KEYS = ("time", "tokens_per_s")  # wall-clock fields of a metrics row


def _holder(run: Path) -> dict:
    try:
        return json.loads((run / LOCK_FILE).read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return {}


def _wait_for_holder(run: Path, proc: subprocess.Popen) -> dict:
    """Wait until ``proc`` holds ``run``'s lock (progress, not a fixed timeout)."""
    while _holder(run).get("pid") != proc.pid:
        assert proc.poll() is None, f"the first job ended before it took the lock: {proc.poll()}"
        time.sleep(0.1)
    return _holder(run)


def _hold(run: Path) -> subprocess.Popen:
    """Another process that takes ``run``'s lock and keeps it (returns once it holds it)."""
    code = (f"from copd_mega.files.run_lock import lock_dir; lock_dir({str(run)!r}); "
            "print('held', flush=True); import time; time.sleep(600)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_lock_names_the_holder_and_a_killed_holders_lock_is_released(tmp_path):
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        with pytest.raises(RunDirBusy) as busy:
            lock_dir(run)
        text = str(busy.value)
        assert "\n" not in text and str(run) in text and f"pid {holder.pid}" in text
        assert f"host {os.uname().nodename}" in text and "started 20" in text
        assert not held(run)
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel releases the lock
        holder.wait()
    assert lock_dir(run) == run and held(run)
    assert lock_dir(run) == run  # again in the same process: a no-op
    assert _holder(run)["pid"] == os.getpid()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is not a directory"):
        lock_dir(tmp_path / "file")


def test_data_pack_into_a_locked_run_stops(tmp_path):
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        (tmp_path / "s.jsonl").write_text('{"prompt": "1+1", "answer": "2", "capability": "x"}\n')
        res = copd("data", "pack", "--jsonl", str(tmp_path / "s.jsonl"), "--media",
                   str(tmp_path), "--out", str(run / "data"))  # fmt: skip
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        (line,) = error_lines(res.stderr)
        assert f"pid {holder.pid}" in line and str(run) in line
        assert not list((run / "data").glob("*.tar"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def _files(root: Path) -> dict[str, object]:
    """What a checkpoint holds, comparable across runs: per branch folder every model tensor and
    every non-tensor object (optimizer hyper-parameters, bucket sizes, branch state); the other
    files as bytes but those naming the run directory or the save time; the trainer state
    without the process-global Python, numpy and torch CPU generator states.

    Not compared, because two lone runs differ there too: the ``.distcp`` bytes and the
    distributed optimizer's bucket tensors (megatron leaves their padding uninitialised), and
    those three generator states (the CUDA stand-in and megatron's tensor-parallel generators
    are compared), and the trainer state's ``clock`` (measured step and save times)."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if not p.is_file() or p.name in ("config.yaml", "complete.json", ".metadata"):
            continue
        if p.suffix == ".distcp":
            out[rel] = _branch_contents(p.parent)
        elif p.parent.name == "trainer_state":
            rec = torch.load(p, weights_only=False)
            rec.pop("clock", None)  # measured step and save seconds: wall-clock, never equal
            (rec.get("trainer_state") or {}).pop("clock", None)
            rng = {k: v for k, v in rec.pop("rng").items() if k not in ("python", "numpy", "torch")}
            out[rel] = _plain((rec, rng))
        else:
            out[rel] = p.read_bytes()
    return out


def _branch_contents(path: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from copd_mega.ckpt.offline import CheckpointReader

    reader = CheckpointReader(path)
    out = {k: _plain(v) for k, v in reader.read(dict.fromkeys(reader.specs)).items()}
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    objs = {k: io.BytesIO() for k, v in meta.items() if isinstance(v, BytesStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(objs, checkpoint_id=str(path), no_dist=True)
    out.update({k: _plain(v) for k, v in objs.items()})
    return out


def _plain(x):
    if isinstance(x, io.BytesIO):
        return _plain(torch.load(io.BytesIO(x.getvalue()), weights_only=False))
    if torch.is_tensor(x):
        return (str(x.dtype), tuple(x.shape), x.flatten().view(torch.uint8).tolist())
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / "metrics" / "text.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIME_KEYS)} for r in rows]


@pytest.mark.multiproc
def test_second_train_on_a_run_dir_stops_in_one_line_and_the_first_runs_as_alone(tmp_path):
    data = tmp_path / "data"  # one data folder: the runs differ only in run_dir
    res = copd("data", "synth", "--capability", "arith", "--out", str(data), "--n-train", "64",
               "--n-eval", "4", "--tokenizer", str(data / "tokenizer.json"))  # fmt: skip
    assert res.returncode == 0, res.stderr
    over = [
        *TINY,
        f"data.dir={data}",
        "data.max_prompt_tokens=40",
        "checkpoint.every=1",
        "checkpoint.keep_last=0",
    ]
    cfg = write_config(tmp_path / "c.yaml", over)
    lone, shared = tmp_path / "lone", tmp_path / "shared"
    res = copd("train", "--config", str(cfg), f"run_dir={lone}")
    assert res.returncode == 0, res.stderr[-3000:]
    first = subprocess.Popen(
        [sys.executable, "-m", "copd_mega.cli", "train", "--config", str(cfg), f"run_dir={shared}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
    )  # fmt: skip
    try:
        holder = _wait_for_holder(shared, first)
        first.send_signal(signal.SIGSTOP)  # keep it mid-job, however slow the machine is
        second = copd("train", "--config", str(cfg), f"run_dir={shared}", "--resume=auto")
        two_ranks = write_config(tmp_path / "two.yaml", [*over, TWO])
        third = copd("train", "--config", str(two_ranks), f"run_dir={shared}", ranks=2)
    finally:
        first.send_signal(signal.SIGCONT)
    out, _ = first.communicate(timeout=900)
    assert first.returncode == 0, out[-3000:]
    for res in (second, third):
        assert res.returncode != 0
        (line,) = error_lines(res.stdout + res.stderr)  # once, also for the 2-rank job
        assert "in use by another job" in line and f"pid {holder['pid']}" in line, line
        assert str(shared) in line and "starting fresh" not in res.stdout
        assert "copd_mega/" not in res.stderr  # no traceback of ours
    assert _rows(shared) == _rows(lone)
    assert _files(shared / "checkpoints") == _files(lone / "checkpoints")
    steps = sorted(p.name for p in (shared / "checkpoints").iterdir())
    assert steps == sorted(p.name for p in (lone / "checkpoints").iterdir())
    assert "step_000002" in steps and not any(".replaced" in s for s in steps)
