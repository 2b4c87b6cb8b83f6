"""The shard format: webdataset tar files, one sample per key.

Members of sample `<key>` (the key has no dot; members are written in sorted suffix order):
- `<key>.json`: `{"id", "prompt", "answer", "reward_type", "capability"}` (strings;
  reward_type is one of `REWARD_TYPES`) plus any extra JSON fields, passed through to readers.
- `<key>.0.png`, `<key>.1.png`, ...: images in order (`.jpg`/`.jpeg` also accepted on read).
- `<key>.mp4`: a video, or `<key>.frames.0.png`, `<key>.frames.1.png`, ...: a video stored as
  frames. Readers sample frames of either form with `media.frame_indices`.

Shards are plain (uncompressed) tar so readers can seek to any member. They are written into a
temporary folder and moved into place only when every sample encoded, so a failed or crashed
writer leaves no half shard behind and never removes the shards it was asked to replace.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from copd_mega.data.media import ImageLike, decode_image, decode_video, encode_png, frame_indices

REQUIRED_FIELDS: tuple[str, ...] = ("id", "prompt", "answer", "reward_type", "capability")
REWARD_TYPES: tuple[str, ...] = ("exact", "math", "choice", "rg")  # rg: data/reasoning_gym.py
MEDIA_FIELDS: tuple[str, ...] = ("images", "video", "frames")
IMAGE_MEMBER = re.compile(r"^(\d+)\.(png|jpe?g)$")
FRAME_MEMBER = re.compile(r"^frames\.(\d+)\.(png|jpe?g)$")


class BadSample(Exception):
    """A sample that cannot be used. `reason` is one of "tar", "json", "image", "video"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_record(record: dict, where: str) -> None:
    """Raise ValueError (prefixed with `where`) unless `record` has the required string fields."""
    for field in REQUIRED_FIELDS:
        if not isinstance(record.get(field), str):
            raise ValueError(
                f"{where}: field {field!r} must be a string, got {record.get(field)!r}"
            )
    if record["reward_type"] not in REWARD_TYPES:
        raise ValueError(
            f"{where}: reward_type {record['reward_type']!r} is not one of {list(REWARD_TYPES)}"
        )
    if record["reward_type"] == "rg" and not isinstance(record.get("rg_entry"), str):
        raise ValueError(f"{where}: reward_type 'rg' needs the task's entry as a JSON string "
                         "in 'rg_entry' (copd data synth --capability rg:<task> writes it)")  # fmt: skip


def _image_member(image: ImageLike | bytes, name: str) -> tuple[str, bytes]:
    """Encoded image bytes pass through (PNG or JPEG); arrays and PIL images become PNG."""
    if isinstance(image, bytes | bytearray):
        if image[:8] == b"\x89PNG\r\n\x1a\n":
            return f"{name}.png", bytes(image)
        if image[:2] == b"\xff\xd8":
            return f"{name}.jpg", bytes(image)
        raise ValueError(
            f"image bytes for {name} are neither PNG nor JPEG; pass a PIL image instead"
        )
    return f"{name}.png", encode_png(image)


def encode_sample(sample: dict) -> dict[str, bytes]:
    """Turn a sample dict into tar members (suffix -> bytes), without the key.

    `sample` holds the `REQUIRED_FIELDS`, optional extra JSON fields, and optional media:
    `images` (list of PIL images, uint8 arrays [H, W(, C)] or PNG/JPEG bytes), `video` (mp4
    bytes) or `frames` (list of images, stored as a frame sequence).

    Returns:
        `{"json": ..., "0.png": ..., "mp4": ...}` style mapping.
    """
    check_record(sample, f"sample {sample.get('id')!r}")
    record = {k: v for k, v in sample.items() if k not in MEDIA_FIELDS}
    members = {"json": json.dumps(record, ensure_ascii=False, sort_keys=True).encode()}
    for i, image in enumerate(sample.get("images") or []):
        suffix, data = _image_member(image, str(i))
        members[suffix] = data
    if sample.get("video") is not None and sample.get("frames") is not None:
        raise ValueError(f"sample {sample['id']!r} has both video and frames; keep one")
    if sample.get("video") is not None:
        if not isinstance(sample["video"], bytes | bytearray):
            raise ValueError(f"sample {sample['id']!r}: video must be mp4 bytes")
        members["mp4"] = bytes(sample["video"])
    for i, frame in enumerate(sample.get("frames") or []):
        suffix, data = _image_member(frame, f"frames.{i}")
        members[suffix] = data
    return members


