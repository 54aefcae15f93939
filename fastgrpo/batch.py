"""One step's data as it moves through the trainer, in plain sight:

    StepBatch   what the rollout and the rewards produced: prompts, completions grouped by prompt
                (G each), their rewards, and the step's reward and sampling metrics
    Rollout     what an update trains on: token ids, the sampler's log-probs and one advantage per
                completion (computed once by the trainer, ``StepBatch.to_rollout(advantages)``)

``Rollout.select`` takes a subset of the sequences (a rank's share under torchrun).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: importing the rollout package would load the engines
    from fastgrpo.rollout.base import Completion


@dataclass
class Rollout:
    """One step's samples, flattened: sequence i is ``prompts[prompt_index[i]] + completions[i]``."""

    prompts: list[list[int]]
    prompt_index: list[int]
    completions: list[list[int]]
    sampler_logprobs: list[list[float]]
    advantages: torch.Tensor  # [sequences] float32
    truncated: list[bool]  # the completion hit the length limit (finish_reason "length")

    def sequences(self, idx: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        return [self.prompts[self.prompt_index[i]] for i in idx], [self.completions[i] for i in idx]

    def select(self, indices: list[int]) -> Rollout:
        """The sequences ``indices``, in that order. ``prompts`` stays whole, so ``prompt_index``
        keeps its meaning."""
        n = len(self.completions)
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"Rollout.select: indices {bad[:5]} are outside the {n} sequences (0..{n - 1})")
        return Rollout(
            prompts=self.prompts,
            prompt_index=[self.prompt_index[i] for i in indices],
            completions=[self.completions[i] for i in indices],
            sampler_logprobs=[self.sampler_logprobs[i] for i in indices],
            advantages=self.advantages[torch.tensor(indices, dtype=torch.long)],
            truncated=[self.truncated[i] for i in indices],
        )


@dataclass
class StepBatch:
    """One step's prompts, completions (grouped by prompt, G each) and their rewards.

    reward_metrics: grader and reward-failure counts and lang_drift_frac over every completion this
    step rewarded (rewards.combine_reward_metrics); stats: DAPO dynamic-sampling counts (or {}).
    """

    prompts: list[list[int]]
    samples: list[Completion]
    rewards: list[float]
    per_reward: dict[str, list[float]]
    stats: dict[str, float] = field(default_factory=dict)
    reward_metrics: dict[str, float] = field(default_factory=dict)

    def to_rollout(self, advantages: torch.Tensor) -> Rollout:
        """The trainer's view: token ids, sampler log-probs and ``advantages`` [one per completion]."""
        if advantages.shape != (len(self.samples),):
            raise ValueError(f"advantages must have shape ({len(self.samples)},), one per completion, "
                             f"got {tuple(advantages.shape)}")
        s = self.samples
        return Rollout(self.prompts, [c.prompt_index for c in s], [c.token_ids for c in s], [c.logprobs for c in s],
                       advantages, [c.finish_reason == "length" for c in s])
