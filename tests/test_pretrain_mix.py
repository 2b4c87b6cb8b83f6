"""Pretraining batches under ``pretrain.capability_target`` (real shards and readers)."""

from __future__ import annotations

from collections import Counter

from copd_mega.config import load_config
from copd_mega.data.cli import main as data_main
from copd_mega.trainer.pretrain import CapabilityMix


def test_rows_follow_each_capability_against_the_target(tmp_path):
    for cap in ("image", "sort"):
        argv = ["synth", "--capability", cap, "--out", str(tmp_path), "--n-train", "40",
                "--n-eval", "8"]  # fmt: skip
        assert data_main(argv) == 0
    cfg = load_config(None, ["vision.enabled=true", f"data.dir={tmp_path}"])
    mix = CapabilityMix(cfg, ["image", "sort"], 0, 1)

    def shares(n: int = 16) -> dict[str, int]:
        return dict(Counter(s["capability"] for s in mix.next_batch(n)))

    assert shares() == {"image": 8, "sort": 8}  # both below: equal rows
    assert not mix.update({"image": 0.5, "sort": 0.1}, 0.4)
    assert shares() == {"image": 4, "sort": 12}  # image rehearsed 1:3
    assert not mix.update({"image": 0.6, "sort": 0.3}, 0.4)
    assert shares() == {"sort": 16}  # image more than 0.15 above: paused
    assert mix.update({"image": 0.41, "sort": 0.4}, 0.4)  # every capability reached it
