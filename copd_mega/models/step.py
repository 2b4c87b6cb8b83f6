"""One optimizer step of a branch through megatron's forward-backward schedule.

Microbatches are dicts of CPU/GPU tensors ``[mbs, S]`` (S may differ between them): ``tokens``,
``position_ids`` and whatever the loss needs; a microbatch whose rows carry ``media`` (a
``RowMedia``) runs the vision-language model on the inputs ``BranchModel.media_spec`` makes and
gets token-aligned logits (``multimodal.text_logits``).
``loss_fn(mb, logits)`` runs on the **last PP stage** (every TP rank) with vocab-parallel logits ``[mbs, S, V/TP]`` and returns
``(loss_sum, num_units, metrics)`` (``num_units`` a device tensor). megatron's
``calculate_per_token_loss`` (set before DDP is built, ``models.branch.wrap_branch_model``) then divides
the gradient by the global ``num_units`` summed over microbatches and the branch's DP ranks, so
``loss_sum / num_units`` is an exact global mean (tokens for token-mean, sequences for seq-mean).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
import torch.distributed as dist

from copd_mega.models.branch import BranchModel
from copd_mega.models.multimodal import text_logits
from copd_mega.parallel import comm
from copd_mega.parallel.cpu import cpu_mode_active, remap_in_backward
from copd_mega.parallel.topology import Topology

LossFn = Callable[[dict, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]]


def prepare_for_training(bm: BranchModel, topo: Topology) -> None:
    """Hook megatron's grad finalisation into the branch's config.

    Per-token loss scaling must already be on (``models.branch.wrap_branch_model`` sets it before DDP is
    built; setting it afterwards would leave DDP's 1/DP pre-scaling in place and make every
    gradient DP times too small).
    """
    from megatron.core.distributed import finalize_model_grads

    cfg = bm.config
    scales = {
        b.gradient_scaling_factor for b in bm.model.buffers + bm.model.expert_parallel_buffers
    }
    if not cfg.calculate_per_token_loss or scales - {1.0}:
        raise RuntimeError(
            "the branch model was wrapped in DDP without calculate_per_token_loss: build it with "
            "copd_mega.models.gpt.wrap_branch_model, which sets the flag before DDP"
        )
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
    Microbatches may differ in width (``batches.split_microbatches`` cuts each to its longest
    row): at PP > 1 megatron's variable sequence lengths then send each activation's shape.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    assert microbatches, "run_microbatches needs at least one microbatch"
    mbs = microbatches[0]["tokens"].shape[0]
    if bm.sequence_parallel:  # megatron splits the sequence over TP: widths multiple of TP
        microbatches = [pad_width(mb, topo.layout.tp) for mb in microbatches]
    widths = {mb["tokens"].shape[1] for mb in microbatches}
    seq = max(widths)
    if topo.layout.pp > 1:
        microbatches = [pad_rows(mb, mbs) for mb in microbatches]
    # Microbatches of different widths: the stages exchange each activation's shape first
    # (megatron's P2PCommunicator reads the flag at every send/receive).
    bm.config.variable_seq_lengths = len(widths) > 1

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        if "media" in mb:  # vision-language rows: LLaVA forward, logits back at text positions
            logits = text_logits(model, _vlm_inputs(bm, mb))
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
    with sequence_parallel(bm):
        out = _schedule(fb, forward_step, microbatches, bm, seq, mbs, forward_only, topo, extra)
    return list(out) if topo.is_last_stage else []


def _schedule(fb, forward_step, microbatches, bm, seq, mbs, forward_only, topo, extra):
    return fb(
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


@contextmanager
def sequence_parallel(bm: BranchModel):
    """Sequence parallelism on for the forward-backward schedule of a branch built with
    ``parallel.sequence_parallel`` (off outside it: generation runs one position at a time).
    On CPU with it or activation recompute, backward passes run under the CPU layer's device
    mapping too (both allocate on ``torch.cuda.current_device()`` there)."""
    remap = cpu_mode_active() and (bm.sequence_parallel or bm.config.recompute_granularity)
    with remap_in_backward() if remap else nullcontext():
        if not bm.sequence_parallel:
            yield
            return
        from megatron.core.transformer.utils import set_model_to_sequence_parallel

        set_model_to_sequence_parallel(bm.module, True)
        try:
            yield
        finally:
            set_model_to_sequence_parallel(bm.module, False)


def pad_width(mb: dict, multiple: int) -> dict:
    """``mb`` with every per-position tensor (dim 1 of the tokens' width) zero-padded to a
    multiple of ``multiple``; ``position_ids`` continue. Padding positions have mask 0 and come
    after every real position, so a causal model's real logits do not change."""
    rows, width = mb["tokens"].shape
    extra = -width % multiple
    if not extra:
        return mb
    out = {}
    for k, v in mb.items():
        if k == "position_ids":
            out[k] = torch.arange(width + extra, device=v.device).unsqueeze(0).expand(rows, -1)
        elif isinstance(v, torch.Tensor) and v.dim() > 1 and v.shape[1] == width:
            out[k] = torch.cat([v, v.new_zeros((v.shape[0], extra, *v.shape[2:]))], dim=1)
        else:
            out[k] = v
    return out


def _vlm_inputs(bm: BranchModel, mb: dict):
    """The ``LLaVAModel`` inputs of a microbatch whose rows carry ``media``."""
    if bm.media_spec is None:
        raise ValueError("rows carry media but the branch model has no media_spec; build it with "
                         "vision.enabled=true and set BranchModel.media_spec")  # fmt: skip
    return bm.media_spec.inputs(mb["tokens"], mb["media"], mb.get("row_lengths"))


def pad_rows(mb: dict, rows: int) -> dict:
    """``mb`` with zero rows appended up to ``rows`` (every row-aligned tensor; ``position_ids``
    repeated). megatron's pipeline sends one activation shape ``[S, mbs, H]`` between stages, so
    at PP > 1 every microbatch needs the same rows. A zero row has ``mask`` 0: it adds no loss,
    no loss units and no telemetry. ``teacher_topk`` holds only the ``opd_rows`` (not one entry
    per row), so it stays as it is."""
    n = mb["tokens"].shape[0]
    if n == rows:
        return mb
    if "media" in mb:
        raise ValueError("vision-language microbatches run with parallel.pp=1 (no padding)")
    out = {}
    for k, v in mb.items():
        if k == "position_ids":
            out[k] = v[:1].expand(rows, -1)
        elif (
            k not in ("teacher_topk", "opd_index")
            and isinstance(v, torch.Tensor)
            and v.dim() > 0
            and v.shape[0] == n
        ):
            out[k] = torch.cat([v, v.new_zeros((rows - n, *v.shape[1:]))])
        else:
            out[k] = v
    return out


def optimizer_step(bm: BranchModel, loss_is_finite: bool = True) -> dict:
    """Apply the accumulated gradients unless the loss or the grad norm is non-finite, and keep
    the update only if every weight it produced is finite on every rank of the branch.

    Returns ``{"grad_norm": float, "skipped": 0.|1., "restored": 0.|1.}``. A skipped step leaves
    weights and optimizer state unchanged and is reported in the metrics. An update that made a
    weight non-finite (e.g. Adam's 0/0 with ``adam_eps=0``) is undone: this rank's optimizer
    shard (fp32 main weights, moments, the step count per parameter or per param group) is restored from a copy taken before the step and
    the model weights are re-gathered from it; the copy costs one optimizer state of memory
    during the step. Gradients are zeroed either way. Collective over the branch.
    """
    opt = bm.optimizer
    found_inf = opt.prepare_grads()
    norm = float(opt.get_grad_norm())
    ok = loss_is_finite and not found_inf and math.isfinite(norm)
    restored = False
    if ok:
        before = _snapshot(opt)
        applied, _, _ = opt.step()
        ok = bool(applied)
        if ok and not _weights_finite(opt):
            _restore(bm, before)
            ok, restored = False, True
            if dist.get_rank(opt.get_grad_stats_parallel_group()) == 0:
                warnings.warn(
                    f"rank {dist.get_rank()}: the optimizer step made weights non-finite (grad "
                    f"norm {norm:.4g}); restored the previous weights and optimizer state, step "
                    "skipped",
                    stacklevel=2,
                )
    zero_grads(bm)
    return {"grad_norm": norm, "skipped": 0.0 if ok else 1.0, "restored": float(restored)}


def _inner(opt) -> list:
    """The torch optimizers under a (chained) megatron optimizer; each owns this rank's shard."""
    return [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]


def _snapshot(opt) -> list[dict]:
    """Copies of this rank's main weights, per-parameter optimizer state tensors and the param
    groups' ``step`` (two layouts of Adam's step count: torch's Adam keeps a ``step`` tensor per
    parameter, megatron's fused Adam on GPU (TransformerEngine/Apex) one ``step`` per group)."""
    out = []
    for inner in _inner(opt):
        params = [p for g in inner.param_groups for p in g["params"]]
        state = {i: {k: v.clone() for k, v in inner.state.get(p, {}).items() if torch.is_tensor(v)}
                 for i, p in enumerate(params)}  # fmt: skip
        steps = [_copy(g["step"]) if "step" in g else None for g in inner.param_groups]
        out.append({"params": [p.detach().clone() for p in params], "state": state,
                    "group_steps": steps})  # fmt: skip
    return out


def _copy(value):
    return value.clone() if torch.is_tensor(value) else value


@torch.no_grad()
def _restore(bm: BranchModel, snapshot: list[dict]) -> None:
    """Put ``snapshot`` back and rebuild the model weights from it (param all-gather over DP)."""
    opt = bm.optimizer
    for inner, snap in zip(_inner(opt), snapshot, strict=True):
        params = [p for g in inner.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            p.copy_(snap["params"][i])
            saved = snap["state"][i]
            if not saved:  # the step created this state (a first step): drop it whole
                inner.state.pop(p, None)
                continue
            state = inner.state[p]
            for k in [k for k, v in state.items() if torch.is_tensor(v) and k not in saved]:
                del state[k]
            for k, v in saved.items():
                state[k].copy_(v)
        for group, step in zip(inner.param_groups, snap["group_steps"], strict=True):
            if step is None:
                group.pop("step", None)  # the step created the entry: a group without one
            elif torch.is_tensor(group["step"]):
                group["step"].copy_(step)
            else:
                group["step"] = step
    for o in getattr(opt, "chained_optimizers", [opt]):
        o._copy_main_params_to_model_params()
    for chunk in getattr(opt, "model_chunks", None) or [bm.model]:
        chunk.start_param_sync(force_sync=True)


def _weights_finite(opt) -> bool:
    """True when every main weight is finite on every rank of the optimizer's group (the branch):
    one MIN all-reduce of a flag on the weights' device."""
    params = [p for inner in _inner(opt) for g in inner.param_groups for p in g["params"]]
    group = opt.get_grad_stats_parallel_group()
    device = (
        params[0].device if params else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    flag = torch.ones(1, device=device)
    for p in params:
        flag = torch.minimum(flag, torch.isfinite(p).all().to(flag.dtype).reshape(1))
    comm.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item() > 0)


def zero_grads(bm: BranchModel) -> None:
    bm.model.zero_grad_buffer()
    bm.optimizer.zero_grad()


def all_finite(values: torch.Tensor, group: dist.ProcessGroup | None) -> bool:
    """True when every entry of ``values`` is finite on every rank of ``group``.

    ``values`` lives on the rank's compute device; the flag is MIN all-reduced there (NCCL takes
    device tensors only) and read back once.
    """
    flag = torch.isfinite(values.detach()).all().to(torch.float32).reshape(1)
    if group is not None and dist.get_world_size(group) > 1:
        comm.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item() > 0)
