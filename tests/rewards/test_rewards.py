"""Tests for fastgrpo.rewards: boxed extraction (incl. a fuzz test), accuracy, format, think format, tag
count, the registry, compute_rewards (weights, metrics, failing rewards). Shaping rewards: test_reward_shaping.py."""

from __future__ import annotations

import logging
import math
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgrpo import rewards
from fastgrpo.config import RewardConfig
from fastgrpo.data.sources import load_problems
from fastgrpo.rewards.grader import Grader
from fastgrpo.rewards import (
    BOXED_SCAN_CHARS,
    MAX_ANSWER_CHARS,
    REWARDS,
    RewardInputError,
    accuracy_reward,
    combine_reward_metrics,
    compute_rewards,
    extract_boxed,
    format_reward,
    get_reward,
    register_reward,
    tag_count_reward,
    think_format_reward,
)
from helpers.paths import SHARED_DATA

DATA = SHARED_DATA

# ---------------------------------------------------------------------------------------------
# extract_boxed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{1}, then \\boxed{2}", "2"),
    ("\\boxed{ 42 }", "42"),
    ("\\fbox{7}", "7"),
    ("\\boxed {5}", "5"),
    ("\\boxed{1} and \\fbox{x^{2}}", "x^{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not nest
    ("\\boxed{a \\boxed{b} c}", "a \\boxed{b} c"),  # a box in a box belongs to the outer one
    ("\\boxed{}", ""),
    ("no box here: 42", None),
    ("\\boxed{\\frac{1}{2}", None),  # unbalanced
    ("\\boxed{3} but finally \\boxed{4", None),  # the final box never closes: no final answer
    ("\\boxedfoo{3}", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_scans_only_the_end():
    tail = "x" * (BOXED_SCAN_CHARS - 20)
    assert extract_boxed("\\boxed{1}" + tail) == "1"
    assert extract_boxed("\\boxed{1}" + tail + "y" * 40) is None


@pytest.mark.parametrize("hostile", [
    "\\boxed{" + "{" * 1_000_000,
    "\\boxed{1}" * 200_000,
    "\\boxed{" * 200_000,
    "\\" * 1_000_000 + "\\boxed{9}",
])
def test_extract_boxed_work_is_bounded(hostile):
    start = time.perf_counter()
    extract_boxed(hostile)
    assert time.perf_counter() - start < 0.5


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion, gold, expected", [
    ("3 + 5 = 8. The answer is \\boxed{8}.", "8", 1.0),
    ("The answer is \\boxed{9}.", "8", 0.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
    ("the answer is 8", "8", 0.0),  # no box, no credit
    ("\\boxed{8} no wait \\boxed{9}", "9", 1.0),  # the last box counts
    ("\\boxed{8} no wait \\boxed{9}", "8", 0.0),
    ("\\boxed{8} and \\boxed{9", "8", 0.0),  # unclosed final box
    ("\\boxed{ 42 }", "42", 1.0),
    # Leading zeros do not matter (decided): AIME's "025" and a boxed 25 are the same answer.
    ("\\boxed{042}", "42", 1.0),
    ("\\boxed{25}", "025", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{+7}", "7", 1.0),
    ("\\boxed{-7}", "7", 0.0),
    ("\\boxed{42.0}", "42", 1.0),
    ("\\boxed{\\sqrt{2}}", "\\sqrt 2", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{}", "0", 0.0),
])
def test_accuracy_reward(completion, gold, expected):
    assert accuracy_reward([completion], [gold]) == [expected]


def test_integers_take_the_fast_path():
    grader = Grader(workers=0)
    result = grader.grade(["\\boxed{12}", "\\boxed{1,234}", "\\boxed{x}"], ["12", "1234", "12"])
    assert result.correct == [True, True, False]
    assert dict(result.stats) == {"integer": 2, "math_verify": 1}
    start = time.perf_counter()
    scores = accuracy_reward([f"so \\boxed{{{i}}}." for i in range(20_000)], [str(i % 7) for i in range(20_000)])
    assert time.perf_counter() - start < 2.0
    assert sum(scores) == 7


def test_non_ascii_digits_leave_the_integer_fast_path():
    # int() reads fullwidth digits as 42; the fast path must not (math-verify decides instead).
    result = Grader(workers=0).grade(["\\boxed{\uff14\uff12}"], ["42"])
    assert result.stats["integer"] == 0


def broken_grade(predicted, gold):
    raise RecursionError("sympy blew up")


def test_grader_failures_score_zero_and_are_counted():
    result = Grader(workers=0, grade_fn=broken_grade).grade(["\\boxed{\\frac{1}{2}}"], ["0.5"])
    assert result.correct == [False] and result.stats["error"] == 1


def test_overlong_answers_are_not_parsed():
    result = Grader(workers=0).grade(["\\boxed{" + "1+" * MAX_ANSWER_CHARS + "1}"], ["1"])
    assert result.correct == [False] and dict(result.stats) == {"too_long": 1}


def test_math_verify_timeout_is_a_zero():
    grader = Grader(workers=0, timeout_s=3)  # math-verify's own limit: 1 s per parse / comparison
    start = time.perf_counter()
    result = grader.grade(["\\boxed{9^{9^{9^{9^{9}}}}}"], ["1"])  # a power tower
    assert time.perf_counter() - start < 6.0  # measured ~1-2 s with a 1 s limit
    assert result.correct == [False] and result.timeouts >= 1


def test_answers_are_parsed_as_latex_only():
    # math-verify's expression extractor hands text to sympy's parse_expr (Python eval); the
    # answer's parse must not include it: a plain "2*3" still grades through the LaTeX parser.
    assert accuracy_reward(["\\boxed{2*3}", "\\boxed{2 \\cdot 3}"], ["6", "6"]) == [1.0, 1.0]


def test_accuracy_off_the_main_thread():
    # math-verify's signal-based limits raise outside the main thread; grading must still work.
    results = []
    worker = threading.Thread(target=lambda: results.append(accuracy_reward(["\\boxed{\\frac{1}{2}}"], ["0.5"])))
    worker.start()
    worker.join()
    assert results == [[1.0]]


def test_accuracy_needs_one_answer_per_completion():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        accuracy_reward(["\\boxed{1}", "\\boxed{2}"], ["1"])


@pytest.mark.parametrize("name", ["aime24", "amc23", "amc", "math500"])
def test_every_shared_gold_answer_grades_itself_correct(name):
    golds = [p["answer"] for p in load_problems(DATA / "eval" / f"{name}.jsonl")]
    completions = [f"Therefore the answer is $\\boxed{{{g}}}$." for g in golds]
    assert accuracy_reward(completions, golds) == [1.0] * len(golds)
    if name in ("aime24", "amc23", "amc"):  # integer answers: a shifted pairing is wrong unless equal
        shifted = golds[1:] + golds[:1]
        expected = [float(int(a) == int(b)) for a, b in zip(golds, shifted)]
        assert accuracy_reward(completions, shifted) == expected


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minerva", "olympiadbench"])
def test_every_shared_gold_answer_grades_itself_correct_slow(name):
    golds = [p["answer"] for p in load_problems(DATA / "eval" / f"{name}.jsonl")]
    assert accuracy_reward([f"\\boxed{{{g}}}" for g in golds], golds) == [1.0] * len(golds)


# ---------------------------------------------------------------------------------------------
# format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion, expected", [
    ("2 + 2 = 4. The answer is \\boxed{4}.", 1.0),
    ("$\\boxed{4}$.\n", 1.0),
    ("\\boxed{4} I hope it is correct.", 1.0),
    ("\\boxed{4} and then I kept talking about many other things for a long while", 0.5),
    ("the answer is 4", 0.0),
    ("\\boxed{}", 0.0),
    ("\\boxed{  }", 0.0),
    ("\\boxed{4", 0.0),
])
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]
    assert format_reward([completion], ["anything"]) == [expected]  # correctness plays no part


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


