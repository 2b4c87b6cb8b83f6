"""A Ctrl-C whose KeyboardInterrupt a library swallowed still ends the rank: at its next step
boundary (``Preemption.agreed``), before it waits for any other rank."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from copd_mega.trainer.preemption import Preemption


def _decide(slowest_s: float) -> tuple[bool, bool]:
    return False, False


def test_a_swallowed_ctrl_c_is_raised_again_at_the_step_boundary():
    calls = []

    def command_handler(signum, frame):  # the command's own handler (cli._on_sigint)
        calls.append(signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, command_handler)
    try:
        with Preemption() as p:
            assert p.agreed(torch.device("cpu"), 0.1, _decide) == (False, False, False)
            try:  # a library's broad except around the place the signal arrives
                os.kill(os.getpid(), signal.SIGINT)
                signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a bytecode boundary: handler runs
            except BaseException:
                pass
            assert calls == [signal.SIGINT] and p.interrupted
            with pytest.raises(KeyboardInterrupt):
                p.agreed(torch.device("cpu"), 0.1, _decide)
        assert signal.getsignal(signal.SIGINT) is command_handler  # restored on exit
    finally:
        signal.signal(signal.SIGINT, old)


def test_without_a_ctrl_c_the_boundary_goes_on_and_sigusr1_is_agreed():
    with Preemption() as p:
        os.kill(os.getpid(), signal.SIGUSR1)
        signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert p.name == "SIGUSR1" and not p.interrupted
        assert p.agreed(torch.device("cpu"), 0.1, _decide) == (True, False, False)
