"""fwd+bwd of per-token log-probs + the GRPO loss from hidden states: fastgrpo's fused one-pass loss
against the naive materialized computation, Liger-Kernel's LigerFusedLinearGRPOLoss and the three bare
matmuls (the floor), at SmolLM2-135M's LM head (N=2,048, H=576, V=49,152) and Qwen2-1.5B's (N=512,
H=1,536, V=151,936).

    pytest benchmarks/bench_kernels.py --benchmark-only

Runs on CUDA (bf16, fastgrpo on its Triton path) when a GPU is present, else on CPU (fp32, fastgrpo's
torch path). Each result's extra_info holds peak_extra_mb (measured in a fresh process per
implementation, see kernel_impls.py), and the run ends with a table of time, time / floor, peak MB and
peak / naive's peak. FASTGRPO_BENCH_ROUNDS sets the timed rounds (default 2 on CPU, 20 on CUDA); the
table shows the fastest round, the least disturbed by other work on the machine. CPU times are
process CPU seconds (see TIMER), about twice the wall time on 2 busy cores.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

import kernel_impls as ki

DEVICE = ki.device()
ROUNDS = int(os.environ.get("FASTGRPO_BENCH_ROUNDS", "20" if DEVICE.type == "cuda" else "2"))
# |loss - naive loss| allowed, relative: fp32 sums in another order on CPU; bf16 logits on CUDA.
LOSS_RTOL = 1e-2 if DEVICE.type == "cuda" else 1e-4


# On CPU the timer is the process's CPU time (all threads): this machine is shared, and wall time
# swung 2x between rounds (the floor at SmolLM2's head: 3.5-4.7 s wall, 2.3-2.4 s CPU). On CUDA,
# wall time after a synchronize.
TIMER = time.perf_counter if DEVICE.type == "cuda" else time.process_time


@pytest.mark.benchmark(timer=TIMER)
@pytest.mark.parametrize("impl", ki.IMPLS)
@pytest.mark.parametrize("shape", list(ki.SHAPES))
def test_logprob_loss_fwd_bwd(benchmark, shape, impl):
    n, h, v, _ = ki.SHAPES[shape]
    peak_extra_mb = ki.peak_extra_mb_in_subprocess(impl, shape)  # first: the inputs below are not yet held
    step = ki.make_step(impl, ki.make_inputs(shape, str(DEVICE)))
    ki.warm_up(impl, DEVICE)

    def run():
        out = step()
        ki.synchronize(DEVICE)
        return out

    loss = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1 if DEVICE.type == "cuda" else 0)
    benchmark.extra_info.update({"peak_extra_mb": round(peak_extra_mb, 1), "device": str(DEVICE),
                                 "dtype": str(ki.dtype_for(DEVICE)), "N": n, "H": h, "V": v})
    seconds = benchmark.stats.stats.min if benchmark.stats is not None else float("nan")
    ki.RESULTS.append({"impl": impl, "shape": shape, "seconds": seconds, "peak_extra_mb": peak_extra_mb,
                       "loss": None if loss is None else loss.item()})
    if loss is not None:
        assert torch.isfinite(loss), f"{impl} gave a non-finite loss at {shape}"
        naive = [r["loss"] for r in ki.RESULTS if r["shape"] == shape and r["impl"] == "naive"]
        if naive:  # every implementation computes the same loss
            assert loss.item() == pytest.approx(naive[0], rel=LOSS_RTOL, abs=1e-6)
