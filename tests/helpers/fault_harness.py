"""Faults injected into a real run, for tests/test_faults.py and tests/test_soak.py.

In a test's own process: ``inject_faults(monkeypatch.setattr, nan_steps={2})``. As a separate
process that a test can SIGKILL:

    python tests/fault_harness.py [--stall-checkpoint STEP] [--nan-steps 3,7] [--engine-crash-step S] -- train ARGS

- ``stall_checkpoint=STEP``: writing checkpoint-STEP stops after the weights, tokenizer and
  optimizer files and before rng.pt and trainer_state.json (the file that marks a checkpoint
  complete); the process creates ``<output_dir>/STALL_MARKER`` and sleeps there, to be killed.
- ``nan_steps``: the loss of these steps is multiplied by NaN, so are all its gradients.
- ``engine_crash_step``: the rollout engine's ``generate`` raises at that step.
- importing this module registers the reward ``flaky``: the share of distinct characters (a
  signal that a random model's samples vary in), raising for completions whose length is a
  multiple of 3, as a buggy reward meeting odd input would.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

STALL_MARKER = "stalled-in-checkpoint-write"


def _register_flaky_reward() -> None:
    from fastgrpo.rewards import REWARDS, register_reward

    if "flaky" in REWARDS:
        return

    @register_reward("flaky")
    def flaky(completions, answers, **ctx):
        values = []
        for c in completions:
            if len(c) % 3 == 0:
                raise ZeroDivisionError(f"flaky reward: a completion of {len(c)} characters")
            values.append(len(set(c)) / max(1, len(c)))
        return values


_register_flaky_reward()


def inject_faults(setattr, *, nan_steps=(), stall_checkpoint: int | None = None,
                  engine_crash_step: int | None = None) -> dict:
    """Patch the trainer through ``setattr(obj, name, value)``; returns {"step": the step being run}."""
    import fastgrpo.checkpoint as ckpt
    import fastgrpo.trainer as trainer

    current = {"step": 0}
    collect_groups, fused_grpo_loss, make_engine = trainer.collect_groups, trainer.fused_grpo_loss, trainer.make_engine
    save_checkpoint = ckpt.save_checkpoint

    def collect_groups_noting_the_step(engine, sampler, encode, cfg, step, *args, **kwargs):
        current["step"] = step
        return collect_groups(engine, sampler, encode, cfg, step, *args, **kwargs)

    def loss_with_nan(*args, **kwargs):
        out = fused_grpo_loss(*args, **kwargs)
        return (out[0] * float("nan"), *out[1:]) if current["step"] in nan_steps else out

    def engine_that_crashes(*args, **kwargs):
        engine = make_engine(*args, **kwargs)
        generate = engine.generate

        def generate_or_crash(*a, **k):
            if current["step"] == engine_crash_step:
                raise RuntimeError(f"injected engine crash at step {engine_crash_step}")
            return generate(*a, **k)

        engine.generate = generate_or_crash
        return engine

    def save_that_stalls(output_dir, step, *args, **kwargs):
        if step == stall_checkpoint:
            def stall():
                (Path(output_dir) / STALL_MARKER).touch()
                time.sleep(3600)

            setattr(ckpt, "rng_state", stall)
        return save_checkpoint(output_dir, step, *args, **kwargs)

    setattr(trainer, "collect_groups", collect_groups_noting_the_step)
    if nan_steps:
        setattr(trainer, "fused_grpo_loss", loss_with_nan)
    if engine_crash_step is not None:
        setattr(trainer, "make_engine", engine_that_crashes)
    if stall_checkpoint is not None:
        setattr(ckpt, "save_checkpoint", save_that_stalls)
    return current


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stall-checkpoint", type=int)
    parser.add_argument("--nan-steps", default="", help="comma-separated steps")
    parser.add_argument("--engine-crash-step", type=int)
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    nan_steps = {int(s) for s in args.nan_steps.split(",") if s}
    inject_faults(lambda obj, name, value: setattr(obj, name, value), nan_steps=nan_steps,
                  stall_checkpoint=args.stall_checkpoint, engine_crash_step=args.engine_crash_step)
    from fastgrpo.cli import main as fastgrpo_main

    return fastgrpo_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