def test_registry_lookup_and_errors():
    assert get_reward("accuracy") is accuracy_reward and get_reward("format") is format_reward
    with pytest.raises(ValueError, match=r"unknown reward 'acc'; valid rewards: \[.*'accuracy'.*'format'.*\]"):
        get_reward("acc")
    with pytest.raises(ValueError, match="'accuracy' is already registered"):
        register_reward("accuracy")(lambda completions, answers, **ctx: [0.0] * len(completions))


def test_compute_rewards_weights_and_context(monkeypatch):
    monkeypatch.setattr(rewards, "REWARDS", dict(REWARDS))  # keep the global registry clean

    @register_reward("length_penalty")
    def length_penalty(completions, answers, *, completion_lengths, **ctx):
        return [-n / 100 for n in completion_lengths]

    completions = ["\\boxed{8}", "\\boxed{9}", "8"]
    answers = ["8", "8", "8"]
    total, per_reward, metrics = compute_rewards({"accuracy": 1.0, "format": 0.5, "length_penalty": 0.0},
                                                 completions, answers, completion_lengths=[10, 20, 30])
    assert per_reward == {"accuracy": [1.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0],
                          "length_penalty": [-0.1, -0.2, -0.3]}
    assert total == [1.5, 0.5, 0.0]
    assert metrics == {"grader_timeouts": 0, "grader_crashes": 0, "grader_errors": 0, "reward_failures_accuracy": 0,
                       "reward_failures_format": 0, "reward_failures_length_penalty": 0, "lang_drift_frac": 0.0}
    total, _, _ = compute_rewards({"length_penalty": 2.0}, completions, answers, completion_lengths=[10, 20, 30])
    assert total == pytest.approx([-0.2, -0.4, -0.6])


