"""A tiny random Qwen3 HF model directory, made here (no download): a byte-level BPE tokenizer
trained with ``tokenizers`` on the built-in tasks' text, Qwen-style chat tokens and template,
a ``generation_config.json`` with two end ids, and random weights from a ``Qwen3Config``.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Qwen-style template: <|im_start|>role\ncontent<|im_end|>\n per turn; the generation prompt
# opens the assistant turn, with an empty reasoning block when thinking is switched off.
CHAT_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    from copd_mega.data.synthetic import make_samples

    lines = ["user\nassistant\nsystem\nYou are a careful solver.\n"]
    for name in ("arith", "sort"):
        for s in make_samples(name, "train", 7, 200):
            lines += [s["prompt"], s["answer"]]
    return lines


def make_tokenizer(out: Path):
    """Train the BPE tokenizer, save it (with its chat template) under ``out``; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(_corpus(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )  # fmt: skip
    hf.add_tokens(["<think>", "</think>"])  # ordinary added tokens, kept by decode as in Qwen3
    hf.save_pretrained(str(out))
    return hf


def make_qwen3_dir(out: Path, *, tied: bool = True, seed: int = 0) -> Path:
    """Save a tiny random Qwen3 (QK-norm, GQA, head_dim 24 != 64/4) with its tokenizer."""
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
        tie_word_embeddings=tied, rms_norm_eps=1e-6, eos_token_id=end, pad_token_id=pad,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1 too: every weight matters
            p.add_(torch.randn_like(p) * 0.05)
    model.generation_config = GenerationConfig(eos_token_id=[end, pad], pad_token_id=pad)
    model.save_pretrained(str(out))
    return out
