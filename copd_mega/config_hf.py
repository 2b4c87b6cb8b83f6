"""The ``config.json`` of an HF text model (Llama, Qwen2, Qwen3 dense) as ``model.*`` fields.

``copd_mega.config_hf_dir.apply_hf_model_config`` fills a run's ``model.*`` from it
(``checkpoint.init_from_hf``); ``copd_mega.config_llava`` reads a LLaVA's ``text_config`` with it.

:func:`hf_model_fields` is the one reading of an HF ``config.json`` (Llama, Qwen2, Qwen3 dense):
``copd import-hf`` builds its ``ModelConfig`` from the same fields
(``copd_mega.hf.families.model_config_from_hf``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# ModelConfig fields that an HF config.json states (hf_model_fields fills them).
HF_STATED = (
    "family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "num_query_groups", "head_dim", "vocab_size", "rotary_base", "norm_epsilon", "qkv_bias",
    "qk_layernorm", "tie_embeddings", "init_std",
)  # fmt: skip


class UnsupportedHFModel(ValueError):
    """The HF model uses a feature the Megatron model here cannot represent."""


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


def hf_model_fields(d: dict[str, Any], where: Path) -> dict[str, Any]:
    """``ModelConfig`` field values (every :data:`HF_STATED` key and ``max_seq_length``) from an
    HF ``config.json`` mapping, refusing what the model cannot express (UnsupportedHFModel)."""
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
    return dict(
        family=family,
        num_layers=d["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=d["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=d.get("num_key_value_heads") or heads,
        head_dim=0 if hd * heads == hidden else hd,
        vocab_size=d["vocab_size"],
        max_seq_length=d.get("max_position_embeddings", 2048),
        rotary_base=_rope_theta(d, where),
        norm_epsilon=float(d.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        qk_layernorm=family == "qwen3",
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        init_std=float(d.get("initializer_range", 0.02)),
    )
