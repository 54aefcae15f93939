"""One training micro-batch with LoRA (rank 16, every projection) against full-parameter training,
side by side in one process: forward + fused loss + backward + clipping + AdamW, as grpo_update runs
them (gradient checkpointing on, the default).

    pytest benchmarks/bench_lora_update.py --benchmark-only -s

Variants: full, lora-peft (peft's own adapter forward), lora (fastgrpo's one-GEMM adapter forward,
lora.fused_lora_forward). Each round runs every variant once; extra_info holds each one's median CPU
seconds (time.process_time, torch at 1 thread: on a shared 2-core machine a 2-thread op waits at an
OpenMP barrier for a descheduled partner, which inflated one such measurement 10x) and the bytes
torch's allocator had live at its peak above the start (exact; RSS follows glibc's heap retention
instead). The model is the tests' tiny random Llama unless FASTGRPO_BENCH_MODEL names a folder.

Measured with SmolLM2-135M (FASTGRPO_BENCH_MODEL set to the default model's folder), the default
step's micro-batch (4 prompts of 98 tokens x G = 8 completions of 21, shared prompts: 1,064 tokens),
3 rounds, load average 2-22: CPU s full 13.59, lora-peft 12.06, lora 11.71; allocator peak full
1,541 MiB (gradients and AdamW states), LoRA 202 MiB.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch
from peft.tuners.lora import Linear as LoraLinear

from fastgrpo.config import LoraConfig, load_config
from fastgrpo.kernels import fused_grpo_loss
from fastgrpo.model import lm_head_weight, load_policy, packed_hidden_states
from fastgrpo.optim import build_optimizer
from fastgrpo.perf.peak_memory import allocation_windows
from fastgrpo.shared_prefix import pack_microbatch

ROUNDS = int(os.environ.get("FASTGRPO_BENCH_ROUNDS", "3"))
PROMPTS, G, PROMPT_LEN, COMPLETION_LEN = 4, 8, 98, 21



def _policy(model_dir: Path, variant: str):
    if variant == "full":
        return load_policy(model_dir, gradient_checkpointing=True)
    policy = load_policy(model_dir, gradient_checkpointing=True, lora=LoraConfig(rank=16))
    if variant == "lora-peft":
        for module in policy.modules():
            if isinstance(module, LoraLinear):
                del module.forward  # peft's class forward again
    return policy


def test_lora_update_against_full(benchmark, model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, [])
        policies = {v: _policy(model_dir, v) for v in ("full", "lora-peft", "lora")}
        optimizers = {v: build_optimizer(p.parameters(), cfg.train) for v, p in policies.items()}
        vocab = policies["full"].config.vocab_size
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, vocab, (PROMPT_LEN,), generator=gen).tolist() for _ in range(PROMPTS)]
        completions = [torch.randint(0, vocab, (COMPLETION_LEN,), generator=gen).tolist() for _ in range(PROMPTS * G)]
        batch = pack_microbatch(prompts, [i // G for i in range(PROMPTS * G)], completions,
                                list(range(PROMPTS * G)), True)
        advantages = torch.randn(PROMPTS * G, generator=gen)

        def update(variant: str) -> float:
            policy = policies[variant]
            start = time.process_time()
            loss, *_ = fused_grpo_loss(packed_hidden_states(policy, batch), lm_head_weight(policy), batch.targets,
                                       None, None, advantages, batch.completion_cu_seqlens,
                                       max_completion_length=64, num_sequences=PROMPTS * G,
                                       num_tokens=PROMPTS * G * COMPLETION_LEN, num_microbatches=1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizers[variant].step()
            return time.process_time() - start

        peaks = {}
        for variant in policies:  # the first update of each: nothing allocated before it is freed inside
            peaks[variant] = allocation_windows(lambda: update(variant))[0]
            policies[variant].zero_grad(set_to_none=True)
        seconds: dict[str, list[float]] = {v: [] for v in policies}

        def one_round():
            for variant in policies:
                seconds[variant].append(update(variant))
                policies[variant].zero_grad(set_to_none=True)

        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    finally:
        torch.set_num_threads(threads)
    for variant in policies:
        benchmark.extra_info[f"{variant}_cpu_s"] = statistics.median(seconds[variant])
        benchmark.extra_info[f"{variant}_alloc_peak_MiB"] = peaks[variant] / 2**20
    print({k: round(v, 2) for k, v in benchmark.extra_info.items()})
    assert peaks["lora"] < peaks["full"]  # no gradients or AdamW states of the base
