"""Helpers of the recovery tests: checkpoint folders with real torch_dist files, ``copd`` in a
subprocess (one process or torchrun), per-rank bodies for ``multiproc.spawn`` (import-safe)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from progress import run_until_stalled

from copd_mega.ckpt.checkpoint import COMPLETE_FILE

# One branch, one rank, a few seconds per step on a CPU.
TINY = [
    "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=1",
    "model.max_seq_length=48", "data.n_train=64", "data.n_eval=4",
    "rollout.prompts_per_step=2", "rollout.max_new_tokens=4", "grpo.group_size=2",
    "opd.prompts_per_peer=2", "opd.samples_per_prompt=1", "schedule.cycles=1",
    "schedule.rl_steps=2", "schedule.opd_steps=1", "schedule.mode=expert",
    "logging.progress=false",
]  # fmt: skip
TWO = "branches=[{name: arith, data: arith}, {name: reverse, data: reverse}]"


def torch_dist_dir(path: Path, value: float = 0.0) -> Path:
    """A folder with the files a torch_dist load reads (``.metadata`` and the ``.distcp`` it
    names, written by torch; megatron's ``metadata.json`` and ``common.pt``; ``config.yaml``)."""
    import torch.distributed.checkpoint as dcp

    path.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"x": torch.full((2,), value)}, checkpoint_id=str(path), no_dist=True)
    (path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    torch.save({}, path / "common.pt")
    (path / "config.yaml").write_text("{}\n")
    return path


def fake_step(root: Path, step: int, complete: bool = True, branches=("a", "b"), world=2) -> Path:
    """A step folder holding every file ``incomplete_reason`` checks (``complete=False``: a save
    killed before it committed)."""
    d = root / f"step_{step:06d}"
    for b in branches:
        torch_dist_dir(d / f"branch_{b}", float(step))
    (d / "trainer_state").mkdir(parents=True)
    (d / "trainer_state" / "config.yaml").write_text("{}\n")
    for r in range(world):
        torch.save({"step": step}, d / "trainer_state" / f"rank_{r:05d}.pt")
    if complete:
        info = {"step": step, "branches": list(branches), "world_size": world}
        (d / COMPLETE_FILE).write_text(json.dumps(info))
    return d


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def write_config(path: Path, overrides: list[str]) -> Path:
    from copd_mega.config import load_config, save_config

    save_config(load_config(None, ["checkpoint.random_init=true", *overrides]), path)
    return path


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def copd(*args: str, ranks: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    """``copd ARGS`` in a subprocess (``ranks`` > 0: under torchrun with that many ranks); fails
    once it made no progress (used no CPU) for ``timeout`` seconds."""
    from copd_mega.parallel.dist import free_port

    cmd = [sys.executable, "-m", "copd_mega.cli", *args]
    if ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
               f"--master-port={free_port()}", "-m", "copd_mega.cli", *args]  # fmt: skip
    return run_until_stalled(cmd, timeout, f"copd {' '.join(args[:1])}", env=_env())


def copd_popen(*args: str, ranks: int) -> subprocess.Popen:
    """``copd ARGS`` under torchrun, running in the background (stdout and stderr to a pipe)."""
    from copd_mega.parallel.dist import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
           f"--master-port={free_port()}", "-m", "copd_mega.cli", *args]  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()
    )


