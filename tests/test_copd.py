"""CoPD on gloo: peer scoring exchange, hub-and-spoke, in-place merge, the five modes."""

import json
from pathlib import Path

import pytest
import torch
from copd_cases import THREE, exchange_round_trip, merge_case, rollouts_for, run_mode, update_case

from multiproc import spawn

pytestmark = pytest.mark.multiproc


def test_exchange_returns_the_teachers_own_computation():
    res = spawn(
        exchange_round_trip, 2, ["branches=[{name: a, data: arith}, {name: b, data: reverse}]"]
    )
    by = {r["branch"]: r for r in res}
    for student, teacher in (("a", "b"), ("b", "a")):
        logp, topk = by[student]["received"][teacher]
        t_logp, t_topk = by[teacher]["local"][student]
        assert torch.equal(
            by[teacher]["incoming"][student][:, 2:], rollouts_for("ab".index(student))[0]
        )
        assert (logp - t_logp).abs().max() <= 1e-6
        assert torch.equal(topk, t_topk)
        assert logp.shape == (3, 9) and topk.shape == (3, 9, 10)
        assert torch.isfinite(logp).all() and (logp[:, 1:] < 0).all()
    # the two branches hold different weights, so their scores differ
    assert not torch.allclose(by["a"]["received"]["b"][0], by["b"]["received"]["a"][0])


def test_hub_and_spoke_three_branches_both_ways():
    res = spawn(exchange_round_trip, 3, [THREE, "teaching.graph=hub_spoke", "teaching.hub=text"])
    by = {r["branch"]: r for r in res}
    assert set(by["text"]["received"]) == {"image", "video"}
    assert set(by["text"]["local"]) == {"image", "video"}
    for spoke in ("image", "video"):
        assert set(by[spoke]["received"]) == {"text"}  # spokes never teach each other
        assert (
            by["text"]["received"][spoke][0] - by[spoke]["local"]["text"][0]
        ).abs().max() <= 1e-6
        assert (
            by[spoke]["received"]["text"][0] - by["text"]["local"][spoke][0]
        ).abs().max() <= 1e-6


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [3.0, 1.0, 0.0]])
def test_merge_equals_weighted_mean(weights):
    res = spawn(merge_case, 3, [THREE], weights)
    total = sum(weights)
    for name in res[0]["before"]:
        expected = sum(w / total * r["before"][name] for w, r in zip(weights, res, strict=True))
        for r in res:
            assert (r["after"][name] - expected).abs().max() < 1e-6, name
    assert not torch.equal(res[0]["before"][name], res[1]["before"][name])


TINY = [
    "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=1",
    "model.max_seq_length=48", "data.n_train=64", "data.n_eval=8",
    "rollout.prompts_per_step=2", "rollout.max_new_tokens=4", "grpo.group_size=2",
    "opd.prompts_per_peer=2", "opd.samples_per_prompt=1", "schedule.cycles=1",
    "schedule.rl_steps=1", "schedule.opd_steps=1", "logging.progress=false",
]  # fmt: skip
TWO = "branches=[{name: arith, data: arith}, {name: reverse, data: reverse}]"
MODES = {
    "copd": (2, [TWO, "schedule.mode=copd"]),
    "expert": (2, [TWO, "schedule.mode=expert", "rollout.tis_cap=2.0"]),
    "mixed": (1, ["branches=[{name: mixed, data: arith+reverse}]", "schedule.mode=mixed",
                  "teaching.graph=none"]),
    "static_opd": (2, [TWO, "schedule.mode=static_opd", "schedule.student=arith"]),
    "mopd": (3, [THREE, "schedule.mode=mopd", "schedule.student=text"]),
}  # fmt: skip


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_runs_end_to_end(mode, tmp_path):
    nproc, extra = MODES[mode]
    table = spawn(run_mode, nproc, [*TINY, *extra, f"run_dir={tmp_path}"])[0]
    assert "base" in table and any(k.startswith("merged") or k.startswith("final") for k in table)
    assert json.loads((tmp_path / "eval.json").read_text()) == table
    assert (tmp_path / "final" / "model" / "config.yaml").exists()
    assert "time/final_eval" in json.loads((tmp_path / "timings.json").read_text())
    rows = [json.loads(line) for p in (tmp_path / "metrics").glob("*.jsonl")
            for line in p.read_text().splitlines()]  # fmt: skip
    opd_rows = [r for r in rows if r["phase"] == "opd" and r["learner"]]
    learned = [r for r in rows if r["learner"]]
    # fp32: the sampler's log-probs (KV cache) equal the trainer's (full forward) per token
    assert learned and all(0.0 <= r["rollout/logp_gap"] < 1e-4 for r in learned)
    if mode == "expert":  # truncated importance sampling on: weights min(ratio, 2) are ~1
        assert all(abs(r["rollout/tis_weight"] - 1.0) < 1e-4 for r in learned)
    if mode in ("copd", "static_opd", "mopd"):
        assert opd_rows and all(any(k.endswith("/overlap") for k in r) for r in opd_rows)
        assert all(any(k.endswith("/delta") for k in r) for r in opd_rows)
    else:
        assert not any(k.startswith("edge/") for r in rows for k in r)
    if mode == "mopd":  # the student learns from both frozen teachers
        student = [r for r in opd_rows if r["branch"] == "text"]
        assert any(
            "edge/text<-image/overlap" in r and "edge/text<-video/overlap" in r for r in student
        )
        assert not [r for r in opd_rows if r["branch"] != "text"]
    assert Path(tmp_path / "final" / "model").is_dir()


def test_kl_to_reference_and_several_updates_per_batch(tmp_path):
    extra = ["branches=[{name: arith, data: arith}]", "schedule.mode=expert",
             "teaching.graph=none", "grpo.kl_coef=0.1", "grpo.updates_per_batch=2",
             "optim.lr=0.01", f"run_dir={tmp_path}"]  # fmt: skip
    first, second = spawn(update_case, 1, [*TINY, *extra])[0]
    # first batch: the policy starts at the reference; its 2nd update sees a moved policy
    # against the batch's fixed old log-probs, so the ratio departs from 1 (approx_kl != 0)
    assert first["approx_kl"] != 0.0
    assert second["kl_to_ref"] > 0.0  # after the first batch's steps the policy left the reference
