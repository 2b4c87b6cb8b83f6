"""``copd merge``: the result loads into the Megatron model and equals the weighted mean."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from copd_mega.ckpt.checkpoint import CheckpointError
from copd_mega.ckpt.offline import CheckpointReader, write_checkpoint
from copd_mega.ckpt.offline_merge import main, merge_checkpoints
from copd_mega.config import Config
from copd_mega.hf.mapping import megatron_specs
from copd_mega.models.gpt import padded_vocab_size
from multiproc import spawn


def make_checkpoint(path: Path, seed: int, vocab: int = 128) -> dict[str, torch.Tensor]:
    """A random model checkpoint of the default model config; returns its global tensors."""
    cfg = Config()
    cfg.model.vocab_size = vocab
    specs = megatron_specs(cfg.model, padded_vocab_size(vocab, 8, 1), torch.float32)
    g = torch.Generator().manual_seed(seed)
    tensors = {s.key: torch.randn(s.shape, generator=g) for s in specs}
    write_checkpoint(path, specs, lambda s, a, b: tensors[s.key][a:b], cfg, progress=False)
    return tensors


@pytest.fixture
def three(tmp_path) -> list[tuple[Path, dict[str, torch.Tensor]]]:
    return [(tmp_path / f"in{i}", make_checkpoint(tmp_path / f"in{i}", seed=i)) for i in range(3)]


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    r = CheckpointReader(path)
    return r.read({k: None for k in r.specs})


def test_weighted_merge_equals_weighted_mean(three, tmp_path):
    out = tmp_path / "merged"
    paths = [str(p) for p, _ in three]
    assert (
        main(["--inputs", *paths, "--weights", "1", "2", "1", "--out", str(out), "--no-progress"])
        == 0
    )
    got = _read_all(out)
    for key, t in got.items():
        want = 0.25 * three[0][1][key] + 0.5 * three[1][1][key] + 0.25 * three[2][1][key]
        torch.testing.assert_close(t, want, rtol=0, atol=1e-6)
    assert (out / "config.yaml").is_file()


def test_uniform_by_default_and_run_directories(three, tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for i, (p, _) in enumerate(three[:2]):
        p.rename(run / "final" / f"branch_{'ab'[i]}")
    merged = merge_checkpoints([run], tmp_path / "merged", progress=False)
    got = _read_all(merged)
    for key, t in got.items():
        torch.testing.assert_close(t, (three[0][1][key] + three[1][1][key]) / 2, rtol=0, atol=1e-6)


def test_mismatched_inputs_name_the_key_and_files(tmp_path, capsys):
    make_checkpoint(tmp_path / "a", seed=0, vocab=128)
    make_checkpoint(tmp_path / "b", seed=1, vocab=200)
    with pytest.raises(CheckpointError, match=r"embedding.word_embeddings.weight.*a.*b"):
        merge_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "m", progress=False)
    assert (
        main(
            ["--inputs", str(tmp_path / "a"), str(tmp_path / "nope"), "--out", str(tmp_path / "m")]
        )
        == 2
    )
    assert "nope" in capsys.readouterr().out
    with pytest.raises(ValueError, match="one per input"):
        merge_checkpoints([tmp_path / "a", tmp_path / "a"], tmp_path / "m", [1.0], progress=False)


def _load_and_resave(rank: int, src: str, dst: str) -> str:
    """Load ``src`` into a Megatron model (TP1) and save it again as ``dst``; then try loading it
    into an untied model and return the error message."""
    from copd_mega.ckpt.checkpoint import load_model, save_model
    from copd_mega.config import load_config
    from copd_mega.models.gpt import build_gpt
    from copd_mega.parallel.dist import init_distributed
    from copd_mega.parallel.topology import build_topology

    cfg = load_config(Path(src) / "config.yaml")
    init_distributed()
    topo = build_topology(cfg)
    gpt = build_gpt(cfg, topo)
    load_model(src, gpt, topo)
    save_model(dst, gpt, topo, cfg)
    untied = load_config(Path(src) / "config.yaml", ["model.tie_embeddings=false"])
    try:
        load_model(src, build_gpt(untied, topo), topo)
    except CheckpointError as e:
        return str(e)
    return "no error"


@pytest.mark.multiproc
def test_merged_checkpoint_loads_into_megatron(three, tmp_path):
    merged = merge_checkpoints([p for p, _ in three], tmp_path / "merged", progress=False)
    error = spawn(_load_and_resave, 1, str(merged), str(tmp_path / "resaved"))[0]
    assert str(merged) in error and "output_layer.weight" in error and "tie_embeddings" in error
    want, got = _read_all(merged), _read_all(tmp_path / "resaved")
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
