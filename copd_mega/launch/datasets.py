"""From config to data: built-in shards, per-branch readers, tokenised prompts.

A branch's ``data`` is a capability name (``arith``, or a reasoning-gym task ``rg:<task>`` with
its options in ``data.reasoning_gym.<task>``), a union of them (``arith+reverse``, the ``mixed``
baseline), or a directory holding ``train-*.tar`` / ``eval-*.tar`` shards. Capability names
resolve to ``<data.dir>/<name>/`` (``rg_<task>/`` for reasoning-gym); with ``data.dir`` empty the
built-in synthetic capabilities and reasoning-gym tasks are generated once under ``RUN/data``
by global rank 0 (the others wait).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

from copd_mega.config import Config, ConfigError, DataConfig
from copd_mega.data import reasoning_gym
from copd_mega.data.cli import main as data_main
from copd_mega.data.reader import ShardReader
from copd_mega.data.synthetic import CAPABILITIES
from copd_mega.data.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer, special_ids
from copd_mega.hf.init_from_hf import hf_init_dir, prepare_hf_init
from copd_mega.hf.llava import IMAGE_TOKEN
from copd_mega.models.vlm_inputs import with_placeholders
from copd_mega.parallel import comm


def data_root(cfg: Config) -> Path:
    return Path(cfg.data.dir) if cfg.data.dir else Path(cfg.run_dir) / "data"


def capabilities_of(spec: str) -> list[str]:
    """``"arith+reverse"`` -> ``["arith", "reverse"]``."""
    return [s for s in spec.split("+") if s]


def _cap_dir(cfg: Config, cap: str) -> Path:
    if reasoning_gym.is_task(cap):
        return data_root(cfg) / reasoning_gym.dir_name(cap)
    p = Path(cap)
    return p if p.is_absolute() or os.sep in cap else data_root(cfg) / cap


def shard_paths(cfg: Config, spec: str, split: str) -> list[Path]:
    """Shard files of ``split`` for a branch data spec; a clear error when there are none."""
    paths: list[Path] = []
    for cap in capabilities_of(spec):
        found = sorted(_cap_dir(cfg, cap).glob(f"{split}-*.tar"))
        if not found:
            raise ConfigError(
                f"no {split}-*.tar shards for data {cap!r} under {_cap_dir(cfg, cap)}; create "
                f"them with `copd data synth --capability {cap} --out {data_root(cfg)}` or point "
                "data.dir / branches.*.data at a shard directory"
            )
        paths += found
    return paths


def prepare_data(cfg: Config) -> Path:
    """Make sure every branch's shards and the tokenizer exist; returns the tokenizer path
    (a ``tokenizer.json``, or with ``checkpoint.init_from_hf`` the HF tokenizer's directory).

    With ``data.dir`` empty, global rank 0 synthesises the built-in capabilities the config
    uses (idempotent); with ``checkpoint.init_from_hf`` it converts the HF model once into
    ``RUN/hf_init`` (whose tokenizer is then the run's, and whose path is returned). Every rank
    then waits at a barrier. Call on every rank.
    """
    root = data_root(cfg)
    tok_path = root / "tokenizer.json"
    needed = sorted({c for b in cfg.branches for c in capabilities_of(b.data)})
    if not cfg.data.dir:
        check_branch_data(cfg, root)
    leader = not dist.is_initialized() or dist.get_rank() == 0
    if cfg.checkpoint.init_from_hf:
        _convert_hf_once(cfg, leader)
    if not cfg.data.dir and leader:
        root.mkdir(parents=True, exist_ok=True)
        for cap in needed:
            if not sorted(_cap_dir(cfg, cap).glob("train-*.tar")):
                argv = ["synth", "--capability", cap, "--out", str(root), "--seed",
                        str(cfg.data.seed), "--n-train", str(cfg.data.n_train),
                        "--n-eval", str(cfg.data.n_eval)]  # fmt: skip
                if reasoning_gym.is_task(cap):
                    opts = cfg.data.reasoning_gym.get(reasoning_gym.task_of(cap), {})
                    argv += ["--rg-options", json.dumps(opts)]
                if data_main(argv) != 0:
                    raise RuntimeError(f"synthesising {cap!r} under {root} failed (see above)")
        if not tok_path.exists():
            save_tokenizer(build_tokenizer(), tok_path)
    if dist.is_initialized():
        comm.barrier()
    for b in cfg.branches:
        shard_paths(cfg, b.data, "train")
    if cfg.checkpoint.init_from_hf:
        return hf_init_dir(cfg)
    if not tok_path.exists():
        raise ConfigError(
            f"tokenizer {tok_path} not found; data.dir must hold tokenizer.json "
            "(`copd data synth ... --tokenizer DIR/tokenizer.json` writes one)"
        )
    return tok_path


def _convert_hf_once(cfg: Config, leader: bool) -> None:
    """Rank 0 converts ``checkpoint.init_from_hf``; its error is raised on every rank."""
    error, failure = None, None
    if leader:
        try:
            prepare_hf_init(cfg, progress=cfg.logging.progress)
        except Exception as e:  # every rank must leave the gather below, not only this one
            error, failure = f"converting checkpoint.init_from_hf failed: {e}", e
    if dist.is_initialized():
        error = next((e for e in comm.all_gather_object(error) if e), None)
    if failure is not None:
        raise failure
    if error:
        raise ConfigError(error)


def check_branch_data(cfg: Config, root: Path) -> None:
    """Every data name of every branch is a built-in capability or holds shards already
    (checked on every rank before rank 0 synthesises anything); the error names the setting."""
    check_reasoning_gym(cfg)
    for i, b in enumerate(cfg.branches):
        for cap in capabilities_of(b.data) or [""]:
            if cap in CAPABILITIES or sorted(_cap_dir(cfg, cap).glob("train-*.tar")):
                continue
            if reasoning_gym.is_task(cap):
                try:
                    reasoning_gym.check_task(
                        cap, cfg.data.reasoning_gym.get(reasoning_gym.task_of(cap))
                    )
                except ValueError as e:
                    raise ConfigError(f"branches.{i}.data={b.data!r}: {e}") from e
                continue
            raise ConfigError(
                f"branches.{i}.data={b.data!r}: {cap!r} is neither a built-in capability "
                f"({', '.join(CAPABILITIES)}) nor a folder with train-*.tar shards under {root}; "
                f"fix branches.{i}.data or set data.dir to the folder that holds it"
            )


def check_reasoning_gym(cfg: Config) -> None:
    """``data.reasoning_gym`` maps task names the branches use (``rg:<task>``) to mappings."""
    used = {reasoning_gym.task_of(c) for b in cfg.branches for c in capabilities_of(b.data)
            if reasoning_gym.is_task(c)}  # fmt: skip
    if not isinstance(cfg.data.reasoning_gym, dict):
        raise ConfigError(f"data.reasoning_gym must be a mapping task -> options, got "
                          f"{cfg.data.reasoning_gym!r}")  # fmt: skip
    for task, opts in cfg.data.reasoning_gym.items():
        if task not in used or not isinstance(opts, dict):
            raise ConfigError(
                f"data.reasoning_gym.{task}: give options (a mapping) only for tasks a branch "
                f"names as rg:<task> (used: {sorted(used) or 'none'}); got {opts!r}"
            )


def make_reader(
    cfg: Config, spec: str, split: str, dp_rank: int, dp_size: int, salt: int = 0
) -> ShardReader:
    """Reader of a data spec for one DP rank; ``salt`` separates streams of the same data.

    With ``vision.enabled`` images and frames are resized to ``vision.image_size`` and each
    video is sampled once, at read time, to ``vision.frames_per_video`` frames (uniformly,
    ``data.media.frame_indices``); those tensors then travel with the rows.
    """
    v = cfg.vision
    return ShardReader(
        shard_paths(cfg, spec, split),
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.data.seed + 7919 * salt,
        shuffle=split == "train",
        name=f"{spec} {split} dp{dp_rank}",
        num_frames=v.frames_per_video if v.enabled else None,
        image_size=v.image_size if v.enabled else None,
    )


class PromptCodec:
    """Tokenises prompts and answers with the built-in character tokenizer and the config's
    template (the default for the synthetic tasks)."""

    def __init__(self, tokenizer_path: str | Path, template: str = "{prompt}") -> None:
        self.path = Path(tokenizer_path)
        self.tok = load_tokenizer(self.path)
        ids = special_ids(self.tok)
        self.bos, self.eos, self.pad, self.unk = ids["bos"], ids["eos"], ids["pad"], ids["unk"]
        self.image = ids["image"]  # the <image> slot a vision model fills with a medium
        self.template = template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def prompt_ids(self, prompt: str, num_media: int = 0) -> list[int]:
        """``[bos] + ids(template.format(prompt=prompt))``, with one ``<image>`` per medium
        after ``<bos>`` (:func:`copd_mega.models.vlm_inputs.with_placeholders`)."""
        ids = [self.bos] + self._ids(self.template.format(prompt=prompt))
        return with_placeholders(ids, num_media, self.image, self.bos) if num_media else ids

    def answer_ids(self, answer: str) -> list[int]:
        """``ids(answer) + [eos]``: the target of supervised pretraining."""
        return self._ids(answer) + [self.eos]

    def _ids(self, text: str) -> list[int]:
        """Ids of ``text``; ConfigError naming the characters the vocabulary lacks."""
        enc = self.tok.encode(text)
        if self.unk in enc.ids:
            pairs = zip(enc.ids, enc.offsets, strict=True)
            bad = sorted({text[a:b] for t, (a, b) in pairs if t == self.unk})
            raise ConfigError(
                f"the character tokenizer {self.path} has no token for {bad} in {text[:80]!r}; "
                "use data without them or a model with its own tokenizer (checkpoint.init_from_hf)"
            )
        return enc.ids

    def decode(self, ids: list[int]) -> str:
        """Text of a response, cut at the first EOS."""
        if self.eos in ids:
            ids = ids[: ids.index(self.eos)]
        return self.tok.decode(ids, skip_special_tokens=True)


class ChatCodec:
    """The HF model's own tokenizer: prompts rendered through its chat template, its end-of-turn
    ids for stopping (``checkpoint.init_from_hf``).

    ``prompt_ids`` is ``apply_chat_template([system?, user], add_generation_prompt=True,
    enable_thinking=data.enable_thinking)`` with the user turn ``data.prompt_template`` filled
    in, tokenised without further special tokens (what an HF user feeds ``generate``); without a
    chat template (or ``data.chat_template=false``) the filled template is tokenised as the
    tokenizer does by default. ``eos`` is every end id (tokenizer eos first, then
    ``generation_config.json``'s ``eos_token_id``): a response ends at any of them.
    """

    def __init__(self, hf_dir: str | Path, data: DataConfig, vision: bool = False) -> None:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        self.hf_dir = Path(hf_dir)
        path = self.hf_dir / "tokenizer.json"
        if (self.hf_dir / "tokenizer_config.json").is_file():
            self.tok = AutoTokenizer.from_pretrained(str(self.hf_dir))
        elif path.is_file():
            self.tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        else:
            raise ConfigError(
                f"{self.hf_dir}: no tokenizer_config.json or tokenizer.json; the HF model "
                "directory of checkpoint.init_from_hf must hold its tokenizer"
            )
        self.path = path if path.is_file() else None
        self.eos = end_ids(self.tok, self.hf_dir)
        self.eos_id = self.eos[0]  # ends a supervised answer
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.bos = self.tok.bos_token_id
        self.template, self.system = data.prompt_template, data.system_prompt
        self.thinking = data.enable_thinking
        if self.tok.chat_template is None and (self.hf_dir / "chat_template.json").is_file():
            template = json.loads((self.hf_dir / "chat_template.json").read_text())
            self.tok.chat_template = template.get("chat_template")  # a processor's (LLaVA)
        self.chat = data.chat_template and self.tok.chat_template is not None
        self.vision, self.image = vision, None
        if vision:
            self.image = image_token_id(self.tok, self.hf_dir)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def prompt_ids(self, prompt: str, num_media: int = 0) -> list[int]:
        """The rendered prompt's ids (ending with the assistant turn's opening).

        A vision-language model's user turn is the list form HF processors render
        (``[{"type": "image"}] * num_media + [{"type": "text", ...}]``), so the template puts
        one ``<image>`` per medium where the model was trained to see it; the ids start with
        ``<bos>`` when the tokenizer adds one (as ``LlavaProcessor`` tokenises).
        """
        content = self.template.format(prompt=prompt)
        if not self.chat:
            text = f"{IMAGE_TOKEN}\n" * num_media + content
            return self.tok(text)["input_ids"]
        if self.vision:
            parts = [{"type": "image"}] * num_media + [{"type": "text", "text": content}]
            system = [{"type": "text", "text": self.system}]
        else:
            parts, system = content, self.system
        turns = [{"role": "system", "content": system}] if self.system else []
        text = self.tok.apply_chat_template(
            turns + [{"role": "user", "content": parts}], tokenize=False,
            add_generation_prompt=True, enable_thinking=self.thinking,
        )  # fmt: skip
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        adds_bos = self.bos is not None and self.tok("a")["input_ids"][:1] == [self.bos]
        if self.vision and adds_bos and ids[:1] != [self.bos]:
            ids = [self.bos] + ids
        if self.vision and ids.count(self.image) != num_media:
            raise ConfigError(
                f"{self.hf_dir}: the chat template rendered {ids.count(self.image)} "
                f"{IMAGE_TOKEN} tokens for {num_media} media; it must render one per "
                '{"type": "image"} part (set data.chat_template=false to skip it)'
            )
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        """``ids(answer) + [end of turn]``: the target of supervised training."""
        return self.tok(answer, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        """Text of a response, cut at the first end id (a reasoning block stays in the text)."""
        cut = next((i for i, t in enumerate(ids) if t in self.eos), len(ids))
        return self.tok.decode(ids[:cut], skip_special_tokens=True)


def end_ids(tok, hf_dir: Path) -> tuple[int, ...]:
    """Ids that end a response: the tokenizer's eos, then generation_config.json's eos ids."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    gen = hf_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not ids:
        raise ConfigError(
            f"{hf_dir}: neither tokenizer_config.json nor generation_config.json names an EOS "
            "token; set eos_token in tokenizer_config.json"
        )
    return tuple(dict.fromkeys(ids))


def image_token_id(tok, hf_dir: Path) -> int:
    """The id of the tokenizer's ``<image>`` (a LLaVA's image token)."""
    ids = tok.convert_tokens_to_ids([IMAGE_TOKEN])
    if not ids or ids[0] is None or ids[0] == tok.unk_token_id:
        raise ConfigError(
            f"{hf_dir}: the tokenizer has no {IMAGE_TOKEN} token; a vision-language model's "
            "tokenizer must mark images with it (add it as a special token)"
        )
    return ids[0]


def make_codec(cfg: Config, tok_path: Path) -> PromptCodec | ChatCodec:
    """The run's codec: the HF model's tokenizer with ``checkpoint.init_from_hf`` (``tok_path``
    is then its directory, from :func:`prepare_data`), the character tokenizer otherwise."""
    if cfg.checkpoint.init_from_hf:
        return ChatCodec(tok_path, cfg.data, cfg.vision.enabled)
    return PromptCodec(tok_path, cfg.data.prompt_template)
