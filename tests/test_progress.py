"""The tests' waits: a slow process that keeps using CPU is waited for, an idle (hung) one is
stopped after the stall time."""

from __future__ import annotations

import sys
import time

import pytest
from progress import run_until_stalled


def test_a_busy_command_outlasting_the_stall_time_is_waited_for():
    busy = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 6: pass\nprint('ok')"
    res = run_until_stalled([sys.executable, "-c", busy], 3.0)
    assert res.returncode == 0 and res.stdout.strip() == "ok"


def test_a_command_that_uses_no_cpu_is_killed_after_the_stall_time():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="no progress"):
        run_until_stalled([sys.executable, "-c", "import time; time.sleep(600)"], 3.0)
    assert time.monotonic() - t0 < 60
