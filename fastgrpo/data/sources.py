"""Problem files and dataset names: read rows with their file and line, load problems, and find
``data/train/<name>.jsonl`` (or .parquet, .json, a saved-dataset folder) from a name."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fastgrpo.data")

DATASET_EXTENSIONS = (".jsonl", ".parquet", ".json")
DATA_DIR_ENV = "FASTGRPO_DATA_DIR"  # the command line's default for --data-dir

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


# ----------------------------------------------------------------------------------------------
# Finding datasets by name
# ----------------------------------------------------------------------------------------------


def dataset_label(name_or_path: str) -> str:
    """The short name of a dataset entry: "aime24" for "aime24" and for "some/dir/aime24.jsonl"."""
    name = Path(str(name_or_path).rstrip("/")).name
    for ext in DATASET_EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def default_data_dir() -> str:
    """$FASTGRPO_DATA_DIR, else "data" (holding train/ and eval/ folders)."""
    return os.environ.get(DATA_DIR_ENV) or "data"


def resolve_dataset(name_or_path: str | os.PathLike, data_dir: str | os.PathLike, subdir: str) -> Path:
    """The file (or saved-dataset folder) of a dataset entry.

    An existing path is returned as it is. Otherwise the entry is a name, looked up as
    ``<data_dir>/<subdir>/<name><ext>`` and then ``<data_dir>/<name><ext>`` for ext in
    DATASET_EXTENSIONS (a folder ``<name>`` saved by `datasets` also matches). A miss raises
    FileNotFoundError listing the places tried and the names that do exist there.
    """
    entry = str(name_or_path)
    if not entry.strip():
        raise ValueError("a dataset name or path is empty")
    path = Path(entry).expanduser()
    if path.exists():
        return path
    roots = [Path(data_dir) / subdir, Path(data_dir)]
    for root in roots:
        for candidate in [root / f"{entry}{ext}" for ext in DATASET_EXTENSIONS]:
            if candidate.is_file():
                return candidate
        folder = root / entry  # written by datasets' save_to_disk
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            return folder
    available = sorted({dataset_label(p.name) for root in roots if root.is_dir() for p in root.iterdir()
                        if p.suffix in DATASET_EXTENSIONS})
    exts = "{" + ",".join(DATASET_EXTENSIONS) + "}"
    raise FileNotFoundError(
        f"no dataset {entry!r}: not an existing path, and neither {roots[0] / entry}{exts} nor "
        f"{roots[1] / entry}{exts} exists; names available there: {', '.join(available) or 'none'} "
        f"(the folder is data.data_dir, --data-dir or ${DATA_DIR_ENV})"
    )
