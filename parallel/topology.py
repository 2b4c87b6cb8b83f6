"""Branches, their per-branch TP x PP x DP grids, peer groups across branches, the teaching graph.

The world is partitioned into B branches, each a contiguous block of R = TP*PP*DP ranks. Inside a
branch, local rank l has coordinates (tp, pp, dp) with TP fastest: l = tp + TP*(pp + PP*dp) (the
order megatron calls ``tp-cp-ep-pp-dp``). A **peer group** joins the ranks holding the same
(tp, pp, dp) coordinate in every branch: global ranks {b*R + l for every branch b}. Those ranks hold
the same parameter shards, so merging is an all-reduce over a peer group and peer scoring pairs a
rank with the same-coordinate rank of its teacher.

``plan_layout`` is pure (no processes): ``copd plan`` prints it. ``build_topology`` creates every
process group on every rank, in one fixed order (collective over the world), and returns this
rank's :class:`Topology`. Megatron's global ``parallel_state`` is never initialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from copd_mega.config import Config, ConfigError
from copd_mega.parallel import comm

GRID_DIMS = ["tp", "cp", "ep", "pp", "dp"]  # cp and ep are size 1; megatron still wants groups


@dataclass(frozen=True)
class BranchLayout:
    """One branch's block of global ranks and its groups (lists of global ranks)."""

    index: int
    name: str
    first_rank: int
    size: int
    tp_groups: list[list[int]]
    pp_groups: list[list[int]]
    dp_groups: list[list[int]]

    @property
    def ranks(self) -> list[int]:
        return list(range(self.first_rank, self.first_rank + self.size))


@dataclass(frozen=True)
class Layout:
    """The whole job's rank layout; pure data, the same on every rank."""

    world_size: int
    tp: int
    pp: int
    dp: int
    branches: list[BranchLayout]
    peer_groups: list[list[int]]  # one per local coordinate, ordered by branch index
    edges: list[tuple[str, str]]  # teaching edges (student, teacher)

    @property
    def ranks_per_branch(self) -> int:
        return self.tp * self.pp * self.dp

    def branch_of(self, rank: int) -> BranchLayout:
        return self.branches[rank // self.ranks_per_branch]

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp, pp, dp) coordinate of a global rank inside its branch."""
        local = rank % self.ranks_per_branch
        return local % self.tp, (local // self.tp) % self.pp, local // (self.tp * self.pp)

    def peer_rank(self, rank: int, branch: str) -> int:
        """The global rank holding ``rank``'s coordinate in ``branch``."""
        idx = [b.name for b in self.branches].index(branch)
        return idx * self.ranks_per_branch + rank % self.ranks_per_branch


def teaching_edges(names: list[str], graph: str, hub: str = "") -> list[tuple[str, str]]:
    """Directed teaching edges (student, teacher); every connected pair appears both ways.

    ``pairwise``: every ordered pair. ``hub_spoke``: hub <-> each spoke, spokes never teach each
    other. ``ring``: each branch with its successor (and back). ``none``: no edges.
    """
    if graph == "none" or len(names) < 2:
        return []
    if graph == "pairwise":
        return [(s, t) for s in names for t in names if s != t]
    if graph == "hub_spoke":
        if hub not in names:
            raise ConfigError(f"teaching.hub={hub!r} is not a branch; set it to one of {names}")
        spokes = [n for n in names if n != hub]
        return [e for s in spokes for e in ((hub, s), (s, hub))]
    if graph == "ring":
        pairs = {(names[i], names[(i + 1) % len(names)]) for i in range(len(names))}
        both = pairs | {(t, s) for s, t in pairs}
        return sorted(both, key=lambda e: (names.index(e[0]), names.index(e[1])))
    raise ConfigError(f"teaching.graph={graph!r}: use pairwise, hub_spoke, ring or none")


def _local_groups(tp: int, pp: int, dp: int, dim: str) -> list[list[int]]:
    """Local-rank groups varying along ``dim`` (tp | pp | dp), in megatron's enumeration order."""

    def loc(t: int, p: int, d: int) -> int:
        return t + tp * (p + pp * d)

    if dim == "tp":
        return [[loc(t, p, d) for t in range(tp)] for d in range(dp) for p in range(pp)]
    if dim == "pp":
        return [[loc(t, p, d) for p in range(pp)] for d in range(dp) for t in range(tp)]
    return [[loc(t, p, d) for d in range(dp)] for p in range(pp) for t in range(tp)]


