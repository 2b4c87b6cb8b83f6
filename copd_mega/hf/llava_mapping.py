"""Tensor names, layouts and configs between the Megatron vision-language model and HF LLaVA.

Megatron side: global checkpoint keys of ``LLaVAModel`` (per-layer tensors stacked on a leading
layer axis): ``language_model.*`` is exactly the GPT checkpoint (:mod:`copd_mega.hf.mapping`),
``vision_model.*`` the CLIP ViT, ``vision_projection.encoder.*`` the projector MLP.

HF side: ``LlavaForConditionalGeneration``. Tensors are named here by component and local name:
``("text", <LlamaForCausalLM name>)``, ``("vision", <CLIPVisionModel name without the
vision_model. prefix>)``, ``("projector", "linear_1.weight")``. Export writes the classic layout
every LLaVA reader accepts (``language_model.model.*``, ``language_model.lm_head.weight``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``); import also reads the other layouts
transformers has written (``model.language_model.*``, ``vision_tower.*``, ``model.vision_tower.*``).

Layout differences in the ViT: ``linear_qkv`` is fused and interleaved per head (``[q_h; k_h;
v_h]``, the GQA layout with one head per group), split into ``q_proj``/``k_proj``/``v_proj``;
``class_token [1, 1, H]`` is HF's ``class_embedding [H]``; the LayerNorms use TE's fused names.
CLIP's ``post_layernorm`` is not part of the features LLaVA reads, so Megatron has none: export
writes ones/zeros and import ignores it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from copd_mega.ckpt.offline import TensorSpec
from copd_mega.config import Config, ModelConfig, VisionConfig
from copd_mega.config_llava import VIT_NORM_EPS, llava_dir_fields, llava_fields, refuse  # noqa: F401
from copd_mega.hf import mapping as mp
from copd_mega.hf.families import hf_config
from copd_mega.models.vlm_inputs import image_token_count

LM, VIT, PROJ = "language_model.", "vision_model.", "vision_projection.encoder."
VIT_LAYERS = VIT + "decoder.layers."
CLASS_TOKEN = VIT + "class_token"
# Megatron ViT key (no prefix) -> CLIP vision name, for tensors outside the layers.
VIT_SIMPLE = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "position_embeddings.weight": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
}
# Stacked ViT layer key (after decoder.layers.) -> CLIP encoder layer name.
VIT_LAYER_SIMPLE = {
    "self_attention.linear_qkv.layer_norm_weight": "layer_norm1.weight",
    "self_attention.linear_qkv.layer_norm_bias": "layer_norm1.bias",
    "self_attention.linear_proj.weight": "self_attn.out_proj.weight",
    "self_attention.linear_proj.bias": "self_attn.out_proj.bias",
    "mlp.linear_fc1.layer_norm_weight": "layer_norm2.weight",
    "mlp.linear_fc1.layer_norm_bias": "layer_norm2.bias",
    "mlp.linear_fc1.weight": "mlp.fc1.weight",
    "mlp.linear_fc1.bias": "mlp.fc1.bias",
    "mlp.linear_fc2.weight": "mlp.fc2.weight",
    "mlp.linear_fc2.bias": "mlp.fc2.bias",
}
VIT_QKV = {"self_attention.linear_qkv.weight": "weight", "self_attention.linear_qkv.bias": "bias"}
PROJ_SIMPLE = {
    "linear_fc1.weight": "linear_1.weight",
    "linear_fc1.bias": "linear_1.bias",
    "linear_fc2.weight": "linear_2.weight",
    "linear_fc2.bias": "linear_2.bias",
}
POST_NORM = ("post_layernorm.weight", "post_layernorm.bias")

# Reads one HF tensor by (component, local name).
HFGetter = Callable[[str, str], torch.Tensor]


def file_name(component: str, name: str) -> str:
    """The safetensors name export writes for an HF tensor (classic LLaVA layout)."""
    prefix = {
        "text": "language_model.",
        "vision": "vision_tower.vision_model.",
        "projector": "multi_modal_projector.",
    }
    return prefix[component] + name


def file_candidates(component: str, name: str) -> list[str]:
    """Every safetensors name LLaVA checkpoints have used for this tensor, classic first."""
    if component == "text":
        modern = (
            "lm_head.weight" if name == "lm_head.weight" else "model.language_model." + name[6:]
        )
        return [file_name(component, name), modern]
    if component == "vision":
        return [file_name(component, name), *(p + name for p in
                ("vision_tower.", "model.vision_tower.", "model.vision_tower.vision_model."))]  # fmt: skip
    return [file_name(component, name), "model.multi_modal_projector." + name]


def vit_heads(v: VisionConfig) -> ModelConfig:
    """The ViT's attention shape as a ModelConfig (one head per group) for the QKV helpers."""
    return ModelConfig(
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads,
        num_query_groups=v.num_attention_heads,
    )


