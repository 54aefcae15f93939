"""Analytical GPU memory planner for GRPO training: will this model, context and group fit a GPU?

    fastgrpo plan --model qwen2.5-1.5b --gpu a40-48gb --max-len 16384 --group 8 --gradient-checkpointing

The plan adds up the bytes of every tensor that is alive at the training peak of one GPU that holds
the policy, its optimizer, (beta > 0) a reference model, and a colocated vLLM engine:

    persistent  policy weights + gradients + optimizer states + reference weights + rollout tensors
                + vLLM's share of the GPU + a CUDA context/fragmentation allowance
    step peak   max(stored activations + max(loss working set, one layer's backward working set),
                    the embedding's backward, the weight-sync copy)

Assumptions (each one names what the planner counts):
- Training runs in the parameter dtype with no fp32 master copy: weights, gradients and torch AdamW's
  two states all take the parameter dtype (torch allocates the states with ``zeros_like(param)``), so
  AdamW costs 2 x dtype bytes per parameter (8 in fp32, 4 in bf16). bitsandbytes AdamW8bit keeps two
  uint8 states plus one fp32 absmax per 256-element block (2.03 bytes/param), and fp32 states for
  tensors under 4,096 elements (norm weights, biases).
- Gradients are accumulated over micro-batches, so from the second micro-batch on the gradients and
  the optimizer states are alive during forward and backward: the planner adds them to the peak.
- Attention is flash-attention (packed, varlen): nothing of size T x T is stored.
- The fused loss is fastgrpo.kernels.token_logprobs on a GPU (Triton): logit tiles live in on-chip
  memory; global memory holds per-token vectors and the fp32 accumulators of grad_hidden [T, H] and
  grad_weight [V, H] plus their casts to the model dtype. The naive loss materializes fp32 logits.
- The reference model (beta > 0) runs under no_grad before the policy's micro-batches: only its
  weights add to the peak.

fastgrpo/perf/peak_memory.py checks the non-GPU parts against torch's allocator on CPU: with the naive
loss the predicted peak sat within 2.6% of the measured one for SmolLM2/Qwen2 shapes, fp32 and bf16,
with and without checkpointing (tests/perf/test_plan.py); through the trainer's own calls (packed forward,
fused loss, AdamW) on the tiny test model and SmolLM2-135M, every component within 20%
(tests/perf/test_plan_validation.py).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field

from fastgrpo.kernels.gpus import GPU_DATASHEETS
from fastgrpo.perf import lora_memory
from fastgrpo.perf.shapes import PRESETS, ModelShape, model_shape

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZERS = ("adamw", "adamw8bit")
LOSSES = ("fused", "naive")


@dataclass(frozen=True)
class GpuSpec:
    """memory_gib: total memory as nvidia-smi reports it (ECC on where it is on by default);
    bf16_tflops: peak dense bf16 tensor-core TFLOP/s (fp32 accumulate, no sparsity); mem_bw_gbs: GB/s."""

    name: str
    memory_gib: float
    bf16_tflops: float
    mem_bw_gbs: float


# The datasheet table is shared with the roofline (fastgrpo/kernels/gpus.py: numbers and sources).
GPUS: dict[str, GpuSpec] = {key: GpuSpec(sheet.name, sheet.memory_mib / 1024, sheet.bf16_tflops, sheet.mem_bw_gbs)
                            for key, sheet in GPU_DATASHEETS.items()}

# CUDA context (~0.5 GiB with cuBLAS workspaces) plus caching-allocator fragmentation.
CUDA_CONTEXT_GIB = 1.5
# Gradients in flight inside one decoder layer's backward, per token, in units of dtype x hidden (the
# layer's output gradient and the residual-branch gradient); plus, once per layer, the largest weight
# gradient, which autograd computes as a new tensor before adding it into .grad (accumulation).
BACKWARD_IN_FLIGHT_HIDDENS = 2
# Fused loss, per token: logp, logsumexp, entropy and their gradients (fp32), the forward's vocabulary
# split partials (4 fp32 per split, ~2 splits at long contexts), the GRPO loss's old/ref log-probs and
# advantages.
FUSED_LOSS_PER_TOKEN_BYTES = 64
# The fused loss's chunked torch path with entropy (what the trainer asks for) holds two fp32
# [chunk, V] buffers at once: the logits and their exp (the entropy's row-wise dot product is a
# batched matmul; torch.linalg.vecdot had allocated a third, measured as 3.0 buffers).
TORCH_PATH_SCRATCH_BUFFERS = 2
# Rollout tensors per generated token if kept on the GPU: int64 ids, fp32 old, ref and sampler
# log-probs, fp32 advantage.
ROLLOUT_BYTES_PER_TOKEN = 24
# vLLM's profile run sizes its activation peak with max_num_batched_tokens prefill tokens (assumed
# 8,192) and its sampler with max_num_seqs (256) rows of fp32 logits and probabilities.
VLLM_PREFILL_TOKENS = 8192
VLLM_MAX_SEQS = 256


def get_gpu(name: str) -> GpuSpec:
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


def _dtype_bytes(dtype: str, what: str = "dtype") -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{what} {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


# --------------------------------------------------------------------------------------------------
# Component formulas (bytes)
# --------------------------------------------------------------------------------------------------
def optimizer_state_bytes(shape: ModelShape, optimizer: str, param_bytes: int) -> int:
    """adamw: exp_avg and exp_avg_sq in the parameter dtype. adamw8bit (bitsandbytes): two uint8
    states + one fp32 absmax per 256 elements each + two 256-entry fp32 quantization maps, and two
    fp32 states for tensors under 4,096 elements."""
    if optimizer == "adamw":
        return 2 * param_bytes * shape.param_count()
    if optimizer == "adamw8bit":
        total = 0
        for n in shape.param_tensor_sizes():
            total += 8 * n if n < 4096 else 2 * n + 2 * 4 * math.ceil(n / 256) + 2 * 256 * 4
        return total
    raise ValueError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")


def layer_activation_bytes_per_token(shape: ModelShape, b: int) -> dict[str, int]:
    """Bytes per token that autograd keeps for one decoder layer (Hugging Face Llama/Qwen2 block,
    flash-attention, activation dtype of b bytes). Each entry is one saved tensor group:

    - RMSNorm upcasts to fp32: ``pow`` keeps the fp32 input (4 H) and the weight multiply keeps the
      normalized output in the model dtype (b H); in fp32 these are the input and the product.
      Two norms per layer. The q/k/v and gate/up projections keep the norm output (the same tensor).
    - RoPE ``q * cos + rotate_half(q) * sin`` keeps q and k and their rotated copies.
    - Flash-attention keeps q and k after RoPE, v, its output (the o_proj input, same storage) and
      one fp32 logsumexp per head.
    - SwiGLU ``down(silu(gate(x)) * up(x))`` keeps gate out (silu input), silu out, up out and the
      product (down_proj input): 4 x I.
    Biases add nothing (addmm keeps only the input).
    """
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    return {
        "rmsnorm_inputs_and_outputs": 2 * (4 + b) * h,
        "rope_q_k_and_rotated": 2 * b * (q + kv),
        "attention_q_k_v": b * (q + 2 * kv),
        "attention_out_and_lse": b * q + 4 * shape.heads,
        "swiglu_gate_silu_up_product": 4 * b * i,
    }


def activation_bytes(shape: ModelShape, tokens: int, b: int, gradient_checkpointing: bool,
                     gathered_keys: int = 0) -> tuple[int, int]:
    """(stored, backward working set) bytes for a micro-batch of ``tokens`` tokens.

    gathered_keys: with shared-prompt groups, the keys gathered beyond the packed tokens (each
    prompt's k/v once more per completion, ``shared_prefix_gathered_keys``); attention keeps the
    gathered k and v for backward in every layer (one layer with checkpointing).

    stored: what stays alive from the end of forward to backward: every layer's saved tensors, or with
    checkpointing only each layer's input (b H per token), plus the final norm and RoPE cos/sin.
    backward working set: the gradients in flight in one layer's backward (per token, and the largest
    weight gradient of the layer), plus with checkpointing the recomputed layer's saved tensors."""
    per_layer = sum(layer_activation_bytes_per_token(shape, b).values())
    gathered_per_layer = gathered_keys * 2 * b * shape.kv_dim
    outside_layers = (4 + b) * shape.hidden + 2 * b * shape.head_dim
    largest_weight_grad = b * shape.hidden * max(shape.intermediate, shape.q_dim)
    in_flight = tokens * BACKWARD_IN_FLIGHT_HIDDENS * b * shape.hidden + largest_weight_grad
    if gradient_checkpointing:
        return (tokens * (shape.layers * b * shape.hidden + outside_layers),
                tokens * per_layer + gathered_per_layer + in_flight)
    return tokens * (shape.layers * per_layer + outside_layers) + shape.layers * gathered_per_layer, in_flight


