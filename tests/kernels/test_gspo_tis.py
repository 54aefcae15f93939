"""The objectives on top of the token-level GRPO loss: the sequence-level ratio (GSPO), truncated
importance sampling against the sampler's log-probs (TIS) and sequence_mask (DAPO's overlong
filtering), through grpo_token_loss and fused_grpo_loss.

Everything is checked against `plain_loss`, the formulas written out with a python loop over the
sequences in float64 and differentiated by autograd, on packed batches with awkward lengths (1, 0,
2, 3, ... 40 tokens). The Triton paths run under TRITON_INTERPRET=1 in a subprocess (see the bottom).
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
from helpers.interpreter_run import run_under_interpreter

from fastgrpo.kernels import fused_grpo_loss, grpo_token_loss
from fastgrpo.kernels import logprob as lp
from fastgrpo.kernels.grpo_loss import IMPORTANCE_SAMPLING_LEVELS, METRIC_NAMES, TIS_METRIC_NAMES

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
MAX_LEN = 48  # max_completion_length for dr_grpo
LENGTHS = (1, 5, 0, 17, 1, 3, 40, 2, 9)
KEEP = (True, False, True, True, False, True, True, True, True)


# ------------------------------------------------------------------ inputs and the plain formulas


def make_batch(seed, lengths=LENGTHS, *, noise=0.4, weights=False, sampler_spread=1.0):
    """float64 packed batch: logp, old (logp + noise), ref, sampler (old + spread * N(0, 1): with
    spread 1, exp(old - sampler) > 2 for ~25% of tokens), per-sequence advantages, cu_seqlens and
    optional fractional token weights (with zeros)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    logp = -3 * torch.rand(n, generator=g, dtype=torch.float64) - 0.05
    old = logp + noise * torch.randn(n, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    sampler = old + sampler_spread * torch.randn(n, generator=g, dtype=torch.float64)
    adv = torch.randn(len(lengths), generator=g, dtype=torch.float64)
    w = None
    if weights:
        w = torch.rand(n, generator=g, dtype=torch.float64) * (torch.rand(n, generator=g) > 0.2)
    return dict(logp=logp, old_logp=old, ref_logp=ref, sampler_logp=sampler, advantages=adv, cu_seqlens=cu,
                token_weights=w)


def plain_loss(logp, old_logp, ref_logp, advantages, cu_seqlens, *, token_weights=None, sampler_logp=None,
               tis_cap=0.0, sequence_mask=None, importance_sampling_level="token", loss_type="grpo",
               epsilon_low=0.2, epsilon_high=0.2, beta=0.0, max_completion_length=MAX_LEN,
               num_sequences=None, num_tokens=None, num_microbatches=1, advantage_level="sequence"):
    """(loss, metrics) from the formulas, one sequence at a time; differentiable in logp."""
    bounds = list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))
    old = logp.detach() if old_logp is None else old_logp
    w = torch.ones_like(logp) if token_weights is None else token_weights.clone()
    kept = list(range(len(bounds)))
    if sequence_mask is not None:
        kept = [i for i in kept if sequence_mask[i]]
        for i, (a, b) in enumerate(bounds):
            if i not in kept:
                w[a:b] = 0.0
    S = max(len(kept), 1) if num_sequences is None else num_sequences
    weighted_sum, seq_terms = 0.0, 0.0
    m = dict(kl=0.0, units=0, low=0, high=0, ratio=0.0, rmax=-math.inf, rmin=math.inf, tis=0.0, capped=0.0)
    for i, (a, b) in enumerate(bounds):
        lp_i, old_i, w_i = logp[a:b], old[a:b], w[a:b]
        A = advantages[a:b] if advantage_level == "token" else advantages[i].expand(b - a)
        if tis_cap > 0:
            raw = torch.exp(old_i - sampler_logp[a:b]).detach()
            A = A * raw.clamp(max=tis_cap)
            m["tis"] += float((w_i * raw.clamp(max=tis_cap)).sum())
            m["capped"] += float((w_i * (raw > tis_cap)).sum())
        W = w_i.sum()
        if importance_sampling_level == "sequence":
            s = torch.exp((w_i * (lp_i - old_i)).sum() / W) if W > 0 else torch.exp(lp_i.sum() * 0)
            r = s.expand(b - a)
        else:
            r = torch.exp(lp_i - old_i)
        per_token = -torch.minimum(r * A, torch.clamp(r, 1 - epsilon_low, 1 + epsilon_high) * A)
        kl = torch.zeros_like(lp_i)
        if ref_logp is not None:
            d = ref_logp[a:b] - lp_i
            kl = torch.exp(d) - d - 1
            per_token = per_token + beta * kl
        term = (w_i * per_token).sum()
        weighted_sum = weighted_sum + term
        seq_terms = seq_terms + (term / W if W > 0 else term * 0)
        m["kl"] += float((w_i * kl).detach().sum())
        if importance_sampling_level == "sequence":  # one unit per sequence with weight
            if W > 0:
                sign = float((w_i * A).sum())
                s = float(s.detach())
                m["units"] += 1
                m["low"] += sign < 0 and s < 1 - epsilon_low
                m["high"] += sign > 0 and s > 1 + epsilon_high
                m["ratio"] += s
                m["rmax"], m["rmin"] = max(m["rmax"], s), min(m["rmin"], s)
        else:
            rr = r.detach()
            m["units"] += float(w_i.sum())
            m["low"] += float((w_i * ((A < 0) & (rr < 1 - epsilon_low))).sum())
            m["high"] += float((w_i * ((A > 0) & (rr > 1 + epsilon_high))).sum())
            m["ratio"] += float((w_i * rr).sum())
            if (w_i > 0).any():
                m["rmax"] = max(m["rmax"], float(rr[w_i > 0].max()))
                m["rmin"] = min(m["rmin"], float(rr[w_i > 0].min()))
    total_w = float(w.sum())
    loss = {
        "grpo": lambda: seq_terms / S,
        "bnpo": lambda: weighted_sum / (total_w or 1.0) / num_microbatches,
        "dr_grpo": lambda: weighted_sum / (S * max_completion_length),
        "dapo": lambda: weighted_sum / (num_tokens or total_w or 1.0),
    }[loss_type]()
    metrics = {}
    if total_w > 0:
        metrics = {"clip_low_frac": m["low"] / m["units"], "clip_high_frac": m["high"] / m["units"],
                   "clip_frac": (m["low"] + m["high"]) / m["units"], "kl_mean": m["kl"] / total_w,
                   "ratio_mean": m["ratio"] / m["units"], "ratio_max": m["rmax"], "ratio_min": m["rmin"]}
        if tis_cap > 0:
            metrics.update(tis_weight_mean=m["tis"] / total_w, tis_clipped_frac=m["capped"] / total_w)
    return loss, metrics


