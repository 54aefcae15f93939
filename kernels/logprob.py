"""Per-token log-probabilities (and entropy) straight from hidden states and the LM head.

    logp = token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, impl="auto")

The `[N, V]` logits never exist: the Triton kernels stream the vocabulary in tiles with an online
logsumexp, and the torch path does the same a chunk of tokens at a time. Both save only the per-token
logsumexp (and entropy) for backward and recompute logit tiles there.

Layers, top to bottom:
    logprob_triton.py: _logprob_fwd_kernel, the backward kernels (_logprob_bwd_hidden_kernel +
                       _logprob_bwd_weight_kernel, or _logprob_bwd_atomic_kernel), their launchers
                       logprob_forward / logprob_backward
    logprob_forward_torch / logprob_backward_torch   the chunked pure-torch path (CPU, fallback)
    TokenLogprobFunction                        autograd.Function over either pair, options in LogprobParams
    token_logprobs                              the public functional; impl="reference" is plain autograd

The Triton backward is two deterministic kernels without atomics, or one with atomics where the
roofline model predicts that faster on the GPU at hand (logprob_triton.choose_backward_kernel).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from . import logprob_triton
from .logprob_triton import (  # noqa: F401 - re-exported: aot.py, fused_grpo.py and the tests use them
    TRITON_DTYPES,
    TritonConfig,
    logprob_backward,
    logprob_forward,
    triton_configs,
    triton_signature,
)

triton = logprob_triton.triton  # None when Triton is not installed (tests patch it here)
_KERNELS_INTERPRETED = logprob_triton.KERNELS_INTERPRETED

IMPLS = ("auto", "triton", "torch", "reference")
# The torch path holds one fp32 [chunk, V] buffer (two with entropy): 2**25 elements = 128 MiB each.
# Measured (fwd+bwd, fp32, one CPU thread, time / the three bare matmuls): N=2048, H=576, V=49,152:
# chunks of 128 / 170 / 512 / 1024 tokens 1.57x / 1.51x / 1.46x / 1.46x; N=512, H=1,536, V=151,936:
# 110 / 220 / 512 tokens 1.67x / 1.47x / 1.43x. Matmuls are ~90% of the time and the floor is 4/3
# (the logits are computed twice); 2**25 gives 682 and 220 tokens at those vocabularies.
TORCH_CHUNK_ELEMENTS = 2**25


@dataclass(frozen=True)
class LogprobParams:
    """Every option of TokenLogprobFunction. impl is already resolved: "triton" or "torch".

    chunk_tokens: tokens per chunk of the torch path (None: TORCH_CHUNK_ELEMENTS // V).
    fwd_config / bwd_config: Triton tiles (None: the defaults for the dtype, see triton_configs());
      bwd_config applies to every backward kernel.
    fwd_splits / bwd_splits: how many programs share one token block's vocabulary in the forward /
      the grad_hidden kernel (None: enough to fill the GPU; their partial results are merged in torch).
    bwd_weight_programs: persistent programs of the grad_weight kernel (None: one per SM).
    bwd_kernel: the Triton backward, "two-kernel" or "atomic" (None: the one the roofline model
      predicts faster on this GPU; logprob_triton.choose_backward_kernel).
    """

    temperature: float = 1.0
    return_entropy: bool = False
    impl: str = "torch"
    chunk_tokens: int | None = None
    fwd_config: TritonConfig | None = None
    bwd_config: TritonConfig | None = None
    fwd_splits: int | None = None
    bwd_splits: int | None = None
    bwd_weight_programs: int | None = None
    bwd_kernel: str | None = None


# --------------------------------------------------------------------------------------------------
# Chunked pure-torch path
# --------------------------------------------------------------------------------------------------
def _torch_chunk_tokens(N: int, V: int, params: LogprobParams) -> int:
    chunk = params.chunk_tokens or TORCH_CHUNK_ELEMENTS // max(V, 1)
    return max(1, min(N, chunk))


def rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, dim=1) for [n, V] tensors without an [n, V] temporary: torch.linalg.vecdot
    allocates one (134 MiB per 683-row chunk at SmolLM2's vocabulary), a batched matmul does not."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2))[:, 0, 0]


def _chunk_logits(hidden_chunk, weight, temperature: float, out):
    """out[:] = (hidden_chunk @ weight.T).float() / temperature, in the fp32 buffer out [c, V]."""
    if hidden_chunk.dtype == torch.float32:
        torch.mm(hidden_chunk, weight.T, out=out)
    else:  # the contract rounds logits to the input dtype first, as the naive expression does
        out.copy_(torch.mm(hidden_chunk, weight.T))
    if temperature != 1.0:
        out.div_(temperature)
    return out


def logprob_forward_torch(hidden, weight, targets, params: LogprobParams):
    """Chunked torch forward; same contract as logprob_forward. Peak extra memory: one (two with
    entropy) fp32 [chunk, V] buffers, reused by every chunk."""
    N, V = hidden.shape[0], weight.shape[0]
    logp = hidden.new_empty(N, dtype=torch.float32)
    lse = hidden.new_empty(N, dtype=torch.float32)
    entropy = hidden.new_empty(N, dtype=torch.float32) if params.return_entropy else None
    if N == 0:
        return logp, lse, entropy
    chunk = _torch_chunk_tokens(N, V, params)
    logits_buf = hidden.new_empty(chunk, V, dtype=torch.float32)
    probs_buf = torch.empty_like(logits_buf) if params.return_entropy else None
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        z = _chunk_logits(hidden[start:end], weight, params.temperature, logits_buf[: end - start])
        target_z = z.gather(1, targets[start:end, None])[:, 0]
        m = z.amax(1)
        z.sub_(m[:, None])
        if params.return_entropy:
            unnormalized = torch.exp(z, out=probs_buf[: end - start])
            sum_exp = unnormalized.sum(1)
            # H = log(sum e^(z-m)) - sum e^(z-m) (z-m) / sum e^(z-m)
            mean_shifted_z = rowwise_dot(unnormalized, z) / sum_exp
            entropy[start:end] = sum_exp.log() - mean_shifted_z
        else:
            sum_exp = z.exp_().sum(1)
        lse[start:end] = m + sum_exp.log()
        logp[start:end] = target_z - lse[start:end]
    return logp, lse, entropy


def logprob_backward_torch(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy,
                           params: LogprobParams, needs_weight_grad: bool = True):
    """Chunked torch backward; same contract as logprob_backward. grad_weight accumulates over chunks
    in fp32 for 16-bit weights (else in the weight's dtype, directly into the result)."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc_dtype = torch.float32 if weight.element_size() < 4 else weight.dtype
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(V, H, device=weight.device, dtype=acc_dtype) if needs_weight_grad else None
    if N == 0:
        return grad_hidden, (grad_weight.to(weight.dtype) if needs_weight_grad else None)
    chunk = _torch_chunk_tokens(N, V, params)
    logits_buf = hidden.new_empty(chunk, V, dtype=torch.float32)
    probs_buf = torch.empty_like(logits_buf) if grad_entropy is not None else None
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        hidden_chunk = hidden[start:end]
        g = grad_logp[start:end, None]
        log_p = _chunk_logits(hidden_chunk, weight, params.temperature, logits_buf[: end - start])
        log_p.sub_(lse[start:end, None])
        if grad_entropy is not None:
            # dz = g * onehot - p * (g + g_ent * (log p + H))
            p = torch.exp(log_p, out=probs_buf[: end - start])
            dz = log_p.add_(entropy[start:end, None]).mul_(grad_entropy[start:end, None]).add_(g)
            dz.mul_(p).neg_()
        else:
            dz = log_p.exp_().mul_(-g)  # dz = g * onehot - p * g
        dz.scatter_add_(1, targets[start:end, None], g)
        if params.temperature != 1.0:
            dz.div_(params.temperature)
        grad_logits = dz if hidden.dtype == torch.float32 else dz.to(hidden.dtype)
        torch.mm(grad_logits, weight, out=grad_hidden[start:end])
        if needs_weight_grad:
            if acc_dtype == weight.dtype:
                grad_weight.addmm_(grad_logits.T, hidden_chunk)
            else:
                grad_weight += grad_logits.T @ hidden_chunk
    return grad_hidden, (grad_weight.to(weight.dtype) if needs_weight_grad else None)


# --------------------------------------------------------------------------------------------------
# autograd.Function and the functional
# --------------------------------------------------------------------------------------------------
class TokenLogprobFunction(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], targets [N] int64, params) -> logp [N] (, entropy [N]).

    params.impl picks the launchers: "triton" or "torch". Saves hidden, weight, targets and the
    per-token logsumexp (+ entropy): O(N) beyond the inputs."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, params: LogprobParams):
        forward = logprob_forward if params.impl == "triton" else logprob_forward_torch
        logp, lse, entropy = forward(hidden, weight, targets, params)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.params = params
        ctx.set_materialize_grads(False)  # an unused entropy arrives as None: skip its term
        return (logp, entropy) if params.return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp is None and grad_entropy is None) or not (needs_hidden or needs_weight):
            return None, None, None, None
        if grad_logp is None:
            grad_logp = lse.new_zeros(lse.shape)
        grad_logp = grad_logp.float()
        grad_entropy = grad_entropy.float() if grad_entropy is not None else None
        backward = logprob_backward if ctx.params.impl == "triton" else logprob_backward_torch
        grad_hidden, grad_weight = backward(hidden, weight, targets, lse, entropy, grad_logp,
                                            grad_entropy, ctx.params, needs_weight_grad=needs_weight)
        return (grad_hidden if needs_hidden else None), grad_weight, None, None


