"""The CoPD cycle schedule and the baseline modes, as a pure plan of steps.

``build_plan`` turns the schedule config into one ``StepPlan`` per global optimizer step; the
training loop walks the list from ``ScheduleState.next_step``. Every rank builds the same plan
from the same config, so no communication is needed to agree on the phase.

Modes (docs/method.md, "Baselines"):
- ``copd``: ``cycles`` x (``rl_steps`` "rl" steps, then ``opd_steps`` "opd" steps). Every branch
  learns every step; in OPD steps all teaching edges are active and the teachers are the
  *current* peers (they learn in the same step).
- ``expert``: every branch runs GRPO only, ``cycles * (rl_steps + opd_steps)`` steps, so an
  expert run spends the same number of steps as the CoPD run it is compared with.
- ``mixed``: one branch whose data is the union, ``mixed_steps`` steps. The caller computes
  ``mixed_steps`` as the sum of the experts' steps, K * cycles * (rl_steps + opd_steps) for K
  experts (the paper's "steps = sum of the experts' steps").
- ``static_opd``: stage 1 = experts (``cycles * rl_steps`` steps, every branch learns); stage 2 =
  ``cycles * opd_steps`` OPD steps where only ``student`` learns, from the one other branch,
  which no longer learns (a frozen teacher). Exactly two branches.
- ``mopd``: as ``static_opd`` but ``student`` learns from every other branch (all frozen).

Cycle numbering: for copd/expert/mixed a cycle is ``rl_steps + opd_steps`` consecutive steps
(the last cycle of ``mixed`` may be shorter). For static_opd/mopd stage 1 holds cycles
``0..cycles-1`` of ``rl_steps`` steps and stage 2 holds cycles ``cycles..2*cycles-1`` of
``opd_steps`` steps, so ``cycle`` increases monotonically over the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

MODES: tuple[str, ...] = ("copd", "expert", "mixed", "static_opd", "mopd")
PHASES: tuple[str, ...] = ("rl", "opd")
Edge = tuple[str, str]  # (student, teacher)
Phase = Literal["rl", "opd"]


@dataclass(frozen=True)
class StepPlan:
    """What one global optimizer step does.

    ``phase`` is what the loop branches on: "rl" (each learner's GRPO rows only) or "opd"
    (GRPO rows plus, for each active (student, teacher) edge in ``edges``, the student's rollouts
    on the teacher's prompts scored by the teacher). ``learners`` do an optimizer step; a
    teacher that is not a learner (static_opd/mopd) is frozen while it teaches. An "rl" step has
    no edges; an "opd" step may have none (``teaching.graph=none``): then it is an RL step too.
    """

    step: int
    cycle: int
    phase: Phase
    learners: tuple[str, ...]
    edges: tuple[Edge, ...]
    end_of_cycle: bool

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"StepPlan.phase={self.phase!r}: use one of {', '.join(PHASES)}")
        if self.phase == "rl" and self.edges:
            raise ValueError(f"step {self.step}: an 'rl' step has no teaching edges")


def _check_count(name: str, value: int, minimum: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"schedule.{name}={value!r} must be an integer >= {minimum}{why}")


def _check_branches(branches: list[str]) -> None:
    if not branches or len(set(branches)) != len(branches):
        raise ValueError(f"branches must be a non-empty list of distinct names, got {branches!r}")


def _check_copd_edges(branches: list[str], edges: list[Edge]) -> None:
    if len(branches) < 2 or not edges:
        raise ValueError(
            f"schedule.mode=copd needs >= 2 branches and teaching edges, got branches={branches} "
            f"edges={edges}; set teaching.graph (e.g. hub or pairwise), or use schedule.mode=expert"
        )
    known = set(branches)
    for s, t in edges:
        if s not in known or t not in known or s == t:
            raise ValueError(
                f"teaching edge ({s!r}, {t!r}) must join two different branches of {branches}"
            )
    if len(set(edges)) != len(edges):
        raise ValueError(f"teaching edges contain duplicates: {edges}")
    one_way = [(s, t) for s, t in edges if (t, s) not in set(edges)]
    if one_way:
        raise ValueError(
            f"schedule.mode=copd teaches both ways, but edges {one_way} have no reverse; build the "
            "edges from teaching.graph, or use schedule.mode=static_opd for one-directional OPD"
        )


def _check_student(mode: str, branches: list[str], student: str | None) -> None:
    if mode not in ("static_opd", "mopd"):
        if student is not None:
            raise ValueError(
                f"schedule.student={student!r} is only used by static_opd and mopd, not "
                f"schedule.mode={mode}; remove schedule.student"
            )
        return
    if student not in branches:
        raise ValueError(
            f"schedule.mode={mode} needs schedule.student set to the branch that learns, one of "
            f"{branches}; got {student!r}"
        )
    if mode == "static_opd" and len(branches) != 2:
        raise ValueError(
            f"schedule.mode=static_opd distils one frozen expert into one student and needs exactly "
            f"2 branches, got {len(branches)} {branches}; use schedule.mode=mopd for more teachers"
        )
    if mode == "mopd" and len(branches) < 2:
        raise ValueError(
            f"schedule.mode=mopd needs >= 2 branches (a student and teachers), got {branches}"
        )


def _validate(
    mode: str,
    branches: list[str],
    edges: list[Edge],
    cycles: int,
    rl_steps: int,
    opd_steps: int,
    student: str | None,
    mixed_steps: int | None,
) -> None:
    if mode not in MODES:
        raise ValueError(f"schedule.mode={mode!r} is not one of {MODES}")
    _check_branches(branches)
    _check_count("cycles", cycles, 1)
    _check_count("rl_steps", rl_steps, 0)
    _check_count("opd_steps", opd_steps, 0)
    if mode in ("copd", "static_opd", "mopd"):
        _check_count(
            "opd_steps", opd_steps, 1, f" for schedule.mode={mode} (it distils in OPD steps)"
        )
    if mode == "expert" and rl_steps + opd_steps < 1:
        raise ValueError(
            "schedule.mode=expert runs cycles * (rl_steps + opd_steps) steps; set schedule.rl_steps >= 1"
        )
    if mode == "mixed":
        if len(branches) != 1:
            raise ValueError(
                f"schedule.mode=mixed trains one policy on the union of the data but {len(branches)} "
                f"branches are configured {branches}; configure one branch whose data is the union"
            )
        if mixed_steps is None:
            raise ValueError(
                "schedule.mode=mixed needs schedule.mixed_steps: set it to the sum of the experts' "
                "steps, K * cycles * (rl_steps + opd_steps) for K experts"
            )
        _check_count("mixed_steps", mixed_steps, 1)
    elif mixed_steps is not None:
        raise ValueError(
            f"schedule.mixed_steps is only used by schedule.mode=mixed, not {mode}; remove it"
        )
    if mode == "copd":
        _check_copd_edges(branches, edges)
    _check_student(mode, branches, student)


def _cycled(
    steps: int, cycle_len: int, first_step: int, first_cycle: int, **fields: object
) -> list[StepPlan]:
    """``steps`` StepPlans sharing ``fields``, grouped in cycles of ``cycle_len`` steps."""
    return [
        StepPlan(
            step=first_step + i,
            cycle=first_cycle + i // cycle_len,
            end_of_cycle=(i + 1) % cycle_len == 0 or i == steps - 1,
            **fields,
        )
        for i in range(steps)
    ]


def _copd_plan(
    branches: tuple[str, ...], edges: tuple[Edge, ...], cycles: int, rl: int, opd: int
) -> list[StepPlan]:
    plan: list[StepPlan] = []
    for c in range(cycles):
        for i in range(rl + opd):
            is_opd = i >= rl
            plan.append(
                StepPlan(
                    step=len(plan),
                    cycle=c,
                    phase="opd" if is_opd else "rl",
                    learners=branches,
                    edges=edges if is_opd else (),
                    end_of_cycle=i == rl + opd - 1,
                )
            )
    return plan


def _distil_plan(
    branches: tuple[str, ...], student: str, cycles: int, rl: int, opd: int
) -> list[StepPlan]:
    """static_opd / mopd: experts first, then ``student`` learns from every other (frozen) branch."""
    experts = _cycled(
        cycles * rl,
        max(rl, 1),
        0,
        0,
        phase="rl",
        learners=branches,
        edges=(),
    )
    edges = tuple((student, t) for t in branches if t != student)
    distil = _cycled(
        cycles * opd,
        opd,
        len(experts),
        cycles,
        phase="opd",
        learners=(student,),
        edges=edges,
    )
    return experts + distil


def build_plan(
    mode: str,
    branches: list[str],
    edges: list[Edge] | tuple[Edge, ...] = (),
    cycles: int = 1,
    rl_steps: int = 0,
    opd_steps: int = 0,
    student: str | None = None,
    mixed_steps: int | None = None,
) -> list[StepPlan]:
    """The whole run as one ``StepPlan`` per global step (0-based, in order).

    Args:
        mode: one of ``MODES``.
        branches: branch names; ``learners`` keep this order.
        edges: (student, teacher) teaching edges, used by ``copd`` only (every pair both ways).
            static_opd/mopd derive their edges from ``student``; expert/mixed have none.
        cycles, rl_steps, opd_steps: N, S_RL, S_OPD.
        student: the learning branch for static_opd/mopd (must be None otherwise).
        mixed_steps: total steps for ``mixed`` (the sum of the experts' steps; caller computes).

    Raises:
        ValueError naming the ``schedule.*`` field and the fix.
    """
    edges = [tuple(e) for e in edges]
    _validate(mode, branches, edges, cycles, rl_steps, opd_steps, student, mixed_steps)
    names = tuple(branches)
    cycle_len = rl_steps + opd_steps
    if mode == "copd":
        return _copd_plan(names, tuple(edges), cycles, rl_steps, opd_steps)
    if mode == "expert":
        return _cycled(
            cycles * cycle_len,
            cycle_len,
            0,
            0,
            phase="rl",
            learners=names,
            edges=(),
        )
    if mode == "mixed":
        return _cycled(
            mixed_steps,
            max(cycle_len, 1),
            0,
            0,
            phase="rl",
            learners=names,
            edges=(),
        )
    return _distil_plan(names, student, cycles, rl_steps, opd_steps)


@dataclass
class ScheduleState:
    """Resumable position in the plan: the index of the next global step to run."""

    next_step: int = 0

    def advance(self) -> None:
        self.next_step += 1

    def state_dict(self) -> dict[str, int]:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        value = state.get("next_step")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"schedule state needs an integer next_step >= 0, got {dict(state)!r}")
        self.next_step = value


def remaining_steps(plan: list[StepPlan], state: ScheduleState) -> list[StepPlan]:
    """The steps still to run after resuming at ``state``.

    Raises ValueError if the checkpoint is past the end of this plan (the schedule config was
    shortened between runs).
    """
    if state.next_step > len(plan):
        raise ValueError(
            f"checkpoint resumes at step {state.next_step} but this schedule has only {len(plan)} "
            "steps; restore the original schedule.cycles/rl_steps/opd_steps or start a new run"
        )
    return plan[state.next_step :]
