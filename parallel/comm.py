"""Every torch.distributed call of the package that communicates, synchronises or makes groups.

The rule (enforced by ``tests/test_collectives_module.py``): outside this module, package code
may only *query* torch.distributed (:data:`QUERIES`: whether it is initialised, ranks, sizes,
backends) and name its types (:data:`TYPES`). Collectives, point-to-point, barriers, object
collectives and group creation/destruction go through the thin wrappers here. Libraries that
communicate on their own (megatron-core, ``torch.distributed.checkpoint``) are handed groups
made here.

Why: NCCL takes CUDA tensors only, and the CPU tests (gloo) accept any tensor, so a CPU tensor
in a collective would first fail on a cluster. Every tensor wrapper checks, when the group's
backend is NCCL, that each tensor is on a CUDA device and raises an error naming the call
otherwise. Under gloo the check is skipped (gloo takes CPU tensors). Object collectives
(``*_object``) serialise on the device torch picks for the backend and need no check.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

# torch.distributed attributes that package code may use anywhere (no communication).
QUERIES = frozenset(
    {
        "is_available",
        "is_initialized",
        "get_rank",
        "get_world_size",
        "get_backend",
        "get_global_rank",
        "get_process_group_ranks",
    }
)
TYPES = frozenset({"ProcessGroup", "ReduceOp"})

ReduceOp = dist.ReduceOp


class DeviceError(RuntimeError):
    """A tensor passed to an NCCL collective is not on a CUDA device."""


def check_device(call: str, tensors: Sequence[torch.Tensor], backend: str) -> None:
    """Raise :class:`DeviceError` if ``backend`` is NCCL and a tensor is not on a CUDA device.

    Pure: ``backend`` is the group's backend name (``dist.get_backend(group)``), so the check is
    testable without NCCL. ``call`` names the collective in the message.
    """
    if backend != "nccl":
        return
    for i, t in enumerate(tensors):
        if t.device.type != "cuda":
            raise DeviceError(
                f"{call}: tensor {i} (shape {tuple(t.shape)}, {t.dtype}) is on {t.device}, but "
                "the group's backend is NCCL, which takes CUDA tensors only; build it on the "
                "rank's device (copd_mega.parallel.dist.device() or the model's device)"
            )


def _check(call: str, tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    check_device(call, tensors, str(dist.get_backend(group)))


# ----------------------------------------------------------------------------- tensor collectives


def all_reduce(
    tensor: torch.Tensor, op: dist.ReduceOp = ReduceOp.SUM, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` over ``group`` (default: the world); returns it."""
    _check("all_reduce", [tensor], group)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def broadcast(
    tensor: torch.Tensor,
    *,
    src: int | None = None,
    group_src: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """In-place broadcast from global rank ``src`` or group rank ``group_src``; returns it."""
    _check("broadcast", [tensor], group)
    dist.broadcast(tensor, src=src, group=group, group_src=group_src)
    return tensor


def all_gather(
    outputs: list[torch.Tensor], tensor: torch.Tensor, group: dist.ProcessGroup | None = None
) -> list[torch.Tensor]:
    """Gather ``tensor`` from every rank of ``group`` into ``outputs`` (one per rank)."""
    _check("all_gather", [*outputs, tensor], group)
    dist.all_gather(outputs, tensor, group=group)
    return outputs


def all_gather_into_tensor(
    output: torch.Tensor, tensor: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Gather ``tensor`` from every rank of ``group`` into ``output`` (concatenated on dim 0)."""
    _check("all_gather_into_tensor", [output, tensor], group)
    dist.all_gather_into_tensor(output, tensor, group=group)
    return output


def send_recv(
    sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]
) -> None:
    """Post every send and receive together (``batch_isend_irecv``) and wait for all of them.

    ``sends``/``recvs``: (tensor, peer global rank). Posting both directions in one batch keeps
    exchanges that run both ways from deadlocking. Nothing is posted when both are empty.
    """
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
    if not ops:
        return
    _check("send_recv", [op.tensor for op in ops], None)
    for req in dist.batch_isend_irecv(ops):
        req.wait()


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait until every rank of ``group`` (default: the world) arrives."""
    dist.barrier(group=group)


# ----------------------------------------------------------------------------- object collectives


def all_gather_object(obj, group: dist.ProcessGroup | None = None) -> list:
    """Every rank's picklable ``obj``, in group-rank order, on every rank of ``group``."""
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group: dist.ProcessGroup | None = None):
    """Global rank ``src``'s picklable ``obj`` on every rank of ``group``."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


# ----------------------------------------------------------------------------- process groups


def init_process_group(backend: str, rank: int, world_size: int, timeout_s: float) -> None:
    """The default (world) group, env:// rendezvous (``MASTER_ADDR``/``MASTER_PORT``)."""
    dist.init_process_group(
        backend=backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )


def new_group(ranks: Sequence[int]) -> dist.ProcessGroup:
    """A group of ``ranks`` (global). Collective: every rank calls it, in the same order."""
    return dist.new_group(list(ranks))


def destroy_process_group() -> None:
    dist.destroy_process_group()
