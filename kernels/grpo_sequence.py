"""Sequence-level importance ratio (GSPO, Zheng et al. 2025, "Group Sequence Policy Optimization").

GSPO replaces the per-token ratio by one ratio per sequence, the geometric mean of its token ratios,
and clips that:

    s_i = exp( sum_{t in i} w_t (logp_t - old_t) / W_i ),   W_i = sum_{t in i} w_t   (1 when W_i = 0)
    l_t = -min(s_i * A_t, clamp(s_i, 1 - eps_low, 1 + eps_high) * A_t) + beta * k3_t

The paper's objective is the mean over the group of -min(s_i A_i, clip(s_i) A_i). Here the sequence
ratio is broadcast to the sequence's tokens and the loss is aggregated by the loss_type's token
weights like every other objective (what TRL does): with loss_type="grpo" (a mean over sequences of
token means) that is exactly the paper's objective for per-sequence advantages; "bnpo"/"dapo"
weigh each sequence's term by its token count and "dr_grpo" by |y_i| / max_completion_length. The
k3 KL term stays per token. The ratio moves ~1/|y_i| as fast as a token ratio, so GSPO clips with
far smaller epsilons than GRPO: the paper (v2, section 5.1) uses eps_low = 3e-4, eps_high = 4e-4.

Everything here is [N] or [S] elementwise work, so it is plain torch (segment sums over cu_seqlens);
the loss and dloss/dlogp come out of one forward, and the fused LM-head pass uses the gradient as is.
"""

from __future__ import annotations

import torch

from .grpo_aggregation import _nonzero, segment_sums

__all__ = ["SequenceLossFunction", "compute_dtype", "sequence_loss_torch"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sequence_loss_torch(logp, old_logp, ref_logp, advantages, scale, weights, cu_seqlens, seq_ids,
                        ratio_low: float, ratio_high: float, beta: float):
    """GSPO loss, its gradient and its statistics, all in one pass.

    logp, old_logp, advantages (TIS weight folded in), scale (the aggregation weights) [N];
    ref_logp, weights [N] or None; cu_seqlens [S+1]; seq_ids [N] int64.
    Returns (loss [], dloss/dlogp [N] in logp's dtype, summary [8]) in float32 (float64 for float64
    logp), where summary = (token weight, weighted k3 sum, number of sequences with W_i > 0, of those
    clipped low, clipped high, sum, max and min of their ratios): sequence-level clip fractions.

    Gradient: s_i depends on every logp of sequence i, ds_i/dlogp_t = s_i w_t / W_i, so
        dloss/dlogp_t = s_i w_t / W_i * sum_{u in i} scale_u * dl_u/ds_i  +  scale_t * beta * (1 - exp(ref_t - logp_t))
    with dl_u/ds_i = -A_u on the unclipped branch (ties included, as at token level) and 0 where the
    clamp is active.
    """
    dtype = compute_dtype(logp.dtype)
    logp_c, old, adv, scale = (x.to(dtype) for x in (logp, old_logp, advantages, scale))
    w = torch.ones_like(logp_c) if weights is None else weights.to(dtype)
    seq_weight = segment_sums(w, cu_seqlens)
    log_ratio = segment_sums(w * (logp_c - old), cu_seqlens) / _nonzero(seq_weight)
    ratio = torch.exp(log_ratio)  # [S]
    token_ratio = ratio[seq_ids]
    unclipped = token_ratio * adv
    clipped = torch.clamp(token_ratio, ratio_low, ratio_high) * adv
    take_unclipped = unclipped <= clipped
    token_loss = -torch.where(take_unclipped, unclipped, clipped)
    dloss_dratio = segment_sums(scale * torch.where(take_unclipped, -adv, torch.zeros_like(adv)), cu_seqlens)
    grad = (ratio * dloss_dratio / _nonzero(seq_weight))[seq_ids] * w
    kl = torch.zeros_like(logp_c)
    if ref_logp is not None:
        log_ref_ratio = ref_logp.to(dtype) - logp_c
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
        if beta != 0.0:
            token_loss = token_loss + beta * kl
            grad = grad + scale * beta * (1.0 - torch.exp(log_ref_ratio))
    loss = (scale * token_loss).sum()

    counted = seq_weight > 0
    sign = segment_sums(w * adv, cu_seqlens)  # the sequence's advantage sign (per-sequence A: its sign)
    clip_low = counted & (sign < 0) & (ratio < ratio_low)
    clip_high = counted & (sign > 0) & (ratio > ratio_high)
    summary = torch.stack([
        w.sum(), (w * kl).sum(), counted.sum().to(dtype), clip_low.sum().to(dtype), clip_high.sum().to(dtype),
        torch.where(counted, ratio, 0.0).sum(), torch.where(counted, ratio, -torch.inf).amax(),
        torch.where(counted, ratio, torch.inf).amin(),
    ])
    return loss, grad.to(logp.dtype), summary


class SequenceLossFunction(torch.autograd.Function):
    """(logp, old_logp, ref_logp, advantages, scale, weights, cu_seqlens, seq_ids, ratio_low,
    ratio_high, beta) -> (loss [], summary [8]); differentiable in logp only. The gradient is
    computed in the forward (it needs the whole sequence) and scaled by the upstream one."""

    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, advantages, scale, weights, cu_seqlens, seq_ids,
                ratio_low, ratio_high, beta):
        loss, grad, summary = sequence_loss_torch(logp, old_logp, ref_logp, advantages, scale, weights,
                                                  cu_seqlens, seq_ids, ratio_low, ratio_high, beta)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(summary)
        return loss, summary

    @staticmethod
    def backward(ctx, grad_loss, grad_summary):
        (grad,) = ctx.saved_tensors
        return (grad_loss.to(grad.dtype) * grad, *([None] * 10))
