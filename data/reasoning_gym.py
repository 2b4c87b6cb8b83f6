"""reasoning-gym tasks as capabilities: ``rg:<task>`` names one of its procedural task families.

A branch's ``data`` may name ``rg:spell_backward`` (or a union, ``rg:spell_backward+rg:count_bits``);
the task's options (its dataset config's fields, e.g. ``min_word_len``) come from the config block
``data.reasoning_gym: {spell_backward: {min_word_len: 3, max_word_len: 5}}`` or, for
``copd data synth``, from ``--rg-options '{"min_word_len": 3}'``.

Samples: ``reasoning_gym.create_dataset(task, size, seed, **options)`` generates entries
(``question``, ``answer``, ``metadata``) deterministically from its seed; the dataset seed is a
hash of ``(task, split, data.seed)``. As for the built-in capabilities, the question's hash alone
(no seed) decides its split (one question in ``EVAL_BUCKETS`` is held out): an entry of the other
split is skipped, so train and eval never share a question for any pair of seeds. A sample is
``{"id", "prompt": question, "answer", "reward_type": "rg", "capability": "rg:<task>",
"rg_entry"}``, where ``rg_entry`` is the JSON of ``{"task", "options", "entry"}`` that
:func:`score` needs: the reward is the task's own ``score_answer(answer, entry)`` (some tasks
give partial credit in [0, 1]; a response counts as correct only at 1.0).

The package is imported inside the functions: it takes seconds to import and only runs that use
its tasks need it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator

PREFIX = "rg:"
REWARD_TYPE = "rg"
EVAL_BUCKETS = 8  # the same held-out share as the built-in capabilities
DRAWS_PER_SAMPLE = 64  # give up when a split needs more draws per sample than this


def is_task(capability: str) -> bool:
    """True for a reasoning-gym capability name (``rg:<task>``)."""
    return capability.startswith(PREFIX)


def task_of(capability: str) -> str:
    """``"rg:spell_backward"`` -> ``"spell_backward"``."""
    return capability[len(PREFIX) :]


def dir_name(capability: str) -> str:
    """The shard folder of a task (``rg_spell_backward``: no ``:`` in paths)."""
    return "rg_" + task_of(capability)


def task_names() -> list[str]:
    """Every task family reasoning-gym registers."""
    import reasoning_gym.factory as factory

    return sorted(factory.DATASETS)


@functools.lru_cache(maxsize=64)
def _dataset(task: str, options_json: str, seed: int, size: int):
    import reasoning_gym

    return reasoning_gym.create_dataset(task, size=size, seed=seed, **json.loads(options_json))


def check_task(capability: str, options: dict | None = None) -> None:
    """Raise ValueError naming the task or option to fix when ``capability`` cannot be made."""
    task = task_of(capability)
    if not is_task(capability) or task not in task_names():
        raise ValueError(
            f"{capability!r} is not a reasoning-gym task; write rg:<task> with one of "
            f"{', '.join(task_names())}"
        )
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"options of {capability!r} must be a mapping, got {options!r}")
    try:
        _dataset(task, json.dumps(options or {}, sort_keys=True), 0, 1)
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(
            f"{capability!r}: reasoning-gym refuses the options {options or {}}: {e}; fix "
            f"data.reasoning_gym.{task} (or --rg-options)"
        ) from e


def split_of(capability: str, question: str) -> str:
    """``"eval"`` for one question hash in ``EVAL_BUCKETS``, else ``"train"`` (no seed)."""
    digest = hashlib.blake2b(f"{capability}|{question}".encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "little") % EVAL_BUCKETS == 0 else "train"


def dataset_seed(capability: str, split: str, seed: int) -> int:
    """The reasoning-gym dataset seed of ``(capability, split, seed)`` (process-independent)."""
    digest = hashlib.blake2b(f"{capability}|{split}|{seed}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def make_samples(
    capability: str, split: str, seed: int, n: int, options: dict | None = None
) -> Iterator[dict]:
    """The first ``n`` samples of ``(capability, split, seed)``; the same arguments give the
    same samples. Raises ValueError when the task's question space is too small for the split.

    Returns:
        An iterator of sample dicts (module docstring), all str fields.
    """
    check_task(capability, options)
    task, opts = task_of(capability), json.dumps(options or {}, sort_keys=True)
    draws = max(n, 1) * DRAWS_PER_SAMPLE
    ds = _dataset(task, opts, dataset_seed(capability, split, seed), draws)
    made = 0
    for idx in range(draws):
        if made == n:
            return
        entry = ds[idx]
        if split_of(capability, entry["question"]) != split:
            continue
        gold = {"task": task, "options": json.loads(opts), "entry": _plain(entry)}
        yield {
            "id": f"{capability}-{split}-{seed}-{made}",
            "prompt": entry["question"],
            "answer": str(entry["answer"]),
            "reward_type": REWARD_TYPE,
            "capability": capability,
            "rg_entry": json.dumps(gold, sort_keys=True),
        }
        made += 1
    if made < n:
        raise ValueError(
            f"{capability}: only {made} of {n} {split} questions in {draws} draws; the task's "
            "question space is too small for a held-out split, widen its options"
        )


def _plain(entry: dict) -> dict:
    """The entry as JSON data; a value JSON cannot hold is an error naming the task's field."""
    try:
        return json.loads(json.dumps(entry))
    except TypeError as e:
        raise ValueError(f"reasoning-gym entry is not JSON data ({e}); pick another task") from e


def score(answer: str, gold: str) -> float:
    """The task's own ``score_answer(answer, entry)`` for ``gold`` = a sample's ``rg_entry``.

    Returns:
        A float in [0, 1] (1.0: right).
    """
    g = json.loads(gold)
    ds = _dataset(g["task"], json.dumps(g["options"], sort_keys=True), 0, 1)
    return float(ds.score_answer(answer, g["entry"]))
