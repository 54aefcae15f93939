"""Corrections for the trainer/sampler mismatch: one detached weight per token on the policy-gradient term.

The rollout engine samples from a slightly different distribution than the trainer computes (bf16
vLLM against the trainer's kernels, or a stale engine), so the sampled tokens are off-policy by
r_t = exp(old_t - sampler_t), old_t being the trainer's log-prob before the update. Two exclusive
corrections, each a weight c_t >= 0 that multiplies the advantage of token t (so the loss kernels are
unchanged; the k3 KL term is never weighted: it regularizes the trained policy towards the
reference, it is not an estimate of the rollout policy's objective):

- truncated importance sampling (``tis_cap``; Yao et al. 2025, as verl's tis_imp_ratio_cap):
  c_t = min(r_t, tis_cap); metrics TIS_METRIC_NAMES (mean weight, fraction capped);
- masking (``sampler_mask``, cap C = ``sampler_mask_cap`` > 1), metrics SAMPLER_METRIC_NAMES (mean
  weight, fraction masked):
    "token"     IcePop (Ring-1T report): c_t = r_t if 1/C <= r_t <= C, else 0;
    "sequence"  c_t = R_i if 1/C <= R_i <= C, else 0 for every token of sequence i, with
                R_i = exp(sum_{t in i, w_t > 0} (old_t - sampler_t)): the ratio of the whole
                sequence's probabilities. TRL's sequence_mask mode masks only above C; here both
                sides are masked, as a sequence the trainer finds far less likely than the sampler
                did is as far off-policy as one it finds far more likely.
  Tokens with weight w_t = 0 (masked by the caller) are left out of R_i: nothing says the sampler
  produced them. The bounds are compared in the log domain, |log r| <= log C, so a long sequence's
  summed log ratio never overflows exp; only kept ratios are exponentiated.
  A masked token keeps its place in the normalizers (the token and sequence counts of the loss
  aggregation), as TRL does: masking changes which tokens move the policy, not the loss scale.

With num_iterations = 1 the trainer's old log-probs are the weights before the step, the proximal
policy of the decoupled PPO objective (AReaL, arXiv 2505.24298), and the sampler is its behaviour
policy: the clip stays around the proximal policy and the sampler only enters through c_t, so either
correction turns stale rollouts into that objective.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .grpo_aggregation import segment_sums

__all__ = ["SAMPLER_MASKS", "SAMPLER_METRIC_NAMES", "TIS_METRIC_NAMES", "check_correction_options",
           "correction_metric_names", "correction_weights", "tis_weights"]

SAMPLER_MASKS = ("none", "token", "sequence")
TIS_METRIC_NAMES = ("tis_weight_mean", "tis_clipped_frac")  # present when tis_cap > 0
SAMPLER_METRIC_NAMES = ("sampler_weight_mean", "sampler_masked_frac")  # present when sampler_mask != "none"
_FAR = 1e4  # a token log ratio beyond any log C (a finite float C is below exp(710))


def correction_metric_names(tis_cap: float, sampler_mask: str) -> tuple[str, ...]:
    if tis_cap > 0:
        return TIS_METRIC_NAMES
    return SAMPLER_METRIC_NAMES if sampler_mask != "none" else ()


def tis_weights(trainer_logp: Tensor, sampler_logp: Tensor, cap: float) -> Tensor:
    """[N] min(exp(trainer_logp - sampler_logp), cap): the truncated importance weight of each
    sampled token (trainer_logp: the trainer's log-prob of the rollout policy, i.e. old_logp)."""
    return torch.exp(trainer_logp - sampler_logp).clamp(max=cap)


def correction_weights(old: Tensor, sampler: Tensor, params, cu_seqlens: Tensor, seq_ids: Tensor,
                       weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """(c [N], flag [N] bool) for params (GRPOLossParams) with tis_cap > 0 or sampler_mask != "none":
    the weight of each token and whether it was capped (TIS) or masked. old, sampler [N] in one
    float dtype; the "sequence" mask needs every token of the batch (cu_seqlens, seq_ids, weights
    are the whole batch's)."""
    if params.tis_cap > 0:
        raw = torch.exp(old - sampler)
        return raw.clamp(max=params.tis_cap), raw > params.tis_cap
    log_ratio = old - sampler
    if params.sampler_mask == "sequence":
        # One non-finite token would poison every later sequence's sum (the segment sums are
        # differences of a running sum); _FAR is still masked alone, as NaN or +-inf are.
        finite = log_ratio.nan_to_num(nan=_FAR, posinf=_FAR, neginf=-_FAR).clamp(-_FAR, _FAR)
        counted = finite if weights is None else torch.where(weights > 0, finite, 0.0)
        log_ratio = segment_sums(counted, cu_seqlens)[seq_ids]
    kept = log_ratio.abs() <= math.log(params.sampler_mask_cap)  # False for NaN: masked
    weight = torch.where(kept, torch.exp(torch.where(kept, log_ratio, 0.0)), 0.0)
    return weight, ~kept


def check_correction_options(tis_cap: float, sampler_mask, sampler_mask_cap, sampler_logp) -> None:
    """ValueError/TypeError naming the argument and what is allowed (tis_cap itself is checked by the caller)."""
    if sampler_mask not in SAMPLER_MASKS:
        raise ValueError(f"unknown sampler_mask {sampler_mask!r}; valid: {list(SAMPLER_MASKS)}")
    if sampler_mask == "none":
        return
    if isinstance(sampler_mask_cap, bool) or not isinstance(sampler_mask_cap, (int, float)):
        raise TypeError(f"sampler_mask_cap must be an int or float, got {sampler_mask_cap!r}")
    if not (math.isfinite(sampler_mask_cap) and sampler_mask_cap > 1):
        raise ValueError(f"sampler_mask_cap must be a finite number > 1 (tokens are kept inside "
                         f"[1/cap, cap]), got {sampler_mask_cap}")
    if tis_cap > 0:
        raise ValueError(f"tis_cap={tis_cap} and sampler_mask={sampler_mask!r} are two corrections of the same "
                         f"mismatch: pass one (tis_cap=0.0 or sampler_mask='none')")
    if sampler_logp is None:
        raise ValueError(f"sampler_mask={sampler_mask!r} needs sampler_logp (the rollout engine's log-probs of "
                         f"the sampled tokens); pass them or sampler_mask='none'")
