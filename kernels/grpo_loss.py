"""GRPO per-token loss: policy ratio, clipping, k3 KL and the loss-aggregation modes.

Layers (the kernel contract in docs/architecture.md): the Triton kernels and their launchers ``grpo_loss_forward``/
``grpo_loss_backward`` (in grpo_loss_triton.py); the same math in torch (``grpo_loss_forward_torch``/
``grpo_loss_backward_torch``); ``GRPOLossFunction``; and the functional ``grpo_token_loss``.
``impl="reference"`` is the plain torch formula differentiated by autograd.

Every per-token tensor is ``[N]``, so nothing here is big: the kernels exist to fuse ~20 elementwise
ops and the metric reductions into one launch each way, not to save memory.

The aggregation modes live in ``LOSS_AGGREGATIONS`` (grpo_aggregation.py); each turns the packed
batch into one weight per token (``scale``), so that ``loss = sum_t scale_t * l_t`` and
``dloss/dlogp_t = scale_t * dl_t/dlogp_t``.

Options on top of the token-level objective, each one registry or flag, shared with fused_grpo_loss
through ``prepare_loss_inputs``:
- ``importance_sampling_level``: "token" (PPO/GRPO) or "sequence" (GSPO, grpo_sequence.py);
- the trainer/sampler mismatch corrections (sampler_correction.py), exclusive: truncated importance
  sampling (Yao et al. 2025, ``tis_cap``) or masking (``sampler_mask`` "token", IcePop, or
  "sequence"). Each is a detached weight >= 0 on the policy-gradient term of a token, folded into
  its advantage, so the kernels are unchanged; the k3 KL term is not weighted;
- ``sequence_mask`` (DAPO's overlong filtering): a masked sequence is treated as if it were not in
  the batch: its tokens get weight 0 and it counts neither in the default num_sequences nor in the
  default num_tokens (a caller that passes global counts must count only the kept sequences).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .grpo_params import GRPOLossParams
from .grpo_aggregation import LOSS_AGGREGATIONS, PackedBatch, _nonzero, sequence_ids, token_scales
from .grpo_loss_triton import (
    NUM_STATS,
    STAT_RATIO_MAX,
    STAT_RATIO_MIN,
    STAT_WEIGHT,
    grpo_loss_backward,
    grpo_loss_forward,
    triton,
    triton_configs,
)
from .grpo_sequence import SequenceLossFunction, compute_dtype, sequence_loss_torch
from .sampler_correction import (SAMPLER_MASKS, SAMPLER_METRIC_NAMES, TIS_METRIC_NAMES, check_correction_options,
                                 correction_metric_names, correction_weights, tis_weights)

__all__ = [
    "ADVANTAGE_LEVELS", "GRPOLossFunction", "GRPOLossParams", "IMPORTANCE_SAMPLING_LEVELS", "LOSS_AGGREGATIONS", "LossInputs",
    "METRIC_NAMES", "NUM_STATS", "PackedBatch", "RATIO_UNIT_METRIC_NAMES", "SAMPLER_MASKS", "SAMPLER_METRIC_NAMES",
    "TIS_METRIC_NAMES", "finish_metrics", "grpo_loss_backward",
    "grpo_loss_backward_torch", "grpo_loss_forward", "grpo_loss_forward_torch", "grpo_token_loss",
    "kl_grad_torch", "loss_grad", "loss_value", "prepare_loss_inputs", "sequence_ids", "tis_weights",
    "token_scales", "triton_configs", "zero_metrics",
]

IMPLS = ("auto", "triton", "torch", "reference")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# What one advantage belongs to: said by the caller, never guessed from the shape ([S] and [N] are
# the same shape when every completion has one token, or some have none).
ADVANTAGE_LEVELS = ("sequence", "token")
METRIC_NAMES = ("clip_low_frac", "clip_high_frac", "clip_frac", "kl_mean",
                "ratio_mean", "ratio_max", "ratio_min")
# TIS_METRIC_NAMES / SAMPLER_METRIC_NAMES (sampler_correction.py): with tis_cap > 0 / sampler_mask.
# The metrics over the ratio's units (weighted tokens, or sequences with weight at the sequence
# level); the others (kl_mean, TIS_METRIC_NAMES, SAMPLER_METRIC_NAMES) are over weighted tokens.
RATIO_UNIT_METRIC_NAMES = ("clip_low_frac", "clip_high_frac", "clip_frac", "ratio_mean", "ratio_max", "ratio_min")


# -------- The same math in torch, and the autograd Function ---------------------------------------


def _ratio_and_branches(logp, old_logp, advantages, params):
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, params.ratio_low, params.ratio_high) * advantages
    return ratio, unclipped, clipped


def grpo_loss_forward_torch(logp, old_logp, ref_logp, advantages, scale, weights,
                            params: GRPOLossParams):
    """Torch forward, the kernel's math: inputs [N] -> (loss [], stats [1, 8]) in float32 (float64
    for float64 logp)."""
    dtype = compute_dtype(logp.dtype)
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


def kl_grad_torch(logp, ref_logp, scale, beta: float):
    """scale * d(beta * k3)/dlogp = scale * beta * (1 - exp(ref - logp)), [N] in logp's (compute) dtype;
    zeros without ref_logp or with beta == 0."""
    if ref_logp is None or beta == 0.0:
        return torch.zeros_like(logp)
    return scale * beta * (1.0 - torch.exp(ref_logp.to(logp.dtype) - logp))


def grpo_loss_backward_torch(grad_loss, logp, old_logp, ref_logp, advantages, scale,
                             params: GRPOLossParams):
    """Torch backward, the kernel's math: grad_loss [] -> dloss/dlogp [N] in logp's dtype."""
    dtype = compute_dtype(logp.dtype)
    logp_c, old_logp, advantages, scale = (x.to(dtype) for x in (logp, old_logp, advantages, scale))
    _, unclipped, clipped = _ratio_and_branches(logp_c, old_logp, advantages, params)
    grad = scale * torch.where(unclipped <= clipped, -unclipped, torch.zeros_like(unclipped))
    grad = grad + kl_grad_torch(logp_c, ref_logp, scale, params.beta)
    return (grad_loss.to(dtype) * grad).to(logp.dtype)


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


# -------- Metrics ---------------------------------------------------------------------------------
# A loss path reports a summary [8]: (token weight, weighted k3 sum, ratio units, clip-low units,
# clip-high units, ratio sum over units, ratio max, ratio min). Units are weighted tokens at token
# level and sequences with weight at sequence level, so clip fractions are per sequence for GSPO.


def _metrics_dict(token_weight, kl, units, clip_low, clip_high, ratio, ratio_max, ratio_min, *correction,
                  names: tuple[str, ...] = ()) -> dict[str, float]:
    """Sums (python floats) -> METRIC_NAMES (+ the correction's `names`, one weighted sum each: a
    token mean); all zeros when no token has weight."""
    if token_weight <= 0:
        return zero_metrics(names)
    extra = {name: value / token_weight for name, value in zip(names, correction, strict=True)}
    return {
        "clip_low_frac": clip_low / units, "clip_high_frac": clip_high / units,
        "clip_frac": (clip_low + clip_high) / units, "kl_mean": kl / token_weight,
        "ratio_mean": ratio / units, "ratio_max": ratio_max, "ratio_min": ratio_min, **extra,
    }


def _summary_from_stats(stats: Tensor) -> Tensor:
    """Token-level stats [P, 8] (the STAT_* columns per program) -> the summary [8]."""
    sums = stats[:, STAT_WEIGHT:STAT_RATIO_MAX].sum(0)  # weight, clip low, clip high, kl, ratio
    return torch.stack([sums[0], sums[3], sums[0], sums[1], sums[2], sums[4],
                        stats[:, STAT_RATIO_MAX].max(), stats[:, STAT_RATIO_MIN].min()])


def finish_metrics(summary: Tensor, correction_sums: Tensor | None, names: tuple[str, ...] = ()) -> dict[str, float]:
    """summary [8] and the correction's sums [2] (or None) named `names` -> the metrics dict, one host sync."""
    parts = [summary.double()] + ([] if correction_sums is None else [correction_sums.double()])
    return _metrics_dict(*torch.cat(parts).tolist(), names=names)


