"""Shared-prompt groups (fastgrpo.shared_prefix): the packed format, its attention and the model
forward equal the one-copy-per-completion layout (``pack_sequences``), to fp32 round-off.

References: the G-copy layout run through the same model (every parameter's gradient compared), and
for the attention alone the textbook softmax over each segment's keys with a bottom-right mask.
Trainer-level equality (beta > 0, two iterations, GSPO, split groups) is in
test_shared_prefix_trainer.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastgrpo.attention as attention
from fastgrpo.attention import ATTN_IMPLEMENTATION, varlen_attention
from fastgrpo.distributed import split_groups
from fastgrpo.kernels import fused_grpo_loss
from fastgrpo.model import lm_head_weight, packed_hidden_states, packed_token_logprobs
from fastgrpo.packing import pack_sequences
from fastgrpo.shared_prefix import (pack_groups, pack_microbatch, plan_group_microbatches,
                                    plan_step_microbatches, shared_token_count)

pytestmark = pytest.mark.usefixtures("no_attention_override")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=256,
            # far from uniform attention: a completion that saw another completion would differ a lot
            initializer_range=0.2)




def _groups(prompt_lens, completion_lens, seed=0, vocab=300):
    """prompts, prompt_index, completions: group g has len(completion_lens[g]) completions."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in prompt_lens]
    prompt_index = [g for g, lens in enumerate(completion_lens) for _ in lens]
    completions = [torch.randint(0, vocab, (n,), generator=gen).tolist() for lens in completion_lens for n in lens]
    return prompts, prompt_index, completions


def _copies(prompts, prompt_index, completions):
    return pack_sequences([prompts[p] for p in prompt_index], completions)


# ----------------------------------------------------------------------------- format

AWKWARD = ([5, 1, 9], [[3, 0, 4], [2], [0, 0, 7, 1]])  # empty completions, a 1-token prompt


def test_layout_gives_every_token_its_sampled_context_and_position():
    prompts, prompt_index, completions = _groups(*AWKWARD)
    shared, plain = pack_groups(prompts, prompt_index, completions), _copies(prompts, prompt_index, completions)
    assert shared.shares_prefixes and not plain.shares_prefixes
    assert shared.num_tokens == sum(AWKWARD[0]) + sum(map(sum, AWKWARD[1])) == 32
    assert shared.num_tokens == shared_token_count([len(prompts[p]) for p in prompt_index], prompt_index,
                                                   [len(c) for c in completions])
    assert torch.equal(shared.targets, plain.targets)
    assert torch.equal(shared.completion_cu_seqlens, plain.completion_cu_seqlens)
    assert shared.num_sequences == plain.num_sequences == len(completions)
    # each prediction is made by the same token at the same position
    assert torch.equal(shared.input_ids[shared.logit_positions], plain.input_ids[plain.logit_positions])
    assert torch.equal(shared.position_ids[shared.logit_positions], plain.position_ids[plain.logit_positions])
    # each query segment's keys are exactly the tokens (and positions) its sequence has up to it
    qb, kb = shared.cu_seqlens.tolist(), shared.cu_seqlens_k.tolist()
    nonempty = [i for i, c in enumerate(completions) if c]
    segment = 0
    for g in range(len(prompts)):
        prompt = torch.tensor(prompts[g])
        keys = shared.kv_index[kb[segment]:kb[segment + 1]]
        assert torch.equal(shared.input_ids[keys], prompt)
        assert torch.equal(shared.input_ids[qb[segment]:qb[segment + 1]], prompt)
        segment += 1
        for i in (i for i in nonempty if prompt_index[i] == g):
            keys = shared.kv_index[kb[segment]:kb[segment + 1]]
            assert shared.input_ids[keys].tolist() == prompts[g] + completions[i]
            assert shared.position_ids[keys].tolist() == list(range(len(prompts[g]) + len(completions[i])))
            assert shared.input_ids[qb[segment]:qb[segment + 1]].tolist() == completions[i]
            segment += 1
    assert segment == shared.cu_seqlens.numel() - 1
    assert shared.max_seqlen == max(qb[n + 1] - qb[n] for n in range(segment))
    assert shared.max_seqlen_k == max(kb[n + 1] - kb[n] for n in range(segment))


