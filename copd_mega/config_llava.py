"""``model.*`` and ``vision.*`` of an HF LLaVA directory (``LlavaForConditionalGeneration``: a
CLIP vision tower, a 2-layer GELU projector, a Llama/Qwen2 language model).

The one reading of a LLaVA ``config.json`` (through transformers' ``LlavaConfig``, which fills
the defaults a released config leaves out, e.g. LLaVA-1.5's ``text_config`` names only its
vocabulary and length) and of its image processor's ``preprocessor_config.json`` (normalisation
mean/std, the pixel size it produces). ``copd import-hf`` and ``checkpoint.init_from_hf`` both
use it, so a run sees the shape the converted checkpoint has.

``vision_feature_layer=-k`` keeps the ViT layers up to that one (the model's features are the
last kept layer's output, as HF computes them); the layers above it are not part of the model
(``copd import-hf`` stores them beside the checkpoint so export gives them back).
What the Megatron model cannot express is refused naming the field (UnsupportedHFModel).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from copd_mega.config_hf import UnsupportedHFModel, hf_model_fields

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_NORM_EPS = 1e-5  # CLIP's layer_norm_eps
# VisionConfig fields a LLaVA directory states (llava_vision_fields fills them).
VISION_STATED = (
    "image_size", "patch_size", "num_layers", "hidden_size", "ffn_hidden_size",
    "num_attention_heads", "image_token_index", "image_mean", "image_std",
)  # fmt: skip


def refuse(where: Path, field: str, value, supported: str) -> UnsupportedHFModel:
    """The error for an HF setting the Megatron model cannot express."""
    return UnsupportedHFModel(f"{where}: {field}={value!r} is not supported ({supported})")


def kept_vision_layers(feature_layer, num_layers: int, where: Path) -> int:
    """ViT layers up to HF's ``vision_feature_layer`` (its ``hidden_states`` index)."""
    if not isinstance(feature_layer, int):
        raise refuse(where, "vision_feature_layer", feature_layer, "one layer index")
    kept = num_layers + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 1 <= kept <= num_layers:
        supported = f"a layer 1..{num_layers} or -1..-{num_layers}"
        raise refuse(where, "vision_feature_layer", feature_layer, supported)
    return kept


def read_llava_config(d: dict[str, Any]):
    """transformers' ``LlavaConfig`` of a ``config.json`` mapping (defaults filled in)."""
    from transformers import LlavaConfig

    return LlavaConfig.from_dict(dict(d))


def llava_fields(hf_cfg, where: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model fields, vision fields)`` of a transformers ``LlavaConfig``; the vision fields
    are :data:`VISION_STATED` without the normalisation (:func:`processor_fields`)."""
    vc, tc = hf_cfg.vision_config, hf_cfg.text_config
    checks = [
        ("vision_config.model_type", vc.model_type, "clip_vision_model", "a CLIP vision tower"),
        ("vision_config.hidden_act", vc.hidden_act, "quick_gelu", "quick_gelu"),
        ("vision_config.layer_norm_eps", vc.layer_norm_eps, VIT_NORM_EPS, f"{VIT_NORM_EPS}"),
        ("vision_config.num_channels", vc.num_channels, 3, "RGB"),
        ("projector_hidden_act", hf_cfg.projector_hidden_act, "gelu", "gelu"),
        ("multimodal_projector_bias", hf_cfg.multimodal_projector_bias, True, "true"),
        ("vision_feature_select_strategy", hf_cfg.vision_feature_select_strategy, "default",
         "default: the class token is dropped"),
    ]  # fmt: skip
    for field, value, want, supported in checks:
        if value != want:
            raise refuse(where, field, value, supported)
    image_token = getattr(hf_cfg, "image_token_id", None)
    vision = dict(
        image_size=vc.image_size, patch_size=vc.patch_size,
        num_layers=kept_vision_layers(hf_cfg.vision_feature_layer, vc.num_hidden_layers, where),
        hidden_size=vc.hidden_size, ffn_hidden_size=vc.intermediate_size,
        num_attention_heads=vc.num_attention_heads,
        image_token_index=-1 if image_token is None else int(image_token),
    )  # fmt: skip
    return hf_model_fields(tc.to_dict(), where), vision


def _pixel_size(p: dict[str, Any]) -> int | None:
    """The square side the processor's images come out at (crop, else resize), None if unsure."""
    box = p.get("crop_size") if p.get("do_center_crop", True) else p.get("size")
    if isinstance(box, int):
        return box
    box = box or {}
    if "height" in box and box.get("height") == box.get("width"):
        return int(box["height"])
    return int(box["shortest_edge"]) if "shortest_edge" in box else None


def processor_fields(hf_dir: Path, image_size: int) -> dict[str, Any]:
    """``image_mean``/``image_std`` of ``hf_dir/preprocessor_config.json`` (CLIP's when the
    directory has none); refuses a processor whose output is not ``image_size`` square pixels
    scaled to [0, 1] and normalised per channel."""
    where = hf_dir / "preprocessor_config.json"
    if not where.is_file():
        return dict(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    p = json.loads(where.read_text())
    if not p.get("do_normalize", True):
        raise refuse(where, "do_normalize", False, "per-channel mean/std normalisation")
    if p.get("do_rescale", True) and abs(p.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise refuse(where, "rescale_factor", p["rescale_factor"], "1/255")
    size = _pixel_size(p)
    if size != image_size:
        raise refuse(where, "crop_size/size", size, f"{image_size}, vision_config.image_size")
    mean, std = p.get("image_mean", list(CLIP_MEAN)), p.get("image_std", list(CLIP_STD))
    if len(mean) != 3 or len(std) != 3:
        raise refuse(where, "image_mean/image_std", (mean, std), "three channels")
    return dict(image_mean=[float(x) for x in mean], image_std=[float(x) for x in std])


def llava_dir_fields(hf_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model fields, vision fields)`` of an HF LLaVA directory: every :data:`VISION_STATED`
    key, the normalisation included. Raises UnsupportedHFModel/KeyError/ValueError."""
    where = hf_dir / "config.json"
    hf_cfg = read_llava_config(json.loads(where.read_text()))
    model, vision = llava_fields(hf_cfg, where)
    vision.update(processor_fields(hf_dir, vision["image_size"]))
    return model, vision
