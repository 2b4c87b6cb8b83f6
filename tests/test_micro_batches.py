"""copd_mega.rl.micro_batches: the micro-batching driver every engine shares (pure, no model).

The Megatron samplers run through it in test_rollout.py, test_rollout_pp.py and
test_vlm_rollout.py; here an engine whose output is a function of each row's prompt and draws
checks the slicing, the draws each row gets and the reassembly in prompt order.
"""

from __future__ import annotations

import pytest
import torch

from copd_mega.rl.micro_batches import (
    MicroBatch,
    generate_in_micro_batches,
    generation_mode,
    length_order,
    micro_batches,
)
from copd_mega.rl.sampling import Rollouts, SamplingParams, row_uniforms

PROMPTS = [[5, 6, 7], [1], [2, 3, 4, 5, 6], [9, 9], [8], [7, 7, 7, 7]]
PAD = 99


class RecordingEngine:
    """Row k's response: ``len(prompt) + 1`` tokens ``[prompt[0], draw id, ...]`` with log-prob
    = its first draw, so the output shows which draws reached which row; widths differ per
    micro-batch (its longest row), so reassembly must pad."""

    def __init__(self):
        self.batches: list[MicroBatch] = []

    def __call__(self, mb: MicroBatch) -> Rollouts:
        self.batches.append(mb)
        n = len(mb.rows)
        resp = [len(p) + 1 for p in mb.prompts]
        width = max(len(p) + r for p, r in zip(mb.prompts, resp, strict=True))
        tokens = torch.full((n, width), PAD, dtype=torch.long)
        logp = torch.zeros(n, width)
        for k, (p, r) in enumerate(zip(mb.prompts, resp, strict=True)):
            tokens[k, : len(p)] = torch.tensor(p)
            tokens[k, len(p) : len(p) + r] = mb.rows[k]
            if mb.uniforms is not None:
                logp[k, len(p)] = float(mb.uniforms[k, 0])
        plen = torch.tensor([len(p) for p in mb.prompts])
        return Rollouts(tokens, plen, plen + torch.tensor(resp), logp)


def test_length_order_is_stable_and_slices_keep_it():
    order = length_order(PROMPTS)
    assert order == [1, 4, 3, 0, 5, 2]  # 1 and 4 both length 1: call order kept
    assert list(micro_batches(order, 4)) == [[1, 4, 3, 0], [5, 2]]
    assert list(micro_batches(order, 10)) == [order]


@pytest.mark.parametrize("size", [1, 2, 4, 6, 64])
def test_rows_come_back_in_prompt_order_with_their_own_draws(size):
    params = SamplingParams(max_new_tokens=5, pad_id=PAD)
    engine = RecordingEngine()
    r = generate_in_micro_batches(PROMPTS, params, 3, 1, size, engine, torch.device("cpu"))
    assert [len(b.rows) for b in engine.batches] == [min(size, 6 - i) for i in range(0, 6, size)]
    for mb in engine.batches:  # each micro-batch: its rows' prompts and row_uniforms draws
        assert mb.prompts == [PROMPTS[j] for j in mb.rows]
        assert torch.equal(mb.uniforms, row_uniforms(3, 1, mb.rows, 5))
    draws = row_uniforms(3, 1, list(range(6)), 5)
    width = max(2 * len(p) + 1 for p in PROMPTS)
    assert r.tokens.shape == (6, width) and torch.equal(
        r.prompt_lens, torch.tensor([3, 1, 5, 2, 1, 4])
    )
    for i, p in enumerate(PROMPTS):
        n = 2 * len(p) + 1
        assert r.tokens[i].tolist() == p + [i] * (len(p) + 1) + [PAD] * (width - n)
        assert int(r.lengths[i]) == n
        assert r.sampler_logprobs[i, len(p)] == pytest.approx(float(draws[i, 0]))
        assert (r.sampler_logprobs[i, n:] == 0).all()


def test_draws_false_and_empty_call():
    params = SamplingParams(max_new_tokens=5, pad_id=PAD)
    engine = RecordingEngine()
    generate_in_micro_batches(PROMPTS, params, 3, 0, 4, engine, torch.device("cpu"), draws=False)
    assert all(b.uniforms is None for b in engine.batches)
    empty = generate_in_micro_batches([], params, 3, 0, 4, engine, torch.device("cpu"))
    assert empty.tokens.shape == (0, 0) and empty.lengths.shape == (0,)
    assert len(engine.batches) == 2  # the empty call ran nothing


def test_generation_mode_restores_train_mode_on_error():
    model = torch.nn.Linear(2, 2)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        with generation_mode(model):
            assert not model.training and not torch.is_grad_enabled()
            raise RuntimeError("boom")
    assert model.training and torch.is_grad_enabled()
    model.eval()
    with generation_mode(model):
        pass
    assert not model.training
