"""The packed format (fastgrpo.packing): layout invariants, errors, micro-batch planning."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgrpo.packing import PackedBatch, pack_sequences, plan_microbatches

token_lists = st.lists(st.integers(0, 1000), min_size=0, max_size=12)
pairs = st.lists(
    st.tuples(st.lists(st.integers(0, 1000), min_size=1, max_size=12), token_lists),
    min_size=1,
    max_size=8,
)


def _check_layout(batch: PackedBatch, prompts, completions):
    """Rebuild every field from the definition, one sequence at a time."""
    assert batch.input_ids.dtype == torch.int64 and batch.position_ids.dtype == torch.int64
    assert batch.cu_seqlens.dtype == torch.int32 and batch.completion_cu_seqlens.dtype == torch.int32
    assert batch.logit_positions.dtype == torch.int64 and batch.targets.dtype == torch.int64
    assert batch.num_sequences == len(prompts)
    assert batch.num_tokens == sum(len(p) + len(c) for p, c in zip(prompts, completions))
    assert batch.num_completion_tokens == sum(len(c) for c in completions)
    assert batch.max_seqlen == max(len(p) + len(c) for p, c in zip(prompts, completions))
    assert int(batch.cu_seqlens[0]) == 0 and int(batch.completion_cu_seqlens[0]) == 0
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        start, end = int(batch.cu_seqlens[i]), int(batch.cu_seqlens[i + 1])
        assert batch.input_ids[start:end].tolist() == prompt + completion
        assert batch.position_ids[start:end].tolist() == list(range(end - start))
        c_start, c_end = int(batch.completion_cu_seqlens[i]), int(batch.completion_cu_seqlens[i + 1])
        assert batch.targets[c_start:c_end].tolist() == completion
        expected_positions = [start + len(prompt) - 1 + j for j in range(len(completion))]
        assert batch.logit_positions[c_start:c_end].tolist() == expected_positions
    # position p predicts token p + 1
    assert torch.equal(batch.input_ids[batch.logit_positions + 1], batch.targets)


def test_pack_small_example_including_empty_completion():
    prompts = [[5, 6, 7], [8], [9, 10]]
    completions = [[11, 12], [], [13]]
    batch = pack_sequences(prompts, completions)
    _check_layout(batch, prompts, completions)


@settings(max_examples=60, deadline=None)
@given(pairs)
def test_pack_layout_property(sequence_pairs):
    prompts = [list(p) for p, _ in sequence_pairs]
    completions = [list(c) for _, c in sequence_pairs]
    _check_layout(pack_sequences(prompts, completions), prompts, completions)


def test_all_completions_empty_gives_zero_scored_tokens():
    batch = pack_sequences([[1, 2], [3]], [[], []])
    assert batch.num_completion_tokens == 0
    assert batch.logit_positions.shape == (0,) and batch.targets.shape == (0,)
    assert batch.completion_cu_seqlens.tolist() == [0, 0, 0]


def test_to_moves_every_tensor_and_keeps_dtypes():
    batch = pack_sequences([[1, 2, 3]], [[4, 5]])
    moved = batch.to("meta")
    for name in ("input_ids", "position_ids", "cu_seqlens", "logit_positions", "targets",
                 "completion_cu_seqlens"):
        before, after = getattr(batch, name), getattr(moved, name)
        assert after.device.type == "meta", name
        assert after.dtype == before.dtype and after.shape == before.shape, name
    assert moved.max_seqlen == batch.max_seqlen


@pytest.mark.parametrize(
    "prompts, completions, message",
    [
        ([[1], []], [[2], [3]], r"prompt_ids\[1\] is empty"),
        ([[1]], [[2], [3]], "1 sequences but completion_ids has 2"),
        ([], [], "at least one sequence"),
        ([[1, -4]], [[2]], "token ids must be >= 0"),
    ],
)
def test_pack_rejects_bad_input(prompts, completions, message):
    with pytest.raises(ValueError, match=message):
        pack_sequences(prompts, completions)


def test_pack_rejects_non_list_sequences():
    with pytest.raises(TypeError, match=r"prompt_ids\[0\]"):
        pack_sequences([torch.tensor([1, 2])], [[3]])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=0, max_size=40), st.integers(50, 200))
def test_plan_microbatches_partitions_within_budget(lengths, budget):
    plan = plan_microbatches(lengths, budget)
    flat = [i for mb in plan for i in mb]
    assert sorted(flat) == list(range(len(lengths)))
    for mb in plan:
        assert mb == sorted(mb) and mb
        assert sum(lengths[i] for i in mb) <= budget
    assert [mb[0] for mb in plan] == sorted(mb[0] for mb in plan)
    # never more micro-batches than the in-order next-fit baseline
    next_fit, room = 0, 0
    for length in lengths:
        if length > room:
            next_fit, room = next_fit + 1, budget
        room -= length
    assert len(plan) <= next_fit
    # and never fewer than the token count allows
    assert len(plan) >= -(-sum(lengths) // budget)


def test_plan_microbatches_packs_tighter_than_input_order():
    # in input order (next fit): [30], [80, 20], [70] -> 3; first-fit decreasing: [80, 20], [30, 70]
    plan = plan_microbatches([30, 80, 20, 70], 100)
    assert plan == [[0, 3], [1, 2]]


def test_plan_microbatches_names_too_long_sequence_and_budget():
    with pytest.raises(ValueError, match=r"sequence 1 has 300 tokens.*max_tokens_per_microbatch=256"):
        plan_microbatches([10, 300, 20], 256)


@pytest.mark.parametrize("budget", [0, -5, 2.5, True])
def test_plan_microbatches_rejects_bad_budget(budget):
    with pytest.raises(ValueError, match="must be a positive int"):
        plan_microbatches([1, 2], budget)


def test_plan_microbatches_rejects_empty_sequence():
    with pytest.raises(ValueError, match=r"seq_lengths\[0\] is 0"):
        plan_microbatches([0, 3], 10)
