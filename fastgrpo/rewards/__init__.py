"""Reward registry and the rewards; ``compute_rewards`` weighs them for one step.

A reward is ``fn(completions: list[str], answers: list[str], **ctx) -> list[float]`` with one
value per completion; a reward uses the ``ctx`` entries it needs and ignores the others. Register
one with ``@register_reward("name")``; weights come from the config as ``{"name": weight}``.
``compute_rewards`` passes this ctx:
  correct                list[bool]: the grader's verdicts (graded once, shared by accuracy and cosine)
  completion_lengths     list[int]: completion lengths in tokens
  truncated              list[bool]: the engine stopped the completion at the length limit
  max_completion_length  int: this step's completion length limit in tokens
  settings               RewardConfig: the `reward_params` config section
  grader                 Grader: for rewards that need to grade more

Registered rewards (formulas of the shaping rewards: fastgrpo/rewards/shaping.py):
  accuracy      1.0 when the last boxed answer equals the gold answer (grader.py: integers, else math-verify)
  format        1.0 a closed, non-empty final box ending the answer; 0.5 followed by more text; 0.0 none
  think_format  the format score of the text after ``</think>`` when the completion reasons first:
                ``[<think>] reasoning </think> answer`` with one ``</think>``; else 0.0
  tag_count     0.5 for exactly one ``<think>`` plus 0.5 for exactly one ``</think>``
  cosine        cosine length reward (shorter correct answers earn more, longer wrong ones lose less)
  repetition    -max_penalty * share of repeated word n-grams
  overlong      DAPO's soft overlong punishment (tokens)
  language      -penalty * share of letters in non-Latin scripts

A reward function that raises scores 0 for the completions it failed on (it is retried one
completion at a time to find them); the failures are counted (``reward_failures_<name>``) and each
kind (reward, exception type) is logged once. Model text is never evaluated: see grader.py.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import NamedTuple

from fastgrpo.config import RewardConfig
from fastgrpo.rewards.grader import (BOXED_SCAN_CHARS, MAX_ANSWER_CHARS, Grader, GradeResult, extract_boxed, last_box,
                             shared_grader)
from fastgrpo.rewards.shaping import (COSINE_WRONG_AT_ZERO, cosine_scaled, language_drift_fraction, language_penalty,
                              overlong_penalty, repetition_penalty)

__all__ = ["BOXED_SCAN_CHARS", "MAX_ANSWER_CHARS", "REWARDS", "RewardBatch", "RewardInputError", "combine_reward_metrics",
           "compute_rewards", "extract_boxed", "get_reward", "register_reward"]

log = logging.getLogger("fastgrpo.rewards")

RewardFn = Callable[..., list[float]]
REWARDS: dict[str, RewardFn] = {}


class RewardInputError(ValueError):
    """A reward was called without an input it needs, or returned the wrong number of values: a
    programming error, raised (never scored 0)."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding ``fn`` to REWARDS under ``name``; a name can be registered once."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered; registered: {sorted(REWARDS)}")
        REWARDS[name] = fn
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {sorted(REWARDS)}")
    return REWARDS[name]


def _check_lengths(completions: list[str], answers: list[str]) -> None:
    if len(completions) != len(answers):
        raise ValueError(f"got {len(completions)} completions but {len(answers)} answers; one answer per completion")


def _need(ctx: Mapping, key: str, reward: str, what: str):
    if ctx.get(key) is None:
        raise RewardInputError(f"reward {reward!r} needs {key} ({what}); compute_rewards passes it when given")
    return ctx[key]


# ----------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------


def grade(completions: list[str], answers: list[str], grader: Grader | None = None) -> GradeResult:
    """The grader's verdicts; without a grader, in-process (math-verify's own limits only)."""
    return (grader or Grader(workers=0)).grade(completions, answers)


def _correctness(completions: list[str], answers: list[str], ctx: Mapping) -> list[bool]:
    correct = ctx.get("correct")
    if correct is None:
        correct = grade(completions, answers, ctx.get("grader")).correct
    if len(correct) != len(completions):
        raise RewardInputError(f"got {len(correct)} correctness flags for {len(completions)} completions")
    return list(correct)


