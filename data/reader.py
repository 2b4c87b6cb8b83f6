"""Per-branch reader over webdataset shards: seeded order, DP split, exact resume, bad-input policy.

Order (see `order.py`): per epoch, shards are shuffled, samples are shuffled within windows of
`shuffle_window` shards, and DP rank r reads a contiguous span of the epoch's global order. All
of it is a pure function of `(seed, epoch)`, so the cursor is just `(epoch, position)`: the
number of sample slots this rank has consumed in its span, bad slots included. Resuming from a
saved cursor yields exactly what the uninterrupted stream would have. When a rank's span is used
up, the cursor moves to position 0 of the next epoch at once, so a batch never comes back short
and `state_dict` never shows an exhausted epoch.

How it departs from a webdataset pipeline: webdataset 1.0.2 streams shards and has no resumable
state, its `split_by_node` reads RANK/WORLD_SIZE from the environment (wrong when each branch is
its own DP group), and its tar iterator stops silently at a corrupt header. Instead the reader
indexes tar headers (`tarindex.py`, webdataset's key rule) and seeks to each sample's members,
so memory holds tar-header indices of at most `index_cache_shards` shards and the permutation
of one window of shards, never the shard data.
There are no dataloader workers; `dp_rank`/`dp_size` are passed in explicitly.

Bad input: a sample whose tar members are damaged, whose `.json` is missing or invalid, or
whose image or video does not decode is skipped, logged (shard, key, byte offset, reason) and
counted in `stats`. `max_consecutive_bad` bad slots in a row raise `DataError`.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from copd_mega.data.order import EpochPlan, rank_span
from copd_mega.data.shards import BadSample, decode_sample
from copd_mega.data.tarindex import ShardIndex, index_shard, read_member

logger = logging.getLogger(__name__)
BAD_REASONS: tuple[str, ...] = ("tar", "json", "image", "video")


class DataError(RuntimeError):
    """Too many bad samples in a row: the data, not one sample, is broken."""


class ShardReader:
    """Reads model-ready samples for one DP rank of one branch.

    Args:
        paths: shard files (sorted here, so the order of the list does not matter).
        dp_rank, dp_size: this rank's index and the branch's data-parallel size.
        seed: base seed of the order (>= 0).
        num_frames: frames sampled per video (None: all frames).
        image_size: resize images and frames to this square size (None: keep).
        shuffle: False reads shards and samples in file order (evaluation).
        shuffle_window: shards whose samples are shuffled together.
        max_consecutive_bad: bad samples in a row that raise `DataError`.
        index_cache_shards: shard indices (tar headers) kept in memory; others are re-read.
        name: prefix of log lines and errors, e.g. "math dp1" (default "dp<rank>").
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        dp_rank: int,
        dp_size: int,
        seed: int,
        num_frames: int | None = None,
        image_size: int | None = None,
        shuffle: bool = True,
        shuffle_window: int = 4,
        max_consecutive_bad: int = 16,
        index_cache_shards: int = 64,
        name: str = "",
    ):
        if seed < 0:
            raise ValueError(f"data seed must be >= 0, got {seed}")
        if max_consecutive_bad < 1:
            raise ValueError(f"max_consecutive_bad must be >= 1, got {max_consecutive_bad}")
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames must be >= 1 or None, got {num_frames}")
        self.paths = sorted(os.fspath(p) for p in paths)
        if not self.paths:
            raise ValueError(
                "no shard paths given; create shards with `copd data synth` or `copd data pack`"
            )
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} shard file(s) not found, first: {missing[0]}; check the branch's data "
                "paths in the config, or create the shards with `copd data synth` / `copd data pack`"
            )
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.num_frames, self.image_size = num_frames, image_size
        self.shuffle, self.shuffle_window = shuffle, shuffle_window
        self.max_consecutive_bad, self.name = max_consecutive_bad, name or f"dp{dp_rank}"
        self.index_cache_shards = max(index_cache_shards, shuffle_window + 1)
        self._indices: OrderedDict[int, ShardIndex] = OrderedDict()
        self._files: OrderedDict[int, BinaryIO] = OrderedDict()
        self.counts: list[int] = []  # filled below; _index checks against it once set
        self.counts = [len(self._index(i).samples) for i in range(len(self.paths))]
        self.num_samples = sum(self.counts)
        if self.num_samples < dp_size:
            raise ValueError(
                f"{self.num_samples} samples in {len(self.paths)} shard(s) cannot give each of "
                f"dp_size={dp_size} ranks a sample; add data or lower the branch's DP size"
            )
        self._start, self._end = rank_span(self.num_samples, dp_rank, dp_size)
        self.epoch, self.position, self._consecutive_bad = 0, 0, 0
        self.stats: dict[str, int] = {
            "samples": 0,
            "bad": 0,
            **{f"bad_{r}": 0 for r in BAD_REASONS},
        }
        self._plan: EpochPlan | None = None

    @property
    def samples_per_epoch(self) -> int:
        """Sample slots in this rank's span of one epoch (bad ones included)."""
        return self._end - self._start

    def state_dict(self) -> dict:
        """The cursor, to save with a checkpoint.

        Returns:
            `{"epoch", "position", "seed", "dp_rank", "dp_size", "num_samples",
            "consecutive_bad", "stats"}` (ints, stats a dict of ints).
        """
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_samples": self.num_samples,
            "consecutive_bad": self._consecutive_bad,
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from a `state_dict`; raises ValueError when it was saved for other data or layout."""
        for key in ("seed", "dp_rank", "dp_size", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"data cursor was saved with {key}={state[key]} but this reader has "
                    f"{key}={getattr(self, key)}; resume with the same shards, seed and DP layout, "
                    "or start the data stream fresh (drop the saved data cursor)"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.samples_per_epoch:
            raise ValueError(
                f"data cursor epoch={epoch} position={position} is outside this rank's "
                f"{self.samples_per_epoch} samples per epoch"
            )
        self.epoch, self.position = epoch, position
        self._consecutive_bad = int(state.get("consecutive_bad", 0))
        self.stats.update(state.get("stats", {}))

    def _plan_for_epoch(self) -> EpochPlan:
        if self._plan is None or self._plan.epoch != self.epoch:
            self._plan = EpochPlan(
                self.counts, self.seed, self.epoch, self.shuffle_window, self.shuffle
            )
        return self._plan

    def _index(self, shard: int) -> ShardIndex:
        """Index of `shard`, from an LRU cache of `index_cache_shards` indices."""
        if shard in self._indices:
            self._indices.move_to_end(shard)
            return self._indices[shard]
        index = index_shard(self.paths[shard])
        for note in index.problems:
            logger.warning("[%s] shard %s: %s", self.name, index.path, note)
        if not index.samples:
            logger.warning(
                "[%s] shard %s holds no samples (empty or not a tar file)", self.name, index.path
            )
        if self.counts and len(index.samples) != self.counts[shard]:
            raise DataError(
                f"shard {index.path} changed on disk: it had {self.counts[shard]} samples when the "
                f"reader was built and has {len(index.samples)} now; shards must not change during a run"
            )
        self._indices[shard] = index
        while len(self._indices) > self.index_cache_shards:
            self._indices.popitem(last=False)
        return index

    def _file(self, shard: int, keep: Sequence[int]) -> BinaryIO:
        """Open file of `shard`; files of shards outside the current window `keep` are closed."""
        if shard not in self._files:
            for old in [s for s in self._files if s not in keep]:
                self._files.pop(old).close()
            self._files[shard] = open(self.paths[shard], "rb")
        return self._files[shard]

    def _read_slot(self) -> tuple[dict | None, str]:
        """Decode the sample at the cursor; returns (sample or None if bad, location for errors)."""
        plan = self._plan_for_epoch()
        global_position = self._start + self.position
        shard, local = plan.locate(global_position)
        index, f = self._index(shard), self._file(shard, plan.window_of(global_position))
        entry = index.samples[local]
        where = f"shard {index.path}, key {entry.key}, byte offset {entry.offset}"
        try:
            if entry.damage is not None:
                raise BadSample("tar", entry.damage)
            members = {}
            for suffix, (offset, size) in entry.members.items():
                try:
                    members[suffix] = read_member(f, offset, size)
                except (EOFError, OSError) as exn:
                    raise BadSample("tar", f"member .{suffix}: {exn}") from exn
            sample = decode_sample(members, self.num_frames, self.image_size)
        except BadSample as exn:
            self.stats["bad"] += 1
            self.stats[f"bad_{exn.reason}"] += 1
            logger.warning(
                "[%s] skipping bad sample (%s): %s: %s", self.name, exn.reason, where, exn
            )
            return None, f"{where}: {exn}"
        sample["key"], sample["shard"] = entry.key, index.path
        return sample, where

    def _advance(self) -> None:
        self.position += 1
        if self.position == self.samples_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0

    def next_batch(self, n: int) -> list[dict]:
        """The next `n` good samples of this rank's stream, crossing epochs as needed.

        Returns:
            `n` dicts with the JSON fields (`id`, `prompt`, `answer`, `reward_type`,
            `capability`, extras), `images` (list of float32 [3, H, W] in [0, 1]), `frames`
            (float32 [N, 3, H, W] in [0, 1], or None without video), `key` and `shard`.
            Raises `DataError` after `max_consecutive_bad` bad samples in a row.
        """
        batch: list[dict] = []
        while len(batch) < n:
            sample, where = self._read_slot()
            self._advance()
            if sample is None:
                self._consecutive_bad += 1
                if self._consecutive_bad >= self.max_consecutive_bad:
                    raise DataError(
                        f"[{self.name}] {self._consecutive_bad} bad samples in a row, the last at "
                        f"{where}; repair or re-pack that shard, or drop it from the branch's data "
                        "paths (max_consecutive_bad sets the limit)"
                    )
                continue
            self._consecutive_bad = 0
            self.stats["samples"] += 1
            batch.append(sample)
        return batch

    def __iter__(self) -> Iterator[dict]:
        """Endless stream of samples (`next_batch(1)` at a time)."""
        while True:
            yield self.next_batch(1)[0]

    def close(self) -> None:
        """Close open shard files; the reader can still be used (files reopen on demand)."""
        while self._files:
            self._files.popitem()[1].close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
