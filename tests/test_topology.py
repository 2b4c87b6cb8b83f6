"""Rank layout, peer groups and teaching graph (pure, no processes)."""

import pytest

from copd_mega.config import ConfigError, load_config
from copd_mega.parallel.topology import plan_layout, teaching_edges
from copd_mega.plan import main as plan_main


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
