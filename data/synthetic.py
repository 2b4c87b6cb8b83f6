"""Built-in verifiable capabilities: small tasks a tiny transformer can learn, each checkable.

Text: `arith` (multi-digit addition, reward "math"), `reverse` (reverse a lowercase string) and
`sort` (sort its letters), both reward "exact". Media: `image` (count shapes drawn on a small
RGB canvas, reward "exact") and `video` (which way a square moves across the frames of an mp4,
reward "choice"). Pairs whose rules conflict (`sort_up`/`sort_down`, `image_squares`/
`image_discs`, `video_to`/`video_from`) come from `data/interference.py` and are registered here;
the two members of a pair share one split family, so they hold out the same keys.

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
DIRECTIONS = ("left", "right", "up", "down")


@dataclass(frozen=True)
class SynthOptions:
    """Sizes of the synthetic problems.

    digits: operand digits for `arith`. min_len/max_len: string length range for `reverse` and
    `sort`. image_size: canvas side in pixels for `image`/`video` (even). max_shapes: most shapes
    in an `image` problem. video_frames: frames per `video` clip.
    """

    digits: int = 2
    min_len: int = 3
    max_len: int = 8
    image_size: int = 32
    max_shapes: int = 5
    video_frames: int = 8

    def check(self) -> None:
        """Raise ValueError naming the option to change when the sizes are unusable."""
        if not 1 <= self.digits <= 9:
            raise ValueError(f"digits must be in 1..9, got {self.digits}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if self.image_size < 16 or self.image_size % 2:
            raise ValueError(f"image_size must be even and >= 16, got {self.image_size}")
        if not 1 <= self.max_shapes <= 9:
            raise ValueError(f"max_shapes must be in 1..9, got {self.max_shapes}")
        room = self.image_size - max(4, self.image_size // 5)
        if not 2 <= self.video_frames <= room + 1:
            raise ValueError(
                f"video_frames must be in 2..{room + 1} for image_size {self.image_size} (the "
                f"square moves at least a pixel a frame), got {self.video_frames}"
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


def _image(rng: random.Random, opt: SynthOptions) -> Problem:
    """Count 1..max_shapes squares and discs, one per cell of a 3x3 grid."""
    count = rng.randint(1, opt.max_shapes)
    cell = opt.image_size // 3
    shapes = []
    for pos in sorted(rng.sample(range(9), count)):
        size = rng.randint(max(3, cell // 2), cell - 2)
        x = (pos % 3) * cell + rng.randint(1, cell - size - 1)
        y = (pos // 3) * cell + rng.randint(1, cell - size - 1)
        shapes.append(
            (rng.choice(("square", "disc")), (x, y, x + size - 1, y + size - 1), _color(rng))
        )

    def render() -> dict:
        canvas = Image.new("RGB", (opt.image_size, opt.image_size))
        draw = ImageDraw.Draw(canvas)
        for kind, box, color in shapes:
            (draw.rectangle if kind == "square" else draw.ellipse)(box, fill=color)
        return {"images": [canvas]}

    key = ";".join(f"{kind}{box}{color}" for kind, box, color in shapes)
    prompt = "Q: How many shapes are in the image?\nA:"
    return Problem(key, prompt, str(count), render)


def _video(rng: random.Random, opt: SynthOptions) -> Problem:
    """A square moving one way for `video_frames` frames, staying inside the canvas."""
    n, side = opt.video_frames, opt.image_size
    size = max(4, side // 5)
    step = rng.randint(1, max(1, (side - size) // (n - 1)))
    travel = step * (n - 1)
    direction = rng.choice(DIRECTIONS)
    dx, dy = {"left": (-step, 0), "right": (step, 0), "up": (0, -step), "down": (0, step)}[
        direction
    ]
    lo_x, hi_x = (travel, side - size) if dx < 0 else (0, side - size - (travel if dx > 0 else 0))
    lo_y, hi_y = (travel, side - size) if dy < 0 else (0, side - size - (travel if dy > 0 else 0))
    x0, y0, color = rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y), _color(rng)

    def render() -> dict:
        frames = []
        for t in range(n):
            frame = np.zeros((side, side, 3), dtype=np.uint8)
            x, y = x0 + dx * t, y0 + dy * t
            frame[y : y + size, x : x + size] = color
            frames.append(frame)
        return {"video": encode_mp4(frames)}

    key = f"{direction}:{x0},{y0}:{step}:{size}:{color}:{n}"
    prompt = "Q: Which way does the square move? Answer left, right, up or down.\nA:"
    return Problem(key, prompt, direction, render)


_MAKERS: dict[str, tuple[Callable[[random.Random, SynthOptions], Problem], str]] = {
    "arith": (_arith, "math"),
    "reverse": (_reverse, "exact"),
    "sort": (_sort, "exact"),
    "image": (_image, "exact"),
    "video": (_video, "choice"),
    **interference.MAKERS,  # pairs with opposite rules behind a small cue (data/interference.py)
}


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
