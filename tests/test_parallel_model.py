"""Megatron GPTModel on gloo: TP invariance, PP equivalence, branch isolation."""

import pytest
import torch

from multiproc import spawn
from parallel_cases import isolation, pp_training, reference_step, tp_logits

pytestmark = pytest.mark.multiproc
TWO_BRANCHES = "branches=[{name: a, data: arith}, {name: b, data: reverse}]"


def test_two_branches_tp2_match_tp1():
    ((ref_name, ref),) = spawn(tp_logits, 1, [])
    results = spawn(tp_logits, 4, [TWO_BRANCHES, "parallel.tp=2"])
    assert [r[0] for r in results] == ["a", "a", "b", "b"]
    for _, logits in results:
        assert (logits - ref).abs().max().item() < 1e-5


def test_pp2_schedule_matches_pp1():
    overrides = ["model.num_layers=4", "optim.lr=0.01"]
    (pp1,) = spawn(pp_training, 1, overrides)
    first, last = spawn(pp_training, 2, [*overrides, "parallel.pp=2"])
    assert first == [] and len(last) == 3
    assert pp1[0] > pp1[-1], "loss should fall over 3 steps"
    for a, b in zip(pp1, last, strict=True):
        assert abs(a - b) < 1e-5


def test_branch_isolation_and_dp_reduction_inside_branch():
    overrides = [TWO_BRANCHES, "parallel.dp=2", "optim.lr=0.01"]
    res = spawn(isolation, 4, overrides)
    a0, a1, b0, b1 = res
    assert (a0["branch"], b0["branch"]) == ("a", "b")
    for b in (b0, b1):  # A's step left B bit-identical
        for k in b["initial"]:
            assert torch.equal(b["initial"][k], b["after_a"][k]), k
    for k in a0["initial"]:  # A moved; its DP ranks agree exactly
        assert torch.equal(a0["final"][k], a1["final"][k])
        assert torch.equal(b0["final"][k], b1["final"][k])
    assert any(not torch.equal(a0["final"][k], a0["initial"][k]) for k in a0["initial"])
    # A's DP-reduced step equals one rank stepping on A's two batches: reduction stayed in A.
    (ref_a,) = spawn(reference_step, 1, ["optim.lr=0.01"], [0, 1])
    (ref_b,) = spawn(reference_step, 1, ["optim.lr=0.01"], [100, 101])
    for k in ref_a:
        assert (a0["final"][k] - ref_a[k]).abs().max() < 1e-6, k
        assert (b0["final"][k] - ref_b[k]).abs().max() < 1e-6, k
