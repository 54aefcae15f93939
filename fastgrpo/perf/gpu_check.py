"""``make gpu-check``: use a short GPU loan fully, in one command, with one report file.

1. the test suite on the GPU (``impl="auto"`` selects the Triton kernels and flash-attention there);
2. the kernel benchmarks (fastgrpo vs naive vs Liger vs the matmul floor: time and
   ``torch.cuda.max_memory_allocated``);
3. 3 GRPO steps of the DeepSeek-R1-Distill-Qwen-1.5B recipe at reduced length: the real weights
   when ``FASTGRPO_R1_PATH`` names a local folder, else a random model of the same shape.

Everything lands in ``gpu_report/`` (``report.md`` plus the raw logs and benchmark JSON).
Not yet run on a GPU by this project: no GPU has been lent to it so far.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPORT_DIR = Path("gpu_report")
R1_RECIPE = "configs/r1-distill-qwen-1.5b-a40.yaml"


def _run(name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None) -> tuple[int, float]:
    started = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return rc, time.perf_counter() - started


def same_shape_random_model(out: Path) -> Path:
    """A random Qwen2 model with DeepSeek-R1-Distill-Qwen-1.5B's shape and the default tokenizer."""
    from fastgrpo.model import save_random_model
    from fastgrpo.perf.plan import PRESETS

    shape = PRESETS["deepseek-r1-distill-qwen-1.5b"]
    return save_random_model(out, "qwen2", dtype=torch.bfloat16, vocab_size=shape.vocab, hidden_size=shape.hidden,
                             intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                             num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                             tie_word_embeddings=shape.tied, max_position_embeddings=32768)


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine (make gpu-check). "
              "What runs without one: make test (Triton interpreter, AOT compile for sm_80/86/90).")
        return 2
    REPORT_DIR.mkdir(exist_ok=True)
    py = sys.executable
    pytest = str(Path(py).with_name("pytest"))
    steps: list[tuple[str, int, float]] = []

    rc, s = _run("tests", [pytest, "-m", "not slow", "-q"], REPORT_DIR)
    steps.append(("tests (GPU: Triton kernels, flash-attention, CUDA vLLM)", rc, s))
    rc, s = _run("bench", [pytest, "benchmarks/", "--benchmark-only", "-q",
                           f"--benchmark-json={REPORT_DIR / 'bench.json'}"], REPORT_DIR)
    steps.append(("kernel + rollout benchmarks", rc, s))
    # The launcher picks the Triton backward by a roofline model: time both forms to check its choice.
    for form in ("two-kernel", "atomic"):
        rc, s = _run(f"bench-bwd-{form}", [pytest, "benchmarks/bench_kernels.py", "--benchmark-only", "-q",
                                            f"--benchmark-json={REPORT_DIR / f'bench-bwd-{form}.json'}"],
                     REPORT_DIR, env={"FASTGRPO_LOGPROB_BWD": form})
        steps.append((f"kernel benchmarks, {form} Triton backward forced", rc, s))

    model = os.environ.get("FASTGRPO_R1_PATH")
    if not model:
        model = str(same_shape_random_model(REPORT_DIR / "random-r1-shape"))
    rc, s = _run("grpo", [py, "-m", "fastgrpo", "train", "--config", R1_RECIPE, "--max-steps", "3",
                          "--output-dir", str(REPORT_DIR / "grpo"), f"model.path={model}", "data.dataset=arithmetic",
                          "data.template=r1", "rollout.max_completion_length=512", "eval.before_and_after=false"],
                 REPORT_DIR)
    steps.append((f"3 GRPO steps, R1-distill recipe at 512 tokens ({'real' if os.environ.get('FASTGRPO_R1_PATH') else 'random'} weights)", rc, s))

    lines = [f"# gpu-check on {torch.cuda.get_device_name(0)}", "", "| step | exit | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {rc} | {s:.0f} |" for name, rc, s in steps]
    lines += ["", "Logs: tests.log, bench.log (table at its end), grpo.log; grpo/metrics.jsonl has the step metrics."]
    (REPORT_DIR / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return max(rc for _, rc, _ in steps)


if __name__ == "__main__":
    sys.exit(main())