def shared_prefix_tokens(prompt_len: int, completion_len: int, group: int) -> tuple[int, int]:
    """(packed tokens, gathered keys) of one shared-prompt group (fastgrpo/shared_prefix.py): the
    prompt once and G completions; the keys are the prompt's, then each completion's prompt + own."""
    return prompt_len + group * completion_len, prompt_len + group * (prompt_len + completion_len)


def shared_prefix_gathered_keys(tokens: int, prompt_len: int, completion_len: int, group: int) -> int:
    """Keys gathered beyond ``tokens`` packed tokens of full groups: G x P more per group. Counted
    at full-length completions; shorter ones put more groups (more prompt copies) in a micro-batch."""
    packed, keys = shared_prefix_tokens(prompt_len, completion_len, group)
    return math.ceil(tokens * (keys - packed) / packed)


def loss_working_set_bytes(loss: str, tokens: int, vocab: int, hidden: int, b: int, torch_chunk_rows: int = 0) -> int:
    """Peak bytes of the log-prob + loss computation, forward and backward, for T tokens.

    naive: fp32 logits, the log-softmax output that autograd keeps, and its gradient: T x V x 12;
      later in backward the fp32 logit gradient (+ its cast to a 16-bit dtype) with grad_hidden [T, H]
      and the LM-head weight gradient [V, H], whichever is larger.
    fused: no T x V tensor; fp32 grad_hidden [T, H] and grad_weight [V, H] accumulators plus, for a
      16-bit model, their casts to the model dtype (in fp32 the cast is a no-op: measured on CPU, the
      loss's peak held one fp32 [V, H], not two), and FUSED_LOSS_PER_TOKEN_BYTES per token.
      torch_chunk_rows > 0: the chunked torch path (CPU), which adds TORCH_PATH_SCRATCH_BUFFERS fp32
      [rows, V] buffers (rows = min(T, its chunk)); the Triton path keeps logit tiles on chip (0)."""
    cast = b if b < 4 else 0
    if loss == "naive":
        return max(12 * tokens * vocab, (4 + cast) * tokens * vocab + b * (tokens + vocab) * hidden)
    if loss == "fused":
        scratch = TORCH_PATH_SCRATCH_BUFFERS * 4 * torch_chunk_rows * vocab
        return (4 + cast) * (tokens + vocab) * hidden + FUSED_LOSS_PER_TOKEN_BYTES * tokens + scratch
    raise ValueError(f"loss {loss!r} is not one of {', '.join(LOSSES)}")


