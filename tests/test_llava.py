"""Vision-language model: HF LLaVA import/export round trips, logits equal HF at TP1 and TP2,
text-only prompts equal the HF language model, TP2 equals TP1 from the same seeded init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llava_cases import (
    TILE_TOKENS,
    hf_inputs,
    hf_logits,
    make_hf_llava,
    prompts,
    save_hf_llava,
    tokenizer_ids,
    vlm_worker,
)

from multiproc import spawn

pytestmark = pytest.mark.multiproc
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_hf_llava(make_hf_llava(seed=0), tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory) -> Path:
    from copd_mega.hf.llava import import_llava

    return import_llava(hf_dir, tmp_path_factory.mktemp("ckpt") / "vlm", progress=False)


@pytest.fixture(scope="module")
def runs(imported, tmp_path_factory) -> dict:
    """Megatron logits at TP1 and TP2 (imported and fresh), a fresh checkpoint saved at TP2."""
    fresh = tmp_path_factory.mktemp("fresh") / "tp2"
    rank0, rank1 = spawn(vlm_worker, 2, str(imported), str(fresh))
    for a, b in zip(rank0["tp2"]["fresh"], rank1["tp2"]["fresh"], strict=True):
        assert torch.equal(a, b)  # every TP rank holds the gathered logits
    return {**rank0, "fresh_ckpt": fresh}


def test_imported_config(imported):
    from copd_mega.ckpt.checkpoint import CONFIG_FILE
    from copd_mega.config import load_config
    from copd_mega.models.vlm_inputs import image_token_count

    cfg = load_config(imported / CONFIG_FILE)
    assert cfg.vision.enabled and (cfg.vision.image_size, cfg.vision.patch_size) == (32, 8)
    assert (cfg.model.num_query_groups, cfg.vision.num_layers) == (2, 2)
    assert image_token_count(cfg) == TILE_TOKENS
    assert (imported / "tokenizer.json").is_file()


@pytest.mark.parametrize("tp", ["tp1", "tp2"])
@pytest.mark.parametrize("sample", [0, 1, 2], ids=["image", "text_only", "video"])
def test_imported_logits_match_hf(hf_dir, runs, tp, sample):
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(str(hf_dir), attn_implementation="eager")
    ref = hf_logits(hf.eval(), sample)
    got = runs[tp]["imported"][sample]
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < TOL


def test_text_only_equals_hf_language_model(hf_dir, runs):
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(str(hf_dir), attn_implementation="eager")
    ids, _ = hf_inputs(1)
    with torch.no_grad():
        hidden = hf.model.language_model(input_ids=ids).last_hidden_state
        ref = hf.lm_head(hidden)[0]
    assert (runs["tp1"]["imported"][1] - ref).abs().max().item() < TOL


def test_tp2_fresh_init_equals_tp1(runs):
    for a, b in zip(runs["tp1"]["fresh"], runs["tp2"]["fresh"], strict=True):
        assert (a - b).abs().max().item() < 1e-5


def test_branch_model_steps_on_text_only_and_mixed_batches(runs):
    for tp in ("tp1", "tp2"):
        train = runs[tp]["train"]
        assert all(ok and torch.isfinite(torch.tensor(n)) for ok, n in train["norms"])
        assert not train["text_only_moved_vit"] and train["mixed_moved_vit"]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_export_gives_back_original_tensors(hf_dir, imported, tmp_path):
    from transformers import AutoImageProcessor, AutoProcessor, LlavaForConditionalGeneration

    from copd_mega.hf.llava import main

    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(imported), "--out", str(out), "--no-progress"]) == 0
    orig = _state(LlavaForConditionalGeneration.from_pretrained(str(hf_dir)))
    back = _state(LlavaForConditionalGeneration.from_pretrained(str(out)))
    assert sorted(orig) == sorted(back)
    for k in orig:
        assert torch.equal(orig[k], back[k]), k
    config = json.loads((out / "config.json").read_text())
    assert config["vision_feature_layer"] == -1
    assert config["vision_feature_select_strategy"] == "default"
    assert config["image_token_index"] == tokenizer_ids()["image"]
    _check_processors(out, AutoImageProcessor, AutoProcessor)


def test_export_from_a_dict_of_global_tensors(imported, tmp_path):
    from safetensors.torch import load_file

    from copd_mega.ckpt.offline import CheckpointReader
    from copd_mega.hf.llava import export_llava

    reader = CheckpointReader(imported)
    state = reader.read(dict.fromkeys(reader.specs))
    a = export_llava(imported, tmp_path / "a", progress=False)
    b = export_llava(
        state,
        tmp_path / "b",
        reader.config(),
        image_token_id=tokenizer_ids()["image"],
        progress=False,
    )
    ta, tb = (load_file(str(d / "model-00001-of-00001.safetensors")) for d in (a, b))
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def _check_processors(out: Path, auto_image, auto_processor) -> None:
    """The exported image processor normalises as the model expects; the processor expands
    one <image> to the image's tokens."""
    import numpy as np
    from PIL import Image

    from copd_mega.models.vlm_inputs import normalize_images

    pixels = (torch.rand(3, 32, 32) * 255).round().to(torch.uint8)
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    got = auto_image.from_pretrained(str(out))(image, return_tensors="pt")["pixel_values"]
    want = normalize_images(pixels.float().unsqueeze(0) / 255)
    assert (torch.as_tensor(np.asarray(got)) - want).abs().max().item() < 1e-5
    enc = auto_processor.from_pretrained(str(out))(
        text="<image>ab", images=image, return_tensors="pt"
    )
    assert int((enc["input_ids"] == tokenizer_ids()["image"]).sum()) == TILE_TOKENS


