"""The accelerators a time prediction runs against (``copd plan --gpu``): peak dense bf16
FLOP/s and HBM bandwidth per GPU, as the vendor states them, each overridable.

These are the datasheet peaks, not measurements; how much of them an engine reaches is the
engine's stated efficiency (``copd_mega.launch.gen_time.Engine``), kept apart so both show.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    """One GPU's peaks (per GPU, dense, no sparsity)."""

    name: str
    peak_flops: float  # bf16 tensor-core FLOP/s
    hbm_bytes_per_s: float  # memory bandwidth, bytes/s
    memory_gib: float  # HBM capacity
    source: str  # where the numbers come from


GPUS: dict[str, Hardware] = {
    "h100": Hardware("H100 SXM 80GB", 989e12, 3.35e12, 80, "NVIDIA H100 datasheet, SXM"),
    "h200": Hardware("H200 SXM 141GB", 989e12, 4.8e12, 141, "NVIDIA H200 datasheet, SXM"),
    "a100": Hardware("A100 SXM 80GB", 312e12, 2.039e12, 80, "NVIDIA A100 datasheet, SXM 80GB"),
}


def hardware(name: str, peak_tflops: float = 0.0, hbm_tbps: float = 0.0) -> Hardware:
    """The preset ``name`` (one of :data:`GPUS`), with the peak bf16 TFLOP/s and the HBM TB/s
    replaced where given (> 0). ValueError naming ``--gpu`` for an unknown name."""
    if name not in GPUS:
        raise ValueError(f"--gpu {name!r} is not one of {', '.join(GPUS)}")
    hw = GPUS[name]
    if peak_tflops > 0:
        hw = dataclasses.replace(
            hw, peak_flops=peak_tflops * 1e12, source=hw.source + " (FLOP/s overridden)"
        )
    if hbm_tbps > 0:
        hw = dataclasses.replace(
            hw, hbm_bytes_per_s=hbm_tbps * 1e12, source=hw.source + " (bandwidth overridden)"
        )
    return hw
