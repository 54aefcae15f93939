"""What LoRA and QLoRA change in the memory plan (fastgrpo/perf/plan.py), in bytes.

Takes the planner's ModelShape (hidden, q_dim, kv_dim, intermediate, layers, vocab, param_count) by
duck typing, so that plan.py can import this module without a circle. What the planner assumes:

- adapters on all seven projections of every decoder layer (lora.target_modules' default), each
  adding A [r, in] and B [out, r];
- peft keeps adapters in fp32 even on a 16-bit base (its autocast_adapter_dtype default), so each
  adapter parameter costs 4 (weight) + 4 (gradient) + 8 (AdamW's two fp32 states) = 16 bytes;
- on a 16-bit base peft casts each adapted projection's input to fp32 for the adapter, and autograd
  keeps that copy for A's weight gradient (4 bytes x in-features per token per projection), plus the
  r-wide fp32 output of A for B's gradient; on an fp32 base the input is the tensor already kept;
- the frozen base: the model dtype, or bitsandbytes NF4 with double quantization (4 bits + an 8-bit
  absmax per 64 weights + an fp32 second-level scale per 256 blocks = 0.516 bytes per weight), or
  LLM.int8 (1 byte + an fp32 scale per output row); only the decoder's projections are quantized,
  the embeddings, the LM head and the norms stay in the model dtype;
- no gradient reaches the embeddings or the LM head: the fused loss skips its [V, H] weight gradient.
"""

from __future__ import annotations

ADAPTER_BYTES = 4  # fp32 adapters
ADAPTER_TRAINING_BYTES_PER_PARAM = 4 + 4 + 8  # weight, gradient, AdamW exp_avg + exp_avg_sq
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
QUANTIZE_CHOICES = ("none", "8bit", "4bit")


def _projections(shape) -> list[tuple[int, int]]:
    """(in, out) features of the seven projections of one decoder layer."""
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def projection_params(shape) -> int:
    """Weights of all decoder projections (what quantization shrinks)."""
    return shape.layers * sum(a * b for a, b in _projections(shape))


def adapter_params(shape, rank: int) -> int:
    """A and B of every projection of every layer: rank x (in + out) each."""
    return shape.layers * rank * sum(a + b for a, b in _projections(shape))


def base_weight_bytes(shape, b: int, quantize: str) -> int:
    """The frozen base: projections per ``quantize``, everything else in the model dtype."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    proj = projection_params(shape)
    rest = shape.param_count() - proj
    if quantize == "4bit":
        quantized = int(proj * NF4_BYTES_PER_WEIGHT)
    elif quantize == "8bit":
        quantized = proj + 4 * shape.layers * sum(out for _, out in _projections(shape))
    else:
        quantized = proj * b
    return quantized + rest * b


def adapter_activation_bytes_per_token(shape, rank: int, b: int) -> int:
    """What the adapters add to one layer's saved tensors, per token (see the module docstring)."""
    cast_inputs = sum(a for a, _ in _projections(shape)) * ADAPTER_BYTES if b != ADAPTER_BYTES else 0
    return cast_inputs + len(_projections(shape)) * rank * ADAPTER_BYTES


def merge_copy_bytes(shape, engine_bytes: int, b: int, quantize: str) -> int:
    """The weight sync merges one projection at a time: its fp32 sum, the cast to the engine dtype
    and, for a quantized base, the dequantized weight."""
    largest = max(a * o for a, o in _projections(shape))
    return largest * (4 + engine_bytes + (b if quantize != "none" else 0))
