"""The GRPO loss straight from hidden states in one pass: log-probs, loss and both input gradients.

    loss, logp, entropy, metrics = fused_grpo_loss(hidden, weight, targets, old_logp, ref_logp,
                                                   advantages, cu_seqlens)
    == grpo_token_loss(token_logprobs(hidden, weight, targets, temperature), old_logp, ref_logp,
                       advantages, cu_seqlens, ...)

Why a second entry point: the loss is a weighted sum of per-token terms, loss = sum_t scale_t *
l(logp_t), with scale_t fixed by the batch (grpo_loss.token_scales). So dloss/dlogp_t is known as soon
as logp_t is, and the forward can finish the whole gradient chunk by chunk: logits = h_c @ W.T once,
then grad_hidden[c] = dlogits @ W and grad_weight += dlogits.T @ h_c. Three matmul-sized products in
all, against four for token_logprobs + grpo_token_loss, whose backward must recompute the logits. The
backward only multiplies the saved gradients by the upstream scalar.

Layers:
    fused_forward_torch / fused_forward_triton   one pass -> logp, entropy, grad_hidden, grad_weight
    FusedGRPOFunction                            autograd.Function, options in FusedGRPOParams
    fused_grpo_loss                              the public functional; impl="reference" is the
                                                 unfused naive composition, differentiated by autograd

Nothing here has its own copy of the loss: the per-token derivative, the loss value, the metrics and
the aggregation weights all come from grpo_loss (prepare_loss_inputs, loss_grad, loss_value), and the
Triton path runs logprob's existing kernels (forward, then backward with dloss/dlogp).
The Triton path therefore still computes the logits twice (its backward kernel recomputes them).

The sequence level (GSPO) breaks "dloss/dlogp_t is known as soon as logp_t is": the ratio s_i needs
every logp of sequence i. The Triton path has all logp before its backward anyway. The torch path
then runs a logp-only chunked pass first (4 matmul-sized products instead of 3), except with
old_logp None and no TIS, where s_i = 1 whatever logp is and the policy-gradient part of the
gradient is known up front (one pass, the k3 part added per chunk). The sequence-level sampler mask
(sampler_mask="sequence") breaks it at either level when old_logp is None: each token's weight
needs its whole sequence's old log-probs, which are then this pass's, so the same first pass runs.

Memory: O(chunk x V) on the torch path (one fp32 [chunk, V] buffer, two with entropy; chunk =
max(512, 2**25 // V) tokens by default), plus the gradients held from the forward to the backward:
grad_hidden [N, H] and grad_weight [V, H] (fp32 while accumulating for 16-bit weights), which the
backward hands to autograd without a copy.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import grpo_loss as gl
from . import logprob as lp

__all__ = ["FUSED_CHUNK_ELEMENTS", "MIN_CHUNK_TOKENS", "FusedGRPOFunction", "FusedGRPOParams",
           "fused_forward_torch", "fused_forward_triton", "fused_grpo_loss"]

# Chunk of the torch path: FUSED_CHUNK_ELEMENTS // V tokens, but never fewer than MIN_CHUNK_TOKENS.
# Each chunk streams the whole weight (and grad_weight) through memory, so on a CPU short chunks are
# memory-bound at a large vocabulary. Measured (fp32, fwd+bwd, CPU time on 2 threads, best of 4,
# time / the three bare matmuls; the machine was shared, so +-5%):
#   N=2048, H=576, V=49,152:  chunks of 256 / 341 / 512 / 682 / 1024 tokens: 1.34 / 1.31 / 1.26 / 1.22 / 1.19
#   N=512, H=1,536, V=151,936: 64 / 110 / 220 / 512 tokens:                  1.63 / 1.42 / 1.27 / 1.09
# (token_logprobs + grpo_token_loss, which computes the logits twice: 1.63 and 1.54.)
# 2**25 elements = a 128 MiB fp32 buffer (682 tokens at V=49,152); at V=151,936 the 512-token floor
# makes it 311 MB, a third of that vocabulary's fp32 grad_weight (934 MB at H=1,536).
FUSED_CHUNK_ELEMENTS = 2**25
MIN_CHUNK_TOKENS = 512


@dataclass(frozen=True)
class FusedGRPOParams:
    """Every option of FusedGRPOFunction.

    impl: "torch" or "triton" (already resolved); the loss's options travel in grpo_loss.LossInputs.
    chunk_tokens: tokens per chunk of the torch path (None: max(MIN_CHUNK_TOKENS,
      FUSED_CHUNK_ELEMENTS // V)).
    hidden_needs_grad / weight_needs_grad: which gradients the forward computes (a frozen LM head
    saves one of the three products).
    """

    temperature: float
    return_entropy: bool
    impl: str
    chunk_tokens: int | None = None
    hidden_needs_grad: bool = True
    weight_needs_grad: bool = True


def _chunk_tokens(n: int, v: int, params: FusedGRPOParams) -> int:
    chunk = params.chunk_tokens or max(MIN_CHUNK_TOKENS, FUSED_CHUNK_ELEMENTS // max(v, 1))
    return max(1, min(n, chunk))


def _torch_chunk(rows: slice, hidden, weight, targets, inputs: gl.LossInputs, policy_grad,
                 params: FusedGRPOParams, logits_buf, exp_buf, out_logp, out_entropy, grad_hidden,
                 grad_weight, needs_grad: bool) -> None:
    """One chunk of fused_forward_torch: fills out_logp[rows] (and out_entropy[rows]), writes
    grad_hidden[rows] and adds into grad_weight. logits_buf / exp_buf: fp32 [>= chunk, V] scratch.
    policy_grad: None (token level: each token's gradient from its own logp) or [N], the
    policy-gradient part of dloss/dlogp computed from whole sequences (the k3 part is added here)."""
    n = rows.stop - rows.start
    hidden_chunk, target_chunk = hidden[rows], targets[rows, None]
    z = lp._chunk_logits(hidden_chunk, weight, params.temperature, logits_buf[:n])
    target_z = z.gather(1, target_chunk)[:, 0]
    m = z.amax(1)
    z.sub_(m[:, None])
    if params.return_entropy:  # H = log s - sum e (z - m) / s: needs e and z - m at once
        e = torch.exp(z, out=exp_buf[:n])
        sum_exp = e.sum(1)
        out_entropy[rows] = sum_exp.log() - lp.rowwise_dot(e, z) / sum_exp
    else:
        e = z.exp_()
        sum_exp = e.sum(1)
    logp = target_z - (m + sum_exp.log())
    out_logp[rows] = logp
    if not needs_grad:
        return
    if policy_grad is None:
        grad_logp = gl.loss_grad(logp, inputs, rows).float()
    else:
        ref = None if inputs.ref_logp is None else inputs.ref_logp[rows]
        grad_logp = (policy_grad[rows] + gl.kl_grad_torch(logp, ref, inputs.scale[rows], inputs.params.beta)).float()
    dlogits = e.mul_((grad_logp / -sum_exp)[:, None])  # -p * g
    dlogits.scatter_add_(1, target_chunk, grad_logp[:, None])  # + onehot * g
    if params.temperature != 1.0:
        dlogits.div_(params.temperature)
    if hidden.dtype != torch.float32:
        dlogits = dlogits.to(hidden.dtype)
    if grad_hidden is not None:
        torch.mm(dlogits, weight, out=grad_hidden[rows])
    if grad_weight is not None:
        if grad_weight.dtype == weight.dtype:
            grad_weight.addmm_(dlogits.T, hidden_chunk)
        else:  # fp32 accumulator of a 16-bit weight's gradient
            grad_weight += dlogits.T @ hidden_chunk


def _logp_only(hidden, weight, targets, inputs: gl.LossInputs, params: FusedGRPOParams) -> Tensor:
    """[N] fp32 log-probs from a chunked pass without gradients (the same chunks, so the same values)."""
    logp_only = replace(params, return_entropy=False, hidden_needs_grad=False, weight_needs_grad=False)
    return fused_forward_torch(hidden, weight, targets, inputs, logp_only)[0]


def _sequence_policy_grad(hidden, weight, targets, inputs: gl.LossInputs, params: FusedGRPOParams, logp=None):
    """[N] the policy-gradient part of dloss/dlogp at the sequence level (no k3 term); logp: this
    pass's log-probs when already computed."""
    if logp is None and inputs.old_logp is None and inputs.sampler_logp is None:
        logp = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)  # s_i = exp(0) = 1 for any logp
    elif logp is None:
        logp = _logp_only(hidden, weight, targets, inputs, params)
    without_kl = replace(inputs, ref_logp=None, params=replace(inputs.params, beta=0.0))
    return gl.loss_grad(logp, without_kl)


def fused_forward_torch(hidden, weight, targets, inputs: gl.LossInputs, params: FusedGRPOParams):
    """Chunked torch pass. hidden [N, H], weight [V, H], targets [N] int64; inputs: the loss's
    (grpo_loss.prepare_loss_inputs) -> (logp [N] fp32, entropy [N] fp32 or None,
    grad_hidden [N, H] in hidden's dtype or None, grad_weight [V, H] in weight's dtype or None), the
    gradients of sum_t scale_t * l_t (upstream gradient 1).

    Per chunk c (z = logits / T, e = exp(z - max z), s = sum e, p = e / s):
        logp = z[target] - (max z + log s);  g = dloss/dlogp  (grpo_loss.loss_grad)
        dlogits = (onehot - p) * g / T;  grad_hidden[c] = dlogits @ W;  grad_weight += dlogits.T @ h_c
    """
    N, H = hidden.shape
    V = weight.shape[0]
    logp = hidden.new_empty(N, dtype=torch.float32)
    entropy = hidden.new_empty(N, dtype=torch.float32) if params.return_entropy else None
    grad_hidden = torch.empty_like(hidden) if params.hidden_needs_grad else None
    acc_dtype = torch.float32 if weight.element_size() < 4 else weight.dtype
    grad_weight = (torch.zeros(V, H, device=weight.device, dtype=acc_dtype)
                   if params.weight_needs_grad else None)
    needs_grad = params.hidden_needs_grad or params.weight_needs_grad
    policy_grad, first_logp = None, None
    if needs_grad and inputs.old_logp is None and inputs.params.sampler_mask == "sequence":
        # The sequence mask weighs each token by its whole sequence's ratio, and with one pass the old
        # log-probs are this pass's: a logp-only pass first gives them to every chunk.
        first_logp = _logp_only(hidden, weight, targets, inputs, params)
        inputs = replace(inputs, old_logp=first_logp)
    if needs_grad and inputs.params.importance_sampling_level == "sequence":
        policy_grad = _sequence_policy_grad(hidden, weight, targets, inputs, params, first_logp)
    chunk = _chunk_tokens(N, V, params)
    logits_buf = hidden.new_empty(chunk, V, dtype=torch.float32)
    exp_buf = torch.empty_like(logits_buf) if params.return_entropy else None
    for start in range(0, N, chunk):
        _torch_chunk(slice(start, min(start + chunk, N)), hidden, weight, targets, inputs, policy_grad,
                     params, logits_buf, exp_buf, logp, entropy, grad_hidden, grad_weight, needs_grad)
    del logits_buf, exp_buf  # freed before a 16-bit weight's gradient is converted below
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return logp, entropy, grad_hidden, grad_weight


def fused_forward_triton(hidden, weight, targets, inputs: gl.LossInputs, params: FusedGRPOParams):
    """Same contract as fused_forward_torch, with logprob's Triton forward and backward launchers
    and grpo_loss's Triton backward kernel for dloss/dlogp (one launch each; torch segment sums at
    the sequence level)."""
    lp_params = lp.LogprobParams(temperature=params.temperature, return_entropy=params.return_entropy,
                                 impl="triton")
    logp, lse, entropy = lp.logprob_forward(hidden, weight, targets, lp_params)
    if not (params.hidden_needs_grad or params.weight_needs_grad):
        return logp, entropy, None, None
    grad_logp = gl.loss_grad(logp, inputs)
    # grad_entropy None: the entropy is a metric here, so the backward kernel skips its term.
    grad_hidden, grad_weight = lp.logprob_backward(hidden, weight, targets, lse, entropy, grad_logp.float(),
                                                   None, lp_params, needs_weight_grad=params.weight_needs_grad)
    return logp, entropy, (grad_hidden if params.hidden_needs_grad else None), grad_weight


class FusedGRPOFunction(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], targets [N], inputs: grpo_loss.LossInputs, params) ->
    (loss [] fp32, logp [N], entropy [N] (empty when not asked for), metric summary [8],
    sampler correction sums [2] (empty when neither TIS nor sampler_mask is on)).

    The forward computes the input gradients of the loss and keeps them (not hidden or weight);
    backward scales them by the upstream gradient in place and returns them, so the graph can be
    backpropagated once. Only the loss is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inputs: gl.LossInputs, params: FusedGRPOParams):
        forward = fused_forward_triton if params.impl == "triton" else fused_forward_torch
        logp, entropy, grad_hidden, grad_weight = forward(hidden, weight, targets, inputs, params)
        loss, summary = gl.loss_value(logp, inputs)
        tis_sums = inputs.correction_sums(logp)
        # Held as attributes, not saved tensors: backward scales them in place and hands them over,
        # so the weight gradient never exists twice (a copy would add 934 MB at Qwen2-1.5B's head).
        ctx.grads = (grad_hidden, grad_weight)
        if entropy is None:
            entropy = logp.new_empty(0)
        if tis_sums is None:
            tis_sums = logp.new_empty(0)
        ctx.mark_non_differentiable(logp, entropy, summary, tis_sums)
        return loss, logp, entropy, summary, tis_sums

    @staticmethod
    def backward(ctx, grad_loss, *unused_grads):
        if ctx.grads is None:
            raise RuntimeError("fused_grpo_loss: backward ran twice through the same graph (retain_graph=True); "
                               "the gradients were handed over the first time. Call fused_grpo_loss again.")
        grads, ctx.grads = ctx.grads, None
        # On CPU, reading the upstream scalar is free and skips two passes over [V, H] when it is 1;
        # on CUDA that read would sync, so the multiply (by a 0-dim tensor) always runs there.
        skip = grad_loss.device.type == "cpu" and grad_loss.item() == 1.0
        if not skip:
            grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return (*grads, None, None, None)