def megatron_specs(cfg: Config, padded_vocab: int, dtype: torch.dtype) -> list[TensorSpec]:
    """Every global tensor of a VLM model checkpoint (the keys ``load_model`` expects)."""
    v, m = cfg.vision, cfg.model
    h, f, n = v.hidden_size, v.ffn_hidden_size, v.num_layers
    seq = (v.image_size // v.patch_size) ** 2 + 1
    shapes = {
        CLASS_TOKEN: (1, 1, h),
        VIT + "conv1.weight": (h, 3, v.patch_size, v.patch_size),
        VIT + "position_embeddings.weight": (seq, h),
        VIT + "ln_pre.weight": (h,),
        VIT + "ln_pre.bias": (h,),
        VIT_LAYERS + "self_attention.linear_qkv.weight": (n, 3 * h, h),
        VIT_LAYERS + "self_attention.linear_qkv.bias": (n, 3 * h),
        VIT_LAYERS + "self_attention.linear_proj.weight": (n, h, h),
        VIT_LAYERS + "mlp.linear_fc1.weight": (n, f, h),
        VIT_LAYERS + "mlp.linear_fc1.bias": (n, f),
        VIT_LAYERS + "mlp.linear_fc2.weight": (n, h, f),
        PROJ + "linear_fc1.weight": (m.hidden_size, h),
        PROJ + "linear_fc1.bias": (m.hidden_size,),
        PROJ + "linear_fc2.weight": (m.hidden_size, m.hidden_size),
        PROJ + "linear_fc2.bias": (m.hidden_size,),
    }
    for key in ("self_attention.linear_proj.bias", "mlp.linear_fc2.bias",
                "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight",
                "self_attention.linear_qkv.layer_norm_bias", "mlp.linear_fc1.layer_norm_bias"):  # fmt: skip
        shapes[VIT_LAYERS + key] = (n, h)
    specs = [TensorSpec(k, s, dtype) for k, s in shapes.items()]
    specs += [
        TensorSpec(LM + s.key, s.shape, s.dtype) for s in mp.megatron_specs(m, padded_vocab, dtype)
    ]
    return sorted(specs, key=lambda s: s.key)


def vit_layer_to_hf(
    layer: dict[str, torch.Tensor], i: int, v: VisionConfig
) -> dict[str, torch.Tensor]:
    """One ViT layer's Megatron tensors (keys after ``decoder.layers.``, layer axis removed) ->
    CLIP vision names of encoder layer i."""
    pre = f"encoder.layers.{i}."
    out = {pre + name: layer[key].contiguous() for key, name in VIT_LAYER_SIMPLE.items()}
    for key, kind in VIT_QKV.items():
        for proj, t in zip("qkv", mp.split_qkv(layer[key], vit_heads(v)), strict=True):
            out[f"{pre}self_attn.{proj}_proj.{kind}"] = t
    return out


def vit_layer_from_hf(get: HFGetter, i: int, key: str, v: VisionConfig) -> torch.Tensor:
    """Megatron ViT tensor ``key`` (after ``decoder.layers.``) of layer i from HF tensors."""
    pre = f"encoder.layers.{i}."
    if key in VIT_LAYER_SIMPLE:
        return get("vision", pre + VIT_LAYER_SIMPLE[key])
    kind = VIT_QKV[key]
    q, k, val = (get("vision", f"{pre}self_attn.{p}_proj.{kind}") for p in "qkv")
    return mp.fuse_qkv(q, k, val, vit_heads(v))


def vit_embeddings_to_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron ViT tensors outside the layers (full keys) -> CLIP vision names, post-norm
    included as the identity (ones/zeros: LLaVA does not read it)."""
    out = {name: tensors[VIT + key].contiguous() for key, name in VIT_SIMPLE.items()}
    cls = tensors[CLASS_TOKEN].reshape(-1)
    out["embeddings.class_embedding"] = cls.contiguous()
    out[POST_NORM[0]] = torch.ones_like(cls)
    out[POST_NORM[1]] = torch.zeros_like(cls)
    return out


def non_layer_from_hf(get: HFGetter, key: str) -> torch.Tensor:
    """A Megatron ViT-embedding or projector tensor (full key) from HF tensors."""
    if key == CLASS_TOKEN:
        return get("vision", "embeddings.class_embedding").reshape(1, 1, -1)
    if key.startswith(PROJ):
        return get("projector", PROJ_SIMPLE[key[len(PROJ) :]])
    return get("vision", VIT_SIMPLE[key[len(VIT) :]])


# ----------------------------------------------------------------------------- configs


def llava_config(
    cfg: Config, dtype: str, token_ids: dict, image_token_id: int, vision_layers: int = 0,
    feature_layer: int = -1,
):  # fmt: skip
    """The ``LlavaConfig`` of ``cfg`` (text config as :func:`families.hf_config`); a tower of
    ``vision_layers`` (default ``vision.num_layers``) read at ``feature_layer``."""
    from transformers import CLIPVisionConfig, LlavaConfig

    v = cfg.vision
    vision = CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
        num_hidden_layers=vision_layers or v.num_layers, num_attention_heads=v.num_attention_heads,
        image_size=v.image_size, patch_size=v.patch_size, num_channels=3,
        hidden_act="quick_gelu", layer_norm_eps=VIT_NORM_EPS, projection_dim=v.hidden_size,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=hf_config(cfg.model, dtype, token_ids),
        image_token_index=image_token_id, image_seq_length=image_token_count(cfg),
        vision_feature_layer=feature_layer, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=cfg.model.tie_embeddings, architectures=["LlavaForConditionalGeneration"],
        dtype=dtype,
    )  # fmt: skip


def image_processor(cfg: Config):
    """CLIP image processor: resize and centre-crop to ``vision.image_size``, CLIP mean/std."""
    from transformers import CLIPImageProcessor

    size = cfg.vision.image_size
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=2,  # bilinear, as data.media
        do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(cfg.vision.image_mean),
        image_std=list(cfg.vision.image_std), do_convert_rgb=True,
    )  # fmt: skip


def vlm_config_from_hf(hf_cfg, where: Path, pad_vocab_to: int = 8) -> Config:
    """``Config`` (``model.*`` and ``vision.*``) of a transformers ``LlavaConfig``
    (``config_llava.llava_fields``; normalisation: CLIP's, see :func:`vlm_config_from_dir`)."""
    model, vision = llava_fields(hf_cfg, where)
    cfg = Config()
    cfg.model = ModelConfig(**model, pad_vocab_to=pad_vocab_to)
    cfg.vision = VisionConfig(enabled=True, **vision)
    return cfg


def vlm_config_from_dir(hf_dir: Path, pad_vocab_to: int = 8) -> Config:
    """``Config`` of an HF LLaVA directory: ``config.json`` and the image processor's
    normalisation (``preprocessor_config.json``)."""
    model, vision = llava_dir_fields(hf_dir)
    cfg = Config()
    cfg.model = ModelConfig(**model, pad_vocab_to=pad_vocab_to)
    cfg.vision = VisionConfig(enabled=True, **vision)
    return cfg
