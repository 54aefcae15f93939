"""Shared-prompt groups: a prompt goes through the model once per group, not once per completion.

GRPO samples G completions of every prompt. Packed as G (prompt, completion) sequences
(``fastgrpo.packing.pack_sequences``), a group costs G x (P + C) tokens of forward and backward;
packed as one prompt followed by its G completions it costs P + G x C (default run: P = 98,
C = 21, G = 8: 952 -> 266 tokens). The result is exact, not an approximation:

    group with prompt p (P tokens) and completions c_1 .. c_G, packed at offset o:
        tokens     p | c_1 | c_2 | ... | c_G
        positions  0..P-1 | P..P+C_1-1 | P..P+C_2-1 | ...   (each completion continues the prompt)
        attention  the prompt: causal over itself;
                   c_j: every prompt token, then causally its own tokens, never another completion

so every token sees exactly the positions and context it had when it was sampled. The attention
segments go into ``PackedBatch`` as query segments (``cu_seqlens``: the prompt, then each
completion) and their keys (``kv_index`` gathered at ``cu_seqlens_k``; see
``fastgrpo.attention.varlen_attention``). The last prompt token predicts the first token of every
completion, so it appears G times in ``logit_positions``: the hidden states handed to the loss head
are [Nc, H] in the same order as in the G-copy layout, and autograd sums the G gradients of that
row. Completion order (``targets``, ``completion_cu_seqlens``) is the order of the sequence indices
given, so advantages and sampler log-probs line up exactly as with ``pack_sequences``.

Micro-batches hold whole groups (``plan_group_microbatches``); a group over the token budget is
split into several, each with its own copy of the prompt (still exact).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .packing import PackedBatch, pack_sequences, plan_microbatches

__all__ = [
    "pack_groups",
    "pack_microbatch",
    "plan_group_microbatches",
    "plan_step_microbatches",
    "shared_token_count",
]


def _runs(prompt_index: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) runs of equal consecutive prompt indices: the groups in packing order."""
    runs, start = [], 0
    for i in range(1, len(prompt_index) + 1):
        if i == len(prompt_index) or prompt_index[i] != prompt_index[start]:
            runs.append((start, i))
            start = i
    return runs


def pack_groups(
    prompts: Sequence[Sequence[int]], prompt_index: Sequence[int], completion_ids: Sequence[Sequence[int]]
) -> PackedBatch:
    """Pack S completions into shared-prompt groups (consecutive equal ``prompt_index``).

    Args:
        prompts: the distinct prompts (token-id lists, each non-empty).
        prompt_index: S indices into ``prompts``; consecutive equal entries form one group (a
            prompt that comes back later starts a new group, with its own copy of the prompt).
        completion_ids: S token-id lists (empty ones are valid: no scored tokens).

    Returns:
        A PackedBatch whose ``logit_positions``/``targets``/``completion_cu_seqlens`` list the S
        completions in the given order, with ``kv_index``/``cu_seqlens_k`` set.
    """
    if len(prompt_index) != len(completion_ids):
        raise ValueError(
            f"prompt_index has {len(prompt_index)} entries but completion_ids has "
            f"{len(completion_ids)}: one prompt index per completion"
        )
    if len(completion_ids) == 0:
        raise ValueError("pack_groups needs at least one completion, got 0")
    for i, p in enumerate(prompt_index):
        if not 0 <= p < len(prompts):
            raise ValueError(f"prompt_index[{i}] = {p} is not an index into the {len(prompts)} prompts")
        if len(prompts[p]) == 0:
            raise ValueError(
                f"prompts[{p}] is empty: every prompt needs at least one token, since the last "
                "prompt token is where the first completion token is predicted"
            )

    tokens: list[int] = []
    positions: list[int] = []
    q_lengths: list[int] = []  # query segments: a group's prompt, then each of its completions
    kv_index: list[int] = []
    k_lengths: list[int] = []
    logit_positions: list[int] = []
    for start, end in _runs(prompt_index):
        prompt = list(prompts[prompt_index[start]])
        prompt_len, prompt_start = len(prompt), len(tokens)
        prompt_keys = range(prompt_start, prompt_start + prompt_len)
        tokens += prompt
        positions += range(prompt_len)
        q_lengths.append(prompt_len)
        kv_index += prompt_keys
        k_lengths.append(prompt_len)
        for i in range(start, end):
            completion = list(completion_ids[i])
            c_start, c_len = len(tokens), len(completion)
            tokens += completion
            positions += range(prompt_len, prompt_len + c_len)
            if c_len:
                q_lengths.append(c_len)
                kv_index += prompt_keys
                kv_index += range(c_start, c_start + c_len)
                k_lengths.append(prompt_len + c_len)
                # the last prompt token predicts the first completion token, then each completion
                # token predicts the next
                logit_positions += [prompt_start + prompt_len - 1, *range(c_start, c_start + c_len - 1)]

    input_ids = torch.tensor(tokens, dtype=torch.int64)
    if int(input_ids.min()) < 0:
        raise ValueError(f"token ids must be >= 0, found {int(input_ids.min())}")
    completion_lens = torch.tensor([len(c) for c in completion_ids], dtype=torch.int64)
    completion_cu_seqlens = torch.zeros(len(completion_ids) + 1, dtype=torch.int32)
    completion_cu_seqlens[1:] = torch.cumsum(completion_lens, 0)

    def cumulative(lengths: list[int]) -> torch.Tensor:
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
        return cu

    targets = torch.tensor(
        [t for c in completion_ids for t in c], dtype=torch.int64
    )
    return PackedBatch(
        input_ids=input_ids,
        position_ids=torch.tensor(positions, dtype=torch.int64),
        cu_seqlens=cumulative(q_lengths),
        max_seqlen=max(q_lengths),
        logit_positions=torch.tensor(logit_positions, dtype=torch.int64),
        targets=targets,
        completion_cu_seqlens=completion_cu_seqlens,
        kv_index=torch.tensor(kv_index, dtype=torch.int64),
        cu_seqlens_k=cumulative(k_lengths),
        max_seqlen_k=max(k_lengths),
    )


