"""DP-exact gradients: a global batch split over DP ranks gives the single-rank gradients.

Compares the reduced gradients themselves (and megatron's grad norm), not an optimizer step:
one Adam step from zero state is blind to a gradient scale factor.
"""

import pytest
import torch
from exact_cases import dp_gradients

from copd_mega.models.gpt import tp_slice
from multiproc import spawn

pytestmark = pytest.mark.multiproc
LAYERS = ["model.num_layers=2"]


def _reference():
    (ref,) = spawn(dp_gradients, 1, LAYERS)
    return ref


def check_grads(ref: dict, res: dict, rel: float = 1e-5, tied: bool = True) -> None:
    """Every gradient shard of ``res`` (one rank's, at any TP) equals the slice of the one-rank
    reference ``ref`` it holds, within ``rel`` of the tensor's largest value; ``tied``: the
    output layer's gradient is the (tied) embedding's."""
    for name, g in res["grads"].items():
        key = "embedding.word_embeddings.weight" if tied and name == "output_layer.weight" else name
        want = ref["grads"][key]
        split, dim, stride = res["meta"][name]
        if split and res["tp"] > 1:
            rows = g.shape[dim] * res["tp"] - want.shape[dim]  # vocabulary padding grows with TP
            if rows:
                want = torch.cat([want, want.new_zeros(rows, *want.shape[1:])], dim=dim)
            want = tp_slice(want, res["tp"], res["tp_rank"], dim, stride)
        assert g.shape == want.shape, name
        err = (g - want).abs().max().item()
        assert err <= rel * max(want.abs().max().item(), 1e-6), (name, err)


def _check(ref: dict, res: dict) -> None:
    assert abs(res["norm"] - ref["norm"]) <= 1e-5 * ref["norm"], (res["norm"], ref["norm"])
    check_grads(ref, res)


def test_dp2_gradients_equal_dp1():
    ref = _reference()
    assert ref["norm"] > 0
    for res in spawn(dp_gradients, 2, [*LAYERS, "parallel.dp=2"]):
        _check(ref, res)


def test_tp2_pp2_dp2_gradients_equal_dp1():
    ref = _reference()
    res = spawn(dp_gradients, 8, [*LAYERS, "parallel.tp=2", "parallel.pp=2", "parallel.dp=2"])
    for r in res:
        _check(ref, r)
    assert sum(len(r["grads"]) for r in res) > 0
    assert torch.isfinite(torch.tensor([r["norm"] for r in res])).all()
