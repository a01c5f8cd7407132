"""Mask, label and position semantics, from the metadata helpers up to the full models."""

import pytest
import torch

from model import (
    IGNORE_INDEX,
    ModelConfig,
    build_labels,
    build_model,
    count_allowed_pairs,
    dense_mask,
    metadata_from_boundaries,
    pack_samples,
)

X = IGNORE_INDEX


def test_metadata_and_labels_from_boundaries():
    # row 0: sample A = prompt [10 11 12] response [13 14]; sample B = prompt [20] response [21 22]; 2 pads
    ids = torch.tensor([[10, 11, 12, 13, 14, 20, 21, 22, 0, 0]])
    seg, pos, prm = metadata_from_boundaries([[(0, 3, 5), (5, 1, 3)]], seq_len=10)
    assert seg.tolist() == [[1, 1, 1, 1, 1, 2, 2, 2, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]]
    assert prm.tolist() == [[True, True, True, False, False, True, False, False, False, False]]
    # the last prompt token predicts the first response token; nothing crosses a boundary
    assert build_labels(ids, seg, prm, "answer").tolist() == [[X, X, 13, 14, X, 21, 22, X, X, X]]
    assert build_labels(ids, seg, prm, "full").tolist() == [[11, 12, 13, 14, X, 21, 22, X, X, X]]


def test_pack_samples_matches_boundaries():
    b = pack_samples([([1, 2], [3, 4, 5]), ([6, 7, 8], [9]), ([1, 1, 1, 1], [2, 2])], seq_len=10)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0], [1, 1, 1, 1, 2, 2, 0, 0, 0, 0]]
    assert b.segment_ids.tolist()[0] == [1, 1, 1, 1, 1, 2, 2, 2, 2, 0]
    assert b.labels.tolist()[0] == [X, 3, 4, 5, X, X, X, 9, X, X]
    with pytest.raises(ValueError):
        metadata_from_boundaries([[(0, 4, 3)]], seq_len=8)  # prompt longer than the sample
    with pytest.raises(ValueError):
        metadata_from_boundaries([[(0, 1, 5), (3, 1, 2)]], seq_len=8)  # overlapping samples


def test_dense_mask_rule():
    seg, _, prm = metadata_from_boundaries([[(0, 2, 4), (4, 1, 2)]], seq_len=7)
    m = dense_mask(seg, prm, prefix=True)[0, 0].int().tolist()
    assert m == [
        # keys: A0 A1 A2 A3 B0 B1 pad
        [1, 1, 0, 0, 0, 0, 0],  # A0 prompt: sees the whole prompt A0, A1
        [1, 1, 0, 0, 0, 0, 0],  # A1 prompt
        [1, 1, 1, 0, 0, 0, 0],  # A2 response: prompt + itself
        [1, 1, 1, 1, 0, 0, 0],  # A3 response
        [0, 0, 0, 0, 1, 0, 0],  # B0 prompt: never sees A
        [0, 0, 0, 0, 1, 1, 0],  # B1 response
        [0, 0, 0, 0, 0, 0, 1],  # pad: itself only (no empty softmax rows)
    ]
    causal = dense_mask(seg, prm, prefix=False)[0, 0]
    assert causal[0, 1].item() is False and causal[1, 0].item() is True


@pytest.mark.parametrize("prefix", [True, False])
def test_count_allowed_pairs_matches_dense_mask(prefix):
    g = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(9):
        p, r = torch.randint(1, 9, (2,), generator=g).tolist()
        samples.append(([1] * p, [2] * r))
    b = pack_samples(samples, seq_len=24)
    assert count_allowed_pairs(b.segment_ids, b.is_prompt, prefix) == int(
        dense_mask(b.segment_ids, b.is_prompt, prefix).sum()
    )


# ---------------------------------------------------------------------------------------------
# The models obey the mask
# ---------------------------------------------------------------------------------------------
PROMPT, RESPONSE = [5, 6, 7, 8, 9], [40, 41, 42, 43, 44, 45]


def run(model, b, ids=None):
    kw = b.as_kwargs()
    kw.pop("labels")
    if ids is not None:
        kw["input_ids"] = ids
    with torch.no_grad():
        return model(**kw).logits


