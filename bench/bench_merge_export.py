"""Offline checkpoint tools against a plain file copy of the same bytes, on a model made on the fly.

Writes two random fp32 model checkpoints (default ~340 MB each: 6 layers, hidden 1024, vocab
16000, tied embeddings), then times ``copd merge`` of the two, ``copd export-hf`` of the merge and
``copd import-hf`` of the export, and ``shutil.copy`` of one checkpoint's data file. Throughput is
checkpoint bytes per second (merge: output bytes, it also reads twice as many), printed beside
the copy's and as a ratio to it::

    .venv/bin/python bench/bench_merge_export.py [--layers 6 --hidden 1024 --vocab 16000]

Every file is fresh in the page cache, so this measures the tools' CPU cost (per-block DCP
planning and (de)serialisation, the QKV/gate-up re-layout, safetensors) more than the disk.
Each operation runs ``--repeats`` times and the best run is kept (a shared machine is noisy).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per operation (best kept)")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    return ap.parse_args()


def make_input(path: Path, a: argparse.Namespace, seed: int) -> int:
    """A random model checkpoint; returns its size in bytes."""
    import torch

    from copd_mega.ckpt.offline import write_checkpoint
    from copd_mega.config import Config
    from copd_mega.hf.mapping import megatron_specs
    from copd_mega.models.gpt import padded_vocab_size

    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.ffn_hidden_size = a.layers, a.hidden, 11 * a.hidden // 4
    m.num_attention_heads, m.num_query_groups, m.vocab_size = 16, 4, a.vocab
    cfg.opd.top_k = 10
    specs = megatron_specs(m, padded_vocab_size(a.vocab, 8, 1), torch.float32)

    def produce(spec, start, stop):
        g = torch.Generator().manual_seed(seed * 1000 + start)
        return torch.randn((stop - start, *spec.shape[1:]), generator=g) * 0.02

    write_checkpoint(path, specs, produce, cfg, progress=False)
    return sum(s.nbytes for s in specs)


def best_of(repeats: int, fn, cleanup) -> float:
    """Best wall time of ``repeats`` runs of ``fn()``; ``cleanup()`` runs before each."""
    times = []
    for _ in range(repeats):
        cleanup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    from copd_mega.ckpt.offline_merge import merge_checkpoints
    from copd_mega.hf.export import export_hf
    from copd_mega.hf.importer import import_hf

    a = parse_args()
    root = Path(a.dir or tempfile.mkdtemp(prefix="bench_merge_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        nbytes = make_input(root / "a", a, 1)
        make_input(root / "b", a, 2)
        print(f"made 2 checkpoints of {nbytes / 2**20:.0f} MB in {time.perf_counter() - t0:.1f}s")
        data = next((root / "a").glob("*.distcp"))

        def rm(*names):
            return lambda: [shutil.rmtree(root / n, ignore_errors=True) for n in names]

        ops = {
            "copy (shutil.copy)": (
                lambda: shutil.copy(data, root / "copy.distcp"),
                lambda: (root / "copy.distcp").unlink(missing_ok=True),
            ),
            "merge (2 inputs)": (
                lambda: merge_checkpoints([root / "a", root / "b"], root / "m", progress=False),
                rm("m", "m.partial"),
            ),
        }
        results = {}
        for name, (fn, cleanup) in ops.items():
            results[name] = best_of(a.repeats, fn, cleanup)
        results["export-hf"] = best_of(
            a.repeats, lambda: export_hf(root / "m", root / "hf", progress=False), rm("hf")
        )
        results["import-hf"] = best_of(
            a.repeats,
            lambda: import_hf(root / "hf", root / "imp", progress=False),
            rm("imp", "imp.partial"),
        )
        base = nbytes / results["copy (shutil.copy)"] / 2**20
        print(f"\n{'operation':<22}{'MB':>8}{'seconds':>10}{'MB/s':>10}{'vs copy':>10}")
        for name, secs in results.items():
            rate = nbytes / secs / 2**20
            print(f"{name:<22}{nbytes / 2**20:>8.0f}{secs:>10.2f}{rate:>10.0f}{rate / base:>10.2f}")
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
