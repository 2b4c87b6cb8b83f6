"""The HF LLaVA tensors the Megatron model does not hold, kept beside the checkpoint so an export
gives back every tensor the import was given.

With ``vision_feature_layer=-k`` (LLaVA-1.5: -2) the features are the output of ViT layer
``L - k + 1`` of ``L``: the layers above it never influence the model, so the Megatron ViT holds
only the layers up to it (``config_llava``). CLIP's ``post_layernorm`` is not read by LLaVA
either. Import stores both in :data:`EXTRA_FILE` (``hf_extra.safetensors``, the tensors under
their CLIP vision names, as stored, with the original ``num_hidden_layers`` and
``vision_feature_layer`` in the file's metadata); the training job carries the file from
``RUN/hf_init`` to ``RUN/final/*`` with the tokenizer files (:data:`CARRIED_FILES`), and
``export_llava`` writes the tensors back and restores ``vision_feature_layer`` and the tower's
layer count. They are never trained, so they come back bit-identical.

A checkpoint without the file (a model trained from scratch, a step checkpoint, a ``copd merge``
output) exports the ViT it holds with ``vision_feature_layer=-1`` and an identity post-norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from copd_mega.config_llava import kept_vision_layers
from copd_mega.hf import llava_mapping as lm
from copd_mega.hf.hf_dir import TOKENIZER_FILES

EXTRA_FILE = "hf_extra.safetensors"
# The image processor and the processor's own files (chat template included), carried as they are.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# Files an HF-derived VLM checkpoint carries beside its weights (copied from RUN/hf_init).
CARRIED_FILES = (*TOKENIZER_FILES, *PROCESSOR_FILES, EXTRA_FILE)


@dataclass
class Extra:
    """The tensors a VLM checkpoint lacks (CLIP vision names) and the tower they belong to."""

    tensors: dict[str, torch.Tensor]
    vision_layers: int  # CLIP num_hidden_layers of the original tower
    feature_layer: int  # its vision_feature_layer


def _layer_names(i: int) -> list[str]:
    """CLIP vision names of encoder layer i."""
    pre = f"encoder.layers.{i}."
    names = [pre + n for n in lm.VIT_LAYER_SIMPLE.values()]
    return names + [f"{pre}self_attn.{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")]


def save_extra(get, out: Path, kept: int, vision_layers: int, feature_layer: int) -> Path:
    """Write ``out/hf_extra.safetensors``: ViT layers ``kept..vision_layers-1`` and the
    post-norm, read with ``get(component, name)`` (``LlavaTensors.get``)."""
    from safetensors.torch import save_file

    names = [n for i in range(kept, vision_layers) for n in _layer_names(i)]
    tensors = {n: get("vision", n).contiguous() for n in [*names, *lm.POST_NORM]}
    meta = {"vision_num_hidden_layers": str(vision_layers),
            "vision_feature_layer": str(feature_layer)}  # fmt: skip
    save_file(tensors, str(out / EXTRA_FILE), metadata=meta)
    return out / EXTRA_FILE


def load_extra(ckpt: Path | None, num_layers: int) -> Extra | None:
    """The extra tensors a checkpoint carries (None without the file). ``num_layers``: the
    checkpoint's ``vision.num_layers``, which must be the kept part of the stored tower."""
    from safetensors import safe_open

    path = ckpt / EXTRA_FILE if ckpt is not None else None
    if path is None or not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    extra = Extra(tensors, int(meta["vision_num_hidden_layers"]), int(meta["vision_feature_layer"]))
    kept = kept_vision_layers(extra.feature_layer, extra.vision_layers, path)
    if kept != num_layers:
        raise ValueError(
            f"{path} belongs to a tower of which {kept} layers are used, but the checkpoint's "
            f"vision.num_layers={num_layers}; remove {path} to export without it"
        )
    return extra