def fused_grpo_loss(hidden: Tensor, weight: Tensor, targets: Tensor, old_logp: Tensor | None,
                    ref_logp: Tensor | None, advantages: Tensor, cu_seqlens: Tensor, *,
                    temperature: float = 1.0, loss_type: str = "grpo", epsilon_low: float = 0.2,
                    epsilon_high: float = 0.2, beta: float = 0.0, max_completion_length: int | None = None,
                    num_sequences: int | None = None, num_tokens: int | float | None = None,
                    num_microbatches: int = 1, token_weights: Tensor | None = None,
                    importance_sampling_level: str = "token", sampler_logp: Tensor | None = None,
                    tis_cap: float = 0.0, sequence_mask: Tensor | None = None,
                    advantage_level: str = "sequence", sampler_mask: str = "none", sampler_mask_cap: float = 2.0,
                    return_entropy: bool = False, impl: str = "auto", chunk_tokens: int | None = None):
    """GRPO loss of the completion tokens from hidden states and the LM head, in one pass.

        loss == grpo_token_loss(token_logprobs(hidden, weight, targets, temperature), old_logp,
                                ref_logp, advantages, cu_seqlens, loss_type, ...)[0]

    (see grpo_token_loss for the loss formula, the aggregation modes, the sequence-level ratio
    (GSPO), truncated importance sampling, sampler_mask, sequence_mask and the metrics). The forward
    also computes the gradients w.r.t. hidden and weight (for those that require grad while grad
    mode is on), so the logits are computed once and the [N, V] logits never exist: peak extra
    memory O(chunk x V) on the torch path, plus grad_hidden [N, H] and grad_weight [V, H] held
    until backward. Call backward() on the loss (or on anything linear in it) to receive them.
    (At the sequence level with old_logp or TIS, and with sampler_mask="sequence" and old_logp None,
    the torch path computes the logits twice: see the module docstring.)

    Args:
        hidden [N, H], weight [V, H]: float16/bfloat16/float32, one dtype; targets [N] integer ids.
        old_logp, ref_logp, token_weights, sampler_logp [N] float or None; advantages [S] (one per
        sequence, advantage_level="sequence", the default) or [N] (advantage_level="token");
        cu_seqlens [S+1] int32/int64 over the N tokens; sequence_mask [S] bool or None; the options
        as in grpo_token_loss. With tis_cap > 0 and old_logp None, the TIS weight uses this pass's
        logp (the trainer's log-prob of the rollout when one pass uses it).
        return_entropy: also return the entropy [N] of softmax(logits / T) (a metric, no gradient).
        impl: "auto" (Triton on CUDA, else torch), "triton", "torch", "reference" (the unfused naive
            composition, which materializes the logits).
        chunk_tokens: tokens per chunk on the torch path (None: max(MIN_CHUNK_TOKENS,
            FUSED_CHUNK_ELEMENTS // V), see their comment for the measurements).
    Returns:
        (loss [] float32, logp [N] float32 detached, entropy [N] float32 detached or None,
         metrics dict of grpo_loss.METRIC_NAMES (+ TIS_METRIC_NAMES when tis_cap > 0, or
         SAMPLER_METRIC_NAMES with sampler_mask) -> float).
    """
    lp._check_inputs(hidden, weight, targets, temperature)
    resolved = lp.resolve_impl(impl, hidden)
    options = dict(loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
                   max_completion_length=max_completion_length, num_sequences=num_sequences,
                   num_tokens=num_tokens, num_microbatches=num_microbatches, token_weights=token_weights,
                   importance_sampling_level=importance_sampling_level, sampler_logp=sampler_logp,
                   tis_cap=tis_cap, sequence_mask=sequence_mask, advantage_level=advantage_level,
                   sampler_mask=sampler_mask, sampler_mask_cap=sampler_mask_cap)
    if resolved == "reference":
        out = lp.token_logprobs(hidden, weight, targets, temperature, return_entropy, impl="reference")
        logp, entropy = out if return_entropy else (out, None)
        loss, metrics = gl.grpo_token_loss(logp, old_logp, ref_logp, advantages, cu_seqlens, impl="reference",
                                           **options)
        return loss, logp.detach(), (None if entropy is None else entropy.detach()), metrics
    if chunk_tokens is not None:
        gl._check_int("chunk_tokens", chunk_tokens, 1)
    n = hidden.shape[0]
    logp_like = torch.empty(n, device=hidden.device, dtype=torch.float32)  # shape/device stand-in
    inputs = gl.prepare_loss_inputs(logp_like, old_logp, ref_logp, advantages, cu_seqlens,
                                    use_triton=resolved == "triton", **options)
    grad_on = torch.is_grad_enabled()
    params = FusedGRPOParams(
        temperature=float(temperature), return_entropy=bool(return_entropy), impl=resolved,
        chunk_tokens=chunk_tokens, hidden_needs_grad=grad_on and hidden.requires_grad,
        weight_needs_grad=grad_on and weight.requires_grad)
    if n == 0:  # a zero still connected to both inputs, so that backward() works on every rank
        loss = (hidden.sum() + weight.sum() * 0).float() * 0.0
        empty = hidden.new_empty(0, dtype=torch.float32)
        return loss, empty, (empty if return_entropy else None), gl.zero_metrics(inputs.metric_names)
    loss, logp, entropy, summary, tis_sums = FusedGRPOFunction.apply(hidden, weight, targets.long(), inputs, params)
    metrics = gl.finish_metrics(summary, tis_sums if tis_sums.numel() else None, inputs.metric_names)
    return loss, logp, (entropy if return_entropy else None), metrics
