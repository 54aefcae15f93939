"""Reward registry: accuracy (math-verify), format, and a way to add more.

A reward is ``fn(completions: list[str], answers: list[str], **ctx) -> list[float]`` with one
value per completion; ``ctx`` carries optional extras (e.g. token counts) that a reward may use
and must otherwise ignore. Register one with ``@register_reward("name")``; weights come from the
config as ``{"name": weight}`` and ``compute_rewards`` sums them.

Model text is never evaluated: answers are compared as integers or by math-verify (sympy after a
LaTeX parser), under its time limits where signals allow, and any grader exception scores 0.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from functools import lru_cache

RewardFn = Callable[..., list[float]]
REWARDS: dict[str, RewardFn] = {}


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


# ----------------------------------------------------------------------------------------------
# Finding the final answer
# ----------------------------------------------------------------------------------------------

# Only the end of a completion is searched, so the work per completion is bounded whatever the
# model writes: 10,000 characters is ~2,500 tokens of trailing text, far more than follows a
# final answer. A box that starts earlier than that is not seen.
BOXED_SCAN_CHARS = 10_000
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")  # no nested quantifiers: linear time


def _closing_brace(text: str, open_index: int) -> int | None:
    """Index of the brace closing ``text[open_index] == "{"``, skipping escaped ``\\{`` / ``\\}``."""
    depth, i = 0, open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # \{ and \} are literal braces; \\ is an escaped backslash
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _last_box(text: str) -> tuple[str, str] | None:
    """(content, text after the box) of the last top-level box, None if absent or unbalanced."""
    window = text[-BOXED_SCAN_CHARS:]
    last, position = None, 0
    while (match := _BOX_START.search(window, position)) is not None:
        close = _closing_brace(window, match.end() - 1)
        if close is None:
            return None  # the final box is cut off (e.g. truncated generation): no final answer
        last = (window[match.end() : close], window[close + 1 :])
        position = close + 1
    return last


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}``, whitespace-stripped.

    Braces nest (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``); a box inside a box belongs to the
    outer one. None when there is no box or the last one never closes (an unclosed final box is
    not an answer even if an earlier box closed). Only the last BOXED_SCAN_CHARS characters are
    scanned. ``\\boxed{}`` gives "" (present but empty).
    """
    box = _last_box(text)
    return None if box is None else box[0].strip()


# ----------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------

# A boxed answer longer than this is scored 0 without parsing: the longest gold answer in the
# shipped eval/train sets has 204 characters, and math-verify's cost (and the size of the log
# line its timeout writes: the whole input) grows with the input.
MAX_ANSWER_CHARS = 1_000
# math-verify's limit (seconds, integers: it uses signal.alarm) for each parse and each compare.
# Its default is 5 s; a legitimate answer parses in milliseconds (math500's 500 gold answers,
# parsed and verified against themselves: 2.9 s in all).
MATH_VERIFY_TIMEOUT_S = 2
_INTEGER = re.compile(r"[+-]?\d+")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+")

# How each accuracy grade was decided since the last reset_grader_stats(): "integer" (fast path),
# "math_verify", "too_long", "error" (an exception out of math-verify, scored 0) and "timeout"
# (math-verify hit its limit: it scores that False itself and says so only in a log warning).
GRADER_STATS: Counter = Counter()


class _TimeoutCounter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Timeout"):
            GRADER_STATS["timeout"] += 1
        return True


for _logger_name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_logger_name).addFilter(_TimeoutCounter())


def reset_grader_stats() -> dict[str, int]:
    """Return the counts since the last reset and start again (for per-step logging)."""
    stats = dict(GRADER_STATS)
    GRADER_STATS.clear()
    return stats


def _as_plain_integer(text: str) -> int | None:
    """The integer a plain answer spells ("42", " +42 ", "1,000", "42.0", "042"), else None.

    Leading zeros do not matter: AIME's gold "025" equals a boxed 25 (math-verify agrees).
    """
    text = text.replace(" ", "")
    if len(text) > MAX_ANSWER_CHARS:  # int() refuses > 4,300 digits; such text is no plain answer
        return None
    if text.endswith(".0"):
        text = text[:-2]
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if not _INTEGER.fullmatch(text):
        return None
    return int(text)


def _timeouts() -> tuple[int | None, int | None]:
    # math-verify's timeouts use signal.alarm, which works only in the main thread (elsewhere its
    # parse raises). Off the main thread we run without a limit and rely on MAX_ANSWER_CHARS.
    if threading.current_thread() is threading.main_thread():
        return MATH_VERIFY_TIMEOUT_S, MATH_VERIFY_TIMEOUT_S
    return None, None


