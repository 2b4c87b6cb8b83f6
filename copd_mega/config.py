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

import yaml

from copd_mega.config_checks import validate
from copd_mega.config_hf_dir import apply_hf_model_config
from copd_mega.config_llava import CLIP_MEAN, CLIP_STD
from copd_mega.config_tree import ConfigError, apply_override, to_dataclass, to_dict

VLLM_TIS_CAP = 2.0  # rollout.tis_cap when rollout.engine=vllm and the config sets none


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
    # Per-channel normalisation of [0, 1] pixels (the image processor's; CLIP's by default).
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))


@dataclass
class ParallelConfig:
    """Per-branch grid; every branch has the same TP x PP x DP shape."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    backend: str = "auto"  # auto | nccl | gloo
    micro_batch_size: int = 8  # sequences per forward-backward microbatch
    # Memory at long sequences (megatron's settings; counted by `copd plan`):
    sequence_parallel: bool = False  # norms/dropout split over TP along the sequence
    recompute: str = "none"  # activation recompute: none | selective | full
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])  # selective
    recompute_num_layers: int = 1  # full: layers per recomputed chunk (megatron's uniform)
    by_length: bool = True  # an update's rows go longest first into micro-batches
    # Deadline of one collective. Ranks wait for uneven work (generation, scoring, another
    # branch's step) in store waits without a deadline first (parallel/comm.py: wait_for).
    collective_timeout_s: float = 600.0


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
    # Sequence positions per chunk of the log-prob/entropy/top-k work (one set of TP collectives
    # each); 0: as many as fit rollout.logprob_chunk_mib for a micro-batch's fp32 logits chunk.
    logprob_chunk: int = 0
    logprob_chunk_mib: int = 1024
    tis_cap: float = 0.0  # truncated importance sampling min(pi_trainer/pi_sampler, C); 0 = off
    max_batch_size: int = 64  # sequences per generation micro-batch (its KV cache's rows)
    # Generating engine (docs/architecture.md, "Generation"); vllm: text models, one engine per
    # rank (the TP x PP ranks of a replica split a call's rows), weights synced after every
    # update; tis_cap then defaults to 2
    engine: str = "megatron"  # megatron | vllm
    tp: int = 1  # vllm: generation tensor parallelism (only 1: every rank holds the whole model)
    kv_cache_gb: float = 0.5  # vllm: KV cache each engine reserves at start, GiB


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
    # Options of reasoning-gym tasks named as `rg:<task>` in branches.*.data: task -> its dataset
    # config's fields, e.g. {spell_backward: {min_word_len: 3, max_word_len: 5}}
    reasoning_gym: dict = field(default_factory=dict)


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
    # Neither init_from nor init_from_hf: training starts from random weights, which
    # `copd plan` and `copd train` refuse unless this says so (tiny models trained from scratch).
    random_init: bool = False
    # never | required (`copd train --resume`: error without a checkpoint) | auto (`--resume=auto`:
    # continue from the newest complete step if there is one, else start fresh)
    resume: str = "never"
    # By the clock (global rank 0 decides at each step boundary, every rank follows): save once
    # this many minutes passed since the last save (0 = off); stop with a checkpoint before a
    # step (predicted from measured step and save times, + end_margin_s) would end after the
    # allocation's end: Slurm's (SLURM_JOB_END_TIME or squeue), or time_limit_minutes after this
    # job started, whichever is sooner (0 = no own limit).
    every_minutes: float = 0.0
    time_limit_minutes: float = 0.0
    end_margin_s: float = 60.0


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
    slow_branch: str = ""  # this branch sleeps slow_step_s at the start of each of its steps
    slow_step_s: float = 0.0
    fail_at_step: int = -1  # global rank fail_rank raises a data error in the middle of this step
    fail_rank: int = 1


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
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML ({what}); fix the file there") from e
    else:
        data = to_dict(Config())
    given = {f"{s}.{k}" for s in ("model", "vision") if isinstance(data.get(s), dict)
             for k in data[s]} if path is not None else set()  # fmt: skip
    for ov in overrides or []:
        apply_override(data, ov)
        key = ov.split("=", 1)[0].strip()
        given |= {".".join(key.split(".")[:2])} if key.startswith(("model.", "vision.")) else set()
    ck = data.get("checkpoint")
    if isinstance(ck, dict) and isinstance(ck.get("resume"), bool):  # the older boolean form
        ck["resume"] = "required" if ck["resume"] else "never"
    tis_given = path is not None and "tis_cap" in (data.get("rollout") or {})
    tis_given |= any(ov.split("=", 1)[0].strip() == "rollout.tis_cap" for ov in overrides or [])
    cfg = to_dataclass(data, Config)
    if cfg.rollout.engine == "vllm" and not tis_given:  # vLLM's numerics differ from training's
        cfg.rollout.tis_cap = VLLM_TIS_CAP
    if cfg.checkpoint.init_from_hf:  # model.*/vision.* from the HF files (mismatches are errors)
        apply_hf_model_config(cfg, given)
    validate(cfg)
    return cfg
