"""GRPO per-token loss: policy ratio, clipping, k3 KL and the loss-aggregation modes.

Layers (DESIGN style rule 1): the Triton kernels ``_grpo_loss_fwd_kernel``/``_grpo_loss_bwd_kernel``;
their launchers ``grpo_loss_forward``/``grpo_loss_backward`` and the same math in torch
(``grpo_loss_forward_torch``/``grpo_loss_backward_torch``); ``GRPOLossFunction``; and the functional
``grpo_token_loss``. ``impl="reference"`` is the plain torch formula differentiated by autograd.

Every per-token tensor is ``[N]``, so nothing here is big: the kernels exist to fuse ~20 elementwise
ops and the metric reductions into one launch each way, not to save memory.

The aggregation modes live in ``LOSS_AGGREGATIONS``; each turns the packed batch into one weight per
token (``scale``), so that ``loss = sum_t scale_t * l_t`` and ``dloss/dlogp_t = scale_t * dl_t/dlogp_t``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the `triton` extra is optional: the torch paths need nothing from it
    triton = None

__all__ = [
    "GRPOLossFunction", "GRPOLossParams", "LOSS_AGGREGATIONS", "METRIC_NAMES", "PackedBatch",
    "grpo_loss_backward", "grpo_loss_backward_torch", "grpo_loss_forward", "grpo_loss_forward_torch",
    "grpo_token_loss", "sequence_ids", "token_scales", "triton_configs",
]

IMPLS = ("auto", "triton", "torch", "reference")
METRIC_NAMES = ("clip_low_frac", "clip_high_frac", "clip_frac", "kl_mean",
                "ratio_mean", "ratio_max", "ratio_min")
# Columns of the statistics the forward writes per program, [num_programs, NUM_STATS]: the loss
# (scaled), then weighted sums of 1, clip-low flags, clip-high flags, k3, ratio; max and min ratio.
NUM_STATS = 8
STAT_LOSS, STAT_WEIGHT, STAT_RATIO_MAX, STAT_RATIO_MIN = 0, 1, 6, 7


# -------- Aggregation modes: one weight per token -------------------------------------------------


@dataclass(frozen=True)
class PackedBatch:
    """What an aggregation mode needs to weigh the tokens of one (micro-)batch.

    seq_ids [N] int64 (sequence of each token), cu_seqlens [S+1], weights [N] float (ones when the
    caller gave none). ``num_tokens`` is the global weighted token count (a 0-dim tensor, the local
    sum, when the caller gave none).
    """

    seq_ids: Tensor
    cu_seqlens: Tensor
    weights: Tensor
    num_sequences: int
    num_tokens: float | Tensor
    num_microbatches: int
    max_completion_length: int | None


def _nonzero(x: Tensor) -> Tensor:
    """x where x > 0, else 1: an all-zero-weight group then contributes 0 instead of 0/0."""
    return torch.where(x > 0, x, torch.ones_like(x))


def _sequence_weight_sums(batch: PackedBatch) -> Tensor:
    """[S] sum of token weights per sequence; a float64 cumsum, deterministic (no atomics)."""
    csum = torch.nn.functional.pad(batch.weights.double().cumsum(0), (1, 0))
    cu = batch.cu_seqlens.long()
    return (csum[cu[1:]] - csum[cu[:-1]]).to(batch.weights.dtype)


def _grpo_scale(batch: PackedBatch) -> Tensor:
    """Mean over sequences (of the global batch) of each sequence's weighted token mean."""
    per_sequence = 1.0 / (_nonzero(_sequence_weight_sums(batch)) * batch.num_sequences)
    return batch.weights * per_sequence[batch.seq_ids]


def _bnpo_scale(batch: PackedBatch) -> Tensor:
    """Weighted token mean of this micro-batch, divided by the number of micro-batches."""
    return batch.weights / (_nonzero(batch.weights.sum()) * batch.num_microbatches)


def _dr_grpo_scale(batch: PackedBatch) -> Tensor:
    """Weighted token sum / (global sequence count * max_completion_length): no length bias."""
    return batch.weights / (batch.num_sequences * batch.max_completion_length)


