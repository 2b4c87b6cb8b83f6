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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from copd_mega.config import Config
from copd_mega.config_llava import CLIP_MEAN, CLIP_STD, VIT_NORM_EPS
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
from copd_mega.parallel.topology import Topology, check_vision_fits

PLACEHOLDER = -200  # megatron's image position id inside input_ids (DEFAULT_IMAGE_TOKEN_INDEX)


def image_token_count(cfg: Config) -> int:
    """Language-model positions one image (one video frame) occupies: the ViT's patches."""
    return (cfg.vision.image_size // cfg.vision.patch_size) ** 2


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


# ----------------------------------------------------------------------------- inputs


@dataclass
class VLMBatch:
    """One microbatch for ``LLaVAModel.forward`` (every rank of the branch passes the same).

    ``images [N, 3, H, W]`` float, CLIP-normalised, every medium's tiles in order (sample 0's
    media in placeholder order, then sample 1's ...); N = 0 for a text-only batch.
    ``num_image_tiles [N_media]`` int32: 1 per image, the frame count per video.
    ``input_ids [B, S]`` long, :data:`PLACEHOLDER` where a medium goes, right-padded.
    ``position_ids [B, S]``: 0..S-1 (RoPE positions come from the combined sequence).
    ``text_positions [B, S]`` long: where token j of sample b lands in the combined sequence of
    length ``combined_length`` (the model's logits ``[B, combined_length, V/TP]``); for a
    placeholder, the position of its medium's last image token.
    """

    images: torch.Tensor
    num_image_tiles: torch.Tensor
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    text_positions: torch.Tensor
    combined_length: int

    def forward_kwargs(self) -> dict:
        """Keyword arguments of ``LLaVAModel.forward`` (attention mask None: causal)."""
        return dict(
            images=self.images, input_ids=self.input_ids, position_ids=self.position_ids,
            attention_mask=None, num_image_tiles=self.num_image_tiles,
        )  # fmt: skip


def normalize_images(pixels: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> ``(x - mean) / std`` per channel (``vision.image_mean``/
    ``image_std``: the image processor's; CLIP's by default)."""
    mean = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def with_placeholders(
    token_ids: list[int], num_media: int, image_token_id: int, bos_id: int | None = None
) -> list[int]:
    """Prompt ids with one ``<image>`` per medium at the front (after a leading ``bos_id``).

    The data pipeline's prompts carry no placeholder; LLaVA puts the media before the text.
    """
    ids = list(token_ids)
    head = 1 if bos_id is not None and ids[:1] == [bos_id] else 0
    return ids[:head] + [image_token_id] * num_media + ids[head:]


def _media_tiles(item: torch.Tensor, size: int, where: str) -> torch.Tensor:
    """One medium as ``[tiles, 3, size, size]``; an image is one tile, a video one per frame."""
    tiles = item.unsqueeze(0) if item.dim() == 3 else item
    if tiles.dim() != 4 or tuple(tiles.shape[1:]) != (3, size, size) or tiles.shape[0] < 1:
        raise ValueError(
            f"{where}: shape {tuple(item.shape)}; give an image [3, {size}, {size}] or a video "
            f"[frames, 3, {size}, {size}] (resize to vision.image_size={size} when reading data)"
        )
    lo, hi = float(tiles.min()), float(tiles.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"{where}: pixel values span [{lo:.3g}, {hi:.3g}]; pass floats in [0, 1] "
            "(prepare_inputs applies the CLIP normalisation itself)"
        )
    return tiles.float()


def prepare_inputs(
    cfg: Config,
    prompts: list[list[int]],
    media: list[list[torch.Tensor]],
    image_token_id: int,
    pad_id: int = 0,
    device: torch.device | str | None = None,
) -> VLMBatch:
    """Build a :class:`VLMBatch` from token ids with ``<image>`` placeholders and their media.

    ``prompts[b]``: sample b's ids, with ``image_token_id`` once per medium (see
    :func:`with_placeholders`); samples are right-padded with ``pad_id``. ``media[b]``: its media
    in placeholder order, each an image ``[3, H, W]`` or a video's frames ``[N, 3, H, W]``, float
    in [0, 1] at ``H = W = vision.image_size``; ``[]`` for a text-only sample. Images land in
    the compute dtype (bf16 on GPU); ids are int64. Raises ValueError naming the fix.
    """
    if len(prompts) != len(media):
        raise ValueError(
            f"{len(prompts)} prompts but {len(media)} media lists; give one per prompt"
        )
    size = cfg.vision.image_size
    seq = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), seq), pad_id, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    slots = (ids == image_token_id).sum(dim=1).tolist()  # host ids: no device sync
    tiles = []
    for b, items in enumerate(media):
        if slots[b] != len(items):
            raise ValueError(
                f"sample {b}: {slots[b]} <image> placeholders (id {image_token_id}) for "
                f"{len(items)} media; put one placeholder per image or video (with_placeholders)"
            )
        tiles += [
            _media_tiles(item, size, f"sample {b} medium {k}") for k, item in enumerate(items)
        ]
    pixels = torch.cat(tiles) if tiles else torch.zeros(0, 3, size, size)
    counts = torch.tensor([t.shape[0] for t in tiles], dtype=torch.long)
    per_row = torch.tensor([len(items) for items in media], dtype=torch.long)
    ids = ids.to(torch.device(device) if device is not None else torch.device("cpu"))
    return batch_inputs(
        cfg, ids, pixels, counts, per_row, image_token_id, [len(p) for p in prompts]
    )


def batch_inputs(
    cfg: Config,
    ids: torch.Tensor,
    pixels: torch.Tensor,
    tiles: torch.Tensor,
    per_row: torch.Tensor,
    image_token_id: int,
    lengths: list[int] | None = None,
) -> VLMBatch:
    """A :class:`VLMBatch` from rows already on the device, without a host sync or per-token work.

    ``ids [B, S]`` long on the compute device, ``image_token_id`` once per medium; ``pixels
    [T, 3, H, W]`` float in [0, 1] (host), every medium's tiles in row order; ``tiles [M]`` and
    ``per_row [B]`` long (host): tiles per medium and media per row. ``lengths``: each row's real
    length (host ints; None: all S). Only the real positions must fit ``model.max_seq_length``:
    a short media row padded to a long text row's width S is truncated after its real end, as
    megatron's ``LLaVAModel`` truncates the combined sequence (its padding positions' logits are
    then read at the last kept position; their mask is 0). Raises ValueError naming the fix.
    """
    size, per_tile, limit = cfg.vision.image_size, image_token_count(cfg), cfg.model.max_seq_length
    rows, seq = ids.shape
    dev = ids.device
    if tuple(pixels.shape[1:]) != (3, size, size):
        raise ValueError(f"media tiles of shape {tuple(pixels.shape[1:])}; give images [3, {size}, "
                         f"{size}] (resize to vision.image_size={size} when reading data)")  # fmt: skip
    if pixels.numel():
        lo, hi = (float(x) for x in pixels.aminmax())  # host pixels: no device sync
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"pixel values span [{lo:.3g}, {hi:.3g}]; pass floats in [0, 1] "
                             "(prepare_inputs applies the CLIP normalisation itself)")  # fmt: skip
    owner = torch.repeat_interleave(torch.arange(rows), per_row)  # positions media add per row
    extra = torch.zeros(rows, dtype=torch.long).index_add_(0, owner, tiles.long() * per_tile - 1)
    real = torch.tensor(lengths if lengths is not None else [seq] * rows, dtype=torch.long)
    need = int((real + extra).max()) if rows else 0
    if need > limit:
        raise ValueError(
            f"the batch needs {need} positions ({per_tile} per image/frame) but "
            f"model.max_seq_length={limit}; raise it, or use fewer frames "
            "(vision.frames_per_video) or a smaller vision.image_size"
        )
    combined = min(seq + int(extra.max()) if rows else seq, limit)
    is_slot = ids == image_token_id
    lens = torch.ones_like(ids)
    if tiles.numel():  # the k-th placeholder (row-major) takes medium k's positions
        counts = (tiles.long() * per_tile).to(dev, non_blocking=True)
        order = (is_slot.flatten().cumsum(0) - 1).clamp(0, tiles.numel() - 1).view(rows, seq)
        lens = torch.where(is_slot, counts[order], lens)
    text_positions = (lens.cumsum(dim=1) - 1).clamp(max=combined - 1)
    return VLMBatch(
        images=normalize_images(pixels.float(), cfg.vision.image_mean, cfg.vision.image_std).to(
            device=dev, dtype=compute_dtype(cfg)
        ),
        num_image_tiles=tiles.to(torch.int32).to(dev, non_blocking=True),
        input_ids=ids.masked_fill(is_slot, PLACEHOLDER),
        position_ids=torch.arange(seq, device=dev).unsqueeze(0).expand(rows, seq),
        text_positions=text_positions,
        combined_length=combined,
    )
