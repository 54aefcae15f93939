"""LoRA: adapter-only training, the reference with adapters off, merged weights for the engine,
adapter checkpoints, export --merge, and the config / preflight errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastgrpo import lora, lora_export
from fastgrpo.config import ConfigError, LoraConfig, load_config
from fastgrpo.model import load_policy, packed_token_logprobs
from fastgrpo.packing import pack_sequences
from fastgrpo.rollout.base import checkpoint_named_weights
from fastgrpo.trainer import Rollout, grpo_update

# A large learning rate: one step visibly moves random adapters, and the base must not move at all.
LR = "train.learning_rate=1e-2"


def lora_policy(model_dir, rank=4, **kw):
    torch.manual_seed(0)
    return load_policy(model_dir, lora=LoraConfig(rank=rank, **kw))


def randomize_adapters(model, scale=0.05, seed=1):
    """Fresh adapters have B = 0 (the model equals its base); give B values so the adapter matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator))


def synthetic_rollout(vocab: int, seed: int = 0) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 11)]
    completions = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 9, 3, 6)]
    return Rollout(prompts, [0, 0, 1, 1], completions, [[-10.0] * len(c) for c in completions],
                   torch.tensor([1.0, -1.0, 0.5, -0.5]), [False] * 4)


def base_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_only_adapters_train_and_the_base_stays_bitwise_equal(tiny_model_dir, tmp_path):
    from helpers.trainer_setup import tiny_config

    from fastgrpo.optim import build_optimizer

    cfg = tiny_config(tiny_model_dir, tmp_path, "transformers", "lora.rank=4", LR, "loss.beta=0.1",
                      "train.num_iterations=2")
    policy = lora_policy(tiny_model_dir)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    head = policy.get_output_embeddings().weight
    assert not head.requires_grad and not policy.get_input_embeddings().weight.requires_grad
    optimizer = build_optimizer(policy.parameters(), cfg.train)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    frozen = base_snapshot(policy)
    adapters = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}

    grads: dict[str, bool] = {}
    original_step = optimizer.step

    def step_and_record(*a, **kw):
        grads.update({n: p.grad is not None for n, p in policy.named_parameters()})
        return original_step(*a, **kw)

    optimizer.step = step_and_record
    reference = lora.reference_view(policy)
    for seed in range(2):
        stats = grpo_update(policy, reference, optimizer, synthetic_rollout(policy.config.vocab_size, seed),
                            cfg, torch.device("cpu"))
        assert stats["grad_norm"] > 0 and stats["skipped_steps"] == 0
    assert {n for n, has in grads.items() if has} == trainable  # no gradient reached a base weight
    for name, before in frozen.items():
        assert torch.equal(dict(policy.named_parameters())[name], before), name
    moved = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, adapters[n])]
    assert set(moved) == trainable  # A and B of every adapted projection moved
    assert optimizer.state and all(p.requires_grad for p in optimizer.state)


def test_fused_loss_skips_the_head_weight_gradient_with_a_frozen_head(tiny_model_dir):
    """The LoRA policy's head is frozen, so the fused loss must not build a [V, H] weight gradient."""
    from fastgrpo.kernels import fused_grpo as fg

    policy = lora_policy(tiny_model_dir)
    seen = []
    forward = fg.fused_forward_torch

    def spy(hidden, weight, targets, inputs, params):
        seen.append(params.weight_needs_grad)
        out = forward(hidden, weight, targets, inputs, params)
        assert out[3] is None  # no grad_weight tensor was allocated or returned
        return out

    rollout = synthetic_rollout(policy.config.vocab_size)
    batch = pack_sequences(*rollout.sequences([0, 1, 2, 3]))
    from fastgrpo.model import lm_head_weight, packed_hidden_states

    fg.fused_forward_torch = spy
    try:
        loss, *_ = fg.fused_grpo_loss(packed_hidden_states(policy, batch), lm_head_weight(policy), batch.targets,
                                      None, None, rollout.advantages, batch.completion_cu_seqlens, impl="torch")
    finally:
        fg.fused_forward_torch = forward
    loss.backward()
    assert seen == [False]


def test_reference_is_the_base_model_with_adapters_disabled(tiny_model_dir):
    policy = lora_policy(tiny_model_dir)
    randomize_adapters(policy)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="fastgrpo_varlen")
    rollout = synthetic_rollout(policy.config.vocab_size)
    batch = pack_sequences(*rollout.sequences([0, 1, 2, 3]))
    with torch.no_grad():
        ref = packed_token_logprobs(lora.reference_view(policy), batch)
        expected = packed_token_logprobs(base, batch)
        adapted = packed_token_logprobs(policy, batch)
    torch.testing.assert_close(ref, expected, rtol=0, atol=1e-5)
    assert (adapted - expected).abs().max() > 1e-2  # the adapters matter, and the view switched them off
    again = packed_token_logprobs(policy, batch).detach()
    torch.testing.assert_close(again, adapted)  # the adapters are back on after the reference pass


