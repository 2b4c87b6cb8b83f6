"""Image and video codecs shared by the shard writer, the reader and rollout.

Every consumer that turns a stored video into model frames goes through `frame_indices` and
`decode_video`, so rollout and training see the same frames for the same sample.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ImageLike = Image.Image | np.ndarray


def frame_indices(num_frames_in_video: int, n: int | None) -> list[int]:
    """Pick `n` frames spread uniformly over a video of `num_frames_in_video` frames.

    Frame i of the result is the middle frame of the i-th of `n` equal segments:
    `floor((i + 0.5) * num_frames_in_video / n)`. With `n > num_frames_in_video` frames repeat,
    so a batch always gets `n` frames per video. `n=None` keeps every frame.

    Returns:
        A list of `n` non-decreasing ints in `[0, num_frames_in_video)`.
    """
    if num_frames_in_video < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames_in_video}")
    if n is None:
        return list(range(num_frames_in_video))
    if n < 1:
        raise ValueError(f"num_frames must be >= 1 or None (all frames), got {n}")
    return [((2 * i + 1) * num_frames_in_video) // (2 * n) for i in range(n)]


def to_pil(image: ImageLike) -> Image.Image:
    """Convert a PIL image or a uint8 array of shape [H, W] or [H, W, 3|4] to a PIL image.

    Returns:
        A PIL image (mode L, RGB or RGBA following the input).
    """
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if (
        arr.dtype != np.uint8
        or arr.ndim not in (2, 3)
        or (arr.ndim == 3 and arr.shape[2] not in (3, 4))
    ):
        raise ValueError(
            f"images must be PIL images or uint8 arrays [H, W] or [H, W, 3|4], got dtype={arr.dtype} "
            f"shape={arr.shape}"
        )
    return Image.fromarray(arr)


def encode_png(image: ImageLike) -> bytes:
    """Encode an image as PNG.

    Returns:
        The PNG file bytes.
    """
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def pil_to_tensor(image: Image.Image, image_size: int | None) -> torch.Tensor:
    """Convert to RGB, resize to `image_size` x `image_size` (bilinear) when given.

    Returns:
        float32 tensor [3, H, W] with values in [0, 1].
    """
    image = image.convert("RGB")
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float().div_(255.0)


def decode_image(data: bytes, image_size: int | None = None) -> torch.Tensor:
    """Decode PNG/JPEG bytes (any format Pillow reads).

    Returns:
        float32 tensor [3, H, W] in [0, 1]; H = W = `image_size` when given. Raises ValueError
        saying why on undecodable bytes (the caller names the file or member).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return pil_to_tensor(img, image_size)
    except UnidentifiedImageError as exn:
        raise ValueError(f"not an image format Pillow reads ({len(data)} bytes)") from exn
    except (OSError, SyntaxError) as exn:  # Pillow's errors for truncated or corrupt data
        raise ValueError(f"damaged image data: {exn}") from exn


def encode_mp4(frames: Sequence[ImageLike], fps: int = 8) -> bytes:
    """Encode RGB frames (all the same even width and height) as an H.264 mp4.

    What a decoder gets back is fixed by the frames alone: the RGB -> YUV 4:2:0 conversion
    (swscale, one thread) is exact integer arithmetic and x264 encodes it losslessly (``qp=0``),
    so every decoded frame is that YUV image bit for bit, whatever the encoder decided. That
    matters because x264's lossy decisions are not reproducible: at ``crf=12`` on one thread,
    of two runs started side by side on a loaded machine, one clip of 200 came out with other
    bytes and decoded pixels up to 2 levels apart. The rest is pinned too: x264 and its lookahead run
    on one thread, frame ``i`` has pts ``i`` in a 1/``fps`` time base, and the muxer and codec
    write in bitexact mode (no version strings or times in the file).

    Returns:
        The mp4 file bytes.
    """
    if not frames:
        raise ValueError("encode_mp4 needs at least one frame")
    arrays = [np.asarray(to_pil(f).convert("RGB")) for f in frames]
    height, width = arrays[0].shape[:2]
    if height % 2 or width % 2:
        raise ValueError(
            f"H.264 needs even frame sizes, got {width}x{height}; pad or resize the frames"
        )
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        codec = stream.codec_context
        codec.thread_count, codec.thread_type = 1, "NONE"
        codec.flags |= av.codec.context.Flags.bitexact
        stream.options = {"qp": "0", "preset": "fast", "threads": "1",
                          "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0"}  # fmt: skip
        for i, arr in enumerate(arrays):
            if arr.shape[:2] != (height, width):
                raise ValueError(
                    f"all frames must be {width}x{height}, got {arr.shape[1]}x{arr.shape[0]}"
                )
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame = frame.reformat(format="yuv420p", threads=1)
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _decode_selected(data: bytes, wanted: set[int]) -> tuple[int, dict[int, np.ndarray]]:
    """Decode every frame of the first video stream, keeping those whose index is in `wanted`.

    Returns:
        (number of frames decoded, {index: uint8 array [H, W, 3]}).
    """
    kept: dict[int, np.ndarray] = {}
    count = 0
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise ValueError("no video stream in the mp4")
        for count, frame in enumerate(container.decode(video=0), start=1):
            if count - 1 in wanted:
                kept[count - 1] = frame.reformat(format="rgb24", threads=1).to_ndarray()
    return count, kept


def video_frame_count(data: bytes) -> int:
    """Number of frames in the first video stream, from the container when it says, else decoded.

    Returns:
        The frame count (int >= 0).
    """
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise ValueError("no video stream in the mp4")
        declared = container.streams.video[0].frames
    if declared > 0:
        return declared
    return _decode_selected(data, set())[0]


def decode_video(
    data: bytes, num_frames: int | None, image_size: int | None = None
) -> torch.Tensor:
    """Decode an mp4 and sample `num_frames` frames with `frame_indices`.

    The frame count comes from the container header; when decoding finds a different count the
    indices are recomputed from the decoded count, so the result depends only on the bytes.

    Returns:
        float32 tensor [N, 3, H, W] in [0, 1], N = `num_frames` (all frames when None),
        H = W = `image_size` when given. Raises ValueError saying why on undecodable bytes.
    """
    try:
        total = video_frame_count(data)
        if total < 1:
            raise ValueError("video has no frames")
        indices = frame_indices(total, num_frames)
        decoded, kept = _decode_selected(data, set(indices))
        if decoded != total:
            indices = frame_indices(decoded, num_frames)
            decoded, kept = _decode_selected(data, set(indices))
    except av.FFmpegError as exn:
        raise ValueError(f"not a video FFmpeg reads ({exn.strerror or exn})") from exn
    frames = [pil_to_tensor(Image.fromarray(kept[i]), image_size) for i in indices]
    return torch.stack(frames)
