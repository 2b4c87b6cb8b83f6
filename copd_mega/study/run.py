"""``copd study``: every mode x every seed from one shared base, and the comparison as a report.

    copd study --config C --modes copd,expert,mixed,static_opd,mopd --seeds 1,2,3 --out STUDY

1. The base: ``checkpoint.init_from`` when the config names one, else ``copd pretrain`` once
   into ``STUDY/base``. Built-in data is synthesised per run from ``data.seed`` (the same data).
2. Each run is one ``copd train`` subprocess (torchrun, one process per rank) in
   ``STUDY/runs/<mode>[-<student>]/seed<S>``, from that base, with the config's data and
   schedule and ``seed=S``. The paper's budget rules: ``expert`` runs every branch for
   ``cycles * (rl_steps + opd_steps)`` steps, ``mixed`` one policy on the union of the data for
   the sum of the experts' steps (``schedule.mixed_steps``), ``static_opd`` / ``mopd`` (one run
   per student branch) the experts' ``cycles * rl_steps`` steps, then ``cycles * opd_steps``
   distillation steps. ``schedule.merge_every_cycle`` applies to ``copd`` only.
3. Reuse: when the first ``cycles * rl_steps`` steps of the expert run are the same steps as the
   distillation modes' stage 1 (``schedule.build_plan`` says so), the expert run stops there once,
   its checkpoint is kept in ``STUDY/runs/expert/seed<S>/stage1``, and every static_opd/mopd
   run of that seed resumes from a copy of it (its metrics rows come along). With two branches
   ``mopd`` is the same run as ``static_opd`` (same plan): its rows are that run's.
   The base is evaluated once (the first run, ``eval.base``); every final model once, by its run.
4. Resumable run by run: a finished run (``eval.json`` + ``final/model``) is skipped, an
   interrupted one continues with ``--resume=auto``. Output of each run: ``RUN/study.log``.
5. ``STUDY/report.md`` (table: mean and std over seeds per capability and overall; wall time
   per mode; plots ``STUDY/plots/accuracy.png`` and ``overlap.png``) and ``STUDY/summary.json``
   (every number per seed, with the eval file it came from); see :mod:`copd_mega.study.report`.

Curves need ``eval.every`` and ``eval.overlap_every``; a config that leaves them 0 gets one
point every eighth of the expert run's steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from copd_mega.ckpt.checkpoint import LATEST_FILE, scan_steps, step_dir_name, write_text_atomic
from copd_mega.config import (
    Config,
    ConfigError,
    default_config_path,
    load_config,
    save_config,
    to_dict,
)
from copd_mega.launch.datasets import capabilities_of
from copd_mega.parallel.dist import free_port
from copd_mega.rl.schedule import MODES, build_plan
from copd_mega.study.report import write_report
from copd_mega.trainer.job import finished as run_finished

STAGE1 = "stage1"


class StudyError(RuntimeError):
    """A run of the study failed (one line: which run, its exit code, its log)."""


@dataclass
class Run:
    """One ``copd train`` job of the study."""

    mode: str
    seed: int
    student: str = ""
    overrides: list[str] = field(default_factory=list)
    path: Path = Path()
    same_as: str = ""  # label of the run whose results this one shares (an identical plan)

    @property
    def label(self) -> str:
        return f"{self.mode}-{self.student}" if self.student else self.mode


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad or len(set(modes)) != len(modes):
        raise ConfigError(f"--modes {text!r}: give distinct modes from {','.join(MODES)}, "
                          "comma-separated")  # fmt: skip
    return modes


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds {text!r}: give distinct integers >= 0, comma-separated (1,2,3)")
    return seeds


def check_modes(cfg: Config, modes: list[str]) -> None:
    """The config must give each requested mode what it needs (errors name the fix)."""
    k = len(cfg.branches)
    if k < 2:
        raise ConfigError(f"copd study compares modes over >= 2 branches (capabilities); the "
                          f"config has {k}: list one branch per capability under branches")  # fmt: skip
    if "static_opd" in modes and k != 2:
        raise ConfigError(f"--modes static_opd distils one expert into another and needs exactly "
                          f"2 branches, the config has {k}; drop static_opd (mopd covers K > 2)")  # fmt: skip
    s = cfg.schedule
    if any(m in modes for m in ("copd", "static_opd", "mopd")) and s.opd_steps < 1:
        raise ConfigError("schedule.opd_steps must be >= 1 for copd/static_opd/mopd runs")


def eval_cadence(cfg: Config) -> list[str]:
    """``eval.every`` / ``eval.overlap_every`` of the config, or one point every eighth of the
    expert run when they are 0."""
    s = cfg.schedule
    default = max(s.cycles * (s.rl_steps + s.opd_steps) // 8, 1)
    return [f"eval.every={cfg.eval.every or default}",
            f"eval.overlap_every={cfg.eval.overlap_every or default}"]  # fmt: skip


def plan_runs(cfg: Config, modes: list[str], seeds: list[int], out: Path, base: Path) -> list[Run]:
    """Every run in execution order (expert first: it provides the distillation stage 1)."""

    names = cfg.branch_names
    union = "+".join(c for b in cfg.branches for c in capabilities_of(b.data))
    order = [m for m in ("expert", "copd", "mixed", "static_opd", "mopd") if m in modes]
    common = [f"checkpoint.init_from={base}", *eval_cadence(cfg), "logging.progress=false"]
    runs: list[Run] = []
    for seed in seeds:
        for mode in order:
            extra = [f"schedule.mode={mode}", f"seed={seed}"]
            if mode != "copd":
                extra.append("schedule.merge_every_cycle=false")
            if mode not in ("static_opd", "mopd"):
                extra.append("schedule.student=")
            students = names if mode in ("static_opd", "mopd") else [""]
            for student in students:
                o = [*common, *extra]
                if student:
                    o.append(f"schedule.student={student}")
                if mode == "mixed":
                    o += [f"branches=[{{name: mixed, data: {union}}}]", "teaching.graph=none"]
                run = Run(mode, seed, student, o)
                run.path = out / "runs" / run.label / f"seed{seed}"
                if mode == "mopd" and len(names) == 2 and "static_opd" in modes:
                    run.same_as = f"static_opd-{student}"
                runs.append(run)
    first = next(r for r in runs if not r.same_as)
    for r in runs:
        r.overrides.append(f"eval.base={'true' if r is first else 'false'}")
    return runs


def stage1_steps(cfg: Config) -> int:
    """Steps the expert run shares with static_opd/mopd stage 1 (0: none, e.g. when the plans
    differ), compared on what each step does."""

    s, names = cfg.schedule, cfg.branch_names
    n = s.cycles * s.rl_steps
    if n == 0 or s.opd_steps < 1:
        return 0
    expert = build_plan("expert", names, (), s.cycles, s.rl_steps, s.opd_steps)[:n]
    distil = build_plan("static_opd" if len(names) == 2 else "mopd", names, (), s.cycles,
                        s.rl_steps, s.opd_steps, names[0])[:n]  # fmt: skip
    what = lambda p: (p.step, p.phase, p.learners, p.edges)  # noqa: E731
    same = [what(a) for a in expert] == [what(b) for b in distil]
    return n if same else 0


# ----------------------------------------------------------------------------- running


def finished(run: Path) -> bool:

    return run_finished(run)


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.setdefault("WANDB_MODE", "disabled")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launch(argv: list[str], ranks: int, log: Path, what: str) -> float:
    """Run ``copd ARGV`` (under torchrun with ``ranks`` processes; 0: one plain process),
    appending its output to ``log``; returns its wall time. Raises StudyError on failure."""

    py = sys.executable
    cmd = [py, "-m", "copd_mega.cli", *argv]
    if ranks:
        cmd = [py, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
               f"--master-port={free_port()}", "-m", "copd_mega.cli", *argv]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"\n=== {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env()).returncode
    if code != 0:
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        tail = [ln for ln in lines if ": error: " in ln][-1:] or lines[-1:]
        raise StudyError(f"{what} failed with exit code {code}; see {log}"
                         + (f" ({tail[0].strip()[:200]})" if tail else ""))  # fmt: skip
    return time.monotonic() - t0


def add_time(run: Path, seconds: float, part: str) -> None:
    """Accumulate wall time in ``RUN/study_time.json`` (``{"total": s, part: s, ...}``)."""

    path = run / "study_time.json"
    t = json.loads(path.read_text()) if path.exists() else {}
    t[part] = t.get(part, 0.0) + seconds
    t["total"] = t.get("total", 0.0) + seconds
    write_text_atomic(path, json.dumps(t, indent=2))


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy the folder ``src`` to ``dst`` beside it first, then swap it in."""
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dst)


