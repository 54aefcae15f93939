"""``fastgrpo profile``: where a GRPO step's time and memory go, and how fast it runs.

    fastgrpo profile [--config FILE] [--steps N] [--out DIR] [--trace] [key=value ...]

Runs N steps of the real trainer (``fastgrpo.trainer.train``, held-out evaluation off unless an
override turns it on) with a PhaseTimer whose memory probe records every phase's peak, and writes:

    DIR/profile.json   per step: seconds and peak memory per phase, tokens, tokens/s, FLOPs, MFU;
                       a summary (means over the steps after the first, which carries warm-up)
    DIR/profile.png    stacked seconds per phase per step | tokens/s per step | peak memory per phase and step
    DIR/trace.json     with --trace: a torch.profiler chrome trace of the last step (the profiler slows
                       it, so the summary leaves it out when other steps after the first exist), phases
                       as ``phase::<name>`` ranges; DIR/trace_ops.txt its op table.
                       ``python profiling/step_trace.py DIR/trace.json`` breaks it down by phase and op.
    DIR/run/           the training run's metrics.jsonl (its checkpoint is deleted: a profile is not a run)

Memory per phase: on a GPU, ``torch.cuda.max_memory_allocated`` after a reset at the phase's start
(tensors of torch's caching allocator); on a CPU, the process RSS sampled every 2 ms by a background
thread (everything the process holds: weights, vLLM's KV cache, pages the allocator kept).

Model FLOPs, from the model's config.json (N: the decoder's matmul weights; V x H: the LM head):
    train      6 N T + 6 V H Tc per optimizer pass: T packed tokens (prompt + completion) through
               forward (2 FLOPs per weight and token) and backward (4), and the fused loss's three
               [Tc, H] x [H, V] products (logits, grad_hidden, grad_weight) over the Tc scored tokens
    log-probs  2 N T + 2 V H Tc per reference / old-policy forward that runs
    rollout    2 (N + V H) Tg for Tg generated tokens (decode only: prompt prefill is not counted)
Attention's score and value products (4 x layers x q_dim x context per token) are not counted: at
the default run's ~150-token sequences they add a few percent. MFU = FLOPs / seconds / peak, the
peak from fastgrpo.perf.plan.GPUS (dense bf16 tensor-core FLOP/s) on a GPU, and on a CPU the fp32 matmul
rate measured before and after the run (the better of two bests of 10 1024^3 products on torch's
threads: on a shared machine the rate moves, and the higher one gives the more modest MFU).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from fastgrpo.phases import PHASES

# Phases whose forward passes are counted (tokens entering an embedding) for the FLOPs.
FORWARD_PHASES = ("reference", "old_logprobs", "forward")
TRAIN_PHASES = ("forward", "backward", "optimizer")
RSS_INTERVAL_S = 0.002
TRACE_RANGE_PREFIX = "phase::"


# --------------------------------------------------------------------------------------------------
# Memory probes: ``probe(phase, start) -> peak bytes at the end`` (fastgrpo.phases.PhaseTimer)
# --------------------------------------------------------------------------------------------------
class RssPeakProbe:
    """CPU: the largest process RSS (bytes) seen during each phase, sampled by a daemon thread every
    ``interval_s`` and once more when the phase ends. A phase shorter than the interval may miss a
    short-lived peak; a 256 MB tensor held for 50 ms is seen (tests/test_profile.py)."""

    def __init__(self, interval_s: float = RSS_INTERVAL_S):
        import psutil

        self.interval_s = interval_s
        self._process = psutil.Process()
        self._lock = threading.Lock()
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastgrpo-rss-probe", daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        return self._process.memory_info().rss

    def _sample(self) -> None:
        rss = self._rss()
        with self._lock:
            self._peak = max(self._peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __call__(self, name: str, start: bool) -> int | None:
        if start:
            rss = self._rss()
            with self._lock:
                self._peak = rss
            return None
        self._sample()
        with self._lock:
            return self._peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class CudaPeakProbe:
    """GPU: ``torch.cuda.max_memory_allocated()`` (bytes) since a reset at the phase's start."""

    def __call__(self, name: str, start: bool) -> int | None:
        import torch

        if start:
            torch.cuda.reset_peak_memory_stats()
            return None
        return torch.cuda.max_memory_allocated()

    def close(self) -> None:
        pass