def test_compute_rewards_errors(monkeypatch):
    monkeypatch.setattr(rewards, "REWARDS", dict(REWARDS))
    register_reward("short")(lambda completions, answers, **ctx: [1.0])
    with pytest.raises(ValueError, match="valid rewards"):
        compute_rewards({"nope": 1.0}, ["a"], ["b"])
    with pytest.raises(ValueError, match="no rewards given"):
        compute_rewards({}, ["a"], ["b"])
    with pytest.raises(ValueError, match="reward 'short' returned 1 values for 2 completions"):
        compute_rewards({"short": 1.0}, ["a", "b"], ["1", "2"])
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        compute_rewards({"accuracy": 1.0}, ["a", "b"], ["1"])
    with pytest.raises(ValueError, match="got 1 truncated for 2 completions"):
        compute_rewards({"format": 1.0}, ["a", "b"], ["1", "2"], truncated=[True])
    # A reward missing an input it needs is the caller's mistake: raised, not scored 0.
    with pytest.raises(RewardInputError, match="'overlong' needs completion_lengths"):
        compute_rewards({"overlong": 1.0}, ["a"], ["1"], max_completion_length=10)


def test_compute_rewards_grades_once_for_accuracy_and_cosine(monkeypatch):
    calls = []

    class CountingGrader(Grader):
        def grade(self, completions, golds):
            calls.append(len(completions))
            return super().grade(completions, golds)

    total, per_reward, _ = compute_rewards(
        {"accuracy": 1.0, "cosine": 1.0}, ["\\boxed{8}", "\\boxed{9}"], ["8", "8"], completion_lengths=[0, 10],
        max_completion_length=10, grader=CountingGrader(workers=0))
    assert calls == [2]
    assert per_reward["accuracy"] == [1.0, 0.0]
    assert per_reward["cosine"] == pytest.approx([1.0, -0.5])  # correct at length 0; wrong at max_len
    assert total == pytest.approx([2.0, -0.5])


def test_a_failing_reward_scores_zero_where_it_fails_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(rewards, "REWARDS", dict(REWARDS))
    monkeypatch.setattr(rewards, "_LOGGED_FAILURES", set())

    @register_reward("fragile")
    def fragile(completions, answers, **ctx):
        return [1.0 / (len(text) - 4) for text in completions]

    @register_reward("nan")
    def nan_reward(completions, answers, **ctx):
        return [math.nan if "NaN" in text else 2.0 for text in completions]

    texts = ["boom!", "four", "four", "sixsix", "NaN"]  # fragile: 1/1, fails, fails, 1/2, 1/(-1)
    with caplog.at_level(logging.WARNING, logger="fastgrpo.rewards"):
        for _ in range(2):
            total, per_reward, metrics = compute_rewards({"fragile": 1.0, "nan": 1.0, "format": 1.0}, texts, ["1"] * 5)
    assert per_reward["fragile"] == [1.0, 0.0, 0.0, 0.5, -1.0]
    assert per_reward["nan"] == [2.0, 2.0, 2.0, 2.0, 0.0]
    assert metrics["reward_failures_fragile"] == 2 and metrics["reward_failures_nan"] == 1  # counts of one call
    assert metrics["reward_failures_format"] == 0
    assert total == pytest.approx([3.0, 2.0, 2.0, 2.5, -1.0])
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2  # one line per kind (fragile/ZeroDivisionError, nan/_BadRewardOutput), not per call
    assert any("'fragile' failed with ZeroDivisionError" in m for m in logged)


