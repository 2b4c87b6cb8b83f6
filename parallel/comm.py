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

Waits that cannot time out: the job's rendezvous store (the TCP store of ``MASTER_ADDR``/
``MASTER_PORT``, or torchrun's agent store) is kept. :func:`wait_for` blocks until named ranks
arrive by polling that store, with no deadline, for as long as the awaited ranks' heartbeats
(``parallel/monitor.py``) move. :func:`barrier` and the object collectives wait there first, and
the trainer calls :func:`wait_for` before every collective that follows work of unbounded or
uneven length (generation, scoring, evaluation, a conversion on one rank), so the collective
timeout (``parallel.collective_timeout_s``) only ever covers a collective every rank has reached.
"""

from __future__ import annotations

import time
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
TYPES = frozenset({"ProcessGroup", "ReduceOp", "Store"})

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
    """Wait until every rank of ``group`` (default: the world) arrives, without a timeout
    (:func:`wait_for` on the group's ranks), then a collective barrier that every rank has
    reached (so no rank leaves, and with it perhaps the store, before all have seen the others)."""
    wait_group(group)
    dist.barrier(group=group)


# ----------------------------------------------------------------------------- object collectives


def all_gather_object(obj, group: dist.ProcessGroup | None = None) -> list:
    """Every rank's picklable ``obj``, in group-rank order, on every rank of ``group``."""
    wait_group(group)
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group: dist.ProcessGroup | None = None):
    """Global rank ``src``'s picklable ``obj`` on every rank of ``group``."""
    wait_group(group)
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


# ----------------------------------------------------------------------------- process groups


def init_process_group(backend: str, rank: int, world_size: int, timeout_s: float) -> None:
    """The default (world) group, env:// rendezvous (``MASTER_ADDR``/``MASTER_PORT``).

    ``timeout_s``: how long a collective may wait. The rendezvous and blocking store calls (group
    set-up) wait at least :data:`STORE_TIMEOUT_S`: ranks start at different times. The store is
    kept for :func:`wait_for` (keys under ``copd/``)."""
    global _STORE, _TIMEOUT
    timeout = _TIMEOUT = timedelta(seconds=timeout_s)
    patient = timedelta(seconds=max(timeout_s, STORE_TIMEOUT_S))
    store, rank, world_size = next(dist.rendezvous("env://", rank, world_size, timeout=patient))
    store.set_timeout(patient)
    dist.init_process_group(
        backend=backend, store=dist.PrefixStore("default_pg", store), rank=rank,
        world_size=world_size, timeout=timeout,
    )  # fmt: skip
    _STORE = dist.PrefixStore("copd", store)
    _ROUNDS.clear()


def new_group(ranks: Sequence[int]) -> dist.ProcessGroup:
    """A group of ``ranks`` (global) with the world's collective timeout. Collective: every rank
    calls it, in the same order."""
    return dist.new_group(list(ranks), timeout=_TIMEOUT)


def collective_timeout() -> timedelta | None:
    """The deadline of one collective the world group was made with (None before it was):
    groups made elsewhere (megatron's ``HyperCommGrid``) are given the same."""
    return _TIMEOUT


def destroy_process_group() -> None:
    global _STORE
    _STORE = None
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- waits without a timeout

_STORE: dist.Store | None = None  # the job's rendezvous store (prefix copd/), once initialised
_TIMEOUT: timedelta | None = None  # parallel.collective_timeout_s, once initialised
_ROUNDS: dict[str, int] = {}  # channel -> how often this rank has waited on it
POLL_MAX_S = 0.5  # longest sleep between two polls of the store
STORE_TIMEOUT_S = 1800.0  # the least a rendezvous or a blocking store call may wait
LIVENESS_S = 300.0  # an awaited rank whose heartbeat stood still this long is lost
ALIVE_KEY = "alive/{}"  # per-rank heartbeat counter (``monitor.Monitor`` adds to it)


class PeerLost(RuntimeError):
    """A rank this one waits for stopped its heartbeat: it died or its process froze."""


