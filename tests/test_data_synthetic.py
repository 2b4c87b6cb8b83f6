"""Built-in capabilities: deterministic, correct answers, train and eval disjoint."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
import torch

from copd_mega.data.media import decode_video
from copd_mega.data.shards import encode_sample
from copd_mega.data.synthetic import (
    TEXT_CAPABILITIES,
    SynthOptions,
    make_sample,
    make_samples,
    problem_key,
    split_of,
)


@pytest.mark.parametrize("capability", ["arith", "reverse", "sort", "image", "video"])
def test_same_arguments_same_sample(capability):
    a = encode_sample(make_sample(capability, "train", 5, 17))
    b = encode_sample(make_sample(capability, "train", 5, 17))
    assert a == b
    assert encode_sample(make_sample(capability, "train", 6, 17)) != a


@pytest.mark.parametrize("capability", TEXT_CAPABILITIES)
def test_text_train_and_eval_are_disjoint_across_seeds(capability):
    options = SynthOptions(digits=2, min_len=2, max_len=3)
    train = {
        problem_key(s)
        for seed in (0, 1)
        for s in make_samples(capability, "train", seed, 400, options)
    }
    evals = {
        problem_key(s)
        for seed in (0, 2)
        for s in make_samples(capability, "eval", seed, 100, options)
    }
    assert train and evals and not train & evals
    assert all(split_of(capability, k) == "train" for k in train)


@pytest.mark.parametrize("capability", ["image", "video"])
def test_media_train_and_eval_are_disjoint(capability):
    def digests(split: str, n: int) -> set[str]:
        out = set()
        for s in make_samples(capability, split, 0, n):
            media = encode_sample(s)
            out.add(hashlib.sha1(media.get("0.png", media.get("mp4", b""))).hexdigest())
        return out

    assert not digests("train", 60) & digests("eval", 20)


def test_answers_are_correct():
    for s in make_samples("arith", "train", 0, 50, SynthOptions(digits=3)):
        a, b = s["prompt"].removeprefix("Q: ").split("=")[0].split("+")
        assert len(a) == len(b) == 3 and s["answer"] == str(int(a) + int(b))
        assert s["reward_type"] == "math"
    for s in make_samples("reverse", "eval", 0, 20):
        assert s["answer"] == s["prompt"].split("\n")[0].removeprefix("Q: reverse ")[::-1]
    for s in make_samples("sort", "eval", 0, 20):
        word = s["prompt"].split("\n")[0].removeprefix("Q: sort ")
        assert s["answer"] == "".join(sorted(word)) and s["reward_type"] == "exact"


def test_media_samples():
    # the image: the shape's pixels lie in the quadrant the answer names
    for image in make_samples("image", "train", 0, 20):
        pixels = torch.tensor(np.asarray(image["images"][0])).sum(-1)  # [H, W]
        ys, xs = torch.nonzero(pixels, as_tuple=True)
        assert image["images"][0].size == (32, 32) and image["reward_type"] == "exact"
        rows, cols = ("n" if ys.max() < 16 else "s"), ("w" if xs.max() < 16 else "e")
        assert ys.min() // 16 == ys.max() // 16 and xs.min() // 16 == xs.max() // 16
        assert rows + cols == image["answer"]
    # the video: four seconds of 3 frames each; the square is shown in `answer` of them
    for video in make_samples("video", "eval", 0, 10, SynthOptions(video_frames=12)):
        frames = decode_video(video["video"], None)
        assert frames.shape == (12, 3, 32, 32) and video["reward_type"] == "exact"
        lit = frames.amax((1, 2, 3)) > 0.5  # [12]
        seconds = lit.view(4, 3)
        assert (seconds.all(1) | ~seconds.any(1)).all()  # a second is all lit or all dark
        assert int(seconds.all(1).sum()) == int(video["answer"])


def test_media_answers_are_balanced_and_need_the_pixels():
    for cap, answers in (("image", {"nw", "ne", "sw", "se"}), ("video", {"1", "2", "3", "4"})):
        samples = list(make_samples(cap, "train", 0, 400))
        counts = Counter(s["answer"] for s in samples)
        assert set(counts) == answers and max(counts.values()) / len(samples) < 0.3, counts
        assert len({s["prompt"] for s in samples}) == 1  # the prompt tells nothing


def test_bad_options_and_names_fail_with_the_fix():
    with pytest.raises(ValueError, match="unknown capability 'maths'"):
        make_sample("maths", "train", 0, 0)
    with pytest.raises(ValueError, match="unknown split"):
        make_sample("arith", "test", 0, 0)
    with pytest.raises(ValueError, match="video_frames"):
        make_sample("video", "train", 0, 0, SynthOptions(video_frames=6))
