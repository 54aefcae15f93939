"""Tests for fastgrpo.rewards: boxed extraction, accuracy, format, the registry."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fastgrpo import rewards
from fastgrpo.data import load_problems
from fastgrpo.rewards import (
    BOXED_SCAN_CHARS,
    MAX_ANSWER_CHARS,
    REWARDS,
    accuracy_reward,
    compute_rewards,
    extract_boxed,
    format_reward,
    get_reward,
    register_reward,
    reset_grader_stats,
)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

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
    reset_grader_stats()
    assert accuracy_reward(["\\boxed{12}", "\\boxed{1,234}", "\\boxed{x}"], ["12", "1234", "12"]) == [1.0, 1.0, 0.0]
    stats = reset_grader_stats()
    assert stats == {"integer": 2, "math_verify": 1}
    start = time.perf_counter()
    scores = accuracy_reward([f"so \\boxed{{{i}}}." for i in range(20_000)], [str(i % 7) for i in range(20_000)])
    assert time.perf_counter() - start < 2.0
    assert sum(scores) == 7


def test_grader_failures_score_zero_and_are_counted(monkeypatch):
    def broken(predicted, gold):
        raise RecursionError("sympy blew up")

    monkeypatch.setattr(rewards, "_math_verify_equal", broken)
    reset_grader_stats()
    assert accuracy_reward(["\\boxed{\\frac{1}{2}}"], ["0.5"]) == [0.0]
    assert reset_grader_stats()["error"] == 1


def test_overlong_answers_are_not_parsed():
    reset_grader_stats()
    assert accuracy_reward(["\\boxed{" + "1+" * MAX_ANSWER_CHARS + "1}"], ["1"]) == [0.0]
    assert reset_grader_stats() == {"too_long": 1}


def test_math_verify_timeout_is_a_zero(monkeypatch):
    monkeypatch.setattr(rewards, "MATH_VERIFY_TIMEOUT_S", 1)
    reset_grader_stats()
    start = time.perf_counter()
    assert accuracy_reward(["\\boxed{9^{9^{9^{9^{9}}}}}"], ["1"]) == [0.0]  # a power tower
    assert time.perf_counter() - start < 6.0  # measured ~1-2 s with a 1 s limit
    assert reset_grader_stats().get("timeout", 0) >= 1


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
    total, per_reward = compute_rewards({"accuracy": 1.0, "format": 0.5, "length_penalty": 0.0},
                                        completions, answers, completion_lengths=[10, 20, 30])
    assert per_reward == {"accuracy": [1.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0],
                          "length_penalty": [-0.1, -0.2, -0.3]}
    assert total == [1.5, 0.5, 0.0]
    total, _ = compute_rewards({"length_penalty": 2.0}, completions, answers, completion_lengths=[10, 20, 30])
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
