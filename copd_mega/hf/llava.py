"""The vision-language model (``vision.enabled=true``) to and from Hugging Face LLaVA.

:func:`export_llava` writes a ``LlavaForConditionalGeneration`` directory from a VLM model
checkpoint (any TP split) or from a dict of its global tensors: ``config.json`` (CLIP
``vision_config``, Llama/Qwen2 ``text_config``, ``image_token_index``,
``vision_feature_layer=-1``, ``vision_feature_select_strategy="default"``: the last ViT layer's
output without the class token and without post-norm, which is what megatron's LLaVA feeds the
projector), safetensors shards with an index, ``generation_config.json``, the image processor
(``preprocessor_config.json``: ``vision.image_mean/std``, resize and crop to
``vision.image_size``, bilinear like the data reader) and, when the checkpoint carries
``tokenizer.json``, the tokenizer and a ``LlavaProcessor`` (so ``AutoProcessor`` loads and
expands ``<image>`` to the image's tokens). A checkpoint that came from an HF LLaVA carries what
the import was given beyond the Megatron weights (``llava_extra``): the HF tokenizer and
processor files (chat template) are copied back as they are, and the ViT layers above
``vision_feature_layer`` and the post-norm are written back with that feature layer.

:func:`import_llava` is the inverse: an HF LLaVA directory to a VLM model checkpoint plus its
``config.yaml`` (``config_llava``: shape, image token, the image processor's mean/std). A
``vision_feature_layer`` other than -1 is imported by keeping only the ViT layers up to that one
(the features are then the last kept layer's output, as HF computes them); the layers above it
go to ``hf_extra.safetensors`` beside the weights. What the Megatron model cannot express
(another activation or norm epsilon in the ViT, the ``full`` strategy, several feature layers,
projector without bias) is refused with the field.

CLI: ``python -m copd_mega.hf.llava export --ckpt M --out DIR`` and
``python -m copd_mega.hf.llava import --hf DIR --out M [--tp N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from copd_mega.ckpt.checkpoint import CheckpointError
from copd_mega.ckpt.offline import CheckpointReader, TensorSpec, write_checkpoint
from copd_mega.config import Config, validate
from copd_mega.config_hf import UnsupportedHFModel
from copd_mega.config_llava import read_llava_config
from copd_mega.data import tokenizer as tk
from copd_mega.hf import llava_mapping as lm
from copd_mega.hf import mapping as mp
from copd_mega.hf.hf_dir import (
    DTYPES,
    TOKENIZER_FILES,
    SafetensorsDir,
    ShardWriter,
    copy_hf_files,
    copy_tokenizer_files,
    export_tokenizer,
    parse_size,
    staged_output,
)
from copd_mega.hf.llava_extra import PROCESSOR_FILES, Extra, load_extra, save_extra
from copd_mega.models.gpt import padded_vocab_size
from copd_mega.parallel.topology import check_vision_fits
from copd_mega.report.progress import progress_bar

IMAGE_TOKEN = "<image>"


class StateReader:
    """A dict of global Megatron tensors (checkpoint keys) seen like a ``CheckpointReader``."""

    def __init__(self, state: Mapping[str, torch.Tensor], cfg: Config):
        self.state, self.cfg, self.tokenizer = state, cfg, None
        self.specs = {k: TensorSpec(k, tuple(t.shape), t.dtype) for k, t in state.items()}

    def read(self, requests: dict[str, tuple[int, int] | None]) -> dict[str, torch.Tensor]:
        return {k: self.state[k] if r is None else self.state[k][r[0] : r[1]]
                for k, r in requests.items()}  # fmt: skip

    def config(self) -> Config:
        return self.cfg


class _Prefixed:
    """The ``language_model.*`` tensors of a reader under GPT keys (for ``export_tensors``)."""

    def __init__(self, reader, cfg: Config):
        self.reader, self.cfg = reader, cfg
        self.specs = {k[len(lm.LM) :]: s for k, s in reader.specs.items() if k.startswith(lm.LM)}

    def read(self, requests: dict) -> dict[str, torch.Tensor]:
        got = self.reader.read({lm.LM + k: r for k, r in requests.items()})
        return {k[len(lm.LM) :]: t for k, t in got.items()}

    def config(self) -> Config:
        return self.cfg


class _Renaming:
    """A ShardWriter view that files tensors of one component under their LLaVA names."""

    def __init__(self, writer: ShardWriter, component: str):
        self.writer, self.component = writer, component

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.add(lm.file_name(self.component, name), tensor)


def export_vision(
    reader, writer: ShardWriter, cfg: Config, dtype: torch.dtype, extra: Extra | None = None
) -> None:
    """Stream the ViT (layer by layer) and the projector into ``writer``; with ``extra`` its
    post-norm and the unused layers above the feature layer as they were imported."""
    v = cfg.vision
    carried = dict(extra.tensors) if extra is not None else {}
    keys = [lm.VIT + k for k in lm.VIT_SIMPLE] + [lm.CLASS_TOKEN]
    embed = {k: t.to(dtype) for k, t in reader.read(dict.fromkeys(keys)).items()}
    vision = _Renaming(writer, "vision")
    for name, t in lm.vit_embeddings_to_hf(embed).items():
        vision.add(name, carried.pop(name, t).to(dtype))
    layer_keys = [k for k in reader.specs if k.startswith(lm.VIT_LAYERS)]
    for i in range(v.num_layers):
        got = reader.read({k: (i, i + 1) for k in layer_keys})
        layer = {k[len(lm.VIT_LAYERS) :]: t[0].to(dtype) for k, t in got.items()}
        for name, t in lm.vit_layer_to_hf(layer, i, v).items():
            vision.add(name, t)
    for name, t in carried.items():  # the layers above vision_feature_layer
        vision.add(name, t.to(dtype))
    proj = reader.read({lm.PROJ + k: None for k in lm.PROJ_SIMPLE})
    for key, name in lm.PROJ_SIMPLE.items():
        writer.add(lm.file_name("projector", name), proj[lm.PROJ + key].to(dtype))


def _save_tokenizer(reader, out: Path) -> dict[str, int | None]:
    """Save the tokenizer; bos/eos/pad ids. HF tokenizer files the checkpoint carries (a run
    from ``checkpoint.init_from_hf``: chat template, generation config) are copied as they are;
    else ``tokenizer.json`` is saved with ``<image>`` registered as special for the product's."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = getattr(reader, "path", None)
    if path is not None and (path / "tokenizer_config.json").is_file():
        copy_tokenizer_files(path, out)
        tok = AutoTokenizer.from_pretrained(str(out))
        return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    if reader.tokenizer is None:
        return {}
    tok = Tokenizer.from_file(str(reader.tokenizer))
    if all(tok.token_to_id(t) is not None for t in tk.SPECIAL_TOKENS):
        tk.save_hf_tokenizer_files(reader.tokenizer, out)
        return {r: i for r, i in tk.special_ids(tok).items() if r in ("bos", "eos", "pad")}
    return export_tokenizer(reader.tokenizer, out)


