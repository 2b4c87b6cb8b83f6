"""Paired differences between two models with a 95% confidence interval (pure numerics).

Two models A and B evaluated on the same held-out problems in each seed give, per seed ``s``
and capability ``c``, the per-problem differences ``d[s][c][p] = correct_A - correct_B``
(each in {-1, 0, 1}). The statistic is the difference of the table's mean accuracies:

    D = mean over seeds of (mean over capabilities of (mean over problems of d)).

Its interval is a two-level paired bootstrap: draw the seeds with replacement, then inside each
drawn seed draw each capability's problems with replacement (the same draw for A and B: the
pairing), recompute D; the 2.5% and 97.5% percentiles of ``n_boot`` draws are the interval.
Resampling seeds carries the run-to-run noise (training randomness), resampling problems the
finite eval set's. With one seed only problems are resampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Diffs = list[list[np.ndarray]]  # [seed][capability] -> per-problem differences [n_problems]


@dataclass(frozen=True)
class PairedDiff:
    """D, its interval and the per-seed differences (fractions, not percent)."""

    mean: float
    lo: float
    hi: float
    per_seed: tuple[float, ...]

    @property
    def contains_zero(self) -> bool:
        return self.lo <= 0.0 <= self.hi


def statistic(diffs: Diffs) -> float:
    """D of the module docstring."""
    return float(np.mean([np.mean([d.mean() for d in caps]) for caps in diffs]))


def paired_bootstrap(
    diffs: Diffs, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> PairedDiff:
    """D and its percentile interval at ``level`` from ``n_boot`` two-level resamples.

    Args:
        diffs: ``[seed][capability]`` arrays of per-problem differences; every seed has the same
            capabilities (in the same order), each with at least one problem.
        seed: the bootstrap's own random generator seed (the result is a function of it).
    Returns:
        :class:`PairedDiff` (fractions).
    """
    if not diffs or not all(diffs) or any(len(c) != len(diffs[0]) for c in diffs):
        raise ValueError("paired_bootstrap needs >= 1 seed, each with the same capabilities")
    if any(d.size == 0 for caps in diffs for d in caps):
        raise ValueError("paired_bootstrap: a capability has no problems")
    rng = np.random.default_rng(seed)
    n_seeds, n_caps = len(diffs), len(diffs[0])
    draws = np.empty(n_boot)
    for b in range(n_boot):
        seeds = rng.integers(0, n_seeds, n_seeds) if n_seeds > 1 else np.zeros(1, dtype=int)
        total = 0.0
        for s in seeds:
            for d in diffs[s]:
                total += d[rng.integers(0, d.size, d.size)].mean()
        draws[b] = total / (len(seeds) * n_caps)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    per_seed = tuple(float(np.mean([d.mean() for d in caps])) for caps in diffs)
    return PairedDiff(statistic(diffs), float(lo), float(hi), per_seed)


def align(a: dict[str, int], b: dict[str, int], what: str) -> np.ndarray:
    """``correct_A - correct_B`` over the problem ids both hold (``{id: 1/0}`` each), in id order.

    Raises ValueError naming ``what`` when the two were evaluated on different problems.
    """
    if a.keys() != b.keys():
        raise ValueError(
            f"{what}: the two models were evaluated on different problems "
            f"({len(a)} vs {len(b)} ids, {len(a.keys() ^ b.keys())} not shared); evaluate both "
            "with the same data.seed and data.n_eval"
        )
    ids = sorted(a)
    return np.array([a[i] - b[i] for i in ids], dtype=np.float64)
