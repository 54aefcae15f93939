"""Prove the GPU path without a GPU: compile every Triton kernel ahead of time for sm_80/86/90 and
read its registers, spills and shared memory (kernel times are predicted in roofline.py).

    from fastgrpo.kernels.aot import iter_kernel_variants, compile_kernel, occupancy, TARGETS
    for v in iter_kernel_variants():
        for spec in v.specializations:                       # "aligned", "odd_vocab", ...
            info = compile_kernel(v.name, v.config, v.dtype, 86, spec)  # raises on a compile error
            occupancy(info, TARGETS[86])                    # Occupancy(blocks, warps per SM, limiter)

A tool for tests, `profiling/kernel_report.py` and the benchmarks: no training code path imports it,
and it imports Triton's compiler only when it compiles.

Registers and spills without a GPU: Triton 3.9 fills `CompiledKernel.n_regs` / `n_spills` only when
it loads the cubin through the CUDA driver (`cuFuncGetAttribute`), and its own `ptxas -v` log is
deleted after compilation. So this module runs the ptxas that Triton uses (the one shipped in
triton/backends/nvidia/bin: 12.9 for sm_80/86, "ptxas-blackwell" 13.4 for sm_90) with Triton's flags
on Triton's PTX, parses "Used N registers", "bytes spill stores/loads" and "bytes smem", and checks that
the cubin it produced is byte-identical to Triton's (`CompiledInfo.same_binary`): the numbers then
describe the binary that a GPU would load. Dynamic shared memory is Triton's `metadata.shared`.
"""
from __future__ import annotations

import functools
import math
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

# Modules whose `triton_configs()` list every launch their dispatcher can choose. A new module with
# Triton kernels must be added here (tests/kernels/test_compile.py fails when a kernel is missing).
KERNEL_MODULES = ("logprob", "grpo_loss")
DTYPES = ("bf16", "fp16", "fp32")
# Keys of a config that are Triton compile options, not constexprs (maxnreg caps registers per thread).
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")
# What Triton's JIT can assume about a launch's arguments: it compiles one kernel per pattern of
# pointers at 16-byte aligned addresses and specialized ints that are multiples of 16. The patterns
# checked here, which of them a variant is built with (KernelVariant.specializations), and what
# each marks divisible:
SPECIALIZATIONS = {
    "aligned": "every pointer and every specialized int (every model the recipes name: H 576 / 896 / "
               "1,536, V 49,152 / 151,936)",
    "odd_vocab": "every pointer and int but V (GPT-2: V 50,257 with H 768)",
    "odd_sizes": "the pointers only (H not a multiple of 16)",
    "unaligned": "nothing (inputs sliced at odd offsets as well)",
}
UNALIGNED_SPECIALIZATIONS = ("odd_vocab", "odd_sizes", "unaligned")


# --------------------------------------------------------------------------------------------------
# Compile targets
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetSpec:
    """Per-SM limits of one compute capability.

    From the CUDA C++ Programming Guide, "Compute Capabilities", table "Technical Specifications per
    Compute Capability" (8.0 / 8.6 / 9.0): max shared memory per block (opt-in) 163 / 99 / 227 KB,
    per SM 164 / 100 / 228 KB, resident warps per SM 64 / 48 / 64, resident blocks per SM 32 / 16 /
    32, 64K 32-bit registers per SM, 255 per thread. The driver reserves 1 KB of shared memory per
    block (cudaDevAttrReservedSharedMemoryPerBlock) and allocates registers per warp in units of 256
    (the CUDA occupancy calculator's "register allocation unit size").
    """

    cc: int
    max_smem_per_block: int
    smem_per_sm: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    regs_per_sm: int = 65536
    reserved_smem_per_block: int = 1024
    reg_alloc_unit: int = 256
    max_threads_per_block: int = 1024


KB = 1024
TARGETS: dict[int, TargetSpec] = {
    80: TargetSpec(80, max_smem_per_block=163 * KB, smem_per_sm=164 * KB, max_warps_per_sm=64, max_blocks_per_sm=32),
    86: TargetSpec(86, max_smem_per_block=99 * KB, smem_per_sm=100 * KB, max_warps_per_sm=48, max_blocks_per_sm=16),
    90: TargetSpec(90, max_smem_per_block=227 * KB, smem_per_sm=228 * KB, max_warps_per_sm=64, max_blocks_per_sm=32),
}