def test_merged_weights_equal_peft_merge_under_base_names(tiny_model_dir):
    policy = lora_policy(tiny_model_dir)
    randomize_adapters(policy)
    streamed = dict(checkpoint_named_weights(policy, torch.float32))
    base_names = [n for n, _ in AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters(remove_duplicate=False)]
    assert list(streamed) == base_names  # tied lm_head.weight included
    import copy

    merged = copy.deepcopy(policy).merge_and_unload()
    for name, tensor in merged.named_parameters(remove_duplicate=False):
        torch.testing.assert_close(streamed[name], tensor, rtol=0, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(streamed[q], dict(policy.named_parameters())[f"base_model.model.{q.replace('.weight', '.base_layer.weight')}"])
    # the trainer's model keeps its adapters unmerged
    assert all(not m.merged for m in policy.modules() if hasattr(m, "merged") and hasattr(m, "lora_A"))
    bf16 = dict(checkpoint_named_weights(policy, torch.bfloat16))
    assert bf16[q].dtype == torch.bfloat16 and torch.equal(bf16[q], streamed[q].to(torch.bfloat16))


def test_transformers_engine_samples_with_the_current_adapter(tiny_model_dir):
    """The transformers engine shares the live LoRA model: its sampler log-probs are the trainer's."""
    from transformers import AutoTokenizer

    from fastgrpo.rollout.hf import TransformersEngine

    policy = lora_policy(tiny_model_dir)
    randomize_adapters(policy, scale=0.2)
    engine = TransformersEngine(policy, AutoTokenizer.from_pretrained(tiny_model_dir))
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    samples = engine.generate(prompts, n=2, max_tokens=6, temperature=1.0, seed=3)
    assert engine.sync_weights(policy) == 0.0
    batch = pack_sequences([prompts[s.prompt_index] for s in samples], [s.token_ids for s in samples])
    with torch.no_grad():
        trainer = packed_token_logprobs(policy, batch)
        base = packed_token_logprobs(lora.reference_view(policy), batch)
    sampler = torch.tensor([x for s in samples for x in s.logprobs])
    assert (trainer - sampler).abs().max() < 1e-4
    assert (base - sampler).abs().max() > 1e-2


def test_adapter_checkpoint_export_merge_and_eval_folder(tiny_model_dir, tmp_path):
    """save_pretrained of the policy is a PEFT folder that peft loads; export --merge writes a plain
    Hugging Face folder whose logits equal the adapter applied to the base."""
    from fastgrpo.cli import main

    policy = lora_policy(tiny_model_dir)
    randomize_adapters(policy)
    adapter = tmp_path / "adapter"
    policy.save_pretrained(adapter, safe_serialization=True)
    assert lora.is_adapter_folder(adapter) and (adapter / "adapter_model.safetensors").is_file()
    assert lora.adapter_base_model(adapter) == str(tiny_model_dir)

    out = tmp_path / "merged"
    assert main(["export", "--merge", str(adapter), str(out)]) == 0
    assert (out / "config.json").is_file() and not lora.is_adapter_folder(out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    loaded, _ = lora_export.load_adapter_model(adapter)
    ids = torch.tensor([[1, 5, 9, 200, 3000, 17]])
    policy.eval()
    with torch.no_grad():
        expected = policy(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert (base - expected).abs().max() > 1e-2
    assert main(["export", "--merge", str(adapter), str(out)]) == 2  # never over an existing folder

    from helpers.paths import SHARED_DATA

    rc = main(["eval", "--model", str(adapter), "--data", str(SHARED_DATA / "eval" / "amc23.jsonl"), "--limit", "2",
               "--samples", "1", "--max-tokens", "4", "--engine", "transformers", "--output-dir", str(tmp_path / "eval")])
    assert rc == 0 and (tmp_path / "eval" / "results.json").is_file()  # an adapter folder evaluates as a model


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("override, key", [
    (["lora.rank=-1"], "lora.rank"),
    (["lora.alpha=32"], "lora.alpha"),
    (["lora.quantize=4bit"], "lora.quantize"),
    (["lora.target_modules=[q_proj]"], "lora.target_modules"),
    (["lora.rank=8", "lora.dropout=1.0"], "lora.dropout"),
    (["lora.rank=8", "lora.alpha=0"], "lora.alpha"),
    (["lora.rank=8", "lora.target_modules=[]"], "lora.target_modules"),
    (["lora.rank=8", "lora.quantize=2bit"], "lora.quantize"),
])
def test_bad_lora_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override)


def test_preflight_rejects_unknown_or_unwrappable_targets_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    from helpers.trainer_setup import tiny_config

    from fastgrpo import model as model_module
    from fastgrpo.preflight import check_run

    def no_loading(*a, **kw):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr(model_module, "load_policy", no_loading)
    with pytest.raises(ConfigError, match=r"lora\.target_modules\[1\]='qkv_proj' matches no module.*q_proj"):
        check_run(tiny_config(tiny_model_dir, tmp_path, "transformers", "lora.rank=4", "lora.target_modules=[q_proj, qkv_proj]"))
    with pytest.raises(ConfigError, match=r"lora\.target_modules\[0\]='input_layernorm'.*LlamaRMSNorm.*cannot wrap"):
        check_run(tiny_config(tiny_model_dir, tmp_path, "transformers", "lora.rank=4", "lora.target_modules=[input_layernorm]"))
    with pytest.raises(ConfigError, match=r"lora\.target_modules\[0\]='lm_head'.*stay frozen"):
        check_run(tiny_config(tiny_model_dir, tmp_path, "transformers", "lora.rank=4", "lora.target_modules=[lm_head]"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"lora\.quantize=8bit.*CUDA"):
            check_run(tiny_config(tiny_model_dir, tmp_path, "transformers", "lora.rank=4", "lora.quantize=8bit"))
    check_run(tiny_config(tiny_model_dir, tmp_path, "transformers", "lora.rank=4"))  # the defaults pass


def test_qlora_4bit_base_trains_adapters_and_streams_dequantized_merged_weights(tiny_model_dir):
    """lora.quantize=4bit on CPU: bitsandbytes 0.50's CPU backend holds the base in NF4; the adapters
    train, and the engine gets dequantize(W) + delta, the weights the trainer computes with."""
    bnb = pytest.importorskip("bitsandbytes")

    torch.manual_seed(0)
    policy = load_policy(tiny_model_dir, dtype=torch.bfloat16, lora=LoraConfig(rank=4, quantize="4bit"))
    q_proj = policy.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"
    with_grad = _params_with_grad_after_a_loss(policy)
    assert with_grad and all(".lora_" in n for n in with_grad)
    streamed = dict(checkpoint_named_weights(policy, torch.float32))
    weight = q_proj.base_layer.weight
    expected = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float() + q_proj.get_delta_weight("default").float()
    torch.testing.assert_close(streamed["model.layers.0.self_attn.q_proj.weight"], expected, rtol=0, atol=1e-6)
    assert streamed["model.embed_tokens.weight"].shape == (policy.config.vocab_size, policy.config.hidden_size)


def test_gradient_checkpointing_and_liger_patches_keep_the_adapters(tiny_model_dir):
    import importlib

    from fastgrpo.model import apply_liger_patches

    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    policy = load_policy(tiny_model_dir, gradient_checkpointing=True, lora=LoraConfig(rank=4))
    with_grad = _params_with_grad_after_a_loss(policy)
    assert with_grad == {n for n, p in policy.named_parameters() if p.requires_grad}  # through recomputed layers

    module = importlib.import_module("transformers.models.llama.modeling_llama")
    before = dict(vars(module))
    try:
        apply_liger_patches(policy, require_cuda=False)  # CPU: checks the swap, not the Triton kernels
    finally:  # Liger patches the module for the whole process: put it back for the other tests
        for name, value in before.items():
            setattr(module, name, value)
    mlp = policy.get_base_model().model.layers[0].mlp
    assert mlp.forward.__func__ is LigerSwiGLUMLP.forward and isinstance(mlp.gate_proj, LoraLayer)


def test_lora_under_torchrun_is_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    from helpers.trainer_setup import tiny_config

    from fastgrpo.preflight import check_run

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"lora\.rank=4: LoRA runs in one training process"):
        check_run(tiny_config(tiny_model_dir, tmp_path, "transformers", "lora.rank=4"))


def _params_with_grad_after_a_loss(policy) -> set[str]:
    """Random adapters, one fused GRPO loss over a synthetic rollout, backward: the names that got a gradient."""
    from fastgrpo.kernels import fused_grpo_loss
    from fastgrpo.model import lm_head_weight, packed_hidden_states

    randomize_adapters(policy)
    rollout = synthetic_rollout(policy.config.vocab_size)
    batch = pack_sequences(*rollout.sequences([0, 1, 2, 3]))
    loss, *_ = fused_grpo_loss(packed_hidden_states(policy, batch), lm_head_weight(policy), batch.targets, None, None,
                               rollout.advantages, batch.completion_cu_seqlens)
    loss.backward()
    return {n for n, p in policy.named_parameters() if p.grad is not None}
