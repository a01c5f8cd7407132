"""Logit lens statistics and attention entropy (model.diagnostics) on the debug preset."""

import math

import torch

from model import ModelConfig, build_model, pack_samples
from model.diagnostics import attention_entropy, lens_distributions, logit_lens_stats


def _batch():
    b = pack_samples([([1, 2, 3, 4], [5, 6, 7]), ([8, 9], [10, 11, 12, 13])], seq_len=16)
    return {k: v for k, v in b.as_kwargs().items() if k != "labels"}


def _models():
    torch.manual_seed(0)
    yield build_model(ModelConfig.preset("debug"))
    for loss, mask in (("full", "causal"), ("answer", "causal"), ("answer", "prefix")):
        yield build_model(ModelConfig.preset("debug", arch="transformer", loss=loss, mask=mask))


def test_lens_distributions_are_proper_and_the_last_is_the_output():
    kw = _batch()
    for model in _models():
        model.eval()
        dists = lens_distributions(model, **kw)
        assert list(dists) == (list(model.cfg.call_names) if model.cfg.arch == "hrm"
                               else [f"layer{i}" for i in range(model.cfg.num_layers)])
        for d in dists.values():
            assert d.shape == (1, 16, 512)
            assert torch.allclose(d.sum(-1), torch.ones(1, 16), atol=1e-5)
        with torch.no_grad():
            own = torch.softmax(model(**kw).logits.float(), -1)
        assert torch.allclose(list(dists.values())[-1], own, atol=1e-5)
        stats = logit_lens_stats(model, **kw)
        last = stats[list(stats)[-1]]
        assert torch.allclose(last["kl"], torch.zeros(1, 16), atol=1e-5)  # the final state vs itself
        assert torch.allclose(last["p_final"], own.max(-1).values, atol=1e-5)
        for s in stats.values():
            assert (s["p_final"] >= 0).all() and (s["p_final"] <= 1 + 1e-6).all() and (s["kl"] >= 0).all()


def test_attention_entropy_bounds_and_names():
    kw = _batch()
    T = 16
    for model in _models():
        ent = attention_entropy(model, **kw)
        cfg = model.cfg
        if cfg.arch == "hrm":
            assert list(ent) == [f"{c}.{i}" for c in cfg.call_names for i in range(cfg.layers_per_call)]
        else:
            assert list(ent) == [f"layer{i}" for i in range(cfg.num_layers)]
        for e in ent.values():
            assert e.shape == (1, cfg.num_heads, T)
            assert (e >= 0).all() and (e <= math.log(T) + 1e-5).all()
        first = ent[list(ent)[0]][0, :, 0]
        if cfg.mask == "causal":  # the first token sees only itself: zero entropy
            assert torch.allclose(first, torch.zeros_like(first), atol=1e-6)
        else:  # PrefixLM: the first prompt token sees the whole 4-token prompt
            assert (first > 0).all() and (first <= math.log(4) + 1e-5).all()


def test_prefix_mask_lets_prompt_tokens_attend_forward():
    # the same weights under the two masks, first layer (its input does not depend on the mask): the
    # first prompt token sees only itself when causal, the whole prompt under PrefixLM; answer tokens
    # see the same keys under both masks, so their rows agree
    torch.manual_seed(0)
    causal = build_model(ModelConfig.preset("debug", arch="transformer", mask="causal"))
    prefix = build_model(ModelConfig.preset("debug", arch="transformer", mask="prefix"))
    prefix.load_state_dict(causal.state_dict())
    kw = _batch()
    ec, ep = attention_entropy(causal, **kw)["layer0"], attention_entropy(prefix, **kw)["layer0"]
    assert torch.allclose(ec[0, :, 0], torch.zeros(2), atol=1e-6) and (ep[0, :, 0] > 0.1).all()
    assert torch.allclose(ep[0, :, 4:7], ec[0, :, 4:7], atol=1e-5)
