"""The GRPO loop, top to bottom: rollout -> reward -> advantage -> pack -> log-probs -> loss -> step
-> sync -> log -> checkpoint.

Algorithm choices, each a config key (fastgrpo/config/schema.py holds every default):
- rollout: ``rollout.num_generations`` (G) samples for each of ``rollout.prompts_per_step`` prompts,
  from an in-process vLLM engine (``rollout.engine``) that keeps the sampler's log-probs, sampled
  in step or up to ``rollout.max_staleness`` steps ahead by a producer thread (fastgrpo/producer.py); with
  ``rollout.dynamic_sampling_rounds`` groups whose rewards all agree are replaced by fresh prompts
  (DAPO), and ``rollout.length_stages`` raises the length limit at given steps (DeepScaleR);
- reward: a weighted sum of registered rewards (``reward_weights: {accuracy: 1.0, format: 0.5}``), graded in
  worker processes with a time bound per answer (fastgrpo/rewards/grader.py);
- advantage: group-relative, ``(r - mean) / std`` with the std of the group, of the batch, or none
  (``loss.scale_rewards``), one value per completion;
- objective: the clipped ratio with ``loss.epsilon_low/high``, per token or per sequence (GSPO,
  ``loss.importance_sampling_level``), k3 KL to a frozen reference when ``loss.beta > 0`` (no
  reference model is loaded otherwise), aggregated by ``loss.loss_type``; optional truncated
  importance weights against the engine's sampler (``loss.tis_cap``) or masking of the tokens or
  sequences the sampler and the trainer disagree on (``loss.sampler_mask``), and masking of
  truncated completions (``loss.mask_truncated``);
- ``train.num_iterations`` optimizer passes over one rollout; log-probs before the first pass are
  the "old" ones (with one pass, the ratio is 1 and only its gradient matters);
- sequences are packed without padding into micro-batches of at most
  ``train.max_tokens_per_microbatch`` tokens; each micro-batch's loss is normalized over the whole
  batch, so accumulating gradients gives the gradient of the global loss;
- log-probs, the loss and its gradient w.r.t. the final hidden states and the LM-head weight come
  from one fused pass (``fused_grpo_loss``): the [tokens x vocab] logits are never built.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastgrpo import checkpoint as ckpt
from fastgrpo import distributed
from fastgrpo import lora
from fastgrpo.attention import set_attention_backend
from fastgrpo.config import Config, ConfigError, to_dict
from fastgrpo.data.prompts import build_messages, encode_prompt
from fastgrpo.eval.evaluate import evaluate
from fastgrpo.eval.suite import eval_settings, load_suite, run_suite, suite_metrics, write_report
from fastgrpo.rewards.grader import shared_grader
from fastgrpo.kernels import fused_grpo_loss
from fastgrpo.kernels.grpo_loss import RATIO_UNIT_METRIC_NAMES
from fastgrpo.advantages import group_advantages
from fastgrpo.batch import Rollout, StepBatch
from fastgrpo.metrics import MetricsLogger, roll_back_metrics
from fastgrpo.data.sampling import make_sampler
from fastgrpo.model import (apply_liger_patches, lm_head_weight, load_policy, load_reference, load_tokenizer,
                            packed_hidden_states, packed_token_logprobs, resolve_model_path)
from fastgrpo.optim import build_optimizer, build_scheduler
from fastgrpo.phases import PhaseTimer
from fastgrpo.preflight import check_run
from fastgrpo.producer import RolloutProducer, staleness_metrics
from fastgrpo.rewards import RewardBatch, combine_reward_metrics, compute_rewards
from fastgrpo.rollout import make_engine
from fastgrpo.shared_prefix import pack_microbatch, plan_step_microbatches

log = logging.getLogger("fastgrpo")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (a failure it cannot train through); the message says how to go on."""


def completion_limit(cfg: Config, step: int) -> int:
    """The completion-length limit at ``step``: the last ``rollout.length_stages`` stage that has
    begun (DeepScaleR's iterative lengthening), else ``rollout.max_completion_length``."""
    limit = cfg.rollout.max_completion_length
    for from_step, length in sorted(cfg.rollout.length_stages):
        if step >= from_step:
            limit = length
    return limit


def longest_completion(cfg: Config) -> int:
    """The longest completion any stage asks for: the rollout engine is sized for it once."""
    return max([cfg.rollout.max_completion_length, *(length for _, length in cfg.rollout.length_stages)])


