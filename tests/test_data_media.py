"""frame_indices and video decoding: deterministic, and the decoded frames are the indexed ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from copd_mega.data.media import decode_image, decode_video, encode_mp4, encode_png, frame_indices
from copd_mega.data.reader import ShardReader
from copd_mega.data.shards import write_shards

LEVELS = [10 + 20 * t for t in range(12)]  # frame t is a flat grey of LEVELS[t]


def _grey_frames() -> list[np.ndarray]:
    return [np.full((16, 16, 3), level, np.uint8) for level in LEVELS]


def _levels(frames: torch.Tensor) -> list[int]:
    return [round(float(f.mean()) * 255) for f in frames]


def test_frame_indices_are_uniform_and_pure():
    assert frame_indices(12, 4) == [1, 4, 7, 10]
    assert frame_indices(8, 8) == list(range(8))
    assert frame_indices(3, None) == [0, 1, 2]
    assert frame_indices(2, 5) == [0, 0, 1, 1, 1]  # more frames asked than stored: repeats
    for total in range(1, 40):
        for n in range(1, 12):
            idx = frame_indices(total, n)
            assert len(idx) == n and idx == sorted(idx) and 0 <= idx[0] and idx[-1] < total
    with pytest.raises(ValueError, match="at least one frame"):
        frame_indices(0, 4)
    with pytest.raises(ValueError, match="num_frames"):
        frame_indices(5, 0)


def test_video_decodes_identically_twice_and_matches_frame_indices():
    mp4 = encode_mp4(_grey_frames())
    assert encode_mp4(_grey_frames()) == mp4
    first, second = decode_video(mp4, 4), decode_video(mp4, 4)
    assert first.shape == (4, 3, 16, 16) and first.dtype == torch.float32
    assert torch.equal(first, second)
    expected = [LEVELS[i] for i in frame_indices(len(LEVELS), 4)]
    assert all(abs(a - b) <= 3 for a, b in zip(_levels(first), expected, strict=True))
    assert decode_video(mp4, None, image_size=8).shape == (12, 3, 8, 8)


def test_image_decode_shape_range_and_resize():
    image = np.zeros((6, 10, 3), np.uint8)
    image[:, :5] = 255
    tensor = decode_image(encode_png(image))
    assert tensor.shape == (3, 6, 10) and tensor.dtype == torch.float32
    assert tensor.min() == 0.0 and tensor.max() == 1.0
    assert decode_image(encode_png(image), image_size=4).shape == (3, 4, 4)


def test_reader_gives_the_same_frames_for_mp4_and_frame_sequences(tmp_path):
    base = {
        "prompt": "Q: which way?\nA:",
        "answer": "up",
        "reward_type": "choice",
        "capability": "video",
    }
    samples = [
        {**base, "id": "mp4", "video": encode_mp4(_grey_frames())},
        {**base, "id": "seq", "frames": _grey_frames()},
    ]
    paths = write_shards(samples, tmp_path, "video", 10)
    expected = [LEVELS[i] for i in frame_indices(len(LEVELS), 5)]
    reads = [
        ShardReader(paths, 0, 1, seed=0, num_frames=5, shuffle=False).next_batch(2)
        for _ in range(2)
    ]
    for got in reads:
        for sample in got:
            assert sample["frames"].shape == (5, 3, 16, 16) and sample["images"] == []
            assert all(
                abs(a - b) <= 3 for a, b in zip(_levels(sample["frames"]), expected, strict=True)
            )
    assert all(torch.equal(a["frames"], b["frames"]) for a, b in zip(*reads, strict=True))


def test_mp4_bytes_depend_only_on_the_frames():
    """The encoder runs on one thread (colour conversion and x264), frame i has pts i and the
    file carries no version string or time, so a sample is the same bytes in any process."""
    import io
    import subprocess
    import sys
    from fractions import Fraction

    import av

    frames = [np.full((16, 16, 3), 40 * i, dtype=np.uint8) for i in range(6)]
    data = encode_mp4(frames, fps=3)
    settings = data[data.find(b"options: ") :].split(b"\x00")[0].decode()
    for fixed in ("threads=1 ", "lookahead_threads=1 ", "sliced_threads=0 "):
        assert fixed in settings, settings
    assert b"Lavf" not in data and b"Lavc" not in data  # bitexact: no library version strings
    with av.open(io.BytesIO(data)) as c:
        times = [f.pts * f.time_base for f in c.decode(video=0)]
    assert times == [Fraction(i, 3) for i in range(6)]
    # Another process, told to use many threads everywhere, writes the same bytes.
    code = ("import sys, numpy as np; from copd_mega.data.media import encode_mp4; "
            "f = [np.full((16, 16, 3), 40 * i, dtype=np.uint8) for i in range(6)]; "
            "sys.stdout.buffer.write(encode_mp4(f, fps=3))")  # fmt: skip
    env = {"OMP_NUM_THREADS": "8", "FFREPORT": "", "PATH": "/usr/bin:/bin"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, check=True)
    assert other.stdout == data


def test_decoded_mp4_frames_are_the_frames_yuv_exactly():
    """Lossless H.264: decoding gives back the one-thread swscale YUV 4:2:0 image of every frame
    bit for bit, so training data does not depend on the encoder's (unreproducible) choices."""
    import io
    import random

    import av

    rng = random.Random(0)
    frames = []
    for _ in range(8):
        frame = np.zeros((32, 32, 3), dtype=np.uint8)
        x, y = rng.randrange(16), rng.randrange(16)
        frame[y : y + 16, x : x + 16] = [rng.randrange(256) for _ in range(3)]
        frames.append(frame)
    expect = [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p", threads=1)
              .to_ndarray() for f in frames]  # fmt: skip
    with av.open(io.BytesIO(encode_mp4(frames, fps=2))) as c:
        got = [f.to_ndarray() for f in c.decode(video=0)]
    assert len(got) == len(expect)
    for a, b in zip(got, expect, strict=True):
        assert np.array_equal(a, b)