def check_vision_fits(cfg: Config) -> None:
    """Divisibility and support checks for ``vision.*`` against ``parallel.*``; ConfigError."""
    v, tp = cfg.vision, cfg.parallel.tp
    if not v.enabled:
        raise ConfigError(
            "vision.enabled=false: build the text model (models.gpt.build_gpt) instead"
        )
    problems = [
        (v.image_size % v.patch_size, f"vision.image_size={v.image_size} is not divisible by "
         f"vision.patch_size={v.patch_size}; choose a patch size that tiles the image"),
        (v.hidden_size % v.num_attention_heads, f"vision.hidden_size={v.hidden_size} is not "
         f"divisible by vision.num_attention_heads={v.num_attention_heads}"),
        (v.num_attention_heads % tp, f"vision.num_attention_heads={v.num_attention_heads} is not "
         f"divisible by parallel.tp={tp}; choose a TP size that divides it"),
        (v.ffn_hidden_size % tp, f"vision.ffn_hidden_size={v.ffn_hidden_size} is not divisible "
         f"by parallel.tp={tp}; choose a TP size that divides it"),
        (cfg.parallel.pp != 1, f"parallel.pp={cfg.parallel.pp}: the vision-language model runs "
         "with parallel.pp=1 (scale it with TP/DP)"),
    ]  # fmt: skip
    for bad, message in problems:
        if bad:
            raise ConfigError(message)


def check_model_fits(cfg: Config) -> None:
    """Divisibility checks between the model and the per-branch grid (no world size needed)."""
    m, p = cfg.model, cfg.parallel
    if m.num_attention_heads % p.tp:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tp={p.tp}; choose a TP size that divides the head count"
        )
    if m.num_query_groups % p.tp:
        raise ConfigError(
            f"model.num_query_groups={m.num_query_groups} is not divisible by parallel.tp={p.tp}; "
            "each TP rank needs whole key/value groups"
        )
    if m.ffn_hidden_size % p.tp:
        raise ConfigError(
            f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tp={p.tp}"
        )
    if cfg.vision.enabled:
        check_vision_fits(cfg)
    if m.num_layers % p.pp:
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pp={p.pp}; "
            "choose PP that divides the layer count"
        )


def plan_layout(cfg: Config, world_size: int) -> Layout:
    """The rank layout for ``world_size`` ranks, or a ConfigError saying what to change."""
    check_model_fits(cfg)
    p = cfg.parallel
    per = cfg.ranks_per_branch
    nb = len(cfg.branches)
    if world_size < 1:
        raise ConfigError(
            f"world size {world_size} must be >= 1; use world size {nb * per} ({nb} branches x "
            f"{per} ranks)"
        )
    if world_size != nb * per:
        fits = world_size // per if world_size % per == 0 else None
        fix = (
            f"configure {fits} branches" if fits
            else f"use world size {nb * per} ({nb} branches x {per} ranks)"
        )  # fmt: skip
        raise ConfigError(
            f"world size {world_size} != {nb} branches x TP{p.tp} x PP{p.pp} x DP{p.dp} "
            f"= {nb * per}; {fix}, or change parallel.tp/pp/dp"
        )
    names = cfg.branch_names
    branches = []
    for b, name in enumerate(names):
        off = b * per
        shift = lambda groups, off=off: [[off + r for r in g] for g in groups]  # noqa: E731
        branches.append(
            BranchLayout(
                index=b, name=name, first_rank=off, size=per,
                tp_groups=shift(_local_groups(p.tp, p.pp, p.dp, "tp")),
                pp_groups=shift(_local_groups(p.tp, p.pp, p.dp, "pp")),
                dp_groups=shift(_local_groups(p.tp, p.pp, p.dp, "dp")),
            )
        )  # fmt: skip
    peers = [[b * per + local for b in range(nb)] for local in range(per)]
    edges = teaching_edges(names, cfg.teaching.graph, cfg.teaching.hub)
    return Layout(world_size, p.tp, p.pp, p.dp, branches, peers, edges)


