"""fused_grpo_loss: the one-pass loss + gradients against the unfused composition
grpo_token_loss(token_logprobs(...)) computed in float64; every loss type, KL, temperature; bf16 on the
torch path; the Triton path under TRITON_INTERPRET=1 (in a subprocess); the O(chunk x V) memory
property; micro-batches; input errors.

Tolerance rule (as in test_logprob.py): the fused result's error against the float64 truth is at most
K x the error of the naive unfused computation in the same dtype (impl="reference"), plus a small atol,
for the loss, logp, entropy and both input gradients.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
from helpers.interpreter_run import run_under_interpreter
from helpers.largest_tensor import LargestTensor

from fastgrpo.kernels import fused_grpo_loss, grpo_token_loss, token_logprobs
from fastgrpo.kernels import fused_grpo as fg
from fastgrpo.kernels.grpo_loss import METRIC_NAMES

K = 2.0
ATOL = {torch.float32: 1e-6, torch.bfloat16: 2e-3}  # x max(|truth|, 1)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
MAX_LEN = 300  # max_completion_length for dr_grpo


def make_case(n=257, h=123, v=1001, seed=0, num_seqs=6, weights=False):
    """Inputs of one packed batch: hidden [n, h], weight [v, h] (logits of std ~2), targets [n],
    cu_seqlens over num_seqs sequences (the second one empty), old/ref log-probs within ~0.3 of the
    true ones (so every clipping case occurs), per-sequence advantages, optional 0/fractional weights."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 2 / h**0.5
    targets = torch.randint(0, v, (n,), generator=g)
    cuts = torch.sort(torch.randint(1, n, (num_seqs - 2,), generator=g)).values
    cu = torch.cat([torch.tensor([0, 1, 1]), cuts[1:], torch.tensor([n])]).to(torch.int32)
    with torch.no_grad():
        true_logp = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(-1, targets[:, None])[:, 0]
    old = (true_logp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    ref = (true_logp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(num_seqs, generator=g)
    token_weights = None
    if weights:
        token_weights = torch.rand(n, generator=g) * (torch.rand(n, generator=g) > 0.2)
    return {"hidden": hidden, "weight": weight, "targets": targets, "old_logp": old, "ref_logp": ref,
            "advantages": adv, "cu_seqlens": cu, "token_weights": token_weights}


def run(fn, case, dtype, upstream=1.7):
    """fn(hidden, weight, targets) -> (loss, logp, entropy or None, metrics) on leaves of `dtype`;
    backprop upstream * loss. Returns a dict of float64 outputs and gradients, and the metrics."""
    hidden = case["hidden"].detach().to(dtype).requires_grad_()
    weight = case["weight"].detach().to(dtype).requires_grad_()
    loss, logp, entropy, metrics = fn(hidden, weight, case["targets"])
    (loss * upstream).backward()
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    out = {"loss": loss.detach().double(), "logp": logp.double(),
           "entropy": None if entropy is None else entropy.double(),
           "grad_hidden": hidden.grad.double(), "grad_weight": weight.grad.double()}
    return out, metrics


def loss_kwargs(case, loss_type, beta, temperature):
    return dict(old_logp=case["old_logp"], ref_logp=case["ref_logp"] if beta else None,
                advantages=case["advantages"], cu_seqlens=case["cu_seqlens"], temperature=temperature,
                loss_type=loss_type, epsilon_high=0.28, beta=beta, max_completion_length=MAX_LEN,
                token_weights=case["token_weights"])


def fused(kwargs, **extra):
    return lambda h, w, t: fused_grpo_loss(h, w, t, **kwargs, **extra)


def float64_composition(kwargs, entropy):
    """The unfused composition in float64: fp64 logits -> log_softmax -> grpo_token_loss (reference)."""
    kw = dict(kwargs)
    temperature = kw.pop("temperature")
    tensors = [kw.pop(name) for name in ("old_logp", "ref_logp", "advantages", "cu_seqlens")]

    def fn(hidden, weight, targets):
        log_probs = torch.log_softmax(hidden.double() @ weight.double().T / temperature, -1)
        logp = log_probs.gather(-1, targets[:, None])[:, 0]
        ent = -(log_probs.exp() * log_probs).sum(-1) if entropy else None
        loss, metrics = grpo_token_loss(logp, *tensors, impl="reference", **kw)
        return loss, logp.detach(), None if ent is None else ent.detach(), metrics
    return fn


def assert_within_naive_error(got, case, kwargs, entropy, dtype):
    truth, _ = run(float64_composition(kwargs, entropy), case, torch.float64)
    naive, naive_metrics = run(fused(kwargs, return_entropy=entropy, impl="reference"), case, dtype)
    for name, want in truth.items():
        if want is None:
            assert got[name] is None, name
            continue
        err = (got[name] - want).abs().max().item()
        naive_err = (naive[name] - want).abs().max().item()
        scale = max(want.abs().max().item(), 1.0)
        assert err <= K * naive_err + ATOL[dtype] * scale, (
            f"{name}: error {err:.3g} vs naive {dtype} error {naive_err:.3g} (scale {scale:.3g})")
    return naive_metrics


def assert_metrics_close(got, want, rel):
    assert set(got) == set(METRIC_NAMES) and all(isinstance(v, float) for v in got.values())
    for name in METRIC_NAMES:
        assert math.isclose(got[name], want[name], rel_tol=rel, abs_tol=1e-6), (name, got, want)


# ----------------------------------------------------------------------------------------------
# torch path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,temperature,entropy,weights", [
    (0.0, 1.0, False, False), (0.1, 0.7, True, True), (0.04, 1.0, False, True), (0.0, 0.7, True, False)])
