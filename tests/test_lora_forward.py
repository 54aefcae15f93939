"""The one-GEMM adapter forward (lora.fused_lora_forward): peft's results and gradients, without peft's
multiply and add passes over the projection output, and peft's own forward wherever it is not the plain case."""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch.utils._python_dispatch import TorchDispatchMode

from fastgrpo import lora
from fastgrpo.config import LoraConfig
from fastgrpo.kernels import fused_grpo_loss
from fastgrpo.model import lm_head_weight, load_policy, packed_hidden_states
from fastgrpo.packing import pack_sequences

from test_lora import randomize_adapters, synthetic_rollout


def _lora_layers(policy) -> list[LoraLinear]:
    return [m for m in policy.modules() if isinstance(m, LoraLinear)]


def _loss_and_grads(policy, rollout):
    batch = pack_sequences(*rollout.sequences([0, 1, 2, 3]))
    loss, logp, *_ = fused_grpo_loss(packed_hidden_states(policy, batch), lm_head_weight(policy), batch.targets,
                                     None, None, rollout.advantages, batch.completion_cu_seqlens)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    return loss.detach(), logp, grads


def test_fused_forward_equals_peft_forward_and_gradients_through_checkpointed_layers(tiny_model_dir):
    # alpha 3 / rank 4: a scaling of 0.75 (not a power of two), so a misplaced scaling cannot cancel out.
    torch.manual_seed(0)
    policy = load_policy(tiny_model_dir, gradient_checkpointing=True, lora=LoraConfig(rank=4, alpha=3.0))
    layers = _lora_layers(policy)
    assert layers and all(m.forward.__func__ is lora.fused_lora_forward for m in layers)  # installed by wrap_model
    randomize_adapters(policy, scale=0.2)
    rollout = synthetic_rollout(policy.config.vocab_size)
    fused = _loss_and_grads(policy, rollout)
    for m in layers:
        del m.forward  # back to peft's own LoRA forward
    peft = _loss_and_grads(policy, rollout)
    torch.testing.assert_close(fused[0], peft[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1], peft[1], rtol=1e-5, atol=1e-5)
    assert fused[2].keys() == peft[2].keys() == {n for n, p in policy.named_parameters() if p.requires_grad}
    for name, grad in peft[2].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(fused[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.ops.append((func.overloadpacket.__name__, tuple(out.shape)))
        return out


def _projection(rank=4, dropout=0.0):
    """One wrapped projection (8 -> 24) of a toy model, with the fused forward installed."""
    torch.manual_seed(0)
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 24, bias=False)

        def forward(self, x):
            return self.proj(x)

    config = PeftLoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=["proj"])
    wrapped = get_peft_model(Toy(), config)
    lora.install_fused_forward(wrapped)
    layer = wrapped.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    return wrapped, layer


def test_the_adapter_update_is_added_inside_the_gemm_not_by_passes_over_the_output():
    wrapped, layer = _projection()
    x = torch.randn(1, 5, 8, requires_grad=True)
    with _Ops() as mode:
        y = wrapped(x)
        y.backward(torch.ones_like(y))
    # peft's forward: mm, mm, mm, then mul and add over the [5, 24] output (and a mul in the backward)
    over_output = [(op, shape) for op, shape in mode.ops if op in ("mul", "add") and shape[-2:] == (5, 24)]
    assert over_output == []
    assert ("addmm", (5, 24)) in mode.ops
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ layer.base_layer.weight.t() + 2.0 * (x @ a.t()) @ b.t()
    torch.testing.assert_close(y, expected)


def test_peft_forward_runs_where_the_layer_is_not_the_plain_case(monkeypatch):
    wrapped, layer = _projection()
    calls = []
    original = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    x = torch.randn(3, 8)
    with wrapped.disable_adapter():  # the KL reference: W only
        torch.testing.assert_close(wrapped(x), x @ layer.base_layer.weight.t())
    assert len(calls) == 1
    wrapped(x)
    assert len(calls) == 1  # the plain case: the fused forward
    dropped, _ = _projection(dropout=0.5)  # dropout on the adapter's input: peft's forward
    dropped(x)
    assert len(calls) == 2
