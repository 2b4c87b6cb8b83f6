"""Per-rank bodies of the study tests (import-safe; run under multiproc.spawn)."""

from __future__ import annotations


def train_from_file(rank: int, path: str, overrides: list[str]):
    """``copd train`` of the config saved at ``path`` (with ``overrides``) in this process group."""
    import torch.distributed as dist

    from copd_mega.config import load_config
    from copd_mega.trainer.train import train

    table = train(load_config(path, overrides))
    return table if dist.get_rank() == 0 else None
