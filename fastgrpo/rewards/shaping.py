"""Reward shaping by length, repetition and language: the formulas, as plain functions of lists.

rewards.py registers them as rewards (``cosine``, ``repetition``, ``overlong``, ``language``) and
feeds them the grader's verdicts, token counts and the ``reward_params`` config section. Nothing here reads
model text beyond splitting it into words and matching letters (linear time, no parsing).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

# ----------------------------------------------------------------------------------------------
# Cosine length reward
# ----------------------------------------------------------------------------------------------

COSINE_COMPAT = ("fastgrpo", "open-rs")
# The reward of a wrong answer of length 0 when the config leaves it unset, per compat mode:
# fastgrpo: -1.0 (open-r1's function default: a long wrong answer is penalized less, -0.5, than a
# short one); open-rs: 0.0 (open-rs's command-line default, cosine_min_value_wrong=0.0, with which
# a long wrong answer is penalized MORE: 0.0 short, -0.5 at max_len).
COSINE_WRONG_AT_ZERO = {"fastgrpo": -1.0, "open-rs": 0.0}


def cosine_scaled(
    lengths: Sequence[int],
    correct: Sequence[bool],
    max_len: int,
    *,
    correct_at_zero: float = 1.0,
    correct_at_max: float = 0.5,
    wrong_at_zero: float = -1.0,
    wrong_at_max: float = -0.5,
    clamp: bool = True,
) -> list[float]:
    """Cosine length reward: shorter correct answers earn more, longer wrong ones lose less.

    For each completion of length L (any unit; fastgrpo passes tokens, open-rs characters):
        p = min(L, max_len) / max_len      (clamp=True; open-rs: p = L / max_len, unclamped)
        r = at_max + (at_zero - at_max) * (1 + cos(pi * p)) / 2
    with (at_zero, at_max) = (correct_at_zero, correct_at_max) for a correct answer and
    (wrong_at_zero, wrong_at_max) for a wrong one. r(0) = at_zero, r(max_len) = at_max.
    Unclamped, cos is periodic: past max_len the reward turns back (r(2 * max_len) = at_zero).

    Sources: the cosine length-scaling reward of Yeo et al. 2025, "Demystifying Long
    Chain-of-Thought Reasoning in LLMs" (arXiv:2502.03373); open-r1's
    ``get_cosine_scaled_reward`` (huggingface/open-r1, src/open_r1/rewards.py), used unchanged by
    open-rs Exp 3 (knoveleng/open-rs: ``--cosine_max_len 3584``, reward weights format 1.0, cosine
    2.0). Their names map to ours: max_value_correct = correct_at_zero, min_value_correct =
    correct_at_max, min_value_wrong = wrong_at_zero, max_value_wrong = wrong_at_max (they swap
    min/max for wrong answers, so "min_value_wrong" is the reward at length 0). Their code: progress
    = len(content) / max_len in characters, no clamp, r = min_value + 0.5 * (max_value -
    min_value) * (1 + cos(progress * pi)).
    """
    if len(lengths) != len(correct):
        raise ValueError(f"got {len(lengths)} lengths but {len(correct)} correctness flags")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    rewards = []
    for length, is_correct in zip(lengths, correct):
        progress = (min(length, max_len) if clamp else length) / max_len
        at_zero, at_max = (correct_at_zero, correct_at_max) if is_correct else (wrong_at_zero, wrong_at_max)
        rewards.append(at_max + 0.5 * (at_zero - at_max) * (1.0 + math.cos(math.pi * progress)))
    return rewards


# ----------------------------------------------------------------------------------------------
# N-gram repetition penalty
# ----------------------------------------------------------------------------------------------


def repetition_penalty(texts: Sequence[str], ngram_size: int = 3, max_penalty: float = 1.0) -> list[float]:
    """-max_penalty * (1 - distinct n-grams / n-grams) over the lower-cased whitespace-split words.

    0.0 for a text with fewer than ``ngram_size`` words; -max_penalty is approached as a text
    repeats one n-gram forever. Source: Yeo et al. 2025 (arXiv:2502.03373), Appendix C.2, as
    implemented by open-r1's ``get_repetition_penalty_reward`` (word n-grams, defaults n = 3 and
    max_penalty -1.0: open-r1 passes the penalty negative, fastgrpo as a magnitude >= 0).
    """
    if ngram_size < 1:
        raise ValueError(f"ngram_size must be >= 1, got {ngram_size}")
    rewards = []
    for text in texts:
        words = text.lower().split()
        total = len(words) - ngram_size + 1
        if total < 1:
            rewards.append(0.0)
            continue
        distinct = len(set(zip(*(words[i:] for i in range(ngram_size)))))
        rewards.append(-max_penalty * (1.0 - distinct / total))
    return rewards


# ----------------------------------------------------------------------------------------------
# Soft overlong punishment (DAPO)
# ----------------------------------------------------------------------------------------------


def default_overlong_buffer(max_length: int) -> int:
    """A fifth of the length limit: DAPO's ratio (a 4,096-token buffer of a 20,480-token limit)."""
    return max(1, max_length // 5)


def overlong_penalty(
    lengths: Sequence[int],
    truncated: Sequence[bool] | None,
    max_length: int,
    buffer_len: int | None = None,
    penalty: float = 1.0,
) -> list[float]:
    """DAPO's soft overlong punishment, in tokens.

    With L_max = max_length and L_cache = buffer_len (default: default_overlong_buffer):
        r = 0                                               if L <= L_max - L_cache
        r = -penalty * (L - (L_max - L_cache)) / L_cache    if L_max - L_cache < L <= L_max
        r = -penalty                                        if L > L_max or the completion was truncated
    Source: Yu et al. 2025, "DAPO" (arXiv:2503.14476), section 3.4 (penalty 1; L_max 20,480 and
    L_cache 4,096 there); ``penalty`` is verl's overlong penalty factor. A truncated completion (the
    engine stopped it at the limit) gets the full penalty even when its count is short of L_max.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    buffer_len = default_overlong_buffer(max_length) if buffer_len is None else buffer_len
    if not 1 <= buffer_len <= max_length:
        raise ValueError(f"the overlong buffer must be in 1..max_length={max_length}, got {buffer_len}")
    if truncated is not None and len(truncated) != len(lengths):
        raise ValueError(f"got {len(lengths)} lengths but {len(truncated)} truncated flags")
    start = max_length - buffer_len
    rewards = []
    for i, length in enumerate(lengths):
        if length > max_length or (truncated is not None and truncated[i]):
            rewards.append(-penalty)
        elif length > start:
            rewards.append(-penalty * (length - start) / buffer_len)
        else:
            rewards.append(0.0)
    return rewards


# ----------------------------------------------------------------------------------------------
# Language drift
# ----------------------------------------------------------------------------------------------

# Letters of these blocks are not drift: Latin (Basic Latin to Latin Extended-B, IPA, modifiers;
# Latin Extended Additional and -C/-D/-E; fullwidth A-Z/a-z), Greek and Greek Extended (math writes
# pi, theta, Sigma as letters), phonetic extensions, super/subscripts, letterlike symbols (the
# double-struck R and N, aleph), number forms, enclosed alphanumerics and the mathematical
# alphanumeric symbols (italic x). Any other letter (CJK, Cyrillic, Arabic, Hebrew, Thai,
# Devanagari, Hangul, ...) is "non-Latin-script text".
_ALLOWED_BLOCKS = (r"\u0000-\u03ff\u1d00-\u1dbf\u1e00-\u1fff\u2070-\u209f\u2100-\u218f\u2460-\u24ff"
                   r"\u2c60-\u2c7f\ua720-\ua7ff\uab30-\uab6f\uff21-\uff3a\uff41-\uff5a\U0001d400-\U0001d7ff")
_LETTER = re.compile(r"[^\W\d_]")
_FOREIGN_LETTER = re.compile(rf"[^\W\d_{_ALLOWED_BLOCKS}]")


def non_latin_share(text: str) -> float:
    """The share of the letters of ``text`` that belong to a non-Latin script (0.0 with no letters)."""
    if text.isascii():  # the common case, answered without a scan (CPython keeps the flag)
        return 0.0
    letters = len(_LETTER.findall(text))
    return len(_FOREIGN_LETTER.findall(text)) / letters if letters else 0.0


def has_non_latin_text(text: str) -> bool:
    return not text.isascii() and _FOREIGN_LETTER.search(text) is not None


def language_penalty(texts: Sequence[str], penalty: float = 1.0) -> list[float]:
    """-penalty * non_latin_share(text): 0 for English (and Greek math letters), -penalty for
    text written wholly in another script.

    Why: open-rs names drift into non-English output as a cause of its late instability (its
    system prompt says "respond by English"; its own language reward is commented out). Scoring
    the share rather than a yes/no follows DeepSeek-R1's language-consistency reward (the share of
    target-language words in the chain of thought, arXiv:2501.12948, section 2.3.2).
    """
    return [-penalty * non_latin_share(text) for text in texts]


def language_drift_fraction(texts: Sequence[str]) -> float:
    """The share of texts holding any non-Latin-script letter (metric ``lang_drift_frac``)."""
    return sum(has_non_latin_text(t) for t in texts) / len(texts) if texts else 0.0
