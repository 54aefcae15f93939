"""Group-relative advantages.

The per-token objective and the loss-aggregation modes live in ``fastgrpo.kernels.grpo_token_loss``
(their single copy); this module turns rewards into advantages, with one registry of scalings.
"""

from __future__ import annotations

from typing import Callable

import torch

AdvantageFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
ADVANTAGE_SCALINGS: dict[str, AdvantageFn] = {}


def register_advantage_scaling(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def wrap(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGE_SCALINGS[name] = fn
        return fn

    return wrap


@register_advantage_scaling("group")
def _scale_by_group_std(centered: torch.Tensor, rewards_grouped: torch.Tensor, eps: float) -> torch.Tensor:
    return centered / (rewards_grouped.std(dim=1, keepdim=True) + eps)


@register_advantage_scaling("batch")
def _scale_by_batch_std(centered: torch.Tensor, rewards_grouped: torch.Tensor, eps: float) -> torch.Tensor:
    return centered / (rewards_grouped.std() + eps)


@register_advantage_scaling("none")
def _no_scaling(centered: torch.Tensor, rewards_grouped: torch.Tensor, eps: float) -> torch.Tensor:
    # Dr. GRPO: dividing by the group std up-weights groups that are nearly all right or all wrong.
    return centered


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages: ``(r - mean(group)) / (std + eps)`` with the std chosen by ``scale``.

    rewards: [B * G] float, grouped (the G samples of prompt 0 first); returns [B * G] float32.
    A group whose rewards all agree gets advantage 0: it carries no learning signal.
    """
    if scale not in ADVANTAGE_SCALINGS:
        raise ValueError(f"unknown advantage scaling {scale!r}; valid: {', '.join(ADVANTAGE_SCALINGS)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, got {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    advantages = ADVANTAGE_SCALINGS[scale](centered, grouped, eps)
    # centered is exactly 0 in a flat group; keep it 0 even when eps = 0 divides 0 by 0
    return torch.where(centered == 0, torch.zeros_like(advantages), advantages).reshape(-1)

