"""token_logprobs: the chunked torch path and the Triton kernels (under TRITON_INTERPRET=1, in a
subprocess) against an fp64 computation; the O(chunk x V) memory property; input errors.

Tolerance rule: a kernel's error against fp64 is at most K x the error of the naive computation in
the same dtype (impl="reference"), plus a small atol, for logp, entropy and both input gradients.
"""
from __future__ import annotations

import sys

import pytest
import torch
from helpers.interpreter_run import run_under_interpreter
from helpers.largest_tensor import LargestTensor

from fastgrpo.kernels import logprob as lp
from fastgrpo.kernels.logprob import (
    LogprobParams,
    TokenLogprobFunction,
    TritonConfig,
    token_logprobs,
)

K = 2.0  # kernel error <= K x naive same-dtype error + atol
ATOL = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 2e-3}  # x max(|truth|, 1)
SHAPES = [(257, 123, 1001), (1, 123, 1001)]  # V=1001 is a multiple of no block size


def make_inputs(n, h, v, dtype, seed):
    """hidden [n, h], weight [v, h] (logits of std ~2), targets [n], upstream grads [n] x 2."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 2 / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    grad_logp, grad_entropy = torch.randn(2, n, generator=gen)
    return hidden, weight, targets, grad_logp, grad_entropy


def fwd_bwd(fn, hidden, weight, targets, grad_logp, grad_entropy, entropy, fp64=False):
    """Run fn(hidden, weight, targets) -> logp (, entropy); backprop random upstream grads.
    fp64: make the leaves float64 (the truth). Returns {"logp", "entropy", "grad_hidden",
    "grad_weight"} as fp64 (entropy None if off)."""
    dtype = torch.float64 if fp64 else hidden.dtype
    hidden = hidden.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_()
    out = fn(hidden, weight, targets)
    logp, ent = out if entropy else (out, None)
    assert logp.dtype == (torch.float64 if fp64 else torch.float32) and logp.shape == targets.shape
    loss = (logp * grad_logp).sum() + ((ent * grad_entropy).sum() if entropy else 0)
    loss.backward()
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    return {"logp": logp.detach().double(), "entropy": ent.detach().double() if entropy else None,
            "grad_hidden": hidden.grad.double(), "grad_weight": weight.grad.double()}


def fp64_logprobs(hidden, weight, targets, temperature, entropy):
    log_probs = torch.log_softmax((hidden.double() @ weight.double().T) / temperature, -1)
    logp = log_probs.gather(-1, targets[:, None])[:, 0]
    return (logp, -(log_probs.exp() * log_probs).sum(-1)) if entropy else logp


def assert_within_naive_error(got, inputs, temperature, entropy, dtype):
    """got vs fp64 truth, bounded by K x (naive same-dtype vs truth) + atol, per output present
    in got (a None gradient is skipped: the caller checks that it is expected)."""
    truth = fwd_bwd(lambda h, w, t: fp64_logprobs(h, w, t, temperature, entropy), *inputs, entropy,
                    fp64=True)
    naive = fwd_bwd(lambda h, w, t: token_logprobs(h, w, t, temperature, entropy, impl="reference"),
                    *inputs, entropy)
    for name, want in truth.items():
        if want is None or got[name] is None:
            continue
        err = (got[name] - want).abs().max().item()
        naive_err = (naive[name] - want).abs().max().item()
        scale = max(want.abs().max().item(), 1.0)  # grad_weight grows with N: relative atol
        assert err <= K * naive_err + ATOL[dtype] * scale, (
            f"{name}: error {err:.3g} vs naive {dtype} error {naive_err:.3g} (scale {scale:.3g})")


# ----------------------------------------------------------------------------------------------
# torch path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature,entropy", [(1.0, False), (0.7, True), (1.0, True), (0.7, False)])
def test_torch_path_matches_fp64(dtype, shape, temperature, entropy):
    inputs = make_inputs(*shape, dtype, seed=shape[0] + int(10 * temperature))
    # 32-token chunks: 257 tokens make nine chunks, the last one of a single token
    params = LogprobParams(temperature, entropy, impl="torch", chunk_tokens=32)
    got = fwd_bwd(lambda h, w, t: TokenLogprobFunction.apply(h, w, t, params), *inputs, entropy)
    assert_within_naive_error(got, inputs, temperature, entropy, dtype)


def test_public_function_default_impl_on_cpu_is_the_torch_path():
    hidden, weight, targets, grad_logp, _ = make_inputs(33, 20, 77, torch.float32, seed=3)
    assert lp.resolve_impl("auto", hidden) == "torch"
    got = token_logprobs(hidden, weight, targets, temperature=0.9)
    want = fp64_logprobs(hidden, weight, targets, 0.9, entropy=False)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("upstream", ["logp", "entropy"])
def test_torch_path_gradient_of_one_output_only(upstream):
    """An unused output reaches backward as None; the other one's gradient must be exact."""
    hidden, weight, targets, grad_out, _ = make_inputs(40, 24, 130, torch.float32, seed=5)
    params = LogprobParams(0.8, True, impl="torch", chunk_tokens=16)
    runs = []
    for fn, dtype in ((lambda h, w: TokenLogprobFunction.apply(h, w, targets, params), torch.float32),
                      (lambda h, w: fp64_logprobs(h, w, targets, 0.8, entropy=True), torch.float64)):
        h, w = hidden.to(dtype).detach().requires_grad_(), weight.to(dtype).detach().requires_grad_()
        logp, ent = fn(h, w)
        ((logp if upstream == "logp" else ent) * grad_out).sum().backward()
        runs.append((h.grad.double(), w.grad.double()))
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_frozen_weight_gets_no_gradient_and_hidden_gradient_is_exact():
    hidden, weight, targets, grad_out, _ = make_inputs(30, 16, 90, torch.float32, seed=6)
    h = hidden.clone().requires_grad_()
    token_logprobs(h, weight, targets).mul(grad_out).sum().backward()
    h64 = hidden.double().requires_grad_()
    fp64_logprobs(h64, weight, targets, 1.0, False).mul(grad_out).sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("entropy", [False, True])
