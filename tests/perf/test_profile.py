"""``fastgrpo profile``: the command on the tiny model, the RSS probe, step/token bookkeeping, the FLOPs
formula against torch's FLOP counter, and the GPU table lookup."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from fastgrpo.cli import main
from fastgrpo.phases import PHASES, PhaseTimer
from fastgrpo.perf.profile import PhaseRecorder, RssPeakProbe, gpu_key, step_flops
from helpers.paths import REPO

MIB = 2**20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_profile_command_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "profile"
    code = main(["profile", "--steps", "2", "--out", str(out), "--trace",
                 f"model.path={tiny_model_dir}", "rollout.engine=transformers", "rollout.prompts_per_step=2",
                 "rollout.num_generations=4", "rollout.max_completion_length=12", "rollout.dtype=float32",
                 "data.num_train=40", "data.num_eval=4"])
    assert code == 0
    assert "| forward |" in capsys.readouterr().out
    result = json.loads((out / "profile.json").read_text())
    assert [s["step"] for s in result["steps"]] == [1, 2]
    assert [s["traced"] for s in result["steps"]] == [False, True]
    for step in result["steps"]:
        assert set(step["phase_s"]) == set(PHASES)
        for phase in ("rollout", "forward", "backward", "optimizer"):
            assert step["phase_s"][phase] > 0, phase
        # every phase ran, so every phase has a peak; RSS holds at least the fp32 model (25 MB)
        assert set(step["peak_bytes"]) == set(PHASES)
        assert min(step["peak_bytes"].values()) > 25 * MIB
        # packed tokens: each of the 8 completions plus its prompt (at least one token)
        assert step["trained_tokens"] >= step["completion_tokens"] + 8
        assert step["generated_tokens_per_s"] > 0 and step["trained_tokens_per_s"] > 0
        assert all(0 < step["mfu"][k] <= 1 for k in ("rollout", "train", "step")), step["mfu"]
        assert sum(step["phase_s"].values()) + step["other_s"] == pytest.approx(step["step_s"], rel=1e-6)
    assert result["peak_flops_per_s"] > 0 and result["memory"] == "cpu_rss"
    assert 0 < result["summary"]["mfu"]["train"] <= 1
    png = (out / "profile.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    from PIL import Image

    with Image.open(out / "profile.png") as image:
        image.verify()
    trace = json.loads((out / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"phase::rollout", "phase::forward", "phase::backward", "phase::optimizer"} <= names
    assert not list((out / "run").glob("checkpoint-*"))  # a profile leaves no 1.6 GB checkpoints behind

    # profiling/step_trace.py: the matmuls of the forward phase sit under it, with self times that fit
    step_trace = _load_script(REPO / "profiling" / "step_trace.py")
    table = step_trace.phase_table(step_trace.load_events(out / "trace.json"))
    assert {"rollout", "forward", "backward", "optimizer", "sync"} <= set(table)
    forward = table["forward"]
    assert forward["ops"]["aten::mm"][1] > 0
    assert 0 < sum(t for t, _ in forward["ops"].values()) <= forward["wall_us"] * 1.01
    assert "aten::mm" in step_trace.format_table(table)


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_rejects_a_bad_step_count(capsys):
    assert main(["profile", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_rss_probe_sees_a_big_allocation_inside_a_phase():
    """A 256 MiB tensor allocated and freed inside a phase: only the sampling thread can see it
    (the end-of-phase sample comes after the free), and the next phase must not."""
    probe = RssPeakProbe()
    timer = PhaseTimer("cpu", memory_probe=probe)
    try:
        with timer.phase("idle"):
            time.sleep(0.05)
        with timer.phase("alloc"):
            big = torch.ones(64 * MIB)  # 256 MiB, written, so resident
            time.sleep(0.05)
            del big
        with timer.phase("after"):
            time.sleep(0.05)
    finally:
        probe.close()
    peaks = timer.pop_peaks()
    assert peaks["alloc"] - peaks["idle"] > 200 * MIB, peaks
    assert peaks["alloc"] - peaks["after"] > 200 * MIB, peaks


def test_recorder_counts_tokens_only_in_forward_phases_and_splits_steps_at_sync():
    calls = []
    recorder = PhaseRecorder(lambda name, start: calls.append((name, start)) or (None if start else 7))
    timer = PhaseTimer("cpu", memory_probe=recorder)
    embedding = torch.nn.Embedding(10, 4)
    for _ in range(2):
        for phase in ("rollout", "reward", "rollout", "reward"):  # two rollout rounds, one step
            with timer.phase(phase):
                embedding(torch.zeros(1, 5, dtype=torch.long))  # generation: not counted
        with timer.phase("forward"):
            embedding(torch.zeros(1, 12, dtype=torch.long))
            embedding(torch.zeros(1, 3, dtype=torch.long))
        with timer.phase("sync"):
            pass
    recorder.close()
    assert len(recorder.steps) == 2
    assert [s["tokens"] for s in recorder.steps] == [{"forward": 15}] * 2
    assert recorder.steps[0]["peak_bytes"] == {"rollout": 7, "reward": 7, "forward": 7, "sync": 7}
    assert calls[:2] == [("rollout", True), ("rollout", False)]
    embedding(torch.zeros(1, 4, dtype=torch.long))  # the global hook is gone after the phase
    assert recorder.steps[-1]["tokens"] == {"forward": 15}


def test_training_flops_formula_equals_torch_flop_counter(tiny_model_dir):
    """6 N T + 6 V H Tc against torch's FlopCounterMode over the trainer's forward, fused loss and
    backward. Neither counts attention (the counter has no formula for CPU SDPA), so they must agree."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastgrpo.kernels import fused_grpo_loss
    from fastgrpo.model import lm_head_weight, load_policy, packed_hidden_states
    from fastgrpo.packing import pack_sequences
    from fastgrpo.perf.shapes import model_shape

    def addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # the fused loss accumulates grad_weight with addmm_

    def entropy_dot_flops(*args, **kwargs):
        return 0  # the entropy diagnostic's row-wise dot (a [n,1,V] x [n,V,1] bmm) is not model FLOPs

    policy = load_policy(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    vocab = policy.config.vocab_size
    batch = pack_sequences([torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (40, 7, 90)],
                           [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (24, 61, 3)])
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_inplace_flops, torch.ops.aten.bmm: entropy_dot_flops}) as counter:
        hidden = packed_hidden_states(policy, batch)
        loss, *_ = fused_grpo_loss(hidden, lm_head_weight(policy), batch.targets, None, None, torch.randn(3),
                                   batch.completion_cu_seqlens, return_entropy=True)
        loss.backward()
    predicted = step_flops(model_shape(tiny_model_dir), packed_tokens={"forward": batch.input_ids.numel()},
                           scored_tokens=batch.targets.numel(), generated_tokens=0)
    assert predicted["train"] == pytest.approx(counter.get_total_flops(), rel=1e-6)
    assert predicted["rollout"] == 0 and predicted["logprobs"] == 0


@pytest.mark.parametrize("name, memory_gib, key", [
    ("NVIDIA A40", 44.4, "a40-48gb"),
    ("NVIDIA H100 80GB HBM3", 79.1, "h100-80gb"),
    ("NVIDIA H200", 140.4, "h200-141gb"),
    ("NVIDIA A100-SXM4-40GB", 39.4, "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", 79.2, "a100-80gb"),
    ("NVIDIA L4", 22.0, "l4-24gb"),
    ("NVIDIA GeForce RTX 4090", 23.6, "rtx4090-24gb"),
    ("NVIDIA RTX A6000", 47.5, "a6000-48gb"),
    ("NVIDIA L40S", 44.4, None),  # not an L4
    ("Tesla V100-SXM2-16GB", 15.8, None),
])
def test_gpu_key_finds_the_table_entry(name, memory_gib, key):
    assert gpu_key(name, memory_gib) == key
