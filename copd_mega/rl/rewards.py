"""Verifiable rewards: answer extraction, per-type scoring, and a hang-proof worker pool.

``score_one(response, gold, reward_type)`` is a pure function returning 1.0 or 0.0. It has no
deadline of its own and uses no signals (math-verify's ``signal.alarm`` timeouts are switched
off, so it is also safe off the main thread). Deadlines are ``RewardPool``'s job: it runs
``score_one`` in worker *processes*, and a worker that overruns ``timeout_s`` on an item (math-
verify can spend minutes on e.g. ``9^{9^{9^{9^{9}}}}``) or dies is killed and replaced; the item
scores 0 and is counted as ``timeout`` or ``error``. Items run on every worker at once, so a batch
of H hanging items costs about ceil(H / workers) timeouts (``rewards.workers``,
``rewards.timeout_s``).

Answer extraction precedence (``extract_answer``), for responses and golds alike, on the text
after a reasoning block (``<think>...</think>``; an unclosed ``<think>`` leaves no answer):
1. the last complete ``\\boxed{...}`` (balanced braces, ``\\{``/``\\}`` are literal; by start
   position, so a truncated final box falls back to an earlier complete one);
2. else the text after the last "answer is" / "answer:" (case-insensitive) to the end of line;
3. else the whole stripped text.
Forms 1 and 2 are cleaned: surrounding ``$..$``, ``\\(..\\)``, ``\\[..\\]``, ``**`` and a
trailing period are removed.

Reward types:
- ``math``: math-verify, ``verify(gold, answer)`` with gold first. An extracted answer is parsed
  as ``\\boxed{answer}``; with no explicit answer the whole response goes to math-verify's own
  extraction.
- ``exact``: extracted answer == extracted gold, after stripping surrounding whitespace
  (case-sensitive).
- ``choice``: gold is a letter, optionally followed by its option text ("B", "(B)", "B) 12 cm").
  The answer scores 1 if its option label matches the gold letter or its text equals the gold's
  option text (case- and whitespace-insensitive). With no explicit answer only a bare label
  ("B", "(B)", "B.") counts as a letter, so prose such as "A quick check..." is not read as "A".
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import signal
import time
import weakref
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

REWARD_TYPES: tuple[str, ...] = ("math", "exact", "choice")
_MAX_START_FAILURES = 3
Item = tuple[str, str, str]  # (response, gold, reward_type)

# --- extraction ------------------------------------------------------------------------------

_BRACE_TOKEN = re.compile(r"\\boxed\s*\{|\\[{}]|[{}]")
_ANSWER_FORM = re.compile(r"answer\s*(?:is(?=[\s:])\s*:?|:)[ \t]*([^\n]*)", re.IGNORECASE)
_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"))


def _last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (linear scan with a brace stack)."""
    stack: list[int | None] = []  # content start for \boxed{, None for a plain {
    best: tuple[int, str] | None = None
    for m in _BRACE_TOKEN.finditer(text):
        tok = m.group()
        if tok.startswith("\\boxed"):
            stack.append(m.end())
        elif tok == "{":
            stack.append(None)
        elif tok == "}" and stack:
            start = stack.pop()
            if start is not None and (best is None or start > best[0]):
                best = (start, text[start : m.start()])
    return None if best is None else best[1]


def _clean(answer: str) -> str:
    s = answer.strip().rstrip(".").strip()
    for left, right in _DELIMS:
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s.strip("*").strip()


