"""HF import/export round trips on tiny random Llama, Qwen2 and Qwen3 models (built from configs,
no download). The Qwen3 models have QK-norm and a head_dim that is not hidden_size / heads.

Import -> Megatron logits equal the HF logits (first ``vocab_size`` columns, fp32) at TP1 and TP2;
a checkpoint that Megatron saved at TP2 or PP2 exports back to the original HF tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from multiproc import spawn

VOCAB = 100  # not a multiple of 8*TP: the Megatron side pads (104 at TP1, 112 at TP2)
VARIANTS = {
    "llama_gqa_untied": ("llama", False),
    "llama_gqa_tied": ("llama", True),
    "qwen2_gqa_untied": ("qwen2", False),
    "qwen2_gqa_tied": ("qwen2", True),
    "qwen3_gqa_untied": ("qwen3", False),
    "qwen3_gqa_tied": ("qwen3", True),
}
ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
TOKENS = torch.tensor([[1, 5, 9, 33, 97, 2, 64, 80], [7, 7, 3, 99, 0, 45, 12, 31]])


def make_hf_model(family: str, tied: bool, seed: int = 0):
    """A tiny random HF model: GQA (4 heads, 2 KV heads), every weight perturbed (norms too).
    Qwen3: QK-norm, head_dim 12 (4 heads x 12 = 48 != hidden 32), rope_theta 1e6."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    extra = {"head_dim": 12} if family == "qwen3" else {}
    cfg = cls(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied, rms_norm_eps=1e-5, **extra,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 if family == "llama" else 1e6},
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for name in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(out / name)))
    return tensors


TWO_TP1_BRANCHES = 'branches=[{"name": "a", "data": "arith"}, {"name": "b", "data": "arith"}]'
# also saved by Megatron at TP2 and at PP2
RESAVED = ["llama_gqa_untied", "qwen2_gqa_tied", "qwen3_gqa_untied"]


