"""The paired-bootstrap interval of ``copd study`` against answers computed independently."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from copd_mega.study.intervals import align, paired_bootstrap, statistic


def test_constant_differences_give_a_point_interval():
    diffs = [[np.full(50, 0.25), np.full(30, 0.25)] for _ in range(3)]
    d = paired_bootstrap(diffs, n_boot=200)
    assert d.mean == d.lo == d.hi == pytest.approx(0.25) and not d.contains_zero


def test_one_seed_matches_the_normal_interval_of_a_mean():
    """One seed, one capability: the bootstrap percentile interval of a mean of n i.i.d.
    values is close to the analytic mean +- 1.96 * sd / sqrt(n) for large n."""
    rng = np.random.default_rng(5)
    d = rng.choice([-1.0, 0.0, 1.0], size=1000, p=[0.2, 0.5, 0.3])
    got = paired_bootstrap([[d]], n_boot=4000, seed=1)
    half = 1.96 * d.std() / np.sqrt(d.size)
    assert got.mean == pytest.approx(d.mean())
    assert got.lo == pytest.approx(d.mean() - half, abs=0.004)
    assert got.hi == pytest.approx(d.mean() + half, abs=0.004)


def test_seed_level_resampling_matches_the_exact_bootstrap_distribution():
    """Problems identical within each seed (no problem noise): the interval is the percentile
    interval of the exact bootstrap distribution of the mean of 3 seeds (27 equally likely
    draws, enumerated here)."""
    seed_means = [-0.10, 0.05, 0.20]
    diffs = [[np.full(20, m)] for m in seed_means]
    exact = sorted(np.mean(c) for c in itertools.product(seed_means, repeat=3))
    lo, hi = np.quantile(exact, [0.025, 0.975], method="inverted_cdf")  # a discrete law
    got = paired_bootstrap(diffs, n_boot=20000, seed=2)
    assert got.mean == pytest.approx(np.mean(seed_means))
    assert got.per_seed == pytest.approx(tuple(seed_means))
    assert got.lo == pytest.approx(lo, abs=0.011) and got.hi == pytest.approx(hi, abs=0.011)
    assert got.contains_zero


def test_statistic_weighs_capabilities_equally_and_align_pairs_by_id():
    diffs = [[np.array([1.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0])]]
    assert statistic(diffs) == pytest.approx((0.5 + 0.25) / 2)
    a, b = {"p2": 1, "p1": 0, "p3": 1}, {"p1": 1, "p3": 1, "p2": 0}
    assert align(a, b, "x").tolist() == [-1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="different problems"):
        align(a, {"p1": 1}, "x")
    with pytest.raises(ValueError):
        paired_bootstrap([[np.ones(3)], [np.ones(3), np.ones(2)]])
