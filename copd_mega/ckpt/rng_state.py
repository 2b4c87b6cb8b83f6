"""RNG state of a rank for exact resume: Python, numpy, torch CPU, CUDA and megatron's TP tracker."""

from __future__ import annotations

import random

import numpy as np
import torch

from copd_mega.parallel.cpu import cpu_mode_active


def _cuda_rng_usable() -> bool:
    return torch.cuda.is_available() or cpu_mode_active()


def capture_rng() -> dict:
    """Python, numpy, torch CPU, CUDA (or the CPU layer's stand-in) and megatron's TP tracker."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if _cuda_rng_usable() else None,
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }


def restore_rng(state: dict) -> None:
    """Inverse of :func:`capture_rng`."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and _cuda_rng_usable():
        torch.cuda.set_rng_state(state["cuda"])
    if state["tracker"]:
        get_cuda_rng_tracker().set_states(state["tracker"])
