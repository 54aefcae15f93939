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
        # Fused AdamW on CPU too: at SmolLM2-135M size 0.18 s vs 0.63-0.83 s of CPU time per step
        # for foreach, which also holds an extra copy of all parameters during the step (+513 MiB).
        # FSDP2's sharded parameters (DTensor) on CPU keep foreach: only it was tested there.
        fused = bool(params) and (params[0].is_cuda or not _is_dtensor(params[0]))
        return torch.optim.AdamW(params, fused=fused, foreach=None if fused else True, **kwargs)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ImportError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from exc
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise ValueError(f"train.optimizer: {cfg.optimizer!r} is not one of adamw, adamw8bit")


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(tensor, DTensor)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then constant, or cosine or linear decay from 1 to
    ``min_lr_ratio`` at max_steps (open-rs decays to 10% of the peak: min_lr_ratio 0.1)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
