"""The GRPO loop end to end on a tiny random model: both rollout engines, checkpoints and resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fastgrpo.checkpoint import latest_checkpoint, list_checkpoints
from fastgrpo.metrics import read_metrics
from fastgrpo.trainer import train
from helpers.paths import SHARED_DATA
from helpers.trainer_setup import tiny_config

STEP_KEYS = {
    "step", "reward_mean", "reward_std", "accuracy", "format_rate", "completion_len_mean", "kl_mean",
    "clip_frac", "entropy_mean", "loss", "grad_norm", "lr", "rollout_s", "train_s", "sync_s", "step_s",
    "completion_tokens", "tokens_per_s", "logprob_mismatch",
}


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_two_grpo_steps_end_to_end(tiny_model_dir, tmp_path, engine):
    out = tmp_path / "run"
    summary = train(tiny_config(tiny_model_dir, out, engine))
    records = read_metrics(out)
    steps = [r for r in records if "eval" not in r]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert STEP_KEYS <= set(r), STEP_KEYS - set(r)
        assert r["completion_tokens"] > 0 and r["grad_norm"] is not None and r["grad_norm"] > 0
        # the trainer recomputes the sampler's log-probs with the weights it sampled with
        assert r["logprob_mismatch"] < 1e-3, r["logprob_mismatch"]
    assert [e["eval"] for e in evals] == ["before", "after"]
    assert "eval_pass@1" in summary["eval_before"] and "eval_pass@1" in summary["eval_after"]
    # checkpoints are Hugging Face folders, and training changed the weights
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    final = latest_checkpoint(out)
    AutoModelForCausalLM.from_pretrained(final)
    before, after = weights(tiny_model_dir), weights(final)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_is_exact_four_steps_against_two_plus_two(tiny_model_dir, tmp_path):
    """4 steps straight and 2 + resume + 2 end in the same weights, optimizer and scheduler state,
    RNG state and data position, and steps 3-4 log the same numbers (same samples, same updates)."""
    straight = tmp_path / "straight"
    train(tiny_config(tiny_model_dir, straight, "transformers", "eval.before_and_after=false", "train.max_steps=4"))

    split = tmp_path / "split"
    train(tiny_config(tiny_model_dir, split, "transformers", "eval.before_and_after=false", "train.max_steps=2"))
    state2 = json.loads((split / "checkpoint-2" / "trainer_state.json").read_text())
    assert state2["step"] == 2 and state2["sampler"]["position"] == 4
    train(tiny_config(tiny_model_dir, split, "transformers", "eval.before_and_after=false", "train.max_steps=4"), resume=True)

    assert [r["step"] for r in read_metrics(split)] == [1, 2, 3, 4]
    a, b = straight / "checkpoint-4", split / "checkpoint-4"
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    opt_a, opt_b = (torch.load(c / "optimizer.pt", weights_only=True) for c in (a, b))
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for k in opt_a["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a["state"][k][name], opt_b["state"][k][name]), (k, name)
    assert torch.load(a / "scheduler.pt", weights_only=True) == torch.load(b / "scheduler.pt", weights_only=True)
    rng_a, rng_b = (torch.load(c / "rng.pt", weights_only=True) for c in (a, b))
    assert torch.equal(rng_a["torch"], rng_b["torch"]) and rng_a["python"] == rng_b["python"]
    state_a, state_b = (json.loads((c / "trainer_state.json").read_text()) for c in (a, b))
    assert state_a["sampler"] == state_b["sampler"] and state_a["sampler"]["position"] == 8
    logged = {run: {r["step"]: r for r in read_metrics(run)} for run in (straight, split)}
    for step in (3, 4):
        for key in ("reward_mean", "completion_tokens", "loss", "grad_norm", "lr"):
            assert logged[straight][step][key] == logged[split][step][key], (step, key)


def test_reference_kl_and_several_passes_per_rollout(tiny_model_dir, tmp_path):
    """beta > 0 loads a frozen reference and adds k3 KL; num_iterations = 2 reuses each rollout with
    old log-probs, so the second pass sees ratios != 1."""
    out = tmp_path / "kl"
    train(tiny_config(tiny_model_dir, out, "transformers", "loss.beta=0.1", "train.num_iterations=2",
                      "eval.before_and_after=false"))
    steps = read_metrics(out)
    assert [r["step"] for r in steps] == [1, 2]
    # step 1 starts at the reference (KL 0); after two updates the policy has moved away from it
    assert steps[0]["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert steps[1]["kl_mean"] > 1e-6


def test_eval_command_on_a_real_eval_file(tiny_model_dir, tmp_path, capsys):
    """`fastgrpo eval` end to end on rows of a shipped eval file: plumbing and grading, not the score."""

    from fastgrpo.cli import main

    amc = SHARED_DATA / "eval" / "amc23.jsonl"
    out = tmp_path / "results.json"
    rc = main(["eval", "--model", str(tiny_model_dir), "--data", str(amc), "--limit", "3", "--samples", "2",
               "--max-tokens", "8", "--engine", "transformers", "--output", str(out),
               "--output-dir", str(tmp_path / "eval")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "amc23: n=3 k=2 pass@1=" in printed and "pass@2=" in printed
    result = json.loads(out.read_text())["amc23"]
    assert len(result["per_problem"]) == 3
    assert all(len(p["completions"]) == 2 and len(p["correct"]) == 2 for p in result["per_problem"])


def test_logged_lr_is_the_rate_the_update_used(tiny_model_dir, tmp_path):
    """Linear warmup over 4 steps: step k's update runs at k/4 of the peak rate (the scheduler steps
    after the update, so reading it then would log the next step's rate)."""
    out = tmp_path / "warmup"
    train(tiny_config(tiny_model_dir, out, "transformers", "eval.before_and_after=false", "train.warmup_steps=4",
                      "train.learning_rate=1e-3"))
    steps = read_metrics(out)
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["lr"] for r in steps] == pytest.approx([0.25e-3, 0.5e-3], rel=1e-12)