@dataclass
class Topology:
    """This rank's view: its branch, coordinates, megatron process groups and peer group."""

    layout: Layout
    rank: int
    branch: BranchLayout
    tp_rank: int
    pp_rank: int
    dp_rank: int
    pg: object  # megatron ProcessGroupCollection of this rank's branch
    peer_group: dist.ProcessGroup  # ranks with this coordinate in every branch
    branch_group: dist.ProcessGroup  # every rank of this branch

    @property
    def is_branch_leader(self) -> bool:
        return self.rank == self.branch.first_rank

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0


def _build_branch_pgs(layout: Layout, branch: BranchLayout):
    """Create every megatron group of one branch (collective: all ranks call for all branches)."""
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection

    grid = HyperCommGrid([layout.tp, 1, 1, layout.pp, layout.dp], GRID_DIMS, branch.first_rank)
    comm.wait_group()  # ranks reach start-up at different times; group set-up has a deadline
    timeout = comm.collective_timeout()
    g = {name: grid.create_pg(dims, timeout=timeout) for name, dims in [
        ("tp", "tp"), ("cp", "cp"), ("ep", "ep"), ("pp", "pp"), ("dp", "dp"),
        ("dp_cp", ["cp", "dp"]), ("mp", ["tp", "pp"]), ("tp_cp", ["tp", "cp"]),
        ("tp_ep", ["tp", "ep"]), ("tp_ep_pp", ["tp", "ep", "pp"]),
        ("tp_dp_cp", ["tp", "cp", "dp"]), ("all", GRID_DIMS),
    ]}  # fmt: skip
    # Embedding group: first and last PP stage (tied embeddings); position embeddings: first.
    embd = pos = None
    for ranks in grid.get_rank_enum("pp"):
        e_ranks = sorted({ranks[0], ranks[-1]})
        e, p = comm.new_group(e_ranks), comm.new_group([ranks[0]])
        if dist.get_rank() in ranks:
            embd = e if dist.get_rank() in e_ranks else None
            pos = p if dist.get_rank() == ranks[0] else None
    pgc = ProcessGroupCollection(
        tp=g["tp"], cp=g["cp"], ep=g["ep"], pp=g["pp"], dp=g["dp"], dp_cp=g["dp_cp"],
        mp=g["mp"], tp_cp=g["tp_cp"], tp_ep=g["tp_ep"], tp_ep_pp=g["tp_ep_pp"],
        tp_dp_cp=g["tp_dp_cp"], expt_tp=g["tp"], expt_dp=g["dp"], intra_dp_cp=g["dp_cp"],
        intra_expt_dp=g["dp"], intra_dist_opt=g["all"], embd=embd, pos_embd=pos, hcp=None,
        inter_dist_opt=None,
    )  # fmt: skip
    return pgc, g["all"]


def build_topology(cfg: Config, world_size: int | None = None) -> Topology:
    """Create every group on every rank in a fixed order and return this rank's view.

    Order: each branch's megatron groups (branch 0 first), then the peer groups. Peer scoring
    uses point-to-point between the two ranks that need it, so it needs no group. Asserts megatron's global parallel state
    is not initialised: everything takes its groups explicitly.
    """
    from megatron.core import parallel_state

    assert not parallel_state.model_parallel_is_initialized(), (
        "megatron's global parallel_state is initialised; copd-mega passes groups explicitly "
        "and must not share a process with initialize_model_parallel()"
    )
    world_size = world_size or dist.get_world_size()
    layout = plan_layout(cfg, world_size)
    rank = dist.get_rank()
    mine = layout.branch_of(rank)
    pgc = branch_group = None
    for branch in layout.branches:
        pgc_b, all_b = _build_branch_pgs(layout, branch)
        if branch is mine:
            pgc, branch_group = pgc_b, all_b
    peer_group = None
    for ranks in layout.peer_groups:
        grp = comm.new_group(ranks)
        if rank in ranks:
            peer_group = grp
    tp_rank, pp_rank, dp_rank = layout.coords(rank)
    return Topology(layout, rank, mine, tp_rank, pp_rank, dp_rank, pgc, peer_group, branch_group)