@lru_cache(maxsize=8192)
def _parse_gold(gold: str, parsing_timeout: int | None) -> tuple:
    from math_verify import parse

    parsed = parse(f"${gold}$", parsing_timeout=parsing_timeout)
    if not parsed:
        parsed = parse(gold, parsing_timeout=parsing_timeout)
    return tuple(parsed)


def _math_verify_equal(predicted: str, gold: str) -> bool:
    from math_verify import parse, verify

    parsing_timeout, verify_timeout = _timeouts()
    gold_parsed = _parse_gold(gold, parsing_timeout)
    predicted_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=parsing_timeout)
    if not gold_parsed or not predicted_parsed:
        # Nothing math-verify can read on one side: only the identical string counts.
        return predicted.strip() == gold.strip()
    return bool(verify(list(gold_parsed), predicted_parsed, timeout_seconds=verify_timeout))


def grade_answer(predicted: str | None, gold: str) -> bool:
    """True when the boxed content ``predicted`` equals ``gold``; never raises."""
    if predicted is None or not predicted:
        return False
    if len(predicted) > MAX_ANSWER_CHARS:
        GRADER_STATS["too_long"] += 1
        return False
    predicted_int, gold_int = _as_plain_integer(predicted), _as_plain_integer(gold)
    if predicted_int is not None and gold_int is not None:
        GRADER_STATS["integer"] += 1
        return predicted_int == gold_int
    try:
        GRADER_STATS["math_verify"] += 1
        return _math_verify_equal(predicted, gold)
    except Exception:  # noqa: BLE001 - any grader failure (sympy error, recursion) is a wrong answer
        GRADER_STATS["error"] += 1
        return False
    except BaseException as e:  # math-verify's TimeoutException derives from BaseException
        if type(e).__name__ != "TimeoutException":
            raise  # KeyboardInterrupt, SystemExit
        GRADER_STATS["timeout"] += 1
        return False


def _check_lengths(completions: list[str], answers: list[str]) -> None:
    if len(completions) != len(answers):
        raise ValueError(f"got {len(completions)} completions but {len(answers)} answers; one answer per completion")


@register_reward("accuracy")
def accuracy_reward(completions: list[str], answers: list[str], **ctx) -> list[float]:
    """1.0 when the last boxed answer equals the gold answer, else 0.0.

    Plain integers on both sides are compared as integers (the arithmetic task; "042" == "42");
    anything else goes through math-verify (\\frac{1}{2} == 0.5, intervals, sets, ...).
    """
    _check_lengths(completions, answers)
    return [float(grade_answer(extract_boxed(text), gold)) for text, gold in zip(completions, answers)]


# ----------------------------------------------------------------------------------------------
# Format
# ----------------------------------------------------------------------------------------------

# Text allowed after the final box for full format credit, e.g. "$." or "\]" or "I hope it is
# correct." (27 characters); longer trailing text means the box was not the end of the answer.
FORMAT_TRAILING_CHARS = 40


@register_reward("format")
def format_reward(completions: list[str], answers: list[str] | None = None, **ctx) -> list[float]:
    """1.0: a non-empty final box followed by at most FORMAT_TRAILING_CHARS non-space characters;
    0.5: a non-empty box followed by more text; 0.0: no box, an empty one, or an unclosed final one.

    The answer's correctness plays no part (answers is accepted for the common signature).
    """
    if answers is not None:
        _check_lengths(completions, answers)
    scores = []
    for text in completions:
        box = _last_box(text)
        if box is None or not box[0].strip():
            scores.append(0.0)
        elif len("".join(box[1].split())) <= FORMAT_TRAILING_CHARS:
            scores.append(1.0)
        else:
            scores.append(0.5)
    return scores


# ----------------------------------------------------------------------------------------------
# Combining rewards
# ----------------------------------------------------------------------------------------------


def compute_rewards(
    weights: Mapping[str, float], completions: list[str], answers: list[str], **ctx
) -> tuple[list[float], dict[str, list[float]]]:
    """(total, per_reward): total[i] = sum over rewards of weight * reward[i].

    Every named reward is computed, also at weight 0 (then it is logged but does not train).
    """
    if not weights:
        raise ValueError(f"no rewards given; valid rewards: {sorted(REWARDS)}")
    _check_lengths(completions, answers)
    total = [0.0] * len(completions)
    per_reward: dict[str, list[float]] = {}
    for name, weight in weights.items():
        values = [float(v) for v in get_reward(name)(completions, answers, **ctx)]
        if len(values) != len(completions):
            raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
        per_reward[name] = values
        total = [t + float(weight) * v for t, v in zip(total, values)]
    return total, per_reward
