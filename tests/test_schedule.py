"""CPU unit tests of copd_mega.rl.schedule: step counts, phases, learners, edges, resume, errors."""

from collections import Counter

import pytest

from copd_mega.rl.schedule import ScheduleState, StepPlan, build_plan, remaining_steps

BR2 = ["text", "image"]
BR3 = ["text", "image", "video"]
HUB3 = [("text", "image"), ("image", "text"), ("text", "video"), ("video", "text")]


def phases(plan):
    return Counter(p.phase for p in plan)


def test_copd_cycles_and_phases():
    plan = build_plan("copd", BR3, HUB3, cycles=3, rl_steps=3, opd_steps=2)
    assert len(plan) == 15 and [p.step for p in plan] == list(range(15))
    assert phases(plan) == {"rl": 9, "opd": 6}
    # Each cycle: rl, rl, rl, opd, opd; end_of_cycle on its last step.
    assert [p.phase for p in plan[:5]] == ["rl"] * 3 + ["opd"] * 2
    assert [p.cycle for p in plan] == [c for c in range(3) for _ in range(5)]
    assert [p.step for p in plan if p.end_of_cycle] == [4, 9, 14]
    for p in plan:
        assert p.learners == tuple(BR3) and {t for _, t in p.edges} <= set(p.learners)
        assert p.edges == (tuple(HUB3) if p.phase == "opd" else ())


def test_expert_mode():
    plan = build_plan("expert", BR2, HUB3[:2], cycles=2, rl_steps=3, opd_steps=2)
    assert len(plan) == 10 and phases(plan) == {"rl": 10}
    assert all(p.learners == tuple(BR2) and p.edges == () for p in plan)
    assert [p.step for p in plan if p.end_of_cycle] == [4, 9]


def test_mixed_mode_one_branch():
    # Caller computes mixed_steps = sum of experts' steps, here 2 experts * 2 cycles * 5 = 20.
    plan = build_plan("mixed", ["union"], cycles=2, rl_steps=3, opd_steps=2, mixed_steps=20)
    assert len(plan) == 20 and phases(plan) == {"rl": 20}
    assert all(p.learners == ("union",) and p.edges == () for p in plan)
    assert plan[-1].end_of_cycle and plan[-1].cycle == 3
    with pytest.raises(ValueError, match="one branch whose data is the union"):
        build_plan("mixed", BR2, mixed_steps=20)
    with pytest.raises(ValueError, match="schedule.mixed_steps"):
        build_plan("mixed", ["union"], cycles=2, rl_steps=3)


def test_static_opd():
    plan = build_plan("static_opd", BR2, cycles=2, rl_steps=3, opd_steps=2, student="image")
    assert len(plan) == 10
    stage1, stage2 = plan[:6], plan[6:]
    assert all(p.phase == "rl" and p.learners == tuple(BR2) and p.edges == () for p in stage1)
    assert all(p.phase == "opd" and p.learners == ("image",) for p in stage2)
    assert all(p.edges == (("image", "text"),) and "text" not in p.learners for p in stage2)
    assert [p.cycle for p in plan] == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert [p.step for p in plan if p.end_of_cycle] == [2, 5, 7, 9]


def test_mopd_student_learns_from_every_other_branch():
    plan = build_plan("mopd", BR3, cycles=1, rl_steps=4, opd_steps=3, student="text")
    assert phases(plan) == {"rl": 4, "opd": 3}
    assert all(p.learners == tuple(BR3) for p in plan[:4])
    for p in plan[4:]:
        assert p.learners == ("text",) and not {t for _, t in p.edges} & set(p.learners)
        assert p.edges == (("text", "image"), ("text", "video"))


@pytest.mark.parametrize("mode", ["copd", "expert", "static_opd", "mopd"])
def test_edges_only_in_opd_steps(mode):
    student = "text" if mode in ("static_opd", "mopd") else None
    edges = HUB3[:2] if mode == "copd" else ()
    plan = build_plan(mode, BR2, edges, cycles=2, rl_steps=2, opd_steps=1, student=student)
    assert all(bool(p.edges) == (p.phase == "opd") for p in plan)
    assert all(isinstance(p, StepPlan) for p in plan)


