"""Build one branch's Megatron GPTModel (Llama/Qwen2/Qwen3 family), its DDP wrapper and optimizer.

The only model implementation is megatron-core's ``GPTModel``: RMSNorm, SwiGLU, RoPE, GQA,
optional QKV bias, optional per-head QK RMSNorm, any head_dim, tied or untied embeddings, vocabulary padded to a multiple of
``model.pad_vocab_to * TP``. Every module gets the branch's ``ProcessGroupCollection``.
Weights are initialised by :func:`init_weights` from ``cfg.seed`` and each parameter's global
name, so every branch and every TP/PP split starts from identical weights: CoPD branches share
one base, and TP/PP invariance holds from step 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from copd_mega.config import Config
from copd_mega.parallel.cpu import cpu_mode_active
from copd_mega.parallel.topology import Topology


def padded_vocab_size(vocab_size: int, pad_to: int, tp: int) -> int:
    """Vocabulary rows in the model: ``vocab_size`` rounded up to a multiple of pad_to*tp."""
    mult = pad_to * tp
    return int(math.ceil(vocab_size / mult) * mult)


def use_gpu() -> bool:
    """True when this process computes on CUDA (NCCL path)."""
    return torch.cuda.is_available() and not cpu_mode_active()


def compute_dtype(cfg: Config) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU for ``model.dtype=auto``."""
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if use_gpu() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.model.dtype]


def transformer_config(cfg: Config):
    """megatron ``TransformerConfig`` for the configured model and per-branch TP/PP."""
    from megatron.core.transformer import TransformerConfig

    m, p = cfg.model, cfg.parallel
    dtype = compute_dtype(cfg)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        qk_layernorm=m.qk_layernorm,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        **memory_settings(cfg),
    )


def memory_settings(cfg: Config) -> dict:
    """megatron's sequence parallelism and activation recompute from ``parallel.*``: selective
    recomputes ``parallel.recompute_modules`` of every layer, full recomputes whole layers in
    chunks of ``parallel.recompute_num_layers`` (megatron's ``uniform`` method)."""
    p = cfg.parallel
    out = dict(sequence_parallel=p.sequence_parallel)
    if p.recompute == "selective":
        out.update(recompute_granularity="selective", recompute_modules=list(p.recompute_modules))
    elif p.recompute == "full":
        out.update(recompute_granularity="full", recompute_method="uniform",
                   recompute_num_layers=p.recompute_num_layers)  # fmt: skip
    return out


def layer_spec(qk_layernorm: bool = False):
    """TransformerEngine spec with TE and CUDA present, megatron's local spec otherwise.

    ``qk_layernorm``: per-head RMSNorm on queries and keys (Qwen3), weight ``[head_dim]``.
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_gpu():
        try:
            import transformer_engine  # noqa: F401

            return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
        except ImportError:
            pass
    return specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)


def branch_seed(cfg: Config, branch_index: int) -> int:
    """The seed of branch ``branch_index``'s own random streams (sampling, dropout)."""
    return cfg.seed + 1009 * (branch_index + 1)


def prepare_megatron_runtime(cfg: Config, topo: Topology) -> None:
    """Process state megatron modules need before they are built (no process groups).

    The local attention takes its scratch from megatron's global memory buffer, and the TP RNG
    tracker gets this branch's streams (dropout regions); weights use ``cfg.seed`` alone.
    """
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()
    tensor_parallel.model_parallel_cuda_manual_seed(
        branch_seed(cfg, topo.branch.index), tp_rank=topo.tp_rank, ep_rank=0, etp_rank=0
    )


def build_gpt(cfg: Config, topo: Topology):
    """The bare ``GPTModel`` chunk for this rank's PP stage (not DDP-wrapped).

    Weights come from :func:`init_weights`: identical on every branch and split.
    """
    from megatron.core.models.gpt import GPTModel

    m = cfg.model
    prepare_megatron_runtime(cfg, topo)
    tcfg = transformer_config(cfg)
    spec = layer_spec(m.qk_layernorm)
    if tcfg.sequence_parallel and not _is_te_spec(spec):
        spec = sequence_parallel_block(tcfg, spec, topo.pp_rank)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(m.vocab_size, m.pad_vocab_to, cfg.parallel.tp),
        max_sequence_length=m.max_seq_length,
        pre_process=topo.is_first_stage,
        post_process=topo.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(m.rotary_base),
        pg_collection=topo.pg,
    )
    init_weights(model, cfg)
    if cfg.parallel.sequence_parallel:  # built with it, run without it outside training
        from megatron.core.transformer.utils import set_model_to_sequence_parallel

        set_model_to_sequence_parallel(model, False)  # (models.step turns it on there)
    if use_gpu():
        model = model.cuda()
    return model


