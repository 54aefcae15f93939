"""The step's data: StepBatch -> Rollout, Rollout.select, and a rank's share (distributed.local_rollout)."""

from __future__ import annotations

import pytest
import torch

from fastgrpo import distributed
from fastgrpo.batch import Rollout, StepBatch
from fastgrpo.rollout.base import Completion


def _rollout() -> Rollout:
    return Rollout(
        prompts=[[1, 2, 3], [4]],
        prompt_index=[0, 0, 1, 1, 1],
        completions=[[5], [6, 7, 8, 9], [10, 11], [], [12, 13, 14]],
        sampler_logprobs=[[-0.5], [-0.1, -0.2, -0.3, -0.4], [-1.0, -1.5], [], [-2.0, -2.5, -3.0]],
        advantages=torch.tensor([0.5, -0.5, 1.0, 0.0, -1.0]),
        truncated=[False, True, False, False, True],
    )


def test_select_takes_every_per_sequence_field_in_the_given_order_and_keeps_the_prompts():
    r = _rollout()
    part = r.select([4, 1])
    assert part.prompts is r.prompts
    assert part.prompt_index == [1, 0]
    assert part.completions == [[12, 13, 14], [6, 7, 8, 9]]
    assert part.sampler_logprobs == [[-2.0, -2.5, -3.0], [-0.1, -0.2, -0.3, -0.4]]
    assert torch.equal(part.advantages, torch.tensor([-1.0, -0.5]))
    assert part.truncated == [True, True]
    assert part.sequences([0, 1]) == ([[4], [1, 2, 3]], [[12, 13, 14], [6, 7, 8, 9]])
    empty = r.select([])
    assert empty.completions == [] and empty.advantages.shape == (0,)
    with pytest.raises(IndexError, match=r"indices \[5\] are outside the 5 sequences"):
        r.select([0, 5])


def test_local_rollouts_of_all_ranks_partition_the_global_one(monkeypatch):
    r = _rollout()
    assert distributed.local_rollout(r) is r  # one process: the whole rollout
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        part = distributed.local_rollout(r)
        assert part.prompts is r.prompts
        seen += [(p, tuple(c), float(a), t) for p, c, a, t in
                 zip(part.prompt_index, part.completions, part.advantages, part.truncated)]
    whole = [(p, tuple(c), float(a), t) for p, c, a, t in zip(r.prompt_index, r.completions, r.advantages, r.truncated)]
    assert sorted(seen) == sorted(whole)


def test_to_rollout_takes_one_advantage_per_completion():
    samples = [Completion(prompt_index=0, token_ids=[7, 8], logprobs=[-0.1, -0.2], text="a", finish_reason="stop"),
               Completion(prompt_index=0, token_ids=[9], logprobs=[-0.3], text="b", finish_reason="length")]
    batch = StepBatch([[1, 2]], samples, [1.0, 0.0], {"accuracy": [1.0, 0.0]})
    rollout = batch.to_rollout(torch.tensor([0.7, -0.7]))
    assert rollout.completions == [[7, 8], [9]] and rollout.truncated == [False, True]
    assert rollout.sampler_logprobs == [[-0.1, -0.2], [-0.3]] and rollout.prompt_index == [0, 0]
    with pytest.raises(ValueError, match=r"advantages must have shape \(2,\), one per completion, got \(3,\)"):
        batch.to_rollout(torch.zeros(3))
