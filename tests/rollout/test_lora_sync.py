"""vLLM follows a LoRA policy, both ways (lora.sync): merged weights streamed in place, or the adapter
itself loaded by vLLM's LoRA support; vLLM serves a fastgrpo LoRA checkpoint folder as it is; the transformers
engine's own copy (rollout.max_staleness > 0) follows the adapter too."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from fastgrpo import lora
from fastgrpo.config import LoraConfig, load_config
from fastgrpo.config.schema import ConfigError
from fastgrpo.model import load_policy, packed_token_logprobs
from fastgrpo.packing import pack_sequences
from fastgrpo.rollout import vllm as vllm_module
from fastgrpo.rollout.vllm import VLLMEngine

LOGPROB_ATOL = 1e-4  # an fp32 engine against an fp32 trainer (the full-model sync test's bound)
PROMPTS = [[1, 2, 3, 4, 5, 6], [9, 8, 7], list(range(100, 260))]  # the last one fills prefix-cache blocks
ARGS = dict(n=2, max_tokens=12, temperature=0.8, seed=4)


def trainer_logprobs(model, prompts, samples, temperature: float) -> torch.Tensor:
    batch = pack_sequences([prompts[s.prompt_index] for s in samples], [s.token_ids for s in samples])
    with torch.no_grad():
        return packed_token_logprobs(model, batch, temperature)


def large_step(policy, seed: int) -> None:
    """Every B matrix gets N(0, 0.3) values (fresh adapters have B = 0): the policy moves far."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def errors_against(policy, samples) -> tuple[torch.Tensor, torch.Tensor]:
    """|trainer - sampler| log-probs of the sampled tokens under the adapted policy and under its base."""
    sampler = torch.tensor([x for s in samples for x in s.logprobs])
    adapted = (trainer_logprobs(policy, PROMPTS, samples, ARGS["temperature"]) - sampler).abs()
    base = (trainer_logprobs(lora.reference_view(policy), PROMPTS, samples, ARGS["temperature"]) - sampler).abs()
    return adapted, base


@pytest.mark.slow
def test_vllm_log_probs_follow_the_adapter_after_a_large_step(tiny_model_dir):
    torch.manual_seed(0)
    policy = load_policy(tiny_model_dir, lora=LoraConfig(rank=8))
    engine = VLLMEngine(tiny_model_dir, dtype="float32", max_model_len=256, seed=0, cpu_kvcache_gb=1, enforce_eager=True)
    try:
        before = engine.generate(PROMPTS, **ARGS)
        large_step(policy, 1)
        seconds = engine.sync_weights(policy)
        after = engine.generate(PROMPTS, **ARGS)
        errors, base_errors = errors_against(policy, after)
        print(f"LoRA sync {seconds:.3f} s; vs the adapted policy max {errors.max():.2e}, vs the base mean {base_errors.mean():.2f}")
        assert errors.max() < LOGPROB_ATOL
        assert base_errors.mean() > 0.05  # the engine really moved to the adapted weights
        assert [s.token_ids for s in after] != [s.token_ids for s in before]
        # the trainer's model still holds W unmerged: switching the adapters off gives the base back
        assert all(not m.merged for m in policy.modules() if isinstance(m, LoraLayer))
    finally:
        engine.close()


