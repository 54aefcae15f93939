"""Tests for fastgrpo.rewards.shaping and its rewards: cosine length (fastgrpo and open-rs compat), n-gram
repetition, DAPO soft overlong punishment, language drift; the `reward_params` config section.

Expected values are worked out by hand from the formulas in the docstrings.
"""

from __future__ import annotations

import math

import pytest

from fastgrpo.config import ConfigError, RewardConfig, load_config
from fastgrpo.rewards import RewardInputError, compute_rewards
from fastgrpo.rewards.shaping import (cosine_scaled, default_overlong_buffer, language_drift_fraction, language_penalty,
                              non_latin_share, overlong_penalty, repetition_penalty)

SQRT_HALF = math.sqrt(0.5)

# ---------------------------------------------------------------------------------------------
# cosine
# ---------------------------------------------------------------------------------------------


def test_cosine_by_hand():
    lengths = [0, 25, 50, 100, 150]
    # correct: 0.5 + 0.25 * (1 + cos(pi * p)); p = 0, 1/4, 1/2, 1, 1 (clamped)
    assert cosine_scaled(lengths, [True] * 5, 100) == pytest.approx(
        [1.0, 0.5 + 0.25 * (1 + SQRT_HALF), 0.75, 0.5, 0.5])
    # wrong: -0.5 + (-1.0 - -0.5) / 2 * (1 + cos(pi * p)): -1 when short, -0.5 when long (penalized less)
    assert cosine_scaled(lengths, [False] * 5, 100) == pytest.approx(
        [-1.0, -0.5 - 0.25 * (1 + SQRT_HALF), -0.75, -0.5, -0.5])


def test_cosine_unclamped_cycles_past_max_len():
    # p = 1.5 -> cos = 0 -> midpoint; p = 2 -> cos = 1 -> back at the length-0 value
    assert cosine_scaled([150, 200], [True, True], 100, clamp=False) == pytest.approx([0.75, 1.0])
    assert cosine_scaled([150, 200], [False, False], 100, clamp=False) == pytest.approx([-0.75, -1.0])


def test_cosine_errors():
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        cosine_scaled([1], [True], 0)
    with pytest.raises(ValueError, match="2 lengths but 1 correctness"):
        cosine_scaled([1, 2], [True], 10)


def open_rs_cosine(text: str, is_correct: bool, min_value_wrong=0.0, max_value_wrong=-0.5,
                   min_value_correct=0.5, max_value_correct=1.0, max_len=1000) -> float:
    """open-rs's cosine reward for one completion, restated from its source (knoveleng/open-rs,
    src/open_r1/rewards.py, get_cosine_scaled_reward) with its command-line defaults."""
    progress = len(text) / max_len
    if is_correct:
        low, high = min_value_correct, max_value_correct
    else:
        low, high = max_value_wrong, min_value_wrong  # swapped for wrong answers, as open-rs does
    return low + 0.5 * (high - low) * (1.0 + math.cos(progress * math.pi))


