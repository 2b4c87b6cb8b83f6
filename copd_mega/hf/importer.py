"""``copd import-hf --hf DIR --out CKPT [--tp N]``: an HF Llama/Qwen2/Qwen3 model as a checkpoint.

Reads ``config.json`` and the safetensors weights (one file or an index), maps names and layouts
to Megatron's (fused interleaved QKV, ``[gate; up]``, vocabulary padded with zero rows to a
multiple of ``pad_vocab_to * tp``) and writes an ordinary model checkpoint plus ``config.yaml``
whose ``model.*`` is filled from ``config.json`` (``parallel.tp`` set to ``--tp``). The checkpoint
loads at any TP/PP split; ``--tp`` only sets the padding. Tensors are read lazily, one layer at a
time. The tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` with its chat template,
``generation_config.json``, ...) are carried over when present.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from copd_mega.ckpt.offline import write_checkpoint
from copd_mega.config import Config, validate
from copd_mega.config_hf import UnsupportedHFModel
from copd_mega.hf import mapping as mp
from copd_mega.hf.families import O_PROJ_BIAS_FAMILIES, model_config_from_hf
from copd_mega.hf.hf_dir import DTYPES, SafetensorsDir, copy_tokenizer_files
from copd_mega.hf.llava import import_llava
from copd_mega.models.gpt import padded_vocab_size


def import_hf(
    hf_dir: str | Path,
    out: str | Path,
    *,
    tp: int = 1,
    pad_vocab_to: int = 8,
    dtype: str | None = None,
    progress: bool = True,
) -> Path:
    """Write model checkpoint ``out`` (weights + config.yaml) from HF directory ``hf_dir``."""
    hf_dir = Path(hf_dir)
    config_json = hf_dir / "config.json"
    if not config_json.is_file():
        raise FileNotFoundError(
            f"{hf_dir}: no config.json; point --hf at a Hugging Face model directory"
        )
    cfg = Config()
    cfg.model = model_config_from_hf(json.loads(config_json.read_text()), config_json, pad_vocab_to)
    cfg.parallel.tp = tp
    cfg.opd.top_k = min(cfg.opd.top_k, cfg.model.vocab_size)
    validate(cfg)
    st = SafetensorsDir(hf_dir)
    if not cfg.model.tie_embeddings and mp.HF_LM_HEAD not in st:
        raise KeyError(f"{hf_dir}: tie_word_embeddings=false but lm_head.weight is missing")
    if cfg.model.family in O_PROJ_BIAS_FAMILIES and cfg.model.qkv_bias:
        for i in range(cfg.model.num_layers):
            mp.check_o_proj_bias(st, i)
    torch_dtype = DTYPES[dtype] if dtype else st.get(mp.HF_NORM).dtype
    padded = padded_vocab_size(cfg.model.vocab_size, pad_vocab_to, tp)
    specs = mp.megatron_specs(cfg.model, padded, torch_dtype)
    tokenizer = hf_dir / "tokenizer.json"
    path = write_checkpoint(
        out,
        specs,
        mp.make_producer(st, cfg, torch_dtype),
        cfg,
        tokenizer=tokenizer if tokenizer.is_file() else None,
        label="import",
        progress=progress,
    )
    copy_tokenizer_files(hf_dir, path)
    return path


def _model_type(hf_dir: str) -> str | None:
    """``model_type`` of an HF directory's config.json (None when unreadable: import_hf says why)."""
    try:
        return json.loads((Path(hf_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def import_model(hf_dir: str | Path, out: str | Path, **kwargs) -> Path:
    """:func:`import_llava` for an HF LLaVA directory, :func:`import_hf` for a text model."""
    if _model_type(str(hf_dir)) == "llava":
        return import_llava(hf_dir, out, **kwargs)
    return import_hf(hf_dir, out, **kwargs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="copd import-hf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="checkpoint directory to write (must not exist)")
    ap.add_argument("--tp", type=int, default=1, help="TP size the vocabulary is padded for")
    ap.add_argument("--pad-vocab-to", type=int, default=8)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as stored")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        kwargs = dict(
            tp=args.tp, pad_vocab_to=args.pad_vocab_to, dtype=args.dtype,
            progress=not args.no_progress,
        )  # fmt: skip
        path = import_model(args.hf, args.out, **kwargs)
    except (UnsupportedHFModel, FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"copd import-hf: {e}")
        return 2
    print(f"wrote {path}")
    return 0
