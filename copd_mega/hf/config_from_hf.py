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
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from copd_mega.config import Config, ConfigError

# ModelConfig fields that an HF config.json states (families.model_config_from_hf fills them).
HF_STATED = (
    "family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "num_query_groups", "head_dim", "vocab_size", "rotary_base", "norm_epsilon", "qkv_bias",
    "qk_layernorm", "tie_embeddings", "init_std",
)  # fmt: skip


def _same(key: str, given, hf_model) -> bool:
    if key == "head_dim":  # 0 means hidden_size / heads: compare the channels per head
        heads, hidden = hf_model.num_attention_heads, hf_model.hidden_size
        return (given or hidden // heads) == hf_model.kv_channels
    return given == getattr(hf_model, key)


def apply_hf_model_config(cfg: Config, given: set[str]) -> None:
    """Fill ``cfg.model`` in place from ``cfg.checkpoint.init_from_hf``/config.json.

    ``given``: the ``model.*`` field names the user set explicitly. Raises ConfigError for an
    unreadable or unsupported HF config and for an explicit key that disagrees with it.
    """
    from copd_mega.hf.families import UnsupportedHFModel, model_config_from_hf

    where = Path(cfg.checkpoint.init_from_hf) / "config.json"
    if not where.is_file():
        if set(HF_STATED) | {"max_seq_length"} <= given:  # a saved, fully resolved config
            return
        raise ConfigError(
            f"checkpoint.init_from_hf={cfg.checkpoint.init_from_hf!r}: no {where}; point it at "
            "a Hugging Face model directory (config.json, safetensors, tokenizer)"
        )
    try:
        raw = json.loads(where.read_text())
        hf = model_config_from_hf(raw, where, cfg.model.pad_vocab_to)
    except (UnsupportedHFModel, KeyError, ValueError) as e:
        raise ConfigError(f"checkpoint.init_from_hf: {e}") from e
    m = cfg.model
    for key in HF_STATED:
        if key in given and not _same(key, getattr(m, key), hf):
            raise ConfigError(
                f"model.{key}={getattr(m, key)!r} but {where} states {getattr(hf, key)!r}; "
                f"remove model.{key} from the config (it is read from the HF model)"
            )
    limit = hf.max_seq_length
    if "max_seq_length" in given and m.max_seq_length > limit:
        raise ConfigError(
            f"model.max_seq_length={m.max_seq_length} exceeds max_position_embeddings={limit} "
            f"in {where}; lower model.max_seq_length or remove it"
        )
    keep = {"pad_vocab_to": m.pad_vocab_to, "dtype": m.dtype}
    if "max_seq_length" in given:
        keep["max_seq_length"] = m.max_seq_length
    cfg.model = dataclasses.replace(hf, **keep)