@pytest.mark.parametrize("max_len", [10, 1000, 3584])
def test_open_rs_compat_reproduces_open_rs(max_len):
    texts = [f"{'x' * n}\\boxed{{7}}" for n in (0, 3, max_len // 2, max_len - 9, max_len, 2 * max_len, 3 * max_len + 5)]
    texts += [t.replace("{7}", "{8}") for t in texts]  # wrong answers of the same lengths
    answers = ["7"] * len(texts)
    correct = [t.endswith("\\boxed{7}") for t in texts]
    settings = RewardConfig(compat="open-rs", cosine_max_len=max_len)
    _, per_reward, _ = compute_rewards({"cosine": 1.0}, texts, answers, settings=settings)  # graded for real
    expected = [open_rs_cosine(t, c, max_len=max_len) for t, c in zip(texts, correct)]
    assert per_reward["cosine"] == pytest.approx(expected, abs=1e-12)


def test_open_rs_compat_numbers_by_hand():
    settings = RewardConfig(compat="open-rs", cosine_max_len=10)
    texts = ["a" * 5, "a" * 10, "a" * 20, "a" * 15]  # characters, whatever the token counts
    _, per_reward, _ = compute_rewards({"cosine": 1.0}, texts, ["1"] * 4, settings=settings,
                                       completion_lengths=[1, 1, 1, 1], correct=[False, False, False, True])
    # wrong: 0.0 at length 0 (open-rs CLI default), -0.5 at max_len: long wrong answers lose MORE there
    assert per_reward["cosine"] == pytest.approx([-0.25, -0.5, 0.0, 0.75])


def test_fastgrpo_cosine_counts_tokens_and_clamps():
    settings = RewardConfig(cosine_max_len=10)
    texts = ["a" * 1000] * 4
    _, per_reward, _ = compute_rewards({"cosine": 1.0}, texts, ["1"] * 4, settings=settings,
                                       completion_lengths=[0, 5, 10, 20], correct=[True, False, True, False])
    assert per_reward["cosine"] == pytest.approx([1.0, -0.75, 0.5, -0.5])


def test_cosine_max_len_defaults_to_the_length_limit_and_values_are_configurable():
    settings = RewardConfig(cosine_correct_at_zero=2.0, cosine_correct_at_max=1.0, cosine_wrong_at_zero=-3.0,
                            cosine_wrong_at_max=-1.0)
    _, per_reward, _ = compute_rewards({"cosine": 1.0}, ["a", "b"], ["1", "1"], settings=settings,
                                       completion_lengths=[32, 32], max_completion_length=64, correct=[True, False])
    assert per_reward["cosine"] == pytest.approx([1.5, -2.0])
    with pytest.raises(RewardInputError, match="max_completion_length"):
        compute_rewards({"cosine": 1.0}, ["a"], ["1"], completion_lengths=[3], correct=[True])
    with pytest.raises(RewardInputError, match="completion_lengths"):
        compute_rewards({"cosine": 1.0}, ["a"], ["1"], max_completion_length=3, correct=[True])


# ---------------------------------------------------------------------------------------------
# repetition
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, ngram, expected", [
    ("a b c a b c", 3, -0.25),  # 4 trigrams, 3 distinct: -(1 - 3/4)
    ("A b C a B c", 3, -0.25),  # lower-cased
    ("the cat sat", 3, 0.0),  # one trigram
    ("one two", 3, 0.0),  # fewer words than n
    ("", 3, 0.0),
    ("x x x x x", 1, -0.8),  # 5 unigrams, 1 distinct
    ("x x x x x", 2, -0.75),  # 4 bigrams, 1 distinct
    ("a\nb\tc  a b c", 3, -0.25),  # any whitespace splits words
])
def test_repetition_by_hand(text, ngram, expected):
    assert repetition_penalty([text], ngram_size=ngram) == pytest.approx([expected])


def test_repetition_scales_with_max_penalty_and_reads_settings():
    assert repetition_penalty(["a b c a b c"], 3, max_penalty=2.0) == pytest.approx([-0.5])
    _, per_reward, _ = compute_rewards({"repetition": 1.0}, ["x x x x x"], ["1"],
                                       settings=RewardConfig(repetition_ngram_size=2, repetition_max_penalty=4.0))
    assert per_reward["repetition"] == pytest.approx([-3.0])
    with pytest.raises(ValueError, match="ngram_size must be >= 1"):
        repetition_penalty(["a"], 0)


# ---------------------------------------------------------------------------------------------
# overlong (DAPO)
# ---------------------------------------------------------------------------------------------


def test_overlong_by_hand():
    # L_max 100, L_cache 20: free up to 80, then -(L - 80) / 20
    assert overlong_penalty([0, 80, 81, 90, 100, 101], None, 100, 20) == pytest.approx([0, 0, -0.05, -0.5, -1.0, -1.0])
    assert overlong_penalty([90], None, 100, 20, penalty=0.5) == pytest.approx([-0.25])


def test_overlong_truncated_gets_the_full_penalty_and_default_buffer():
    assert overlong_penalty([50, 50], [True, False], 100, 20) == [-1.0, 0.0]
    assert default_overlong_buffer(20_480) == 4_096  # DAPO's numbers
    assert default_overlong_buffer(3) == 1
    assert overlong_penalty([90], None, 100) == pytest.approx([-0.5])  # buffer 20 by default


def test_overlong_errors():
    with pytest.raises(ValueError, match="buffer must be in 1..max_length=10"):
        overlong_penalty([1], None, 10, 11)
    with pytest.raises(ValueError, match="1 lengths but 2 truncated"):
        overlong_penalty([1], [True, False], 10, 5)


def test_overlong_through_compute_rewards():
    _, per_reward, _ = compute_rewards(
        {"overlong": 1.0}, ["a", "b", "c"], ["1"] * 3, completion_lengths=[10, 60, 64], truncated=[False, False, True],
        max_completion_length=64, settings=RewardConfig(overlong_buffer_len=8, overlong_penalty=2.0))
    assert per_reward["overlong"] == pytest.approx([0.0, -2.0 * 4 / 8, -2.0])


