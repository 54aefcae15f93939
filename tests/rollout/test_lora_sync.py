"""vLLM follows a LoRA policy: merged weights streamed in place after a large adapter update."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from fastgrpo import lora
from fastgrpo.config import LoraConfig
from fastgrpo.model import load_policy, packed_token_logprobs
from fastgrpo.packing import pack_sequences
from fastgrpo.rollout.vllm import VLLMEngine

LOGPROB_ATOL = 1e-4  # an fp32 engine against an fp32 trainer (the full-model sync test's bound)


def trainer_logprobs(model, prompts, samples, temperature: float) -> torch.Tensor:
    batch = pack_sequences([prompts[s.prompt_index] for s in samples], [s.token_ids for s in samples])
    with torch.no_grad():
        return packed_token_logprobs(model, batch, temperature)


@pytest.mark.slow
def test_vllm_log_probs_follow_the_adapter_after_a_large_step(tiny_model_dir):
    torch.manual_seed(0)
    policy = load_policy(tiny_model_dir, lora=LoraConfig(rank=8))
    engine = VLLMEngine(tiny_model_dir, dtype="float32", max_model_len=256, seed=0, cpu_kvcache_gb=1, enforce_eager=True)
    try:
        prompts = [[1, 2, 3, 4, 5, 6], [9, 8, 7], list(range(100, 260))]  # the last one fills prefix-cache blocks
        args = dict(n=2, max_tokens=12, temperature=0.8, seed=4)
        before = engine.generate(prompts, **args)
        # a large step: every B matrix gets N(0, 0.3) values (fresh adapters have B = 0)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if ".lora_B." in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        seconds = engine.sync_weights(policy)
        after = engine.generate(prompts, **args)
        sampler = torch.tensor([x for s in after for x in s.logprobs])
        errors = (trainer_logprobs(policy, prompts, after, args["temperature"]) - sampler).abs()
        base_errors = (trainer_logprobs(lora.reference_view(policy), prompts, after, args["temperature"]) - sampler).abs()
        print(f"LoRA sync {seconds:.3f} s; vs the adapted policy max {errors.max():.2e}, vs the base mean {base_errors.mean():.2f}")
        assert errors.max() < LOGPROB_ATOL
        assert base_errors.mean() > 0.05  # the engine really moved to the adapted weights
        assert [s.token_ids for s in after] != [s.token_ids for s in before]
        # the trainer's model still holds W unmerged: switching the adapters off gives the base back
        assert all(not m.merged for m in policy.modules() if isinstance(m, LoraLayer))
    finally:
        engine.close()


def test_the_transformers_engines_own_copy_follows_the_adapter(tiny_model_dir):
    """rollout.max_staleness > 0 gives the transformers engine its own model: a LoRA policy's sync
    arrives there as merged base weights, and the copy then scores like the adapted policy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastgrpo.rollout.hf import TransformersEngine

    torch.manual_seed(0)
    policy = load_policy(tiny_model_dir, lora=LoraConfig(rank=8))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    engine = TransformersEngine(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                AutoTokenizer.from_pretrained(tiny_model_dir))
    prompts = [[1, 2, 3, 4, 5, 6], [9, 8, 7]]
    stale = engine.generate(prompts, n=2, max_tokens=8, temperature=0.8, seed=3)
    engine.sync_weights(policy)
    fresh = engine.generate(prompts, n=2, max_tokens=8, temperature=0.8, seed=3)
    for samples, model, bound in ((fresh, policy, LOGPROB_ATOL), (stale, lora.reference_view(policy), LOGPROB_ATOL)):
        sampler = torch.tensor([x for s in samples for x in s.logprobs])
        assert (trainer_logprobs(model, prompts, samples, 0.8) - sampler).abs().max() < bound
    moved = (trainer_logprobs(policy, prompts, stale, 0.8) - torch.tensor([x for s in stale for x in s.logprobs])).abs()
    assert moved.mean() > 0.05  # before the sync the copy held the base weights, far from the adapted ones
