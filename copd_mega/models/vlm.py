"""The vision-language model: megatron ``LLaVAModel`` = CLIP ViT + MLP projector + the GPT of ``model.*``.

Architecture (``vision.enabled=true``):

* **ViT** (megatron ``CLIPViTModel``, ``vision_model_type="clip"``): bias-free patch conv of
  ``vision.patch_size``, a class token in front, learned position embeddings, ``ln_pre``, then
  ``vision.num_layers`` pre-LayerNorm layers (eps 1e-5, quick-GELU MLP, biases everywhere,
  bidirectional attention). No final norm.
* **Features**: the output of the *last* ViT layer, class token dropped, no post-norm, so an
  image becomes ``(image_size / patch_size)**2`` tokens (HF LLaVA: ``vision_feature_layer=-1``,
  ``vision_feature_select_strategy="default"``).
* **Projector**: ``linear_fc1 [H_lm, H_vit]`` + bias, exact GELU, ``linear_fc2 [H_lm, H_lm]`` + bias.
* **Language model**: the same ``GPTModel`` as :func:`copd_mega.models.gpt.build_gpt` (RMSNorm, SwiGLU,
  RoPE, GQA), initialised identically, so a VLM branch and a text branch share the LM weights.

How this departs from megatron's own LLaVA wiring: megatron builds the ViT's ``ln_pre`` with
``torch.nn.LayerNorm`` when TransformerEngine is absent, which its ``build_module(config=...)``
cannot construct, and its local ViT layer spec is causal. So :func:`build_vlm` builds
``LLaVAModel`` without the encoder and attaches the ViT itself (``WrappedTorchNorm``/``TENorm``,
a non-causal layer spec whose checkpoint keys match the TransformerEngine spec). Every module gets
the branch's ``ProcessGroupCollection``; megatron's global parallel state stays uninitialised
(only its global attention scratch buffer is created, as for the GPT).

Inputs: one ``<image>`` placeholder per medium; an image is one tile, a video of N frames is one
medium of N tiles (megatron's multi-tile path), so its placeholder becomes ``N * T`` positions.
Text-only samples carry no placeholder and the batch may hold zero images.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

from copd_mega.config import Config
from copd_mega.config_llava import VIT_NORM_EPS
from copd_mega.models.gpt import (
    compute_dtype,
    global_param_names,
    init_weights,
    layer_spec,
    padded_vocab_size,
    prepare_megatron_runtime,
    tp_slice,
    transformer_config,
    use_gpu,
)
from copd_mega.models.vlm_inputs import PLACEHOLDER, image_token_count
from copd_mega.parallel.topology import Topology, check_vision_fits


def _cpu_safe_flags(cfg: Config) -> dict:
    """TransformerConfig settings shared with the language model (no dropout, no fusions)."""
    dtype = compute_dtype(cfg)
    return dict(
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=cfg.model.init_std,
        use_cpu_initialization=True, perform_initialization=True, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, pipeline_dtype=dtype,
        tensor_model_parallel_size=cfg.parallel.tp, pipeline_model_parallel_size=1,
        sequence_parallel=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        bias_dropout_fusion=False,
    )  # fmt: skip


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation ``x * sigmoid(1.702 x)``; megatron's copy is ``torch.compile``d, which
    costs ~25 s of compilation in every CPU process."""
    return x * torch.sigmoid(1.702 * x)


def vision_transformer_config(cfg: Config):
    """``TransformerConfig`` of the CLIP ViT (``vision_model_type="clip"`` set on it)."""
    from megatron.core.transformer import TransformerConfig

    v = cfg.vision
    tc = TransformerConfig(
        num_layers=v.num_layers, hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size,
        num_attention_heads=v.num_attention_heads, num_query_groups=v.num_attention_heads,
        kv_channels=v.hidden_size // v.num_attention_heads, normalization="LayerNorm",
        layernorm_epsilon=VIT_NORM_EPS, gated_linear_unit=False, activation_func=quick_gelu,
        add_bias_linear=True, add_qkv_bias=True, **_cpu_safe_flags(cfg),
    )  # fmt: skip
    tc.vision_model_type = "clip"
    return tc


def projector_config(cfg: Config):
    """``TransformerConfig`` of the 2-layer MLP projector (``H_vit -> H_lm -> H_lm``, GELU)."""
    from megatron.core.transformer import TransformerConfig

    m = cfg.model
    return TransformerConfig(
        num_layers=1,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        gated_linear_unit=False,
        activation_func=F.gelu,
        add_bias_linear=True,
        **_cpu_safe_flags(cfg),
    )


def _te_available() -> bool:
    if not use_gpu():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def vision_layer_spec():
    """ViT layer spec: TransformerEngine's with TE on GPU, else megatron's local ViT spec made
    bidirectional (it is causal in 0.16; CLIP attends both ways).

    The local spec stores its LayerNorms under TE's fused names (``linear_qkv.layer_norm_*``,
    ``linear_fc1.layer_norm_*``), so CPU and GPU checkpoints share keys.
    """
    from megatron.core.models.vision import vit_layer_specs
    from megatron.core.transformer.enums import AttnMaskType

    if _te_available():
        return vit_layer_specs.get_vit_layer_with_transformer_engine_spec()
    spec = vit_layer_specs.get_vit_layer_with_local_spec()
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.no_mask}
    spec.submodules.sharded_state_dict_keys_map = {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
    }
    return spec


