"""Whether a failed write ran out of space, and the one line that says so.

A full filesystem reaches us in several forms: ``OSError(ENOSPC)`` (or ``EDQUOT``, a quota),
torch's zip writer as ``RuntimeError: ... unexpected pos N vs M`` (a short write, the errno
lost), safetensors as ``SafetensorError: ... StorageFull``, and
``torch.distributed.checkpoint`` as a ``CheckpointException`` wrapping each rank's error. So
:func:`disk_full` looks through the exception chain and, when the text does not say, asks the
filesystem of the path that was being written whether it has room left.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = (
    "No space left on device",
    "Disk quota exceeded",
    "StorageFull",
    "QuotaExceeded",
    "no space left on the filesystem of",
)  # the last: disk_full_message's own words
_SHORT_WRITE = ("unexpected pos", "file write failed", "write failed")
LOW_SPACE_BYTES = 16 * 2**20  # "full" when a short write left less than this free


def _chain(error: BaseException):
    """``error``, its causes and contexts, and the per-rank errors a CheckpointException holds."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            todo.append(failure[0] if isinstance(failure, tuple) else failure)


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem of ``path`` (its nearest existing folder), or None."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full(error: BaseException, path: str | Path) -> bool:
    """True when ``error`` (raised while writing under ``path``) means no space was left."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(t in str(e) for t in _FULL_TEXT):
            return True
    short = any(t in str(e) for e in _chain(error) for t in _SHORT_WRITE)
    free = free_bytes(path)
    return short and free is not None and free < LOW_SPACE_BYTES


def disk_full_message(path: str | Path, what: str, kept: str, fix: str = "") -> str:
    """One line: the path, the free space left, what was kept, and the fix."""
    free = free_bytes(path)
    room = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
    mount = _mount_point(Path(path))
    fix = fix or "write to a larger filesystem"
    return (f"no space left on the filesystem of {path} ({mount}: {room}) while writing {what}; "
            f"{kept}. Free space on {mount} (or {fix}) and run the command again")  # fmt: skip


def _mount_point(p: Path) -> str:
    while not p.exists() and p != p.parent:
        p = p.parent
    p = p.resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)
