"""Measured training peaks on CPU, to check fastgrpo.perf.plan's formulas against real allocations.

torch.profiler with ``profile_memory=True`` records every CPU allocation and free together with
the allocator's running total of the bytes allocated since memory profiling began. Unlike RSS it is
exact: it does not depend on when the C library hands pages back to the OS. One caveat shapes both
measurements below: a free of a tensor allocated *before* the profiler started is not reported, so
the measured code must not free tensors that existed when it began (no ``zero_grad(set_to_none=True)``
inside), or the running total overstates what is alive.

- measure_training_peak: a randomly initialized Hugging Face model of a plan shape, naive log-probs
  (full logits), one micro-batch and a fused AdamW step (tests/test_plan.py).
- measure_trainer_micro_batch: a real model folder through the trainer's own calls (packed forward
  with fastgrpo's varlen attention, fused_grpo_loss with entropy, backward, gradient clipping,
  AdamW), with the peak of each part (tests/test_plan_validation.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastgrpo.perf.plan import DTYPE_BYTES, GpuSpec, activation_bytes, loss_working_set_bytes, plan_memory, step_peak_bytes
from fastgrpo.perf.shapes import ModelShape, model_shape

# record_function ranges whose names start with this are measured windows
WINDOW_PREFIX = "peak::"


@dataclass(frozen=True)
class Window:
    """Bytes allocated above the profile's start: when the window opened, its maximum, when it closed."""

    start: int
    peak: int
    end: int


