"""The GPU check: use a short GPU loan fully, in one command, with one report file.

    make gpu-check ARGS="--report-dir DIR"                       # a CUDA machine with `make install`
    bash scripts/gpu_check_offline.sh --report-dir DIR           # a lent machine without network
    python -m fastgrpo.perf.gpu_check --report-dir DIR [--dry-run] [--stages kernels,bench,grpo,lora]

Stages, in this order; each has its own time limit (the remaining total caps it) and one line in the
report, whatever the stages before it did:
  kernels  tests/kernels/test_triton_gpu.py: the Triton kernels against fp64 on the GPU in fp32, fp16
           and bf16, both backward forms, awkward shapes (what the interpreter cannot check)
  bench    scripts/gpu_kernel_bench.py: fastgrpo (each backward form) vs naive vs Liger's fused GRPO
           loss vs the matmul floor, time and torch.cuda.max_memory_allocated, at SmolLM2's head,
           Qwen2's (512 tokens) and the R1 recipe's micro-batch (16,384 tokens), beside the roofline
           predictions; registers, spills and shared memory of the Triton binaries that ran
  grpo     scripts/gpu_grpo_check.py: 3 GRPO steps, transformers engine, bf16, torch varlen attention,
           on a random model of DeepSeek-R1-Distill-Qwen-1.5B's shape: peak memory vs `fastgrpo plan`
  lora     LoRA and shared-prompt training: a line saying whether they have landed (no stage yet)

DIR/report.md is rewritten after every stage (a later timeout loses nothing); each stage's log and
outputs lie beside it. --dry-run runs nothing on a GPU: it prints the plan and checks, without CUDA,
that everything the stages import is importable (the offline script runs it under an import guard
that admits only the GPU image's packages and the bundle's) and that pytest collects stage a.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

# The whole run must fit a 15-minute loan with the machine's start and one rerun: 7.5 min in all.
TOTAL_LIMIT_S = 450
KILL_GRACE_S = 10
# Modules the stages import in their own processes; the dry run imports each (and grades one answer).
STAGE_IMPORTS = ("fastgrpo.kernels", "fastgrpo.kernels.logprob_triton", "fastgrpo.kernels.grpo_loss_triton",
                 "fastgrpo.kernels.roofline", "fastgrpo.trainer", "fastgrpo.rollout.hf", "fastgrpo.rewards.grader",
                 "fastgrpo.perf.plan", "fastgrpo.perf.profile", "math_verify", "liger_kernel.chunked_loss",
                 "pytest", "pytest_benchmark")


@dataclasses.dataclass(frozen=True)
class Stage:
    key: str
    title: str
    limit_s: int
    argv: Callable[[Path, Path], list[str]]  # (report dir, scratch dir) -> arguments after the Python
    summarize: Callable[[Path], str]  # report dir -> the report line's summary, from the stage's outputs


@dataclasses.dataclass
class Outcome:
    stage: str
    status: str  # passed | FAILED (exit N) | TIMED OUT | skipped: why
    seconds: float
    limit_s: int | None
    summary: str = ""


def same_shape_random_model(out: Path) -> Path:
    """A random Qwen2 model with DeepSeek-R1-Distill-Qwen-1.5B's shape and the default tokenizer."""
    from fastgrpo.model import save_random_model
    from fastgrpo.perf.shapes import PRESETS

    shape = PRESETS["deepseek-r1-distill-qwen-1.5b"]
    return save_random_model(out, "qwen2", dtype=torch.bfloat16, vocab_size=shape.vocab, hidden_size=shape.hidden,
                             intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                             num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                             tie_word_embeddings=shape.tied, max_position_embeddings=32768)


# ------------------------------------------------------------------------------------------ stages
def _summarize_kernels(report: Path) -> str:
    import xml.etree.ElementTree as ET

    path = report / "kernels.xml"
    if not path.is_file():
        return "no junit file (see kernels.log)"
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return (f"{counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']} of {counts['tests']} "
            f"passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped")


