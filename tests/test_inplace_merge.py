"""In-place merge on the fp32 masters (bf16 model, TP2 x DP2, two branches), per optimizer-state
policy: masters equal the weighted mean; the bf16 weights are the rounded masters; the moments
are averaged / zeroed / kept; a step after the merge equals the step of a job restored from the
checkpoint saved right after it."""

import pytest
import torch
from exact_cases import merge_policies

from multiproc import spawn

pytestmark = pytest.mark.multiproc
TWO = "branches=[{name: a, data: arith}, {name: b, data: reverse}]"
SHAPE = [TWO, "model.dtype=bf16", "parallel.tp=2", "parallel.dp=2", "optim.lr=0.01"]


def test_fp32_master_merge_average_and_restore(tmp_path):
    _check_policies(tmp_path, ["average"])


@pytest.mark.slow
def test_fp32_master_merge_reset_keep_and_restore(tmp_path):
    _check_policies(tmp_path, ["reset", "keep"])


def _check_policies(tmp_path, policies: list[str]) -> None:
    weights = [3.0, 1.0]
    res = spawn(merge_policies, 8, SHAPE, weights, str(tmp_path), policies, timeout=900)
    w = [x / sum(weights) for x in weights]
    peers: dict = {}
    for r in res:
        peers.setdefault(r["coord"], {})[r["branch"]] = r
    assert len(peers) == 4 and all(len(p) == 2 for p in peers.values())
    for policy in policies:
        for pair in peers.values():
            a, b = pair[0][policy], pair[1][policy]
            assert not all(torch.equal(x, y) for x, y in zip(a["before"], b["before"], strict=True))
            for i, (x, y) in enumerate(zip(a["before"], b["before"], strict=True)):
                want = w[0] * x + w[1] * y
                for r in (a, b):
                    assert (r["after"][i] - want).abs().max() <= 1e-6, (policy, i)
            for r, own in ((a, a), (b, b)):
                assert r["rounded"], policy  # bf16 weights are the merged masters, rounded
                for i, m in enumerate(r["moments_after"]):
                    if policy == "average":
                        want = w[0] * a["moments"][i] + w[1] * b["moments"][i]
                    elif policy == "reset":
                        want = torch.zeros_like(m)
                    else:
                        want = own["moments"][i]
                    assert (m - want).abs().max() <= 1e-6 * want.abs().max() + 1e-30, policy
        for r in res:
            p = r[policy]
            for k, v in p["merged_params"].items():  # every branch holds the merged weights
                assert torch.equal(v, peers[r["coord"]][0][policy]["merged_params"][k]), k
            for k, v in p["stepped"].items():
                assert torch.equal(v, p["restored"][k]), (policy, k)
            assert any(not torch.equal(p["stepped"][k], v) for k, v in p["merged_params"].items())
