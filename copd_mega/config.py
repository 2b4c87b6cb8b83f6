"""Typed configuration: nested dataclasses are the schema, YAML files in ``configs/`` their saved form.

``load_config(path, overrides)`` reads YAML, applies ``a.b.c=value`` overrides (values parsed as
YAML scalars; list items addressed by index, ``branches.1.beta=0.5``), converts to dataclasses
with type checks, and runs cross-field validation. Every error names the dotted path and the fix.
Checks that need the world size (branches x TP x PP x DP) live in ``parallel.topology``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from copd_mega.config_hf import apply_hf_model_config
from copd_mega.config_tree import ConfigError, apply_override, non_finite, to_dataclass, to_dict


@dataclass
class ModelConfig:
    """A Llama/Qwen2/Qwen3-family decoder (RMSNorm, SwiGLU, RoPE, GQA) as a Megatron GPTModel."""

    family: str = "llama"  # llama | qwen2 (qkv_bias) | qwen3 (qk_layernorm): the HF class
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2  # GQA: key/value heads
    head_dim: int = 0  # per-head channels (kv_channels); 0 = hidden_size / num_attention_heads
    vocab_size: int = 128  # tokenizer's size; padded to a multiple of pad_vocab_to * TP
    pad_vocab_to: int = 8
    max_seq_length: int = 128
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-6
    qkv_bias: bool = False
    qk_layernorm: bool = False  # per-head RMSNorm on queries and keys (Qwen3)
    tie_embeddings: bool = True
    init_std: float = 0.02
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16

    @property
    def kv_channels(self) -> int:
        """Channels per attention head: ``head_dim``, or hidden_size / heads when it is 0."""
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class VisionConfig:
    """A CLIP-style ViT + MLP projector in front of the language model (megatron LLaVAModel).

    Off by default (text-only GPTModel). When on, every branch holds the same vision-language
    architecture, so any branch can score any peer and all can be merged; text-only samples
    simply carry no image tokens.
    """

    enabled: bool = False
    image_size: int = 32
    patch_size: int = 8
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    frames_per_video: int = 4  # frames sampled uniformly from a video; each becomes one image
    image_token_index: int = (
        -1
    )  # HF LLaVA's image token id, kept on import (-1: tokenizer's <image>)


@dataclass
class ParallelConfig:
    """Per-branch grid; every branch has the same TP x PP x DP shape."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    backend: str = "auto"  # auto | nccl | gloo
    micro_batch_size: int = 8  # sequences per forward-backward microbatch


@dataclass
class BranchConfig:
    """One expert branch: a name, its capability data and its OPD weight."""

    name: str = "text"
    data: str = "arith"  # capability name (built-in synthetic) or a shard directory
    beta: float = 1.0  # OPD advantage scale beta_k
    merge_weight: float = 1.0  # relative weight in the final merge (normalised)


@dataclass
class TeachingConfig:
    """The teaching graph: which branches distil into which."""

    graph: str = "pairwise"  # pairwise | hub_spoke | ring | none
    hub: str = ""  # hub branch name for hub_spoke


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class GRPOConfig:
    group_size: int = 8  # rollouts per prompt (G)
    eps_low: float = 0.2
    eps_high: float = 0.28
    loss_agg: str = "token_mean"  # token_mean | seq_mean
    kl_coef: float = 0.0  # KL to the initial (reference) policy; 0 = off as in the paper
    updates_per_batch: int = 1  # optimizer steps per rollout batch (uses old log-probs)
    adv_eps: float = 1e-6


@dataclass
class OPDConfig:
    top_k: int = 10  # overlap@k telemetry and the teacher's returned top-k ids
    prompts_per_peer: int = 4  # prompts drawn from each teaching peer's data per OPD step
    samples_per_prompt: int = 2  # student rollouts per peer prompt


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8  # native prompts per branch per step (across its DP ranks)
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    logprob_chunk: int = 64  # sequence positions per chunk in log-prob computation
    tis_cap: float = 0.0  # truncated importance sampling min(pi_trainer/pi_sampler, C); 0 = off
    max_batch_size: int = 64  # sequences per generation micro-batch (its KV cache's rows)


