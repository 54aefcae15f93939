"""The one packed format: prompt+completion sequences concatenated with no padding.

A GRPO batch holds S sequences of different lengths. Padding them to the longest would waste
compute and memory in proportion to the length spread (completions of reasoning models run from
a few tokens to the full budget), so sequences are concatenated into one row of T tokens and
attention is kept inside each sequence with ``cu_seqlens`` (flash-attention's varlen format, see
``fastgrpo.attention``).

Only completion tokens are scored. Position ``p`` predicts token ``p + 1``, so the prediction
positions of a completion are the last prompt token through the second-to-last completion token:

    sequence i (prompt P_i tokens, completion C_i tokens) starting at packed offset o_i:
        logit_positions  = o_i + P_i - 1, ..., o_i + P_i + C_i - 2     (C_i positions)
        targets          = input_ids[logit_positions + 1]              (the completion tokens)

The model returns hidden states only at ``logit_positions`` ([Nc, H], Nc = sum C_i), which the
log-prob kernel turns into log-probs of ``targets`` without building logits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PackedBatch", "pack_sequences", "plan_microbatches"]


@dataclass
class PackedBatch:
    """S sequences packed into T tokens, Nc of which are scored completion tokens.

    Attributes:
        input_ids: [T] int64, all sequences concatenated (prompt then completion), no padding.
        position_ids: [T] int64, restarting at 0 at the start of every sequence.
        cu_seqlens: [S+1] int32, sequence i occupies packed tokens cu_seqlens[i]:cu_seqlens[i+1].
        max_seqlen: the longest sequence, in tokens (an int, as flash-attention wants it).
        logit_positions: [Nc] int64, packed positions whose next token is a completion token.
        targets: [Nc] int64, the completion token predicted at each of ``logit_positions``.
        completion_cu_seqlens: [S+1] int32, sequence i's completion tokens are
            ``targets[completion_cu_seqlens[i]:completion_cu_seqlens[i+1]]`` (may be empty).
        kv_index, cu_seqlens_k, max_seqlen_k: None in the layout above, where every sequence
            attends to itself. Shared-prompt groups (``fastgrpo.shared_prefix``) set them: then
            ``cu_seqlens`` [N+1] delimits N attention *segments* (a group's prompt, then each of its
            completions), segment n's keys are the packed tokens
            ``kv_index[cu_seqlens_k[n]:cu_seqlens_k[n+1]]`` (a completion's: its prompt's, then its
            own) and its causal mask is aligned bottom-right (the last query sees every key).
    """

    input_ids: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    logit_positions: Tensor
    targets: Tensor
    completion_cu_seqlens: Tensor
    kv_index: Tensor | None = None
    cu_seqlens_k: Tensor | None = None
    max_seqlen_k: int | None = None

    @property
    def shares_prefixes(self) -> bool:
        """True for the shared-prompt-group layout (keys gathered through ``kv_index``)."""
        return self.kv_index is not None

    @property
    def num_sequences(self) -> int:
        """S, the number of scored (prompt, completion) sequences."""
        return self.completion_cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        """T, the number of packed tokens (prompts and completions)."""
        return self.input_ids.numel()

    @property
    def num_completion_tokens(self) -> int:
        """Nc, the number of scored completion tokens."""
        return self.targets.numel()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """A copy with every tensor on ``device`` (dtypes unchanged)."""

        def move(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=non_blocking)

        return PackedBatch(
            input_ids=move(self.input_ids),
            position_ids=move(self.position_ids),
            cu_seqlens=move(self.cu_seqlens),
            max_seqlen=self.max_seqlen,
            logit_positions=move(self.logit_positions),
            targets=move(self.targets),
            completion_cu_seqlens=move(self.completion_cu_seqlens),
            kv_index=move(self.kv_index),
            cu_seqlens_k=move(self.cu_seqlens_k),
            max_seqlen_k=self.max_seqlen_k,
        )


def _check_token_lists(name: str, sequences: list[list[int]]) -> None:
    if not isinstance(sequences, (list, tuple)):
        raise TypeError(f"{name} must be a list of token-id lists, got {type(sequences).__name__}")
    for index, tokens in enumerate(sequences):
        if not isinstance(tokens, (list, tuple)):
            raise TypeError(
                f"{name}[{index}] must be a list of int token ids, got {type(tokens).__name__}"
            )


def pack_sequences(prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> PackedBatch:
    """Pack S (prompt, completion) pairs into one PackedBatch on the CPU.

    Args:
        prompt_ids: S lists of token ids, each non-empty (the first prediction position of a
            completion is the last prompt token).
        completion_ids: S lists of token ids; an empty completion is valid and contributes a
            sequence with zero scored tokens.

    Returns:
        PackedBatch with T = sum(len(prompt) + len(completion)) tokens and
        Nc = sum(len(completion)) scored positions.
    """
    _check_token_lists("prompt_ids", prompt_ids)
    _check_token_lists("completion_ids", completion_ids)
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(
            f"prompt_ids has {len(prompt_ids)} sequences but completion_ids has "
            f"{len(completion_ids)}: they must pair up one to one"
        )
    if len(prompt_ids) == 0:
        raise ValueError("pack_sequences needs at least one sequence, got 0")
    for index, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(
                f"prompt_ids[{index}] is empty: every prompt needs at least one token, since the "
                "last prompt token is where the first completion token is predicted"
            )

    prompt_lens = torch.tensor([len(p) for p in prompt_ids], dtype=torch.int64)
    completion_lens = torch.tensor([len(c) for c in completion_ids], dtype=torch.int64)
    seq_lens = prompt_lens + completion_lens

    flat_tokens = list(
        itertools.chain.from_iterable(
            itertools.chain(p, c) for p, c in zip(prompt_ids, completion_ids)
        )
    )
    input_ids = torch.tensor(flat_tokens, dtype=torch.int64)
    if input_ids.numel() and int(input_ids.min()) < 0:
        raise ValueError(f"token ids must be >= 0, found {int(input_ids.min())}")

    seq_starts = torch.cumsum(seq_lens, 0) - seq_lens
    cu_seqlens = torch.zeros(len(prompt_ids) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(seq_lens, 0)
    total_tokens = input_ids.numel()
    position_ids = torch.arange(total_tokens, dtype=torch.int64) - torch.repeat_interleave(
        seq_starts, seq_lens
    )

    completion_starts = torch.cumsum(completion_lens, 0) - completion_lens
    completion_cu_seqlens = torch.zeros(len(prompt_ids) + 1, dtype=torch.int32)
    completion_cu_seqlens[1:] = torch.cumsum(completion_lens, 0)
    num_completion = int(completion_lens.sum())
    offset_in_completion = torch.arange(num_completion, dtype=torch.int64) - torch.repeat_interleave(
        completion_starts, completion_lens
    )
    first_prediction = seq_starts + prompt_lens - 1
    logit_positions = torch.repeat_interleave(first_prediction, completion_lens) + offset_in_completion
    targets = input_ids[logit_positions + 1]

    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=int(seq_lens.max()),
        logit_positions=logit_positions,
        targets=targets,
        completion_cu_seqlens=completion_cu_seqlens,
    )


def plan_microbatches(seq_lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most ``max_tokens`` packed tokens.

    First-fit decreasing: sequences are taken longest first (ties by index) and each goes into
    the first micro-batch with room, else opens a new one. This uses the fewest forward passes
    in practice (FFD is within 11/9 of the optimum), which matters more than keeping the input
    order: the loss is aggregated over the whole batch, not per micro-batch.

    Args:
        seq_lengths: S sequence lengths in tokens (prompt + completion), each >= 1.
        max_tokens: the token budget of one micro-batch (config key
            ``train.max_tokens_per_microbatch``).

    Returns:
        Micro-batches as lists of indices into ``seq_lengths``, each list ascending, the lists
        ordered by their first index. Every index appears exactly once.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(
            f"max_tokens (train.max_tokens_per_microbatch) must be a positive int, got {max_tokens!r}"
        )
    lengths = [int(n) for n in seq_lengths]
    for index, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"seq_lengths[{index}] is {length}: every sequence has >= 1 token")
        if length > max_tokens:
            raise ValueError(
                f"sequence {index} has {length} tokens, more than the micro-batch budget "
                f"train.max_tokens_per_microbatch={max_tokens}; raise that budget to at least "
                f"{length} or shorten the prompt/completion limits"
            )

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] = free - lengths[index]
                break
        else:
            bins.append([index])
            room.append(max_tokens - lengths[index])
    microbatches = [sorted(b) for b in bins]
    microbatches.sort(key=lambda b: b[0])
    return microbatches
