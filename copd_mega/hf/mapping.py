"""Tensor names and layouts between Megatron checkpoints and Hugging Face Llama-family models.

Megatron keys are the global checkpoint keys (TransformerEngine-compatible names; per-layer tensors
stacked on a leading layer axis of size L). The HF side is ``LlamaForCausalLM`` /
``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` naming. Layout differences:

* ``linear_qkv`` is fused and interleaved per query group: for each of the ``ng`` KV groups,
  ``nq/ng`` query heads, then one key head, then one value head (``d`` rows each). HF keeps
  ``q_proj [nq*d, H]``, ``k_proj [ng*d, H]``, ``v_proj [ng*d, H]`` (head i uses KV head
  ``i // (nq/ng)``, the same grouping). Biases follow the weights.
* ``linear_fc1`` is ``[gate; up]`` (``[2F, H]``, SwiGLU); HF has ``gate_proj``, ``up_proj``.
* The embedding (and an untied output layer) has ``V_pad >= V`` rows; HF has exactly ``V``.
* Qwen3's per-head RMSNorm on queries and keys (``q_norm``/``k_norm``, ``[d]``) is megatron's
  ``q_layernorm``/``k_layernorm`` (``qk_layernorm``); ``d`` is ``model.kv_channels``, which need
  not be ``H / nq`` (then ``o_proj`` is ``[H, nq*d]``).
"""

from __future__ import annotations

import torch

