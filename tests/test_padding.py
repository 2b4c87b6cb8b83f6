"""Rows padded per micro-batch, mixed text/media updates, and megatron's memory settings
(sequence parallelism, selective and full activation recompute): each equal to the plain
single-rank forward/backward (the real megatron model on gloo)."""

import pytest
import torch
from padding_cases import LENGTHS, WIDTH, mixed_update, trimmed_gradients
from test_dp_exact import _check

from copd_mega.models.gpt import tp_slice
from multiproc import spawn

pytestmark = pytest.mark.multiproc
LAYERS = ["model.num_layers=2"]


@pytest.fixture(scope="module")
def reference():
    """One rank, every micro-batch at the full width, no recompute, no sequence parallelism."""
    (ref,) = spawn(trimmed_gradients, 1, LAYERS, False)
    assert ref["widths"] == [WIDTH] * 3 and ref["norm"] > 0
    return ref


def _same(ref: dict, results: list[dict]) -> None:
    for r in results:
        _check(ref, r)
        if r["last_stage"]:
            assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_micro_batches_cut_to_their_longest_row_equal_full_width(reference):
    (one,) = spawn(trimmed_gradients, 1, LAYERS, True)
    assert one["widths"] == [max(LENGTHS[i : i + 2]) for i in range(0, 6, 2)] == [12, 9, 11]
    _same(reference, [one])


def test_variable_widths_at_tp2_pp2_equal_one_rank(reference):
    """megatron's variable sequence lengths: each micro-batch's activation shape goes between
    the stages before the activation."""
    res = spawn(trimmed_gradients, 4, [*LAYERS, "parallel.tp=2", "parallel.pp=2"], True)
    assert {tuple(r["widths"]) for r in res} == {(12, 9, 11)}
    _same(reference, res)


@pytest.mark.parametrize(
    "settings",
    [
        ["parallel.sequence_parallel=true"],
        ["parallel.recompute=selective", "parallel.recompute_modules=[core_attn,mlp]"],
        ["parallel.recompute=full", "parallel.recompute_num_layers=1"],
        ["parallel.recompute=full", "parallel.recompute_num_layers=2",
         "parallel.sequence_parallel=true"],
    ],
    ids=["sequence_parallel", "selective", "full", "full_and_sequence_parallel"],
)  # fmt: skip
def test_memory_settings_at_tp2_equal_the_plain_forward_backward(reference, settings):
    """Trimmed micro-batches of odd widths (9, 11) are padded to a multiple of TP under
    sequence parallelism; the model runs without it again after the update."""
    res = spawn(trimmed_gradients, 2, [*LAYERS, "parallel.tp=2", *settings], True)
    recompute = [s.split("=")[1] for s in settings if s.startswith("parallel.recompute=")]
    for r in res:
        assert r["recompute"] == (recompute[0] if recompute else None)
        assert r["sp_after"] is False
        assert r["widths"] == [12, 9, 11]
    _same(reference, res)


def _vlm_check(ref: dict, res: dict) -> None:
    for name, g in res["grads"].items():
        want = ref["grads"][name]
        split, dim, stride = res["meta"][name]
        if split and res["tp"] > 1:
            rows = g.shape[dim] * res["tp"] - want.shape[dim]  # vocabulary padding grows with TP
            if rows:
                want = torch.cat([want, want.new_zeros(rows, *want.shape[1:])], dim=dim)
            want = tp_slice(want, res["tp"], res["tp_rank"], dim, stride)
        assert g.shape == want.shape, name
        err = (g - want).abs().max().item()
        assert err <= 1e-4 * max(want.abs().max().item(), 1e-6), (name, err)


def test_mixed_text_and_image_rows_fit_and_tp2_equals_one_rank():
    """A 12-token image row fits alone (15 positions of 40); padded to the 40-token text row's
    width it would need 43 > 40. In one update with that text row it runs, its log-probs equal
    its log-probs alone, and TP2 gives the single-rank loss and gradients."""
    (one,) = spawn(mixed_update, 1, [])
    assert (
        "needs 43 positions" in one["padded_error"] and "max_seq_length=40" in one["padded_error"]
    )
    assert one["width"] == 40 and one["units"] > 0
    torch.testing.assert_close(one["mixed"][:12], one["alone"][:12], rtol=1e-5, atol=1e-5)
    assert one["alone"][1:12].abs().min() > 0  # real log-probs at every position past <bos>
    for r in spawn(mixed_update, 2, ["parallel.tp=2"]):
        assert r["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert r["units"] == one["units"]
        torch.testing.assert_close(r["mixed"], one["mixed"], rtol=1e-4, atol=1e-5)
        _vlm_check(one, r)
