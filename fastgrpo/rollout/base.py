"""What every rollout engine shares: the Completion record, the engine protocol, argument checks,
per-prompt seeds and the parameter stream that weight syncs send.

Engines (vllm.py, hf.py, server.py) implement `RolloutEngine`; `EngineBase` gives them the no-op
`sleep`/`wake_up`/`close` of an engine with nothing to free. `make_engine` (rollout/__init__.py)
is the one switch between them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

# Prefixes that wrappers put in front of a model's parameter names (torch.compile, DDP).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


@dataclass
class Completion:
    """One sampled completion of one prompt.

    token_ids and logprobs have the same length (the number of generated tokens, at most
    max_tokens); token_ids ends with the end-of-sequence token when finish_reason == "stop".
    """

    prompt_index: int  # index into the prompts list passed to generate
    token_ids: list[int]  # generated tokens, including the EOS token if it stopped on one
    logprobs: list[float]  # the sampler's log-prob of each generated token
    text: str  # decoded, special tokens skipped
    finish_reason: str  # "stop" or "length"
    # The policy version (optimizer steps behind the weights) that sampled it; set by the trainer's
    # rollout producer (fastgrpo/producer.py), the engines leave 0.
    policy_version: int = 0


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a sampler."""

    name: str

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Completion]:
        """len(prompt_ids) * n completions, grouped: the n samples of prompt 0, then prompt 1, ..."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> float:
        """Load `model`'s current weights into the sampler; returns the seconds it took."""
        ...

    def sleep(self) -> None:
        """Free the sampler's accelerator memory while the trainer runs (no-op where unsupported)."""
        ...

    def wake_up(self) -> None:
        """Undo `sleep` before the next sync/generate (no-op where unsupported)."""
        ...

    def close(self) -> None: ...


class EngineBase:
    """Defaults for an engine that holds nothing to free between steps."""

    def sleep(self) -> None:
        """Nothing to free."""

    def wake_up(self) -> None:
        """Nothing to restore."""

    def close(self) -> None:
        """Nothing to release."""


def check_generate_args(
    prompt_ids: Sequence[Sequence[int]], n: int, max_tokens: int, temperature: float, top_p: float
) -> None:
    if not isinstance(prompt_ids, Sequence) or len(prompt_ids) == 0:
        raise ValueError(f"prompt_ids must be a non-empty list of token-id lists, got {prompt_ids!r}")
    for index, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt_ids[{index}] is empty; every prompt needs at least one token")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (samples per prompt) must be an int >= 1, got {n!r}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def prompt_seed(seed: int, prompt_index: int) -> int:
    """A 62-bit seed for one prompt of a call seeded with `seed` (splitmix64 of the pair), so
    that the streams `prompt_seed + j` of different prompts and calls do not overlap."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + (prompt_index + 1) * 0xD1B54A32D192ED03) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 2


def checkpoint_named_weights(
    model: torch.nn.Module, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, detached tensor cast to `dtype`) for every parameter name of `model`.

    Tied parameters are yielded under every name: vLLM 0.32's in-place reload rebuilds each layer
    from its own list of loaded names, and when `lm_head.weight` of a tied model is left out its
    LM head keeps the old weights ("ParallelLMHead: Failed to load weights"; measured on the tiny
    tied Llama: log-probs 10 nats away from the trainer's after a sync, 1e-5 with it sent).
    Casting lazily, one tensor at a time, keeps the extra memory at one parameter. A parameter
    sharded by FSDP2 (a DTensor) is cast shard-wise, then all-gathered: every rank of the trainer
    must iterate together (a collective per parameter). A LoRA policy (peft) yields its base names
    with the adapters merged in on the fly (fastgrpo.lora.merged_named_weights).
    """
    from fastgrpo.lora import is_adapter_model, merged_named_weights

    if is_adapter_model(model):
        yield from merged_named_weights(model, dtype)
        return
    for name, param in model.named_parameters(remove_duplicate=False):
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        tensor = param.detach().to(dtype)
        yield name, (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor)
