"""The faults users hit end in one line that names the path or setting and the fix: a run_dir
that is a file, a branch name that is not a plain name, YAML errors in `copd plan`, bad
`--gpu-memory-gb` / `--world-size`, undecodable or unreadable media, and Ctrl-C on a multi-rank
job (one line from rank 0, no traceback from any rank)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from lost_cases import TINY, TWO, copd, write_config
from progress import Stall, communicate_until_stalled

from copd_mega.config import ConfigError, load_config
from copd_mega.data.cli import main as data_main
from copd_mega.data.shards import BadSample, decode_sample
from copd_mega.launch.plan import main as plan_main
from copd_mega.launch.validate import validate_job


def _one_line(res: subprocess.CompletedProcess) -> str:
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == 1 and len(lines) == 1, res.stdout[-2000:] + res.stderr[-4000:]
    assert "Traceback" not in res.stderr
    return lines[0]


def test_run_dir_that_is_a_file_is_one_line_naming_it(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", [*TINY, TWO])
    (tmp_path / "afile").write_text("x")
    for run_dir in (tmp_path / "afile", tmp_path / "afile" / "run"):
        line = _one_line(copd("train", "--config", str(cfg), f"run_dir={run_dir}", ranks=0))
        assert f"run_dir={run_dir}" in line and "is a file, not a folder" in line, line
        assert "set run_dir to" in line
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("name", ["a/b", "..", ".", "", "a b", "-x", "../up"])
def test_branch_name_must_be_a_plain_name(name):
    branches = f"branches=[{{name: '{name}', data: arith}}, {{name: r, data: reverse}}]"
    with pytest.raises(ConfigError, match=r"branches\.0\.name=.*is not a plain name.*letters"):
        load_config(None, [*TINY, branches])


def test_plain_branch_names_still_load():
    branches = "branches=[{name: sort_up, data: arith}, {name: v2.down-1, data: reverse}]"
    assert load_config(None, [*TINY, branches]).branch_names == ["sort_up", "v2.down-1"]


def test_branch_name_with_a_slash_is_one_line_from_train(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", TINY)
    bad = "branches=[{name: a/b, data: arith}, {name: r, data: reverse}]"
    line = _one_line(copd("train", "--config", str(cfg), f"run_dir={tmp_path}/run", bad))
    assert "branches.0.name='a/b'" in line and "plain name" in line, line
    assert not (tmp_path / "run" / "metrics").exists()


def test_yaml_error_is_one_line_naming_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\nbranches: [{name: a, data: arith}\nseed: 1\n")
    assert plan_main(["--config", str(bad), "--world-size", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"copd plan: {bad}:3:"), err
    assert "not valid YAML" in err[0] and "fix the file" in err[0]
    line = _one_line(copd("train", "--config", str(bad)))
    assert f"{bad}:3:" in line and "not valid YAML" in line, line


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--world-size", "2", "--gpu-memory-gb", "-1"], "--gpu-memory-gb -1 must be"),
        (["--world-size", "2", "--gpu-memory-gb", "nan"], "--gpu-memory-gb nan must be"),
        (["--world-size", "2", "--gpu-memory-gb", "inf"], "--gpu-memory-gb inf must be"),
        (["--world-size", "2", "--gpu-memory-gb", "0"], "--gpu-memory-gb 0 must be"),
        (["--world-size", "-8"], "--world-size -8 must be >= 1"),
        (["--world-size", "0"], "--world-size 0 must be >= 1"),
    ],
)
def test_plan_rejects_bad_gpu_memory_and_world_size(args, needle, capsys):
    assert plan_main(["--config", "configs/tiny_cpu.yaml", *args]) == 1
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert "fits" not in out.out


def test_plan_still_checks_memory_when_given():
    assert plan_main(["--config", "configs/tiny_cpu.yaml", "--world-size", "2",
                      "--gpu-memory-gb", "80"]) == 0  # fmt: skip


@pytest.mark.parametrize("world", [-8, -2, 0])
def test_world_size_below_one_never_suggests_a_negative_branch_count(world):
    cfg = load_config("configs/tiny_cpu.yaml")
    with pytest.raises(ConfigError) as e:
        validate_job(cfg, world)
    assert f"world size {world} must be >= 1" in str(e.value)
    assert "configure -" not in str(e.value) and "configure 0" not in str(e.value)


def _pack(tmp_path: Path, record: dict, media: dict[str, bytes], capsys) -> tuple[int, str, Path]:
    (tmp_path / "media").mkdir()
    for name, data in media.items():
        (tmp_path / "media" / name).write_bytes(data)
    jsonl = tmp_path / "cap.jsonl"
    jsonl.write_text(json.dumps({"prompt": "p", "answer": "a", "reward_type": "exact", **record}))
    out = tmp_path / "new" / "shards"
    argv = ["pack", "--jsonl", str(jsonl), "--media", str(tmp_path / "media"), "--out", str(out)]
    code = data_main(argv)
    return code, capsys.readouterr().err, out


@pytest.mark.parametrize(
    "record, media, needle",
    [
        ({"images": "bad.png"}, {"bad.png": b"not an image"}, "image file"),
        ({"images": ["ok.png", "cut.png"]}, {"ok.png": b"", "cut.png": b""}, "image file"),
        ({"video": "bad.mp4"}, {"bad.mp4": b"not a video"}, "video file"),
    ],
)
def test_pack_error_names_the_file_and_leaves_no_empty_out(tmp_path, capsys, record, media, needle):
    from copd_mega.data.media import encode_png

    png = encode_png(__import__("numpy").zeros((8, 8, 3), dtype="uint8"))
    media = {n: (png if n == "ok.png" else png[: len(png) // 2] if n == "cut.png" else d)
             for n, d in media.items()}  # fmt: skip
    code, err, out = _pack(tmp_path, record, media, capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    bad = [n for n in media if n != "ok.png"][0]
    assert code == 1 and len(lines) == 1, err
    assert needle in lines[0] and str(tmp_path / "media" / bad) in lines[0], lines[0]
    assert "cap.jsonl:1" in lines[0] and "replace it with" in lines[0]
    assert "BytesIO" not in lines[0] and "0x" not in lines[0], lines[0]
    assert not (tmp_path / "new").exists()  # neither --out nor the parent it created


def test_unreadable_media_file_is_one_line_naming_it(tmp_path, capsys):
    """A media file that exists but cannot be read (here /proc/self/mem, which fails every read
    with EIO even for root) ends the pack in one line naming it; no --out is left."""
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "x.png").symlink_to("/proc/self/mem")
    jsonl = tmp_path / "cap.jsonl"
    jsonl.write_text(json.dumps({"prompt": "p", "answer": "a", "reward_type": "exact",
                                 "images": "x.png"}))  # fmt: skip
    out = tmp_path / "out"
    argv = ["pack", "--jsonl", str(jsonl), "--media", str(tmp_path / "media"), "--out", str(out)]
    assert data_main(argv) == 1
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and str(tmp_path / "media" / "x.png") in lines[0], lines
    assert "cannot be read" in lines[0] and not out.exists()


def test_pack_error_keeps_an_existing_out_folder(tmp_path, capsys):
    (tmp_path / "new" / "shards").mkdir(parents=True)
    code, _, out = _pack(tmp_path, {"images": "bad.png"}, {"bad.png": b"x"}, capsys)
    assert code == 1 and out.is_dir() and not list(out.iterdir())


def test_undecodable_shard_member_is_named_without_an_object_repr():
    record = {"id": "x", "capability": "c", "prompt": "p", "answer": "a", "reward_type": "exact"}
    members = {"json": json.dumps(record).encode()}
    for suffix, reason in (("0.png", "image"), ("mp4", "video")):
        with pytest.raises(BadSample) as e:
            decode_sample({**members, suffix: b"garbage"}, 4, 8)
        assert e.value.reason == reason and f".{suffix}" in str(e.value), str(e.value)
        assert "BytesIO" not in str(e.value) and "0x" not in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- Ctrl-C


def _default_sigint() -> None:
    """SIGINT as a terminal's job has it: a test suite started in the background by a
    non-interactive shell inherits it ignored, and a Ctrl-C would then reach no rank."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _launch_ranks(cfg: Path, world: int, log) -> list[subprocess.Popen]:
    """``copd train`` on ``world`` ranks as srun starts them (one process per rank, RANK/
    WORLD_SIZE set), all in one new process group, as a terminal's Ctrl-C reaches them."""
    from copd_mega.parallel.dist import free_port

    env = {**os.environ, "WANDB_MODE": "disabled", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}  # fmt: skip
    procs: list[subprocess.Popen] = []
    for rank in range(world):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "copd_mega.cli", "train", "--config", str(cfg)],
            stdout=log, stderr=subprocess.STDOUT, env={**env, "RANK": str(rank),
            "LOCAL_RANK": str(rank)}, process_group=procs[0].pid if procs else 0,
            preexec_fn=_default_sigint,
        ))  # fmt: skip
    return procs


