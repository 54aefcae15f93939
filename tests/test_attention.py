"""Packed attention (fastgrpo.attention): every path used equals separate per-sequence forwards.

Paths: the "torch" varlen path, and the "flash" path with flash_attn_varlen_func replaced by a
stand-in that checks the arguments flash-attention would receive and computes them with the torch
path (flash-attention itself needs CUDA; this machine class has none). Reference: the same
weights run with transformers' "eager" attention, one unpadded sequence at a time.
"""

import copy
import sys

import pytest
import torch

import fastgrpo.attention as attention
from fastgrpo.attention import (
    ATTN_IMPLEMENTATION,
    get_attention_backend,
    packed_attention_forward,
    resolve_backend,
    set_attention_backend,
    varlen_attention,
)
from fastgrpo.model import random_model

LENGTHS = [7, 5, 1, 12]
pytestmark = pytest.mark.usefixtures("no_attention_override")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=64,
            # larger than the 0.02 default so that attention is far from uniform and a sequence
            # seeing its neighbours changes the output a lot (see the negative control)
            initializer_range=0.2)




def naive_varlen_attention(q, k, v, cu_seqlens, causal, scale):
    """Softmax(q k^T) v per sequence with k/v heads repeated: the textbook formula."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))
        scores = qs @ ks.transpose(1, 2) * scale
        if causal:
            keep = torch.ones(end - start, end - start, dtype=torch.bool).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        outputs.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outputs)


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _qkv(total, heads, kv_heads, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(total, h, dim, generator=gen, dtype=dtype).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_torch_path_matches_naive_reference(heads, kv_heads, causal, scale, dtype, atol):
    cu = _cu(LENGTHS)
    q, k, v = _qkv(int(cu[-1]), heads, kv_heads, 16, dtype)
    out = varlen_attention(q, k, v, cu, max(LENGTHS), causal=causal, softmax_scale=scale, impl="torch")
    ref = naive_varlen_attention(q, k, v, cu, causal, scale)
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, atol=atol, rtol=atol, msg=f"grad {name}")


def test_torch_path_uses_sdpa_flash_kernel_not_math():
    """3-D SDPA inputs fall to the math kernel on CPU (measured ~1.7x slower forward, see
    fastgrpo.attention); the torch path must hand SDPA 4-D views, forward and backward."""
    from torch.profiler import profile

    cu = _cu(LENGTHS)
    q, k, v = _qkv(int(cu[-1]), 6, 2, 16, torch.float32)
    with profile() as prof:
        varlen_attention(q, k, v, cu, max(LENGTHS), impl="torch").sum().backward()
    ops = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in ops
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops


def test_varlen_attention_rejects_bad_shapes():
    cu = _cu([3, 2])
    q, k, v = _qkv(5, 6, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        varlen_attention(q, k, v, cu, 3, impl="torch")
    q, k, v = _qkv(5, 4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens ends at 4"):
        varlen_attention(q, k, v, _cu([3, 1]), 3, impl="torch")
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        varlen_attention(q, k, v, cu, 3, impl="cuda")


# ----------------------------------------------------------------------------- backend choice


def test_backend_override_and_environment(monkeypatch):
    q = torch.zeros(1, 1, 8)
    assert get_attention_backend() == "auto"
    assert resolve_backend("auto", q) == "torch"  # CPU tensor
    monkeypatch.setenv(attention.ENV_VAR, "flash")
    assert get_attention_backend() == "flash" and resolve_backend("auto", q) == "flash"
    set_attention_backend("torch")  # the override wins over the environment
    assert resolve_backend("auto", q) == "torch"
    assert resolve_backend("flash", q) == "flash"  # an explicit impl wins over both
    set_attention_backend(None)
    monkeypatch.setenv(attention.ENV_VAR, "xformers")
    with pytest.raises(ValueError, match="FASTGRPO_ATTENTION.*'xformers'.*auto, flash, torch"):
        get_attention_backend()
    with pytest.raises(ValueError, match="valid: auto, flash, torch"):
        set_attention_backend("sdpa")


def test_flash_backend_without_flash_attn_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` fail
    q, k, v = _qkv(5, 4, 2, 8, torch.float32)
    with pytest.raises(ImportError, match="needs the flash-attn package"):
        varlen_attention(q, k, v, _cu([3, 2]), 3, impl="flash")


@pytest.fixture
def routed_flash(monkeypatch):
    """flash_attn_varlen_func stand-in: checks flash-attention's argument contract, then computes
    with the torch path. Returns the list of recorded calls."""
    calls = []

    def fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False):
        assert q.dim() == k.dim() == v.dim() == 3 and q.shape[0] == k.shape[0] == v.shape[0]
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1  # flash needs contiguous last dim
        assert q.shape[1] % k.shape[1] == 0
        for cu in (cu_seqlens_q, cu_seqlens_k):
            assert cu.dtype == torch.int32 and cu.device == q.device and cu.dim() == 1
            assert int(cu[0]) == 0 and int(cu[-1]) == q.shape[0]
        assert torch.equal(cu_seqlens_q, cu_seqlens_k)
        assert type(max_seqlen_q) is int and max_seqlen_q == int(cu_seqlens_q.diff().max())
        assert max_seqlen_k == max_seqlen_q
        assert isinstance(causal, bool) and isinstance(dropout_p, float)
        calls.append(dict(shape=tuple(q.shape), causal=causal, scale=softmax_scale))
        return attention._torch_varlen_attention(q, k, v, cu_seqlens_q, causal, softmax_scale, dropout_p)

    monkeypatch.setattr(attention, "_flash_attn_varlen_func", lambda: fake_flash_attn_varlen_func)
    return calls


def test_flash_arguments_routed_to_torch_match(routed_flash):
    cu = _cu(LENGTHS)
    q, k, v = _qkv(int(cu[-1]), 6, 2, 16, torch.float32)
    out = varlen_attention(q, k, v, cu.long(), max(LENGTHS), softmax_scale=0.25, impl="flash")
    ref = naive_varlen_attention(q, k, v, cu, True, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert routed_flash == [dict(shape=(int(cu[-1]), 6, 16), causal=True, scale=0.25)]


# ----------------------------------------------------------------------------- whole models


def _tiny_model(kind, seed=0):
    model = random_model(kind, seed=seed, **TINY)
    if kind == "qwen2":  # Qwen2: q/k/v projections carry biases
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model.float().train()


def _sequences(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (n,), generator=gen) for n in LENGTHS]


def _packed_hidden(model, sequences, cu_seqlens=None):
    ids = torch.cat(sequences)[None]
    positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    kwargs = {}
    if cu_seqlens is not None:
        kwargs = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                      max_length_q=int(cu_seqlens.diff().max()), max_length_k=int(cu_seqlens.diff().max()))
    return model.model(input_ids=ids, position_ids=positions, use_cache=False, **kwargs).last_hidden_state[0]


def _separate_hidden(model, sequences):
    return torch.cat([model.model(input_ids=s[None], use_cache=False).last_hidden_state[0] for s in sequences])


def _param_grads(model, hidden, projection):
    model.zero_grad()
    (hidden * projection).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", ["torch", "flash-routed", "position-ids-only"])
def test_packed_model_forward_and_grads_equal_separate_forwards(kind, backend, request):
    model = _tiny_model(kind)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    exact = copy.deepcopy(reference).double()
    sequences = _sequences()
    cu = _cu(LENGTHS)
    if backend == "flash-routed":
        calls = request.getfixturevalue("routed_flash")
        set_attention_backend("flash")
    else:
        set_attention_backend("torch")

    packed = _packed_hidden(model, sequences, None if backend == "position-ids-only" else cu)
    separate = _separate_hidden(reference, sequences)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)

    # Gradients reach ~80 in magnitude here, where fp32 summation order alone moves them by
    # ~5e-5 (SDPA's blocked CPU kernel vs eager's plain softmax). So: the packed gradients may be
    # at most 3x as far from an fp64 run as the fp32 eager per-sequence gradients are.
    projection = torch.randn_like(separate)
    grads = _param_grads(model, packed, projection)
    ref_grads = _param_grads(reference, separate, projection)
    exact_grads = _param_grads(exact, _separate_hidden(exact, sequences), projection.double())
    assert grads.keys() == ref_grads.keys() == exact_grads.keys() and len(grads) > 0
    for name, exact_grad in exact_grads.items():
        packed_error = (grads[name].double() - exact_grad).abs().max().item()
        fp32_error = (ref_grads[name].double() - exact_grad).abs().max().item()
        assert packed_error <= 3 * fp32_error + 1e-6, (name, packed_error, fp32_error)
    if backend == "flash-routed":
        assert len(calls) == model.config.num_hidden_layers  # forward only; backward reuses it


def test_negative_control_one_sequence_boundary_differs():
    """The comparison above can fail: letting sequences see each other changes the output."""
    model = _tiny_model("llama")
    sequences = _sequences()
    joined = _packed_hidden(model, sequences, _cu([sum(LENGTHS)]))
    separate = _separate_hidden(model, sequences)
    assert (joined - separate).abs().max() > 1e-2


def test_packed_forward_builds_no_attention_mask(monkeypatch):
    import transformers.masking_utils as masking_utils

    def no_mask(*args, **kwargs):
        raise AssertionError("a [T, T] attention mask was built for the packed forward")

    monkeypatch.setattr(masking_utils, "sdpa_mask", no_mask)
    model = _tiny_model("llama")
    set_attention_backend("torch")
    sequences = _sequences()
    _packed_hidden(model, sequences, _cu(LENGTHS))  # would raise if a mask were built


def test_unpacked_batch_and_generation_match_sdpa():
    """The same model object still serves ordinary batched forwards and padded generation."""
    model = _tiny_model("llama").eval()
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    ids = torch.randint(0, TINY["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)

    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_hf_attention_function_rejects_unsupported_options():
    module = torch.nn.Module()
    q = torch.randn(1, 4, 12, 8)
    k = torch.randn(1, 2, 12, 8)
    with pytest.raises(ValueError, match="sliding-window"):
        packed_attention_forward(module, q, k, k, None, sliding_window=3,
                                 cu_seq_lens_q=_cu([12]), max_length_q=12)
    with pytest.raises(ValueError, match="softcapping"):
        packed_attention_forward(module, q, k, k, None, softcap=30.0)
    with pytest.raises(ValueError, match="cu_seq_lens_q ends at 10"):
        packed_attention_forward(module, q, k, k, None, cu_seq_lens_q=_cu([4, 6]))
    with pytest.raises(ValueError, match="cu_seq_lens_k must equal"):
        packed_attention_forward(module, q, k, k, None, cu_seq_lens_q=_cu([4, 8]),
                                 cu_seq_lens_k=_cu([6, 6]))