def _dapo_scale(batch: PackedBatch) -> Tensor:
    """Weighted token sum / weighted token count of the whole global batch."""
    num_tokens = batch.num_tokens
    if isinstance(num_tokens, Tensor):
        num_tokens = _nonzero(num_tokens)
    return batch.weights / num_tokens


# The registry of loss types: name -> PackedBatch -> [N] token weights.
LOSS_AGGREGATIONS: dict[str, Callable[[PackedBatch], Tensor]] = {
    "grpo": _grpo_scale, "bnpo": _bnpo_scale, "dr_grpo": _dr_grpo_scale, "dapo": _dapo_scale,
}


def token_scales(loss_type: str, batch: PackedBatch) -> Tensor:
    """[N] weight of each token in the loss for `loss_type`; ValueError lists the valid names."""
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {sorted(LOSS_AGGREGATIONS)}")
    return LOSS_AGGREGATIONS[loss_type](batch)


def sequence_ids(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """[N] int64 index of the packed sequence that holds each token; cu_seqlens [S+1] (0 ... N).

    Uses `output_size` so that a CUDA call does not sync to learn N.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seqs = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(seqs, lengths, output_size=num_tokens)


# -------- Triton kernels and launchers ------------------------------------------------------------

# One launch config: the work is ~25 flops per token, latency-bound at any N a trainer sees
# (64k tokens are 64 programs of 1024), so there is nothing to tune. Not yet timed on a GPU.
_BLOCK_SIZE = 1024
_NUM_WARPS = 4

if triton is not None:

    @triton.jit(do_not_specialize=["n_tokens"])
    def _grpo_loss_fwd_kernel(
        logp_ptr,  # *fp32 [N] log-probs of the policy being trained
        old_logp_ptr,  # *fp32 [N] log-probs of the policy that sampled
        ref_logp_ptr,  # *fp32 [N] reference log-probs (read only when HAS_REF)
        advantages_ptr,  # *fp32 [N] per-token advantage
        scale_ptr,  # *fp32 [N] aggregation weight of each token (token weight included)
        weights_ptr,  # *fp32 [N] token weights for the metrics (read only when HAS_WEIGHTS)
        stats_ptr,  # *fp32 [num_programs, 8] out: the STAT_* columns of this program's tokens
        n_tokens,  # i32 N, never constexpr (it changes every step)
        ratio_low,  # fp32 1 - epsilon_low
        ratio_high,  # fp32 1 + epsilon_high
        beta,  # fp32 KL coefficient
        HAS_REF: tl.constexpr,
        HAS_WEIGHTS: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        in_range = offsets < n_tokens
        logp = tl.load(logp_ptr + offsets, mask=in_range, other=0.0)
        old_logp = tl.load(old_logp_ptr + offsets, mask=in_range, other=0.0)
        advantage = tl.load(advantages_ptr + offsets, mask=in_range, other=0.0)
        scale = tl.load(scale_ptr + offsets, mask=in_range, other=0.0)

        ratio = tl.exp(logp - old_logp)
        unclipped = ratio * advantage
        clipped = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high) * advantage
        token_loss = -tl.where(unclipped <= clipped, unclipped, clipped)
        if HAS_REF:
            ref_logp = tl.load(ref_logp_ptr + offsets, mask=in_range, other=0.0)
            log_ref_ratio = ref_logp - logp
            kl = tl.exp(log_ref_ratio) - log_ref_ratio - 1.0
            token_loss += tl.where(beta != 0.0, beta * kl, 0.0)
        else:
            kl = tl.zeros_like(logp)
        if HAS_WEIGHTS:
            weight = tl.load(weights_ptr + offsets, mask=in_range, other=0.0)
        else:
            weight = tl.where(in_range, 1.0, 0.0)
        counted = weight > 0.0
        clip_low = (advantage < 0.0) & (ratio < ratio_low)
        clip_high = (advantage > 0.0) & (ratio > ratio_high)

        row = stats_ptr + pid * 8
        tl.store(row + 0, tl.sum(tl.where(in_range, scale * token_loss, 0.0), axis=0))
        tl.store(row + 1, tl.sum(weight, axis=0))
        tl.store(row + 2, tl.sum(tl.where(clip_low, weight, 0.0), axis=0))
        tl.store(row + 3, tl.sum(tl.where(clip_high, weight, 0.0), axis=0))
        tl.store(row + 4, tl.sum(weight * kl, axis=0))
        tl.store(row + 5, tl.sum(weight * ratio, axis=0))
        tl.store(row + 6, tl.max(tl.where(counted, ratio, -float("inf")), axis=0))
        tl.store(row + 7, tl.min(tl.where(counted, ratio, float("inf")), axis=0))

    @triton.jit(do_not_specialize=["n_tokens"])
    def _grpo_loss_bwd_kernel(
        grad_loss_ptr,  # *fp32 [] upstream gradient of the scalar loss (read on device: no sync)
        logp_ptr,  # *fp32 [N]
        old_logp_ptr,  # *fp32 [N]
        ref_logp_ptr,  # *fp32 [N] (read only when HAS_REF)
        advantages_ptr,  # *fp32 [N]
        scale_ptr,  # *fp32 [N]
        grad_logp_ptr,  # *fp32 [N] out
        n_tokens,  # i32 N, never constexpr
        ratio_low,  # fp32
        ratio_high,  # fp32
        beta,  # fp32
        HAS_REF: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        in_range = offsets < n_tokens
        grad_loss = tl.load(grad_loss_ptr)
        logp = tl.load(logp_ptr + offsets, mask=in_range, other=0.0)
        old_logp = tl.load(old_logp_ptr + offsets, mask=in_range, other=0.0)
        advantage = tl.load(advantages_ptr + offsets, mask=in_range, other=0.0)
        scale = tl.load(scale_ptr + offsets, mask=in_range, other=0.0)

        ratio = tl.exp(logp - old_logp)
        unclipped = ratio * advantage
        clipped = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high) * advantage
        # d(-r*A)/dlogp = -r*A where the unclipped branch is taken (ties included), else the
        # clamp is active and the clipped branch is constant in logp.
        grad = tl.where(unclipped <= clipped, -unclipped, 0.0)
        if HAS_REF:
            ref_logp = tl.load(ref_logp_ptr + offsets, mask=in_range, other=0.0)
            grad += tl.where(beta != 0.0, beta * (1.0 - tl.exp(ref_logp - logp)), 0.0)
        tl.store(grad_logp_ptr + offsets, grad_loss * scale * grad, mask=in_range)


def triton_configs() -> list[dict]:
    """Every kernel variant the dispatcher can launch, as `triton.compile(ASTSource(...))` inputs.

    Each entry: {"kernel", "signature" (arg name -> type, constexprs typed "constexpr"),
    "constexprs", "num_warps"}. All pointers are fp32 (the launchers cast [N] inputs to fp32 so that
    one signature serves every input dtype), N is i32, the scalars fp32.
    Empty when Triton is not installed.
    """
    if triton is None:
        return []
    vec = ("logp_ptr", "old_logp_ptr", "ref_logp_ptr", "advantages_ptr", "scale_ptr")
    scalars = {"n_tokens": "i32", "ratio_low": "fp32", "ratio_high": "fp32", "beta": "fp32"}
    variants = [(_grpo_loss_fwd_kernel, (*vec, "weights_ptr", "stats_ptr"), {"HAS_REF": r, "HAS_WEIGHTS": w})
                for r in (False, True) for w in (False, True)]
    variants += [(_grpo_loss_bwd_kernel, ("grad_loss_ptr", *vec, "grad_logp_ptr"), {"HAS_REF": r})
                 for r in (False, True)]
    configs = []
    for kernel, pointers, flags in variants:
        constexprs = {**flags, "BLOCK_SIZE": _BLOCK_SIZE}
        signature = {**dict.fromkeys(pointers, "*fp32"), **scalars, **dict.fromkeys(constexprs, "constexpr")}
        configs.append({"kernel": kernel, "signature": signature, "constexprs": constexprs, "num_warps": _NUM_WARPS})
    return configs


@dataclass(frozen=True)
class GRPOLossParams:
    """Options of GRPOLossFunction. ratio_low/high are 1 - epsilon_low and 1 + epsilon_high."""

    ratio_low: float
    ratio_high: float
    beta: float
    use_triton: bool


def _fp32(x: Tensor) -> Tensor:
    return x.to(torch.float32).contiguous()


def grpo_loss_forward(logp, old_logp, ref_logp, advantages, scale, weights, params: GRPOLossParams):
    """Triton forward. All inputs [N] (ref_logp, weights may be None) -> (loss [] fp32, stats [P, 8])."""
    n = logp.numel()
    num_programs = triton.cdiv(n, _BLOCK_SIZE)
    stats = torch.empty(num_programs, NUM_STATS, device=logp.device, dtype=torch.float32)
    logp32 = _fp32(logp)
    # Unused pointers get a real tensor so that the kernel's signature never holds a None.
    _grpo_loss_fwd_kernel[(num_programs,)](
        logp32, _fp32(old_logp), logp32 if ref_logp is None else _fp32(ref_logp), _fp32(advantages),
        _fp32(scale), logp32 if weights is None else _fp32(weights), stats, n,
        params.ratio_low, params.ratio_high, params.beta,
        HAS_REF=ref_logp is not None, HAS_WEIGHTS=weights is not None, BLOCK_SIZE=_BLOCK_SIZE,
        num_warps=_NUM_WARPS,
    )
    return stats[:, STAT_LOSS].sum(), stats


def grpo_loss_backward(grad_loss, logp, old_logp, ref_logp, advantages, scale, params: GRPOLossParams):
    """Triton backward: grad_loss [] -> dloss/dlogp [N] in logp's dtype."""
    n = logp.numel()
    grad_logp = torch.empty(n, device=logp.device, dtype=torch.float32)
    logp32 = _fp32(logp)
    _grpo_loss_bwd_kernel[(triton.cdiv(n, _BLOCK_SIZE),)](
        _fp32(grad_loss), logp32, _fp32(old_logp), logp32 if ref_logp is None else _fp32(ref_logp),
        _fp32(advantages), _fp32(scale), grad_logp, n,
        params.ratio_low, params.ratio_high, params.beta,
        HAS_REF=ref_logp is not None, BLOCK_SIZE=_BLOCK_SIZE, num_warps=_NUM_WARPS,
    )
    return grad_logp.to(logp.dtype)


# -------- The same math in torch, and the autograd Function ---------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ratio_and_branches(logp, old_logp, advantages, params):
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, params.ratio_low, params.ratio_high) * advantages
    return ratio, unclipped, clipped


