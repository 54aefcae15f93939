"""The roofline model of fastgrpo.kernels.roofline on small shapes whose FLOPs and bytes are counted
by hand in the comments, on the benchmark shapes against closed forms, and the backward choice the
Triton launcher makes from it."""
from __future__ import annotations

import dataclasses

import pytest

from fastgrpo.kernels import aot, roofline
from fastgrpo.kernels.logprob_triton import default_config_for_itemsize

TINY = roofline.Shape("tiny", N=2, H=3, V=5)  # N*V = 10 logits, (N + V) * H = 21
BIG_L2 = roofline.GPU("test", 86, bf16_flops=1e12, mem_bytes_per_s=1e9, l2_bytes=1 << 30, sms=1)
NO_L2 = dataclasses.replace(BIG_L2, l2_bytes=0)


def test_roofline_takes_the_slower_of_compute_and_memory():
    h100 = roofline.GPUS["H100"]
    seconds, bound = roofline.roofline_seconds(1e12, 1e9, h100)  # 1.011 ms of math, 0.299 ms of memory
    assert bound == "compute" and seconds == pytest.approx(1e12 / 989e12)
    seconds, bound = roofline.roofline_seconds(1e9, 1e10, h100)  # 0.001 ms of math, 2.985 ms of memory
    assert bound == "memory" and seconds == pytest.approx(1e10 / 3350e9)
    a40 = roofline.GPUS["A40"]
    assert roofline.roofline_seconds(149.7e12, 696e9, a40) == (pytest.approx(1.0), "compute")  # a tie


def test_a_path_is_the_sum_of_its_kernels():
    one_s_compute = roofline.Traffic("a", 1e12, (("x", 1.0),))  # 1 s of math on BIG_L2
    two_s_memory = roofline.Traffic("b", 0, (("y", 2e9),))  # 2 s of memory
    pred = roofline.predict([one_s_compute, two_s_memory], BIG_L2)
    assert pred.seconds == pytest.approx(3.0) and pred.bound == "memory"
    assert pred.flops == 1e12 and pred.bytes == 2e9 + 1


def test_naive_traffic_by_hand():
    kernels = roofline.naive_kernels(TINY, itemsize=2)
    assert sum(k.flops for k in kernels) == 6 * 2 * 3 * 5  # 180
    # fwd: matmul 21*3... (N+V)H*2 = 42 + logits 10*2 = 62; .float() 10*(2+4) = 60; /T 80;
    #      log_softmax 80; gather N*(8+4) = 24
    # bwd: zeros + scatter 40 + 24 = 64; log_softmax 120; /T 80; cast 60;
    #      g @ W 20 + 30 + 12 = 62; g.T @ hidden 20 + 12 + 30 = 62
    assert sum(k.bytes for k in kernels) == 62 + 60 + 80 + 80 + 24 + 64 + 120 + 80 + 60 + 62 + 62  # 754


def test_naive_traffic_is_58_bytes_per_logit_plus_the_matmul_operands():
    for shape in roofline.SHAPES.values():
        N, H, V = shape.N, shape.H, shape.V
        assert sum(k.bytes for k in roofline.naive_kernels(shape)) == 58 * N * V + 3 * (N + V) * H * 2 + 24 * N


def test_forward_traffic_by_hand():
    traffic = roofline.forward_traffic(TINY, BIG_L2, itemsize=2)
    assert traffic.flops == 2 * 30
    # one token block, 4 * 1 SM / 1 block = 4 splits wanted, but V has 1 tile: 1 split, 1 wave.
    # hidden 12 + targets 16 + weight 30 + partials 2*4*1*2*4 = 64 + logp, lse 16 = 138
    assert traffic.bytes == 138


def test_two_kernel_backward_by_hand_when_everything_fits_in_l2():
    hidden, weight = roofline.two_kernel_backward_traffic(TINY, BIG_L2, itemsize=2)
    assert hidden.flops == weight.flops == 4 * 30  # each: logit recompute + one gradient matmul
    # bwd_hidden: hidden 12 + targets, lse, grad_logp 32 + weight 30 (1 wave) + fp32 partials 1*6*4 = 24
    #             + torch sum (read 24) and cast (write 12) = 134
    assert hidden.bytes == 134
    # bwd_weight: weight 30 + hidden, vectors 44 (1 round) + no workspace (one step covers N=2)
    #             + grad_weight 30 = 104
    assert weight.bytes == 104


