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
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from copd_mega.ckpt.checkpoint import CheckpointError
from copd_mega.ckpt.offline import CheckpointReader, progress_bar
from copd_mega.hf import mapping as mp
from copd_mega.hf.families import O_PROJ_BIAS_FAMILIES, hf_config
from copd_mega.hf.init_from_hf import copy_tokenizer_files

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPECIAL = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}


def parse_size(text: str) -> int:
    """``"2GB"``, ``"500MB"``, ``"4096"`` -> bytes."""
    units = {"GB": 2**30, "MB": 2**20, "KB": 2**10, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * mult)
    if t.isdigit():
        return int(t)
    raise ValueError(f"--max-shard-size {text!r}: write e.g. 2GB, 500MB or a byte count")


class ShardWriter:
    """Collects tensors into safetensors files of at most ``max_bytes`` (a bigger tensor alone)."""

    def __init__(self, out: Path, max_bytes: int, on_add=lambda nbytes: None):
        self.out, self.max_bytes, self.on_add = out, max_bytes, on_add
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self._pending_bytes() + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.total += size
        self.on_add(size)

    def _pending_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pending.values())

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"shard-{len(self.files):05d}.tmp"
        save_file(self.pending, str(self.out / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending = {}

    def finish(self) -> None:
        """Rename shards to HF's ``model-0000i-of-0000N.safetensors`` and write the index."""
        if self.pending:
            self._flush()
        n, weight_map = len(self.files), {}
        for i, (tmp, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / tmp, self.out / final)
            weight_map.update({name: final for name in names})
        index = {
            "metadata": {"total_size": self.total},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_tensors(reader: CheckpointReader, writer: ShardWriter, dtype: torch.dtype) -> None:
    """Stream every HF tensor of the checkpoint into ``writer`` (layer by layer)."""
    m = reader.config().model
    vocab = m.vocab_size

    def rows(key: str) -> torch.Tensor:  # embedding/output with the padded rows dropped
        return reader.read({key: (0, vocab)})[key].to(dtype)

    writer.add(mp.HF_EMBEDDING, rows(mp.EMBEDDING))
    layer_keys = [k for k in reader.specs if k.startswith("decoder.layers.")]
    for i in range(m.num_layers):
        layer = {k: t[0] for k, t in reader.read({k: (i, i + 1) for k in layer_keys}).items()}
        hf = mp.layer_to_hf({k: t.to(dtype) for k, t in layer.items()}, i, m)
        if m.qkv_bias and m.family in O_PROJ_BIAS_FAMILIES:  # attention_bias also biases o_proj
            hf[mp.hf_layer(i, "self_attn.o_proj.bias")] = torch.zeros(m.hidden_size, dtype=dtype)
        for name, t in hf.items():
            writer.add(name, t)
    writer.add(mp.HF_NORM, reader.read({mp.FINAL_NORM: None})[mp.FINAL_NORM].to(dtype))
    if not m.tie_embeddings:
        writer.add(mp.HF_LM_HEAD, rows(mp.OUTPUT))


def export_tokenizer(tokenizer_json: Path | None, out: Path) -> dict[str, int | None]:
    """Save the tokenizer (special tokens ``<bos>``/``<eos>``/``<pad>`` when in its vocabulary)."""
    if tokenizer_json is None:
        return {}
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json))
    vocab = tok.get_vocab()
    present = {f"{role}_token": tok_str for role, tok_str in SPECIAL.items() if tok_str in vocab}
    if present:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), **present)
    tok.save_pretrained(str(out))
    return {role: vocab.get(tok_str) for role, tok_str in SPECIAL.items()}


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
            export_tensors(reader, writer, torch_dtype)
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


@contextmanager
def staged_output(out: Path):
    """Yield a folder beside ``out`` to write into; it becomes ``out`` only when the block ends
    without an error (``out`` must be absent or empty; a failed export leaves nothing there)."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; remove it or choose another --out")
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # an export that died
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def export_hf_tokenizer(ckpt: Path, out: Path) -> dict[str, int | None]:
    """Copy the HF tokenizer files a checkpoint carries (chat template, generation config)."""
    from transformers import AutoTokenizer

    copy_tokenizer_files(ckpt, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="copd export-hf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="model checkpoint directory")
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
        if CheckpointReader(args.ckpt).config().vision.enabled:  # LlavaForConditionalGeneration
            from copd_mega.hf.llava import export_llava

            path = export_llava(args.ckpt, args.out, image_token_id=args.image_token_id, **kwargs)
        else:
            path = export_hf(args.ckpt, args.out, **kwargs)
    except (CheckpointError, ValueError, FileExistsError) as e:
        print(f"copd export-hf: {e}")
        return 2
    print(f"wrote {path}")
    return 0
