"""Faults during a run: non-finite updates, a crashing rollout engine, a kill during a checkpoint
write, and checkpoints that try to run code when loaded. Tiny random model, transformers engine."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastgrpo import checkpoint as ckpt
from fastgrpo.cli import main as fastgrpo_main
from fastgrpo.config import load_config
from fastgrpo.metrics import read_metrics
from fastgrpo.trainer import TrainingStopped, train

from helpers.fault_harness import STALL_MARKER, inject_faults

HARNESS = Path(__file__).resolve().parent / "helpers" / "fault_harness.py"


def tiny_args(model_dir, out, *extra):
    return [f"model.path={model_dir}", f"log.output_dir={out}", "rollout.engine=transformers",
            "rollout.prompts_per_step=2", "rollout.num_generations=4", "rollout.max_completion_length=12",
            "rollout.dtype=float32", "data.num_train=40", "data.num_eval=4", "eval.before_and_after=false",
            "train.learning_rate=1e-3", "train.warmup_steps=0", "train.max_tokens_per_microbatch=160",
            "log.checkpoint_every=1", "log.keep_last=3", "reward_weights={format: 0.5, flaky: 1.0}", *extra]


def steps_of(out):
    return [r["step"] for r in read_metrics(out) if "eval" not in r]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# --- numerical faults ---------------------------------------------------------------------------


def test_nonfinite_step_is_skipped_logged_and_counted(tiny_model_dir, tmp_path, monkeypatch):
    inject_faults(monkeypatch.setattr, nan_steps={2})
    out = tmp_path / "run"
    train(load_config(None, tiny_args(tiny_model_dir, out, "train.max_steps=3")))
    records = [r for r in read_metrics(out) if "eval" not in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["skipped_steps"] for r in records] == [0, 1, 0]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None  # NaN is written as null
    # step 2 changed neither the weights nor the optimizer's moments; step 3 trained again
    w1, w2, w3 = (weights(out / f"checkpoint-{s}") for s in (1, 2, 3))
    assert same_weights(w1, w2) and not same_weights(w2, w3)
    opt1, opt2 = (torch.load(out / f"checkpoint-{s}" / "optimizer.pt", weights_only=True) for s in (1, 2))
    for k in opt1["state"]:
        assert torch.equal(opt1["state"][k]["exp_avg"], opt2["state"][k]["exp_avg"])
        assert torch.isfinite(opt2["state"][k]["exp_avg"]).all()


def test_nonfinite_steps_in_a_row_stop_with_a_checkpoint_and_exit_1(tiny_model_dir, tmp_path, monkeypatch, capsys):
    inject_faults(monkeypatch.setattr, nan_steps={2, 3, 4, 5})
    out = tmp_path / "run"
    rc = fastgrpo_main(["train", *tiny_args(tiny_model_dir, out, "train.max_steps=5", "train.max_consecutive_nonfinite=2",
                                            "log.checkpoint_every=10")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "training stopped: 2 steps in a row had a non-finite loss or gradient (train.max_consecutive_nonfinite=2)" in err
    assert f"--resume {out}" in err
    assert steps_of(out) == [1, 2, 3]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-3"]  # saved by the stop, not by the schedule
    assert ckpt.load_trainer_state(out / "checkpoint-3")["step"] == 3


# --- the rollout engine crashes -------------------------------------------------------------------


def test_engine_crash_saves_the_last_finished_step_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(None, tiny_args(tiny_model_dir, out, "train.max_steps=3", "log.checkpoint_every=10"))
    with monkeypatch.context() as patch:
        inject_faults(patch.setattr, engine_crash_step=2)
        with pytest.raises(TrainingStopped) as info:
            train(cfg)
    message = str(info.value)
    assert "rollout or grading failed at step 2 (RuntimeError: injected engine crash at step 2)" in message
    assert f"step 1 was saved to {out / 'checkpoint-1'}" in message and f"--resume {out}" in message
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]  # checkpoint_every=10 would not have
    assert steps_of(out) == [1]
    assert ckpt.load_trainer_state(out / "checkpoint-1")["sampler"]["position"] == 2  # before step 2's draw

    train(cfg, resume=True)
    assert steps_of(out) == [1, 2, 3]
    assert ckpt.latest_checkpoint(out).name == "checkpoint-3"


# --- a kill during a checkpoint write -------------------------------------------------------------


def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_complete_one(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    log_file = tmp_path / "killed_run.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, str(HARNESS), "--stall-checkpoint", "2", "--", "train",
                                 *tiny_args(tiny_model_dir, out, "train.max_steps=3")], stdout=log, stderr=log)
    deadline = time.monotonic() + 600
    while not (out / STALL_MARKER).exists():
        assert proc.poll() is None, f"the run ended before checkpoint 2: {log_file.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint-2 write within 600 s"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    (out / STALL_MARKER).unlink()

    # On disk: checkpoint 1 complete; 2 only as a temporary folder without its state file
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    (half,) = out.glob(".tmp-checkpoint-2-*")
    assert (half / "model.safetensors").is_file() and (half / "optimizer.pt").is_file()
    assert not (half / ckpt.STATE_FILE).exists()
    assert steps_of(out) == [1, 2]  # step 2 had finished and was logged, but not saved
    killed_step_2 = weights(half)

    assert fastgrpo_main(["train", "--resume", str(out)]) == 0
    assert steps_of(out) == [1, 2, 3]  # step 2 ran again; each step is in metrics.jsonl once
    rolled_back = [json.loads(line) for line in (out / "metrics.rolled_back.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rolled_back] == [2]
    assert not list(out.glob(".tmp-checkpoint-*"))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    # the step run again from checkpoint 1 is the step the killed process ran: same data, same samples
    rerun = [r for r in read_metrics(out) if r["step"] == 2][0]
    for key in ("reward_mean", "completion_tokens", "loss", "grad_norm"):
        assert rerun[key] == rolled_back[0][key], key
    assert same_weights(killed_step_2, weights(out / "checkpoint-2"))


# --- checkpoint files -----------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this creates a file: the stand-in for a payload that runs arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _tiny_checkpoint(tiny_model_dir, out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer, optimizer, scheduler


def test_loading_never_unpickles_code(tiny_model_dir, tmp_path):
    model, tokenizer, optimizer, scheduler = _tiny_checkpoint(tiny_model_dir, tmp_path)
    folder = ckpt.save_checkpoint(tmp_path, 1, model, tokenizer, optimizer, scheduler, {"sampler": {}})
    marker = tmp_path / "code-ran"
    payload = {"state": {}, "param_groups": [], "x": _RunsCode(marker)}
    torch.save(payload, folder / "optimizer.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckpt.load_training_state(folder, optimizer, scheduler)
    assert not marker.exists()
    # the payload is live: an unguarded torch.load runs it (so the assertion above can fail)
    torch.load(folder / "optimizer.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()

    # weights: a pickled pytorch_model.bin in place of the safetensors file is refused too
    from fastgrpo.model import load_policy

    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_policy(folder)
    assert not marker.exists()


def test_checkpoint_restores_rng_and_keeps_the_last_k(tiny_model_dir, tmp_path):
    import random

    model, tokenizer, optimizer, scheduler = _tiny_checkpoint(tiny_model_dir, tmp_path)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, tokenizer, optimizer, scheduler, {"sampler": {}}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-3"]
    expected = (torch.rand(4), random.random())  # what follows the state saved in checkpoint-3
    torch.manual_seed(123)
    random.seed(123)
    ckpt.load_training_state(tmp_path / "checkpoint-3", optimizer, scheduler)
    assert torch.equal(torch.rand(4), expected[0]) and random.random() == expected[1]