@dataclass
class ScheduleConfig:
    mode: str = "copd"  # copd | expert | mixed | static_opd | mopd
    cycles: int = 2  # N
    rl_steps: int = 3  # S_RL
    opd_steps: int = 2  # S_OPD
    student: str = ""  # static_opd / mopd: the branch that learns in the distillation phase
    merge_every_cycle: bool = False
    stop_after: int = 0  # end this job after N steps with a checkpoint (resume with --resume)


@dataclass
class PretrainConfig:
    """Next-token training on (prompt, answer) pairs that makes a base model from scratch."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3  # peak; linear warmup then cosine decay to lr/10
    warmup_steps: int = 50
    capabilities: list[str] = field(default_factory=list)  # empty: every branch's data
    target_accuracy: float = 0.0  # stop once mean held-out accuracy reaches this (0 = off)
    # Per capability (0 = off): rows go 3:1 to capabilities below this held-out accuracy against
    # those up to 0.15 above it (none further above); training stops once all are at or above it.
    capability_target: float = 0.0
    eval_every: int = 50  # steps between held-out evaluations (0 = only at the end)
    eval_limit: int = 64  # held-out samples per capability in those evaluations


@dataclass
class DataConfig:
    dir: str = ""  # shard root; empty: synthesise built-in data under RUN/data
    n_train: int = 2000
    n_eval: int = 64
    seed: int = 1234
    prompt_template: str = "{prompt}"  # the user message (or whole prompt without a chat template)
    # Longest prompt in model positions (text tokens + image/frame tokens); a longer prompt is an
    # error at generation. 0: the built-in capabilities' own bound (data.dir empty only).
    max_prompt_tokens: int = 0
    # With an HF tokenizer (checkpoint.init_from_hf): render prompts through its chat template.
    chat_template: bool = True
    system_prompt: str = ""  # a system turn before the user turn (chat template only)
    enable_thinking: bool = False  # the template's reasoning switch (Qwen3 `enable_thinking`)


@dataclass
class MergeConfig:
    """How branches are merged in place (``parallel/merge.py``; docs/checkpoints.md)."""

    optimizer_state: str = "average"  # Adam moments after a merge: average | reset | keep


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2
    init_from: str = ""  # checkpoint directory to start every branch from (a base model)
    # HF model directory to start every branch from: converted once to RUN/hf_init, its
    # config.json fills model.*, its tokenizer and chat template are the run's.
    init_from_hf: str = ""
    # never | required (`copd train --resume`: error without a checkpoint) | auto (`--resume=auto`:
    # continue from the newest complete step if there is one, else start fresh)
    resume: str = "never"


@dataclass
class RewardsConfig:
    """Verifiable-reward scoring: worker processes with a hard deadline per item."""

    workers: int = 2  # scored at once per scorer rank: H hanging items cost ~H/workers timeouts
    timeout_s: float = 5.0  # per item; an answer still being verified then scores 0 (a timeout)


@dataclass
class DebugConfig:
    """Fault injection for end-to-end tests of the recovery paths (off: -1)."""

    nan_loss_at_step: int = -1  # the loss of this global step is NaN on every rank (step skipped)
    crash_in_save_at_step: int = -1  # every rank is SIGKILLed inside the save of this step


@dataclass
class EvalConfig:
    """Telemetry during training (no gradient, no effect on the weights; 0 = off)."""

    every: int = 0  # steps between held-out evaluations of each branch (and the merged branches)
    limit: int = 128  # held-out samples per capability in those evaluations
    overlap_every: int = 0  # steps between cross-branch top-k overlap/delta probes
    overlap_prompts: int = 16  # held-out prompts of the teacher's data per probe (across DP)
    overlap_samples: int = 2  # student rollouts per probe prompt
    base: bool = True  # evaluate the starting model at a fresh start (the table's base row)


@dataclass
class LoggingConfig:
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "copd-mega"
    progress: bool = True
    log_all_ranks: bool = False


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    branches: list[BranchConfig] = field(default_factory=lambda: [BranchConfig()])
    teaching: TeachingConfig = field(default_factory=TeachingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    @property
    def branch_names(self) -> list[str]:
        return [b.name for b in self.branches]

    @property
    def ranks_per_branch(self) -> int:
        return self.parallel.tp * self.parallel.pp * self.parallel.dp


# ----------------------------------------------------------------------------- YAML


def default_config_path() -> Path:
    """The embedded demo config shipped inside the package (``copd demo``, ``copd study``)."""
    return Path(str(resources.files("copd_mega") / "demo.yaml"))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (or the defaults), apply dotted overrides, type-check and validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass --config configs/<name>.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
    else:
        data = to_dict(Config())
    given = set(data.get("model") or {}) if path is not None else set()
    for ov in overrides or []:
        apply_override(data, ov)
        key = ov.split("=", 1)[0].strip()
        given |= {key.split(".")[1]} if key.startswith("model.") else set()
    ck = data.get("checkpoint")
    if isinstance(ck, dict) and isinstance(ck.get("resume"), bool):  # the older boolean form
        ck["resume"] = "required" if ck["resume"] else "never"
    cfg = to_dataclass(data, Config)
    if cfg.checkpoint.init_from_hf:  # model.* from the HF config.json (mismatches are errors)
        apply_hf_model_config(cfg, given)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation

_CHOICES = {
    "model.family": ("llama", "qwen2", "qwen3"),
    "model.dtype": ("auto", "fp32", "bf16"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "teaching.graph": ("pairwise", "hub_spoke", "ring", "none"),
    "grpo.loss_agg": ("token_mean", "seq_mean"),
    "schedule.mode": ("copd", "expert", "mixed", "static_opd", "mopd"),
    "merge.optimizer_state": ("average", "reset", "keep"),
    "logging.wandb": ("disabled", "offline", "online"),
    "checkpoint.resume": ("never", "required", "auto"),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[int(part)] if isinstance(cfg, list) else getattr(cfg, part)
    return cfg


def _validate_numbers(cfg: Config) -> None:
    """No NaN/inf anywhere; optimizer, clipping, OPD and reward settings in range."""
    bad = non_finite(cfg)
    if bad:
        raise ConfigError(f"{bad}={_get(cfg, bad)} is not a finite number; set a finite value")
    o = cfg.optim
    checks = [
        ("optim.lr", o.lr > 0, "must be > 0"),
        ("optim.weight_decay", o.weight_decay >= 0, "must be >= 0"),
        ("optim.adam_beta1", 0 <= o.adam_beta1 < 1, "must be in [0, 1)"),
        ("optim.adam_beta2", 0 <= o.adam_beta2 < 1, "must be in [0, 1)"),
        ("optim.adam_eps", o.adam_eps > 0, "must be > 0 (0 makes Adam's update 0/0 = NaN)"),
        ("optim.clip_grad", o.clip_grad >= 0, "must be >= 0 (0 = no clipping)"),
        ("grpo.kl_coef", cfg.grpo.kl_coef >= 0, "must be >= 0"),
        ("grpo.adv_eps", cfg.grpo.adv_eps > 0, "must be > 0"),
        ("pretrain.lr", cfg.pretrain.lr > 0, "must be > 0"),
        ("pretrain.capability_target", 0 <= cfg.pretrain.capability_target <= 1, "in [0, 1]"),
        ("rewards.workers", cfg.rewards.workers >= 1, "must be >= 1"),
        ("rewards.timeout_s", cfg.rewards.timeout_s > 0, "must be > 0"),
        ("checkpoint.every", cfg.checkpoint.every >= 0, "must be >= 0"),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last >= 0, "must be >= 0 (0 = keep all)"),
        ("eval.every", cfg.eval.every >= 0, "must be >= 0 (0 = off)"),
        ("eval.limit", cfg.eval.limit >= 1, "must be >= 1"),
        ("eval.overlap_every", cfg.eval.overlap_every >= 0, "must be >= 0 (0 = off)"),
        ("eval.overlap_prompts", cfg.eval.overlap_prompts >= 1, "must be >= 1"),
        ("eval.overlap_samples", cfg.eval.overlap_samples >= 1, "must be >= 1"),
    ]
    checks += [(f"branches.{i}.beta", b.beta >= 0, "must be >= 0")
               for i, b in enumerate(cfg.branches)]  # fmt: skip
    for dotted, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{dotted}={_get(cfg, dotted)} {rule}")


def validate(cfg: Config) -> None:
    """Cross-field checks that need no world size. Raises ConfigError naming the setting."""
    _validate_numbers(cfg)
    for dotted, allowed in _CHOICES.items():
        if _get(cfg, dotted) not in allowed:
            raise ConfigError(f"{dotted}={_get(cfg, dotted)!r}: use one of {', '.join(allowed)}")
    positive = [
        "model.num_layers", "model.hidden_size", "model.ffn_hidden_size",
        "model.num_attention_heads", "model.num_query_groups", "model.vocab_size",
        "model.max_seq_length", "parallel.tp", "parallel.pp", "parallel.dp",
        "parallel.micro_batch_size", "grpo.group_size", "grpo.updates_per_batch",
        "rollout.prompts_per_step", "rollout.max_new_tokens", "opd.top_k", "schedule.cycles",
    ]  # fmt: skip
    for dotted in positive:
        if _get(cfg, dotted) <= 0:
            raise ConfigError(f"{dotted}={_get(cfg, dotted)} must be positive")
    m = cfg.model
    if m.head_dim < 0:
        raise ConfigError(f"model.head_dim={m.head_dim} must be >= 0 (0 = hidden / heads)")
    if not m.head_dim and m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by "
            f"model.num_attention_heads={m.num_attention_heads}; set model.head_dim"
        )
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_query_groups={m.num_query_groups} (GQA needs whole groups)"
        )
    if m.family == "qwen2" and not m.qkv_bias:
        raise ConfigError("model.family=qwen2 uses QKV bias: set model.qkv_bias=true")
    if m.family == "qwen3" and not m.qk_layernorm:
        raise ConfigError("model.family=qwen3 uses QK-norm: set model.qk_layernorm=true")
    if m.qk_layernorm and cfg.vision.enabled:
        raise ConfigError("model.qk_layernorm=true with vision.enabled=true is not supported")
    if cfg.checkpoint.init_from_hf and cfg.checkpoint.init_from:
        raise ConfigError(
            f"checkpoint.init_from={cfg.checkpoint.init_from!r} and checkpoint.init_from_hf="
            f"{cfg.checkpoint.init_from_hf!r} are both set; keep one"
        )
    if cfg.checkpoint.init_from_hf and cfg.vision.enabled:
        raise ConfigError(
            "checkpoint.init_from_hf with vision.enabled=true: import the LLaVA model with "
            "`copd import-hf` and start from it with checkpoint.init_from"
        )
    if not cfg.branches:
        raise ConfigError("branches: configure at least one branch")
    names = cfg.branch_names
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"branches: duplicate branch names {dupes}; give each a unique name")
    if cfg.teaching.graph == "hub_spoke" and cfg.teaching.hub not in names:
        raise ConfigError(
            f"teaching.hub={cfg.teaching.hub!r} is not a branch; set it to one of {names}"
        )
    if cfg.grpo.eps_low < 0 or cfg.grpo.eps_high < 0:
        raise ConfigError("grpo.eps_low and grpo.eps_high must be >= 0")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1]")
    if cfg.rollout.tis_cap < 0:
        raise ConfigError(f"rollout.tis_cap={cfg.rollout.tis_cap} must be >= 0 (0 turns TIS off)")
    if cfg.data.max_prompt_tokens < 0:
        raise ConfigError(f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} must be >= 0")
    if cfg.rollout.temperature < 0:
        raise ConfigError(f"rollout.temperature={cfg.rollout.temperature} must be >= 0")
    if cfg.rollout.max_batch_size < 1:
        raise ConfigError(
            f"rollout.max_batch_size={cfg.rollout.max_batch_size} must be >= 1: it is the "
            "number of sequences per generation micro-batch (the KV cache holds that many rows)"
        )
    if cfg.schedule.rl_steps < 0 or cfg.schedule.opd_steps < 0:
        raise ConfigError("schedule.rl_steps and schedule.opd_steps must be >= 0")
    if cfg.opd.top_k > m.vocab_size:
        raise ConfigError(f"opd.top_k={cfg.opd.top_k} exceeds model.vocab_size={m.vocab_size}")
    if sum(b.merge_weight for b in cfg.branches) <= 0 or any(
        b.merge_weight < 0 for b in cfg.branches
    ):
        raise ConfigError("branches.*.merge_weight must be >= 0 with a positive sum")