class PhaseRecorder:
    """The memory probe handed to PhaseTimer. Around the inner probe it keeps one record per step (a
    step starts with the first phase after a "sync" ends, so several rollout rounds stay one step):
    peak bytes per phase, and the tokens entering an ``nn.Embedding`` during FORWARD_PHASES (a global
    forward pre-hook that exists only while such a phase runs). With ``trace_path`` it runs
    torch.profiler over step ``trace_step`` and marks every phase as a ``phase::<name>`` range."""

    def __init__(self, probe: Callable[[str, bool], int | None], *, trace_path: Path | None = None,
                 trace_step: int = 1, cuda: bool = False):
        self.probe = probe
        self.steps: list[dict[str, dict[str, int]]] = []
        self.trace_path, self.trace_step, self.cuda = trace_path, trace_step, cuda
        self._step_open = False
        self._phase: str | None = None
        self._hook = None
        self._profiler = None
        self._range = None

    def _count_tokens(self, module, args) -> None:
        import torch

        if isinstance(module, torch.nn.Embedding) and args and torch.is_tensor(args[0]):
            tokens = self.steps[-1]["tokens"]
            tokens[self._phase] = tokens.get(self._phase, 0) + args[0].numel()

    def __call__(self, name: str, start: bool) -> int | None:
        import torch

        if start:
            if not self._step_open:
                self.steps.append({"peak_bytes": {}, "tokens": {}})
                self._step_open = True
                if self.trace_path is not None and len(self.steps) == self.trace_step:
                    self.steps[-1]["traced"] = True
                    self._start_trace()
            self._phase = name
            if name in FORWARD_PHASES:
                self._hook = torch.nn.modules.module.register_module_forward_pre_hook(self._count_tokens)
            if self._profiler is not None:
                self._range = torch.profiler.record_function(TRACE_RANGE_PREFIX + name)
                self._range.__enter__()
            self.probe(name, True)
            return None
        peak = self.probe(name, False)
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if peak is not None:
            peaks = self.steps[-1]["peak_bytes"]
            peaks[name] = max(peaks.get(name, 0), int(peak))
        if name == "sync":
            self._step_open = False
            if self._profiler is not None:
                self._stop_trace()
        return peak

    def _start_trace(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._profiler = profile(activities=activities, record_shapes=True)
        self._profiler.start()

    def _stop_trace(self) -> None:
        prof, self._profiler = self._profiler, None
        prof.stop()
        prof.export_chrome_trace(str(self.trace_path))
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        self.trace_path.with_name("trace_ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))

    def close(self) -> None:
        """Stops a trace that a failed run left running (nothing is written) and the probe."""
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None
        if self._hook is not None:
            self._hook.remove()
        getattr(self.probe, "close", lambda: None)()


# --------------------------------------------------------------------------------------------------
# FLOPs and the device's peak
# --------------------------------------------------------------------------------------------------
def matmul_params(shape) -> int:
    """N: the decoder layers' linear weights (q, k, v, o and the three SwiGLU projections)."""
    return shape.layers * (2 * shape.hidden * (shape.q_dim + shape.kv_dim) + 3 * shape.hidden * shape.intermediate)


def step_flops(shape, *, packed_tokens: dict[str, int], scored_tokens: int, generated_tokens: int,
               passes: int = 1) -> dict[str, float]:
    """Model FLOPs of one step (formulas in the module docstring). packed_tokens: tokens through the
    model per phase (FORWARD_PHASES; "forward" summed over the ``passes`` optimizer passes);
    scored_tokens: completion tokens of the batch (Tc); generated_tokens: Tg."""
    n, head = matmul_params(shape), shape.vocab * shape.hidden
    logprobs = sum(2 * n * packed_tokens.get(p, 0) + (2 * head * scored_tokens if packed_tokens.get(p) else 0)
                   for p in ("reference", "old_logprobs"))
    return {"rollout": 2.0 * (n + head) * generated_tokens, "logprobs": float(logprobs),
            "train": 6.0 * n * packed_tokens.get("forward", 0) + 6.0 * head * scored_tokens * passes}


def measure_cpu_matmul_flops(size: int = 1024, repeats: int = 10) -> float:
    """The CPU's fp32 matmul rate (FLOP/s): best of ``repeats`` [size x size] @ [size x size] products
    on torch's current threads, after one warm-up product."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def gpu_key(device_name: str, memory_gib: float | None = None) -> str | None:
    """The fastgrpo.perf.plan.GPUS key of a CUDA device name ("NVIDIA A40", "NVIDIA H100 80GB HBM3",
    "NVIDIA A100-SXM4-40GB", ...), the one nearest ``memory_gib`` when several share the model; None
    for an unknown GPU. Words are matched whole (an "L40S" is not an "L4")."""
    from fastgrpo.perf.plan import GPUS

    words = re.findall(r"[a-z0-9]+", device_name.lower())
    tokens = set(words) | {a + b for a, b in zip(words, words[1:])}
    matches = [key for key in GPUS if key.split("-")[0] in tokens]
    if not matches:
        return None
    if memory_gib is None:
        return matches[0]
    return min(matches, key=lambda key: abs(GPUS[key].memory_gib - memory_gib))


def device_peak_flops(device, override: float | None = None) -> dict[str, Any]:
    """{"flops_per_s": peak or None, "source": where it came from, "device": a description}."""
    import torch

    if device.type == "cuda":
        from fastgrpo.perf.plan import GPUS

        props = torch.cuda.get_device_properties(device)
        name = props.name
        key = gpu_key(name, props.total_memory / 2**30)
        if override:
            return {"flops_per_s": override, "source": "--peak-tflops", "device": name}
        if key is None:
            return {"flops_per_s": None, "source": f"{name!r} is not in fastgrpo.perf.plan.GPUS: pass --peak-tflops",
                    "device": name}
        return {"flops_per_s": GPUS[key].bf16_tflops * 1e12, "source": f"datasheet dense bf16 ({key})", "device": name}
    threads = torch.get_num_threads()
    desc = f"CPU, {threads} torch threads"
    if override:
        return {"flops_per_s": override, "source": "--peak-tflops", "device": desc}
    return {"flops_per_s": measure_cpu_matmul_flops(), "device": desc,
            "source": "measured fp32 matmul, 1024^3, best before/after the run"}


# --------------------------------------------------------------------------------------------------
# The profile
# --------------------------------------------------------------------------------------------------
def _ratio(num: float, den: float) -> float | None:
    return num / den if den and den > 0 else None


def _step_record(metrics: dict, recorded: dict, shape, peak: float | None, passes: int) -> dict[str, Any]:
    phase_s = {p: float(metrics.get(f"{p}_s", 0.0)) for p in PHASES}
    completion = int(metrics["completion_tokens"])
    tokens = recorded["tokens"]
    train_s = sum(phase_s[p] for p in TRAIN_PHASES)
    record = {
        "step": metrics["step"], "phase_s": phase_s, "step_s": metrics["step_s"],
        # prompt encoding, packing, engine sleep/wake, logging: the step's time outside the phases
        "other_s": max(0.0, metrics["step_s"] - sum(phase_s.values())), "traced": bool(recorded.get("traced")),
        "completion_tokens": completion, "trained_tokens": tokens.get("forward", 0),
        "generated_tokens_per_s": _ratio(completion, phase_s["rollout"]),
        "trained_tokens_per_s": _ratio(tokens.get("forward", 0), train_s),
        "tokens_per_s": metrics.get("tokens_per_s"),
        "peak_bytes": {p: recorded["peak_bytes"][p] for p in PHASES if p in recorded["peak_bytes"]},
    }
    if shape is not None:
        flops = step_flops(shape, packed_tokens=tokens, scored_tokens=completion, generated_tokens=completion,
                           passes=passes)
        record["flops"] = flops
        if peak:
            record["mfu"] = {"rollout": _ratio(flops["rollout"], phase_s["rollout"] * peak),
                             "train": _ratio(flops["train"], train_s * peak),
                             "step": _ratio(sum(flops.values()), metrics["step_s"] * peak)}
    return record


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(steps: list[dict]) -> dict[str, Any]:
    """Means over the steps after the first (the first carries warm-up: compilation, allocator growth)
    that were not traced, else over the steps after the first, else over the only step; peak memory
    per phase is the maximum over all steps."""
    steady = [s for s in steps[1:] if not s["traced"]] or steps[1:] or steps
    summary: dict[str, Any] = {
        "steps_averaged": [s["step"] for s in steady],
        "phase_s": {p: _mean([s["phase_s"][p] for s in steady]) for p in PHASES},
        "step_s": _mean([s["step_s"] for s in steady]),
        "other_s": _mean([s["other_s"] for s in steady]),
        **{k: _mean([s[k] for s in steady])
           for k in ("generated_tokens_per_s", "trained_tokens_per_s", "tokens_per_s")},
        "peak_bytes": {p: max(s["peak_bytes"][p] for s in steps if p in s["peak_bytes"])
                       for p in PHASES if any(p in s["peak_bytes"] for s in steps)},
    }
    if all("mfu" in s for s in steady):
        summary["mfu"] = {k: _mean([s["mfu"][k] for s in steady]) for k in ("rollout", "train", "step")}
    return summary


def run_profile(cfg, steps: int = 3, out_dir: str | Path = "runs/profile", trace: bool = False,
                peak_flops: float | None = None) -> dict[str, Any]:
    """Run ``steps`` GRPO steps of ``cfg`` (a fastgrpo.config.Config) and write DIR/profile.json and
    DIR/profile.png (and with ``trace`` DIR/trace.json); returns what profile.json holds.
    ``peak_flops``: the device's peak FLOP/s for MFU (default: GPU table, or measured on a CPU)."""
    from fastgrpo.metrics import read_metrics
    from fastgrpo.model import resolve_model_path
    from fastgrpo.phases import PhaseTimer
    from fastgrpo.perf.shapes import model_shape
    from fastgrpo.trainer import pick_device, train

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    out = Path(out_dir)
    run_dir = out / "run"
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # metrics.jsonl appends; this profile starts it anew
    cfg = replace(cfg, train=replace(cfg.train, max_steps=steps),
                  log=replace(cfg.log, output_dir=str(run_dir), checkpoint_every=steps + 1))
    device = pick_device()
    peak = device_peak_flops(device, peak_flops)
    probe = CudaPeakProbe() if device.type == "cuda" else RssPeakProbe()
    recorder = PhaseRecorder(probe, trace_path=out / "trace.json" if trace else None, trace_step=steps,
                             cuda=device.type == "cuda")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        train(cfg, timer=PhaseTimer(device, memory_probe=recorder))
    finally:
        recorder.close()
    wall_s = time.perf_counter() - started
    if device.type != "cuda" and peak_flops is None:
        peak["flops_per_s"] = max(peak["flops_per_s"], measure_cpu_matmul_flops())
    for folder in run_dir.glob("checkpoint-*"):
        shutil.rmtree(folder, ignore_errors=True)

    model_dir = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    try:
        shape = model_shape(model_dir)
    except ValueError as exc:  # a model type the planner does not know: no FLOPs, no MFU
        shape, shape_error = None, str(exc)
    records = [r for r in read_metrics(run_dir) if "eval" not in r]
    if len(records) != len(recorder.steps):
        raise RuntimeError(f"{len(records)} step records in metrics.jsonl but {len(recorder.steps)} timed steps")
    per_step = [_step_record(m, r, shape, peak["flops_per_s"], cfg.train.num_iterations)
                for m, r in zip(records, recorder.steps)]
    result = {
        "model": cfg.model.path, "model_name": model_dir.name, "device": peak["device"],
        "memory": "cuda_max_allocated" if device.type == "cuda" else "cpu_rss",
        "settings": {"prompts_per_step": cfg.rollout.prompts_per_step, "num_generations": cfg.rollout.num_generations,
                     "max_completion_length": cfg.rollout.max_completion_length, "engine": cfg.rollout.engine,
                     "dtype": cfg.model.dtype, "gradient_checkpointing": cfg.model.gradient_checkpointing,
                     "max_tokens_per_microbatch": cfg.train.max_tokens_per_microbatch,
                     "num_iterations": cfg.train.num_iterations},
        "peak_flops_per_s": peak["flops_per_s"], "peak_flops_source": peak["source"],
        "flops_formula": {"train": "6 N T + 6 V H Tc per pass", "logprobs": "2 N T + 2 V H Tc per forward",
                          "rollout": "2 (N + V H) Tg", "attention": "not counted"},
        "matmul_params": matmul_params(shape) if shape else None,
        "lm_head_params": shape.vocab * shape.hidden if shape else None,
        "steps": per_step, "summary": summarize(per_step), "wall_s": wall_s,
        "files": {"json": str(out / "profile.json"), "chart": str(out / "profile.png"),
                  "trace": str(out / "trace.json") if trace else None},
    }
    if shape is None:
        result["flops_note"] = shape_error
    plot_profile(result, out / "profile.png")
    (out / "profile.json").write_text(json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------------------------------
# Output: chart and text
# --------------------------------------------------------------------------------------------------
def plot_profile(result: dict[str, Any], path: str | Path) -> None:
    """Three panels: stacked seconds per phase per step, tokens/s per step, peak memory per phase and step."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("fastgrpo profile draws its chart with matplotlib: pip install 'matplotlib>=3.8'") from exc

    steps = result["steps"]
    x = [s["step"] for s in steps]
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    ax_time, ax_rate, ax_mem = fig.subplots(1, 3)
    bottom = [0.0] * len(steps)
    colors = {p: f"C{i}" for i, p in enumerate(PHASES)}
    for phase in PHASES:
        heights = [s["phase_s"][phase] for s in steps]
        ax_time.bar(x, heights, bottom=bottom, label=phase, color=colors[phase])
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax_time.bar(x, [s["other_s"] for s in steps], bottom=bottom, label="outside phases", color="0.85", hatch="//")
    ax_time.set(title="seconds per phase", xlabel="step" + (" (T: traced)" if any(s["traced"] for s in steps) else ""),
                ylabel="s", xticks=x, xticklabels=[f"{s['step']}{' T' if s['traced'] else ''}" for s in steps])
    ax_time.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    for key, label in (("generated_tokens_per_s", "generated (rollout)"),
                       ("trained_tokens_per_s", "trained (fwd+bwd+opt)"),
                       ("tokens_per_s", "completion tokens / step time")):
        ax_rate.plot(x, [s[key] or 0.0 for s in steps], marker="o", label=label)
    ax_rate.set(title="tokens/s", xlabel="step", xticks=x, ylim=(0, None))
    ax_rate.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    # One line per step across the phases in run order: a memory timeline of each step (the first
    # step's rollout runs before any training memory exists; RSS keeps what the allocator retained).
    names = [p for p in PHASES if any(p in s["peak_bytes"] for s in steps)]
    for s in steps:
        ax_mem.plot(range(len(names)), [s["peak_bytes"].get(p, float("nan")) / 2**30 for p in names], marker="o",
                    label=f"step {s['step']}")
    what = "process RSS" if result["memory"] == "cpu_rss" else "CUDA max allocated"
    ax_mem.set(title=f"peak memory per phase ({what})", ylabel="GiB", ylim=(0, None), xticks=range(len(names)))
    ax_mem.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax_mem.legend(fontsize=7)
    summary = result["summary"]
    mfu = summary.get("mfu") or {}
    fmt = lambda v: f"{v:.1%}" if v is not None else "n/a"
    name = result.get("model_name") or Path(str(result["model"])).name
    fig.suptitle(f"{name} on {result['device']}: {summary['step_s']:.1f} s/step, "
                 f"MFU train {fmt(mfu.get('train'))}, rollout {fmt(mfu.get('rollout'))}, step {fmt(mfu.get('step'))}")
    fig.savefig(path, dpi=100)


def format_summary(result: dict[str, Any]) -> str:
    """A table of mean seconds and peak memory per phase, then tokens/s and MFU."""
    s = result["summary"]
    step_s = s["step_s"] or 0.0
    unit = "RSS" if result["memory"] == "cpu_rss" else "CUDA"
    name = result.get("model_name") or result["model"]
    lines = [f"{name} on {result['device']}, mean of steps {s['steps_averaged']}", "",
             f"| phase | s | share | peak {unit} MiB |", "|---|---:|---:|---:|"]
    share = lambda sec: f"{sec / step_s:.0%}" if step_s else ""
    for p in PHASES:
        sec = s["phase_s"][p] or 0.0
        peak = s["peak_bytes"].get(p)
        lines.append(f"| {p} | {sec:.2f} | {share(sec)} | {'' if peak is None else f'{peak / 2**20:,.0f}'} |")
    other = s["other_s"] or 0.0
    lines += [f"| outside phases | {other:.2f} | {share(other)} | |", f"| step | {step_s:.2f} | | |"]
    lines.append("")
    rate = lambda v: "n/a" if v is None else f"{v:,.0f}"
    lines.append(f"generated tokens/s {rate(s['generated_tokens_per_s'])} (rollout) | trained tokens/s "
                 f"{rate(s['trained_tokens_per_s'])} (forward+backward+optimizer) | completion tokens/s over the step "
                 f"{rate(s['tokens_per_s'])}")
    mfu = s.get("mfu")
    if mfu:
        pct = lambda v: "n/a" if v is None else f"{v:.2%}"
        lines.append(f"MFU train {pct(mfu['train'])} | rollout {pct(mfu['rollout'])} | step {pct(mfu['step'])} "
                     f"(peak {result['peak_flops_per_s'] / 1e12:.3g} TFLOP/s: {result['peak_flops_source']})")
    files = result["files"]
    lines.append("wrote " + ", ".join(v for v in (files["json"], files["chart"], files["trace"]) if v))
    return "\n".join(lines)


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fastgrpo profile``."""
    parser.add_argument("--config", help="YAML recipe (overrides only; see configs/)")
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps to run (default 3; the first is warm-up)")
    parser.add_argument("--out", default="runs/profile", help="output folder (default runs/profile)")
    parser.add_argument("--trace", action="store_true", help="also write a torch.profiler chrome trace of one step")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: the GPU "
                        "table in fastgrpo.perf.plan, or the CPU's measured fp32 matmul rate)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides; held-out evaluation is off unless eval.before_and_after=true")


def run_profile_command(args: argparse.Namespace) -> int:
    """Profile and print the summary; 2 on a bad argument."""
    import sys

    from fastgrpo.config import load_config

    if args.steps < 1:
        print(f"fastgrpo profile: error: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        print(f"fastgrpo profile: error: --peak-tflops must be > 0, got {args.peak_tflops}", file=sys.stderr)
        return 2
    cfg = load_config(args.config, ["eval.before_and_after=false", *args.overrides])
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    print(format_summary(run_profile(cfg, args.steps, args.out, trace=args.trace, peak_flops=peak)))
    return 0
