"""Tile tables of the log-prob Triton kernels: the one home of every tile size.

The launchers (logprob_triton.py) pick their launch configuration here; the roofline model
(roofline.py) reads the same tiles to predict traffic; the compile checks (aot.py) compile each of
them. Importing this module loads no compiler.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TritonConfig:
    """One launch configuration of a kernel: tile sizes (constexpr) and CUDA launch options.

    fwd and bwd_hidden own BLOCK_N tokens and loop over the vocabulary in BLOCK_V tiles;
    bwd_weight owns BLOCK_V vocabulary rows and loops over the tokens in BLOCK_N tiles. All three
    step through H in BLOCK_H slices."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


# Defaults (not tuned on a GPU: none was available). No autotuning: a caller opts into other tiles
# through LogprobParams.fwd_config / bwd_config. Two tables: _DEFAULT_CONFIGS for launches that
# Triton's JIT specializes as aligned (every pointer 16-byte aligned, H and V multiples of 16: every
# model the recipes name), _UNALIGNED_CONFIGS for all others (odd vocabularies such as GPT-2's
# 50,257, odd H, sliced inputs); see is_aligned_launch. Every tile compiles for sm_80/86/90 with no
# register spill and within sm_86's 99 KB of shared memory per block, the aligned ones as aligned,
# the unaligned ones with nothing aligned, with only V odd, and with only the pointers aligned
# (tests/kernels/test_compile.py).
# fwd: 64x128 logit tiles with 64-wide H steps (16-bit; the fp32 forward spills at 64, not at 32;
# the 16-bit one spills at BLOCK_H=32 on sm_86 and not at 64).
# bwd_hidden / bwd_weight: each owns few rows (32 tokens / 32 vocabulary rows) and loops over the
# other axis in steps of two 256-wide tiles, one fp32 logit tile in registers at a time. Every step
# reads and writes the owned rows' fp32 accumulator, so the longer the step, the fewer accumulator
# bytes per FLOP (2,048 FLOPs per element read and written); 32 owned rows x H=1,536 x 4 bytes x
# 132 resident programs (26 MB) stay in an H100's 50 MB of L2. Compiled (16-bit, aligned): 146-254
# registers, 48-68 KB of shared memory at num_stages=1; num_stages=2 spilled 16-232 bytes per
# thread, steps of one 512-wide tile spilled up to 148 bytes, and 16 owned rows would double the L2
# reads of the streamed operand tiles per FLOP. fp32 (not a GPU training dtype here) takes smaller
# steps: 2x128-wide bwd_hidden steps spilled 16 bytes on sm_90, 2x128-token bwd_weight steps 32 on
# sm_86.
# bwd_atomic: the tiles of the one-kernel backward (BLOCK_H=64 spilled up to 1.3 KB/thread in its
# weight-gradient variant; the fp32 one at BLOCK_V=128 spilled 2.5 KB/thread).
_DEFAULT_CONFIGS = {
    ("fwd", 2): TritonConfig(block_n=64, block_v=128, block_h=64, num_warps=8, num_stages=3),
    ("fwd", 4): TritonConfig(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=3),
    ("bwd_hidden", 2): TritonConfig(block_n=32, block_v=256, block_h=32, num_warps=8, num_stages=1),
    ("bwd_hidden", 4): TritonConfig(block_n=32, block_v=64, block_h=32, num_warps=8, num_stages=1),
    ("bwd_weight", 2): TritonConfig(block_n=256, block_v=32, block_h=32, num_warps=8, num_stages=1),
    ("bwd_weight", 4): TritonConfig(block_n=64, block_v=32, block_h=32, num_warps=4, num_stages=1),
    ("bwd_atomic", 2): TritonConfig(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=2),
    ("bwd_atomic", 4): TritonConfig(block_n=64, block_v=64, block_h=32, num_warps=8, num_stages=2),
}
# Without alignment the loads of hidden / weight rows are not vectorized and every element needs
# its own address and mask registers: the aligned tiles above then spilled in 47 of 90 compilations
# with nothing aligned (28 bytes to 2.4 KB per thread; worst: the fp32 bwd_weight, and the 16-bit
# two-kernel backward on sm_80 at 1.1-1.3 KB). These tiles compile without a spill with nothing
# aligned, with only V odd and with only the pointers aligned, at 102-255 registers. Halving BLOCK_H
# or a row axis was not always enough: ptxas sometimes settles at 80 or 128 registers and spills
# 4-40 bytes (e.g. 16-bit bwd_hidden 32x128x32 on sm_90 with only V odd; the fp32 forward at 2-3
# pipeline stages), so these are the candidates that passed all 3 x 3 (specialization, target)
# compilations; the 16-bit bwd_atomic tile passed as it is.
_UNALIGNED_CONFIGS = {
    ("fwd", 2): TritonConfig(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=2),
    ("fwd", 4): TritonConfig(block_n=64, block_v=64, block_h=16, num_warps=8, num_stages=1),
    ("bwd_hidden", 2): TritonConfig(block_n=32, block_v=128, block_h=16, num_warps=8, num_stages=1),
    ("bwd_hidden", 4): TritonConfig(block_n=32, block_v=32, block_h=16, num_warps=8, num_stages=1),
    ("bwd_weight", 2): TritonConfig(block_n=128, block_v=32, block_h=32, num_warps=8, num_stages=1),
    ("bwd_weight", 4): TritonConfig(block_n=32, block_v=32, block_h=16, num_warps=8, num_stages=1),
    ("bwd_atomic", 2): TritonConfig(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=2),
    ("bwd_atomic", 4): TritonConfig(block_n=64, block_v=64, block_h=16, num_warps=8, num_stages=2),
}
KERNEL_NAMES = ("fwd", "bwd_hidden", "bwd_weight", "bwd_atomic")
BACKWARD_KERNELS = ("two-kernel", "atomic")
# Programs per SM: the forward and bwd_hidden split the vocabulary until this many programs exist
# per SM (2,048 tokens are only 64 token blocks of 32); bwd_weight runs one persistent program per
# SM (its 16-bit tiles use 194-204 registers per thread at 8 warps: one block fits per SM).
_SPLIT_PROGRAMS_PER_SM = 4
_PERSISTENT_PROGRAMS_PER_SM = 1


def default_config_for_itemsize(kernel_name: str, itemsize: int, aligned: bool = True) -> TritonConfig:
    """The tiles the launchers use for `kernel_name` (one of KERNEL_NAMES), inputs of `itemsize`
    bytes (2: fp16/bf16, 4: fp32) and a launch that is_aligned_launch (or not)."""
    if kernel_name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {kernel_name!r}; valid: {', '.join(KERNEL_NAMES)}")
    if itemsize not in (2, 4):
        raise ValueError(f"itemsize must be 2 (fp16/bf16) or 4 (fp32), got {itemsize!r}")
    return (_DEFAULT_CONFIGS if aligned else _UNALIGNED_CONFIGS)[(kernel_name, itemsize)]
