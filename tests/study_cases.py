"""Per-rank bodies of the study tests (import-safe; run under multiproc.spawn)."""

from __future__ import annotations

import torch


def train_from_file(rank: int, path: str, overrides: list[str]):
    """``copd train`` of the config saved at ``path`` (with ``overrides``) in this process group."""
    import torch.distributed as dist

    from copd_mega.config import load_config
    from copd_mega.trainer.train import train

    table = train(load_config(path, ["checkpoint.random_init=true", *overrides]))
    return table if dist.get_rank() == 0 else None


def perturbed_start(rank: int, overrides: list[str]) -> None:
    """A step-0 checkpoint in ``run_dir`` whose branches hold different weights (each perturbed
    deterministically), so a run resumed from it has branches that disagree from the start."""
    from pathlib import Path

    from copd_cases import perturb

    from copd_mega.ckpt.checkpoint import save_step
    from copd_mega.config import load_config
    from copd_mega.trainer.job import build_job, trainer_state

    cfg = load_config(None, ["checkpoint.random_init=true", *overrides])
    job = build_job(cfg)
    perturb(job.bm, job.rt.topo)
    job.bm.optimizer.reload_model_params()  # the fp32 masters take the perturbed weights
    job.state.advance()
    save_step(Path(cfg.run_dir) / "checkpoints", 0, job.bm, job.rt.topo, cfg, trainer_state(job))
    job.judge.close()


def merged_eval_case(rank: int, overrides: list[str]) -> dict:
    """Weights before, inside and after ``periodic_eval.merged_for_eval`` on perturbed branches."""
    from copd_cases import perturb

    from copd_mega.config import load_config
    from copd_mega.parallel.merge import master_shards
    from copd_mega.trainer.job import build_job
    from copd_mega.trainer.periodic_eval import merged_for_eval

    job = build_job(load_config(None, ["checkpoint.random_init=true", *overrides]))
    perturb(job.bm, job.rt.topo)
    job.bm.optimizer.reload_model_params()
    named = lambda: {n: p.detach().clone() for n, p in job.bm.model.named_parameters()}  # noqa: E731
    masters = lambda: [t.detach().clone() for t in master_shards(job.bm.optimizer)]  # noqa: E731
    before, masters_before = named(), masters()
    with merged_for_eval(job):
        inside = named()
    after, masters_after = named(), masters()
    job.judge.close()
    return {
        "branch": job.name,
        "before": before,
        "inside": inside,
        "after": after,
        "masters_equal": all(
            torch.equal(a, b) for a, b in zip(masters_before, masters_after, strict=True)
        ),
    }
