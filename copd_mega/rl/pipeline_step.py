"""One generation forward of a branch's ``GPTModel`` through its pipeline stages, and the
broadcast that hands the sampled ids to every rank of the model replica.

:class:`GPTStep` is the ``step`` that :func:`copd_mega.rl.rollout.decode_loop` calls once per
position. It follows megatron's static-batching inference wrapper
(``AbstractModelInferenceWrapper.forward_pass_with_pipeline_parallel_small_input_batch``):

* the **first stage** embeds the running rows' tokens; every other stage receives the previous
  stage's hidden states ``[s, n, h]`` over the branch's PP group
  (``megatron.core.inference.communication_utils.recv_from_prev_pipeline_rank_``), hands them to
  the model with ``set_input_tensor`` and sends its own output on
  (``send_to_next_pipeline_rank``); only the **last stage** returns logits;
* each stage owns a megatron ``StaticInferenceContext`` holding the KV cache of **its own
  layers**, sized for the micro-batch (``rows x (longest prompt + max_new_tokens)``), advanced by
  ``increment_sequence_len_offset`` after each forward on every stage alike;
* :meth:`GPTStep.compact` drops finished rows from the running batch: every stage keeps the same
  rows of its KV cache (the keep index comes from tokens every stage holds, see
  :func:`share_from_last_stage`), so later forwards cost only the rows still generating.

Without a KV cache (``use_kv_cache=False``) the whole prefix runs at every position: the
reference the tests and the benchmark compare against.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from copd_mega.parallel import comm
from copd_mega.parallel.topology import Topology


def last_stage_source(topo: Topology) -> int:
    """Global rank of TP rank 0 on the last PP stage of this rank's model replica (same DP)."""
    lay = topo.layout
    return topo.branch.first_rank + lay.tp * ((lay.pp - 1) + lay.pp * topo.dp_rank)


def share_from_last_stage(x: Tensor, topo: Topology) -> None:
    """Broadcast ``x`` in place from :func:`last_stage_source` to every TP x PP rank of this
    replica (the branch's model-parallel group). ``x`` lives on the model's device everywhere;
    its value matters only on the source rank before the call, and is valid everywhere after."""
    group = topo.pg.mp
    if group is not None and dist.get_world_size(group) > 1:
        comm.broadcast(x, src=last_stage_source(topo), group=group)


class GPTStep:
    """Generation forwards of one micro-batch on this rank's PP stage of a ``GPTModel``.

    ``gpt``: the bare ``GPTModel`` chunk of this stage; ``rows`` x ``length``: the micro-batch's
    rows and buffer length (the KV cache's size). Call it as the ``step`` of ``decode_loop``;
    call :meth:`close` when the micro-batch is done.
    """

    def __init__(self, gpt, topo: Topology, rows: int, length: int, use_kv_cache: bool = True):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.gpt, self.pp_group = gpt, topo.pg.pp
        self.first, self.last = topo.is_first_stage, topo.is_last_stage
        self.hidden = gpt.config.hidden_size
        self.dtype = gpt.config.pipeline_dtype or gpt.config.params_dtype
        self.ctx = StaticInferenceContext(rows, length) if use_kv_cache else None
        if self.ctx is not None:
            self.ctx.reset()
        self.peak = (0, 0)  # the allocated KV memory's (rows, positions) before compactions
        self.layers = 0  # transformer layers whose keys/values this stage caches

    def __call__(self, tokens: Tensor, rows: Tensor, start: int, end: int, decode: bool):
        """Feed positions ``[start, end)`` (all of ``[0, end)`` without a cache) of the running
        ``rows`` of ``tokens [b, L]``. Returns the logits ``[n, V_pad]`` at position ``end - 1``
        (full vocabulary, every TP rank) on the last stage, None on the others."""
        from megatron.core.inference.communication_utils import (
            recv_from_prev_pipeline_rank_,
            send_to_next_pipeline_rank,
        )

        lo = start if self.ctx is not None else 0
        n, s = rows.numel(), end - lo
        if self.ctx is not None:
            self.ctx.enable_decode_mode() if decode else self.ctx.enable_prefill_mode()
        ids = pos = None
        if self.first:
            ids = tokens[rows, lo:end]
            pos = torch.arange(lo, end, device=tokens.device).expand(n, -1)
        else:
            recv = torch.empty(s, n, self.hidden, dtype=self.dtype, device=tokens.device)
            recv_from_prev_pipeline_rank_(recv, self.pp_group)
            self.gpt.set_input_tensor(recv)
        out = self.gpt(ids, pos, None, inference_context=self.ctx, runtime_gather_output=True)
        if not self.last:
            send_to_next_pipeline_rank(out.to(self.dtype).contiguous(), self.pp_group)
        if self.ctx is not None:
            self.ctx.increment_sequence_len_offset(s)
            self.layers = sum(isinstance(v, tuple) for v in self.ctx.key_value_memory_dict.values())
        return out[:, -1] if self.last else None

    def compact(self, keep: Tensor) -> None:
        """Keep only running rows ``keep`` (indices into the current running batch, [n'] long)
        in every layer's KV cache of this stage; freed rows are released."""
        self.peak = max(self.peak, cache_shape(self.ctx))
        compact_cache(self.ctx, keep)

    def cache_shape(self) -> tuple[int, int]:
        """``(rows, positions)`` of this stage's largest allocated KV memory so far ((0, 0)
        without a cache)."""
        return max(self.peak, cache_shape(self.ctx))

    def close(self) -> None:
        """Drop the cache and the last received activations."""
        if not self.first:
            self.gpt.set_input_tensor(None)
        self.ctx = None


def cache_shape(ctx) -> tuple[int, int]:
    """``(rows, positions)`` of the largest key memory ``[seq, rows, groups, dim]`` held by a
    ``StaticInferenceContext`` ((0, 0) for None or before the first forward)."""
    if ctx is None:
        return (0, 0)
    shapes = [v[0].shape for v in ctx.key_value_memory_dict.values() if isinstance(v, tuple)]
    return max(((int(s[1]), int(s[0])) for s in shapes), default=(0, 0))


def compact_cache(ctx, keep: Tensor) -> None:
    """Keep rows ``keep`` of every ``(key, value)`` memory ``[seq, rows, groups, dim]`` of a
    ``StaticInferenceContext`` (no-op for None). Entries that are not cache tensors (LLaVA's
    ``image_tokens_count``) are left alone."""
    if ctx is None:
        return
    mem = ctx.key_value_memory_dict
    for key, val in list(mem.items()):
        if isinstance(val, tuple):
            mem[key] = tuple(m.index_select(1, keep) for m in val)
