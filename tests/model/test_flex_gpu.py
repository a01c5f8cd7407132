"""FlexAttention (CUDA fast path) gives the outputs of SDPA with the explicit mask."""

import pytest
import torch

from model import ModelConfig, build_model, pack_samples
from model.layers import attend
from model.masks import AttnMask, dense_mask, flex_block_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def packed_batch(seq_len=256, rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    while len(samples) < 40:
        p, r = torch.randint(2, 60, (2,), generator=g).tolist()
        samples.append((torch.randint(1, 500, (p,), generator=g).tolist(), torch.randint(1, 500, (r,), generator=g).tolist()))
    b = pack_samples(samples, seq_len)
    keep = slice(0, rows)
    return type(b)(*(t[keep] for t in (b.input_ids, b.segment_ids, b.position_ids, b.is_prompt, b.labels)))


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_equals_sdpa_attention(prefix, dtype):
    b = packed_batch().to("cuda")
    B, T = b.input_ids.shape
    q, k, v = (torch.randn(B, 4, T, 64, device="cuda", dtype=dtype) for _ in range(3))
    ref = attend(q, k, v, AttnMask(dense=dense_mask(b.segment_ids, b.is_prompt, prefix)))
    out = attend(q, k, v, AttnMask(block_mask=flex_block_mask(b.segment_ids, b.is_prompt, prefix)))
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("arch", ["hrm", "transformer"])
def test_flex_equals_sdpa_whole_model(arch):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("debug", arch=arch, attn_backend="sdpa")
    sdpa_model = build_model(cfg).cuda()
    flex_model = build_model(cfg.replace(attn_backend="flex")).cuda()
    flex_model.load_state_dict(sdpa_model.state_dict())
    b = packed_batch().to("cuda")
    a = sdpa_model(**b.as_kwargs(), bp=5)
    f = flex_model(**b.as_kwargs(), bp=5)
    assert torch.allclose(a.logits, f.logits, atol=5e-3, rtol=5e-3)
    a.loss.backward()
    f.loss.backward()
    for (n, p), (_, q) in zip(sdpa_model.named_parameters(), flex_model.named_parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=5e-3, rtol=5e-2), n


def test_generation_on_cuda_cached_equals_uncached():
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("debug")).cuda().eval()
    from model import generate

    prompts = [[5, 6, 7, 8, 9, 10], [3, 4], [100, 200, 300]]
    assert generate(model, prompts, 10) == generate(model, prompts, 10, use_cache=False)