@pytest.mark.slow
def test_vllm_serves_the_adapter_itself_and_a_lora_checkpoint_folder(tiny_model_dir, tmp_path):
    """lora.sync=adapter: vLLM's LoRA support samples with the policy's adapter after each sync (a new
    id each time, the old one removed), and loads a fastgrpo LoRA checkpoint folder directly."""
    from transformers import AutoTokenizer

    from fastgrpo.checkpoint import save_checkpoint

    torch.manual_seed(0)
    policy = load_policy(tiny_model_dir, lora=LoraConfig(rank=8))
    engine = VLLMEngine(tiny_model_dir, dtype="float32", max_model_len=256, seed=0, cpu_kvcache_gb=1, enforce_eager=True,
                        lora_rank=8)
    try:
        before = engine.generate(PROMPTS, **ARGS)  # no adapter loaded yet: the base model
        assert errors_against(policy, before)[0].max() < LOGPROB_ATOL
        for seed in (1, 2):  # two syncs: the second must replace the first, not add to it
            large_step(policy, seed)
            seconds = engine.sync_weights(policy)
            after = engine.generate(PROMPTS, **ARGS)
            errors, base_errors = errors_against(policy, after)
            print(f"adapter sync {seconds:.3f} s; vs the adapted policy max {errors.max():.2e}, vs the base mean {base_errors.mean():.2f}")
            assert errors.max() < LOGPROB_ATOL
            assert base_errors.mean() > 0.05
            assert engine.llm.llm_engine.list_loras() == {engine._adapter.request.lora_int_id}
        scratch = engine._adapter._scratch
        assert len(list(scratch.iterdir())) == 1  # the previous adapter's folder is gone
        with pytest.raises(TypeError, match="needs a peft model"):
            engine.sync_weights(policy.get_base_model())

        # a checkpoint as the trainer writes it, loaded by vLLM as it is (not via the policy)
        large_step(policy, 3)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        folder = save_checkpoint(tmp_path, 3, policy, AutoTokenizer.from_pretrained(tiny_model_dir), optimizer, scheduler, {})
        large_step(policy, 4)  # the live policy moves on: only the folder holds step 3's adapter
        engine.load_adapter(folder)
        from_folder = engine.generate(PROMPTS, **ARGS)
        saved = load_policy(tiny_model_dir, lora=LoraConfig(rank=8), adapter_dir=folder)
        assert errors_against(saved, from_folder)[0].max() < LOGPROB_ATOL
        assert errors_against(policy, from_folder)[0].mean() > 0.05
        assert folder.is_dir() and len(engine.llm.llm_engine.list_loras()) == 1  # a user's folder is never deleted
        with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
            engine.load_adapter(tiny_model_dir)
        # an adapter vLLM refuses (rank 16 > the engine's max_lora_rank 8): the one in use stays, and
        # the refused adapter's scratch folder goes
        with pytest.raises(ValueError, match="rank"):
            engine.sync_weights(load_policy(tiny_model_dir, lora=LoraConfig(rank=16)))
        assert list(scratch.iterdir()) == [] and engine._adapter.request.lora_path == str(folder)
        assert errors_against(saved, engine.generate(PROMPTS, **ARGS))[0].max() < LOGPROB_ATOL
    finally:
        engine.close()
    assert not scratch.exists()


# ----------------------------------------------------------------------------- no engine started


@pytest.mark.parametrize("rank, expected", [(1, 1), (4, 8), (8, 8), (16, 16), (20, 32), (512, 512)])
def test_lora_engine_args_take_the_smallest_max_lora_rank_vllm_allows(tiny_model_dir, rank, expected):
    from vllm.config.lora import LoRAConfig

    args = vllm_module.vllm_engine_args(tiny_model_dir, device="cpu", lora_rank=rank)
    assert (args["enable_lora"], args["max_lora_rank"], args["max_loras"]) == (True, expected, 1)
    LoRAConfig(max_lora_rank=args["max_lora_rank"], max_loras=args["max_loras"])  # vLLM's own validation
    assert "enable_lora" not in vllm_module.vllm_engine_args(tiny_model_dir, device="cpu")  # merge: no LoRA layers


@pytest.mark.parametrize("rank", [0, 513, 2.0, True, "8"])
def test_lora_engine_args_refuse_a_rank_vllm_cannot_serve(tiny_model_dir, rank):
    with pytest.raises(ValueError, match="lora_rank must be an int in 1..512"):
        vllm_module.vllm_max_lora_rank(rank)


@pytest.mark.parametrize("override, match", [
    (["lora.rank=8", "lora.sync=adapters"], r"lora\.sync: 'adapters' is not one of merge, adapter"),
    (["lora.sync=adapter"], r"lora\.sync is set but lora\.rank is 0"),
    (["lora.rank=8", "lora.sync=adapter", "rollout.engine=transformers"], r"lora\.sync=adapter .*rollout\.engine=transformers"),
    (["lora.rank=8", "lora.sync=adapter", "rollout.mode=server"], r"lora\.sync=adapter .*rollout\.mode=server"),
    (["lora.rank=8", "lora.sync=adapter", "lora.quantize=4bit"], r"lora\.sync=adapter with lora\.quantize=4bit"),
])
def test_bad_lora_sync_settings_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match) as raised:
        load_config(None, override)
    assert raised.value.key == "lora.sync"


def test_lora_sync_defaults_to_merge_and_takes_adapter():
    assert load_config(None, ["lora.rank=8"]).lora.sync == "merge"
    assert load_config(None, ["lora.rank=8", "lora.sync=adapter"]).lora.sync == "adapter"


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