def grpo_loss_forward_torch(logp, old_logp, ref_logp, advantages, scale, weights,
                            params: GRPOLossParams):
    """Torch forward, the kernel's math: inputs [N] -> (loss [], stats [1, 8]) in float32 (float64
    for float64 logp)."""
    dtype = _compute_dtype(logp.dtype)
    logp, old_logp, advantages, scale = (x.to(dtype) for x in (logp, old_logp, advantages, scale))
    ratio, unclipped, clipped = _ratio_and_branches(logp, old_logp, advantages, params)
    token_loss = -torch.where(unclipped <= clipped, unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        log_ref_ratio = ref_logp.to(dtype) - logp
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
        if params.beta != 0.0:
            token_loss = token_loss + params.beta * kl
    weight = torch.ones_like(logp) if weights is None else weights.to(dtype)
    counted = weight > 0
    clip_low = (advantages < 0) & (ratio < params.ratio_low)
    clip_high = (advantages > 0) & (ratio > params.ratio_high)
    loss = (scale * token_loss).sum()
    stats = torch.stack([
        loss, weight.sum(), (weight * clip_low).sum(), (weight * clip_high).sum(), (weight * kl).sum(),
        (weight * ratio).sum(), torch.where(counted, ratio, -math.inf).max(),
        torch.where(counted, ratio, math.inf).min(),
    ])
    return loss, stats[None]


def grpo_loss_backward_torch(grad_loss, logp, old_logp, ref_logp, advantages, scale,
                             params: GRPOLossParams):
    """Torch backward, the kernel's math: grad_loss [] -> dloss/dlogp [N] in logp's dtype."""
    dtype = _compute_dtype(logp.dtype)
    logp_c, old_logp, advantages, scale = (x.to(dtype) for x in (logp, old_logp, advantages, scale))
    _, unclipped, clipped = _ratio_and_branches(logp_c, old_logp, advantages, params)
    grad = torch.where(unclipped <= clipped, -unclipped, torch.zeros_like(unclipped))
    if ref_logp is not None and params.beta != 0.0:
        grad = grad + params.beta * (1.0 - torch.exp(ref_logp.to(dtype) - logp_c))
    return (grad_loss.to(dtype) * scale * grad).to(logp.dtype)


class GRPOLossFunction(torch.autograd.Function):
    """(logp, old_logp, ref_logp, advantages, scale, weights, params) -> (loss [], stats [P, 8]).

    Differentiable in logp only; every other tensor is a constant.
    """

    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, advantages, scale, weights, params: GRPOLossParams):
        forward = grpo_loss_forward if params.use_triton else grpo_loss_forward_torch
        loss, stats = forward(logp, old_logp, ref_logp, advantages, scale, weights, params)
        ctx.save_for_backward(logp, old_logp, ref_logp, advantages, scale)
        ctx.params = params
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        params = ctx.params
        backward = grpo_loss_backward if params.use_triton else grpo_loss_backward_torch
        grad_logp = backward(grad_loss, *ctx.saved_tensors, params)
        return grad_logp, None, None, None, None, None, None