def zero_metrics(names: tuple[str, ...] = ()) -> dict[str, float]:
    return dict.fromkeys(METRIC_NAMES + tuple(names), 0.0)


# -------- Inputs shared by grpo_token_loss and fused_grpo_loss -------------------------------------


@dataclass(frozen=True)
class LossInputs:
    """Everything derived from the loss arguments before logp is known (all [N] detached, except
    cu_seqlens [S+1]). old_logp None: the ratio's old side is logp itself. sampler_logp is set only
    when a sampler correction (TIS or sampler_mask) is on. weights: token weights with the sequence
    mask folded in (None: all ones). advantages: per token, before the correction's weight (which
    needs old_logp, so possibly logp)."""

    old_logp: Tensor | None
    ref_logp: Tensor | None
    advantages: Tensor
    sampler_logp: Tensor | None
    weights: Tensor | None
    scale: Tensor
    cu_seqlens: Tensor
    seq_ids: Tensor
    num_sequences: int
    params: GRPOLossParams

    def old(self, logp: Tensor, rows: slice = slice(None)) -> Tensor:
        """The old log-probs of the tokens `rows`, whose current log-probs are logp."""
        return logp.detach() if self.old_logp is None else self.old_logp[rows]

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The sampler correction's metric names (none when it is off)."""
        return correction_metric_names(self.params.tis_cap, self.params.sampler_mask)

    def correction(self, logp: Tensor, rows: slice = slice(None)) -> tuple[Tensor, Tensor] | None:
        """(weight, capped-or-masked flag) of the tokens `rows`, or None without a correction. The
        sequence mask needs whole sequences: it is computed over all N tokens and sliced, so with
        old_logp None, logp must then cover all N tokens (fused_forward_torch passes a first pass's).
        The chunked path recomputes it per chunk: [N] elementwise work beside a chunk's [chunk, V] logits."""
        if self.sampler_logp is None:
            return None
        dtype = self.advantages.dtype
        take = slice(None) if self.params.sampler_mask == "sequence" else rows
        old = self.old(logp, take)
        if old.shape != self.sampler_logp[take].shape:
            raise RuntimeError("sampler_mask='sequence' needs the old log-probs of every token, got a chunk of logp")
        weight, flag = correction_weights(old.to(dtype), self.sampler_logp[take].to(dtype), self.params,
                                          self.cu_seqlens, self.seq_ids, self.weights)
        return (weight, flag) if take == rows else (weight[rows], flag[rows])

    def effective_advantages(self, logp: Tensor, rows: slice = slice(None)) -> Tensor:
        """Advantages of the tokens `rows` times their correction weight (when one is on)."""
        correction = self.correction(logp, rows)
        return self.advantages[rows] if correction is None else self.advantages[rows] * correction[0]

    def correction_sums(self, logp: Tensor) -> Tensor | None:
        """[2] weighted sums of the correction weight and of the capped/masked flags, or None."""
        correction = self.correction(logp)
        if correction is None:
            return None
        weight, flag = correction
        w = torch.ones_like(weight) if self.weights is None else self.weights.to(weight.dtype)
        return torch.stack([(w * weight).sum(), (w * flag).sum()])