def projector_spec():
    """MLP submodules of the projector (megatron's local column/row parallel linears)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def _attach_vision(model, cfg: Config, topo: Topology) -> None:
    """Give a decoder-only ``LLaVAModel`` its CLIP ViT and projector (what ``add_encoder`` does,
    with a LayerNorm that ``build_module(config=...)`` can build on CPU)."""
    from megatron.core.models.multimodal.llava_model import (
        _load_state_dict_hook_ignore_extra_state,
    )
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel
    from megatron.core.models.vision.multimodal_projector import MultimodalProjector
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    v = cfg.vision
    if _te_available():
        from megatron.core.extensions.transformer_engine import TENorm as norm
    else:
        norm = WrappedTorchNorm
    model.vision_model = CLIPViTModel(
        vision_transformer_config(cfg), vision_layer_spec(), ln_pre_impl=norm, ln_post_impl=norm,
        add_class_token=True, class_token_len=1, patch_dim=v.patch_size,
        img_h=v.image_size, img_w=v.image_size, model_subtype="clip", pg_collection=topo.pg,
    )  # fmt: skip
    model.vision_projection = MultimodalProjector(
        projector_config(cfg), projector_spec(), "mlp", v.hidden_size, tp_group=topo.pg.tp
    )
    for module in (model.vision_model, model.vision_projection):
        module.register_load_state_dict_post_hook(_load_state_dict_hook_ignore_extra_state)
    model.add_encoder = True
    model._drop_vision_class_token = True
    # MegatronModule.sharded_state_dict reads the global TP group from modules without
    # ``tp_group`` (LLaVAModel, CLIPViTModel, MultimodalProjector in 0.16): give them the branch's.
    for module in model.modules():
        if isinstance(module, MegatronModule) and not hasattr(module, "tp_group"):
            module.tp_group = topo.pg.tp
    if model.img_seq_len != image_token_count(cfg):
        raise AssertionError(f"LLaVA counts {model.img_seq_len} image tokens, expected "
                             f"{image_token_count(cfg)}")  # fmt: skip


def build_vlm(cfg: Config, topo: Topology):
    """The bare ``LLaVAModel`` of this rank (not DDP-wrapped); weights from :func:`init_vlm_weights`.

    Every TP rank holds its shard of the ViT, projector and LM; the patch conv, class token,
    position embeddings and ``ln_pre`` are replicated on every TP rank.
    """
    from megatron.core.enums import ModelType
    from megatron.core.models.multimodal.llava_model import LLaVAModel

    check_vision_fits(cfg)
    m, v = cfg.model, cfg.vision
    prepare_megatron_runtime(cfg, topo)
    model = LLaVAModel(
        language_transformer_config=transformer_config(cfg),
        language_transformer_layer_spec=layer_spec(),
        language_vocab_size=padded_vocab_size(m.vocab_size, m.pad_vocab_to, cfg.parallel.tp),
        language_max_sequence_length=m.max_seq_length,
        vision_transformer_config=vision_transformer_config(cfg),
        vision_transformer_layer_spec=vision_layer_spec(), drop_vision_class_token=True,
        vision_projection_config=projector_config(cfg), vision_projection_layer_spec=projector_spec(),
        parallel_output=True, share_embeddings_and_output_weights=m.tie_embeddings,
        language_position_embedding_type="rope", language_rotary_base=int(m.rotary_base),
        add_encoder=False,  # attached by _attach_vision
        img_h=v.image_size, img_w=v.image_size, patch_dim=v.patch_size,
        image_token_index=PLACEHOLDER, pg_collection=topo.pg,
    )  # fmt: skip
    _attach_vision(model, cfg, topo)
    # megatron's forward-backward schedule reads ``model_type`` (LLaVAModel sets none in 0.16)
    model.model_type = ModelType.encoder_or_decoder
    model.to(dtype=compute_dtype(cfg))  # the patch conv and torch norms are built in fp32
    init_vlm_weights(model, cfg)
    if use_gpu():
        model = model.cuda()
    return model


@torch.no_grad()
def init_vlm_weights(model, cfg: Config) -> None:
    """Split-invariant init: the LM exactly as :func:`copd_mega.models.gpt.init_weights`; ViT and
    projector drawn whole per global parameter name from ``cfg.seed``, then TP-sliced.

    Normal(0, init_std) for matrices, the class token and position embeddings;
    init_std/sqrt(2*vision.num_layers) for the ViT's output projections; ones/zeros for norms.
    """
    init_weights(model.language_model, cfg)
    tp = cfg.parallel.tp
    tp_rank = torch.distributed.get_rank(model.pg_collection.tp)
    std = cfg.model.init_std
    scaled = std / math.sqrt(2.0 * cfg.vision.num_layers)
    params = {n: p for n, p in global_param_names(model).items() if not n.startswith("language_")}
    for name, param in params.items():
        if "norm" in name or "ln_pre" in name:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        if name.endswith(".bias"):
            param.zero_()
            continue
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(name.encode()))
        vit_out = name.startswith("vision_model.") and name.endswith(("linear_proj.weight",
                                                                      "linear_fc2.weight"))  # fmt: skip
        shape = list(param.shape)
        sharded = getattr(param, "tensor_model_parallel", False) and tp > 1
        if sharded:
            shape[param.partition_dim] *= tp
        full = torch.randn(shape, generator=gen) * (scaled if vit_out else std)
        if sharded:
            full = tp_slice(full, tp, tp_rank, param.partition_dim, param.partition_stride)
        param.copy_(full.to(param.dtype))
