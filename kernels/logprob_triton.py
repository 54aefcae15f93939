"""Triton kernels of per-token log-probabilities (logprob.py holds the torch path, the autograd
Function and the public functional; this module only launches kernels).

    _logprob_fwd_kernel          (token block, vocab split): online logsumexp (+ entropy sums)
    _logprob_bwd_hidden_kernel   (token block, vocab split): grad_hidden = dlogits @ W, looping over V
    _logprob_bwd_weight_kernel   persistent, one vocab block at a time: grad_weight = dlogits.T @ hidden,
                                 looping over N
    _logprob_bwd_atomic_kernel   (token block, vocab block): both gradients, added atomically
    logprob_forward / logprob_backward   their launchers

Two backward designs; both recompute logit tiles from hidden, W and the saved logsumexp and form
dL/dlogits in registers. "two-kernel" (bwd_hidden + bwd_weight): no atomics, deterministic; each
program owns its output rows and keeps their fp32 sums to itself (grad_hidden in [splits, N, H]
partials summed in torch, grad_weight in a [BLOCK_V, H] workspace slice per program, written in the
weight's dtype after the last token tile); 8NHV FLOPs, as each kernel recomputes the logits.
"atomic": one kernel, 6NHV FLOPs, but fp32 grad_hidden [N, H] and grad_weight [V, H] accumulators that
are zeroed, updated by atomics and cast, and run-to-run nondeterminism in the gradients' last bits.
choose_backward_kernel picks by the roofline model (numbers there). (Not yet timed on a GPU.)
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path needs no Triton
    triton = None
    tl = None

from .tiles import (BACKWARD_KERNELS, KERNEL_NAMES, TritonConfig, _DEFAULT_CONFIGS, _PERSISTENT_PROGRAMS_PER_SM,
                    _SPLIT_PROGRAMS_PER_SM, _UNALIGNED_CONFIGS, default_config_for_itemsize)
from . import roofline

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def default_config(kernel_name: str, dtype: torch.dtype, aligned: bool = True) -> TritonConfig:
    """The tiles the launchers use for `kernel_name`, inputs of `dtype` and an aligned launch or not."""
    return default_config_for_itemsize(kernel_name, 4 if dtype == torch.float32 else 2, aligned)


def is_aligned_launch(tensors, sizes) -> bool:
    """Whether Triton's JIT builds the fully aligned specialization for a launch with these tensor
    arguments and specialized int arguments: it marks a pointer divisible when its address is a
    multiple of 16 bytes and an int when it is a multiple of 16; any other launch gets a separately
    compiled, less vectorized kernel, which takes _UNALIGNED_CONFIGS. (Outputs and workspaces come
    from torch's allocator, whose blocks are 512-byte aligned, so the inputs decide.)"""
    return all(t.data_ptr() % 16 == 0 for t in tensors) and all(size % 16 == 0 for size in sizes)


def triton_configs() -> list[dict]:
    """Every Triton launch the dispatcher can choose, for ahead-of-time compilation.

    Returns dicts {"kernel": the jit function (None without Triton), "kernel_name", "dtypes": input
    dtypes using it, "config": TritonConfig, "flags": list of constexpr flag dicts, one per variant,
    "aligned": whether the launchers use it for aligned launches only or for all others}.
    Kernel arguments, in order (pointers to contiguous tensors; sizes are i32 runtime values, never
    constexpr; N is not even specialized, so a new token count never recompiles):
      fwd:        hidden *T [N, H], weight *T [V, H], targets *i64 [N], partials *fp32 [4, S, N],
                  N, V, H, v_per_split i32, inv_temperature fp32
      bwd_hidden: hidden, weight, targets, lse *fp32 [N], entropy *fp32 [N], grad_logp *fp32 [N],
                  grad_entropy *fp32 [N], partials *fp32 [S, N, H], N, V, H, v_per_split, inv_temperature
      bwd_weight: hidden, weight, targets, lse, entropy, grad_logp, grad_entropy,
                  grad_weight *T [V, H], workspace *fp32 [P, BLOCK_V, H], N, V, H, inv_temperature
      bwd_atomic: hidden, weight, targets, lse, entropy, grad_logp, grad_entropy,
                  grad_hidden *fp32 [N, H], grad_weight *fp32 [V, H], N, V, H, inv_temperature
    then the constexprs BLOCK_N, BLOCK_V, BLOCK_H, HAS_ENTROPY (bwd_atomic: and COMPUTE_DWEIGHT);
    T one of fp16, bf16, fp32.
    triton_signature() builds the ASTSource arguments.
    """
    out = []
    for aligned, configs in ((True, _DEFAULT_CONFIGS), (False, _UNALIGNED_CONFIGS)):
        for (kernel_name, itemsize), cfg in configs.items():
            dtypes = [d for d in TRITON_DTYPES if torch.empty((), dtype=d).element_size() == itemsize]
            flags = [{"HAS_ENTROPY": e} for e in (False, True)]
            if kernel_name == "bwd_atomic":
                flags = [{**f, "COMPUTE_DWEIGHT": w} for f in flags for w in (False, True)]
            out.append({"kernel": _KERNELS.get(kernel_name), "kernel_name": kernel_name, "dtypes": dtypes,
                        "config": cfg, "flags": flags, "aligned": aligned})
    return out


def triton_signature(kernel_name: str, dtype: torch.dtype, config: TritonConfig, flags: dict):
    """(signature, constexprs) for triton.compiler.ASTSource of one kernel variant."""
    t = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    inputs = {"hidden_ptr": t, "weight_ptr": t, "targets_ptr": "*i64"}
    row_terms = {"lse_ptr": "*fp32", "entropy_ptr": "*fp32", "grad_logp_ptr": "*fp32",
                 "grad_entropy_ptr": "*fp32"}
    if kernel_name == "fwd":
        sig = {**inputs, "partials_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32", "v_per_split": "i32"}
    elif kernel_name == "bwd_hidden":
        sig = {**inputs, **row_terms, "partials_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32",
               "v_per_split": "i32"}
    elif kernel_name == "bwd_weight":
        sig = {**inputs, **row_terms, "grad_weight_ptr": t, "workspace_ptr": "*fp32",
               "N": "i32", "V": "i32", "H": "i32"}
    elif kernel_name == "bwd_atomic":
        sig = {**inputs, **row_terms, "grad_hidden_ptr": "*fp32", "grad_weight_ptr": "*fp32",
               "N": "i32", "V": "i32", "H": "i32"}
    else:
        raise ValueError(f"unknown kernel {kernel_name!r}; valid: {', '.join(KERNEL_NAMES)}")
    sig["inv_temperature"] = "fp32"
    constexprs = {"BLOCK_N": config.block_n, "BLOCK_V": config.block_v, "BLOCK_H": config.block_h, **flags}
    sig.update({name: "constexpr" for name in constexprs})
    return sig, constexprs


# --------------------------------------------------------------------------------------------------
# Kernels
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

    @triton.jit
    def _grad_logit_tile(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr,
                         grad_entropy_ptr, rows, cols, n_mask, v_mask, H, inv_temperature,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                         HAS_ENTROPY: tl.constexpr):
        """dL/dlogits [BLOCK_N, BLOCK_V] in the inputs' dtype, from a recomputed logit tile.

        With z = logits / T and log p = z - lse:  dlogp/dz_j = onehot_j - p_j and
        dentropy/dz_j = -p_j (log p_j + entropy);  dL/dlogits = dL/dz / T. Rows past N have
        grad_logp = grad_entropy = 0, columns past V have p = 0 and match no target: both give 0."""
        z = _logit_tile(hidden_ptr, weight_ptr, rows, cols, n_mask, v_mask, H, inv_temperature,
                        BLOCK_N, BLOCK_V, BLOCK_H)
        target = tl.load(targets_ptr + rows, mask=n_mask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=n_mask, other=0.0)
        grad_logp = tl.load(grad_logp_ptr + rows, mask=n_mask, other=0.0)
        log_p = z - lse[:, None]
        p = tl.where(v_mask[None, :], tl.exp(log_p), 0.0)
        dz = tl.where(cols[None, :] == target[:, None], grad_logp[:, None], 0.0) - p * grad_logp[:, None]
        if HAS_ENTROPY:
            entropy = tl.load(entropy_ptr + rows, mask=n_mask, other=0.0)
            grad_entropy = tl.load(grad_entropy_ptr + rows, mask=n_mask, other=0.0)
            dz -= grad_entropy[:, None] * p * (log_p + entropy[:, None])
        # rounded to the inputs' dtype, as the naive backward's grad of a 16-bit matmul is
        return (dz * inv_temperature).to(hidden_ptr.dtype.element_ty)

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

    @triton.jit(do_not_specialize=["N", "v_per_split"])
    def _logprob_bwd_hidden_kernel(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr,
                                   grad_logp_ptr, grad_entropy_ptr, partials_ptr,
                                   N, V, H, v_per_split, inv_temperature,
                                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                                   HAS_ENTROPY: tl.constexpr):
        """Program (token block, vocab split s): partials[s, rows, :] = sum over the split's vocab
        columns of dlogits @ W, in fp32; the launcher sums the splits. Each step takes two BLOCK_V
        tiles (v_per_split is a multiple of 2 x BLOCK_V), so the accumulator rows are read and
        written once per 2 x BLOCK_V columns while only one fp32 logit tile lives in registers."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rows = offs_n.to(tl.int64)
        offs_h = tl.arange(0, BLOCK_H)
        out_ptr = partials_ptr + pid_s.to(tl.int64) * N * H
        v_start = pid_s * v_per_split
        v_end = tl.minimum(v_start + v_per_split, V)
        for v0 in range(v_start, v_end, 2 * BLOCK_V):
            offs_a = v0 + tl.arange(0, BLOCK_V)
            offs_b = offs_a + BLOCK_V
            mask_a, mask_b = offs_a < V, offs_b < V  # a tile past V is all zeros: dlogits 0, W masked
            cols_a, cols_b = offs_a.to(tl.int64), offs_b.to(tl.int64)
            dlogits_a = _grad_logit_tile(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr,
                                         grad_logp_ptr, grad_entropy_ptr, rows, cols_a, n_mask, mask_a, H,
                                         inv_temperature, BLOCK_N, BLOCK_V, BLOCK_H, HAS_ENTROPY)
            dlogits_b = _grad_logit_tile(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr,
                                         grad_logp_ptr, grad_entropy_ptr, rows, cols_b, n_mask, mask_b, H,
                                         inv_temperature, BLOCK_N, BLOCK_V, BLOCK_H, HAS_ENTROPY)
            # the first step starts from 0: the buffer need not be zeroed. (A [BLOCK_N] condition,
            # not a scalar: Triton 3.9's interpreter rejects `mask & scalar`.)
            not_first = (v0 + 0 * offs_n) > v_start
            for h0 in range(0, H, BLOCK_H):
                h_mask = (h0 + offs_h) < H
                w_a = tl.load(weight_ptr + cols_a[:, None] * H + (h0 + offs_h)[None, :],
                              mask=mask_a[:, None] & h_mask[None, :], other=0.0)
                w_b = tl.load(weight_ptr + cols_b[:, None] * H + (h0 + offs_h)[None, :],
                              mask=mask_b[:, None] & h_mask[None, :], other=0.0)
                acc_ptrs = out_ptr + rows[:, None] * H + (h0 + offs_h)[None, :]
                acc_mask = n_mask[:, None] & h_mask[None, :]
                acc = tl.load(acc_ptrs, mask=acc_mask & not_first[:, None], other=0.0)
                acc = tl.dot(dlogits_a, w_a, acc, input_precision="ieee")
                acc = tl.dot(dlogits_b, w_b, acc, input_precision="ieee")
                tl.store(acc_ptrs, acc, mask=acc_mask)
            # The next step's loads may run on other threads of this program than the stores above:
            # a block-wide barrier orders global memory between them.
            tl.debug_barrier()

    @triton.jit(do_not_specialize=["N"])
    def _logprob_bwd_weight_kernel(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr,
                                   grad_logp_ptr, grad_entropy_ptr, grad_weight_ptr, workspace_ptr,
                                   N, V, H, inv_temperature,
                                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                                   HAS_ENTROPY: tl.constexpr):
        """Persistent program p takes vocab blocks p, p + P, p + 2P, ... (P programs). For each, it
        sums dlogits.T @ hidden over the tokens in fp32, in its own workspace slice [BLOCK_V, H],
        two BLOCK_N token tiles per step (as the hidden kernel), and writes the last step's sum to
        grad_weight in the weight's dtype."""
        pid = tl.program_id(0)
        offs_h = tl.arange(0, BLOCK_H)
        local_v = tl.arange(0, BLOCK_V)
        ws_ptr = workspace_ptr + pid.to(tl.int64) * BLOCK_V * H
        for vb in range(pid, tl.cdiv(V, BLOCK_V), tl.num_programs(0)):
            offs_v = vb * BLOCK_V + local_v
            v_mask = offs_v < V
            cols = offs_v.to(tl.int64)
            for n0 in range(0, N, 2 * BLOCK_N):
                offs_a = n0 + tl.arange(0, BLOCK_N)
                offs_b = offs_a + BLOCK_N
                mask_a, mask_b = offs_a < N, offs_b < N  # rows past N have zero gradients
                rows_a, rows_b = offs_a.to(tl.int64), offs_b.to(tl.int64)
                dlogits_a = _grad_logit_tile(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr,
                                             grad_logp_ptr, grad_entropy_ptr, rows_a, cols, mask_a, v_mask, H,
                                             inv_temperature, BLOCK_N, BLOCK_V, BLOCK_H, HAS_ENTROPY)
                dlogits_b = _grad_logit_tile(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr,
                                             grad_logp_ptr, grad_entropy_ptr, rows_b, cols, mask_b, v_mask, H,
                                             inv_temperature, BLOCK_N, BLOCK_V, BLOCK_H, HAS_ENTROPY)
                # [BLOCK_V] conditions, not scalars (see the hidden kernel)
                not_first = (n0 + 0 * local_v) > 0
                last = (n0 + 2 * BLOCK_N + 0 * local_v) >= N  # write the result in the weight's dtype
                for h0 in range(0, H, BLOCK_H):
                    h_mask = (h0 + offs_h) < H
                    x_a = tl.load(hidden_ptr + rows_a[:, None] * H + (h0 + offs_h)[None, :],
                                  mask=mask_a[:, None] & h_mask[None, :], other=0.0)
                    x_b = tl.load(hidden_ptr + rows_b[:, None] * H + (h0 + offs_h)[None, :],
                                  mask=mask_b[:, None] & h_mask[None, :], other=0.0)
                    out_mask = v_mask[:, None] & h_mask[None, :]
                    ws_ptrs = ws_ptr + local_v[:, None] * H + (h0 + offs_h)[None, :]
                    acc = tl.load(ws_ptrs, mask=out_mask & not_first[:, None], other=0.0)
                    acc = tl.dot(tl.trans(dlogits_a), x_a, acc, input_precision="ieee")
                    acc = tl.dot(tl.trans(dlogits_b), x_b, acc, input_precision="ieee")
                    tl.store(ws_ptrs, acc, mask=out_mask & ~last[:, None])
                    tl.store(grad_weight_ptr + cols[:, None] * H + (h0 + offs_h)[None, :],
                             acc.to(grad_weight_ptr.dtype.element_ty), mask=out_mask & last[:, None])
                tl.debug_barrier()  # as in the hidden kernel: the next step reloads the workspace

    @triton.jit(do_not_specialize=["N"])
    def _logprob_bwd_atomic_kernel(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr,
                                   grad_logp_ptr, grad_entropy_ptr, grad_hidden_ptr, grad_weight_ptr,
                                   N, V, H, inv_temperature,
                                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                                   HAS_ENTROPY: tl.constexpr, COMPUTE_DWEIGHT: tl.constexpr):
        """Program (token block, vocab block): one dlogits tile, its products atomically added into
        the zeroed fp32 grad_hidden [N, H] and grad_weight [V, H]."""
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        n_mask = offs_n < N
        v_mask = offs_v < V
        rows = offs_n.to(tl.int64)
        cols = offs_v.to(tl.int64)
        dlogits = _grad_logit_tile(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr,
                                   grad_logp_ptr, grad_entropy_ptr, rows, cols, n_mask, v_mask, H,
                                   inv_temperature, BLOCK_N, BLOCK_V, BLOCK_H, HAS_ENTROPY)
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

    _KERNELS = {"fwd": _logprob_fwd_kernel, "bwd_hidden": _logprob_bwd_hidden_kernel,
                "bwd_weight": _logprob_bwd_weight_kernel, "bwd_atomic": _logprob_bwd_atomic_kernel}
    KERNELS_INTERPRETED = type(_logprob_fwd_kernel).__name__ == "InterpretedFunction"
else:
    _KERNELS = {}
    KERNELS_INTERPRETED = False


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs
    one after another, so more of them buys nothing)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _vocab_splits(n_blocks: int, V: int, block_v: int, requested: int | None, device: torch.device):
    """(splits, v_per_split) for a grid of n_blocks token blocks x splits: enough programs for
    _SPLIT_PROGRAMS_PER_SM per SM unless `requested`, each split a whole number of tiles, none empty."""
    v_tiles = _cdiv(V, block_v)
    splits = requested or _cdiv(_SPLIT_PROGRAMS_PER_SM * _sm_count(device), n_blocks)
    splits = min(max(1, splits), v_tiles)
    v_per_split = _cdiv(v_tiles, splits) * block_v
    return _cdiv(V, v_per_split), v_per_split