def test_empty_batch(impl, entropy):
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    out = token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), 1.0, entropy, impl=impl)
    outs = out if entropy else (out,)
    for o in outs:
        assert o.shape == (0,) and o.dtype == torch.float32
    sum(o.sum() for o in outs).backward()
    assert hidden.grad.shape == (0, 8) and weight.grad.shape == (50, 8)
    assert not weight.grad.any()


# ----------------------------------------------------------------------------------------------
# memory: the torch path never holds an N x V tensor
# ----------------------------------------------------------------------------------------------


def _largest_in_fwd_bwd(fn, n=96, h=16, v=300):
    hidden, weight, targets, grad_logp, grad_entropy = make_inputs(n, h, v, torch.float32, seed=8)
    hidden.requires_grad_(), weight.requires_grad_()
    with LargestTensor() as mode:
        logp, ent = fn(hidden, weight, targets)
        ((logp * grad_logp).sum() + (ent * grad_entropy).sum()).backward()
    return mode, n * v


def test_torch_path_never_allocates_n_by_v():
    # chunk 8 of N=96: every buffer is 8 x V; weight grad V x H = 4,800 < N x V = 28,800
    params = LogprobParams(1.3, True, impl="torch", chunk_tokens=8)
    mode, n_by_v = _largest_in_fwd_bwd(lambda h, w, t: TokenLogprobFunction.apply(h, w, t, params))
    assert mode.numel < n_by_v, f"{mode.op} made a tensor of {mode.numel} elements >= N x V = {n_by_v}"
    assert mode.numel >= 8 * 300  # the check saw the chunk buffers (the mode is active throughout)


