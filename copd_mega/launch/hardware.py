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
    nvlink_bytes_per_s: float = 0.0  # GPU-to-GPU inside a node, one direction (DP, TP)
    interconnect_bytes_per_s: float = 0.0  # per GPU across nodes, one direction (peers)
    cores: int = 0  # CPU only: ranks share these cores (0: one device per rank)
    op_overhead_s: float = 0.0  # CPU only: measured fixed cost of one layer forward
    latency_s: float = 0.0  # measured latency of one message (0: the step model's assumption)
    background_load: float = 0.0  # CPU only: other work's runnable processes when measured


GPUS: dict[str, Hardware] = {
    "h100": Hardware("H100 SXM 80GB", 989e12, 3.35e12, 80, "NVIDIA H100 datasheet, SXM; "
                     "NVLink 4 450 GB/s a direction, one 400 Gb/s NDR port per GPU", 450e9, 50e9),
    "h200": Hardware("H200 SXM 141GB", 989e12, 4.8e12, 141, "NVIDIA H200 datasheet, SXM; "
                     "NVLink 4 450 GB/s a direction, one 400 Gb/s NDR port per GPU", 450e9, 50e9),
    "a100": Hardware("A100 SXM 80GB", 312e12, 2.039e12, 80, "NVIDIA A100 datasheet, SXM 80GB; "
                     "NVLink 3 300 GB/s a direction, one 200 Gb/s HDR port per GPU", 300e9, 25e9),
}  # fmt: skip


def hardware(
    name: str, peak_tflops: float = 0.0, hbm_tbps: float = 0.0, interconnect_gbps: float = 0.0
) -> Hardware:
    """The preset ``name`` (one of :data:`GPUS`), with the peak bf16 TFLOP/s, the HBM TB/s and
    the per-GPU interconnect Gb/s (``--interconnect-gbps``) replaced where given (> 0).
    ValueError naming ``--gpu`` for an unknown name."""
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
    if interconnect_gbps > 0:
        hw = dataclasses.replace(
            hw, interconnect_bytes_per_s=interconnect_gbps * 1e9 / 8,
            source=hw.source + " (interconnect overridden)",
        )  # fmt: skip
    return hw
