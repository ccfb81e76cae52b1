"""The weights' EMA shared by the student trainer and the toy teacher's training script."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from twostep.common.ema import EMA


def _module(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    m[1].weight.requires_grad_(False)  # frozen: not averaged
    return m


def test_trainer_and_toy_teacher_use_the_same_ema():
    from twostep.toy import train_transformer
    from twostep.trainer.checkpoint import EMA as TrainerEMA

    assert TrainerEMA is EMA and train_transformer.EMA is EMA


def test_update_follows_the_decay_with_its_warm_up():
    m = _module(0)
    ema = EMA(m, decay=0.9)
    assert set(ema.state_dict()) == {n for n, p in m.named_parameters() if p.requires_grad}
    expected = {n: p.detach().clone() for n, p in m.named_parameters()}
    for step in range(5):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        ema.update(m, step)
        d = min(0.9, (1 + step) / (10 + step))  # 0.1, 0.18, ...: early weights fade fast
        for n, p in m.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach()
    for n, v in ema.state_dict().items():
        torch.testing.assert_close(v, expected[n], atol=1e-6, rtol=1e-6)
    assert "1.weight" not in ema.state_dict()


def test_copy_to_keeps_the_ema_weights_and_applied_restores_the_raw_ones():
    m, other = _module(0), _module(1)
    ema = EMA(other, decay=0.5)
    raw = {k: v.clone() for k, v in m.state_dict().items()}
    with ema.applied(m):
        assert torch.equal(m[0].weight, other[0].weight)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in raw.items())
    ema.copy_to(m)
    assert torch.equal(m[0].weight, other[0].weight) and torch.equal(m[2].bias, other[2].bias)
    assert torch.equal(m[1].weight, raw["1.weight"])  # not averaged, so not touched


def test_load_state_dict_ignores_extra_keys_and_names_a_missing_one():
    m = _module(0)
    ema = EMA(m, decay=0.5)
    full = {k: torch.zeros_like(v) for k, v in m.state_dict().items()}  # a whole state dict: more keys
    ema.load_state_dict(full)
    assert all(v.abs().sum() == 0 for v in ema.state_dict().values())
    del full["2.bias"]
    with pytest.raises(KeyError, match=r"2\.bias"):
        ema.load_state_dict(full)