class LargestAllocation(LargestTensor):
    """Records the largest new tensor: outputs that share storage with an input (views such as the
    weight's transpose) are not allocations."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
                    and t.numel() > self.numel):
                self.numel, self.op = t.numel(), func
        return out


def test_frozen_head_allocates_no_weight_sized_tensor_on_the_torch_path():
    """LoRA's frozen LM head: no [V, H] gradient buffer (V x H = 4,800 > chunk 8 x V = 2,400 > N x H)."""
    params = LogprobParams(1.3, True, impl="torch", chunk_tokens=8)
    sizes = {}
    for trainable in (True, False):
        hidden, weight, targets, grad_logp, grad_entropy = make_inputs(96, 16, 300, torch.float32, seed=8)
        hidden.requires_grad_(), weight.requires_grad_(trainable)
        with LargestAllocation() as mode:
            logp, ent = TokenLogprobFunction.apply(hidden, weight, targets, params)
            ((logp * grad_logp).sum() + (ent * grad_entropy).sum()).backward()
        sizes[trainable] = mode.numel
    assert sizes[True] >= 300 * 16  # the probe sees the weight gradient when there is one
    assert sizes[False] < 300 * 16, f"a frozen head still made a tensor of {sizes[False]} elements"


def test_memory_check_catches_the_naive_reference():
    mode, n_by_v = _largest_in_fwd_bwd(
        lambda h, w, t: token_logprobs(h, w, t, 1.3, True, impl="reference"))
    assert mode.numel >= n_by_v


def test_default_chunk_is_bounded_by_the_element_budget():
    params = LogprobParams()
    assert lp._torch_chunk_tokens(100_000, 151_936, params) * 151_936 <= lp.TORCH_CHUNK_ELEMENTS
    assert lp._torch_chunk_tokens(100_000, 10**9, params) == 1
    assert lp._torch_chunk_tokens(5, 1000, params) == 5


# ----------------------------------------------------------------------------------------------
# input errors
# ----------------------------------------------------------------------------------------------
def _good():
    return torch.randn(4, 8), torch.randn(20, 8), torch.tensor([0, 3, 19, 7])


@pytest.mark.parametrize("change,error,match", [
    (lambda h, w, t: (h[None], w, t), ValueError, r"hidden must be 2-D \[N, H\], got shape \(1, 4, 8\)"),
    (lambda h, w, t: (h, w[None], t), ValueError, r"weight must be 2-D \[V, H\], got shape \(1, 20, 8\)"),
    (lambda h, w, t: (h, w[:, :5], t), ValueError, r"hidden has H=8 but weight \[V, H\] has H=5"),
    (lambda h, w, t: (h, w, t[:3]), ValueError, r"targets must be 1-D of length N=4, got shape \(3,\)"),
    (lambda h, w, t: (h, w, t[None]), ValueError, r"targets must be 1-D of length N=4, got shape \(1, 4\)"),
    (lambda h, w, t: (h, w, t.float()), TypeError, r"targets must be an integer tensor .* got torch.float32"),
    (lambda h, w, t: (h, w, t.clone().fill_(20)), ValueError, r"\[0, V=20\), got min 20 and max 20"),
    (lambda h, w, t: (h, w, torch.tensor([-1, 0, 25, 1])), ValueError, r"\[0, V=20\), got min -1 and max 25"),
    (lambda h, w, t: (h, w.double(), t), TypeError, r"share one floating dtype, got torch.float32 and torch.float64"),
])
def test_bad_inputs_raise_with_a_clear_message(change, error, match):
    with pytest.raises(error, match=match):
        token_logprobs(*change(*_good()))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), "0.7", None])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got"):
        token_logprobs(*_good(), temperature=temperature)


def test_unknown_impl_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown impl 'cuda'; valid: auto, triton, torch, reference"):
        token_logprobs(*_good(), impl="cuda")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(lp, "_KERNELS_INTERPRETED", False)
    with pytest.raises(RuntimeError, match=r"impl='triton' needs a CUDA tensor .* hidden is on cpu"):
        token_logprobs(*_good(), impl="triton")
    monkeypatch.setattr(lp, "triton", None)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        token_logprobs(*_good(), impl="triton")
    assert lp.resolve_impl("auto", _good()[0]) == "torch"