@register_reward("accuracy")
def accuracy_reward(completions: list[str], answers: list[str], **ctx) -> list[float]:
    """1.0 when the last boxed answer equals the gold answer, else 0.0.

    Plain integers on both sides are compared as integers (the arithmetic task; "042" == "42");
    anything else goes through math-verify (\\frac{1}{2} == 0.5, intervals, sets, ...). Uses
    ``ctx["correct"]`` when compute_rewards graded already, else ``ctx["grader"]`` or in-process.
    """
    _check_lengths(completions, answers)
    return [float(c) for c in _correctness(completions, answers, ctx)]


# ----------------------------------------------------------------------------------------------
# Format
# ----------------------------------------------------------------------------------------------

# Text allowed after the final box for full format credit, e.g. "$." or "\]" or "I hope it is
# correct." (27 characters); longer trailing text means the box was not the end of the answer.
FORMAT_TRAILING_CHARS = 40


def _box_format_score(text: str) -> float:
    box = last_box(text)
    if box is None or not box[0].strip():
        return 0.0
    return 1.0 if len("".join(box[1].split())) <= FORMAT_TRAILING_CHARS else 0.5


@register_reward("format")
def format_reward(completions: list[str], answers: list[str] | None = None, **ctx) -> list[float]:
    """1.0: a non-empty final box followed by at most FORMAT_TRAILING_CHARS non-space characters;
    0.5: a non-empty box followed by more text; 0.0: no box, an empty one, or an unclosed final one.

    The answer's correctness plays no part (answers is accepted for the common signature).
    """
    if answers is not None:
        _check_lengths(completions, answers)
    return [_box_format_score(text) for text in completions]


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _think_format_score(text: str) -> float:
    reasoning, close, answer = text.partition(THINK_CLOSE)
    if not close or THINK_CLOSE in answer or THINK_OPEN in answer:
        return 0.0
    reasoning = reasoning.lstrip()
    if reasoning.startswith(THINK_OPEN):
        reasoning = reasoning[len(THINK_OPEN):]
    if THINK_OPEN in reasoning or not reasoning.strip():
        return 0.0
    return _box_format_score(answer)


@register_reward("think_format")
def think_format_reward(completions: list[str], answers: list[str] | None = None, **ctx) -> list[float]:
    """R1-style format: ``[<think>] reasoning </think> answer``, scored as format_reward scores the
    answer part (1.0 / 0.5 / 0.0); 0.0 without exactly one ``</think>`` after non-blank reasoning,
    or with a ``<think>`` anywhere but the start.

    The opening tag is optional because R1-style chat templates put ``<think>\\n`` in the prompt
    (open-rs's format reward counts only the closing tag for that reason).
    """
    if answers is not None:
        _check_lengths(completions, answers)
    return [_think_format_score(text) for text in completions]


@register_reward("tag_count")
def tag_count_reward(completions: list[str], answers: list[str] | None = None, **ctx) -> list[float]:
    """0.5 when ``<think>`` occurs exactly once plus 0.5 when ``</think>`` does.

    open-r1/open-rs's tag_count_reward with bare tags: theirs count "<think>\\n" and "\\n</think>\\n"
    (newlines included). With a prompt that already opens ``<think>`` the most is 0.5, as there.
    """
    if answers is not None:
        _check_lengths(completions, answers)
    return [0.5 * (text.count(THINK_OPEN) == 1) + 0.5 * (text.count(THINK_CLOSE) == 1) for text in completions]


# ----------------------------------------------------------------------------------------------
# Shaping: length, repetition, language (formulas in shaping.py)
# ----------------------------------------------------------------------------------------------


def _settings(ctx: Mapping) -> RewardConfig:
    return ctx.get("settings") or RewardConfig()