def store() -> dist.Store | None:
    """The job's rendezvous store (keys under ``copd/``), or None before
    :func:`init_process_group` (or when torch.distributed was set up elsewhere)."""
    return _STORE


def wait_group(group: dist.ProcessGroup | None = None) -> None:
    """:func:`wait_for` every rank of ``group`` (default: the world); one channel per group."""
    ranks = dist.get_process_group_ranks(group) if group is not None else None
    if ranks is None:
        ranks = list(range(dist.get_world_size()))
    name = "world" if group is None else "group/" + ",".join(map(str, ranks))
    wait_for(ranks, name)


def wait_for(ranks: Sequence[int], channel: str) -> None:
    """Block until every rank in ``ranks`` has called ``wait_for(..., channel)`` as often as this
    rank (each of them calls it with the same ``channel``, and the same number of times).

    No deadline: polls the store (1 ms, doubling to :data:`POLL_MAX_S`) for as long as the awaited
    ranks' heartbeats move; raises :class:`PeerLost` naming a rank whose heartbeat stood still for
    :data:`LIVENESS_S`. Without a store (torch.distributed set up elsewhere) it returns at once.
    Every store call happens before the wait ends, so a rank that hosts the store and leaves
    right after it cannot fail another rank's wait.
    """
    if _STORE is None:
        return
    n = _arrive(_STORE, channel)
    _await(_STORE, {r: f"{channel}/{n}/{r}" for r in ranks if r != dist.get_rank()}, channel)


def wait_for_peers(peers: Sequence[int], tag: str) -> None:
    """:func:`wait_for` each of ``peers`` pairwise (channel ``tag/<low>,<high>`` per pair; both
    ranks of a pair call it equally often), arriving at every pair before waiting at any, so
    ranks with overlapping peer sets cannot wait for each other in a cycle."""
    if _STORE is None:
        return
    me, keys = dist.get_rank(), {}
    for p in sorted(set(peers) - {me}):
        channel = f"{tag}/{min(me, p)},{max(me, p)}"
        keys[p] = f"{channel}/{_arrive(_STORE, channel)}/{p}"
    _await(_STORE, keys, tag)


def _arrive(st: dist.Store, channel: str) -> int:
    """Mark this rank's arrival at the next round of ``channel``; returns the round."""
    me = dist.get_rank()
    n = _ROUNDS.get(channel, 0)
    _ROUNDS[channel] = n + 1
    if n >= 2:  # everyone arrived at round n - 1, so nobody still polls round n - 2
        st.delete_key(f"{channel}/{n - 2}/{me}")
    st.set(f"{channel}/{n}/{me}", "1")
    return n


def _await(st: dist.Store, keys: dict[int, str], where: str) -> None:
    """Poll until every key of ``keys`` (awaited rank -> its arrival key) exists."""
    sleep, beats, next_look = 0.001, {}, time.monotonic() + 10.0
    while keys and not st.check(list(keys.values())):
        time.sleep(sleep)
        sleep = min(2 * sleep, POLL_MAX_S)
        if time.monotonic() > next_look:
            next_look = time.monotonic() + 10.0
            keys = {r: k for r, k in keys.items() if not st.check([k])}
            _check_alive(st, list(keys), beats, where)


def _check_alive(st: dist.Store, ranks: list[int], beats: dict, where: str) -> None:
    """Raise :class:`PeerLost` when an awaited rank's heartbeat has not moved for LIVENESS_S
    (``beats``: rank -> (last count, when it changed), kept by the caller between looks)."""
    now = time.monotonic()
    for r in ranks:
        count = st.add(ALIVE_KEY.format(r), 0)
        last, since = beats.get(r, (None, now))
        if count != last:
            beats[r] = (count, now)
        elif count > 0 and now - since > LIVENESS_S:
            raise PeerLost(
                f"global rank {r} stopped its heartbeat {now - since:.0f}s ago while global rank "
                f"{dist.get_rank()} waited for it at {where}: that rank died or froze (see its "
                "output above); the job cannot continue, resume it with --resume=auto"
            )
