"""Per-GPU memory of a training job, part by part, from the config alone (``copd plan``).

Pure arithmetic on the config; every part is an upper bound for the most loaded pipeline stage
of a rank on a GPU (``model.dtype=auto`` is bf16 there). Sizes in bytes. The parts and their
formulas (t = TP, p = PP, d = DP, L = model.num_layers, h = hidden, kv = query groups x head
dim, F = ffn, V = vocabulary padded to ``pad_vocab_to * t``, e = 2 bytes bf16 / 4 fp32):

* **weights**: the stage's parameters / t in the model dtype; the first stage holds the word
  embedding (and the vision tower + projector with ``vision.enabled``), the last the output
  layer (a second copy of the embedding when tied and p > 1).
* **gradients**: megatron's DDP grad buffer in fp32 (``grad_reduce_in_fp32``), 4 bytes / param.
* **optimizer**: the distributed optimizer shards fp32 master weights (bf16 models only) and
  Adam's two moments over DP: (4 + 4 + 4) / d bytes per param (8 / d for fp32 models).
* **vLLM engine** (``rollout.engine=vllm``, instead of the rollout KV cache): the whole model
  in the model dtype (generation TP 1) plus ``rollout.kv_cache_gb``, on top of the rest.
* **rollout KV cache**: one generation micro-batch: ``rollout.max_batch_size`` sequences x
  (longest prompt + ``rollout.max_new_tokens``) x L/p layers x 2 (K, V) x kv/t x e.
* **log-prob chunk**: ``parallel.micro_batch_size`` x chunk x V/t x 4 bytes for the fp32 copy
  of a logits chunk, x 2 for the softmax temporary of the same size; the chunk is
  ``rollout.logprob_chunk`` positions, or (0) as many as fit ``rollout.logprob_chunk_mib``.
* **activations** (``parallel.recompute`` none; selective and full recompute and
  ``parallel.sequence_parallel`` shrink them, :func:`layer_activation_bytes`), per
  training micro-batch of b = ``parallel.micro_batch_size`` rows of s = longest prompt +
  ``rollout.max_new_tokens`` positions, per layer ``e * s * b * (4h + (2h + 2kv + 3F) / t)``:
  the two norm inputs and the two column-parallel inputs (replicated over TP), Q/K/V and the
  attention output, and the SwiGLU's gate, up and product (split over TP); flash attention
  keeps no s x s scores. Under 1F1B the first stage holds p micro-batches of L/p layers, so L
  layers in all (also at p = 1). Plus the output logits ``e * s * b * V / t`` kept for the
  log-prob backward, and the vision tower's layers on its patches when enabled.
* **runtime reserve**: CUDA context, NCCL buffers, allocator slack (a fixed estimate).

Not a separate part: the non-finite update guard (``step.optimizer_step``) copies this rank's
optimizer shard during the optimizer step, after the forward-backward activations are freed:
the plan covers that copy while the optimizer part is no larger than the activations part
(configs/copd_8branch.yaml: 10.1 vs 32.9 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass

from copd_mega.config import Config
from copd_mega.launch.validate import prompt_positions_bound
from copd_mega.models.gpt import padded_vocab_size
from copd_mega.rl.logprobs import logprob_chunk

GIB = 2**30
RESERVE_BYTES = 3 * GIB  # CUDA context + NCCL buffers + allocator fragmentation


@dataclass(frozen=True)
class Part:
    """One line of the memory plan: ``bytes`` per GPU and the setting that shrinks it."""

    name: str
    bytes: float
    knob: str  # the config setting to change when this part is the one that does not fit


def _elem_bytes(cfg: Config) -> int:
    return 4 if cfg.model.dtype == "fp32" else 2


def layer_params(cfg: Config) -> tuple[int, int]:
    """(TP-sharded, replicated) parameters of one decoder layer: attention and SwiGLU matrices
    (and QKV bias) are split over TP, the two RMSNorms are on every TP rank."""
    m = cfg.model
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = m.num_query_groups * (h // m.num_attention_heads)
    attn = h * (h + 2 * kv) + h * h + (h + 2 * kv if m.qkv_bias else 0)
    return attn + 3 * h * f, 2 * h


def vision_parts(cfg: Config) -> tuple[int, int]:
    """(TP-sharded, replicated) parameters of the CLIP ViT and its MLP projector. Replicated:
    the patch conv, class token, positions, the pre-LayerNorm, every layer's two LayerNorms
    and the row-parallel biases (attention output, fc2, projector fc2)."""
    v, h = cfg.vision, cfg.model.hidden_size
    if not v.enabled:
        return 0, 0
    hv, fv, patches = v.hidden_size, v.ffn_hidden_size, (v.image_size // v.patch_size) ** 2
    shard = v.num_layers * (4 * hv * hv + 3 * hv + 2 * hv * fv + fv) + hv * h + h + h * h
    rep = 3 * v.patch_size**2 * hv + hv + (patches + 1) * hv + 2 * hv + v.num_layers * 6 * hv + h
    return shard, rep


def vision_params(cfg: Config) -> int:
    """Parameters of the vision tower + projector (0 when ``vision.enabled`` is false)."""
    return sum(vision_parts(cfg))


def stage_params(cfg: Config) -> int:
    """Parameters per GPU on the most loaded pipeline stage (a TP rank's shards + replicas)."""
    m, p = cfg.model, cfg.parallel
    vocab = padded_vocab_size(m.vocab_size, m.pad_vocab_to, p.tp) * m.hidden_size
    shard, rep = (m.num_layers // p.pp * x for x in layer_params(cfg))
    v_shard, v_rep = vision_parts(cfg)
    first = (shard + vocab + v_shard) // p.tp + rep + v_rep
    out = vocab if (not m.tie_embeddings or p.pp > 1) else 0
    last = (shard + out) // p.tp + rep + m.hidden_size
    if p.pp == 1:
        return first + out // p.tp + m.hidden_size
    return max(first, last)


def layer_activation_bytes(cfg: Config, seq: int) -> tuple[float, float]:
    """(kept, peak) bytes of one decoder layer's activations for one micro-batch.

    Without recompute both are ``e*s*b*(4h + (2h + 2kv + 3F)/t)`` (module docstring). Sequence
    parallelism splits the replicated 4h (norm and column-parallel inputs) over t. Selective
    recompute drops what its modules recompute: ``core_attn`` the attention output (h/t),
    ``mlp`` the SwiGLU's gate, up and product (3F/t). Full recompute keeps the layer's input only (h, /t with SP); a recomputed chunk
    of ``parallel.recompute_num_layers`` layers holds its full activations during its backward.
    """
    m, p, e = cfg.model, cfg.parallel, _elem_bytes(cfg)
    h, f, b, t = m.hidden_size, m.ffn_hidden_size, p.micro_batch_size, p.tp
    kv = m.num_query_groups * (h // m.num_attention_heads)
    rep = (1 / t) if p.sequence_parallel else 1.0
    full = e * seq * b * (4 * h * rep + (2 * h + 2 * kv + 3 * f) / t)
    if p.recompute == "full":
        return e * seq * b * h * rep, full
    if p.recompute == "selective":
        mods = set(p.recompute_modules)
        saved = (h / t if "core_attn" in mods else 0) + (3 * f / t if "mlp" in mods else 0)
        return full - e * seq * b * saved, full
    return full, full


def activation_name(cfg: Config) -> str:
    """The plan's line for activations: which recompute, and sequence parallelism."""
    p = cfg.parallel
    how = {"none": "no recompute", "full": f"full recompute, {p.recompute_num_layers} layer(s) "
           "per chunk", "selective": "selective recompute: " + ", ".join(p.recompute_modules)}  # fmt: skip
    return f"activations ({how[p.recompute]}{', sequence parallel' if p.sequence_parallel else ''})"


def activation_bytes(cfg: Config, seq: int) -> float:
    """Training activations of one micro-batch (see the module docstring)."""
    m, p, e = cfg.model, cfg.parallel, _elem_bytes(cfg)
    b, t = p.micro_batch_size, p.tp
    kept, peak = layer_activation_bytes(cfg, seq)
    logits = e * seq * b * padded_vocab_size(m.vocab_size, m.pad_vocab_to, t) / t
    total = m.num_layers * kept + logits
    if p.recompute == "full":  # one chunk recomputed at a time, on top of what is kept
        total += p.recompute_num_layers * (peak - kept)
    v = cfg.vision
    if v.enabled:  # every medium position of the rows runs the ViT, (patches + 1) per tile
        patches = (v.image_size // v.patch_size) ** 2
        tiles = seq * b // patches
        vit = (
            e
            * tiles
            * (patches + 1)
            * (4 * v.hidden_size + (4 * v.hidden_size + 2 * v.ffn_hidden_size) / t)
        )
        total += v.num_layers * vit
    return total


def memory_parts(cfg: Config) -> list[Part]:
    """The per-GPU memory plan of ``cfg``, part by part (bytes)."""
    m, p, r = cfg.model, cfg.parallel, cfg.rollout
    e = _elem_bytes(cfg)
    local = stage_params(cfg)
    seq = prompt_positions_bound(cfg) + r.max_new_tokens
    kv = m.num_query_groups * (m.hidden_size // m.num_attention_heads)
    vocab_local = padded_vocab_size(m.vocab_size, m.pad_vocab_to, p.tp) / p.tp
    chunk = min(logprob_chunk(cfg), seq)
    optimizer = (8 if cfg.model.dtype == "fp32" else 12) / p.dp
    return [
        Part("weights", local * e, "parallel.tp / parallel.pp"),
        Part("gradients (fp32 buffer)", local * 4, "parallel.tp / parallel.pp"),
        Part("optimizer (distributed over DP)", local * optimizer, "parallel.dp"),
        *(
            engine_parts(cfg)
            if r.engine == "vllm"
            else [
                Part(
                    "rollout KV cache",
                    r.max_batch_size * seq * (m.num_layers // p.pp) * 2 * kv / p.tp * e,
                    "rollout.max_batch_size",
                )
            ]
        ),  # fmt: skip
        Part(
            "log-prob chunk",
            p.micro_batch_size * chunk * vocab_local * 4 * 2,
            "rollout.logprob_chunk_mib",
        ),
        Part(activation_name(cfg), activation_bytes(cfg, seq), "parallel.micro_batch_size"),
        Part("runtime reserve", RESERVE_BYTES, ""),
    ]


def engine_parts(cfg: Config) -> list[Part]:
    """``rollout.engine=vllm``: each GPU's engine holds the whole model (``rollout.tp=1``) in
    the model dtype and reserves ``rollout.kv_cache_gb`` of KV cache. Counted on top of the
    training parts (an upper bound: on GPU the engine sleeps during the update)."""
    m = cfg.model
    shard, rep = layer_params(cfg)
    embed = 2 * m.vocab_size * m.hidden_size  # the engine's output layer is never tied
    full = m.num_layers * (shard + rep) + embed + m.hidden_size
    return [
        Part("vLLM engine weights (whole model)", full * _elem_bytes(cfg), "rollout.engine"),
        Part("vLLM KV cache", cfg.rollout.kv_cache_gb * GIB, "rollout.kv_cache_gb"),
    ]


def fit_error(cfg: Config, parts: list[Part], gpu_gib: float) -> str | None:
    """None when the parts fit ``gpu_gib``; else one line naming the setting to change."""
    total = sum(x.bytes for x in parts)
    if total <= gpu_gib * GIB:
        return None
    big = max((x for x in parts if x.knob), key=lambda x: x.bytes)
    fix = f"change {big.knob}"
    if big.knob == "rollout.max_batch_size":
        per_seq = big.bytes / cfg.rollout.max_batch_size
        room = gpu_gib * GIB - (total - big.bytes)
        n = int(room // per_seq)
        fix = (f"lower rollout.max_batch_size to <= {n}" if n >= 1 else
               "lower rollout.max_new_tokens or raise parallel.tp/parallel.pp")  # fmt: skip
    elif big.knob == "parallel.micro_batch_size":
        fix = ("lower parallel.micro_batch_size" if cfg.parallel.micro_batch_size > 1 else
               "lower rollout.max_new_tokens or raise parallel.tp")  # fmt: skip
        if cfg.parallel.recompute != "full":
            fix += " (or set parallel.recompute=full / parallel.sequence_parallel=true)"
    elif big.knob == "parallel.tp / parallel.pp":
        fix = "raise parallel.tp or parallel.pp (more GPUs per branch)"
    elif big.knob == "parallel.dp":
        fix = "raise parallel.dp (shards the optimizer state further)"
    return (
        f"needs ~{total / GIB:.1f} GiB per GPU > --gpu-memory-gb {gpu_gib:g}; the largest part is "
        f"{big.name} ({big.bytes / GIB:.1f} GiB): {fix}"
    )
