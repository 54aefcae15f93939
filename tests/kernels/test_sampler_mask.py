"""sampler_mask: masking of the trainer/sampler mismatch ("token": IcePop; "sequence": the whole
sequence's ratio), through grpo_token_loss and fused_grpo_loss on every path.

The expected values come from `mask_weights`, the definition written out one token / one sequence
at a time with python floats, folded into per-token advantages of test_gspo_tis's `plain_loss` (the
whole loss in float64, differentiated by autograd). The Triton paths run under TRITON_INTERPRET=1 in
a subprocess (see the bottom).
"""
from __future__ import annotations

import math
import sys

import pytest
import test_gspo_tis as tg
import torch
from helpers.interpreter_run import run_under_interpreter

from fastgrpo.kernels import fused_grpo_loss, grpo_token_loss
from fastgrpo.kernels import logprob as lp
from fastgrpo.kernels.grpo_loss import IMPORTANCE_SAMPLING_LEVELS, METRIC_NAMES, SAMPLER_METRIC_NAMES

MODES = ("token", "sequence")
CAP = 2.0
# spread of log(old / sampler) per token: the sequence sums of 40 tokens need a smaller one to
# leave some sequences kept, the token mask a larger one to mask some tokens
SPREAD = {"token": 1.0, "sequence": 0.3}


def _one_pass(batch, logp):
    """The batch with old_logp None and the sampler as far from logp as it was from old_logp."""
    return dict(batch, old_logp=None, sampler_logp=logp + (batch["sampler_logp"] - batch["old_logp"]))


def _fused_case(seed, mode, old, **kwargs):
    """test_gspo_tis's fused case with the sampler SPREAD[mode] from the trainer's old log-probs."""
    hidden, weight, targets, batch = tg.make_fused_case(seed, **kwargs)
    batch["sampler_logp"] = batch["old_logp"] + (batch["sampler_logp"] - batch["old_logp"]) * SPREAD[mode]
    if old == "none":  # the sequence mask then needs a first logp pass
        with torch.no_grad():
            logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None])[:, 0]
        batch = _one_pass(batch, logp)
    return hidden, weight, targets, batch


# ------------------------------------------------------------------ the definition


def mask_weights(old, sampler, cu_seqlens, mode, cap, token_weights=None):
    """(weights [N] float64, masked [N] bool) from the definition: r = exp(old - sampler) per token
    ("token") or the product over the sequence's tokens with weight > 0 ("sequence"); the weight
    is r where 1/cap <= r <= cap, else 0."""
    n = old.numel()
    weights, masked = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool)
    bound = math.log(cap)
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        log_ratios = [float(old[t]) - float(sampler[t]) for t in range(a, b)]
        if mode == "sequence":
            counted = [x for t, x in zip(range(a, b), log_ratios)
                       if token_weights is None or token_weights[t] > 0]
            log_ratios = [sum(counted)] * (b - a)
        for t, x in zip(range(a, b), log_ratios):
            keep = -bound <= x <= bound
            weights[t], masked[t] = (math.exp(x) if keep else 0.0), not keep
    return weights, masked


def plain_masked(logp, old_logp, ref_logp, advantages, cu_seqlens, *, sampler_logp, sampler_mask,
                 sampler_mask_cap=CAP, token_weights=None, sequence_mask=None, advantage_level="sequence", **kwargs):
    """(loss, metrics): the mask's weights folded into per-token advantages of plain_loss."""
    old = (logp if old_logp is None else old_logp).detach()
    c, masked = mask_weights(old, sampler_logp, cu_seqlens, sampler_mask, sampler_mask_cap, token_weights)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    per_token = advantages if advantage_level == "token" else advantages.repeat_interleave(lengths)
    loss, metrics = tg.plain_loss(logp, old_logp, ref_logp, per_token * c, cu_seqlens, token_weights=token_weights,
                                  sequence_mask=sequence_mask, advantage_level="token", **kwargs)
    w = torch.ones_like(c) if token_weights is None else token_weights.clone()
    if sequence_mask is not None:
        w = w * sequence_mask.double().repeat_interleave(lengths)
    total = float(w.sum())
    if total > 0:
        metrics.update(sampler_weight_mean=float((w * c).sum()) / total,
                       sampler_masked_frac=float((w * masked).sum()) / total)
    return loss, metrics