def kv_bytes_per_token(shape: ModelShape, engine_bytes: int = 2) -> int:
    """K and V of every layer: 2 x layers x kv_heads x head_dim x dtype bytes."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * engine_bytes


def vllm_runtime_bytes(shape: ModelShape, engine_bytes: int = 2) -> int:
    """vLLM's non-KV working memory: one prefill chunk's activations (hidden, q/k/v, gate and up) and
    the sampler's fp32 logits and probabilities for VLLM_MAX_SEQS rows."""
    per_token = engine_bytes * (3 * shape.hidden + shape.q_dim + 2 * shape.kv_dim + 2 * shape.intermediate)
    return VLLM_PREFILL_TOKENS * per_token + VLLM_MAX_SEQS * shape.vocab * 4 * 2


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------
LABELS = {
    "policy_weights": "policy weights",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "reference_weights": "reference model weights (beta > 0)",
    "rollout_tensors": "rollout tensors (ids, log-probs, advantages)",
    "activations_stored": "activations kept for backward",
    "activations_backward": "one layer's backward (recomputed layer, gradients in flight, tied LM-head grad)",
    "loss_working_set": "log-prob/loss working set",
    "embedding_gradients": "embedding backward (tied: LM-head + embedding grads, + their sum if naive)",
    "weight_sync_copy": "weight-sync copy in the engine dtype",
    "not_simultaneous": "not simultaneous (peaks at different times)",
    "vllm_weights": "vLLM weights",
    "vllm_runtime": "vLLM activations + sampler",
    "vllm_kv_cache": "vLLM KV cache",
    "cuda_context": "CUDA context + fragmentation allowance",
}


