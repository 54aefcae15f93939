"""A tiny training config and the test reward that gives a random model's groups a signal."""

from __future__ import annotations

from fastgrpo.config import load_config
from fastgrpo.rewards import REWARDS, register_reward


def distinct_chars(completions, answers, **ctx):
    """The share of distinct characters: it varies between random samples, so groups are never flat
    (a random model never answers correctly, and accuracy alone gives zero gradients)."""
    return [len(set(c)) / max(1, len(c)) for c in completions]


def register_test_reward() -> None:
    if "distinct_chars" not in REWARDS:
        register_reward("distinct_chars")(distinct_chars)


def tiny_config(model_dir, out, engine, *extra):
    register_test_reward()
    return load_config(None, [
        f"model.path={model_dir}", f"log.output_dir={out}", f"rollout.engine={engine}",
        "rollout.prompts_per_step=2", "rollout.num_generations=4", "rollout.max_completion_length=12",
        "rollout.cpu_kvcache_gb=1", "rollout.dtype=float32",
        "data.num_train=40", "data.num_eval=4", "eval.max_completion_length=8",
        # a large learning rate so that one step visibly moves a random model's weights
        "train.learning_rate=1e-3", "train.warmup_steps=0", "train.max_steps=2",
        "train.max_tokens_per_microbatch=160", "log.checkpoint_every=1", "log.keep_last=3",
        "reward_weights={accuracy: 1.0, format: 0.5, distinct_chars: 1.0}",
        *extra,
    ])