def collect_groups(engine, sampler, encode, cfg: Config, step: int, max_tokens: int, timer: PhaseTimer) -> StepBatch:
    """Sample and reward ``rollout.prompts_per_step`` groups of G completions.

    With DAPO dynamic sampling (``rollout.dynamic_sampling_rounds`` > 0), a group whose rewards all
    agree has zero advantage everywhere and no policy-gradient signal: such groups are set aside and
    fresh prompts are drawn, at most that many extra rounds. If the rounds run out, set-aside groups
    fill the batch so its size (and the cost of a step) stays fixed.
    """
    G, want, rounds = cfg.rollout.num_generations, cfg.rollout.prompts_per_step, cfg.rollout.dynamic_sampling_rounds
    informative: list[tuple] = []
    flat: list[tuple] = []
    rewarded: list[RewardBatch] = []  # every round's: the step's reward metrics cover all it graded
    drawn = 0
    for round_ in range(rounds + 1):
        problems = next(sampler)
        prompts = encode(problems)
        with timer.phase("rollout"):
            samples = engine.generate(prompts, n=G, max_tokens=max_tokens, temperature=cfg.rollout.temperature,
                                      top_p=cfg.rollout.top_p, seed=cfg.train.seed * 100_003 + step + round_ * 1_000_003)
        texts = [s.text for s in samples]
        answers = [problems[s.prompt_index]["answer"] for s in samples]
        with timer.phase("reward"):
            rewarded.append(compute_rewards(
                cfg.reward_weights, texts, answers, settings=cfg.reward_params, max_completion_length=max_tokens,
                completion_lengths=[len(s.token_ids) for s in samples],
                truncated=[s.finish_reason == "length" for s in samples]))
        rewards, per_reward = rewarded[-1].totals, rewarded[-1].per_reward
        drawn += len(problems)
        for j, prompt in enumerate(prompts):
            sl = slice(j * G, (j + 1) * G)
            group = (prompt, samples[sl], rewards[sl], {k: v[sl] for k, v in per_reward.items()})
            agree = max(group[2]) - min(group[2]) <= 1e-6
            (flat if rounds and agree else informative).append(group)
        if not rounds or len(informative) >= want:
            break
    groups = (informative + flat)[:want] if rounds else informative
    batch = StepBatch([], [], [], {k: [] for k in groups[0][3]}, reward_metrics=combine_reward_metrics(rewarded))
    for j, (prompt, group_samples, group_rewards, group_per_reward) in enumerate(groups):
        batch.prompts.append(prompt)
        batch.samples.extend(dataclasses.replace(s, prompt_index=j) for s in group_samples)
        batch.rewards.extend(group_rewards)
        for k, v in group_per_reward.items():
            batch.per_reward[k].extend(v)
    if rounds:
        batch.stats = {"dynamic_flat_frac": len(flat) / drawn, "dynamic_prompts_drawn": float(drawn),
                       "dynamic_flat_in_batch": float(max(0, want - len(informative)))}
    return batch


def save_on_failure(out: Path, step: int, policy, tokenizer, optimizer, scheduler, resume_state: dict, cfg: Config) -> str:
    """Checkpoint the last finished step after a failure, unless it is saved already; says what it did.
    resume_state: the producer's checkpoint_state(step) (data sampler, rollouts sampled ahead)."""
    latest = ckpt.latest_checkpoint(out)
    if step < 1 or (latest is not None and latest.name == f"checkpoint-{step}"):
        return f"the newest checkpoint is {latest}" if latest else "no step had finished, nothing to save"
    try:
        path = distributed.save_checkpoint(out, step, policy, tokenizer, optimizer, scheduler,
                                           {**resume_state, "config": to_dict(cfg)}, keep_last=cfg.log.keep_last)
    except Exception as exc:  # the original failure matters more than this one
        log.error("could not save a checkpoint after the failure: %s", exc)
        return f"saving a checkpoint failed too ({exc}); the newest is {latest}"
    return f"step {step} was saved to {path}"


