"""Per-rank bodies of the multi-process model tests (import-safe; run under tests/multiproc.spawn)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def setup(overrides: list[str]):
    from copd_mega.config import load_config
    from copd_mega.models.branch import build_branch_model
    from copd_mega.models.step import prepare_for_training
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    cfg = load_config(None, ["model.vocab_size=100", *overrides])
    init_distributed()
    topo = build_topology(cfg)
    bm = build_branch_model(cfg, topo)
    prepare_for_training(bm, topo)
    return cfg, topo, bm


def batch(seed: int, b: int = 2, s: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 100, (b, s), generator=g)
    return {
        "tokens": tokens,
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, s),
        "labels": torch.roll(tokens, -1, 1),
    }


def next_token_loss(mb: dict, logits: torch.Tensor):
    """Sum of next-token NLL over a TP1 microbatch; units = tokens."""
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), mb["labels"].reshape(-1), reduction="sum"
    )
    n = torch.tensor(mb["labels"].numel())
    return nll, n, {"nll_sum": torch.stack([nll.detach(), n.float()])}


def full_params(bm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in bm.module.named_parameters()}


def tp_logits(rank: int, overrides: list[str]):
    """Full-vocabulary logits of a fixed batch, gathered over the branch's TP group."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    cfg, topo, bm = setup(overrides)
    mb = batch(7)
    with torch.no_grad():
        out = bm.model(mb["tokens"], mb["position_ids"], None)
        full = gather_from_tensor_model_parallel_region(out, group=topo.pg.tp)
    return topo.branch.name, full[..., : cfg.model.vocab_size]


def pp_training(rank: int, overrides: list[str], steps: int = 3):
    """Losses of `steps` optimizer steps over 2 microbatches (valid on the last PP stage)."""
    from copd_mega.models.step import optimizer_step, run_microbatches

    cfg, topo, bm = setup(overrides)
    mbs = [batch(1), batch(2)]
    losses = []
    for _ in range(steps):
        out = run_microbatches(bm, topo, mbs, next_token_loss)
        optimizer_step(bm)
        if out:
            tot = sum(o["nll_sum"] for o in out)
            losses.append((tot[0] / tot[1]).item())
    return losses


def isolation(rank: int, overrides: list[str]):
    """Branch A steps while B idles (B must stay bit-identical); then both step on own data."""
    from copd_mega.models.step import optimizer_step, run_microbatches

    cfg, topo, bm = setup(overrides)
    name = topo.branch.name
    initial = full_params(bm)
    data = [batch(100 * topo.branch.index + topo.dp_rank)]
    if name == "a":
        run_microbatches(bm, topo, data, next_token_loss)
        optimizer_step(bm)
    after_a = full_params(bm)
    if name == "b":
        run_microbatches(bm, topo, data, next_token_loss)
        optimizer_step(bm)
    return {"branch": name, "dp": topo.dp_rank, "initial": initial, "after_a": after_a,
            "final": full_params(bm)}  # fmt: skip


def reference_step(rank: int, overrides: list[str], seeds: list[int]):
    """One optimizer step of a single rank over microbatches built from `seeds`."""
    from copd_mega.models.step import optimizer_step, run_microbatches

    cfg, topo, bm = setup(overrides)
    run_microbatches(bm, topo, [batch(s) for s in seeds], next_token_loss)
    optimizer_step(bm)
    return full_params(bm)
