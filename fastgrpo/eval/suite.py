"""Benchmark suites: named eval sets, sampling presets, result tables and per-problem records.

``fastgrpo eval --model DIR --suite aime24,amc23,math500,minerva,olympiadbench --preset deepscaler``
and ``eval.suite`` during training both go through here:

- a suite entry is a name, found as ``<data_dir>/eval/<name>.jsonl`` (mixture.resolve_dataset), or
  a path; its label (metrics, file names) is the file stem;
- every set is scored by eval.evaluate: pass@1 = the mean over k samples per problem, averaged
  over problems, and the unbiased pass@k;
- ``write_report`` writes results.md (a markdown table), results.json (scores and settings) and
  ``<label>.jsonl``: one line per problem with its completions, the extracted final answers and
  which of them were graded correct.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastgrpo.data.prompts import PROMPT_TEMPLATES
from fastgrpo.data.sources import load_problems
from fastgrpo.eval.evaluate import evaluate
from fastgrpo.data.sources import dataset_label, resolve_dataset
from fastgrpo.rewards import extract_boxed

# The five benchmarks of the DeepScaleR and open-rs tables.
DEFAULT_SUITE = ("aime24", "amc23", "math500", "minerva", "olympiadbench")


@dataclass(frozen=True)
class EvalSettings:
    """How completions are sampled for scoring. samples = k per problem."""

    samples: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 1024
    template: str = "r1"
    one_shot: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {self.samples!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.template not in PROMPT_TEMPLATES:
            raise ValueError(f"unknown prompt template {self.template!r}; valid templates: {list(PROMPT_TEMPLATES)}")


# Published protocols. Each value is cited; explicit command-line flags override a preset.
PRESETS: dict[str, dict[str, Any]] = {
    # DeepScaleR README "Evaluation" and scripts/eval/eval_model.sh: vLLM, 16 samples for every
    # problem of every set ("Pass@1 accuracy averaged over 16 samples"), temperature 0.6,
    # top_p 0.95, response length 32,768.
    "deepscaler": dict(samples=16, temperature=0.6, top_p=0.95, max_tokens=32768, template="r1", one_shot=False),
    # open-rs README "Evaluation" (lighteval): one sample per problem, temperature 0.6, top_p 0.95,
    # max_new_tokens 32,768.
    "open-rs": dict(samples=1, temperature=0.6, top_p=0.95, max_tokens=32768, template="r1", one_shot=False),
}


def eval_settings(preset: str | None = None, **explicit: Any) -> EvalSettings:
    """EvalSettings from the defaults, then `preset`'s values, then the `explicit` ones that are not None."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown eval preset {preset!r}; valid presets: {sorted(PRESETS)}")
        values.update(PRESETS[preset])
    fields = {f.name for f in dataclasses.fields(EvalSettings)}
    unknown = sorted(set(explicit) - fields)
    if unknown:
        raise TypeError(f"unknown eval setting(s) {unknown}; valid: {sorted(fields)}")
    values.update({k: v for k, v in explicit.items() if v is not None})
    return EvalSettings(**values)


# ----------------------------------------------------------------------------------------------
# Finding and loading the sets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteSet:
    label: str
    path: Path
    problems: list[dict]


def parse_suite(entries: str | Sequence[str]) -> list[str]:
    """"aime24,amc23" or ["aime24", "amc23,math500"] -> ["aime24", "amc23", "math500"]."""
    if isinstance(entries, (str, os.PathLike)):
        entries = [str(entries)]
    names = [part.strip() for entry in entries for part in str(entry).split(",")]
    return [name for name in names if name]


def load_suite(entries: str | Sequence[str], data_dir: str | os.PathLike, limit: int | None = None) -> list[SuiteSet]:
    """The sets of a suite, each limited to its first `limit` problems; labels must be unique."""
    names = parse_suite(entries)
    if not names:
        raise ValueError(f"the suite names no dataset, got {entries!r}; e.g. {','.join(DEFAULT_SUITE)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all problems), got {limit}")
    sets, seen = [], set()
    for name in names:
        label = dataset_label(name)
        if label in seen:
            raise ValueError(f"the suite names {label!r} twice (results are keyed by name): {names}")
        seen.add(label)
        path = resolve_dataset(name, data_dir, "eval")
        sets.append(SuiteSet(label, path, load_problems(path)[:limit]))
    return sets


