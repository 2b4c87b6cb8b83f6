"""The one validation of a job: ``validate_job(cfg, world_size)``.

``copd train`` runs it at start-up (before any process group or model exists) and ``copd plan``
runs it for its dry run, so a config the dry run accepts passes the same checks on the cluster.
It covers the fields (``config.validate``), the rank layout and model/grid divisibility
(``topology.plan_layout``), the step schedule of ``schedule.mode`` with the teaching edges,
the vision-language limits, the sequence lengths (longest prompt + ``rollout.max_new_tokens``
within ``model.max_seq_length``) and, for the built-in data, the tokenizer's size.

Only what needs files the dry run cannot see stays at run time: shard directories, a tokenizer
under ``data.dir``, and prompts longer than ``data.max_prompt_tokens`` (refused, naming it).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from copd_mega.config import Config, ConfigError, validate
from copd_mega.config_hf_dir import hf_dir_present
from copd_mega.data import reasoning_gym
from copd_mega.data.synthetic import CAPABILITIES, MEDIA_CAPABILITIES, longest_prompt
from copd_mega.data.tokenizer import build_tokenizer
from copd_mega.hf.init_from_hf import hf_init_dir
from copd_mega.launch.datasets import ChatCodec, capabilities_of
from copd_mega.models.vlm_inputs import image_token_count
from copd_mega.parallel.topology import Layout, plan_layout
from copd_mega.rl.schedule import StepPlan, build_plan


def validate_job(cfg: Config, world_size: int) -> Layout:
    """Every start-up check of a training job on ``world_size`` ranks; ConfigError names the fix.

    Returns the rank layout (pure: no processes, files or GPUs needed).
    """
    validate(cfg)
    layout = plan_layout(cfg, world_size)
    schedule_plan(cfg, layout.edges)
    check_media(cfg)
    check_lengths(cfg)
    check_builtin_tokenizer(cfg)
    check_start(cfg)
    return layout


def check_start(cfg: Config) -> None:
    """A run starts from a model (``checkpoint.init_from``/``init_from_hf``) or says it trains
    from random weights (``checkpoint.random_init``): a large model from random weights earns
    reward 0 in every group, so every advantage is 0 and nothing is learned."""
    c = cfg.checkpoint
    if c.init_from or c.init_from_hf or c.random_init:
        return
    raise ConfigError(
        "neither checkpoint.init_from nor checkpoint.init_from_hf is set, so the run would start "
        "from random weights: set checkpoint.init_from_hf to an HF model directory, or "
        "checkpoint.init_from to a model checkpoint (e.g. RUN/base from `copd pretrain`), or "
        "checkpoint.random_init=true to train from scratch on purpose"
    )


def start_line(cfg: Config) -> str:
    """What the run starts from, for ``copd plan`` and the start-up banner."""
    c = cfg.checkpoint
    if c.init_from_hf:
        kind = "LLaVA" if cfg.vision.enabled else cfg.model.family
        if hf_dir_present(cfg):
            return f"starts from HF model {c.init_from_hf} ({kind})"
        return (
            f"starts from HF model {c.init_from_hf} ({kind}); not present here: shape from the "
            "config (checked against its config.json where it is present)"
        )
    if c.init_from:
        return f"starts from checkpoint {c.init_from}"
    return "starts from random weights (checkpoint.random_init=true)"


def schedule_plan(cfg: Config, edges: list[tuple[str, str]]) -> list[StepPlan]:
    """The run's step plan for ``schedule.mode`` (errors name the schedule field to fix)."""
    s = cfg.schedule
    mixed = None
    if s.mode == "mixed":
        if len(cfg.branches) != 1:
            raise ConfigError(
                "schedule.mode=mixed trains one branch on the union of the data: configure one "
                "branch whose data joins the capabilities, e.g. data: arith+reverse"
            )
        experts = len(capabilities_of(cfg.branches[0].data))
        mixed = experts * s.cycles * (s.rl_steps + s.opd_steps)
    try:
        return build_plan(
            s.mode, cfg.branch_names, edges if s.mode == "copd" else (), s.cycles, s.rl_steps,
            s.opd_steps, s.student or None if s.mode in ("static_opd", "mopd") else None, mixed,
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_media(cfg: Config) -> None:
    """Built-in image/video data needs ``vision.enabled``; the VLM has no KL reference."""
    if cfg.grpo.kl_coef > 0 and cfg.vision.enabled:
        raise ConfigError(
            f"grpo.kl_coef={cfg.grpo.kl_coef} with vision.enabled=true: the frozen reference is "
            "built as a text model only; set grpo.kl_coef=0 for vision-language runs"
        )
    if cfg.data.dir or cfg.vision.enabled:
        return
    for i, b in enumerate(cfg.branches):
        media = [c for c in capabilities_of(b.data) if c in MEDIA_CAPABILITIES]
        if media:
            raise ConfigError(
                f"branches.{i}.data={b.data!r} reads images/video ({', '.join(media)}) but "
                "vision.enabled=false; set vision.enabled=true"
            )


def prompt_positions_bound(cfg: Config) -> int:
    """Most model positions a prompt can take: ``data.max_prompt_tokens``, or (when it is 0) the
    built-in capabilities' longest prompt under ``data.prompt_template`` with ``<bos>`` and its
    image/frame positions. ConfigError when 0 and the data is not built-in."""
    if cfg.data.max_prompt_tokens > 0:
        return cfg.data.max_prompt_tokens
    caps = sorted({c for b in cfg.branches for c in capabilities_of(b.data)})
    unknown = [c for c in caps if c not in CAPABILITIES]
    for i, b in enumerate(cfg.branches):  # a bare name that is no capability: most likely a typo
        bad = [c for c in capabilities_of(b.data)
               if c in unknown and "/" not in c and not reasoning_gym.is_task(c)]  # fmt: skip
        if bad and not cfg.data.dir:
            raise ConfigError(
                f"branches.{i}.data={b.data!r}: {bad[0]!r} is not a built-in capability "
                f"({', '.join(CAPABILITIES)}); fix branches.{i}.data, or name a shard folder and "
                "set data.max_prompt_tokens"
            )
    if cfg.data.dir or unknown:
        what = f"data {unknown}" if unknown else f"data.dir={cfg.data.dir!r}"
        raise ConfigError(
            f"{what} is not built-in synthetic data, so its longest prompt is unknown: set "
            "data.max_prompt_tokens to its model positions (text tokens + image/frame tokens)"
        )
    count = _prompt_counter(cfg)
    media = {"image": 1, "video": cfg.vision.frames_per_video}
    longest = 0
    for c in caps:
        k = 1 if cfg.vision.enabled and c in media else 0  # one medium (an image or a video)
        n = count(longest_prompt(c), k) + k * media.get(c, 0) * image_token_count(cfg)
        longest = max(longest, n)
    return longest


def _prompt_counter(cfg: Config):
    """``(prompt, media) -> text positions`` (the ``<image>`` slots not counted) as the run
    renders it: the HF model's chat template with ``checkpoint.init_from_hf`` (its directory, or
    the run's converted copy once the source is gone), else ``<bos>`` + the built-in character
    tokenizer under ``data.prompt_template``."""
    if cfg.checkpoint.init_from_hf:
        src = Path(cfg.checkpoint.init_from_hf)
        codec = ChatCodec(src if src.is_dir() else hf_init_dir(cfg), cfg.data, cfg.vision.enabled)
        return lambda prompt, k: len(codec.prompt_ids(prompt, k)) - k
    tok = build_tokenizer()
    template = cfg.data.prompt_template
    return lambda prompt, k: 1 + len(tok.encode(template.format(prompt=prompt)).ids)


def check_lengths(cfg: Config) -> None:
    """Longest prompt + ``rollout.max_new_tokens`` must fit ``model.max_seq_length``."""
    prompt, new, seq = (
        prompt_positions_bound(cfg),
        cfg.rollout.max_new_tokens,
        cfg.model.max_seq_length,
    )
    if prompt + new > seq:
        src = "data.max_prompt_tokens" if cfg.data.max_prompt_tokens else "the built-in prompts"
        raise ConfigError(
            f"longest prompt ({prompt} positions, {src}) + rollout.max_new_tokens={new} = "
            f"{prompt + new} exceeds model.max_seq_length={seq}; raise model.max_seq_length to "
            f">= {prompt + new} or lower rollout.max_new_tokens to <= {max(seq - prompt, 0)}"
        )


def check_builtin_tokenizer(cfg: Config) -> None:
    """With built-in data (``data.dir`` empty) the run writes the built-in tokenizer: it must
    fit ``model.vocab_size`` (a tokenizer under ``data.dir`` is checked at start-up)."""
    if cfg.data.dir:
        return
    check_vocab(cfg, build_tokenizer().get_vocab_size(), "the built-in tokenizer")


def check_vocab(cfg: Config, vocab_size: int, what: str) -> None:
    if vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"{what} has {vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size >= {vocab_size}"
        )


def prompt_positions(ids: list[int], media: list[Tensor], image_id: int, per_image: int) -> int:
    """Model positions of one prompt: its text ids, each ``<image>`` slot replaced by the
    positions of its medium (an image ``[3, H, W]`` or frames ``[T, 3, H, W]``)."""
    tiles = sum(m.shape[0] if m.dim() == 4 else 1 for m in media)
    return len(ids) - sum(1 for t in ids if t == image_id) + tiles * per_image


def check_prompts(cfg: Config, prompts: list[list[int]], media: list[list[Tensor]], image_id: int):
    """Refuse (ConfigError) a prompt longer than the bound ``validate_job`` checked lengths with."""
    bound = prompt_positions_bound(cfg)
    per_image = image_token_count(cfg) if cfg.vision.enabled else 0
    for ids, m in zip(prompts, media, strict=True):
        n = prompt_positions(ids, m, image_id, per_image)
        if n > bound:
            raise ConfigError(
                f"a prompt takes {n} model positions > data.max_prompt_tokens={bound}; raise "
                "data.max_prompt_tokens (and model.max_seq_length with it) or shorten the prompts"
            )
