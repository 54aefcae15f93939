"""Stage b of the GPU check: fwd+bwd of per-token log-probs + the GRPO loss on CUDA (bf16), the four
implementations of benchmarks/kernel_impls.py (fastgrpo's fused loss, naive, Liger's
LigerFusedLinearGRPOLoss, the three bare matmuls), fastgrpo once per Triton backward form, at SmolLM2's
head, Qwen2-1.5B's head (512 tokens) and Qwen2-1.5B's head at the R1 recipe's micro-batch
(train.max_tokens_per_microbatch of configs/r1-distill-qwen-1.5b-a40.yaml: 16,384 tokens). Beside
each measured time, the roofline model's prediction; after the runs, the registers, spills and shared
memory of every Triton binary the JIT built.

    python scripts/gpu_kernel_bench.py --out DIR [--rounds 5] [--shapes smollm2-135m,...]

Writes DIR/bench.jsonl (one line per measurement, appended as soon as it is taken, so a stage cut
short by its time limit keeps what it measured) and DIR/bench.md (the tables).

Peak memory is torch.cuda.max_memory_allocated above the bytes allocated before the call, in this
process: CUDA's allocator counts exactly the tensors alive, so one implementation's freed tensors
cannot hide another's (the fresh process per implementation of kernel_impls.py is for CPU RSS).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import kernel_impls as ki  # noqa: E402  (benchmarks/ is not a package)

from fastgrpo.kernels import roofline  # noqa: E402

R1_RECIPE = REPO / "configs" / "r1-distill-qwen-1.5b-a40.yaml"
R1_PRESET = "deepseek-r1-distill-qwen-1.5b"
BACKWARD_ENV = "FASTGRPO_LOGPROB_BWD"  # read by the launcher at every call (logprob_triton.choose_backward_kernel)
# (label, kernel_impls implementation, forced Triton backward or None for the launcher's pick)
VARIANTS = (("naive", "naive", None), ("fastgrpo", "fastgrpo", None), ("fastgrpo two-kernel", "fastgrpo", "two-kernel"),
            ("fastgrpo atomic", "fastgrpo", "atomic"), ("liger", "liger", None), ("matmul_floor", "matmul_floor", None))


def r1_microbatch_shape() -> tuple[str, tuple[int, int, int, int]]:
    """(name, (N, H, V, sequences)): the R1 recipe's micro-batch through its model's LM head."""
    from fastgrpo.config import load_config
    from fastgrpo.perf.shapes import PRESETS

    tokens = load_config(R1_RECIPE).train.max_tokens_per_microbatch
    shape = PRESETS[R1_PRESET]
    return "r1-microbatch", (tokens, shape.hidden, shape.vocab, 16)  # 16 sequences: Liger's [B, T, H]


def roofline_shape(name: str, n: int, h: int, v: int) -> roofline.Shape:
    same = [s for s in roofline.SHAPES.values() if (s.N, s.H, s.V) == (n, h, v)]
    return same[0] if same else roofline.Shape(name, N=n, H=h, V=v)


def roofline_gpu(device_name: str) -> tuple[roofline.GPU, str]:
    """The roofline's GPU for this device, else H100 (the nearest: an H200 has H100's compute and
    1.4x its bandwidth), with a note saying so."""
    gpu = roofline.gpu_for_device_name(device_name)
    if gpu is not None:
        return gpu, ""
    return roofline.GPUS["H100"], f"{device_name} is not in kernels/roofline.py's GPUS: predictions are H100's"


def measure(impl: str, inputs: dict, rounds: int, dev: torch.device) -> dict:
    """Peak memory above the inputs of one call, then the best and median of `rounds` timed calls."""
    ki.warm_up(impl, dev)
    step = ki.make_step(impl, inputs)
    step()  # compiles anything specific to this shape (Liger's torch.compile) outside the timed calls
    ki.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    loss = step()
    ki.synchronize(dev)
    peak_mb = (torch.cuda.max_memory_allocated(dev) - base) / 1e6
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        step()
        ki.synchronize(dev)
        times.append(time.perf_counter() - started)
    return {"best_ms": min(times) * 1e3, "median_ms": statistics.median(times) * 1e3, "peak_extra_mb": peak_mb,
            "loss": None if loss is None else loss.item()}


def triton_binaries() -> list[dict]:
    """Registers, spills and shared memory of each kernel binary Triton's JIT built in this process."""
    import triton

    from fastgrpo.kernels import grpo_loss_triton, logprob_triton

    rows = []
    for module in (logprob_triton, grpo_loss_triton):
        for name, fn in sorted(vars(module).items()):
            if not isinstance(fn, triton.runtime.JITFunction):
                continue
            caches = getattr(fn, "device_caches", None)  # Triton >= 3.2: device -> (kernels, ...)
            per_device = [c[0] for c in caches.values()] if caches else list(getattr(fn, "cache", {}).values())
            for kernels in per_device:
                for kernel in kernels.values():
                    meta = kernel.metadata
                    rows.append({"kernel": name, "registers": getattr(kernel, "n_regs", None),
                                 "spills": getattr(kernel, "n_spills", None), "shared_bytes": getattr(meta, "shared", None),
                                 "warps": getattr(meta, "num_warps", None), "stages": getattr(meta, "num_stages", None)})
    return rows


