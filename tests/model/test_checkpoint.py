import json

import pytest
import torch

from model import ModelConfig, build_model, load_checkpoint, pack_samples, save_checkpoint


@pytest.mark.parametrize("arch", ["hrm", "transformer"])
def test_round_trip_gives_identical_outputs(tmp_path, arch, monkeypatch):
    cfg = ModelConfig.preset("debug", arch=arch, mask="causal", loss="full", bp=4)
    model = build_model(cfg)
    save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["config"]["arch"] == arch

    def no_pickles(*a, **k):
        raise AssertionError("load_checkpoint must not unpickle")

    monkeypatch.setattr(torch, "load", no_pickles)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.cfg == cfg
    b = pack_samples([([1, 2, 3], [4, 5, 6, 7])], seq_len=10)
    with torch.no_grad():
        assert torch.equal(model(**b.as_kwargs()).logits, loaded(**b.as_kwargs()).logits)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    if arch == "hrm":
        assert torch.equal(loaded.z_l_init, model.z_l_init)  # the fixed z_L buffer travels too


def test_load_in_bf16(tmp_path):
    model = build_model(ModelConfig.preset("debug"))
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    out = loaded(torch.randint(0, 512, (1, 8)))
    assert torch.isfinite(out.logits).all()
