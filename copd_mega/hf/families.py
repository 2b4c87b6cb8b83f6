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

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
O_PROJ_BIAS_FAMILIES = ("llama", "qwen3")  # attention_bias also biases o_proj


class UnsupportedHFModel(ValueError):
    """The HF model uses a feature the Megatron model here cannot represent."""


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


def _rope_theta(d: dict, where: Path) -> float:
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise UnsupportedHFModel(
            f"{where}: rope type {kind!r} is not supported (only default RoPE)"
        )
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    if theta != int(theta):
        raise UnsupportedHFModel(f"{where}: rope_theta={theta} must be a whole number")
    return theta


def _family(d: dict, where: Path) -> str:
    kind = d.get("model_type")
    if kind not in ARCHITECTURES:
        raise UnsupportedHFModel(
            f"{where}: model_type={kind!r}; copd import-hf reads {sorted(ARCHITECTURES)} models"
        )
    return kind


def model_config_from_hf(d: dict[str, Any], where: Path, pad_vocab_to: int = 8) -> ModelConfig:
    """ModelConfig from an HF ``config.json`` mapping, refusing what the model cannot express."""
    family = _family(d, where)
    heads, hidden = d["num_attention_heads"], d["hidden_size"]
    hd = d.get("head_dim") or hidden // heads
    if d.get("hidden_act", "silu") != "silu":
        raise UnsupportedHFModel(f"{where}: hidden_act={d['hidden_act']!r}; only silu (SwiGLU)")
    if d.get("mlp_bias"):
        raise UnsupportedHFModel(f"{where}: mlp_bias=true is not supported")
    if family in ("qwen2", "qwen3") and d.get("use_sliding_window"):
        raise UnsupportedHFModel(f"{where}: use_sliding_window=true is not supported")
    qkv_bias = family == "qwen2" or bool(d.get("attention_bias", False))
    return ModelConfig(
        family=family,
        num_layers=d["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=d["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=d.get("num_key_value_heads") or heads,
        head_dim=0 if hd * heads == hidden else hd,
        vocab_size=d["vocab_size"],
        pad_vocab_to=pad_vocab_to,
        max_seq_length=d.get("max_position_embeddings", 2048),
        rotary_base=_rope_theta(d, where),
        norm_epsilon=float(d.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        qk_layernorm=family == "qwen3",
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        init_std=float(d.get("initializer_range", 0.02)),
    )