def test_two_calls_keep_their_metrics_apart_and_a_step_combines_its_own(monkeypatch):
    monkeypatch.setattr(rewards, "REWARDS", dict(REWARDS))
    monkeypatch.setattr(rewards, "_LOGGED_FAILURES", set())

    @register_reward("fails_on_x")
    def fails_on_x(completions, answers, **ctx):
        if any("FAIL" in text for text in completions):
            raise ValueError("FAIL")
        return [1.0] * len(completions)

    weights = {"format": 1.0, "fails_on_x": 1.0}
    first = compute_rewards(weights, ["FAIL \\boxed{1}", "答案 \\boxed{1}", "FAIL"], ["1"] * 3)
    second = compute_rewards(weights, ["\\boxed{1}"], ["1"])
    assert first.metrics["reward_failures_fails_on_x"] == 2 and first.metrics["lang_drift_frac"] == pytest.approx(1 / 3)
    # a second caller (another step, an evaluation) sees only its own counts, before and after
    assert second.metrics["reward_failures_fails_on_x"] == 0 and second.metrics["lang_drift_frac"] == 0.0
    assert compute_rewards(weights, ["\\boxed{1}"], ["1"]).metrics == second.metrics
    step = combine_reward_metrics([first, second])
    assert step["reward_failures_fails_on_x"] == 2 and step["reward_failures_format"] == 0
    assert step["grader_timeouts"] == 0 and step["lang_drift_frac"] == pytest.approx(1 / 4)
    assert combine_reward_metrics([second]) == second.metrics
    assert combine_reward_metrics([]) == {}


def test_compute_rewards_uses_the_shared_worker_pool_by_default():
    settings = RewardConfig(grader_workers=1, grader_timeout_s=5.0)
    total, _, metrics = compute_rewards({"accuracy": 1.0}, ["\\boxed{\\frac{1}{2}}", "\\boxed{9^{9^{9^{9}}}}"],
                                        ["0.5", "1"], settings=settings)
    assert total == [1.0, 0.0] and metrics["grader_timeouts"] >= 1
    from fastgrpo.rewards.grader import shared_grader

    pool = shared_grader(1, 5.0)
    assert len(pool.worker_pids()) == 1
    pool.close()


# ---------------------------------------------------------------------------------------------
# think format and tag count
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion, expected", [
    ("<think>\n2 + 2 is 4.\n</think>\nThe answer is \\boxed{4}.", 1.0),
    ("2 + 2 is 4.\n</think>\n\\boxed{4}", 1.0),  # the R1 template put <think> in the prompt
    ("  <think>2 + 2 is 4.</think>\\boxed{4} and then a long tail of more and more words that goes on", 0.5),
    ("<think>2 + 2 is 4.</think> so it is 4", 0.0),  # no box after the reasoning
    ("<think>\\boxed{4}</think>", 0.0),  # the box is inside the reasoning
    ("<think>\n</think>\n\\boxed{4}", 0.0),  # no reasoning
    ("<think>a</think><think>b</think>\\boxed{4}", 0.0),
    ("<think>a</think>b</think>\\boxed{4}", 0.0),
    ("a <think> b </think> \\boxed{4}", 0.0),  # <think> only at the start
    ("\\boxed{4}", 0.0),
])
def test_think_format_reward(completion, expected):
    assert think_format_reward([completion]) == [expected]


@pytest.mark.parametrize("completion, expected", [
    ("<think>\nx\n</think>\n\\boxed{1}", 1.0),
    ("x\n</think>\n\\boxed{1}", 0.5),
    ("<think>x", 0.5),
    ("<think><think>x</think>", 0.5),
    ("<think>x</think></think>", 0.5),
    ("\\boxed{1}", 0.0),
])
def test_tag_count_reward(completion, expected):
    assert tag_count_reward([completion]) == [expected]


# ---------------------------------------------------------------------------------------------
# extract_boxed, fuzzed
# ---------------------------------------------------------------------------------------------

# Text without braces or backslashes, and balanced brace groups built from it.
_plain = st.text(alphabet=st.characters(blacklist_characters="{}\\", blacklist_categories=("Cs",)), max_size=20)
_balanced = st.recursive(_plain, lambda inner: st.builds(lambda a, b, c: f"{a}{{{b}}}{c}", _plain, inner, _plain),
                         max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=3000))
def test_extract_boxed_never_raises_and_returns_a_substring(text):
    start = time.perf_counter()
    result = extract_boxed(text)
    assert time.perf_counter() - start < 0.5
    assert result is None or result in text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="\\{}boxedfb 1", max_size=400))
def test_extract_boxed_on_brace_and_backslash_soup(text):
    result = extract_boxed(text)
    assert result is None or result in text


@settings(max_examples=300, deadline=None)
@given(prefix=_plain, content=_balanced, suffix=_plain)
def test_extract_boxed_round_trips_balanced_content(prefix, content, suffix):
    assert extract_boxed(f"{prefix}\\boxed{{{content}}}{suffix}") == content.strip()