def decode_sample(
    members: dict[str, bytes], num_frames: int | None, image_size: int | None
) -> dict:
    """Decode one sample's members (suffix -> bytes) into model-ready values.

    Returns:
        The JSON fields, plus `"images"`: list of float32 tensors [3, H, W] in [0, 1] (empty
        when the sample has none) and `"frames"`: float32 tensor [N, 3, H, W] in [0, 1] or None.
        N = `num_frames` (all frames when None); H = W = `image_size` when given. Raises
        `BadSample` naming the member at fault.
    """
    if "json" not in members:
        raise BadSample("json", f"no .json member (has {sorted(members)})")
    try:
        record = json.loads(members["json"])
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        check_record(record, ".json")
    except ValueError as exn:
        raise BadSample("json", f"bad .json member: {exn}") from exn
    images, frame_members = [], []
    for suffix in members:
        if match := IMAGE_MEMBER.match(suffix):
            images.append((int(match.group(1)), suffix))
        elif match := FRAME_MEMBER.match(suffix):
            frame_members.append((int(match.group(1)), suffix))
    record["images"] = []
    for _, suffix in sorted(images):
        try:
            record["images"].append(decode_image(members[suffix], image_size))
        except Exception as exn:
            raise BadSample("image", f"undecodable image .{suffix}: {exn}") from exn
    record["frames"] = None
    if "mp4" in members:
        try:
            record["frames"] = decode_video(members["mp4"], num_frames, image_size)
        except Exception as exn:
            raise BadSample("video", f"undecodable video .mp4: {exn}") from exn
    elif frame_members:
        ordered = [suffix for _, suffix in sorted(frame_members)]
        try:
            picks = frame_indices(len(ordered), num_frames)
            record["frames"] = torch.stack(
                [decode_image(members[ordered[i]], image_size) for i in picks]
            )
        except Exception as exn:
            raise BadSample("video", f"undecodable video frames: {exn}") from exn
    return record


def _existing_shards(out_dir: Path, prefix: str) -> list[Path]:
    return sorted(out_dir.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))


