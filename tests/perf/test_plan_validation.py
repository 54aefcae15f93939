"""The memory planner against the trainer's own training step, measured on CPU.

fastgrpo.perf.peak_memory.measure_trainer_micro_batch loads a real model folder as the trainer does and
runs the trainer's calls (packed forward with fastgrpo's varlen attention, fused_grpo_loss with
entropy, backward, gradient clipping, fused fp32 AdamW) under torch's allocator profiler, in the
steady state of gradient accumulation. Each component is compared with the planner's formula for it
(fastgrpo.perf.peak_memory.predicted_trainer_micro_batch); the issue asks for 20%.

Measured vs predicted MiB (2-core CPU, fp32; 8 sequences x (40 prompt + 24 completion) = 512 tokens, 192
scored), no checkpointing | checkpointing:
  tiny test model (2 layers, H 128, V 49,152; weights 25.1, gradients 25.1, AdamW 50.3, all exact):
    stored activations 9.7 vs 9.6 | 1.2 vs 1.1; loss working set 132.1 vs 132.1 | the same;
    backward peak 48.3 vs 48.2 | the same; micro-batch peak 141.8 vs 141.7 | 133.3 vs 133.2
  SmolLM2-135M (30 layers, H 576, V 49,152; weights 513.1, gradients 513.1, AdamW 1,026.3, all exact):
    stored activations 689.8 vs 678.0 | 36.8 vs 36.2; loss working set 216.4 vs 216.4 | the same;
    backward peak 803.1 vs 791.7 | 217.5 vs 217.1; micro-batch peak 906.2 vs 894.5 | 253.2 vs 252.7;
    whole peak 2,958.7 vs 2,947.0 (-0.4%) | 2,305.7 vs 2,305.2
Before this comparison the planner charged the fused loss an fp32 -> fp32 "cast" of [V, H] that is
never made, left out the CPU path's chunk buffers, and charged the tied embedding's backward a third
[V, H] that only the naive loss causes: its SmolLM2 micro-batch peak with checkpointing was 326.6 MiB
against 253.2 measured (+29%), and the tiny model's loss working set 48.5 against 132.1 (-63%).
"""

from __future__ import annotations

import pytest

from fastgrpo.perf.peak_memory import TRAINER_COMPONENTS, measure_trainer_micro_batch, predicted_trainer_micro_batch

PERSISTENT = ("policy_weights", "gradients", "optimizer_states")
COMPARED = ("activations_stored", "loss_working_set", "backward_peak", "micro_batch_peak", "peak")
MIB = 2**20


def _check(model_dir, ckpt, sequences=8, prompt_len=40, completion_len=24):
    measured = measure_trainer_micro_batch(model_dir, sequences=sequences, prompt_len=prompt_len,
                                           completion_len=completion_len, gradient_checkpointing=ckpt)
    predicted = predicted_trainer_micro_batch(model_dir, tokens=measured["tokens"],
                                              scored_tokens=measured["scored_tokens"], gradient_checkpointing=ckpt)
    assert set(TRAINER_COMPONENTS) <= set(measured) and set(TRAINER_COMPONENTS) <= set(predicted)
    report = {k: (round(measured[k] / MIB, 1), round(predicted[k] / MIB, 1)) for k in TRAINER_COMPONENTS}
    for key in PERSISTENT:  # exact formulas: the bytes torch allocated for weights, .grad and AdamW
        assert predicted[key] == pytest.approx(measured[key], rel=1e-3), (key, report)
    for key in COMPARED:
        assert predicted[key] == pytest.approx(measured[key], rel=0.20), (key, report)
    # A fused AdamW step allocates nothing the size of the parameters (clipping: a few per-tensor norms).
    persistent = sum(measured[k] for k in PERSISTENT)
    assert measured["optimizer_step_peak"] < 0.01 * persistent, report
    return measured, predicted


@pytest.mark.parametrize("ckpt", [False, True])
def test_plan_matches_the_trainer_step_on_the_tiny_model(tiny_model_dir, ckpt):
    measured, predicted = _check(tiny_model_dir, ckpt)
    # At this size the fused loss's chunk buffers, not the activations, decide the peak: a planner
    # that left them out (the GPU's Triton path has none) would be off by far more than 20%.
    assert measured["loss_working_set"] > 2 * measured["activations_stored"]


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", [False, True])
def test_plan_matches_the_trainer_step_on_smollm2_135m(ckpt):
    """The embedded default model (converted once into the fastgrpo cache), ~1-3 min per case."""
    from fastgrpo.model import resolve_model_path

    measured, _ = _check(resolve_model_path("default"), ckpt)
    if ckpt:  # checkpointing keeps one hidden state per layer: ~19x less than the full activations
        assert measured["activations_stored"] < 60 * MIB