def _metrics_dict(weight, clip_low, clip_high, kl, ratio, ratio_max, ratio_min) -> dict[str, float]:
    """Weighted sums (python floats) -> METRIC_NAMES; all zeros when no token has weight."""
    if weight <= 0:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    return {
        "clip_low_frac": clip_low / weight, "clip_high_frac": clip_high / weight,
        "clip_frac": (clip_low + clip_high) / weight, "kl_mean": kl / weight,
        "ratio_mean": ratio / weight, "ratio_max": ratio_max, "ratio_min": ratio_min,
    }


def _metrics_from_stats(stats: Tensor) -> dict[str, float]:
    """stats [P, 8] (the STAT_* columns per program) -> metrics, with one host sync."""
    sums = stats[:, STAT_WEIGHT:STAT_RATIO_MAX].sum(0)
    extremes = torch.stack([stats[:, STAT_RATIO_MAX].max(), stats[:, STAT_RATIO_MIN].min()])
    return _metrics_dict(*torch.cat([sums, extremes]).tolist())


# -------- Reference: the formula as written, differentiated by autograd ---------------------------


def _reference_loss(logp, old_logp, ref_logp, advantages, seq_ids, num_local_sequences, weights,
                    loss_type, epsilon_low, epsilon_high, beta, max_completion_length,
                    num_sequences, num_tokens, num_microbatches):
    dtype = _compute_dtype(logp.dtype)
    logp, old_logp, advantages = logp.to(dtype), old_logp.to(dtype), advantages.to(dtype)
    weights = torch.ones_like(logp) if weights is None else weights.to(dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages
    # where() takes the unclipped branch on ties, as the kernels do. (torch.minimum splits a tie's
    # gradient between both branches, which then carry the same gradient: clamp passes it at its bounds.)
    per_token = -torch.where(unclipped <= clipped, unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = torch.exp(ref_logp.to(dtype) - logp) - (ref_logp.to(dtype) - logp) - 1
        if beta != 0:
            per_token = per_token + beta * kl
    weighted = per_token * weights
    total_weight = weights.sum()
    if loss_type == "grpo":
        zeros = torch.zeros(num_local_sequences, dtype=dtype, device=logp.device)
        seq_sum, seq_weight = zeros.index_add(0, seq_ids, weighted), zeros.index_add(0, seq_ids, weights)
        loss = (seq_sum / _nonzero(seq_weight)).sum() / num_sequences
    elif loss_type == "bnpo":
        loss = weighted.sum() / _nonzero(total_weight) / num_microbatches
    elif loss_type == "dr_grpo":
        loss = weighted.sum() / (num_sequences * max_completion_length)
    elif loss_type == "dapo":
        loss = weighted.sum() / (_nonzero(total_weight) if num_tokens is None else num_tokens)
    else:
        raise NotImplementedError(f"no reference for loss_type {loss_type!r}: add one beside the registry's")
    counted = weights > 0
    with torch.no_grad():
        low = ((advantages < 0) & (ratio < 1 - epsilon_low)).to(dtype)
        high = ((advantages > 0) & (ratio > 1 + epsilon_high)).to(dtype)
        values = torch.stack([
            total_weight, (weights * low).sum(), (weights * high).sum(), (weights * kl).sum(),
            (weights * ratio).sum(), torch.where(counted, ratio, -math.inf).max(),
            torch.where(counted, ratio, math.inf).min(),
        ]).tolist()
    return loss, _metrics_dict(*values)


# -------- Validation and the functional API -------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be an int or float, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value}")


def _check_float_tensor(name: str, x, shapes: tuple[tuple[int, ...], ...], device) -> None:
    """x must be a floating tensor with one of `shapes`, on `device`."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape not in shapes:
        allowed = " or ".join(str(tuple(shape)) for shape in shapes)
        raise ValueError(f"{name} must have shape {allowed}, got {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, logp on {device}")


def _check_cu_seqlens(cu_seqlens, logp: Tensor, token_weights: Tensor | None) -> None:
    """Shape/dtype checks, then the values of cu_seqlens and token_weights in one host sync."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
        raise ValueError(f"cu_seqlens must have shape [S+1] with S >= 0, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != logp.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, logp on {logp.device}")
    n = logp.numel()
    decreasing = (cu_seqlens[1:] < cu_seqlens[:-1]).sum()
    negative = torch.zeros_like(decreasing) if token_weights is None else (token_weights < 0).sum()
    first, last, num_decreasing, num_negative = torch.stack(
        [cu_seqlens[0].long(), cu_seqlens[-1].long(), decreasing, negative]).tolist()
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0]={first}")
    if last != n:
        raise ValueError(f"cu_seqlens must end at the token count N={n}, got cu_seqlens[-1]={last}")
    if num_decreasing:
        i = int(torch.nonzero(cu_seqlens[1:] < cu_seqlens[:-1])[0])
        raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}]={int(cu_seqlens[i])} > "
                         f"cu_seqlens[{i + 1}]={int(cu_seqlens[i + 1])}")
    if num_negative:
        raise ValueError(f"token_weights must be >= 0, got {num_negative} negative weights "
                         f"(min {float(token_weights.min())})")


