"""Resource and roofline report of the Triton kernels, made with no GPU.

    python profiling/kernel_report.py [--markdown] [--no-compile] [--specialization NAME] [--summary] [--terms]

1. Resources: every kernel variant the dispatchers can launch, compiled ahead of time for sm_80
   (A100), sm_86 (A40) and sm_90 (H100) with each argument specialization the JIT can build for it
   (fastgrpo.kernels.aot.SPECIALIZATIONS): registers per thread, spilled bytes, shared memory per
   block, and the warps per SM that these allow (fastgrpo.kernels.aot.occupancy).
2. Roofline: FLOPs and DRAM bytes of per-token log-probs, forward + backward, at the benchmark
   shapes, for the fused kernels (with each of the two Triton backwards, and the one the launcher
   picks) and for the naive torch expression (materialized fp32 logits), and the time: per kernel
   max(FLOPs / peak bf16, bytes / bandwidth), summed, on A40, A100 and H100. Predicted, not measured.

The model (what is counted, what is assumed) is documented in fastgrpo.kernels.roofline; --terms
prints every byte term. Exit status 1 when a kernel fails to compile, spills or exceeds its target's
shared memory.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

from fastgrpo.kernels import aot, roofline

TARGET_LABELS = {80: "sm_80 (A100)", 86: "sm_86 (A40)", 90: "sm_90 (H100)"}


def render(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    """A markdown table, or columns aligned with spaces."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [headers, *rows])


def _resource_cell(result) -> str:
    if isinstance(result, Exception):
        return "COMPILE ERROR"
    occ = aot.occupancy(result, aot.TARGETS[result.cc])
    spill = result.n_spills * 4
    cell = f"{result.n_regs} / {spill} / {result.shared_bytes / 1024:.0f} / {occ.warps_per_sm}"
    return cell + (" **!**" if aot.resource_problems(result) else "")


def resource_table(results: dict, markdown: bool) -> str:
    """results: compile_many's {(variant, specialization, cc): CompiledInfo or failure}."""
    headers = ["kernel", "dtype", "config", "specialization"] + [TARGET_LABELS[cc] for cc in aot.TARGETS]
    cases = list(dict.fromkeys((v, spec) for v, spec, _ in results))
    rows = [[v.name, v.dtype, aot.config_label(v.config), spec]
            + [_resource_cell(results[(v, spec, cc)]) for cc in aot.TARGETS] for v, spec in cases]
    return render(headers, rows, markdown)


def is_summarized(variant) -> bool:
    """A bf16 log-prob kernel with every flag on (entropy, and the weight gradient): its largest form."""
    return variant.dtype == "bf16" and variant.name.startswith("logprob_") and all(
        x for x in variant.config.values() if isinstance(x, bool))


def summary_table(results: dict, markdown: bool) -> str:
    """The README's table: the bf16 log-prob kernels with every flag on (their largest variants),
    one row per tile table, each cell the worst case over the specializations it is compiled with:
    max registers / max shared KB / min resident warps per SM, "SPILL" if any spilled."""
    largest = [v for v in dict.fromkeys(v for v, _, _ in results) if is_summarized(v)]
    headers = ["kernel", "launches", "tiles (N x V x H, warps, stages)"] + [TARGET_LABELS[cc] for cc in aot.TARGETS]
    rows = []
    for v in largest:
        tiles = aot.config_label({k: x for k, x in v.config.items() if not isinstance(x, bool)})
        row = [v.name.removeprefix("logprob_"), "aligned" if v.aligned else "other", tiles]
        for cc in aot.TARGETS:
            infos = [results[(v, spec, cc)] for spec in v.specializations if (v, spec, cc) in results]
            if any(isinstance(i, Exception) for i in infos):
                row.append("COMPILE ERROR")
                continue
            warps = min(aot.occupancy(i, aot.TARGETS[cc]).warps_per_sm for i in infos)
            cell = f"{max(i.n_regs for i in infos)} / {max(i.shared_bytes for i in infos) / 1024:.0f} / {warps}"
            row.append(cell + (" SPILL" if any(i.n_spills or i.spill_load_bytes for i in infos) else ""))
        rows.append(row)
    return render(headers, rows, markdown)


