"""The CPU's numbers for the step model (``copd plan --predict --gpu cpu``), measured here and
now on one thread (medians: under the machine's load at the time, whose load average is the
background the ranks are taken to share the cores with): fp32 matmul FLOP/s, memory bandwidth (a large copy), the fixed cost of one
transformer layer's forward on one position, and the one-way time of a message between two
local sockets.

On a CPU a tiny model's step is made of fixed costs, not FLOPs, so the per-forward overhead
the step model needs is counted in layers: a forward costs (``num_layers`` +
:data:`LAYERS_OUTSIDE`) x the measured layer (``torch.nn.TransformerEncoderLayer`` of the
model's hidden, heads and ffn on its unfused path, one row of one position: nearly all Python
and dispatch), where :data:`LAYERS_OUTSIDE` (an assumption) stands for the embedding, final
norm, output layer and log-softmax or sampling outside the layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import statistics
import threading
import time

import torch

from copd_mega.launch.gen_time import Engine
from copd_mega.launch.hardware import Hardware
from copd_mega.launch.step_time import Assume

LAYERS_OUTSIDE = 1
# Assumed, not measured by this module: the fixed CPU cost of one rank's checkpoint save of a
# tiny model, and of judging one rollout of the built-in capabilities on the host.
CPU_SAVE_FIXED_S = 0.05
CPU_REWARD_ROW_S = 5e-4


def median_time(fn, repeats: int, warmup: bool = False) -> float:
    """The median of ``repeats`` timings of ``fn()`` (after one untimed call with ``warmup``):
    its cost under the machine's current load, which the step model's ranks share
    (``Setting.slowdown``)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_cpu(hidden: int, heads: int, ffn: int, repeats: int = 5) -> Hardware:
    """This machine as a :class:`Hardware`: one core's numbers (``torch`` on one thread),
    ``cores`` = the CPUs this process may use. Takes about a second."""
    with RunnableSampler() as beside:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            n = 512
            a, b = torch.randn(n, n), torch.randn(n, n)
            flops = 2 * n**3 * 4 / median_time(lambda: [a @ b for _ in range(4)], repeats)
            big = torch.empty(16 * 2**20)  # 64 MiB of fp32
            dst = torch.empty_like(big)
            bw = 2 * big.numel() * 4 / median_time(lambda: dst.copy_(big), repeats)
            layer = torch.nn.TransformerEncoderLayer(hidden, heads, ffn, dropout=0.0).train()
            x, calls = torch.randn(1, 1, hidden), 200
            with torch.no_grad():  # train mode keeps the unfused path a Megatron layer takes
                layer(x)
                op_s = median_time(lambda: [layer(x) for _ in range(calls)], repeats) / calls
        finally:
            torch.set_num_threads(threads)
        left, right = socket.socketpair()
        try:
            msgs = 500

            def ping() -> None:
                for _ in range(msgs):
                    left.sendall(b"12345678")
                    right.recv(8)
                    right.sendall(b"12345678")
                    left.recv(8)

            latency = median_time(ping, repeats) / (2 * msgs)
        finally:
            left.close()
            right.close()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = beside.background  # what ran beside the measurement
    return Hardware(
        "this CPU (measured)", flops, bw, 0.0,
        f"measured now: 512^3 fp32 matmul on 1 thread, 64 MiB copy, one layer's forward, "
        f"socketpair ping-pong; {cores} cores shared by the ranks",
        nvlink_bytes_per_s=bw, interconnect_bytes_per_s=bw, cores=cores or 1,
        op_overhead_s=op_s, latency_s=latency, background_load=load,
    )  # fmt: skip


def cpu_costs(layers: int, hw: Hardware, engine: Engine, assume: Assume) -> tuple[Engine, Assume]:
    """The engine and assumptions with their per-forward fixed costs counted in measured
    layers (module docstring; ``hw.op_overhead_s`` holds the layer's time) and every efficiency 1 (the measured FLOP/s and bandwidth are what a
    core reaches); for a CPU :class:`Hardware` from :func:`measure_cpu`."""
    per_forward = (layers + LAYERS_OUTSIDE) * hw.op_overhead_s
    engine = dataclasses.replace(
        engine, forward_overhead_s=per_forward, prefill_mfu=1.0, decode_mfu=1.0,
        decode_bw_eff=1.0,
    )  # fmt: skip
    assume = dataclasses.replace(
        assume, pass_overhead_s=per_forward, train_mfu=1.0, score_mfu=1.0,
        optimizer_bw_eff=1.0, net_eff=1.0, optimizer_fixed_s=per_forward,
        ckpt_fixed_s=CPU_SAVE_FIXED_S, reward_row_s=CPU_REWARD_ROW_S,
    )  # fmt: skip
    return engine, assume


def runnable_tasks() -> int:
    """Tasks runnable on this machine at this instant (``/proc/loadavg``'s running count; the
    caller's own running thread included); 0 where the file is not there."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return 0


class RunnableSampler:
    """Samples :func:`runnable_tasks` every ``every_s`` in a thread while the block runs;
    :attr:`background` is then the mean less ``own`` (the measuring process's running threads:
    the sampler and the thread at work): the load the work shared the cores with. Unlike the
    load average it neither lags nor counts what ran before."""

    def __init__(self, every_s: float = 0.05, own: int = 2) -> None:
        self.every_s, self.own, self.samples = every_s, own, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(runnable_tasks())

    def __enter__(self) -> RunnableSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def background(self) -> float:
        return max(statistics.fmean(self.samples) - self.own, 0.0) if self.samples else 0.0


COSTS = ("decode_step_s", "forward_s", "forward_backward_s", "optimizer_step_s", "collective_s")


def measured_costs(
    path: str, engine: Engine, assume: Assume, hw: Hardware
) -> tuple[Engine, Assume, Hardware]:
    """The fixed costs ``bench/bench_step_costs.py`` measured (JSON at ``path``) in place of the
    estimates: a decode step, a micro-batch pass (forward + backward / 3), an optimizer step,
    one collective's latency; the tasks that ran beside the bench (``background_runnable``) are
    the background load (``Hardware.background_load``). ValueError naming ``--cpu-costs`` for a missing or bad file."""
    try:
        with open(path) as f:
            got = json.load(f)
        costs = {k: float(got[k]) for k in COSTS}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"--cpu-costs {path}: not a bench/bench_step_costs.py JSON with {', '.join(COSTS)} "
            f"({e}); run the bench first"
        ) from e
    engine = dataclasses.replace(engine, forward_overhead_s=costs["decode_step_s"])
    assume = dataclasses.replace(
        assume, pass_overhead_s=costs["forward_backward_s"] / 3,
        optimizer_fixed_s=costs["optimizer_step_s"],
    )  # fmt: skip
    if "background_runnable" in got:  # sampled while the bench ran (RunnableSampler)
        load = max(float(got["background_runnable"]), 0.0)
    else:  # an older file: the load average, less the bench itself
        load = max(float(got.get("load_average", 0.0)) - 1.0, 0.0)
    hw = dataclasses.replace(
        hw, latency_s=costs["collective_s"], background_load=load,
        source=hw.source + f"; fixed costs from {os.path.basename(path)} (bench)",
    )  # fmt: skip
    return engine, assume, hw
