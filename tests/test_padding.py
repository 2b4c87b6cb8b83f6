"""Rows padded per micro-batch, mixed text/media updates, and megatron's memory settings
(sequence parallelism, selective and full activation recompute): each equal to the plain
single-rank forward/backward (the real megatron model on gloo)."""

import pytest
import torch
from padding_cases import LENGTHS, WIDTH, mixed_update, trimmed_gradients
from test_dp_exact import _check, check_grads

from copd_mega.config import ConfigError, load_config
from multiproc import spawn

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


@pytest.mark.multiproc
def test_micro_batches_cut_to_their_longest_row_equal_full_width(reference):
    (one,) = spawn(trimmed_gradients, 1, LAYERS, True)
    assert one["widths"] == [max(LENGTHS[i : i + 2]) for i in range(0, 6, 2)] == [12, 9, 11]
    _same(reference, [one])


@pytest.mark.multiproc
@pytest.mark.parametrize("shape", [["parallel.pp=2"], ["parallel.tp=2", "parallel.pp=2"]],
                         ids=["pp2", "tp2_pp2"])  # fmt: skip
def test_variable_widths_at_pp2_equal_one_rank(reference, shape):
    """megatron's variable sequence lengths: each micro-batch's activation shape goes between
    the stages before the activation."""
    res = spawn(trimmed_gradients, 2 * len(shape), [*LAYERS, *shape], True)
    assert {tuple(r["widths"]) for r in res} == {(12, 9, 11)}
    _same(reference, res)


@pytest.mark.multiproc
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
    check_grads(ref, res, rel=1e-4, tied=False)


@pytest.mark.multiproc
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


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["parallel.recompute=some"], "parallel.recompute"),
        (["parallel.recompute_modules=[layernorm]"], "parallel.recompute_modules"),
        (["parallel.recompute=full", "parallel.recompute_num_layers=0"],
         "parallel.recompute_num_layers"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
        (["parallel.sequence_parallel=true", "parallel.tp=2", "vision.enabled=true"],
         "parallel.sequence_parallel"),
        (["rollout.logprob_chunk=-1"], "rollout.logprob_chunk"),
    ],
)  # fmt: skip
def test_memory_settings_are_checked(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_memory_plan_counts_recompute_and_sequence_parallelism():
    from copd_mega.launch.memory import memory_parts

    base = ["parallel.tp=2", "model.num_layers=4", "parallel.micro_batch_size=2"]

    def act(*extra: str) -> tuple[str, float]:
        (part,) = [p for p in memory_parts(load_config(None, [*base, *extra]))
                   if p.name.startswith("activations")]  # fmt: skip
        return part.name, part.bytes

    name, plain = act()
    assert name == "activations (no recompute)"
    sel_name, selective = act("parallel.recompute=selective",
                              "parallel.recompute_modules=[core_attn,mlp]")  # fmt: skip
    full_name, full = act("parallel.recompute=full")
    sp_name, sp = act("parallel.sequence_parallel=true")
    assert "selective recompute: core_attn, mlp" in sel_name and "full recompute" in full_name
    assert "sequence parallel" in sp_name
    assert plain > selective > full and plain > sp
    _, full_sp = act("parallel.recompute=full", "parallel.sequence_parallel=true")
    assert full_sp < full


def test_logprob_chunk_is_sized_from_memory():
    from copd_mega.rl.logprobs import logprob_chunk

    cfg = load_config(None, ["model.vocab_size=1000", "model.pad_vocab_to=128", "parallel.tp=2",
                             "parallel.micro_batch_size=4", "rollout.logprob_chunk_mib=1"])  # fmt: skip
    v_local = 1024 // 2  # vocabulary padded to 128 * TP, split over TP
    assert logprob_chunk(cfg) == 2**20 // (4 * v_local * 4 * 2) == 64
    bigger = load_config(None, ["model.vocab_size=1000", "model.pad_vocab_to=128", "parallel.tp=2",
                                "parallel.micro_batch_size=4", "rollout.logprob_chunk_mib=8"])  # fmt: skip
    assert logprob_chunk(bigger) == 8 * 64
    fixed = load_config(None, ["rollout.logprob_chunk=7"])
    assert logprob_chunk(fixed) == 7


def test_row_media_slices_and_device_inputs_equal_the_list_path():
    from copd_mega.models.multimodal import RowMedia
    from copd_mega.models.vlm_inputs import batch_inputs, prepare_inputs

    cfg = load_config(None, ["vision.enabled=true", "vision.image_size=16", "vision.patch_size=8",
                             "model.max_seq_length=64"])  # fmt: skip
    g = torch.Generator().manual_seed(0)
    img = lambda: torch.rand(3, 16, 16, generator=g)  # noqa: E731
    media = [[img()], [], [img(), torch.rand(2, 3, 16, 16, generator=g)], [img()]]
    rm = RowMedia.from_lists(media, 16)
    for start, end in [(0, 4), (1, 3), (2, 4), (3, 3)]:
        part = rm.rows(start, end)
        want = RowMedia.from_lists(media[start:end], 16)
        assert torch.equal(part.pixels, want.pixels) and torch.equal(part.tiles, want.tiles)
        assert torch.equal(part.per_row, want.per_row)
    order = [2, 0, 3, 1]
    sel = rm.select(order)
    want = RowMedia.from_lists([media[i] for i in order], 16)
    assert torch.equal(sel.pixels, want.pixels) and torch.equal(sel.tiles, want.tiles)
    prompts = [[1, 7, 20, 21], [1, 30, 31, 32, 33, 34], [1, 7, 7, 40], [1, 7, 50, 51, 52]]
    ref = prepare_inputs(cfg, prompts, media, 7)
    ids = torch.zeros(4, 6, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    got = batch_inputs(cfg, ids, rm.pixels, rm.tiles, rm.per_row, 7, [len(p) for p in prompts])
    for field in ("images", "num_image_tiles", "input_ids", "position_ids", "text_positions"):
        assert torch.equal(getattr(got, field), getattr(ref, field)), field
    # the widest row: 6 ids, an image (4 positions for 1 id) and a 2-frame video (8 for 1)
    assert got.combined_length == ref.combined_length == 6 + (4 - 1) + (2 * 4 - 1)
