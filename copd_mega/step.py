"""One optimizer step of a branch through megatron's forward-backward schedule.

Microbatches are dicts of CPU/GPU tensors with a common padded length ``[mbs, S]``: ``tokens``,
``position_ids`` and whatever the loss needs; a microbatch with ``vlm`` (a ``VLMBatch``) runs
the vision-language model and gets token-aligned logits (``multimodal.text_logits``).
``loss_fn(mb, logits)`` runs on the **last PP stage** (every TP rank) with vocab-parallel logits ``[mbs, S, V/TP]`` and returns
``(loss_sum, num_units, metrics)``. megatron's ``calculate_per_token_loss`` then divides the
gradient by the global ``num_units`` summed over microbatches and the branch's DP ranks, so
``loss_sum / num_units`` is an exact global mean (tokens for token-mean, sequences for seq-mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist

from copd_mega.model import BranchModel
from copd_mega.multimodal import text_logits
from copd_mega.parallel.topology import Topology

LossFn = Callable[[dict, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]]


def prepare_for_training(bm: BranchModel, topo: Topology) -> None:
    """Hook megatron's grad finalisation and per-token loss scaling into the branch's config."""
    from megatron.core.distributed import finalize_model_grads

    cfg = bm.config
    cfg.calculate_per_token_loss = True
    cfg.finalize_model_grads_func = partial(finalize_model_grads, pg_collection=topo.pg)
    cfg.no_sync_func = bm.model.no_sync
    cfg.grad_scale_func = None


def run_microbatches(
    bm: BranchModel,
    topo: Topology,
    microbatches: list[dict],
    loss_fn: LossFn,
    forward_only: bool = False,
) -> list[dict]:
    """Forward (and backward unless ``forward_only``) over ``microbatches`` on this branch.

    Returns the per-microbatch metric dicts produced by ``loss_fn`` on the last PP stage;
    other stages get an empty list. Gradients accumulate in the DDP buffers. With PP > 1 a
    short microbatch is padded to the first one's rows (:func:`pad_rows`), so per-row outputs
    of the last microbatch may carry extra rows at their end: cut them to the real row count.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    assert microbatches, "run_microbatches needs at least one microbatch"
    mbs, seq = microbatches[0]["tokens"].shape
    if topo.layout.pp > 1:
        microbatches = [pad_rows(mb, mbs) for mb in microbatches]

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        if "vlm" in mb:  # vision-language rows: LLaVA forward, logits back at text positions
            logits = text_logits(model, mb["vlm"])
        else:
            logits = model(mb["tokens"], mb["position_ids"], None)

        def loss_func(output):
            loss, units, metrics = loss_fn(mb, output)
            return loss, units.to(torch.int), metrics

        return logits, loss_func

    pp = topo.layout.pp
    fb = get_forward_backward_func(pp_size=pp, vp_size=None)
    extra = {}
    if pp > 1:
        extra["p2p_communicator"] = P2PCommunicator(topo.pg.pp, bm.config)
    out = fb(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[bm.model],
        num_microbatches=len(microbatches),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only,
        pg_collection=topo.pg,
        **extra,
    )
    return list(out) if topo.is_last_stage else []


def pad_rows(mb: dict, rows: int) -> dict:
    """``mb`` with zero rows appended up to ``rows`` (every row-aligned tensor; ``position_ids``
    repeated). megatron's pipeline sends one activation shape ``[S, mbs, H]`` between stages, so
    at PP > 1 every microbatch needs the same rows. A zero row has ``mask`` 0: it adds no loss,
    no loss units and no telemetry."""
    n = mb["tokens"].shape[0]
    if n == rows:
        return mb
    if "vlm" in mb:
        raise ValueError("vision-language microbatches run with parallel.pp=1 (no padding)")
    out = {}
    for k, v in mb.items():
        if k == "position_ids":
            out[k] = v[:1].expand(rows, -1)
        elif isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            out[k] = torch.cat([v, v.new_zeros((rows - n, *v.shape[1:]))])
        else:
            out[k] = v
    return out


def optimizer_step(bm: BranchModel, loss_is_finite: bool = True) -> dict:
    """Apply the accumulated gradients unless the loss or the grad norm is non-finite.

    Returns ``{"grad_norm": float, "skipped": 0.|1.}``. A skipped step leaves weights unchanged
    and is reported in the metrics (never applied). Gradients are zeroed either way.
    """
    opt = bm.optimizer
    found_inf = opt.prepare_grads()
    norm = float(opt.get_grad_norm())
    ok = loss_is_finite and not found_inf and math.isfinite(norm)
    if ok:
        applied, _, _ = opt.step()
        ok = bool(applied)
    zero_grads(bm)
    return {"grad_norm": norm, "skipped": 0.0 if ok else 1.0}


def zero_grads(bm: BranchModel) -> None:
    bm.model.zero_grad_buffer()
    bm.optimizer.zero_grad()


def all_finite(values: list[float], group: dist.ProcessGroup | None) -> bool:
    """True when every value is finite on every rank of ``group`` (a MIN all-reduce)."""
    flag = torch.tensor([1.0 if all(math.isfinite(v) for v in values) else 0.0])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item() > 0)