@pytest.fixture(params=[("hrm", "prefix"), ("transformer", "prefix"), ("hrm", "causal"), ("transformer", "causal")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    arch, mask = request.param
    return build_model(ModelConfig.preset("debug", arch=arch, mask=mask)).eval()


def test_later_response_token_never_changes_earlier_outputs(model):
    b = pack_samples([(PROMPT, RESPONSE)], seq_len=16)
    base = run(model, b)
    t = len(PROMPT) + 3  # a response position
    ids = b.input_ids.clone()
    ids[0, t] = 99
    out = run(model, b, ids)
    assert torch.allclose(out[0, :t], base[0, :t], atol=1e-5)
    assert not torch.allclose(out[0, t], base[0, t], atol=1e-4)


def test_prompt_token_reaches_every_prompt_position_only_under_prefixlm(model):
    b = pack_samples([(PROMPT, RESPONSE)], seq_len=16)
    base = run(model, b)
    ids = b.input_ids.clone()
    ids[0, len(PROMPT) - 1] = 99  # the last prompt token
    out = run(model, b, ids)
    n = len(PROMPT) + len(RESPONSE)
    changed = [(out[0, t] - base[0, t]).abs().max().item() > 1e-4 for t in range(n)]
    if model.cfg.mask == "prefix":
        assert all(changed)  # every prompt position reads it (bidirectional), and every response one
    else:
        assert changed == [False] * (len(PROMPT) - 1) + [True] * (n - len(PROMPT) + 1)


def test_nothing_leaks_across_packed_samples(model):
    a, c = ([11, 12, 13], [14, 15, 16, 17]), ([21, 22, 23, 24], [25, 26])
    packed = pack_samples([a, c], seq_len=16)
    assert packed.input_ids.shape[0] == 1  # both in one row
    out = run(model, packed)
    alone = run(model, pack_samples([c], seq_len=16))
    s = len(a[0]) + len(a[1])
    n = len(c[0]) + len(c[1])
    # positions restart and the first sample is invisible: same logits as the sample alone
    assert torch.allclose(out[0, s : s + n], alone[0, :n], atol=1e-5)
    ids = packed.input_ids.clone()
    ids[0, :s] = 3  # rewrite the whole first sample
    assert torch.allclose(run(model, packed, ids)[0, s : s + n], out[0, s : s + n], atol=1e-5)
    ids = packed.input_ids.clone()
    ids[0, s:] = 3  # rewrite the second sample and the padding: the first one does not move
    assert torch.allclose(run(model, packed, ids)[0, :s], out[0, :s], atol=1e-5)


def test_answer_only_loss_counts_answer_tokens():
    model = build_model(ModelConfig.preset("debug"))
    b = pack_samples([(PROMPT, RESPONSE), ([1, 2], [3, 4])], seq_len=20)
    out = model(**b.as_kwargs())
    assert out.num_tokens.item() == len(RESPONSE) + 2
    assert torch.allclose(out.loss, out.loss_sum / (len(RESPONSE) + 2))
    assert out.loss.dtype == torch.float32
    empty = b.labels.clone().fill_(IGNORE_INDEX)
    kw = {**b.as_kwargs(), "labels": empty}
    z = model(**kw)
    assert z.num_tokens.item() == 0 and z.loss.item() == 0.0  # divided by clamp(0, 1), no NaN


def test_flex_backend_refused_on_cpu():
    model = build_model(ModelConfig.preset("debug", attn_backend="flex"))
    b = pack_samples([(PROMPT, RESPONSE)], seq_len=16)
    with pytest.raises(ValueError, match="CUDA"):
        model(**b.as_kwargs())
    model(**b.as_kwargs(), attn_backend="sdpa")  # a per-call override


def test_pad_pairs_lays_out_one_sample_per_row():
    from model import pad_pairs

    b = pad_pairs([([5, 6], [7]), ([8], [9, 10, 11])], pad=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 10, 11]]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]
    assert b["is_prompt"].tolist() == [[True, True, False, False], [True, False, False, False]]
    # the answer-only labels of such a batch: the last prompt token predicts the first response token
    labels = build_labels(b["input_ids"], b["segment_ids"], b["is_prompt"], "answer")
    assert labels.tolist() == [[-100, 7, -100, -100], [9, 10, 11, -100]]
