"""megatron-core on CPU: the one compatibility layer, entered once at start-up without CUDA.

megatron-core 0.16 assumes CUDA in a handful of places that the real model, DDP, distributed
optimizer, pipeline schedules and checkpointing all go through. Each assumption is answered at
exactly one place here:

* factory calls with ``device='cuda'`` / ``device=<int>`` / ``torch.device('cuda', i)`` and
  ``Tensor.to('cuda')``: a :class:`torch.overrides.TorchFunctionMode` maps them to CPU;
* ``Tensor.type()`` strings (``'torch.cuda.FloatTensor'`` checks in the optimizer and grad
  clipping): the same mode reports CPU tensors under their CUDA type names;
* ``Tensor.cuda()`` / ``Module.cuda()``: become ``.cpu()`` / identity;
* ``torch.cuda.current_device()`` returns 0 (an int, mapped to CPU by the mode),
  ``synchronize``/``empty_cache``/streams are no-ops; inside backward (which torch 2.13 runs
  within the mode's handler, the mode off) only under :func:`remap_in_backward`;
* the tensor-parallel RNG tracker forks "the CUDA RNG": here it forks a dedicated CPU
  ``torch.Generator`` (mapping it onto the global CPU RNG would trip megatron's
  "CPU RNG state changed within GPU RNG context" check).

``enter_cpu_mode()`` is idempotent and refuses to run when CUDA is available.
``tests/test_cpu_compat.py`` fails if a megatron-core upgrade makes a patch unnecessary
or insufficient.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE: _CudaToCpuMode | None = None
_CUDA_GEN: torch.Generator | None = None

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
}


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and reports CPU tensors under CUDA type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.autograd.backward and _REMAP_BACKWARD:
            with self:  # torch runs backward inside this handler, where the mode is off
                return _run_backward(*args, **kwargs)
        return func(*args, **kwargs)


_REMAP_BACKWARD = False


def _run_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
    """The tail of ``torch.autograd.backward`` (after its ``__torch_function__`` check)."""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)),
                        is_grads_batched=False)  # fmt: skip
    retain_graph = create_graph if retain_graph is None else retain_graph
    _engine_run_backward(tensors, grads, retain_graph, create_graph, tuple(inputs or ()),
                         allow_unreachable=True, accumulate_grad=True)  # fmt: skip


@contextlib.contextmanager
def remap_in_backward():
    """Map CUDA device arguments inside backward passes too, for the duration (sequence
    parallelism's backward allocates on ``torch.cuda.current_device()``). Off by default: it
    routes every backward op through this mode's Python handler."""
    global _REMAP_BACKWARD
    before, _REMAP_BACKWARD = _REMAP_BACKWARD, True
    try:
        yield
    finally:
        _REMAP_BACKWARD = before


def _cuda_generator() -> torch.Generator:
    assert _CUDA_GEN is not None, "enter_cpu_mode() was not called"
    return _CUDA_GEN


def _get_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return _cuda_generator().get_state()


def _set_rng_state(state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    _cuda_generator().set_state(state)


def _manual_seed(seed: int) -> None:
    _cuda_generator().manual_seed(int(seed))


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def wait_stream(self, _other: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *_args: Any) -> None:
        return None


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.get_rng_state = _get_rng_state
    cuda.set_rng_state = _set_rng_state
    cuda.manual_seed = _manual_seed
    cuda.manual_seed_all = _manual_seed
    cuda.Stream = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *_a, **_k: contextlib.nullcontext()
    torch.Tensor.cuda = lambda self, *a, **k: self.cpu()
    torch.nn.Module.cuda = lambda self, *a, **k: self


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = _get_rng_state
    tp_random._set_cuda_rng_state = _set_rng_state


def enter_cpu_mode(seed: int = 0) -> None:
    """Make megatron-core run on CPU. Call once per process before any model is built.

    Idempotent. Raises RuntimeError when CUDA is available: the GPU path needs no layer.
    """
    global _ACTIVE, _CUDA_GEN
    if _ACTIVE is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "enter_cpu_mode() called on a machine with CUDA; the CPU layer is only for "
            "machines without a GPU (runtime.device=cpu is not supported on GPU nodes)."
        )
    _CUDA_GEN = torch.Generator(device="cpu")
    _CUDA_GEN.manual_seed(seed)
    _patch_torch_cuda()
    _patch_megatron()
    _ACTIVE = _CudaToCpuMode()
    _ACTIVE.__enter__()


def cpu_mode_active() -> bool:
    """True once :func:`enter_cpu_mode` has run in this process."""
    return _ACTIVE is not None