def logprob_forward(hidden, weight, targets, params):
    """Triton forward. hidden [N, H], weight [V, H], targets [N] int64, params: logprob.LogprobParams
    -> (logp [N] fp32, lse [N] fp32 of logits / T, entropy [N] fp32 or None)."""
    N, H = hidden.shape
    V = weight.shape[0]
    empty = hidden.new_empty(0, dtype=torch.float32)
    if N == 0:
        return empty, empty, (empty if params.return_entropy else None)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    aligned = is_aligned_launch((hidden, weight, targets), (H, V))
    cfg = params.fwd_config or default_config("fwd", hidden.dtype, aligned)
    n_blocks = _cdiv(N, cfg.block_n)
    splits, v_per_split = _vocab_splits(n_blocks, V, cfg.block_v, params.fwd_splits, hidden.device)
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


def choose_backward_kernel(N: int, H: int, V: int, dtype: torch.dtype, device: torch.device,
                           requested: str | None = None) -> str:
    """"two-kernel" or "atomic": `requested` if given, else the one roofline.choose_backward predicts
    faster on this GPU (A40, A100, H100, H200); "two-kernel" (deterministic) on any other device.

    What the model predicted (bf16, backward only, ms; kernels/roofline.py): the atomic kernel does
    6NHV FLOPs against 8NHV, so it wins where both are compute-bound and hidden + its fp32 grad_hidden
    fit in L2: SmolLM2 (2,048 x 576 x 49,152) atomic / two-kernel on A100 1.12 / 1.49, H100 0.35 /
    0.47; Qwen2-1.5B at 512 tokens on A100 2.30 / 3.06. It loses where its V x H fp32 accumulator
    traffic dominates (Qwen2-1.5B, 512 tokens: A40 6.73 / 6.58, H100 1.40 / 0.97) or grad_hidden
    leaves L2 (SmolLM2 on A40's 6 MB: 7.34 / 3.10; 16,384 tokens of Qwen2-1.5B: A40 436 / 204, A100
    149 / 98, H100 91 / 31). The model counts neither L2 atomic throughput (the atomic kernel issues
    one fp32 atomic per 256 FLOPs, the two-kernel one accumulator load + store per 2,048) nor
    tails: time both with LogprobParams.bwd_kernel, or the FASTGRPO_LOGPROB_BWD environment variable
    that `make gpu-check` sets, on the first GPU."""
    requested = requested or os.environ.get("FASTGRPO_LOGPROB_BWD") or None
    if requested is not None:
        if requested not in BACKWARD_KERNELS:
            raise ValueError(f"unknown backward kernel {requested!r}; valid: {', '.join(BACKWARD_KERNELS)}")
        return requested
    if device.type != "cuda":
        return "two-kernel"
    gpu = roofline.gpu_for_device_name(torch.cuda.get_device_name(device))
    if gpu is None:
        return "two-kernel"
    itemsize = 4 if dtype == torch.float32 else 2
    return roofline.choose_backward(roofline.Shape("call", N, H, V), gpu, itemsize)


