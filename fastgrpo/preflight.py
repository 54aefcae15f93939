"""Checks that read files, run by ``trainer.train`` before any model loads.

``config.validate`` decides what the config alone can decide. What needs files waits for
``check_run(cfg)``: the rewards are registered; ``model.path`` is a model folder (the KL
reference of ``loss.beta > 0`` comes from it too); every dataset exists, loads and has valid rows
(a bad row is named by file and line); and the longest prompt plus the longest completion fits
the model (``max_position_embeddings`` of its config.json), ``rollout.max_model_len`` and
``train.max_tokens_per_microbatch``; the model's logits are its LM head's output unchanged (the
fused head computes ``log_softmax(hidden @ W.T / temperature)`` and nothing else); and with ``lora.rank > 0`` the adapters' target modules exist
and peft can wrap them, and ``lora.quantize`` has a bitsandbytes backend. Each failure is
one ConfigError naming the key, the file and what is allowed, raised in seconds instead of after
minutes of model loading and sampling.

The default model is not converted for the check: before its first conversion the prompt's share
of the length checks is skipped (no tokenizer yet) and the model's limit is the embedded GGUF's.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from fastgrpo.config import Config, ConfigError

_DATASET_FORMS = "'arithmetic' (built in), a dataset name under data.data_dir, or a .jsonl/.json/.parquet file or saved-dataset folder"


@dataclass(frozen=True)
class RunShape:
    """What the checks measured. ``longest_prompt`` is None before the default model's first conversion."""

    longest_prompt: int | None  # tokens of the longest chat prompt over train, held-out and suite problems
    model_max_length: int | None  # the model's longest sequence; None when its config names none
    # The problems as mixture.load_training_data returned them: the trainer uses these, not a second read.
    train_problems: list[dict] = field(default_factory=list, repr=False)
    held_out_problems: list[dict] = field(default_factory=list, repr=False)


def check_run(cfg: Config) -> RunShape:
    """Raise ConfigError for the first input problem found; return the measured lengths."""
    from fastgrpo.rewards import get_reward

    for name in cfg.reward_weights:
        try:
            get_reward(name)
        except ValueError as exc:
            raise ConfigError(f"reward_weights.{name}: {exc}", key=f"reward_weights.{name}") from None
    _check_suite_names(cfg.eval.suite)
    folder, max_len = _check_model(cfg)
    if folder is not None:  # the default model (SmolLM2, Llama) does not post-process its logits
        check_logits_are_the_heads(folder, f"model.path={cfg.model.path!r}")
    _check_lora(cfg, folder)
    _check_staleness(cfg)
    problems = _check_data(cfg)
    if folder is None:
        return RunShape(None, max_len, problems["train"], problems["held_out"])
    from fastgrpo.model import load_tokenizer

    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.path={cfg.model.path!r}: no usable tokenizer in {folder} ({exc})",
                          key="model.path") from None
    train_prompt, train_id = longest_prompt(tokenizer, problems["train"], cfg.data.template, cfg.data.one_shot)
    any_prompt, any_id = max((longest_prompt(tokenizer, p, cfg.data.template, cfg.data.one_shot) for p in problems.values()),
                             key=lambda x: x[0])
    _check_lengths(cfg, folder, max_len, (train_prompt, train_id), (any_prompt, any_id))
    return RunShape(any_prompt, max_len, problems["train"], problems["held_out"])


def _check_suite_names(suite: tuple[str, ...]) -> None:
    """Suite metrics are keyed by dataset name: two entries with one name (aime24, x/aime24.jsonl) would collide."""
    from fastgrpo.data.sources import dataset_label

    labels = [dataset_label(s) for s in suite]
    duplicates = sorted({s for s in labels if labels.count(s) > 1})
    if duplicates:
        raise ConfigError(f"eval.suite: the names {duplicates} occur twice (metrics are keyed by name)",
                          key="eval.suite")


def _check_model(cfg: Config) -> tuple[Path | None, int | None]:
    from fastgrpo.model import existing_model_dir, model_max_length

    try:
        folder = existing_model_dir(cfg.model.path, cfg.model.cache_dir)
        max_len = model_max_length(cfg.model.path, cfg.model.cache_dir)
    except (OSError, ValueError) as exc:
        also = " With loss.beta > 0 the frozen KL reference is loaded from it too." if cfg.loss.beta > 0 else ""
        raise ConfigError(f"model.path={cfg.model.path!r}: {exc}.{also} Allowed: 'default' (the embedded "
                          "SmolLM2-135M-Instruct) or a local Hugging Face model folder with config.json",
                          key="model.path") from None
    return folder, max_len


