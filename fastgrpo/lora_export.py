"""Adapter folders as ordinary models: load base + adapter (``load_adapter_model``), write them merged
as one Hugging Face folder (``fastgrpo export --merge``), or hand a merged temporary folder to a
model-folder consumer (``fastgrpo eval --model ADAPTER``). Apart from fastgrpo.lora, which
fastgrpo.model imports to wrap the policy: this module needs fastgrpo.model to find base models."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from fastgrpo.lora import ADAPTER_CONFIG, adapter_base_model, is_adapter_folder
from fastgrpo.model import resolve_model_path

log = logging.getLogger(__name__)


def load_adapter_model(adapter_dir: str | os.PathLike, base: str | os.PathLike | None = None,
                       dtype: torch.dtype = torch.float32):
    """The base model (``base``, else the folder the adapter names) with the adapter loaded, eval mode."""
    from transformers import AutoModelForCausalLM

    base = base if base is not None else adapter_base_model(adapter_dir)
    try:
        base_dir = resolve_model_path(base)
    except ValueError as exc:
        raise FileNotFoundError(f"the base model of the adapter {adapter_dir} ({ADAPTER_CONFIG} "
                                f"base_model_name_or_path={base!r}): {exc}. Pass the base model folder "
                                "explicitly (--base)") from None
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval(), base_dir


def export_merged(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  base: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write base + adapter as one ordinary Hugging Face folder (weights, config, tokenizer, generation
    config) that transformers and vLLM load without peft. ``adapter_dir`` may also be a checkpoint."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder for the merged model")
    model, base_dir = load_adapter_model(adapter_dir, base, dtype)
    merged = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer_dir = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base_dir
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


@contextlib.contextmanager
def merged_model_folder(path: str | os.PathLike, scratch: str | os.PathLike | None = None) -> Iterator[Path]:
    """``path`` itself for a model folder; for an adapter folder, a temporary merged export
    (removed afterwards). Lets model-folder consumers (``fastgrpo eval``, vLLM) take either."""
    import shutil
    import tempfile

    if not is_adapter_folder(path):
        yield Path(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix="fastgrpo-merged-", dir=scratch))
    try:
        log.info("merging the adapter %s into %s", path, tmp)
        yield export_merged(path, tmp / "model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