def test_a_prompt_that_comes_back_later_starts_a_new_group():
    prompts, _, completions = _groups([4, 3], [[2, 2], [1]])
    batch = pack_groups(prompts, [0, 1, 0], completions)
    assert batch.num_tokens == 4 + 2 + 3 + 2 + 4 + 1
    assert torch.equal(batch.targets, _copies(prompts, [0, 1, 0], completions).targets)


@pytest.mark.parametrize("call, error", [
    (lambda: pack_groups([[1]], [0, 0], [[2]]), r"prompt_index has 2 entries but completion_ids has 1"),
    (lambda: pack_groups([[1]], [1], [[2]]), r"prompt_index\[0\] = 1 is not an index into the 1 prompts"),
    (lambda: pack_groups([[]], [0], [[2]]), r"prompts\[0\] is empty"),
    (lambda: pack_groups([[1]], [], []), r"at least one completion"),
    (lambda: pack_groups([[-1]], [0], [[2]]), r"token ids must be >= 0, found -1"),
])
def test_pack_groups_errors_name_the_bad_value(call, error):
    with pytest.raises(ValueError, match=error):
        call()


def test_group_microbatches_hold_whole_groups_and_split_big_ones_with_the_prompt_repeated():
    prompt_lens, completion_lens = [10, 6, 20], [[5, 5, 5, 5], [1, 0], [30, 30, 2]]
    prompts, prompt_index, completions = _groups(prompt_lens, completion_lens)
    budget = 64
    plans = plan_group_microbatches([prompt_lens[p] for p in prompt_index], prompt_index,
                                    [len(c) for c in completions], budget)
    assert sorted(i for plan in plans for i in plan) == list(range(len(completions)))
    for plan in plans:
        batch = pack_microbatch(prompts, prompt_index, completions, plan, shared_prefix=True)
        assert batch.num_tokens <= budget
    where = {i: k for k, plan in enumerate(plans) for i in plan}
    assert len({where[i] for i in (0, 1, 2, 3)}) == 1 and where[4] == where[5]  # groups that fit stay whole
    assert len({where[i] for i in (6, 7, 8)}) == 2  # 20 + 30 + 30 + 2 > 64: two pieces, each with the prompt
    with pytest.raises(ValueError, match=r"sequence 6 has 50 tokens .*max_tokens_per_microbatch=49"):
        plan_group_microbatches([prompt_lens[p] for p in prompt_index], prompt_index,
                                [len(c) for c in completions], 49)


def test_plan_step_without_shared_prefix_is_the_per_sequence_plan():
    prompts, prompt_index, completions = _groups([10, 6], [[5, 5], [1, 7]])
    plans = plan_step_microbatches(prompts, prompt_index, completions, 20, shared_prefix=False)
    assert sorted(i for p in plans for i in p) == [0, 1, 2, 3]
    assert all(sum(len(prompts[prompt_index[i]]) + len(completions[i]) for i in p) <= 20 for p in plans)
    batch = pack_microbatch(prompts, prompt_index, completions, plans[0], shared_prefix=False)
    assert not batch.shares_prefixes


def test_split_groups_never_splits_a_group_across_ranks():
    prompt_index = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    prompt_lens = [50] * 3 + [10] * 3 + [40] * 3 + [20] * 3
    parts = split_groups(prompt_index, prompt_lens, [5] * 12, 2)
    assert sorted(i for p in parts for i in p) == list(range(12))
    for part in parts:
        groups = {prompt_index[i] for i in part}
        assert sum(prompt_index.count(g) for g in groups) == len(part)  # whole groups only
    assert {frozenset(prompt_index[i] for i in p) for p in parts} == {frozenset({0, 1}), frozenset({2, 3})}
    with pytest.raises(ValueError, match=r"2 prompt groups cannot be split over 3 ranks.*train.shared_prefix"):
        split_groups([0, 0, 1], [1, 1, 1], [1, 1, 1], 3)


# ----------------------------------------------------------------------------- attention


