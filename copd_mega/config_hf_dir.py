"""``model.*`` (and for a LLaVA ``vision.*``) from the directory of ``checkpoint.init_from_hf``:
the user writes no shape that the HF files already state.

:func:`apply_hf_model_config` runs inside ``config.load_config`` (before validation), so every
command that loads a config (``copd plan``, ``copd train``, ``copd eval``) sees the same model.
A text model's ``config.json`` fills ``model.*`` (``config_hf``); a LLaVA directory
(``model_type: llava``) fills ``model.*`` from its ``text_config`` and ``vision.*`` (shape,
image token, the ViT layers up to ``vision_feature_layer``, the image processor's mean/std)
and turns ``vision.enabled`` on (``config_llava``).

A ``model.*``/``vision.*`` key the user gave explicitly (in the YAML file or as an override)
must agree with the HF files; a disagreement is a ConfigError naming the key, both values and the
file. ``model.max_seq_length`` may be lowered below ``max_position_embeddings`` (it is a length
limit); ``model.pad_vocab_to``, ``model.dtype`` and ``vision.frames_per_video`` are not stated by
HF and stay as configured.

**The directory is absent** (``copd plan`` on a laptop, a saved ``config.yaml`` once the model is
gone): a config that states every key the directory would fill (``config_hf.HF_STATED`` +
``model.max_seq_length``, and with ``vision.enabled`` every ``config_llava.VISION_STATED``) loads
with those values, checked against the files wherever they are present; otherwise it is an
error naming the keys to state. :func:`hf_dir_present` lets ``copd plan`` say which case it is.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from copd_mega.config_hf import HF_STATED, UnsupportedHFModel, hf_model_fields
from copd_mega.config_llava import VISION_STATED, llava_dir_fields
from copd_mega.config_tree import ConfigError


def hf_dir_present(cfg: Any) -> bool:
    """Whether ``checkpoint.init_from_hf`` names a directory with a ``config.json`` here."""
    return (Path(cfg.checkpoint.init_from_hf) / "config.json").is_file()


def _same(key: str, given, hf: dict[str, Any]) -> bool:
    if key == "head_dim":  # 0 means hidden_size / heads: compare the channels per head
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        return (given or hidden // heads) == (hf["head_dim"] or hidden // heads)
    if isinstance(given, list):  # image mean/std: floats as written in two JSON files
        return len(given) == len(hf[key]) and all(
            abs(a - b) <= 1e-7 for a, b in zip(given, hf[key], strict=True)
        )
    return given == hf[key]


def _check_given(section: str, obj: Any, stated: tuple, hf: dict, given: set, where: Path):
    for key in stated:
        if f"{section}.{key}" in given and not _same(key, getattr(obj, key), hf):
            raise ConfigError(
                f"{section}.{key}={getattr(obj, key)!r} but {where} states {hf[key]!r}; "
                f"remove {section}.{key} from the config (it is read from the HF model)"
            )


def _absent(cfg: Any, given: set[str], where: Path) -> None:
    """No HF files here: a config that states the whole shape loads as it is."""
    need = [f"model.{k}" for k in (*HF_STATED, "max_seq_length")]
    need += [f"vision.{k}" for k in VISION_STATED] if cfg.vision.enabled else []
    missing = [k for k in need if k not in given]
    if not missing:
        return
    raise ConfigError(
        f"checkpoint.init_from_hf={cfg.checkpoint.init_from_hf!r}: no {where}; point it at a "
        "Hugging Face model directory (config.json, safetensors, tokenizer), or state the "
        f"model's shape in the config to plan without it ({', '.join(missing[:4])}"
        + (f" and {len(missing) - 4} more)" if len(missing) > 4 else ")")
    )


def apply_hf_model_config(cfg: Any, given: set[str]) -> None:
    """Fill ``cfg.model`` (and ``cfg.vision`` for a LLaVA) in place from
    ``cfg.checkpoint.init_from_hf``.

    ``given``: the dotted ``model.*``/``vision.*`` keys the user set explicitly. Raises
    ConfigError for unreadable or unsupported HF files and for an explicit key that disagrees.
    """
    hf_dir = Path(cfg.checkpoint.init_from_hf)
    where = hf_dir / "config.json"
    if not where.is_file():
        return _absent(cfg, given, where)
    try:
        d = json.loads(where.read_text())
        if d.get("model_type") == "llava":
            hf, vision = llava_dir_fields(hf_dir)
        else:
            hf, vision = hf_model_fields(d, where), None
    except (UnsupportedHFModel, KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"checkpoint.init_from_hf: {e}") from e
    m = cfg.model
    _check_given("model", m, HF_STATED, hf, given, where)
    limit = hf["max_seq_length"]
    if "model.max_seq_length" in given and m.max_seq_length > limit:
        raise ConfigError(
            f"model.max_seq_length={m.max_seq_length} exceeds max_position_embeddings={limit} "
            f"in {where}; lower model.max_seq_length or remove it"
        )
    if "model.max_seq_length" in given:
        hf["max_seq_length"] = m.max_seq_length
    cfg.model = dataclasses.replace(m, **hf)  # pad_vocab_to and dtype stay as configured
    if vision is None:
        if cfg.vision.enabled:
            raise ConfigError(
                f"vision.enabled=true but {where} is a text model (model_type="
                f"{d.get('model_type')!r}); start from an HF LLaVA directory or set "
                "vision.enabled=false"
            )
        return
    if "vision.enabled" in given and not cfg.vision.enabled:
        raise ConfigError(
            f"vision.enabled=false but {where} is a LLaVA (vision-language) model; remove "
            "vision.enabled from the config"
        )
    _check_given("vision", cfg.vision, VISION_STATED, vision, given, where)
    cfg.vision = dataclasses.replace(cfg.vision, enabled=True, **vision)
