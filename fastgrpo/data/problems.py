"""The built-in arithmetic task, and the one train/held-out split of a data config.

``load_training_data(data_cfg, seed)`` builds (train, held-out) for the built-in task, a file, or
a weighted mixture of files (each mixture problem tagged with its source,
``problem["mixture_source"]``); no training problem ever shares its text with a held-out one.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fastgrpo.data.prompts import ONE_SHOT_PROBLEM
from fastgrpo.data.sources import load_problems, resolve_dataset

SOURCE_KEY = "mixture_source"  # the problem field naming the mixture source it came from

# ----------------------------------------------------------------------------------------------
# The built-in arithmetic task
# ----------------------------------------------------------------------------------------------

# Sampling weight of each difficulty level when `levels` is a plain sequence. Levels 1-2 make up
# 80% because the default model (SmolLM2-135M-Instruct) gets even "What is 17 + 25?" wrong
# untrained: a group of samples needs some correct answers for GRPO to have a signal at all.
DEFAULT_LEVEL_WEIGHTS: dict[int, float] = {1: 0.45, 2: 0.35, 3: 0.12, 4: 0.08}
LEVEL_DESCRIPTIONS: dict[int, str] = {
    1: "one-digit sum, e.g. 3 + 5",
    2: "two-digit sum or difference with a non-negative result, e.g. 47 - 18",
    3: "one-digit product (7 * 8) or three two-digit terms (23 + 45 - 17)",
    4: "parenthesized multi-step expression, e.g. (23 - 7) * 3 + 12",
}

_PRECEDENCE = {"+": 1, "-": 1, "*": 2}


@dataclass(frozen=True)
class _Num:
    value: int


@dataclass(frozen=True)
class _BinOp:
    op: str
    left: _Num | _BinOp
    right: _Num | _BinOp


_Expr = _Num | _BinOp


def _evaluate(expr: _Expr) -> int:
    """Exact integer value of an expression tree (never parses text)."""
    if isinstance(expr, _Num):
        return expr.value
    left, right = _evaluate(expr.left), _evaluate(expr.right)
    if expr.op == "+":
        return left + right
    if expr.op == "-":
        return left - right
    if expr.op == "*":
        return left * right
    raise ValueError(f"unknown operator {expr.op!r}; allowed: + - *")


def _render(expr: _Expr) -> str:
    """Infix text with the parentheses the precedence rules need (and no others)."""
    if isinstance(expr, _Num):
        return str(expr.value)
    prec = _PRECEDENCE[expr.op]
    left, right = _render(expr.left), _render(expr.right)
    if isinstance(expr.left, _BinOp) and _PRECEDENCE[expr.left.op] < prec:
        left = f"({left})"
    if isinstance(expr.right, _BinOp):
        right_prec = _PRECEDENCE[expr.right.op]
        # a - (b + c) and a * (b + c) need them; a + (b - c) == a + b - c does not.
        if right_prec < prec or (right_prec == prec and expr.op == "-"):
            right = f"({right})"
    return f"{left} {expr.op} {right}"


def _two_digit(rng: random.Random) -> _Num:
    return _Num(rng.randint(10, 99))


def _level_expr(level: int, rng: random.Random) -> _Expr:
    if level == 1:
        return _BinOp("+", _Num(rng.randint(0, 9)), _Num(rng.randint(0, 9)))
    if level == 2:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if rng.random() < 0.5:
            return _BinOp("+", _Num(a), _Num(b))
        return _BinOp("-", _Num(max(a, b)), _Num(min(a, b)))
    if level == 3:
        if rng.random() < 0.5:
            return _BinOp("*", _Num(rng.randint(2, 9)), _Num(rng.randint(2, 9)))
        first = _BinOp(rng.choice("+-"), _two_digit(rng), _two_digit(rng))
        return _BinOp(rng.choice("+-"), first, _two_digit(rng))
    if level == 4:
        inner = _BinOp(rng.choice("+-"), _two_digit(rng), _two_digit(rng))
        factor = _Num(rng.randint(2, 9))
        scaled = _BinOp("*", inner, factor) if rng.random() < 0.5 else _BinOp("*", factor, inner)
        other = _two_digit(rng)
        if rng.random() < 0.5:
            return _BinOp(rng.choice("+-"), scaled, other)
        return _BinOp(rng.choice("+-"), other, scaled)
    raise ValueError(f"unknown arithmetic level {level!r}; valid levels: {sorted(LEVEL_DESCRIPTIONS)}")


def _level_weights(levels: Sequence[int] | Mapping[int, float]) -> tuple[list[int], list[float]]:
    if isinstance(levels, Mapping):
        weights = {int(k): float(v) for k, v in levels.items()}
    else:
        weights = {}
        for level in levels:
            if level not in DEFAULT_LEVEL_WEIGHTS:
                raise ValueError(
                    f"unknown arithmetic level {level!r}; valid levels: {sorted(DEFAULT_LEVEL_WEIGHTS)}"
                )
            weights[level] = DEFAULT_LEVEL_WEIGHTS[level]
    for level, weight in weights.items():
        if level not in DEFAULT_LEVEL_WEIGHTS:
            raise ValueError(
                f"unknown arithmetic level {level!r}; valid levels: {sorted(DEFAULT_LEVEL_WEIGHTS)}"
            )
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"level {level} weight must be a finite number >= 0, got {weight!r}")
    if not weights or sum(weights.values()) <= 0:
        raise ValueError(f"levels must name at least one level with a positive weight, got {levels!r}")
    order = sorted(weights)
    return order, [weights[level] for level in order]


def _draw(rng: random.Random, order: list[int], weights: list[float]) -> tuple[str, str, int]:
    while True:
        level = rng.choices(order, weights=weights)[0]
        expr = _level_expr(level, rng)
        problem = f"What is {_render(expr)}?"
        if problem != ONE_SHOT_PROBLEM:
            return problem, str(_evaluate(expr)), level


def arithmetic_problems(
    n: int, seed: int, levels: Sequence[int] | Mapping[int, float] = (1, 2, 3, 4), id_prefix: str = "arith"
) -> list[dict]:
    """`n` seeded arithmetic problems ``{"problem", "answer", "level", "id"}``.

    levels: a sequence of level numbers (sampled with DEFAULT_LEVEL_WEIGHTS, renormalized over
    the chosen levels: by default 45% L1, 35% L2, 12% L3, 8% L4) or a mapping level -> weight.
    See LEVEL_DESCRIPTIONS for what each level asks. Problems may repeat (level 1 has only 100
    distinct problems); answers are exact integers computed from the expression tree.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    order, weights = _level_weights(levels)
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        problem, answer, level = _draw(rng, order, weights)
        problems.append({"problem": problem, "answer": answer, "level": level, "id": f"{id_prefix}-{i}"})
    return problems


