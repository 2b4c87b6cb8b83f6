"""reasoning-gym tasks as capabilities: samples, shards, rewards from the task's own checker, the
character tokenizer's coverage, and a 2-branch run on two tasks."""

from __future__ import annotations

import json

import pytest
import reasoning_gym
from lost_cases import TINY, copd, write_config

from copd_mega.config import ConfigError, load_config
from copd_mega.data import reasoning_gym as rgdata
from copd_mega.data.cli import main as data_main
from copd_mega.data.reader import ShardReader
from copd_mega.data.tokenizer import build_tokenizer, save_tokenizer
from copd_mega.launch.datasets import PromptCodec, check_branch_data
from copd_mega.rl.reward_pool import RewardPool
from copd_mega.rl.rewards import gold_of

SPELL = {"min_word_len": 3, "max_word_len": 5}
ARITH = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2,
         "operators": ["+", "-"], "allow_parentheses": False, "allow_negation": False}  # fmt: skip
TASKS = [("rg:spell_backward", SPELL), ("rg:basic_arithmetic", ARITH), ("rg:count_bits", {})]


def test_samples_are_deterministic_and_splits_never_share_a_question():
    for cap, opts in TASKS:
        a = list(rgdata.make_samples(cap, "train", 7, 200, opts))
        assert a == list(rgdata.make_samples(cap, "train", 7, 200, opts))
        assert a != list(rgdata.make_samples(cap, "train", 8, 200, opts))
        held = list(rgdata.make_samples(cap, "eval", 7, 50, opts))
        other = list(rgdata.make_samples(cap, "train", 99, 400, opts))
        assert not {s["prompt"] for s in held} & {s["prompt"] for s in a + other}
        assert all(s["capability"] == cap and s["reward_type"] == "rg" for s in a)


def test_synth_writes_shards_the_reader_reads_back(tmp_path):
    argv = ["synth", "--capability", "rg:spell_backward", "--rg-options", json.dumps(SPELL),
            "--out", str(tmp_path), "--seed", "3", "--n-train", "20", "--n-eval", "8"]  # fmt: skip
    assert data_main(argv) == 0
    reader = ShardReader(sorted((tmp_path / "rg_spell_backward").glob("eval-*.tar")),
                         dp_rank=0, dp_size=1, seed=0, shuffle=False)  # fmt: skip
    got = reader.next_batch(8)
    want = list(rgdata.make_samples("rg:spell_backward", "eval", 3, 8, SPELL))
    assert [s["prompt"] for s in got] == [s["prompt"] for s in want]
    assert [gold_of(s) for s in got] == [s["rg_entry"] for s in want]
    assert data_main(["synth", "--capability", "rg:nope", "--out", str(tmp_path)]) == 1
    bad = ["synth", "--capability", "rg:spell_backward", "--rg-options", '{"bogus": 1}',
           "--out", str(tmp_path), "--overwrite"]  # fmt: skip
    assert data_main(bad) == 1


def _responses(entry: dict) -> list[str]:
    """Right, wrong, partly right and malformed answers to one entry."""
    gold = entry["answer"]
    return [gold, f"  {gold}\n", "Answer: " + gold, gold[:-1] + ("x" if gold[-1] != "x" else "y"),
            gold[: len(gold) // 2], "9" * 40, "", "<think>unfinished", "\\boxed{", gold + gold]  # fmt: skip


def test_rewards_in_the_worker_pool_are_the_tasks_own_score_answer():
    items, expected = [], []
    for cap, opts in TASKS:
        task = rgdata.task_of(cap)
        ds = reasoning_gym.create_dataset(task, size=1, seed=0, **opts)
        for s in rgdata.make_samples(cap, "eval", 1, 4, opts):
            entry = json.loads(s["rg_entry"])["entry"]
            for r in _responses(entry):
                items.append((r, gold_of(s), s["reward_type"]))
                answer = r.strip().removeprefix("Answer: ")  # what the answer extraction reads
                answer = "" if r.startswith("<think>") else answer
                expected.append(float(ds.score_answer(answer, entry)))
    with RewardPool(num_workers=2, timeout_s=30.0) as pool:
        scores, counts = pool.score_with_metrics(items)
    assert counts["ok"] == len(items) and counts["timeout"] == counts["error"] == 0
    assert scores == pytest.approx(expected)
    assert 1.0 in scores and 0.0 in scores and any(0 < x < 1 for x in scores)  # partial credit


def test_the_character_tokenizer_refuses_characters_it_lacks(tmp_path):
    codec = PromptCodec(save_tokenizer(build_tokenizer(), tmp_path / "tok.json"))
    assert codec.decode(codec.prompt_ids("Calculate 24 - 25.")[1:]) == "Calculate 24 - 25."
    with pytest.raises(ConfigError, match=r"no token for \['×'\].*init_from_hf"):
        codec.prompt_ids("Calculate 2 × 3.")
    with pytest.raises(ConfigError, match="no token for"):
        codec.answer_ids("é")


def test_config_errors_name_the_setting(tmp_path):
    def check(data: str, extra: list[str]):
        cfg = load_config(None, [f"branches=[{{name: a, data: {data}}}]", *extra])
        with pytest.raises(ConfigError) as e:
            check_branch_data(cfg, tmp_path)
        return str(e.value)

    assert "branches.0.data" in check("rg:nope", []) and "spell_backward" in check("rg:nope", [])
    assert "data.reasoning_gym.spell_backward" in check(
        "rg:spell_backward", ["data.reasoning_gym={spell_backward: {bogus: 1}}"]
    )
    assert "data.reasoning_gym.gcd" in check("rg:spell_backward", ["data.reasoning_gym={gcd: {}}"])


@pytest.mark.multiproc
def test_two_branches_on_two_reasoning_gym_tasks_train_and_eval_json_names_them(tmp_path):
    run = tmp_path / "run"
    opts = json.dumps({"spell_backward": SPELL, "basic_arithmetic": ARITH})
    cfg = write_config(tmp_path / "c.yaml", [
        *TINY, "schedule.mode=copd", f"run_dir={run}", "model.max_seq_length=64",
        "data.max_prompt_tokens=56", f"data.reasoning_gym={opts}",
        "branches=[{name: spell, data: 'rg:spell_backward'}, {name: arith, data: 'rg:basic_arithmetic'}]",
    ])  # fmt: skip
    res = copd("train", "--config", str(cfg), ranks=2, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    caps = ["rg:basic_arithmetic", "rg:spell_backward"]
    table = json.loads((run / "eval.json").read_text())
    for row in ("branch spell", "branch arith", "merged"):
        assert sorted(table[row]) == caps
    problems = json.loads((run / "eval_problems.json").read_text())
    for row in ("branch spell", "branch arith", "merged"):
        for cap in caps:
            ids = problems[row][cap]
            assert len(ids) == 4 and set(ids.values()) <= {0, 1}
            assert all(i.startswith(f"{cap}-eval-") for i in ids)
            assert sum(ids.values()) / 4 == pytest.approx(table[row][cap])
    for branch in ("spell", "arith"):
        text = (run / "metrics" / f"{branch}.jsonl").read_text()
        rows = [json.loads(x) for x in text.splitlines()]
        steps = [r for r in rows if "reward" in r]
        assert len(steps) == 3 and all(0.0 <= r["reward"] <= 1.0 for r in steps)
        assert all(r["reward_timeouts"] == 0 and r["reward_errors"] == 0 for r in steps)
