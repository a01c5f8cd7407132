"""Cached generation equals uncached generation; batching, stops and sampling."""

import pytest
import torch

from model import ModelConfig, build_model, generate, pack_samples, sample_next

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [100, 200, 300, 400, 17]]


@pytest.fixture(params=[("hrm", "prefix"), ("transformer", "prefix"), ("hrm", "causal"), ("transformer", "causal")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    arch, mask = request.param
    torch.manual_seed(3)
    return build_model(ModelConfig.preset("debug", arch=arch, mask=mask)).eval()


def test_cached_equals_uncached_greedy_batched(model):
    cached = generate(model, PROMPTS, 16)
    uncached = generate(model, PROMPTS, 16, use_cache=False)
    assert cached == uncached
    assert all(len(r) == 16 for r in cached)
    # left padding is invisible: each prompt alone gives the same continuation
    assert cached == [generate(model, [p], 16, use_cache=False)[0] for p in PROMPTS]


def test_cached_decode_logits_match_full_forward(model):
    """Prefill + 3 cached decode steps give the logits of one full forward over the sequence."""
    prompt, answer = [5, 6, 7, 8], [9, 10, 11]
    b = pack_samples([(prompt, answer)], seq_len=7)
    with torch.no_grad():
        full = model(b.input_ids, segment_ids=b.segment_ids, position_ids=b.position_ids,
                     is_prompt=b.is_prompt).logits  # (1, 7, V)
        cache = model.new_cache(1, 8)
        P = len(prompt)
        steps = [model(b.input_ids[:, :P], segment_ids=b.segment_ids[:, :P], position_ids=b.position_ids[:, :P],
                       is_prompt=b.is_prompt[:, :P], cache=cache).logits]
        for t in range(P, 7):
            steps.append(model(b.input_ids[:, t : t + 1], segment_ids=b.segment_ids[:, t : t + 1],
                               position_ids=b.position_ids[:, t : t + 1], is_prompt=b.is_prompt[:, t : t + 1],
                               cache=cache).logits)
    assert cache.length == 7
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_cache_has_one_slot_per_call_and_layer():
    hrm = build_model(ModelConfig.preset("debug"))
    tr = build_model(ModelConfig.preset("debug", arch="transformer"))
    assert hrm.new_cache(2, 10).k.shape[0] == 8 * 2  # 8 module calls x 2 layers per module
    assert tr.new_cache(2, 10).k.shape[0] == 4


def test_stop_token_ids_and_sequences():
    model = build_model(ModelConfig.preset("debug")).eval()
    free = generate(model, PROMPTS, 12)
    row = free[0]
    stop = row[4]
    first = row.index(stop)
    got = generate(model, PROMPTS, 12, stop_token_ids=[stop])
    assert got[0] == row[:first]  # stop token removed, decoding stopped
    seq = row[5:7]
    got = generate(model, PROMPTS[:1], 12, stop_token_ids=[seq])
    ends = next(i for i in range(2, 13) if row[i - 2 : i] == seq)
    assert got[0] == row[: ends - 2]


def test_stop_fn_and_max_tokens():
    model = build_model(ModelConfig.preset("debug")).eval()
    calls = []

    def stop_after_three(row, toks):
        calls.append(row)
        return len(toks) >= 3 + row  # row b stops after 3 + b tokens

    got = generate(model, PROMPTS, 10, stop_fn=stop_after_three)
    assert [len(r) for r in got] == [3, 4, 5]
    assert generate(model, PROMPTS, 0) == [[], [], []]


def test_sampling():
    model = build_model(ModelConfig.preset("debug")).eval()
    greedy = generate(model, PROMPTS, 8)
    assert generate(model, PROMPTS, 8, temperature=1.0, top_k=1) == greedy
    assert generate(model, PROMPTS, 8, temperature=0.7, top_p=1e-6) == greedy
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = generate(model, PROMPTS, 8, temperature=1.0, top_p=0.9, generator=g1)
    b = generate(model, PROMPTS, 8, temperature=1.0, top_p=0.9, generator=g2)
    assert a == b and a != greedy
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    draws = sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {2, 3}
    draws = sample_next(logits, temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {3}  # 3 alone holds 64% of the mass: the nucleus stops there
