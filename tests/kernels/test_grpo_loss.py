"""Tests of fastgrpo.kernels.grpo_loss: hand-checked values, torch path and Triton (interpreter) against
the autograd reference, gradient accumulation over micro-batches, and input validation.

Triton's interpreter must be switched on before triton is imported, so the Triton checks run this
file as a script in a subprocess with TRITON_INTERPRET=1 (see the bottom of the file) and compare
what it saved here.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from helpers.interpreter_run import run_under_interpreter

from fastgrpo.kernels.grpo_loss import (
    LOSS_AGGREGATIONS,
    METRIC_NAMES,
    grpo_token_loss,
    sequence_ids,
    triton_configs,
)

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
MAX_LEN = 64  # max_completion_length for dr_grpo


# ------------------------------------------------------------------ inputs


def hand_case():
    """2 sequences of 3 and 2 tokens with ratios chosen to hit every clipping case (eps 0.2 / 0.28).

    Returns (args, kwargs, expected) where expected holds per-token losses and d loss_t / d logp_t
    worked out by hand from the formula (before aggregation).
    """
    ratios = [1.5, 1.1, 0.5, 0.5, 1.5]
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5], dtype=torch.float64)
    logp = old + torch.tensor(ratios, dtype=torch.float64).log()
    advantages = torch.tensor([1.0, -2.0], dtype=torch.float64)  # per sequence
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    # eps_low = 0.2 -> band low 0.8; eps_high = 0.28 (clip-higher) -> band high 1.28.
    expected = {
        # t0: A=+1, r=1.5 > 1.28: min(1.5, 1.28) = 1.28 (clipped)        -> l = -1.28, grad 0
        # t1: A=+1, r=1.1 inside the band                                -> l = -1.1,  grad -A*r = -1.1
        # t2: A=+1, r=0.5: min(0.5, 0.8) = 0.5 (a low ratio with A>0 is not clipped) -> l = -0.5, grad -0.5
        # t3: A=-2, r=0.5 < 0.8: min(-1.0, -1.6) = -1.6 (clipped)        -> l = 1.6,  grad 0
        # t4: A=-2, r=1.5: min(-3.0, -2.56) = -3.0 (unclipped)           -> l = 3.0,  grad -A*r = 3.0
        "token_loss": [-1.28, -1.1, -0.5, 1.6, 3.0],
        "token_grad": [0.0, -1.1, -0.5, 0.0, 3.0],
        "metrics": {"clip_low_frac": 1 / 5, "clip_high_frac": 1 / 5, "clip_frac": 2 / 5, "kl_mean": 0.0,
                    "ratio_mean": sum(ratios) / 5, "ratio_max": 1.5, "ratio_min": 0.5},
    }
    kwargs = {"epsilon_low": 0.2, "epsilon_high": 0.28, "max_completion_length": 4}
    return (logp, old, None, advantages, cu), kwargs, expected


# Each token's weight in the loss, per loss type, for the hand case (S=2, lengths 3 and 2, L=4).
HAND_SCALES = {
    "grpo": [1 / 6] * 3 + [1 / 4] * 2,  # 1 / (S * len_s)
    "bnpo": [1 / 5] * 5,
    "dr_grpo": [1 / 8] * 5,  # 1 / (S * L)
    "dapo": [1 / 5] * 5,
}


def random_batch(seed, n, num_seqs, *, per_sequence_adv=True, with_ref=True, weights=None):
    """A packed float64 batch of N tokens over S sequences whose lengths start 1, 0, 1 (then random).

    weights: None, "mask" (0/1, one whole sequence masked) or "frac" (fractional weights and zeros).
    """
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randint(0, n - 1, (num_seqs - 4,), generator=g)).values
    inner = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([n - 2])]))
    lengths = torch.cat([torch.tensor([1, 0, 1]), inner])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    logp = -4 * torch.rand(n, generator=g, dtype=torch.float64)
    old = logp + 0.4 * torch.randn(n, generator=g, dtype=torch.float64)  # ratios 0.5..2: all clip cases
    ref = logp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64) if with_ref else None
    adv = torch.randn(num_seqs if per_sequence_adv else n, generator=g, dtype=torch.float64)
    w = None
    if weights == "mask":
        w = (torch.rand(n, generator=g) > 0.25).double()
        w[cu[4]:cu[5]] = 0.0
    elif weights == "frac":
        w = torch.rand(n, generator=g, dtype=torch.float64) * (torch.rand(n, generator=g) > 0.2)
    return logp, old, ref, adv, cu, w


def independent_loss(logp, old, ref, adv, cu, w, loss_type, eps_low, eps_high, beta, advantage_level="sequence"):
    """The loss written apart from the module: torch.minimum (its tie gradient equals the module's),
    a python loop over sequences. Differentiable in logp; float64 in, float64 out."""
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    if advantage_level == "sequence":
        adv = torch.cat([adv[i].expand(b - a) for i, (a, b) in enumerate(bounds)])
    w = torch.ones_like(logp) if w is None else w
    r = torch.exp(logp - old)
    per_token = -torch.minimum(r * adv, torch.clamp(r, 1 - eps_low, 1 + eps_high) * adv)
    if beta:
        per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    per_token = per_token * w
    if loss_type == "grpo":
        means = [per_token[a:b].sum() / w[a:b].sum() if w[a:b].sum() > 0 else per_token[a:b].sum() * 0
                 for a, b in bounds]
        return sum(means) / len(bounds)
    if loss_type == "dr_grpo":
        return per_token.sum() / (len(bounds) * MAX_LEN)
    return per_token.sum() / w.sum()  # bnpo and dapo on a whole batch


def run(logp, old, ref, adv, cu, w=None, dtype=torch.float64, **kwargs):
    """Cast to dtype, compute (loss, d loss / d logp, metrics)."""
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    w = kwargs.pop("token_weights", w)
    leaf = logp.to(dtype).detach().requires_grad_()
    loss, metrics = grpo_token_loss(leaf, cast(old), cast(ref), cast(adv), cu, token_weights=cast(w), **kwargs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


def assert_within(actual, exact, same_dtype_ref, atol, rtol):
    """|actual - exact| <= 2 * |same-dtype torch reference - exact| + atol + rtol * |exact|."""
    err = (actual.double() - exact).abs()
    tol = 2 * (same_dtype_ref.double() - exact).abs() + atol + rtol * exact.abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3e}, max excess {(err - tol).max().item():.3e}"


def assert_metrics(actual, expected, rel, abs_=1e-12):
    assert set(actual) == set(METRIC_NAMES) and all(isinstance(v, float) for v in actual.values())
    for name in METRIC_NAMES:
        assert math.isclose(actual[name], expected[name], rel_tol=rel, abs_tol=abs_), (name, actual, expected)


# ------------------------------------------------------------------ hand-checked values


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_hand_checked_clipping(impl, loss_type):
    args, kwargs, expected = hand_case()
    loss, grad, metrics = run(*args, loss_type=loss_type, impl=impl, **kwargs)
    scales = HAND_SCALES[loss_type]
    want_loss = sum(s * l for s, l in zip(scales, expected["token_loss"]))
    want_grad = torch.tensor([s * g for s, g in zip(scales, expected["token_grad"])], dtype=torch.float64)
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)
    assert_metrics(metrics, expected["metrics"], rel=1e-12)


def test_hand_checked_grpo_total():
    # grpo = ((-1.28 - 1.1 - 0.5) / 3 + (1.6 + 3.0) / 2) / 2 = (-0.96 + 2.3) / 2 = 0.67
    args, kwargs, _ = hand_case()
    assert run(*args, loss_type="grpo", impl="torch", **kwargs)[0].item() == pytest.approx(0.67, rel=1e-12)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_kl_value_and_gradient(impl):
    # old_logp None -> r = 1 and A = 0: only beta * k3 remains, k3(d) = e^d - d - 1 with d = ref - logp.
    logp = torch.tensor([-1.0, -0.5, -2.0, -0.1], dtype=torch.float64)
    d = [0.3, -0.7, 1.2, 0.0]
    ref = logp + torch.tensor(d, dtype=torch.float64)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    beta = 0.04
    loss, grad, metrics = run(logp, None, ref, torch.zeros(1, dtype=torch.float64), cu,
                              loss_type="bnpo", beta=beta, impl=impl)
    k3 = [math.exp(x) - x - 1 for x in d]
    assert loss.item() == pytest.approx(beta * sum(k3) / 4, rel=1e-12)
    want = torch.tensor([beta * (1 - math.exp(x)) / 4 for x in d], dtype=torch.float64)  # d k3/d logp = 1 - e^d
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-15)
    assert metrics["kl_mean"] == pytest.approx(sum(k3) / 4, rel=1e-12)
    assert metrics["ratio_mean"] == metrics["ratio_max"] == metrics["ratio_min"] == 1.0


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_ties_take_the_unclipped_gradient(impl):
    # eps = 0 puts r = 1 exactly on both clip boundaries: r*A == clamp(r)*A for every token. The
    # whole gradient -A*r must flow (a kernel that took the clipped branch on ties would give 0).
    logp = torch.tensor([-1.0, -0.3, -2.0], dtype=torch.float64)
    adv = torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    loss, grad, metrics = run(logp, None, None, adv, cu, epsilon_low=0.0, epsilon_high=0.0, impl=impl,
                              advantage_level="token")
    assert loss.item() == pytest.approx(-adv.mean().item(), rel=1e-12)
    torch.testing.assert_close(grad, -adv / 3, rtol=1e-12, atol=0)
    assert metrics["clip_frac"] == 0.0


def test_torch_path_passes_gradcheck():
    logp, old, ref, adv, cu, w = random_batch(3, 24, 5, weights="frac")
    for loss_type in LOSS_TYPES:
        fn = lambda x: grpo_token_loss(x, old, ref, adv, cu, loss_type, beta=0.1, max_completion_length=MAX_LEN,  # noqa: E731
                                       impl="torch", token_weights=w)[0]
        assert torch.autograd.gradcheck(fn, (logp.clone().requires_grad_(),), eps=1e-7, atol=1e-9)


# ------------------------------------------------------------------ torch path vs reference


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float64, 1e-14, 1e-11), (torch.float32, 1e-7, 1e-5),
                                               (torch.bfloat16, 1e-7, 1e-5)])
@pytest.mark.parametrize("weights", [None, "mask", "frac"])
@pytest.mark.parametrize("per_sequence_adv", [True, False])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_torch_path_matches_reference(loss_type, per_sequence_adv, weights, dtype, atol, rtol):
    batch = random_batch(1, 1001, 37, per_sequence_adv=per_sequence_adv, weights=weights)
    kwargs = dict(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, beta=0.05, max_completion_length=MAX_LEN,
                  advantage_level="sequence" if per_sequence_adv else "token")
    loss, grad, metrics = run(*batch, dtype=dtype, impl="torch", **kwargs)
    ref_loss, ref_grad, ref_metrics = run(*batch, dtype=dtype, impl="reference", **kwargs)
    # The exact answer: the reference in float64 on the same (rounded) inputs.
    rounded = [None if x is None or x.dtype == torch.int32 else x.to(dtype).double() for x in batch]
    rounded[4] = batch[4]
    exact_loss, exact_grad, _ = run(*rounded, impl="reference", **kwargs)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    assert_within(loss, exact_loss, ref_loss, atol, rtol)
    assert_within(grad, exact_grad, ref_grad, atol if dtype != torch.bfloat16 else 1e-5, rtol)
    assert_metrics(metrics, ref_metrics, rel=1e-5 if dtype != torch.float64 else 1e-12, abs_=1e-7)
    # The float64 reference itself against a formula written apart from the module.
    logp = rounded[0].clone().requires_grad_()
    want = independent_loss(logp, *rounded[1:], loss_type, 0.2, 0.28, 0.05, kwargs["advantage_level"])
    (want_grad,) = torch.autograd.grad(want, logp)
    torch.testing.assert_close(exact_loss, want.detach(), rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(exact_grad, want_grad, rtol=1e-10, atol=1e-15)


def test_auto_is_the_torch_path_on_cpu():
    batch = random_batch(2, 300, 9)
    auto = run(*batch, beta=0.1, impl="auto")
    torch_path = run(*batch, beta=0.1, impl="torch")
    assert torch.equal(auto[0], torch_path[0]) and torch.equal(auto[1], torch_path[1]) and auto[2] == torch_path[2]


def test_sequence_ids():
    cu = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)
    assert sequence_ids(cu, 6).tolist() == [0, 0, 2, 2, 2, 3]


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("cu", [[0], [0, 0, 0]])
def test_empty_batch_gives_a_connected_zero(impl, cu):
    logp = torch.zeros(0, requires_grad=True)
    loss, metrics = grpo_token_loss(logp, None, None, torch.zeros(len(cu) - 1), torch.tensor(cu, dtype=torch.int32),
                                    impl=impl)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert logp.grad is not None and logp.grad.shape == (0,)
    assert metrics == dict.fromkeys(METRIC_NAMES, 0.0)


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_zero_weights_give_zero_loss_and_metrics(impl, loss_type):
    logp, old, ref, adv, cu, _ = random_batch(4, 50, 6)
    loss, grad, metrics = run(logp, old, ref, adv, cu, torch.zeros(50, dtype=torch.float64), impl=impl,
                              loss_type=loss_type, beta=0.1, max_completion_length=MAX_LEN)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    assert metrics == dict.fromkeys(METRIC_NAMES, 0.0)


# ------------------------------------------------------------------ gradient accumulation


def split_microbatches(batch, seq_bounds):
    """Cut a packed batch at sequence boundaries: seq_bounds [0, ..., S] -> list of sub-batches."""
    logp, old, ref, adv, cu, w = batch
    for s0, s1 in zip(seq_bounds[:-1], seq_bounds[1:]):
        t0, t1 = int(cu[s0]), int(cu[s1])
        piece = lambda x: None if x is None else x[t0:t1]  # noqa: E731
        yield piece(logp), piece(old), piece(ref), adv[s0:s1], (cu[s0:s1 + 1] - cu[s0]).to(torch.int32), piece(w)


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("weights", [None, "mask"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_microbatch_losses_sum_to_the_global_loss(loss_type, weights, impl):
    batch = random_batch(5, 600, 24, weights=weights)
    bounds = [0, 5, 6, 17, 24]
    num_microbatches = len(bounds) - 1
    w = batch[5] if batch[5] is not None else torch.ones(600, dtype=torch.float64)
    common = dict(loss_type=loss_type, beta=0.05, max_completion_length=MAX_LEN, impl=impl)
    full_loss, full_grad, _ = run(*batch, **common)
    losses, grads = [], []
    for micro in split_microbatches(batch, bounds):
        loss, grad, _ = run(*micro, num_sequences=24, num_tokens=float(w.sum()),
                            num_microbatches=num_microbatches, **common)
        losses.append(loss)
        grads.append(grad)
    accumulated, accumulated_grad = sum(losses), torch.cat(grads)
    if loss_type != "bnpo":
        torch.testing.assert_close(accumulated, full_loss, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(accumulated_grad, full_grad, rtol=1e-12, atol=1e-15)
        return
    # bnpo: each micro-batch is its own weighted token mean, the mean over micro-batches is the loss.
    expected = sum(independent_loss(*micro, "bnpo", 0.2, 0.2, 0.05) for micro in split_microbatches(batch, bounds))
    torch.testing.assert_close(accumulated, expected / num_microbatches, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_per_sequence_advantages_when_there_are_as_many_tokens_as_sequences(impl):
    """Completions of 0, 2 and 1 tokens: N == S == 3, and the advantages are still one per sequence.
    One pass (old_logp None, r = 1): l_t = -A of t's sequence, loss = -(A_1 + A_2) / 3 (grpo, the
    empty sequence adds 0), dloss/dlogp_t = -A / (3 * len)."""
    logp = torch.tensor([-1.0, -0.5, -2.0], dtype=torch.float64)
    adv = torch.tensor([5.0, -1.0, 0.5], dtype=torch.float64)
    cu = torch.tensor([0, 0, 2, 3], dtype=torch.int32)
    loss, grad, _ = run(logp, None, None, adv, cu, impl=impl)
    assert loss.item() == pytest.approx(-(-1.0 + 0.5) / 3, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor([1 / 6, 1 / 6, -0.5 / 3], dtype=torch.float64), rtol=1e-12, atol=0)
    # the same advantages spelled per token
    per_token = run(logp, None, None, adv[[1, 1, 2]], cu, impl=impl, advantage_level="token")
    torch.testing.assert_close(per_token[0], loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(per_token[1], grad, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ validation


def _call(**overrides):
    args = dict(logp=hand_case()[0][0].float(), old_logp=None, ref_logp=None, advantages=torch.ones(2),
                cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32))
    args.update(overrides)
    return grpo_token_loss(**args)


@pytest.mark.parametrize("overrides, error, match", [
    ({"loss_type": "ppo"}, ValueError, r"unknown loss_type 'ppo'; valid: \['bnpo', 'dapo', 'dr_grpo', 'grpo'\]"),
    ({"beta": 0.1}, ValueError, r"beta=0.1 > 0 needs ref_logp"),
    ({"old_logp": torch.zeros(4)}, ValueError, r"old_logp must have shape \(5,\), got \(4,\)"),
    ({"ref_logp": torch.zeros(5, dtype=torch.int64)}, TypeError, r"ref_logp must be a floating-point tensor"),
    ({"advantages": torch.ones(3)}, ValueError,
     r"advantages must have shape \(2,\), one per sequence \(advantage_level='sequence'\), got \(3,\)"),
    ({"advantages": torch.ones(2), "advantage_level": "token"}, ValueError,
     r"advantages must have shape \(5,\), one per token \(advantage_level='token'\), got \(2,\)"),
    ({"advantage_level": "batch"}, ValueError, r"unknown advantage_level 'batch'; valid: \['sequence', 'token'\]"),
    ({"cu_seqlens": torch.tensor([0.0, 3.0, 5.0])}, TypeError, r"cu_seqlens must be int32 or int64, got torch.float32"),
    ({"cu_seqlens": torch.tensor([1, 3, 5])}, ValueError, r"must start at 0, got cu_seqlens\[0\]=1"),
    ({"cu_seqlens": torch.tensor([0, 3, 4])}, ValueError, r"must end at the token count N=5, got cu_seqlens\[-1\]=4"),
    ({"cu_seqlens": torch.tensor([0, 4, 2, 5]), "advantages": torch.ones(5)}, ValueError,
     r"non-decreasing, got cu_seqlens\[1\]=4 > cu_seqlens\[2\]=2"),
    ({"epsilon_low": -0.1}, ValueError, r"epsilon_low must be a finite number >= 0, got -0.1"),
    ({"epsilon_high": float("nan")}, ValueError, r"epsilon_high must be a finite number >= 0, got nan"),
    ({"loss_type": "dr_grpo"}, ValueError, r"loss_type='dr_grpo' needs max_completion_length"),
    ({"loss_type": "dr_grpo", "max_completion_length": 0}, ValueError, r"max_completion_length must be >= 1, got 0"),
    ({"token_weights": torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0])}, ValueError, r"token_weights must be >= 0"),
    ({"num_sequences": 1}, ValueError, r"num_sequences must be >= 2, got 1"),
    ({"num_microbatches": 0}, ValueError, r"num_microbatches must be >= 1, got 0"),
    ({"num_tokens": 0}, ValueError, r"num_tokens must be a finite number > 0, got 0"),
    ({"impl": "cuda"}, ValueError, r"unknown impl 'cuda'; valid: \['auto', 'triton', 'torch', 'reference'\]"),
])
def test_invalid_inputs_raise_clear_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"impl='triton' needs Triton and a CUDA tensor"):
        _call(impl="triton")


def test_registry_lists_the_four_loss_types():
    assert sorted(LOSS_AGGREGATIONS) == sorted(LOSS_TYPES)


# ------------------------------------------------------------------ Triton


def interpreter_cases():
    """name -> (args, kwargs) run through impl='triton' under the interpreter."""
    cases = {"hand_" + lt: (hand_case()[0], {**hand_case()[1], "loss_type": lt}) for lt in LOSS_TYPES}
    for i, lt in enumerate(LOSS_TYPES):
        # 2500 tokens = 3 programs of 1024, so per-program statistics are combined.
        logp, old, ref, adv, cu, w = random_batch(10 + i, 2500 if i % 2 else 1001, 37, weights="mask")
        cases["weighted_" + lt] = ((logp, old, ref, adv, cu), dict(
            loss_type=lt, epsilon_high=0.28, beta=0.04, max_completion_length=MAX_LEN, token_weights=w))
        logp, old, ref, adv, cu, w = random_batch(20 + i, 1001, 37, per_sequence_adv=False, with_ref=False)
        cases["plain_" + lt] = ((logp, old, ref, adv, cu), dict(loss_type=lt, max_completion_length=MAX_LEN,
                                                                advantage_level="token"))
    logp, old, ref, adv, cu, w = random_batch(30, 300, 8, weights="frac")
    cases["frac_kl_only"] = ((logp, old, ref, adv, cu), dict(beta=0.1, token_weights=w))
    cases["ties"] = ((torch.tensor([-1.0, -0.3, -2.0]), None, None, torch.tensor([1.5, -2.0, 0.5]),
                      torch.tensor([0, 3], dtype=torch.int32)),
                     dict(epsilon_low=0.0, epsilon_high=0.0, advantage_level="token"))
    return cases


def _as32(args, kwargs):
    args = [x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args]
    kwargs = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return args, kwargs


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo_interp") / "results.pt"
    run_under_interpreter(__file__, out, timeout=300)
    return torch.load(out)


@pytest.mark.parametrize("name", sorted(interpreter_cases()))
def test_triton_interpreter_matches_reference(interpreter_results, name):
    args, kwargs = _as32(*interpreter_cases()[name])
    loss, grad, metrics = interpreter_results[name]
    ref_loss, ref_grad, ref_metrics = run(*args, dtype=torch.float32, impl="reference", **kwargs)
    exact_loss, exact_grad, _ = run(*args, impl="reference", **kwargs)  # float64 on the float32 inputs
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_within(loss, exact_loss, ref_loss, atol=1e-7, rtol=1e-5)
    assert_within(grad, exact_grad, ref_grad, atol=1e-9, rtol=1e-5)
    assert_metrics(metrics, ref_metrics, rel=1e-5, abs_=1e-7)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_triton_interpreter_hand_checked(interpreter_results, loss_type):
    _, _, expected = hand_case()
    loss, grad, metrics = interpreter_results["hand_" + loss_type]
    scales = HAND_SCALES[loss_type]
    assert loss.item() == pytest.approx(sum(s * l for s, l in zip(scales, expected["token_loss"])), rel=1e-6)
    want = torch.tensor([s * g for s, g in zip(scales, expected["token_grad"])])
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-7)
    assert_metrics(metrics, expected["metrics"], rel=1e-6, abs_=1e-7)


def test_kernels_compile_for_sm86():
    """Every launch config compiles to a cubin for the A40 (sm_86); the interpreter never compiles."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    configs = triton_configs()
    assert len(configs) == 6
    for c in configs:
        source = ASTSource(fn=c["kernel"], signature=c["signature"], constexprs=c["constexprs"])
        compiled = triton.compile(source, target=GPUTarget("cuda", 86, 32), options={"num_warps": c["num_warps"]})
        assert len(compiled.asm["cubin"]) > 0


if __name__ == "__main__":  # the interpreter run: `TRITON_INTERPRET=1 python test_grpo_loss.py OUT.pt`
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for case_name, (case_args, case_kwargs) in interpreter_cases().items():
        results[case_name] = run(*_as32(case_args, case_kwargs)[0], dtype=torch.float32, impl="triton",
                                 **_as32(case_args, case_kwargs)[1])
    torch.save(results, sys.argv[1])
