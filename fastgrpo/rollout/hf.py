"""The transformers rollout engine: a left-padded, KV-cached decode loop over the trainer's live
model (no weight sync needed). The fallback when vLLM is not installed, and the reference the vLLM
path is tested against; built by fastgrpo.rollout.make_engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from fastgrpo.rollout.base import Completion, EngineBase, check_generate_args, checkpoint_named_weights

log = logging.getLogger("fastgrpo")


class TransformersEngine(EngineBase):
    """Batched, left-padded, KV-cached sampling with a Hugging Face causal LM.

    `model` is used in place (eval mode and no grad while generating, its mode restored after), so
    a trainer that passes its own model has nothing to sync. Rows are decoded `batch_size` at a
    time; a chunk runs until all of its rows stop, so one long row holds up the chunk (measured
    ~110 generated tokens/s against vLLM's ~600 on SmolLM2-135M, 2 CPU cores).

    Log-probs are those of the processed distribution (temperature, then top-p), like vLLM's
    "processed_logprobs", computed in fp32 whatever the model dtype.
    """

    name = "transformers"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int = 32) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        if not self.eos_token_ids:
            raise ValueError("neither the tokenizer nor the model's generation config names an EOS token")
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids)

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Completion]:
        """Sample n completions per prompt; see `RolloutEngine.generate`.

        One torch.Generator seeded with `seed` drives the whole call, so results depend on
        batch_size as well as on the seed.
        """
        check_generate_args(prompt_ids, n, max_tokens, temperature, top_p)
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()  # fresh randomness without reseeding torch's global generator
        else:
            generator.manual_seed(seed)
        rows = [index for index in range(len(prompt_ids)) for _ in range(n)]

        was_training = self.model.training
        self.model.eval()
        completions: list[Completion] = []
        try:
            with torch.no_grad():
                for start in range(0, len(rows), self.batch_size):
                    chunk = rows[start : start + self.batch_size]
                    completions += self._generate_chunk(
                        chunk, [prompt_ids[i] for i in chunk], max_tokens, temperature, top_p,
                        generator, device,
                    )
        finally:
            self.model.train(was_training)
        return completions

    def _generate_chunk(
        self,
        prompt_indices: list[int],
        prompts: list[Sequence[int]],
        max_tokens: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator,
        device: torch.device,
    ) -> list[Completion]:
        from transformers import DynamicCache

        batch, longest = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long, device=device)
        for row, ids in enumerate(prompts):
            input_ids[row, longest - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, longest - len(ids) :] = 1
        # Left padding: positions count real tokens only, so each row sees positions 0..len-1.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

        eos = torch.tensor(sorted(self.eos_token_ids), device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        lengths = torch.full((batch,), max_tokens, dtype=torch.long, device=device)
        tokens, logprobs = [], []
        cache = DynamicCache()
        for step in range(max_tokens):
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1, :].float()
            next_tokens, next_logprobs = _sample(logits, temperature, top_p, generator)
            next_tokens = torch.where(finished, self.pad_token_id, next_tokens)
            tokens.append(next_tokens)
            logprobs.append(next_logprobs)
            stopped_now = ~finished & torch.isin(next_tokens, eos)
            lengths = torch.where(stopped_now, step + 1, lengths)
            finished |= stopped_now
            if bool(finished.all()):
                break
            input_ids = next_tokens[:, None]
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
            position_ids = position_ids[:, -1:] + 1

        tokens_t = torch.stack(tokens, 1).tolist()
        logprobs_t = torch.stack(logprobs, 1).tolist()
        out = []
        for row, prompt_index in enumerate(prompt_indices):
            length = int(lengths[row])
            ids = tokens_t[row][:length]
            stopped = bool(finished[row])
            out.append(
                Completion(
                    prompt_index=prompt_index,
                    token_ids=ids,
                    logprobs=logprobs_t[row][:length],
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    finish_reason="stop" if stopped else "length",
                )
            )
        return out

    def sync_weights(self, model: torch.nn.Module) -> float:
        """No-op (0.0) for the shared model; another module's weights are copied in."""
        if model is self.model:
            return 0.0
        started = time.perf_counter()
        # By checkpoint name: a LoRA policy (peft) arrives with its adapters merged into the base names.
        mine = dict(self.model.named_parameters(remove_duplicate=False))
        dtype = next(iter(mine.values())).dtype
        with torch.no_grad():
            seen = set()
            for name, tensor in checkpoint_named_weights(model, dtype):
                if name not in mine:
                    raise KeyError(f"sync_weights: the trainer's parameter {name!r} has no counterpart in the engine's model")
                mine[name].copy_(tensor)
                seen.add(name)
        missing = sorted(set(mine) - seen)
        if missing:
            raise KeyError(f"sync_weights: the trainer's model lacks {missing[:5]} ({len(missing)} engine parameters)")
        return time.perf_counter() - started


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] fp32 -> (sampled token ids [B], their log-probs [B] under the processed
    distribution). Greedy (temperature 0) scores under the plain softmax, as vLLM does."""
    if temperature == 0.0:
        logp = torch.log_softmax(logits, -1)
        tokens = logp.argmax(-1)
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (vLLM's
        # and transformers' rule); the top token is always kept.
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    logp = torch.log_softmax(logits, -1)
    # Exponential race (argmax of p / Exp(1) noise) draws from p like torch.multinomial, which took
    # 56 ms per [4, 49152] call on 2 CPU cores, most of a tiny model's decode step.
    noise = torch.empty_like(logp).exponential_(generator=generator)
    tokens = (logp.exp() / noise).argmax(-1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def _eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    return ids
