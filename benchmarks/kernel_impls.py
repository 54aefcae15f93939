"""The four implementations that bench_kernels.py times, and their peak-memory measurement.

fwd+bwd of per-token log-probs + the GRPO loss (loss_type "grpo", beta 0, epsilons 0.2, temperature 1)
from hidden [N, H] and the LM head [V, H]:
    fastgrpo      fused_grpo_loss, impl "auto": the chunked one-pass torch path on CPU, Triton on CUDA
    fastgrpo_frozen_head  the same with a frozen LM head (LoRA): no weight-gradient matmul, no [V, H] buffer
    naive         logits = hidden @ W.T, log_softmax, gather, the loss formula, all by autograd
    liger         liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss (input [B, T, H])
    matmul_floor  the three bare matmuls every exact method needs: h @ W.T, g @ W, g.T @ h

Peak memory is measured in a fresh process per implementation (so that one's allocations cannot hide
another's), as growth over the memory held once the inputs exist:
    python benchmarks/kernel_impls.py IMPL SHAPE   ->  prints {"peak_extra_mb": ...} as JSON
CPU: the peak resident set (VmHWM, reset through /proc/self/clear_refs after a warm-up run) minus the
resident set before the measured run; CUDA: torch.cuda.max_memory_allocated minus the allocated bytes.
"""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

IMPLS = ("naive", "fastgrpo", "fastgrpo_frozen_head", "liger", "matmul_floor")  # naive first: the others' losses are checked against it
# name -> (N tokens, H, V, sequences). N is small enough for a 2-core CPU; sequences of equal length
# because Liger takes a padded [B, T, H] batch (all-ones mask here: no padding to waste).
SHAPES = {
    "smollm2-135m": (2048, 576, 49_152, 8),
    "qwen2-1.5b": (512, 1_536, 151_936, 4),
}
# Sequences per Liger chunk: 1 is Liger's default (and what TRL's GRPOTrainer constructs). On this CPU
# the whole batch in one chunk ran ~2x faster at Qwen2-1.5B's head (CPU time 9.7 s vs 19.8 s, floor 5.3 s);
# FASTGRPO_BENCH_LIGER_CHUNK=4 selects that.
LIGER_CHUNK_SIZE = int(os.environ.get("FASTGRPO_BENCH_LIGER_CHUNK", "1"))
EPSILON = 0.2