def loss_and_grad(fn, batch, **kwargs):
    """fn(logp leaf, ...) -> (loss, metrics); returns (loss, dloss/dlogp, metrics) in float64."""
    leaf = batch["logp"].clone().requires_grad_()
    args = {k: v for k, v in batch.items() if k != "logp"}
    loss, metrics = fn(leaf, **{**args, **kwargs})
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach().double(), grad.double(), metrics


def assert_metrics(got, want, tis, rel=1e-9, abs_=1e-12):
    names = METRIC_NAMES + (TIS_METRIC_NAMES if tis else ())
    assert set(got) == set(names), set(got) ^ set(names)
    for name in names:
        assert math.isclose(got[name], want[name], rel_tol=rel, abs_tol=abs_), (name, got[name], want[name])


def _mask():
    return torch.tensor(KEEP)


# ------------------------------------------------------------------ sequence level (GSPO)


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("variant", ["plain", "kl_weights", "no_old", "per_token_adv", "gspo_eps"])
def test_sequence_level_matches_the_formula(variant, loss_type, impl):
    batch = make_batch(2, weights=variant == "kl_weights")
    kwargs = dict(importance_sampling_level="sequence", loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
                  max_completion_length=MAX_LEN)
    if variant == "kl_weights":
        kwargs["beta"] = 0.05
    if variant == "no_old":  # one pass: s_i = 1, only its gradient matters
        batch["old_logp"] = None
    if variant == "per_token_adv":
        batch["advantages"] = torch.randn(batch["logp"].numel(), dtype=torch.float64,
                                          generator=torch.Generator().manual_seed(3))
        kwargs["advantage_level"] = "token"
    if variant == "gspo_eps":  # the paper's epsilons (v2, section 5.1) clip most sequences
        kwargs.update(epsilon_low=3e-4, epsilon_high=4e-4)
    got = loss_and_grad(grpo_token_loss, batch, impl=impl, **kwargs)
    want = loss_and_grad(plain_loss, batch, **kwargs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-14)
    assert_metrics(got[2], want[2], tis=False)
    if variant == "plain":  # the case exercises both clipping sides and the unclipped branch
        assert 0 < want[2]["clip_low_frac"] and 0 < want[2]["clip_high_frac"] and want[2]["clip_frac"] < 1