def copd_killed(*args: str, timeout: float = 600) -> tuple[int, str]:
    """``copd ARGS`` (one process) in its own session, for a job that gets killed: returns its
    exit code and output once it ended, after killing what it left (megatron's save helpers)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "copd_mega.cli", *args], stdout=out, stderr=subprocess.STDOUT,
            text=True, env=_env(), start_new_session=True,
        )  # fmt: skip
        try:
            code = proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        return code, out.read()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


def metrics_rows(run_dir: Path) -> dict[tuple[str, int], dict]:
    """(branch, step) -> JSONL row; asserts no step appears twice in a file."""
    out = {}
    for path in sorted((run_dir / "metrics").glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        steps = [r["step"] for r in rows]
        assert len(steps) == len(set(steps)), f"{path} repeats steps: {steps}"
        out.update({(r["branch"], r["step"]): r for r in rows})
    return out


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    from copd_mega.ckpt.offline import CheckpointReader

    reader = CheckpointReader(path)
    keys = [k for k in reader.specs if not k.startswith("optimizer")]
    return reader.read(dict.fromkeys(keys))


METRIC_KEYS = ("loss", "reward", "accuracy", "grad_norm", "response_len", "entropy")


def assert_same_run(a_dir: Path, b_dir: Path, rows: int) -> dict[tuple[str, int], dict]:
    """Two runs of one config ended alike: the same ``rows`` metrics rows with equal
    :data:`METRIC_KEYS` and ``edge/*`` values, equal eval.json and eval_problems.json (every
    row of the table) and bit-equal final merged model tensors. Returns ``b_dir``'s metrics rows."""
    a, b = metrics_rows(a_dir), metrics_rows(b_dir)
    assert sorted(a) == sorted(b) and len(a) == rows, (sorted(a), sorted(b))
    for key in a:
        for k in [*METRIC_KEYS, *(k for k in a[key] if k.startswith("edge/"))]:
            assert a[key][k] == b[key][k], (key, k, a[key][k], b[key][k])
    ta, tb = (json.loads((d / "eval.json").read_text()) for d in (a_dir, b_dir))
    assert ta == tb
    # per-problem results of every row (the base too, also after a resume)
    pa, pb = (json.loads((d / "eval_problems.json").read_text()) for d in (a_dir, b_dir))
    assert pa == pb and sorted(pa) == sorted(ta)
    wa, wb = model_tensors(a_dir / "final" / "model"), model_tensors(b_dir / "final" / "model")
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    return b


# ----------------------------------------------------------------------------- per-rank bodies


class GroupStepAdam(torch.optim.Optimizer):
    """Adam that keeps its step count in the param groups (``group["step"]``, an int), the layout
    of megatron's fused Adam on GPU (TransformerEngine / Apex FusedAdam), which do not run on CPU;
    per-parameter state holds only the two moments. Same update as ``torch.optim.Adam``."""

    def __init__(self, groups):
        # megatron's main-weight shards are views (non-leaf): take its groups as they are
        super().__init__([torch.zeros(1, requires_grad=True)], {})
        self.param_groups = groups

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            g["step"] = g.get("step", 0) + 1
            b1, b2 = g["betas"]
            c1, c2 = 1 - b1 ** g["step"], 1 - b2 ** g["step"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                grad = p.grad + g["weight_decay"] * p if g["weight_decay"] else p.grad
                st["exp_avg"].lerp_(grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (st["exp_avg_sq"] / c2).sqrt_().add_(g["eps"])
                p.addcdiv_(st["exp_avg"], denom, value=-g["lr"] / c1)


def guard_case(rank: int, overrides: list[str], group_step: bool = False) -> dict:
    """One step with ``adam_eps=0`` (Adam's 0/0 on parameters without gradient), then one with
    ``adam_eps=1e-8``. Returns the weights before, after the guarded step and after the next.
    ``group_step``: the torch Adam under megatron's optimizer is swapped for
    :class:`GroupStepAdam` (the step count in the param groups)."""
    import torch.nn.functional as F

    from copd_mega.config import load_config
    from copd_mega.models.branch import build_branch_model
    from copd_mega.models.step import optimizer_step, prepare_for_training, run_microbatches
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    cfg = load_config(None, ["model.vocab_size=100", "model.tie_embeddings=false", "optim.lr=0.01",
                             *overrides])  # fmt: skip
    init_distributed()
    topo = build_topology(cfg)
    bm = build_branch_model(cfg, topo)
    prepare_for_training(bm, topo)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (2, 8), generator=g)  # rows 50.. of the embedding get no grad
    mb = {"tokens": tokens, "position_ids": torch.arange(8).expand(2, 8)}
    mb["labels"] = torch.roll(tokens, -1, 1)

    def loss_fn(mb, logits):  # TP=1 here: the logits hold the whole vocabulary
        flat = logits.float().flatten(0, 1)
        loss = F.cross_entropy(flat, mb["labels"].flatten(), reduction="sum")
        return loss, torch.tensor(mb["labels"].numel()), {}

    def params() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in bm.module.named_parameters()}

    def set_eps(eps: float) -> None:
        for o in getattr(bm.optimizer, "chained_optimizers", [bm.optimizer]):
            for group in o.optimizer.param_groups:
                group["eps"] = eps

    if group_step:
        for o in getattr(bm.optimizer, "chained_optimizers", [bm.optimizer]):
            o.optimizer = GroupStepAdam(o.optimizer.param_groups)
    before = params()
    set_eps(0.0)
    run_microbatches(bm, topo, [mb], loss_fn)
    guarded = optimizer_step(bm)
    after_guard = params()
    set_eps(1e-8)
    run_microbatches(bm, topo, [mb], loss_fn)
    ok = optimizer_step(bm)
    group = bm.optimizer.get_grad_stats_parallel_group()
    return {
        "guarded": guarded, "next": ok, "before": before, "after_guard": after_guard,
        "after_next": params(), "group_size": torch.distributed.get_world_size(group),
        "group_steps": [g.get("step") for o in getattr(bm.optimizer, "chained_optimizers",
                        [bm.optimizer]) for g in o.optimizer.param_groups],
    }  # fmt: skip


def judge_case(rank: int, overrides: list[str], items: list) -> tuple[list[float], dict, float]:
    """Score ``items`` with the judge a job builds from ``rewards.*``; returns the rewards, the
    status counts and the seconds the call took (workers already started)."""
    import time

    from copd_mega.config import load_config
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology
    from copd_mega.rl.judge import Judge

    cfg = load_config(None, overrides)
    init_distributed()
    topo = build_topology(cfg)
    judge = Judge.from_config(topo, torch.device("cpu"), cfg.rewards)
    judge.pool.wait_ready()
    t0 = time.monotonic()
    rewards, counts = judge.score(items)
    elapsed = time.monotonic() - t0
    judge.close()
    return rewards.tolist(), counts, elapsed
