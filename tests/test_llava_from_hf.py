"""A run that starts from an HF LLaVA directory (``checkpoint.init_from_hf``): shape, image token,
feature layer and the image processor's normalisation from its files, prompts through its chat
template; `copd train` with two vision branches, `copd export-hf`, and every original tensor and
transformers' logits come back. Also: `copd plan` names the model it starts from (present or
not) and refuses a run that would start from random weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llava_cases import IMAGE_MEAN, IMAGE_STD, TILE_TOKENS, checkpoint_logits_worker, make_llava_dir

from multiproc import spawn

TOL = 1e-4
RUN = """\
run_dir: {run}
checkpoint: {{init_from_hf: {hf}}}
vision: {{frames_per_video: 2}}
branches: [{{name: image, data: image}}, {{name: video, data: video}}]
data: {{n_train: 32, n_eval: 4}}
rollout: {{prompts_per_step: 2, max_new_tokens: 4}}
grpo: {{group_size: 2}}
opd: {{prompts_per_peer: 2, samples_per_prompt: 1}}
schedule: {{cycles: 1, rl_steps: 1, opd_steps: 1}}
optim: {{lr: 0.003}}
eval: {{limit: 4}}
logging: {{progress: false}}
"""
ONE_BRANCH = ["branches=[{name: image, data: image}]"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_llava_dir(tmp_path_factory.mktemp("hf") / "llava")


def _copd(rank: int, argv: list[str]) -> int:
    from copd_mega.cli import main

    return main(argv)


def _state(path: Path) -> dict[str, torch.Tensor]:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_config_is_read_from_the_llava_dir(hf_dir, tmp_path, capsys):
    from copd_mega.config import ConfigError, load_config
    from copd_mega.launch.plan import main as plan_main

    cfg = load_config(None, [f"checkpoint.init_from_hf={hf_dir}", *ONE_BRANCH])
    v, m = cfg.vision, cfg.model
    hf = json.loads((hf_dir / "config.json").read_text())
    assert v.enabled and (v.image_size, v.patch_size, v.hidden_size) == (32, 8, 32)
    assert v.num_layers == 2  # of 3: vision_feature_layer=-2
    assert v.image_token_index == hf["image_token_index"]
    assert (v.image_mean, v.image_std) == (IMAGE_MEAN, IMAGE_STD)
    assert (m.vocab_size, m.num_query_groups, m.max_seq_length) == (
        hf["text_config"]["vocab_size"],
        2,
        128,
    )
    with pytest.raises(ConfigError, match=r"vision.image_size=64 but .* states 32"):
        load_config(None, [f"checkpoint.init_from_hf={hf_dir}", "vision.image_size=64"])
    with pytest.raises(ConfigError, match="vision.enabled=false"):
        load_config(None, [f"checkpoint.init_from_hf={hf_dir}", "vision.enabled=false"])
    capsys.readouterr()
    argv = ["--config", "configs/copd_8branch.yaml", "--world-size", "64", "--gpu-memory-gb", "80"]
    assert plan_main(argv) == 0  # the flagship: its HF directory is not on this machine
    out = capsys.readouterr().out
    assert "starts from HF model /models/llava-1.5-7b-hf (LLaVA); not present here" in out
    assert "fits --gpu-memory-gb 80" in out
    # pointed at this directory, the flagship's stated shape is checked against its files
    assert plan_main([*argv, f"checkpoint.init_from_hf={hf_dir}"]) == 1
    assert "model.num_layers=32 but" in capsys.readouterr().err
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(RUN.format(run=tmp_path / "run", hf=hf_dir))
    assert plan_main(["--config", str(yaml_file), "--world-size", "2"]) == 0
    assert f"starts from HF model {hf_dir} (LLaVA)\n" in capsys.readouterr().out


def test_plan_refuses_random_weights_unless_asked(capsys):
    from copd_mega.config import ConfigError, load_config
    from copd_mega.launch.plan import main as plan_main
    from copd_mega.launch.validate import validate_job

    two = "branches=[{name: a, data: arith}, {name: b, data: sort}]"
    with pytest.raises(ConfigError, match="checkpoint.random_init=true"):
        validate_job(load_config(None, [two]), 2)
    validate_job(load_config(None, [two, "checkpoint.random_init=true"]), 2)
    validate_job(load_config(None, [two, "checkpoint.init_from=runs/x/base"]), 2)
    argv = ["--config", "configs/tiny_cpu.yaml", "--world-size", "2"]
    assert plan_main([*argv, "checkpoint.random_init=false"]) == 1
    assert "would start from random weights" in capsys.readouterr().err
    assert plan_main(argv) == 0
    assert "starts from random weights (checkpoint.random_init=true)" in capsys.readouterr().out


@pytest.mark.multiproc
def test_llava_through_copd_and_back(hf_dir, tmp_path):
    """`copd train` from the HF LLaVA (2 vision branches, one RL and one OPD step each),
    `copd export-hf` of the final merged model: every original tensor comes back (the unused
    last ViT layer and the post-norm bit for bit), and transformers' logits on an image prompt
    equal the trainer's from the same checkpoint. (A random model earns no reward, so its
    advantages are 0 and the step leaves the weights as they were; exporting weights Megatron
    changed is tests/test_llava.py's TP2 case.)"""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    from copd_mega.config import DataConfig
    from copd_mega.launch.datasets import ChatCodec

    config = tmp_path / "run.yaml"
    config.write_text(RUN.format(run=tmp_path / "run", hf=hf_dir))
    assert spawn(_copd, 2, ["train", "--config", str(config)]) == [0, 0]
    final = tmp_path / "run" / "final" / "model"
    assert (final / "hf_extra.safetensors").is_file() and (final / "chat_template.jinja").is_file()
    out, untrained = tmp_path / "out", tmp_path / "untrained"
    for ckpt, dst in ((final, out), (tmp_path / "run" / "hf_init", untrained)):
        argv = ["export-hf", "--ckpt", str(ckpt), "--out", str(dst), "--no-progress"]
        assert spawn(_copd, 1, argv)[0] == 0

    orig, back, same = _state(hf_dir), _state(out), _state(untrained)
    assert sorted(orig) == sorted(back) == sorted(same)
    assert all(torch.equal(orig[k], same[k]) for k in orig)  # converted, not trained: all equal
    unused = [k for k in orig if ".layers.2." in k and "vision" in k or "post_layernorm" in k]
    assert len(unused) == 18  # 16 tensors of the unused layer, the post-norm's 2
    assert all(torch.equal(orig[k], back[k]) for k in unused)
    config_json = json.loads((out / "config.json").read_text())
    assert (
        config_json["vision_feature_layer"],
        config_json["vision_config"]["num_hidden_layers"],
    ) == (-2, 3)

    codec = ChatCodec(final, DataConfig(), vision=True)
    ids = codec.prompt_ids("Q: Which corner holds the shape?", 1)
    assert ids[0] == codec.bos and ids.count(codec.image) == 1
    pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(5))
    image = torch.as_tensor(pixels, dtype=torch.uint8)
    medium = image.permute(2, 0, 1).float() / 255
    (ours,) = spawn(checkpoint_logits_worker, 1, str(final), ONE_BRANCH, ids, [medium])

    proc = AutoImageProcessor.from_pretrained(str(out))
    pix = proc(Image.fromarray(image.numpy()), return_tensors="pt")["pixel_values"]
    expanded = [t for i in ids for t in ([i] * TILE_TOKENS if i == codec.image else [i])]
    hf = LlavaForConditionalGeneration.from_pretrained(str(out), attn_implementation="eager")
    with torch.no_grad():
        ref = hf.eval()(
            input_ids=torch.tensor([expanded]), pixel_values=torch.as_tensor(np.asarray(pix))
        ).logits[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < TOL
