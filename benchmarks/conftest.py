"""Prints the kernel benchmarks' table (bench_kernels.py) at the end of a run and, with no GPU, the
roofline model's prediction for the same shapes on A40 / A100 / H100 / H200 (predicted, not measured)."""
from __future__ import annotations

import os
from pathlib import Path

import kernel_impls as ki
import pytest

from fastgrpo.kernels import roofline
from fastgrpo.model import TINY_MODEL_CONFIG, save_random_model

TABLE_ORDER = ("fastgrpo", "fastgrpo_frozen_head", "naive", "liger", "matmul_floor")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """FASTGRPO_BENCH_MODEL (a model folder, e.g. the converted SmolLM2), else the tests' tiny random
    Llama (2 layers, head_dim 32: the smallest vLLM's CPU attention takes) with the default tokenizer."""
    configured = os.environ.get("FASTGRPO_BENCH_MODEL", "").strip()
    if configured:
        return Path(configured)
    return save_random_model(tmp_path_factory.mktemp("bench_tiny_llama"), **TINY_MODEL_CONFIG)


def format_table(results: list[dict]) -> list[str]:
    """Rows of implementation, shape, best time, time / matmul floor, peak extra MB, peak / naive's."""
    lines = [f"{'implementation':<22}{'shape':<14}{'time ms':>10}{'x floor':>9}{'peak MB':>10}{'x naive mem':>13}"]
    for shape in ki.SHAPES:
        rows = {r["impl"]: r for r in results if r["shape"] == shape}
        floor, naive = rows.get("matmul_floor"), rows.get("naive")
        for impl in TABLE_ORDER:
            if impl not in rows:
                continue
            r = rows[impl]
            ratio = r["seconds"] / floor["seconds"] if floor else float("nan")
            mem_ratio = r["peak_extra_mb"] / naive["peak_extra_mb"] if naive else float("nan")
            lines.append(f"{impl:<22}{shape:<14}{r['seconds'] * 1e3:>10.0f}{ratio:>9.2f}"
                         f"{r['peak_extra_mb']:>10.0f}{mem_ratio:>13.2f}")
    for shape in ki.SHAPES:  # LoRA's frozen head against a trainable one, same run
        rows = {r["impl"]: r for r in results if r["shape"] == shape}
        if "fastgrpo" in rows and "fastgrpo_frozen_head" in rows:
            trainable, frozen = rows["fastgrpo"], rows["fastgrpo_frozen_head"]
            lines.append(f"frozen head at {shape}: {trainable['seconds'] / frozen['seconds']:.2f}x faster, "
                         f"peak {frozen['peak_extra_mb']:.0f} MB vs {trainable['peak_extra_mb']:.0f} MB trainable")
    return lines


def pytest_terminal_summary(terminalreporter):
    if not ki.RESULTS:
        return
    dev = ki.device()
    timer = "wall" if dev.type == "cuda" else "CPU time"
    terminalreporter.section(f"log-probs + GRPO loss, fwd+bwd ({dev}, {ki.dtype_for(dev)}, best {timer})")
    for line in format_table(ki.RESULTS):
        terminalreporter.write_line(line)
    if dev.type != "cuda":
        terminalreporter.section("no GPU here: the same log-prob shapes on GPUs, bf16 fwd+bwd, predicted by "
                                 "fastgrpo.kernels.roofline, not measured")
        for line in predicted_lines({r["shape"] for r in ki.RESULTS}):
            terminalreporter.write_line(line)


def predicted_lines(shape_names) -> list[str]:
    """One roofline prediction per (benchmarked shape, GPU), in kernel_impls.SHAPES order."""
    return [roofline.describe_prediction(roofline.SHAPES[name], gpu)
            for name in ki.SHAPES if name in shape_names for gpu in roofline.GPUS.values()]