def _summarize_bench(report: Path) -> str:
    path = report / "bench" / "bench.jsonl"
    if not path.is_file():
        return "nothing measured (see bench.log)"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    failed = [f"{r['shape']} {r['label']}" for r in records if "error" in r]
    differ = [f"{r['shape']} {r['label']}" for r in records if r.get("loss_check", "ok") != "ok"]
    return (f"{len(records) - len(failed)} measurements" + (f"; failed: {', '.join(failed)}" if failed else "")
            + (f"; losses differ from naive's: {', '.join(differ)}" if differ else ""))


def _summarize_grpo(report: Path) -> str:
    path = report / "grpo" / "grpo.json"
    if not path.is_file():
        return "no result (see grpo.log)"
    g = json.loads(path.read_text())
    return (f"{g['steps']} steps; training peak {g['measured_train_peak_bytes'] / 2**30:.2f} GiB measured vs "
            f"{g['predicted_peak_bytes'] / 2**30:.2f} GiB planned ({g['measured_over_predicted']:.2f}x)")


# Stage a runs verbose: kernels.log then names every test as it finishes, so a timeout keeps the results so far.
STAGES = (
    Stage("kernels", "a. Triton kernels vs fp64 on the GPU (fp32/fp16/bf16, both backward forms)", 120,
          lambda report, scratch: ["-m", "pytest", "tests/kernels/test_triton_gpu.py", "-m", "gpu", "-v",
                                   "-p", "no:cacheprovider", f"--junitxml={report / 'kernels.xml'}"],
          _summarize_kernels),
    Stage("bench", "b. kernel benchmarks: fastgrpo vs naive vs Liger vs matmul floor, with roofline predictions", 150,
          lambda report, scratch: ["scripts/gpu_kernel_bench.py", "--out", str(report / "bench")], _summarize_bench),
    Stage("grpo", "c. 3 GRPO steps, R1-Distill-Qwen-1.5B shape (random), transformers engine, bf16: memory vs plan",
          150, lambda report, scratch: ["scripts/gpu_grpo_check.py", "--out", str(report / "grpo"),
                                        "--scratch", str(scratch)], _summarize_grpo),
)
STAGE_KEYS = tuple(s.key for s in STAGES) + ("lora",)


def lora_status() -> str:
    """Stage d: whether LoRA or shared-prompt training has landed (a config field names it)."""
    from fastgrpo import config

    names = [f"{cls.__name__}.{f.name}" for cls in vars(config).values()
             if dataclasses.is_dataclass(cls) and isinstance(cls, type) for f in dataclasses.fields(cls)
             if "lora" in f.name or "shared_prompt" in f.name]
    if not names:
        return "skipped: LoRA and shared-prompt training have not landed in this tree"
    return f"skipped: {', '.join(sorted(set(names)))} landed, but no GPU stage exercises it yet"


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # it ended on its own meanwhile
        pass


def run_stage(stage: Stage, report: Path, scratch: Path, limit_s: int) -> Outcome:
    """The stage in its own process group, killed with everything it started at the limit."""
    cmd = [sys.executable, *stage.argv(report, scratch)]
    # A rerun into the same folder must not mix in the last run's outputs (bench.jsonl appends).
    shutil.rmtree(report / stage.key, ignore_errors=True)
    (report / f"{stage.key}.xml").unlink(missing_ok=True)
    started = time.perf_counter()
    with open(report / f"{stage.key}.log", "w") as log:
        log.write(f"$ {' '.join(cmd)}  (limit {limit_s} s)\n")
        log.flush()
        # PYTHONSAFEPATH: the repository root must not go on sys.path, where kernels/ could pass for
        # Hugging Face's `kernels` package and fastgrpo/ would shadow an installed copy.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONSAFEPATH": "1"})
        try:
            rc = proc.wait(timeout=limit_s)
            status = "passed" if rc == 0 else f"FAILED (exit {rc})"
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
            status = f"TIMED OUT at {limit_s} s"
    seconds = time.perf_counter() - started
    try:
        summary = stage.summarize(report)
    except Exception as exc:  # a half-written output must not cost the report line
        summary = f"outputs unreadable: {exc!r}"
    return Outcome(stage.title, status, seconds, limit_s, summary)


