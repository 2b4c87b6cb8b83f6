"""Reader throughput against a plain sequential read of the same tar files.

For text shards and image shards (built-in `arith` and `image` capabilities), prints samples/s of
one epoch of `ShardReader.next_batch` (shuffled order, JSON parsed, images decoded to float
tensors) next to Python `tarfile` reading every member's bytes in file order, and their ratio.

    .venv/bin/python bench/bench_reader.py [--text N] [--images N] [--batch B]
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

from copd_mega.data.reader import ShardReader
from copd_mega.data.shards import write_shards
from copd_mega.data.synthetic import make_samples


def sequential_read(paths: list[Path]) -> int:
    """Read every member's bytes with `tarfile`, shard after shard.

    Returns:
        Number of samples (distinct keys) seen.
    """
    keys = set()
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isreg():
                    tar.extractfile(member).read()
                    keys.add((path, member.name.split(".", 1)[0]))
    return len(keys)


def reader_epoch(paths: list[Path], batch: int) -> int:
    """Read one epoch with `ShardReader` (DP size 1), in batches of `batch`.

    Returns:
        Number of samples read.
    """
    reader = ShardReader(paths, 0, 1, seed=0)
    total = reader.samples_per_epoch
    done = 0
    while done < total:
        done += len(reader.next_batch(min(batch, total - done)))
    reader.close()
    return done


def _rate(fn, *args) -> float:
    start = time.perf_counter()
    n = fn(*args)
    return n / (time.perf_counter() - start)


def main() -> None:
    """Build shards in a temporary folder, time both reads, print a table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--text", type=int, default=20000, help="text samples")
    parser.add_argument("--images", type=int, default=4000, help="image samples")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sets = {
            "text": write_shards(
                make_samples("arith", "train", 0, args.text), Path(tmp, "text"), "train", 1000
            ),
            "image": write_shards(
                make_samples("image", "train", 0, args.images), Path(tmp, "img"), "train", 500
            ),
        }
        print(f"{'shards':<8}{'samples':>9}{'reader/s':>12}{'tarfile/s':>12}{'ratio':>8}")
        for name, paths in sets.items():
            sequential_read(paths)  # warm the page cache for both
            plain = _rate(sequential_read, paths)
            ours = _rate(reader_epoch, paths, args.batch)
            n = args.text if name == "text" else args.images
            print(f"{name:<8}{n:>9}{ours:>12.0f}{plain:>12.0f}{ours / plain:>8.2f}")


if __name__ == "__main__":
    main()
