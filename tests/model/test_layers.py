import math

import torch
from torch import nn

from model import ModelConfig, build_model
from model.layers import Attention, apply_rope, rms_norm, rope_cos_sin
from model.masks import AttnMask


def test_rms_norm_is_scale_free():
    x = torch.randn(3, 5, 64) * 7
    y = rms_norm(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3, 5), atol=1e-4)
    assert torch.allclose(rms_norm(3 * x), y, atol=1e-5)  # no learnable scale, scale invariant


def test_no_biases_no_norm_weights():
    for arch in ("hrm", "transformer"):
        m = build_model(ModelConfig.preset("debug", arch=arch))
        for mod in m.modules():
            if isinstance(mod, nn.Linear):
                assert mod.bias is None
        names = {n.split(".")[-1] for n, _ in m.named_parameters()}
        assert names == {"weight"}
        # only projections, the embedding and the head carry parameters
        assert all(("proj" in n) or n in ("embed.weight", "lm_head.weight") for n, _ in m.named_parameters())


def test_rope_depends_on_relative_position_only():
    D = 32
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), D, 1e4)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), D, 1e4)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    assert torch.allclose(score(5, 2), score(105, 102), atol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)
    cos, _ = rope_cos_sin(torch.tensor([[0, 1]]), D, 1e4)
    assert cos.dtype == torch.float32


def test_attention_matches_a_hand_written_reference():
    """Fused [q|k|v|gate] projection, RoPE on q and k, causal softmax, sigmoid(gate) * attn
    elementwise, then the output projection."""
    cfg = ModelConfig.preset("debug")
    attn = Attention(cfg)
    B, T, C, H, D = 2, 6, cfg.hidden_size, cfg.num_heads, cfg.head_dim
    x = torch.randn(B, T, C)
    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T), D, cfg.rope_theta)
    out = attn(x, (cos, sin), AttnMask(causal=True))

    w = attn.qkvg_proj.weight  # (4C, C)
    q, k, v, g = (x @ w[j * C : (j + 1) * C].T for j in range(4))  # (B, T, C) each
    q = apply_rope(q.view(B, T, H, D), cos, sin).transpose(1, 2)  # (B, H, T, D)
    k = apply_rope(k.view(B, T, H, D), cos, sin).transpose(1, 2)
    v = v.view(B, T, H, D).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    ref = (torch.sigmoid(g) * y) @ attn.out_proj.weight.T
    assert torch.allclose(out, ref, atol=1e-5)


def test_init_stds():
    cfg = ModelConfig.preset("cpu-small")
    m = build_model(cfg)
    h, i = cfg.hidden_size, cfg.intermediate_size

    def close(t, std):
        return abs(t.std().item() - std) / std < 0.05 and t.abs().max().item() <= 2 * std / 0.8796 + 1e-6

    assert close(m.embed.weight, 1 / math.sqrt(h))
    assert close(m.lm_head.weight, 1 / math.sqrt(h))
    blk = m.h_module.layers[0]
    assert close(blk.attn.qkvg_proj.weight, 1 / math.sqrt(h))
    assert close(blk.attn.out_proj.weight, 1 / math.sqrt(h))
    assert close(blk.mlp.down_proj.weight, 1 / math.sqrt(i))
    z = m.z_l_init
    assert z.shape == (h,) and 0.8 < z.std().item() < 1.2 and z.abs().max() <= 2 / 0.8796 + 1e-6
    assert "z_l_init" in dict(m.named_buffers()) and "z_l_init" in m.state_dict()
    assert all(not p is z for p in m.parameters())  # a buffer, not trained
