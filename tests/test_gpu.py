"""GPU smoke tests (NCCL, bf16, TransformerEngine spec when installed). Skipped without CUDA.

Two branches need two GPUs (NCCL refuses two ranks of one communicator on one device).
"""

import pytest
import torch
from copd_cases import run_mode
from test_copd import TINY, TWO

from multiproc import spawn

pytestmark = pytest.mark.gpu


def _gpu_step(rank: int):
    from copd_mega.config import load_config
    from copd_mega.models.branch import build_branch_model
    from copd_mega.models.gpt import compute_dtype
    from copd_mega.models.step import optimizer_step, prepare_for_training, run_microbatches
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology
    from parallel_cases import batch

    cfg = load_config(None, ["model.vocab_size=100", "model.num_layers=2"])
    launch = init_distributed()
    topo = build_topology(cfg)
    bm = build_branch_model(cfg, topo)
    prepare_for_training(bm, topo)
    dev = torch.device("cuda", torch.cuda.current_device())
    mb = {k: v.to(dev) for k, v in batch(0).items()}

    def loss_fn(mb, logits):
        from copd_mega.rl.logprobs import token_logprobs

        lp = token_logprobs(logits, mb["labels"], topo.pg.tp, 100)
        return -lp.sum(), torch.tensor(lp.numel(), device=dev), {"nll": -lp.detach().mean()}

    losses = []
    for _ in range(3):
        out = run_microbatches(bm, topo, [mb], loss_fn)
        optimizer_step(bm)
        losses.append(float(out[0]["nll"]))
    param = next(bm.module.parameters())
    return {"backend": torch.distributed.get_backend(), "dtype": str(compute_dtype(cfg)),
            "device": param.device.type, "losses": losses, "launcher": launch.launcher}  # fmt: skip


def test_gpu_train_step_bf16_nccl():
    (r,) = spawn(_gpu_step, 1)
    assert r["backend"] == "nccl" and r["device"] == "cuda" and r["dtype"] == "torch.bfloat16"
    assert r["losses"][-1] < r["losses"][0]


def test_gpu_one_expert_cycle(tmp_path):
    table = spawn(run_mode, 1, [*TINY, "branches=[{name: arith, data: arith}]",
                                "schedule.mode=expert", "teaching.graph=none",
                                f"run_dir={tmp_path}"])[0]  # fmt: skip
    assert "base" in table and (tmp_path / "final" / "model").is_dir()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two branches need two GPUs")
def test_gpu_copd_cycle_two_branches(tmp_path):
    table = spawn(run_mode, 2, [*TINY, TWO, "schedule.mode=copd", f"run_dir={tmp_path}"])[0]
    assert "merged" in table
