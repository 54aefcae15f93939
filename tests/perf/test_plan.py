"""The memory planner: parameter counts, component formulas, the fit search, the CLI, and the plan
against training peaks measured on CPU (torch.profiler's allocator totals).

Measured vs predicted micro-batch + step peak above weights/gradients/AdamW states (naive loss, one
sequence; 2-core CPU), no checkpointing | checkpointing:
  SmolLM2-135M (30 layers, V 49,152), 512 tokens, fp32: 944.2 vs 966.0 MiB | 325.0 vs 325.1 MiB
    (whole peak 2,996.8 vs 3,018.6 MiB, +0.7% | 2,377.5 vs 2,377.6 MiB, 0.0%)
  SmolLM2 widths, 6 layers, V 8,192, 2,048 tokens, fp32: 728.9 vs 742.5 | 233.5 vs 229.0 MiB
  Qwen2.5-0.5B widths, 4 layers, V 8,192, 512 tokens, bf16: 163.7 vs 163.9 | 59.9 vs 58.6 MiB
  R1-Distill-1.5B widths, 4 layers, V 8,192, 512 tokens, fp32: 456.6 vs 457.6 | 177.6 vs 173.0 MiB
"""

import argparse
import json
from dataclasses import replace

import pytest
import torch

from fastgrpo.perf.peak_memory import measure_training_peak, predicted_training_peak
from fastgrpo.perf.plan import GIB, GPUS, activation_bytes, add_plan_arguments, format_plan, kv_bytes_per_token, loss_working_set_bytes, optimizer_state_bytes, plan_memory, run_plan
from fastgrpo.perf.shapes import PRESETS, model_shape, shape_from_config

R1 = PRESETS["deepseek-r1-distill-qwen-1.5b"]


@pytest.mark.parametrize("name, expected", [
    ("smollm2-135m", 134.5e6), ("qwen2.5-0.5b", 494e6), ("deepseek-r1-distill-qwen-1.5b", 1.777e9),
    ("qwen2.5-1.5b", 1.544e9), ("qwen2.5-7b", 7.6e9)])
def test_preset_parameter_counts_match_published_sizes(name, expected):
    assert model_shape(name).param_count() == pytest.approx(expected, rel=0.01)


TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320)