def _group_units(
    prompt_lens: Sequence[int], prompt_index: Sequence[int], completion_lens: Sequence[int], max_tokens: int
) -> list[list[int]]:
    """The sequence indices of every group (all completions of one prompt, in index order), cut
    into consecutive pieces of at most ``max_tokens`` packed tokens (prompt + completions)."""
    members: dict[int, list[int]] = {}
    for i, p in enumerate(prompt_index):
        members.setdefault(p, []).append(i)
    units: list[list[int]] = []
    for p, seqs in sorted(members.items(), key=lambda item: item[1][0]):
        piece: list[int] = []
        used = 0
        for i in seqs:
            need = completion_lens[i] if piece else prompt_lens[i] + completion_lens[i]
            if piece and used + need > max_tokens:
                units.append(piece)
                piece, used, need = [], 0, prompt_lens[i] + completion_lens[i]
            if need > max_tokens:
                raise ValueError(
                    f"sequence {i} has {need} tokens (prompt {prompt_lens[i]} + completion "
                    f"{completion_lens[i]}), more than the micro-batch budget "
                    f"train.max_tokens_per_microbatch={max_tokens}; raise that budget to at least "
                    f"{need} or shorten the prompt/completion limits"
                )
            piece.append(i)
            used += need
        units.append(piece)
    return units


def plan_group_microbatches(
    prompt_lens: Sequence[int], prompt_index: Sequence[int], completion_lens: Sequence[int], max_tokens: int
) -> list[list[int]]:
    """Micro-batches of whole shared-prompt groups, at most ``max_tokens`` packed tokens each.

    A group (the sequences sharing a ``prompt_index``) counts P + sum(C_j) tokens; one over the
    budget is cut into consecutive pieces, each carrying the prompt again. Pieces are placed first
    fit decreasing (``fastgrpo.packing.plan_microbatches``).

    Args:
        prompt_lens: S prompt lengths (of each sequence's prompt).
        prompt_index: S prompt indices; sequences with equal index share their prompt.
        completion_lens: S completion lengths (0 allowed).
        max_tokens: ``train.max_tokens_per_microbatch``.

    Returns:
        Lists of sequence indices; each list holds whole pieces, a piece's indices consecutive and
        ascending, so ``pack_groups`` sees each piece as one group.
    """
    if len(prompt_lens) != len(prompt_index) or len(prompt_index) != len(completion_lens):
        raise ValueError(
            f"prompt_lens ({len(prompt_lens)}), prompt_index ({len(prompt_index)}) and "
            f"completion_lens ({len(completion_lens)}) must have one entry per sequence"
        )
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(
            f"max_tokens (train.max_tokens_per_microbatch) must be a positive int, got {max_tokens!r}"
        )
    units = _group_units(prompt_lens, prompt_index, completion_lens, max_tokens)
    sizes = [prompt_lens[u[0]] + sum(completion_lens[i] for i in u) for u in units]
    return [[i for u in plan for i in units[u]] for plan in plan_microbatches(sizes, max_tokens)]


def shared_token_count(
    prompt_lens: Sequence[int], prompt_index: Sequence[int], completion_lens: Sequence[int]
) -> int:
    """Packed tokens with shared prompts: each run of equal ``prompt_index`` counts its prompt once."""
    runs = _runs(prompt_index)
    return sum(prompt_lens[start] for start, _ in runs) + sum(completion_lens)


def plan_step_microbatches(
    prompts: Sequence[Sequence[int]], prompt_index: Sequence[int], completion_ids: Sequence[Sequence[int]],
    max_tokens: int, shared_prefix: bool,
) -> list[list[int]]:
    """A step's micro-batches (lists of sequence indices) for the layout ``train.shared_prefix``
    asks for: whole groups (``plan_group_microbatches``) or single sequences."""
    prompt_lens = [len(prompts[p]) for p in prompt_index]
    completion_lens = [len(c) for c in completion_ids]
    if shared_prefix:
        return plan_group_microbatches(prompt_lens, prompt_index, completion_lens, max_tokens)
    return plan_microbatches([p + c for p, c in zip(prompt_lens, completion_lens)], max_tokens)


def pack_microbatch(
    prompts: Sequence[Sequence[int]], prompt_index: Sequence[int], completion_ids: Sequence[Sequence[int]],
    idx: Sequence[int], shared_prefix: bool,
) -> PackedBatch:
    """One micro-batch (sequence indices ``idx``) in the layout ``train.shared_prefix`` asks for:
    shared-prompt groups (``pack_groups``) or one (prompt, completion) sequence each."""
    sub_index = [prompt_index[i] for i in idx]
    sub_completions = [completion_ids[i] for i in idx]
    if shared_prefix:
        return pack_groups(prompts, sub_index, sub_completions)
    return pack_sequences([list(prompts[p]) for p in sub_index], sub_completions)
