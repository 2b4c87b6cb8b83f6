"""Stream a branch replica's weights from its Megatron TP/PP shards as Hugging Face tensors.

A rollout engine that holds the whole model on each rank of a model replica (generation TP 1)
is refreshed from the training shards without a disk and without gathering the model at once:

* :class:`SyncPlan` (built once, collective over the replica's ``mp`` group): which rank holds
  which piece of every global tensor (megatron's sharded state dict: global key, shape and
  offset of each local shard; a TP- or PP-replicated piece is taken from one rank only).
* :func:`stream_hf_weights` (collective over the ``mp`` group): one *unit* at a time (the
  embedding, one transformer layer, the final norm, the output layer), each piece is broadcast
  from its owner, every rank assembles the unit's global tensors and maps them to HF names with
  :mod:`copd_mega.hf.mapping` (split QKV and gate/up, padded vocabulary rows dropped). It is a
  generator of ``(hf_name, tensor)`` that the engine consumes as it loads, so the extra memory
  is one layer.

Keys follow ``mapping.megatron_specs``; a parameter the mapping does not know is an error. A
tied model's embedding is also sent as ``lm_head.weight`` (the engine's output layer is untied).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from copd_mega.ckpt.sharded_state import model_sharded_state_dict
from copd_mega.config import ModelConfig
from copd_mega.hf import mapping as mp
from copd_mega.parallel import comm

LAYER_PREFIX = "decoder.layers."


@dataclass(frozen=True)
class Piece:
    """One rank's shard of a unit tensor: ``owner`` (group rank) holds its ``index``-th local
    tensor, which fills ``[offset, offset + shape)`` of the unit tensor (layer axis removed)."""

    key: str
    layer: int  # global layer index, -1 for non-layer tensors
    owner: int
    index: int
    offset: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass
class SyncPlan:
    """Which rank of the replica sends what, the same on every rank of the ``mp`` group."""

    units: list[list[Piece]]  # in streaming order: embedding, layers 0..L-1, norm, output
    full_shape: dict[str, tuple[int, ...]]  # unit tensor shape per key (layer axis removed)
    dtype: dict[str, torch.dtype]
    ranks: list[int]  # global rank of each group rank
    group: dist.ProcessGroup


def _local_shards(model, topo) -> list:
    """This rank's ShardedTensors of the model, in a fixed order (the plan's ``index``)."""
    sd = model_sharded_state_dict(model, topo)
    out = []
    for k in sorted(sd):
        v = sd[k]
        if hasattr(v, "build_fn"):  # a ShardedTensorFactory (SwiGLU fc1: gate and up halves)
            out += v.build()
        elif hasattr(v, "global_shape"):
            out.append(v)
    return out


def build_plan(model, topo, m: ModelConfig) -> SyncPlan:
    """Collective over ``topo.pg.mp``: every rank's shard metadata, de-duplicated."""
    group = topo.pg.mp
    known = {s.key for s in mp.megatron_specs(m, 1, torch.float32)}
    mine = []
    for i, sh in enumerate(_local_shards(model, topo)):
        if sh.key not in known:
            raise ValueError(f"weight sync: parameter {sh.key} has no Hugging Face name")
        layered = sh.key.startswith(LAYER_PREFIX)
        pre = sh.prepend_axis_num
        meta = dict(key=sh.key, index=i, replica=tuple(sh.replica_id),
                    offset=tuple(sh.global_offset), shape=tuple(sh.local_shape),
                    full=tuple(sh.global_shape), pre=pre, layered=layered,
                    dtype=str(sh.data.dtype))  # fmt: skip
        mine.append(meta)
    everyone = comm.all_gather_object((dist.get_rank(), mine), group)
    chosen: dict[tuple, tuple] = {}
    full_shape, dtype = {}, {}
    for owner, (_, metas) in enumerate(everyone):
        for me in metas:
            pre = me["pre"]
            layer = me["offset"][0] if me["layered"] else -1
            offset = me["offset"][pre:] if me["layered"] else me["offset"]
            full_shape[me["key"]] = me["full"][1:] if me["layered"] else me["full"]
            dtype[me["key"]] = getattr(torch, me["dtype"].removeprefix("torch."))
            piece = Piece(me["key"], layer, owner, me["index"], offset, me["shape"])
            slot = (me["key"], layer, offset)
            rank_key = (me["replica"], owner)
            if slot not in chosen or rank_key < chosen[slot][0]:
                chosen[slot] = (rank_key, piece)
    by_unit: dict[tuple[int, int], list[Piece]] = {}
    for _, piece in sorted(chosen.values(), key=lambda x: (x[1].key, x[1].layer, x[1].offset)):
        order = {mp.EMBEDDING: 0, mp.FINAL_NORM: 2, mp.OUTPUT: 3}.get(piece.key, 1)
        by_unit.setdefault((order, piece.layer), []).append(piece)
    units = [by_unit[u] for u in sorted(by_unit)]
    return SyncPlan(units, full_shape, dtype, [r for r, _ in everyone], group)


def _assemble(plan: SyncPlan, unit: list[Piece], local: list, me: int) -> dict[str, torch.Tensor]:
    """The unit's global tensors on every rank of the group: each piece is broadcast from the
    rank that holds it."""
    out: dict[str, torch.Tensor] = {}
    many = len(plan.ranks) > 1
    dev = local[0].data.device
    for p in unit:
        if p.key not in out:
            out[p.key] = torch.empty(plan.full_shape[p.key], dtype=plan.dtype[p.key], device=dev)
        dst = out[p.key][tuple(slice(o, o + s) for o, s in zip(p.offset, p.shape, strict=True))]
        if p.owner == me:
            buf = local[p.index].data.contiguous()
        else:
            buf = torch.empty(p.shape, dtype=plan.dtype[p.key], device=dev)
        if many:
            comm.broadcast(buf, src=plan.ranks[p.owner], group=plan.group)
        dst.copy_(buf)
    return out


def _to_hf(tensors: dict[str, torch.Tensor], layer: int, m: ModelConfig):
    """HF ``(name, tensor)`` pairs of one unit (padded vocabulary rows dropped)."""
    if layer >= 0:
        yield from mp.layer_to_hf(tensors, layer, m).items()
        return
    names = {mp.EMBEDDING: mp.HF_EMBEDDING, mp.OUTPUT: mp.HF_LM_HEAD, mp.FINAL_NORM: mp.HF_NORM}
    for key, t in tensors.items():
        yield names[key], (t[: m.vocab_size] if key in (mp.EMBEDDING, mp.OUTPUT) else t)
        if key == mp.EMBEDDING and m.tie_embeddings:  # the engine's output layer is untied
            yield mp.HF_LM_HEAD, t[: m.vocab_size]


def stream_hf_weights(
    plan: SyncPlan, model, topo, m: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor of the model, unit by unit (valid until the next unit), on every rank of
    the plan's group. Collective over that group: every rank consumes the whole stream."""
    local = _local_shards(model, topo)
    me = dist.get_rank(plan.group)
    with torch.no_grad():
        for unit in plan.units:
            yield from _to_hf(_assemble(plan, unit, local, me), unit[0].layer, m)
