"""The vision path learns: GRPO on image rows moves the ViT and projector, and a model trained
on the image task needs the pixels' layout (the real megatron LLaVA model on gloo)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from vision_cases import TRAINED, VISION_TASK, grpo_step_on_images, trained_then_shuffled

from multiproc import spawn

SMALL_RL = ["rollout.prompts_per_step=4", "grpo.group_size=4", "rollout.max_new_tokens=3"]


@pytest.mark.multiproc
def test_grpo_step_on_image_rows_moves_vision_tower_and_projector(tmp_path):
    got = spawn(grpo_step_on_images, 1, [*VISION_TASK, *SMALL_RL, f"run_dir={tmp_path}"])[0]
    before, flat, after = got["before"], got["flat"], got["after"]
    towers = [n for n in before if "vision_model" in n]
    projector = [n for n in before if "vision_projection" in n]
    assert towers and projector
    # equal rewards give zero advantages and no gradient: nothing moves (no weight decay)
    assert all(torch.equal(before[n], flat[n]) for n in before)
    moved = {n for n in before if not torch.equal(flat[n], after[n])}
    assert {n for n in towers if "conv1" in n or "linear_qkv.weight" in n} <= moved
    assert set(projector) <= moved


@pytest.mark.multiproc
def test_image_model_needs_the_pixel_layout(tmp_path):
    got = spawn(trained_then_shuffled, 1, [*VISION_TASK, *TRAINED, f"run_dir={tmp_path}"])[0]
    answers = Counter(got["answers"])
    majority = max(answers.values()) / len(got["answers"])
    assert len(answers) == 4 and majority < 0.4  # four balanced answers: chance is 25%
    # trained: well above chance and above always answering the majority corner
    assert got["accuracy"] >= 0.6, got
    # shuffled pixels: no better than always answering the majority corner (plus noise)
    assert got["shuffled"] <= max(0.25, majority) + 0.1, got
