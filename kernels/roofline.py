"""Roofline model of per-token log-probs (forward + backward): the Triton kernels against the naive
torch expression, on A40, A100, H100 and H200, from published peaks. Predicted, not measured.

    from fastgrpo.kernels.roofline import GPUS, SHAPES, predict_logprob
    predict_logprob(SHAPES["qwen2-1.5b"], GPUS["H100"])   # {"fused", "two-kernel", "atomic", "naive"}

A path is a sequence of kernels that run one after another; each kernel takes max(FLOPs / peak bf16
dense, DRAM bytes / bandwidth), and a path the sum over its kernels. FLOPs count tensor-core matmuls
only (the exp/max/sum over N x V elements are not counted); bytes are DRAM traffic, each term named
so that a reader can check the sum. L2 enters as a yes/no: a working set that fits in L2 costs its
first read and final write-back, one that does not costs DRAM traffic at every touch. Not modelled:
L2 and atomic throughput, latency, tail effects, occupancy beyond BLOCKS_PER_SM.

logprob_triton.py's launcher asks `choose_backward` which backward kernel to run on a known GPU.
Only arithmetic and the kernels' tile sizes here: importing this module loads no compiler.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .gpus import GPU_DATASHEETS, GpuDatasheet
from .tiles import default_config_for_itemsize

KB = 1024
MB = 1024 * KB


@dataclass(frozen=True)
class GPU:
    """The roofline's view of a GPU: dense bf16 tensor-core FLOP/s (no sparsity), DRAM bandwidth,
    L2 and SMs, from the datasheet table (gpus.py) for the GPUs in GPUS."""

    name: str
    cc: int
    bf16_flops: float
    mem_bytes_per_s: float
    l2_bytes: int
    sms: int

    @classmethod
    def from_datasheet(cls, sheet: GpuDatasheet) -> GPU:
        if sheet.sms is None or sheet.l2_mib is None or sheet.cc is None:
            raise ValueError(f"{sheet.name}: the roofline needs sms, l2_mib and cc, got {sheet}")
        return cls(sheet.label, sheet.cc, sheet.bf16_tflops * 1e12, sheet.mem_bw_gbs * 1e9, sheet.l2_mib * MB,
                   sheet.sms)


# The GPUs whose datasheet has the roofline's fields: A40, A100 (80 GB SXM), H100 (SXM5), H200 (SXM).
GPUS: dict[str, GPU] = {sheet.label: GPU.from_datasheet(sheet) for sheet in GPU_DATASHEETS.values()
                        if sheet.sms is not None}


def gpu_for_device_name(device_name: str) -> GPU | None:
    """The GPUS entry whose name appears in a CUDA device name ("NVIDIA A100-SXM4-80GB" -> A100),
    None for any other GPU (A10 and A30 are not A100; "A40" must not match an "A400")."""
    tokens = device_name.upper().replace("-", " ").split()
    for name, gpu in GPUS.items():
        if name in tokens:
            return gpu
    return None


@dataclass(frozen=True)
class Shape:
    """N tokens, hidden size H, vocabulary V."""

    name: str
    N: int
    H: int
    V: int


SHAPES: dict[str, Shape] = {
    "smollm2-135m": Shape("smollm2-135m", N=2048, H=576, V=49152),
    "qwen2-1.5b": Shape("qwen2-1.5b", N=512, H=1536, V=151936),
    "train-16k": Shape("train-16k", N=16384, H=1536, V=151936),
}


@dataclass(frozen=True)
class Traffic:
    """One kernel (or one torch op): matmul FLOPs and named DRAM byte terms."""

    name: str
    flops: float
    terms: tuple[tuple[str, float], ...]

    @property
    def bytes(self) -> float:
        return sum(b for _, b in self.terms)


def roofline_seconds(flops: float, nbytes: float, gpu: GPU) -> tuple[float, str]:
    """max(flops / peak bf16 FLOP/s, bytes / bandwidth) and which term wins (ties: "compute")."""
    compute, memory = flops / gpu.bf16_flops, nbytes / gpu.mem_bytes_per_s
    return (compute, "compute") if compute >= memory else (memory, "memory")


@dataclass(frozen=True)
class Prediction:
    """A path's kernels, their summed roofline time (seconds) and its bound: "compute" when
    compute-bound kernels take at least half of it, else "memory"."""

    kernels: tuple[Traffic, ...]
    seconds: float
    bound: str

    @property
    def flops(self) -> float:
        return sum(k.flops for k in self.kernels)

    @property
    def bytes(self) -> float:
        return sum(k.bytes for k in self.kernels)


def predict(kernels: Sequence[Traffic], gpu: GPU) -> Prediction:
    """Sum of each kernel's roofline time on `gpu` (kernels run one after another)."""
    times = [roofline_seconds(k.flops, k.bytes, gpu) for k in kernels]
    total = sum(t for t, _ in times)
    compute = sum(t for t, bound in times if bound == "compute")
    return Prediction(tuple(kernels), total, "compute" if compute >= total / 2 else "memory")