def token_logprobs_reference(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """The naive definition (materializes [N, V] logits and their gradient); for tests."""
    log_probs = torch.log_softmax((hidden @ weight.T).float() / temperature, -1)
    logp = log_probs.gather(-1, targets.long()[:, None])[:, 0]
    if not return_entropy:
        return logp
    return logp, -(log_probs.exp() * log_probs).sum(-1)


def triton_available(device: torch.device | None = None) -> bool:
    """True when the Triton kernels can run on `device`: CUDA, or any tensor under TRITON_INTERPRET=1."""
    if triton is None:
        return False
    return _KERNELS_INTERPRETED or (device is not None and device.type == "cuda")


def resolve_impl(impl: str, hidden: torch.Tensor) -> str:
    """Validate impl; "auto" becomes "triton" for CUDA inputs of a Triton dtype, else "torch"."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    if impl == "auto":
        ok = hidden.is_cuda and hidden.dtype in TRITON_DTYPES and triton_available(hidden.device)
        return "triton" if ok else "torch"
    if impl == "triton":
        if not triton_available(hidden.device):
            why = "Triton is not installed" if triton is None else f"hidden is on {hidden.device}"
            raise RuntimeError(f"impl='triton' needs a CUDA tensor and Triton (or TRITON_INTERPRET=1 set "
                               f"before this module is imported); {why}. Use impl='torch' or 'auto'.")
        if hidden.dtype not in TRITON_DTYPES:
            raise TypeError(f"impl='triton' supports {TRITON_DTYPES}, got {hidden.dtype}")
    return impl


def _check_inputs(hidden, weight, targets, temperature):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden has H={hidden.shape[1]} but weight [V, H] has H={weight.shape[1]}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share one floating dtype, got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"hidden, weight and targets must be on one device, got {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be 1-D of length N={hidden.shape[0]}, got shape {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of token ids (int64), got {targets.dtype}")
    V = weight.shape[0]
    if targets.numel():
        # one host sync: out-of-range ids would make the kernels read outside the weight
        lo, hi = (int(x) for x in torch.aminmax(targets))
        if lo < 0 or hi >= V:
            raise ValueError(f"target ids must lie in [0, V={V}), got min {lo} and max {hi}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, impl="auto"):
    """Per-token log-probability of `targets` under softmax(hidden @ weight.T / temperature).

        logp == torch.log_softmax((hidden @ weight.T).float() / temperature, -1).gather(-1, targets[:, None])[:, 0]

    The [N, V] logits, probabilities and their gradient are never materialized: peak extra memory is
    O(chunk x V) on the torch path, O(BLOCK_N x BLOCK_V) per program in Triton, plus the Triton
    backward's fp32 accumulators: [splits, N, H] and [SMs, 32, H] (two-kernel) or N x H and V x H
    (atomic).

    Args:
        hidden:  [N, H] float16/bfloat16/float32 (float64: torch paths only), final hidden states.
        weight:  [V, H] same dtype, the LM head.
        targets: [N] integer token ids in [0, V).
        temperature: > 0, divides the logits.
        return_entropy: also return the entropy [N] of softmax(logits / temperature).
        impl: "auto" (Triton for CUDA tensors, else the chunked torch path), "triton", "torch",
            "reference" (naive, materializes the logits).
    Returns:
        logp [N] float32, or (logp [N], entropy [N]) float32; differentiable w.r.t. hidden and weight.
    """
    _check_inputs(hidden, weight, targets, temperature)
    impl = resolve_impl(impl, hidden)
    if impl == "reference":
        return token_logprobs_reference(hidden, weight, targets, temperature, return_entropy)
    params = LogprobParams(temperature=float(temperature), return_entropy=bool(return_entropy), impl=impl)
    return TokenLogprobFunction.apply(hidden, weight, targets.long(), params)
