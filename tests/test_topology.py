"""Rank layout, peer groups and teaching graph (pure, no processes)."""

import re

import pytest

from copd_mega.config import ConfigError, load_config
from copd_mega.launch.plan import main as plan_main
from copd_mega.parallel.topology import plan_layout, teaching_edges


def three_branches(graph="hub_spoke", hub="text", tp=2, pp=1, dp=2, extra=()):
    branches = "[{name: text, data: arith}, {name: image, data: image}, {name: video, data: video}]"
    return load_config(
        None,
        [f"branches={branches}", f"teaching.graph={graph}", f"teaching.hub={hub}",
         f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}", *extra],
    )  # fmt: skip


def test_peer_groups_and_hub_spoke_edges_match_hand_written():
    layout = plan_layout(three_branches(), world_size=12)
    # 3 branches x (TP2 x DP2): branch b owns ranks 4b..4b+3; TP fastest.
    assert [b.ranks for b in layout.branches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert layout.branches[1].tp_groups == [[4, 5], [6, 7]]
    assert layout.branches[1].dp_groups == [[4, 6], [5, 7]]
    assert layout.branches[2].pp_groups == [[8], [9], [10], [11]]
    assert layout.peer_groups == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]
    assert layout.edges == [
        ("text", "image"), ("image", "text"), ("text", "video"), ("video", "text"),
    ]  # fmt: skip
    assert layout.coords(6) == (0, 0, 1)
    assert layout.peer_rank(6, "video") == 10


def test_pp_groups_with_tp_and_dp():
    layout = plan_layout(three_branches(tp=2, pp=2, dp=2, extra=["model.num_layers=4"]), 24)
    b0 = layout.branches[0]
    assert b0.tp_groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert b0.pp_groups == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert b0.dp_groups == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_teaching_graphs():
    names = ["a", "b", "c"]
    assert teaching_edges(names, "pairwise") == [
        ("a", "b"), ("a", "c"), ("b", "a"), ("b", "c"), ("c", "a"), ("c", "b"),
    ]  # fmt: skip
    assert teaching_edges(names, "none") == []
    assert len(teaching_edges(names + ["d"], "ring")) == 8
    with pytest.raises(ConfigError, match="teaching.hub"):
        teaching_edges(names, "hub_spoke", hub="z")


@pytest.mark.parametrize(
    "overrides, world, fragment",
    [
        ([], 10, "world size 10"),
        (["model.num_attention_heads=6", "model.hidden_size=66", "model.num_query_groups=3"], 12,
         "not divisible by parallel.tp"),
        (["parallel.pp=2", "model.num_layers=3"], 24, "model.num_layers=3"),
    ],
)  # fmt: skip
def test_layout_errors_say_what_to_change(overrides, world, fragment):
    cfg = (
        three_branches(extra=overrides)
        if "parallel.pp=2" not in overrides
        else three_branches(pp=2, extra=[o for o in overrides if not o.startswith("parallel.pp")])
    )
    with pytest.raises(ConfigError, match=fragment):
        plan_layout(cfg, world)


def test_unknown_hub_is_refused():
    with pytest.raises(ConfigError, match="teaching.hub"):
        three_branches(hub="audio")


