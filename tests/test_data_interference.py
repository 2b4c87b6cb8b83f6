"""The interfering capability pairs: opposite rules on one prompt surface, a shared held-out
split, and media variants built on the image/video makers."""

import random

import numpy as np
import pytest
import torch

from copd_mega.data.interference import ACROSS, SPLIT_FAMILY
from copd_mega.data.media import decode_video
from copd_mega.data.shards import encode_sample
from copd_mega.data.synthetic import (
    _MAKERS,
    SynthOptions,
    _image,
    _video,
    longest_prompt,
    make_sample,
    make_samples,
    problem_key,
    split_of,
)

PAIRS = [("sort_up", "sort_down"), ("image_at", "image_across"), ("video_lit", "video_dark")]
MAKERS = {c: _MAKERS[c] for pair in PAIRS for c in pair}


def _draw(capability: str, seed: int):
    return MAKERS[capability][0](random.Random(seed), SynthOptions())


def test_sort_pair_is_one_input_with_opposite_answers_behind_one_cue():
    for seed in range(50):
        up, down = _draw("sort_up", seed), _draw("sort_down", seed)
        word = up.prompt.removeprefix("Q: sort ").split(" ")[0]
        assert up.answer == "".join(sorted(word)) and down.answer == up.answer[::-1]
        # the prompts differ in the cue character alone
        assert [
            i for i, (a, b) in enumerate(zip(up.prompt, down.prompt, strict=True)) if a != b
        ] == [len(up.prompt) - 4]
        assert up.key == down.key


def test_image_pair_names_the_shape_s_corner_or_the_one_across_from_it():
    for seed in range(30):
        at, across = _draw("image_at", seed), _draw("image_across", seed)
        whole = _image(random.Random(seed), SynthOptions())
        assert at.answer == whole.answer and across.answer == ACROSS[whole.answer]
        assert at.key == across.key == whole.key
        same = [np.asarray(p.render()["images"][0]) for p in (at, across, whole)]
        assert (same[0] == same[2]).all() and (same[1] == same[2]).all()
        assert at.prompt != across.prompt


def test_video_pair_counts_the_seconds_shown_or_hidden_of_the_same_clip():
    seen = set()
    for seed in range(40):
        lit, dark = _draw("video_lit", seed), _draw("video_dark", seed)
        clip = _video(random.Random(seed), SynthOptions())
        assert lit.answer == clip.answer and int(dark.answer) == 4 - int(clip.answer)
        assert lit.key == dark.key == clip.key
        seen.add(dark.answer)
    assert seen == {"0", "1", "2", "3"}


@pytest.mark.parametrize("pair", PAIRS)
def test_pair_shares_its_held_out_keys(pair):
    a, b = pair
    assert SPLIT_FAMILY[a] == SPLIT_FAMILY[b]
    for seed in range(200):
        key = _draw(a, seed).key
        assert split_of(a, key) == split_of(b, key)


def test_held_out_sort_inputs_are_never_trained_under_either_rule():
    options = SynthOptions(min_len=2, max_len=3)
    train = {problem_key(s) for c in ("sort_up", "sort_down")
             for s in make_samples(c, "train", 0, 400, options)}  # fmt: skip
    evals = {problem_key(s) for c in ("sort_up", "sort_down")
             for s in make_samples(c, "eval", 3, 100, options)}  # fmt: skip
    assert train and evals and not train & evals


@pytest.mark.parametrize("capability", sorted(MAKERS))
def test_samples_are_deterministic_and_bounded_by_the_longest_prompt(capability):
    a = make_sample(capability, "eval", 4, 9)
    one, two = encode_sample(a), encode_sample(make_sample(capability, "eval", 4, 9))
    # Videos: the decoded frames are equal (lossless encoding; x264's bitstream choices are not
    # guaranteed reproducible, see data.media.encode_mp4); every other member byte for byte.
    assert sorted(one) == sorted(two)
    for member in one:
        if member == "mp4":
            assert torch.equal(decode_video(one[member], None), decode_video(two[member], None))
        else:
            assert one[member] == two[member], member
    assert a["capability"] == capability and a["reward_type"] == MAKERS[capability][1]
    assert len(a["prompt"]) <= len(longest_prompt(capability))