# config.json attributes of architectures that post-process the LM head's output before the softmax,
# each with the value that leaves the logits as they are (from the transformers modeling code):
# Gemma 2 (and Gemma 3 when set) cap them (c * tanh(logits / c)), Granite and HyperCLOVA X divide or multiply them by
# logits_scaling, Cohere multiplies by logit_scale, Falcon-H1 by lm_head_multiplier. vLLM samples
# from the post-processed logits; the fused head would compute log-probs of the raw ones: wrong
# ratios, KL and gradients, without an error.
LOGIT_POSTPROCESSING: dict[str, float | None] = {
    "final_logit_softcapping": None, "logits_scaling": 1.0, "logit_scale": 1.0, "lm_head_multiplier": 1.0,
}


def check_logits_are_the_heads(folder: Path, key: str) -> None:
    """ConfigError naming ``key``, the model folder and the attribute when the model in ``folder``
    post-processes its logits (LOGIT_POSTPROCESSING). Reads the config only, with its class's
    defaults for what config.json leaves out (Cohere's logit_scale is one: 0.0625); multimodal
    configs nest the language model's under ``text_config``."""
    config = _config_dict(Path(folder))
    sections = [("", config)]
    if isinstance(config.get("text_config"), dict):
        sections.append(("text_config.", config["text_config"]))
    for prefix, section in sections:
        for attribute, plain in LOGIT_POSTPROCESSING.items():
            if section.get(attribute, plain) != plain:
                allowed = ", ".join(f"{a}={json.dumps(v)}" for a, v in LOGIT_POSTPROCESSING.items())
                raise ConfigError(
                    f"{key}: the model in {folder} has {prefix}{attribute}={json.dumps(section[attribute])} "
                    f"(config.json or its class's default): it post-processes its logits, which fastgrpo's fused "
                    f"LM head does not, so its log-probs would not be those of the model that samples. Allowed: "
                    f"a model that leaves its logits as they are ({allowed})", key=key)


def _config_dict(folder: Path) -> dict:
    """The model's config as a dict, class defaults included; config.json as it is for a model type
    this transformers does not know."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(folder).to_dict()
    except (ValueError, KeyError, OSError):
        return json.loads((folder / "config.json").read_text())
def _check_lora(cfg: Config, folder: Path | None) -> None:
    """lora.quantize has a bitsandbytes backend here; lora.target_modules name wrappable modules of the
    model (checked on a weightless copy built from config.json; skipped before the default model's
    first conversion, whose layers are the Llama projections of the defaults)."""
    if cfg.lora.rank == 0:
        return
    from fastgrpo.lora import check_quantize_supported, check_targets

    _refuse_several_processes("lora.rank", cfg.lora.rank, "LoRA", "FSDP2 sharding of adapters is not supported", "0")

    check_quantize_supported(cfg.lora.quantize)
    if folder is not None:
        check_targets(cfg.lora, folder)


def _check_staleness(cfg: Config) -> None:
    """Rollouts sampled ahead come from one producer in one training process: under torchrun every
    rank would run its own and ask the server for batches of different policy versions."""
    if cfg.rollout.max_staleness > 0:
        _refuse_several_processes("rollout.max_staleness", cfg.rollout.max_staleness, "the rollout producer",
                                  "one rollout producer per run", "0")


def _refuse_several_processes(key: str, value: Any, feature: str, why: str, off: str) -> None:
    """A ConfigError for ``key`` when this launch has several training processes (torchrun)."""
    from fastgrpo.distributed import launched_world_size

    n = launched_world_size()
    if n > 1:
        raise ConfigError(f"{key}={value}: {feature} runs in one training process for now (this launch has {n}: "
                          f"{why}); run without torchrun, or set {key}={off}", key=key)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Mute a logger: the trainer loads the data again right after and logs skipped rows once."""
    logger = logging.getLogger(logger_name)
    was = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was


def _row_error(key: str, exc: Exception, problem_key: str, answer_key: str) -> ConfigError:
    message = str(exc).replace("on_error='skip' drops bad rows", "data.on_bad_rows=skip drops bad rows")
    return ConfigError(f"{key}: {message}. Allowed: rows with a non-empty {problem_key!r} string and a non-empty "
                       f"{answer_key!r} string or number (the field names are data.problem_key and data.answer_key)",
                       key=key)


def _check_entry(key: str, entry: str, data_dir: str, subdir: str, problem_key: str, answer_key: str,
                 on_error: str) -> list[dict]:
    """Resolve and load one dataset entry; errors name ``key``."""
    from fastgrpo.data.sources import load_problems
    from fastgrpo.data.sources import resolve_dataset

    try:
        path = resolve_dataset(entry, data_dir, subdir)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}={entry!r}: {exc}. Allowed: {_DATASET_FORMS}", key=key) from None
    try:
        return load_problems(path, problem_key, answer_key, on_error=on_error)
    except (OSError, ValueError, ImportError) as exc:
        raise _row_error(key, exc, problem_key, answer_key) from None


