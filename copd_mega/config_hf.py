"""``model.*`` from the ``config.json`` of ``checkpoint.init_from_hf``: the user writes no model
shape that the HF config already states.

:func:`apply_hf_model_config` runs inside ``config.load_config`` (before validation), so every
command that loads a config (``copd plan``, ``copd train``, ``copd eval``) sees the same model.
A ``model.*`` key the user gave explicitly (in the YAML file or as an override) must agree with
the HF config; a disagreement is a ConfigError naming the key, both values and the file.
``model.max_seq_length`` may be lowered below ``max_position_embeddings`` (it is a length limit);
``model.pad_vocab_to`` and ``model.dtype`` are not stated by HF and stay as configured.

A saved config (``config.yaml`` beside every checkpoint) states every model key, so it also loads
once the HF directory is gone; a config that relies on the HF directory for its shape needs it.

:func:`hf_model_fields` is the one reading of an HF ``config.json`` (Llama, Qwen2, Qwen3 dense):
``copd import-hf`` builds its ``ModelConfig`` from the same fields
(``copd_mega.hf.families.model_config_from_hf``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from copd_mega.config_tree import ConfigError

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


def _same(key: str, given, hf: dict[str, Any]) -> bool:
    if key == "head_dim":  # 0 means hidden_size / heads: compare the channels per head
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        return (given or hidden // heads) == (hf["head_dim"] or hidden // heads)
    return given == hf[key]


def apply_hf_model_config(cfg: Any, given: set[str]) -> None:
    """Fill ``cfg.model`` (a ``Config``'s) in place from ``cfg.checkpoint.init_from_hf``/config.json.

    ``given``: the ``model.*`` field names the user set explicitly. Raises ConfigError for an
    unreadable or unsupported HF config and for an explicit key that disagrees with it.
    """
    where = Path(cfg.checkpoint.init_from_hf) / "config.json"
    if not where.is_file():
        if set(HF_STATED) | {"max_seq_length"} <= given:  # a saved, fully resolved config
            return
        raise ConfigError(
            f"checkpoint.init_from_hf={cfg.checkpoint.init_from_hf!r}: no {where}; point it at "
            "a Hugging Face model directory (config.json, safetensors, tokenizer)"
        )
    try:
        hf = hf_model_fields(json.loads(where.read_text()), where)
    except (UnsupportedHFModel, KeyError, ValueError) as e:
        raise ConfigError(f"checkpoint.init_from_hf: {e}") from e
    m = cfg.model
    for key in HF_STATED:
        if key in given and not _same(key, getattr(m, key), hf):
            raise ConfigError(
                f"model.{key}={getattr(m, key)!r} but {where} states {hf[key]!r}; "
                f"remove model.{key} from the config (it is read from the HF model)"
            )
    limit = hf["max_seq_length"]
    if "max_seq_length" in given and m.max_seq_length > limit:
        raise ConfigError(
            f"model.max_seq_length={m.max_seq_length} exceeds max_position_embeddings={limit} "
            f"in {where}; lower model.max_seq_length or remove it"
        )
    if "max_seq_length" in given:
        hf["max_seq_length"] = m.max_seq_length
    cfg.model = dataclasses.replace(m, **hf)  # pad_vocab_to and dtype stay as configured
