import torch

from model import ModelConfig, build_model, pack_samples


def test_hrm_logit_lens_every_call():
    model = build_model(ModelConfig.preset("debug"))
    b = pack_samples([([1, 2, 3], [4, 5, 6])], seq_len=8)
    kw = {k: v for k, v in b.as_kwargs().items() if k != "labels"}
    lens = model.logit_lens(**kw)
    assert list(lens) == ["L0", "L1", "L2", "H0", "L3", "L4", "L5", "H1"]
    assert all(v.shape == (1, 8, 512) and v.dtype == torch.float32 for v in lens.values())
    with torch.no_grad():
        final = model(**kw).logits
    assert torch.allclose(lens["H1"], final, atol=1e-4)  # the last H exit norm is the final norm
    assert not torch.allclose(lens["H0"], final, atol=1e-3)


def test_transformer_logit_lens_every_layer():
    model = build_model(ModelConfig.preset("debug", arch="transformer"))
    ids = torch.randint(0, 512, (2, 8))
    lens = model.logit_lens(ids)
    assert list(lens) == [f"layer{i}" for i in range(4)]
    with torch.no_grad():
        assert torch.allclose(lens["layer3"], model(ids).logits, atol=1e-5)