def loss_value(logp: Tensor, inputs: LossInputs) -> tuple[Tensor, Tensor]:
    """(loss [], summary [8]) of logp [N], without autograd, on the path inputs.params selects."""
    p = inputs.params
    old, adv = inputs.old(logp), inputs.effective_advantages(logp)
    if p.importance_sampling_level == "sequence":
        loss, _, summary = sequence_loss_torch(logp, old, inputs.ref_logp, adv, inputs.scale, inputs.weights,
                                               inputs.cu_seqlens, inputs.seq_ids, p.ratio_low, p.ratio_high, p.beta)
        return loss, summary
    forward = grpo_loss_forward if p.use_triton else grpo_loss_forward_torch
    loss, stats = forward(logp, old, inputs.ref_logp, adv, inputs.scale, inputs.weights, p)
    return loss, _summary_from_stats(stats)


def loss_grad(logp: Tensor, inputs: LossInputs, rows: slice = slice(None)) -> Tensor:
    """dloss/dlogp (upstream gradient 1) of the tokens `rows`, given their logp. The sequence level
    needs whole sequences: rows must then cover all N tokens."""
    p = inputs.params
    ref = None if inputs.ref_logp is None else inputs.ref_logp[rows]
    old, adv, scale = inputs.old(logp, rows), inputs.effective_advantages(logp, rows), inputs.scale[rows]
    if p.importance_sampling_level == "sequence":
        return sequence_loss_torch(logp, old, ref, adv, scale, inputs.weights, inputs.cu_seqlens, inputs.seq_ids,
                                   p.ratio_low, p.ratio_high, p.beta)[1]
    one = torch.ones((), device=logp.device, dtype=torch.float32)
    backward = grpo_loss_backward if p.use_triton else grpo_loss_backward_torch
    return backward(one, logp, old, ref, adv, scale, p)


