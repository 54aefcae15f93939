"""Tests for fastgrpo.eval.suite: suite names, presets, tables and per-problem records; `fastgrpo eval
--suite` end to end on the tiny model; the suite evaluated during training (with a data mixture)."""

from __future__ import annotations

import json

import pytest

from fastgrpo.cli import main
from fastgrpo.config import load_config
from fastgrpo.eval.suite import (DEFAULT_SUITE, PRESETS, EvalSettings, eval_settings, load_suite, markdown_table,
                                 parse_suite, run_suite, suite_metrics, write_report)
from fastgrpo.metrics import read_metrics
from helpers.eval_doubles import CharTokenizer, Output
from helpers.paths import SHARED_DATA

DATA = SHARED_DATA


# ----------------------------------------------------------------------------------------------
# Names and presets
# ----------------------------------------------------------------------------------------------


def test_suite_names_resolve_in_the_data_folder():
    sets = load_suite("aime24,amc23", DATA)
    assert [(s.label, len(s.problems)) for s in sets] == [("aime24", 30), ("amc23", 40)]
    assert sets[0].path.resolve() == (DATA / "eval" / "aime24.jsonl").resolve()
    # the data folder may also be the eval folder itself; paths work too; limit cuts each set
    sets = load_suite(["math500", str(DATA / "eval" / "minerva.jsonl")], DATA / "eval", limit=3)
    assert [(s.label, len(s.problems)) for s in sets] == [("math500", 3), ("minerva", 3)]
    assert parse_suite(["aime24, amc23", "math500,"]) == ["aime24", "amc23", "math500"]
    assert len(load_suite(",".join(DEFAULT_SUITE), DATA, limit=1)) == 5  # the shipped data has all five


def test_suite_errors_name_the_dataset():
    with pytest.raises(FileNotFoundError, match=r"no dataset 'aime25'.*names available there: .*aime24.*amc23"):
        load_suite("aime24,aime25", DATA)
    with pytest.raises(ValueError, match="names 'amc23' twice"):
        load_suite(["amc23", str(DATA / "eval" / "amc23.jsonl")], DATA)
    with pytest.raises(ValueError, match="names no dataset"):
        load_suite(" , ", DATA)


def test_presets_and_explicit_settings():
    ds = eval_settings("deepscaler")
    assert (ds.samples, ds.temperature, ds.top_p, ds.max_tokens) == (16, 0.6, 0.95, 32768)
    assert eval_settings("open-rs").samples == 1 and eval_settings("open-rs").max_tokens == 32768
    # explicit values win over the preset; None means "not given"
    mixed = eval_settings("deepscaler", samples=2, temperature=None, max_tokens=64)
    assert (mixed.samples, mixed.temperature, mixed.max_tokens) == (2, 0.6, 64)
    assert eval_settings() == EvalSettings()
    assert set(PRESETS) == {"deepscaler", "open-rs"}
    with pytest.raises(ValueError, match=r"unknown eval preset 'deepscale'; valid presets: \['deepscaler', 'open-rs'\]"):
        eval_settings("deepscale")
    with pytest.raises(ValueError, match="top_p must be in"):
        eval_settings(top_p=0.0)
    with pytest.raises(ValueError, match="unknown prompt template 'chatml'"):
        eval_settings(template="chatml")
    with pytest.raises(TypeError, match="unknown eval setting"):
        eval_settings(temprature=0.5)


# ----------------------------------------------------------------------------------------------
# Running and writing, with test doubles for the engine and tokenizer interfaces
# ----------------------------------------------------------------------------------------------


class _ScriptedEngine:
    """Prompt i of a call gets n completions, the first ``i % (n + 1)`` boxing the gold answer."""

    def __init__(self, sets):
        self.answers = {s.problems[0]["problem"]: [p["answer"] for p in s.problems] for s in sets}

    def generate(self, prompt_ids, n, max_tokens, temperature, top_p, seed):
        first = "".join(chr(t) for t in prompt_ids[0])
        answers = next(a for problem, a in self.answers.items() if problem in first)
        return [Output(i, f"So the answer is \\boxed{{{answers[i] if j < i % (n + 1) else 'wrong'}}}.", [1] * (3 + j))
                for i in range(len(prompt_ids)) for j in range(n)]


