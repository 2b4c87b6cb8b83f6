"""bench/bench_gpu_step.py is not dead code: its CPU dry mode runs the real build, train step and
sampler on a tiny model (the GPU run itself is bench/gpu_check.sh)."""

import sys
from pathlib import Path

import pytest

from multiproc import spawn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_gpu_step  # noqa: E402


def test_flops_and_peak_lookup():
    assert bench_gpu_step.model_flops_per_token(1000, 2, 8, 16) == 6 * 1000 + 12 * 2 * 8 * 16
    assert bench_gpu_step.peak_tflops("NVIDIA H200", 0.0) == 989.0
    assert bench_gpu_step.peak_tflops("NVIDIA H200", 500.0) == 500.0
    assert bench_gpu_step.peak_tflops("cpu", 0.0) == 0.0
    assert bench_gpu_step.parse_args([]).layers == 22  # the ~1.1B default shape


def _dry(rank: int):
    return bench_gpu_step.main(["--dry"])


@pytest.mark.multiproc
def test_dry_run_trains_and_generates():
    (res,) = spawn(_dry, 1)
    assert res["step_s"] > 0 and res["grad_norm"] > 0
    assert res["gen_tokens"] == 4 * 8 and res["gen_tok_s"] > 0
