"""The roofline model of fastgrpo.kernels.aot on small shapes whose FLOPs and bytes are counted by
hand in the comments, and on one benchmark shape against its closed form."""
from __future__ import annotations

import dataclasses

import pytest

from fastgrpo.kernels import aot

TINY = aot.Shape("tiny", N=2, H=3, V=5)  # N*V = 10 logits, (N + V) * H = 21
BIG_L2 = aot.GPU("test", 86, bf16_flops=1e12, mem_bytes_per_s=1e9, l2_bytes=1 << 30, sms=1)


def test_roofline_takes_the_slower_of_compute_and_memory():
    h100 = aot.GPUS["H100"]
    seconds, bound = aot.roofline_seconds(1e12, 1e9, h100)  # 1.011 ms of math, 0.299 ms of memory
    assert bound == "compute" and seconds == pytest.approx(1e12 / 989e12)
    seconds, bound = aot.roofline_seconds(1e9, 1e10, h100)  # 0.001 ms of math, 2.985 ms of memory
    assert bound == "memory" and seconds == pytest.approx(1e10 / 3350e9)
    a40 = aot.GPUS["A40"]
    assert aot.roofline_seconds(149.7e12, 696e9, a40) == (pytest.approx(1.0), "compute")  # a tie


def test_naive_traffic_by_hand():
    traffic = aot.naive_traffic(TINY, itemsize=2)
    assert traffic.flops == 6 * 2 * 3 * 5  # 180
    # fwd: matmul 21*3... (N+V)H*2 = 42 + logits 10*2 = 62; .float() 10*(2+4) = 60; /T 80;
    #      log_softmax 80; gather N*(8+4) = 24
    # bwd: zeros + scatter 40 + 24 = 64; log_softmax 120; /T 80; cast 60;
    #      g @ W 20 + 30 + 12 = 62; g.T @ hidden 20 + 12 + 30 = 62
    assert traffic.bytes == 62 + 60 + 80 + 80 + 24 + 64 + 120 + 80 + 60 + 62 + 62  # 754


def test_naive_traffic_is_58_bytes_per_logit_plus_the_matmul_operands():
    for shape in aot.SHAPES.values():
        N, H, V = shape.N, shape.H, shape.V
        assert aot.naive_traffic(shape).bytes == 58 * N * V + 3 * (N + V) * H * 2 + 24 * N


def test_fused_traffic_by_hand_when_the_accumulator_fits_in_l2():
    traffic = aot.fused_traffic(TINY, BIG_L2, itemsize=2, block_n=64, block_v=128)
    assert traffic.flops == 2 * 30 + 6 * 30  # fwd logits; bwd recompute + grad_hidden + grad_weight
    # one token block, 4 * 1 SM / 1 block = 4 splits wanted, but V has 1 tile: 1 split.
    # fwd: hidden 12 + weight 30 + targets 16 + partials 2*4*1*2*4 = 64 + logp, lse 16 = 138
    # bwd: hidden, weight 42 + targets, lse, grad 32 + zero 21*4 = 84 + grad_hidden 2*6*4 = 48
    #      + grad_weight 2*15*4 = 120 + cast 21*(4+2) = 126 = 452
    assert traffic.bytes == 138 + 452


def test_fused_traffic_counts_every_atomic_when_grad_hidden_misses_l2():
    no_l2 = dataclasses.replace(BIG_L2, l2_bytes=0)
    traffic = aot.fused_traffic(TINY, no_l2, itemsize=2, block_n=64, block_v=2)
    # 3 vocab blocks -> 3 splits: partials 2*4*3*2*4 = 192; fwd 12 + 30 + 16 + 192 + 16 = 266
    # bwd: 42 + 32 + 84 + atomics 8 bytes * 6 elements * 3 vocab blocks = 144 + 120 + 126 = 548
    assert traffic.bytes == 266 + 548
    atomics = dict(traffic.terms)
    assert sum(v for k, v in atomics.items() if "atomics past L2" in k) == 144


def test_predictions_at_a_benchmark_shape_match_the_closed_form():
    shape, h100 = aot.SHAPES["smollm2-135m"], aot.GPUS["H100"]
    N, H, V = shape.N, shape.H, shape.V
    pred = aot.predict_logprob(shape, h100)
    # fused: 8NHV = 463.9 GFLOP at 989 TFLOP/s = 0.469 ms, well above its 0.65 GB / 3.35 TB/s
    assert pred["fused"].bound == "compute"
    assert pred["fused"].seconds == pytest.approx(8 * N * H * V / 989e12)
    # naive: 58 bytes per logit of 100.7M logits + operands = 6.02 GB at 3.35 TB/s = 1.80 ms
    assert pred["naive"].bound == "memory"
    assert pred["naive"].seconds == pytest.approx((58 * N * V + 6 * (N + V) * H + 24 * N) / 3350e9)
    line = aot.describe_prediction(shape, h100)
    assert "not measured" in line and "H100" in line and "0.469 ms" in line


def test_every_gpu_maps_to_a_compile_target():
    for gpu in aot.GPUS.values():
        assert gpu.cc in aot.TARGETS, gpu
