"""Peer scoring exchange: student rollouts out to the teacher, log-probs and top-k ids back.

For a teaching edge (student s, teacher t), the rank at coordinate (tp, pp, dp) of branch s sends
its rollouts on t's prompts to the rank at the same coordinate of branch t (so every teacher TP/PP
rank holds the sequences its forward pass needs), and the teacher's **last PP stage** ranks send
the per-token results back to the student's last-stage ranks at the same coordinate. All traffic
is point-to-point between exactly those two ranks (NCCL on GPU, gloo on CPU). Every rank posts
all of its sends and receives of one round together (``batch_isend_irecv``), so edges that run
both ways in the same step cannot deadlock.

Each round starts with a store wait for exactly the ranks it exchanges with
(``comm.wait_for_peers``, no deadline): a teacher still sampling (the hub samples on every
spoke's prompts) or scoring keeps its students waiting there, not in a p2p receive that times out.

Round 1 (:func:`send_rollouts`): shapes first, then the packed rollouts.
Round 2 (:func:`return_scores`): teacher log-probs ``[N, L]`` fp32 and top-k ids ``[N, L, k]``.
"""

from __future__ import annotations

import torch

from copd_mega.parallel import comm
from copd_mega.parallel.topology import Topology


def pack_rollouts(tokens: torch.Tensor, prompt_lens: torch.Tensor, lengths: torch.Tensor):
    """``[N, L]`` tokens plus ``[N]`` prompt lengths and lengths -> one ``[N, L + 2]`` int64."""
    return torch.cat([prompt_lens[:, None], lengths[:, None], tokens], dim=1).long().contiguous()


def unpack_rollouts(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_rollouts`: (tokens ``[N, L]``, prompt_lens ``[N]``, lengths ``[N]``)."""
    return packed[:, 2:], packed[:, 0], packed[:, 1]


def send_rollouts(
    topo: Topology,
    outgoing: dict[str, torch.Tensor],
    students: list[str],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Send packed rollouts to each teacher and receive each student's, in one round.

    ``outgoing`` maps teacher branch -> packed ``[N, L+2]`` int64 (this rank is the student);
    ``students`` lists the branches this rank's branch teaches this step. Every rank of both
    branches takes part. Returns student branch -> packed rollouts received (valid on every rank
    of the teacher branch).
    """
    layout, rank = topo.layout, topo.rank
    comm.wait_for_peers([layout.peer_rank(rank, b) for b in [*outgoing, *students]], "exchange")
    shapes_in = {s: torch.zeros(2, dtype=torch.long, device=device) for s in students}
    comm.send_recv(
        [
            (torch.tensor(t.shape, device=device), layout.peer_rank(rank, n))
            for n, t in outgoing.items()
        ],
        [(buf, layout.peer_rank(rank, s)) for s, buf in shapes_in.items()],
    )
    incoming = {
        s: torch.empty(tuple(shape.tolist()), dtype=torch.long, device=device)
        for s, shape in shapes_in.items()
    }
    comm.send_recv(
        [(t.to(device), layout.peer_rank(rank, n)) for n, t in outgoing.items()],
        [(buf, layout.peer_rank(rank, s)) for s, buf in incoming.items()],
    )
    return incoming


def return_scores(
    topo: Topology,
    scores: dict[str, tuple[torch.Tensor, torch.Tensor]],
    expected: dict[str, tuple[int, int]],
    top_k: int,
    device: torch.device,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Send each student its teacher scores and receive this branch's, in one round.

    Only last-PP-stage ranks take part (others return ``{}``). ``scores`` maps student branch ->
    (log-probs ``[N, L]`` fp32, top-k ids ``[N, L, k]`` int64) computed by this (teacher) rank;
    ``expected`` maps teacher branch -> (N, L) of the rollouts this rank sent it. Returns teacher
    branch -> (log-probs, top-k ids), valid on the student's last-stage ranks.
    """
    if not topo.is_last_stage:
        return {}
    layout, rank = topo.layout, topo.rank
    comm.wait_for_peers([layout.peer_rank(rank, b) for b in [*scores, *expected]], "scores")
    sends, recvs = [], []
    for student, (logp, topk) in scores.items():
        peer = layout.peer_rank(rank, student)
        sends.append((logp.float().contiguous().to(device), peer))
        sends.append((topk.long().contiguous().to(device), peer))
    received = {}
    for teacher, (n, length) in expected.items():
        peer = layout.peer_rank(rank, teacher)
        logp = torch.empty(n, length, dtype=torch.float32, device=device)
        topk = torch.empty(n, length, top_k, dtype=torch.long, device=device)
        recvs += [(logp, peer), (topk, peer)]
        received[teacher] = (logp, topk)
    comm.send_recv(sends, recvs)
    return received


def send_media(
    topo: Topology,
    outgoing: dict[str, tuple[torch.Tensor, torch.Tensor]],
    students: list[str],
    device: torch.device,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Send the media of the rollouts in :func:`send_rollouts`, over the same peer ranks.

    ``outgoing`` maps teacher branch -> (pixels ``[T, 3, H, W]`` float32 in [0, 1], meta ``[m]``
    int64: the rows' media counts and tiles, ``multimodal.RowMedia.pack``); pixels travel
    unchanged, so the teacher scores exactly the pixels the student sampled from. Every rank of
    both branches takes part. Returns student branch -> (pixels, meta), valid on every rank of
    the teacher branch. Empty tensors are not posted (their sizes travel in the header).
    """
    layout, rank = topo.layout, topo.rank
    heads_in = {s: torch.zeros(4, dtype=torch.long, device=device) for s in students}
    heads_out = []
    for name, (pix, meta) in outgoing.items():
        head = [pix.shape[0], pix.shape[-2], pix.shape[-1], meta.numel()]
        heads_out.append((torch.tensor(head, device=device), layout.peer_rank(rank, name)))
    comm.send_recv(heads_out, [(buf, layout.peer_rank(rank, s)) for s, buf in heads_in.items()])
    incoming, sends, recvs = {}, [], []
    for s, head in heads_in.items():
        t, h, w, m = head.tolist()
        pix = torch.empty(t, 3, h, w, dtype=torch.float32, device=device)
        meta = torch.empty(m, dtype=torch.long, device=device)
        incoming[s] = (pix, meta)
        recvs += [(x, layout.peer_rank(rank, s)) for x in (pix, meta) if x.numel()]
    for name, (pix, meta) in outgoing.items():
        peer = layout.peer_rank(rank, name)
        for x in (pix.float().contiguous().to(device), meta.long().contiguous().to(device)):
            if x.numel():
                sends.append((x, peer))
    comm.send_recv(sends, recvs)
    return incoming