# ----------------------------------------------------------------------------------------------
# Triton: specialization, ahead-of-time compilation, and the kernels under the interpreter
# ----------------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(lp.triton is None, reason="Triton is not installed")


@needs_triton
def test_sizes_are_runtime_arguments_and_tiles_constexpr():
    kernels = [entry["kernel"] for entry in lp.triton_configs()]
    assert {k.__name__ for k in kernels} == {"_logprob_fwd_kernel", "_logprob_bwd_hidden_kernel",
                                             "_logprob_bwd_weight_kernel", "_logprob_bwd_atomic_kernel"}
    for kernel in kernels:
        params = {p.name: p for p in kernel.params}
        assert not any(params[name].is_constexpr for name in ("N", "V", "H"))
        assert params["N"].do_not_specialize  # N changes every step: no alignment specializations
        assert all(params[name].is_constexpr for name in ("BLOCK_N", "BLOCK_V", "BLOCK_H", "HAS_ENTROPY"))


@needs_triton
def test_every_kernel_compiles_for_sm86_with_bf16():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for entry in lp.triton_configs():
        if torch.bfloat16 not in entry["dtypes"]:
            continue
        flags = entry["flags"][-1]  # every flag on: the largest variant
        sig, constexprs = lp.triton_signature(entry["kernel_name"], torch.bfloat16, entry["config"], flags)
        compiled = triton.compile(
            ASTSource(fn=entry["kernel"], signature=sig, constexprs=constexprs),
            target=GPUTarget("cuda", 86, 32),
            options={"num_warps": entry["config"].num_warps, "num_stages": entry["config"].num_stages})
        assert "cubin" in compiled.asm
        assert compiled.metadata.shared <= 99 * 1024  # an A40 block's shared-memory limit


def test_backward_kernel_choice(monkeypatch):
    """Off CUDA: "two-kernel"; a request wins; on a known GPU the roofline model decides (numbers in
    logprob_triton.choose_backward_kernel); unknown GPUs get the deterministic "two-kernel"."""
    choose = lp.logprob_triton.choose_backward_kernel
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose(2048, 576, 49152, torch.bfloat16, cpu) == "two-kernel"
    assert choose(2048, 576, 49152, torch.bfloat16, cpu, requested="atomic") == "atomic"
    with pytest.raises(ValueError, match="unknown backward kernel 'fast'; valid: two-kernel, atomic"):
        choose(2048, 576, 49152, torch.bfloat16, cpu, requested="fast")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert choose(2048, 576, 49152, torch.bfloat16, cuda) == "atomic"  # predicted 0.35 vs 0.47 ms
    assert choose(16384, 1536, 151936, torch.bfloat16, cuda) == "two-kernel"  # 31 vs 91 ms
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    assert choose(2048, 576, 49152, torch.bfloat16, cuda) == "two-kernel"