def assert_metrics(got, want, rel=1e-9, abs_=1e-12):
    names = METRIC_NAMES + SAMPLER_METRIC_NAMES
    assert set(got) == set(names), set(got) ^ set(names)
    for name in names:
        assert math.isclose(got[name], want[name], rel_tol=rel, abs_tol=abs_), (name, got[name], want[name])


def assert_away_from_the_bounds(batch, mode):
    """Random data whose log ratio sits within 1e-5 of a bound would let float32 paths flip a decision."""
    old = (batch["logp"] if batch["old_logp"] is None else batch["old_logp"]).double()
    x = old - batch["sampler_logp"].double()
    if mode == "sequence":
        w = batch.get("token_weights")
        counted = x if w is None else torch.where(w > 0, x, 0.0)
        cu = batch["cu_seqlens"].tolist()
        x = torch.stack([counted[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])
    assert ((x.abs() - math.log(CAP)).abs() > 1e-5).all()


# ------------------------------------------------------------------ grpo_token_loss


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("old,loss_type", [("given", "grpo"), ("none", "dapo"), ("given", "dr_grpo")])
def test_sampler_mask_matches_the_formula(mode, level, impl, old, loss_type):
    batch = tg.make_batch(21, sampler_spread=SPREAD[mode], weights=True)
    if old == "none":  # one pass: r uses the trainer's current (detached) logp
        batch = _one_pass(batch, batch["logp"])
    kwargs = dict(importance_sampling_level=level, sampler_mask=mode, sampler_mask_cap=CAP, beta=0.04,
                  loss_type=loss_type, epsilon_high=0.28, max_completion_length=tg.MAX_LEN,
                  sequence_mask=tg._mask())
    got = tg.loss_and_grad(grpo_token_loss, batch, impl=impl, **kwargs)
    want = tg.loss_and_grad(plain_masked, batch, **kwargs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-14)
    assert_metrics(got[2], want[2])
    assert 0.05 < want[2]["sampler_masked_frac"] < 0.8  # the mask masks some tokens and keeps others


def _bounds_batch():
    """float64, loss_type grpo. Log ratios d = old - sampler, each an exact float64 difference
    (old = -d, sampler = -2d: Sterbenz), with L = log 2 = log CAP:
        A [+L] at the upper bound           B [-L] at the lower bound        C [] empty
        D [L/2, L/2]: sums to L exactly     E [L + 1e-9] just outside         G [5, -5, 0.1]: sums to 0.1
        I [+inf]: the sampler gave -inf     F [30] * 40: sums to 1200 (exp overflows float64)
        H [0.2] after F: its sum is a difference of a running sum past 1200
    The running sum is exact up to D, so D's sum is L exactly (its bound decision is exact)."""
    L = math.log(CAP)
    seqs = [[L], [-L], [], [L / 2, L / 2], [L + 1e-9], [5.0, -5.0, 0.1], [math.inf], [30.0] * 40, [0.2]]
    d = torch.tensor([x for s in seqs for x in s], dtype=torch.float64)
    old = torch.where(torch.isinf(d), torch.tensor(-1.0, dtype=torch.float64), -d)
    sampler = torch.where(torch.isinf(d), torch.tensor(-math.inf, dtype=torch.float64), -2 * d)
    assert torch.equal(old - sampler, d)
    g = torch.Generator().manual_seed(5)
    logp = old + 0.05 * torch.randn(d.numel(), generator=g, dtype=torch.float64)
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0).to(torch.int32)
    adv = torch.linspace(-1.0, 1.2, len(seqs), dtype=torch.float64)
    batch = dict(logp=logp, old_logp=old, ref_logp=logp - 0.1, sampler_logp=sampler, advantages=adv, cu_seqlens=cu,
                 token_weights=None)
    e = math.exp
    want = {  # the weight of each token, by hand
        "token": [2.0, 0.5, e(L / 2), e(L / 2), 0.0, 0.0, 0.0, e(0.1), 0.0] + [0.0] * 40 + [e(0.2)],
        "sequence": [2.0, 0.5, 2.0, 2.0, 0.0, e(0.1), e(0.1), e(0.1), 0.0] + [0.0] * 40 + [e(0.2)],
    }
    return batch, want


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("mode", MODES)
def test_bounds_are_inclusive_and_huge_or_infinite_ratios_are_masked(mode, level, impl):
    batch, want_weights = _bounds_batch()
    weights, masked = mask_weights(batch["old_logp"], batch["sampler_logp"], batch["cu_seqlens"], mode, CAP)
    torch.testing.assert_close(weights, torch.tensor(want_weights[mode], dtype=torch.float64), rtol=1e-15, atol=0)
    kwargs = dict(importance_sampling_level=level, sampler_mask=mode, sampler_mask_cap=CAP, beta=0.0,
                  epsilon_low=10.0, epsilon_high=10.0)  # no clipping: every kept token has a gradient
    got = tg.loss_and_grad(grpo_token_loss, batch, impl=impl, **kwargs)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    assert all(math.isfinite(v) for v in got[2].values())
    want = tg.loss_and_grad(plain_masked, batch, **kwargs)
    # H's sequence sum is a difference of a running sum near 1e4 (the clamped inf, then F): ~1e-12 off
    torch.testing.assert_close(got[0], want[0], rtol=1e-11, atol=1e-15)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-15)
    assert_metrics(got[2], want[2])
    if level == "token":  # each token's gradient is its own: zero exactly where masked
        assert torch.equal(got[1] == 0, masked)
    assert got[2]["sampler_masked_frac"] == pytest.approx(float(masked.double().mean()), rel=1e-14)
    assert got[2]["sampler_weight_mean"] == pytest.approx(sum(want_weights[mode]) / len(want_weights[mode]), rel=1e-14)


