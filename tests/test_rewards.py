"""CPU tests of copd_mega.rl.rewards: extraction, per-type scoring, and the hang-proof worker pool."""

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from copd_mega.rl.reward_pool import RewardPool
from copd_mega.rl.rewards import extract_answer, score_one

DEADLINE_S = 2.0
# math-verify evaluates this power tower for minutes (we measured > 30 s); it must not block.
HANG = ("Let me compute. \\boxed{9^{9^{9^{9^{9}}}}}", "3", "math")
GOOD = ("The answer is \\boxed{\\frac{1}{2}}", "0.5", "math")


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=DEADLINE_S) as p:
        yield p


# --- extraction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),  # nested braces
        ("first \\boxed{1} then \\boxed{2}", "2"),  # last occurrence
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are literal
        ("\\boxed{3} and a truncated \\boxed{\\frac{1}{", "3"),  # last *complete* box
        ("\\boxed{5}. Answer: 6", "5"),  # boxed beats the answer form
        ("blah\nAnswer: 42\n", "42"),
        ("The final answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("**Final Answer:** 12", "12"),
        ("the answer is: Paris.", "Paris"),
        ("answer is 1.\nFinal answer is 2.", "2"),  # last answer form
        ("  just 7  \n", "just 7"),  # fallback: whole stripped text
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# --- per-type scoring ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("\\boxed{1/2}", "0.5", 1.0),
        ("The answer is $\\frac{1}{2}$.", "0.5", 1.0),
        ("\\boxed{0.5}", "$\\frac{1}{2}$", 1.0),
        ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),
        ("Answer: 1,000", "1000", 1.0),
        ("\\boxed{x = 5}", "5", 1.0),
        ("0.5", "\\boxed{1/2}", 1.0),  # fallback: whole response
        ("\\boxed{0.51}", "0.5", 0.0),
        ("\\boxed{3}", "4", 0.0),
        ("I do not know", "3", 0.0),
        ("", "3", 0.0),
    ],
)
def test_math(response, gold, expected):
    assert score_one(response, gold, "math") == expected


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("Answer: Paris.", "Paris", 1.0),
        ("\\boxed{ Paris }", " Paris\n", 1.0),
        ("  Paris  ", "Paris", 1.0),
        ("Answer: paris", "Paris", 0.0),  # case-sensitive
        ("\\boxed{1/2}", "0.5", 0.0),  # no maths equivalence
    ],
)
def test_exact(response, gold, expected):
    assert score_one(response, gold, "exact") == expected


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("\\boxed{B}", "B", 1.0),
        ("\\boxed{\\text{(B)}}", "B", 1.0),
        ("The answer is (C).", "C", 1.0),
        ("Answer: C) 42 apples", "C", 1.0),
        ("Answer: Option D", "D", 1.0),
        ("B", "(B)", 1.0),  # bare label as the whole response
        ("\\boxed{b}", "B", 1.0),
        ("\\boxed{42 Apples}", "C) 42 apples", 1.0),  # option text
        ("\\boxed{B}", "C) 42 apples", 0.0),
        ("\\boxed{41 apples}", "C) 42 apples", 0.0),
        ("A quick check shows nothing", "A", 0.0),  # prose is not read as a letter
    ],
)
def test_choice(response, gold, expected):
    assert score_one(response, gold, "choice") == expected


def test_errors():
    with pytest.raises(ValueError, match="'regex'.*math, exact, choice"):
        score_one("x", "x", "regex")
    with pytest.raises(ValueError, match="choice gold"):
        score_one("\\boxed{A}", "  ", "choice")


@pytest.mark.parametrize(
    "response, gold, expected",
    [("down", "down", 1.0), (" Down.", "down", 1.0), ("Answer: left", "left", 1.0),
     ("up", "down", 0.0), ("A", "down", 0.0), ("\\boxed{A}", "Paris", 0.0)],
)  # fmt: skip
def test_choice_whose_gold_is_the_option_text(response, gold, expected):
    assert score_one(response, gold, "choice") == expected


# --- the pool --------------------------------------------------------------------------------