@register_reward("cosine")
def cosine_reward(completions: list[str], answers: list[str], **ctx) -> list[float]:
    """Cosine length reward (shaping.cosine_scaled) on the grader's verdicts.

    compat "fastgrpo": L = completion_lengths (tokens), clamped at max_len; compat "open-rs":
    L = len(text) in characters, unclamped, cosine_wrong_at_zero 0.0 unless set: open-rs's code and
    command-line defaults exactly. max_len = settings.cosine_max_len or max_completion_length.
    Not reproduced from open-rs: its correctness check (math-verify on the whole completion, first
    match; fastgrpo grades the last box) and its 1.0 for a gold answer math-verify cannot parse.
    """
    _check_lengths(completions, answers)
    settings = _settings(ctx)
    correct = _correctness(completions, answers, ctx)
    open_rs = settings.compat == "open-rs"
    if open_rs:
        lengths = [len(text) for text in completions]
    else:
        lengths = _need(ctx, "completion_lengths", "cosine", "token counts; compat open-rs counts characters")
    max_len = settings.cosine_max_len or _need(ctx, "max_completion_length", "cosine", "or set reward_params.cosine_max_len")
    wrong_at_zero = settings.cosine_wrong_at_zero
    if wrong_at_zero is None:
        wrong_at_zero = COSINE_WRONG_AT_ZERO[settings.compat]
    return cosine_scaled(lengths, correct, max_len, correct_at_zero=settings.cosine_correct_at_zero,
                         correct_at_max=settings.cosine_correct_at_max, wrong_at_zero=wrong_at_zero,
                         wrong_at_max=settings.cosine_wrong_at_max, clamp=not open_rs)


@register_reward("repetition")
def repetition_reward(completions: list[str], answers: list[str] | None = None, **ctx) -> list[float]:
    """-max_penalty * (1 - distinct / total word n-grams) (shaping.repetition_penalty)."""
    settings = _settings(ctx)
    return repetition_penalty(completions, settings.repetition_ngram_size, settings.repetition_max_penalty)


@register_reward("overlong")
def overlong_reward(completions: list[str], answers: list[str] | None = None, **ctx) -> list[float]:
    """DAPO's soft overlong punishment on token counts (shaping.overlong_penalty); a truncated
    completion gets the full penalty."""
    settings = _settings(ctx)
    lengths = _need(ctx, "completion_lengths", "overlong", "token counts")
    max_length = _need(ctx, "max_completion_length", "overlong", "the length limit in tokens")
    return overlong_penalty(lengths, ctx.get("truncated"), max_length, settings.overlong_buffer_len,
                            settings.overlong_penalty)


@register_reward("language")
def language_reward(completions: list[str], answers: list[str] | None = None, **ctx) -> list[float]:
    """-language_penalty * share of letters in non-Latin scripts (shaping.language_penalty)."""
    return language_penalty(completions, _settings(ctx).language_penalty)


# ----------------------------------------------------------------------------------------------
# Combining rewards
# ----------------------------------------------------------------------------------------------

# Rewards that need the grader's verdicts: the batch is graded once for all of them.
NEEDS_CORRECTNESS = frozenset({"accuracy", "cosine"})
# ctx entries with one value per completion (sliced when a failing reward is retried per item).
PER_ITEM_KEYS = ("correct", "completion_lengths", "truncated")
_LOGGED_FAILURES: set[tuple[str, str]] = set()


class RewardBatch(NamedTuple):
    """What compute_rewards returns: totals[i] = sum over rewards of weight * per_reward[name][i];
    metrics: grader_timeouts, grader_crashes, grader_errors, reward_failures_<name> (counts this
    call) and lang_drift_frac (share of completions with non-Latin-script text)."""

    totals: list[float]
    per_reward: dict[str, list[float]]
    metrics: dict[str, float]


class _BadRewardOutput(Exception):
    """A reward returned a non-finite value (scored 0 like a raised exception)."""


def _checked(name: str, values, n: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) != n:
        raise RewardInputError(f"reward {name!r} returned {len(values)} values for {n} completions")
    if not all(math.isfinite(v) for v in values):
        raise _BadRewardOutput(f"reward {name!r} returned a non-finite value")
    return values


def _log_failure_once(name: str, exc: BaseException) -> None:
    kind = (name, type(exc).__name__)
    if kind not in _LOGGED_FAILURES:
        _LOGGED_FAILURES.add(kind)
        # The message is cut: it may quote model text, which can be a megabyte long.
        log.warning("reward %r failed with %s: %.200s; the completions it fails on score 0 for it. Later %s "
                    "failures of this reward are counted in reward_failures_%s, not logged.",
                    name, kind[1], exc, kind[1], name)


