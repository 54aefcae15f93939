"""Where a run's numbers go: ``metrics.jsonl`` always, TensorBoard and W&B when asked and installed.

A resumed run continues ``metrics.jsonl``. Steps logged after the checkpoint it resumes from (a
step that finished but was killed before its checkpoint was written) are run again, so
``roll_back_metrics`` first moves their records to ``metrics.rolled_back.jsonl``: every step then
appears once in ``metrics.jsonl``, with the numbers of the run that the weights descend from.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("fastgrpo")


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null says "not finite" without breaking readers
    return v


class MetricsLogger:
    """One JSON object per line in ``<output_dir>/metrics.jsonl``; appends, so a resume continues it."""

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = False, wandb: bool = False, config: dict | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                log.warning("log.tensorboard=true but tensorboard is not installed (pip install tensorboard); skipping it")
        if wandb:
            try:
                import wandb as wandb_mod

                # Offline unless the user configured otherwise: runs on rented cards often have no login.
                os.environ.setdefault("WANDB_MODE", "offline")
                self._wandb = wandb_mod.init(project="fastgrpo", dir=str(output_dir), config=config or {})
            except ImportError:
                log.warning("log.wandb=true but wandb is not installed (pip install wandb); skipping it")

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: _finite_or_none(v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        step = record.get("step", 0)
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def roll_back_metrics(output_dir: str | Path, step: int) -> int:
    """Move the records of steps after ``step`` from metrics.jsonl to metrics.rolled_back.jsonl
    (appended); returns how many moved. The rewrite is atomic (temporary file, then rename)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            later = json.loads(line).get("step", 0) > step
        except (json.JSONDecodeError, AttributeError, TypeError):
            later = True  # a line cut off by a kill mid-write
        (moved if later else keep).append(line if line.endswith("\n") else line + "\n")
    if not moved:
        return 0
    with open(path.with_name("metrics.rolled_back.jsonl"), "a") as fh:
        fh.writelines(moved)
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
    return len(moved)


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