def metrics_before(src: Path, dst: Path, step: int, rl_steps: int) -> None:
    """Copy ``src/metrics/*.jsonl`` rows of steps < ``step`` to ``dst/metrics`` (atomically),
    numbering their cycles as the distillation plan's stage 1 does (``step // rl_steps``)."""

    (dst / "metrics").mkdir(parents=True, exist_ok=True)
    for f in sorted((src / "metrics").glob("*.jsonl")):
        rows = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
        keep = [{**r, "cycle": r["step"] // rl_steps} for r in rows if r["step"] < step]
        write_text_atomic(dst / "metrics" / f.name, "".join(json.dumps(r) + "\n" for r in keep))


class Study:
    """The runs of one study folder and how to bring each to its end."""

    def __init__(self, cfg: Config, config_path: Path, runs: list[Run], shared: int, ranks: int):
        self.cfg, self.config_path, self.runs = cfg, config_path, runs
        self.shared, self.ranks = shared, ranks  # stage-1 steps shared; ranks per branch

    def world(self, run: Run) -> int:
        return (1 if run.mode == "mixed" else len(self.cfg.branches)) * self.ranks

    def train(self, run: Run, extra: list[str], part: str) -> None:
        argv = ["train", "--config", str(self.config_path), "--resume=auto",
                f"run_dir={run.path}", *run.overrides, *extra]  # fmt: skip
        secs = launch(
            argv, self.world(run), run.path / "study.log", f"run {run.label} seed {run.seed}"
        )
        add_time(run.path, secs, part)

    def stage1_dir(self, seed: int) -> Path | None:
        expert = next((r for r in self.runs if r.mode == "expert" and r.seed == seed), None)
        return expert.path / STAGE1 if expert is not None else None

    def bring(self, run: Run) -> str:
        """Run ``run`` to its end; returns what was done (for the progress line)."""
        if run.same_as:
            return f"same run as {run.same_as}"
        if finished(run.path):
            return "finished before: skipped"
        wants_stage1 = self.shared and any(
            r.seed == run.seed and r.mode in ("static_opd", "mopd") and not r.same_as
            and not finished(r.path) for r in self.runs
        )  # fmt: skip
        if run.mode == "expert" and wants_stage1:
            self.expert_stage1(run)
        if run.mode in ("static_opd", "mopd"):
            self.seed_from_stage1(run)
        self.train(run, [], "train")
        return "done"

    def expert_stage1(self, run: Run) -> None:
        """Stop the expert run after the shared steps once and keep that checkpoint."""

        keep = run.path / STAGE1
        if keep.exists():
            return
        chosen, _ = scan_steps(run.path / "checkpoints")
        next_step = int(chosen.name[5:]) + 1 if chosen is not None else 0
        if next_step < self.shared:
            self.train(run, [f"schedule.stop_after={self.shared - next_step}"], "stage1")
            chosen, _ = scan_steps(run.path / "checkpoints")
        if chosen is None or chosen.name != step_dir_name(self.shared - 1):
            return  # already past the shared steps: the distillation runs do stage 1 themselves
        copy_atomic(chosen, keep)

    def seed_from_stage1(self, run: Run) -> None:
        """A fresh static_opd/mopd run starts from the expert's stage-1 checkpoint (copied)."""

        stage1 = self.stage1_dir(run.seed)
        if stage1 is None or not stage1.exists() or scan_steps(run.path / "checkpoints")[0]:
            return
        root = run.path / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        name = f"step_{self.shared - 1:06d}"
        copy_atomic(stage1, root / name)
        write_text_atomic(root / LATEST_FILE, name + "\n")
        metrics_before(stage1.parent, run.path, self.shared, self.cfg.schedule.rl_steps)
        t = json.loads((stage1.parent / "study_time.json").read_text())
        write_text_atomic(run.path / "stage1_from.json", json.dumps(
            {"checkpoint": str(stage1), "steps": self.shared, "seconds": t.get("stage1", 0.0)}
        ))  # fmt: skip


# ----------------------------------------------------------------------------- the command


def prepare(args) -> tuple[Study, Path, list[str]]:
    """Validate the input, write ``STUDY/config.yaml`` and plan the runs (no training yet)."""

    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder for the study")
    modes, seeds = parse_modes(args.modes), parse_seeds(args.seeds)
    cfg = load_config(
        args.config or default_config_path(), [*args.overrides, f"run_dir={out}/base"]
    )
    check_modes(cfg, modes)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    if config_path.exists():
        old = load_config(config_path, [])
        if to_dict(old) != to_dict(cfg):
            raise ConfigError(f"{out} holds a study of another config ({config_path}); use a new "
                              "--out, or the same --config and overrides to continue it")  # fmt: skip
    else:
        save_config(cfg, config_path)
    base = Path(cfg.checkpoint.init_from) if cfg.checkpoint.init_from else out / "base" / "base"
    runs = plan_runs(cfg, modes, seeds, out, base)
    distil = "static_opd" in modes or "mopd" in modes
    shared = stage1_steps(cfg) if "expert" in modes and distil else 0
    return Study(cfg, config_path, runs, shared, cfg.ranks_per_branch), out, modes


def run_study(study: Study, out: Path, modes: list[str], seeds: list[int]) -> Path:
    """Pretrain (or reuse) the base, bring every run to its end, write the report."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=False)
    cfg = study.cfg
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total} runs"), TimeElapsedColumn(), console=console) as bar:  # fmt: skip
        task = bar.add_task("base", total=len(study.runs))
        base = out / "base"
        if not cfg.checkpoint.init_from and not (base / "base" / "config.yaml").exists():
            bar.update(task, description="pretraining the base")
            secs = launch(["pretrain", "--config", str(study.config_path)], 0, base / "study.log",
                          "pretraining the base")  # fmt: skip
            add_time(base, secs, "pretrain")
        for run in study.runs:
            bar.update(task, description=f"{run.label} seed {run.seed}")
            what = study.bring(run)
            bar.advance(task)
            console.print(f"{run.label} seed {run.seed}: {what} ({run.path})")
    return write_report(out, cfg, study.runs, study.shared)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="copd study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--config", default=None, help="config (default: the embedded demo.yaml)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    ap.add_argument("--out", required=True, help="study folder (resumed when it exists)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every run")
    args = ap.parse_args(argv)
    study, out, modes = prepare(args)
    try:
        report = run_study(study, out, modes, parse_seeds(args.seeds))
    except StudyError as e:
        print(f"copd study: error: {e}", file=sys.stderr)
        return 1
    print(report.read_text().split("## Wall time")[0].rstrip())
    print(f"\ncopd study: report {report}")
    return 0
