"""grpo_update with train.shared_prefix=true equals train.shared_prefix=false: the same loss and the
same gradient of every parameter at every optimizer pass, on the tiny random model (fp32), with the
reference model (beta > 0), two passes over the rollout (old log-probs), GSPO, truncated completions
masked, and groups split across micro-batches."""

from __future__ import annotations

import pytest
import torch

from fastgrpo.config import load_config
from fastgrpo.model import load_policy, load_reference
from fastgrpo.trainer import Rollout, grpo_update


class RecordingSGD:
    """An optimizer that records every parameter's gradient at each step, then takes a plain SGD
    step (so that a second pass sees moved weights and a ratio that is not 1)."""

    def __init__(self, model, lr=0.05):
        self.model, self.lr, self.steps = model, lr, []
        self.param_groups = [{"lr": lr}]  # what grpo_update logs as the step's learning rate

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self):
        grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.steps.append(grads)
        for n, p in self.model.named_parameters():
            if n in grads:
                p.sub_(self.lr * grads[n])


def _rollout():
    """3 prompts x 4 completions, lengths from 0 to the limit (12, marked truncated)."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (n,), generator=gen).tolist() for n in (9, 2, 14)]
    lengths = [12, 3, 0, 7, 1, 12, 5, 2, 4, 12, 6, 9]
    completions = [torch.randint(10, 1000, (n,), generator=gen).tolist() for n in lengths]
    prompt_index = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    sampler = [[-7.0] * n for n in lengths]
    advantages = torch.randn(len(lengths), generator=gen)
    return Rollout(prompts, prompt_index, completions, sampler, advantages, [n == 12 for n in lengths])


CASES = {
    "defaults": [],
    "beta>0, two passes, split groups": ["loss.beta=0.1", "train.num_iterations=2",
                                         "train.max_tokens_per_microbatch=40"],
    "GSPO, masked truncation, dr_grpo, two passes": ["loss.importance_sampling_level=sequence",
                                                   "loss.mask_truncated=true", "loss.loss_type=dr_grpo",
                                                   "train.num_iterations=2"],
}


def _update(model_dir, shared, overrides):
    cfg = load_config(None, [f"model.path={model_dir}", "rollout.max_completion_length=12",
                             "train.max_grad_norm=1e9", f"train.shared_prefix={str(shared).lower()}",
                             "loss.epsilon_low=0.01", "loss.epsilon_high=0.01", *overrides])
    policy = load_policy(model_dir)
    reference = None
    if cfg.loss.beta > 0:
        reference = load_reference(model_dir)
        with torch.no_grad():  # a reference that differs from the policy: the KL term is not zero
            gen = torch.Generator().manual_seed(5)
            for p in reference.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    optimizer = RecordingSGD(policy)
    stats = grpo_update(policy, reference, optimizer, _rollout(), cfg, torch.device("cpu"))
    return stats, optimizer.steps


@pytest.mark.parametrize("case", list(CASES))
def test_grpo_update_with_shared_prefix_equals_one_copy_per_completion(tiny_model_dir, case):
    stats_plain, steps_plain = _update(tiny_model_dir, False, CASES[case])
    stats_shared, steps_shared = _update(tiny_model_dir, True, CASES[case])
    assert len(steps_plain) == len(steps_shared) >= 1
    assert stats_shared["loss"] == pytest.approx(stats_plain["loss"], rel=1e-5, abs=1e-7)
    assert stats_shared["grad_norm"] == pytest.approx(stats_plain["grad_norm"], rel=1e-4)
    assert stats_shared["logprob_mismatch"] == pytest.approx(stats_plain["logprob_mismatch"], rel=1e-5)
    for plain, shared in zip(steps_plain, steps_shared):
        assert plain.keys() == shared.keys() and plain
        for name, grad in plain.items():
            scale = grad.abs().max().item()
            torch.testing.assert_close(shared[name], grad, rtol=1e-4, atol=1e-5 * max(scale, 1e-12), msg=name)