def logprob_backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, params,
                     needs_weight_grad: bool = True):
    """Triton backward. grad_logp [N] fp32, grad_entropy [N] fp32 or None, params: LogprobParams ->
    (grad_hidden [N, H] in hidden's dtype, grad_weight [V, H] in weight's dtype or None).
    The kernel: choose_backward_kernel(..., params.bwd_kernel)."""
    N, H = hidden.shape
    V = weight.shape[0]
    if N == 0:
        return torch.zeros_like(hidden), (torch.zeros_like(weight) if needs_weight_grad else None)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    has_entropy = grad_entropy is not None
    row_terms = (lse, entropy if has_entropy else lse, grad_logp.contiguous(),
                 grad_entropy.contiguous() if has_entropy else grad_logp)
    kernel = choose_backward_kernel(N, H, V, hidden.dtype, hidden.device, params.bwd_kernel)
    backward = _backward_atomic if kernel == "atomic" else _backward_two_kernel
    aligned = is_aligned_launch((hidden, weight, targets, *row_terms), (H, V))
    return backward(hidden, weight, targets, row_terms, has_entropy, params, needs_weight_grad, aligned)


def _backward_two_kernel(hidden, weight, targets, row_terms, has_entropy, params, needs_weight_grad, aligned):
    """bwd_hidden, then bwd_weight. Extra memory: fp32 partials [splits, N, H] for grad_hidden (splits
    > 1 only while N is below ~_SPLIT_PROGRAMS_PER_SM x SMs x BLOCK_N tokens, so at most ~(that + N)
    x H x 4 bytes: 0.1 GB on an H100 at H=1,536) and an fp32 workspace [P, BLOCK_V, H] for
    grad_weight, P = min(vocab blocks, SMs) (26 MB on an H100 at H=1,536); no V x H fp32 copy."""
    N, H = hidden.shape
    V = weight.shape[0]
    inv_temperature = 1.0 / params.temperature
    cfg = params.bwd_config or default_config("bwd_hidden", hidden.dtype, aligned)
    n_blocks = _cdiv(N, cfg.block_n)
    # each split a whole number of the kernel's steps of two vocabulary tiles
    splits, v_per_split = _vocab_splits(n_blocks, V, 2 * cfg.block_v, params.bwd_splits, hidden.device)
    partials = torch.empty(splits, N, H, device=hidden.device, dtype=torch.float32)
    _logprob_bwd_hidden_kernel[(n_blocks, splits)](
        hidden, weight, targets, *row_terms, partials, N, V, H, v_per_split, inv_temperature,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, HAS_ENTROPY=has_entropy,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grad_hidden = (partials[0] if splits == 1 else partials.sum(0)).to(hidden.dtype)
    del partials
    if not needs_weight_grad:
        return grad_hidden, None

    cfg = params.bwd_config or default_config("bwd_weight", hidden.dtype, aligned)
    v_blocks = _cdiv(V, cfg.block_v)
    programs = params.bwd_weight_programs or _PERSISTENT_PROGRAMS_PER_SM * _sm_count(hidden.device)
    programs = min(max(1, programs), v_blocks)
    workspace = torch.empty(programs, cfg.block_v, H, device=hidden.device, dtype=torch.float32)
    grad_weight = torch.empty_like(weight)
    _logprob_bwd_weight_kernel[(programs,)](
        hidden, weight, targets, *row_terms, grad_weight, workspace, N, V, H, inv_temperature,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, HAS_ENTROPY=has_entropy,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return grad_hidden, grad_weight


def _backward_atomic(hidden, weight, targets, row_terms, has_entropy, params, needs_weight_grad, aligned):
    """One kernel over (token block x vocab block) tiles. Extra memory: fp32 accumulators of N x H
    and V x H (atomics need fp32); the gradients' last bits vary from run to run."""
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = params.bwd_config or default_config("bwd_atomic", hidden.dtype, aligned)
    grad_hidden = torch.zeros(N, H, device=hidden.device, dtype=torch.float32)
    grad_weight = torch.zeros(V, H, device=hidden.device, dtype=torch.float32) if needs_weight_grad else grad_hidden
    _logprob_bwd_atomic_kernel[(_cdiv(N, cfg.block_n), _cdiv(V, cfg.block_v))](
        hidden, weight, targets, *row_terms, grad_hidden, grad_weight, N, V, H, 1.0 / params.temperature,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, HAS_ENTROPY=has_entropy,
        COMPUTE_DWEIGHT=needs_weight_grad, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return grad_hidden.to(hidden.dtype), (grad_weight.to(weight.dtype) if needs_weight_grad else None)
