"""Waits without a deadline (``comm.wait_for``, ``wait_for_peers``, ``barrier``) on 2 gloo ranks
whose collective timeout is 2 s: a rank 6 s late times nothing out; a rank whose heartbeat
stops is named in a ``PeerLost`` error."""

from __future__ import annotations

import time

import pytest
import torch

from copd_mega.parallel import comm, monitor
from copd_mega.parallel.dist import init_distributed
from multiproc import spawn

pytestmark = pytest.mark.multiproc

LATE_S = 6.0


def _late_rank(rank: int) -> dict:
    init_distributed("gloo", timeout_s=2.0)
    out = {}
    if rank == 1:
        time.sleep(LATE_S)  # longer than a collective may wait
    t0 = time.monotonic()
    comm.wait_for([0, 1], "test")
    out["waited"] = time.monotonic() - t0
    out["sum"] = comm.all_reduce(torch.tensor([rank + 1.0])).item()
    if rank == 0:
        time.sleep(LATE_S)
    comm.wait_for_peers([1 - rank], "pairs")
    comm.barrier()
    out["objects"] = comm.all_gather_object(rank)
    return out


def test_a_late_rank_times_nothing_out():
    a, b = spawn(_late_rank, 2)
    assert a["waited"] > LATE_S - 1 and a["sum"] == b["sum"] == 3.0
    assert a["objects"] == b["objects"] == [0, 1]


def _lost_rank(rank: int) -> str:
    init_distributed("gloo", timeout_s=2.0)
    comm.LIVENESS_S = 1.0
    comm.barrier()
    if rank == 1:
        monitor.stop()  # its heartbeat stops: as if the process froze
        time.sleep(15)  # rank 0 looks at heartbeats every 10 s
        comm.wait_for([0, 1], "done")
        return ""
    try:
        comm.wait_for([0, 1], "never")
        message = "no error"
    except comm.PeerLost as e:
        message = str(e)
    comm.wait_for([0, 1], "done")  # both leave together (the 2 s collective timeout)
    return message


def test_a_rank_whose_heartbeat_stops_is_named():
    message, _ = spawn(_lost_rank, 2)
    assert message.startswith("global rank 1 stopped its heartbeat"), message
