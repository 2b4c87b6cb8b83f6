"""slurm/copd_8branch.sh as written: its dry run equals ``copd plan`` with the memory plan;
submitted to a local Slurm with a CPU override (2 branches x TP2 x PP2 = 8 ranks, tiny text
model, gloo) it prints the layout first, trains both branches at that shape through PP2
generation and writes the merged model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from progress import run_until_stalled
from slurm_local import local_slurm_fixture

from copd_mega.launch.plan import main as plan_main
from copd_mega.parallel.dist import free_port

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "copd_8branch.sh"
CONFIG = "configs/copd_8branch.yaml"
NAMES = ["text", "image"]
CAPS = ["arith", "reverse"]
# The 8-branch config cut to its text hub and first spoke, a tiny text model on built-in data,
# at a real branch shape: 2 branches x TP2 x PP2 = 8 gloo processes on any machine. Branch
# names (and the text hub) are the config's own.
CPU_OVERRIDES = [
    "branches=[" + ", ".join(f"{{name: {n}, data: {c}}}" for n, c in zip(NAMES, CAPS, strict=True))
    + "]",
    "vision.enabled=false", "data.dir=", "data.max_prompt_tokens=0",
    "parallel.tp=2", "parallel.pp=2", "parallel.dp=1", "parallel.micro_batch_size=4",
    "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=128",
    "model.pad_vocab_to=8", "model.max_seq_length=48",
    "data.n_train=64", "data.n_eval=8", "rollout.prompts_per_step=2", "rollout.max_new_tokens=4",
    "rollout.max_batch_size=3", "grpo.group_size=2", "opd.prompts_per_peer=2",
    "opd.samples_per_prompt=1", "schedule.cycles=1", "schedule.rl_steps=1",
    "schedule.opd_steps=1", "checkpoint.every=0", "logging.wandb=disabled",
    "checkpoint.init_from_hf=", "checkpoint.random_init=true",  # the tiny model: from scratch
]  # fmt: skip
GPU_GB = ["--gpu-memory-gb", "80"]  # what the script's dry run checks by default
JOB_TIMEOUT_S = 420


def _plan(capsys, world: int, overrides: list[str], extra: tuple[str, ...] = ()) -> str:
    """What ``copd plan --config CONFIG --world-size WORLD EXTRA OVERRIDES`` prints."""
    capsys.readouterr()
    argv = ["--config", str(REPO / CONFIG), "--world-size", str(world), *extra, *overrides]
    assert plan_main(argv) == 0
    return capsys.readouterr().out


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without launcher variables that would override the job's own."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in drop}
    return {**env, "COPD_PYTHON": sys.executable, **extra}


def test_script_is_thin():
    """An #SBATCH header for 8 nodes x 8 GPUs, one srun line, nothing killed by name."""
    text = SCRIPT.read_text()
    for opt in ("--nodes=8", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=", "--output="):
        assert f"#SBATCH {opt}" in text
    assert sum(line.lstrip().startswith("srun ") for line in text.splitlines()) == 1
    assert "pkill" not in text and "killall" not in text
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_dry_run_prints_the_64_gpu_layout(capsys):
    res = run_until_stalled(
        ["bash", str(SCRIPT), "--dry-run"], 120, cwd=REPO, env=_clean_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    expected = _plan(capsys, 64, [], GPU_GB)
    assert res.stdout == expected
    assert expected.startswith("copd-mega layout: world 64 = 8 branches x (TP4 x PP1 x DP2")
    assert "rollout KV cache" in expected and "fits --gpu-memory-gb 80" in expected


def test_dry_run_fails_in_one_line_when_memory_does_not_fit():
    res = run_until_stalled(
        ["bash", str(SCRIPT), "--dry-run"], 120, cwd=REPO, env=_clean_env(COPD_GPU_MEMORY_GB="8"),
    )  # fmt: skip
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert "--gpu-memory-gb 8" in line


def test_dry_run_env_var_uses_the_allocation_and_overrides(capsys):
    res = run_until_stalled(
        ["bash", str(SCRIPT), *CPU_OVERRIDES], 120, cwd=REPO,
        env=_clean_env(COPD_DRY_RUN="1", SLURM_NTASKS="8"),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == _plan(capsys, 8, CPU_OVERRIDES, GPU_GB)
    assert "(TP2 x PP2 x DP1 = 4 ranks)" in res.stdout


slurm = local_slurm_fixture(cpus=8, what="the sbatch test")


@pytest.mark.multiproc
def test_sbatch_runs_two_tp2_pp2_branches_on_cpu(slurm, tmp_path, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = slurm.sbatch(
        # The allocation shrunk to one CPU node; the script itself is submitted unchanged.
        ["--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=0", "--time=15",
         f"--output={out}", str(SCRIPT), *CPU_OVERRIDES],
        cwd=REPO,
        env=_clean_env(COPD_RUN_DIR=str(run_dir), MASTER_PORT=str(free_port()),
                       WANDB_MODE="disabled"),
    )  # fmt: skip
    state, code = slurm.wait(job, JOB_TIMEOUT_S)
    text = out.read_text() if out.exists() else "(no output file)"
    assert (state, code) == ("COMPLETED", "0:0"), f"job {job} {state} {code}:\n{text[-3000:]}"

    layout = _plan(capsys, 8, CPU_OVERRIDES)
    assert "2 branches x (TP2 x PP2 x DP1 = 4 ranks)" in layout
    assert layout in text, "the job's layout differs from `copd plan` for the same config"
    # Start-up prints the layout, then synthesises data, then builds the models.
    first_data = text.index(" samples in ")
    first_progress = min(text.index(f"[{n}] [") for n in NAMES)
    assert text.index(layout) < first_data < first_progress, "layout must come before the models"
    for n in NAMES:  # every branch leader reported its last step
        assert f"[{n}] [ {'━' * 20} ] step 2/2" in text, n  # rich's full bar
    metrics = sorted((run_dir / "metrics").glob("*.jsonl"))
    assert [p.stem for p in metrics] == sorted(NAMES)
    for p in metrics:
        rows = [json.loads(line) for line in p.read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1] and rows[1]["phase"] == "opd", p
    assert (run_dir / "final" / "model" / "config.yaml").is_file()
    assert (run_dir / "final" / "model" / "metadata.json").is_file()
    assert "final model (merged) saved to" in text


def test_scaling_study_submits_one_job_per_branch_count(tmp_path, capsys):
    """scaling_study.sh against a stand-in sbatch that records its arguments (no Slurm)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    stub = bin_dir / "sbatch"
    stub.write_text(
        '#!/bin/bash\nprintf "%s\\n" "COPD_RUN_DIR=$COPD_RUN_DIR" "$@" "--" >> "$SBATCH_LOG"\n'
        'echo $((100 + $(grep -c "^--$" "$SBATCH_LOG")))\n'
    )
    stub.chmod(0o755)
    root = tmp_path / "runs"
    env = _clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SBATCH_LOG=str(log),
        SCALING_ROOT=str(root),
    )  # fmt: skip
    res = run_until_stalled(
        ["bash", str(REPO / "slurm" / "scaling_study.sh"), "schedule.cycles=1"], 60, cwd=REPO,
        env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    jobs = [j.splitlines() for j in log.read_text().split("--\n") if j.strip()]
    assert len(jobs) == 5  # the four branch counts, then the predicted-vs-measured table
    for i, (n, args) in enumerate(zip((1, 2, 4, 8), jobs[:4], strict=True)):
        assert args[0] == f"COPD_RUN_DIR={root}/b{n}" and (root / f"b{n}").is_dir()
        assert f"--ntasks={n}" in args and "--gpus-per-node=0" in args
        deps = [a for a in args if a.startswith("--dependency")]
        assert deps == ([f"--dependency=afterany:{100 + i}"] if i else [])  # one at a time
        overrides = args[args.index("slurm/copd_8branch.sh") + 1 :]
        branches, hub = overrides[:2]
        # one branch has no peers: the same steps without distillation
        assert overrides[2:] == (["schedule.mode=expert"] if n == 1 else []) + ["schedule.cycles=1"]
        assert hub == "teaching.hub=text"
        # the override names the first n branches, hub first, and the config accepts it
        single = ["parallel.tp=1", "parallel.pp=1", "parallel.dp=1", *overrides]
        assert _plan(capsys, n, single).count("\nbranch ") == n
    runs = " ".join(f"{root}/b{n}" for n in (1, 2, 4, 8))
    assert f"copd report scaling {runs}" in res.stdout
    last = jobs[4]
    assert "--dependency=afterany:101:102:103:104" in last
    wrap = last[last.index("--wrap") + 1]
    assert (
        f"bench/bench_step_costs.py --config configs/scaling_cpu.yaml --out {root}/cpu_costs.json"
        in wrap
    )
    assert f"report scaling --predict --gpu cpu --cpu-costs {root}/cpu_costs.json" in wrap
    assert f"{runs} --table {root}/predicted_vs_measured.md" in " ".join(wrap.split())