def test_torch_path_matches_float64_composition(loss_type, beta, temperature, entropy, weights):
    case = make_case(seed=LOSS_TYPES.index(loss_type), weights=weights)
    kwargs = loss_kwargs(case, loss_type, beta, temperature)
    # 32-token chunks: 257 tokens make nine chunks, the last of one token, and cut through sequences
    got, metrics = run(fused(kwargs, return_entropy=entropy, impl="torch", chunk_tokens=32), case, torch.float32)
    naive_metrics = assert_within_naive_error(got, case, kwargs, entropy, torch.float32)
    assert_metrics_close(metrics, naive_metrics, rel=1e-4)
    assert 0 < metrics["clip_frac"] < 1  # the case exercises both branches of the clipped objective


def test_matches_the_unfused_torch_composition_closely():
    """Same dtype, same chunked torch arithmetic: fused and token_logprobs + grpo_token_loss agree to
    float32 rounding, metrics included."""
    case = make_case(seed=11, weights=True)
    kwargs = loss_kwargs(case, "grpo", 0.1, 0.7)

    def unfused(hidden, weight, targets):
        kw = dict(kwargs)
        logp, ent = token_logprobs(hidden, weight, targets, kw.pop("temperature"), True, impl="torch")
        loss, metrics = grpo_token_loss(logp, kw.pop("old_logp"), kw.pop("ref_logp"), kw.pop("advantages"),
                                        kw.pop("cu_seqlens"), impl="torch", **kw)
        return loss, logp.detach(), ent.detach(), metrics

    got, got_metrics = run(fused(kwargs, return_entropy=True, impl="torch"), case, torch.float32)
    want, want_metrics = run(unfused, case, torch.float32)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6 * max(want[name].abs().max(), 1))
    assert_metrics_close(got_metrics, want_metrics, rel=1e-5)


def test_bf16_torch_path_within_naive_bf16_error():
    case = make_case(seed=5, weights=True)
    kwargs = loss_kwargs(case, "grpo", 0.1, 0.7)
    got, _ = run(fused(kwargs, return_entropy=True, impl="torch", chunk_tokens=64), case, torch.bfloat16)
    assert_within_naive_error(got, case, kwargs, True, torch.bfloat16)


def test_default_impl_on_cpu_and_detached_outputs():
    case = make_case(n=40, h=16, v=90, seed=2, num_seqs=3)
    assert fg.lp.resolve_impl("auto", case["hidden"]) == "torch"
    hidden = case["hidden"].clone().requires_grad_()
    loss, logp, entropy, _ = fused_grpo_loss(hidden, case["weight"], case["targets"], case["old_logp"], None,
                                             case["advantages"], case["cu_seqlens"])
    assert loss.requires_grad and loss.dtype == torch.float32 and loss.shape == ()
    assert not logp.requires_grad and logp.dtype == torch.float32 and logp.shape == (40,) and entropy is None
    want = token_logprobs(case["hidden"], case["weight"], case["targets"], impl="reference")
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)