def test_resume_round_trip():
    plan = build_plan("copd", BR2, HUB3[:2], cycles=2, rl_steps=2, opd_steps=1)
    state = ScheduleState()
    for _ in range(4):
        state.advance()
    saved = state.state_dict()
    assert saved == {"next_step": 4}
    resumed = ScheduleState()
    resumed.load_state_dict(saved)
    assert resumed == state
    assert remaining_steps(plan, resumed) == plan[4:]
    resumed.load_state_dict({"next_step": 99})
    with pytest.raises(ValueError, match="schedule.cycles"):
        remaining_steps(plan, resumed)
    with pytest.raises(ValueError, match="next_step"):
        resumed.load_state_dict({"step": 3})


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(mode="bogus", branches=BR2), "schedule.mode"),
        (dict(mode="copd", branches=BR2, edges=HUB3[:2], cycles=0, opd_steps=1), "schedule.cycles"),
        (
            dict(mode="copd", branches=BR2, edges=HUB3[:2], rl_steps=-1, opd_steps=1),
            "schedule.rl_steps",
        ),
        (
            dict(mode="copd", branches=BR2, edges=HUB3[:2], rl_steps=2, opd_steps=0),
            "schedule.opd_steps",
        ),
        (
            dict(mode="copd", branches=BR2, edges=HUB3[:2], cycles=1.5, opd_steps=1),
            "schedule.cycles",
        ),
        (dict(mode="expert", branches=BR2), "schedule.rl_steps"),
        (dict(mode="static_opd", branches=BR2, opd_steps=1), "schedule.student"),
        (dict(mode="static_opd", branches=BR2, opd_steps=1, student="audio"), "schedule.student"),
        (dict(mode="mopd", branches=BR2, opd_steps=1, student=None), "schedule.student"),
        (
            dict(mode="copd", branches=BR2, edges=HUB3[:2], opd_steps=1, student="text"),
            "schedule.student",
        ),
        (dict(mode="expert", branches=BR2, rl_steps=1, mixed_steps=3), "schedule.mixed_steps"),
    ],
)
def test_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build_plan(**kwargs)


def test_static_opd_needs_two_branches():
    with pytest.raises(ValueError, match="exactly 2 branches.*mopd"):
        build_plan("static_opd", BR3, rl_steps=1, opd_steps=1, student="text")


def test_copd_edge_errors():
    with pytest.raises(ValueError, match="no reverse"):
        build_plan("copd", BR2, [("text", "image")], rl_steps=1, opd_steps=1)
    with pytest.raises(ValueError, match="teaching.graph"):
        build_plan("copd", BR2, [], rl_steps=1, opd_steps=1)
    with pytest.raises(ValueError, match="two different branches"):
        build_plan("copd", BR2, [("text", "audio"), ("audio", "text")], rl_steps=1, opd_steps=1)
    with pytest.raises(ValueError, match="distinct"):
        build_plan("expert", ["a", "a"], rl_steps=1)


def test_step_phase_is_explicit_and_checked():
    """The loop branches on ``StepPlan.phase``: only "rl" and "opd", and an "rl" step never
    carries teaching edges (every mode's plan satisfies it)."""
    with pytest.raises(ValueError, match="phase"):
        StepPlan(step=0, cycle=0, phase="distil", learners=("a",), edges=(), end_of_cycle=True)
    with pytest.raises(ValueError, match="no teaching edges"):
        StepPlan(step=0, cycle=0, phase="rl", learners=("a", "b"), edges=(("a", "b"),),
                 end_of_cycle=True)  # fmt: skip
    for mode, extra in [("copd", {"edges": [("a", "b"), ("b", "a")]}), ("expert", {}),
                        ("static_opd", {"student": "a"}), ("mopd", {"student": "a"})]:  # fmt: skip
        plan = build_plan(mode, ["a", "b"], cycles=2, rl_steps=2, opd_steps=1, **extra)
        assert {p.phase for p in plan} <= {"rl", "opd"}
        assert all(p.edges == () for p in plan if p.phase == "rl")
