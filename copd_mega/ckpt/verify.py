"""Is a step checkpoint complete? Only if every file the loader reads is there and readable.

At save, after every rank's files are on disk, global rank 0 records a manifest in
``complete.json`` (written before ``latest``): every file of the step with its size, and a CRC32
of every file but the ``.distcp`` tensor data (those can be many GB; their sizes, and the byte
ranges torch's ``.metadata`` says they hold, are checked instead). :func:`incomplete_reason`
then finds a step unusable when a file is missing, of another size or checksum than at save,
or not readable as what it is: ``metadata.json`` as JSON, ``.metadata`` as torch's metadata,
every ``.distcp`` at least as long as the tensor bytes ``.metadata`` places in it, every ``.pt``
(``common.pt``, ``trainer_state/rank_*.pt``) as a zip whose entries match their CRCs. Steps
saved before manifests existed get the same readability checks, without the sizes.

The reason names the damaged file relative to the step folder, e.g.
``branch_a/common.pt is 598 bytes, 1196 when saved (cut short or damaged)``.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path

from copd_mega.ckpt.sharded_state import CONFIG_FILE

COMPLETE_FILE = "complete.json"
TRAINER_DIR = "trainer_state"
MANIFEST_KEY = "files"  # in complete.json: {relative path: [size, crc32 or None]}
_CHUNK = 8 * 2**20


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


def _size(path: Path) -> int:
    """Size from an open descriptor (on NFS an open revalidates what another host wrote)."""
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_size


def file_manifest(step_dir: Path, skip: tuple[str, ...] = (COMPLETE_FILE,)) -> dict[str, list]:
    """``{relative path: [size, crc32 or None]}`` of every file under ``step_dir`` (CRC of every
    file but ``*.distcp``). Called by global rank 0 once every rank's files are written."""
    out = {}
    for p in sorted(step_dir.rglob("*")):
        rel = p.relative_to(step_dir).as_posix()
        if p.is_file() and rel not in skip:
            out[rel] = [_size(p), None if p.suffix == ".distcp" else _crc32(p)]
    return out


def _manifest_mismatch(step_dir: Path, manifest: dict) -> str | None:
    for rel, (size, crc) in manifest.items():
        p = step_dir / rel
        if not p.is_file():
            return f"{rel} is missing"
        now = _size(p)
        if now != size:
            return f"{rel} is {now} bytes, {size} when saved (cut short or damaged)"
        if crc is not None and _crc32(p) != crc:
            return f"{rel} does not match the checksum recorded when it was saved (damaged)"
    return None


def _unreadable_pt(path: Path) -> str | None:
    """Why torch.load could not read ``path`` (a torch zip archive), or None."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"is not a readable torch file ({type(e).__name__}: cut short or damaged)"
    return f"is damaged (entry {bad} fails its checksum)" if bad else None


def _torch_dist_reason(path: Path) -> str | None:
    """What a torch_dist load of ``path`` needs and lacks or cannot read, or None."""
    for name in ("metadata.json", ".metadata", "common.pt", CONFIG_FILE):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        json.loads((path / "metadata.json").read_text())
    except (ValueError, UnicodeDecodeError):
        return "metadata.json is unreadable (not JSON)"
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as e:  # a torn or foreign .metadata
        return f".metadata is unreadable ({type(e).__name__})"
    need: dict[str, int] = {}
    for info in (storage or {}).values():
        end = int(info.offset) + int(info.length)
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    for rel, end in sorted(need.items()):
        if not (path / rel).is_file():
            return f"{rel} is missing"
        size = _size(path / rel)
        if size < end:
            return f"{rel} is {size} bytes but holds tensor data up to byte {end} (cut short)"
    why = _unreadable_pt(path / "common.pt")
    return f"common.pt {why}" if why else None


def incomplete_reason(step_dir: Path) -> str | None:
    """Why ``step_dir`` cannot be resumed from, or None when every file the loader reads is
    there and readable (see the module docstring): ``complete.json`` and its manifest; per branch
    megatron's ``metadata.json``, torch's ``.metadata``, the ``.distcp`` files it names,
    ``common.pt`` and ``config.yaml``; one ``trainer_state`` file per saved rank and its
    ``config.yaml``. Pure filesystem reads."""
    marker = step_dir / COMPLETE_FILE
    if not marker.is_file():
        return f"no {COMPLETE_FILE} (the save did not finish)"
    try:
        info = json.loads(marker.read_text())
        names, world = info["branches"], int(info.get("world_size", 0))
        manifest = dict(info.get(MANIFEST_KEY) or {})
    except (ValueError, KeyError, TypeError):
        return f"{COMPLETE_FILE} is unreadable"
    mismatch = _manifest_mismatch(step_dir, manifest)
    if mismatch:
        return mismatch
    for name in names:
        reason = _torch_dist_reason(step_dir / f"branch_{name}")
        if reason:
            return f"branch_{name}/{reason}"
    trainer = step_dir / TRAINER_DIR
    if not (trainer / CONFIG_FILE).is_file():
        return f"{TRAINER_DIR}/{CONFIG_FILE} is missing"
    for rank in range(world):
        rel = f"{TRAINER_DIR}/rank_{rank:05d}.pt"
        if not (step_dir / rel).is_file():
            return f"{rel} is missing"
        why = _unreadable_pt(step_dir / rel)
        if why:
            return f"{rel} {why}"
    return None