class SequenceParallelNorm:
    """megatron's ``WrappedTorchNorm`` (torch RMSNorm/LayerNorm) usable under sequence
    parallelism: its parameters carry ``sequence_parallel``, so ``finalize_model_grads`` sums
    their gradients over TP (what ``TENorm`` does with TransformerEngine)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = torch.nn.LayerNorm if config.normalization == "LayerNorm" else torch.nn.RMSNorm
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def _is_te_spec(spec) -> bool:
    return "transformer_engine" in getattr(spec.submodules.input_layernorm, "__module__", "")


def sequence_parallel_block(tcfg, spec, pp_rank: int):
    """The local layer spec's block with :class:`SequenceParallelNorm` for every norm (the two
    per layer and the final one): megatron's torch norm refuses ``sequence_parallel``."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    spec.submodules.input_layernorm = SequenceParallelNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
    layers = get_num_layers_to_build(tcfg, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=SequenceParallelNorm)


def global_param_names(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters keyed by split-independent names: PP-local layer indices become global."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    offsets = {}
    for name, mod in model.named_modules():
        if isinstance(mod, TransformerLayer):
            offsets[name + "."] = name.rsplit(".", 1)[0] + f".{mod.layer_number - 1}."
    out = {}
    for name, param in model.named_parameters():
        for local, glob in offsets.items():
            if name.startswith(local):
                name = glob + name[len(local) :]
                break
        out[name] = param
    return out


def _full_shape(param: torch.nn.Parameter, tp: int) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return shape


@torch.no_grad()
def init_weights(model: torch.nn.Module, cfg: Config) -> None:
    """Initialise every parameter identically for any TP/PP split and every branch.

    Each matrix is drawn whole from a generator seeded by (cfg.seed, its global name), then this
    rank keeps its TP slice (:func:`tp_slice`, megatron's layout).
    Normal(0, init_std) for weights, init_std/sqrt(2*layers) for output projections (megatron's
    scaled init), ones for norms, zeros for biases. Tied output weights reuse the embedding's name.
    """
    import zlib

    tp = cfg.parallel.tp
    tp_rank = torch.distributed.get_rank(model.pg_collection.tp)
    std = cfg.model.init_std
    scaled = std / math.sqrt(2.0 * cfg.model.num_layers)
    for name, param in global_param_names(model).items():
        if name == "output_layer.weight" and cfg.model.tie_embeddings:
            name = "embedding.word_embeddings.weight"
        if "layer_norm" in name or "layernorm" in name or name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        if name.endswith(".bias"):
            param.zero_()
            continue
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(name.encode()))
        sd = scaled if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else std
        full = torch.randn(_full_shape(param, tp), generator=gen) * sd
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            full = tp_slice(full, tp, tp_rank, param.partition_dim, param.partition_stride)
        param.copy_(full.to(param.dtype))


def tp_slice(full: torch.Tensor, tp: int, rank: int, dim: int, stride: int = 1) -> torch.Tensor:
    """TP rank ``rank``'s shard of an unsharded tensor, in megatron's layout.

    With ``stride`` s the tensor is cut into s*tp pieces along ``dim`` and the rank keeps pieces
    rank, rank+tp, ... (SwiGLU's fused fc1 has s=2: each rank holds [gate shard; up shard]).
    """
    pieces = full.chunk(stride * tp, dim=dim)
    return torch.cat([pieces[rank + tp * i] for i in range(stride)], dim=dim)


def count_parameters(cfg: Config) -> int:
    """Total parameters of the configured model (unpadded vocabulary rows excluded: padded)."""
    m = cfg.model
    h, f, layers = m.hidden_size, m.ffn_hidden_size, m.num_layers
    d = m.kv_channels
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    vocab = padded_vocab_size(m.vocab_size, m.pad_vocab_to, cfg.parallel.tp)
    attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if m.qkv_bias else 0)
    attn += 2 * d if m.qk_layernorm else 0
    mlp = 2 * h * f + f * h
    per_layer = attn + mlp + 2 * h
    emb = vocab * h * (1 if m.tie_embeddings else 2)
    return layers * per_layer + emb + h
