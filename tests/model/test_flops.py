"""The FLOP counter counts what really runs."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import ModelConfig, build_model, count_flops, pack_samples
from model.flops import block_linear_flops_per_token


def measured(model, bp, **batch):
    """FLOPs torch sees (math SDPA so attention shows up as matmuls): (forward, backward)."""
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            model(**batch, bp=bp)
        with FlopCounterMode(display=False) as both:
            model(**batch, bp=bp).loss.backward()
    f = fwd.get_total_flops()
    return f, both.get_total_flops() - f


@pytest.mark.parametrize("arch", ["hrm", "transformer"])
@pytest.mark.parametrize("bp", [2, 5, 8])
def test_matches_torch_flop_counter_on_a_dense_mask(arch, bp):
    """With an all-prompt PrefixLM row the mask is dense, which is what math SDPA computes: the
    forward must match torch's count exactly, the backward within the input-gradient of the first
    layer of the first grad call (skipped by autograd when that call's input is detached)."""
    cfg = ModelConfig.preset("debug", arch=arch)
    model = build_model(cfg)
    B, T = 2, 32
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    seg = torch.ones(B, T, dtype=torch.long)
    prm = torch.ones(B, T, dtype=torch.bool)
    fwd, bwd = measured(model, bp, input_ids=ids, segment_ids=seg, is_prompt=prm, labels=ids)
    c = count_flops(cfg, segment_ids=seg, is_prompt=prm, bp=bp)
    assert c.breakdown["attention_density"] == 1.0
    assert c.forward == fwd
    assert 0 <= c.backward - bwd <= 0.03 * c.backward


def test_hrm_runs_eight_calls_forward_but_backward_only_bp_calls():
    hrm = ModelConfig.preset("debug")
    tr = ModelConfig.preset("debug", arch="transformer")
    B, T = 4, 64
    for bp in (2, 5, 8):
        h, t = count_flops(hrm, B, T, bp=bp), count_flops(tr, B, T, bp=bp)
        # 8 calls of half the layers = 4x the Transformer's block forwards
        assert h.breakdown["body_forward"] == 4 * t.breakdown["body_forward"]
        assert h.breakdown["head_forward"] == t.breakdown["head_forward"]
        # backward: bp calls of half the layers vs all layers
        assert h.breakdown["body_backward"] == bp / 2 * t.breakdown["body_backward"]
        assert h.breakdown["calls_with_grad"] == bp
    inf = count_flops(hrm, B, T, training=False)
    assert inf.backward == 0 and inf.forward == count_flops(hrm, B, T).forward


def test_attention_counted_by_mask_density():
    cfg = ModelConfig.preset("debug")
    b = pack_samples([([1] * 4, [2] * 4), ([1] * 2, [2] * 6)], seq_len=20)  # 4 pads
    c = count_flops(cfg, segment_ids=b.segment_ids, is_prompt=b.is_prompt)
    # causal 36 + 36, prompt bidirectional extra 4*3/2 + 2*1/2, pads 4
    assert c.breakdown["attention_pairs"] == 36 + 6 + 36 + 1 + 4
    causal = count_flops(cfg.replace(mask="causal"), segment_ids=b.segment_ids, is_prompt=b.is_prompt)
    assert causal.breakdown["attention_pairs"] == 36 + 36 + 4
    N = 20
    lin = block_linear_flops_per_token(cfg) * N
    attn = 4 * cfg.hidden_size * 83
    assert c.breakdown["body_forward"] == 8 * 2 * (lin + attn)
    assert c.per_token == c.total / N


def test_xl_per_token_figure_is_plausible():
    """1B model, 4k tokens, bp = 5: about (8 fwd + 2*5 bwd)/2 * 6N-ish: well above the 6N of a
    Transformer, and the HRM/Transformer ratio is about 3x on the blocks."""
    xl = ModelConfig.preset("XL")
    h = count_flops(xl, 1, 4096, bp=5).per_token
    t = count_flops(xl.replace(arch="transformer"), 1, 4096).per_token
    assert 2.5 < h / t < 3.0
    n_body = 32 * (5 * 1536**2 + 3 * 1536 * 4096)
    attn = 3 * 32 * 4 * 1536 * (4096 + 1) / 2  # fwd+bwd, causal: (T+1)/2 keys per query on average
    assert t == pytest.approx(6 * n_body + 6 * 1536 * 65536 + attn)  # 6N plus attention
