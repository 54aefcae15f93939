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


def test_cosine_decays_to_the_floor():
    cfg = TrainConfig(max_steps=10, warmup_steps=0, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(1.0)
    assert lr_multiplier(5, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(10, cfg) == pytest.approx(0.1)


def test_cpu_adamw_is_fused_and_matches_the_foreach_update():
    torch.manual_seed(0)
    start = torch.randn(300, 70)
    grads = [torch.randn(300, 70) for _ in range(3)]
    cfg = TrainConfig(learning_rate=1e-2, weight_decay=0.1)
    ours = torch.nn.Parameter(start.clone())
    opt = build_optimizer([ours], cfg)
    assert opt.defaults["fused"] is True
    plain = torch.nn.Parameter(start.clone())
    ref = torch.optim.AdamW([plain], lr=1e-2, betas=cfg.adam_betas, weight_decay=0.1, foreach=True)
    for g in grads:
        ours.grad, plain.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert not torch.equal(ours.detach(), start)
    torch.testing.assert_close(ours.detach(), plain.detach(), rtol=1e-5, atol=1e-6)
