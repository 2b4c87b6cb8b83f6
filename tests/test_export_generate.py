"""A model trained by copd, exported to Hugging Face, generates exactly what the trainer generates.

Pretrain a small base (a copd-trained checkpoint with a tokenizer), export it with
`copd export-hf`, load it with AutoModelForCausalLM + AutoTokenizer, and compare greedy
generation on held-out prompts with the trainer's own KV-cached greedy sampler.
"""

import json

import pytest
import torch

from multiproc import spawn

pytestmark = pytest.mark.multiproc

PRETRAIN = [
    "branches=[{name: arith, data: arith}]", "teaching.graph=none",
    "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=2",
    "model.tie_embeddings=false", "model.max_seq_length=48", "data.n_train=512",
    "data.n_eval=16", "pretrain.steps=150", "pretrain.batch_size=32", "pretrain.lr=3e-3",
    "pretrain.eval_every=0", "pretrain.eval_limit=16", "rollout.max_new_tokens=6",
]  # fmt: skip


def _pretrain(rank: int, overrides: list[str]):
    from copd_mega.config import load_config
    from copd_mega.trainer.pretrain import run_pretrain

    return str(run_pretrain(load_config(None, overrides)))


def _trainer_greedy(rank: int, overrides: list[str], ckpt: str):
    from copd_mega.ckpt.checkpoint import load_model
    from copd_mega.config import load_config
    from copd_mega.launch.datasets import make_reader
    from copd_mega.launch.runtime import start
    from copd_mega.models.gpt import build_gpt
    from copd_mega.rl.rollout import MegatronSampler
    from copd_mega.rl.sampling import SamplingParams

    cfg = load_config(None, overrides)
    rt = start(cfg)
    model = build_gpt(cfg, rt.topo)
    load_model(ckpt, model, rt.topo)
    samples = make_reader(cfg, "arith", "eval", 0, 1).next_batch(16)
    prompts = [rt.codec.prompt_ids(s["prompt"]) for s in samples]
    params = SamplingParams(6, 0.0, 1.0, 0, rt.codec.eos, rt.codec.pad)
    rolls = MegatronSampler(model, rt.topo, cfg).generate(prompts, params, 0)
    return {"prompts": [s["prompt"] for s in samples], "responses": rolls.responses()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base model pretrained by copd (module-wide), with the overrides that made it."""
    run = tmp_path_factory.mktemp("run")
    overrides = [*PRETRAIN, f"run_dir={run}"]
    (base,) = spawn(_pretrain, 1, overrides)
    return base, overrides, run


def _copd_eval(rank: int, argv: list[str]):
    import contextlib
    import io

    from copd_mega.trainer.evaluate import main as eval_main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = eval_main(argv)
    return code, buf.getvalue()


def test_copd_eval_prints_a_table(trained, tmp_path):
    base, overrides, run = trained
    cfg_file = tmp_path / "c.yaml"
    from copd_mega.config import load_config, save_config

    save_config(load_config(None, overrides), cfg_file)
    code, out = spawn(_copd_eval, 1, ["--config", str(cfg_file), "--ckpt", base, "--limit", "8"])[0]
    assert code == 0
    header = [line for line in out.splitlines() if line.startswith("model ") and "mean" in line]
    assert header and "arith" in header[0]
    row = [line for line in out.splitlines() if line.startswith(base)]
    assert row and 0.0 <= float(row[0].split()[-1]) <= 100.0


def test_exported_model_generates_like_the_trainer(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from copd_mega.hf.export import main as export_main

    base, overrides, _ = trained
    hf_dir = tmp_path / "hf"
    assert export_main(["--ckpt", base, "--out", str(hf_dir), "--no-progress"]) == 0
    (ours,) = spawn(_trainer_greedy, 1, overrides, base)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    distinct = set()
    for prompt, expected in zip(ours["prompts"], ours["responses"], strict=True):
        ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        got = out[0, len(ids) :].tolist()
        if tok.eos_token_id in got:  # HF pads after EOS; the trainer stops there
            got = got[: got.index(tok.eos_token_id) + 1]
        assert got == expected, (prompt, got, expected)
        distinct.add(tuple(got))
    assert len(distinct) > 1, "a trained model answers different prompts differently"


# ----------------------------------------------------------------------------- from HF and back

HF_RUN = """\
run_dir: {run}
checkpoint: {{init_from_hf: {hf}}}
branches: [{{name: arith, data: arith}}, {{name: sort, data: sort}}]
data: {{n_train: 64, n_eval: 8, system_prompt: "You are a careful solver."}}
rollout: {{prompts_per_step: 2, max_new_tokens: 6}}
grpo: {{group_size: 2}}
opd: {{prompts_per_peer: 2, samples_per_prompt: 1}}
schedule: {{cycles: 1, rl_steps: 1, opd_steps: 1}}
optim: {{lr: 0.003}}
logging: {{progress: false}}
"""


def _copd(rank: int, argv: list[str]) -> int:
    from copd_mega.cli import main

    return main(argv)


def _trainer_chat_greedy(rank: int, config: str, ckpt: str):
    """The trainer's own greedy generation on held-out prompts of both capabilities, one rank
    (the run's config with one branch: same run dir, so the cached HF conversion is reused)."""
    from copd_mega.ckpt.checkpoint import load_model
    from copd_mega.config import load_config
    from copd_mega.launch.datasets import make_reader
    from copd_mega.launch.runtime import start
    from copd_mega.models.gpt import build_gpt
    from copd_mega.rl.rollout import MegatronSampler
    from copd_mega.rl.sampling import SamplingParams

    cfg = load_config(config, ["branches=[{name: arith, data: arith}]", "teaching.graph=none"])
    rt = start(cfg)
    model = build_gpt(cfg, rt.topo)
    load_model(ckpt, model, rt.topo)
    samples = [s for cap in ("arith", "sort")
               for s in make_reader(cfg, cap, "eval", 0, 1).next_batch(4)]  # fmt: skip
    prompts = [rt.codec.prompt_ids(s["prompt"]) for s in samples]
    params = SamplingParams(8, 0.0, 1.0, 0, rt.codec.eos, rt.codec.pad)
    rolls = MegatronSampler(model, rt.topo, cfg).generate(prompts, params, 0)
    return {"prompts": [s["prompt"] for s in samples], "ids": prompts,
            "responses": rolls.responses(), "eos": rt.codec.eos}  # fmt: skip


def test_hf_qwen3_through_copd_and_back(tmp_path):
    """A tiny random Qwen3 with its own BPE tokenizer and chat template: `copd train` from it
    (2 CoPD branches, no model.* keys), `copd export-hf`, and transformers' greedy generation
    from apply_chat_template prompts equals the trainer's."""
    from hf_tiny import make_qwen3_dir
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = make_qwen3_dir(tmp_path / "qwen3")
    config = tmp_path / "run.yaml"
    config.write_text(HF_RUN.format(run=tmp_path / "run", hf=hf))
    assert spawn(_copd, 2, ["train", "--config", str(config)]) == [0, 0]
    final = tmp_path / "run" / "final" / "model"
    assert (final / "chat_template.jinja").is_file()
    out = tmp_path / "out"
    assert (
        spawn(_copd, 1, ["export-hf", "--ckpt", str(final), "--out", str(out), "--no-progress"])[0]
        == 0
    )
    (ours,) = spawn(_trainer_chat_greedy, 1, str(config), str(final))

    rows = [json.loads(line) for b in ("arith", "sort")
            for line in (tmp_path / "run" / "metrics" / f"{b}.jsonl").read_text().splitlines()]  # fmt: skip
    assert sorted((r["branch"], r["phase"]) for r in rows) == [
        ("arith", "opd"), ("arith", "rl"), ("sort", "opd"), ("sort", "rl")]  # fmt: skip
    # Both branches start from the HF weights: identical peers (overlap 1, delta 0). A random
    # model earns no reward, so every advantage is 0 and Adam moves nothing: the exported model
    # is the HF one, bit for bit, after Megatron's training state, merge, save and export.
    opd = [r for r in rows if r["phase"] == "opd"]
    assert all(r["overlap"] == 1.0 and r["reward"] == 0.0 for r in opd)
    before, after = load_file(str(hf / "model.safetensors")), _exported(out)
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert tuple(model.generation_config.eos_token_id) == ours["eos"]
    lengths = []
    for prompt, ids, expected in zip(ours["prompts"], ours["ids"], ours["responses"], strict=True):
        turns = [{"role": "system", "content": "You are a careful solver."},
                 {"role": "user", "content": prompt}]  # fmt: skip
        x = tok.apply_chat_template(
            turns, add_generation_prompt=True, enable_thinking=False, return_tensors="pt",
            return_dict=True,
        )["input_ids"]  # fmt: skip
        assert x[0].tolist() == ids  # the trainer saw the prompts an HF user renders
        gen = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False
        )
        got = gen[0, x.shape[1] :].tolist()
        end = next((i for i, t in enumerate(got) if t in ours["eos"]), None)
        got = got if end is None else got[: end + 1]  # HF pads after an end id; the trainer stops
        assert got == expected, (prompt, got, expected)
        lengths.append(len(got))
    assert max(lengths) > 1, "the comparison covers more than one token"


def _exported(out) -> dict:
    from safetensors.torch import load_file

    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for name in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(out / name)))
    return tensors
