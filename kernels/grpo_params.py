"""The options of the GRPO loss as one frozen dataclass, read by the torch path, the Triton
launchers (grpo_loss_triton.py) and the autograd Function (grpo_loss.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GRPOLossParams:
    """Options of GRPOLossFunction. ratio_low/high are 1 - epsilon_low and 1 + epsilon_high.
    importance_sampling_level and the sampler corrections (tis_cap, sampler_mask, sampler_mask_cap:
    sampler_correction.py) are read by the callers (the kernels see none of them)."""

    ratio_low: float
    ratio_high: float
    beta: float
    use_triton: bool
    importance_sampling_level: str = "token"
    tis_cap: float = 0.0
    sampler_mask: str = "none"
    sampler_mask_cap: float = 2.0
