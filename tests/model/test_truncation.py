"""Truncated backprop: which module calls get gradient, and the warmup schedule of bp."""

import pytest
import torch

from model import ModelConfig, bp_schedule, build_model, pack_samples


def batch():
    return pack_samples([([5, 6, 7], [8, 9, 10, 11]), ([12, 13], [14, 15, 16])], seq_len=16)


def calls_with_gradient(model, bp):
    got: set[str] = set()
    seen: list[str] = []

    def hook(name, z):
        seen.append(name)
        if z.requires_grad:
            z.register_hook(lambda g, name=name: got.add(name) if g.abs().sum() > 0 else None)

    model.zero_grad(set_to_none=True)
    out = model(**batch().as_kwargs(), bp=bp, state_hook=hook)
    out.loss.backward()
    assert seen == list(model.cfg.call_names)  # all 8 calls run forward whatever bp is
    return got


@pytest.mark.parametrize("bp", range(2, 9))
def test_exactly_bp_calls_receive_gradient(bp):
    model = build_model(ModelConfig.preset("debug"))
    got = calls_with_gradient(model, bp)
    h_bp, l_bp = min(2, bp - 1), bp - min(2, bp - 1)
    assert len(got) == bp
    assert got == {f"H{i}" for i in range(2 - h_bp, 2)} | {f"L{i}" for i in range(6 - l_bp, 6)}
    assert got == set(model.cfg.grad_calls(bp))


def test_bp5_is_the_last_five_calls():
    model = build_model(ModelConfig.preset("debug"))
    assert calls_with_gradient(model, 5) == {"H0", "L3", "L4", "L5", "H1"}
    assert calls_with_gradient(model, 2) == {"L5", "H1"}


def test_embedding_gets_no_gradient_at_bp2_on_purpose():
    """x enters only through H0's input, and H0 runs without gradient at bp = 2."""
    model = build_model(ModelConfig.preset("debug"))
    calls_with_gradient(model, 2)
    assert model.embed.weight.grad is None
    for name, p in model.named_parameters():
        if name != "embed.weight":
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    calls_with_gradient(model, 3)  # H0 joins: the embedding learns from bp = 3 on
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0


def test_bp_does_not_change_the_forward_values():
    model = build_model(ModelConfig.preset("debug"))
    b = batch().as_kwargs()
    ref = model(**b, bp=8).logits
    for bp in (2, 5):
        assert torch.equal(model(**b, bp=bp).logits, ref)
    with torch.no_grad():
        assert torch.equal(model(**b).logits, ref)


def test_transformer_ignores_bp_and_trains_everything():
    model = build_model(ModelConfig.preset("debug", arch="transformer"))
    model(**batch().as_kwargs(), bp=2).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bp_schedule_staircase():
    total = 1000  # warmup = 200 steps
    values = [bp_schedule(s, total) for s in range(total)]
    assert values[0] == 2 and values[66] == 2 and values[67] == 3 and values[134] == 4
    assert values[199] == 4 and values[200] == 5 and values[-1] == 5
    assert sorted(set(values)) == [2, 3, 4, 5]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert bp_schedule(10, 100, warmup_frac=0.0) == 5
    assert bp_schedule(0, 10, start=3, end=3) == 3


@pytest.mark.parametrize(
    "cycles,bp,expected",
    [
        (1, 2, {"H0", "L2"}),
        (1, 4, {"H0", "L0", "L1", "L2"}),  # H_bp = min(1, 3) = 1: the rest goes to L
        (2, 5, {"H0", "L3", "L4", "L5", "H1"}),
        (3, 2, {"H2", "L8"}),
        (3, 4, {"H0", "H1", "H2", "L8"}),  # H_bp = min(3, 3) = 3 (min(2, bp-1) would give H1 H2 L7 L8)
        (3, 6, {"H0", "H1", "H2", "L6", "L7", "L8"}),
    ],
)
def test_bp_split_follows_cycles(cycles, bp, expected):
    """The reference's split H_bp = min(cycles, bp - 1), L_bp = bp - H_bp, for any number of cycles."""
    cfg = ModelConfig.preset("debug", cycles=cycles, bp=bp)
    h_bp = min(cycles, bp - 1)
    assert cfg.bp_split(bp) == (h_bp, bp - h_bp)
    assert set(cfg.grad_calls(bp)) == expected
    model = build_model(cfg)
    assert calls_with_gradient(model, bp) == expected


def test_bp_too_large_for_the_l_calls_is_refused():
    with pytest.raises(ValueError, match="impossible"):
        ModelConfig.preset("debug", cycles=1, bp=5)  # H_bp = 1, L_bp = 4 > 3 L calls
