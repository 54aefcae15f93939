"""Every Triton kernel, in every configuration its dispatcher can launch, compiles ahead of time for
sm_80 (A100), sm_86 (A40) and sm_90 (H100) with no GPU present, without register spills and within
the target's shared memory per block.

Each configuration is compiled with every argument specialization the JIT can build for it
(aot.SPECIALIZATIONS): the tiles for aligned launches (16-byte aligned pointers, H and V multiples
of 16: real models) as aligned; the tiles for every other launch with only V odd (GPT-2's 50,257),
with only the pointers aligned, and with nothing aligned. The compilations run once per session in
worker processes, with Triton's cache in a temporary folder; each (variant, specialization,
target) is then its own test.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import subprocess
import sys

import pytest
import torch

import fastgrpo.kernels
from fastgrpo.kernels import aot
from fastgrpo.kernels import logprob_triton as lpt

VARIANTS = list(aot.iter_kernel_variants())
CASES = [(v, spec) for v in VARIANTS for spec in v.specializations]
TARGET_CCS = tuple(aot.TARGETS)  # 80, 86, 90


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    cache = tmp_path_factory.mktemp("triton_cache")
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(cache)  # the spawned workers inherit it
    try:
        return aot.compile_many(VARIANTS, TARGET_CCS)
    finally:
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR")
        else:
            os.environ["TRITON_CACHE_DIR"] = old


@pytest.mark.parametrize("cc", TARGET_CCS, ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].label}-{c[1]}".replace(" ", "-"))
def test_kernel_compiles_without_spills_within_shared_memory(compiled, case, cc):
    variant, spec = case
    result = compiled[(variant, spec, cc)]
    if isinstance(result, Exception):
        pytest.fail(f"compile error: {result}")
    problems = aot.resource_problems(result)
    assert not problems, f"{variant.label} ({spec}) on sm_{cc}: " + "; ".join(problems)


def test_launches_pick_the_tiles_compiled_for_their_specialization():
    """The launcher's config for a launch is one that triton_configs() lists for that kind of launch
    (so the compile test above covers it), and the two kinds differ where aligned tiles spill."""
    listed = {(e["kernel_name"], d, e["aligned"]): e["config"] for e in lpt.triton_configs() for d in e["dtypes"]}
    for name in lpt.KERNEL_NAMES:
        for dtype in lpt.TRITON_DTYPES:
            for aligned in (True, False):
                assert lpt.default_config(name, dtype, aligned) == listed[(name, dtype, aligned)]
    assert lpt.default_config("bwd_weight", torch.bfloat16, False) != lpt.default_config("bwd_weight", torch.bfloat16)
    assert {v.aligned for v in VARIANTS if v.name.startswith("logprob_")} == {True, False}


def test_is_aligned_launch_follows_the_jit_specialization():
    x = torch.zeros(64, 48, dtype=torch.bfloat16)
    w = torch.zeros(50257, 48, dtype=torch.bfloat16)
    assert lpt.is_aligned_launch((x, x), (48, 49152))
    assert not lpt.is_aligned_launch((x, w), (48, 50257))  # odd vocabulary
    assert not lpt.is_aligned_launch((x,), (49, 49152))  # odd H
    assert not lpt.is_aligned_launch((x.view(-1)[1:],), (48, 49152))  # a slice 2 bytes past the start
    assert lpt.is_aligned_launch((x.view(-1)[8:],), (48, 49152))  # 16 bytes past it


def test_specializations_mark_what_the_jit_marks():
    kernel = lpt._KERNELS["bwd_weight"]
    sig, _ = lpt.triton_signature("bwd_weight", torch.bfloat16, lpt.default_config("bwd_weight", torch.bfloat16),
                                  {"HAS_ENTROPY": True})
    pointers = {a for a, ty in sig.items() if ty.startswith("*")}
    assert set(aot._divisible_args(kernel, sig, "aligned")) == pointers | {"V", "H"}  # N: do_not_specialize
    assert set(aot._divisible_args(kernel, sig, "odd_vocab")) == pointers | {"H"}
    assert set(aot._divisible_args(kernel, sig, "odd_sizes")) == pointers
    assert aot._divisible_args(kernel, sig, "unaligned") == []


def test_aligned_tiles_spill_when_nothing_is_aligned(tmp_path, monkeypatch):
    """Why the unaligned launches have tiles of their own: the fp32 bwd_weight tile of aligned launches
    spilled ~1.2 KB per thread on sm_86 compiled with nothing aligned; its unaligned tile does not."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    [aligned_variant] = [v for v in VARIANTS if v.name == "logprob_bwd_weight" and v.dtype == "fp32"
                         and v.aligned and v.config["HAS_ENTROPY"]]
    info = aot.compile_kernel(aligned_variant.name, aligned_variant.config, "fp32", 86, "unaligned")
    assert info.specialization == "unaligned"
    assert any("spills" in p for p in aot.resource_problems(info))


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
    with pytest.raises(ValueError, match="specialization must be one of"):
        aot.compile_kernel("logprob_fwd", VARIANTS[0].config, "bf16", 86, "odd")
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


def test_kernel_report_summary_takes_the_worst_case_over_specializations():
    """profiling/kernel_report.py --summary (the README's table): one row per bf16 log-prob kernel with
    every flag on, per target max registers / max shared KB / min resident warps, SPILL if any spilled."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "profiling" / "kernel_report.py"
    spec = importlib.util.spec_from_file_location("kernel_report", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)

    [variant] = [v for v in VARIANTS if v.name == "logprob_fwd" and v.dtype == "bf16" and v.aligned is False
                 and v.config["HAS_ENTROPY"]]
    assert report.is_summarized(variant)
    assert not report.is_summarized(dataclasses.replace(variant, dtype="fp16"))
    results = {}
    for cc in TARGET_CCS:
        for spec_name, regs, smem_kb in zip(variant.specializations, (128, 200, 160), (12, 12, 24)):
            results[(variant, spec_name, cc)] = _info(cc, regs, 8, smem_kb * 1024)
    results[(variant, "unaligned", 90)] = dataclasses.replace(results[(variant, "unaligned", 90)], n_spills=1)
    table = report.summary_table(results, markdown=True)
    assert "| fwd | other | 64x128x32 w8s2 | 200 / 24 / 8 | 200 / 24 / 8 | 200 / 24 / 8 SPILL |" in table