class _RecordingKernel:
    """Stands in for a jit kernel: `kernel[grid](*args, **constexprs)` records the tiles."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, TritonConfig(kwargs["BLOCK_N"], kwargs["BLOCK_V"], kwargs["BLOCK_H"],
                                                          kwargs["num_warps"], kwargs["num_stages"])))
        return launch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("h,v,aligned", [(64, 512, True), (64, 50257, False), (45, 512, False)])
@pytest.mark.parametrize("backward", ["two-kernel", "atomic"])
def test_launchers_pick_aligned_or_unaligned_tiles(monkeypatch, dtype, h, v, aligned, backward):
    """The launchers take the tiles that tests/kernels/test_compile.py compiled for the kernel the JIT
    builds: the aligned table only when H, V and every input address are multiples of 16."""
    lpt = lp.logprob_triton
    launches = []
    for name in lpt.KERNEL_NAMES:
        monkeypatch.setattr(lpt, f"_logprob_{name}_kernel", _RecordingKernel(name, launches))
    hidden, weight, targets, grad_logp, _ = make_inputs(5, h, v, dtype, seed=0)
    params = LogprobParams(1.0, False, impl="triton", bwd_kernel=backward)
    _, lse, _ = lpt.logprob_forward(hidden, weight, targets, params)
    lpt.logprob_backward(hidden, weight, targets, lse, None, grad_logp, None, params)
    expected = ["fwd", "bwd_hidden", "bwd_weight"] if backward == "two-kernel" else ["fwd", "bwd_atomic"]
    assert [name for name, _ in launches] == expected
    for name, tiles in launches:
        assert tiles == lpt.default_config(name, dtype, aligned), name
    if aligned:  # an input at an address 2 or 4 bytes off 16 makes the same sizes unaligned
        launches.clear()
        offset_hidden = torch.empty(hidden.numel() + 1, dtype=dtype)[1:].view_as(hidden).copy_(hidden)
        lpt.logprob_forward(offset_hidden, weight, targets, params)
        assert launches == [("fwd", lpt.default_config("fwd", dtype, aligned=False))]


# Small tiles so that every axis has several tiles and a partial one: N=67 -> 5 token blocks of 16,
# V=300 -> 5 vocab tiles of 64, H=45 -> 3 steps of 16; `splits` vocab splits in the forward and in
# bwd_hidden (2: columns 0-255 in two steps of two tiles, then 256-299, whose second tile lies past
# V), and `splits` persistent bwd_weight programs (5 vocab blocks over 2 programs: 3 and 2; steps of
# 32 tokens, the last one's second tile past N). "large": 64/128/64 tiles; "default": the
# launchers' own tiles (32 x 2x256 and 2x256 x 32 in the backward).
SMALL_TILES = TritonConfig(16, 64, 16, num_warps=4, num_stages=1)
LARGE_TILES = TritonConfig(64, 128, 64, num_warps=4, num_stages=1)
TRITON_CASES = [  # (n, h, v, dtype name, temperature, entropy, tiles, splits, weight needs grad, backward)
    *[(67, 45, 300, d, t, e, "small", 2, True, "two-kernel")
      for d in ("float32", "float16") for t in (1.0, 0.7) for e in (False, True)],
    (1, 45, 300, "float32", 0.7, True, "small", 3, True, "two-kernel"),
    (67, 45, 300, "float16", 1.0, True, "small", 1, False, "two-kernel"),
    (257, 123, 1001, "float32", 0.7, True, "large", 2, True, "two-kernel"),
    (257, 123, 1001, "float16", 1.0, True, "default", None, True, "two-kernel"),  # the unaligned tiles
    (70, 64, 528, "float16", 0.7, True, "default", None, True, "two-kernel"),  # the aligned tiles
    (70, 64, 528, "float32", 1.0, True, "default", None, True, "atomic"),
    (0, 45, 300, "float32", 1.0, True, "small", 2, True, "two-kernel"),
    (67, 45, 300, "float32", 0.7, True, "small", 2, True, "atomic"),
    (67, 45, 300, "float16", 1.0, False, "small", 2, True, "atomic"),
    (67, 45, 300, "float16", 0.7, True, "small", 2, False, "atomic"),
]
TILES = {"small": SMALL_TILES, "large": LARGE_TILES, "default": None}


class LargestFloat32(LargestTensor):
    """Records the largest fp32 tensor any op produces."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


def _triton_params(temperature, entropy, tiles, splits, backward):
    return LogprobParams(temperature, entropy, impl="triton", fwd_config=TILES[tiles], bwd_config=TILES[tiles],
                         fwd_splits=splits, bwd_splits=splits, bwd_weight_programs=splits, bwd_kernel=backward)