@pytest.mark.parametrize("config", [
    dict(model_type="llama", tie_word_embeddings=True, **TINY),
    dict(model_type="llama", tie_word_embeddings=False, attention_bias=True, mlp_bias=True, **TINY),
    dict(model_type="qwen2", tie_word_embeddings=False, **TINY),
    dict(model_type="mistral", tie_word_embeddings=False, head_dim=32, **TINY),
])
def test_param_count_and_optimizer_bytes_equal_a_real_model(config):
    """The shape's count equals the numel of a transformers model built from the same config.json,
    and the optimizer-state formula equals the bytes torch AdamW / bitsandbytes AdamW8bit allocate."""
    from fastgrpo.model import random_model

    shape = shape_from_config(config)
    model = random_model(**config)
    params = list(model.parameters())
    assert shape.param_count() == sum(p.numel() for p in params)
    assert sorted(shape.param_tensor_sizes()) == sorted(p.numel() for p in params)

    import bitsandbytes as bnb

    for name, opt_cls in (("adamw", torch.optim.AdamW), ("adamw8bit", bnb.optim.AdamW8bit)):
        opt = opt_cls(params, lr=1e-3)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        states = [v for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"]
        allocated = sum(v.nbytes for v in states)
        assert optimizer_state_bytes(shape, name, 4) == allocated, name


def test_config_json_from_a_folder(tmp_path):
    config = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
              "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
              "tie_word_embeddings": False, "architectures": ["Qwen2ForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = model_shape(tmp_path)
    assert shape.param_count() == R1.param_count()
    assert (shape.head_dim, shape.kv_dim, shape.qkv_bias, shape.tied) == (128, 256, True, False)
    assert model_shape(tmp_path / "config.json").param_count() == R1.param_count()


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="gpt2.*supported: llama, mistral, qwen2"):
        shape_from_config({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="intermediate_size"):
        shape_from_config({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2})


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="presets: .*qwen2.5-7b.*smollm2-135m"):
        model_shape("llama-70b")
    with pytest.raises(ValueError, match="unknown GPU 'v100'; known: a40-48gb, a100-40gb"):
        plan_memory(R1, "v100", max_len=1024)
    with pytest.raises(ValueError, match="optimizer 'sgd'"):
        plan_memory(R1, "a40-48gb", max_len=1024, optimizer="sgd")
    with pytest.raises(ValueError, match="loss 'liger'"):
        plan_memory(R1, "a40-48gb", max_len=1024, loss="liger")
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        plan_memory(R1, "a40-48gb", max_len=4096, micro_batch_tokens=2048)


def test_gpu_table_holds_the_datasheet_numbers():
    a40 = GPUS["a40-48gb"]
    assert (a40.bf16_tflops, a40.mem_bw_gbs) == (149.7, 696.0)
    assert 44 < a40.memory_gib <= 48
    assert GPUS["h100-80gb"].bf16_tflops == 989.0


def test_loss_working_set_naive_is_tens_of_gib_and_fused_has_no_vocab_by_tokens_term():
    T, V, H = 16384, 151936, R1.hidden
    naive = loss_working_set_bytes("naive", T, V, H, 2)
    fused = loss_working_set_bytes("fused", T, V, H, 2)
    assert naive > 20 * GIB
    # What remains fused is the fp32 [V, H] and [T, H] gradient accumulators and their casts.
    assert fused < 1.5 * GIB
    growth = loss_working_set_bytes("fused", 2 * T, V, H, 2) - fused
    assert growth < 0.25 * GIB  # per 16k more tokens; naive grows by ~28 GiB
    assert loss_working_set_bytes("naive", 2 * T, V, H, 2) - naive > 20 * GIB


def test_kv_bytes_per_token():
    assert kv_bytes_per_token(R1) == 2 * 28 * 2 * 128 * 2


def _plan(**kw):
    args = dict(max_len=8192, group=8, prompts_per_step=16, dtype="bfloat16", optimizer="adamw",
                gradient_checkpointing=True, loss="fused", beta=0.04, vllm_share=0.3)
    args.update(kw)
    return plan_memory(R1, "a40-48gb", **args)


def test_components_sum_to_total_and_monotonicity():
    base = _plan()
    assert sum(base.components.values()) == base.total_bytes
    assert _plan(micro_batch_tokens=16384).total_bytes > base.total_bytes
    assert _plan(max_len=16384).total_bytes > base.total_bytes
    assert _plan(optimizer="adamw8bit").total_bytes < base.total_bytes
    assert _plan(beta=0.0).total_bytes < base.total_bytes
    assert _plan(loss="naive").total_bytes > base.total_bytes
    assert _plan(dtype="float32").total_bytes > base.total_bytes
    for tokens in (1024, 8192, 32768):
        with_ckpt = sum(activation_bytes(R1, tokens, 2, True))
        without = sum(activation_bytes(R1, tokens, 2, False))
        assert with_ckpt < without / 5


@pytest.mark.parametrize("loss", ["fused", "naive"])
@pytest.mark.parametrize("ckpt", [True, False])
def test_largest_micro_batch_fits_and_one_percent_more_does_not(loss, ckpt):
    plan = _plan(loss=loss, gradient_checkpointing=ckpt, max_len=1024)
    best = plan.max_micro_batch_tokens[loss]
    assert best > 1024
    assert _plan(loss=loss, gradient_checkpointing=ckpt, max_len=1024, micro_batch_tokens=best).fits
    over = _plan(loss=loss, gradient_checkpointing=ckpt, max_len=1024, micro_batch_tokens=best + 1)
    assert over.total_bytes > over.capacity_bytes and not over.fits
    assert not _plan(loss=loss, gradient_checkpointing=ckpt, max_len=1024, micro_batch_tokens=int(best * 1.01)).fits
    other = "naive" if loss == "fused" else "fused"
    assert plan.max_micro_batch_tokens[other] == _plan(loss=other, gradient_checkpointing=ckpt,
                                                      max_len=1024).max_micro_batch_tokens[other]


def test_r1_distill_at_16k_fits_an_a40_only_with_the_fused_loss_and_checkpointing():
    fused = _plan(max_len=16384, beta=0.0, prompts_per_step=8)
    naive = _plan(max_len=16384, beta=0.0, prompts_per_step=8, loss="naive")
    assert fused.fits and not naive.fits
    assert not _plan(max_len=16384, beta=0.0, gradient_checkpointing=False).fits
    assert naive.max_micro_batch_tokens["naive"] < 16384 < fused.max_micro_batch_tokens["fused"]
    assert fused.concurrent_sequences >= 1 and fused.kv_cache_tokens > 16384


def test_too_small_vllm_share_does_not_fit():
    plan = plan_memory(PRESETS["qwen2.5-7b"], "l4-24gb", max_len=8192, vllm_share=0.1)
    assert not plan.fits
    assert any("raise the share" in r for r in plan.reasons)


def test_format_and_cli(capsys):
    text = format_plan(_plan())
    assert "| policy weights |" in text and "**FITS**" in text and "naive loss" in text
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    argv = ["--model", "deepseek-r1-distill-qwen-1.5b", "--max-len", "16384", "--group", "8"]
    assert run_plan(parser.parse_args(argv + ["--gradient-checkpointing", "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and out["components_gib"]["policy_weights"] == pytest.approx(3.31, abs=0.01)
    assert run_plan(parser.parse_args(argv + ["--no-gradient-checkpointing"])) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert run_plan(parser.parse_args(argv + ["--gpu", "tpu"])) == 2
    assert "known: a40-48gb" in capsys.readouterr().err


def _check_against_measurement(shape, tokens, dtype, ckpt, tolerance=0.20):
    measured = measure_training_peak(shape, tokens, dtype=dtype, gradient_checkpointing=ckpt)
    predicted = predicted_training_peak(shape, tokens, dtype=dtype, gradient_checkpointing=ckpt)
    # Weights, gradients, AdamW states; the measurement also holds the inputs (a few KB).
    assert predicted["persistent"] == pytest.approx(measured["persistent"], rel=1e-3)
    # The whole peak (the 20%) and, stricter, the part that depends on the micro-batch alone.
    assert predicted["peak"] == pytest.approx(measured["peak"], rel=tolerance)
    assert predicted["step"] == pytest.approx(measured["step"], rel=tolerance)


@pytest.mark.parametrize("ckpt", [False, True])
def test_plan_matches_a_measured_cpu_peak_small(ckpt):
    """SmolLM2 widths, 4 layers, 8k vocabulary, 256 tokens, fp32 (~10-20 s)."""
    _check_against_measurement(replace(PRESETS["smollm2-135m"], layers=4, vocab=8192), 256, "float32", ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("name, layers, vocab, tokens, dtype", [
    ("smollm2-135m", 30, 49152, 512, "float32"),  # the full SmolLM2-135M
    ("smollm2-135m", 6, 8192, 2048, "float32"),
    ("qwen2.5-0.5b", 4, 8192, 512, "bfloat16"),
    ("deepseek-r1-distill-qwen-1.5b", 4, 8192, 512, "float32"),
])
@pytest.mark.parametrize("ckpt", [False, True])
def test_plan_matches_measured_cpu_peaks(name, layers, vocab, tokens, dtype, ckpt):
    _check_against_measurement(replace(PRESETS[name], layers=layers, vocab=vocab), tokens, dtype, ckpt)


def test_the_planner_and_the_roofline_read_one_datasheet_table():
    from fastgrpo.kernels import roofline
    from fastgrpo.kernels.gpus import GPU_DATASHEETS

    # every name the CLI took before the table was shared, with its numbers
    assert list(GPUS) == ["a40-48gb", "a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb", "l4-24gb", "rtx4090-24gb",
                          "a6000-48gb"]
    assert [(g.bf16_tflops, g.mem_bw_gbs, round(g.memory_gib * 1024)) for g in GPUS.values()] == [
        (149.7, 696.0, 46068), (312.0, 1555.0, 40960), (312.0, 2039.0, 81920), (989.0, 3350.0, 81559),
        (989.0, 4800.0, 143771), (121.0, 300.0, 23034), (165.2, 1008.0, 24564), (154.8, 768.0, 49140)]
    assert {name: (g.cc, g.bf16_flops, g.mem_bytes_per_s, g.l2_bytes, g.sms) for name, g in roofline.GPUS.items()} == {
        "A40": (86, 149.7e12, 696e9, 6 << 20, 84), "A100": (80, 312e12, 2039e9, 40 << 20, 108),
        "H100": (90, 989e12, 3350e9, 50 << 20, 132), "H200": (90, 989e12, 4800e9, 60 << 20, 132)}
    # one source: the planner's and the roofline's A40 are the same row
    sheet = GPU_DATASHEETS["a40-48gb"]
    assert GPUS["a40-48gb"].bf16_tflops * 1e12 == roofline.GPUS["A40"].bf16_flops == sheet.bf16_tflops * 1e12
    assert roofline.GPUS["A100"] == roofline.GPU.from_datasheet(GPU_DATASHEETS["a100-80gb"])
    with pytest.raises(ValueError, match="the roofline needs sms, l2_mib and cc"):
        roofline.GPU.from_datasheet(GPU_DATASHEETS["l4-24gb"])


def test_shared_prefix_counts_match_the_packed_layout():
    from fastgrpo.perf.plan import shared_prefix_gathered_keys, shared_prefix_tokens
    from fastgrpo.shared_prefix import pack_groups

    prompt, completion, group = 13, 5, 4
    batch = pack_groups([list(range(1, prompt + 1))] * 2, [0] * group + [1] * group, [[7] * completion] * (2 * group))
    packed, keys = shared_prefix_tokens(prompt, completion, group)
    assert (2 * packed, 2 * keys) == (batch.num_tokens, batch.kv_index.numel())
    assert shared_prefix_gathered_keys(batch.num_tokens, prompt, completion, group) == 2 * group * prompt


def test_plan_with_prompt_len_counts_gathered_keys_and_step_tokens():
    base = _plan(max_len=1280, micro_batch_tokens=8192, gradient_checkpointing=False)
    shared = _plan(max_len=1280, micro_batch_tokens=8192, gradient_checkpointing=False, prompt_len=1024)
    copies = _plan(max_len=1280, micro_batch_tokens=8192, gradient_checkpointing=False, prompt_len=1024,
                   shared_prefix=False)
    assert copies.components == base.components
    extra = shared.components["activations_stored"] - base.components["activations_stored"]
    # 8,192 tokens of groups (1,024 + 8 x 256) gather 8 x 1,024 more keys per group: k and v, every layer
    gathered = -(-8192 * 8 * 1024 // (1024 + 8 * 256))
    assert extra == gathered * 2 * 2 * R1.kv_dim * R1.layers
    assert shared.settings["step_tokens"] == {"copies": 16 * 8 * 1280, "shared": 16 * (1024 + 8 * 256)}
    assert any("3.33x" in note for note in shared.notes)
    with pytest.raises(ValueError, match=r"prompt_len must be an int in \[0, max_len=1280\), got 1280"):
        _plan(max_len=1280, prompt_len=1280)