def strip_reasoning(text: str) -> str:
    """The text after a reasoning block: after the last ``</think>``; ``""`` when a ``<think>``
    block is never closed (a response cut off while reasoning has no answer)."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    return "" if "<think>" in text else text


def _extract(text: str) -> tuple[str, bool]:
    """``(answer, explicit)``; ``explicit`` is False for the whole-text fallback."""
    text = strip_reasoning(text)
    boxed = _last_boxed(text)
    if boxed is not None:
        return _clean(boxed), True
    for m in reversed(list(_ANSWER_FORM.finditer(text))):
        answer = _clean(m.group(1))
        if answer:
            return answer, True
    return text.strip(), False


def extract_answer(text: str) -> str:
    """The final answer in ``text`` (precedence in the module docstring)."""
    return _extract(text)[0]


# --- scoring ---------------------------------------------------------------------------------


def _check_type(reward_type: str) -> None:
    if reward_type not in REWARD_TYPES:
        raise ValueError(f"unknown reward type {reward_type!r}; allowed: {', '.join(REWARD_TYPES)}")


def _parse_math(text: str, explicit: bool) -> list:
    from math_verify import parse

    if explicit:
        parsed = parse("\\boxed{" + text + "}", parsing_timeout=None)
        if parsed:
            return parsed
    return parse(text, parsing_timeout=None)


def _score_math(response: str, gold: str) -> bool:
    from math_verify import verify

    gold_parsed = _parse_math(extract_answer(gold), explicit=True)
    answer_parsed = _parse_math(*_extract(response))
    if not gold_parsed or not answer_parsed:
        return False
    return verify(gold_parsed, answer_parsed, timeout_seconds=None)


_GOLD_CHOICE = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:]?(?:\s+(.*))?", re.DOTALL)
_LABEL_PREFIX = re.compile(r"[(\[]?([A-Z])[)\]]?(?=$|[\s.:,)])")
_BARE_LABEL = re.compile(r"[(\[]?([A-Za-z])[)\]]?\.?")
_LATEX_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")


def _norm_text(s: str) -> str:
    return " ".join(s.casefold().split()).rstrip(".")


def _score_choice(response: str, gold: str) -> bool:
    """A lettered gold ("B", "(B) 12 cm") matches its label or its option text; a gold that is
    the option itself ("down") matches that option text, case and spacing aside."""
    answer, explicit = _extract(response)
    answer = re.sub(
        r"^(?:option|choice)\s+", "", _LATEX_WRAP.sub(r"\1", answer), flags=re.I
    ).strip()
    g = _GOLD_CHOICE.fullmatch(gold.strip())
    if g is None:
        if not gold.strip():
            raise ValueError("choice gold is empty: give a letter A-Z or the option's text")
        return _norm_text(answer) == _norm_text(gold)
    gold_letter, gold_text = g.group(1).upper(), g.group(2)
    bare = _BARE_LABEL.fullmatch(answer)
    label = bare or (_LABEL_PREFIX.match(answer) if explicit else None)
    if label is not None and label.group(1).upper() == gold_letter:
        return True
    return bool(gold_text) and _norm_text(answer) == _norm_text(gold_text)


def score_one(response: str, gold: str, reward_type: str) -> float:
    """1.0 if ``response`` answers ``gold`` under ``reward_type`` (one of ``REWARD_TYPES``), else 0.0.

    No deadline: math verification can hang, so score untrusted responses via ``RewardPool``.
    Raises ValueError for an unknown ``reward_type`` or a malformed ``choice`` gold.
    """
    _check_type(reward_type)
    if reward_type == "math":
        ok = _score_math(response, gold)
    elif reward_type == "exact":
        ok = extract_answer(response) == extract_answer(gold)
    else:
        ok = _score_choice(response, gold)
    return 1.0 if ok else 0.0


# --- worker process --------------------------------------------------------------------------


def _exit_when_orphaned(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this worker when its parent thread exits, even mid C-level
    hang (a polling thread could not run then: the hung C code holds the GIL)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: rely on close() / exit handlers
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker_main(conn: Connection, parent_pid: int) -> None:
    """Worker loop: receive ``(index, response, gold, type)``, send ``(index, score, status)``."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        # The pool owner decides when workers stop (a preempted trainer still finishes its step)
        signal.signal(sig, signal.SIG_IGN)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _exit_when_orphaned(parent_pid)
    score_one("\\boxed{1}", "1", "math")  # warm math-verify's lazy imports before the clock runs
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, response, gold, reward_type = msg
        try:
            conn.send((index, score_one(response, gold, reward_type), "ok", ""))
        except Exception as e:  # a scoring failure is a 0 reward, not a dead worker
            conn.send((index, 0.0, "error", f"{type(e).__name__}: {e}"[:500]))


@dataclass
class _Worker:
    proc: BaseProcess
    conn: Connection
    started: float
    ready: bool = False
    item: int | None = None
    deadline: float = field(default=float("inf"))


def _stop_workers(workers: list[_Worker]) -> None:
    """Ask each worker to exit, kill what has not within a second, close every pipe."""
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 1.0
    for w in workers:
        w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()
        w.conn.close()
    workers.clear()


