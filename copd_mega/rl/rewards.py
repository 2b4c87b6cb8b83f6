"""Verifiable rewards: answer extraction and per-type scoring (pure).

``score_one(response, gold, reward_type)`` is a pure function returning 1.0 or 0.0. It has no
deadline of its own and uses no signals (math-verify's ``signal.alarm`` timeouts are switched
off, so it is also safe off the main thread). Deadlines are the job of
``copd_mega.rl.reward_pool.RewardPool``, which runs it in worker processes.

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
- ``rg``: a reasoning-gym task's own ``score_answer(extracted answer, entry)``; the gold is the
  sample's ``rg_entry`` (:func:`gold_of`), the score may be partial credit in [0, 1].

A response is *correct* (accuracy, pass@1) when its reward is 1.0 (:func:`is_correct`).
"""

from __future__ import annotations

import re

from copd_mega.data import reasoning_gym

REWARD_TYPES: tuple[str, ...] = ("math", "exact", "choice", reasoning_gym.REWARD_TYPE)
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


def check_reward_type(reward_type: str) -> None:
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


def gold_of(sample: dict) -> str:
    """What a sample's response is scored against: its ``answer``, or for a reasoning-gym task
    its ``rg_entry`` (the task's entry, which its checker needs)."""
    return (
        sample["rg_entry"]
        if sample["reward_type"] == reasoning_gym.REWARD_TYPE
        else sample["answer"]
    )


def is_correct(rewards):
    """Which rewards (a tensor or array) count as a correct answer (bool, same shape): full
    credit, 1.0. (No torch import here: the reward workers import this module.)"""
    return rewards > 1.0 - 1e-6


def score_one(response: str, gold: str, reward_type: str) -> float:
    """1.0 if ``response`` answers ``gold`` under ``reward_type`` (one of ``REWARD_TYPES``), else
    0.0; for ``rg`` the task's score in [0, 1].

    No deadline: math verification can hang, so score untrusted responses via ``RewardPool``.
    Raises ValueError for an unknown ``reward_type`` or a malformed ``choice`` gold.
    """
    check_reward_type(reward_type)
    if reward_type == "math":
        ok = _score_math(response, gold)
    elif reward_type == "exact":
        ok = extract_answer(response) == extract_answer(gold)
    elif reward_type == reasoning_gym.REWARD_TYPE:
        return reasoning_gym.score(extract_answer(response), gold)
    else:
        ok = _score_choice(response, gold)
    return 1.0 if ok else 0.0