def roofline_table(markdown: bool) -> str:
    headers = ["shape (N x H x V)", "GPU", "fused GFLOP", "fused GB", "fused ms (bound; backward picked)",
               "with two-kernel bwd ms", "with atomic bwd ms", "naive GFLOP", "naive GB", "naive ms",
               "naive / fused"]
    rows = []
    for shape in roofline.SHAPES.values():
        for gpu in roofline.GPUS.values():
            pred = roofline.predict_logprob(shape, gpu)
            fused, naive = pred["fused"], pred["naive"]
            rows.append([
                f"{shape.name} ({shape.N} x {shape.H} x {shape.V})", gpu.name,
                f"{fused.flops / 1e9:,.0f}", f"{fused.bytes / 1e9:.2f}",
                f"{fused.seconds * 1e3:.2f} ({fused.bound}; {roofline.choose_backward(shape, gpu)})",
                f"{pred['two-kernel'].seconds * 1e3:.2f}", f"{pred['atomic'].seconds * 1e3:.2f}",
                f"{naive.flops / 1e9:,.0f}", f"{naive.bytes / 1e9:.2f}",
                f"{naive.seconds * 1e3:.2f} ({naive.bound})", f"{naive.seconds / fused.seconds:.1f}x",
            ])
    return render(headers, rows, markdown)


def byte_terms(markdown: bool) -> str:
    out = []
    gpu = roofline.GPUS["H100"]
    for shape in roofline.SHAPES.values():
        for backward in roofline.BACKWARDS:
            kernels = roofline.fused_kernels(shape, gpu, backward=backward)
            rows = [[k.name, name, f"{k.flops / 1e9:,.1f}" if i == 0 else "", f"{nbytes / 1e9:.3f}"]
                    for k in kernels for i, (name, nbytes) in enumerate(k.terms)]
            rows.append(["total", "", f"{sum(k.flops for k in kernels) / 1e9:,.1f}",
                         f"{sum(k.bytes for k in kernels) / 1e9:.3f}"])
            out.append(f"fused with the {backward} backward, {shape.name}, L2 of the {gpu.name}:\n\n"
                       + render(["kernel", "term", "GFLOP", "GB"], rows, markdown))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--no-compile", action="store_true", help="skip the compilation: roofline only")
    parser.add_argument("--specialization", choices=tuple(aot.SPECIALIZATIONS), default=None,
                        help="only this argument specialization (default: each variant with every one it "
                             "can be launched with)")
    parser.add_argument("--summary", action="store_true",
                        help="one row per bf16 log-prob kernel and tile table, worst case over specializations "
                             "(the README's table) instead of every variant")
    parser.add_argument("--terms", action="store_true", help="also print every byte term of the roofline")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU cores)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

    sections = []
    problems = 0
    if not args.no_compile:
        variants = [v for v in aot.iter_kernel_variants() if is_summarized(v) or not args.summary]
        start = time.perf_counter()
        specializations = None if args.specialization is None else (args.specialization,)
        results = aot.compile_many(variants, specializations=specializations, workers=args.workers)
        seconds = time.perf_counter() - start
        problems = sum(isinstance(r, Exception) or bool(aot.resource_problems(r)) for r in results.values())
        kinds = "; ".join(f"{name}: {what} divisible by 16" for name, what in aot.SPECIALIZATIONS.items()
                          if specializations is None or name in specializations)
        if args.summary:
            sections.append(
                f"Kernel resources, bf16 with every flag on, worst case over the specializations (compiled ahead "
                f"of time in {seconds:.0f} s). Each cell: registers per thread / shared memory KB per block / "
                f"resident warps per SM.\n\n" + summary_table(results, args.markdown))
        else:
            sections.append(
                f"Kernel resources (specializations, {kinds}; compiled ahead of time in {seconds:.0f} s). "
                f"Each cell: registers per thread / "
                f"spilled bytes per thread / shared memory KB per block / resident warps per SM "
                f"(max 64 on sm_80 and sm_90, 48 on sm_86); **!** marks spills or shared memory over the limit.\n\n"
                + resource_table(results, args.markdown))
    sections.append(
        "Predicted, not measured: per-token log-probs forward + backward (bf16 inputs, grads of hidden and "
        "weight); each kernel max(FLOPs / peak bf16 dense, DRAM bytes / bandwidth), summed over the kernels. "
        "Fused: 2NHV forward, then the backward the launcher picks (the faster prediction): two-kernel 8NHV "
        "(each kernel recomputes the logits) or atomic 6NHV. Naive: 6NHV, with the N x V logits and their "
        "gradient materialized (58 bytes per logit through HBM), one op at a time.\n\n"
        + roofline_table(args.markdown))
    if args.terms:
        sections.append(byte_terms(args.markdown))
    print("\n\n".join(sections))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
