"""rollout.max_staleness in the trainer, on the tiny random model: k = 0 is the synchronous loop bit
for bit (even through the producer thread), k = 1 trains on one-step-old rollouts from the engine's
own copy of the weights, and a resume with rollouts sampled ahead is exact."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fastgrpo import trainer as trainer_module
from fastgrpo.config import ConfigError, load_config
from fastgrpo.metrics import read_metrics
from fastgrpo.producer import RolloutProducer
from fastgrpo.trainer import train
from helpers.trainer_setup import tiny_config

# Wall-clock keys differ between any two runs; everything else must not.
TIMING = ("_s", "tokens_per_s")


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def steps_of(out):
    return [r for r in read_metrics(out) if "eval" not in r]


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_no_staleness_through_the_producer_thread_is_bitwise_the_synchronous_loop(tiny_model_dir, tmp_path, monkeypatch):
    args = ("eval.before_and_after=false", "train.max_steps=3")
    train(tiny_config(tiny_model_dir, tmp_path / "inline", "transformers", *args))
    monkeypatch.setattr(trainer_module, "RolloutProducer", functools.partial(RolloutProducer, threaded=True))
    train(tiny_config(tiny_model_dir, tmp_path / "threaded", "transformers", *args))
    inline, threaded = steps_of(tmp_path / "inline"), steps_of(tmp_path / "threaded")
    for a, b in zip(inline, threaded, strict=True):
        assert a["staleness_max"] == b["staleness_max"] == 0.0
        for key in a:
            if not key.endswith(TIMING):
                assert a[key] == b[key], (a["step"], key)
    assert same_weights(tmp_path / "inline" / "checkpoint-3", tmp_path / "threaded" / "checkpoint-3")


def test_one_step_off_trains_on_rollouts_of_the_previous_weights(tiny_model_dir, tmp_path):
    out = tmp_path / "k1"
    train(tiny_config(tiny_model_dir, out, "transformers", "eval.before_and_after=false", "train.max_steps=4",
                      "rollout.max_staleness=1"))
    records = steps_of(out)
    assert [r["staleness_mean"] for r in records] == [0.0, 1.0, 1.0, 1.0]
    assert [r["staleness_max"] for r in records] == [0.0, 1.0, 1.0, 1.0]
    for r in records:
        assert {"rollout_wait_s", "sync_wait_s", "producer_wait_s", "rollout_s", "reward_s"} <= set(r)
        assert min(r["rollout_wait_s"], r["sync_wait_s"], r["producer_wait_s"]) >= 0.0
    # Step 1 was sampled by the weights it trains (the engine's copy, synced at start); from step 2
    # the sampler's log-probs are those of the weights one update older (lr 1e-3 moves them).
    assert records[0]["logprob_mismatch"] < 1e-4, records[0]["logprob_mismatch"]
    assert all(r["logprob_mismatch"] > 1e-3 for r in records[1:]), [r["logprob_mismatch"] for r in records]


def test_resume_with_rollouts_sampled_ahead_is_exact(tiny_model_dir, tmp_path):
    """A 4-step run, and the same run killed after checkpoint 2 and resumed, end the same."""
    args = ("eval.before_and_after=false", "rollout.max_staleness=1", "train.max_steps=4")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_config(tiny_model_dir, straight, "transformers", *args))
    state = json.loads((straight / "checkpoint-2" / "trainer_state.json").read_text())
    # step 3's rollouts were sampled (by version 1) before checkpoint 2 was written: they are in it
    assert [(p["step"], p["version"]) for p in state["pending_rollouts"]] == [(3, 1)]
    assert state["sampler"]["position"] == 6  # 2 prompts per step, through step 3
    shutil.copytree(straight / "checkpoint-2", split / "checkpoint-2")
    train(tiny_config(tiny_model_dir, split, "transformers", *args), resume=True)
    assert same_weights(straight / "checkpoint-4", split / "checkpoint-4")
    logged = {run: {r["step"]: r for r in steps_of(run)} for run in (straight, split)}
    for step in (3, 4):
        for key in ("reward_mean", "completion_tokens", "loss", "grad_norm", "logprob_mismatch", "staleness_mean"):
            assert logged[straight][step][key] == logged[split][step][key], (step, key)
    final = json.loads((split / "checkpoint-4" / "trainer_state.json").read_text())
    assert final["pending_rollouts"] == []


def test_one_step_off_with_the_vllm_engine(tiny_model_dir, tmp_path):
    """vLLM's in-process engine generating from the producer thread while the trainer trains."""
    out = tmp_path / "vllm-k1"
    train(tiny_config(tiny_model_dir, out, "vllm", "eval.before_and_after=false", "train.max_steps=3",
                      "rollout.max_staleness=1"))
    records = steps_of(out)
    assert [r["staleness_mean"] for r in records] == [0.0, 1.0, 1.0]
    assert records[0]["logprob_mismatch"] < 1e-3  # fp32 engine, the same weights
    assert records[1]["logprob_mismatch"] > records[0]["logprob_mismatch"]


@pytest.mark.parametrize("override, message", [
    ("rollout.max_staleness=-1", r"rollout.max_staleness must be an int >= 0 \(0 = synchronous\), got -1"),
    ("rollout.enable_sleep_mode=true", r"rollout.max_staleness=2 samples while the trainer trains, but "
                                       r"rollout.enable_sleep_mode frees the engine"),
])
def test_bad_staleness_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, ["rollout.max_staleness=2", override])
    assert info.value.key == "rollout.max_staleness"


def test_asynchronous_rollouts_under_torchrun_are_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    from fastgrpo.preflight import check_run

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"rollout\.max_staleness=1: the rollout producer runs in one training "
                                          r"process for now \(this launch has 2") as info:
        check_run(tiny_config(tiny_model_dir, tmp_path, "transformers", "rollout.max_staleness=1"))
    assert info.value.key == "rollout.max_staleness"
