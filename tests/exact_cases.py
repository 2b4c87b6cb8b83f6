"""Per-rank bodies of the DP-exactness and fp32-master merge tests (import-safe; multiproc.spawn)."""

from __future__ import annotations

import torch
import torch.distributed as dist

VOCAB = 100


def setup(overrides: list[str]):
    from copd_mega.config import load_config
    from copd_mega.models.branch import build_branch_model
    from copd_mega.models.step import prepare_for_training
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    cfg = load_config(None, [f"model.vocab_size={VOCAB}", *overrides])
    init_distributed()
    topo = build_topology(cfg)
    bm = build_branch_model(cfg, topo)
    prepare_for_training(bm, topo)
    return cfg, topo, bm


def global_batch(seed: int, n_micro: int = 4, b: int = 2, s: int = 10) -> list[dict]:
    """``n_micro`` microbatches whose loss masks hold very different token counts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_micro):
        tokens = torch.randint(0, VOCAB, (b, s), generator=g)
        mask = torch.zeros(b, s, dtype=torch.bool)
        mask[:, s - 1 - 2 * i :] = True  # 1, 3, 5, 7 target tokens per row
        mask[0, 1:] |= i == 0  # the first microbatch also has one long row
        out.append({"tokens": tokens, "mask": mask,
                    "position_ids": torch.arange(s).expand(b, s)})  # fmt: skip
    return out


def masked_nll(topo):
    """Loss function: summed NLL of the masked tokens (vocab-parallel), units = masked tokens."""
    from copd_mega.rl.logprobs import response_logprobs

    def loss_fn(mb: dict, logits: torch.Tensor):
        logp = response_logprobs(logits, mb["tokens"], topo.pg.tp, VOCAB)
        nll = -(logp * mb["mask"]).sum()
        return nll, mb["mask"].sum(), {"nll": nll.detach()}

    return loss_fn


def full_reduced_grads(bm, topo) -> dict[str, torch.Tensor]:
    """Every parameter's reduced gradient on this rank's TP/PP shard, keyed by global name.

    The distributed optimizer leaves each DP rank with only its shard of every bucket reduced;
    all-gathering the owned shards over DP rebuilds the full reduced gradient buffer.
    """
    from copd_mega.models.gpt import global_param_names

    group = topo.pg.dp_cp
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    for buffer in bm.model.buffers:
        for bucket in buffer.buckets:
            n = bucket.grad_data.numel() // size
            mine = bucket.grad_data[rank * n : (rank + 1) * n].clone()
            dist.all_gather_into_tensor(bucket.grad_data, mine, group=group)
    return {k: p.main_grad.detach().clone() for k, p in global_param_names(bm.module).items()}


def dp_gradients(rank: int, overrides: list[str]):
    """Gradients and megatron's grad norm of one global batch split over the branch's DP ranks."""
    from copd_mega.models.gpt import global_param_names
    from copd_mega.models.step import optimizer_step, run_microbatches

    cfg, topo, bm = setup(overrides)
    mbs = global_batch(0)
    per = len(mbs) // topo.layout.dp
    mine = mbs[topo.dp_rank * per : (topo.dp_rank + 1) * per]
    run_microbatches(bm, topo, mine, masked_nll(topo))
    grads = full_reduced_grads(bm, topo)
    norm = optimizer_step(bm)["grad_norm"]
    meta = {
        k: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", -1),
            getattr(p, "partition_stride", 1))
        for k, p in global_param_names(bm.module).items()
    }  # fmt: skip
    return {"grads": grads, "norm": norm, "meta": meta, "tp": topo.layout.tp,
            "tp_rank": topo.tp_rank}  # fmt: skip


def _full_params(bm) -> dict[str, torch.Tensor]:
    from copd_mega.models.gpt import global_param_names

    return {k: p.detach().float().clone() for k, p in global_param_names(bm.module).items()}


def _train_step(bm, topo, seed: int) -> None:
    from copd_mega.models.step import optimizer_step, run_microbatches

    run_microbatches(bm, topo, global_batch(seed, n_micro=2), masked_nll(topo))
    assert optimizer_step(bm)["skipped"] == 0.0


def merge_policies(
    rank: int, overrides: list[str], weights: list[float], root: str, policies: list[str]
):
    """Per policy: branches diverge by one step, merge in place, save a step checkpoint, step
    again; a fresh model restored from that checkpoint takes the same step.

    Returns per policy this rank's masters and moments before and after the merge, whether the
    model weights equal the merged masters rounded to the model dtype, and the parameters after
    the next step in place and after the restore.
    """
    from copd_mega.ckpt.checkpoint import load_latest, save_step
    from copd_mega.models.branch import build_branch_model
    from copd_mega.models.step import prepare_for_training
    from copd_mega.parallel.merge import (
        inner_optimizers,
        master_shards,
        merge_in_place,
        moment_tensors,
    )

    cfg, topo, _ = setup(overrides)
    out = {"branch": topo.branch.index, "coord": (topo.tp_rank, topo.pp_rank, topo.dp_rank)}
    for policy in policies:
        bm = build_branch_model(cfg, topo)
        prepare_for_training(bm, topo)
        _train_step(bm, topo, seed=100 * topo.branch.index + topo.dp_rank)
        before = [t.clone() for t in master_shards(bm.optimizer)]
        moments = [t.clone() for t in moment_tensors(bm.optimizer)]
        merge_in_place(bm.model, bm.optimizer, topo, weights, policy)
        o = inner_optimizers(bm.optimizer)[0]
        rounded = all(
            torch.equal(m.to(s.dtype), s)
            for ms, ss in zip(o.shard_fp32_from_float16_groups, o.shard_float16_groups, strict=True)
            for m, s in zip(ms, ss, strict=True)
        )  # fmt: skip
        res = {"before": before, "after": [t.clone() for t in master_shards(bm.optimizer)],
               "moments": moments, "moments_after": [t.clone() for t in moment_tensors(bm.optimizer)],
               "rounded": rounded, "merged_params": _full_params(bm)}  # fmt: skip
        save_step(f"{root}/{policy}", 1, bm, topo, cfg, {})
        _train_step(bm, topo, seed=7)
        res["stepped"] = _full_params(bm)
        fresh = build_branch_model(cfg, topo)
        prepare_for_training(fresh, topo)
        load_latest(f"{root}/{policy}", fresh, topo)
        _train_step(fresh, topo, seed=7)
        res["restored"] = _full_params(fresh)
        out[policy] = res
    return out
