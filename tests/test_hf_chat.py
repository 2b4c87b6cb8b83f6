"""Starting from an HF model directory: model.* from its config.json (``copd plan`` included),
the cached conversion, its tokenizer with chat template and end ids, reasoning-block answers."""

from __future__ import annotations

import json
import os

import pytest
from hf_tiny import make_qwen3_dir


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return make_qwen3_dir(tmp_path_factory.mktemp("hf") / "qwen3")


@pytest.mark.parametrize(
    "response,answer",
    [
        ("<think>\n12+34 is 46, or is it 47?\n</think>\n\n46", "46"),
        ("<think>\n\n</think>\n\nThe answer is 46.", "46"),
        ("<think>a</think>x<think>b</think>\\boxed{7}", "7"),
        ("<think>\nstill thinking, 46", ""),  # cut off while reasoning: no answer
        ("46", "46"),
    ],
)
def test_answer_after_reasoning_block(response, answer):
    from copd_mega.rl.rewards import extract_answer, score_one

    assert extract_answer(response) == answer
    assert score_one(response, "46", "exact") == float(answer == "46")


def test_chat_codec_uses_the_template_and_end_ids(qwen3_dir):
    from transformers import AutoTokenizer

    from copd_mega.config import DataConfig
    from copd_mega.launch.datasets import ChatCodec

    tok = AutoTokenizer.from_pretrained(qwen3_dir)
    end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    for system, thinking in [("", False), ("You are a careful solver.", True)]:
        codec = ChatCodec(qwen3_dir, DataConfig(system_prompt=system, enable_thinking=thinking))
        turns = [{"role": "system", "content": system}] if system else []
        want = tok.apply_chat_template(
            turns + [{"role": "user", "content": "12+34="}], add_generation_prompt=True,
            enable_thinking=thinking, tokenize=True, return_dict=True,
        )["input_ids"]  # fmt: skip
        assert codec.prompt_ids("12+34=") == want
        text = tok.decode(want)
        assert text.endswith(
            "<|im_start|>assistant\n" + ("" if thinking else "<think>\n\n</think>\n\n")
        )
        assert text.startswith("<|im_start|>system\n" if system else "<|im_start|>user\n12+34=")
    assert (codec.eos, codec.pad, codec.vocab_size) == ((end, pad), pad, len(tok))
    assert codec.answer_ids("46")[-1] == end
    ids = tok("<think>\nx\n</think>\n\n46", add_special_tokens=False)["input_ids"]
    assert codec.decode(ids + [pad, 5, 6]) == "<think>\nx\n</think>\n\n46"
    plain = ChatCodec(qwen3_dir, DataConfig(chat_template=False, prompt_template="Q: {prompt}"))
    assert plain.prompt_ids("12+34=") == tok("Q: 12+34=")["input_ids"]


def test_model_config_comes_from_the_hf_directory(qwen3_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from copd_mega.config import ConfigError, load_config, save_config
    from copd_mega.launch.plan import main as plan_main
    from copd_mega.models.gpt import count_parameters

    over = [f"checkpoint.init_from_hf={qwen3_dir}"]
    cfg = load_config(None, over)
    m = cfg.model
    assert (m.family, m.num_layers, m.hidden_size, m.ffn_hidden_size) == ("qwen3", 2, 64, 128)
    assert (m.num_attention_heads, m.num_query_groups, m.head_dim, m.kv_channels) == (4, 2, 24, 24)
    assert (m.qk_layernorm, m.qkv_bias, m.tie_embeddings, m.rotary_base) == (True, False, True, 1e6)
    assert (m.vocab_size, m.max_seq_length) == (322, 256)
    hf = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    unpadded = load_config(None, [*over, "model.pad_vocab_to=1"])
    assert count_parameters(unpadded) == sum(p.numel() for p in hf.parameters())
    # explicit keys that agree are fine, a lower length limit too; disagreements name both values
    load_config(
        None, [*over, "model.hidden_size=64", "model.head_dim=24", "model.max_seq_length=64"]
    )
    with pytest.raises(ConfigError, match=r"model.hidden_size=32 but .*config.json states 64"):
        load_config(None, [*over, "model.hidden_size=32"])
    with pytest.raises(ConfigError, match=r"model.head_dim=16 but .* states 24"):
        load_config(None, [*over, "model.head_dim=16"])
    with pytest.raises(ConfigError, match="max_position_embeddings=256"):
        load_config(None, [*over, "model.max_seq_length=512"])
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"checkpoint:\n  init_from_hf: {qwen3_dir}\nmodel:\n  tie_embeddings: false\n"
    )
    with pytest.raises(ConfigError, match="model.tie_embeddings=False but .* states True"):
        load_config(yaml_file)
    yaml_file.write_text(
        f"checkpoint:\n  init_from_hf: {qwen3_dir}\nbranches: [{{name: a}}, {{name: b}}]\n"
    )
    assert plan_main(["--config", str(yaml_file), "--world-size", "2"]) == 0
    assert "qwen3" in capsys.readouterr().out  # the layout names the model read from HF
    saved = tmp_path / "saved.yaml"  # a saved config states every key: loads without the HF dir
    save_config(cfg, saved)
    moved = qwen3_dir.with_name("moved")
    os.rename(qwen3_dir, moved)
    try:
        assert load_config(saved).model == m
        with pytest.raises(ConfigError, match="no .*config.json"):
            load_config(None, over)
    finally:
        os.rename(moved, qwen3_dir)