@dataclass
class MemoryPlan:
    """components: bytes per LABELS key; they sum to total_bytes (the "not_simultaneous" entry is the
    negative credit for phases that peak at different times). max_micro_batch_tokens: the largest
    micro-batch that fits for each loss ("naive", "fused"), all else equal."""

    model: ModelShape
    gpu: GpuSpec
    settings: dict
    param_count: int
    components: dict[str, int]
    total_bytes: int
    capacity_bytes: int
    fits: bool
    reasons: list[str]
    max_micro_batch_tokens: dict[str, int]
    kv_cache_tokens: int | None = None
    concurrent_sequences: int | None = None
    rollout_sequences: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def to_dict(self) -> dict:
        out = asdict(self)
        out["components_gib"] = {k: round(v / GIB, 3) for k, v in self.components.items()}
        out["total_gib"] = round(self.total_gib, 3)
        out["capacity_gib"] = round(self.capacity_bytes / GIB, 3)
        return out


def step_peak_bytes(shape, tokens, *, b, gradient_checkpointing, loss, engine_bytes, loss_ws=None,
                    gathered_keys=0, lora_rank: int = 0, quantize: str = "none") -> dict[str, int]:
    """The micro-batch-dependent components, with the negative credit that makes them sum to the peak.
    loss_ws: the loss working set if the caller computed it (default: loss_working_set_bytes at T);
    gathered_keys: see activation_bytes (shared-prompt groups).

    Four phases peak one after another: the loss (stored activations + loss working set), each layer's
    backward (stored + one layer's working set), the embedding's backward, and the weight sync. With
    tied embeddings autograd holds the LM-head's weight gradient [V, H] from the loss until the
    embedding's arrives. The naive loss's gradient cannot be summed in place, so autograd adds the two
    into a third tensor (measured on CPU: this end-of-backward peak of 3 x V x H was the whole
    micro-batch peak of SmolLM2 widths with checkpointing at 256 tokens); the fused loss hands autograd
    a gradient it alone holds, which the embedding's is added into: 2 x V x H (measured on CPU,
    SmolLM2-135M with checkpointing: 217.5 MiB against 2 x 108.5).

    lora_rank > 0 (fastgrpo/perf/lora_memory.py): the LM head and the embeddings are frozen, so none of
    their [V, H] gradients exist; each layer keeps the adapters' saved tensors too; the sync merges
    one projection at a time. gathered_keys: see activation_bytes (shared-prompt groups)."""
    stored, backward = activation_bytes(shape, tokens, b, gradient_checkpointing, gathered_keys)
    lm_head_grad = shape.vocab * shape.hidden * b if lora_rank == 0 else 0
    if lora_rank:
        adapters = tokens * lora_memory.adapter_activation_bytes_per_token(shape, lora_rank, b)
        backward += adapters if gradient_checkpointing else 0
        stored += 0 if gradient_checkpointing else shape.layers * adapters
    if shape.tied:
        backward += lm_head_grad
    if loss_ws is None:
        loss_ws = loss_working_set_bytes(loss, tokens, shape.vocab, shape.hidden, b)
        if lora_rank:  # no weight-gradient accumulator or cast (the frozen-head path)
            loss_ws -= (b if loss == "naive" else 4 + (b if b < 4 else 0)) * shape.vocab * shape.hidden
    embedding = ((3 if loss == "naive" else 2) if shape.tied else 1) * lm_head_grad + tokens * shape.hidden * b
    # Before vLLM reloads weights the trainer casts its state dict when the dtypes differ (a new tensor
    # per parameter); this happens after the optimizer step, with no activations alive.
    sync = shape.param_count() * engine_bytes if engine_bytes != b else 0
    if lora_rank:
        sync = lora_memory.merge_copy_bytes(shape, engine_bytes, b, quantize)
    step_peak = max(stored + max(loss_ws, backward), embedding, sync)
    parts = {"activations_stored": stored, "activations_backward": backward, "loss_working_set": loss_ws,
             "embedding_gradients": embedding, "weight_sync_copy": sync}
    parts["not_simultaneous"] = step_peak - sum(parts.values())
    return parts