def write_shards(
    samples: Iterable[dict],
    out_dir: str | os.PathLike,
    prefix: str,
    samples_per_shard: int,
    overwrite: bool = False,
) -> list[Path]:
    """Write samples (see `encode_sample`) to `out_dir/<prefix>-000000.tar`, ... .

    `samples` is consumed lazily, so memory holds one sample at a time. All or nothing: shards
    are written into a temporary folder beside them (`out_dir/.<prefix>.partial`) and moved
    into place only after every sample encoded; on any error that folder is removed and the
    shards already in `out_dir` (replaced with `overwrite`) are untouched.

    Returns:
        The shard paths, in order. Raises ValueError when no sample was given, or when shards
        with this prefix already exist and `overwrite` is False.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"shard prefix {prefix!r} may hold only letters, digits, '_' and '-'")
    out_dir = Path(out_dir)
    made = _missing_folders(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _write_shards_into(samples, out_dir, prefix, samples_per_shard, overwrite)
    except BaseException:
        for folder in made:  # the folders this call created, if still empty: no empty --out
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    for p in (path, *path.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    return missing


def _write_shards_into(
    samples: Iterable[dict], out_dir: Path, prefix: str, samples_per_shard: int, overwrite: bool
) -> list[Path]:
    stale = _existing_shards(out_dir, prefix)
    if stale and not overwrite:
        raise ValueError(
            f"{out_dir} already holds {len(stale)} {prefix}-*.tar shards; use an empty output "
            "folder or pass overwrite=True (--overwrite) to replace them"
        )
    staging = out_dir / f".{prefix}.partial"
    if staging.exists():
        shutil.rmtree(staging)  # an earlier writer that died
    staging.mkdir()
    try:
        written = _write_into(samples, staging, prefix, samples_per_shard)
        if not written:
            raise ValueError(f"no samples to write for {out_dir}/{prefix}-*.tar")
        for path in written:  # each swap is atomic; the old set is gone only after the last
            os.replace(path, out_dir / path.name)
        for path in stale[len(written) :]:
            path.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out_dir / path.name for path in written]


def _write_into(samples: Iterable[dict], folder: Path, prefix: str, per_shard: int) -> list[Path]:
    """Encode ``samples`` into ``folder/<prefix>-NNNNNN.tar`` files; returns them in order."""
    written: list[Path] = []
    writer, count = None, 0
    try:
        for index, sample in enumerate(samples):
            if writer is None:
                written.append(folder / f"{prefix}-{len(written):06d}.tar")
                writer = wds.TarWriter(
                    str(written[-1]), encoder=False, mtime=0, user="copd", group="copd"
                )
            writer.write({"__key__": f"{index:08d}", **encode_sample(sample)})
            count += 1
            if count == per_shard:
                writer.close()
                writer, count = None, 0
    finally:
        if writer is not None:
            writer.close()
    return written


def _media_file(media_dir: Path, name: object, where: str, field: str) -> Path:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: {field} entries must be file names, got {name!r}")
    path = media_dir / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{where}: {field} file {path} not found (media files are looked up in --media {media_dir})"
        )
    return path


def _read_media_file(path: Path, where: str, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exn:
        raise ValueError(f"{where}: {field} file {path} cannot be read ({exn.strerror or exn}); "
                         "check its permissions, or fix the name in the JSONL") from exn  # fmt: skip


def _read_image_file(path: Path, where: str) -> bytes:
    """PNG/JPEG bytes pass through after a decode check; other formats are re-encoded as PNG."""
    data = _read_media_file(path, where, "image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt = img.format
            if fmt not in ("PNG", "JPEG"):
                data = encode_png(img.convert("RGB"))
    except Exception as exn:
        why = "not an image format Pillow reads" if isinstance(exn, UnidentifiedImageError) else exn
        raise ValueError(f"{where}: image file {path} cannot be decoded ({why}); replace it with "
                         "a PNG or JPEG image") from exn  # fmt: skip
    return data


def _record_from_line(line: str, lineno: int, jsonl_path: Path, media_dir: Path) -> dict:
    where = f"{jsonl_path}:{lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exn:
        raise ValueError(f"{where}: invalid JSON: {exn}") from exn
    if not isinstance(record, dict):
        raise ValueError(f"{where}: each line must be a JSON object")
    record.setdefault("id", f"{jsonl_path.stem}-{lineno}")
    record.setdefault("capability", jsonl_path.stem)
    check_record(record, where)
    images = record.pop("images", None)
    if images is not None:
        names = [images] if isinstance(images, str) else images
        if not isinstance(names, list):
            raise ValueError(f"{where}: images must be a file name or a list of file names")
        record["images"] = [
            _read_image_file(_media_file(media_dir, n, where, "images"), where) for n in names
        ]
    video = record.pop("video", None)
    if isinstance(video, list):
        record["frames"] = [
            _read_image_file(_media_file(media_dir, n, where, "video"), where) for n in video
        ]
    elif video is not None:
        path = _media_file(media_dir, video, where, "video")
        if path.suffix.lower() != ".mp4":
            raise ValueError(
                f"{where}: video {path} is not .mp4; convert it (ffmpeg -i {path.name} out.mp4)"
            )
        data = _read_media_file(path, where, "video")
        try:
            decode_video(data, 1)
        except Exception as exn:
            raise ValueError(f"{where}: video file {path} cannot be decoded ({exn}); replace it "
                             "with an H.264 .mp4") from exn  # fmt: skip
        record["video"] = data
    return record


def pack_jsonl(
    jsonl_path: str | os.PathLike,
    media_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    samples_per_shard: int,
    prefix: str = "train",
    overwrite: bool = False,
) -> list[Path]:
    """Pack a JSONL file plus a media folder into shards.

    Each non-blank line is a JSON object with `prompt`, `answer`, `reward_type` (required),
    `id` (default `<stem>-<line>`), `capability` (default the JSONL file stem), optional extra
    fields, and optional media named relative to `media_dir`: `images` (a file name or a list),
    `video` (an .mp4 file name, or a list of frame image file names). Media are checked to
    decode while packing.

    Returns:
        The shard paths (see `write_shards`). Errors name the JSONL line and the missing or
        undecodable file; nothing is left written after an error.
    """
    jsonl_path, media_dir = Path(jsonl_path), Path(media_dir)
    if not jsonl_path.is_file():
        raise FileNotFoundError(f"JSONL file {jsonl_path} not found")
    if not media_dir.is_dir():
        raise FileNotFoundError(f"media folder {media_dir} not found (pass an existing --media)")

    def records() -> Iterable[dict]:
        with jsonl_path.open(encoding="utf-8") as lines:
            for lineno, line in enumerate(lines, start=1):
                if line.strip():
                    yield _record_from_line(line, lineno, jsonl_path, media_dir)

    return write_shards(records(), out_dir, prefix, samples_per_shard, overwrite=overwrite)