def test_hf_init_is_converted_once_and_checked(qwen3_dir, tmp_path):
    from copd_mega.config import ConfigError, load_config
    from copd_mega.hf.init_from_hf import prepare_hf_init

    cfg = load_config(None, [f"checkpoint.init_from_hf={qwen3_dir}", f"run_dir={tmp_path}/run"])
    cache = prepare_hf_init(cfg)
    files = sorted(os.listdir(cache))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json", "config.yaml", "metadata.json", "hf_source.json"):  # fmt: skip
        assert name in files, name
    stamp = (cache / "metadata.json").stat().st_mtime_ns
    assert prepare_hf_init(cfg) == cache  # reused, not rewritten
    assert (cache / "metadata.json").stat().st_mtime_ns == stamp
    assert not (tmp_path / "run" / "hf_init.staging").exists()
    other = make_qwen3_dir(tmp_path / "other", tied=False)
    cfg2 = load_config(None, [f"checkpoint.init_from_hf={other}", f"run_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match="was converted from .* differs"):
        prepare_hf_init(cfg2)
    saved = json.loads((cache / "hf_source.json").read_text())
    assert saved["path"] == str(qwen3_dir.resolve())


def _prepare(rank: int, overrides: list[str]) -> str:
    from copd_mega.config import load_config
    from copd_mega.launch.datasets import prepare_data
    from copd_mega.parallel.dist import init_distributed

    init_distributed()
    try:
        prepare_data(load_config(None, overrides))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "ok"


@pytest.mark.multiproc
def test_failed_conversion_is_raised_on_every_rank(tmp_path):
    """Rank 0 converts; when that fails every rank raises (none waits forever at a barrier)."""
    from multiproc import spawn

    hf = make_qwen3_dir(tmp_path / "qwen3")
    (hf / "model.safetensors").unlink()
    over = [f"checkpoint.init_from_hf={hf}", f"run_dir={tmp_path}/run",
            "branches=[{name: a, data: arith}, {name: b, data: arith}]", "data.n_train=8"]  # fmt: skip
    first, second = spawn(_prepare, 2, over, timeout=300)
    for error in (first, second):
        assert error.startswith("ConfigError") and "no model.safetensors" in error
    assert not (tmp_path / "run" / "hf_init").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.family=qwen3"], "set model.qk_layernorm=true"),
        (["model.head_dim=-1"], "model.head_dim=-1 must be >= 0"),
        (["model.hidden_size=30"], "set model.head_dim"),
        (["checkpoint.init_from=a", "checkpoint.init_from_hf={hf}"], "both set; keep one"),
    ],
)
def test_model_settings_are_validated(qwen3_dir, overrides, message):
    from copd_mega.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, [o.format(hf=qwen3_dir) for o in overrides])
    if overrides == ["model.hidden_size=30"]:  # with head_dim any hidden size works
        assert load_config(None, [*overrides, "model.head_dim=8"]).model.kv_channels == 8
