"""Per-token log-probabilities (and entropy) straight from hidden states and the LM head.

    logp = token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, impl="auto")

The `[N, V]` logits never exist: the Triton kernels stream the vocabulary in tiles with an online
logsumexp, and the torch path does the same a chunk of tokens at a time. Both save only the per-token
logsumexp (and entropy) for backward and recompute logit tiles there.

Layers, top to bottom:
    _logprob_fwd_kernel / _logprob_bwd_kernel   Triton kernels (private)
    logprob_forward / logprob_backward          Triton launchers
    logprob_forward_torch / logprob_backward_torch   the chunked pure-torch path (CPU, fallback)
    TokenLogprobFunction                        autograd.Function over either pair, options in LogprobParams
    token_logprobs                              the public functional; impl="reference" is plain autograd

Backward design (Triton): ONE kernel over a (token-block x vocab-block) grid that recomputes its logit
tile once and atomically adds into fp32 grad_hidden [N, H] and grad_weight [V, H]. The alternative (one
kernel looping over V per token block for grad_hidden, one looping over N per vocab block for
grad_weight) is deterministic but recomputes the logits twice (5 instead of 4 matmul-sized passes) and
its grad_hidden grid has only N / BLOCK_N programs: 32 for 2,048 tokens, a quarter of an H100's 132 SMs.
The price of atomics is run-to-run nondeterminism in the last bits of the gradients. (Not yet timed on
a GPU: this machine has none.)
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path needs no Triton
    triton = None
    tl = None

IMPLS = ("auto", "triton", "torch", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The torch path holds one fp32 [chunk, V] buffer (two with entropy): 2**25 elements = 128 MiB each.
# Measured (fwd+bwd, fp32, one CPU thread, time / the three bare matmuls): N=2048, H=576, V=49,152:
# chunks of 128 / 170 / 512 / 1024 tokens 1.57x / 1.51x / 1.46x / 1.46x; N=512, H=1,536, V=151,936:
# 110 / 220 / 512 tokens 1.67x / 1.47x / 1.43x. Matmuls are ~90% of the time and the floor is 4/3
# (the logits are computed twice); 2**25 gives 682 and 220 tokens at those vocabularies.
TORCH_CHUNK_ELEMENTS = 2**25


@dataclass(frozen=True)
class TritonConfig:
    """One launch configuration of a kernel: tile sizes (constexpr) and CUDA launch options."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class LogprobParams:
    """Every option of TokenLogprobFunction. impl is already resolved: "triton" or "torch".

    chunk_tokens: tokens per chunk of the torch path (None: TORCH_CHUNK_ELEMENTS // V).
    fwd_config / bwd_config: Triton tiles (None: the default for the dtype, see triton_configs()).
    fwd_splits: how many programs share one token block's vocabulary in the forward (None: enough to
      fill the GPU; the partial logsumexps are merged in torch).
    """

    temperature: float = 1.0
    return_entropy: bool = False
    impl: str = "torch"
    chunk_tokens: int | None = None
    fwd_config: TritonConfig | None = None
    bwd_config: TritonConfig | None = None
    fwd_splits: int | None = None


# Defaults (not tuned on a GPU yet: none was available). 16-bit tiles: 64x128 logits, 64-wide H
# steps; fp32 halves the H step. Compiled for sm_80/86/90 they use 24 / 48 KB (fwd, 16-bit / fp32)
# and 48-64 / 72 KB (bwd) of shared memory, under the ~100 KB an sm_86 (A40) block may use.
# No autotuning: a caller opts into other tiles through LogprobParams.fwd_config / bwd_config.
# Chosen so that ptxas reports no register spills for sm_80/86/90 (tests/kernels/test_compile.py):
# BLOCK_H=64 for the 16-bit backward spilled up to 1.3 KB/thread in the weight-gradient variant (the
# 16-bit forward spills at BLOCK_H=32 on sm_86 and not at 64), and the
# fp32 backward at BLOCK_V=128 spilled 2.5 KB/thread; these tiles compile spill-free.
_DEFAULT_CONFIGS = {
    ("fwd", 2): TritonConfig(block_n=64, block_v=128, block_h=64, num_warps=8, num_stages=3),
    ("fwd", 4): TritonConfig(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=3),
    ("bwd", 2): TritonConfig(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=2),
    ("bwd", 4): TritonConfig(block_n=64, block_v=64, block_h=32, num_warps=8, num_stages=2),
}


