"""Triton kernels of the token-level GRPO loss (grpo_loss.py holds the torch path, the aggregation
modes and the public functional; this module only launches kernels).

    _grpo_loss_fwd_kernel   per token: ratio, clipped surrogate, k3 KL; per program: the STAT_* sums
    _grpo_loss_bwd_kernel   per token: dloss/dlogp = grad_loss * scale * dl/dlogp
    grpo_loss_forward / grpo_loss_backward   their launchers (fp32 in, fp32 out)

Both kernels read the same four vectors and form the same ratio and clipping branches, in one
@triton.jit helper (`_ratio_branches`), so the forward and the backward cannot disagree on which
branch a token takes. Truncated importance sampling needs no kernel of its own: its weight is >= 0
and detached, so the callers fold it into the advantage (w * -min(r*A, clip(r)*A) =
-min(r*(w*A), clip(r)*(w*A))).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the `triton` extra is optional: the torch paths need nothing from it
    triton = None

from .grpo_params import GRPOLossParams

__all__ = ["NUM_STATS", "STAT_LOSS", "STAT_RATIO_MAX", "STAT_RATIO_MIN", "STAT_WEIGHT",
           "grpo_loss_backward", "grpo_loss_forward", "triton_configs"]

# Columns of the statistics the forward writes per program, [num_programs, NUM_STATS]: the loss
# (scaled), then weighted sums of 1, clip-low flags, clip-high flags, k3, ratio; max and min ratio.
NUM_STATS = 8
STAT_LOSS, STAT_WEIGHT, STAT_RATIO_MAX, STAT_RATIO_MIN = 0, 1, 6, 7

# One launch config: the work is ~25 flops per token, latency-bound at any N a trainer sees
# (64k tokens are 64 programs of 1024), so there is nothing to tune. Not yet timed on a GPU.
_BLOCK_SIZE = 1024
_NUM_WARPS = 4

if triton is not None:

    @triton.jit
    def _ratio_branches(logp_ptr, old_logp_ptr, advantages_ptr, scale_ptr, offsets, in_range,
                        ratio_low, ratio_high):
        """Loads one block and returns (logp, advantage, scale, ratio, unclipped, clipped):
        ratio = exp(logp - old), unclipped = ratio * A, clipped = clamp(ratio, low, high) * A."""
        logp = tl.load(logp_ptr + offsets, mask=in_range, other=0.0)
        old_logp = tl.load(old_logp_ptr + offsets, mask=in_range, other=0.0)
        advantage = tl.load(advantages_ptr + offsets, mask=in_range, other=0.0)
        scale = tl.load(scale_ptr + offsets, mask=in_range, other=0.0)
        ratio = tl.exp(logp - old_logp)
        unclipped = ratio * advantage
        clipped = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high) * advantage
        return logp, advantage, scale, ratio, unclipped, clipped

    @triton.jit(do_not_specialize=["n_tokens"])
    def _grpo_loss_fwd_kernel(
        logp_ptr,  # *fp32 [N] log-probs of the policy being trained
        old_logp_ptr,  # *fp32 [N] log-probs of the policy that sampled
        ref_logp_ptr,  # *fp32 [N] reference log-probs (read only when HAS_REF)
        advantages_ptr,  # *fp32 [N] per-token advantage (times the TIS weight when TIS is on)
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
        logp, advantage, scale, ratio, unclipped, clipped = _ratio_branches(
            logp_ptr, old_logp_ptr, advantages_ptr, scale_ptr, offsets, in_range, ratio_low, ratio_high)
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
        logp, advantage, scale, ratio, unclipped, clipped = _ratio_branches(
            logp_ptr, old_logp_ptr, advantages_ptr, scale_ptr, offsets, in_range, ratio_low, ratio_high)
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
