"""The memory plan of LoRA / QLoRA runs (fastgrpo/perf/lora_memory.py): counts checked against peft
and bitsandbytes on the tiny model, and the issue's target (R1-Distill-Qwen-1.5B, 16k, G=8, rank 32)."""

import pytest
import torch

from fastgrpo.config import LoraConfig
from fastgrpo.perf import lora_memory
from fastgrpo.perf.plan import plan_memory
from fastgrpo.perf.shapes import PRESETS, model_shape

R1 = PRESETS["deepseek-r1-distill-qwen-1.5b"]
TARGET = dict(max_len=16384, group=8, gradient_checkpointing=True)


def test_adapter_count_and_dtype_match_peft(tiny_model_dir):
    from fastgrpo.model import load_policy

    policy = load_policy(tiny_model_dir, lora=LoraConfig(rank=8))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == lora_memory.adapter_params(model_shape(tiny_model_dir), 8)
    assert all(p.dtype == torch.float32 for p in trainable)
    frozen = sum(p.numel() for p in policy.parameters() if not p.requires_grad)
    assert frozen == model_shape(tiny_model_dir).param_count()


def test_bf16_base_keeps_adapters_in_fp32(tiny_model_dir):
    """The planner's 16 bytes per adapter parameter assume peft's fp32 adapters on a bf16 base."""
    from fastgrpo.model import load_policy

    policy = load_policy(tiny_model_dir, dtype=torch.bfloat16, lora=LoraConfig(rank=4))
    assert {p.dtype for p in policy.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in policy.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_nf4_bytes_per_weight_match_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(1024, 1024, dtype=torch.bfloat16)
    packed, state = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    nbytes = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    nbytes += state.state2.absmax.numel() * 4
    assert nbytes / w.numel() == pytest.approx(lora_memory.NF4_BYTES_PER_WEIGHT, rel=0.01)


def test_r1_distill_16k_fits_a_24gb_card_with_lora_and_qlora_not_full():
    full = plan_memory(R1, "rtx4090-24gb", **TARGET)
    lora = plan_memory(R1, "rtx4090-24gb", lora_rank=32, **TARGET)
    qlora = plan_memory(R1, "rtx4090-24gb", lora_rank=32, quantize="4bit", **TARGET)
    assert not full.fits and lora.fits and qlora.fits
    assert qlora.total_bytes < lora.total_bytes < full.total_bytes
    c = lora.components
    assert c["reference_weights"] == 0 == plan_memory(R1, "rtx4090-24gb", lora_rank=32, beta=0.04, **TARGET).components["reference_weights"]
    # the frozen head: no [V, H] gradient anywhere
    assert c["loss_working_set"] < R1.vocab * R1.hidden * 2
    assert c["optimizer_states"] == 8 * lora_memory.adapter_params(R1, 32)
    assert qlora.components["policy_weights"] < 0.5 * c["policy_weights"]


def test_quantize_without_lora_is_refused():
    with pytest.raises(ValueError, match="quantize needs lora_rank"):
        plan_memory(R1, "rtx4090-24gb", max_len=1024, quantize="4bit")
    with pytest.raises(ValueError, match="quantize '3bit'"):
        lora_memory.base_weight_bytes(R1, 2, "3bit")
