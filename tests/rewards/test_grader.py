"""Tests for fastgrpo.rewards.grader: the worker pool (time limits, kills, crashes, memory cap, shutdown), the
in-process mode, and adversarial completions (bounded time, reward 0, nothing executed).

The grading functions below are module-level so that worker processes can import them.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

from fastgrpo.data.sources import load_problems
from fastgrpo.rewards.grader import Grader, GraderError, shared_grader
from helpers.paths import SHARED_DATA

DATA = SHARED_DATA
TIMEOUT_S = 3.0  # math-verify's own limits inside a worker: 1 s each
# Slack over the limit for killing and restarting a worker (a fresh interpreter importing
# math-verify: ~0.5-1 s here) on a loaded 2-core machine. A bound for a hang, not a benchmark.
SLACK_S = 6.0


def hang_on_request(predicted: str, gold: str) -> bool:
    if predicted == "hang":
        time.sleep(3600)
    return predicted == gold


def crash_on_request(predicted: str, gold: str) -> bool:
    if predicted == "exit":
        os._exit(3)
    if predicted == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if predicted == "raise":
        raise RuntimeError("a bug in the grading function")
    if predicted == "print":
        print("stray output that must not corrupt the protocol", flush=True)
    return predicted == gold


def allocate_gigabytes(predicted: str, gold: str) -> bool:
    return len(bytearray(int(predicted) << 30)) > 0  # beyond the worker's 1 GiB address-space cap


@pytest.fixture(scope="module")
def pool():
    with Grader(workers=2, timeout_s=TIMEOUT_S) as grader:
        yield grader


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# normal answers: pool == in-process
# ---------------------------------------------------------------------------------------------


def test_pool_and_in_process_agree_on_real_answers():
    golds = [p["answer"] for p in load_problems(DATA / "eval" / "math500.jsonl")][:20]
    completions = [f"So the answer is $\\boxed{{{g}}}$." for g in golds]
    shifted = golds[1:] + golds[:1]
    # Generous limits (math-verify's own: 4 s): this compares verdicts, not speed, on a loaded machine.
    in_process = Grader(workers=0, timeout_s=9.0).grade(completions + completions, golds + shifted)
    with Grader(workers=2, timeout_s=9.0) as pool:
        pooled = pool.grade(completions + completions, golds + shifted)
    assert pooled.correct == in_process.correct
    assert pooled.correct[:20] == [True] * 20
    assert sum(pooled.correct[20:]) < 3  # a shifted pairing is (nearly always) wrong
    assert pooled.stats["integer"] == in_process.stats["integer"] > 0
    assert pooled.stats["math_verify"] == in_process.stats["math_verify"] > 0
    assert pooled.timeouts == pooled.stats["crash"] == 0


def test_a_gold_parse_cut_short_is_not_cached():
    from fastgrpo.rewards import grader as grader_module

    gold = "{" * 450 + "1" + "}" * 450  # math-verify's parse hits its 1 s limit
    assert grader_module.parse_gold(gold, 1) == ()
    assert (gold, 1) not in grader_module._GOLD_CACHE
    assert grader_module.parse_gold("\\frac{1}{2}", 1) != ()
    assert ("\\frac{1}{2}", 1) in grader_module._GOLD_CACHE


def test_workers_start_lazily_and_are_reused():
    with Grader(workers=2, timeout_s=TIMEOUT_S) as grader:
        assert grader.worker_pids() == []
        grader.grade(["\\boxed{7}"], ["7"])  # integers never leave the trainer's process
        assert grader.worker_pids() == []
        grader.grade(["\\boxed{\\frac{1}{2}}"], ["0.5"])
        first = grader.worker_pids()
        assert len(first) == 1  # one job needs one worker
        grader.grade(["\\boxed{\\frac{1}{2}}"] * 4, ["0.5"] * 4)
        assert grader.worker_pids()[:1] == first and len(grader.worker_pids()) == 2
        pids = grader.worker_pids()
    assert not any(_alive(pid) for pid in pids)  # close() ended them


# ---------------------------------------------------------------------------------------------
# hangs, crashes, memory
# ---------------------------------------------------------------------------------------------


def test_a_hanging_worker_is_killed_counted_and_replaced():
    with Grader(workers=2, timeout_s=1.0, grade_fn=hang_on_request) as grader:
        grader.grade(["\\boxed{a}"] * 2, ["a"] * 2)  # start both workers outside the timed part
        before = set(grader.worker_pids())
        start = time.perf_counter()
        items = ["hang", "a", "b", "hang", "a"]
        result = grader.grade([f"\\boxed{{{x}}}" for x in items], ["hang", "a", "a", "hang", "a"])
        elapsed = time.perf_counter() - start
        assert result.correct == [False, True, False, False, True]
        assert result.stats["killed"] == 2 and result.timeouts == 2
        assert elapsed < 2 * (1.0 + SLACK_S)
        assert not any(_alive(pid) for pid in before - set(grader.worker_pids()))
        assert len(before - set(grader.worker_pids())) >= 1  # replaced, not reused
        assert grader.grade(["\\boxed{a}"], ["a"]).correct == [True]  # the pool still works


def test_crashing_workers_are_counted_and_other_items_still_graded():
    with Grader(workers=2, timeout_s=TIMEOUT_S, grade_fn=crash_on_request) as grader:
        items = ["exit", "ok", "segfault", "raise", "print", "ok"]
        result = grader.grade([f"\\boxed{{{x}}}" for x in items], ["ok", "ok", "ok", "ok", "print", "ok"])
        assert result.correct == [False, True, False, False, True, True]
        assert result.stats["crash"] == 2 and result.stats["error"] == 1 and result.timeouts == 0


def test_a_worker_ignores_ctrl_c():
    with Grader(workers=1, timeout_s=TIMEOUT_S, grade_fn=crash_on_request) as grader:
        grader.grade(["\\boxed{ok}"], ["ok"])
        (pid,) = grader.worker_pids()
        os.kill(pid, signal.SIGINT)
        assert grader.grade(["\\boxed{ok}"], ["ok"]).correct == [True]
        assert grader.worker_pids() == [pid]


def test_worker_memory_is_capped():
    with Grader(workers=1, timeout_s=TIMEOUT_S, grade_fn=allocate_gigabytes) as grader:
        result = grader.grade(["\\boxed{2}"], ["x"])
    assert result.correct == [False] and result.stats["error"] == 1  # MemoryError, not a machine out of RAM


def test_grade_fn_must_be_importable_by_workers():
    with pytest.raises(TypeError, match="module-level function"):
        Grader(workers=1, grade_fn=lambda predicted, gold: True)
    assert Grader(workers=0, grade_fn=lambda predicted, gold: True).grade(["\\boxed{a}"], ["b"]).correct == [True]


def test_a_worker_that_cannot_start_is_an_error(monkeypatch):
    monkeypatch.setattr("fastgrpo.rewards.grader._WORKER_BOOT", "raise SystemExit(7)")
    with Grader(workers=1, timeout_s=TIMEOUT_S) as grader:
        with pytest.raises(GraderError, match="failed to start"):
            grader.grade(["\\boxed{x}"], ["y"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="workers must be an integer >= 0"):
        Grader(workers=-1)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        Grader(timeout_s=0)
    with pytest.raises(ValueError, match="2 completions but 1 gold"):
        Grader(workers=0).grade(["a", "b"], ["c"])


def test_shared_grader_is_rebuilt_when_settings_change():
    first = shared_grader(1, TIMEOUT_S)
    assert shared_grader(1, TIMEOUT_S) is first
    first.grade(["\\boxed{\\frac{1}{2}}"], ["0.5"])
    (pid,) = first.worker_pids()
    second = shared_grader(2, TIMEOUT_S)
    assert second is not first and not _alive(pid)
    second.close()


# ---------------------------------------------------------------------------------------------
# adversarial completions: bounded time, reward 0, nothing executed
# ---------------------------------------------------------------------------------------------

MARKER = Path(tempfile.gettempdir()) / f"fastgrpo-grader-marker-{os.getpid()}"
ADVERSARIAL = {
    "power tower": "\\boxed{9^{9^{9^{9}}}}",
    "huge power": "\\boxed{10^{10^{10}}}",
    "huge factorial": "\\boxed{(10^{10^{8}})!}",
    "factorial chain": "\\boxed{" + "100000!" * 3 + "}",
    "nested braces": "\\boxed{" + "{" * 450 + "1" + "}" * 450 + "}",
    "nested fractions": "\\boxed{" + "\\frac{1}{" * 80 + "2" + "}" * 80 + "}",
    "nested parentheses": "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
    "1 MB answer": "\\boxed{" + "1+" * 500_000 + "1}",
    "long answer at the end": "x" * 1_000_000 + "\\boxed{" + "1+" * 4_000 + "1}",
    "1 MB of box openers": "\\boxed{" * 150_000,
    "1 MB of text": "a" * 1_000_000,
    "unbalanced braces": "\\boxed{\\frac{1}{2}",
    "unbalanced left/right": "\\boxed{\\left( 1 \\right]}",
    "broken frac": "\\boxed{\\frac{1}}",
    "open environment": "\\boxed{\\begin{pmatrix} 1 & 2}",
    "python import": f"\\boxed{{__import__('os').system('touch {MARKER}')}}",
    "python exec": f"\\boxed{{exec(\"open('{MARKER}', 'w')\")}}",
    "dunder walk": "\\boxed{().__class__.__bases__[0].__subclasses__()}",
    "lambda": "\\boxed{(lambda: __import__('os'))()}",
    "NUL bytes": "\\boxed{1\x002\x00}",
    "lone surrogate": "\\boxed{\ud800}",
    "bidi override": "\\boxed{\u202e1\u202d}",
    "fullwidth digits": "\\boxed{\uff11\uff12}",
    "combining marks": "\\boxed{1" + "\u0301" * 500 + "}",
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_completion_scores_zero_in_bounded_time(pool, name):
    start = time.perf_counter()
    result = pool.grade([ADVERSARIAL[name]], ["7"])
    elapsed = time.perf_counter() - start
    assert result.correct == [False]
    assert elapsed < TIMEOUT_S + SLACK_S, f"{name}: {elapsed:.1f} s"
    assert not MARKER.exists()


def test_adversarial_batch_in_process_executes_nothing():
    # In-process mode has only math-verify's own limits, but still parses model text as LaTeX only.
    texts = [ADVERSARIAL[k] for k in ("python import", "python exec", "dunder walk", "lambda", "NUL bytes")]
    result = Grader(workers=0, timeout_s=TIMEOUT_S).grade(texts, ["7"] * len(texts))
    assert result.correct == [False] * len(texts)
    assert not MARKER.exists()