def format_tables(records: list[dict], binaries: list[dict], note: str) -> str:
    lines = ["| shape (N x H x V) | implementation | best ms | median ms | x floor | predicted ms | peak extra MB "
             "| x naive memory | loss vs naive |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for shape in dict.fromkeys(r["shape"] for r in records):
        rows = {r["label"]: r for r in records if r["shape"] == shape}
        floor, naive = (r if r is not None and "error" not in r else None
                        for r in (rows.get("matmul_floor"), rows.get("naive")))
        for label, r in rows.items():
            if "error" in r:
                lines.append(f"| {shape} {r['N']} x {r['H']} x {r['V']} | {label} | failed: {r['error'][:200]} "
                             "| | | | | | |")
                continue
            x_floor = f"{r['best_ms'] / floor['best_ms']:.2f}" if floor else "-"
            x_mem = f"{r['peak_extra_mb'] / naive['peak_extra_mb']:.2f}" if naive and naive["peak_extra_mb"] else "-"
            predicted = "-" if r.get("predicted_ms") is None else f"{r['predicted_ms']:.3g}"
            lines.append(f"| {shape} {r['N']} x {r['H']} x {r['V']} | {label} | {r['best_ms']:.3g} | {r['median_ms']:.3g} "
                         f"| {x_floor} | {predicted} | {r['peak_extra_mb']:.0f} | {x_mem} | {r.get('loss_check', '-')} |")
    lines += ["", "predicted: kernels/roofline.py (fastgrpo: the forward + the backward named or picked; naive: "
              "materialized logits); bf16." + (f" {note}." if note else "")]
    if binaries:
        lines += ["", "Triton binaries built by the JIT in this run (compile-time resources of the code timed above):", "",
                  "| kernel | registers/thread | spills | shared KB | warps | stages |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {b['kernel']} | {b['registers']} | {b['spills']} | "
                  f"{'-' if b['shared_bytes'] is None else round(b['shared_bytes'] / 1024, 1)} | {b['warps']} | {b['stages']} |"
                  for b in binaries]
    return "\n".join(lines)


def run(out: Path, rounds: int, shape_names: list[str] | None) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_kernel_bench.py needs a CUDA device")
    from fastgrpo.kernels.logprob_triton import choose_backward_kernel

    dev = torch.device("cuda")
    name, r1 = r1_microbatch_shape()
    shapes = {name: r1, **ki.SHAPES}  # the R1 micro-batch first: the training shape matters most
    unknown = sorted(set(shape_names or ()) - set(shapes))
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; valid: {', '.join(shapes)}")
    gpu, note = roofline_gpu(torch.cuda.get_device_name(dev))
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.jsonl"
    records = []
    for shape in shape_names or shapes:
        n, h, v, seqs = shapes[shape]
        inputs = ki.build_inputs(n, h, v, seqs, dev)
        predicted = roofline.predict_logprob(roofline_shape(shape, n, h, v), gpu)
        picked = choose_backward_kernel(n, h, v, ki.dtype_for(dev), dev, None)
        for label, impl, backward in VARIANTS:
            os.environ.pop(BACKWARD_ENV, None)
            if backward:
                os.environ[BACKWARD_ENV] = backward
            print(f"{shape} {label} ...", flush=True)
            record = {"shape": shape, "label": label, "impl": impl,
                      "backward": backward or (picked if impl == "fastgrpo" else None), "N": n, "H": h, "V": v,
                      "device": torch.cuda.get_device_name(dev), "roofline_gpu": gpu.name}
            try:
                record.update(measure(impl, inputs, rounds, dev))
            except Exception as exc:  # one implementation failing (e.g. Liger vs this transformers) costs only its row
                record["error"] = repr(exc)[:500]
                print(f"{shape} {label} failed: {exc!r}", file=sys.stderr, flush=True)
                torch.cuda.empty_cache()
            key = record["backward"] if impl == "fastgrpo" else ("naive" if impl == "naive" else None)
            record["predicted_ms"] = predicted[key].seconds * 1e3 if key else None
            naive = [r["loss"] for r in records if r["shape"] == shape and r["impl"] == "naive" and "error" not in r]
            if record.get("loss") is not None and naive:
                record["loss_check"] = "ok" if abs(record["loss"] - naive[0]) <= 1e-2 * abs(naive[0]) + 1e-6 else (
                    f"DIFFERS: {record['loss']:.6g} vs {naive[0]:.6g}")
            records.append(record)
            with open(log, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            (out / "bench.md").write_text(format_tables(records, [], note) + "\n")
        os.environ.pop(BACKWARD_ENV, None)
        del inputs
        torch.cuda.empty_cache()
    try:
        binaries = triton_binaries()
    except Exception as exc:  # Triton's cache layout changes between versions: keep the timings regardless
        print(f"could not read the Triton binaries' resources: {exc!r}", file=sys.stderr)
        binaries = []
    (out / "triton_binaries.json").write_text(json.dumps(binaries, indent=1))
    table = format_tables(records, binaries, note)
    (out / "bench.md").write_text(table + "\n")
    print(table)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per implementation and shape (default 5)")
    parser.add_argument("--shapes", help="comma-separated subset of the shapes (default all)")
    args = parser.parse_args(argv)
    records = run(args.out, args.rounds, args.shapes.split(",") if args.shapes else None)
    bad = [f"{r['shape']} {r['label']}" for r in records if r.get("loss_check", "ok") != "ok" or "error" in r]
    if bad:
        print(f"failed or losses differ from naive's: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