def _wait_for_steps(procs: list[subprocess.Popen], metrics: Path, steps: int) -> None:
    """Wait until the job has logged ``steps`` steps; fail if a rank exits first or the ranks
    use no CPU for 300 s (progress, not a fixed time)."""
    stall = Stall(lambda: [p.pid for p in procs], 300, "the job")
    while not (metrics.exists() and metrics.read_text().count("\n") >= steps):
        assert all(p.poll() is None for p in procs), "a rank exited before training started"
        stall.check()
        time.sleep(0.5)


@pytest.mark.multiproc
def test_ctrl_c_on_a_two_rank_job_prints_one_line_once(tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", [*TINY, TWO, "schedule.rl_steps=100000",
                                             f"run_dir={run}"])  # fmt: skip
    with tempfile.TemporaryFile("w+") as log:
        procs = _launch_ranks(cfg, 2, log)
        try:
            _wait_for_steps(procs, run / "metrics" / "arith.jsonl", 2)
            os.killpg(procs[0].pid, signal.SIGINT)
            for p in procs:
                communicate_until_stalled(p, 300)
            codes = [p.returncode for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        log.seek(0)
        text = log.read()
    assert codes == [130, 130], text[-4000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-4000:]
    lines = [x for x in text.splitlines() if "interrupted" in x]
    assert lines == ["copd train: interrupted (Ctrl-C); saved checkpoints are kept: continue "
                     "with --resume=auto"], text[-4000:]  # fmt: skip
