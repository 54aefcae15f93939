"""Atomic checkpoints and exact resume.

A checkpoint is a Hugging Face model folder (safetensors + config + tokenizer) that
``from_pretrained`` and vLLM load as they are, plus the trainer's state:

    <output_dir>/checkpoint-<step>/
        model.safetensors, config.json, tokenizer files   the policy
        optimizer.pt, scheduler.pt                          tensors and numbers only
        rng.pt                                              torch / python RNG states
        trainer_state.json                                  step, data position, metrics so far

With ``lora.rank > 0`` the policy part is a PEFT adapter folder instead (``adapter_config.json`` +
``adapter_model.safetensors``, written by the same ``save_pretrained`` call); the base model stays
in ``model.path`` and ``fastgrpo export --merge`` makes a plain model folder of the two.

It is written into a hidden temporary folder, flushed, then renamed into place, so a crash leaves
either the previous complete checkpoint or the new one, never half of one (the temporary folder a
killed write leaves is ignored, and removed by the next save). Loading never unpickles
arbitrary objects: weights are safetensors and ``torch.load`` runs with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": random.getstate()[0]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and keep only the newest ``keep_last``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    # Leftovers of writes that were killed: one run owns an output folder, so their writers are gone.
    for stale in output_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = output_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    tmp.mkdir()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    # Written last: a folder with trainer_state.json is complete.
    (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=1))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume) replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(output_dir)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        (old / STATE_FILE).unlink()  # first: a deletion cut short never leaves a "complete" half
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary folders of interrupted writes are ignored."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def load_training_state(checkpoint: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from ``checkpoint``; return the trainer state dict."""
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(checkpoint / "rng.pt", weights_only=True))
    return load_trainer_state(checkpoint)
