"""The multi-rank half of tests/test_distributed.py, launched there with torchrun (2 processes).

``dist_worker.py MODEL_DIR RESUME_DIR OUT_DIR``, on each rank (gloo on CPU): (1) one grpo_update
with SGD on a fixed rollout, FSDP2-sharded, the result gathered to rank 0 and saved; (2) resume
from a checkpoint written by one process, one AdamW update on a second rollout, and a checkpoint
written on these ranks. The test repeats both on one process and compares. ``make_rollout`` and
``make_config`` are shared with the test.

``dist_worker.py train ARGS...``: ``fastgrpo train ARGS...`` with the test reward ``distinct_chars``
registered (a random model's completions all score 0 on the built-in rewards: no gradient).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

SGD_LR = 0.1
# With SGD the update is lr x the (clipped) gradient, so comparing weights compares gradients.


if __name__ == "__main__":  # run as a script on each rank: make `helpers` importable as under pytest
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.trainer_setup import register_test_reward  # noqa: E402


def make_config(model_dir, out, *extra):
    from fastgrpo.config import load_config

    return load_config(None, [
        f"model.path={model_dir}", f"log.output_dir={out}", "rollout.max_completion_length=12",
        # a small budget: 3-4 micro-batches per rank; for make_rollout(1), 4 on one rank and 3 on the
        # other before distributed.same_microbatch_count evens them out
        "train.max_tokens_per_microbatch=34", "train.max_grad_norm=1000.0",
        "loss.beta=0.04", "train.num_iterations=2", "train.learning_rate=1e-3", "train.warmup_steps=0",
        *extra,
    ])


def make_rollout(seed: int, prompts: int = 4, generations: int = 4):
    """A fixed global rollout: random prompt/completion ids, advantages and sampler log-probs."""
    from fastgrpo.batch import Rollout

    g = torch.Generator().manual_seed(seed)
    ids = lambda lo, hi: torch.randint(0, 2000, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
    prompt_ids = [ids(3, 10) for _ in range(prompts)]
    completions = [ids(1, 13) for _ in range(prompts * generations)]
    return Rollout(
        prompts=prompt_ids,
        prompt_index=[i // generations for i in range(prompts * generations)],
        completions=completions,
        sampler_logprobs=[(-torch.rand(len(c), generator=g) * 10).tolist() for c in completions],
        advantages=torch.randn(prompts * generations, generator=g),
        truncated=[len(c) == 12 for c in completions],
    )


def full_weights(model) -> dict[str, torch.Tensor]:
    """Every rank must call it (a gather); rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main(model_dir: str, resume_dir: str, out_dir: str) -> None:
    from transformers import AutoTokenizer

    from fastgrpo import distributed
    from fastgrpo.checkpoint import latest_checkpoint
    from fastgrpo.model import load_policy, load_reference
    from fastgrpo.optim import build_optimizer, build_scheduler
    from fastgrpo.trainer import grpo_update

    out = Path(out_dir)
    cfg = make_config(model_dir, out / "run", "rollout.mode=server")
    distributed.setup(cfg)
    assert distributed.world_size() == 2, distributed.world_size()
    device = torch.device("cpu")
    reference = distributed.shard_model(load_reference(model_dir))

    # (1) one update with SGD on the fixed rollout
    policy = distributed.shard_model(load_policy(model_dir))
    sgd = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=SGD_LR)
    stats = grpo_update(policy, reference, sgd, make_rollout(1), cfg, device)
    weights = full_weights(policy)
    if distributed.is_main():
        torch.save({"stats": stats, "weights": weights}, out / "sgd.pt")

    # (2) resume a one-process checkpoint here, one AdamW update, checkpoint on two ranks
    start = latest_checkpoint(resume_dir)
    policy = distributed.shard_model(load_policy(start))
    optimizer = build_optimizer(policy.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    state = distributed.load_training_state(start, policy, optimizer, scheduler)
    stats = grpo_update(policy, reference, optimizer, make_rollout(0), cfg, device)
    scheduler.step()
    distributed.save_checkpoint(out / "run", state["step"] + 1, policy, AutoTokenizer.from_pretrained(model_dir),
                                optimizer, scheduler, {"sampler": state["sampler"]})
    if distributed.is_main():
        torch.save({"stats": stats}, out / "adam.pt")
    distributed.teardown()


if __name__ == "__main__":
    if sys.argv[1] == "train":
        from fastgrpo.cli import main as cli_main

        register_test_reward()
        sys.exit(cli_main(sys.argv[1:]))
    main(*sys.argv[1:4])
