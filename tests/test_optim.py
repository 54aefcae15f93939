import pytest
import torch

from fastgrpo.config import TrainConfig
from fastgrpo.optim import build_optimizer, build_scheduler, lr_multiplier


def test_warmup_then_cosine_to_zero():
    cfg = TrainConfig(max_steps=10, warmup_steps=2, lr_schedule="cosine")
    assert lr_multiplier(0, cfg) == pytest.approx(0.5)
    assert lr_multiplier(1, cfg) == pytest.approx(1.0)
    assert lr_multiplier(2, cfg) == pytest.approx(1.0)
    assert lr_multiplier(6, cfg) == pytest.approx(0.5)
    assert lr_multiplier(10, cfg) == pytest.approx(0.0, abs=1e-12)


def test_linear_and_constant():
    assert lr_multiplier(6, TrainConfig(max_steps=10, warmup_steps=2, lr_schedule="linear")) == pytest.approx(0.5)
    assert lr_multiplier(9, TrainConfig(max_steps=10, warmup_steps=0, lr_schedule="constant")) == 1.0


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_optimizers_step_on_cpu(name):
    """bitsandbytes 0.50's CPU backend runs AdamW8bit here (uint8 states)."""
    torch.manual_seed(0)
    # bitsandbytes keeps 8-bit states only for tensors of >= 4096 elements
    p = torch.nn.Parameter(torch.randn(64, 128))
    before = p.detach().clone()
    opt = build_optimizer([p], TrainConfig(optimizer=name, learning_rate=1e-2))
    sched = build_scheduler(opt, TrainConfig(warmup_steps=0))
    (p ** 2).sum().backward()
    opt.step()
    sched.step()
    assert not torch.equal(p.detach(), before)
    # each entry moves against its gradient's sign (Adam's first step is ~lr * sign(g))
    assert torch.all(torch.sign(before - p.detach())[before.abs() > 1e-3] == torch.sign(before)[before.abs() > 1e-3])
    if name == "adamw8bit":
        state = opt.state[p]
        assert state["state1"].dtype == torch.uint8
