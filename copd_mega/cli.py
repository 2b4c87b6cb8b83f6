"""The ``copd`` command: each subcommand lives in the module that does the work.

Every subcommand module exposes ``main(argv: list[str]) -> int``; this file only dispatches, so
importing it is cheap and ``copd --help`` lists everything.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("copd_mega.plan", "print the rank layout for N ranks (dry run, no GPUs)"),
    "pretrain": ("copd_mega.pretrain", "next-token training that makes a tiny base model"),
    "train": (
        "copd_mega.train",
        "run CoPD or a baseline mode (copd, expert, mixed, static_opd, mopd)",
    ),
    "eval": ("copd_mega.evaluate", "greedy pass@1 per capability for checkpoints"),
    "demo": ("copd_mega.demo", "the embedded default job: data, base, CoPD, merge, eval, plots"),
    "report": ("copd_mega.report", "plots and tables from run directories"),
    "merge": ("copd_mega.merge", "average checkpoints tensor by tensor"),
    "export-hf": ("copd_mega.hf.export", "write a checkpoint as a Hugging Face model"),
    "import-hf": ("copd_mega.hf.importer", "read a Hugging Face model into a checkpoint"),
    "data": ("copd_mega.data.cli", "pack shards or synthesise built-in capabilities"),
}


def _usage() -> str:
    lines = ["usage: copd <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"copd: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