def naive_segment_attention(q, k, v, cu_q, kv_index, cu_k, scale):
    """Textbook softmax(q k^T) v per segment over the gathered keys, bottom-right causal."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outputs = []
    qb, kb = cu_q.tolist(), cu_k.tolist()
    for n in range(len(qb) - 1):
        qs = q[qb[n]:qb[n + 1]].transpose(0, 1)
        keys = kv_index[kb[n]:kb[n + 1]]
        ks, vs = k[keys].transpose(0, 1), v[keys].transpose(0, 1)
        lq, lk = qs.shape[1], ks.shape[1]
        keep = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = (qs @ ks.transpose(1, 2) * scale).masked_fill(~keep, float("-inf"))
        outputs.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outputs)


def _qkv(total, heads, kv_heads, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(total, h, dim, generator=gen, dtype=dtype).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_segment_attention_matches_textbook_values_and_gradients(heads, kv_heads, scale, dtype, atol):
    batch = pack_groups(*_groups(*AWKWARD))
    q, k, v = _qkv(batch.num_tokens, heads, kv_heads, 8, dtype)
    out = varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, softmax_scale=scale, impl="torch",
                           kv_index=batch.kv_index, cu_seqlens_k=batch.cu_seqlens_k,
                           max_seqlen_k=batch.max_seqlen_k)
    ref = naive_segment_attention(q, k, v, batch.cu_seqlens, batch.kv_index, batch.cu_seqlens_k, scale)
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=atol * 10, rtol=atol * 10)


def test_segment_attention_rejects_partial_or_inconsistent_key_layouts():
    batch = pack_groups(*_groups(*AWKWARD))
    q, k, v = _qkv(batch.num_tokens, 4, 2, 8, torch.float32)
    common = (q, k, v, batch.cu_seqlens, batch.max_seqlen)
    with pytest.raises(ValueError, match=r"kv_index, cu_seqlens_k and max_seqlen_k together"):
        varlen_attention(*common, kv_index=batch.kv_index)
    with pytest.raises(ValueError, match=r"causal only"):
        varlen_attention(*common, causal=False, kv_index=batch.kv_index, cu_seqlens_k=batch.cu_seqlens_k,
                         max_seqlen_k=batch.max_seqlen_k)
    with pytest.raises(ValueError, match=r"cu_seqlens_k ends at \d+ but kv_index has \d+ entries"):
        varlen_attention(*common, impl="torch", kv_index=batch.kv_index[:-1], cu_seqlens_k=batch.cu_seqlens_k,
                         max_seqlen_k=batch.max_seqlen_k)


def test_flash_path_gets_gathered_keys_and_separate_query_key_layouts(monkeypatch):
    """flash_attn_varlen_func stand-in (flash-attention needs CUDA; the flash path never ran): checks
    the arguments against flash's contract and computes with the bottom-right textbook formula."""
    calls = []

    def fake_flash(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                   softmax_scale=None, causal=False):
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        assert int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0] == v.shape[0]
        assert type(max_seqlen_q) is int and max_seqlen_q == int(cu_seqlens_q.diff().max())
        assert type(max_seqlen_k) is int and max_seqlen_k == int(cu_seqlens_k.diff().max())
        assert causal is True and (cu_seqlens_k.diff() >= cu_seqlens_q.diff()).all()
        calls.append(k.shape[0])
        identity = torch.arange(k.shape[0])
        return naive_segment_attention(q, k, v, cu_seqlens_q, identity, cu_seqlens_k, softmax_scale)

    monkeypatch.setattr(attention, "_flash_attn_varlen_func", lambda: fake_flash)
    batch = pack_groups(*_groups(*AWKWARD))
    q, k, v = _qkv(batch.num_tokens, 4, 2, 8, torch.float64)
    kwargs = dict(kv_index=batch.kv_index, cu_seqlens_k=batch.cu_seqlens_k, max_seqlen_k=batch.max_seqlen_k)
    out = varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, impl="flash", **kwargs)
    ref = varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, impl="torch", **kwargs)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    assert calls == [batch.kv_index.numel()]


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(**TINY)
    config._attn_implementation = ATTN_IMPLEMENTATION
    return LlamaForCausalLM(config).float()


