"""copd_mega.launch.flops / gen_time / predict: the generation-time arithmetic on hand-computed
cases, and what ``copd plan`` prints with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from copd_mega.config import load_config
from copd_mega.launch.flops import decode_flops, decode_kv_bytes, prefill_flops, token_cost
from copd_mega.launch.gen_time import (
    Engine,
    EngineShape,
    GenCall,
    branch_calls,
    call_time,
    engine_shape,
    engine_with,
    vllm_concurrency,
    vllm_kv_budget,
    vllm_setup,
)
from copd_mega.launch.hardware import Hardware, hardware
from copd_mega.launch.plan import main as plan_main
from copd_mega.rl.schedule import StepPlan

REPO = Path(__file__).resolve().parents[1]
# 1 MFLOP/s and 100 kB/s: small numbers so the hand computation below stays readable
HW = Hardware("toy", 1e6, 1e5, 1, "test")


def toy_cost():
    # L=2, h=64, F=128, 4 heads of 16 (q=64), 2 groups (kv=32), V=128: per layer
    # 64*(64+64) + 64*64 + 3*64*128 = 36864, N = 2*36864 + 128*64 = 81920; bf16
    return token_cost(load_config(None, []))


def test_token_cost_and_flops_by_hand():
    c = toy_cost()
    assert (c.matmul_params, c.layers, c.q_dim, c.kv_dim, c.elem_bytes) == (81920, 2, 64, 32, 2)
    assert c.weight_bytes == 163840 and c.kv_bytes_per_position == 2 * 2 * 32 * 2
    assert prefill_flops(c, 10) == 2 * 81920 * 10 + 2 * 2 * 64 * 10 * 10  # 1,664,000
    # 4 tokens at contexts 11, 12, 13, 14 (sum 50)
    assert decode_flops(c, 11, 4) == 4 * (2 * 81920) + 4 * 2 * 64 * 50
    assert decode_kv_bytes(c, 11, 4) == 256 * 50
    assert token_cost(load_config(None, ["model.dtype=fp32"])).elem_bytes == 4


def test_static_micro_batches_by_hand():
    """3 rows in micro-batches of 2 and 1, prompt 10, 5 new tokens, on 2 GPUs."""
    eng = Engine("megatron", 0.5, 0.5, 0.5, 0.01, False, False, 0.0, "")
    call = GenCall("native", 3, 1, 10, 5, 5.0)
    t = call_time(toy_cost(), HW, eng, EngineShape(2, 1, 2), call)
    # prefill of n rows: max(n * 1,664,000 / (2 * 1e6 * 0.5), 163,840 / (2 * 1e5 * 0.5))
    assert t.prefill_s == pytest.approx(3.328 + 1.664)
    # decode of n rows, 4 steps: max(n * 680,960 / 1e6, (4 * 163,840 + n * 12,800) / 1e5)
    assert t.decode_s == pytest.approx(6.8096 + 6.6816)
    assert t.forwards == 10 and t.overhead_s == pytest.approx(0.1)  # 2 x (1 prefill + 4)
    assert t.total_s == pytest.approx(4.992 + 13.4912 + 0.1)
    # PP2: each forward passes two stages, so twice the overhead
    t2 = call_time(toy_cost(), HW, eng, EngineShape(2, 2, 2), call)
    assert t2.overhead_s == pytest.approx(0.2) and t2.decode_s == pytest.approx(t.decode_s)


def test_continuous_batching_by_hand():
    """2 prompts x 3 rollouts (prefix-cached), mean response 3 of at most 5, 4 rows at once."""
    eng = Engine("vllm", 0.5, 0.5, 0.5, 0.01, True, True, 0.5, "")
    t = call_time(toy_cost(), HW, eng, EngineShape(2, 1, 4), GenCall("native", 2, 3, 10, 5, 3.0))
    assert t.prefill_s == pytest.approx(3.328)  # 2 distinct prompts, not 6
    # 6 rows x 2 decode tokens = 12 at 4 at once: 3 steps, but the longest row needs 4;
    # per row 2 tokens at contexts 11, 12: 2 * (2 * 81920) + 4 * 2 * 64 * 23 = 339,456 FLOPs
    assert t.decode_s == pytest.approx(max(6 * 339456 / 1e6, (4 * 163840 + 6 * 256 * 23) / 1e5))
    assert t.forwards == 5 and t.total_s == pytest.approx(3.328 + 6.90688 + 0.05)


def test_kv_budget_and_concurrency_by_hand():
    c = toy_cost()
    eng = Engine("vllm", 0.5, 0.5, 0.5, 0.0, True, True, 0.5, "")
    # per GPU: 0.5 * 1e6 - 1e5 resident - 163,840 / 2 weights = 318,080; two GPUs
    assert vllm_kv_budget(1e6, 1e5, c, 2, eng) == 636160
    assert vllm_concurrency(c, 3 * 256 * 15 + 1, 10, 5) == 3  # 15 positions of 256 B per row
    assert vllm_concurrency(c, 100, 10, 5) == 0


def test_vllm_engines_are_the_trainers_one_per_rank():
    """A vllm config predicts the engines the trainer runs: rollout.tp (1) GPUs each, so TP x PP
    engines per DP replica, each with the config's rollout.kv_cache_gb; a megatron config asked
    about vllm gets the budget its resident training state leaves."""
    c = toy_cost()
    eng = Engine("vllm", 0.5, 0.5, 0.5, 0.0, True, True, 0.5, "")
    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2", "rollout.engine=vllm",
                             "rollout.kv_cache_gb=0.25"])  # fmt: skip
    assert vllm_setup(cfg, c, eng, 1e6, 1e5) == (1, 0.25 * 2**30)
    shape, split = engine_shape(cfg, eng, c, 10, 5, 0.25 * 2**30, 1)
    assert (shape.gpus, shape.stages, split) == (1, 1, 4)
    megatron = load_config(None, ["parallel.tp=2"])
    assert vllm_setup(megatron, c, eng, 1e6, 1e5) == (1, vllm_kv_budget(1e6, 1e5, c, 1, eng))
    assert vllm_setup(megatron, c, eng, 1e6, 1e5, gen_tp=2)[0] == 2


def test_branch_calls_follow_the_trainers_split():
    cfg = load_config(
        None, ["parallel.dp=2", "rollout.prompts_per_step=8", "opd.prompts_per_peer=3"]
    )
    edges = (("a", "b"), ("b", "a"), ("a", "c"), ("c", "a"))
    opd = StepPlan(0, 0, "opd", ("a", "b", "c"), edges, False)
    calls = branch_calls(cfg, "a", opd, 16.0, 10)
    assert [(x.what, x.prompts, x.samples) for x in calls] == [
        ("native", 4, 8), ("peer b", 1, 2), ("peer c", 1, 2)]  # fmt: skip
    assert [x.what for x in branch_calls(cfg, "b", opd, 16.0, 10)] == ["native", "peer a"]
    rl = StepPlan(1, 0, "rl", ("a",), (), False)
    assert branch_calls(cfg, "b", rl, 16.0, 10) == []  # not a learner in this step
    assert [x.prompts for x in branch_calls(cfg, "a", rl, 16.0, 10, split=3)] == [2]


def test_overrides_and_errors_name_the_option():
    assert (
        engine_with(
            "megatron", ["megatron.decode_bw_eff=0.6", "vllm.prefill_mfu=0.1"]
        ).decode_bw_eff
        == 0.6
    )
    with pytest.raises(ValueError, match="--gen-assume"):
        engine_with("vllm", ["vllm.nonsense=1"])
    assert hardware("h200", peak_tflops=500).peak_flops == 500e12
    with pytest.raises(ValueError, match="--gpu"):
        hardware("v100")


def _plan(capsys, *argv: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``copd plan`` on the 8-branch config."""
    capsys.readouterr()
    code = plan_main(
        ["--config", str(REPO / "configs/copd_8branch.yaml"), "--world-size", "64", *argv]
    )
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_prints_generation_per_engine_with_its_assumptions(capsys):
    code, out, _ = _plan(capsys, "--gpu", "h200", "--mean-response-tokens", "1000")
    assert code == 0
    assert "--gpu h200: H200 SXM 141GB, 989 TFLOP/s bf16 dense, 4.8 TB/s HBM" in out
    max_new = load_config(REPO / "configs/copd_8branch.yaml").rollout.max_new_tokens
    assert f"responses {max_new} tokens at most, 1000 on average" in out
    assert "megatron: one sampler per DP replica: TP4" in out and "micro-batches of 32 rows" in out
    assert "vllm: 4 engine(s) per DP replica of TP1" in out  # one per rank (rollout.tp=1)
    assert out.count("assumes prefill") == 2 and out.count("rl step (x300)") == 2
    assert "opd step (x200)" in out and "slowest branch text" in out  # the hub's peer calls
    _, slower, _ = _plan(
        capsys, "--gpu", "h200", "--gen-assume", "megatron.forward_overhead_s=0.01"
    )
    assert "10 ms per forward per stage" in slower
    _, none, _ = _plan(capsys)
    assert "generation per step" not in none  # only asked with --gpu / --gpu-memory-gb


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gen-assume", "vllm.decode_bw_eff=1.5"], "vllm.decode_bw_eff=1.5"),
        (["--gen-assume", "megatron.prefill_mfu=x"], "megatron.prefill_mfu=x"),
        (["--mean-response-tokens", "0.5"], "--mean-response-tokens 0.5"),
        (["--peak-tflops", "-1"], None),
    ],
)
def test_plan_bad_prediction_options_fail_in_one_line(capsys, argv, message):
    code, out, err = _plan(capsys, "--gpu", "a100", *argv)
    if message is None:  # a non-positive override keeps the datasheet value
        assert code == 0 and "312 TFLOP/s" in out
        return
    assert code == 1 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("copd plan: ") and message in line