# ----------------------------------------------------------------------------------------------
# Running and reporting
# ----------------------------------------------------------------------------------------------


def run_suite(engine, tokenizer, sets: Sequence[SuiteSet], settings: EvalSettings,
              ks: Sequence[int] | None = None) -> dict[str, dict]:
    """{label: eval.evaluate's result + "path"} for each set, in order."""
    results = {}
    for s in sets:
        result = evaluate(engine, tokenizer, s.problems, samples=settings.samples, max_tokens=settings.max_tokens,
                          temperature=settings.temperature, top_p=settings.top_p, template=settings.template,
                          one_shot=settings.one_shot, seed=settings.seed, ks=ks)
        result["path"] = str(s.path)
        results[s.label] = result
    return results


def scores(result: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one set's result (pass@k, counts, boxed_frac, ...), without per-problem records."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def average_pass_at_1(results: Mapping[str, Mapping[str, Any]]) -> float:
    """The unweighted mean of the sets' pass@1 (the "Avg." column of the DeepScaleR/open-rs tables)."""
    if not results:
        raise ValueError("no results to average")
    return sum(r["pass@1"] for r in results.values()) / len(results)


def suite_metrics(results: Mapping[str, Mapping[str, Any]], prefix: str = "eval_") -> dict[str, float]:
    """Flat metrics for the trainer's log: ``{prefix}<label>_pass@1``, ``..._pass@k``, ``..._boxed_frac``."""
    out = {}
    for label, result in results.items():
        for key, value in scores(result).items():
            if key.startswith("pass@") or key in ("boxed_frac", "mean_completion_tokens"):
                out[f"{prefix}{label}_{key}"] = float(value)
    if results:
        out[f"{prefix}suite_avg_pass@1"] = average_pass_at_1(results)
    return out


def per_problem_records(result: Mapping[str, Any]) -> list[dict]:
    """One record per problem: id, problem, answer, completions, extracted (the last \\boxed{} of
    each completion, None if none), correct (per completion), n_correct and pass@1."""
    records = []
    for row in result["per_problem"]:
        correct = [bool(c) for c in row["correct"]]
        records.append({
            "id": row["id"], "problem": row["problem"], "answer": row["answer"],
            "completions": row["completions"], "extracted": [extract_boxed(c) for c in row["completions"]],
            "correct": correct, "n_correct": sum(correct), "pass@1": sum(correct) / len(correct),
        })
    return records


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """| dataset | problems | k | pass@1 (%) | pass@k (%) ... | boxed (%) | mean tokens |, plus an average row."""
    pass_keys = sorted({k for r in results.values() for k in r if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    header = ["dataset", "problems", "k", *(f"{k} (%)" for k in pass_keys), "boxed (%)", "mean tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    for label, r in results.items():
        cells = [label, str(r["n_problems"]), str(r["n_samples"]), *(pct(r.get(k)) for k in pass_keys),
                 pct(r.get("boxed_frac")), f"{r.get('mean_completion_tokens', float('nan')):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if len(results) > 1:
        cells = ["average", str(sum(r["n_problems"] for r in results.values())), "", pct(average_pass_at_1(results)),
                 *([""] * (len(pass_keys) - 1)), "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | os.PathLike, results: Mapping[str, Mapping[str, Any]],
                 settings: Mapping[str, Any]) -> dict[str, Path]:
    """Write results.md, results.json and one <label>.jsonl of per-problem records per set.

    results.json: {"settings": settings, "average_pass@1": float, "results": {label: {scores...,
    "path", "per_problem_file"}}}. Returns {"markdown", "json", <label>: path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    summary: dict[str, Any] = {}
    for label, result in results.items():
        path = out / f"{label}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for record in per_problem_records(result):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        written[label] = path
        summary[label] = {**scores(result), "path": result.get("path"), "per_problem_file": path.name}
    document = {"settings": dict(settings), "average_pass@1": average_pass_at_1(results), "results": summary}
    written["json"] = out / "results.json"
    written["json"].write_text(json.dumps(document, indent=1) + "\n")
    written["markdown"] = out / "results.md"
    written["markdown"].write_text(markdown_table(results))
    return written