def _triton_worker(out_path):
    """Runs in a subprocess with TRITON_INTERPRET=1: fwd+bwd of every TRITON_CASES entry, and the
    largest fp32 tensor of each backward on fp16 inputs."""
    assert lp._KERNELS_INTERPRETED, "TRITON_INTERPRET=1 must be set before the module is imported"
    results = []
    for i, (n, h, v, dtype, temperature, entropy, tiles, splits, weight_grad, backward) in enumerate(TRITON_CASES):
        params = _triton_params(temperature, entropy, tiles, splits, backward)
        hidden, weight, targets, grad_logp, grad_entropy = make_inputs(n, h, v, getattr(torch, dtype), seed=i)
        hidden.requires_grad_(), weight.requires_grad_(weight_grad)
        out = TokenLogprobFunction.apply(hidden, weight, targets, params)
        logp, ent = out if entropy else (out, None)
        ((logp * grad_logp).sum() + ((ent * grad_entropy).sum() if entropy else 0)).backward()
        results.append({"logp": logp.detach(), "entropy": None if ent is None else ent.detach(),
                        "grad_hidden": hidden.grad, "grad_weight": weight.grad})
    largest_fp32 = {}
    for backward in ("two-kernel", "atomic"):
        hidden, weight, targets, grad_logp, _ = make_inputs(67, 45, 300, torch.float16, seed=0)
        hidden.requires_grad_(), weight.requires_grad_()
        logp = TokenLogprobFunction.apply(hidden, weight, targets, _triton_params(1.0, False, "small", 2, backward))
        with LargestFloat32() as mode:
            (logp * grad_logp).sum().backward()
        largest_fp32[backward] = mode.numel
        weight.requires_grad_(False)  # a frozen head (LoRA): no [V, H] buffer in any dtype
        logp = TokenLogprobFunction.apply(hidden, weight, targets, _triton_params(1.0, False, "small", 2, backward))
        with LargestAllocation() as mode:
            (logp * grad_logp).sum().backward()
        largest_fp32[f"{backward}-frozen"] = mode.numel
    torch.save({"cases": results, "largest_fp32": largest_fp32}, out_path)


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    """The interpreter must be on before Triton decorates the kernels, which this process already
    did: run all cases in one fresh interpreter-mode process (~40 s)."""
    out_path = tmp_path_factory.mktemp("triton") / "results.pt"
    run_under_interpreter(__file__, "--triton-worker", out_path, timeout=900)
    return torch.load(out_path)


@needs_triton
@pytest.mark.parametrize("case", range(len(TRITON_CASES)),
                         ids=lambda i: "-".join(map(str, TRITON_CASES[i][:6] + TRITON_CASES[i][9:])))
def test_triton_kernels_match_fp64_under_interpreter(triton_results, case):
    n, h, v, dtype, temperature, entropy, _, _, weight_grad, _ = TRITON_CASES[case]
    dtype = getattr(torch, dtype)
    inputs = make_inputs(n, h, v, dtype, seed=case)
    got = {k: (None if x is None else x.double()) for k, x in triton_results["cases"][case].items()}
    assert got["logp"].shape == (n,)
    assert (got["grad_weight"] is None) == (not weight_grad)
    if n == 0:
        assert got["grad_hidden"].shape == (0, h) and got["entropy"].shape == (0,)
        return
    assert_within_naive_error(got, inputs, temperature, entropy, dtype)


@needs_triton
def test_two_kernel_backward_holds_no_fp32_copy_of_the_weight(triton_results):
    """fp16 weight [300, 45]: the atomic backward accumulates grad_weight in an fp32 [V, H] buffer;
    the two-kernel one only in fp32 partials [2 splits, 67, 45] and a workspace [2 programs, 64, 45]."""
    largest = triton_results["largest_fp32"]
    assert largest["atomic"] >= 300 * 45  # the probe sees the kernels' buffers
    assert largest["two-kernel"] == max(2 * 67 * 45, 2 * 64 * 45)
    # a frozen weight: bwd_weight is not launched and the atomic kernel gets no [V, H] accumulator
    assert largest["two-kernel-frozen"] < 300 * 45 and largest["atomic-frozen"] < 300 * 45


if __name__ == "__main__" and sys.argv[1:2] == ["--triton-worker"]:
    _triton_worker(sys.argv[2])