CASES = {
    "G=1": ([7, 3], [[5], [1]]),
    "G=2": ([7, 3], [[5, 0], [4, 9]]),
    "G=8 with empty and length-limited (12) completions": (
        [11, 4], [[12, 3, 0, 12, 7, 1, 12, 5], [2, 12, 12, 0, 6, 9, 3, 1]]),
}


def _loss_and_grads(model, batch, advantages, reference_logp=None):
    model.zero_grad(set_to_none=True)
    loss, logp, _, _ = fused_grpo_loss(
        packed_hidden_states(model, batch), lm_head_weight(model), batch.targets, None, reference_logp,
        advantages, batch.completion_cu_seqlens, beta=0.0 if reference_logp is None else 0.1,
        max_completion_length=12,
    )
    loss.backward()
    return loss.detach(), logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", list(CASES))
def test_model_loss_logprobs_and_every_gradient_equal_the_g_copy_layout(tiny_llama, case):
    prompts, prompt_index, completions = _groups(*CASES[case], seed=3)
    advantages = torch.randn(len(completions), generator=torch.Generator().manual_seed(1))
    plain = _copies(prompts, prompt_index, completions)
    shared = pack_groups(prompts, prompt_index, completions)
    with torch.no_grad():
        reference = packed_token_logprobs(tiny_llama, plain) - 0.05  # a KL term that is not zero
    loss_a, logp_a, grads_a = _loss_and_grads(tiny_llama, plain, advantages, reference)
    loss_b, logp_b, grads_b = _loss_and_grads(tiny_llama, shared, advantages, reference)
    assert shared.num_tokens < plain.num_tokens or len(completions) == len(prompts)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logp_b, logp_a, rtol=1e-5, atol=2e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(tiny_llama.parameters()))
    for name, grad in grads_a.items():
        scale = grad.abs().max().item()
        assert scale > 0, name  # every parameter takes part, so the comparison can fail
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_negative_control_completions_that_see_each_other_differ(tiny_llama):
    """If a completion attended to its group's other completions, log-probs would change a lot."""
    prompts, prompt_index, completions = _groups(*CASES["G=2"], seed=3)
    shared = pack_groups(prompts, prompt_index, completions)
    leaky = pack_groups(prompts, prompt_index, completions)
    # one segment per group covering prompt and all completions, plain causal
    leaky.cu_seqlens = torch.tensor([0, 7 + 5, 7 + 5 + 3 + 4 + 9], dtype=torch.int32)
    leaky.cu_seqlens_k = leaky.cu_seqlens.clone()
    leaky.kv_index = torch.arange(leaky.num_tokens)
    leaky.max_seqlen = leaky.max_seqlen_k = 16
    with torch.no_grad():
        good, bad = packed_token_logprobs(tiny_llama, shared), packed_token_logprobs(tiny_llama, leaky)
        want = packed_token_logprobs(tiny_llama, _copies(prompts, prompt_index, completions))
    torch.testing.assert_close(good, want, rtol=1e-5, atol=2e-5)
    assert (bad - want).abs().max() > 0.1


def test_shared_prefix_needs_the_fastgrpo_attention(tiny_llama, monkeypatch):
    monkeypatch.setattr(tiny_llama.config, "_attn_implementation", "flash_attention_2")
    batch = pack_groups(*_groups(*AWKWARD))
    with pytest.raises(ValueError, match=r"need attn_implementation 'fastgrpo_varlen'.*train.shared_prefix=false"):
        packed_hidden_states(tiny_llama, batch)


def test_gradient_checkpointing_passes_the_shared_layout_through(tiny_llama):
    """Checkpointed layers re-run their forward in backward: the gather index must reach it too."""
    prompts, prompt_index, completions = _groups(*CASES["G=2"], seed=3)
    shared = pack_groups(prompts, prompt_index, completions)
    advantages = torch.randn(len(completions), generator=torch.Generator().manual_seed(1))
    tiny_llama.train()
    _, _, plain_grads = _loss_and_grads(tiny_llama, shared, advantages)
    tiny_llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        _, _, checkpointed = _loss_and_grads(tiny_llama, shared, advantages)
    finally:
        tiny_llama.gradient_checkpointing_disable()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
