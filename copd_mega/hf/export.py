"""``copd export-hf --ckpt M --out DIR``: a model checkpoint as a Hugging Face model directory.

Writes ``config.json`` (``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM``),
``generation_config.json``,
``model-0000i-of-0000N.safetensors`` shards of at most ``--max-shard-size`` with
``model.safetensors.index.json``, and the tokenizer when the checkpoint carries ``tokenizer.json``
(with the HF tokenizer files a run from ``checkpoint.init_from_hf`` keeps: chat template,
``generation_config.json``, copied as they are).
The checkpoint's global tensors are read layer by layer (any TP/PP split wrote them), the fused
QKV and gate/up are split, and the padded vocabulary is trimmed to ``model.vocab_size``: memory
holds one layer plus the shard being filled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from copd_mega.ckpt.checkpoint import CheckpointError
from copd_mega.ckpt.offline import CheckpointReader
from copd_mega.ckpt.targets import resolve_model_dir
from copd_mega.files.disk_full import disk_full, disk_full_message
from copd_mega.hf import mapping as mp
from copd_mega.hf.families import O_PROJ_BIAS_FAMILIES, hf_config
from copd_mega.hf.hf_dir import (
    DTYPES,
    SPECIAL,
    ShardWriter,
    copy_tokenizer_files,
    export_tokenizer,
    parse_size,
    staged_output,
)
from copd_mega.hf.llava import export_llava
from copd_mega.report.progress import progress_bar


def hf_nbytes(reader: CheckpointReader, dtype: torch.dtype) -> int:
    """Bytes of the HF tensors that :func:`export_tensors` writes (for the progress bar)."""
    m = reader.config().model
    numel = sum(int(torch.Size(s.shape).numel()) for s in reader.specs.values())
    padded_rows = reader.specs[mp.EMBEDDING].shape[0] - m.vocab_size
    numel -= padded_rows * m.hidden_size * (1 if m.tie_embeddings else 2)
    numel += m.num_layers * m.hidden_size if m.qkv_bias and m.family in O_PROJ_BIAS_FAMILIES else 0
    return numel * dtype.itemsize


def export_hf(
    ckpt: str | Path,
    out: str | Path,
    *,
    max_shard_bytes: int = 2 * 2**30,
    dtype: str | None = None,
    progress: bool = True,
) -> Path:
    """Write the HF model directory ``out`` from model checkpoint ``ckpt``."""
    from transformers import GenerationConfig

    reader = CheckpointReader(ckpt)
    m = reader.config().model
    torch_dtype = DTYPES[dtype] if dtype else reader.specs[mp.EMBEDDING].dtype
    with staged_output(Path(out)) as tmp:
        with progress_bar("export", hf_nbytes(reader, torch_dtype), progress) as advance:
            writer = ShardWriter(tmp, max_shard_bytes, advance)
            mp.export_tensors(reader, writer, torch_dtype)
            writer.finish()
        if (reader.path / "tokenizer_config.json").is_file():  # an HF tokenizer came with it
            token_ids = export_hf_tokenizer(reader.path, tmp)
        else:
            token_ids = export_tokenizer(reader.tokenizer, tmp)
        hf_config(m, str(torch_dtype).removeprefix("torch."), token_ids).save_pretrained(str(tmp))
        if not (tmp / "generation_config.json").is_file():
            gen = {
                f"{r}_token_id": token_ids.get(r) for r in SPECIAL if token_ids.get(r) is not None
            }
            GenerationConfig(**gen).save_pretrained(str(tmp))
    return Path(out)


def export_hf_tokenizer(ckpt: Path, out: Path) -> dict[str, int | None]:
    """Copy the HF tokenizer files a checkpoint carries (chat template, generation config)."""
    from transformers import AutoTokenizer

    copy_tokenizer_files(ckpt, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="copd export-hf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="a model checkpoint, a run directory (its "
                    "merged final/model), a step folder or RUN/checkpoints/latest")  # fmt: skip
    ap.add_argument("--branch", default=None, help="export this branch of the run or step")
    ap.add_argument("--out", required=True, help="HF model directory to write (new or empty)")
    ap.add_argument("--max-shard-size", default="2GB", help="per safetensors file, e.g. 2GB, 500MB")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as stored")
    ap.add_argument("--image-token-id", type=int, default=None,
                    help="vision checkpoints: HF image_token_index (default: the tokenizer's "
                    "<image>, else the one kept at import)")  # fmt: skip
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        kwargs = dict(
            max_shard_bytes=parse_size(args.max_shard_size), dtype=args.dtype,
            progress=not args.no_progress,
        )  # fmt: skip
        ckpt = resolve_model_dir(args.ckpt, args.branch)
        if ckpt != Path(args.ckpt):
            print(f"exporting {ckpt}", flush=True)
        if CheckpointReader(ckpt).config().vision.enabled:  # LlavaForConditionalGeneration
            path = export_llava(ckpt, args.out, image_token_id=args.image_token_id, **kwargs)
        else:
            path = export_hf(ckpt, args.out, **kwargs)
    except (CheckpointError, ValueError, FileExistsError) as e:
        print(f"copd export-hf: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk: OSError, or safetensors' SafetensorError
        if not disk_full(e, args.out):
            raise
        kept = f"nothing was lost: {args.out} was not created, the partial export removed"
        print(f"copd export-hf: error: {disk_full_message(args.out, 'the export', kept)}",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"wrote {path}")
    return 0