def _check_data(cfg: Config) -> dict[str, list[dict]]:
    """{"train", "held_out", "suite"} problems, loaded as the trainer loads them."""
    from fastgrpo.data.problems import load_training_data

    d = cfg.data
    with _quiet("fastgrpo.data"):
        try:
            train, held_out = load_training_data(d, seed=cfg.train.seed)
        except (OSError, ValueError, ImportError) as exc:
            # Which entry? Load each on its own so the error names its key.
            entries = [(f"data.mixture.{name}", name) for name in d.mixture]
            if not d.mixture and d.dataset != "arithmetic":
                entries.append(("data.dataset", d.dataset))
            for key, entry in entries:
                _check_entry(key, entry, d.data_dir, "train", d.problem_key, d.answer_key, d.on_bad_rows)
            if d.eval_dataset is not None:
                _check_entry("data.eval_dataset", d.eval_dataset, d.data_dir, "eval", d.problem_key, d.answer_key,
                             d.on_bad_rows)
            raise ConfigError(f"data: {exc}", key="data") from None
        suite = []
        for i, entry in enumerate(cfg.eval.suite):
            suite += _check_entry(f"eval.suite[{i}]", entry, d.data_dir, "eval", "problem", "answer", "raise")[
                : cfg.eval.suite_limit]
    return {"train": train, "held_out": held_out, "suite": suite}


# ----------------------------------------------------------------------------------------------
# Lengths
# ----------------------------------------------------------------------------------------------


def longest_prompt(tokenizer, problems: list[dict], template: str, one_shot: bool) -> tuple[int, str | None]:
    """(tokens, problem id) of the longest chat prompt over ``problems``, encoding only the few that can be it.

    Byte-level BPE and byte-fallback SentencePiece make at most one token per UTF-8 byte, so a
    problem of b bytes gives a prompt of at most ``frame + b`` tokens (frame: the template's own
    tokens, +2 for merges at the seams). Problems are visited longest first and the walk stops once
    that bound cannot beat the best so far. Measured on the 8,445 DeepScaleR problems: 4 prompts
    encoded, 0.02 s, the same 3,478 tokens as encoding all of them (6.1 s on 2 busy cores).
    """
    from fastgrpo.data.prompts import build_messages, encode_prompt

    if not problems:
        return 0, None

    def tokens(text: str) -> int:
        return len(encode_prompt(tokenizer, build_messages(text, template, one_shot)))

    frame = tokens("x") - 1 + 2
    best, best_id = 0, None
    for p in sorted(problems, key=lambda p: len(p["problem"].encode()), reverse=True):
        if frame + len(p["problem"].encode()) <= best:
            break
        n = tokens(p["problem"])
        if n > best:
            best, best_id = n, p.get("id")
    return best, best_id


def _check_lengths(cfg: Config, folder: Path, max_len: int | None, train_prompt: tuple[int, str | None],
                   any_prompt: tuple[int, str | None]) -> None:
    r = cfg.rollout
    completions = [(r.max_completion_length, "rollout.max_completion_length")]
    completions += [(length, f"rollout.length_stages[{i}]") for i, (_, length) in enumerate(r.length_stages)]
    train_completion, train_key = max(completions)
    if cfg.eval.max_completion_length is not None:
        completions.append((cfg.eval.max_completion_length, "eval.max_completion_length"))
    completion, key = max(completions)
    prompt, prompt_id = any_prompt
    needed = prompt + completion
    where = f"{folder}/config.json"
    if max_len is not None and needed > max_len:
        raise ConfigError(
            f"{key}: the longest prompt ({prompt} tokens, problem {prompt_id!r}) plus {completion} completion tokens "
            f"is {needed} tokens, more than the model takes ({max_len}, max_position_embeddings in {where}). "
            f"Allowed: completions of at most {max(0, max_len - prompt)} tokens", key=key)
    if r.max_model_len is not None:
        if max_len is not None and r.max_model_len > max_len:
            raise ConfigError(f"rollout.max_model_len={r.max_model_len} is more than the model takes ({max_len}, "
                              f"max_position_embeddings in {where}). Allowed: {needed}..{max_len}, or null (sized from the data)",
                              key="rollout.max_model_len")
        if r.max_model_len < needed:
            raise ConfigError(
                f"rollout.max_model_len={r.max_model_len} is smaller than the longest prompt ({prompt} tokens, problem "
                f"{prompt_id!r}) plus {key}={completion}. Allowed: >= {needed}, or null (sized from the data)",
                key="rollout.max_model_len")
    budget = cfg.train.max_tokens_per_microbatch
    prompt, prompt_id = train_prompt
    if budget < prompt + train_completion:
        raise ConfigError(
            f"train.max_tokens_per_microbatch={budget} is smaller than one training sequence: the longest prompt "
            f"({prompt} tokens, problem {prompt_id!r}) plus {train_key}={train_completion} is {prompt + train_completion} "
            f"tokens. Allowed: >= {prompt + train_completion}", key="train.max_tokens_per_microbatch")