def _call_reward(name: str, fn: RewardFn, completions: list[str], answers: list[str],
                 ctx: dict) -> tuple[list[float], int]:
    """(values, failures): the batch at once; if that raises, one completion at a time, 0 for those that fail."""
    n = len(completions)
    try:
        return _checked(name, fn(completions, answers, **ctx), n), 0
    except RewardInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a reward's bug or a hostile input: score 0, count, log once
        _log_failure_once(name, exc)
    values, failures = [], 0
    for i in range(n):
        item_ctx = {k: ([v[i]] if k in PER_ITEM_KEYS and v is not None else v) for k, v in ctx.items()}
        try:
            values.append(_checked(name, fn([completions[i]], [answers[i]], **item_ctx), 1)[0])
        except RewardInputError:
            raise
        except Exception as exc:  # noqa: BLE001
            _log_failure_once(name, exc)
            values.append(0.0)
            failures += 1
    return values, failures


def compute_rewards(
    weights: Mapping[str, float],
    completions: list[str],
    answers: list[str],
    *,
    settings: RewardConfig | None = None,
    completion_lengths: list[int] | None = None,
    truncated: list[bool] | None = None,
    max_completion_length: int | None = None,
    grader: Grader | None = None,
    **ctx,
) -> RewardBatch:
    """Weighted sum of the named rewards, per-reward values and the step's reward metrics.

    Every named reward is computed, also at weight 0 (then it is logged but does not train).
    When accuracy or cosine is named, the batch is graded once by ``grader`` (default: the shared
    pool of ``settings.grader_workers`` workers with ``settings.grader_timeout_s`` per item).
    Raises ValueError for unknown rewards, mismatched lengths, or a reward missing an input;
    a reward that fails on some completions scores 0 there (counted in reward_failures_<name>).
    """
    if not weights:
        raise ValueError(f"no rewards given; valid rewards: {sorted(REWARDS)}")
    _check_lengths(completions, answers)
    for key, values in (("completion_lengths", completion_lengths), ("truncated", truncated)):
        if values is not None and len(values) != len(completions):
            raise ValueError(f"got {len(values)} {key} for {len(completions)} completions")
    fns = {name: get_reward(name) for name in weights}
    settings = settings or RewardConfig()
    metrics: dict[str, float] = {"grader_timeouts": 0, "grader_crashes": 0, "grader_errors": 0}
    if NEEDS_CORRECTNESS & set(weights) and ctx.get("correct") is None:
        grader = grader or shared_grader(settings.grader_workers, settings.grader_timeout_s)
        result = grader.grade(completions, answers)
        ctx["correct"] = result.correct
        metrics.update(grader_timeouts=result.timeouts, grader_crashes=result.stats["crash"],
                       grader_errors=result.stats["error"])
    ctx.update(settings=settings, completion_lengths=completion_lengths, truncated=truncated,
               max_completion_length=max_completion_length, grader=grader)
    totals = [0.0] * len(completions)
    per_reward: dict[str, list[float]] = {}
    for name, weight in weights.items():
        values, failures = _call_reward(name, fns[name], completions, answers, ctx)
        per_reward[name] = values
        metrics[f"reward_failures_{name}"] = failures
        totals = [t + float(weight) * v for t, v in zip(totals, values)]
    metrics["lang_drift_frac"] = language_drift_fraction(completions)
    return RewardBatch(totals, per_reward, metrics)


def combine_reward_metrics(batches: list[RewardBatch]) -> dict[str, float]:
    """The metrics of several compute_rewards results as one (a step may reward several rounds of
    samples, DAPO dynamic sampling): counts are summed, lang_drift_frac is the share over all their
    completions. {} for no completions."""
    counts: Counter = Counter()
    drifted, completions = 0.0, 0
    for batch in batches:
        n = len(batch.totals)
        counts.update({k: v for k, v in batch.metrics.items() if k != "lang_drift_frac"})
        drifted += batch.metrics["lang_drift_frac"] * n
        completions += n
    if not completions:
        return {}
    return {**counts, "lang_drift_frac": drifted / completions}