def _resolve_impl(impl: str, logp: Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {list(IMPLS)}")
    triton_ok = triton is not None and (logp.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
    if impl == "auto":
        return "triton" if triton_ok and logp.is_cuda and logp.dtype != torch.float64 else "torch"
    if impl == "triton":
        if not triton_ok:
            raise ValueError(f"impl='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1); "
                             f"logp is on {logp.device}, triton {'missing' if triton is None else 'installed'}")
        if logp.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"impl='triton' computes in float32 and takes float16/bfloat16/float32 logp, "
                            f"got {logp.dtype}; use impl='torch'")
    return impl


def grpo_token_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    cu_seqlens: Tensor,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    *,
    impl: str = "auto",
    num_sequences: int | None = None,
    num_tokens: int | float | None = None,
    num_microbatches: int = 1,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss over the completion tokens of packed sequences -> (loss [], metrics).

    Per token (w = token_weights, 1 when None; r = exp(logp - old_logp);
    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1):
        l = -where(r*A <= clamp(r, 1-eps_low, 1+eps_high)*A, r*A, clamp(r, ...)*A) + beta * k3
    where the unclipped branch wins ties, so dl/dlogp = -r*A there (the gradient torch.minimum gives too).
    Aggregation (S = num_sequences, default local S; W_s = sum of w over sequence s):
        grpo    sum_s (sum_{t in s} w_t l_t / W_s) / S          (a sequence with W_s = 0 adds 0)
        bnpo    sum_t w_t l_t / sum_t w_t / num_microbatches    (normalized per micro-batch, as TRL)
        dr_grpo sum_t w_t l_t / (S * max_completion_length)
        dapo    sum_t w_t l_t / num_tokens                      (global weighted count; default local)
    With num_sequences / num_tokens set to the global batch's counts, the losses of micro-batches sum
    to the loss of the whole batch (grpo, dr_grpo, dapo).

    Shapes: logp, old_logp, ref_logp, token_weights [N] float; advantages [N] (per token) or [S] (per
    sequence, broadcast; when N == S it is read as per token, which then is the same thing);
    cu_seqlens [S+1] int32/int64, 0 = cu_seqlens[0] <= ... <= cu_seqlens[S] = N.
    old_logp None means logp.detach() (r = 1). ref_logp None requires beta == 0 (kl_mean is then 0).
    Gradients flow to logp only. Tokens with weight 0 must still hold finite values (they are
    multiplied by 0). The loss is float32 (float64 for float64 logp); nothing [N x anything] is built.
    metrics: METRIC_NAMES as python floats over the weighted tokens (ratio_max/min over tokens with
    w > 0), all 0.0 when no token has weight. Two host syncs: input validation and the metrics.
    impl: "auto" (Triton on CUDA, torch elsewhere), "triton", "torch", "reference" (autograd).
    """
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {sorted(LOSS_AGGREGATIONS)}")
    for name, value in (("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high), ("beta", beta)):
        _check_number(name, value)
    if ref_logp is None and beta > 0:
        raise ValueError(f"beta={beta} > 0 needs ref_logp; pass reference log-probs or beta=0.0")
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (an int >= 1), got None")
        _check_int("max_completion_length", max_completion_length, 1)
    _check_int("num_microbatches", num_microbatches, 1)
    if num_tokens is not None:
        _check_number("num_tokens", num_tokens, positive=True)
    if not isinstance(logp, Tensor) or logp.dim() != 1:
        raise ValueError(f"logp must be a 1-D tensor [N], got {getattr(logp, 'shape', type(logp).__name__)}")
    _check_float_tensor("logp", logp, (logp.shape,), None)
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("token_weights", token_weights)):
        if x is not None:
            _check_float_tensor(name, x, (logp.shape,), logp.device)
    _check_cu_seqlens(cu_seqlens, logp, token_weights)
    n, num_local_sequences = logp.numel(), cu_seqlens.numel() - 1
    _check_float_tensor("advantages", advantages, ((n,), (num_local_sequences,)), logp.device)
    if num_sequences is None:
        num_sequences = num_local_sequences
    else:
        _check_int("num_sequences", num_sequences, max(num_local_sequences, 1))
    impl = _resolve_impl(impl, logp)

    if n == 0:  # a zero that is still connected to logp, so that backward() works on every rank
        loss = logp.sum().to(_compute_dtype(logp.dtype)) * 0.0
        return loss, dict.fromkeys(METRIC_NAMES, 0.0)

    old_logp = logp.detach() if old_logp is None else old_logp.detach()
    ref_logp = None if ref_logp is None else ref_logp.detach()
    seq_ids = sequence_ids(cu_seqlens, n)
    advantages = advantages.detach()
    if advantages.shape != (n,):
        advantages = advantages[seq_ids]
    weights = None if token_weights is None else token_weights.detach()
    if impl == "reference":
        return _reference_loss(logp, old_logp, ref_logp, advantages, seq_ids, num_local_sequences, weights,
                               loss_type, epsilon_low, epsilon_high, beta, max_completion_length,
                               num_sequences, num_tokens, num_microbatches)

    dtype = _compute_dtype(logp.dtype)
    scale_weights = torch.ones(n, dtype=dtype, device=logp.device) if weights is None else weights.to(dtype)
    batch = PackedBatch(seq_ids, cu_seqlens, scale_weights, num_sequences,
                        scale_weights.sum() if num_tokens is None else num_tokens,
                        num_microbatches, max_completion_length)
    scale = token_scales(loss_type, batch)
    params = GRPOLossParams(1.0 - epsilon_low, 1.0 + epsilon_high, float(beta), impl == "triton")
    loss, stats = GRPOLossFunction.apply(logp, old_logp, ref_logp, advantages, scale, weights, params)
    return loss, _metrics_from_stats(stats)
