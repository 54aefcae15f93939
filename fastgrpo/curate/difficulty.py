"""Problem difficulty as a pass rate: k samples per problem from a model, graded like the reward.

open-rs trained on a mix of easy and hard problems (its Exp 2) after Exp 1 (hard only) collapsed;
a group whose k samples all agree carries no GRPO signal. ``fastgrpo data prepare --difficulty K``
records ``pass_rate = correct / K`` per problem with the model that will be trained, so a config can
filter or mix subsets (e.g. the ``.easy.jsonl`` / ``.hard.jsonl`` files of ``--split-at``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastgrpo.data.prompts import PROMPT_TEMPLATES, build_messages, encode_prompt


def _training_default(section: str, name: str) -> Any:
    import fastgrpo.config as config

    return getattr(getattr(config, section), name)


@dataclass(frozen=True)
class DifficultyOptions:
    """Pass-rate estimation: ``samples`` completions per problem from ``model`` (0 = off).

    Prompt and sampling defaults are the training defaults (DataConfig, RolloutConfig), so the pass
    rate is the one the trainer's groups will see.
    """

    samples: int = 0
    model: str = "default"
    engine: str = "vllm"
    max_tokens: int = 512
    temperature: float = field(default_factory=lambda: _training_default("RolloutConfig", "temperature"))
    top_p: float = field(default_factory=lambda: _training_default("RolloutConfig", "top_p"))
    template: str = field(default_factory=lambda: _training_default("DataConfig", "template"))
    one_shot: bool = field(default_factory=lambda: _training_default("DataConfig", "one_shot"))
    dtype: str = field(default_factory=lambda: _training_default("RolloutConfig", "dtype"))
    max_model_len: int = 2048  # prompts longer than max_model_len - max_tokens are dropped
    cpu_kvcache_gb: float = 1.0
    seed: int = 0
    prompts_per_call: int = 64
    grader_workers: int = 1
    min_pass_rate: float = 0.0  # keep rows with min_pass_rate <= pass_rate <= max_pass_rate
    max_pass_rate: float = 1.0
    split_at: float | None = None  # also write <out>.easy.jsonl (pass_rate >= split_at) and .hard.jsonl

    def __post_init__(self) -> None:
        for name in ("samples", "max_tokens", "max_model_len", "prompts_per_call", "grader_workers"):
            value = getattr(self, name)
            low = 0 if name in ("samples", "grader_workers") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"difficulty {name} must be an integer >= {low}, got {value!r}")
        if self.template not in PROMPT_TEMPLATES:
            raise ValueError(f"unknown prompt template {self.template!r}; valid templates: {list(PROMPT_TEMPLATES)}")
        if not 0.0 <= self.min_pass_rate <= self.max_pass_rate <= 1.0:
            raise ValueError(f"need 0 <= min_pass_rate <= max_pass_rate <= 1, got {self.min_pass_rate!r}, "
                             f"{self.max_pass_rate!r}")
        if self.split_at is not None and not 0.0 <= self.split_at <= 1.0:
            raise ValueError(f"split_at must be in [0, 1], got {self.split_at!r}")
        if self.max_tokens >= self.max_model_len:
            raise ValueError(f"max_tokens {self.max_tokens} leaves no room for a prompt in max_model_len "
                             f"{self.max_model_len}")
        if self.samples:
            from fastgrpo.rollout import ENGINE_KINDS

            if self.engine not in ENGINE_KINDS:
                raise ValueError(f"unknown rollout engine {self.engine!r}; valid engines: {', '.join(ENGINE_KINDS)}")
            if self.model != "default" and not (Path(self.model).expanduser() / "config.json").is_file():
                raise ValueError(f"--model {self.model!r} is not a local Hugging Face model folder (no config.json) "
                                 "nor 'default'")


def estimate_pass_rates(problems: Sequence[dict], engine, tokenizer, options: DifficultyOptions,
                        grader=None, progress: bool = False) -> list[int]:
    """Correct completions (0..options.samples) per problem: ``options.samples`` samples each from
    ``engine`` (rollout.RolloutEngine), graded like the accuracy reward (rewards.grade).

    Prompts are data.build_messages(problem, template, one_shot) through the chat template, sent
    ``prompts_per_call`` at a time; call c is seeded ``seed + c``.
    """
    from tqdm.auto import tqdm

    from fastgrpo.rewards import grade

    k = options.samples
    correct: list[int] = []
    starts = range(0, len(problems), options.prompts_per_call)
    for call, start in enumerate(tqdm(starts, desc="difficulty", unit="call", disable=not progress)):
        chunk = problems[start : start + options.prompts_per_call]
        prompt_ids = [encode_prompt(tokenizer, build_messages(p["problem"], options.template, options.one_shot))
                      for p in chunk]
        outputs = engine.generate(prompt_ids, n=k, max_tokens=options.max_tokens, temperature=options.temperature,
                                  top_p=options.top_p, seed=options.seed + call)
        texts: list[list[str]] = [[] for _ in chunk]
        for out in outputs:
            texts[out.prompt_index].append(out.text)
        for index, group in enumerate(texts):
            if len(group) != k:
                raise RuntimeError(f"engine returned {len(group)} completions for prompt {start + index}, expected {k}")
        flat = [text for group in texts for text in group]
        golds = [str(p["answer"]) for p in chunk for _ in range(k)]
        verdicts = grade(flat, golds, grader).correct
        correct += [sum(verdicts[i * k : (i + 1) * k]) for i in range(len(chunk))]
    return correct


def make_difficulty_engine(options: DifficultyOptions):
    """(engine, tokenizer) for options.model (a local folder or "default") with options.engine."""
    from fastgrpo.model import load_tokenizer, resolve_model_path
    from fastgrpo.rollout import make_engine

    model_dir = resolve_model_path(options.model)
    tokenizer = load_tokenizer(model_dir)
    engine = make_engine(options.engine, model_path=str(model_dir), tokenizer=tokenizer, dtype=options.dtype,
                         max_model_len=options.max_model_len, seed=options.seed,
                         cpu_kvcache_gb=options.cpu_kvcache_gb)
    return engine, tokenizer


