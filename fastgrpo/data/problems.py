"""Datasets and prompts: the built-in arithmetic task, file loaders, chat prompts, the prompt sampler.

Every problem is a dict with at least ``{"problem": str, "answer": str, "id": str}``; the
arithmetic task adds ``"level": int`` and file rows keep their other fields (e.g. ``"source"``).
Answers are always strings so that AIME's ``"025"`` survives (graded by value in rewards.py).

Functions take explicit arguments only; the config maps onto them in the trainer and CLI.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

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

# The worked example of the one-shot prompt. The generator never emits this problem, so a
# one-shot prompt never contains its own answer.
ONE_SHOT_PROBLEM = "What is 2 + 2?"
ONE_SHOT_SOLUTION = "2 + 2 = 4. The answer is \\boxed{4}."

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
# Loading problems from files
# ----------------------------------------------------------------------------------------------

_PIP_HINT = "pip install {package}"
_MAX_ERRORS_REPORTED = 5


def _normalize_row(row: Any, problem_key: str, answer_key: str, fallback_id: str) -> dict | str:
    """The normalized problem dict, or a string saying what is wrong with the row."""
    if not isinstance(row, Mapping):
        return f"expected an object with {problem_key!r} and {answer_key!r}, got {type(row).__name__}"
    if problem_key not in row:
        return f"missing key {problem_key!r} (keys: {sorted(row)})"
    if answer_key not in row:
        return f"missing key {answer_key!r} (keys: {sorted(row)})"
    problem, answer = row[problem_key], row[answer_key]
    if not isinstance(problem, str):
        return f"{problem_key!r} must be a string, got {type(problem).__name__}"
    if not problem.strip():
        return f"{problem_key!r} is empty"
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return f"{answer_key!r} must be a string or a number, got {type(answer).__name__}"
    if isinstance(answer, float):
        if not math.isfinite(answer):
            return f"{answer_key!r} must be finite, got {answer!r}"
        answer = str(int(answer)) if answer.is_integer() else repr(answer)
    answer = str(answer).strip()
    if not answer:
        return f"{answer_key!r} is empty"
    out = {k: v for k, v in row.items() if k not in (problem_key, answer_key)}
    out["problem"], out["answer"] = problem, answer
    out["id"] = str(row["id"]) if "id" in row and row["id"] is not None else fallback_id
    return out


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {line_no}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {line_no}", _BadRow(f"invalid JSON ({e.msg} at column {e.colno})")


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json file must hold a list of objects, got {type(data).__name__}")
    for i, row in enumerate(data, start=1):
        yield f"item {i}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs pyarrow, which is not installed: {_PIP_HINT.format(package='pyarrow')}"
        ) from e
    for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"row {i}", row


def _hf_dataset_rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"{path} is a folder: reading a saved Hugging Face dataset needs the `datasets` package: "
            f"{_PIP_HINT.format(package='datasets')}"
        ) from e
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split is None or split not in data:
            raise ValueError(f"{path} holds splits {sorted(data)}; pass split= one of them, got {split!r}")
        data = data[split]
    for i, row in enumerate(data, start=1):
        yield f"row {i}", row


@dataclass(frozen=True)
class _BadRow:
    reason: str


_LOADERS = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}


def read_rows(
    path: str | Path, problem_key: str = "problem", answer_key: str = "answer", split: str | None = None
) -> Iterator[tuple[str, dict | str]]:
    """Every row of a dataset as ``(where, problem dict or the reason the row is bad)``.

    where is "line N" (.jsonl, 1-based, blank lines counted), "item N" (.json) or "row N"
    (parquet, datasets folder). The formats, the problem dicts and the checks are load_problems';
    nothing is dropped or logged here. A missing path or an unknown format raises at once.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}")
    if path.is_dir():
        rows = _hf_dataset_rows(path, split)
    elif path.suffix in _LOADERS:
        rows = _LOADERS[path.suffix](path)
    else:
        raise ValueError(
            f"{path}: unknown dataset format {path.suffix!r}; supported: {sorted(_LOADERS)} "
            "or a folder saved with datasets' save_to_disk"
        )
    return (
        (where, row.reason if isinstance(row, _BadRow) else _normalize_row(
            row, problem_key, answer_key, fallback_id=f"{path.stem}-{where.split()[-1]}"
        ))
        for where, row in rows
    )