def triton_configs() -> list[dict]:
    """Every Triton launch the dispatcher can choose, for ahead-of-time compilation.

    Returns dicts {"kernel": fwd kernel fn or bwd kernel fn, "kernel_name", "dtypes": input dtypes
    using it, "config": TritonConfig, "flags": list of constexpr flag dicts, one per variant}.
    Kernel arguments, in order (pointers to contiguous tensors; sizes are i32 runtime values, never
    constexpr; the JIT does not specialize N at all, so a new token count never recompiles):
      fwd: hidden *T [N, H], weight *T [V, H], targets *i64 [N], partials *fp32 [4, S, N],
           N i32, V i32, H i32, v_per_split i32, inv_temperature fp32,
           BLOCK_N, BLOCK_V, BLOCK_H, HAS_ENTROPY (constexpr)
      bwd: hidden *T, weight *T, targets *i64, lse *fp32 [N], entropy *fp32 [N], grad_logp *fp32 [N],
           grad_entropy *fp32 [N], grad_hidden *fp32 [N, H], grad_weight *fp32 [V, H],
           N i32, V i32, H i32, inv_temperature fp32,
           BLOCK_N, BLOCK_V, BLOCK_H, HAS_ENTROPY, COMPUTE_DWEIGHT (constexpr)
    with T one of fp16, bf16, fp32. triton_signature() builds the ASTSource arguments.
    """
    out = []
    for (kernel_name, itemsize), cfg in _DEFAULT_CONFIGS.items():
        dtypes = [d for d in TRITON_DTYPES if torch.empty((), dtype=d).element_size() == itemsize]
        if kernel_name == "fwd":
            flags = [{"HAS_ENTROPY": e} for e in (False, True)]
        else:
            flags = [{"HAS_ENTROPY": e, "COMPUTE_DWEIGHT": w} for e in (False, True) for w in (False, True)]
        kernel = None
        if triton is not None:
            kernel = _logprob_fwd_kernel if kernel_name == "fwd" else _logprob_bwd_kernel
        out.append({"kernel": kernel, "kernel_name": kernel_name, "dtypes": dtypes, "config": cfg,
                    "flags": flags})
    return out


def triton_signature(kernel_name: str, dtype: torch.dtype, config: TritonConfig, flags: dict):
    """(signature, constexprs) for triton.compiler.ASTSource of one kernel variant."""
    t = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    if kernel_name == "fwd":
        sig = {"hidden_ptr": t, "weight_ptr": t, "targets_ptr": "*i64", "partials_ptr": "*fp32",
               "N": "i32", "V": "i32", "H": "i32", "v_per_split": "i32", "inv_temperature": "fp32"}
    else:
        sig = {"hidden_ptr": t, "weight_ptr": t, "targets_ptr": "*i64", "lse_ptr": "*fp32",
               "entropy_ptr": "*fp32", "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32",
               "grad_hidden_ptr": "*fp32", "grad_weight_ptr": "*fp32",
               "N": "i32", "V": "i32", "H": "i32", "inv_temperature": "fp32"}
    constexprs = {"BLOCK_N": config.block_n, "BLOCK_V": config.block_v, "BLOCK_H": config.block_h,
                  **flags}
    sig.update({name: "constexpr" for name in constexprs})
    return sig, constexprs


