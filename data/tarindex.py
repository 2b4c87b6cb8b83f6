"""Index of one shard: where each sample's members lie, found by reading tar headers only.

Why not webdataset's `tar_file_iterator`: it streams a tar with `tarfile.open(mode="r|*")`, which
ends the iteration without an error at the first corrupt member header, silently dropping the
rest of the shard. Here the headers are read with `ignore_zeros=True`, which skips unreadable
blocks and resynchronises on the next valid header, and every byte range that no header accounts
for is reported. Samples are grouped by webdataset's own key rule (`base_plus_ext`: the key is
the member name up to its first dot), so keys mean the same as in any webdataset pipeline.

A lost header may have belonged to the sample before the unreadable range or to the one after
it; both are marked damaged, so a sample that silently lost an image is never used, and the
range itself becomes one damaged slot (it may have held whole samples). One corrupt header thus
costs up to three slots, all counted as bad by the reader.
"""

from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

from webdataset.tariterators import base_plus_ext

logger = logging.getLogger(__name__)
BLOCK = 512
TAIL_CHECK_BYTES = 1 << 20


@dataclass
class SampleEntry:
    """One sample of a shard.

    key: the webdataset key. offset: byte offset of its first member header.
    members: lower-case suffix (e.g. "json", "0.png") -> (data offset, size) in bytes.
    damage: why the sample cannot be trusted, or None.
    """

    key: str
    offset: int
    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    damage: str | None = None


@dataclass
class ShardIndex:
    """All samples of one shard in file order, and the structural problems found."""

    path: str
    samples: list[SampleEntry]
    problems: list[str]


def _check_plain_tar(path: str) -> None:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00":
        raise ValueError(
            f"shard {path} is compressed; the reader seeks inside shards and needs plain .tar "
            "files: decompress it or re-pack with `copd data pack`"
        )


def index_shard(path: str | os.PathLike) -> ShardIndex:
    """Read the tar headers of `path` and group members into samples.

    Returns:
        A `ShardIndex`. Raises ValueError for a compressed shard; a shard that is empty or not a
        tar at all gives zero samples and a problem entry.
    """
    path = os.fspath(path)
    _check_plain_tar(path)
    samples: list[SampleEntry] = []
    problems: list[str] = []
    current: SampleEntry | None = None
    expected = 0  # where the next header should start if nothing was lost
    damage_next: str | None = None
    try:
        with tarfile.open(path, "r:", ignore_zeros=True) as tar:
            for info in tar:
                if info.offset != expected:
                    note = f"bytes {expected}..{info.offset} unreadable (corrupt tar header)"
                    problems.append(note)
                    if current is not None:
                        current.damage = current.damage or note
                    # the lost range may have held whole samples: keep one slot for it, so the
                    # loss is counted when the reader reaches it
                    samples.append(SampleEntry(f"<unreadable@{expected}>", expected, damage=note))
                    current, damage_next = None, note
                expected = info.offset_data + -(-info.size // BLOCK) * BLOCK
                if not info.isreg():
                    continue
                key, suffix = base_plus_ext(info.name)
                if key is None:
                    logger.debug("%s: ignoring member %s (no key.suffix name)", path, info.name)
                    continue
                suffix = suffix.lower()
                if current is None or key != current.key:
                    current = SampleEntry(key, info.offset)
                    samples.append(current)
                if damage_next is not None:
                    current.damage, damage_next = current.damage or damage_next, None
                if suffix in current.members:
                    current.damage = current.damage or f"duplicate member {info.name}"
                current.members[suffix] = (info.offset_data, info.size)
    except (tarfile.TarError, EOFError, OSError) as exn:
        note = f"tar stream ends early after byte {expected}: {exn}"
        problems.append(note)
        if current is not None:
            current.damage = current.damage or note
    else:
        _check_tail(path, expected, problems, current)
    return ShardIndex(path, samples, problems)


def _check_tail(path: str, expected: int, problems: list[str], last: SampleEntry | None) -> None:
    """Bytes after the last member must be the zero end-of-archive blocks; anything else is a
    lost (e.g. truncated) header, which may have belonged to the last sample."""
    size = os.path.getsize(path)
    if size <= expected:
        return
    with open(path, "rb") as f:
        f.seek(expected)
        tail = f.read(min(size - expected, TAIL_CHECK_BYTES))
    if tail.strip(b"\x00"):
        note = f"bytes {expected}..{size} after the last member are not a valid tar header"
        problems.append(note)
        if last is not None:
            last.damage = last.damage or note


def read_member(f: BinaryIO, offset: int, size: int) -> bytes:
    """Read `size` bytes at `offset` from an open shard.

    Returns:
        The member bytes. Raises EOFError when the shard ends first (truncated shard).
    """
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise EOFError(f"member at byte {offset} needs {size} bytes, shard has {len(data)}")
    return data
