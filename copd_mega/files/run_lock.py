"""One job per run directory: an exclusive ``fcntl.flock`` on ``DIR/.copd.lock``.

Every command that writes a run directory calls :func:`lock_dir` before it writes anything
(``copd train``, ``pretrain``, ``study``); ``copd data pack``/``synth`` call
:func:`lock_enclosing`, which takes the lock of every run directory the output lies in. The lock belongs to the open
file, which stays open for the life of the process, so the kernel releases it when the process
ends in any way (exit, exception, SIGKILL, a node reboot): a killed job never leaves a stale
lock, and there is nothing to clean up (the file stays, the lock does not). The file is opened ``O_CLOEXEC``, so programs the job
starts (reward workers are spawned, study runs are subprocesses) do not inherit it.

A second job finds the lock taken and stops at once with one line naming the holder, read from
the lock file: host, pid, start time and command line (the holder writes them after it got the
lock). Locking the same directory again in the same process is a no-op, so a job may call
``copd data synth`` into its own run directory.

Shared filesystems: ``flock`` is seen by every process on the host. Across hosts it holds where
the filesystem passes locks to its server (NFS v4, and NFS v3 with lockd: Linux turns ``flock``
into a byte-range lock there; Lustre mounted with ``-o flock``; GPFS). A filesystem without
locks (Lustre ``localflock``/``noflock``, some FUSE mounts) answers with an error or per host
only: the job then runs with a one-line warning that two jobs on different hosts are not kept
apart.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

LOCK_FILE = ".copd.lock"
_HELD: dict[str, int] = {}  # lock file (resolved) -> open descriptor, for the process's life
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


class RunDirError(RuntimeError):
    """A run directory this job cannot use; the message names it and the fix."""


class RunDirBusy(RunDirError):
    """Another live job holds the run directory's lock; the message names that job."""


def holder_text(info: dict) -> str:
    """``pid 123 on host h, started 2026-01-01 10:00:00 UTC (copd train ...)``."""
    if not info:
        return "holder unknown: it has not written its name yet"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("started", 0)))
    text = f"pid {info.get('pid')} on host {info.get('host')}, started {started}"
    return text + (f" ({info['command']})" if info.get("command") else "")


def _read_holder(fd: int) -> dict:
    """What the holder wrote into the lock file (it may not have written it yet: retry)."""
    for _ in range(20):
        raw = os.pread(fd, 4096, 0)
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            time.sleep(0.05)  # caught between the holder's truncate and write
    return {}


def _directory(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise RunDirError(f"{path} is not a directory ({e.strerror}); set run_dir (or --out) to "
                          "a folder, or move the file away") from e  # fmt: skip
    return path


def _take(lock: Path, what: Path) -> None:
    """flock ``lock`` for this process or raise RunDirBusy naming its holder."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = holder_text(_read_holder(fd))
        os.close(fd)
        raise RunDirBusy(
            f"{what} is in use by another job: {holder}. Wait for that job to end (its lock "
            f"{lock} is released when it exits), or give this job another run directory"
        ) from None
    except OSError as e:
        os.close(fd)
        if e.errno not in _NO_FLOCK:
            raise
        warnings.warn(f"{lock}: this filesystem has no file locks ({e.strerror}); two jobs on "
                      f"{what} are not kept apart", stacklevel=3)  # fmt: skip
        return
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "command": " ".join(["copd", *sys.argv[1:]])[:300]}  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD[str(lock)] = fd


def lock_dir(path: str | Path) -> Path:
    """Hold ``path``'s lock (creating the folder) until this process exits; returns ``path``.
    Raises RunDirBusy naming the holder, RunDirError when ``path`` is a file."""
    path = _directory(Path(path))
    lock = (path / LOCK_FILE).resolve()
    if str(lock) not in _HELD:
        _take(lock, path)
    return path


def lock_enclosing(path: str | Path) -> None:
    """Hold the lock of ``path`` and of every folder above it that has a lock file (a run
    directory), up to the first this process holds; creates nothing. ``copd data pack --out
    RUN/data`` (or ``--out RUN``) so stops while a job holds RUN, and holds RUN while it packs."""
    p = Path(path).resolve()
    for folder in [p, *p.parents]:
        lock = folder / LOCK_FILE
        if str(lock) in _HELD:
            return
        if lock.is_file():
            _take(lock, folder)


def held(path: str | Path) -> bool:
    """True when this process holds ``path``'s lock."""
    return str((Path(path) / LOCK_FILE).resolve()) in _HELD