def load_problems(
    path: str | Path,
    problem_key: str = "problem",
    answer_key: str = "answer",
    split: str | None = None,
    on_error: str = "raise",
) -> list[dict]:
    """Problems ``{"problem", "answer": str, "id", ...other fields}`` from a file or dataset folder.

    Formats: ``.jsonl`` (one object a line; blank lines skipped), ``.json`` (a list of objects),
    ``.parquet`` (needs pyarrow) and a folder written by ``datasets.Dataset.save_to_disk`` (needs
    `datasets`; a DatasetDict needs `split`). Answers may be strings or numbers and become strings
    (integral floats lose their ".0"). Rows without an "id" get "<file stem>-<1-based row>".
    Bad rows raise one ValueError naming the file, the 1-based line/row and what is wrong (the
    first few bad rows are listed); with ``on_error="skip"`` they are dropped with a warning
    instead (the shipped DeepScaleR train file has 2 rows with an empty answer). An empty dataset
    is always an error.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    problems, errors = [], []
    for where, result in read_rows(path, problem_key, answer_key, split):
        if isinstance(result, str):
            errors.append(f"{where}: {result}")
        else:
            problems.append(result)
    if errors:
        shown = "; ".join(errors[:_MAX_ERRORS_REPORTED])
        hidden = len(errors) - _MAX_ERRORS_REPORTED
        more = f" (and {hidden} more bad rows)" if hidden > 0 else ""
        if on_error == "raise":
            raise ValueError(f"{path}: {shown}{more}; on_error='skip' drops bad rows")
        log.warning("%s: skipped %d bad rows: %s%s", path, len(errors), shown, more)
    if not problems:
        raise ValueError(f"{path}: the dataset is empty (no valid rows)")
    return problems


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


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------

# "boxed" asks for a short answer: the default model answers within a 128-token budget. Measured
# on SmolLM2-135M-Instruct (transformers generate, 16 level-1/2 problems x 4 samples, temperature
# 1.0, 96 new tokens) with the one-shot "boxed" prompt: 81% boxed, 50% correct before training.
BOXED_INSTRUCTION = "Put your final answer within \\boxed{}."
# The sentence that DeepSeek-R1-Distill and Qwen2.5-Math are evaluated with.
REASONING_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_TEMPLATES = ("boxed", "r1", "qwen")


def build_messages(problem: str, template: str = "boxed", one_shot: bool = True) -> list[dict]:
    """Chat messages ``[{"role", "content"}, ...]`` that ask for a \\boxed{} final answer.

    templates:
      "boxed": problem + "\n" + BOXED_INSTRUCTION in the user turn; no system prompt (the chat
               template may add its default one).
      "r1":    DeepSeek-R1-Distill style: problem + "\n" + REASONING_INSTRUCTION, no system prompt.
      "qwen":  Qwen2.5-Math style: REASONING_INSTRUCTION is the system prompt, the user turn the
               bare problem.
    one_shot: put one worked example (ONE_SHOT_PROBLEM -> ONE_SHOT_SOLUTION) before the problem
    as a prior user/assistant turn. Why it is the default: measured on SmolLM2-135M-Instruct, a bare
    instruction gave 0 boxed answers in 160 completions, the one-shot prompt 66% boxed.
    """
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; valid templates: {list(PROMPT_TEMPLATES)}")
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"problem must be a non-empty string, got {problem!r}")

    instruction = {"boxed": BOXED_INSTRUCTION, "r1": REASONING_INSTRUCTION, "qwen": None}[template]

    def user_turn(text: str) -> dict:
        return {"role": "user", "content": text if instruction is None else f"{text}\n{instruction}"}

    messages = []
    if template == "qwen":
        messages.append({"role": "system", "content": REASONING_INSTRUCTION})
    if one_shot:
        messages.append(user_turn(ONE_SHOT_PROBLEM))
        messages.append({"role": "assistant", "content": ONE_SHOT_SOLUTION})
    messages.append(user_turn(problem))
    return messages


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the chat prompt, ending with the assistant generation header.

    transformers 5.x returns a BatchEncoding from ``apply_chat_template(tokenize=True)``; older
    versions a list (or a tensor with return_tensors): all become a plain list[int].
    """
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], (list, tuple)):
        if len(encoded) != 1:
            raise ValueError(f"expected the ids of one prompt, got a batch of {len(encoded)}")
        encoded = encoded[0]
    return [int(token) for token in encoded]


# ----------------------------------------------------------------------------------------------
# Sampling prompt batches
# ----------------------------------------------------------------------------------------------


class PromptSampler:
    """Endless batches of problems, reshuffled every epoch; resumable at the exact position.

    Epoch e visits the problems in the order of ``np.random.default_rng([seed, e]).permutation``,
    so the order depends only on (seed, epoch), not on how many batches came before. Batches are
    always full: a batch that reaches the end of an epoch continues into the next (reusing data
    is what longer training means: total optimization steps matter more than unique problems).
    """

    def __init__(self, problems: Sequence[dict], batch_size: int, seed: int):
        if len(problems) == 0:
            raise ValueError("PromptSampler needs at least one problem, got an empty list")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.problems = list(problems)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.problems))

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> list[dict]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self.problems):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(batch), len(self.problems) - self.position)
            batch.extend(self.problems[i] for i in self._order[self.position : self.position + take])
            self.position += take
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_problems": len(self.problems)}

    def load_state_dict(self, state: Mapping) -> None:
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise ValueError(f"sampler state lacks {sorted(missing)}; expected epoch, position, seed")
        n_problems = state.get("n_problems", len(self.problems))
        if n_problems != len(self.problems):
            raise ValueError(
                f"sampler state was saved over {n_problems} problems, this sampler has {len(self.problems)}"
            )
        if not 0 <= int(state["position"]) <= len(self.problems):
            raise ValueError(f"sampler position {state['position']} is outside 0..{len(self.problems)}")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