@pytest.mark.parametrize("mode", MODES)
def test_the_mask_leaves_the_kl_term_unweighted(mode):
    batch = tg.make_batch(22, sampler_spread=SPREAD[mode])
    batch["advantages"] = torch.zeros_like(batch["advantages"])  # only the k3 term is left
    kl_only = tg.loss_and_grad(grpo_token_loss, dict(batch, sampler_logp=None), beta=0.1)
    masked = tg.loss_and_grad(grpo_token_loss, batch, beta=0.1, sampler_mask=mode)
    torch.testing.assert_close(masked[0], kl_only[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(masked[1], kl_only[1], rtol=1e-14, atol=0)
    assert masked[2]["sampler_masked_frac"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_masked_tokens_still_count_in_the_normalizers(mode):
    """Everything masked (the sampler 10 nats off): the policy term is 0, and the loss's token counts
    are unchanged, so the k3 term is the same as without the mask (not renormalized to the kept)."""
    batch = tg.make_batch(23)
    batch["sampler_logp"] = batch["old_logp"] - 10.0
    kwargs = dict(beta=0.1, loss_type="dapo")
    masked = tg.loss_and_grad(grpo_token_loss, batch, sampler_mask=mode, **kwargs)
    no_policy = tg.loss_and_grad(grpo_token_loss, dict(batch, advantages=batch["advantages"] * 0, sampler_logp=None),
                                 **kwargs)
    torch.testing.assert_close(masked[0], no_policy[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(masked[1], no_policy[1], rtol=1e-14, atol=0)
    assert masked[2]["sampler_masked_frac"] == 1.0 and masked[2]["sampler_weight_mean"] == 0.0


def test_metric_names_and_the_empty_batch():
    batch = tg.make_batch(24)
    _, _, metrics = tg.loss_and_grad(grpo_token_loss, batch, sampler_mask="token")
    assert set(metrics) == set(METRIC_NAMES + SAMPLER_METRIC_NAMES)
    empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    loss, metrics = grpo_token_loss(empty, None, None, torch.zeros(2, dtype=torch.float64),
                                    torch.zeros(3, dtype=torch.int32), sampler_logp=empty.detach(), sampler_mask="sequence")
    loss.backward()
    assert loss.item() == 0.0 and metrics == dict.fromkeys(METRIC_NAMES + SAMPLER_METRIC_NAMES, 0.0)


# ------------------------------------------------------------------ fused_grpo_loss (torch path)


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("old", ["given", "none"])
def test_fused_matches_the_float64_formula(mode, level, old):
    hidden, weight, targets, batch = _fused_case(25, mode, old)
    kwargs = dict(importance_sampling_level=level, sampler_mask=mode, beta=0.05, loss_type="grpo", epsilon_high=0.28,
                  sequence_mask=torch.tensor([True, True, True, False, True, True]))
    got = tg.fused_run(hidden, weight, targets, batch, impl="torch", chunk_tokens=16, **kwargs)
    want = _fused_formula(hidden, weight, targets, batch, **kwargs)
    for name, g, t in zip(("loss", "grad_hidden", "grad_weight"), got[:3], want[:3]):
        assert (g - t).abs().max().item() <= 2e-5 * max(t.abs().max().item(), 1e-3), name
    assert_metrics(got[3], want[3], rel=1e-4, abs_=1e-5)
    assert 0.05 < want[3]["sampler_masked_frac"] < 0.8


def _fused_formula(hidden, weight, targets, batch, upstream=1.3, **kwargs):
    """float64 logits -> plain_masked (the check on the data's distance to the bounds included)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp = torch.log_softmax(h @ w.T, -1).gather(-1, targets[:, None])[:, 0]
    cast = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in batch.items()}
    assert_away_from_the_bounds(dict(cast, logp=logp.detach()), kwargs["sampler_mask"])
    loss, metrics = plain_masked(logp, **cast, **kwargs)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad, metrics


def test_fused_computes_the_logits_twice_only_for_the_one_pass_sequence_mask(monkeypatch):
    """The sequence mask needs whole sequences' old log-probs: with old_logp None the torch path
    computes every logp first (one more pass over the logits); the token mask and a given old_logp
    need none. At the sequence level that first pass is shared with GSPO's."""
    hidden, weight, targets, batch = tg.make_fused_case(26)
    calls = []
    real = lp._chunk_logits
    monkeypatch.setattr(lp, "_chunk_logits", lambda *a: calls.append(1) or real(*a))
    n_chunks = math.ceil(hidden.shape[0] / 16)
    cases = [("token", None, "token", 1), ("sequence", None, "token", 2), ("sequence", batch["old_logp"], "token", 1),
             ("sequence", None, "sequence", 2)]
    for mode, old, level, passes in cases:
        calls.clear()
        tg.fused_run(hidden, weight, targets, dict(batch, old_logp=old), impl="torch", chunk_tokens=16,
                     sampler_mask=mode, importance_sampling_level=level)
        assert len(calls) == passes * n_chunks, (mode, old is None, level, len(calls))


# ------------------------------------------------------------------ errors name the arguments


@pytest.mark.parametrize("overrides,error,match", [
    ({"sampler_mask": "tokens"}, ValueError, r"unknown sampler_mask 'tokens'; valid: \['none', 'token', 'sequence'\]"),
    ({"sampler_mask": "token", "sampler_mask_cap": 1.0}, ValueError, r"sampler_mask_cap must be a finite number > 1"),
    ({"sampler_mask": "token", "sampler_mask_cap": math.inf}, ValueError, r"sampler_mask_cap must be a finite number > 1"),
    ({"sampler_mask": "token", "sampler_mask_cap": "2"}, TypeError, r"sampler_mask_cap must be an int or float"),
    ({"sampler_mask": "sequence", "tis_cap": 2.0}, ValueError,
     r"tis_cap=2.0 and sampler_mask='sequence' are two corrections.*pass one"),
    ({"sampler_mask": "token", "sampler_logp": None}, ValueError, r"sampler_mask='token' needs sampler_logp"),
])
def test_bad_mask_options_raise_clear_errors(overrides, error, match):
    args = {**tg._small(), **overrides}
    with pytest.raises(error, match=match):
        grpo_token_loss(**args)
    g = torch.Generator().manual_seed(0)
    hidden, weight, targets = torch.randn(5, 8, generator=g), torch.randn(20, 8, generator=g), torch.arange(5)
    args.pop("logp")
    with pytest.raises(error, match=match):
        fused_grpo_loss(hidden, weight, targets, **args)


# ------------------------------------------------------------------ Triton paths, under the interpreter


def triton_cases():
    """name -> (function, kwargs): the Triton impls with the mask folded into the advantages."""
    cases = {}
    for mode, level in (("token", "token"), ("sequence", "sequence"), ("sequence", "token")):
        b = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
             for k, v in tg.make_batch(27, weights=True, sampler_spread=SPREAD[mode]).items()}
        cases[f"token_loss_{mode}_mask_{level}_level"] = ("grpo_token_loss", dict(
            b, importance_sampling_level=level, sampler_mask=mode, beta=0.04, loss_type="dapo", epsilon_high=0.28,
            sequence_mask=tg._mask()))
    for mode, level in (("sequence", "token"), ("token", "sequence")):
        # one pass: the sequence mask needs every logp before the gradient
        hidden, weight, targets, fb = _fused_case(28, mode, "none", h=45, v=300)
        cases[f"fused_{mode}_mask_{level}_level"] = ("fused_grpo_loss", dict(
            fb, hidden=hidden, weight=weight, targets=targets, importance_sampling_level=level, sampler_mask=mode,
            beta=0.04, sequence_mask=torch.tensor([True, True, True, False, True, True])))
    return cases


def _triton_worker(out_path):
    tg.run_triton_cases(triton_cases(), out_path)


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sampler_mask_triton") / "results.pt"
    run_under_interpreter(__file__, "--triton-worker", out, timeout=600)
    return torch.load(out)


@pytest.mark.skipif(lp.triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("name", sorted(triton_cases()))
def test_triton_paths_match_the_formula_under_interpreter(triton_results, name):
    fn, kwargs = triton_cases()[name]
    kwargs = dict(kwargs)
    got = triton_results[name]
    if fn == "grpo_token_loss":
        options = {k: kwargs.pop(k) for k in ("importance_sampling_level", "sampler_mask", "beta", "loss_type",
                                              "epsilon_high", "sequence_mask")}
        double = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in kwargs.items()}
        assert_away_from_the_bounds(double, options["sampler_mask"])
        want = tg.loss_and_grad(plain_masked, double, **options)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-7)
        assert_metrics(got[2], want[2], rel=1e-4, abs_=1e-6)
        assert 0.05 < want[2]["sampler_masked_frac"] < 0.8
        return
    hidden, weight, targets = (kwargs.pop(k) for k in ("hidden", "weight", "targets"))
    options = {k: kwargs.pop(k) for k in ("importance_sampling_level", "sampler_mask", "beta", "sequence_mask")}
    want = _fused_formula(hidden, weight, targets, kwargs, **options)
    assert 0.05 < want[3]["sampler_masked_frac"] < 0.8
    for g, t in zip(got[:3], want[:3]):
        assert (g - t).abs().max().item() <= 2e-5 * max(t.abs().max().item(), 1e-3)
    assert_metrics(got[3], want[3], rel=1e-4, abs_=1e-5)


if __name__ == "__main__" and sys.argv[1:2] == ["--triton-worker"]:
    _triton_worker(sys.argv[2])