# -------- Reference: the formula as written, differentiated by autograd ---------------------------


def _reference_loss(logp, inputs: LossInputs, loss_type, epsilon_low, epsilon_high, beta,
                    max_completion_length, num_tokens, num_microbatches):
    dtype = compute_dtype(logp.dtype)
    seq_ids, num_sequences = inputs.seq_ids, inputs.num_sequences
    num_local_sequences = inputs.cu_seqlens.numel() - 1
    logp, old_logp, advantages = logp.to(dtype), inputs.old(logp).to(dtype), inputs.advantages.to(dtype)
    weights = torch.ones_like(logp) if inputs.weights is None else inputs.weights.to(dtype)
    zeros = torch.zeros(num_local_sequences, dtype=dtype, device=logp.device)
    p = inputs.params
    if inputs.sampler_logp is not None:  # the corrections as their formulas (sampler_correction.py)
        log_r = old_logp - inputs.sampler_logp.to(dtype)
        if p.tis_cap > 0:
            advantages = advantages * torch.exp(log_r).clamp(max=p.tis_cap)
        else:
            if p.sampler_mask == "sequence":
                log_r = zeros.index_add(0, seq_ids, torch.where(weights > 0, log_r, 0.0))[seq_ids]
            inside = log_r.abs() <= math.log(p.sampler_mask_cap)
            advantages = advantages * torch.where(inside, torch.exp(torch.where(inside, log_r, 0.0)), 0.0)
    seq_weight = zeros.index_add(0, seq_ids, weights)
    sequence_level = inputs.params.importance_sampling_level == "sequence"
    if sequence_level:
        seq_ratio = torch.exp(zeros.index_add(0, seq_ids, weights * (logp - old_logp)) / _nonzero(seq_weight))
        ratio = seq_ratio[seq_ids]
    else:
        ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages
    # where() takes the unclipped branch on ties, as the kernels do. (torch.minimum splits a tie's
    # gradient between both branches, which then carry the same gradient: clamp passes it at its bounds.)
    per_token = -torch.where(unclipped <= clipped, unclipped, clipped)
    kl = torch.zeros_like(logp)
    if inputs.ref_logp is not None:
        kl = torch.exp(inputs.ref_logp.to(dtype) - logp) - (inputs.ref_logp.to(dtype) - logp) - 1
        if beta != 0:
            per_token = per_token + beta * kl
    weighted = per_token * weights
    total_weight = weights.sum()
    if loss_type == "grpo":
        loss = (zeros.index_add(0, seq_ids, weighted) / _nonzero(seq_weight)).sum() / num_sequences
    elif loss_type == "bnpo":
        loss = weighted.sum() / _nonzero(total_weight) / num_microbatches
    elif loss_type == "dr_grpo":
        loss = weighted.sum() / (num_sequences * max_completion_length)
    elif loss_type == "dapo":
        loss = weighted.sum() / (_nonzero(total_weight) if num_tokens is None else num_tokens)
    else:
        raise NotImplementedError(f"no reference for loss_type {loss_type!r}: add one beside the registry's")
    with torch.no_grad():
        if sequence_level:  # one unit per sequence with weight; the sign of its weighted advantage
            unit, ratio_u = (seq_weight > 0).to(dtype), seq_ratio.detach()
            sign = zeros.index_add(0, seq_ids, weights * advantages)
        else:
            unit, ratio_u, sign = weights, ratio.detach(), advantages
        low = ((sign < 0) & (ratio_u < 1 - epsilon_low)).to(dtype)
        high = ((sign > 0) & (ratio_u > 1 + epsilon_high)).to(dtype)
        counted = unit > 0
        values = [total_weight, (weights * kl).sum(), unit.sum(), (unit * low).sum(), (unit * high).sum(),
                  (unit * ratio_u).sum(), torch.where(counted, ratio_u, -math.inf).max(),
                  torch.where(counted, ratio_u, math.inf).min()]
        correction = inputs.correction_sums(logp)
        values = torch.stack(values).tolist() + ([] if correction is None else correction.tolist())
    return loss, _metrics_dict(*values, names=inputs.metric_names)
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


