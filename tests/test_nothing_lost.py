"""Nothing is lost and every error is one line: the ten bad-input cases a new user hits, each
rerun as written (resume and retention, atomic data writes, non-finite updates, LLaVA round trip,
synth defaults, reward workers)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from lost_cases import (
    TINY,
    TWO,
    copd,
    error_lines,
    fake_step,
    guard_case,
    judge_case,
    snapshot,
    torch_dist_dir,
    write_config,
)

from copd_mega.config import ConfigError, load_config
from multiproc import spawn

HANG = ("Let me compute. \\boxed{9^{9^{9^{9^{9}}}}}", "3", "math")


def _damaged_run(run, step_dirs=(1, 2)):
    """Committed checkpoints of a one-branch, one-rank run whose branch folders lost
    metadata.json (a partial copy): the weights themselves are intact."""
    for s in step_dirs:
        d = fake_step(run / "checkpoints", s, branches=("text",), world=1)
        (d / "branch_text" / "metadata.json").unlink()
    (run / "checkpoints" / "latest").write_text(f"step_{step_dirs[-1]:06d}\n")


# 1 ------------------------------------------------------------------------------------------


def test_case1_damaged_checkpoints_are_never_started_over_or_deleted(tmp_path):
    run = tmp_path / "run"
    _damaged_run(run)
    before = snapshot(run / "checkpoints")
    cfg = write_config(tmp_path / "c.yaml", [*TINY, f"run_dir={run}", "checkpoint.every=1"])
    for flag in ("--resume", "--resume=auto"):
        res = copd("train", "--config", str(cfg), flag)
        assert res.returncode == 1, res.stdout + res.stderr
        (line,) = error_lines(res.stderr)
        assert str(run / "checkpoints") in line and "metadata.json" in line, line
        assert "Traceback" not in res.stderr
        assert snapshot(run / "checkpoints") == before  # nothing deleted, nothing written


def test_case1_retention_keeps_damaged_and_newer_steps(tmp_path):
    from copd_mega.ckpt.checkpoint import _apply_retention

    for s in (1, 2, 3, 5, 8):
        fake_step(tmp_path, s)
    (tmp_path / "step_000002" / "branch_a" / "metadata.json").unlink()  # damaged copy
    fake_step(tmp_path, 4, complete=False)  # a save killed before it committed
    fake_step(tmp_path, 6, complete=False)  # newer than the step just written
    deleted = _apply_retention(tmp_path, tmp_path / "step_000005", keep_last=2)
    kept = sorted(p.name for p in tmp_path.glob("step_*"))
    assert kept == ["step_000002", "step_000003", "step_000005", "step_000006", "step_000008"]
    assert sorted(p.name for p in deleted) == ["step_000001", "step_000004"]
    # the step just written is incomplete: nothing at all is deleted
    (tmp_path / "step_000008" / "branch_b" / ".metadata").unlink()
    assert _apply_retention(tmp_path, tmp_path / "step_000008", keep_last=1) == []
    assert len(list(tmp_path.glob("step_*"))) == 5


# 2 ------------------------------------------------------------------------------------------


def test_case2_resume_without_checkpoint_is_one_error_naming_the_run(tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", [*TINY, TWO, f"run_dir={run}"])
    res = copd("train", "--config", str(cfg), "--resume", ranks=2)
    assert res.returncode != 0
    lines = error_lines(res.stdout + res.stderr)
    assert len(lines) == 1, res.stderr  # printed once for the two ranks
    assert str(run / "checkpoints") in lines[0] and "--resume=auto" in lines[0]
    assert "copd_mega/" not in res.stderr  # no frame of ours (torchrun prints its own)
    assert not (run / "eval.json").exists()


def test_case2_finished_run_is_left_untouched(tmp_path):
    from copd_mega.files.run_lock import LOCK_FILE

    run = tmp_path / "run"
    torch_dist_dir(run / "final" / "model")
    (run / "eval.json").write_text('{"merged": {"arith": 50.0}}')
    (run / LOCK_FILE).touch()  # the job's lock file (it writes its name there)
    before = {k: v for k, v in snapshot(run).items() if k != LOCK_FILE}
    cfg = write_config(tmp_path / "c.yaml", [*TINY, f"run_dir={run}"])
    for flags in (["--resume"], ["--resume=auto"], []):
        res = copd("train", "--config", str(cfg), *flags)
        assert res.returncode == 0, res.stderr
        assert "finished run" in res.stdout and "--retrain" in res.stdout
        assert {k: v for k, v in snapshot(run).items() if k != LOCK_FILE} == before


def test_case2_start_modes(tmp_path):
    """How a job starts, for each resume mode and what the run directory holds (files only)."""
    from copd_mega.ckpt.checkpoint import CheckpointError
    from copd_mega.trainer.job import start_mode

    def mode(resume: str, retrain: bool = False) -> str:
        cfg = load_config(None, [f"run_dir={tmp_path}", f"checkpoint.resume={resume}"])
        return start_mode(cfg, retrain)[0]

    assert [mode(m) for m in ("never", "auto")] == ["fresh", "fresh"]
    fake_step(tmp_path / "checkpoints", 3, complete=False, branches=("text",), world=1)
    assert [mode(m) for m in ("never", "auto")] == ["fresh", "fresh"]  # only a killed save
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        mode("required")
    fake_step(tmp_path / "checkpoints", 2, branches=("text",), world=1)
    assert [mode(m) for m in ("required", "auto")] == ["resume", "resume"]
    with pytest.raises(CheckpointError, match="--retrain"):
        mode("never")  # would start over a complete checkpoint
    assert mode("never", retrain=True) == "fresh"
    torch_dist_dir(tmp_path / "final" / "model")
    (tmp_path / "eval.json").write_text("{}")
    assert [mode(m) for m in ("never", "required", "auto")] == ["finished"] * 3
    assert mode("auto", retrain=True) == "fresh"


def test_configs_saved_with_a_boolean_resume_still_load(tmp_path):
    (tmp_path / "c.yaml").write_text("checkpoint: {resume: false}\n")
    assert load_config(tmp_path / "c.yaml").checkpoint.resume == "never"
    assert load_config(None, ["checkpoint.resume=true"]).checkpoint.resume == "required"


def test_case2_metrics_cut_back_to_the_resumed_step(tmp_path):
    from copd_mega.report.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, "a", True, 10, progress=False)
    for step in range(5):
        log.log(step, {"reward": float(step)})
    log._file.write('{"step": 5, "bra')  # a job killed mid-line
    log._file.flush()
    log.cut_back(3)
    log.log(3, {"reward": 30.0})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics" / "a.jsonl").read_text().split("\n")
            if line]  # fmt: skip
    assert [(r["step"], r["reward"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]


# 3 ------------------------------------------------------------------------------------------


def test_case3_pack_overwrite_keeps_old_shards_when_the_new_ones_fail(tmp_path):
    from copd_mega.data.cli import main
    from copd_mega.data.reader import ShardReader

    media, out = tmp_path / "media", tmp_path / "out"
    media.mkdir()
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": str(i),
                                        "reward_type": "exact"}) + "\n" for i in range(6)))  # fmt: skip
    args = ["--media", str(media), "--out", str(out), "--samples-per-shard", "4"]
    assert main(["pack", "--jsonl", str(good), *args]) == 0
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"prompt": "x", "answer": 1}\n')  # answer not a string
    assert main(["pack", "--jsonl", str(bad), *args, "--overwrite"]) == 1
    assert snapshot(out) == before
    samples = ShardReader(sorted(out.glob("train-*.tar")), 0, 1, seed=0, shuffle=False)
    assert [s["prompt"] for s in samples.next_batch(6)] == [f"p{i}" for i in range(6)]
    assert not list(out.glob(".*"))  # no temporary folder left behind


def test_case3_synth_overwrite_swaps_in_new_shards(tmp_path):
    from copd_mega.data.cli import main

    base = ["synth", "--capability", "arith", "--out", str(tmp_path), "--n-eval", "4"]
    assert main([*base, "--n-train", "12", "--samples-per-shard", "4"]) == 0
    assert len(list((tmp_path / "arith").glob("train-*.tar"))) == 3
    assert main([*base, "--n-train", "0"]) == 1  # refused before anything is written
    assert len(list((tmp_path / "arith").glob("train-*.tar"))) == 3
    assert main([*base, "--n-train", "5", "--samples-per-shard", "4", "--overwrite"]) == 0
    assert len(list((tmp_path / "arith").glob("train-*.tar"))) == 2  # the 3rd old shard removed


# 4 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,key",
    [("optim.adam_eps=0", "optim.adam_eps"), ("optim.lr=.nan", "optim.lr"),
     ("optim.lr=-1e-6", "optim.lr"), ("optim.adam_beta1=1.0", "optim.adam_beta1"),
     ("optim.adam_beta2=.inf", "optim.adam_beta2"), ("optim.clip_grad=-1", "optim.clip_grad"),
     ("branches.0.beta=.nan", "branches.0.beta"), ("branches.0.beta=-2", "branches.0.beta"),
     ("grpo.eps_high=.inf", "grpo.eps_high"), ("rewards.timeout_s=0", "rewards.timeout_s")],
)  # fmt: skip
def test_case4_non_finite_or_out_of_range_numbers_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.multiproc
def test_case4_update_that_makes_weights_non_finite_is_undone():
    """adam_eps=0 makes Adam's update 0/0 on weights without gradient: the step is undone on
    every rank (DP=2, the optimizer state sharded) exactly as on one rank, and the next step
    sees the restored optimizer state (it equals a first step from the start)."""
    two = spawn(guard_case, 2, ["parallel.dp=2"])
    (one,) = spawn(guard_case, 1, [])
    assert two[0]["group_size"] == 2
    for r in [*two, one]:
        assert r["guarded"]["skipped"] == 1.0 and r["guarded"]["restored"] == 1.0
        assert math.isfinite(r["guarded"]["grad_norm"])
        for k, v in r["before"].items():
            assert torch.equal(v, r["after_guard"][k]), k  # weights restored exactly
        assert r["next"]["skipped"] == 0.0
        assert all(torch.isfinite(v).all() for v in r["after_next"].values())
    moved = [k for k in one["before"] if not torch.equal(one["before"][k], one["after_next"][k])]
    assert moved
    for k in one["before"]:
        torch.testing.assert_close(two[0]["after_next"][k], one["after_next"][k])
        torch.testing.assert_close(two[1]["after_next"][k], one["after_next"][k])
    # Adam's first step moves every weight with a gradient by ~lr: the step count was restored
    emb = "embedding.word_embeddings.weight"
    step = (one["after_next"][emb] - one["before"][emb])[:50].abs()
    assert step.max().item() == pytest.approx(0.01, rel=1e-3)


@pytest.mark.multiproc
def test_case4_undone_update_restores_a_param_group_step_count():
    """megatron's fused Adam on GPU keeps ``step`` in the param groups: the guard restores it too,
    so the next step's bias correction is a first step's (every weight with a gradient moves by
    ~lr; with the step count left at 2 the move would be ~0.53 lr); at DP=2 as on one rank."""
    (one,) = spawn(guard_case, 1, [], True)
    two = spawn(guard_case, 2, ["parallel.dp=2"], True)
    for r in [one, *two]:
        assert r["guarded"]["restored"] == 1.0 and r["next"]["skipped"] == 0.0
        assert r["group_steps"] and set(r["group_steps"]) == {1}
        for k, v in r["before"].items():
            assert torch.equal(v, r["after_guard"][k]), k
    emb = "embedding.word_embeddings.weight"
    step = (one["after_next"][emb] - one["before"][emb])[:50].abs()
    assert step.max().item() == pytest.approx(0.01, rel=1e-3)
    for k in one["before"]:
        torch.testing.assert_close(two[0]["after_next"][k], one["after_next"][k])


# 5 ------------------------------------------------------------------------------------------


def test_case5_step_without_torch_metadata_is_skipped_for_the_previous(tmp_path, capsys):
    from copd_mega.ckpt.checkpoint import find_resume_step, incomplete_reason

    fake_step(tmp_path, 1)
    fake_step(tmp_path, 2)
    (tmp_path / "latest").write_text("step_000002\n")
    for lost, reason in [("branch_b/.metadata", "branch_b/.metadata is missing"),
                         ("branch_a/__0_0.distcp", "branch_a/__0_0.distcp is missing"),
                         ("branch_a/common.pt", "branch_a/common.pt is missing"),
                         ("trainer_state/rank_00001.pt", "trainer_state/rank_00001.pt")]:  # fmt: skip
        shutil.rmtree(tmp_path / "step_000002")
        fake_step(tmp_path, 2)
        (tmp_path / "step_000002" / lost).unlink()
        assert reason in incomplete_reason(tmp_path / "step_000002")
        assert find_resume_step(tmp_path).name == "step_000001"
        (line,) = capsys.readouterr().err.splitlines()  # one line, naming the file
        assert reason in line and "resuming from step_000001" in line


# 6 ------------------------------------------------------------------------------------------


def test_case6_checkpoint_and_data_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    import webdataset as wds

    from copd_mega.data.tokenizer import build_tokenizer, save_tokenizer

    cfg = write_config(tmp_path / "c.yaml", [*TINY, f"run_dir={tmp_path / 'run'}"])
    res = copd("eval", "--config", str(cfg), "--ckpt", str(tmp_path / "missing"))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    (line,) = error_lines(res.stderr)
    assert line.startswith("copd eval: error: ") and str(tmp_path / "missing") in line
    res = copd("--debug", "eval", "--config", str(cfg), "--ckpt", str(tmp_path / "missing"))
    assert res.returncode != 0 and "Traceback" in res.stderr and "CheckpointError" in res.stderr
    data = tmp_path / "data"
    for split in ("train", "eval"):  # every sample's .json is broken: the data is unusable
        (data / "arith").mkdir(parents=True, exist_ok=True)
        with wds.TarWriter(str(data / "arith" / f"{split}-000000.tar")) as w:
            for i in range(40):
                w.write({"__key__": f"{i:08d}", "json": b"{not json"})
    save_tokenizer(build_tokenizer(), data / "tokenizer.json")
    res = copd("train", "--config", str(cfg), f"data.dir={data}", "data.max_prompt_tokens=8")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    (line,) = error_lines(res.stderr)
    assert "bad samples in a row" in line and "arith" in line


# 7 ------------------------------------------------------------------------------------------


def test_case7_typo_in_branch_data_names_the_setting(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", [*TINY, f"run_dir={tmp_path / 'run'}"])
    res = copd("train", "--config", str(cfg), "branches.0.data=arth")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    (line,) = error_lines(res.stderr)
    assert "branches.0.data='arth'" in line and "arith" in line and "--capability" not in line


# 8 ------------------------------------------------------------------------------------------


@pytest.mark.multiproc
def test_case8_llava_without_tokenizer_round_trips_through_the_cli(tmp_path):
    from llava_cases import make_hf_llava
    from transformers import LlavaForConditionalGeneration

    hf = tmp_path / "hf"
    model = make_hf_llava(seed=1)
    model.config.image_token_index = 7
    model.save_pretrained(str(hf))  # no tokenizer.json
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    res = copd("import-hf", "--hf", str(hf), "--out", str(ckpt), "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    assert load_config(ckpt / "config.yaml").vision.image_token_index == 7
    res = copd("export-hf", "--ckpt", str(ckpt), "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((out / "config.json").read_text())["image_token_index"] == 7
    back = LlavaForConditionalGeneration.from_pretrained(str(out)).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, back[k]), k
    assert not list(tmp_path.glob(".*partial"))


# 9 ------------------------------------------------------------------------------------------


def test_case9_synth_needs_only_capability_and_out(tmp_path):
    res = copd("data", "synth", "--capability", "arith", "--out", str(tmp_path / "d"))
    assert res.returncode == 0, res.stderr
    assert list((tmp_path / "d" / "arith").glob("train-*.tar"))
    assert list((tmp_path / "d" / "arith").glob("eval-*.tar"))


# 10 -----------------------------------------------------------------------------------------


@pytest.mark.multiproc
def test_case10_a_batch_of_hanging_answers_costs_about_one_timeout():
    timeout = 3.0
    items = [HANG] * 4 + [("\\boxed{4}", "4", "math")]
    over = ["rewards.workers=5", f"rewards.timeout_s={timeout}"]
    ((rewards, counts, elapsed),) = spawn(judge_case, 1, over, items)
    assert rewards == [0.0] * 4 + [1.0]
    assert counts["timeout"] == 4 and counts["ok"] == 1
    assert elapsed < 2 * timeout, elapsed  # in a row they took 4 timeouts


def test_rewards_settings_are_validated():
    with pytest.raises(ConfigError, match="rewards.workers"):
        load_config(None, ["rewards.workers=0"])