def test_sequence_level_hand_checked():
    """3 sequences (lengths 1, 4, 2), grpo, eps 3e-4 / 4e-4: sequence 0 has s = 1.001 and A = +1
    (clipped high: min(1.001, 1.0004) = 1.0004), sequence 1 s = 0.999 and A = -2 (clipped low:
    min(-1.998, -1.9994) = -1.9994), sequence 2 s = 1.0001 and A = 0.5 (inside the band)."""
    targets = [1.001, 0.999, 1.0001]
    lengths = [1, 4, 2]
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -0.7, -2.2], dtype=torch.float64)
    # token log-ratios with the wanted mean per sequence, unequal within a sequence
    spread = torch.tensor([0.0, 0.3, -0.1, -0.4, 0.2, 0.05, -0.05], dtype=torch.float64)
    mean = torch.tensor([math.log(t) for t, n in zip(targets, lengths) for _ in range(n)], dtype=torch.float64)
    logp = (old + mean + spread).requires_grad_()
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    cu = torch.tensor([0, 1, 5, 7], dtype=torch.int32)
    loss, metrics = grpo_token_loss(logp, old, None, adv, cu, epsilon_low=3e-4, epsilon_high=4e-4,
                                    importance_sampling_level="sequence")
    loss.backward()
    want = (-1.0004 + 1.9994 - 1.0001 * 0.5) / 3
    assert loss.item() == pytest.approx(want, rel=1e-9)
    # clipped sequences get no policy gradient; sequence 2: dloss/dlogp_t = -s A / (|y| S)
    want_grad = [0.0] * 5 + [-1.0001 * 0.5 / (2 * 3)] * 2
    torch.testing.assert_close(logp.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-9, atol=1e-15)
    assert metrics["clip_low_frac"] == pytest.approx(1 / 3) and metrics["clip_high_frac"] == pytest.approx(1 / 3)
    assert metrics["ratio_max"] == pytest.approx(1.001) and metrics["ratio_min"] == pytest.approx(0.999)
    assert metrics["ratio_mean"] == pytest.approx(sum(targets) / 3)


