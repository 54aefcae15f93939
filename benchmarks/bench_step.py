"""One whole GRPO step, phase by phase: rollout and rewards, reference/old log-probs, forward (packed
decoder + fused loss), backward, AdamW, weight sync, on the tiny random model (or
``FASTGRPO_BENCH_MODEL``), 4 prompts x 8 samples x up to 32 tokens of the built-in arithmetic task.

    pytest benchmarks/bench_step.py --benchmark-only

The step is fastgrpo.trainer.train's loop body (collect_groups -> group_advantages -> to_rollout -> grpo_update ->
sync_weights) with the transformers engine over the fp32 policy (no engine start, no weight copy),
timed by the same PhaseTimer and RSS probe as ``fastgrpo profile``. Each round is one step (the
weights move between rounds, as in training); extra_info holds per phase the median seconds and the
peak process RSS over the rounds, the tokens and tokens/s. Wall-clock is reported, never asserted.
"""

from __future__ import annotations

import statistics
import time

import torch

from fastgrpo.advantages import group_advantages
from fastgrpo.config import load_config
from fastgrpo.data.prompts import build_messages, encode_prompt
from fastgrpo.data.problems import load_training_data
from fastgrpo.data.sampling import make_sampler
from fastgrpo.model import load_policy, load_tokenizer
from fastgrpo.optim import build_optimizer
from fastgrpo.phases import PHASES, PhaseTimer
from fastgrpo.perf.profile import RssPeakProbe
from fastgrpo.rollout.hf import TransformersEngine
from fastgrpo.trainer import collect_groups, grpo_update

PROMPTS, SAMPLES, MAX_TOKENS, ROUNDS = 4, 8, 32, 3



def test_one_grpo_step(benchmark, model_dir):
    cfg = load_config(None, [f"model.path={model_dir}", "rollout.engine=transformers",
                             f"rollout.prompts_per_step={PROMPTS}", f"rollout.num_generations={SAMPLES}",
                             f"rollout.max_completion_length={MAX_TOKENS}", "data.num_train=200",
                             "eval.before_and_after=false"])
    device = torch.device("cpu")
    tokenizer = load_tokenizer(model_dir)
    policy = load_policy(model_dir, dtype=getattr(torch, cfg.model.dtype), device=device)
    optimizer = build_optimizer(policy.parameters(), cfg.train)
    sampler = make_sampler(cfg, load_training_data(cfg.data, seed=cfg.train.seed)[0])
    engine = TransformersEngine(policy, tokenizer, batch_size=PROMPTS * SAMPLES)
    probe = RssPeakProbe()
    timer = PhaseTimer(device, memory_probe=probe)
    rounds: list[dict] = []

    def encode(problems):
        return [encode_prompt(tokenizer, build_messages(p["problem"], cfg.data.template, cfg.data.one_shot))
                for p in problems]

    def step() -> None:
        started = time.perf_counter()
        batch = collect_groups(engine, sampler, encode, cfg, len(rounds) + 1, MAX_TOKENS, timer)
        rewards = torch.tensor(batch.rewards, dtype=torch.float32)
        advantages = group_advantages(rewards, cfg.rollout.num_generations, cfg.loss.scale_rewards)
        rollout = batch.to_rollout(advantages)
        grpo_update(policy, None, optimizer, rollout, cfg, device, timer, MAX_TOKENS)
        with timer.phase("sync"):
            engine.sync_weights(policy)
        completion = sum(len(c) for c in rollout.completions)
        rounds.append({"step_s": time.perf_counter() - started, "phase_s": timer.pop(), "peak": timer.pop_peaks(),
                       "completion_tokens": completion,
                       "trained_tokens": completion + sum(len(rollout.prompts[i]) for i in rollout.prompt_index)})

    try:
        benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    finally:
        probe.close()
        engine.close()
    measured = rounds[1:]  # the warm-up round is not part of the statistics
    median = lambda key: statistics.median(r[key] for r in measured)
    phase_s = {p: round(statistics.median(r["phase_s"].get(f"{p}_s", 0.0) for r in measured), 3) for p in PHASES}
    peak_mib = {p: round(max(r["peak"].get(p, 0) for r in measured) / 2**20) for p in PHASES}
    train_s = sum(phase_s[p] for p in ("forward", "backward", "optimizer"))
    benchmark.extra_info.update(
        model=model_dir.name, batch=f"{PROMPTS} prompts x {SAMPLES} samples x <= {MAX_TOKENS} tokens",
        phase_s=phase_s, peak_rss_mib=peak_mib, step_s=round(median("step_s"), 3),
        completion_tokens=median("completion_tokens"), trained_tokens=median("trained_tokens"),
        generated_tokens_per_s=round(median("completion_tokens") / phase_s["rollout"], 1),
        trained_tokens_per_s=round(median("trained_tokens") / train_s, 1) if train_s else None,
    )
    shares = " ".join(f"{p} {phase_s[p]:.2f}s/{peak_mib[p]}MiB" for p in PHASES)
    print(f"\none GRPO step ({model_dir.name}): {median('step_s'):.2f} s; {shares}")
    assert all(r["completion_tokens"] > 0 for r in rounds)
    assert set(peak_mib) == set(PHASES) and min(peak_mib.values()) > 0
