"""Sample order of an epoch and its split over DP ranks: pure functions of counts and seeds.

Epoch `e` of a dataset with shard sample counts `counts`:
1. shards are permuted with a generator seeded by `(seed, e)`;
2. consecutive groups of `window` shards (in that order) form windows; the samples of a window
   are permuted together with a generator seeded by `(seed, e, window index)`. This is a
   shuffle buffer of `window` shards whose state is a pure function of the cursor, so a
   resumed reader needs no buffer contents, only `(epoch, position)`;
3. the concatenated windows give the epoch's global order of `sum(counts)` positions, and DP
   rank `r` of `d` reads the contiguous positions `rank_span(total, r, d)`. The spans are
   disjoint, cover the epoch, and differ in length by at most one.

With `shuffle=False` every permutation is the identity (file order), for evaluation.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from itertools import accumulate

import numpy as np


def rank_span(num_samples: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """Contiguous share of one epoch's `num_samples` positions for DP rank `dp_rank`.

    Returns:
        `(start, end)` with `end - start` equal to `num_samples // dp_size` or one more.
    """
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
    return dp_rank * num_samples // dp_size, (dp_rank + 1) * num_samples // dp_size


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(words)))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Order in which epoch `epoch` visits the shards.

    Returns:
        A permutation of `range(num_shards)` (the identity when `shuffle` is False).
    """
    if not shuffle:
        return list(range(num_shards))
    return _rng(seed, epoch, 0).permutation(num_shards).tolist()


def window_permutation(
    size: int, seed: int, epoch: int, window: int, shuffle: bool = True
) -> np.ndarray:
    """Order of the `size` samples of window `window` in epoch `epoch`.

    Returns:
        int64 array [size], a permutation of `range(size)`.
    """
    if not shuffle:
        return np.arange(size, dtype=np.int64)
    return _rng(seed, epoch, 1, window).permutation(size).astype(np.int64)


class EpochPlan:
    """Maps positions of one epoch's global order to `(shard index, sample index in shard)`.

    Holds O(num_shards) integers plus the permutation of the window last used (at most
    `window` shards' samples).
    """

    def __init__(
        self, counts: Sequence[int], seed: int, epoch: int, window: int, shuffle: bool = True
    ):
        if window < 1:
            raise ValueError(f"shuffle window must be >= 1 shard, got {window}")
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        order = shard_order(len(counts), seed, epoch, shuffle)
        self.windows = [order[i : i + window] for i in range(0, len(order), window)]
        sizes = [sum(counts[s] for s in shards) for shards in self.windows]
        self.window_starts = [0, *accumulate(sizes)]
        # per window: cumulative sample counts of its shards, in window order
        self.shard_starts = [[0, *accumulate(counts[s] for s in shards)] for shards in self.windows]
        self.total = self.window_starts[-1]
        self._cached: tuple[int, np.ndarray] | None = None

    def _perm(self, w: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != w:
            size = self.window_starts[w + 1] - self.window_starts[w]
            self._cached = (w, window_permutation(size, self.seed, self.epoch, w, self.shuffle))
        return self._cached[1]

    def locate(self, position: int) -> tuple[int, int]:
        """Where global position `position` of this epoch lives.

        Returns:
            `(shard index into counts, sample index within that shard)`.
        """
        if not 0 <= position < self.total:
            raise IndexError(f"position {position} outside epoch of {self.total} samples")
        w = bisect.bisect_right(self.window_starts, position) - 1
        j = int(self._perm(w)[position - self.window_starts[w]])
        starts = self.shard_starts[w]
        k = bisect.bisect_right(starts, j) - 1
        return self.windows[w][k], j - starts[k]

    def window_of(self, position: int) -> list[int]:
        """Shard indices of the window holding `position` (the shards to keep open)."""
        return self.windows[bisect.bisect_right(self.window_starts, position) - 1]
