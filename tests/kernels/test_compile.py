"""Every Triton kernel, in every configuration its dispatcher can launch, compiles ahead of time for
sm_80 (A100), sm_86 (A40) and sm_90 (H100) with no GPU present, without register spills and within
the target's shared memory per block.

The compilations (36 variants x 3 targets) run once per session in worker processes, with Triton's
cache in a temporary folder; each (variant, target) is then its own test. The "aligned" variants
are what the JIT builds for real models (16-byte aligned pointers, H and V multiples of 16); the
slow tier also checks the unaligned ones (odd vocabularies such as GPT-2's 50,257).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import subprocess
import sys

import pytest

import fastgrpo.kernels
from fastgrpo.kernels import aot

VARIANTS = list(aot.iter_kernel_variants())
TARGET_CCS = tuple(aot.TARGETS)  # 80, 86, 90


def _compile_in_tmp_cache(tmp_path_factory, aligned: bool):
    cache = tmp_path_factory.mktemp("triton_cache")
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(cache)  # the spawned workers inherit it
    try:
        return aot.compile_many(VARIANTS, TARGET_CCS, aligned=aligned)
    finally:
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR")
        else:
            os.environ["TRITON_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def compiled_aligned(tmp_path_factory):
    return _compile_in_tmp_cache(tmp_path_factory, aligned=True)


@pytest.fixture(scope="session")
def compiled_unaligned(tmp_path_factory):
    return _compile_in_tmp_cache(tmp_path_factory, aligned=False)


def _check(result):
    if isinstance(result, Exception):
        pytest.fail(f"compile error: {result}")
    problems = aot.resource_problems(result)
    assert not problems, f"{result.name}[{result.dtype} {aot.config_label(result.config)}] on sm_{result.cc}: " + \
        "; ".join(problems)


@pytest.mark.parametrize("cc", TARGET_CCS, ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.label.replace(" ", "-"))
def test_kernel_compiles_without_spills_within_shared_memory(compiled_aligned, variant, cc):
    _check(compiled_aligned[(variant, cc)])


@pytest.mark.slow
@pytest.mark.parametrize("cc", TARGET_CCS, ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.label.replace(" ", "-"))
def test_unaligned_kernel_compiles_without_spills(compiled_unaligned, variant, cc):
    _check(compiled_unaligned[(variant, cc)])


def test_every_triton_kernel_in_the_package_is_compiled():
    """A kernel that some module defines but no triton_configs() lists would escape the checks."""
    import triton

    defined = set()
    for module_info in pkgutil.iter_modules(fastgrpo.kernels.__path__):
        module = importlib.import_module(f"fastgrpo.kernels.{module_info.name}")
        defined |= {aot._kernel_name(obj) for name, obj in vars(module).items()
                    if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")}
    covered = {v.name for v in VARIANTS}
    assert defined, "found no Triton kernels: the scan is broken"
    assert defined <= covered, f"kernels with no AOT variant: {sorted(defined - covered)}"
    assert {"logprob_fwd", "logprob_bwd_hidden", "logprob_bwd_weight", "logprob_bwd_atomic",
            "grpo_loss_fwd", "grpo_loss_bwd"} <= covered


def test_training_code_does_not_import_the_aot_tool():
    """aot is a tool (it drives Triton's compiler and ptxas); importing the trainer must not load it."""
    code = ("import sys, fastgrpo.kernels, fastgrpo.trainer; "
            "sys.exit(1 if 'fastgrpo.kernels.aot' in sys.modules else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:] or "fastgrpo.kernels.aot was imported by fastgrpo.trainer"


def test_every_dtype_is_covered_for_the_logprob_kernels():
    for name in ("logprob_fwd", "logprob_bwd_hidden", "logprob_bwd_weight", "logprob_bwd_atomic"):
        assert {v.dtype for v in VARIANTS if v.name == name} == set(aot.DTYPES), name


# ---- the checks themselves can fail --------------------------------------------------------------

def test_register_cap_makes_spills_that_are_detected(tmp_path, monkeypatch):
    """47 registers' worth of work (grpo_loss_fwd) capped at 24 per thread has to spill."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    config = {"HAS_REF": True, "HAS_WEIGHTS": True, "BLOCK_SIZE": 1024, "num_warps": 4, "maxnreg": 24}
    info = aot.compile_kernel("grpo_loss_fwd", config, "fp32", 86)
    assert info.n_regs <= 24 and info.n_spills > 0
    assert any("spills" in p for p in aot.resource_problems(info))


def test_too_many_pipeline_stages_exceed_shared_memory(tmp_path, monkeypatch):
    """16 stages of a 64x64 hidden tile and a 64x64 weight tile (bf16): 15 x 16 KB = 240 KB > 99 KB."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    config = {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 64, "HAS_ENTROPY": False, "num_warps": 4, "num_stages": 16}
    info = aot.compile_kernel("logprob_fwd", config, "bf16", 86)
    assert info.shared_bytes > aot.TARGETS[86].max_smem_per_block
    assert any("shared memory" in p for p in aot.resource_problems(info))
    assert aot.occupancy(info, aot.TARGETS[86]).blocks_per_sm == 0


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="target_cc must be one of"):
        aot.compile_kernel("logprob_fwd", VARIANTS[0].config, "bf16", 75)
    with pytest.raises(ValueError, match="dtype must be one of"):
        aot.compile_kernel("logprob_fwd", VARIANTS[0].config, "fp64", 86)
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        aot.compile_kernel("nope", {"num_warps": 4}, "fp32", 86)
    with pytest.raises(ValueError, match="fp32 pointers only"):
        aot.compile_kernel("grpo_loss_bwd", {"HAS_REF": False, "BLOCK_SIZE": 1024, "num_warps": 4}, "bf16", 86)


# ---- parsing and occupancy, on hand-checked numbers ----------------------------------------------

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_logprob_bwd_kernel' for 'sm_86'
ptxas info    : Function properties for _logprob_bwd_kernel
    152 bytes stack frame, 148 bytes spill stores, 260 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 152 bytes cumulative stack size, 456 bytes cmem[0]
"""


def test_parse_ptxas_log():
    assert aot.parse_ptxas_log(PTXAS_LOG) == {
        "n_regs": 255, "spill_store_bytes": 148, "spill_load_bytes": 260, "stack_bytes": 152, "static_smem": 0}
    clean = "ptxas info    : Used 40 registers, used 0 barriers, 1024 bytes smem, 400 bytes cmem[0]\n"
    assert aot.parse_ptxas_log(clean)["static_smem"] == 1024
    assert aot.parse_ptxas_log(clean)["spill_store_bytes"] == 0
    with pytest.raises(ValueError, match="no 'Used N registers'"):
        aot.parse_ptxas_log("ptxas fatal   : Unresolved extern function")


def _info(cc, regs, warps, smem):
    return aot.CompiledInfo(name="k", cc=cc, dtype="bf16", config={}, n_regs=regs, n_spills=0, shared_bytes=smem,
                            max_threads=warps * 32, num_warps=warps, spill_load_bytes=0, stack_bytes=0,
                            same_binary=True)


def test_occupancy_hand_checked():
    # 255 regs -> 8160 per warp, rounded to 8192: 65536 / 8192 = 8 warps = one 8-warp block.
    occ = aot.occupancy(_info(86, 255, 8, 48 * 1024), aot.TARGETS[86])
    assert (occ.blocks_per_sm, occ.warps_per_sm, occ.limiter) == (1, 8, "registers")
    assert occ.fraction == pytest.approx(8 / 48)
    # 32 regs -> 1024 per warp: 64 warps by registers, 64 / 4 = 16 blocks by warps (tie: warps first).
    occ = aot.occupancy(_info(80, 32, 4, 0), aot.TARGETS[80])
    assert (occ.blocks_per_sm, occ.warps_per_sm, occ.fraction) == (16, 64, 1.0)
    # 72 KB + 1 KB reserved per block: 228 KB / 73 KB = 3 blocks on sm_90.
    occ = aot.occupancy(_info(90, 64, 4, 72 * 1024), aot.TARGETS[90])
    assert (occ.blocks_per_sm, occ.limiter) == (3, "shared memory")
    # sm_86 holds at most 16 blocks: 1-warp blocks of 16 registers are capped there.
    occ = aot.occupancy(_info(86, 16, 1, 0), aot.TARGETS[86])
    assert (occ.blocks_per_sm, occ.limiter) == (16, "blocks")


def test_resource_problems_lists_each_problem():
    ok = _info(86, 128, 8, 48 * 1024)
    assert aot.resource_problems(ok) == []
    bad = dataclasses.replace(ok, n_spills=2, shared_bytes=100 * 1024, max_threads=128, same_binary=False)
    problems = aot.resource_problems(bad)
    assert len(problems) == 4, problems