# ------------------------------------------------------------------ truncated importance sampling


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("cap,spread", [(2.0, 1.0), (50.0, 0.3)], ids=["cap_hit", "cap_not_hit"])
@pytest.mark.parametrize("old", ["given", "none"])
def test_tis_matches_the_formula(level, cap, spread, old):
    batch = make_batch(2, sampler_spread=spread, weights=True)
    if old == "none":  # one pass: the TIS weight uses the trainer's current (detached) logp
        batch["old_logp"] = None
    kwargs = dict(importance_sampling_level=level, tis_cap=cap, beta=0.04, loss_type="dapo", epsilon_high=0.28)
    got = loss_and_grad(grpo_token_loss, batch, impl="torch", **kwargs)
    ref = loss_and_grad(grpo_token_loss, batch, impl="reference", **kwargs)
    want = loss_and_grad(plain_loss, batch, **kwargs)
    for result in (got, ref):
        torch.testing.assert_close(result[0], want[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(result[1], want[1], rtol=1e-10, atol=1e-14)
        assert_metrics(result[2], want[2], tis=True)
    clipped = want[2]["tis_clipped_frac"]
    assert (0.1 < clipped < 0.6) if cap == 2.0 else clipped == 0.0


def test_tis_cap_everywhere_scales_the_policy_term_by_the_cap():
    """Sampler log-probs far below the trainer's: every weight is the cap, so TIS == advantages x cap."""
    batch = make_batch(4)
    batch["sampler_logp"] = batch["old_logp"] - 5.0  # exp(5) = 148 > cap
    with_tis = loss_and_grad(grpo_token_loss, batch, tis_cap=3.0)
    scaled = dict(batch, advantages=batch["advantages"] * 3.0, sampler_logp=None)
    plain = loss_and_grad(grpo_token_loss, scaled)
    torch.testing.assert_close(with_tis[0], plain[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(with_tis[1], plain[1], rtol=1e-12, atol=0)
    assert with_tis[2]["tis_weight_mean"] == pytest.approx(3.0) and with_tis[2]["tis_clipped_frac"] == 1.0


def test_tis_leaves_the_kl_term_unweighted_and_is_off_at_cap_zero():
    batch = make_batch(5)
    batch["advantages"] = torch.zeros_like(batch["advantages"])  # only the k3 term is left
    kl_only = loss_and_grad(grpo_token_loss, dict(batch, sampler_logp=None), beta=0.1)
    with_tis = loss_and_grad(grpo_token_loss, batch, beta=0.1, tis_cap=2.0)
    torch.testing.assert_close(with_tis[0], kl_only[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(with_tis[1], kl_only[1], rtol=1e-14, atol=0)
    batch = make_batch(5)
    off = loss_and_grad(grpo_token_loss, batch, tis_cap=0.0)  # sampler_logp given but ignored
    none = loss_and_grad(grpo_token_loss, dict(batch, sampler_logp=None))
    assert torch.equal(off[0], none[0]) and torch.equal(off[1], none[1]) and set(off[2]) == set(METRIC_NAMES)


# ------------------------------------------------------------------ sequence_mask


def _without(batch, keep):
    """The batch with the masked sequences removed."""
    cu = batch["cu_seqlens"].long()
    rows = torch.cat([torch.arange(int(cu[i]), int(cu[i + 1])) for i in range(len(keep)) if keep[i]])
    lengths = [int(cu[i + 1] - cu[i]) for i in range(len(keep)) if keep[i]]
    out = {k: (None if v is None else v[rows]) for k, v in batch.items() if k not in ("advantages", "cu_seqlens")}
    out["advantages"] = batch["advantages"][torch.tensor(keep)]
    out["cu_seqlens"] = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    return out, rows


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_masked_sequences_are_as_if_absent(loss_type, level):
    batch = make_batch(6, weights=True)
    kwargs = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.05, tis_cap=2.0,
                  max_completion_length=MAX_LEN)
    masked = loss_and_grad(grpo_token_loss, batch, sequence_mask=_mask(), **kwargs)
    smaller, rows = _without(batch, KEEP)
    dropped = loss_and_grad(grpo_token_loss, smaller, **kwargs)
    torch.testing.assert_close(masked[0], dropped[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(masked[1][rows], dropped[1], rtol=1e-12, atol=1e-15)
    others = torch.ones(batch["logp"].numel(), dtype=torch.bool).index_fill_(0, rows, False)
    assert others.any() and not masked[1][others].any()
    assert_metrics(masked[2], dropped[2], tis=True, rel=1e-12)
    # and the plain formula agrees
    want = loss_and_grad(plain_loss, batch, sequence_mask=_mask(), **kwargs)
    torch.testing.assert_close(masked[0], want[0], rtol=1e-12, atol=1e-15)


def test_everything_masked_gives_a_connected_zero():
    batch = make_batch(7)
    nothing = torch.zeros(len(LENGTHS), dtype=torch.bool)
    loss, grad, metrics = loss_and_grad(grpo_token_loss, batch, sequence_mask=nothing,
                                        importance_sampling_level="sequence", tis_cap=2.0)
    assert loss.item() == 0.0 and not grad.any()
    assert metrics == dict.fromkeys(METRIC_NAMES + TIS_METRIC_NAMES, 0.0)


# ------------------------------------------------------------------ micro-batches


def _split(batch, bounds, keep):
    cu = batch["cu_seqlens"].long()
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        t0, t1 = int(cu[s0]), int(cu[s1])
        part = {k: (None if v is None else v[t0:t1]) for k, v in batch.items() if k not in ("advantages", "cu_seqlens")}
        part.update(advantages=batch["advantages"][s0:s1], cu_seqlens=(cu[s0:s1 + 1] - t0).to(torch.int32))
        yield part, torch.tensor(keep[s0:s1]), slice(t0, t1)


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_microbatch_losses_sum_to_the_batch_loss(loss_type, level):
    """With the global counts of the kept sequences, masked TIS/GSPO micro-batches sum to the batch."""
    batch = make_batch(8, weights=True)
    kwargs = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.05, tis_cap=2.0,
                  max_completion_length=MAX_LEN)
    whole = loss_and_grad(grpo_token_loss, batch, sequence_mask=_mask(), **kwargs)
    cu = batch["cu_seqlens"].long()
    kept_tokens = sum(float(batch["token_weights"][int(cu[i]):int(cu[i + 1])].sum())
                      for i in range(len(KEEP)) if KEEP[i])
    total, grad = 0.0, torch.zeros_like(batch["logp"])
    bounds = [0, 2, 3, 7, 9]
    for part, keep, rows in _split(batch, bounds, KEEP):
        loss, g, _ = loss_and_grad(grpo_token_loss, part, sequence_mask=keep, num_sequences=sum(KEEP),
                                   num_tokens=kept_tokens, num_microbatches=len(bounds) - 1, **kwargs)
        total += loss
        grad[rows] = g
    torch.testing.assert_close(total, whole[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, whole[1], rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ fused_grpo_loss (torch path)


def make_fused_case(seed, n_seqs_lengths=(1, 7, 0, 30, 2, 12), h=24, v=97):
    g = torch.Generator().manual_seed(seed)
    n = sum(n_seqs_lengths)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 2 / h**0.5
    targets = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad():
        true = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(-1, targets[:, None])[:, 0]
    batch = make_batch(seed, n_seqs_lengths)
    for name in ("old_logp", "ref_logp", "sampler_logp"):
        batch[name] = (true + (batch[name] - batch["logp"])).float()
    batch.pop("logp")
    batch["advantages"] = batch["advantages"].float()
    return hidden, weight, targets, batch


def fused_run(hidden, weight, targets, batch, dtype=torch.float32, upstream=1.3, **kwargs):
    """(loss, grad_hidden, grad_weight, metrics) of fused_grpo_loss, float64 out."""
    h = hidden.detach().to(dtype).clone().requires_grad_()
    w = weight.detach().to(dtype).clone().requires_grad_()
    loss, logp, _, metrics = fused_grpo_loss(h, w, targets, **batch, **kwargs)
    (loss * upstream).backward()
    return loss.detach().double(), h.grad.double(), w.grad.double(), metrics


def float64_formula(hidden, weight, targets, batch, upstream=1.3, **kwargs):
    """The same through float64 logits and plain_loss."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp = torch.log_softmax(h @ w.T, -1).gather(-1, targets[:, None])[:, 0]
    cast = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in batch.items()}
    loss, metrics = plain_loss(logp, **cast, **kwargs)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad, metrics


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("old,tis", [("given", 0.0), ("none", 0.0), ("given", 2.0), ("none", 2.0)])
def test_fused_matches_the_float64_formula(level, old, tis):
    hidden, weight, targets, batch = make_fused_case(9)
    if old == "none":
        batch["old_logp"] = None
    kwargs = dict(importance_sampling_level=level, tis_cap=tis, beta=0.05, loss_type="grpo", epsilon_high=0.28,
                  sequence_mask=torch.tensor([True, True, True, False, True, True]))
    got = fused_run(hidden, weight, targets, batch, impl="torch", chunk_tokens=16, **kwargs)
    want = float64_formula(hidden, weight, targets, batch, **kwargs)
    for name, g, t in zip(("loss", "grad_hidden", "grad_weight"), got[:3], want[:3]):
        scale = max(t.abs().max().item(), 1e-3)
        assert (g - t).abs().max().item() <= 2e-5 * scale, name
    assert_metrics(got[3], want[3], tis=tis > 0, rel=1e-4, abs_=1e-5)


def test_fused_sequence_level_computes_the_logits_twice_only_when_it_must(monkeypatch):
    """One pass (old_logp None, no TIS): s_i = 1 and one chunked pass suffices; with old_logp the
    torch path first computes every logp (a second pass over the logits)."""
    hidden, weight, targets, batch = make_fused_case(10)
    calls = []
    real = lp._chunk_logits
    monkeypatch.setattr(lp, "_chunk_logits", lambda *a: calls.append(1) or real(*a))
    n_chunks = math.ceil(hidden.shape[0] / 16)
    for old, tis, passes in [(None, 0.0, 1), (batch["old_logp"], 0.0, 2), (None, 2.0, 2)]:
        calls.clear()
        fused_run(hidden, weight, targets, dict(batch, old_logp=old), impl="torch", chunk_tokens=16, tis_cap=tis,
                  importance_sampling_level="sequence")
        assert len(calls) == passes * n_chunks, (old is None, tis, len(calls))


def test_fused_microbatches_sum_to_the_whole_batch():
    hidden, weight, targets, batch = make_fused_case(11)
    keep = (True, False, True, True, True, False)
    kwargs = dict(importance_sampling_level="sequence", tis_cap=2.0, beta=0.05, loss_type="dapo")
    cu = batch["cu_seqlens"].long()
    whole = fused_run(hidden, weight, targets, batch, sequence_mask=torch.tensor(keep), **kwargs)
    kept_tokens = sum(int(cu[i + 1] - cu[i]) for i in range(len(keep)) if keep[i])
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    total = 0.0
    for s0, s1 in [(0, 2), (2, 4), (4, 6)]:
        a, b = int(cu[s0]), int(cu[s1])
        part = {k: (None if v is None else v[a:b]) for k, v in batch.items() if k not in ("advantages", "cu_seqlens")}
        loss, *_ = fused_grpo_loss(h[a:b], w, targets[a:b], **part, advantages=batch["advantages"][s0:s1],
                                   cu_seqlens=cu[s0:s1 + 1] - a, sequence_mask=torch.tensor(keep[s0:s1]),
                                   num_sequences=sum(keep), num_tokens=kept_tokens, **kwargs)
        (loss * 1.3).backward()
        total += loss.item()
    assert total == pytest.approx(whole[0].item(), rel=1e-5)
    torch.testing.assert_close(h.grad.double(), whole[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad.double(), whole[2], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ errors name the valid values


def _small():
    b = make_batch(12, lengths=(2, 3))
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in b.items()}


@pytest.mark.parametrize("overrides,error,match", [
    ({"importance_sampling_level": "seq"}, ValueError,
     r"unknown importance_sampling_level 'seq'; valid: \['token', 'sequence'\]"),
    ({"loss_type": "gspo"}, ValueError, r"unknown loss_type 'gspo'; valid: \['bnpo', 'dapo', 'dr_grpo', 'grpo'\]"),
    ({"tis_cap": 2.0, "sampler_logp": None}, ValueError, r"tis_cap=2.0 > 0 needs sampler_logp"),
    ({"tis_cap": -1.0}, ValueError, r"tis_cap must be a finite number >= 0, got -1.0"),
    ({"tis_cap": 2.0, "sampler_logp": torch.zeros(4)}, ValueError, r"sampler_logp must have shape \(5,\), got \(4,\)"),
    ({"sequence_mask": torch.ones(2)}, TypeError, r"sequence_mask must be a bool tensor \[S\].*got torch.float32"),
    ({"sequence_mask": torch.ones(3, dtype=torch.bool)}, ValueError,
     r"sequence_mask must have shape \(2,\), got \(3,\)"),
    ({"sequence_mask": torch.tensor([True, False]), "num_sequences": 0}, ValueError,
     r"num_sequences must be >= 1, got 0"),
])
def test_bad_options_raise_clear_errors(overrides, error, match):
    args = {**_small(), **overrides}
    with pytest.raises(error, match=match):
        grpo_token_loss(**args)
    g = torch.Generator().manual_seed(0)
    hidden, weight, targets = torch.randn(5, 8, generator=g), torch.randn(20, 8, generator=g), torch.arange(5)
    args.pop("logp")
    with pytest.raises(error, match=match):
        fused_grpo_loss(hidden, weight, targets, **args)


# ------------------------------------------------------------------ Triton paths, under the interpreter


def triton_cases():
    """name -> (function, kwargs): the Triton impls with TIS folded into the advantages and the
    sequence level (torch segment sums on the Triton path)."""
    cases = {}
    for level in IMPORTANCE_SAMPLING_LEVELS:
        b = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
             for k, v in make_batch(13, weights=True).items()}
        cases[f"token_loss_{level}"] = ("grpo_token_loss", dict(
            b, importance_sampling_level=level, tis_cap=2.0, beta=0.04, loss_type="dapo", epsilon_high=0.28,
            sequence_mask=_mask()))
        hidden, weight, targets, fb = make_fused_case(14, h=45, v=300)
        cases[f"fused_{level}"] = ("fused_grpo_loss", dict(
            fb, hidden=hidden, weight=weight, targets=targets, importance_sampling_level=level, tis_cap=2.0,
            beta=0.04, sequence_mask=torch.tensor([True, True, True, False, True, True])))
    return cases


def _triton_worker(out_path):
    run_triton_cases(triton_cases(), out_path)


def run_triton_cases(cases: dict, out_path) -> None:
    """Run {name: (function name, kwargs)} on the Triton path (in a TRITON_INTERPRET=1 process) and
    save {name: results} to out_path (test_sampler_mask.py's worker uses it too)."""
    assert lp._KERNELS_INTERPRETED, "TRITON_INTERPRET=1 must be set before the kernels are imported"
    results = {}
    for name, (fn, kwargs) in cases.items():
        kwargs = dict(kwargs)
        if fn == "grpo_token_loss":
            results[name] = loss_and_grad(grpo_token_loss, kwargs, impl="triton")
        else:
            hidden, weight, targets = (kwargs.pop(k) for k in ("hidden", "weight", "targets"))
            results[name] = fused_run(hidden, weight, targets, kwargs, impl="triton")
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gspo_tis_triton") / "results.pt"
    run_under_interpreter(__file__, "--triton-worker", out, timeout=600)
    return torch.load(out)


@pytest.mark.skipif(lp.triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("name", sorted(triton_cases()))
def test_triton_paths_match_the_formula_under_interpreter(triton_results, name):
    fn, kwargs = triton_cases()[name]
    kwargs = dict(kwargs)
    got = triton_results[name]
    if fn == "grpo_token_loss":
        options = {k: kwargs.pop(k) for k in ("importance_sampling_level", "tis_cap", "beta", "loss_type",
                                              "epsilon_high", "sequence_mask")}
        double = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in kwargs.items()}
        want = loss_and_grad(plain_loss, double, **options)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-7)
        assert_metrics(got[2], want[2], tis=True, rel=1e-4, abs_=1e-6)
        return
    hidden, weight, targets = (kwargs.pop(k) for k in ("hidden", "weight", "targets"))
    want = float64_formula(hidden, weight, targets, kwargs)
    for g, t in zip(got[:3], want[:3]):
        assert (g - t).abs().max().item() <= 2e-5 * max(t.abs().max().item(), 1e-3)
    assert_metrics(got[3], want[3], tis=True, rel=1e-4, abs_=1e-5)


if __name__ == "__main__" and sys.argv[1:2] == ["--triton-worker"]:
    _triton_worker(sys.argv[2])
