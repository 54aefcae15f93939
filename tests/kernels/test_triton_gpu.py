"""The Triton kernels on a CUDA GPU against fp64: what the interpreter cannot check (bf16, the compiled
code, the in-program ordering of the accumulators). Run by the GPU check (stage a); skipped without
CUDA, deselected by `make test` (-m "not gpu").

Same tolerance rule and helpers as the interpreter tests (test_logprob.py, test_fused_grpo.py): a
kernel's error against fp64 is at most K x the naive same-dtype computation's, plus a small atol.
Each case forces one backward form, so both are checked whatever the launcher would pick.
"""
from __future__ import annotations

import math

import pytest
import torch
import test_fused_grpo as tf
import test_logprob as tl

from fastgrpo.kernels.logprob import LogprobParams, TokenLogprobFunction

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKWARDS = ("two-kernel", "atomic")
# Awkward shapes: V a multiple of no block size (unaligned tiles), a single token, aligned H and V
# (the aligned tile table), and SmolLM2's head with N not a multiple of any token block.
SHAPES = [(257, 123, 1001), (1, 123, 1001), (70, 64, 528), (1000, 576, 49152)]


def _cuda(tensors):
    return tuple(t.cuda() for t in tensors)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_token_logprobs_match_fp64_on_gpu(shape, dtype, backward):
    n, h, v = shape
    inputs = _cuda(tl.make_inputs(n, h, v, dtype, seed=n + v))
    params = LogprobParams(0.7, True, impl="triton", bwd_kernel=backward)
    got = tl.fwd_bwd(lambda hh, ww, tt: TokenLogprobFunction.apply(hh, ww, tt, params), *inputs, entropy=True)
    tl.assert_within_naive_error(got, inputs, 0.7, True, dtype)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_token_logprobs_without_entropy_bf16(backward):
    """The kernels compiled without the entropy outputs (another specialization), at temperature 1."""
    inputs = _cuda(tl.make_inputs(257, 123, 1001, torch.bfloat16, seed=3))
    params = LogprobParams(1.0, False, impl="triton", bwd_kernel=backward)
    got = tl.fwd_bwd(lambda hh, ww, tt: TokenLogprobFunction.apply(hh, ww, tt, params), *inputs, entropy=False)
    tl.assert_within_naive_error(got, inputs, 1.0, False, torch.bfloat16)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("i", range(len(tf.TRITON_CASES)), ids=lambda i: "-".join(map(str, tf.TRITON_CASES[i][:5])))
def test_fused_grpo_loss_matches_fp64_on_gpu(i, dtype):
    n, h, v, loss_type, beta, temperature, entropy, weights = tf.TRITON_CASES[i]
    case = tf.make_case(n, h, v, seed=20 + i, num_seqs=5, weights=weights)
    case = {k: None if t is None else t.cuda() for k, t in case.items()}
    kwargs = tf.loss_kwargs(case, loss_type, beta, temperature)
    got, metrics = tf.run(tf.fused(kwargs, return_entropy=entropy, impl="triton"), case, dtype)
    naive_metrics = tf.assert_within_naive_error(got, case, kwargs, entropy, dtype)
    if dtype == torch.float32:
        tf.assert_metrics_close(metrics, naive_metrics, rel=1e-4)
    else:  # bf16 log-probs near a clip boundary may fall on the other side: allow 3 tokens' worth
        assert set(metrics) == set(naive_metrics)
        for name, want in naive_metrics.items():
            assert math.isclose(metrics[name], want, rel_tol=2e-2, abs_tol=3 / n), (name, metrics, naive_metrics)
