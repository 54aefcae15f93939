"""Optimizers and learning-rate schedules: AdamW from torch or 8-bit AdamW from bitsandbytes."""

from __future__ import annotations

import math

import torch

from fastgrpo.config import TrainConfig


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``adamw``: torch AdamW (fp32 states, 8 bytes/param). ``adamw8bit``: bitsandbytes AdamW8bit
    (uint8 states, ~2 bytes/param), which runs on CPU too (bitsandbytes 0.50)."""
    params = [p for p in params if p.requires_grad]
    kwargs = dict(lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # fused AdamW exists for CUDA tensors only; foreach is the fast path on CPU.
        fused = bool(params) and params[0].is_cuda
        return torch.optim.AdamW(params, fused=fused, **kwargs)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ImportError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from exc
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise ValueError(f"train.optimizer: {cfg.optimizer!r} is not one of adamw, adamw8bit")


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then constant, cosine or linear decay to 0 at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