def _save_processor(reader, cfg: Config, out: Path, has_tokenizer: bool) -> None:
    """The image processor (the carried ``preprocessor_config.json``, else CLIP's resize/crop
    to ``vision.image_size`` with ``vision.image_mean/std``); with a tokenizer that has
    ``<image>``, a ``LlavaProcessor``. Carried processor files are then put back as they were."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaProcessor

    path = getattr(reader, "path", None)
    carried = path is not None and (path / PROCESSOR_FILES[0]).is_file()
    proc = AutoImageProcessor.from_pretrained(str(path)) if carried else lm.image_processor(cfg)
    if has_tokenizer:
        LlavaProcessor(
            image_processor=proc, tokenizer=AutoTokenizer.from_pretrained(str(out)),
            patch_size=cfg.vision.patch_size, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
        ).save_pretrained(str(out))  # fmt: skip
    else:
        proc.save_pretrained(str(out))
    hf_tokenizer = path is not None and (path / "tokenizer_config.json").is_file()
    if path is not None:  # what came from an HF directory goes back as it was
        copy_hf_files(path, out, (*(TOKENIZER_FILES if hf_tokenizer else ()), *PROCESSOR_FILES))


def export_llava(
    source: str | Path | Mapping[str, torch.Tensor],
    out: str | Path,
    cfg: Config | None = None,
    *,
    image_token_id: int | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 2**30,
    progress: bool = True,
) -> Path:
    """Write HF LLaVA directory ``out`` from a VLM checkpoint directory or a dict of its global
    tensors (``cfg`` required then; defaults to the checkpoint's ``config.yaml``).

    ``image_token_id`` defaults to ``<image>`` of the checkpoint's ``tokenizer.json``, else to
    ``vision.image_token_index`` of its config (kept by :func:`import_llava`).
    """
    from tokenizers import Tokenizer
    from transformers import GenerationConfig

    is_dir = isinstance(source, (str, Path))
    if not is_dir and cfg is None:
        raise ValueError("export_llava from a dict of tensors needs cfg= (the model's Config)")
    reader = CheckpointReader(source) if is_dir else StateReader(source, cfg)
    cfg = cfg or reader.config()
    if not cfg.vision.enabled:
        raise ValueError("vision.enabled=false in this checkpoint: export it with copd export-hf")
    tok = reader.tokenizer and Tokenizer.from_file(str(reader.tokenizer))
    tok_image = tok.token_to_id(IMAGE_TOKEN) if tok else None
    kept = cfg.vision.image_token_index if cfg.vision.image_token_index >= 0 else None
    image_token_id = next((i for i in (image_token_id, tok_image, kept) if i is not None), None)
    if image_token_id is None:
        raise ValueError(
            "no image token id: the checkpoint has no tokenizer.json with <image> and no "
            "vision.image_token_index in its config.yaml; pass --image-token-id to copd export-hf"
        )
    extra = load_extra(getattr(reader, "path", None), cfg.vision.num_layers)
    with staged_output(Path(out)) as tmp:
        token_ids = _save_tokenizer(reader, tmp)
        torch_dtype = DTYPES[dtype] if dtype else reader.specs[lm.LM + mp.EMBEDDING].dtype
        numel = sum(int(torch.Size(s.shape).numel()) for s in reader.specs.values())
        with progress_bar("export", numel * torch_dtype.itemsize, progress) as advance:
            writer = ShardWriter(tmp, max_shard_bytes, advance)
            mp.export_tensors(_Prefixed(reader, cfg), _Renaming(writer, "text"), torch_dtype)
            export_vision(reader, writer, cfg, torch_dtype, extra)
            writer.finish()
        name = str(torch_dtype).removeprefix("torch.")
        tower = (extra.vision_layers, extra.feature_layer) if extra else (cfg.vision.num_layers, -1)
        lm.llava_config(cfg, name, token_ids, image_token_id, *tower).save_pretrained(str(tmp))
        if not (tmp / "generation_config.json").is_file():
            gen = {f"{r}_token_id": i for r, i in token_ids.items() if i is not None}
            GenerationConfig(**gen).save_pretrained(str(tmp))
        _save_processor(reader, cfg, tmp, has_tokenizer=tok_image is not None)
    return Path(out)


# ----------------------------------------------------------------------------- import


class LlavaTensors:
    """Lazy HF LLaVA tensors by (component, local name), whichever layout the files use."""

    def __init__(self, root: Path):
        self.st = SafetensorsDir(root)

    def get(self, component: str, name: str) -> torch.Tensor:
        for cand in lm.file_candidates(component, name):
            if cand in self.st:
                return self.st.get(cand)
        raise KeyError(f"{self.st.root}: no tensor for {component} {name} (looked for "
                       f"{lm.file_candidates(component, name)})")  # fmt: skip

    def has(self, component: str, name: str) -> bool:
        return any(c in self.st for c in lm.file_candidates(component, name))


class _TextView:
    """The language model's tensors under Llama names (what ``mapping.make_producer`` reads)."""

    def __init__(self, hf: LlavaTensors):
        self.hf, self.root = hf, hf.st.root

    def __contains__(self, name: str) -> bool:
        return self.hf.has("text", name)

    def get(self, name: str) -> torch.Tensor:
        return self.hf.get("text", name)


def make_vlm_producer(hf: LlavaTensors, cfg: Config, dtype: torch.dtype):
    """``produce(spec, start, stop)`` for :func:`write_checkpoint` reading HF tensors lazily."""
    text = mp.make_producer(_TextView(hf), cfg, dtype)

    def produce(spec: TensorSpec, start: int, stop: int) -> torch.Tensor:
        if spec.key.startswith(lm.LM):
            return text(TensorSpec(spec.key[len(lm.LM) :], spec.shape, dtype), start, stop)
        if spec.key.startswith(lm.VIT_LAYERS):
            key = spec.key[len(lm.VIT_LAYERS) :]
            return torch.stack([lm.vit_layer_from_hf(hf.get, i, key, cfg.vision)
                                for i in range(start, stop)])  # fmt: skip
        return lm.non_layer_from_hf(hf.get, spec.key)[start:stop]

    return produce


def _check_text(hf: LlavaTensors, cfg: Config) -> None:
    m = cfg.model
    if not m.tie_embeddings and not hf.has("text", mp.HF_LM_HEAD):
        raise KeyError(f"{hf.st.root}: tie_word_embeddings=false but lm_head.weight is missing")
    for i in range(m.num_layers if m.family == "llama" and m.qkv_bias else 0):
        name = mp.hf_layer(i, "self_attn.o_proj.bias")
        if hf.has("text", name) and hf.get("text", name).abs().max() > 0:
            raise UnsupportedHFModel(f"{hf.st.root}: {name} is non-zero; the model here has no "
                                     "output-projection bias")  # fmt: skip


def _image_token_check(hf_dir: Path, image_token_id: int | None) -> Path | None:
    """tokenizer.json to carry over; its <image> must be the config's image token."""
    from tokenizers import Tokenizer

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return None
    tok_id = Tokenizer.from_file(str(path)).token_to_id(IMAGE_TOKEN)
    if tok_id is not None and tok_id != image_token_id:
        raise UnsupportedHFModel(
            f"{hf_dir}: config image_token_index={image_token_id} but the tokenizer's "
            f"{IMAGE_TOKEN} is {tok_id}; prompts here mark images with the tokenizer's "
            f"{IMAGE_TOKEN}: fix image_token_index in config.json"
        )
    return path


def import_llava(
    hf_dir: str | Path,
    out: str | Path,
    *,
    tp: int = 1,
    pad_vocab_to: int = 8,
    dtype: str | None = None,
    progress: bool = True,
) -> Path:
    """Write VLM model checkpoint ``out`` (weights + config.yaml) from HF LLaVA ``hf_dir``.

    Loads at any TP split; ``tp`` only sets the vocabulary padding (``pad_vocab_to * tp``).
    """
    hf_dir = Path(hf_dir)
    where = hf_dir / "config.json"
    if not where.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json; point --hf at an HF LLaVA directory")
    d = json.loads(where.read_text())
    if d.get("model_type") != "llava":
        raise lm.refuse(where, "model_type", d.get("model_type"),
                        "llava; text models go through copd import-hf")  # fmt: skip
    cfg = lm.vlm_config_from_dir(hf_dir, pad_vocab_to)
    cfg.parallel.tp = tp
    cfg.opd.top_k = min(cfg.opd.top_k, cfg.model.vocab_size)
    validate(cfg)
    check_vision_fits(cfg)
    hf = LlavaTensors(hf_dir)
    _check_text(hf, cfg)
    image_token = cfg.vision.image_token_index
    tokenizer = _image_token_check(hf_dir, None if image_token < 0 else image_token)
    torch_dtype = DTYPES[dtype] if dtype else hf.get("text", mp.HF_NORM).dtype
    padded = padded_vocab_size(cfg.model.vocab_size, pad_vocab_to, tp)
    path = write_checkpoint(
        out, lm.megatron_specs(cfg, padded, torch_dtype), make_vlm_producer(hf, cfg, torch_dtype),
        cfg, tokenizer=tokenizer, label="import", progress=progress,
    )  # fmt: skip
    hf_cfg = read_llava_config(d)
    save_extra(hf.get, path, cfg.vision.num_layers, hf_cfg.vision_config.num_hidden_layers,
               hf_cfg.vision_feature_layer)  # fmt: skip
    copy_hf_files(hf_dir, path, (*TOKENIZER_FILES, *PROCESSOR_FILES))
    return path


def main(argv: list[str] | None = None) -> int:
    """``export --ckpt M --out DIR`` | ``import --hf DIR --out M [--tp N]``."""
    ap = argparse.ArgumentParser(
        prog="python -m copd_mega.hf.llava", description=__doc__.split("\n\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="VLM checkpoint -> HF LLaVA directory")
    ex.add_argument("--ckpt", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--image-token-id", type=int, default=None, help="default: tokenizer's <image>")
    ex.add_argument("--max-shard-size", default="2GB")
    im = sub.add_parser("import", help="HF LLaVA directory -> VLM checkpoint")
    im.add_argument("--hf", required=True)
    im.add_argument("--out", required=True)
    im.add_argument("--tp", type=int, default=1)
    im.add_argument("--pad-vocab-to", type=int, default=8)
    for p in (ex, im):
        p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as stored")
        p.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "export":
            path = export_llava(
                args.ckpt, args.out, image_token_id=args.image_token_id, dtype=args.dtype,
                max_shard_bytes=parse_size(args.max_shard_size), progress=not args.no_progress,
            )  # fmt: skip
        else:
            path = import_llava(args.hf, args.out, tp=args.tp, pad_vocab_to=args.pad_vocab_to,
                                dtype=args.dtype, progress=not args.no_progress)  # fmt: skip
    except (CheckpointError, UnsupportedHFModel, ValueError, KeyError, FileNotFoundError,
            FileExistsError) as e:  # fmt: skip
        print(f"copd {args.cmd}-hf: {e}")
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
