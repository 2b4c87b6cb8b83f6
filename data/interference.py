"""Built-in capabilities that interfere: pairs of tasks on the same inputs whose rules are
opposite and are told apart only by a small cue in the prompt.

Each pair shares its inputs; only the cue decides which of two opposite answers earns the
reward. One policy trained on both (the ``mixed`` baseline) must route the same shared circuits
two opposite ways on near-identical prompts, so a gradient step that helps one rule pushes the
other toward the wrong answer; an expert trained on one rule never pays that cost. The pairs:

- text ``sort_up`` / ``sort_down``: ``Q: sort dbca <\\nA:`` -> ``abcd``, and with the cue ``>``
  -> ``dcba`` (reward ``exact``).
- image ``image_at`` / ``image_across``: the ``image`` capability's canvas (one shape in one
  quadrant); the corner that holds the shape, or the corner diagonally across from it
  (``nw``/``ne``/``sw``/``se``, reward ``exact``; the cue is the words "in" / "across from").
- video ``video_lit`` / ``video_dark``: the ``video`` capability's four-second clip; for how many
  seconds the square is shown (``1``..``4``), or hidden (``0``..``3``) (reward ``exact``).

Both members of a pair share one split family (``SPLIT_FAMILY``): a problem key (the letter
multiset, the drawing, the clip) held out for one rule is held out for the other too, so no
held-out input of either rule is ever trained on.

The makers are built on ``synthetic``'s own ``sort``, ``image`` and ``video`` makers, passed to
:func:`pair_makers` (``synthetic`` registers the result in its capability table), so a member
of a pair draws exactly the problem its base capability draws from the same random state.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

UP, DOWN = "<", ">"  # the sort cue: the last character before the newline
ACROSS = {"nw": "se", "ne": "sw", "sw": "ne", "se": "nw"}
SECONDS = 4  # the video clip's length (``synthetic._video``)

TEXT_CAPABILITIES: tuple[str, ...] = ("sort_up", "sort_down")
MEDIA_CAPABILITIES: tuple[str, ...] = ("image_at", "image_across", "video_lit", "video_dark")
SPLIT_FAMILY: dict[str, str] = {
    "sort_up": "sort_updown",
    "sort_down": "sort_updown",
    "image_at": "image_corners",
    "image_across": "image_corners",
    "video_lit": "video_seconds",
    "video_dark": "video_seconds",
}
IMAGE_PROMPT = "Q: Which corner is {where} the shape? Answer nw, ne, sw or se.\nA:"
VIDEO_PROMPT = "Q: For how many seconds is the square {state}? Answer {options}.\nA:"

Maker = Callable[[random.Random, object], object]  # (rng, SynthOptions) -> synthetic.Problem


def pair_makers(sort: Maker, image: Maker, video: Maker) -> dict[str, tuple[Maker, str]]:
    """capability -> (maker, reward type) of every pair, built on the base makers.

    ``sort`` draws ``Problem(key=sorted letters, prompt "Q: sort <word>\\nA:", answer)``,
    ``image`` one shape whose answer is its corner, ``video`` a clip whose answer is the number
    of seconds the square is shown.
    """

    def sorted_word(rng, opt, descending: bool):
        p = sort(rng, opt)
        word = p.prompt.removeprefix("Q: sort ").split("\n")[0]
        cue = DOWN if descending else UP
        answer = p.answer[::-1] if descending else p.answer
        return dataclasses.replace(p, prompt=f"Q: sort {word} {cue}\nA:", answer=answer)

    def corner(rng, opt, across: bool):
        p = image(rng, opt)
        where = "across from" if across else "in"
        answer = ACROSS[p.answer] if across else p.answer
        return dataclasses.replace(p, prompt=IMAGE_PROMPT.format(where=where), answer=answer)

    def seconds(rng, opt, hidden: bool):
        p = video(rng, opt)
        if not hidden:
            prompt = VIDEO_PROMPT.format(state="shown", options="1, 2, 3 or 4")
            return dataclasses.replace(p, prompt=prompt)
        prompt = VIDEO_PROMPT.format(state="hidden", options="0, 1, 2 or 3")
        return dataclasses.replace(p, prompt=prompt, answer=str(SECONDS - int(p.answer)))

    return {
        "sort_up": (lambda rng, opt: sorted_word(rng, opt, False), "exact"),
        "sort_down": (lambda rng, opt: sorted_word(rng, opt, True), "exact"),
        "image_at": (lambda rng, opt: corner(rng, opt, False), "exact"),
        "image_across": (lambda rng, opt: corner(rng, opt, True), "exact"),
        "video_lit": (lambda rng, opt: seconds(rng, opt, False), "exact"),
        "video_dark": (lambda rng, opt: seconds(rng, opt, True), "exact"),
    }


def text_key(sample: dict) -> str:
    """The split key of a ``sort_up``/``sort_down`` sample: its letters, sorted."""
    return "".join(sorted(sample["answer"]))
