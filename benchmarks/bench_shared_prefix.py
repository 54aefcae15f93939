"""Shared-prompt groups against one copy of the prompt per completion (``train.shared_prefix``):
tokens through the model, time and peak memory of the training phases (``grpo_update``: forward,
backward, optimizer; reference and old log-probs when the case asks for them), side by side in one
process on the same rollout batch.

    pytest benchmarks/bench_shared_prefix.py --benchmark-only -s

Cases:
    default      8 prompts x G = 8: the default run's prompts (chat template, worked example and
                 question, ~98 tokens) with completions of 21 tokens on average (8 .. 34).
    long-prompt  2 prompts of 1,024 tokens x G = 8 completions of 256 tokens.
Each round runs both layouts once, alternating which goes first (so drift on a shared machine hits
both); the benchmark's own timing is of the pair, and extra_info holds each layout's median seconds
per phase, its packed tokens, its memory (CPU: the bytes autograd saves for backward, i.e. the
activations; CUDA: max_memory_allocated above the start; one separate run per layout) and the ratios. The model is the
tiny random Llama of bench_rollout (2 cores) unless ``FASTGRPO_BENCH_MODEL`` names a model folder
(e.g. the default model's). Wall-clock is reported, never asserted; exactness is tested in
tests/test_shared_prefix*.py.

Measured on a shared 2-core CPU (load average 7-10 from other jobs, so times are noisy), fp32,
default config (forward + backward + optimizer), copies / shared:
    SmolLM2-135M, default case, 2 rounds: tokens 7,583 / 2,137 (3.55x), time 398 / 199 s (2.00x;
        forward 1.57x, backward 2.26x), saved for backward 10,616 / 3,575 MiB (2.97x).
    tiny random model (2 layers, hidden 128, vocab 49,152: the LM head dominates, the same work in
        both layouts), 3 rounds: default case tokens 3.55x, time 0.85x (within noise of the head's
        cost), memory 1.29x; long-prompt case tokens 3.33x, time 1.47x, memory 1.26x (profiler
        allocation totals, before saved_for_backward_bytes replaced them).
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

from fastgrpo.config import load_config
from fastgrpo.data.problems import load_training_data
from fastgrpo.data.prompts import build_messages, encode_prompt
from fastgrpo.model import load_policy, load_reference, load_tokenizer
from fastgrpo.phases import PhaseTimer
from fastgrpo.shared_prefix import plan_step_microbatches, pack_microbatch
from fastgrpo.trainer import Rollout, grpo_update

ROUNDS = int(os.environ.get("FASTGRPO_BENCH_ROUNDS", "3"))
TRAIN_PHASES = ("reference", "old_logprobs", "forward", "backward", "optimizer")
# case -> (prompts, G, prompt length (None: the default run's real prompts), completion lengths)
CASES = {
    "default": (8, 8, None, [8 + (3 * j + 5 * p) % 27 for p in range(8) for j in range(8)]),
    "long-prompt": (2, 8, 1024, [256] * 16),
}
# Extra config for a case run: FASTGRPO_BENCH_OVERRIDES="loss.beta=0.04 train.num_iterations=2" adds the
# reference and old log-prob passes to the timed phases.
OVERRIDES = os.environ.get("FASTGRPO_BENCH_OVERRIDES", "").split()



def _rollout(cfg, tokenizer, case: str) -> Rollout:
    prompts_n, group, prompt_len, completion_lens = CASES[case]
    gen = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    if prompt_len is None:
        problems = load_training_data(cfg.data, seed=cfg.train.seed)[0][:prompts_n]
        prompts = [encode_prompt(tokenizer, build_messages(p["problem"], cfg.data.template, cfg.data.one_shot))
                   for p in problems]
    else:
        prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(prompts_n)]
    completions = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in completion_lens]
    sampler = [[-1.0] * n for n in completion_lens]
    advantages = torch.randn(len(completions), generator=gen)
    return Rollout(prompts, [p for p in range(prompts_n) for _ in range(group)], completions, sampler, advantages,
                   [False] * len(completions))


def saved_for_backward_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn runs (the activations
    kept from forward to backward, the bulk of a micro-batch's peak; one micro-batch here). On CPU
    this replaces torch.profiler's allocation totals, which took minutes per update of the real
    model on 2 cores."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def _packed_tokens(rollout: Rollout, budget: int, shared: bool) -> int:
    plans = plan_step_microbatches(rollout.prompts, rollout.prompt_index, rollout.completions, budget, shared)
    return sum(pack_microbatch(rollout.prompts, rollout.prompt_index, rollout.completions, idx, shared).num_tokens
               for idx in plans)


@pytest.mark.parametrize("case", list(CASES))
def test_shared_prefix_against_prompt_copies(benchmark, model_dir, case):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    max_len = max(CASES[case][3])
    base = [f"model.path={model_dir}", f"rollout.max_completion_length={max_len}",
            "train.max_tokens_per_microbatch=16384", *OVERRIDES]
    cfgs = {layout: load_config(None, [*base, f"train.shared_prefix={str(layout == 'shared').lower()}"])
            for layout in ("copies", "shared")}
    tokenizer = load_tokenizer(model_dir)
    rollout = _rollout(cfgs["shared"], tokenizer, case)
    dtype = getattr(torch, cfgs["shared"].model.dtype)
    policy = load_policy(model_dir, dtype=dtype, device=device)
    reference = load_reference(model_dir, dtype=dtype, device=device) if cfgs["shared"].loss.beta > 0 else None
    # lr 0: every round trains the same weights, so both layouts see the same work each round
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    timer = PhaseTimer(device)
    times: dict[str, list[dict[str, float]]] = {"copies": [], "shared": []}

    def update(layout: str) -> None:
        grpo_update(policy, reference, optimizer, rollout, cfgs[layout], device, timer, max_len)

    def peak_bytes(layout: str) -> int:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            update(layout)
            return torch.cuda.max_memory_allocated() - before
        return saved_for_backward_bytes(lambda: update(layout))

    peaks = {layout: peak_bytes(layout) for layout in ("copies", "shared")}  # also the warm-up
    timer.pop()

    def pair() -> None:
        order = ("copies", "shared") if len(times["copies"]) % 2 == 0 else ("shared", "copies")
        for layout in order:
            update(layout)
            times[layout].append(timer.pop())

    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1, warmup_rounds=0)

    def train_s(layout: str) -> float:
        return statistics.median(sum(t.get(f"{p}_s", 0.0) for p in TRAIN_PHASES) for t in times[layout])

    tokens = {layout: _packed_tokens(rollout, 16384, layout == "shared") for layout in ("copies", "shared")}
    result = {
        layout: dict(packed_tokens=tokens[layout], train_s=round(train_s(layout), 3),
                     phase_s={p: round(statistics.median(t.get(f"{p}_s", 0.0) for t in times[layout]), 3)
                              for p in TRAIN_PHASES},
                     memory_mib=round(peaks[layout] / 2**20, 1))
        for layout in ("copies", "shared")
    }
    ratios = dict(tokens=tokens["copies"] / tokens["shared"], time=train_s("copies") / train_s("shared"),
                  memory=peaks["copies"] / max(peaks["shared"], 1))
    benchmark.extra_info.update(model=model_dir.name, case=case, overrides=OVERRIDES, **result,
                                copies_over_shared={k: round(v, 2) for k, v in ratios.items()})
    print(f"\n{case} ({model_dir.name}, {device}, {' '.join(OVERRIDES) or 'default config'}): "
          + "; ".join(f"{layout} {r['packed_tokens']} tokens {r['train_s']:.3f} s {r['memory_mib']} MiB"
                      for layout, r in result.items())
          + f"; copies/shared: tokens {ratios['tokens']:.2f}x, time {ratios['time']:.2f}x, "
            f"{'peak' if device.type == 'cuda' else 'saved-for-backward'} memory {ratios['memory']:.2f}x")
    assert tokens["shared"] < tokens["copies"] and all(len(t) == ROUNDS for t in times.values())