def arithmetic_splits(
    n_train: int, n_eval: int, seed: int, levels: Sequence[int] | Mapping[int, float] = (1, 2, 3, 4)
) -> tuple[list[dict], list[dict]]:
    """(train, eval): eval holds `n_eval` distinct problems, and no train problem text is in eval.

    Raises ValueError when the levels cannot supply that many (e.g. levels=(1,) has 100 problems).
    """
    for name, value in (("n_train", n_train), ("n_eval", n_eval)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    order, weights = _level_weights(levels)
    rng = random.Random(seed)
    # Rejection sampling; the cap turns an impossible request into an error instead of a hang.
    max_draws = 200 * (n_train + n_eval) + 10_000
    draws = 0

    def take(count: int, accept, prefix: str) -> list[dict]:
        nonlocal draws
        out = []
        while len(out) < count:
            draws += 1
            if draws > max_draws:
                raise ValueError(
                    f"could not draw {n_eval} distinct eval problems and {n_train} train problems outside "
                    f"them from levels {order} in {max_draws} draws; lower n_eval or add levels"
                )
            problem, answer, level = _draw(rng, order, weights)
            if accept(problem):
                out.append({"problem": problem, "answer": answer, "level": level, "id": f"{prefix}-{len(out)}"})
        return out

    eval_texts: set[str] = set()

    def new_eval_text(problem: str) -> bool:
        if problem in eval_texts:
            return False
        eval_texts.add(problem)
        return True

    eval_problems = take(n_eval, new_eval_text, "arith-eval")
    train_problems = take(n_train, lambda problem: problem not in eval_texts, "arith-train")
    return train_problems, eval_problems


# ----------------------------------------------------------------------------------------------
# The train / held-out split
# ----------------------------------------------------------------------------------------------


def load_task(data_cfg, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) problems for a data config (any object with DataConfig's attribute names).

    dataset "arithmetic": arithmetic_splits(num_train, num_eval, seed, levels). A file: its
    problems; the eval set is eval_dataset when given, else `num_eval` problems drawn (seeded)
    from the file and removed from train, so the two never share a problem text. Bad file rows
    raise unless the config has ``on_bad_rows = "skip"`` (see load_problems' on_error).
    """
    on_error = data_cfg.on_bad_rows
    if data_cfg.dataset == "arithmetic":
        train, held_out = arithmetic_splits(data_cfg.num_train, data_cfg.num_eval, seed, tuple(data_cfg.levels))
        if data_cfg.eval_dataset is None:
            return train, held_out
    else:
        train = load_problems(data_cfg.dataset, data_cfg.problem_key, data_cfg.answer_key, on_error=on_error)
    if data_cfg.eval_dataset is not None:
        held_out = load_problems(data_cfg.eval_dataset, data_cfg.problem_key, data_cfg.answer_key, on_error=on_error)
        held_out = held_out[: data_cfg.num_eval] if data_cfg.num_eval else held_out
        held_texts = {p["problem"] for p in held_out}
        train = [p for p in train if p["problem"] not in held_texts]
        if not train:
            raise ValueError(f"every training problem of {data_cfg.dataset} is also in {data_cfg.eval_dataset}")
        return train, held_out
    if data_cfg.num_eval >= len(train):
        raise ValueError(
            f"num_eval={data_cfg.num_eval} leaves no training problems in {data_cfg.dataset} ({len(train)} rows)"
        )
    picked = random.Random(seed).sample(range(len(train)), data_cfg.num_eval)
    held_out = [train[i] for i in sorted(picked)]
    held_texts = {p["problem"] for p in held_out}
    return [p for p in train if p["problem"] not in held_texts], held_out


def load_training_data(data_cfg, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) for a data config (DataConfig's attribute names).

    No mixture: data.load_task, with `dataset` and `eval_dataset` names resolved first (see
    resolve_dataset; "arithmetic" stays the built-in task). A mixture: every source's problems
    (copies) tagged ``SOURCE_KEY: <mixture key>``; the held-out set is the first `num_eval` rows
    of `eval_dataset` when given, else `num_eval` problems drawn (seeded) from all sources pooled.
    Either way no training problem shares its text with a held-out one.
    """
    d = data_cfg
    eval_path = None if d.eval_dataset is None else str(resolve_dataset(d.eval_dataset, d.data_dir, "eval"))
    if not d.mixture:
        dataset = d.dataset if d.dataset == "arithmetic" else str(resolve_dataset(d.dataset, d.data_dir, "train"))
        return load_task(dataclasses.replace(d, dataset=dataset, eval_dataset=eval_path), seed)

    sources: dict[str, list[dict]] = {}
    for name in d.mixture:
        path = resolve_dataset(name, d.data_dir, "train")
        rows = load_problems(path, d.problem_key, d.answer_key, on_error=d.on_bad_rows)
        sources[name] = [{**row, SOURCE_KEY: name} for row in rows]
    if eval_path is not None:
        held_out = load_problems(eval_path, d.problem_key, d.answer_key, on_error=d.on_bad_rows)[: d.num_eval]
    else:
        pool = [p for rows in sources.values() for p in rows]
        if d.num_eval >= len(pool):
            raise ValueError(f"data.num_eval={d.num_eval} leaves no training problems in the mixture ({len(pool)} rows)")
        held_out = [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), d.num_eval))]
    held_texts = {p["problem"] for p in held_out}
    train = []
    for name, rows in sources.items():
        kept = [p for p in rows if p["problem"] not in held_texts]
        if not kept:
            raise ValueError(f"data.mixture source {name!r}: every problem is also in the held-out set")
        train.extend(kept)
    return train, held_out
