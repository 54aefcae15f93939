"""Fused kernels: per-token log-probs from hidden states (never [N, V] logits) and the GRPO loss.

Installed as ``fastgrpo.kernels`` (a top-level ``kernels`` package would collide with Hugging
Face's ``kernels`` package, which bitsandbytes imports).
"""

from .logprob import token_logprobs
from .grpo_loss import grpo_token_loss
from .fused_grpo import fused_grpo_loss

__all__ = ["token_logprobs", "grpo_token_loss", "fused_grpo_loss"]