def _megatron_worker(rank: int, ckpts: dict[str, str], save_root: str) -> dict:
    """On 2 ranks: each checkpoint loaded at TP1 (two one-rank branches) and at TP2 (one branch),
    full-vocab logits; the RESAVED ones are saved again from the TP2 model and from a PP2 one."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from copd_mega.ckpt.checkpoint import load_model, save_model
    from copd_mega.config import load_config
    from copd_mega.models.gpt import build_gpt
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    init_distributed()
    splits = {1: [TWO_TP1_BRANCHES], 2: ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}
    topos: dict = {}
    logits: dict = {1: {}, 2: {}}
    for name, ckpt in ckpts.items():
        for split, over in splits.items():
            if split == "pp2" and name not in RESAVED:
                continue
            cfg = load_config(Path(ckpt) / "config.yaml", over)
            if split not in topos:  # group creation: same order on both ranks
                topos[split] = build_topology(cfg)
            topo = topos[split]
            gpt = build_gpt(cfg, topo)
            load_model(ckpt, gpt, topo)
            if split != "pp2":
                pos = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
                with torch.no_grad():
                    out = gpt(TOKENS, pos, None)
                out = gather_from_tensor_model_parallel_region(out, group=topo.pg.tp)
                logits[split][name] = out[..., :VOCAB].clone()
            if name in RESAVED and split != 1:
                save_model(
                    Path(save_root) / f"{'tp2' if split == 2 else split}_{name}", gpt, topo, cfg
                )
    return logits


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, tuple[Path, Path, torch.Tensor]]:
    """name -> (HF dir, imported checkpoint, HF logits [2, 8, VOCAB])."""
    from copd_mega.hf.importer import import_hf

    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (family, tied) in VARIANTS.items():
        model = make_hf_model(family, tied)
        model.save_pretrained(root / f"hf_{name}")
        with torch.no_grad():
            ref = model(TOKENS).logits
        out[name] = (root / f"hf_{name}", import_hf(root / f"hf_{name}", root / f"ck_{name}"), ref)
    return out


@pytest.fixture(scope="module")
def megatron_runs(imported, tmp_path_factory) -> tuple[dict, Path]:
    """({tp: {name: logits}}, directory of checkpoints Megatron re-saved at TP2 and PP2)."""
    saved = tmp_path_factory.mktemp("resaved")
    ckpts = {name: str(ck) for name, (_, ck, _) in imported.items()}
    runs = spawn(_megatron_worker, 2, ckpts, str(saved))
    for tp in (1, 2):  # both ranks see the same logits
        assert all(torch.equal(runs[0][tp][n], runs[1][tp][n]) for n in VARIANTS)
    return runs[0], saved


@pytest.mark.multiproc
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_imported_logits_match_hf(imported, megatron_runs, name, tp):
    ref = imported[name][2]
    got = megatron_runs[0][tp][name]
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_gives_back_original_tensors(imported, tmp_path, name):
    from transformers import AutoModelForCausalLM

    from copd_mega.hf.export import export_hf

    hf_dir, ckpt, ref = imported[name]
    out = export_hf(ckpt, tmp_path / "out", max_shard_bytes=30_000)
    original = hf_tensors_single(hf_dir)
    exported = hf_tensors(out)
    assert set(exported) == set(original)
    for key, t in original.items():
        assert torch.equal(exported[key], t), key
    assert (
        len(
            set(
                json.loads((out / "model.safetensors.index.json").read_text())[
                    "weight_map"
                ].values()
            )
        )
        > 1
    )
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCH[VARIANTS[name][0]]]
    assert config["tie_word_embeddings"] == VARIANTS[name][1]
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    with torch.no_grad():
        assert (reloaded(TOKENS).logits - ref).abs().max().item() < 1e-5


def hf_tensors_single(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(hf_dir / "model.safetensors"))


@pytest.mark.multiproc
@pytest.mark.parametrize("split", ["tp2", "pp2"])
@pytest.mark.parametrize("name", RESAVED)
def test_export_of_megatron_saved_split(imported, megatron_runs, tmp_path, name, split):
    """Megatron saved the model at TP2 / PP2 (2 ranks); export reads the global tensors."""
    from copd_mega.hf.export import export_hf

    out = export_hf(megatron_runs[1] / f"{split}_{name}", tmp_path / "out")
    original = hf_tensors_single(imported[name][0])
    exported = hf_tensors(out)
    assert set(exported) == set(original)
    for key, t in original.items():
        assert torch.equal(exported[key], t), key


def _word_level_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {
        tok: i for i, tok in enumerate(["<pad>", "<bos>", "<eos>"] + [f"w{i}" for i in range(97)])
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_tokenizer_and_generation_config_are_exported(tmp_path):
    from transformers import AutoTokenizer

    from copd_mega.hf.export import export_hf
    from copd_mega.hf.importer import import_hf

    make_hf_model("llama", True).save_pretrained(tmp_path / "hf")
    _word_level_tokenizer(tmp_path / "hf" / "tokenizer.json")
    ckpt = import_hf(tmp_path / "hf", tmp_path / "ck", progress=False)
    assert (ckpt / "tokenizer.json").is_file()
    out = export_hf(ckpt, tmp_path / "out", progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert tok("w3 w5")["input_ids"] == [6, 8]
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (1, 2, VOCAB)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_bias_needs_zero_o_proj_bias(tmp_path, family):
    """HF Llama's and Qwen3's attention_bias biases q/k/v and o_proj; only a zero o_proj bias is
    importable, and export writes it back as zeros (exact)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from copd_mega.config_hf import UnsupportedHFModel
    from copd_mega.hf.export import export_hf
    from copd_mega.hf.importer import import_hf

    cfg = {"llama": LlamaConfig, "qwen3": Qwen3Config}[family](
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, head_dim=8,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.zeros_like(p) if "o_proj.bias" in name else torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "zero")
    out = export_hf(import_hf(tmp_path / "zero", tmp_path / "ck", progress=False), tmp_path / "out")
    original = hf_tensors_single(tmp_path / "zero")
    assert all(torch.equal(hf_tensors(out)[k], v) for k, v in original.items())
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.bias.fill_(0.5)
    model.save_pretrained(tmp_path / "nonzero")
    with pytest.raises(UnsupportedHFModel, match="layers.1.self_attn.o_proj.bias is non-zero"):
        import_hf(tmp_path / "nonzero", tmp_path / "ck2", progress=False)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"mlp_bias": True}, "mlp_bias"),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
            "rope type",
        ),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "mistral"}, "model_type='mistral'"),
    ],
)
def test_import_refuses_what_the_model_cannot_express(tmp_path, change, message):
    from copd_mega.config_hf import UnsupportedHFModel
    from copd_mega.hf.importer import import_hf

    make_hf_model("llama", False).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UnsupportedHFModel, match=message):
        import_hf(tmp_path / "hf", tmp_path / "ck", progress=False)