def plan_memory(shape: ModelShape, gpu: GpuSpec | str, *, max_len: int, group: int = 8, prompts_per_step: int = 8,
                dtype: str = "bfloat16", optimizer: str = "adamw", gradient_checkpointing: bool = False,
                loss: str = "fused", beta: float = 0.0, vllm_share: float = 0.3, micro_batch_tokens: int | None = None,
                vllm_dtype: str = "bfloat16", cuda_context_gib: float = CUDA_CONTEXT_GIB, prompt_len: int = 0,
                shared_prefix: bool = True, lora_rank: int = 0, quantize: str = "none") -> MemoryPlan:
    """Peak GPU memory of one GRPO training step with a colocated vLLM engine.

    max_len: longest sequence (prompt + completion) in tokens; micro_batch_tokens: packed tokens per
    micro-batch (default max_len; it must hold one sequence of max_len). vllm_share: the fraction of
    the GPU's memory given to vLLM (0: no engine on this GPU). prompt_len: the prompt's share of
    max_len (0: not known); with it and shared_prefix (``train.shared_prefix``) the plan counts the
    packed tokens of a step with each prompt once per group and the keys that attention gathers. lora_rank > 0: adapters on a frozen base
    (quantize: none | 8bit | 4bit), the reference is the base itself (no weights of its own)."""
    gpu = get_gpu(gpu) if isinstance(gpu, str) else gpu
    b = _dtype_bytes(dtype)
    engine_bytes = _dtype_bytes(vllm_dtype, "vllm_dtype")
    loss_working_set_bytes(loss, 1, 1, 1, b)  # raises on an unknown loss before any other work
    for label, value in (("max_len", max_len), ("group", group), ("prompts_per_step", prompts_per_step)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if not 0.0 <= vllm_share < 1.0:
        raise ValueError(f"vllm_share must be in [0, 1), got {vllm_share}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    tokens = max_len if micro_batch_tokens is None else micro_batch_tokens
    if tokens < max_len:
        raise ValueError(f"micro_batch_tokens={tokens} cannot hold one sequence of max_len={max_len}")
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or not 0 <= prompt_len < max_len:
        raise ValueError(f"prompt_len must be an int in [0, max_len={max_len}), got {prompt_len!r}")
    completion_len = max_len - prompt_len
    sharing = shared_prefix and prompt_len > 0 and group > 1
    step_tokens = {"copies": prompts_per_step * group * max_len,
                   "shared": prompts_per_step * shared_prefix_tokens(prompt_len, completion_len, group)[0]}

    def gathered(t: int) -> int:
        return shared_prefix_gathered_keys(t, prompt_len, completion_len, group) if sharing else 0

    if lora_rank < 0 or (quantize != "none" and lora_rank == 0):
        raise ValueError(f"lora_rank must be >= 0 and quantize needs lora_rank > 0, got {lora_rank} / {quantize!r}")
    n_params = shape.param_count()
    capacity = int(gpu.memory_gib * GIB)
    rollout_sequences = prompts_per_step * group
    fixed = {
        "policy_weights": n_params * b,
        "gradients": n_params * b,
        "optimizer_states": optimizer_state_bytes(shape, optimizer, b),
        "reference_weights": n_params * b if beta > 0 else 0,
        "rollout_tensors": rollout_sequences * max_len * ROLLOUT_BYTES_PER_TOKEN,
    }
    if lora_rank:
        n_adapter = lora_memory.adapter_params(shape, lora_rank)
        fixed.update(policy_weights=lora_memory.base_weight_bytes(shape, b, quantize) + n_adapter * lora_memory.ADAPTER_BYTES,
                     gradients=n_adapter * lora_memory.ADAPTER_BYTES,
                     optimizer_states=n_adapter * (lora_memory.ADAPTER_TRAINING_BYTES_PER_PARAM - 2 * lora_memory.ADAPTER_BYTES),
                     reference_weights=0)
    reasons, notes = [], []
    kv_tokens = concurrent = None
    vllm = {}
    if vllm_share > 0:
        reserved = int(vllm_share * capacity)
        vllm = {"vllm_weights": n_params * engine_bytes, "vllm_runtime": vllm_runtime_bytes(shape, engine_bytes)}
        vllm["vllm_kv_cache"] = reserved - vllm["vllm_weights"] - vllm["vllm_runtime"]
        kv_tokens = max(0, vllm["vllm_kv_cache"]) // kv_bytes_per_token(shape, engine_bytes)
        concurrent = kv_tokens // max_len
        if concurrent < 1:
            reasons.append(f"vLLM's share ({vllm_share:.2f} x {gpu.memory_gib:.1f} GiB) leaves room for "
                           f"{kv_tokens} KV tokens, less than one sequence of {max_len}: raise the share")
        elif concurrent < rollout_sequences:
            notes.append(f"vLLM holds {concurrent} of the {rollout_sequences} rollout sequences at full length "
                         "at once; the rest wait (generation is slower, not out of memory)")
    fixed.update(vllm)
    fixed["cuda_context"] = int(cuda_context_gib * GIB)

    def peak_parts(t: int, which_loss: str) -> dict[str, int]:
        return step_peak_bytes(shape, t, b=b, gradient_checkpointing=gradient_checkpointing, loss=which_loss,
                               engine_bytes=engine_bytes if vllm_share > 0 else b, gathered_keys=gathered(t),
                               lora_rank=lora_rank, quantize=quantize)

    parts = peak_parts(tokens, loss)
    total = sum(fixed.values()) + sum(parts.values())
    components = {**{k: v for k, v in fixed.items() if not k.startswith("vllm") and k != "cuda_context"},
                  **parts, **vllm, "cuda_context": fixed["cuda_context"]}
    if total > capacity:
        reasons.insert(0, f"total {total / GIB:.2f} GiB > {gpu.memory_gib:.2f} GiB")
    room = capacity - sum(fixed.values())
    max_tokens = {name: _largest_fitting(lambda t, n=name: sum(peak_parts(t, n).values()), room) for name in LOSSES}
    if max_tokens[loss] < max_len:
        notes.append(f"the largest micro-batch ({max_tokens[loss]} tokens) is shorter than max_len={max_len}")
    if prompt_len:
        notes.append(f"packed tokens per step at full length: {step_tokens['shared']:,} with each prompt once per "
                     f"group, {step_tokens['copies']:,} with a copy per completion "
                     f"({step_tokens['copies'] / step_tokens['shared']:.2f}x); train.shared_prefix="
                     f"{'true' if shared_prefix else 'false'} trains on the "
                     f"{'first' if sharing else 'second'} in micro-batches of {tokens:,} tokens")
    settings = dict(max_len=max_len, group=group, prompts_per_step=prompts_per_step, dtype=dtype,
                    optimizer=optimizer, gradient_checkpointing=gradient_checkpointing, loss=loss, beta=beta,
                    vllm_share=vllm_share, vllm_dtype=vllm_dtype, micro_batch_tokens=tokens,
                    cuda_context_gib=cuda_context_gib, prompt_len=prompt_len, shared_prefix=shared_prefix,
                    step_tokens=step_tokens if prompt_len else None, lora_rank=lora_rank, quantize=quantize)
    return MemoryPlan(model=shape, gpu=gpu, settings=settings, param_count=n_params, components=components,
                      total_bytes=total, capacity_bytes=capacity, fits=not reasons, reasons=reasons,
                      max_micro_batch_tokens=max_tokens, kv_cache_tokens=kv_tokens, concurrent_sequences=concurrent,
                      rollout_sequences=rollout_sequences, notes=notes)


def _largest_fitting(total_for_tokens, capacity: int) -> int:
    """Largest T >= 0 with total_for_tokens(T) <= capacity (the total grows with T); 0 if none."""
    if total_for_tokens(1) > capacity:
        return 0
    lo, hi = 1, 2
    while total_for_tokens(hi) <= capacity:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total_for_tokens(mid) <= capacity else (lo, mid)
    return lo


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def format_plan(plan: MemoryPlan) -> str:
    """The plan as a markdown table (component, GiB), the verdict and the largest micro-batches."""
    s = plan.settings
    ckpt = "on" if s["gradient_checkpointing"] else "off"
    lines = [
        f"## Memory plan: {plan.model.name} ({plan.param_count / 1e9:.3f}B parameters) on {plan.gpu.name}",
        "",
        f"max_len {s['max_len']}, group {s['group']} x {s['prompts_per_step']} prompts = {plan.rollout_sequences} "
        f"sequences/step, micro-batch {s['micro_batch_tokens']} tokens, {s['dtype']}, {s['optimizer']}, "
        f"gradient checkpointing {ckpt}, loss {s['loss']}, beta {s['beta']}, vLLM share {s['vllm_share']}"
        + (f", LoRA rank {s['lora_rank']} (base {s['quantize'] if s['quantize'] != 'none' else s['dtype']})"
           if s.get("lora_rank") else ""),
        "",
        "| component | GiB |",
        "|---|---:|",
    ]
    lines += [f"| {LABELS[k]} | {v / GIB:.2f} |" for k, v in plan.components.items() if v != 0]
    lines += [f"| **total** | **{plan.total_gib:.2f}** |", f"| GPU memory | {plan.capacity_bytes / GIB:.2f} |", ""]
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"**{verdict}**" + ("" if plan.fits else ": " + "; ".join(plan.reasons)))
    if plan.kv_cache_tokens is not None:
        lines.append(f"vLLM KV cache: {plan.kv_cache_tokens:,} tokens = {plan.concurrent_sequences} concurrent "
                     f"sequences of {s['max_len']} tokens")
    mx = plan.max_micro_batch_tokens
    lines.append(f"largest micro-batch that fits: fused loss {mx['fused']:,} tokens | "
                 f"naive loss {mx['naive']:,} tokens")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fastgrpo plan``; defaults of shared knobs come from fastgrpo.config."""
    from fastgrpo.config import LossConfig, RolloutConfig, TrainConfig

    parser.add_argument("--model", required=True,
                        help=f"a local model folder with config.json, or a preset: {', '.join(PRESETS)}")
    parser.add_argument("--gpu", default="a40-48gb", help=f"one of {', '.join(GPUS)} (default a40-48gb)")
    parser.add_argument("--max-len", type=int, required=True, help="longest sequence, prompt + completion, in tokens")
    parser.add_argument("--group", type=int, default=RolloutConfig.num_generations, help="samples per prompt (G)")
    parser.add_argument("--prompts-per-step", type=int, default=RolloutConfig.prompts_per_step)
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPE_BYTES), help="training dtype")
    parser.add_argument("--optimizer", default=TrainConfig.optimizer, choices=OPTIMIZERS)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--loss", default="fused", choices=LOSSES, help="which loss the verdict uses")
    parser.add_argument("--beta", type=float, default=LossConfig.beta, help="KL weight; > 0 adds a reference model")
    parser.add_argument("--vllm-memory-share", type=float, default=RolloutConfig.gpu_memory_utilization,
                        help="fraction of GPU memory for the colocated vLLM engine (0: none)")
    parser.add_argument("--vllm-dtype", default="bfloat16", choices=tuple(DTYPE_BYTES),
                        help="the engine dtype on a GPU (rollout.dtype=auto is bfloat16 there)")
    parser.add_argument("--micro-batch-tokens", type=int, default=None,
                        help="packed tokens per micro-batch (default: --max-len)")
    parser.add_argument("--prompt-len", type=int, default=0,
                        help="the prompt's tokens within --max-len: counts shared-prompt groups (0: unknown)")
    parser.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=TrainConfig.shared_prefix,
                        help="each prompt packed once per group (train.shared_prefix)")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: full-parameter training)")
    parser.add_argument("--quantize", default="none", choices=lora_memory.QUANTIZE_CHOICES,
                        help="the frozen base of a LoRA run: none (--dtype), 8bit or 4bit (NF4, QLoRA)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; 0 if it fits, 1 if it does not, 2 on a bad argument."""
    import sys

    try:
        plan = plan_memory(model_shape(args.model), args.gpu, max_len=args.max_len, group=args.group,
                           prompts_per_step=args.prompts_per_step, dtype=args.dtype, optimizer=args.optimizer,
                           gradient_checkpointing=args.gradient_checkpointing, loss=args.loss, beta=args.beta,
                           vllm_share=args.vllm_memory_share, micro_batch_tokens=args.micro_batch_tokens,
                           vllm_dtype=args.vllm_dtype, prompt_len=args.prompt_len,
                           shared_prefix=args.shared_prefix, lora_rank=args.lora_rank, quantize=args.quantize)
    except ValueError as exc:
        print(f"fastgrpo plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan))
    return 0 if plan.fits else 1
