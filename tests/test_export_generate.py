"""A model trained by copd, exported to Hugging Face, generates exactly what the trainer generates.

Pretrain a small base (a copd-trained checkpoint with a tokenizer), export it with
`copd export-hf`, load it with AutoModelForCausalLM + AutoTokenizer, and compare greedy
generation on held-out prompts with the trainer's own KV-cached greedy sampler.
"""

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
    from copd_mega.pretrain import run_pretrain

    return str(run_pretrain(load_config(None, overrides)))


def _trainer_greedy(rank: int, overrides: list[str], ckpt: str):
    from copd_mega.checkpoint import load_model
    from copd_mega.config import load_config
    from copd_mega.datasets import make_reader
    from copd_mega.model import build_gpt
    from copd_mega.rollout import MegatronSampler, SamplingParams
    from copd_mega.runtime import start

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

    from copd_mega.evaluate import main as eval_main

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
