"""From config to data: built-in shards, per-branch readers, tokenised prompts.

A branch's ``data`` is a capability name (``arith``), a union of them (``arith+reverse``, the
``mixed`` baseline), or a directory holding ``train-*.tar`` / ``eval-*.tar`` shards. Capability
names resolve to ``<data.dir>/<name>/``; with ``data.dir`` empty the built-in synthetic
capabilities are generated once under ``RUN/data`` by global rank 0 (the others wait).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from copd_mega.config import Config, ConfigError
from copd_mega.data.reader import ShardReader
from copd_mega.data.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer, special_ids


def data_root(cfg: Config) -> Path:
    return Path(cfg.data.dir) if cfg.data.dir else Path(cfg.run_dir) / "data"


def capabilities_of(spec: str) -> list[str]:
    """``"arith+reverse"`` -> ``["arith", "reverse"]``."""
    return [s for s in spec.split("+") if s]


def _cap_dir(cfg: Config, cap: str) -> Path:
    p = Path(cap)
    return p if p.is_absolute() or os.sep in cap else data_root(cfg) / cap


def shard_paths(cfg: Config, spec: str, split: str) -> list[Path]:
    """Shard files of ``split`` for a branch data spec; a clear error when there are none."""
    paths: list[Path] = []
    for cap in capabilities_of(spec):
        found = sorted(_cap_dir(cfg, cap).glob(f"{split}-*.tar"))
        if not found:
            raise ConfigError(
                f"no {split}-*.tar shards for data {cap!r} under {_cap_dir(cfg, cap)}; create "
                f"them with `copd data synth --capability {cap} --out {data_root(cfg)}` or point "
                "data.dir / branches.*.data at a shard directory"
            )
        paths += found
    return paths


def prepare_data(cfg: Config) -> Path:
    """Make sure every branch's shards and the tokenizer exist; returns the tokenizer path.

    With ``data.dir`` empty, global rank 0 synthesises the built-in capabilities the config
    uses (idempotent), then every rank waits at a barrier. Call on every rank.
    """
    root = data_root(cfg)
    tok_path = root / "tokenizer.json"
    needed = sorted({c for b in cfg.branches for c in capabilities_of(b.data)})
    if not cfg.data.dir:
        _check_builtin(cfg, root)
    if not cfg.data.dir and (not dist.is_initialized() or dist.get_rank() == 0):
        from copd_mega.data.cli import main as data_main

        root.mkdir(parents=True, exist_ok=True)
        for cap in needed:
            if not sorted(_cap_dir(cfg, cap).glob("train-*.tar")):
                argv = ["synth", "--capability", cap, "--out", str(root), "--seed",
                        str(cfg.data.seed), "--n-train", str(cfg.data.n_train),
                        "--n-eval", str(cfg.data.n_eval)]  # fmt: skip
                if data_main(argv) != 0:
                    raise RuntimeError(f"synthesising {cap!r} under {root} failed (see above)")
        if not tok_path.exists():
            save_tokenizer(build_tokenizer(), tok_path)
    if dist.is_initialized():
        dist.barrier()
    if not tok_path.exists():
        raise ConfigError(
            f"tokenizer {tok_path} not found; data.dir must hold tokenizer.json "
            "(`copd data synth ... --tokenizer DIR/tokenizer.json` writes one)"
        )
    for b in cfg.branches:
        shard_paths(cfg, b.data, "train")
    return tok_path


def _check_builtin(cfg: Config, root: Path) -> None:
    """Every data name of every branch is a built-in capability or holds shards already
    (checked on every rank before rank 0 synthesises anything); the error names the setting."""
    from copd_mega.data.synthetic import CAPABILITIES

    for i, b in enumerate(cfg.branches):
        for cap in capabilities_of(b.data) or [""]:
            if cap in CAPABILITIES or sorted(_cap_dir(cfg, cap).glob("train-*.tar")):
                continue
            raise ConfigError(
                f"branches.{i}.data={b.data!r}: {cap!r} is neither a built-in capability "
                f"({', '.join(CAPABILITIES)}) nor a folder with train-*.tar shards under {root}; "
                f"fix branches.{i}.data or set data.dir to the folder that holds it"
            )


def make_reader(
    cfg: Config, spec: str, split: str, dp_rank: int, dp_size: int, salt: int = 0
) -> ShardReader:
    """Reader of a data spec for one DP rank; ``salt`` separates streams of the same data.

    With ``vision.enabled`` images and frames are resized to ``vision.image_size`` and each
    video is sampled once, at read time, to ``vision.frames_per_video`` frames (uniformly,
    ``data.media.frame_indices``); those tensors then travel with the rows.
    """
    v = cfg.vision
    return ShardReader(
        shard_paths(cfg, spec, split),
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.data.seed + 7919 * salt,
        shuffle=split == "train",
        name=f"{spec} {split} dp{dp_rank}",
        num_frames=v.frames_per_video if v.enabled else None,
        image_size=v.image_size if v.enabled else None,
    )


class PromptCodec:
    """Tokenises prompts and answers with the run's tokenizer and the config's template."""

    def __init__(self, tokenizer_path: str | Path, template: str = "{prompt}") -> None:
        self.path = Path(tokenizer_path)
        self.tok = load_tokenizer(self.path)
        ids = special_ids(self.tok)
        self.bos, self.eos, self.pad = ids["bos"], ids["eos"], ids["pad"]
        self.image = ids["image"]  # the <image> slot a vision model fills with a medium
        self.template = template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def prompt_ids(self, prompt: str) -> list[int]:
        """``[bos] + ids(template.format(prompt=prompt))``."""
        return [self.bos] + self.tok.encode(self.template.format(prompt=prompt)).ids

    def answer_ids(self, answer: str) -> list[int]:
        """``ids(answer) + [eos]``: the target of supervised pretraining."""
        return self.tok.encode(answer).ids + [self.eos]

    def decode(self, ids: list[int]) -> str:
        """Text of a response, cut at the first EOS."""
        if self.eos in ids:
            ids = ids[: ids.index(self.eos)]
        return self.tok.decode(ids, skip_special_tokens=True)
