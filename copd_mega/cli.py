"""The ``copd`` command: each subcommand lives in the module that does the work.

Every subcommand module exposes ``main(argv: list[str]) -> int``; this file only dispatches, so
importing it is cheap and ``copd --help`` lists everything.

Errors: a domain error (a bad config, data, checkpoint or Hugging Face input) ends any command
with one line, ``copd <command>: error: <what and how to fix it>``, and exit code 1. In a
multi-rank job the line is printed once: by global rank 0 for errors every rank raises alike
(config, resume decisions, collective checkpoint checks), else by the rank that failed.
``--debug`` anywhere on the command line shows the full traceback instead.

Ctrl-C (SIGINT, which reaches every rank of the job) ends a command with one line from global
rank 0, ``copd <command>: interrupted ...``, and exit code 130; the other ranks exit quietly.
SIGINTs that arrive once the interrupt was caught (e.g. torchrun passing the signal on) are
ignored.

Once the process group is up, any error on any rank ends every rank within seconds
(``parallel/monitor.py``): the first rank to fail tells the others through the job's store and
reports; the others end without a word, also those blocked in a collective.
"""

from __future__ import annotations

import importlib
import signal
import sys
import time

DEBUG_FLAG = "--debug"
RANK0_GRACE_S = 5.0
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
_sigints: list[int] = []  # SIGINTs received by this process
_handled: list[bool] = []  # non-empty once main() has caught the KeyboardInterrupt
_command: list[str] = []  # the running command's name, for the Ctrl-C backstop
INTERRUPT_GRACE_S = 30.0  # a Ctrl-C ends the process within this long, whatever swallowed it

COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("copd_mega.launch.plan", "print the rank layout for N ranks (dry run, no GPUs)"),
    "pretrain": ("copd_mega.trainer.pretrain", "next-token training that makes a tiny base model"),
    "train": (
        "copd_mega.trainer.train",
        "run CoPD or a baseline mode (copd, expert, mixed, static_opd, mopd)",
    ),
    "eval": ("copd_mega.trainer.evaluate", "greedy pass@1 per capability for checkpoints"),
    "demo": ("copd_mega.demo", "the embedded default job: data, base, CoPD, merge, eval, plots"),
    "study": (
        "copd_mega.study.run",
        "every mode x seeds from one base: report.md with table, plots",
    ),
    "overlap": (
        "copd_mega.trainer.overlap",
        "top-k overlap and delta of two checkpoints on rollouts",
    ),
    "report": ("copd_mega.report.plots", "plots and tables from run directories"),
    "merge": ("copd_mega.ckpt.offline_merge", "average checkpoints tensor by tensor"),
    "export-hf": ("copd_mega.hf.export", "write a checkpoint as a Hugging Face model"),
    "import-hf": ("copd_mega.hf.importer", "read a Hugging Face model into a checkpoint"),
    "data": ("copd_mega.data.cli", "pack shards or synthesise built-in capabilities"),
}
HIDDEN = {"report scaling --predict": ("copd_mega.launch.scaling_predict", "")}


def _usage() -> str:
    lines = ["usage: copd [--debug] <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def domain_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (reported in one line), imported only when one is raised."""
    from copd_mega.ckpt.sharded_state import CheckpointError
    from copd_mega.config import ConfigError
    from copd_mega.config_hf import UnsupportedHFModel
    from copd_mega.data.reader import DataError
    from copd_mega.files.run_lock import RunDirError

    return (ConfigError, CheckpointError, DataError, UnsupportedHFModel, RunDirError)


def _global_rank() -> int:
    """This process's global rank (0 outside a distributed job)."""
    from copd_mega.parallel.dist import read_launch_env

    return read_launch_env().rank


def report(command: str, error: BaseException, alone: bool = True) -> None:
    """Print ``error`` as one line on stderr, once per job (see the module docstring).
    ``alone``: no other rank was told (before the process group; else this rank failed first)."""
    from copd_mega.config import ConfigError

    everywhere = isinstance(error, ConfigError) or getattr(error, "everywhere", False)
    if alone and everywhere and _global_rank() != 0:
        time.sleep(RANK0_GRACE_S)  # rank 0 reports; exiting first would get it killed unheard
        return
    text = " ".join(str(error).split()) or type(error).__name__
    print(f"copd {command}: error: {text} ({DEBUG_FLAG} shows the traceback)", file=sys.stderr)
    sys.stderr.flush()


def _on_sigint(signum, frame) -> None:
    """A SIGINT interrupts the command (KeyboardInterrupt) until ``main`` has caught one; those
    that arrive while it winds down are ignored (no second traceback)."""
    _sigints.append(signum)
    if len(_sigints) == 1:  # backstop: a library that swallows the KeyboardInterrupt (a
        # broad except in a collective or a worker pool) must not keep the job running
        import threading

        timer = threading.Timer(INTERRUPT_GRACE_S, _end_interrupted)
        timer.daemon = True
        timer.start()
    if not _handled:
        raise KeyboardInterrupt


def _end_interrupted() -> None:
    """The first Ctrl-C did not end the command within ``INTERRUPT_GRACE_S``: say so once (rank
    0) and end this process with the Ctrl-C exit code; the launcher ends the other ranks."""
    import os

    if not _handled:
        _handled.append(True)
        interrupted(_command[0] if _command else "")
    sys.stderr.flush()
    os._exit(INTERRUPTED_EXIT)


def interrupted(command: str) -> None:
    """One line on global rank 0 for a Ctrl-C; the other ranks stay quiet."""
    if _global_rank() != 0:
        return
    keep = "; saved checkpoints are kept: continue with --resume=auto" if command == "train" else ""
    print(f"copd {command}: interrupted (Ctrl-C){keep}", file=sys.stderr)
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "report" and rest[:1] == ["scaling"] and "--predict" in rest:
        name, rest = "report scaling --predict", rest[1:]  # the model lives in launch/
    if name not in COMMANDS and name not in HIDDEN:
        print(f"copd: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    _sigints.clear()
    _handled.clear()
    _command[:] = [name]
    old_handler = signal.getsignal(signal.SIGINT)
    if not debug and old_handler is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        module = importlib.import_module({**COMMANDS, **HIDDEN}[name][0])
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        _handled.append(True)
        if debug:
            raise
        interrupted(name)
        return INTERRUPTED_EXIT
    except Exception as e:
        if _sigints and not debug:  # a peer's exit after the Ctrl-C broke a collective here
            _handled.append(True)
            interrupted(name)
            return INTERRUPTED_EXIT
        from copd_mega.parallel import monitor

        first = monitor.claim_failure()  # None outside a multi-rank job
        if first is False:
            return 1  # another rank failed first and reports; its error caused this one
        try:
            if debug or not isinstance(e, domain_errors()):
                raise
            report(name, e, alone=first is None)
            return 1
        finally:
            if first:
                monitor.await_acknowledgements()  # the others end before this rank (the store)
    finally:
        if old_handler is signal.default_int_handler:
            signal.signal(signal.SIGINT, old_handler)


if __name__ == "__main__":
    sys.exit(main())
