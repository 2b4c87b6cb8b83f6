"""Built-in capabilities that interfere: pairs of tasks on the same prompt surface whose rules
are opposite and are told apart only by a small cue in the prompt.

Each pair shares its inputs and its answer space; only the cue decides which of two opposite
answers earns the reward. One policy trained on both (the ``mixed`` baseline) must route the
same shared circuits two opposite ways on near-identical prompts, so a gradient step that helps
one rule pushes the other toward the wrong answer; an expert trained on one rule never pays
that cost. The pairs:

- text ``sort_up`` / ``sort_down``: ``Q: sort dbca <\\nA:`` -> ``abcd``, and with the cue ``>``
  -> ``dcba`` (reward ``exact``).
- image ``image_squares`` / ``image_discs``: the ``image`` capability's canvas (1..max_shapes
  squares and discs); count only the squares, or only the discs (reward ``exact``).
- video ``video_to`` / ``video_from``: the ``video`` capability's clip; the direction the
  square moves to, or the side it comes from (the opposite direction; reward ``choice``).

Both members of a pair share one split family (``SPLIT_FAMILY``): a problem key (the letter
multiset, the drawing) held out for one rule is held out for the other too, so no held-out input
of either rule is ever trained on.

The image and video makers reuse ``synthetic``'s renderers unchanged (imported when called, since
``synthetic`` registers these makers in its capability table).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from copd_mega.data.synthetic import Problem, SynthOptions

UP, DOWN = "<", ">"  # the cue: the last character before the newline
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}

TEXT_CAPABILITIES: tuple[str, ...] = ("sort_up", "sort_down")
MEDIA_CAPABILITIES: tuple[str, ...] = ("image_squares", "image_discs", "video_to", "video_from")
SPLIT_FAMILY: dict[str, str] = {
    "sort_up": "sort_updown",
    "sort_down": "sort_updown",
    "image_squares": "image_kinds",
    "image_discs": "image_kinds",
    "video_to": "video_tofrom",
    "video_from": "video_tofrom",
}


def _sorted_word(rng: random.Random, opt: SynthOptions, descending: bool) -> Problem:
    from copd_mega.data.synthetic import Problem, _word

    word = _word(rng, opt)
    key = "".join(sorted(word))
    cue = DOWN if descending else UP
    return Problem(key, f"Q: sort {word} {cue}\nA:", key[::-1] if descending else key)


def _sort_up(rng: random.Random, opt: SynthOptions) -> Problem:
    return _sorted_word(rng, opt, descending=False)


def _sort_down(rng: random.Random, opt: SynthOptions) -> Problem:
    return _sorted_word(rng, opt, descending=True)


def _count_kind(rng: random.Random, opt: SynthOptions, kind: str) -> Problem:
    """The ``image`` canvas; the answer counts only the shapes of ``kind`` (``square``/``disc``).
    The drawing's key lists each shape as ``<kind>(box)(color)``."""
    from copd_mega.data.synthetic import Problem, _image

    drawn = _image(rng, opt)
    count = sum(1 for shape in drawn.key.split(";") if shape.startswith(kind))
    prompt = f"Q: How many {kind}s are in the image?\nA:"
    return Problem(drawn.key, prompt, str(count), drawn.render)


def _image_squares(rng: random.Random, opt: SynthOptions) -> Problem:
    return _count_kind(rng, opt, "square")


def _image_discs(rng: random.Random, opt: SynthOptions) -> Problem:
    return _count_kind(rng, opt, "disc")


def _moving(rng: random.Random, opt: SynthOptions, source: bool) -> Problem:
    """The ``video`` clip; the answer is its direction, or with ``source`` the opposite one."""
    from copd_mega.data.synthetic import Problem, _video

    clip = _video(rng, opt)
    if not source:
        return clip
    prompt = "Q: Which side does the square come from? Answer left, right, up or down.\nA:"
    return Problem(clip.key, prompt, OPPOSITE[clip.answer], clip.render)


def _video_to(rng: random.Random, opt: SynthOptions) -> Problem:
    return _moving(rng, opt, source=False)


def _video_from(rng: random.Random, opt: SynthOptions) -> Problem:
    return _moving(rng, opt, source=True)


MAKERS: dict[str, tuple[Callable[[random.Random, SynthOptions], Problem], str]] = {
    "sort_up": (_sort_up, "exact"),
    "sort_down": (_sort_down, "exact"),
    "image_squares": (_image_squares, "exact"),
    "image_discs": (_image_discs, "exact"),
    "video_to": (_video_to, "choice"),
    "video_from": (_video_from, "choice"),
}


def text_key(sample: dict) -> str:
    """The split key of a ``sort_up``/``sort_down`` sample: its letters, sorted."""
    return "".join(sorted(sample["answer"]))
