"""The CPU compatibility layer: every patch is still needed, and together they are enough.

If a megatron-core upgrade removes a CUDA assumption, the matching "needed" case fails: drop
that patch from parallel/cpu.py. If the layer stops being enough, the "sufficient" case fails.
"""

import importlib
import inspect

import pytest

from multiproc import spawn

# (megatron module, source fragment that assumes CUDA, the patch in parallel/cpu.py answering it)
ASSUMPTIONS = [
    ("megatron.core.optimizer.clip_grads", "device='cuda'", "TorchFunctionMode device rewrite"),
    ("megatron.core.optimizer.clip_grads", "'torch.cuda.FloatTensor'", "Tensor.type() names"),
    ("megatron.core.optimizer.distrib_optimizer", "'torch.cuda.FloatTensor'", "Tensor.type() names"),
    ("megatron.core.tensor_parallel.random", "def _get_cuda_rng_state", "CPU generator RNG"),
    ("megatron.core.tensor_parallel.random", "torch.cuda.manual_seed(", "cuda.manual_seed"),
    ("megatron.core.models.common.embeddings.rotary_pos_embedding",
     "torch.cuda.current_device()", "cuda.current_device"),
    ("megatron.core.distributed.param_and_grad_buffer", "torch.cuda.current_device()",
     "cuda.current_device"),
    ("megatron.core.distributed.distributed_data_parallel", "torch.cuda.Stream", "cuda.Stream"),
    ("megatron.core.dist_checkpointing.strategies.filesystem_async", "torch.cuda.synchronize()",
     "cuda.synchronize"),
    ("megatron.core.dist_checkpointing.exchange_utils", ".cuda()", "Tensor.cuda"),
]  # fmt: skip


@pytest.mark.parametrize("module, fragment, patch", ASSUMPTIONS, ids=lambda x: str(x)[:40])
def test_patch_still_needed(module, fragment, patch):
    source = inspect.getsource(importlib.import_module(module))
    assert fragment in source, (
        f"{module} no longer contains {fragment!r}: the '{patch}' patch in parallel/cpu.py may "
        "be unnecessary now; remove it and this case"
    )


def _train_one_step(rank: int, with_layer: bool):
    import os

    import torch
    import torch.distributed as dist

    from copd_mega.config import load_config
    from copd_mega.models.branch import build_branch_model
    from copd_mega.models.step import optimizer_step, prepare_for_training, run_microbatches
    from copd_mega.parallel.topology import build_topology
    from parallel_cases import batch, next_token_loss

    cfg = load_config(None, ["model.vocab_size=100"])
    if with_layer:
        from copd_mega.parallel.dist import init_distributed

        init_distributed()
    else:  # plain gloo start-up, no compatibility layer
        dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    try:
        topo = build_topology(cfg)
        bm = build_branch_model(cfg, topo)
        prepare_for_training(bm, topo)
        mb = [batch(0)]
        losses = []
        for _ in range(2):
            out = run_microbatches(bm, topo, mb, next_token_loss)
            stats = optimizer_step(bm)
            losses.append((out[0]["nll_sum"][0] / out[0]["nll_sum"][1]).item())
        return {"ok": True, "losses": losses, "skipped": stats["skipped"]}
    except Exception as e:  # reported to the parent, which asserts on it
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300], "torch": torch.__version__}


def test_layer_is_sufficient_and_needed():
    (with_layer,) = spawn(_train_one_step, 1, True)
    assert with_layer["ok"], with_layer
    assert with_layer["losses"][1] < with_layer["losses"][0] and with_layer["skipped"] == 0.0
    (without,) = spawn(_train_one_step, 1, False)
    assert not without["ok"], "megatron-core ran on CPU without the layer: is it still needed?"