# --------------------------------------------------------------------------------------------------
# The Triton path
# --------------------------------------------------------------------------------------------------
# Resident programs per SM assumed by the model: the 16-bit logprob kernels use 170-250 registers per
# thread at 8 warps (profiling/kernel_report.py), so one block per SM.
BLOCKS_PER_SM = 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tiles(kernel_name: str, itemsize: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_V) that logprob_triton's launchers use for inputs of `itemsize` bytes."""
    cfg = default_config_for_itemsize(kernel_name, itemsize)
    return cfg.block_n, cfg.block_v


def _vocab_splits(n_blocks: int, V: int, block_v: int, gpu: GPU) -> int:
    """As logprob_triton._vocab_splits: ~4 programs per SM, whole `block_v` steps, no empty split."""
    v_tiles = _cdiv(V, block_v)
    splits = min(max(1, _cdiv(4 * gpu.sms, n_blocks)), v_tiles)
    return _cdiv(V, _cdiv(v_tiles, splits) * block_v)


def forward_traffic(shape: Shape, gpu: GPU, itemsize: int = 2) -> Traffic:
    """The Triton forward: 2NHV FLOPs (the logits).

    Bytes: hidden, targets read once; the weight once per wave of programs (a wave: the
    gpu.sms x BLOCKS_PER_SM programs resident at once; they sweep the vocabulary together, so a
    weight tile one of them reads is an L2 hit for the others, but the weight (467 MB at V=151,936,
    H=1,536) leaves L2 between waves); the partial logsumexps written and read back; logp and lse.
    """
    N, H, V = shape.N, shape.H, shape.V
    block_n, block_v = _tiles("fwd", itemsize)
    n_blocks = _cdiv(N, block_n)
    splits = _vocab_splits(n_blocks, V, block_v, gpu)
    waves = _cdiv(n_blocks, gpu.sms * BLOCKS_PER_SM)
    return Traffic("fwd", 2 * N * H * V, (
        ("read hidden, targets", N * H * itemsize + N * 8),
        (f"read weight x {waves} waves", waves * V * H * itemsize),
        ("write+read partials [4, splits, N]", 2 * 4 * splits * N * 4),
        ("write logp, lse", 2 * N * 4),
    ))


