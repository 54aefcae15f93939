import pytest
import torch

from fastgrpo.advantages import group_advantages


def test_group_std_scaling_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, group_size=4, scale="group", eps=0.0)
    g0 = torch.tensor([1.0, 0.0, 0.0, 0.0])
    expected0 = (g0 - 0.25) / g0.std()
    torch.testing.assert_close(adv[:4], expected0)
    # a group whose rewards all agree carries no signal
    assert torch.all(adv[4:] == 0)


def test_batch_and_none_scaling():
    r = torch.tensor([1.0, 0.0, 2.0, 2.0])
    centered = torch.tensor([0.5, -0.5, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(r, 2, "none"), centered)
    torch.testing.assert_close(group_advantages(r, 2, "batch", eps=0.0), centered / r.std())


def test_errors_list_valid_names():
    with pytest.raises(ValueError, match="valid: group, batch, none"):
        group_advantages(torch.zeros(4), 2, "zscore")
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        group_advantages(torch.zeros(4), 3)
