"""Adam-atan2 against its formula, the LR schedule, the EMA."""

from __future__ import annotations

import math

import torch

from training.optim import EMA, AdamAtan2, lr_lambda


def test_adam_atan2_matches_the_reference_update():
    """The reference's step: decay first, then lr/bc1 * atan2(m, sqrt(v)/sqrt(bc2)); no a=1.27 factor,
    and the first-moment correction outside atan2 (not atan2(m_hat, sqrt(v_hat)))."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    p0 = p.detach().clone()
    opt = AdamAtan2([p], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    m = torch.zeros_like(p0)
    v = torch.zeros_like(p0)
    ref = p0.clone()
    for t in range(1, 5):
        g = torch.randn(5, 3) * 1e-3  # small gradients: atan2's bound and the bc1 placement both matter
        p.grad = g.clone()
        opt.step()
        ref = ref * (1 - 0.01 * 0.1)
        m = 0.9 * m + 0.1 * g
        v = 0.95 * v + 0.05 * g * g
        bc1, bc2 = 1 - 0.9**t, 1 - 0.95**t
        ref = ref - (0.01 / bc1) * torch.atan2(m, v.sqrt() / math.sqrt(bc2))
        torch.testing.assert_close(p.detach(), ref, rtol=1e-6, atol=1e-7)
    # step 1 by hand on one scalar: m = 0.1 g, sqrt(v)/sqrt(bc2) = |g|, so the move is lr/0.1 * atan(0.1)
    q = torch.nn.Parameter(torch.tensor([1.0]))
    q.grad = torch.tensor([0.5])
    AdamAtan2([q], lr=0.01, weight_decay=0.0).step()
    torch.testing.assert_close(q.detach(), torch.tensor([1.0 - 0.1 * math.atan(0.1)]))
    # no epsilon: a zero gradient on a fresh parameter moves it by weight decay only
    q = torch.nn.Parameter(torch.ones(3))
    q.grad = torch.zeros(3)
    AdamAtan2([q], lr=0.1, weight_decay=0.0).step()
    assert torch.equal(q.detach(), torch.ones(3))


def test_parameters_without_gradient_are_skipped():
    """grad None: no decay, no state (the reference). skip_zero_grad: the same for an all-zero gradient
    (ZeRO's flat buffers), while a tensor with any nonzero entry is stepped and decayed."""
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = AdamAtan2([a, b], lr=0.1, weight_decay=0.5)
    b.grad = torch.ones(4)
    opt.step()
    assert torch.equal(a.detach(), torch.ones(4)) and a not in opt.state
    assert not torch.equal(b.detach(), torch.ones(4))

    z, nz = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = AdamAtan2([z, nz], lr=0.1, weight_decay=0.5, skip_zero_grad=True)
    z.grad, nz.grad = torch.zeros(4), torch.tensor([0.0, 0.0, 0.0, 1.0])
    opt.step()
    assert torch.equal(z.detach(), torch.ones(4)) and z not in opt.state
    assert (nz.detach()[:3] == 1 - 0.1 * 0.5).all() and int(opt.state[nz]["step"]) == 1
    # without the flag an all-zero gradient is a real (decaying) step
    w = torch.nn.Parameter(torch.ones(4))
    w.grad = torch.zeros(4)
    AdamAtan2([w], lr=0.1, weight_decay=0.5).step()
    assert torch.equal(w.detach(), torch.full((4,), 0.95))


def test_embedding_has_its_own_param_group():
    from model import ModelConfig, build_model
    from training.optim import param_groups

    model = build_model(ModelConfig.preset("debug"))
    groups = param_groups(model, 0.1)
    embed = [g for g in groups if any(p is model.embed.weight for p in g["params"])]
    assert len(embed) == 1 and len(embed[0]["params"]) == 1 and embed[0]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


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
