"""Hugging Face model directories on disk: safetensors shards read lazily and written in
bounded files, output staged beside its final place, and the tokenizer files that travel with a
model."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPECIAL = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}


# Tokenizer and generation files carried with an HF-derived checkpoint (copied as they are).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
    "generation_config.json",
)  # fmt: skip


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


class SafetensorsDir:
    """Lazy access to the tensors of an HF model directory by name."""

    def __init__(self, root: Path):
        from safetensors import safe_open

        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (root / "model.safetensors").is_file():
            with safe_open(str(root / "model.safetensors"), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"{root}: no model.safetensors or model.safetensors.index.json; save the model "
                "with save_pretrained(safe_serialization=True)"
            )
        self.root, self.weight_map = root, weight_map
        self._open = {name: safe_open(str(root / name), "pt") for name in set(weight_map.values())}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.root}: tensor {name} is missing from the safetensors files")
        return self._open[self.weight_map[name]].get_tensor(name)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the :data:`TOKENIZER_FILES` present in ``src`` into ``dst``; returns their names."""
    return copy_hf_files(src, dst, TOKENIZER_FILES)


def copy_hf_files(src: str | Path, dst: str | Path, names: tuple[str, ...]) -> list[str]:
    """Copy the files of ``names`` present in ``src`` into ``dst``; returns their names."""
    present = [n for n in names if (Path(src) / n).is_file()]
    for name in present:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return present
