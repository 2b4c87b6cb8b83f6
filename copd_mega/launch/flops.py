"""FLOPs and bytes of the language model per token, from the config alone (pure arithmetic).

The counts every time prediction builds on (generation today; teacher scoring and the update
are the same forward, x3 with the backward). With L = ``model.num_layers``, h = hidden,
q = heads x head dim, kv = query groups x head dim, F = ffn, V = vocabulary padded as the model
pads it (``pad_vocab_to`` x TP), e = 2 bytes (bf16, ``model.dtype=auto`` on a GPU) or 4 (fp32):

* **matmul parameters** N = L x (h(q + 2kv) + qh + 3hF) + Vh: the weights every token
  multiplies (QKV, attention output, SwiGLU, the output layer); the embedding is a lookup.
* **a forward of one token at context c** (it attends to c positions): 2N + 4Lqc FLOPs (QK^T
  and AV, 2 FLOPs per multiply-add each).
* **a prefill of P prompt positions** (causal): 2NP + 2LqP^2.
* **decoding R tokens after a prompt of P**: the sum over k < R of a forward at context P + k:
  2NR + 4Lq(RP + R(R-1)/2).
* **weights read per forward**: N x e bytes (every matrix once, shared by the forward's rows).
* **KV cache per position**: 2 (K, V) x L x kv x e bytes; reading the cache of a row at
  context c costs c times that.

Not counted: norms, rotary, softmax and sampling (O(h) per token against O(h^2)), and the
vision tower's compute on a prompt's media (``vision.enabled``: ``copd plan`` prints its size
beside the language model's).
"""

from __future__ import annotations

from dataclasses import dataclass

from copd_mega.config import Config
from copd_mega.models.gpt import padded_vocab_size


@dataclass(frozen=True)
class TokenCost:
    """Per-token constants of one model (see the module docstring)."""

    matmul_params: int  # N
    layers: int  # L
    q_dim: int  # heads x head dim
    kv_dim: int  # query groups x head dim
    elem_bytes: int  # e

    @property
    def weight_bytes(self) -> float:
        """Bytes of weights one forward reads (N x e)."""
        return float(self.matmul_params * self.elem_bytes)

    @property
    def kv_bytes_per_position(self) -> float:
        """K and V of one position in every layer (2 x L x kv x e bytes)."""
        return float(2 * self.layers * self.kv_dim * self.elem_bytes)


def token_cost(cfg: Config, tp: int = 1) -> TokenCost:
    """The per-token constants of ``cfg.model`` (bf16 unless ``model.dtype=fp32``); ``tp``
    only pads the vocabulary as the model does at that TP."""
    m = cfg.model
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.kv_channels
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * f
    vocab = padded_vocab_size(m.vocab_size, m.pad_vocab_to, tp)
    elem = 4 if m.dtype == "fp32" else 2
    return TokenCost(m.num_layers * per_layer + vocab * h, m.num_layers, q, kv, elem)


def prefill_flops(c: TokenCost, prompt: int) -> float:
    """FLOPs of one causal forward over ``prompt`` positions: 2NP + 2LqP^2."""
    return 2.0 * c.matmul_params * prompt + 2.0 * c.layers * c.q_dim * prompt * prompt


def decode_flops(c: TokenCost, prompt: int, tokens: float) -> float:
    """FLOPs of decoding ``tokens`` (R) tokens one by one after ``prompt`` (P) positions:
    2NR + 4Lq(RP + R(R-1)/2). ``tokens`` may be fractional (a mean length)."""
    attended = tokens * prompt + tokens * (tokens - 1) / 2
    return 2.0 * c.matmul_params * tokens + 4.0 * c.layers * c.q_dim * attended


def decode_kv_bytes(c: TokenCost, prompt: int, tokens: float) -> float:
    """KV-cache bytes read while decoding ``tokens`` tokens after ``prompt`` positions: each
    step reads its row's whole cache so far, sum over k < R of (P + k) positions."""
    return c.kv_bytes_per_position * (tokens * prompt + tokens * (tokens - 1) / 2)
