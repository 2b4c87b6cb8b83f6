"""`copd data`: make shards from a JSONL file (`pack`) or from the built-in capabilities (`synth`).

`synth` writes `<out>/<capability>/train-000000.tar ...` and `eval-000000.tar ...` per
capability; `text` means every text capability, `all` every capability. `rg:<task>` is a
reasoning-gym task (its options as JSON in `--rg-options`), written to `<out>/rg_<task>/`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from copd_mega.config import DataConfig
from copd_mega.data import reasoning_gym
from copd_mega.data.shards import pack_jsonl, write_shards
from copd_mega.data.synthetic import (
    CAPABILITIES,
    TEXT_CAPABILITIES,
    SynthOptions,
    make_samples,
)
from copd_mega.data.tokenizer import build_tokenizer, save_tokenizer
from copd_mega.files.disk_full import disk_full, disk_full_message
from copd_mega.files.run_lock import lock_enclosing

GROUPS = {"text": TEXT_CAPABILITIES, "all": CAPABILITIES}


def build_parser() -> argparse.ArgumentParser:
    """Returns: the `copd data` argument parser."""
    parser = argparse.ArgumentParser(prog="copd data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    pack = sub.add_parser("pack", help="pack a JSONL file and its media folder into shards")
    pack.add_argument("--jsonl", required=True, type=Path, help="one JSON sample per line")
    pack.add_argument(
        "--media", required=True, type=Path, help="folder the images/video fields name files in"
    )
    pack.add_argument("--out", required=True, type=Path, help="output folder")
    pack.add_argument("--samples-per-shard", type=int, default=1000)
    pack.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    pack.add_argument(
        "--overwrite", action="store_true", help="replace shards with this prefix in --out"
    )

    synth = sub.add_parser("synth", help="generate shards of built-in capabilities")
    synth.add_argument("--capability", required=True, type=_capability,
                       help=f"one of {', '.join([*CAPABILITIES, *GROUPS])}, or rg:<task> "
                       "(a reasoning-gym task)")  # fmt: skip
    synth.add_argument("--rg-options", default="{}", type=json.loads,
                       help='reasoning-gym task options as JSON, e.g. {"min_word_len": 3}')  # fmt: skip
    synth.add_argument(
        "--out", required=True, type=Path, help="output folder (one sub-folder per capability)"
    )
    data_defaults = DataConfig()
    synth.add_argument("--n-train", type=int, default=data_defaults.n_train,
                       help=f"training samples (default {data_defaults.n_train})")  # fmt: skip
    synth.add_argument("--n-eval", type=int, default=data_defaults.n_eval,
                       help=f"held-out samples (default {data_defaults.n_eval})")  # fmt: skip
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--samples-per-shard", type=int, default=1000)
    synth.add_argument(
        "--tokenizer", type=Path, help="also write the character tokenizer.json here"
    )
    synth.add_argument("--overwrite", action="store_true", help="replace existing shards")
    defaults = SynthOptions()
    synth.add_argument("--digits", type=int, default=defaults.digits, help="arith operand digits")
    synth.add_argument(
        "--min-len", type=int, default=defaults.min_len, help="reverse/sort word length"
    )
    synth.add_argument("--max-len", type=int, default=defaults.max_len)
    synth.add_argument(
        "--image-size", type=int, default=defaults.image_size, help="image/video side"
    )
    synth.add_argument("--video-frames", type=int, default=defaults.video_frames)
    return parser


def _capability(text: str) -> str:
    if text in CAPABILITIES or text in GROUPS or reasoning_gym.is_task(text):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is none of {', '.join([*CAPABILITIES, *GROUPS])} and no rg:<task>"
    )


def _tracked(items: Iterable[dict], progress: Progress, label: str, total: int) -> Iterator[dict]:
    task = progress.add_task(label, total=total)
    for item in items:
        yield item
        progress.advance(task)


def _synth(args: argparse.Namespace, console: Console) -> None:
    options = SynthOptions(
        digits=args.digits,
        min_len=args.min_len,
        max_len=args.max_len,
        image_size=args.image_size,
        video_frames=args.video_frames,
    )
    options.check()
    if args.n_train < 0 or args.n_eval < 0 or args.n_train + args.n_eval == 0:
        raise ValueError("--n-train and --n-eval must be >= 0 and not both 0")
    capabilities = GROUPS.get(args.capability, (args.capability,))
    with Progress(console=console, transient=True) as progress:
        for cap in capabilities:
            rg = reasoning_gym.is_task(cap)
            out = args.out / (reasoning_gym.dir_name(cap) if rg else cap)
            for split, n in (("train", args.n_train), ("eval", args.n_eval)):
                if n == 0:
                    continue
                made = (reasoning_gym.make_samples(cap, split, args.seed, n, args.rg_options) if rg
                        else make_samples(cap, split, args.seed, n, options))  # fmt: skip
                samples = _tracked(made, progress, f"{cap} {split}", n)
                paths = write_shards(samples, out, split, args.samples_per_shard, args.overwrite)
                console.print(f"{cap} {split}: {n} samples in {len(paths)} shard(s) under {out}")
    if args.tokenizer is not None:
        console.print(f"tokenizer: {save_tokenizer(build_tokenizer(), args.tokenizer)}")


def main(argv: list[str]) -> int:
    """Run `copd data` with `argv` (without the program name).

    Returns:
        0 on success, 1 on a data error (message on stderr), 2 on bad arguments.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exn:
        return int(exn.code or 0)
    console = Console(stderr=True, markup=False, highlight=False)
    lock_enclosing(args.out)  # not while a job writes the run directory --out lies in
    try:
        if args.command == "pack":
            paths = pack_jsonl(
                args.jsonl,
                args.media,
                args.out,
                args.samples_per_shard,
                args.prefix,
                args.overwrite,
            )
            console.print(f"packed {args.jsonl} into {len(paths)} shard(s) under {args.out}")
        else:
            _synth(args, console)
    except (ValueError, FileNotFoundError) as exn:
        print(f"copd data {args.command}: error: {exn}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as exn:
        if not disk_full(exn, args.out):
            raise
        kept = "nothing was lost: shards already there are untouched, the partial ones removed"
        print(f"copd data {args.command}: error: {disk_full_message(args.out, 'shards', kept)}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
