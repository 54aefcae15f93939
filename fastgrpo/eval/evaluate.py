"""Held-out evaluation: pass@1 averaged over k samples, unbiased pass@k, per-problem records.

The engine is anything with ``generate(prompt_ids: list[list[int]], n, max_tokens, temperature,
top_p, seed) -> list[output]`` where each output has ``.prompt_index``, ``.text`` and
``.token_ids`` (rollout.py's RolloutEngine); grading is rewards.accuracy_reward.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastgrpo.data.prompts import build_messages, encode_prompt
from fastgrpo.config import RewardConfig
from fastgrpo.rewards.grader import shared_grader
from fastgrpo.rewards import accuracy_reward, format_reward


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the (huge) binomials.
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"n, c, k must be integers, got n={n!r}, c={c!r}, k={k!r}")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..n={n}, got k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def summarize(correct: Sequence[Sequence[bool]], ks: Sequence[int] | None = None) -> dict:
    """Scores from ``correct[problem][sample]``.

    pass@1 is the fraction of correct samples per problem, averaged over problems (the "Pass@1
    averaged over 16 samples" of DeepScaleR); pass@k for each k in ks (default: 1 and the number of
    samples) is the unbiased estimator averaged over problems. Every problem needs >= max(ks) samples.
    Returns {"pass@1": float, "pass@k": float, ..., "n_problems": int, "n_samples": int (the fewest)}.
    """
    if len(correct) == 0:
        raise ValueError("summarize needs at least one problem, got none")
    counts = [len(row) for row in correct]
    n_min = min(counts)
    if n_min < 1:
        raise ValueError(f"every problem needs at least one sample; problem {counts.index(n_min)} has none")
    ks = sorted({1, n_min} if ks is None else set(ks))
    if ks[0] < 1 or ks[-1] > n_min:
        raise ValueError(f"ks must lie in 1..{n_min} (the fewest samples of a problem), got {ks}")
    out: dict = {}
    for k in ks:
        scores = [pass_at_k(len(row), sum(bool(x) for x in row), k) for row in correct]
        out[f"pass@{k}"] = sum(scores) / len(scores)
    out["n_problems"] = len(correct)
    out["n_samples"] = n_min
    return out


def evaluate(
    engine,
    tokenizer,
    problems: Sequence[dict],
    *,
    samples: int = 1,
    max_tokens: int = 512,
    temperature: float = 0.6,
    top_p: float = 0.95,
    template: str = "boxed",
    one_shot: bool = True,
    seed: int = 0,
    ks: Sequence[int] | None = None,
    grader=None,
) -> dict:
    """Generate ``samples`` completions per problem, grade them, and score.

    problems: dicts with "problem", "answer" and optionally "id" (data.load_problems' rows).
    Returns summarize()'s dict plus "boxed_frac" (completions with a non-empty final box),
    "mean_completion_tokens" and "per_problem": [{"id", "problem", "answer", "completions",
    "correct"}] in the order of `problems`. Grading runs in the grader's worker processes with a
    time bound per answer (``grader``: a fastgrpo.rewards.grader.Grader; default the shared pool with the
    ``reward`` section's default settings): model text is untrusted, in evaluation as in training.
    """
    if not problems:
        raise ValueError("evaluate needs at least one problem, got none")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    prompt_ids = [encode_prompt(tokenizer, build_messages(p["problem"], template, one_shot)) for p in problems]
    outputs = engine.generate(prompt_ids, n=samples, max_tokens=max_tokens, temperature=temperature,
                              top_p=top_p, seed=seed)
    completions: list[list[str]] = [[] for _ in problems]
    n_tokens = 0
    for out in outputs:
        if not 0 <= out.prompt_index < len(problems):
            raise ValueError(f"engine returned prompt_index {out.prompt_index} for {len(problems)} prompts")
        completions[out.prompt_index].append(out.text)
        n_tokens += len(out.token_ids)
    for index, texts in enumerate(completions):
        if len(texts) != samples:
            raise ValueError(f"engine returned {len(texts)} completions for prompt {index}, expected {samples}")

    flat_texts = [text for texts in completions for text in texts]
    flat_answers = [str(p["answer"]) for p in problems for _ in range(samples)]
    if grader is None:
        defaults = RewardConfig()
        grader = shared_grader(defaults.grader_workers, defaults.grader_timeout_s)
    flat_correct = [score == 1.0 for score in accuracy_reward(flat_texts, flat_answers, grader=grader)]
    correct = [flat_correct[i * samples : (i + 1) * samples] for i in range(len(problems))]

    result = summarize(correct, ks)
    result["boxed_frac"] = sum(score > 0 for score in format_reward(flat_texts)) / len(flat_texts)
    result["mean_completion_tokens"] = n_tokens / len(flat_texts)
    result["per_problem"] = [
        {"id": p.get("id", str(i)), "problem": p["problem"], "answer": str(p["answer"]),
         "completions": completions[i], "correct": correct[i]}
        for i, p in enumerate(problems)
    ]
    return result
