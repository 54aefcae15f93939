"""grpo_update with the loss options wired in: GSPO's sequence-level ratio, truncated importance
sampling against the sampler's log-probs or the sampler mask, and loss.mask_truncated, on the tiny
random model."""
from __future__ import annotations

import math

import pytest
import torch

from fastgrpo.config import load_config
from fastgrpo.model import load_policy, load_reference, packed_token_logprobs
from fastgrpo.optim import build_optimizer
from fastgrpo.packing import pack_sequences
from fastgrpo.batch import Rollout
from fastgrpo.trainer import grpo_update

CAP = 2.0


def _rollout(policy, truncated):
    """4 completions of 2 prompts. The sampler's log-probs sit 1.0 above the trainer's on every
    other token (weight e^-1, under the cap) and 1.0 below on the rest (e^1 > CAP: capped)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (5, 3)]
    completions = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (1, 6, 4, 7)]
    prompt_index = [0, 0, 1, 1]
    with torch.no_grad():
        logp = packed_token_logprobs(policy, pack_sequences([prompts[p] for p in prompt_index], completions))
    shift = torch.tensor([1.0 if t % 2 == 0 else -1.0 for t in range(logp.numel())])
    sampler = (logp + shift).tolist()
    per_sequence, start = [], 0
    for c in completions:
        per_sequence.append(sampler[start:start + len(c)])
        start += len(c)
    return Rollout(prompts, prompt_index, completions, per_sequence, torch.tensor([1.0, -1.0, 0.5, -0.5]),
                   truncated), shift


def _update(model_dir, truncated, *overrides, reference=None):
    cfg = load_config(None, [f"model.path={model_dir}", "loss.importance_sampling_level=sequence",
                             f"loss.tis_cap={CAP}", "loss.mask_truncated=true", "loss.epsilon_low=0.0003",
                             "loss.epsilon_high=0.0004", "train.learning_rate=1e-3", "train.warmup_steps=0",
                             "train.max_tokens_per_microbatch=4096", *overrides])
    policy = load_policy(model_dir)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    rollout, shift = _rollout(policy, truncated)
    stats = grpo_update(policy, reference, build_optimizer(policy.parameters(), cfg.train), rollout, cfg,
                        torch.device("cpu"))
    changed = any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    return stats, changed, rollout, shift


def test_gspo_tis_and_mask_truncated_through_grpo_update(tiny_model_dir):
    truncated = [False, True, False, True]
    stats, changed, rollout, shift = _update(tiny_model_dir, truncated)
    assert changed and math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    # TIS metrics over the kept sequences' tokens only (one micro-batch)
    kept = torch.cat([torch.full((len(c),), not t) for c, t in zip(rollout.completions, truncated)])
    w = torch.where(shift[kept] > 0, torch.tensor(math.exp(-1.0)), torch.tensor(CAP))
    assert stats["tis_clipped_frac"] == pytest.approx(float((shift[kept] < 0).double().mean()), abs=1e-6)
    assert stats["tis_weight_mean"] == pytest.approx(float(w.mean()), rel=1e-4)
    # one pass: the sequence ratios are 1, inside GSPO's band
    assert stats["clip_frac"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


def test_everything_truncated_and_masked_leaves_the_weights_unchanged(tiny_model_dir):
    stats, changed, _, _ = _update(tiny_model_dir, [True] * 4)
    assert stats["loss"] == 0.0 and stats["grad_norm"] == 0.0 and not changed
    # nothing kept, nothing to measure: the loss metrics say so (NaN, logged as null), not 0.0
    assert all(math.isnan(stats[name]) for name in ("ratio_mean", "ratio_min", "ratio_max", "kl_mean", "clip_frac"))
    stats, changed, _, _ = _update(tiny_model_dir, [True] * 4, "loss.mask_truncated=false")
    assert stats["grad_norm"] > 0 and changed


# A budget of 11 tokens puts each of the 4 sequences (6, 11, 7 and 10 tokens) in its own
# micro-batch, so the truncated ones (1 and 3) make micro-batches with no kept token.
ONE_SEQUENCE_EACH = ("rollout.max_completion_length=8", "train.max_tokens_per_microbatch=11")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_one_pass_logs_ratio_one_when_whole_micro_batches_are_masked(tiny_model_dir, level):
    stats, _, _, _ = _update(tiny_model_dir, [False, True, False, True], f"loss.importance_sampling_level={level}",
                             *ONE_SEQUENCE_EACH)
    # one pass: old == current, every ratio is exactly 1 and nothing is clipped
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert stats["ratio_min"] == pytest.approx(1.0, abs=1e-6) and stats["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert stats["clip_frac"] == 0.0 and stats["clip_low_frac"] == 0.0 and stats["clip_high_frac"] == 0.0


def _moved_reference(model_dir):
    reference = load_reference(model_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return reference


@pytest.mark.parametrize("level,correction", [("token", "tis"), ("sequence", "tis"), ("token", "sampler_mask")])
def test_masked_means_do_not_depend_on_how_the_batch_is_split(tiny_model_dir, level, correction):
    """kl_mean and the TIS / sampler-mask metrics are means over the kept tokens however many
    micro-batches hold them."""
    args = (tiny_model_dir, [False, True, False, True], f"loss.importance_sampling_level={level}", "loss.beta=0.1")
    names = ("tis_weight_mean", "tis_clipped_frac")
    if correction == "sampler_mask":
        args += ("loss.tis_cap=0", "loss.sampler_mask=sequence")
        names = ("sampler_weight_mean", "sampler_masked_frac")
    whole, _, _, _ = _update(*args, reference=_moved_reference(tiny_model_dir))
    split, _, _, _ = _update(*args, *ONE_SEQUENCE_EACH, reference=_moved_reference(tiny_model_dir))
    assert whole["kl_mean"] > 1e-4  # the moved reference gives the KL something to measure
    assert 0 < whole[names[1]] < 1  # the correction caps or masks some kept tokens, not all
    for name in ("kl_mean", *names, "ratio_mean", "ratio_min", "ratio_max", "clip_frac"):
        assert split[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-7), name


def _sequence_log_ratios(rollout, shift):
    """[tokens] each token's sequence's sum of log(p_trainer / p_sampler) = -shift (the sampler sits
    `shift` above the trainer)."""
    out, start = [], 0
    for c in rollout.completions:
        out += [-float(shift[start:start + len(c)].sum())] * len(c)
        start += len(c)
    return torch.tensor(out)


def test_sequence_sampler_mask_through_grpo_update(tiny_model_dir):
    """loss.sampler_mask=sequence reaches the loss: the kept sequences 0 (one token, sum -1: outside
    [-log 2, log 2], masked) and 2 (sum 0: kept, weight 1) give the metrics over their 5 tokens."""
    truncated = [False, True, False, True]
    stats, changed, rollout, shift = _update(tiny_model_dir, truncated, "loss.tis_cap=0", "loss.sampler_mask=sequence",
                                             "loss.sampler_mask_cap=2.0")
    assert changed and math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    assert "tis_weight_mean" not in stats
    kept = torch.cat([torch.full((len(c),), not t) for c, t in zip(rollout.completions, truncated)])
    log_ratio = _sequence_log_ratios(rollout, shift)[kept]
    inside = log_ratio.abs() <= math.log(2.0)
    assert 0 < inside.sum() < inside.numel()  # the case masks a sequence and keeps one
    assert stats["sampler_masked_frac"] == pytest.approx(float((~inside).double().mean()), abs=1e-6)
    want = torch.where(inside, log_ratio.exp(), torch.zeros(()))
    assert stats["sampler_weight_mean"] == pytest.approx(float(want.mean()), rel=1e-4)


def test_token_sampler_mask_and_its_cap_through_grpo_update(tiny_model_dir):
    """Every token's log ratio is +-1: a cap of 2 masks them all (no policy gradient, no update with
    beta 0), a cap of 3 keeps them all with weights e^-1 and e^1."""
    masked_all, changed, _, _ = _update(tiny_model_dir, [False] * 4, "loss.tis_cap=0", "loss.sampler_mask=token",
                                        "loss.sampler_mask_cap=2.0")
    assert masked_all["sampler_masked_frac"] == 1.0 and masked_all["sampler_weight_mean"] == 0.0
    assert masked_all["grad_norm"] == 0.0 and not changed
    kept_all, changed, _, shift = _update(tiny_model_dir, [False] * 4, "loss.tis_cap=0", "loss.sampler_mask=token",
                                          "loss.sampler_mask_cap=3.0")
    assert kept_all["sampler_masked_frac"] == 0.0 and changed
    assert kept_all["sampler_weight_mean"] == pytest.approx(float((-shift).exp().mean()), rel=1e-4)


def test_a_run_with_the_sequence_mask_logs_its_metrics(tiny_model_dir, tmp_path):
    """train() passes loss.sampler_mask through: metrics.jsonl holds the mask's metrics (and not
    TIS's). The transformers engine samples with the trainer's own fp32 weights, so nothing is masked."""
    import json

    from helpers.trainer_setup import tiny_config

    from fastgrpo.trainer import train

    train(tiny_config(tiny_model_dir, tmp_path, "transformers", "loss.sampler_mask=sequence", "loss.sampler_mask_cap=1.5",
                      "train.max_steps=1", "eval.before_and_after=false"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "sampler_masked_frac" in r]
    assert [r["step"] for r in steps] == [1] and not any("tis_weight_mean" in r for r in records)
    assert steps[0]["sampler_masked_frac"] == 0.0 and steps[0]["sampler_weight_mean"] == pytest.approx(1.0, abs=1e-3)
