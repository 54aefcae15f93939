"""The steps of ``fastgrpo data prepare`` (pipeline.py runs them in order) and the records they pass:
``Row`` (a problem and where it came from) and ``StepReport`` (what one step kept and dropped, why,
and what each dropped row matched). Text matching itself lives in matching.py.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastgrpo.curate.difficulty import DifficultyOptions, estimate_pass_rates
from fastgrpo.curate.matching import NgramIndex, answers_agree, best_matches, greedy_duplicates, similar_pairs, text_key
from fastgrpo.data.prompts import build_messages, encode_prompt
from fastgrpo.data.sources import read_rows

log = logging.getLogger("fastgrpo.curate")

STEPS = ("load", "gradable", "dedup", "decontam", "embed-dedup", "difficulty")


@dataclass(frozen=True)
class PrepareOptions:
    """What ``prepare`` does; the CLI flags' defaults come from here."""

    problem_field: str = "problem"
    answer_field: str = "answer"
    split: str | None = None  # a DatasetDict folder's split
    against_problem_field: str = "problem"
    against_answer_field: str = "answer"
    gradable: bool = True
    dedup: bool = True
    decontam: bool = True
    embed_decontam: bool = True
    embed_dedup: bool = True
    # Word 13-grams (GPT-3's contamination n). On the shipped train file vs the eval sets every
    # coverage >= 0.9 was the same problem (7 rows); 0.50-0.87 were problems sharing a diagram or a
    # template with other numbers and other answers (20 rows).
    ngram_size: int = 13
    ngram_threshold: float = 0.9
    # MiniLM cosine to an eval problem. >= 0.95: all 8 rows the same problem; 0.93-0.95 held different
    # problems (spherical vs cylindrical coordinates). With equal gold answers 0.85 still found the
    # same problem reformatted (OlympiadBench row 522 at 0.896) and one different one.
    decontam_threshold: float = 0.95
    decontam_answer_threshold: float = 0.85
    # MiniLM cosine between train problems: at 0.90-0.95 pairs with the same answer were mostly
    # rewordings (4 of 6 sampled), pairs with different answers different questions (a shared
    # diagram, other numbers) even at 0.97-1.0 (texts past the model's 256 tokens are cut).
    dedup_threshold: float = 0.90
    dedup_any_answer: bool = False
    embed_batch_size: int = 64
    grade_timeout_s: int = 5  # math-verify's limit per parse/compare of a gold answer (whole seconds)
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("ngram_threshold", "decontam_threshold", "decontam_answer_threshold", "dedup_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
        for name in ("ngram_size", "embed_batch_size", "grade_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("problem_field", "answer_field", "against_problem_field", "against_answer_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty field name, got {getattr(self, name)!r}")


# ----------------------------------------------------------------------------------------------
# Rows and the report
# ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    """A problem (load_problems' dict: problem, answer, id, other fields) and where it came from."""

    record: dict
    file: str
    line: int  # 1-based: the line of a .jsonl, the item of a .json, the row of parquet/datasets

    def ref(self) -> dict:
        return {"file": self.file, "line": self.line, "id": self.record.get("id")}


@dataclass
class StepReport:
    step: str
    kept: int = 0
    dropped: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    seconds: float = 0.0
    skipped: bool = False

    def drop(self, row: Row, reason: str, detail: str | None = None, matched: dict | None = None) -> None:
        entry = row.ref() | {"reason": reason}
        if detail is not None:
            entry["detail"] = detail
        if matched is not None:
            entry["matched"] = matched
        self.dropped.append(entry)

    def to_dict(self) -> dict:
        if self.skipped:
            return {"step": self.step, "skipped": True}
        return {"step": self.step, "kept": self.kept, "dropped": len(self.dropped),
                "reasons": dict(Counter(d["reason"] for d in self.dropped).most_common()),
                "seconds": round(self.seconds, 2), "settings": self.settings, "notes": self.notes,
                "dropped_rows": self.dropped}


def timed(step: StepReport, fn: Callable[[], list[Row]]) -> list[Row]:
    started = time.perf_counter()
    kept = fn()
    step.seconds, step.kept = time.perf_counter() - started, len(kept)
    log.info("%s: kept %d, dropped %d (%.1f s) %s", step.step, step.kept, len(step.dropped), step.seconds,
             dict(Counter(d["reason"] for d in step.dropped)))
    return kept


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------


def _line_number(where: str) -> int:
    return int(where.split()[-1])  # read_rows' "line 12" / "item 3" / "row 7"


def read_problem_rows(path: str | Path, problem_field: str, answer_field: str, split: str | None,
                      step: StepReport) -> list[Row]:
    """The valid rows of one file; bad rows go to ``step`` with their line and reason.

    A file without a single valid row is an error (usually a wrong field mapping): it names the
    fields asked for and the first rows' problems, which list the keys the rows do have.
    """
    rows, bad = [], []
    for where, result in read_rows(path, problem_field, answer_field, split):
        if isinstance(result, str):
            bad.append((where, result))
        else:
            rows.append(Row(result, str(path), _line_number(where)))
    if not rows and bad:
        shown = "; ".join(f"{where}: {reason}" for where, reason in bad[:3])
        raise ValueError(f"{path}: no usable row with problem field {problem_field!r} and answer field "
                         f"{answer_field!r} ({shown}); map the fields with --problem-field/--answer-field")
    if not rows:
        raise ValueError(f"{path}: the dataset is empty")
    for where, reason in bad:
        step.drop(Row({}, str(path), _line_number(where)), "bad_row", reason)
    step.notes.setdefault("files", {})[str(path)] = {"rows": len(rows) + len(bad), "bad": len(bad)}
    return rows


# ----------------------------------------------------------------------------------------------
# gradable
# ----------------------------------------------------------------------------------------------


def gold_check(gold: str, timeout_s: int = 5) -> str:
    """How the grader reads a gold answer: "integer" or "math_verify" when gradable, else the reason
    it is not: "too_long", "unparseable" (math-verify finds no math in it), "unparseable_boxed" (a
    completion boxing exactly this answer would not parse), "not_self_equal" (the two parses do not
    verify as equal), "timeout" (math-verify hit ``timeout_s``), "error" (an exception in it).

    The same path as the accuracy reward (fastgrpo.rewards.grader): integers compare as integers; anything
    else is the gold parse against the LaTeX-only parse of the boxed answer, then verify. Without
    these checks an unparseable gold would still "grade", by exact string equality only.
    """
    from fastgrpo.rewards import grader

    if grader.as_plain_integer(gold) is not None:
        return "integer"
    if len(gold) > grader.MAX_ANSWER_CHARS:
        return "too_long"
    from math_verify import parse, verify

    reason = "math_verify"

    def reads_back(_predicted: str, _gold: str) -> bool:
        nonlocal reason
        # math-verify returns [sympy form, original text]; the text alone means it read nothing.
        gold_parsed = grader.parse_gold(gold, timeout_s)
        if all(isinstance(x, str) for x in gold_parsed):
            reason = "unparseable"
            return False
        boxed = parse(f"\\boxed{{{gold}}}", extraction_config=grader.latex_only_extraction(), parsing_timeout=timeout_s)
        if all(isinstance(x, str) for x in boxed):
            reason = "unparseable_boxed"
            return False
        if not verify(list(gold_parsed), boxed, timeout_seconds=timeout_s):
            reason = "not_self_equal"
            return False
        return True

    # grade_one tells math-verify's timeouts (which it reports only in a log line) and errors apart.
    # Measured: "-3,-1,1" took 1.8 s on the shared 2 cores, past a 2 s limit on a busier run.
    readable, kind = grader.grade_one(reads_back, gold, gold)
    if readable:
        return "math_verify"
    return kind if kind in ("timeout", "error") else reason


def _progress(items, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not enabled, unit="row")


def step_gradable(rows: list[Row], options: PrepareOptions, step: StepReport) -> list[Row]:
    kept, kinds = [], Counter()
    for row in _progress(rows, options.progress, "gradable"):
        kind = gold_check(row.record["answer"], options.grade_timeout_s)
        if kind in ("integer", "math_verify"):
            kinds[kind] += 1
            kept.append(row)
        else:
            step.drop(row, kind, f"answer {row.record['answer'][:200]!r}")
    step.notes["graded_as"] = dict(kinds)
    return kept


# ----------------------------------------------------------------------------------------------
# dedup / decontam / embed-dedup
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    rows: list[Row]
    step: StepReport  # bad rows of the --against files

    @property
    def problems(self) -> list[str]:
        return [r.record["problem"] for r in self.rows]


def load_eval_sets(paths: Sequence[str | Path], options: PrepareOptions) -> EvalSet:
    report = StepReport("against")
    rows: list[Row] = []
    for path in paths:
        rows += read_problem_rows(path, options.against_problem_field, options.against_answer_field, None, report)
    for entry in report.dropped:
        log.warning("--against %s line %s is not used for decontamination: %s", entry["file"], entry["line"],
                    entry["detail"])
    return EvalSet(rows, report)


# ----------------------------------------------------------------------------------------------
# difficulty
# ----------------------------------------------------------------------------------------------


def step_difficulty(rows: list[Row], options: DifficultyOptions, step: StepReport, engine, tokenizer,
                    progress: bool) -> list[Row]:
    from fastgrpo.rewards.grader import Grader

    budget = options.max_model_len - options.max_tokens
    fits = []
    for row in rows:
        length = len(encode_prompt(tokenizer, build_messages(row.record["problem"], options.template,
                                                             options.one_shot)))
        if length > budget:
            step.drop(row, "prompt_too_long", f"{length} prompt tokens > max_model_len {options.max_model_len} "
                                              f"- max_tokens {options.max_tokens}")
        else:
            fits.append(row)
    with Grader(workers=options.grader_workers) as grader:
        correct = estimate_pass_rates([r.record for r in fits], engine, tokenizer, options, grader, progress)
    kept = []
    for row, n_correct in zip(fits, correct):
        pass_rate = n_correct / options.samples
        row.record |= {"pass_rate": pass_rate, "n_correct": n_correct, "n_samples": options.samples}
        if pass_rate < options.min_pass_rate:
            step.drop(row, "too_hard", f"pass_rate {pass_rate:.3f} < min_pass_rate {options.min_pass_rate}")
        elif pass_rate > options.max_pass_rate:
            step.drop(row, "too_easy", f"pass_rate {pass_rate:.3f} > max_pass_rate {options.max_pass_rate}")
        else:
            kept.append(row)
    step.notes["n_correct_histogram"] = {str(c): n for c, n in sorted(Counter(correct).items())}
    step.notes["mean_pass_rate"] = sum(correct) / (options.samples * len(correct)) if correct else None
    return kept


# ----------------------------------------------------------------------------------------------
# dedup / decontam / embed-dedup
# ----------------------------------------------------------------------------------------------


def step_dedup(rows: list[Row], step: StepReport) -> list[Row]:
    """Keep the first row of every normalized problem text (hashed: 16-byte blake2b)."""
    first: dict[bytes, Row] = {}
    kept, conflicts = [], 0
    for row in rows:
        digest = hashlib.blake2b(text_key(row.record["problem"]).encode(), digest_size=16).digest()
        if digest not in first:
            first[digest] = row
            kept.append(row)
            continue
        original = first[digest]
        same = answers_agree(row.record["answer"], original.record["answer"])
        conflicts += not same
        detail = None if same else f"answers differ: {row.record['answer']!r} vs kept {original.record['answer']!r}"
        step.drop(row, "exact_duplicate", detail, original.ref())
    step.notes["answer_conflicts"] = conflicts
    return kept


def step_decontam(rows: list[Row], evals: EvalSet, options: PrepareOptions, step: StepReport,
                  embeddings=None, eval_embeddings=None) -> list[Row]:
    """Drop rows that overlap an eval problem (checks in order: exact, n-gram, embedding)."""
    exact = {text_key(p): i for i, p in reversed(list(enumerate(evals.problems)))}
    index = NgramIndex(evals.problems, options.ngram_size)
    if embeddings is not None:
        cosines, nearest = best_matches(embeddings, eval_embeddings)
    kept = []
    for position, row in enumerate(_progress(rows, options.progress, "decontam")):
        problem = row.record["problem"]
        if (j := exact.get(text_key(problem))) is not None:
            step.drop(row, "eval_exact", None, evals.rows[j].ref())
            continue
        j, coverage = index.best_overlap(problem)
        if coverage >= options.ngram_threshold:
            step.drop(row, "eval_ngram", f"{coverage:.0%} of the eval problem's {options.ngram_size}-grams",
                      evals.rows[j].ref() | {"ngram_coverage": round(coverage, 4)})
            continue
        if embeddings is not None:
            cosine, j = float(cosines[position]), int(nearest[position])
            matched = evals.rows[j].ref() | {"cosine": round(cosine, 4)}
            if cosine >= options.decontam_threshold:
                step.drop(row, "eval_embedding", None, matched)
                continue
            if cosine >= options.decontam_answer_threshold and answers_agree(
                    row.record["answer"], evals.rows[j].record["answer"], options.grade_timeout_s):
                step.drop(row, "eval_embedding_same_answer", None, matched)
                continue
        kept.append(row)
    return kept


def step_embed_dedup(rows: list[Row], embeddings, options: PrepareOptions, step: StepReport) -> list[Row]:
    """Drop a row whose cosine to an earlier kept row is >= dedup_threshold (and, unless
    dedup_any_answer, whose gold answer agrees with that row's)."""
    pairs = similar_pairs(embeddings, options.dedup_threshold)
    different_answers = 0
    if not options.dedup_any_answer:
        agreeing = []
        for i, j, cosine in _progress(pairs, options.progress, "near-duplicate answers"):
            if answers_agree(rows[i].record["answer"], rows[j].record["answer"], options.grade_timeout_s):
                agreeing.append((i, j, cosine))
            else:
                different_answers += 1
        pairs = agreeing
    dropped = greedy_duplicates(pairs)
    for i, (j, cosine) in sorted(dropped.items()):
        step.drop(rows[i], "near_duplicate", None, rows[j].ref() | {"cosine": round(cosine, 4)})
    step.notes["similar_pairs_with_different_answers_kept"] = different_answers
    return [row for i, row in enumerate(rows) if i not in dropped]
