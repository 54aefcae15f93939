"""Cross-field validation of a built Config: what the config alone can decide (what needs files waits
for fastgrpo.preflight). Each failure is one ConfigError naming the key and what is allowed."""

from __future__ import annotations

import dataclasses
import math


from fastgrpo.config.schema import LORA_ALL_PROJECTIONS, Config, ConfigError, DataConfig, LoraConfig


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
    if isinstance(r.max_staleness, bool) or not isinstance(r.max_staleness, int) or r.max_staleness < 0:
        raise ConfigError(f"rollout.max_staleness must be an int >= 0 (0 = synchronous), got {r.max_staleness!r}",
                          key="rollout.max_staleness")
    if r.max_staleness > 0 and r.enable_sleep_mode:
        raise ConfigError(f"rollout.max_staleness={r.max_staleness} samples while the trainer trains, but "
                          "rollout.enable_sleep_mode frees the engine during training: set one of them off",
                          key="rollout.max_staleness")
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
    if not (math.isfinite(lo.sampler_mask_cap) and lo.sampler_mask_cap > 1):
        raise ConfigError(f"loss.sampler_mask_cap must be a finite number > 1 (tokens are kept inside [1/cap, cap]), "
                          f"got {lo.sampler_mask_cap}", key="loss.sampler_mask_cap")
    if lo.tis_cap > 0 and lo.sampler_mask != "none":
        raise ConfigError(f"loss.tis_cap={lo.tis_cap} and loss.sampler_mask={lo.sampler_mask} are two corrections of "
                          f"the same mismatch: set one (loss.tis_cap=0 or loss.sampler_mask=none)", key="loss.sampler_mask")
    if not cfg.data.levels or any(lv not in (1, 2, 3, 4) for lv in cfg.data.levels):
        raise ConfigError(f"data.levels must be a non-empty list of 1..4, got {list(cfg.data.levels)}", key="data.levels")
    _validate_data_sources(cfg)
    _validate_lora(cfg.lora)
    _validate_lora_sync(cfg)


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


def _validate_lora_sync(cfg: Config) -> None:
    """lora.sync=adapter only where vLLM itself serves the adapter (its names are CHOICES["lora.sync"])."""
    if cfg.lora.sync != "adapter" or cfg.lora.rank == 0:
        return
    if cfg.rollout.engine != "vllm" or cfg.rollout.mode != "colocate":
        raise ConfigError(f"lora.sync=adapter loads the adapter into the vLLM engine the trainer starts (rollout.engine=vllm, "
                          f"rollout.mode=colocate), got rollout.engine={cfg.rollout.engine}, rollout.mode={cfg.rollout.mode}; "
                          "allowed here: lora.sync=merge", key="lora.sync")
    if cfg.lora.quantize != "none":
        # vLLM would add the adapter to the full-precision base, the trainer to the quantized one.
        raise ConfigError(f"lora.sync=adapter with lora.quantize={cfg.lora.quantize}: vLLM applies the adapter to the "
                          "unquantized base, not to the weights the trainer computes with; allowed: lora.sync=merge "
                          "(streams the dequantized merged weights)", key="lora.sync")


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
