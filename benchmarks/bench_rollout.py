"""Rollout throughput: generated tokens/s of the vLLM and transformers engines on one GRPO batch
(8 prompts x 8 samples x up to 128 tokens, temperature 1.0), and vLLM's in-place weight sync.

    FASTGRPO_BENCH_MODEL=/path/to/hf_model pytest benchmarks/bench_rollout.py --benchmark-only

`FASTGRPO_BENCH_MODEL` names a Hugging Face model folder (e.g. SmolLM2-135M-Instruct converted from
the shipped GGUF by `fastgrpo.model`); without it a tiny random Llama with SmolLM2's tokenizer is
built on the fly, so the suite always runs (its numbers then measure overheads, not a real model).
Each result's extra_info holds generated_tokens and tokens_per_s (vLLM also engine_start_s).
vLLM runs in the dtype training gives it (``rollout.dtype=auto``: fp32 on CPU, where it measured faster
than bf16, bf16 on a GPU) with its default torch.compile; the transformers engine runs the model the
trainer holds (fp32 on CPU).
"""

from __future__ import annotations

import time

import pytest
import torch

from fastgrpo.rollout.hf import TransformersEngine
from fastgrpo.rollout.vllm import VLLMEngine

PROMPTS = 8
SAMPLES_PER_PROMPT = 8
MAX_TOKENS = 128
QUESTIONS = [f"What is {a} + {b}? Put the answer in \\boxed{{}}." for a, b in
             [(17, 25), (38, 46), (123, 77), (9, 8), (250, 250), (61, 39), (1001, 999), (42, 58)]]



@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for q in QUESTIONS[:PROMPTS]
    ]


@pytest.fixture(scope="module")
def vllm_engine(model_dir):
    engine = VLLMEngine(model_dir, dtype="auto", max_model_len=512, seed=0, cpu_kvcache_gb=2)
    yield engine
    engine.close()


def _measure_rollout(benchmark, engine, prompt_ids) -> list:
    # The first generate of an engine JIT-compiles CPU kernels (~5 s for vLLM), and vLLM's first
    # full-size batch still compiles for its shapes (measured 267 vs 306 tokens/s on the next one):
    # two rounds, the faster one reported, as a training run sees it from its second step on.
    engine.generate(prompt_ids[:2], n=2, max_tokens=8, seed=0)
    rounds: list[tuple[int, float]] = []

    def rollout() -> None:
        started = time.perf_counter()
        out = engine.generate(prompt_ids, n=SAMPLES_PER_PROMPT, max_tokens=MAX_TOKENS, temperature=1.0, seed=1)
        rounds.append((sum(len(c.token_ids) for c in out), time.perf_counter() - started))

    benchmark.pedantic(rollout, rounds=2, iterations=1)
    tokens, seconds = min(rounds, key=lambda r: r[1] / max(1, r[0]))
    benchmark.extra_info.update(
        engine=engine.name,
        batch=f"{len(prompt_ids)} prompts x {SAMPLES_PER_PROMPT} samples x <= {MAX_TOKENS} tokens",
        generated_tokens=tokens,
        tokens_per_s=round(tokens / seconds, 1),
        rounds_tokens_per_s=[round(t / s, 1) for t, s in rounds],
    )
    print(f"\n{engine.name}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tokens/s (best of 2 rounds)")
    return rounds


def _logprob_gap_to_fp32(model, prompt_ids, completions) -> float:
    """Mean |sampler log-prob - fp32 trainer log-prob| per token, at temperature 1."""
    gaps = []
    for c in completions:
        prompt = prompt_ids[c.prompt_index]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1].float()
        trainer = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        gaps.append((trainer - torch.tensor(c.logprobs)).abs())
    return torch.cat(gaps).mean().item()


def test_vllm_rollout_throughput(benchmark, vllm_engine, prompt_ids, model_dir, hf_model):
    benchmark.extra_info.update(model=model_dir.name, dtype=str(vllm_engine.dtype), engine_start_s=round(vllm_engine.start_seconds, 1))
    _measure_rollout(benchmark, vllm_engine, prompt_ids)
    # How far the sampler's log-probs sit from the fp32 trainer's (the step-0 policy ratio).
    sample = vllm_engine.generate(prompt_ids, n=1, max_tokens=MAX_TOKENS, temperature=1.0, seed=2)
    benchmark.extra_info["logprob_gap_to_fp32"] = round(_logprob_gap_to_fp32(hf_model, prompt_ids, sample), 4)


def test_transformers_rollout_throughput(benchmark, hf_model, tokenizer, prompt_ids, model_dir):
    benchmark.extra_info.update(model=model_dir.name, dtype="float32", batch_size=64)
    # One chunk holds the whole batch (64 rows), the fastest setting for this engine.
    _measure_rollout(benchmark, TransformersEngine(hf_model, tokenizer, batch_size=64), prompt_ids)


def test_vllm_weight_sync(benchmark, vllm_engine, hf_model):
    seconds = benchmark.pedantic(vllm_engine.sync_weights, args=(hf_model,), rounds=3, iterations=1)
    benchmark.extra_info.update(parameters=sum(p.numel() for p in hf_model.parameters()), last_sync_s=round(seconds, 3))


def test_vllm_weight_sync_lora(benchmark, vllm_engine, model_dir):
    """The LoRA sync: W + (alpha/r) B A merged per projection on the fly (rank 16, all projections),
    beside test_vllm_weight_sync's full-model sync of the same engine."""
    from fastgrpo.config import LoraConfig
    from fastgrpo.model import load_policy

    policy = load_policy(model_dir, lora=LoraConfig(rank=16))
    seconds = benchmark.pedantic(vllm_engine.sync_weights, args=(policy,), rounds=3, iterations=1)
    benchmark.extra_info.update(adapter_parameters=sum(p.numel() for p in policy.parameters() if p.requires_grad),
                                last_sync_s=round(seconds, 3))