def test_export_of_megatron_tp2_checkpoint_matches_megatron_logits(runs, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from copd_mega.hf.llava import export_llava

    out = export_llava(runs["fresh_ckpt"], tmp_path / "hf", progress=False)
    hf = LlavaForConditionalGeneration.from_pretrained(str(out), attn_implementation="eager")
    for sample in range(len(prompts()[0])):
        ref = hf_logits(hf.eval(), sample)
        assert (runs["tp1"]["fresh"][sample] - ref).abs().max().item() < TOL


def test_prepare_inputs_positions_and_errors():
    from copd_mega.config import load_config
    from copd_mega.models.vlm_inputs import PLACEHOLDER, prepare_inputs, with_placeholders

    cfg = load_config(None, ["vision.enabled=true", "model.vocab_size=101"])
    ids, items = prompts()
    img = tokenizer_ids()["image"]
    batch = prepare_inputs(cfg, ids, items, img)
    assert batch.images.shape == (3, 3, 32, 32) and batch.num_image_tiles.tolist() == [1, 2]
    assert batch.combined_length == 1 + 2 * TILE_TOKENS + 5  # padded to 7 tokens
    assert batch.text_positions[0, :3].tolist() == [0, TILE_TOKENS, TILE_TOKENS + 1]
    assert (batch.input_ids == PLACEHOLDER).sum() == 2
    assert with_placeholders([1, 9], 2, img, bos_id=1) == [1, img, img, 9]
    with pytest.raises(ValueError, match="placeholders"):
        prepare_inputs(cfg, [ids[0]], [[]], img)
    with pytest.raises(ValueError, match="vision.image_size"):
        prepare_inputs(cfg, [ids[0]], [[torch.rand(3, 16, 16)]], img)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prepare_inputs(cfg, [ids[0]], [[torch.rand(3, 32, 32) * 255]], img)
    short = load_config(
        None, ["vision.enabled=true", "model.vocab_size=101", "model.max_seq_length=16"]
    )
    with pytest.raises(ValueError, match="model.max_seq_length"):
        prepare_inputs(short, [ids[0]], [items[0]], img)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy"),
        ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
        ({"vision_config": {"hidden_act": "gelu"}}, "hidden_act"),
        ({"vision_feature_layer": [-2, -1]}, "vision_feature_layer"),
    ],
)
def test_import_refuses_what_the_model_cannot_express(hf_dir, tmp_path, change, message):
    import shutil

    from copd_mega.config_hf import UnsupportedHFModel
    from copd_mega.hf.llava import import_llava

    work = tmp_path / "hf"
    shutil.copytree(hf_dir, work)
    config = json.loads((work / "config.json").read_text())
    for key, value in change.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    (work / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedHFModel, match=message):
        import_llava(work, tmp_path / "ckpt", progress=False)


def test_penultimate_feature_layer_imports_as_a_shorter_vit(tmp_path):
    """HF's vision_feature_layer=-2 (LLaVA-1.5's choice) keeps the ViT layers up to it."""
    from llava_cases import imported_logits_worker
    from transformers import LlavaForConditionalGeneration

    from copd_mega.config import load_config
    from copd_mega.hf.llava import import_llava

    hf_dir = save_hf_llava(
        make_hf_llava(seed=1, feature_layer=-2, layers=3, tied=True), tmp_path / "hf"
    )
    ckpt = import_llava(hf_dir, tmp_path / "ckpt", progress=False)
    cfg = load_config(ckpt / "config.yaml")
    assert cfg.vision.num_layers == 2 and cfg.model.tie_embeddings
    (got,) = spawn(imported_logits_worker, 1, str(ckpt))
    hf = LlavaForConditionalGeneration.from_pretrained(str(hf_dir), attn_implementation="eager")
    for sample in range(len(prompts()[0])):
        assert (got[sample] - hf_logits(hf.eval(), sample)).abs().max().item() < TOL


def test_cli_dispatches_llava_both_ways(hf_dir, imported, tmp_path):
    """`copd import-hf` on an HF LLaVA dir and `copd export-hf` on a VLM checkpoint use LLaVA."""
    from copd_mega.hf.export import main as export_main
    from copd_mega.hf.importer import main as import_main

    ckpt = tmp_path / "ckpt"
    assert import_main(["--hf", str(hf_dir), "--out", str(ckpt), "--no-progress"]) == 0
    out = tmp_path / "hf"
    assert export_main(["--ckpt", str(ckpt), "--out", str(out), "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