from copd_mega.ckpt.offline import CheckpointReader, TensorSpec
from copd_mega.config import Config, ModelConfig
from copd_mega.config_hf import UnsupportedHFModel
from copd_mega.hf.families import O_PROJ_BIAS_FAMILIES
from copd_mega.hf.hf_dir import SafetensorsDir, ShardWriter

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
QKV_BIAS = "decoder.layers.self_attention.linear_qkv.bias"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
# Stacked per-layer keys that map one-to-one onto an HF tensor of layer i.
LAYER_SIMPLE = {
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "decoder.layers.self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "decoder.layers.mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# Per-head QK RMSNorm (``model.qk_layernorm``): weight [d] per layer.
QK_NORMS = {
    "decoder.layers.self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "decoder.layers.self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
HF_EMBEDDING, HF_LM_HEAD, HF_NORM = (
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.norm.weight",
)


def hf_layer(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


def head_dim(m: ModelConfig) -> int:
    return m.kv_channels


def simple_keys(m: ModelConfig) -> dict[str, str]:
    """Stacked Megatron keys that map one-to-one onto an HF tensor of a layer, for ``m``."""
    return {**LAYER_SIMPLE, **(QK_NORMS if m.qk_layernorm else {})}


def megatron_specs(m: ModelConfig, padded_vocab: int, dtype: torch.dtype) -> list[TensorSpec]:
    """Every global tensor of a model checkpoint for ``m`` (the keys ``load_model`` expects)."""
    h, f, n, d = m.hidden_size, m.ffn_hidden_size, m.num_layers, head_dim(m)
    qkv_rows = (m.num_attention_heads + 2 * m.num_query_groups) * d
    shapes = {
        EMBEDDING: (padded_vocab, h),
        FINAL_NORM: (h,),
        QKV: (n, qkv_rows, h),
        FC1: (n, 2 * f, h),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (n, h),
        "decoder.layers.self_attention.linear_proj.weight": (n, h, m.num_attention_heads * d),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (n, h),
        "decoder.layers.mlp.linear_fc2.weight": (n, h, f),
    }
    if m.qkv_bias:
        shapes[QKV_BIAS] = (n, qkv_rows)
    if m.qk_layernorm:
        shapes.update({key: (n, d) for key in QK_NORMS})
    if not m.tie_embeddings:
        shapes[OUTPUT] = (padded_vocab, h)
    return [TensorSpec(k, s, dtype) for k, s in sorted(shapes.items())]


def split_qkv(
    fused: torch.Tensor, m: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's interleaved ``[(nq+2ng)*d, ...]`` -> HF ``q [nq*d, ...]``, ``k``, ``v [ng*d, ...]``."""
    ng, d = m.num_query_groups, head_dim(m)
    per = m.num_attention_heads // ng
    grouped = fused.reshape(ng, (per + 2) * d, *fused.shape[1:])
    q, k, v = grouped.split([per * d, d, d], dim=1)
    rest = fused.shape[1:]
    return (
        q.reshape(ng * per * d, *rest).contiguous(),
        k.reshape(ng * d, *rest).contiguous(),
        v.reshape(ng * d, *rest).contiguous(),
    )


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    ng, d = m.num_query_groups, head_dim(m)
    per = m.num_attention_heads // ng
    rest = q.shape[1:]
    grouped = torch.cat(
        [q.reshape(ng, per * d, *rest), k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)], dim=1
    )
    return grouped.reshape(ng * (per + 2) * d, *rest)


def split_fc1(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[gate; up] [2F, H]`` -> ``gate [F, H]``, ``up [F, H]``."""
    gate, up = fused.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def fuse_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def layer_to_hf(layer: dict[str, torch.Tensor], i: int, m: ModelConfig) -> dict[str, torch.Tensor]:
    """One layer's Megatron tensors (stacked keys, layer axis removed) -> HF tensors of layer i."""
    out = {hf_layer(i, name): layer[key].contiguous() for key, name in simple_keys(m).items()}
    q, k, v = split_qkv(layer[QKV], m)
    gate, up = split_fc1(layer[FC1])
    out.update(
        {hf_layer(i, "self_attn.q_proj.weight"): q, hf_layer(i, "self_attn.k_proj.weight"): k}
    )
    out.update(
        {hf_layer(i, "self_attn.v_proj.weight"): v, hf_layer(i, "mlp.gate_proj.weight"): gate}
    )
    out[hf_layer(i, "mlp.up_proj.weight")] = up
    if m.qkv_bias:
        qb, kb, vb = split_qkv(layer[QKV_BIAS], m)
        out.update(
            {
                hf_layer(i, f"self_attn.{p}_proj.bias"): b
                for p, b in zip("qkv", (qb, kb, vb), strict=False)
            }
        )
    return out


def layer_from_hf(get, i: int, key: str, m: ModelConfig) -> torch.Tensor:
    """Megatron tensor ``key`` of layer i (no layer axis) from HF tensors (``get(name)``)."""
    simple = simple_keys(m)
    if key in simple:
        return get(hf_layer(i, simple[key]))
    if key == FC1:
        return fuse_fc1(
            get(hf_layer(i, "mlp.gate_proj.weight")), get(hf_layer(i, "mlp.up_proj.weight"))
        )
    kind = {QKV: "weight", QKV_BIAS: "bias"}[key]
    q, k, v = (get(hf_layer(i, f"self_attn.{p}_proj.{kind}")) for p in "qkv")
    return fuse_qkv(q, k, v, m)


def export_tensors(reader: CheckpointReader, writer: ShardWriter, dtype: torch.dtype) -> None:
    """Stream every HF tensor of the checkpoint into ``writer`` (layer by layer)."""
    m = reader.config().model
    vocab = m.vocab_size

    def rows(key: str) -> torch.Tensor:  # embedding/output with the padded rows dropped
        return reader.read({key: (0, vocab)})[key].to(dtype)

    writer.add(HF_EMBEDDING, rows(EMBEDDING))
    layer_keys = [k for k in reader.specs if k.startswith("decoder.layers.")]
    for i in range(m.num_layers):
        layer = {k: t[0] for k, t in reader.read({k: (i, i + 1) for k in layer_keys}).items()}
        hf = layer_to_hf({k: t.to(dtype) for k, t in layer.items()}, i, m)
        if m.qkv_bias and m.family in O_PROJ_BIAS_FAMILIES:  # attention_bias also biases o_proj
            hf[hf_layer(i, "self_attn.o_proj.bias")] = torch.zeros(m.hidden_size, dtype=dtype)
        for name, t in hf.items():
            writer.add(name, t)
    writer.add(HF_NORM, reader.read({FINAL_NORM: None})[FINAL_NORM].to(dtype))
    if not m.tie_embeddings:
        writer.add(HF_LM_HEAD, rows(OUTPUT))


def check_o_proj_bias(st: SafetensorsDir, i: int) -> None:
    name = hf_layer(i, "self_attn.o_proj.bias")
    if name in st and st.get(name).abs().max() > 0:
        raise UnsupportedHFModel(
            f"{st.root}: {name} is non-zero; the Megatron model here has no output-projection "
            "bias (attention_bias=true is only importable with zero o_proj biases)"
        )


def make_producer(st: SafetensorsDir, cfg: Config, dtype: torch.dtype):
    """``produce(spec, start, stop)`` for :func:`write_checkpoint` reading HF tensors lazily."""
    m = cfg.model

    def padded_rows(name: str, start: int, stop: int) -> torch.Tensor:
        src = st.get(name)
        out = torch.zeros(stop - start, src.shape[1], dtype=dtype)
        end = min(stop, m.vocab_size)
        if end > start:
            out[: end - start] = src[start:end]
        return out

    def produce(spec: TensorSpec, start: int, stop: int) -> torch.Tensor:
        if spec.key == EMBEDDING:
            return padded_rows(HF_EMBEDDING, start, stop)
        if spec.key == OUTPUT:
            return padded_rows(HF_LM_HEAD, start, stop)
        if spec.key == FINAL_NORM:
            return st.get(HF_NORM)
        layers = []
        for i in range(start, stop):
            layers.append(layer_from_hf(st.get, i, spec.key, m))
        return torch.stack(layers)

    return produce
