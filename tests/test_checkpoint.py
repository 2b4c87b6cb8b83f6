"""Step checkpoints (2 branches on 2 gloo ranks), crash safety, resharding of model checkpoints."""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from lost_cases import fake_step

from copd_mega.ckpt.checkpoint import (
    COMPLETE_FILE,
    CheckpointError,
    _apply_retention,
    find_resume_step,
    read_latest,
    require_model_dir,
)
from multiproc import spawn

TWO_BRANCHES = 'branches=[{"name": "a", "data": "arith"}, {"name": "b", "data": "arith"}]'


def _train_step(bm, topo, seed: int) -> None:
    """One optimizer step on random tokens drawn from ``seed`` (branch-specific data)."""
    import torch.nn.functional as F

    from copd_mega.models.step import optimizer_step, run_microbatches

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 100, (2, 8), generator=g)
    mb = {"tokens": tokens, "position_ids": torch.arange(8).expand(2, 8)}
    mb["labels"] = torch.roll(tokens, -1, 1)

    def loss_fn(mb, logits):
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), mb["labels"].flatten(), reduction="sum"
        )
        return loss, torch.tensor(mb["labels"].numel()), {}

    run_microbatches(bm, topo, [mb], loss_fn)
    optimizer_step(bm)


def _params(bm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bm.module.named_parameters()}


