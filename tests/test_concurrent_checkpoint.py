"""Per-branch checkpoints: 2 branches x TP2 on 4 gloo ranks save and load over their own groups.

Concurrency is proved without timing: the ranks of branch ``b`` stay outside every collective
(waiting for a file) until branch ``a`` has finished saving a model, and again loading one; with a
world-collective save or load that would deadlock. ``load_latest`` loads through the same
per-branch path after one world broadcast (the choice of step). Weights saved at TP2 equal, bit for bit, the
same weights saved by a single rank at TP1; a step checkpoint (model + optimizer) loads back
bit-identical and a further step matches.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
from test_checkpoint import TWO_BRANCHES, _params, _same

from multiproc import spawn

pytestmark = pytest.mark.multiproc


def _distinct_weights(bm, cfg, branch_index: int) -> None:
    """Weights unlike the default init, one set per branch, identical at any TP split."""
    from copd_mega.models.gpt import init_weights

    with torch.no_grad():
        init_weights(bm.module, dataclasses.replace(cfg, seed=7 + branch_index))
        for name, p in bm.module.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * (branch_index + 1))
    bm.optimizer.reload_model_params()


def _train_step(bm, topo, cfg, seed: int) -> None:
    """One optimizer step of next-token NLL on random tokens (vocab-parallel log-probs)."""
    from copd_mega.models.step import optimizer_step, run_microbatches
    from copd_mega.rl.logprobs import token_logprobs

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 100, (2, 8), generator=g)
    mb = {"tokens": tokens, "position_ids": torch.arange(8).expand(2, 8)}
    mb["labels"] = torch.roll(tokens, -1, 1)

    def loss_fn(mb, logits):
        logp = token_logprobs(logits, mb["labels"], topo.pg.tp, cfg.model.vocab_size)
        return -logp.sum(), torch.tensor(mb["labels"].numel()), {}

    run_microbatches(bm, topo, [mb], loss_fn)
    optimizer_step(bm)


def _wait_for(path: Path) -> None:
    """Wait for the peer branch's mark, however slow the machine (``spawn`` fails the test once
    the ranks stop making progress)."""
    while not path.exists():
        time.sleep(0.05)


def _mark(path: Path, topo) -> None:
    if topo.rank == topo.branch.first_rank:
        path.write_text("done")


def _tp2_worker(rank: int, tmp: str) -> dict:
    from copd_mega.ckpt.checkpoint import load_latest, load_model, save_model, save_step
    from copd_mega.config import load_config
    from copd_mega.models.branch import build_branch_model
    from copd_mega.models.step import prepare_for_training
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    tmp = Path(tmp)
    cfg = load_config(None, [TWO_BRANCHES, "parallel.tp=2", "optim.lr=0.01"])
    init_distributed()
    topo = build_topology(cfg)
    me = topo.branch.name
    bm = build_branch_model(cfg, topo)
    prepare_for_training(bm, topo)
    _distinct_weights(bm, cfg, topo.branch.index)
    if me == "b":  # outside every collective until branch a has saved
        _wait_for(tmp / "a_saved")
    for name in cfg.branch_names:  # the trainer's final saves: each rank writes only its own
        save_model(tmp / "tp2" / name, bm, topo, cfg, branch=name)
    _mark(tmp / f"{me}_saved", topo)

    seed = 100 * (topo.branch.index + 1)
    _train_step(bm, topo, cfg, seed)
    save_step(tmp / "checkpoints", 1, bm, topo, cfg, {"rank": rank})
    saved = _params(bm)
    _train_step(bm, topo, cfg, seed + 1)
    after = _params(bm)

    fresh = build_branch_model(cfg, topo)
    prepare_for_training(fresh, topo)
    before_load = _params(fresh)
    state = load_latest(tmp / "checkpoints", fresh, topo)
    out = {"state": state, "restored": _same(saved, _params(fresh))}
    out["changed"] = not _same(saved, before_load)
    _train_step(fresh, topo, cfg, seed + 1)  # needs the Adam moments and steps restored
    out["step_equal"] = _same(after, _params(fresh))

    other = build_branch_model(cfg, topo)  # the final save of this branch loads back exactly
    if me == "b":  # outside every collective until branch a has loaded
        _wait_for(tmp / "a_loaded")
    load_model(tmp / "tp2" / me, other, topo)
    _mark(tmp / f"{me}_loaded", topo)
    _distinct_weights(bm, cfg, topo.branch.index)
    out["model_restored"] = _same(_params(bm), _params(other))
    return out


def _tp1_worker(rank: int, tmp: str) -> None:
    from copd_mega.ckpt.checkpoint import save_model
    from copd_mega.config import load_config
    from copd_mega.models.branch import build_branch_model
    from copd_mega.models.step import prepare_for_training
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    cfg = load_config(None, ["optim.lr=0.01"])
    init_distributed()
    topo = build_topology(cfg)
    bm = build_branch_model(cfg, topo)
    prepare_for_training(bm, topo)
    for index, name in enumerate("ab"):
        _distinct_weights(bm, cfg, index)
        save_model(Path(tmp) / "tp1" / name, bm, topo, cfg)


def test_branches_save_and_load_concurrently_at_tp2(tmp_path):
    from copd_mega.ckpt.offline import CheckpointReader

    res = spawn(_tp2_worker, 4, str(tmp_path), timeout=400)
    for rank, r in enumerate(res):
        assert r["state"] == {"rank": rank}
        assert r["changed"] and r["restored"] and r["step_equal"] and r["model_restored"]
    spawn(_tp1_worker, 1, str(tmp_path))
    for name in "ab":
        tp1, tp2 = (
            CheckpointReader(tmp_path / "tp1" / name),
            CheckpointReader(tmp_path / "tp2" / name),
        )
        assert tp1.specs == tp2.specs and tp1.specs
        for key in tp1.specs:
            assert torch.equal(tp1.read({key: None})[key], tp2.read({key: None})[key]), key
    a, b = (CheckpointReader(tmp_path / "tp2" / n) for n in "ab")
    key = "decoder.final_layernorm.weight"
    assert not torch.equal(a.read({key: None})[key], b.read({key: None})[key])
