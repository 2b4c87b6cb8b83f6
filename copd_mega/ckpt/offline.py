"""Offline model checkpoints (no process group): a streaming reader and writer.

The offline tools (merge, HF export and import) see a model checkpoint as Megatron's *global*
tensors: ``embedding.word_embeddings.weight [V_pad, H]``, per-layer weights stacked on a leading
layer axis (``decoder.layers.self_attention.linear_qkv.weight [L, (nq+2*ng)*d, H]``), whatever TP
and PP split wrote them. :class:`CheckpointReader` reads any row block of one of them through
``torch.distributed.checkpoint`` (only the stored chunks that overlap are read).
:func:`write_checkpoint` writes a torch_dist checkpoint whose tensors are produced block by block
on demand, so neither side ever holds more than one block per input. The result is an ordinary
model checkpoint: ``checkpoint.load_model`` loads it at any TP/PP split. ``copd merge``
(``ckpt/offline_merge.py``) and the HF converters are built on them.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from copd_mega.ckpt.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    require_model_dir,
    save_config,
)
from copd_mega.config import Config, load_config
from copd_mega.report.progress import progress_bar

BLOCK_BYTES = 256 * 2**20  # rows per produced block: at most this many bytes (at least one row)


@dataclass(frozen=True)
class TensorSpec:
    """One global tensor of a checkpoint: its Megatron key, full shape and dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize

    def row_blocks(self, max_bytes: int = BLOCK_BYTES) -> list[tuple[int, int]]:
        """``[start, stop)`` ranges of dim 0 (layers for stacked keys) of at most ``max_bytes``."""
        rows = self.shape[0] if self.shape else 1
        per_row = max(1, self.nbytes // max(rows, 1))
        step = max(1, max_bytes // per_row)
        return [(a, min(a + step, rows)) for a in range(0, rows, step)]


# Produces rows [start, stop) of a spec's tensor, shape (stop - start, *spec.shape[1:]).
Producer = Callable[[TensorSpec, int, int], torch.Tensor]


@contextmanager
def _single_process():
    """torch.distributed.checkpoint warns that it runs without a process group: intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


class _CachedReader(FileSystemReader):
    def read_metadata(self):
        if getattr(self, "_md", None) is None:
            self._md = super().read_metadata()
        return self._md


class _SliceLoadPlanner(DefaultLoadPlanner):
    """Loads row blocks of global tensors into given buffers (one block per key and call)."""

    def __init__(self, targets: dict[str, tuple[torch.Tensor, int]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.targets = targets  # key -> (buffer, first row)

    def create_local_plan(self):
        from torch.distributed.checkpoint.planner import LoadPlan

        items = []
        for key, (buf, row) in self.targets.items():
            offsets = torch.Size([row] + [0] * (buf.dim() - 1)) if buf.dim() else torch.Size()
            chunk = ChunkStorageMetadata(offsets=offsets, sizes=buf.shape)
            items += create_read_items_for_chunk_list(
                key, self.metadata.state_dict_metadata[key], [chunk]
            )
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.targets[index.fqn][0]


class CheckpointReader:
    """Read-only view of one model checkpoint directory (any TP/PP split), no process group."""

    def __init__(self, path: str | Path):
        self.path = require_model_dir(path)
        self._reader = _CachedReader(str(self.path))
        meta = self._reader.read_metadata().state_dict_metadata
        self.specs: dict[str, TensorSpec] = {
            k: TensorSpec(k, tuple(md.size), md.properties.dtype)
            for k, md in sorted(meta.items())
            if isinstance(md, TensorStorageMetadata) and not k.startswith("optimizer.")
        }

    def read(self, requests: dict[str, tuple[int, int] | None]) -> dict[str, torch.Tensor]:
        """``{key: rows}`` -> ``{key: tensor}``; ``rows=None`` reads the whole tensor."""
        targets = {}
        for key, rows in requests.items():
            spec = self.specs.get(key)
            if spec is None:
                raise CheckpointError(
                    f"{self.path}: no tensor {key} (has {list(self.specs)[:8]}...)"
                )
            start, stop = rows if rows is not None else (0, spec.shape[0] if spec.shape else 1)
            shape = (stop - start, *spec.shape[1:]) if spec.shape else ()
            targets[key] = (torch.empty(shape, dtype=spec.dtype), start)
        with _single_process():
            dcp.load(
                {}, storage_reader=self._reader, planner=_SliceLoadPlanner(targets), no_dist=True
            )
        return {k: buf for k, (buf, _) in targets.items()}

    def config(self) -> Config:
        """The resolved config saved beside the weights."""
        path = self.path / CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(f"{self.path}: no {CONFIG_FILE}; re-save it with save_model")
        return load_config(path)

    @property
    def tokenizer(self) -> Path | None:
        path = self.path / TOKENIZER_FILE
        return path if path.is_file() else None


class _StreamSavePlanner(DefaultSavePlanner):
    """Plans one write item per row block and asks ``produce`` for its data only when written."""

    def __init__(self, specs: list[TensorSpec], produce: Producer, block_bytes: int, on_block):
        super().__init__(flatten_state_dict=False, dedup_replicated_tensors=None)
        self.specs = {s.key: s for s in specs}
        self.produce, self.block_bytes, self.on_block = produce, block_bytes, on_block

    def create_local_plan(self) -> SavePlan:
        items = []
        for spec in self.specs.values():
            for start, stop in spec.row_blocks(self.block_bytes):
                offsets = (
                    torch.Size([start] + [0] * (len(spec.shape) - 1))
                    if spec.shape
                    else torch.Size()
                )
                sizes = torch.Size((stop - start, *spec.shape[1:])) if spec.shape else torch.Size()
                data = TensorWriteData(
                    ChunkStorageMetadata(offsets, sizes),
                    TensorProperties(spec.dtype),
                    torch.Size(spec.shape),
                )
                items.append(
                    WriteItem(
                        MetadataIndex(spec.key, offsets), WriteItemType.SHARD, tensor_data=data
                    )
                )
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        spec = self.specs[write_item.index.fqn]
        chunk = write_item.tensor_data.chunk
        start = int(chunk.offsets[0]) if spec.shape else 0
        stop = start + (int(chunk.sizes[0]) if spec.shape else 1)
        out = self.produce(spec, start, stop).to(spec.dtype).contiguous()
        if tuple(out.shape) != tuple(chunk.sizes):
            raise ValueError(f"producer gave {tuple(out.shape)} for {spec.key} rows {start}:{stop}")
        self.on_block(out.nbytes)
        return out


def write_checkpoint(
    path: str | Path,
    specs: list[TensorSpec],
    produce: Producer,
    cfg: Config,
    *,
    tokenizer: str | Path | None = None,
    block_bytes: int = BLOCK_BYTES,
    progress: bool = True,
    label: str = "writing",
) -> Path:
    """Write a model checkpoint at ``path`` whose tensors come from ``produce`` block by block.

    Written to ``path.partial`` and renamed once complete; ``path`` must not exist.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; remove it or choose another output path")
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = sum(s.nbytes for s in specs)
    with progress_bar(label, total, progress) as advance:
        planner = _StreamSavePlanner(specs, produce, block_bytes, advance)
        writer = FileSystemWriter(str(tmp), single_file_per_rank=True, thread_count=1)
        try:
            with _single_process():
                dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
        except CheckpointException as e:  # raise what the producer raised, not DCP's wrapper
            shutil.rmtree(tmp, ignore_errors=True)
            raise next(iter(e.failures.values()))[0] from None
    torch.save({}, tmp / "common.pt")
    save_config(cfg, tmp / CONFIG_FILE)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    from megatron.core.dist_checkpointing.core import CheckpointingConfig
    from megatron.core.dist_checkpointing.core import save_config as save_meta

    save_meta(CheckpointingConfig("torch_dist", 1), str(tmp))  # metadata.json: complete
    os.replace(tmp, path)
    return path