def _check_sequence_mask(sequence_mask, num_local_sequences: int, device) -> None:
    if not isinstance(sequence_mask, Tensor) or sequence_mask.dtype != torch.bool:
        got = sequence_mask.dtype if isinstance(sequence_mask, Tensor) else type(sequence_mask).__name__
        raise TypeError(f"sequence_mask must be a bool tensor [S] (True: the sequence is trained on), got {got}")
    if sequence_mask.shape != (num_local_sequences,):
        raise ValueError(f"sequence_mask must have shape ({num_local_sequences},), got {tuple(sequence_mask.shape)}")
    if sequence_mask.device != device:
        raise ValueError(f"sequence_mask is on {sequence_mask.device}, logp on {device}")


def prepare_loss_inputs(logp: Tensor, old_logp, ref_logp, advantages, cu_seqlens, *, loss_type: str,
                        epsilon_low, epsilon_high, beta, max_completion_length, num_sequences, num_tokens,
                        num_microbatches, token_weights, importance_sampling_level: str, sampler_logp,
                        tis_cap, sequence_mask, use_triton: bool, advantage_level: str = "sequence",
                        sampler_mask: str = "none", sampler_mask_cap: float = 2.0) -> LossInputs:
    """Checks grpo_token_loss's arguments (ValueError/TypeError naming the value and what is allowed)
    and derives LossInputs. logp: the log-probs [N], or a stand-in of their shape, dtype and device
    (fused_grpo_loss, which computes them later). One host sync (two with sequence_mask)."""
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {sorted(LOSS_AGGREGATIONS)}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; "
                         f"valid: {list(IMPORTANCE_SAMPLING_LEVELS)}")
    if advantage_level not in ADVANTAGE_LEVELS:
        raise ValueError(f"unknown advantage_level {advantage_level!r}; valid: {list(ADVANTAGE_LEVELS)}")
    for name, value in (("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high), ("beta", beta),
                        ("tis_cap", tis_cap)):
        _check_number(name, value)
    if ref_logp is None and beta > 0:
        raise ValueError(f"beta={beta} > 0 needs ref_logp; pass reference log-probs or beta=0.0")
    if tis_cap > 0 and sampler_logp is None:
        raise ValueError(f"tis_cap={tis_cap} > 0 needs sampler_logp (the rollout engine's log-probs of the "
                         f"sampled tokens); pass them or tis_cap=0.0")
    check_correction_options(tis_cap, sampler_mask, sampler_mask_cap, sampler_logp)
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
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("token_weights", token_weights),
                    ("sampler_logp", sampler_logp)):
        if x is not None:
            _check_float_tensor(name, x, (logp.shape,), logp.device)
    _check_cu_seqlens(cu_seqlens, logp, token_weights)
    n, num_local_sequences = logp.numel(), cu_seqlens.numel() - 1
    per_sequence = advantage_level == "sequence"
    expected = (num_local_sequences,) if per_sequence else (n,)
    if isinstance(advantages, Tensor) and advantages.shape != expected:
        raise ValueError(f"advantages must have shape {expected}, one per {advantage_level} "
                         f"(advantage_level={advantage_level!r}), got {tuple(advantages.shape)}")
    _check_float_tensor("advantages", advantages, (expected,), logp.device)
    kept = num_local_sequences
    if sequence_mask is not None:
        _check_sequence_mask(sequence_mask, num_local_sequences, logp.device)
        kept = int(sequence_mask.sum())
    if num_sequences is None:
        num_sequences = max(kept, 1)
    else:
        _check_int("num_sequences", num_sequences, max(kept, 1))

    dtype = compute_dtype(logp.dtype)
    seq_ids = sequence_ids(cu_seqlens, n)
    advantages = advantages.detach().to(dtype)
    if per_sequence:
        advantages = advantages[seq_ids]
    weights = None if token_weights is None else token_weights.detach().to(dtype)
    if sequence_mask is not None:
        keep = sequence_mask[seq_ids].to(dtype)
        weights = keep if weights is None else weights * keep
    scale_weights = torch.ones(n, dtype=dtype, device=logp.device) if weights is None else weights
    batch = PackedBatch(seq_ids, cu_seqlens, scale_weights, num_sequences,
                        scale_weights.sum() if num_tokens is None else num_tokens,
                        num_microbatches, max_completion_length)
    params = GRPOLossParams(1.0 - epsilon_low, 1.0 + epsilon_high, float(beta), use_triton,
                            importance_sampling_level, float(tis_cap), sampler_mask, float(sampler_mask_cap))
    return LossInputs(
        old_logp=None if old_logp is None else old_logp.detach(),
        ref_logp=None if ref_logp is None else ref_logp.detach(),
        advantages=advantages, sampler_logp=sampler_logp.detach() if tis_cap > 0 or sampler_mask != "none" else None,
        weights=weights, scale=token_scales(loss_type, batch), cu_seqlens=cu_seqlens, seq_ids=seq_ids,
        num_sequences=num_sequences, params=params)


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
    importance_sampling_level: str = "token",
    sampler_logp: Tensor | None = None,
    tis_cap: float = 0.0,
    sequence_mask: Tensor | None = None,
    advantage_level: str = "sequence",
    sampler_mask: str = "none",
    sampler_mask_cap: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss over the completion tokens of packed sequences -> (loss [], metrics).

    Per token (w = token_weights, 1 when None, 0 in sequences where sequence_mask is False;
    r = exp(logp - old_logp); k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1):
        l = -where(r*A <= clamp(r, 1-eps_low, 1+eps_high)*A, r*A, clamp(r, ...)*A) + beta * k3
    where the unclipped branch wins ties, so dl/dlogp = -r*A there (the gradient torch.minimum gives too).
    importance_sampling_level="sequence" (GSPO) replaces r by the sequence's
    s_i = exp(sum_{t in i} w_t (logp_t - old_t) / sum_{t in i} w_t), clipped once per sequence and
    broadcast to its tokens (grpo_sequence.py; with loss_type "grpo" this is the paper's objective).
    tis_cap > 0 (truncated importance sampling) multiplies A by the detached
    min(exp(old_logp - sampler_logp), tis_cap) (old_logp None: logp); the k3 term is not weighted.
    sampler_mask "token" / "sequence" (exclusive with tis_cap) multiplies A by r (r_t, or the
    sequence's R_i) where 1/sampler_mask_cap <= r <= sampler_mask_cap, else by 0 (sampler_correction.py).
    Aggregation (S = num_sequences, default: the local sequences kept by sequence_mask;
    W_s = sum of w over sequence s):
        grpo    sum_s (sum_{t in s} w_t l_t / W_s) / S          (a sequence with W_s = 0 adds 0)
        bnpo    sum_t w_t l_t / sum_t w_t / num_microbatches    (normalized per micro-batch, as TRL)
        dr_grpo sum_t w_t l_t / (S * max_completion_length)
        dapo    sum_t w_t l_t / num_tokens                      (global weighted count; default local)
    With num_sequences / num_tokens set to the global batch's counts, the losses of micro-batches sum
    to the loss of the whole batch (grpo, dr_grpo, dapo). A masked sequence is as if it were absent:
    global counts passed in must leave masked sequences out.

    Shapes: logp, old_logp, ref_logp, token_weights, sampler_logp [N] float; advantages [S] (one per
    sequence, broadcast to its tokens) with advantage_level="sequence" (the default), [N] (one per
    token) with advantage_level="token" (the level is never guessed from the shape: N == S happens);
    cu_seqlens [S+1] int32/int64, 0 = cu_seqlens[0] <= ... <= cu_seqlens[S] = N;
    sequence_mask [S] bool (True: trained on).
    old_logp None means logp.detach() (r = 1). ref_logp None requires beta == 0 (kl_mean is then 0).
    sampler_logp is read only when tis_cap > 0 or sampler_mask != "none", and then required.
    Gradients flow to logp only. Tokens with weight 0 must still hold finite values (they are
    multiplied by 0). The loss is float32 (float64 for float64 logp); nothing [N x anything] is built.
    metrics: METRIC_NAMES as python floats over the weighted tokens (ratio_max/min over tokens with
    w > 0); at the sequence level the clip fractions and ratio statistics are over sequences with
    weight (one each), kl_mean stays a token mean. With tis_cap > 0 also TIS_METRIC_NAMES: the
    weighted mean TIS weight and the weighted fraction of tokens whose weight hit the cap; with
    sampler_mask, SAMPLER_METRIC_NAMES: the mean weight and the fraction masked, likewise. All 0.0
    when no token has weight. Two host syncs (three with sequence_mask): validation and the metrics.
    impl: "auto" (Triton on CUDA, torch elsewhere), "triton", "torch", "reference" (autograd). The
    sequence level is torch ops (segment sums) for every impl but "reference".
    """
    if not isinstance(logp, Tensor) or logp.dim() != 1:
        raise ValueError(f"logp must be a 1-D tensor [N], got {getattr(logp, 'shape', type(logp).__name__)}")
    impl = _resolve_impl(impl, logp)
    inputs = prepare_loss_inputs(
        logp, old_logp, ref_logp, advantages, cu_seqlens, loss_type=loss_type, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, beta=beta, max_completion_length=max_completion_length,
        num_sequences=num_sequences, num_tokens=num_tokens, num_microbatches=num_microbatches,
        token_weights=token_weights, importance_sampling_level=importance_sampling_level,
        sampler_logp=sampler_logp, tis_cap=tis_cap, sequence_mask=sequence_mask, use_triton=impl == "triton",
        advantage_level=advantage_level, sampler_mask=sampler_mask, sampler_mask_cap=sampler_mask_cap)

    if logp.numel() == 0:  # a zero that is still connected to logp, so that backward() works on every rank
        loss = logp.sum().to(compute_dtype(logp.dtype)) * 0.0
        return loss, zero_metrics(inputs.metric_names)
    if impl == "reference":
        return _reference_loss(logp, inputs, loss_type, epsilon_low, epsilon_high, beta, max_completion_length,
                               num_tokens, num_microbatches)
    p = inputs.params
    old, adv = inputs.old(logp), inputs.effective_advantages(logp)
    if p.importance_sampling_level == "sequence":
        loss, summary = SequenceLossFunction.apply(logp, old, inputs.ref_logp, adv, inputs.scale, inputs.weights,
                                                   inputs.cu_seqlens, inputs.seq_ids, p.ratio_low, p.ratio_high,
                                                   p.beta)
    else:
        loss, stats = GRPOLossFunction.apply(logp, old, inputs.ref_logp, adv, inputs.scale, inputs.weights, p)
        summary = _summary_from_stats(stats)
    return loss, finish_metrics(summary, inputs.correction_sums(logp), inputs.metric_names)