def test_plan_cli_64_and_60(capsys):
    assert plan_main(["--config", "configs/copd_8branch.yaml", "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    assert out.count("branch ") >= 8 and "peer groups (8)" in out and "text<-image" in out
    assert plan_main(["--config", "configs/copd_8branch.yaml", "--world-size", "60"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "world size 60" in err[0] and "64" in err[0]


def test_plan_prints_the_memory_plan_and_fits_80(capsys):
    argv = ["--config", "configs/copd_8branch.yaml", "--world-size", "64", "--gpu-memory-gb", "80"]
    assert plan_main(argv) == 0
    out = capsys.readouterr().out
    for part in ("weights", "gradients", "optimizer", "rollout KV cache", "log-prob chunk",
                 "activations (no recompute)", "total"):  # fmt: skip
        assert f"\n  {part}" in out, part
    assert "+ vision" in out and "fits --gpu-memory-gb 80" in out


def test_plan_that_does_not_fit_exits_with_one_line(capsys):
    argv = ["--config", "configs/copd_8branch.yaml", "--world-size", "64", "--gpu-memory-gb", "8"]
    assert plan_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpu-memory-gb 8" in err[0]
    assert "rollout.max_new_tokens" in err[0] or "parallel." in err[0]


def _kv_heavy(batch: int) -> list[str]:
    return ["--config", "configs/copd_8branch.yaml", "--world-size", "64", "--gpu-memory-gb",
            "80", f"rollout.max_batch_size={batch}"]  # fmt: skip


def test_kv_cache_too_big_names_a_batch_size_that_fits(capsys):
    assert plan_main(_kv_heavy(512)) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "rollout KV cache" in line and "rollout.max_batch_size to <= " in line
    fits = int(line.split("rollout.max_batch_size to <= ")[1].split()[0])
    assert plan_main(_kv_heavy(fits)) == 0
    assert plan_main(_kv_heavy(fits + 1)) == 1


def test_memory_parts_follow_the_formulas():
    from copd_mega.launch.memory import GIB, memory_parts

    over = ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "model.num_layers=4",
            "rollout.max_batch_size=3", "rollout.max_new_tokens=20", "data.max_prompt_tokens=12",
            "model.dtype=bf16", "parallel.micro_batch_size=5", "rollout.logprob_chunk=7"]  # fmt: skip
    cfg = load_config(None, over)
    parts = {p.name: p.bytes for p in memory_parts(cfg)}
    head_dim = 64 // 4
    # sequences x positions x layers on this stage x (K, V) x kv heads / TP x head dim x bf16
    assert parts["rollout KV cache"] == 3 * (12 + 20) * 2 * 2 * (2 // 2) * head_dim * 2
    # micro-batch x chunk x padded vocab / TP x fp32, twice (copy + softmax temporary)
    assert parts["log-prob chunk"] == 5 * 7 * (128 // 2) * 4 * 2
    assert parts["gradients (fp32 buffer)"] == 2 * parts["weights"]
    assert parts["optimizer (distributed over DP)"] == 12 / 2 / 2 * parts["weights"]
    doubled = {p.name: p.bytes for p in memory_parts(load_config(None, [*over, "parallel.dp=4"]))}
    assert (
        doubled["optimizer (distributed over DP)"] * 2 == parts["optimizer (distributed over DP)"]
    )
    assert parts["runtime reserve"] == 3 * GIB


def _local_param_counts(rank: int, overrides: list[str]):
    from copd_mega.config import load_config
    from copd_mega.launch.memory import stage_params, vision_params
    from copd_mega.models.gpt import build_gpt
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    cfg = load_config(None, overrides)
    init_distributed()
    topo = build_topology(cfg)
    if cfg.vision.enabled:
        from copd_mega.models.vlm import build_vlm

        model = build_vlm(cfg, topo)
        vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith("vision_"))
        return (
            sum(p.numel() for p in model.parameters()),
            vision,
            stage_params(cfg),
            vision_params(cfg),
        )
    model = build_gpt(cfg, topo)
    return sum(p.numel() for p in model.parameters()), 0, stage_params(cfg), 0


@pytest.mark.multiproc
def test_planned_parameters_equal_the_built_models():
    """The memory plan's parameter counts are those of the megatron models the trainer builds:
    per rank at TP2 x PP2 (most loaded stage) and for the vision tower."""
    from multiproc import spawn

    base = ["model.num_layers=4", "model.tie_embeddings=false", "model.qkv_bias=true"]
    counts = spawn(_local_param_counts, 4, [*base, "parallel.tp=2", "parallel.pp=2"])
    assert max(c[0] for c in counts) == counts[0][2]
    (vlm,) = spawn(_local_param_counts, 1, ["vision.enabled=true", "model.vocab_size=101"])
    assert vlm[1] == vlm[3] and vlm[0] == vlm[2]


SOLO = "schedule.mode=expert"  # one branch learns alone (copd needs two)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["teaching.graph=hub_spoke", "teaching.hub=text"], "schedule.mode=copd needs >= 2"),
        ([SOLO, "rollout.max_new_tokens=128"], "exceeds model.max_seq_length="),
        ([SOLO, "data.max_prompt_tokens=100", "rollout.max_new_tokens=29"],
         "rollout.max_new_tokens"),
        ([SOLO, "vision.enabled=true", "parallel.pp=2"], "parallel.pp=2"),
        ([SOLO, "branches=[{name: a, data: image}]"], "vision.enabled=true"),
        ([SOLO, "branches=[{name: a, data: /shards/a}]"], "data.max_prompt_tokens"),
        ([SOLO, "model.vocab_size=40", "opd.top_k=4"], "model.vocab_size >= "),
        ([SOLO, "vision.enabled=true", "grpo.kl_coef=0.1"], "grpo.kl_coef"),
    ],
)  # fmt: skip
def test_plan_refuses_what_train_refuses(overrides, fragment, capsys):
    """Each of these passed `copd plan` before and failed at `copd train` start-up (or on the
    cluster): the shared ``validate_job`` refuses them in the dry run, in one line."""
    from copd_mega.launch.validate import validate_job

    world = 2 if "parallel.pp=2" in overrides else 1
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        validate_job(load_config(None, overrides), world)
    argv = ["--config", "configs/tiny_cpu.yaml", "--world-size", str(world),
            "branches=[{name: text, data: arith}]", *overrides]  # fmt: skip
    assert plan_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("copd plan: ") and fragment in err[0], err


def test_builtin_prompt_bound_is_the_longest_prompt():
    from copd_mega.data.synthetic import make_samples
    from copd_mega.data.tokenizer import build_tokenizer
    from copd_mega.launch.validate import prompt_positions_bound

    tok = build_tokenizer()
    for cap in ("arith", "reverse", "sort"):
        cfg = load_config(
            None, [f"branches=[{{name: x, data: {cap}}}]", "data.prompt_template=Task {prompt}"]
        )
        longest = max(1 + len(tok.encode("Task " + s["prompt"]).ids)
                      for s in make_samples(cap, "train", 3, 400))  # fmt: skip
        assert prompt_positions_bound(cfg) == longest, cap
    video = load_config(None, ["branches=[{name: v, data: video}]", "vision.enabled=true"])
    text = 1 + len("Q: For how many seconds is the square shown? Answer 1, 2, 3 or 4.\nA:")
    assert prompt_positions_bound(video) == text + 4 * (32 // 8) ** 2


def test_a_prompt_over_the_bound_is_refused():
    import torch

    from copd_mega.launch.validate import check_prompts

    cfg = load_config(None, ["vision.enabled=true", "data.max_prompt_tokens=40"])
    frames = torch.zeros(2, 3, 32, 32)  # 2 frames x 16 positions
    check_prompts(cfg, [[1, 9, 5, 5, 5]], [[frames]], image_id=9)  # 4 + 32 = 36 positions
    with pytest.raises(ConfigError, match="data.max_prompt_tokens=40"):
        check_prompts(cfg, [[1, 9, *[5] * 8]], [[frames]], image_id=9)  # 9 + 32 = 41


def _train_start_error(rank: int, overrides: list[str]) -> str:
    from copd_mega.config import ConfigError, load_config
    from copd_mega.trainer.job import build_job

    try:
        build_job(load_config(None, overrides))
    except ConfigError as e:
        return str(e)
    return ""


@pytest.mark.multiproc
def test_train_start_up_runs_the_same_validation(tmp_path):
    from copd_mega.launch.validate import validate_job
    from multiproc import spawn

    over = ["teaching.graph=hub_spoke", "teaching.hub=text", f"run_dir={tmp_path}"]
    with pytest.raises(ConfigError) as planned:
        validate_job(load_config(None, over), 1)
    (message,) = spawn(_train_start_error, 1, over)
    assert message == str(planned.value)
