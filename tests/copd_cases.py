"""Per-rank bodies of the CoPD multi-process tests (import-safe; run under multiproc.spawn)."""

from __future__ import annotations

import torch
import torch.distributed as dist

THREE = (
    "branches=[{name: text, data: arith}, {name: image, data: reverse}, {name: video, data: sort}]"
)


def setup(overrides: list[str]):
    from copd_mega.config import load_config
    from copd_mega.models.branch import build_branch_model
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    cfg = load_config(None, ["model.vocab_size=100", "model.init_std=0.2", *overrides])
    init_distributed()
    topo = build_topology(cfg)
    return cfg, topo, build_branch_model(cfg, topo)


def perturb(bm, topo) -> None:
    """Make each branch's weights distinct (deterministic per branch and parameter)."""
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(bm.module.named_parameters())):
            g = torch.Generator().manual_seed(1000 * topo.branch.index + i)
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def rollouts_for(branch_index: int, n: int = 3, width: int = 9):
    g = torch.Generator().manual_seed(branch_index)
    tokens = torch.randint(1, 100, (n, width), generator=g)
    prompt_lens = torch.tensor([2, 3, 4][:n])
    lengths = torch.tensor([9, 7, 8][:n])
    return tokens, prompt_lens, lengths


def exchange_round_trip(rank: int, overrides: list[str]):
    """Every branch sends rollouts to its teachers, scores its students', returns scores.

    Returns what this rank received as a student and what it computed locally as a teacher.
    """
    from copd_mega.parallel.exchange import pack_rollouts, return_scores, send_rollouts
    from copd_mega.rl.teacher_scores import score_sequences

    cfg, topo, bm = setup(overrides)
    perturb(bm, topo)
    me, edges = topo.branch.name, topo.layout.edges
    teachers = [t for s, t in edges if s == me]
    students = [s for s, t in edges if t == me]
    mine = rollouts_for(topo.branch.index)
    out = {t: pack_rollouts(*mine) for t in teachers}
    incoming = send_rollouts(topo, out, students, torch.device("cpu"))
    local = {}
    for s in students:
        local[s] = score_sequences(bm, topo, incoming[s][:, 2:], 10, 100, 2, 4, torch.device("cpu"))
    got = return_scores(topo, local, {t: tuple(mine[0].shape) for t in teachers}, 10,
                        torch.device("cpu"))  # fmt: skip
    # The teacher's own computation on the tokens it received, for comparison in the parent.
    return {"branch": me, "received": got, "local": local,
            "incoming": {s: v for s, v in incoming.items()}}  # fmt: skip


def merge_case(rank: int, overrides: list[str], weights: list[float]):
    from copd_mega.parallel.merge import merge_in_place

    cfg, topo, bm = setup(overrides)
    perturb(bm, topo)
    bm.optimizer.reload_model_params()  # the masters take the perturbed weights
    before = {n: p.detach().clone() for n, p in bm.module.named_parameters()}
    merge_in_place(bm.model, bm.optimizer, topo, weights)
    after = {n: p.detach().clone() for n, p in bm.module.named_parameters()}
    dist.barrier()
    return {"branch": topo.branch.name, "before": before, "after": after}


def run_mode(rank: int, overrides: list[str]):
    """A whole `copd train` job in this process group; returns the eval table on rank 0."""
    from copd_mega.config import load_config
    from copd_mega.trainer.train import train

    cfg = load_config(None, ["checkpoint.random_init=true", *overrides])
    table = train(cfg)
    return table if dist.get_rank() == 0 else None


def update_case(rank: int, overrides: list[str]):
    """Two batches of hand-made GRPO rows with non-zero advantages through ``train.update``."""
    from copd_mega.config import load_config
    from copd_mega.rl.batches import grpo_rows
    from copd_mega.rl.objective import make_loss_fn, unpack_metrics
    from copd_mega.trainer.job import build_job
    from copd_mega.trainer.train import update

    job = build_job(load_config(None, ["checkpoint.random_init=true", *overrides]))
    loss_fn = make_loss_fn(job.cfg, job.rt.topo, job.edges)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 100, (4, 10), generator=g)
    rows = grpo_rows(tokens, torch.tensor([3, 3, 4, 4]), torch.tensor([10, 9, 10, 8]),
                     torch.tensor([1.0, -1.0, 0.5, -0.5]))  # fmt: skip

    def step() -> dict:  # this rank's telemetry and the optimizer's grad norm
        vec, stats = update(job, rows, loss_fn)
        return {**unpack_metrics(vec.tolist(), job.edges), **stats}

    first, second = step(), step()
    job.judge.close()
    return first, second