def two_kernel_backward_traffic(shape: Shape, gpu: GPU, itemsize: int = 2) -> tuple[Traffic, Traffic]:
    """The two-kernel backward (no atomics), grads of hidden and weight: (bwd_hidden, bwd_weight).

    Each kernel: 4NHV FLOPs (recompute the logits 2NHV, one gradient matmul 2NHV), and each loop
    step covers two tiles (2 x BLOCK_V columns, 2 x BLOCK_N tokens).
    bwd_hidden (owns BLOCK_N tokens, loops over the vocabulary): hidden and the per-token vectors
    read once, the weight once per wave (as the forward). Its fp32 accumulator rows [splits, N, H] are
    read and written once per step; they stay in L2 when the resident programs' rows (programs x
    BLOCK_N x H x 4 bytes) fit, and then cost one write-back; otherwise every step but the first
    costs a DRAM read and every step a write. The torch sum over splits and the cast follow.
    bwd_weight (persistent, one program per SM, owns BLOCK_V vocabulary rows at a time, loops over
    the tokens): the weight read once, hidden once per round of vocabulary blocks; its fp32 workspace
    [programs, BLOCK_V, H] is untouched when one step covers all tokens, costs one write-back when it
    fits in L2, else each step but the first reads it and each but the last writes it; grad_weight
    is written once in the input dtype.
    """
    N, H, V = shape.N, shape.H, shape.V
    resident = gpu.sms * BLOCKS_PER_SM
    bn, bv = _tiles("bwd_hidden", itemsize)
    n_blocks = _cdiv(N, bn)
    splits = _vocab_splits(n_blocks, V, 2 * bv, gpu)
    waves = _cdiv(n_blocks, resident)
    hidden_terms = [("read hidden, targets, lse, grad_logp", N * H * itemsize + N * 16),
                    (f"read weight x {waves} waves", waves * V * H * itemsize)]
    if min(n_blocks * splits, resident) * bn * H * 4 <= gpu.l2_bytes:
        hidden_terms.append(("fp32 partials: write-back (resident rows fit in L2)", splits * N * H * 4))
    else:
        steps_per_split = _cdiv(_cdiv(V, 2 * bv), splits)
        hidden_terms.append(("fp32 partials past L2: read + write per step",
                             splits * N * H * 4 * (2 * steps_per_split - 1)))
    hidden_terms.append(("torch: sum partials, cast", splits * N * H * 4 + N * H * itemsize))

    bn, bv = _tiles("bwd_weight", itemsize)
    v_blocks = _cdiv(V, bv)
    programs = min(v_blocks, resident)
    rounds = _cdiv(v_blocks, programs)
    weight_terms = [("read weight", V * H * itemsize),
                    (f"read hidden, targets, lse, grad_logp x {rounds} rounds", rounds * (N * H * itemsize + N * 16))]
    steps = _cdiv(N, 2 * bn)
    if steps == 1:
        pass  # one step: the workspace is never touched, the sum goes straight to grad_weight
    elif programs * bv * H * 4 <= gpu.l2_bytes:
        weight_terms.append(("fp32 workspace: write-back (fits in L2)", min(programs * bv, V) * H * 4))
    else:
        weight_terms.append(("fp32 workspace past L2: read + write per step", 8 * V * H * (steps - 1)))
    weight_terms.append(("write grad_weight", V * H * itemsize))
    return (Traffic("bwd_hidden", 4 * N * H * V, tuple(hidden_terms)),
            Traffic("bwd_weight", 4 * N * H * V, tuple(weight_terms)))


def atomic_backward_traffic(shape: Shape, gpu: GPU, itemsize: int = 2) -> tuple[Traffic]:
    """The one-kernel backward: a (token block x vocab block) grid that recomputes its logit tile
    once and adds into fp32 grad_hidden and grad_weight atomically. 6NHV FLOPs.

    Bytes: the weight and the per-token vectors read once (a vocab block's programs run together);
    both fp32 accumulators zeroed (write 4), read by the first atomic (4), written back (4), cast to
    the input dtype (read 4, write itemsize). The grid sweeps all tokens once per vocab block, so
    when hidden plus the fp32 grad_hidden (N x H x (itemsize + 4)) do not fit in L2, hidden is re-read
    and every grad_hidden atomic is a DRAM read + write (8 bytes) once per vocab block. grad_weight's
    atomics come from programs that run together (same vocab block): in L2.
    """
    N, H, V = shape.N, shape.H, shape.V
    block_n, block_v = _tiles("bwd_atomic", itemsize)
    v_blocks = _cdiv(V, block_v)
    terms = [("read weight, targets, lse, grad_logp", V * H * itemsize + N * 16),
             ("zero fp32 grad_hidden, grad_weight", (N + V) * H * 4)]
    if N * H * (itemsize + 4) <= gpu.l2_bytes:
        terms += [("read hidden", N * H * itemsize),
                  ("grad_hidden fp32: first read + write-back (fits in L2)", 2 * N * H * 4)]
    else:
        terms += [(f"read hidden x {v_blocks} vocab blocks (past L2)", v_blocks * N * H * itemsize),
                  (f"grad_hidden fp32 atomics past L2: 8 bytes x {v_blocks} vocab blocks", 8 * N * H * v_blocks)]
    terms += [("grad_weight fp32: first read + write-back", 2 * V * H * 4),
              ("cast both grads to the input dtype", (N + V) * H * (4 + itemsize))]
    return (Traffic("bwd_atomic", 6 * N * H * V, tuple(terms)),)


BACKWARDS = {"two-kernel": two_kernel_backward_traffic, "atomic": atomic_backward_traffic}