def write_report(report: Path, outcomes: list[Outcome], header: str) -> Path:
    lines = [header, "", "| stage | result | seconds | limit s | summary |", "|---|---|---:|---:|---|"]
    lines += [f"| {o.stage} | {o.status} | {o.seconds:.0f} | {o.limit_s or '-'} | {o.summary} |" for o in outcomes]
    for title, name in (("b. Kernel benchmarks", "bench/bench.md"), ("c. GRPO steps", "grpo/grpo.md")):
        if (report / name).is_file():
            lines += ["", f"## {title}", "", (report / name).read_text().rstrip()]
    lines += ["", "Logs: <stage>.log beside this file; kernels.xml (junit), bench/bench.jsonl, "
              "bench/triton_binaries.json, grpo/profile.json, grpo/run/metrics.jsonl."]
    path = report / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def environment_header() -> str:
    triton = "absent"
    try:
        import triton as triton_module

        triton = triton_module.__version__
    except ImportError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return (f"# fastgrpo GPU check on {device}\n\ntorch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"Triton {triton}, Python {sys.version.split()[0]}")


def selected_stages(keys: list[str] | None) -> list[str]:
    keys = list(keys or STAGE_KEYS)
    unknown = [k for k in keys if k not in STAGE_KEYS]
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; valid: {', '.join(STAGE_KEYS)}")
    return [k for k in STAGE_KEYS if k in keys]  # always in the documented order


def run_all(report: Path, keys: list[str], total_limit_s: int, spent_s: float | None = None) -> int:
    report.mkdir(parents=True, exist_ok=True)
    header = environment_header()
    outcomes = [] if spent_s is None else [Outcome("install the bundle (scripts/gpu_check_offline.sh)", "passed",
                                                   spent_s, None)]
    deadline = time.perf_counter() + total_limit_s - (spent_s or 0.0)
    failed = False
    with tempfile.TemporaryDirectory(prefix="fastgrpo-gpu-check-") as scratch:
        for stage in STAGES:
            if stage.key not in keys:
                continue
            left = int(deadline - time.perf_counter()) - KILL_GRACE_S
            if left < 20:
                outcomes.append(Outcome(stage.title, f"skipped: {max(left, 0)} s left of the {total_limit_s} s total",
                                        0.0, stage.limit_s))
            else:
                print(f"gpu-check: {stage.title} (limit {min(stage.limit_s, left)} s)", flush=True)
                outcomes.append(run_stage(stage, report, Path(scratch), min(stage.limit_s, left)))
            failed |= outcomes[-1].status != "passed"
            print(f"gpu-check: {outcomes[-1].status}: {outcomes[-1].summary}", flush=True)
            write_report(report, outcomes, header)
    if "lora" in keys:
        outcomes.append(Outcome("d. LoRA and shared prompts", lora_status(), 0.0, None))
    path = write_report(report, outcomes, header)
    print(path.read_text())
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------- dry run
def plan_lines(keys: list[str], total_limit_s: int) -> list[str]:
    lines = [f"GPU check plan (total limit {total_limit_s} s, stages in this order, each capped by what is left):"]
    for stage in STAGES:
        if stage.key in keys:
            argv = stage.argv(Path("$REPORT"), Path("$SCRATCH"))
            lines.append(f"  {stage.key:<8} limit {stage.limit_s:>3} s  {stage.title}\n"
                         f"           python {' '.join(argv)}")
    if "lora" in keys:
        lines.append(f"  lora     {lora_status()}")
    manifest = bundle_manifest()
    if manifest:
        lines.append(f"bundle {os.environ['FASTGRPO_GPU_BUNDLE']}: {len(manifest['wheels'])} wheels, "
                     f"{manifest['total_bytes'] / 2**20:.2f} MiB of {manifest['limit_bytes'] / 2**20:.0f} MiB, "
                     f"for Python {manifest['python']}")
        lines += [f"  {w['file']}: {w['reason']}" for w in manifest["wheels"]]
    return lines


def bundle_manifest() -> dict:
    """The manifest of the bundle the offline script installed (FASTGRPO_GPU_BUNDLE), else {}."""
    bundle = os.environ.get("FASTGRPO_GPU_BUNDLE")
    path = Path(bundle) / "manifest.json" if bundle else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _check(label: str, fn: Callable[[], str]) -> tuple[str, str]:
    try:
        return label, f"ok ({fn()})"
    except BaseException as exc:  # SystemExit too: a stage script's import may exit
        return label, f"FAILED: {exc!r}"


def _load_script(name: str) -> str:
    """Import a stage script as a module (its main() does not run): its imports are the stage's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), Path("scripts") / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(spec.origin)


def _grade() -> str:
    from math_verify import parse, verify

    if not verify(parse("$\\frac{1}{2}$"), parse("$0.5$")):
        raise AssertionError("1/2 graded unequal to 0.5")
    return "1/2 = 0.5"


def _default_tokenizer() -> str:
    from fastgrpo.model import load_tokenizer

    return f"{len(load_tokenizer('default'))} tokens"


def dry_run_checks() -> list[tuple[str, str]]:
    """(check, "ok ..." or "FAILED ..."): the imports of every stage and of the stage scripts, a
    graded answer, the default tokenizer when the bundle carries it, and pytest's collection of
    stage a (in a process of its own: pytest loads its plugins from the bundle)."""
    import importlib

    results = [_check(f"import {name}", lambda name=name: getattr(importlib.import_module(name), "__file__", "?"))
               for name in STAGE_IMPORTS]
    results += [_check(f"import scripts/{script}", lambda script=script: _load_script(script))
                for script in ("gpu_kernel_bench.py", "gpu_grpo_check.py")]
    results.append(_check("math-verify grades an answer", _grade))
    manifest = bundle_manifest()
    if any(f["file"].startswith("fastgrpo-cache/") for f in manifest.get("files", ())):
        results.append(_check("the default tokenizer loads from the bundle's cache", _default_tokenizer))
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    if manifest.get("python", "") != f"{sys.version_info.major}.{sys.version_info.minor}":
        # A dry run on another Python: hypothesis's wheel holds a native module for the bundle's Python only.
        collect += ["-p", "no:hypothesispytest"]
    proc = subprocess.run([*collect, "tests/kernels/test_triton_gpu.py"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONSAFEPATH": "1"}, timeout=300)
    output = (proc.stdout + proc.stderr).strip()
    results.append(("pytest collects stage a", f"ok ({output.splitlines()[-1]})" if proc.returncode == 0 else
                    f"FAILED (exit {proc.returncode}): {output[-1500:]}"))
    return results


def dry_run(report: Path, keys: list[str], total_limit_s: int) -> int:
    lines = plan_lines(keys, total_limit_s)
    import fastgrpo
    import fastgrpo.kernels

    lines.append(f"fastgrpo from {Path(fastgrpo.__file__).parent}, fastgrpo.kernels from "
                 f"{Path(fastgrpo.kernels.__file__).parent}")
    checks = dry_run_checks()
    lines += [f"  {'ok    ' if result.startswith('ok') else 'FAILED'} {label}: {result}" for label, result in checks]
    failed = [label for label, result in checks if not result.startswith("ok")]
    lines.append(f"dry run: {len(checks) - len(failed)} of {len(checks)} checks passed"
                 + (f"; failed: {', '.join(failed)}" if failed else ""))
    report.mkdir(parents=True, exist_ok=True)
    (report / "dry-run.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgrpo.perf.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--report-dir", type=Path, default=Path("gpu_report"), help="where report.md and the logs go")
    parser.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGE_KEYS)} (default all)")
    parser.add_argument("--total-limit-s", type=int, default=TOTAL_LIMIT_S,
                        help=f"time for all stages together, install included (default {TOTAL_LIMIT_S})")
    parser.add_argument("--spent-s", type=float, default=None,
                        help="seconds already spent installing the bundle (the offline script passes it)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check the imports; no GPU needed")
    args = parser.parse_args(argv)
    if not (Path("tests/kernels").is_dir() and Path("scripts").is_dir()):
        raise SystemExit(f"run the GPU check from the repository root (the stages run tests/ and scripts/); "
                         f"the current folder is {Path.cwd()}")
    keys = selected_stages(args.stages.split(",") if args.stages else None)
    if args.dry_run:
        return dry_run(args.report_dir, keys, args.total_limit_s)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine, or --dry-run to check the set-up. "
              "What runs without one: make test (Triton interpreter, AOT compile for sm_80/86/90).")
        return 2
    return run_all(args.report_dir, keys, args.total_limit_s, args.spent_s)


if __name__ == "__main__":
    sys.exit(main())
