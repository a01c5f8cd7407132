"""Adam-atan2 against its formula, the LR schedule, the EMA."""

from __future__ import annotations

import math

import torch

from training.optim import EMA, AdamAtan2, lr_lambda


def test_adam_atan2_matches_formula():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    p0 = p.detach().clone()
    opt = AdamAtan2([p], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    m = torch.zeros_like(p0)
    v = torch.zeros_like(p0)
    ref = p0.clone()
    for t in range(1, 4):
        g = torch.randn(5, 3)
        p.grad = g.clone()
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.95 * v + 0.05 * g * g
        mh, vh = m / (1 - 0.9**t), v / (1 - 0.95**t)
        ref = ref * (1 - 0.01 * 0.1) - 0.01 * 1.27 * torch.atan2(mh, vh.sqrt())
        torch.testing.assert_close(p.detach(), ref, rtol=1e-6, atol=1e-7)
    # no epsilon: a zero gradient on a fresh parameter moves it by weight decay only
    q = torch.nn.Parameter(torch.ones(3))
    q.grad = torch.zeros(3)
    AdamAtan2([q], lr=0.1, weight_decay=0.0).step()
    assert torch.equal(q.detach(), torch.ones(3))


def test_lr_schedule():
    f = lr_lambda(10, 100, "constant")
    assert f(0) == 0.1 and f(9) == 1.0 and f(50) == 1.0
    c = lr_lambda(10, 110, "cosine", 0.1)
    assert c(10) == 1.0 and math.isclose(c(110), 0.1) and math.isclose(c(60), 0.55)


def test_ema():
    m = torch.nn.Linear(2, 2, bias=False)
    ema = EMA(m, 0.9)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    torch.testing.assert_close(ema.state_dict()["weight"], w0 + 0.1)
