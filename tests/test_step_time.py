"""copd_mega.launch.step_time: the step model's arithmetic on hand-computed cases, and what
``copd plan --predict`` prints with it."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from copd_mega.config import load_config, save_config
from copd_mega.launch.flops import token_cost
from copd_mega.launch.gen_time import ENGINES
from copd_mega.launch.hardware import Hardware
from copd_mega.launch.memory import stage_params
from copd_mega.launch.plan import main as plan_main
from copd_mega.launch.scaling_predict import project, validation_table
from copd_mega.launch.step_time import (
    Assume,
    Setting,
    assume_with,
    exchange_bytes,
    forward_time,
    predict_run,
    predict_step,
    ring_allreduce_s,
)
from copd_mega.rl.schedule import StepPlan

REPO = Path(__file__).resolve().parents[1]
# 1 GFLOP/s, 1 GB/s memory, 100 kB/s between branches: readable hand arithmetic
HW = Hardware("toy", 1e9, 1e9, 1, "test", nvlink_bytes_per_s=1e9, interconnect_bytes_per_s=1e5)
A = Assume(train_mfu=0.5, score_mfu=0.5, optimizer_bw_eff=1.0, net_eff=0.5, latency_s=1e-5,
           pass_overhead_s=1e-3, reward_row_s=0.0, ckpt_bytes_per_s=1e6, ckpt_fixed_s=0.5,
           optimizer_fixed_s=0.0, mean_response=4)  # fmt: skip


def setting(world: int, **kw) -> Setting:
    return Setting(HW, ENGINES["megatron"], A, world, **kw)


def test_forward_time_by_hand():
    # the toy model (tests/test_gen_time.py): N = 81920, L = 2, q = 64; a forward of one row
    # of 10 positions = 2 * 81920 * 10 + 2 * 2 * 64 * 100 = 1,664,000 FLOPs
    cfg = load_config(None, ["parallel.micro_batch_size=16"])
    c = token_cost(cfg)
    s, f = forward_time(c, cfg, setting(1), 16, 10, 3, 0.5)
    # 3 passes x 16 rows = 79,872,000 FLOPs at 0.5 GFLOP/s, + 3 passes x 1 micro-batch x 1 ms
    assert f == 79_872_000
    assert s == pytest.approx(0.159744 + 0.003)
    # PP2, one micro-batch: twice the GPUs but (1 + 2 - 1) / 1 = 2 slots; overhead x 2 stages
    pp = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pp=2))
    s2, f2 = forward_time(c, pp, setting(2), 16, 10, 3, 0.5)
    assert s2 == pytest.approx(0.159744 + 0.006) and f2 == 79_872_000 / 2
    # a CPU: 2 cores, 8 ranks share them, every term x4
    cpu = Setting(dataclasses.replace(HW, cores=2), ENGINES["megatron"], A, 8)
    assert forward_time(c, cfg, cpu, 16, 10, 3, 0.5)[0] == pytest.approx(4 * (0.159744 + 0.003))
    # costs measured by one process beside 4 others: 8 ranks beside them run (4 + 8) / 2 cores
    # against (4 + 1) / 2: x2.4
    busy = dataclasses.replace(cpu, hw=dataclasses.replace(cpu.hw, background_load=4.0))
    assert busy.slowdown == pytest.approx(2.4)


def test_collectives_and_exchange_bytes_by_hand():
    # ring over 4 ranks: 2 * 3 / 4 * 1 MB at 0.5 GB/s = 3 ms, + 6 messages of 10 us
    assert ring_allreduce_s(1e6, 4, 1e9, setting(4)) == pytest.approx(0.003 + 6e-5)
    assert ring_allreduce_s(1e6, 1, 1e9, setting(1)) == 0.0
    cfg = load_config(None, ["opd.top_k=10"])
    # 4 rows of 6 + 8 positions: 4 * 14 * 8 bytes of ids; back 4 * 8 * (4 + 10 * 12)
    assert exchange_bytes(cfg, 4, 6, 8) == (448.0, 3968.0)


def test_hub_spoke_step_by_hand():
    """3 branches, hub 'a': the spokes wait in the exchange for the hub's extra work."""
    cfg = load_config(None, [
        "branches=[{name: a, data: arith}, {name: b, data: reverse}, {name: c, data: sort}]",
        "teaching.graph=hub_spoke", "teaching.hub=a", "opd.prompts_per_peer=2",
        "opd.samples_per_prompt=1", "opd.top_k=10", "rollout.max_new_tokens=4",
        "checkpoint.every=1", "schedule.merge_every_cycle=true",
    ])  # fmt: skip
    edges = (("a", "b"), ("b", "a"), ("a", "c"), ("c", "a"))
    step = StepPlan(0, 0, "opd", ("a", "b", "c"), edges, True)
    c = token_cost(cfg)
    out = predict_step(cfg, setting(3), c, step, 6)
    hub, spoke = out["a"].phase_s, out["b"].phase_s
    assert out["c"].phase_s == spoke
    # a spoke sends 2 rows of 6 + 4 ids (160 B) and gets 2 x 4 x 124 B back (992): 1152 B at
    # 50 kB/s, + 2 x 10 us per peer (2 peers); the hub moves its two edges' 2304 B
    xfer_spoke, xfer_hub = 1152 / 5e4 + 4e-5, 2304 / 5e4 + 4e-5
    assert hub["exchange"] == pytest.approx(xfer_hub)  # the hub is last: it waits for nobody
    before = hub["rollout"] + hub["reward"] - spoke["rollout"] - spoke["reward"]
    wait = before + hub["teacher"] - spoke["teacher"]
    assert wait > 0 and spoke["exchange"] == pytest.approx(xfer_spoke + wait)
    # the hub scores 2 spokes' 2 rows of 10 positions: 4 x 1,664,000 FLOPs at 0.5 GFLOP/s
    # + 1 micro-batch x 1 ms (micro_batch_size 4 by default); a spoke scores the hub's 2 rows
    mbs = cfg.parallel.micro_batch_size
    assert hub["teacher"] == pytest.approx(4 * 1_664_000 / 5e8 + -(-4 // mbs) * 1e-3)
    assert spoke["teacher"] == pytest.approx(2 * 1_664_000 / 5e8 + 1e-3)
    # merge: fp32 masters (4 x stage params) over 3 peers at 50 kB/s: 4/3 x bytes + 4 latencies
    p = stage_params(cfg)
    assert hub["merge"] == pytest.approx(4 / 3 * 4 * p / 5e4 + 4e-5)
    # ... which the spokes reach first: the hub trains on 2 peer edges' rows, a spoke on 1
    late = hub["train"] + xfer_hub - spoke["train"] - xfer_spoke
    assert late > 0 and spoke["merge"] == pytest.approx(hub["merge"] + late)
    # checkpoint: bf16 weights + 12 B of fp32 master and Adam per parameter at 1 MB/s, + 0.5 s
    assert hub["checkpoint"] == pytest.approx(p * 14 / 1e6 + 0.5) == spoke["checkpoint"]


def test_time_based_checkpoints_are_spread_over_the_steps():
    """checkpoint.every_minutes: one save per that many minutes of predicted steps."""
    over = ["rollout.max_new_tokens=4", "schedule.cycles=1", "schedule.rl_steps=2",
            "schedule.opd_steps=0", "branches=[{name: a, data: arith}]", "schedule.mode=expert"]  # fmt: skip
    cfg = load_config(None, over)
    timed = load_config(None, [*over, "checkpoint.every_minutes=0.001"])  # 0.06 s
    steps = [StepPlan(i, 0, "rl", ("a",), (), i == 1) for i in range(2)]
    c = token_cost(cfg)
    plain = predict_run(cfg, setting(1), c, steps, 6, skip_first=False)["a"]
    assert plain["checkpoint"] == 0.0
    got = predict_run(timed, setting(1), c, steps, 6, skip_first=False)["a"]
    step_s = sum(plain.values())
    save = stage_params(cfg) * 14 / 1e6 + 0.5  # as in the hand case above
    assert got["checkpoint"] == pytest.approx(min(1.0, step_s / 0.06) * save)
    slow = load_config(None, [*over, "checkpoint.every_minutes=1000"])
    share = step_s / 60000.0
    got = predict_run(slow, setting(1), c, steps, 6, skip_first=False)["a"]
    assert got["checkpoint"] == pytest.approx(share * save)


def test_assume_overrides_and_errors():
    assert assume_with(["train_mfu=0.3"]).train_mfu == 0.3
    with pytest.raises(ValueError, match="--step-assume"):
        assume_with(["nope=1"])
    with pytest.raises(ValueError, match="--step-assume"):
        assume_with(["train_mfu=x"])


def test_plan_predict_prints_phases_and_assumptions(capsys):
    rc = plan_main(["--config", str(REPO / "configs/copd_8branch.yaml"), "--world-size", "64",
                    "--predict", "--gpu", "h100"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("rollout", "teacher", "exchange", "train", "merge", "checkpoint", "step total",
                 "989 TFLOP/s", "400 Gb/s", "update 40%"):  # fmt: skip
        assert word in out
    rc = plan_main(["--config", str(REPO / "configs/copd_8branch.yaml"), "--world-size", "64",
                    "--predict", "--step-assume", "bogus=1"])  # fmt: skip
    assert rc == 1


def _args(**kw) -> argparse.Namespace:
    base = dict(gpu="h100", peak_tflops=0.0, hbm_tbps=0.0, interconnect_gbps=0.0,
                step_assume=[], gen_assume=[], engine=None, cpu_costs="", gen_tp=0)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_projection_hub_waits_and_a_balanced_hub_helps():
    cfg = load_config(REPO / "configs/copd_8branch.yaml")
    pw, hs = project(cfg, 8, "pairwise", _args()), project(cfg, 8, "hub_spoke", _args())
    assert hs.gpus == pw.gpus == 64 and hs.hub_wait_s > 0
    # the hub does a pairwise branch's generation and scoring: the same slowest branch
    assert hs.step_s == pytest.approx(pw.step_s)
    assert hs.balanced_k > 1 and hs.balanced_gpus == 64 + (hs.balanced_k - 1) * 8
    assert hs.balanced_step_s < hs.step_s
    one = project(cfg, 1, "hub_spoke", _args())
    assert one.phase_s["exchange"] == one.phase_s["teacher"] == 0.0 and one.step_s < hs.step_s


def test_validation_table_against_a_run(tmp_path):
    """A run directory with a saved config and metrics: predicted beside measured, the error."""
    run = tmp_path / "b2"
    cfg = load_config(REPO / "configs/scaling_cpu.yaml",
                      ["branches=[{name: text, data: arith}, {name: image, data: reverse}]"])  # fmt: skip
    (run / "final" / "model").mkdir(parents=True)
    save_config(cfg, run / "final" / "model" / "config.yaml")
    (run / "metrics").mkdir()
    for b in ("text", "image"):
        rows = [{"step": i, "time/step": 0.5, "time/rollout": 0.2, "time/train": 0.3}
                for i in range(3)]  # fmt: skip
        (run / "metrics" / f"{b}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    hw = Hardware("cpu", 1e10, 1e10, 0, "test", 1e10, 1e10, cores=2, op_overhead_s=1e-4)
    table = validation_table([str(run)], _args(gpu="cpu"), hw)
    row = table.splitlines()[2].split(" | ")
    assert row[:4] == ["| b2", "2", "1x1x1", "2"]
    pred = float(row[-2].split(" / ")[0])
    assert row[-2].endswith(" / 0.500") and row[-1] == f"{100 * (pred - 0.5) / 0.5:+.0f}% |"
    assert "step error: mean" in table


def test_bench_costs_take_the_background_sampled_beside_the_bench(tmp_path):
    from copd_mega.launch.measure import RunnableSampler, measured_costs

    costs = {"decode_step_s": 0.003, "forward_s": 0.003, "forward_backward_s": 0.006,
             "optimizer_step_s": 0.005, "collective_s": 5e-4}  # fmt: skip
    path = tmp_path / "costs.json"
    cpu = dataclasses.replace(HW, cores=2)
    # the tasks that ran beside the bench, not the (lagging) load average
    path.write_text(json.dumps({**costs, "background_runnable": 1.5, "load_average": 17.0}))
    engine, assume, hw = measured_costs(str(path), ENGINES["megatron"], A, cpu)
    assert hw.background_load == 1.5 and hw.latency_s == 5e-4
    assert engine.forward_overhead_s == 0.003 and assume.pass_overhead_s == pytest.approx(0.002)
    path.write_text(json.dumps({**costs, "load_average": 3.0}))  # a file from before: less itself
    assert measured_costs(str(path), ENGINES["megatron"], A, cpu)[2].background_load == 2.0
    with RunnableSampler(every_s=0.01) as s:
        sum(i * i for i in range(300_000))
    assert s.samples and s.background >= 0.0