def train(cfg: Config, resume: bool = False, timer: PhaseTimer | None = None) -> dict[str, Any]:
    """Run GRPO as configured; return the final metrics (held-out accuracy before/after included).

    ``timer`` times the phases of each step (``fastgrpo profile`` passes one that also tracks memory).
    """
    shape = check_run(cfg)  # rewards, data, model folder and lengths: one clear error before any model loads
    out = Path(cfg.log.output_dir)
    if not resume and ckpt.latest_checkpoint(out) is not None:
        raise ConfigError(f"log.output_dir={str(out)!r} holds checkpoints of an earlier run: continue it with "
                          f"`fastgrpo train --resume {out}`, or choose another --output-dir", key="log.output_dir")
    distributed.setup(cfg)  # several ranks under torchrun, else a no-op
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    train_problems, eval_problems = shape.train_problems, shape.held_out_problems  # read once, by preflight
    # Benchmarks evaluated with the held-out split: loaded now so that a bad name fails before any model loads.
    suite = load_suite(cfg.eval.suite, cfg.data.data_dir, limit=cfg.eval.suite_limit) if cfg.eval.suite else []
    device = pick_device()
    timer = timer or PhaseTimer(device)

    model_dir = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    start = latest = ckpt.latest_checkpoint(out) if resume else None
    if resume and latest is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint-<step> folder in {out}")
    tokenizer = load_tokenizer(model_dir)
    dtype = getattr(torch, cfg.model.dtype)
    set_attention_backend(cfg.model.attention)
    # With LoRA a checkpoint holds the adapter only: the base comes from model.path every time.
    adapters = cfg.lora.rank > 0
    policy = load_policy(model_dir if adapters else (latest or model_dir), dtype=dtype, device=device,
                         gradient_checkpointing=cfg.model.gradient_checkpointing, lora=cfg.lora, adapter_dir=latest)
    if cfg.model.liger:
        apply_liger_patches(policy)
    policy = distributed.shard_model(policy)  # FSDP2 over the ranks; one process: unchanged
    if adapters:  # the KL reference is the policy with its adapters off: no second model
        reference = lora.reference_view(policy) if cfg.loss.beta > 0 else None
    else:
        reference = distributed.shard_model(load_reference(model_dir, dtype=dtype, device=device)) if cfg.loss.beta > 0 else None
    optimizer = build_optimizer(policy.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    sampler = make_sampler(cfg, train_problems)
    first_step, pending_rollouts = 1, []
    if start is not None:
        state = distributed.load_training_state(start, policy, optimizer, scheduler)  # from any world size
        sampler.load_state_dict(state["sampler"])
        pending_rollouts = state.get("pending_rollouts", [])  # sampled ahead with rollout.max_staleness > 0
        first_step = state["step"] + 1
        log.info("resumed from %s at step %d", start, state["step"])
        if distributed.is_main() and roll_back_metrics(out, state["step"]):  # steps after the checkpoint run again: each is logged once
            log.warning("records of steps after %d moved to %s", state["step"], out / "metrics.rolled_back.jsonl")

    def prompt_ids_of(problems: list[dict]) -> list[list[int]]:
        return [encode_prompt(tokenizer, build_messages(p["problem"], cfg.data.template, cfg.data.one_shot)) for p in problems]

    # The engine is sized once for the longest prompt of any split (preflight measured it) plus the
    # longest completion of any length stage or evaluation, within the model's own limit.
    longest_prompt = shape.longest_prompt or max(len(ids) for ids in prompt_ids_of(train_problems[:256] + eval_problems[:256]))
    max_model_len = cfg.rollout.max_model_len or longest_prompt + 64 + max(longest_completion(cfg), cfg.eval.max_completion_length or 0)
    if shape.model_max_length:
        max_model_len = min(max_model_len, shape.model_max_length)
    # With rollouts sampled while the trainer trains, the transformers engine needs its own copy of
    # the model (make_engine loads one from model_path when model is None); sync_weights fills it.
    own_copy = cfg.rollout.max_staleness > 0 and cfg.rollout.mode == "colocate"
    engine = make_engine(
        cfg.rollout.engine, model_path=str(model_dir if adapters else (latest or model_dir)),
        model=None if own_copy else policy, tokenizer=tokenizer,
        dtype=cfg.rollout.dtype, seed=cfg.train.seed,
        max_model_len=max_model_len,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        enable_sleep_mode=cfg.rollout.enable_sleep_mode, cpu_kvcache_gb=cfg.rollout.cpu_kvcache_gb,
        lora_rank=cfg.lora.rank if adapters and cfg.lora.sync == "adapter" else 0,  # vLLM serves the adapter itself
        mode=cfg.rollout.mode, server_host=cfg.rollout.server_host, server_port=cfg.rollout.server_port,
        server_group_port=cfg.rollout.server_group_port, server_timeout_s=cfg.rollout.server_timeout_s,
    )
    # The engine started from the base model (it gets the saved adapter), or the transformers engine
    # loaded its own copy from model_path (a server gets the weights when the RemoteEngine connects).
    if (start is not None and adapters) or (own_copy and cfg.rollout.engine == "transformers"):
        engine.sync_weights(policy)
    if start is not None:
        # vLLM seeds the global generators when it starts: the checkpoint's RNG state goes back after it.
        ckpt.set_rng_state(torch.load(start / "rng.pt", weights_only=True))
    logger = MetricsLogger(out, tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb, config=to_dict(cfg)) if distributed.is_main() else distributed.NullLogger()
    summary: dict[str, Any] = {}
    producer = None
    try:
        if cfg.eval.before_and_after and start is None:
            summary["eval_before"] = run_eval(engine, tokenizer, eval_problems, cfg, step=0, logger=logger, tag="before", suite=suite)

        # 1.-2. rollouts and rewards come from the producer: sampled here, step by step (k = 0), or by
        # a thread that samples up to rollout.max_staleness steps ahead (fastgrpo/producer.py).
        def collect(step: int, phase_timer: PhaseTimer) -> StepBatch:
            return collect_groups(engine, sampler, prompt_ids_of, cfg, step, completion_limit(cfg, step), phase_timer)

        producer = RolloutProducer(engine, collect, sampler, max_staleness=cfg.rollout.max_staleness,
                                   first_step=first_step, last_step=cfg.train.max_steps, timer=timer,
                                   # host-side times: a device sync in the producer thread would wait
                                   # for the trainer's kernels on a shared GPU
                                   pending=pending_rollouts, producer_timer=PhaseTimer("cpu"))
        bar = tqdm(range(first_step, cfg.train.max_steps + 1), desc="GRPO", unit="step", dynamic_ncols=True,
                   disable=not distributed.is_main())
        nonfinite_in_a_row = 0
        for step in bar:
            t_step = time.perf_counter()
            max_tokens = completion_limit(cfg, step)
            try:
                # 1.-2. rollout (G completions per prompt, with the sampler's log-probs) and rewards
                produced, rollout_wait_s = producer.next_batch(step)
            except Exception as exc:  # RolloutFailed from the producer thread among them
                # Nothing of this step has touched the weights: the last finished step is saved.
                saved = save_on_failure(out, step - 1, policy, tokenizer, optimizer, scheduler,
                                        producer.checkpoint_state(step - 1), cfg)
                raise TrainingStopped(f"rollout or grading failed at step {step} ({type(exc).__name__}: {exc}); "
                                      f"{saved}. Continue with: fastgrpo train --resume {out}") from exc
            batch = produced.batch
            samples = batch.samples
            # 3. group-relative advantage, one value per completion
            reward_t = torch.tensor(batch.rewards, dtype=torch.float32)
            advantages = group_advantages(reward_t, cfg.rollout.num_generations, cfg.loss.scale_rewards)
            rollout = batch.to_rollout(advantages)

            # 4.-6. pack, log-probs, loss, optimizer step(s)
            with producer.training():
                stats = grpo_update(policy, reference, optimizer, rollout, cfg, device, timer, max_tokens)
                scheduler.step()

            # 7. the rollout engine gets the new weights in place (with k > 0 once step + k is sampled)
            try:
                with timer.phase("sync"):
                    sync_wait_s = producer.sync(policy, step)
            except Exception as exc:
                # The update is done and the sampler has moved on: this step is complete but unlogged.
                saved = save_on_failure(out, step, policy, tokenizer, optimizer, scheduler, producer.checkpoint_state(step), cfg)
                raise TrainingStopped(f"the weight sync to the rollout engine failed at step {step} "
                                      f"({type(exc).__name__}: {exc}); {saved}. Continue with: fastgrpo train --resume {out}") from exc

            # 8. log
            n_tokens = sum(len(c) for c in rollout.completions)
            step_s = time.perf_counter() - t_step
            phase_s = timer.pop()
            overlap = {}
            if producer.threaded:  # the producer's own phases, and who waited for whom
                phase_s.update(produced.phase_s)
                phase_s["sync_s"] -= sync_wait_s
                overlap = {"rollout_wait_s": rollout_wait_s, "sync_wait_s": sync_wait_s,
                           "producer_wait_s": produced.producer_wait_s}
            train_s = sum(phase_s.get(f"{p}_s", 0.0) for p in ("reference", "old_logprobs", "forward", "backward", "optimizer"))
            per_reward = batch.per_reward
            record = {
                "step": step,
                "reward_mean": reward_t.mean().item(),
                "reward_std": reward_t.std().item(),
                **{f"reward_{k}": sum(v) / len(v) for k, v in per_reward.items()},
                **batch.reward_metrics,  # grader_timeouts/_crashes/_errors, reward_failures_<name>, lang_drift_frac
                "accuracy": _mean(per_reward.get("accuracy")),
                "format_rate": _mean(per_reward.get("format")),
                "completion_len_mean": n_tokens / len(rollout.completions),
                "truncated_frac": sum(rollout.truncated) / len(samples),
                "max_completion_length": max_tokens,
                **batch.stats,
                **staleness_metrics(produced, step),
                **overlap,
                **stats,  # lr among them: the rate this step's update used
                **phase_s, "train_s": train_s, "step_s": step_s,
                "completion_tokens": n_tokens,
                "tokens_per_s": n_tokens / step_s,
            }
            if cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0 and step != cfg.train.max_steps:
                with producer.engine_lock():
                    record.update(run_eval(engine, tokenizer, eval_problems, cfg, step=step, logger=None, tag="during", suite=suite))
            logger.log(record)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record['accuracy']:.2f}",
                            step_s=f"{step_s:.1f}", sync_s=f"{phase_s['sync_s']:.2f}")

            # 9. checkpoint; a run whose updates keep coming out non-finite stops here with one
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if stats["skipped_steps"] else 0
            if nonfinite_in_a_row >= cfg.train.max_consecutive_nonfinite:
                distributed.save_checkpoint(out, step, policy, tokenizer, optimizer, scheduler,
                                            {**producer.checkpoint_state(step), "config": to_dict(cfg)}, keep_last=cfg.log.keep_last)
                raise TrainingStopped(
                    f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (train.max_consecutive_nonfinite="
                    f"{cfg.train.max_consecutive_nonfinite}); weights are those of the last finite update, saved in "
                    f"{out}/checkpoint-{step}. Lower train.learning_rate or check the data, then --resume {out}")
            if step % cfg.log.checkpoint_every == 0 or step == cfg.train.max_steps:
                distributed.save_checkpoint(out, step, policy, tokenizer, optimizer, scheduler,
                                            {**producer.checkpoint_state(step), "config": to_dict(cfg)}, keep_last=cfg.log.keep_last)

        producer.close()
        if cfg.eval.before_and_after:
            summary["eval_after"] = run_eval(engine, tokenizer, eval_problems, cfg, step=cfg.train.max_steps, logger=logger, tag="after", suite=suite)
    finally:
        if producer is not None:
            producer.close()  # the thread finishes the generation it is in, then stops
        logger.close()
        try:
            engine.close()
        except Exception as exc:  # never hide the error that ended the run
            log.error("closing the rollout engine failed: %s", exc)
        distributed.teardown()
    return summary


def grpo_update(policy, reference, optimizer, rollout: Rollout, cfg: Config, device: torch.device,
                timer: PhaseTimer | None = None, max_completion_length: int | None = None) -> dict[str, float]:
    """``train.num_iterations`` optimizer steps on one rollout; returns the step's training metrics."""
    timer = timer or PhaseTimer(device)
    # The loss is normalized by the global batch's counts; with several ranks each trains on its share
    # (whole rollout on one process) and FSDP2 sums the gradients.
    # loss.mask_truncated: truncated completions are as if absent, in the loss and in its normalizers.
    kept = [i for i, cut in enumerate(rollout.truncated) if not (cfg.loss.mask_truncated and cut)]
    n_seqs = max(1, len(kept))
    n_tokens = max(1, sum(len(rollout.completions[i]) for i in kept))
    all_tokens = max(1, sum(len(c) for c in rollout.completions))  # entropy and mismatch: over every token
    # The loss metrics are means over what the loss kept: kept tokens, or the ratio's units (kept
    # sequences with a token, at the sequence level); see _metric_counts.
    sequence_level = cfg.loss.importance_sampling_level == "sequence"
    kept_counts = _metric_counts(rollout, kept, sequence_level)
    shared = cfg.train.shared_prefix  # shared-prompt groups: each prompt packed once per group
    rollout = distributed.local_rollout(rollout, whole_groups=shared)
    lengths = [len(rollout.prompts[p]) + len(c) for p, c in zip(rollout.prompt_index, rollout.completions)]
    plans = distributed.same_microbatch_count(
        plan_step_microbatches(rollout.prompts, rollout.prompt_index, rollout.completions,
                               cfg.train.max_tokens_per_microbatch, shared), lengths)
    n_microbatches = len(plans) * distributed.world_size()
    batches = [pack_microbatch(rollout.prompts, rollout.prompt_index, rollout.completions, idx, shared).to(device)
               for idx in plans]
    temperature = cfg.rollout.temperature
    lo = cfg.loss

    # Log-probs that stay fixed over the passes: the reference's (beta > 0) and the "old" policy's
    # (only needed when more than one pass reuses the rollout; with one pass old == current).
    with torch.no_grad(), timer.phase("reference"):
        ref_logps = [packed_token_logprobs(reference, b, temperature) for b in batches] if reference is not None else None
    with torch.no_grad(), timer.phase("old_logprobs"):
        old_logps = [packed_token_logprobs(policy, b, temperature) for b in batches] if cfg.train.num_iterations > 1 else None

    stats: dict[str, float] = {}
    for it in range(cfg.train.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        mismatch_sum, entropy_sum, loss_total = 0.0, 0.0, 0.0
        for k, (idx, batch) in enumerate(zip(plans, batches)):
            # The sampler's log-probs of these completion tokens: the truncated-IS weights (tis_cap > 0)
            # or the sampler mask's (loss.sampler_mask) and, on the first pass, the logprob_mismatch
            # metric. Truncated completions get no loss when loss.mask_truncated (DAPO's overlong filtering).
            sampler_lp = torch.tensor([x for i in idx for x in rollout.sampler_logprobs[i]], dtype=torch.float32,
                                      device=device)
            keep = torch.tensor([not rollout.truncated[i] for i in idx], device=device) if lo.mask_truncated else None
            # One pass over the LM head: log-probs, loss and the gradients w.r.t. the hidden states
            # and the head weight (3 matmuls, logits never materialized), then backward through the model.
            with timer.phase("forward"):
                loss, logp, entropy, metrics = fused_grpo_loss(
                    packed_hidden_states(policy, batch), lm_head_weight(policy), batch.targets,
                    old_logps[k] if old_logps else None, ref_logps[k] if ref_logps else None,
                    rollout.advantages[idx].to(device), batch.completion_cu_seqlens, temperature=temperature,
                    loss_type=lo.loss_type, epsilon_low=lo.epsilon_low, epsilon_high=lo.epsilon_high, beta=lo.beta,
                    max_completion_length=max_completion_length or cfg.rollout.max_completion_length,
                    num_sequences=n_seqs, num_tokens=n_tokens, num_microbatches=n_microbatches, return_entropy=True,
                    importance_sampling_level=lo.importance_sampling_level, sampler_logp=sampler_lp,
                    tis_cap=lo.tis_cap, sequence_mask=keep, advantage_level="sequence",
                    sampler_mask=lo.sampler_mask, sampler_mask_cap=lo.sampler_mask_cap,
                )
            with timer.phase("backward"):
                loss.backward()
            loss_total += loss.item()
            kept_here = [i for i in idx if not (lo.mask_truncated and rollout.truncated[i])]
            _accumulate(sums, metrics, _metric_counts(rollout, kept_here, sequence_level))
            entropy_sum += entropy.sum().item()
            if it == 0:
                # The rollout was sampled with exactly these weights: any gap is sync or numerics.
                mismatch_sum += (logp - sampler_lp).abs().sum().item()
        sums, loss_total, entropy_sum, mismatch_sum = distributed.reduce_step_sums(sums, loss_total, entropy_sum, mismatch_sum)
        with timer.phase("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.max_grad_norm).item()
            if math.isfinite(grad_norm) and math.isfinite(loss_total):
                optimizer.step()
                stats["skipped_steps"] = stats.get("skipped_steps", 0.0)
            else:
                log.warning("non-finite loss (%s) or grad norm (%s): update skipped", loss_total, grad_norm)
                stats["skipped_steps"] = stats.get("skipped_steps", 0.0) + 1
        if it == 0:
            stats.update(_finish_metrics(sums, kept_counts))
            # The caller steps the scheduler after this update: the rate read now is the one it used.
            stats.update(loss=loss_total, grad_norm=grad_norm, entropy_mean=entropy_sum / all_tokens,
                         logprob_mismatch=mismatch_sum / all_tokens, lr=optimizer.param_groups[0]["lr"])
    optimizer.zero_grad(set_to_none=True)
    return stats


def run_eval(engine, tokenizer, problems, cfg: Config, *, step: int, logger: MetricsLogger | None, tag: str,
             suite: list | None = None) -> dict[str, float]:
    """Held-out accuracy, and ``eval.suite``'s benchmarks, with the engine's current weights; logged
    as ``eval_*`` and ``eval_<set>_pass@k`` metrics. The suite's per-problem records (completions,
    extracted answers, correctness) and tables go to ``<log.output_dir>/eval/step-<step>/``."""
    if not distributed.is_main():
        return {}  # rank 0 evaluates (the rollout server serves it alone), logs and writes the reports
    t0 = time.perf_counter()
    settings = dict(samples=cfg.eval.samples, max_tokens=cfg.eval.max_completion_length or cfg.rollout.max_completion_length,
                    temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, template=cfg.data.template,
                    one_shot=cfg.data.one_shot, seed=cfg.train.seed)
    result = evaluate(engine, tokenizer, problems, **settings,
                      grader=shared_grader(cfg.reward_params.grader_workers, cfg.reward_params.grader_timeout_s))
    metrics = {f"eval_{k}": v for k, v in result.items() if isinstance(v, (int, float))}
    if suite:
        suite_results = run_suite(engine, tokenizer, suite, eval_settings(**settings))
        metrics.update(suite_metrics(suite_results))
        write_report(Path(cfg.log.output_dir) / "eval" / f"step-{step}", suite_results, {"step": step, "tag": tag, **settings})
    metrics["eval_s"] = time.perf_counter() - t0
    log.info("held-out accuracy %s step %d: %s", tag, step, {k: round(v, 4) for k, v in metrics.items()})
    if logger is not None:
        logger.log({"step": step, "eval": tag, **metrics})
    return metrics


def _metric_counts(rollout: Rollout, kept, sequence_level: bool) -> tuple[int, int]:
    """(kept tokens, kept ratio units) of the sequences ``kept``: what the loss metrics are means over.
    Units are tokens at the token level and sequences with a token at the sequence level (GSPO)."""
    tokens = sum(len(rollout.completions[i]) for i in kept)
    return tokens, (sum(1 for i in kept if rollout.completions[i]) if sequence_level else tokens)


def _accumulate(sums: dict[str, float], metrics: dict[str, float], counts: tuple[int, int]) -> None:
    """Add one micro-batch's loss metrics: each mean times what it is a mean over (``counts``: its
    kept tokens and ratio units), so that masked tokens weigh nothing; running max/min of the
    extremes over micro-batches that kept a unit (an empty one reports 0.0 there: skipped)."""
    tokens, units = counts
    for name, value in metrics.items():
        if name.endswith(("_max", "_min")):
            pick, none = (max, -math.inf) if name.endswith("_max") else (min, math.inf)
            sums[name] = pick(sums.get(name, none), value if units else none)
        else:
            sums[name] = sums.get(name, 0.0) + value * (units if name in RATIO_UNIT_METRIC_NAMES else tokens)


def _finish_metrics(sums: dict[str, float], counts: tuple[int, int]) -> dict[str, float]:
    """The step's loss metrics from the summed ``_accumulate`` sums and the global kept counts; NaN
    when the loss kept nothing (every completion masked)."""
    tokens, units = counts
    out = {}
    for name, value in sums.items():
        if name.endswith(("_max", "_min")):
            out[name] = value if math.isfinite(value) else math.nan
        else:
            count = units if name in RATIO_UNIT_METRIC_NAMES else tokens
            out[name] = value / count if count else math.nan
    return out


def _mean(values: list[float] | None) -> float:
    return sum(values) / len(values) if values else float("nan")
