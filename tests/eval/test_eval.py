"""Tests for fastgrpo.eval.evaluate: the pass@k estimator, summaries, evaluate() against a scripted engine."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from fastgrpo.data.prompts import build_messages
from fastgrpo.data.sources import load_problems
from fastgrpo.eval.evaluate import evaluate, pass_at_k, summarize
from helpers.eval_doubles import CharTokenizer, Output
from helpers.paths import SHARED_DATA

DATA = SHARED_DATA


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (c correct) that hold a correct one, by enumeration."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows a float; the product form does not need it.
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert pass_at_k(1000, 10, 500) == pytest.approx(1 - math.comb(990, 500) / math.comb(1000, 500), rel=1e-9)
    assert pass_at_k(1000, 0, 500) == 0.0 and pass_at_k(1000, 600, 500) == 1.0


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_summarize():
    correct = [[True, False, False, False], [True, True, True, True], [False] * 4]
    out = summarize(correct)
    assert out["pass@1"] == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    assert out["pass@4"] == pytest.approx((1 + 1 + 0) / 3)
    assert out["n_problems"] == 3 and out["n_samples"] == 4
    two = summarize(correct, ks=(2,))
    assert set(two) == {"pass@2", "n_problems", "n_samples"}
    assert two["pass@2"] == pytest.approx((_brute_force_pass_at_k(4, 1, 2) + 1.0 + 0.0) / 3)
    assert summarize([[True]]) == {"pass@1": 1.0, "n_problems": 1, "n_samples": 1}
    with pytest.raises(ValueError, match="ks must lie in 1..4"):
        summarize(correct, ks=(8,))
    with pytest.raises(ValueError, match="at least one problem"):
        summarize([])


# ---------------------------------------------------------------------------------------------
# evaluate() with test doubles for the engine and the tokenizer interfaces
# ---------------------------------------------------------------------------------------------


class _ScriptedEngine:
    """Problem i gets n completions: `n_correct[i]` boxing the gold answer, the rest boxing a wrong one.

    Outputs come back shuffled, so evaluate() must group them by prompt_index.
    """

    def __init__(self, problems, n_correct):
        self.problems, self.n_correct, self.calls = problems, n_correct, []

    def generate(self, prompt_ids, n, max_tokens, temperature, top_p, seed):
        self.calls.append(dict(prompt_ids=prompt_ids, n=n, max_tokens=max_tokens, temperature=temperature,
                               top_p=top_p, seed=seed))
        outputs = []
        for i, ids in enumerate(prompt_ids):
            prompt = "".join(chr(t) for t in ids)
            assert self.problems[i]["problem"] in prompt  # prompt i is problem i's
            for j in range(n):
                answer = self.problems[i]["answer"] if j < self.n_correct[i] else "wrong"
                text = f"Some reasoning. The answer is $\\boxed{{{answer}}}$."
                outputs.append(Output(i, text, list(range(len(text) // 4))))
        random.Random(seed).shuffle(outputs)
        return outputs


def test_evaluate_on_amc23_rows():
    problems = load_problems(DATA / "eval" / "amc23.jsonl")[:5]
    n_correct = [0, 1, 4, 2, 0]
    engine = _ScriptedEngine(problems, n_correct)
    result = evaluate(engine, CharTokenizer(), problems, samples=4, max_tokens=64, temperature=0.7, top_p=0.9,
                      template="qwen", one_shot=False, seed=3)

    (call,) = engine.calls
    assert call["n"] == 4 and call["max_tokens"] == 64 and call["temperature"] == 0.7
    assert call["top_p"] == 0.9 and call["seed"] == 3
    expected_prompt = CharTokenizer().apply_chat_template(build_messages(problems[1]["problem"], "qwen", False),
                                                            True, True)["input_ids"]
    assert call["prompt_ids"][1] == expected_prompt

    assert result["n_problems"] == 5 and result["n_samples"] == 4
    assert result["pass@1"] == pytest.approx(sum(c / 4 for c in n_correct) / 5)
    assert result["pass@4"] == pytest.approx(sum(c > 0 for c in n_correct) / 5)
    assert result["boxed_frac"] == 1.0
    per_problem = result["per_problem"]
    assert [p["id"] for p in per_problem] == [p["id"] for p in problems]
    for row, problem, c in zip(per_problem, problems, n_correct):
        assert row["problem"] == problem["problem"] and row["answer"] == problem["answer"]
        assert len(row["completions"]) == 4 and sum(row["correct"]) == c
        assert all(ok == (f"{{{problem['answer']}}}" in text) for ok, text in zip(row["correct"], row["completions"]))


def test_evaluate_rejects_a_short_engine_answer():
    problems = load_problems(DATA / "eval" / "amc23.jsonl")[:2]

    class _DroppingEngine(_ScriptedEngine):
        def generate(self, *args, **kwargs):
            return super().generate(*args, **kwargs)[1:]

    with pytest.raises(ValueError, match=r"engine returned \d completions for prompt \d, expected 2"):
        evaluate(_DroppingEngine(problems, [1, 1]), CharTokenizer(), problems, samples=2)
    with pytest.raises(ValueError, match="samples must be"):
        evaluate(_ScriptedEngine(problems, [1, 1]), CharTokenizer(), problems, samples=0)
