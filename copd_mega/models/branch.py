"""The one builder of a branch's trainable model: the GPT or the vision-language model (with
``vision.enabled``), megatron DDP and the distributed optimizer on the branch's DP group."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from copd_mega.config import Config
from copd_mega.models.gpt import build_gpt
from copd_mega.models.multimodal import MediaSpec
from copd_mega.models.vlm import build_vlm
from copd_mega.parallel.topology import Topology


@dataclass
class BranchModel:
    """A branch's trainable state on this rank: the DDP-wrapped chunk and its optimizer."""

    model: torch.nn.Module  # megatron DistributedDataParallel around GPTModel / LLaVAModel
    optimizer: object  # megatron (distributed) optimizer
    config: object  # TransformerConfig
    media_spec: MediaSpec | None = None  # how the VLM reads rows' media (None: text model)
    # parallel.sequence_parallel: on in training's forward-backward only (models.step)
    sequence_parallel: bool = False

    @property
    def module(self):
        """The unwrapped GPTModel."""
        return self.model.module


def build_branch_model(
    cfg: Config, topo: Topology, lr: float | None = None, min_lr: float | None = None
) -> BranchModel:
    """The branch's model + megatron DDP + distributed optimizer on the branch's DP group.

    A GPTModel, or the vision-language model when ``vision.enabled``. ``lr`` defaults to
    ``optim.lr``; ``min_lr`` (the floor an lr scheduler decays to) to ``lr``.
    """
    module = build_vlm(cfg, topo) if cfg.vision.enabled else build_gpt(cfg, topo)
    return wrap_branch_model(module, cfg, topo, lr, min_lr)


def wrap_branch_model(
    module: torch.nn.Module,
    cfg: Config,
    topo: Topology,
    lr: float | None = None,
    min_lr: float | None = None,
) -> BranchModel:
    """Wrap a bare megatron module in DDP and build its distributed optimizer.

    Losses are sums with a unit count (``step.run_microbatches``), so per-token loss scaling is
    switched on here, **before** DDP is built: DDP fixes its gradient pre-scaling at construction
    (1/DP without it), and ``finalize_model_grads`` then divides by the global unit count. With
    the flag set first, the gradient is exactly d(sum of losses)/d(theta) / (global units) at any
    DP size (``tests/test_dp_exact.py``).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    tcfg = module.config
    tcfg.calculate_per_token_loss = True  # before DDP: it picks its gradient scaling now
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=True,
        check_for_nan_in_grad=False,
    )
    ddp = DistributedDataParallel(tcfg, ddp_cfg, module, pg_collection=topo.pg)
    o = cfg.optim
    lr = o.lr if lr is None else lr
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=lr if min_lr is None else min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=tcfg.bf16,
        params_dtype=tcfg.params_dtype,
        use_distributed_optimizer=True,
    )
    opt = get_megatron_optimizer(
        opt_cfg, [ddp], use_gloo_process_groups=False, pg_collection=topo.pg
    )
    return BranchModel(ddp, opt, tcfg, sequence_parallel=cfg.parallel.sequence_parallel)