def _default_config(kernel_name: str, dtype: torch.dtype) -> TritonConfig:
    return _DEFAULT_CONFIGS[(kernel_name, 4 if dtype == torch.float32 else 2)]


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _logit_tile(hidden_ptr, weight_ptr, rows, cols, n_mask, v_mask, H, inv_temperature,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
        """fp32 [BLOCK_N, BLOCK_V] tile of (hidden @ weight.T) * inv_temperature."""
        offs_h = tl.arange(0, BLOCK_H)
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h_mask = (h0 + offs_h) < H
            x = tl.load(hidden_ptr + rows[:, None] * H + (h0 + offs_h)[None, :],
                        mask=n_mask[:, None] & h_mask[None, :], other=0.0)
            w = tl.load(weight_ptr + cols[:, None] * H + (h0 + offs_h)[None, :],
                        mask=v_mask[:, None] & h_mask[None, :], other=0.0)
            # "ieee" keeps fp32 inputs out of TF32 (torch's matmul default); ignored for 16-bit inputs.
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        return acc * inv_temperature

    @triton.jit(do_not_specialize=["N", "v_per_split"])
    def _logprob_fwd_kernel(hidden_ptr, weight_ptr, targets_ptr, partials_ptr,
                            N, V, H, v_per_split, inv_temperature,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                            HAS_ENTROPY: tl.constexpr):
        """Program (token block, vocab split): online max / sum exp / sum exp*z / target logit.

        partials[0, s, n] = running max m, [1] = sum exp(z - m), [2] = sum exp(z - m) * z (entropy
        only), [3] = the target logit if it lies in this split, else 0. z = logits / temperature.
        """
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rows = offs_n.to(tl.int64)
        target = tl.load(targets_ptr + rows, mask=n_mask, other=-1)
        m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        sum_exp = tl.zeros([BLOCK_N], dtype=tl.float32)
        sum_exp_z = tl.zeros([BLOCK_N], dtype=tl.float32)
        target_z = tl.zeros([BLOCK_N], dtype=tl.float32)
        v_start = pid_s * v_per_split
        v_end = tl.minimum(v_start + v_per_split, V)
        for v0 in range(v_start, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_mask = offs_v < V
            cols = offs_v.to(tl.int64)
            z = _logit_tile(hidden_ptr, weight_ptr, rows, cols, n_mask, v_mask, H, inv_temperature,
                            BLOCK_N, BLOCK_V, BLOCK_H)
            z = tl.where(v_mask[None, :], z, 0.0)
            target_z += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
            # every tile holds at least one valid column (v0 < V), so m_new is finite
            m_new = tl.maximum(m, tl.max(tl.where(v_mask[None, :], z, float("-inf")), axis=1))
            rescale = tl.exp(m - m_new)
            p = tl.where(v_mask[None, :], tl.exp(z - m_new[:, None]), 0.0)
            sum_exp = sum_exp * rescale + tl.sum(p, axis=1)
            if HAS_ENTROPY:
                sum_exp_z = sum_exp_z * rescale + tl.sum(p * z, axis=1)
            m = m_new
        split_stride = tl.num_programs(1).to(tl.int64) * N
        base = partials_ptr + pid_s.to(tl.int64) * N + rows
        tl.store(base, m, mask=n_mask)
        tl.store(base + split_stride, sum_exp, mask=n_mask)
        if HAS_ENTROPY:
            tl.store(base + 2 * split_stride, sum_exp_z, mask=n_mask)
        tl.store(base + 3 * split_stride, target_z, mask=n_mask)

    @triton.jit(do_not_specialize=["N"])
    def _logprob_bwd_kernel(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr,
                            grad_logp_ptr, grad_entropy_ptr, grad_hidden_ptr, grad_weight_ptr,
                            N, V, H, inv_temperature,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                            HAS_ENTROPY: tl.constexpr, COMPUTE_DWEIGHT: tl.constexpr):
        """Program (token block, vocab block): recompute the logit tile, form dL/dlogits, and
        atomically add its products into grad_hidden [N, H] and grad_weight [V, H] (fp32, zeroed).

        With z = logits / T, log p = z - lse:  dlogp/dz_j = onehot_j - p_j and
        dentropy/dz_j = -p_j (log p_j + entropy); dL/dlogits = dL/dz / T.
        """
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        n_mask = offs_n < N
        v_mask = offs_v < V
        rows = offs_n.to(tl.int64)
        cols = offs_v.to(tl.int64)
        z = _logit_tile(hidden_ptr, weight_ptr, rows, cols, n_mask, v_mask, H, inv_temperature,
                        BLOCK_N, BLOCK_V, BLOCK_H)
        target = tl.load(targets_ptr + rows, mask=n_mask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=n_mask, other=0.0)
        grad_logp = tl.load(grad_logp_ptr + rows, mask=n_mask, other=0.0)  # 0 on padded rows
        log_p = z - lse[:, None]
        p = tl.where(v_mask[None, :], tl.exp(log_p), 0.0)
        dz = tl.where(cols[None, :] == target[:, None], grad_logp[:, None], 0.0) - p * grad_logp[:, None]
        if HAS_ENTROPY:
            entropy = tl.load(entropy_ptr + rows, mask=n_mask, other=0.0)
            grad_entropy = tl.load(grad_entropy_ptr + rows, mask=n_mask, other=0.0)
            dz -= grad_entropy[:, None] * p * (log_p + entropy[:, None])
        dlogits = (dz * inv_temperature).to(hidden_ptr.dtype.element_ty)
        offs_h = tl.arange(0, BLOCK_H)
        for h0 in range(0, H, BLOCK_H):
            h_mask = (h0 + offs_h) < H
            w = tl.load(weight_ptr + cols[:, None] * H + (h0 + offs_h)[None, :],
                        mask=v_mask[:, None] & h_mask[None, :], other=0.0)
            grad_h = tl.dot(dlogits, w, input_precision="ieee")
            tl.atomic_add(grad_hidden_ptr + rows[:, None] * H + (h0 + offs_h)[None, :], grad_h,
                          mask=n_mask[:, None] & h_mask[None, :], sem="relaxed")
            if COMPUTE_DWEIGHT:
                x = tl.load(hidden_ptr + rows[:, None] * H + (h0 + offs_h)[None, :],
                            mask=n_mask[:, None] & h_mask[None, :], other=0.0)
                grad_w = tl.dot(tl.trans(dlogits), x, input_precision="ieee")
                tl.atomic_add(grad_weight_ptr + cols[:, None] * H + (h0 + offs_h)[None, :], grad_w,
                              mask=v_mask[:, None] & h_mask[None, :], sem="relaxed")

    _KERNELS_INTERPRETED = type(_logprob_fwd_kernel).__name__ == "InterpretedFunction"
else:
    _KERNELS_INTERPRETED = False


# --------------------------------------------------------------------------------------------------
# Triton launchers
# --------------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _auto_fwd_splits(n_blocks: int, device: torch.device) -> int:
    # Split the vocabulary until ~4 programs per SM exist: 2,048 tokens are only 32 token blocks.
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return _cdiv(4 * sms, n_blocks)


def logprob_forward(hidden, weight, targets, params: LogprobParams):
    """Triton forward. hidden [N, H], weight [V, H], targets [N] int64 ->
    (logp [N] fp32, lse [N] fp32 of logits / T, entropy [N] fp32 or None)."""
    N, H = hidden.shape
    V = weight.shape[0]
    empty = hidden.new_empty(0, dtype=torch.float32)
    if N == 0:
        return empty, empty, (empty if params.return_entropy else None)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    cfg = params.fwd_config or _default_config("fwd", hidden.dtype)
    n_blocks, v_tiles = _cdiv(N, cfg.block_n), _cdiv(V, cfg.block_v)
    splits = min(max(1, params.fwd_splits or _auto_fwd_splits(n_blocks, hidden.device)), v_tiles)
    v_per_split = _cdiv(v_tiles, splits) * cfg.block_v
    splits = _cdiv(V, v_per_split)  # no empty split
    partials = torch.empty(4, splits, N, device=hidden.device, dtype=torch.float32)
    _logprob_fwd_kernel[(n_blocks, splits)](
        hidden, weight, targets, partials, N, V, H, v_per_split, 1.0 / params.temperature,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
        HAS_ENTROPY=params.return_entropy, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    split_max, split_sum, split_sum_z, split_target = partials.unbind(0)
    m = split_max.amax(0)
    scale = torch.exp(split_max - m)
    sum_exp = (split_sum * scale).sum(0)
    lse = m + torch.log(sum_exp)
    logp = split_target.sum(0) - lse
    entropy = None
    if params.return_entropy:
        entropy = lse - (split_sum_z * scale).sum(0) / sum_exp  # H = lse - E_p[z]
    return logp, lse, entropy


def logprob_backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy,
                     params: LogprobParams, needs_weight_grad: bool = True):
    """Triton backward. grad_logp [N] fp32, grad_entropy [N] fp32 or None ->
    (grad_hidden [N, H] in hidden's dtype, grad_weight [V, H] in weight's dtype or None).
    Extra memory: fp32 accumulators of N x H and V x H (the atomics need fp32)."""
    N, H = hidden.shape
    V = weight.shape[0]
    if N == 0:
        return torch.zeros_like(hidden), (torch.zeros_like(weight) if needs_weight_grad else None)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    cfg = params.bwd_config or _default_config("bwd", hidden.dtype)
    grad_hidden = torch.zeros(N, H, device=hidden.device, dtype=torch.float32)
    grad_weight = torch.zeros(V, H, device=hidden.device, dtype=torch.float32) if needs_weight_grad else grad_hidden
    has_entropy = grad_entropy is not None
    _logprob_bwd_kernel[(_cdiv(N, cfg.block_n), _cdiv(V, cfg.block_v))](
        hidden, weight, targets, lse, entropy if has_entropy else lse, grad_logp.contiguous(),
        grad_entropy.contiguous() if has_entropy else grad_logp, grad_hidden, grad_weight,
        N, V, H, 1.0 / params.temperature,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, HAS_ENTROPY=has_entropy,
        COMPUTE_DWEIGHT=needs_weight_grad, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return grad_hidden.to(hidden.dtype), (grad_weight.to(weight.dtype) if needs_weight_grad else None)


# --------------------------------------------------------------------------------------------------
# Chunked pure-torch path
# --------------------------------------------------------------------------------------------------
def _torch_chunk_tokens(N: int, V: int, params: LogprobParams) -> int:
    chunk = params.chunk_tokens or TORCH_CHUNK_ELEMENTS // max(V, 1)
    return max(1, min(N, chunk))


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
            mean_shifted_z = torch.linalg.vecdot(unnormalized, z, dim=1) / sum_exp
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
    O(chunk x V) on the torch path, O(BLOCK_N x BLOCK_V) per program in Triton (plus fp32 gradient
    accumulators of N x H and V x H in Triton's backward).

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