class RewardPool:
    """Scores ``(response, gold, reward_type)`` items in worker processes with a per-item deadline.

    A worker that overruns ``timeout_s`` on an item is killed and replaced (item scores 0,
    counted as ``timeout``); a worker that dies mid-item is replaced (item scores 0, counted as
    ``error``, as is an exception raised by ``score_one``). Workers use the ``spawn`` start
    method by default (never ``fork``: the trainer holds torch and gloo threads). Use as a
    context manager or call ``close()``; workers are also stopped at interpreter exit, and on
    Linux the kernel kills them if the process dies (``PR_SET_PDEATHSIG``). That signal follows
    the *thread* that started a worker, so create and call the pool from a long-lived thread
    (a worker lost that way is replaced, like a crash). Not thread-safe: one caller at a time.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        start_method: str = "spawn",
        start_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 1 or not timeout_s > 0:
            raise ValueError(
                f"reward pool needs num_workers >= 1 and timeout_s > 0, got {num_workers}, {timeout_s}"
            )
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(
                f"start_method must be 'spawn' or 'forkserver' (not fork), got {start_method!r}"
            )
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        self._stats: Counter[str] = Counter(ok=0, timeout=0, error=0, replaced=0)
        self.last_error = ""
        self._start_failures = 0
        self._workers.extend(self._spawn() for _ in range(num_workers))

    # -- public --

    @property
    def stats(self) -> dict[str, int]:
        """Cumulative counts: ``ok``, ``timeout``, ``error`` items and ``replaced`` workers."""
        return dict(self._stats)

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def wait_ready(self) -> None:
        """Block until every worker has started (e.g. before the first training step)."""
        self._check_open()
        while not all(w.ready for w in self._workers):
            self._collect([], Counter())

    def score(self, items: Sequence[Item]) -> list[float]:
        """Scores (1.0/0.0) in the order of ``items``."""
        return self.score_with_metrics(items)[0]

    def score_with_metrics(self, items: Sequence[Item]) -> tuple[list[float], dict[str, int]]:
        """Scores plus this batch's counts of ``ok``, ``timeout`` and ``error`` items."""
        self._check_open()
        for _, _, reward_type in items:
            _check_type(reward_type)  # fail before any work, in the caller's process
        scores = [0.0] * len(items)
        counts: Counter[str] = Counter(ok=0, timeout=0, error=0)
        todo = deque(range(len(items)))
        while todo or any(w.item is not None for w in self._workers):
            self._dispatch(todo, items)
            self._collect(scores, counts)
        self._stats.update(counts)
        return scores, dict(counts)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("RewardPool is closed")

    def _spawn(self) -> _Worker:
        self._check_open()  # close() from another thread or at exit: never start new workers
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main, args=(child_conn, os.getpid()), name="reward-worker", daemon=True
        )
        proc.start()
        child_conn.close()
        return _Worker(proc, parent_conn, started=time.monotonic())

    def _replace(self, i: int) -> None:
        w = self._workers[i]
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join()
        w.conn.close()
        self._workers[i] = self._spawn()
        self._stats["replaced"] += 1

    def _dispatch(self, todo: deque[int], items: Sequence[Item]) -> None:
        for i, w in enumerate(self._workers):
            if not todo or not w.ready or w.item is not None:
                continue
            index = todo.popleft()
            try:
                w.conn.send((index, *items[index]))
            except (OSError, ValueError):  # died while idle: nothing was lost, retry elsewhere
                todo.appendleft(index)
                self._replace(i)
                continue
            w.item, w.deadline = index, time.monotonic() + self.timeout_s

    def _collect(self, scores: list[float], counts: Counter[str]) -> None:
        """Wait for the next message, death or deadline, and account for it."""
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.item is not None]
        deadlines += [w.started + self.start_timeout_s for w in self._workers if not w.ready]
        waitables = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
        ready = set(wait(waitables, timeout=max(0.0, min(deadlines, default=now + 1.0) - now)))
        for i, w in enumerate(self._workers):
            if w.conn in ready and self._receive(i, scores, counts):
                continue
            if w.proc.sentinel in ready and not w.conn.poll():
                self._on_death(i, counts, f"worker exited with code {w.proc.exitcode}")
        now = time.monotonic()
        for i, w in enumerate(self._workers):
            if w.item is not None and now >= w.deadline:
                counts["timeout"] += 1
                self._replace(i)
            elif not w.ready and now >= w.started + self.start_timeout_s:
                raise RuntimeError(f"reward worker did not start within {self.start_timeout_s} s")

    def _receive(self, i: int, scores: list[float], counts: Counter[str]) -> bool:
        """Handle one message from worker ``i``; True if the worker died (already handled)."""
        w = self._workers[i]
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            self._on_death(i, counts, f"worker pipe closed (exit code {w.proc.exitcode})")
            return True
        if msg[0] == "ready":
            w.ready = True
            self._start_failures = 0
            return False
        index, score, status, error = msg
        if index == w.item:
            scores[index] = score
            counts[status] += 1
            if error:
                self.last_error = error
            w.item, w.deadline = None, float("inf")
        return False

    def _on_death(self, i: int, counts: Counter[str], why: str) -> None:
        w = self._workers[i]
        if not w.ready:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:  # broken environment, not bad luck
                raise RuntimeError(
                    f"reward workers failed to start {self._start_failures} times in a row: {why}"
                )
        if w.item is not None:
            counts["error"] += 1
            self.last_error = why
        self._replace(i)
