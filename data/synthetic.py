"""Built-in verifiable capabilities: small tasks a tiny transformer can learn, each checkable.

Text: `arith` (multi-digit addition, reward "math"), `reverse` (reverse a lowercase string) and
`sort` (sort its letters), both reward "exact". Media: `image` (which corner of a small RGB
canvas holds the shape) and `video` (for how many of an mp4's four seconds a square is shown),
both reward "exact". Each has four answers drawn uniformly (chance 25%) that only the pixels
decide: the prompt is the same for every problem of a capability. The image's answer needs the
layout (its colours alone do not tell the corner); the video's needs every second's frames. Pairs whose rules conflict (`sort_up`/`sort_down`, `image_at`/
`image_across`, `video_lit`/`video_dark`) come from `data/interference.py` and are registered
here; the two members of a pair share one split family, so they hold out the same keys.

Determinism and held-out data: sample `index` of `(capability, split, seed)` is drawn from a
`random.Random` seeded with that tuple (string seeds hash with SHA-512, so the result does not
depend on the process). Each problem has a key (for `arith` the unordered operand pair, for
`sort` its multiset of letters, for media the full drawing parameters) and the key's hash alone,
with no seed, decides whether the problem belongs to `train` or `eval`. A draw that lands in the
other split is redrawn. So train and eval never share a problem, for any pair of seeds.
Within a split, problems are drawn with replacement.

Prompts carry no media placeholder: samples list their images/frames, and the model's input
builder inserts `<image>` tokens for them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from copd_mega.data import interference
from copd_mega.data.media import encode_mp4

TEXT_CAPABILITIES: tuple[str, ...] = ("arith", "reverse", "sort", *interference.TEXT_CAPABILITIES)
MEDIA_CAPABILITIES: tuple[str, ...] = ("image", "video", *interference.MEDIA_CAPABILITIES)
CAPABILITIES: tuple[str, ...] = TEXT_CAPABILITIES + MEDIA_CAPABILITIES
SPLITS: tuple[str, ...] = ("train", "eval")
EVAL_BUCKETS = 8  # one problem key in EVAL_BUCKETS is held out for eval
MAX_REDRAWS = 1000
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CORNERS = ("nw", "ne", "sw", "se")  # image answers: the shape's quadrant (north = top)


@dataclass(frozen=True)
class SynthOptions:
    """Sizes of the synthetic problems.

    digits: operand digits for `arith`. min_len/max_len: string length range for `reverse` and
    `sort`. image_size: canvas side in pixels for `image`/`video` (even). video_frames: frames
    per `video` clip.
    """

    digits: int = 2
    min_len: int = 3
    max_len: int = 8
    image_size: int = 32
    video_frames: int = 8

    def check(self) -> None:
        """Raise ValueError naming the option to change when the sizes are unusable."""
        if not 1 <= self.digits <= 9:
            raise ValueError(f"digits must be in 1..9, got {self.digits}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if self.image_size < 16 or self.image_size % 2:
            raise ValueError(f"image_size must be even and >= 16, got {self.image_size}")
        if self.video_frames < 4 or self.video_frames % 4:
            raise ValueError(
                f"video_frames must be a positive multiple of 4 (a four-second clip), got "
                f"{self.video_frames}"
            )


@dataclass
class Problem:
    """One drawn problem before it becomes a sample dict."""

    key: str
    prompt: str
    answer: str
    # media are rendered only once the problem's key has landed in the wanted split
    render: Callable[[], dict] | None = None


def split_of(capability: str, problem_key: str) -> str:
    """Which split owns a problem: a pure function of capability and key (no seed).

    Returns:
        "eval" for one key hash in `EVAL_BUCKETS`, else "train".
    """
    family = interference.SPLIT_FAMILY.get(capability, capability)  # pairs share held-out keys
    digest = hashlib.blake2b(f"{family}|{problem_key}".encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "little") % EVAL_BUCKETS == 0 else "train"


def _arith(rng: random.Random, opt: SynthOptions) -> Problem:
    lo = 0 if opt.digits == 1 else 10 ** (opt.digits - 1)
    a, b = rng.randint(lo, 10**opt.digits - 1), rng.randint(lo, 10**opt.digits - 1)
    return Problem(f"{min(a, b)}+{max(a, b)}", f"Q: {a}+{b}=?\nA:", str(a + b))


def _word(rng: random.Random, opt: SynthOptions) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(opt.min_len, opt.max_len)))


def _reverse(rng: random.Random, opt: SynthOptions) -> Problem:
    word = _word(rng, opt)
    return Problem(word, f"Q: reverse {word}\nA:", word[::-1])


def _sort(rng: random.Random, opt: SynthOptions) -> Problem:
    word = _word(rng, opt)
    answer = "".join(sorted(word))
    return Problem(answer, f"Q: sort {word}\nA:", answer)


def _color(rng: random.Random) -> tuple[int, int, int]:
    """A bright colour, so shapes stand out from the black background."""
    channels = [rng.randint(0, 255) for _ in range(3)]
    channels[rng.randrange(3)] = 255
    return channels[0], channels[1], channels[2]


def _shape(rng: random.Random, size: int) -> tuple[str, int, tuple[int, int, int]]:
    """A random shape kind, side in pixels (``5 * size // 16 .. size // 2``: big enough that
    it covers whole 8-pixel patches of a 32-pixel image) and bright colour."""
    return rng.choice(("square", "disc")), rng.randint(5 * size // 16, size // 2), _color(rng)


def _image(rng: random.Random, opt: SynthOptions) -> Problem:
    """One square or disc of random size, colour and position inside one quadrant."""
    corner, half = rng.choice(CORNERS), opt.image_size // 2
    kind, size, color = _shape(rng, opt.image_size)
    x = rng.randint(0, half - size) + (half if corner[1] == "e" else 0)
    y = rng.randint(0, half - size) + (half if corner[0] == "s" else 0)
    box = (x, y, x + size - 1, y + size - 1)

    def render() -> dict:
        canvas = Image.new("RGB", (opt.image_size, opt.image_size))
        draw = ImageDraw.Draw(canvas)
        (draw.rectangle if kind == "square" else draw.ellipse)(box, fill=color)
        return {"images": [canvas]}

    prompt = "Q: Which corner is the shape in? Answer nw, ne, sw or se.\nA:"
    return Problem(f"{kind}{box}{color}", prompt, corner, render)


def _video(rng: random.Random, opt: SynthOptions) -> Problem:
    """A four-second clip (`video_frames` frames, a quarter of them per second) in which a
    square of half the canvas's side is shown during 1..4 of the seconds, black otherwise.

    Which seconds are lit is random, so no one frame tells the count: the answer sums over the
    frames. Any uniform sampling of four or more frames (``data.media.frame_indices``) sees each
    second at least once.
    """
    n, side = opt.video_frames, opt.image_size
    count = rng.randint(1, 4)
    lit = sorted(rng.sample(range(4), count))
    size, color = side // 2, _color(rng)
    x0, y0 = rng.randint(0, side - size), rng.randint(0, side - size)

    def render() -> dict:
        frames = []
        for t in range(n):
            frame = np.zeros((side, side, 3), dtype=np.uint8)
            if t * 4 // n in lit:
                frame[y0 : y0 + size, x0 : x0 + size] = color
            frames.append(frame)
        return {"video": encode_mp4(frames, fps=n // 4)}

    key = f"{lit}:{x0},{y0}:{color}:{n}"
    prompt = "Q: For how many seconds is the square shown? Answer 1, 2, 3 or 4.\nA:"
    return Problem(key, prompt, str(count), render)


_BASE_MAKERS: dict[str, tuple[Callable[[random.Random, SynthOptions], Problem], str]] = {
    "arith": (_arith, "math"),
    "reverse": (_reverse, "exact"),
    "sort": (_sort, "exact"),
    "image": (_image, "exact"),
    "video": (_video, "exact"),
}
_MAKERS = {**_BASE_MAKERS, **interference.pair_makers(_sort, _image, _video)}


class _Longest(random.Random):
    """A stream whose every ``randint`` draws the top of its range: the most digits, the longest
    word. The makers lengthen prompts only through ``randint`` upper bounds."""

    def randint(self, a: int, b: int) -> int:
        return b


def longest_prompt(capability: str, options: SynthOptions | None = None) -> str:
    """The longest prompt text `capability` can draw under `options` (default sizes)."""
    if capability not in _MAKERS:
        raise ValueError(f"unknown capability {capability!r}; choose one of {list(CAPABILITIES)}")
    options = options or SynthOptions()
    options.check()
    return _MAKERS[capability][0](_Longest(0), options).prompt


def make_sample(
    capability: str, split: str, seed: int, index: int, options: SynthOptions | None = None
) -> dict:
    """Sample `index` of `(capability, split, seed)`; the same arguments give the same sample.

    Returns:
        `{"id", "prompt", "answer", "reward_type", "capability"}` (all str), plus
        `"images": [PIL.Image RGB image_size x image_size]` for `image` and
        `"video": bytes` (mp4, `video_frames` frames) for `video`.
    """
    if capability not in _MAKERS:
        raise ValueError(f"unknown capability {capability!r}; choose one of {list(CAPABILITIES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    options = options or SynthOptions()
    options.check()
    maker, reward_type = _MAKERS[capability]
    for attempt in range(MAX_REDRAWS):
        rng = random.Random(f"{capability}|{split}|{seed}|{index}|{attempt}")
        problem = maker(rng, options)
        if split_of(capability, problem.key) == split:
            break
    else:
        raise ValueError(
            f"{capability}: no {split} problem found in {MAX_REDRAWS} draws; the problem space is "
            f"too small for a held-out split, enlarge it (e.g. --digits or --max-len)"
        )
    sample = {
        "id": f"{capability}-{split}-{seed}-{index}",
        "prompt": problem.prompt,
        "answer": problem.answer,
        "reward_type": reward_type,
        "capability": capability,
    }
    if problem.render is not None:
        sample.update(problem.render())
    return sample


def make_samples(
    capability: str,
    split: str,
    seed: int,
    n: int,
    options: SynthOptions | None = None,
    start: int = 0,
) -> Iterator[dict]:
    """Samples `start .. start + n - 1` of `(capability, split, seed)`, lazily.

    Returns:
        An iterator of `make_sample` dicts.
    """
    for index in range(start, start + n):
        yield make_sample(capability, split, seed, index, options)


def problem_key(sample: dict) -> str:
    """Recover the split key of a text sample from its prompt (for tests and audits).

    Returns:
        The key `split_of` hashed when the sample was drawn.
    """
    cap, body = sample["capability"], sample["prompt"].split("\n")[0]
    if cap == "arith":
        a, b = (int(x) for x in body.removeprefix("Q: ").removesuffix("=?").split("+"))
        return f"{min(a, b)}+{max(a, b)}"
    if cap == "reverse":
        return body.removeprefix("Q: reverse ")
    if cap == "sort":
        return sample["answer"]
    if cap in interference.TEXT_CAPABILITIES:
        return interference.text_key(sample)
    raise ValueError(f"problem_key covers text capabilities only, got {cap!r}")