def choose_backward(shape: Shape, gpu: GPU, itemsize: int = 2) -> str:
    """The backward ("two-kernel" or "atomic") with the smaller predicted time; ties: "two-kernel"
    (deterministic)."""
    two_kernel = predict(two_kernel_backward_traffic(shape, gpu, itemsize), gpu).seconds
    atomic = predict(atomic_backward_traffic(shape, gpu, itemsize), gpu).seconds
    return "atomic" if atomic < two_kernel else "two-kernel"


def fused_kernels(shape: Shape, gpu: GPU, itemsize: int = 2, backward: str = "auto") -> tuple[Traffic, ...]:
    """token_logprobs(impl="triton"), forward + backward: "two-kernel", "atomic", or "auto" (the one
    choose_backward picks, as the launcher does)."""
    if backward == "auto":
        backward = choose_backward(shape, gpu, itemsize)
    if backward not in BACKWARDS:
        raise ValueError(f"unknown backward {backward!r}; valid: auto, {', '.join(BACKWARDS)}")
    return (forward_traffic(shape, gpu, itemsize), *BACKWARDS[backward](shape, gpu, itemsize))


# --------------------------------------------------------------------------------------------------
# The naive torch expression
# --------------------------------------------------------------------------------------------------
def naive_kernels(shape: Shape, itemsize: int = 2) -> tuple[Traffic, ...]:
    """The reference expression in eager torch, forward + backward, one Traffic per op:
    log_softmax((hidden @ weight.T).float() / T, -1).gather(-1, targets[:, None]).

    Each op reads its inputs and writes its outputs once (a lower bound: torch's softmax kernels read
    a long row more than once). FLOPs: 2NHV forward, 4NHV backward (grad_hidden, grad_weight).
    """
    N, H, V = shape.N, shape.H, shape.V
    NV, b, NHV = N * V, itemsize, N * H * V
    ops = [
        ("fwd matmul: read hidden, weight; write logits", 2 * NHV, (N + V) * H * b + NV * b),
        ("fwd .float(): read 16-bit, write fp32 logits", 0, NV * (b + 4)),
        ("fwd / T: read, write fp32", 0, NV * 8),
        ("fwd log_softmax: read, write fp32", 0, NV * 8),
        ("fwd gather", 0, N * (8 + 4)),
        ("bwd gather: write the zero-filled fp32 grad + scatter", 0, NV * 4 + N * 12),
        ("bwd log_softmax: read grad, output; write grad", 0, NV * 12),
        ("bwd / T: read, write fp32", 0, NV * 8),
        ("bwd .float(): read fp32, write 16-bit grad", 0, NV * (4 + b)),
        ("bwd grad_hidden = g @ W: read g, W; write", 2 * NHV, NV * b + V * H * b + N * H * b),
        ("bwd grad_weight = g.T @ hidden: read g, hidden; write", 2 * NHV, NV * b + N * H * b + V * H * b),
    ]
    return tuple(Traffic(name, flops, ((name, nbytes),)) for name, flops, nbytes in ops)


def predict_logprob(shape: Shape, gpu: GPU) -> dict[str, Prediction]:
    """Predictions of per-token log-probs forward + backward (bf16 inputs, grads of hidden and
    weight) at `shape` on `gpu`: "fused" (what the Triton launcher runs: the backward choose_backward
    picks), "two-kernel" and "atomic" (the forward with each backward), "naive" (torch, materialized
    logits)."""
    return {
        "fused": predict(fused_kernels(shape, gpu), gpu),
        "two-kernel": predict(fused_kernels(shape, gpu, backward="two-kernel"), gpu),
        "atomic": predict(fused_kernels(shape, gpu, backward="atomic"), gpu),
        "naive": predict(naive_kernels(shape), gpu),
    }


def describe_prediction(shape: Shape, gpu: GPU) -> str:
    """One line for logs and benchmarks without a GPU, e.g. "predicted (roofline, not measured)
    qwen2-1.5b N=512 H=1536 V=151936 on H100: fused 1.34 ms (compute), ..."."""
    pred = predict_logprob(shape, gpu)
    paths = ", ".join(f"{path} {p.seconds * 1e3:.3g} ms ({p.bound})" for path, p in pred.items())
    return (f"predicted (roofline, not measured) {shape.name} N={shape.N} H={shape.H} V={shape.V} "
            f"on {gpu.name}: {paths}")