def test_frozen_weight_and_no_grad():
    """A weight that needs no gradient gets none (and its product is skipped); under no_grad the loss
    is the same and carries no graph."""
    case = make_case(n=60, h=20, v=150, seed=3, num_seqs=4)
    kwargs = loss_kwargs(case, "dapo", 0.0, 1.0)
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone()
    loss, *_ = fused_grpo_loss(hidden, weight, case["targets"], **kwargs)
    loss.backward()
    assert weight.grad is None
    truth, _ = run(float64_composition(kwargs, False), case, torch.float64, upstream=1.0)
    torch.testing.assert_close(hidden.grad.double(), truth["grad_hidden"], rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        loss_no_grad, *_ = fused_grpo_loss(case["hidden"].detach().requires_grad_(), weight, case["targets"], **kwargs)
    assert not loss_no_grad.requires_grad and loss_no_grad.item() == pytest.approx(loss.item(), rel=1e-6)


def test_second_backward_through_the_graph_is_a_clear_error():
    """The gradients are handed over (scaled in place) by the first backward; a second one must not
    silently return them again."""
    case = make_case(n=30, h=12, v=50, seed=7, num_seqs=3)
    hidden = case["hidden"].clone().requires_grad_()
    loss, *_ = fused_grpo_loss(hidden, case["weight"], case["targets"], **loss_kwargs(case, "grpo", 0.0, 1.0))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice through the same graph"):
        loss.backward()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_microbatches_with_global_counts_sum_to_the_whole_batch(loss_type):
    case = make_case(n=120, h=24, v=200, seed=4, num_seqs=6, weights=True)
    cu, w = case["cu_seqlens"].long(), case["token_weights"]
    kwargs = dict(loss_type=loss_type, beta=0.1, max_completion_length=MAX_LEN, num_sequences=6,
                  num_tokens=float(w.sum()))

    def grads(parts):
        hidden = case["hidden"].clone().requires_grad_()
        weight = case["weight"].clone().requires_grad_()
        total = 0.0
        for s0, s1 in parts:
            a, b = int(cu[s0]), int(cu[s1])
            loss, *_ = fused_grpo_loss(hidden[a:b], weight, case["targets"][a:b], case["old_logp"][a:b],
                                       case["ref_logp"][a:b], case["advantages"][s0:s1], cu[s0:s1 + 1] - a,
                                       token_weights=w[a:b], **kwargs)
            loss.backward()
            total += loss.item()
        return total, hidden.grad, weight.grad

    whole, parts = grads([(0, 6)]), grads([(0, 3), (3, 6)])
    assert parts[0] == pytest.approx(whole[0], rel=1e-5)
    for got, want in zip(parts[1:], whole[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_empty_batch(impl):
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    empty = torch.zeros(0)
    loss, logp, entropy, metrics = fused_grpo_loss(hidden, weight, torch.zeros(0, dtype=torch.long), empty, None,
                                                   empty, torch.zeros(1, dtype=torch.int32),
                                                   return_entropy=True, impl=impl)
    assert logp.shape == entropy.shape == (0,) and loss.item() == 0.0
    assert metrics == dict.fromkeys(METRIC_NAMES, 0.0)
    loss.backward()
    assert hidden.grad.shape == (0, 8) and not weight.grad.any()


# ----------------------------------------------------------------------------------------------
# memory: no tensor of N x V elements
# ----------------------------------------------------------------------------------------------


def _largest_in_fwd_bwd(impl, n=96, h=16, v=300):
    case = make_case(n=n, h=h, v=v, seed=8, num_seqs=4)
    hidden, weight = case["hidden"].requires_grad_(), case["weight"].requires_grad_()
    kwargs = loss_kwargs(case, "grpo", 0.1, 1.3)
    extra = {"chunk_tokens": 8} if impl == "torch" else {}
    with LargestTensor() as mode:
        loss, *_ = fused_grpo_loss(hidden, weight, case["targets"], **kwargs, return_entropy=True, impl=impl,
                                   **extra)
        loss.backward()
    return mode, n * v


def test_torch_path_never_allocates_n_by_v():
    # chunk 8 of N=96: the buffers are 8 x V; weight grad V x H = 4,800 < N x V = 28,800
    mode, n_by_v = _largest_in_fwd_bwd("torch")
    assert mode.numel < n_by_v, f"{mode.op} made a tensor of {mode.numel} elements >= N x V = {n_by_v}"
    assert mode.numel >= 8 * 300  # the mode saw the chunk buffers


def test_memory_check_catches_the_unfused_reference():
    mode, n_by_v = _largest_in_fwd_bwd("reference")
    assert mode.numel >= n_by_v


# ----------------------------------------------------------------------------------------------
# input errors (the loss's checks are grpo_loss's; the logits' are logprob's)
# ----------------------------------------------------------------------------------------------
def _small():
    case = make_case(n=10, h=8, v=20, seed=9, num_seqs=3)
    return (case["hidden"], case["weight"], case["targets"], case["old_logp"], case["ref_logp"],
            case["advantages"], case["cu_seqlens"])


@pytest.mark.parametrize("kwargs,error,match", [
    ({"loss_type": "ppo"}, ValueError, r"unknown loss_type 'ppo'; valid: \['bnpo', 'dapo', 'dr_grpo', 'grpo'\]"),
    ({"impl": "cuda"}, ValueError, "unknown impl 'cuda'; valid: auto, triton, torch, reference"),
    ({"loss_type": "dr_grpo"}, ValueError, "needs max_completion_length"),
    ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
    ({"chunk_tokens": 0}, ValueError, "chunk_tokens must be >= 1, got 0"),
    ({"epsilon_low": -0.1}, ValueError, "epsilon_low must be a finite number >= 0"),
])
def test_bad_options_raise_with_a_clear_message(kwargs, error, match):
    with pytest.raises(error, match=match):
        fused_grpo_loss(*_small(), **kwargs)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_per_sequence_advantages_when_there_are_as_many_tokens_as_sequences(impl):
    """Completions of 0, 2 and 1 tokens: N == S == 3. One pass (old_logp None, r = 1), grpo: the
    loss is -(A_1 + A_2) / 3 whatever the logits, and the gradients are those of the same advantages
    spelled per token."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([3, 11, 7])
    adv = torch.tensor([5.0, -1.0, 0.5], dtype=torch.float64)
    cu = torch.tensor([0, 0, 2, 3], dtype=torch.int32)
    loss, *_ = fused_grpo_loss(hidden, weight, targets, None, None, adv, cu, impl=impl)
    assert loss.item() == pytest.approx(-(-1.0 + 0.5) / 3, rel=1e-6)  # the loss is float32
    grads = torch.autograd.grad(loss, (hidden, weight))
    per_token, *_ = fused_grpo_loss(hidden, weight, targets, None, None, adv[[1, 1, 2]], cu, impl=impl,
                                    advantage_level="token")
    for got, want in zip(grads, torch.autograd.grad(per_token, (hidden, weight))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match=r"advantages must have shape \(3,\), one per token"):
        fused_grpo_loss(hidden, weight, targets, None, None, adv[:2], cu, advantage_level="token")


def test_bad_tensors_raise_with_a_clear_message():
    hidden, weight, targets, old, ref, adv, cu = _small()
    with pytest.raises(ValueError, match="beta=0.1 > 0 needs ref_logp"):
        fused_grpo_loss(hidden, weight, targets, old, None, adv, cu, beta=0.1)
    with pytest.raises(ValueError, match=r"cu_seqlens must end at the token count N=10, got cu_seqlens\[-1\]=9"):
        fused_grpo_loss(hidden, weight, targets, old, ref, adv, cu.clone().index_fill_(0, torch.tensor([3]), 9))
    with pytest.raises(ValueError, match=r"old_logp must have shape \(10,\), got \(9,\)"):
        fused_grpo_loss(hidden, weight, targets, old[:9], ref, adv, cu)
    with pytest.raises(ValueError, match=r"target ids must lie in \[0, V=20\)"):
        fused_grpo_loss(hidden, weight, targets + 20, old, ref, adv, cu)


# ----------------------------------------------------------------------------------------------
# Triton path: logprob's kernels and grpo_loss's under the interpreter, in a subprocess
# ----------------------------------------------------------------------------------------------
TRITON_CASES = [  # (n, h, v, loss_type, beta, temperature, entropy, weights)
    (257, 123, 1001, "grpo", 0.1, 0.7, True, True),
    (67, 45, 300, "dapo", 0.0, 1.0, False, False),
    (67, 45, 300, "dr_grpo", 0.04, 0.7, False, True),
]


def _triton_case(i):
    n, h, v, loss_type, beta, temperature, entropy, weights = TRITON_CASES[i]
    case = make_case(n, h, v, seed=20 + i, num_seqs=5, weights=weights)
    return case, loss_kwargs(case, loss_type, beta, temperature), entropy


def _triton_worker(inputs_path, out_path):
    """Runs with TRITON_INTERPRET=1: the Triton impl of every TRITON_CASES entry, on the inputs the
    parent saved (so both processes see bit-identical inputs)."""
    assert fg.lp._KERNELS_INTERPRETED, "TRITON_INTERPRET=1 must be set before the kernels are imported"
    results = []
    for case, kwargs, entropy in torch.load(inputs_path):
        results.append(run(fused(kwargs, return_entropy=entropy, impl="triton"), case, torch.float32))
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fused_triton")
    inputs = [_triton_case(i) for i in range(len(TRITON_CASES))]
    torch.save(inputs, folder / "inputs.pt")
    run_under_interpreter(__file__, "--triton-worker", folder / "inputs.pt", folder / "results.pt", timeout=600)
    return torch.load(folder / "results.pt")


@pytest.mark.skipif(fg.lp.triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("i", range(len(TRITON_CASES)), ids=lambda i: "-".join(map(str, TRITON_CASES[i][:5])))
def test_triton_path_matches_float64_under_interpreter(triton_results, i):
    case, kwargs, entropy = _triton_case(i)
    got, metrics = triton_results[i]
    naive_metrics = assert_within_naive_error(got, case, kwargs, entropy, torch.float32)
    assert_metrics_close(metrics, naive_metrics, rel=1e-4)


if __name__ == "__main__" and sys.argv[1:2] == ["--triton-worker"]:
    _triton_worker(sys.argv[2], sys.argv[3])
