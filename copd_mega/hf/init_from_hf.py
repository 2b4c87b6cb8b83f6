"""``checkpoint.init_from_hf: DIR``: the HF model converted once per run, under ``RUN/hf_init``.

Global rank 0 converts (``import_hf``, or ``import_llava`` for a LLaVA directory) into
``RUN/hf_init.staging`` and renames it to ``RUN/hf_init`` when complete, with
``hf_source.json`` (the source path and a digest of its ``config.json`` and weight index) beside
the weights; the other ranks wait at the caller's barrier. A later job on the same run
(``--resume``, or a rerun) reuses it, also when the HF directory is gone; a cache made from a
different model is an error, never silently reused. The checkpoint also carries the HF
tokenizer files (:data:`TOKENIZER_FILES`, copied by the import; a LLaVA's image processor files
and ``hf_extra.safetensors`` too), so the run's tokenizer, chat template and end-of-turn ids are
read from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from copd_mega.config import Config, ConfigError
from copd_mega.config_hf import UnsupportedHFModel
from copd_mega.hf.importer import import_model

HF_INIT = "hf_init"
SOURCE_FILE = "hf_source.json"


def hf_init_dir(cfg: Config) -> Path:
    """``RUN/hf_init``: the converted model checkpoint of ``checkpoint.init_from_hf``."""
    return Path(cfg.run_dir) / HF_INIT


def source_digest(hf_dir: Path) -> str:
    """sha256 of the HF directory's config.json and weight file names and sizes."""
    h = hashlib.sha256((hf_dir / "config.json").read_bytes())
    for f in sorted(hf_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def _check_cache(cache: Path, hf_dir: Path) -> None:
    if not (hf_dir / "config.json").is_file():  # source gone: the cache is the model
        return
    saved = json.loads((cache / SOURCE_FILE).read_text())
    if saved["digest"] != source_digest(hf_dir):
        raise ConfigError(
            f"{cache} was converted from {saved['path']}, which differs from "
            f"checkpoint.init_from_hf={str(hf_dir)!r}; use another run_dir or delete {cache}"
        )


def prepare_hf_init(cfg: Config, progress: bool = False) -> Path:
    """Convert ``checkpoint.init_from_hf`` to ``RUN/hf_init`` unless a matching copy exists.

    Call on one process (global rank 0) and let the others wait at a barrier. Returns the
    checkpoint directory (weights, ``config.yaml``, tokenizer files, ``hf_source.json``).
    """
    hf_dir, cache = Path(cfg.checkpoint.init_from_hf), hf_init_dir(cfg)
    if (cache / SOURCE_FILE).is_file():
        _check_cache(cache, hf_dir)
        return cache
    staging = cache.with_name(HF_INIT + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        import_model(hf_dir, staging, tp=cfg.parallel.tp, pad_vocab_to=cfg.model.pad_vocab_to,
                     progress=progress)  # fmt: skip
    except (UnsupportedHFModel, FileNotFoundError, KeyError, ValueError) as e:
        raise ConfigError(f"checkpoint.init_from_hf={str(hf_dir)!r}: {e}") from e
    source = {"path": str(hf_dir.resolve()), "digest": source_digest(hf_dir)}
    (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    if cache.exists():
        raise ConfigError(
            f"{cache} exists without {SOURCE_FILE}; move it away or use another run_dir"
        )
    os.replace(staging, cache)
    return cache
