"""Rows of one update: GRPO rows carry no top-k; microbatches get the OPD rows' top-k only."""

import torch

from copd_mega.rl.batches import concat_rows, grpo_rows, microbatches, opd_rows


def _parts():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (2, 6), generator=g)
    grpo = grpo_rows(tokens, torch.tensor([2, 3]), torch.tensor([6, 5]), torch.tensor([1.0, -1.0]),
                     sampler_logp=-torch.rand(2, 6, generator=g))  # fmt: skip
    opd_tokens = torch.randint(1, 50, (3, 8), generator=g)
    topk = torch.arange(3 * 8 * 4).view(3, 8, 4)
    opd = opd_rows(opd_tokens, torch.tensor([2, 2, 3]), torch.tensor([8, 7, 8]),
                   -torch.rand(3, 8, generator=g), topk, 0.5, edge=1,
                   sampler_logp=-torch.rand(3, 8, generator=g))  # fmt: skip
    return grpo, opd, topk


def test_grpo_rows_carry_no_top_k_and_concat_keeps_only_opd_top_k():
    grpo, opd, topk = _parts()
    assert grpo.teacher_topk is None and grpo.row_edges == [-1, -1]
    rows = concat_rows([grpo, opd], pad_id=0)
    assert rows.tokens.shape == (5, 8) and rows.teacher_topk.shape == (3, 8, 4)
    assert torch.equal(rows.teacher_topk, topk)
    assert rows.row_edges == [-1, -1, 1, 1, 1]
    assert torch.equal(rows.edge, torch.tensor([-1, -1, 1, 1, 1]))
    assert rows.sampler_logp.shape == (5, 8) and (rows.sampler_logp[:2, 6:] == 0).all()
    no_sampler = grpo_rows(grpo.tokens, torch.tensor([2, 3]), torch.tensor([6, 5]), grpo.adv)
    assert concat_rows([no_sampler, opd]).sampler_logp is None


def test_microbatches_slice_the_opd_rows_top_k():
    grpo, opd, topk = _parts()
    mbs = microbatches(concat_rows([grpo, opd]), 3, torch.device("cpu"))
    assert [mb["opd_rows"] for mb in mbs] == [[2], [0, 1]]
    assert [mb["edges"] for mb in mbs] == [[1], [1]]
    assert torch.equal(mbs[0]["teacher_topk"], topk[:1])
    assert torch.equal(mbs[1]["teacher_topk"], topk[1:])
    assert "sampler_logp" in mbs[0] and mbs[1]["tokens"].shape == (2, 8)
    only_grpo = microbatches(grpo, 3, torch.device("cpu"))
    assert only_grpo[0]["opd_rows"] == [] and "teacher_topk" not in only_grpo[0]