# ---------------------------------------------------------------------------------------------
# language
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, share", [
    ("The answer is 42.", 0.0),
    ("Ainsi, la réponse est déjà là: façade, naïve.", 0.0),  # Latin with diacritics
    ("By \\pi r^2 with π ≈ 3.14, θ = 30°, Σ x_i ≤ √2 and 𝑥 ∈ ℝ, ℵ₀", 0.0),  # Greek, math letters
    ("🙂 42 + 1 = 43 ✓", 0.0),  # no letters at all
    ("答案是", 1.0),
    ("Ответ", 1.0),
    ("The answer 答案", 2 / 11),  # 9 Latin letters + 2 CJK
    ("الجواب", 1.0),
    ("उत्तर", 1.0),  # Devanagari (its virama is a mark, counted in neither)
    ("คำตอบ", 1.0),
    ("정답", 1.0),
    ("こたえ", 1.0),
    ("תשובה", 1.0),
])
def test_non_latin_share(text, share):
    assert non_latin_share(text) == pytest.approx(share)


def test_language_penalty_and_drift_fraction():
    texts = ["The answer is 4.", "The answer 答案", "答案是 4", "π = 3.14"]
    assert language_penalty(texts, penalty=2.0) == pytest.approx([0.0, -4 / 11, -2.0, 0.0])
    assert language_drift_fraction(texts) == 0.5
    assert language_drift_fraction([]) == 0.0
    _, per_reward, metrics = compute_rewards({"language": 1.0, "format": 0.0}, texts, ["4"] * 4,
                                             settings=RewardConfig(language_penalty=0.5))
    assert per_reward["language"] == pytest.approx([0.0, -1 / 11, -0.5, 0.0])
    assert metrics["lang_drift_frac"] == 0.5


def test_language_scan_is_bounded():
    import time

    # A bound for a runaway (backtracking) scan, not a benchmark: 2 MB took ~0.8 s on a quiet 2-core
    # machine, ~7 s at load 13.
    start = time.perf_counter()
    assert language_penalty(["x答" * 500_000]) == pytest.approx([-0.5])
    assert language_drift_fraction(["x" * 2_000_000, "答" + "x" * 2_000_000]) == 0.5
    assert time.perf_counter() - start < 30.0


# ---------------------------------------------------------------------------------------------
# the `reward_params` config section
# ---------------------------------------------------------------------------------------------


def test_reward_config_defaults_and_overrides():
    cfg = load_config(overrides=["reward_params.compat=open-rs", "reward_params.cosine_max_len=3584", "reward_params.grader_workers=0"])
    assert cfg.reward_params.compat == "open-rs" and cfg.reward_params.cosine_max_len == 3584 and cfg.reward_params.grader_workers == 0
    assert load_config().reward_params == RewardConfig()


@pytest.mark.parametrize("override, message", [
    ("reward_params.compat=open-r1", "reward_params.compat: 'open-r1' is not one of fastgrpo, open-rs"),
    ("reward_params.cosine_max_len=0", "reward_params.cosine_max_len must be >= 1"),
    ("reward_params.cosine_wrong_at_max=.inf", "reward_params.cosine_wrong_at_max must be a finite number"),
    ("reward_params.repetition_ngram_size=0", "reward_params.repetition_ngram_size must be >= 1"),
    ("reward_params.repetition_max_penalty=-1", "reward_params.repetition_max_penalty is a penalty's magnitude"),
    ("reward_params.overlong_penalty=-0.5", "reward_params.overlong_penalty is a penalty's magnitude"),
    ("reward_params.language_penalty=.nan", "reward_params.language_penalty is a penalty's magnitude"),
    ("reward_params.overlong_buffer_len=65", r"reward_params.overlong_buffer_len must be in 1..64"),
    ("reward_params.overlong_buffer_len=0", r"reward_params.overlong_buffer_len must be in 1..64"),
    ("reward_params.grader_timeout_s=0", "reward_params.grader_timeout_s must be a finite number of seconds > 0"),
    ("reward_params.grader_workers=-1", "reward_params.grader_workers must be >= 0"),
    ("reward_params.grader_workers=1.5", "reward_params.grader_workers: expected an integer"),
])
def test_reward_config_ranges(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_overlong_buffer_must_fit_every_length_stage():
    with pytest.raises(ConfigError, match=r"overlong_buffer_len must be in 1..32"):
        load_config(overrides=["reward_params.overlong_buffer_len=40", "rollout.length_stages=[[1, 64], [5, 32]]"])