# --------------------------------------------------------------------------------------------------
# Kernel variants
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelVariant:
    """One compilation the dispatcher can ask for. name: "logprob_fwd", "grpo_loss_bwd", ...;
    dtype: element type of the kernel's tensor inputs ("bf16"/"fp16"/"fp32"); config: the constexprs
    (tile sizes and flags) plus "num_warps" and, when the launcher sets it, "num_stages"; aligned:
    True when the launcher uses this config only for launches the JIT specializes as aligned, False
    only for the others, None for every launch."""

    name: str
    dtype: str
    config_items: tuple
    aligned: bool | None = None

    @property
    def config(self) -> dict:
        return dict(self.config_items)

    @property
    def specializations(self) -> tuple[str, ...]:
        """The SPECIALIZATIONS this variant is compiled and checked with."""
        if self.aligned is None:
            return tuple(SPECIALIZATIONS)
        return ("aligned",) if self.aligned else UNALIGNED_SPECIALIZATIONS

    @property
    def label(self) -> str:
        scope = " for-unaligned" if self.aligned is False else ""
        return f"{self.name}[{self.dtype} {config_label(self.config)}{scope}]"


def config_label(config: Mapping) -> str:
    """Short text of a config: tiles as NxVxH, flags as their names when set, warps/stages."""
    parts = []
    blocks = [str(config[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H") if k in config]
    if blocks:
        parts.append("x".join(blocks))
    if "BLOCK_SIZE" in config:
        parts.append(str(config["BLOCK_SIZE"]))
    parts += [k.lower() for k, v in config.items() if isinstance(v, bool) and v]
    parts.append(f"w{config['num_warps']}" + (f"s{config['num_stages']}" if "num_stages" in config else ""))
    if "maxnreg" in config:
        parts.append(f"maxnreg{config['maxnreg']}")
    return " ".join(parts)


def _kernel_module(module_name: str):
    import importlib

    return importlib.import_module(f"{__package__}.{module_name}")


def _kernel_name(jit_fn) -> str:
    """_logprob_fwd_kernel -> logprob_fwd."""
    return jit_fn.__name__.strip("_").removesuffix("_kernel")


def iter_kernel_variants() -> Iterator[KernelVariant]:
    """Every (kernel, dtype, config) of KERNEL_MODULES' triton_configs(), in a stable order.

    logprob entries carry {"kernel_name", "dtypes", "config": TritonConfig, "flags": [dict, ...],
    "aligned"}; grpo_loss entries a complete {"kernel", "signature", "constexprs", "num_warps"} (fp32
    pointers; one config for every launch).
    """
    for module_name in KERNEL_MODULES:
        for entry in _kernel_module(module_name).triton_configs():
            if "flags" in entry:
                cfg = entry["config"]
                tiles = {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_H": cfg.block_h}
                launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                for dtype in entry["dtypes"]:
                    for flags in entry["flags"]:
                        config = {**tiles, **flags, **launch}
                        yield KernelVariant(f"{module_name}_{entry['kernel_name']}", _dtype_name(dtype),
                                            tuple(config.items()), entry["aligned"])
            else:
                config = {**entry["constexprs"], "num_warps": entry["num_warps"]}
                if "num_stages" in entry:
                    config["num_stages"] = entry["num_stages"]
                yield KernelVariant(_kernel_name(entry["kernel"]), "fp32", tuple(config.items()))


def _dtype_name(dtype) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _source(name: str, config: Mapping, dtype: str):
    """(jit fn, signature, constexprs) of kernel `name` for `config` and `dtype`."""
    import torch

    constexprs = {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS}
    if name.startswith("logprob_"):
        logprob = _kernel_module("logprob")
        kernel_name = name.removeprefix("logprob_")
        kernel = {e["kernel_name"]: e["kernel"] for e in logprob.triton_configs()}.get(kernel_name)
        if kernel is None:
            raise ValueError(f"unknown kernel {name!r}; valid: {', '.join(kernel_names())}")
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        tiles = logprob.TritonConfig(block_n=config["BLOCK_N"], block_v=config["BLOCK_V"],
                                     block_h=config["BLOCK_H"], num_warps=config["num_warps"],
                                     num_stages=config.get("num_stages", 3))
        flags = {k: v for k, v in constexprs.items() if not k.startswith("BLOCK_")}
        signature, constexprs = logprob.triton_signature(kernel_name, torch_dtype, tiles, flags)
        return kernel, signature, constexprs
    for module_name in KERNEL_MODULES:
        for entry in _kernel_module(module_name).triton_configs():
            if "signature" in entry and _kernel_name(entry["kernel"]) == name:
                if dtype != "fp32":
                    raise ValueError(f"{name} takes fp32 pointers only (its launcher casts), got dtype {dtype!r}")
                return entry["kernel"], dict(entry["signature"]), constexprs
    raise ValueError(f"unknown kernel {name!r}; valid: {', '.join(kernel_names())}")


def kernel_names() -> list[str]:
    return sorted({v.name for v in iter_kernel_variants()})


# --------------------------------------------------------------------------------------------------
# Compilation and introspection
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompiledInfo:
    """Resources of one compiled kernel. n_regs: 32-bit registers per thread; n_spills: 32-bit words
    of spill stores per thread (ptxas "bytes spill stores" / 4; Triton's own n_spills, read from the
    driver, is local memory / 4); shared_bytes: Triton's dynamic shared memory + static (ptxas
    "bytes smem"); max_threads: threads per block the binary can be launched with (its .reqntid,
    capped by the register file); specialization: what the compilation assumed of the arguments."""

    name: str
    cc: int
    dtype: str
    config: dict = field(hash=False)
    n_regs: int
    n_spills: int
    shared_bytes: int
    max_threads: int
    num_warps: int
    spill_load_bytes: int
    stack_bytes: int
    same_binary: bool  # the introspected cubin is byte-identical to the one Triton built
    specialization: str = "aligned"  # a SPECIALIZATIONS key


_PTXAS_PATTERNS = {
    "n_regs": r"Used (\d+) registers",
    "spill_store_bytes": r"(\d+) bytes spill stores",
    "spill_load_bytes": r"(\d+) bytes spill loads",
    "stack_bytes": r"(\d+) bytes stack frame",
    "static_smem": r"(\d+) bytes smem",
}


def parse_ptxas_log(log: str) -> dict[str, int]:
    """`ptxas -v` output -> {"n_regs", "spill_store_bytes", "spill_load_bytes", "stack_bytes",
    "static_smem"} (0 where ptxas printed nothing); ValueError when the register line is missing."""
    if not re.search(_PTXAS_PATTERNS["n_regs"], log):
        raise ValueError(f"no 'Used N registers' line in the ptxas output:\n{log}")
    out = {}
    for key, pattern in _PTXAS_PATTERNS.items():
        match = re.search(pattern, log)
        out[key] = int(match.group(1)) if match else 0
    return out


def _ptxas_resources(ptx: str, cc: int) -> tuple[dict[str, int], bytes]:
    """Run Triton's ptxas, with the flags Triton 3.9 passes, on `ptx` -> (parsed -v log, cubin)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        src.write_text(ptx)
        cmd = [get_ptxas(cc).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(cc)}", str(src), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return parse_ptxas_log(proc.stdout + proc.stderr), out.read_bytes()


def compile_kernel(name: str, config: Mapping, dtype: str, target_cc: int,
                   specialization: str = "aligned") -> CompiledInfo:
    """Compile kernel `name` with `config` (constexprs + num_warps [+ num_stages]) for sm_<target_cc>
    and return its resources. Raises Triton's CompilationError / PTXASError on a compile error.

    specialization (a SPECIALIZATIONS key) is what the JIT would know of the arguments: "aligned",
    what it builds for real models, marks every pointer 16-byte aligned and every specialized int
    argument a multiple of 16; the others mark less. Results are memoized per process; Triton's own
    cache (TRITON_CACHE_DIR) makes a second process fast too.
    """
    if target_cc not in TARGETS:
        raise ValueError(f"target_cc must be one of {sorted(TARGETS)}, got {target_cc!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if specialization not in SPECIALIZATIONS:
        raise ValueError(f"specialization must be one of {tuple(SPECIALIZATIONS)}, got {specialization!r}")
    if "num_warps" not in config:
        raise ValueError(f"config must hold num_warps, got keys {sorted(config)}")
    return _compile_cached(name, tuple(config.items()), dtype, target_cc, specialization)


def _divisible_args(kernel, signature: Mapping, specialization: str) -> list[str]:
    """The arguments that `specialization` marks divisible by 16, as the JIT would: 16-byte aligned
    pointers, specialized i32 arguments that are multiples of 16 (never those in do_not_specialize)."""
    skip = set(getattr(kernel, "do_not_specialize", ()))
    pointers = [a for a, ty in signature.items() if ty.startswith("*")]
    ints = [a for a, ty in signature.items()
            if ty == "i32" and a not in skip and kernel.arg_names.index(a) not in skip]
    return {"aligned": pointers + ints, "odd_vocab": pointers + [a for a in ints if a != "V"],
            "odd_sizes": pointers, "unaligned": []}[specialization]


@functools.lru_cache(maxsize=None)
def _compile_cached(name: str, config_items: tuple, dtype: str, cc: int, specialization: str) -> CompiledInfo:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    config = dict(config_items)
    kernel, signature, constexprs = _source(name, config, dtype)
    attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]]
             for arg in _divisible_args(kernel, signature, specialization)}
    options = {k: config[k] for k in LAUNCH_OPTIONS if k in config}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", cc, 32), options=options)
    res, cubin = _ptxas_resources(compiled.asm["ptx"], cc)
    num_warps = compiled.metadata.num_warps
    spec = TARGETS[cc]
    regs_per_warp = _round_up(max(res["n_regs"], 1) * 32, spec.reg_alloc_unit)
    max_threads = min(num_warps * 32, spec.max_threads_per_block, 32 * (spec.regs_per_sm // regs_per_warp))
    return CompiledInfo(name=name, cc=cc, dtype=dtype, config=config, specialization=specialization,
                        n_regs=res["n_regs"],
                        n_spills=math.ceil(res["spill_store_bytes"] / 4),
                        shared_bytes=compiled.metadata.shared + res["static_smem"], max_threads=max_threads,
                        num_warps=num_warps, spill_load_bytes=res["spill_load_bytes"],
                        stack_bytes=res["stack_bytes"], same_binary=cubin == compiled.asm["cubin"])


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def resource_problems(info: CompiledInfo) -> list[str]:
    """What would make this binary slow or unlaunchable on its target; [] when none: register
    spills, shared memory above the per-block limit, more threads than the registers allow, or
    numbers read from a cubin that is not the one Triton built."""
    spec = TARGETS[info.cc]
    problems = []
    if info.n_spills or info.spill_load_bytes:
        problems.append(f"spills {info.n_spills * 4} bytes stores / {info.spill_load_bytes} bytes loads per "
                        f"thread at {info.n_regs} registers")
    if info.shared_bytes > spec.max_smem_per_block:
        problems.append(f"needs {info.shared_bytes} bytes of shared memory; sm_{info.cc} allows "
                        f"{spec.max_smem_per_block} per block")
    if info.num_warps * 32 > info.max_threads:
        problems.append(f"{info.num_warps * 32} threads per block but its {info.n_regs} registers allow "
                        f"{info.max_threads}")
    if not info.same_binary:
        problems.append("ptxas -v rebuilt a different cubin than Triton's: its flags changed, so these "
                        "numbers may not describe the binary a GPU loads")
    return problems


class CompileFailure(RuntimeError):
    """A compile error caught by compile_many (Triton's own exceptions do not all pickle)."""


def _compile_job(job: tuple) -> CompiledInfo | CompileFailure:
    import warnings

    variant, specialization, cc = job
    try:
        with warnings.catch_warnings():  # Triton 3.9's notice about its FP-fusion default, once per worker
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
            return compile_kernel(variant.name, variant.config, variant.dtype, cc, specialization)
    except Exception as exc:  # noqa: BLE001 - every compile error becomes a reportable result
        return CompileFailure(f"{variant.label} ({specialization}) for sm_{cc}: {type(exc).__name__}: {exc}")


def compile_many(variants, target_ccs=tuple(TARGETS), specializations: tuple[str, ...] | None = None,
                 workers: int | None = None) -> dict[tuple[KernelVariant, str, int], CompiledInfo | CompileFailure]:
    """Compile every (variant, specialization, target) in `workers` processes (default: one per CPU
    core) -> {(variant, specialization, cc): CompiledInfo, or CompileFailure holding the error text}.
    specializations: those of each variant's own `specializations` to build (None: all of them).

    The 432 of tests/kernels/test_compile.py (144 variant x specialization pairs x 3 targets) took
    147 s in 2 worker processes on an otherwise idle 2-core machine (0.1-5.5 s each).
    """
    import concurrent.futures
    import multiprocessing
    import os

    jobs = [(v, spec, cc) for v in variants for spec in v.specializations
            if specializations is None or spec in specializations for cc in target_ccs]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        results = [_compile_job(job) for job in jobs]
    else:  # spawn: a forked child would inherit torch's thread pools
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            results = list(pool.map(_compile_job, jobs, chunksize=1))
    return dict(zip(jobs, results))


# --------------------------------------------------------------------------------------------------
# Occupancy
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Occupancy:
    """Resident blocks and warps per SM, the fraction of the SM's warp slots, and what limits it."""

    blocks_per_sm: int
    warps_per_sm: int
    fraction: float
    limiter: str


def occupancy(info: CompiledInfo, spec: TargetSpec) -> Occupancy:
    """Blocks per SM = min over warps, registers (per warp, in 256-register units), shared memory
    (+1 KB reserved per block) and the block limit; 0 when one block does not fit."""
    warps = info.num_warps
    regs_per_warp = _round_up(max(info.n_regs, 1) * 32, spec.reg_alloc_unit)
    smem_per_block = info.shared_bytes + spec.reserved_smem_per_block
    limits = {
        "warps": spec.max_warps_per_sm // warps,
        "registers": (spec.regs_per_sm // regs_per_warp) // warps,
        "shared memory": spec.smem_per_sm // smem_per_block if info.shared_bytes <= spec.max_smem_per_block else 0,
        "blocks": spec.max_blocks_per_sm,
    }
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    return Occupancy(blocks, blocks * warps, blocks * warps / spec.max_warps_per_sm, limiter)