def test_pool_matches_score_one(pool):
    items = [
        GOOD,
        ("\\boxed{3}", "4", "math"),
        ("Answer: Paris", "Paris", "exact"),
        ("\\boxed{B}", "B", "choice"),
    ]
    scores, metrics = pool.score_with_metrics(items)
    assert scores == [score_one(*it) for it in items] == [1.0, 0.0, 1.0, 1.0]
    assert metrics == {"ok": 4, "timeout": 0, "error": 0}
    assert pool.score([]) == []
    with pytest.raises(ValueError, match="'regex'"):
        pool.score([GOOD, ("x", "x", "regex")])
    # A malformed gold raises inside the worker: scored 0, counted as an error, worker lives on.
    pids = pool.worker_pids
    assert pool.score_with_metrics([("\\boxed{A}", "  ", "choice")]) == (
        [0.0],
        {"ok": 0, "timeout": 0, "error": 1},
    )
    assert "choice gold" in pool.last_error and pool.worker_pids == pids


def test_hang_really_exceeds_the_deadline():
    # Run score_one on HANG with no pool: it is still busy after the deadline.
    proc = mp.get_context("spawn").Process(target=score_one, args=HANG, daemon=True)
    proc.start()
    proc.join(timeout=DEADLINE_S + 1.0)  # + ~0.6 s for the spawned interpreter to import
    still_running = proc.is_alive()
    proc.kill()
    proc.join()
    assert still_running, "HANG finished within the deadline; pick a slower expression"


def test_hang_scores_zero_within_deadline_and_pool_survives(pool):
    before = pool.stats
    t0 = time.monotonic()
    scores, metrics = pool.score_with_metrics([HANG, GOOD, GOOD])
    wall = time.monotonic() - t0
    assert scores == [0.0, 1.0, 1.0]
    assert metrics == {"ok": 2, "timeout": 1, "error": 0}
    assert wall < DEADLINE_S + 3.0
    assert pool.stats["timeout"] == before["timeout"] + 1
    assert pool.stats["replaced"] == before["replaced"] + 1
    assert pool.score([GOOD, ("\\boxed{2}", "2", "math")]) == [1.0, 1.0]  # later batches still work


def test_worker_killed_mid_item_is_survived(pool):
    pool.wait_ready()  # both workers ready, so both take a HANG item at once
    pids = pool.worker_pids
    killer = threading.Timer(0.5, lambda: [os.kill(pid, signal.SIGKILL) for pid in pids])
    killer.start()
    t0 = time.monotonic()
    scores, metrics = pool.score_with_metrics([HANG, HANG, GOOD])
    killer.join()
    assert scores == [0.0, 0.0, 1.0]
    assert metrics == {"ok": 1, "timeout": 0, "error": 2}
    assert time.monotonic() - t0 < DEADLINE_S + 3.0
    assert not set(pids) & set(pool.worker_pids)


def test_worker_killed_while_idle_is_replaced(pool):
    pool.wait_ready()
    victim = pool.worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.2)
    scores, metrics = pool.score_with_metrics([GOOD] * 4)
    assert scores == [1.0] * 4 and metrics["ok"] == 4
    assert victim not in pool.worker_pids


def test_worker_killed_while_starting_is_replaced(pool):
    pool.wait_ready()
    pool.score([HANG])  # its worker is killed and a fresh one is starting now
    starting = [w.proc.pid for w in pool._workers if not w.ready]
    assert len(starting) == 1
    os.kill(starting[0], signal.SIGKILL)
    assert pool.score([GOOD, GOOD, GOOD]) == [1.0, 1.0, 1.0]
    pool.wait_ready()
    assert starting[0] not in pool.worker_pids


def test_close_stops_every_worker():
    p = RewardPool(num_workers=2, timeout_s=DEADLINE_S)
    assert p.score([GOOD]) == [1.0]
    procs = [w.proc for w in p._workers]
    p.close()
    p.close()  # idempotent
    assert not any(proc.is_alive() for proc in procs)
    with pytest.raises(RuntimeError, match="closed"):
        p.score([GOOD])


def test_bad_config():
    with pytest.raises(ValueError, match="fork"):
        RewardPool(start_method="fork")
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(num_workers=0)