def _draws() -> list:
    """One draw from python/numpy/torch, then megatron's tracker and the CUDA (stand-in) states."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker().get_states()
    return [random.random(), float(np.random.rand()), torch.rand(3), torch.cuda.get_rng_state()] + [
        tracker[k] for k in sorted(tracker)
    ]


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _resume_worker(rank: int, root: str, layout: list[str], broken: str, lost: str) -> dict:
    from copd_mega.ckpt.checkpoint import load_latest, save_model, save_step
    from copd_mega.config import load_config
    from copd_mega.models.branch import build_branch_model
    from copd_mega.models.step import prepare_for_training
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    cfg = load_config(None, [*layout, "optim.lr=0.01", "checkpoint.keep_last=2"])
    init_distributed()
    topo = build_topology(cfg)
    bm = build_branch_model(cfg, topo)
    prepare_for_training(bm, topo)
    seed = 100 * (topo.branch.index + 1)
    snapshots = {}
    for step in (1, 2, 3):
        _train_step(bm, topo, seed + step)
        save_step(root, step, bm, topo, cfg, {"step": step, "cursor": [rank, step]})
        snapshots[step] = _params(bm)
    expected_draws = _draws()
    _train_step(bm, topo, seed + 4)  # uses Adam moments: equal after resume only if restored
    after4 = _params(bm)
    random.seed(999), np.random.seed(999), torch.manual_seed(999)
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():  # moves the tracked TP-region state
        torch.cuda.manual_seed(5)
    torch.cuda.manual_seed(999)
    out = {"latest": read_latest(root), "steps": sorted(p.name for p in Path(root).glob("step_*"))}
    out["state"] = load_latest(root, bm, topo)
    out["weights_restored"] = _same(snapshots[3], _params(bm))
    draws = _draws()
    out["rng_restored"] = all(
        (a == b) if isinstance(a, float) else torch.equal(a, b)
        for a, b in zip(draws, expected_draws, strict=True)
    )
    _train_step(bm, topo, seed + 4)
    out["resumed_step_equal"] = _same(after4, _params(bm))
    out["checksum"] = float(sum(v.double().sum() for v in snapshots[3].values()))
    # A step folder whose branch lost a file the loader reads is skipped; step 2 loads instead.
    if rank == 0:
        (Path(root) / "step_000003" / f"branch_{broken}" / lost).unlink()
    torch.distributed.barrier()
    with contextlib.redirect_stderr(io.StringIO()) as err:  # one line per skipped step
        out["fallback_state"] = load_latest(root, bm, topo)
    out["warnings"] = [ln for ln in err.getvalue().splitlines() if "step_000003" in ln]
    out["fallback_weights"] = _same(snapshots[2], _params(bm))
    for b in topo.layout.branches:  # the trainer's RUN/final/branch_<name>, one save per branch
        save_model(Path(root).parent / "final" / f"branch_{b.name}", bm, topo, cfg, branch=b.name)
    out["final_norm"] = _params(bm).get("decoder.final_layernorm.weight")  # last PP stage
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "layout,broken,lost",
    [
        ([TWO_BRANCHES], "b", ".metadata"),
        (["parallel.dp=2"], "text", "metadata.json"),
        pytest.param(["parallel.pp=2"], "text", "metadata.json", marks=pytest.mark.slow),
    ],
    ids=["2branches", "1branch_dp2", "1branch_pp2_tied"],
)
def test_save_step_load_latest(tmp_path, layout, broken, lost):
    """Model, optimizer (a further step matches), trainer_state, RNG; latest; keep-last-2;
    a step with a branch's metadata.json or torch's .metadata missing is warned about and the
    previous one loads."""
    root = tmp_path / "checkpoints"
    res = spawn(_resume_worker, 2, str(root), layout, broken, lost)
    for rank, r in enumerate(res):
        assert r["latest"] == "step_000003"
        assert r["steps"] == ["step_000002", "step_000003"]  # keep_last=2 removed step 1
        assert r["state"] == {"step": 3, "cursor": [rank, 3]}
        assert r["weights_restored"] and r["rng_restored"] and r["resumed_step_equal"]
        assert r["fallback_state"] == {"step": 2, "cursor": [rank, 2]}
        assert r["fallback_weights"]
    if layout == [TWO_BRANCHES]:
        assert res[0]["checksum"] != res[1]["checksum"]  # each branch got its own weights back
        from copd_mega.ckpt.offline import CheckpointReader
        from copd_mega.ckpt.offline_merge import merge_checkpoints

        key = "decoder.final_layernorm.weight"
        for rank, name in enumerate("ab"):
            saved = CheckpointReader(tmp_path / "final" / f"branch_{name}").read({key: None})[key]
            assert torch.equal(saved, res[rank]["final_norm"])
        merged = merge_checkpoints([tmp_path], tmp_path / "merged", progress=False)
        mean = (res[0]["final_norm"] + res[1]["final_norm"]) / 2
        torch.testing.assert_close(CheckpointReader(merged).read({key: None})[key], mean)
    assert res[0]["warnings"] and f"branch_{broken}/{lost}" in res[0]["warnings"][0]


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time

    def main(root):
        from copd_mega.parallel.dist import free_port
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        import copd_mega.ckpt.checkpoint as ck
        from copd_mega.config import load_config
        from copd_mega.models.branch import build_branch_model
        from copd_mega.parallel.dist import init_distributed
        from copd_mega.parallel.topology import build_topology

        cfg = load_config(None, [])
        init_distributed()
        topo = build_topology(cfg)
        bm = build_branch_model(cfg, topo)
        ck.save_step(root, 1, bm, topo, cfg, {"step": 1})
        real_save = ck.save_dir

        def save_then_hang(path, state, group):
            real_save(path, state, group)
            print("MIDSAVE", flush=True)
            time.sleep(600)

        ck.save_dir = save_then_hang  # the hook save_step writes through
        ck.save_step(root, 2, bm, topo, cfg, {"step": 2})

    if __name__ == "__main__":
        main(sys.argv[1])
    """
)


def _load_worker(rank: int, root: str) -> tuple[dict | None, list[str]]:
    from copd_mega.ckpt.checkpoint import load_latest
    from copd_mega.config import load_config
    from copd_mega.models.branch import build_branch_model
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    cfg = load_config(None, [])
    init_distributed()
    topo = build_topology(cfg)
    bm = build_branch_model(cfg, topo)
    with contextlib.redirect_stderr(io.StringIO()) as err:  # one line per skipped step
        state = load_latest(root, bm, topo)
    return state, [ln for ln in err.getvalue().splitlines() if "step_" in ln]