# Filled by bench_kernels.py, printed by conftest.py's terminal summary.
RESULTS: list[dict] = []


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype_for(dev: torch.device) -> torch.dtype:
    # fp32 on CPU (no fast 16-bit matmul there); bf16 on a GPU, as in training.
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def build_inputs(n: int, h: int, v: int, num_seqs: int, dev: torch.device) -> dict:
    """hidden [n, h], weight [v, h] (logits of std ~1), targets [n], old_logp [n] near the current
    log-probs (ratios around 1, some clipped), advantages [num_seqs], cu_seqlens of equal lengths."""
    gen = torch.Generator().manual_seed(0)
    dtype = dtype_for(dev)
    hidden = torch.randn(n, h, generator=gen).to(dev, dtype)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dev, dtype)
    targets = torch.randint(0, v, (n,), generator=gen).to(dev)
    old_logp = (-math.log(v) + 0.3 * torch.randn(n, generator=gen)).to(dev)
    advantages = torch.randn(num_seqs, generator=gen).to(dev)
    cu_seqlens = torch.arange(0, n + 1, n // num_seqs, dtype=torch.int32).to(dev)
    return {"hidden": hidden, "weight": weight, "targets": targets, "old_logp": old_logp,
            "advantages": advantages, "cu_seqlens": cu_seqlens, "num_seqs": num_seqs}


@functools.lru_cache(maxsize=1)
def make_inputs(shape: str, dev_name: str) -> dict:
    """The inputs of a named shape; cached, one shape at a time (Qwen2's head alone is 0.9 GB)."""
    return build_inputs(*SHAPES[shape], torch.device(dev_name))


def warm_up(impl: str, dev: torch.device) -> None:
    """One call at a tiny shape: library loading, thread pools, Triton compilation (tile sizes are
    the same at every shape) happen here and not in the measured calls."""
    make_step(impl, build_inputs(64, 32, 256, 4, dev))()
    synchronize(dev)


def make_step(impl: str, inputs: dict):
    """A callable that runs one fwd+bwd of `impl` and returns the loss (or None for the floor).
    Gradients land in fresh leaves each call, so nothing accumulates across rounds."""
    hidden, weight, targets = inputs["hidden"], inputs["weight"], inputs["targets"]
    old_logp, advantages, cu_seqlens = inputs["old_logp"], inputs["advantages"], inputs["cu_seqlens"]
    num_seqs = inputs["num_seqs"]

    def leaves(head_trainable: bool = True):
        return hidden.detach().requires_grad_(), weight.detach().requires_grad_(head_trainable)

    if impl in ("fastgrpo", "fastgrpo_frozen_head"):
        from fastgrpo.kernels import fused_grpo_loss

        def step():
            h, w = leaves(head_trainable=impl == "fastgrpo")
            loss, _, _, _ = fused_grpo_loss(h, w, targets, old_logp, None, advantages, cu_seqlens,
                                            loss_type="grpo", epsilon_low=EPSILON, epsilon_high=EPSILON)
            loss.backward()
            return loss
    elif impl == "naive":
        from fastgrpo.kernels import grpo_token_loss

        def step():
            h, w = leaves()
            log_probs = torch.log_softmax((h @ w.T).float(), dim=-1)
            logp = log_probs.gather(-1, targets[:, None])[:, 0]
            loss, _ = grpo_token_loss(logp, old_logp, None, advantages, cu_seqlens, "grpo", EPSILON, EPSILON,
                                      impl="reference")
            loss.backward()
            return loss
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        # compiled=False on CPU: torch.compile only touches Liger's [B, T] loss math, not its matmuls.
        liger = LigerFusedLinearGRPOLoss(beta=0.0, compiled=hidden.is_cuda, use_ref_model=False,
                                         chunk_size=LIGER_CHUNK_SIZE, epsilon_low=EPSILON,
                                         epsilon_high=EPSILON, loss_type="grpo", temperature=1.0)
        batch = (num_seqs, hidden.shape[0] // num_seqs)
        ids, old = targets.view(batch), old_logp.view(batch)
        mask = torch.ones(batch, device=hidden.device, dtype=torch.long)

        def step():
            h, w = leaves()
            loss, _ = liger(h.view(*batch, -1), w, ids, mask, advantages, old_per_token_logps=old)
            loss.backward()
            return loss
    elif impl == "matmul_floor":
        def step():
            logits = hidden @ weight.T  # the backward's two products use it as dloss/dlogits
            grad_hidden, grad_weight = logits @ weight, logits.T @ hidden
            del grad_hidden, grad_weight
            return None
    else:
        raise ValueError(f"unknown impl {impl!r}; valid: {IMPLS}")
    return step


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rss_bytes(field: str) -> int:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measure_peak_extra_mb(impl: str, shape: str) -> float:
    """Run in a fresh process: peak memory of one fwd+bwd above what the inputs hold, in MB."""
    dev = device()
    step = make_step(impl, make_inputs(shape, str(dev)))
    warm_up(impl, dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 1e6
    base = _rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    step()
    return (_rss_bytes("VmHWM") - base) / 1e6


def peak_extra_mb_in_subprocess(impl: str, shape: str) -> float:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), impl, shape],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run of {impl} at {shape} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_mb"]


if __name__ == "__main__":
    print(json.dumps({"peak_extra_mb": measure_peak_extra_mb(sys.argv[1], sys.argv[2])}))