def test_tables_json_and_per_problem_records(tmp_path):
    sets = load_suite("aime24,amc23", DATA, limit=5)
    settings = eval_settings(samples=4, max_tokens=16)
    results = run_suite(_ScriptedEngine(sets), CharTokenizer(), sets, settings)
    expected_pass1 = sum((i % 5) / 4 for i in range(5)) / 5  # 0, 1/4, 2/4, 3/4, 4/4 correct
    for label in ("aime24", "amc23"):
        assert results[label]["pass@1"] == pytest.approx(expected_pass1)
        assert results[label]["pass@4"] == pytest.approx(4 / 5)

    written = write_report(tmp_path, results, {"model": "scripted", **settings.__dict__})
    table = written["markdown"].read_text()
    assert table == markdown_table(results)
    assert "| aime24 | 5 | 4 | 50.0 | 80.0 | 100.0 | 4 |" in table
    assert "| average | 10 |  | 50.0 |" in table
    doc = json.loads(written["json"].read_text())
    assert doc["settings"]["samples"] == 4 and doc["average_pass@1"] == pytest.approx(expected_pass1)
    assert doc["results"]["amc23"]["per_problem_file"] == "amc23.jsonl"
    assert "per_problem" not in doc["results"]["amc23"]

    rows = [json.loads(line) for line in written["amc23"].read_text().splitlines()]
    assert [r["id"] for r in rows] == [p["id"] for p in sets[1].problems]
    for i, row in enumerate(rows):
        assert row["n_correct"] == i % 5 and row["pass@1"] == pytest.approx((i % 5) / 4)
        assert row["correct"] == [j < i % 5 for j in range(4)]
        assert row["extracted"] == [row["answer"] if j < i % 5 else "wrong" for j in range(4)]
        assert len(row["completions"]) == 4

    metrics = suite_metrics(results)
    assert metrics["eval_aime24_pass@1"] == pytest.approx(expected_pass1)
    assert metrics["eval_amc23_pass@4"] == pytest.approx(0.8)
    assert metrics["eval_suite_avg_pass@1"] == pytest.approx(expected_pass1)


# ----------------------------------------------------------------------------------------------
# End to end on the tiny model (transformers engine: no vLLM start-up)
# ----------------------------------------------------------------------------------------------


def test_fastgrpo_eval_suite_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(tiny_model_dir), "--suite", "amc23,aime24", "--limit", "2",
                 "--data-dir", str(DATA), "--engine", "transformers", "--preset", "deepscaler",
                 "--samples", "2", "--max-tokens", "6", "--output-dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| amc23 | 2 | 2 |" in printed and "| aime24 | 2 | 2 |" in printed
    doc = json.loads((out / "results.json").read_text())
    # the preset's sampling settings, with the explicit --samples / --max-tokens on top
    assert {k: doc["settings"][k] for k in ("samples", "temperature", "top_p", "max_tokens", "preset")} == {
        "samples": 2, "temperature": 0.6, "top_p": 0.95, "max_tokens": 6, "preset": "deepscaler"}
    assert set(doc["results"]) == {"amc23", "aime24"}
    for label in ("amc23", "aime24"):
        rows = [json.loads(line) for line in (out / f"{label}.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(len(r["completions"]) == 2 == len(r["extracted"]) for r in rows)
        assert doc["results"][label]["n_problems"] == 2 and 0.0 <= doc["results"][label]["pass@1"] <= 1.0

    assert main(["eval", "--model", str(tiny_model_dir), "--engine", "transformers"]) == 2
    assert "needs --suite" in capsys.readouterr().err


def test_suite_during_training_with_a_mixture(tiny_model_dir, tmp_path):
    from fastgrpo.trainer import train

    data = tmp_path / "data"
    for name, offset in (("hard", 10), ("easy", 0)):
        (data / "train").mkdir(parents=True, exist_ok=True)
        (data / "train" / f"{name}.jsonl").write_text(
            "".join(json.dumps({"problem": f"What is {offset + i} + 1?", "answer": str(offset + i + 1)}) + "\n"
                    for i in range(8)))
    (data / "eval").mkdir()
    (data / "eval" / "amc23.jsonl").write_text((DATA / "eval" / "amc23.jsonl").read_text())
    out = tmp_path / "run"
    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", f"log.output_dir={out}", "rollout.engine=transformers",
        "rollout.prompts_per_step=2", "rollout.num_generations=2", "rollout.max_completion_length=6",
        "rollout.dtype=float32", f"data.data_dir={data}", "data.mixture={hard: 1, easy: 3}", "data.num_eval=2",
        "data.unique_problems=8", "data.shuffle=false",
        "eval.max_completion_length=4", "eval.samples=2", "eval.every_n_steps=1", "eval.suite=[amc23]",
        "eval.suite_limit=2", "train.max_steps=2", "train.warmup_steps=0", "train.max_tokens_per_microbatch=512",
        "log.checkpoint_every=2", "reward_weights={accuracy: 1.0, format: 0.5}",
    ])
    train(cfg)
    records = read_metrics(out)
    with_suite = [r for r in records if "eval_amc23_pass@1" in r]
    assert [r["step"] for r in with_suite] == [0, 1, 2]  # before, every step (1), after
    assert all("eval_pass@1" in r and "eval_amc23_pass@2" in r for r in with_suite)
    for step in (0, 1, 2):
        rows = (out / "eval" / f"step-{step}" / "amc23.jsonl").read_text().splitlines()
        assert len(rows) == 2 and len(json.loads(rows[0])["completions"]) == 2
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["sampler"]["kind"] == "mixture" and state["sampler"]["draws"] == 4
    assert [(s["name"], s["n_problems"]) for s in state["sampler"]["sources"]] == [("hard", 2), ("easy", 6)]
    assert state["sampler"]["shuffle"] is False