@pytest.mark.multiproc
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    script = tmp_path / "save_and_hang.py"
    script.write_text(KILL_SCRIPT)
    root = tmp_path / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if "MIDSAVE" in line:
                break
        assert proc.poll() is None, "the saving process ended before the kill"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the saver and its checkpoint helper processes
        proc.wait(timeout=30)
    assert read_latest(root) == "step_000001"
    assert (root / "step_000002" / "branch_text" / "metadata.json").is_file()
    assert not (root / "step_000002" / COMPLETE_FILE).exists()
    state, warned = spawn(_load_worker, 1, str(root))[0]
    assert state == {"step": 1}
    assert any("step_000002" in w for w in warned)


def _reshard_worker(rank: int, path: str, tp: int, save: bool) -> list[torch.Tensor]:
    """At TP=tp: draw other weights and save (``save``), or load; full-vocab logits (before the
    load, and after)."""
    import dataclasses

    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from copd_mega.ckpt.checkpoint import load_model, save_model
    from copd_mega.config import load_config
    from copd_mega.models.branch import build_branch_model
    from copd_mega.models.gpt import init_weights
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    over = [f"parallel.tp={tp}", "model.vocab_size=100", "model.tie_embeddings=false",
            "model.family=qwen2", "model.qkv_bias=true"]  # fmt: skip
    cfg = load_config(None, over)
    init_distributed()
    topo = build_topology(cfg)
    bm = build_branch_model(cfg, topo)
    if save:  # weights unlike the seed-1234 init the loading side starts from
        with torch.no_grad():
            init_weights(bm.module, dataclasses.replace(cfg, seed=7))
            for name, p in bm.module.named_parameters():
                p.add_(0.1 if "norm" in name or name.endswith("bias") else 0.0)
        save_model(path, bm, topo, cfg)
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])

    def logits() -> torch.Tensor:
        with torch.no_grad():
            out = bm.model(tokens, torch.arange(8)[None], None)
        return gather_from_tensor_model_parallel_region(out, group=topo.pg.tp)[..., :100].clone()

    if save:
        return [logits()]
    before = logits()
    load_model(path, bm, topo)
    return [before, logits()]


@pytest.mark.multiproc
def test_model_checkpoint_saved_at_tp2_loads_at_tp1(tmp_path):
    path = str(tmp_path / "model")
    tp2 = spawn(_reshard_worker, 2, path, 2, True)
    assert (tmp_path / "model" / "config.yaml").is_file()
    before, tp1 = spawn(_reshard_worker, 1, path, 1, False)[0]
    assert (tp1 - tp2[0][0]).abs().max().item() < 1e-5
    assert (before - tp1).abs().max().item() > 1e-2  # the load changed the weights


# ----------------------------------------------------------------------------- filesystem only


def test_find_resume_step_prefers_latest_and_skips_incomplete(tmp_path):
    fake_step(tmp_path, 10)
    fake_step(tmp_path, 20)
    fake_step(tmp_path, 30, complete=False)  # killed before it committed
    (tmp_path / "latest").write_text("step_000020\n")
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert find_resume_step(tmp_path).name == "step_000020"
    assert ["step_000030" in ln for ln in err.getvalue().splitlines()] == [True]
    (tmp_path / "step_000020" / "branch_a" / "metadata.json").unlink()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert find_resume_step(tmp_path).name == "step_000010"
    assert any(
        "step_000020" in ln and "branch_a/metadata.json" in ln for ln in err.getvalue().splitlines()
    )
    assert find_resume_step(tmp_path / "nothing") is None


def test_retention_keeps_last_k_complete_steps(tmp_path):
    for s in (1, 2, 3):
        fake_step(tmp_path, s)
    fake_step(tmp_path, 4, complete=False)
    fake_step(tmp_path, 5)
    fake_step(tmp_path, 6, complete=False)  # newer than the one just written: kept
    (tmp_path / "step_000003.replaced-0").mkdir()  # set aside when step 3 was re-saved
    _apply_retention(tmp_path, tmp_path / "step_000005", keep_last=2)
    kept = sorted(p.name for p in tmp_path.glob("step_*"))
    assert kept == ["step_000003", "step_000005", "step_000006"]


def test_bad_checkpoint_path_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "missing")):
        require_model_dir(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="metadata.json"):
        require_model_dir(tmp_path / "half")
