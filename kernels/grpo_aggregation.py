"""The loss-aggregation modes of the GRPO objectives (their single copy): each turns a packed batch
into one weight per token, ``scale``, so that ``loss = sum_t scale_t * l_t``.

    LOSS_AGGREGATIONS  name -> PackedBatch -> [N] token weights   ("grpo", "bnpo", "dr_grpo", "dapo")
    token_scales       the registry lookup; ValueError lists the valid names

With the global batch's counts in PackedBatch (num_sequences, num_tokens), the weights of a
micro-batch are those the whole batch gives its tokens, so micro-batch losses sum to the batch loss
("bnpo" is normalized per micro-batch, as TRL does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["LOSS_AGGREGATIONS", "PackedBatch", "segment_sums", "sequence_ids", "token_scales"]


@dataclass(frozen=True)
class PackedBatch:
    """What an aggregation mode needs to weigh the tokens of one (micro-)batch.

    seq_ids [N] int64 (sequence of each token), cu_seqlens [S+1], weights [N] float (ones when the
    caller gave none). ``num_tokens`` is the global weighted token count (a 0-dim tensor, the local
    sum, when the caller gave none).
    """

    seq_ids: Tensor
    cu_seqlens: Tensor
    weights: Tensor
    num_sequences: int
    num_tokens: float | Tensor
    num_microbatches: int
    max_completion_length: int | None


def _nonzero(x: Tensor) -> Tensor:
    """x where x > 0, else 1: an all-zero-weight group then contributes 0 instead of 0/0."""
    return torch.where(x > 0, x, torch.ones_like(x))


def segment_sums(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """[S] sums of x [N] over the sequences cu_seqlens [S+1] marks, in x's dtype.

    A float64 cumsum and differences at its values at the boundaries: deterministic (no atomics), and
    the running sum's float64 rounding (~1e-16 of its size) stays far below float32 resolution.
    """
    csum = torch.nn.functional.pad(x.double().cumsum(0), (1, 0))
    cu = cu_seqlens.long()
    return (csum[cu[1:]] - csum[cu[:-1]]).to(x.dtype)


def _sequence_weight_sums(batch: PackedBatch) -> Tensor:
    """[S] sum of token weights per sequence; a float64 cumsum, deterministic (no atomics)."""
    return segment_sums(batch.weights, batch.cu_seqlens)


def _grpo_scale(batch: PackedBatch) -> Tensor:
    """Mean over sequences (of the global batch) of each sequence's weighted token mean."""
    per_sequence = 1.0 / (_nonzero(_sequence_weight_sums(batch)) * batch.num_sequences)
    return batch.weights * per_sequence[batch.seq_ids]


def _bnpo_scale(batch: PackedBatch) -> Tensor:
    """Weighted token mean of this micro-batch, divided by the number of micro-batches."""
    return batch.weights / (_nonzero(batch.weights.sum()) * batch.num_microbatches)


def _dr_grpo_scale(batch: PackedBatch) -> Tensor:
    """Weighted token sum / (global sequence count * max_completion_length): no length bias."""
    return batch.weights / (batch.num_sequences * batch.max_completion_length)


def _dapo_scale(batch: PackedBatch) -> Tensor:
    """Weighted token sum / weighted token count of the whole global batch."""
    num_tokens = batch.num_tokens
    if isinstance(num_tokens, Tensor):
        num_tokens = _nonzero(num_tokens)
    return batch.weights / num_tokens


# The registry of loss types: name -> PackedBatch -> [N] token weights.
LOSS_AGGREGATIONS: dict[str, Callable[[PackedBatch], Tensor]] = {
    "grpo": _grpo_scale, "bnpo": _bnpo_scale, "dr_grpo": _dr_grpo_scale, "dapo": _dapo_scale,
}


def token_scales(loss_type: str, batch: PackedBatch) -> Tensor:
    """[N] weight of each token in the loss for `loss_type`; ValueError lists the valid names."""
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {sorted(LOSS_AGGREGATIONS)}")
    return LOSS_AGGREGATIONS[loss_type](batch)


def sequence_ids(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """[N] int64 index of the packed sequence that holds each token; cu_seqlens [S+1] (0 ... N).

    Uses `output_size` so that a CUDA call does not sync to learn N.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seqs = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(seqs, lengths, output_size=num_tokens)
