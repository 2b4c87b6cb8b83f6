"""Hugging Face config translation for the supported families: Llama, Qwen2 and Qwen3 (dense).

All are the same decoder (RMSNorm, SwiGLU, RoPE, GQA, any ``head_dim``); they differ in biases
and QK-norm: Qwen2 has q/k/v biases; Qwen3 has a per-head RMSNorm on queries and keys
(``model.qk_layernorm``); Llama's and Qwen3's ``attention_bias`` add biases to q/k/v *and*
o_proj. Such a model with ``model.qkv_bias`` is exported with ``attention_bias=true`` and zero
o_proj biases (exact), and an import with ``attention_bias`` is accepted only when every o_proj
bias is zero. Everything this product's model cannot express is refused with the field and value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from copd_mega.config import ModelConfig
from copd_mega.config_hf import ARCHITECTURES, hf_model_fields

O_PROJ_BIAS_FAMILIES = ("llama", "qwen3")  # attention_bias also biases o_proj


def hf_config(m: ModelConfig, dtype: str, token_ids: dict[str, int | None]):
    """A ``LlamaConfig``/``Qwen2Config``/``Qwen3Config`` for ``m``; ``token_ids``: bos/eos/pad
    ids (an int, a list of ints for several EOS ids, or None)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        head_dim=m.kv_channels,
        max_position_embeddings=m.max_seq_length,
        rms_norm_eps=m.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        tie_word_embeddings=m.tie_embeddings,
        hidden_act="silu",
        initializer_range=m.init_std,
        architectures=[ARCHITECTURES[m.family]],
        dtype=dtype,
        bos_token_id=token_ids.get("bos"),
        eos_token_id=token_ids.get("eos"),
        pad_token_id=token_ids.get("pad"),
    )
    if m.family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if m.family == "qwen3":
        return Qwen3Config(**common, attention_bias=m.qkv_bias, use_sliding_window=False)
    return LlamaConfig(**common, attention_bias=m.qkv_bias, mlp_bias=False)


def model_config_from_hf(d: dict[str, Any], where: Path, pad_vocab_to: int = 8) -> ModelConfig:
    """ModelConfig from an HF ``config.json`` mapping, refusing what the model cannot express
    (``config_hf.hf_model_fields``; UnsupportedHFModel)."""
    return ModelConfig(**hf_model_fields(d, where), pad_vocab_to=pad_vocab_to)