def test_two_kernel_accumulators_past_l2_by_hand():
    cfg = default_config_for_itemsize("bwd_hidden", 2)
    assert (cfg.block_n, cfg.block_v) == (32, 256)
    shape = roofline.Shape("wide", N=2, H=3, V=5000)
    hidden, _ = roofline.two_kernel_backward_traffic(shape, NO_L2)
    # steps of 2*256 columns: 10; 4 splits wanted (1 SM x 4, 1 token block) -> 3 steps per split,
    # splits = cdiv(5000, 1536) = 4; every step writes 6 fp32 rows, every step but the first reads them:
    # 4 splits * 24 bytes * (2*3 - 1) = 480
    assert dict(hidden.terms)["fp32 partials past L2: read + write per step"] == 480
    cfg = default_config_for_itemsize("bwd_weight", 2)
    assert (cfg.block_n, cfg.block_v) == (256, 32)
    shape = roofline.Shape("long", N=600, H=3, V=5)
    _, weight = roofline.two_kernel_backward_traffic(shape, NO_L2)
    # steps of 2*256 tokens: 2; the workspace is written after step 1 and read in step 2: 8 * V*H = 120
    assert dict(weight.terms)["fp32 workspace past L2: read + write per step"] == 120


def test_atomic_backward_counts_every_atomic_when_grad_hidden_misses_l2():
    (fits,) = roofline.atomic_backward_traffic(TINY, BIG_L2, itemsize=2)
    assert fits.flops == 6 * 30
    # weight 30 + vectors 32 + zero 21*4 = 84 + hidden 12 + grad_hidden 2*6*4 = 48 + grad_weight 2*15*4 = 120
    # + cast 21*(4+2) = 126 = 452
    assert fits.bytes == 452
    (past,) = roofline.atomic_backward_traffic(TINY, NO_L2, itemsize=2)
    # 1 vocab block: hidden re-read 12, atomics 8 * 6 = 48: the same bytes as when it fits
    assert past.bytes == 452
    wide = roofline.Shape("wide", N=2, H=3, V=1000)  # 8 vocab blocks of 128
    terms = dict(roofline.atomic_backward_traffic(wide, NO_L2)[0].terms)
    assert terms["grad_hidden fp32 atomics past L2: 8 bytes x 8 vocab blocks"] == 8 * 6 * 8
    assert terms["read hidden x 8 vocab blocks (past L2)"] == 12 * 8


def test_the_launcher_picks_the_faster_predicted_backward():
    for shape in roofline.SHAPES.values():
        for gpu in roofline.GPUS.values():
            pred = roofline.predict_logprob(shape, gpu)
            faster = min(pred["two-kernel"].seconds, pred["atomic"].seconds)
            assert pred["fused"].seconds == faster
            assert roofline.choose_backward(shape, gpu) == (
                "atomic" if pred["atomic"].seconds < pred["two-kernel"].seconds else "two-kernel")


def test_predictions_at_benchmark_shapes_match_closed_forms():
    h100 = roofline.GPUS["H100"]
    shape = roofline.SHAPES["smollm2-135m"]
    N, H, V = shape.N, shape.H, shape.V
    pred = roofline.predict_logprob(shape, h100)
    # every fused kernel is compute-bound here: atomic 2NHV + 6NHV, two-kernel 2NHV + 4NHV + 4NHV
    assert pred["atomic"].seconds == pytest.approx(8 * N * H * V / 989e12)
    assert pred["two-kernel"].seconds == pytest.approx(10 * N * H * V / 989e12)
    assert pred["fused"].seconds == pred["atomic"].seconds
    # naive: its three matmuls compute-bound (6NHV), its elementwise ops memory-bound (58 bytes/logit)
    matmul_bytes = 3 * (N + V) * H * 2 + 6 * N * V  # operands; logits written, their grad read twice
    assert pred["naive"].seconds == pytest.approx(
        6 * N * H * V / 989e12 + (58 * N * V + 3 * (N + V) * H * 2 + 24 * N - matmul_bytes) / 3350e9)
    # 16k tokens: the two-kernel backward is compute-bound on an H100 (accumulators fit in 50 MB of L2)
    big = roofline.SHAPES["train-16k"]
    hidden, weight = roofline.two_kernel_backward_traffic(big, h100)
    assert roofline.predict([hidden, weight], h100).seconds == pytest.approx(8 * big.N * big.H * big.V / 989e12)
    line = roofline.describe_prediction(shape, h100)
    assert "not measured" in line and "H100" in line and "fused 0.469 ms" in line


@pytest.mark.parametrize("name,expected", [
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA A40", "A40"),
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 NVL", "H100"),
    ("NVIDIA A10", None), ("NVIDIA RTX A4000", None), ("NVIDIA L40S", None), ("NVIDIA H200", "H200"),
    ("NVIDIA B200", None),
])
def test_gpu_for_device_name(name, expected):
    gpu = roofline.gpu_for_device_name(name)
    assert (gpu.name if gpu else None) == expected


def test_every_gpu_maps_to_a_compile_target():
    for gpu in roofline.GPUS.values():
        assert gpu.cc in aot.TARGETS, gpu