def allocation_windows(fn: Callable[[], None]) -> tuple[int, dict[str, Window]]:
    """Run fn under torch.profiler's memory tracking. Returns (the largest net allocation over the
    whole run, {label: Window}) for every ``record_function(WINDOW_PREFIX + label)`` range fn opened
    (a label seen twice keeps its last range). Bytes are net of what was allocated when fn began."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations, ranges = [], {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.total_allocated))
        elif event.name.startswith(WINDOW_PREFIX):
            ranges[event.name[len(WINDOW_PREFIX):]] = (event.start_time_ns, event.end_time_ns)
        stack.extend(event.children)
    if not allocations:
        return 0, {name: Window(0, 0, 0) for name in ranges}
    allocations.sort()
    # The running total carries over from earlier profiling sessions in this process: subtract the
    # level just before the first event.
    base = allocations[0][2] - allocations[0][1]
    totals = [(ts, total - base) for ts, _, total in allocations]
    windows = {}
    for name, (begin, finish) in ranges.items():
        before = [t for ts, t in totals if ts < begin]
        inside = [t for ts, t in totals if begin <= ts <= finish]
        start = before[-1] if before else 0
        windows[name] = Window(start, max([start, *inside]), inside[-1] if inside else start)
    return max(0, max(t for _, t in totals)), windows


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind tensors (tied weights count once)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


# --------------------------------------------------------------------------------------------------
# A plan shape, naive loss (tests/test_plan.py)
# --------------------------------------------------------------------------------------------------
def measure_training_peak(shape: ModelShape, tokens: int, *, dtype: str = "float32",
                          gradient_checkpointing: bool = False, seed: int = 0) -> dict[str, int]:
    """Measured CPU peak (bytes) of one GRPO-like micro-batch of ``tokens`` tokens for a randomly
    initialized Hugging Face model of ``shape``: forward, naive log-probs (log_softmax + gather of the
    full logits), a policy-gradient loss, backward and a (fused) AdamW step, in the steady state of
    gradient accumulation (gradients and AdamW states already exist from a first micro-batch).

    Returns {"persistent": weights + gradients + optimizer states + inputs, "step": the largest
    allocation above them during the micro-batch and the step, "peak": their sum}."""
    import torch

    from fastgrpo.model import random_model

    torch.manual_seed(seed)
    model = random_model(
        shape.model_type, seed=seed, dtype=getattr(torch, dtype), hidden_size=shape.hidden,
        intermediate_size=shape.intermediate, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, vocab_size=shape.vocab,
        tie_word_embeddings=shape.tied, use_cache=False,
        attention_bias=shape.o_bias, mlp_bias=shape.mlp_bias,  # Llama's flags; Qwen2's q/k/v biases are built in
        attn_implementation="sdpa")  # one sequence, no mask: SDPA's CPU flash kernel
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as load_policy
    model.train()
    # fused=True: no foreach temporaries the size of the parameters, as with fused AdamW on a GPU.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    input_ids = torch.randint(0, shape.vocab, (1, tokens))
    advantages = torch.randn(1, tokens - 1)

    def micro_batch_and_step():
        logits = model(input_ids=input_ids, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]
        del logits
        (-(logp * advantages).mean()).backward()
        optimizer.step()

    micro_batch_and_step()  # creates the gradients and AdamW states
    params = list(model.parameters())
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    persistent = _storage_bytes(params + [p.grad for p in params] + states + [input_ids, advantages])
    step, _ = allocation_windows(micro_batch_and_step)
    return {"persistent": persistent, "step": step, "peak": persistent + step}


def predicted_training_peak(shape: ModelShape, tokens: int, *, dtype: str = "float32",
                            gradient_checkpointing: bool = False) -> dict[str, int]:
    """plan_memory's numbers for measure_training_peak's setting: naive loss, AdamW, no vLLM, no CUDA
    context, one sequence of ``tokens`` tokens."""
    plan = plan_memory(shape, GpuSpec("host", 1e6, 0.0, 0.0), max_len=tokens, group=1, prompts_per_step=1,
                       dtype=dtype, optimizer="adamw", gradient_checkpointing=gradient_checkpointing, loss="naive",
                       beta=0.0, vllm_share=0.0, cuda_context_gib=0.0)
    persistent = sum(plan.components[k] for k in ("policy_weights", "gradients", "optimizer_states"))
    return {"persistent": persistent, "step": plan.total_bytes - persistent, "peak": plan.total_bytes}


# --------------------------------------------------------------------------------------------------
# A real model through the trainer's calls, fused loss (tests/test_plan_validation.py)
# --------------------------------------------------------------------------------------------------
# The components both functions below return, in bytes. The last five are above the persistent ones.
TRAINER_COMPONENTS = ("policy_weights", "gradients", "optimizer_states", "activations_stored", "loss_working_set",
                      "backward_peak", "optimizer_step_peak", "micro_batch_peak", "peak")


def measure_trainer_micro_batch(model_dir: str | Path, *, sequences: int, prompt_len: int, completion_len: int,
                                dtype: str = "float32", gradient_checkpointing: bool = False,
                                fused_adamw: bool = True, seed: int = 0) -> dict[str, int]:
    """Measured CPU bytes of one trainer micro-batch of ``sequences`` packed sequences (random ids,
    ``prompt_len`` + ``completion_len`` tokens each) and the optimizer step, for the model in
    ``model_dir`` loaded as the trainer loads it (fastgrpo.model.load_policy).

    The calls are fastgrpo.trainer.grpo_update's: packed_hidden_states -> fused_grpo_loss (with the
    entropy, as the trainer asks) -> backward -> clip_grad_norm_ -> AdamW step. It runs in the steady
    state of gradient accumulation: a first micro-batch and step create the gradients and AdamW states,
    and the measured micro-batch adds into those gradients. ``fused_adamw``: torch's fused AdamW (the
    trainer's choice on a GPU, what the planner assumes); False: foreach AdamW (the trainer's CPU choice).

    Returns TRAINER_COMPONENTS plus "tokens" (T, packed) and "scored_tokens" (Nc, completion tokens):
    activations_stored = what the forward leaves alive; loss_working_set = the loss call's peak above its
    start; backward_peak, optimizer_step_peak, micro_batch_peak = peaks above the persistent bytes;
    peak = persistent + the largest of them."""
    import torch
    from torch.profiler import record_function

    from fastgrpo.kernels import fused_grpo_loss
    from fastgrpo.model import lm_head_weight, load_policy, packed_hidden_states
    from fastgrpo.packing import pack_sequences

    torch.manual_seed(seed)
    policy = load_policy(model_dir, dtype=getattr(torch, dtype), device="cpu",
                         gradient_checkpointing=gradient_checkpointing)
    vocab = policy.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(sequences)]
    completions = [torch.randint(0, vocab, (completion_len,), generator=gen).tolist() for _ in range(sequences)]
    batch = pack_sequences(prompts, completions)
    advantages = torch.randn(sequences, generator=gen)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=fused_adamw, foreach=not fused_adamw)

    def micro_batch():
        with record_function(WINDOW_PREFIX + "forward"):
            hidden = packed_hidden_states(policy, batch)
        with record_function(WINDOW_PREFIX + "loss"):
            loss, *_ = fused_grpo_loss(hidden, lm_head_weight(policy), batch.targets, None, None, advantages,
                                       batch.completion_cu_seqlens, num_sequences=sequences,
                                       num_tokens=batch.targets.numel(), return_entropy=True)
        del hidden
        with record_function(WINDOW_PREFIX + "backward"):
            loss.backward()

    def step():
        with record_function(WINDOW_PREFIX + "optimizer"):
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()

    micro_batch()
    step()
    params = list(policy.parameters())
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    out = {"tokens": batch.input_ids.numel(), "scored_tokens": batch.targets.numel(),
           "policy_weights": _storage_bytes(params), "gradients": _storage_bytes([p.grad for p in params]),
           "optimizer_states": _storage_bytes(states)}
    _, w = allocation_windows(lambda: (micro_batch(), step()))
    out.update(activations_stored=w["forward"].end - w["forward"].start,
               loss_working_set=w["loss"].peak - w["loss"].start, backward_peak=w["backward"].peak,
               optimizer_step_peak=w["optimizer"].peak,
               micro_batch_peak=max(w[k].peak for k in ("forward", "loss", "backward")))
    persistent = out["policy_weights"] + out["gradients"] + out["optimizer_states"]
    out["peak"] = persistent + max(out["micro_batch_peak"], out["optimizer_step_peak"])
    return out


def predicted_trainer_micro_batch(model_dir: str | Path, *, tokens: int, scored_tokens: int, dtype: str = "float32",
                                  gradient_checkpointing: bool = False) -> dict[str, int]:
    """fastgrpo.perf.plan's numbers for measure_trainer_micro_batch's setting: the shape read from
    ``model_dir``/config.json, AdamW, no vLLM, no CUDA context, a micro-batch of ``tokens`` packed tokens
    of which ``scored_tokens`` get a log-prob. Two CPU facts enter that a GPU plan does not have: the
    fused loss runs its chunked torch path (fp32 [chunk, V] scratch) and scores only completion tokens
    (the GPU plan charges every token, an upper bound). A fused AdamW step allocates nothing (0)."""
    from fastgrpo.kernels.fused_grpo import FUSED_CHUNK_ELEMENTS, MIN_CHUNK_TOKENS

    shape = model_shape(model_dir)
    plan = plan_memory(shape, GpuSpec("host", 1e6, 0.0, 0.0), max_len=tokens, group=1, prompts_per_step=1,
                       dtype=dtype, optimizer="adamw", gradient_checkpointing=gradient_checkpointing, loss="fused",
                       beta=0.0, vllm_share=0.0, cuda_context_gib=0.0)
    b = DTYPE_BYTES[dtype]
    chunk_rows = min(scored_tokens, max(MIN_CHUNK_TOKENS, FUSED_CHUNK_ELEMENTS // shape.vocab))
    loss_ws = loss_working_set_bytes("fused", scored_tokens, shape.vocab, shape.hidden, b, torch_chunk_rows=chunk_rows)
    parts = step_peak_bytes(shape, tokens, b=b, gradient_checkpointing=gradient_checkpointing, loss="fused",
                            engine_bytes=b, loss_ws=loss_ws)
    stored, backward = activation_bytes(shape, tokens, b, gradient_checkpointing)
    out = {k: plan.components[k] for k in ("policy_weights", "gradients", "optimizer_states")}
    out.update(activations_stored=stored, loss_working_set=loss_ws,
               backward_peak=max(stored + parts["activations_backward"], parts["embedding_gradients"]),
               optimizer_step_peak=0, micro_batch_peak=sum(parts.values()))
    out["peak"] = sum(out[k] for k in ("policy_weights", "gradients", "optimizer_states")) + out["micro_batch_peak"]
    return out
