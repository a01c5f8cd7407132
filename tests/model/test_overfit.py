"""A tiny HRM memorises a handful of instruction-response pairs (answer-only loss, PrefixLM).
Its speed is measured by benchmarks/overfit.py, not here."""

import pytest
import torch

from model import ModelConfig, bp_schedule, build_model, generate, pack_samples


@pytest.mark.parametrize("arch", ["hrm", "transformer"])
def test_tiny_model_overfits_instruction_pairs(arch):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randint(10, 500, (5,), generator=g).tolist(), torch.randint(10, 500, (6,), generator=g).tolist())
        for _ in range(8)
    ]
    batch = pack_samples(pairs, seq_len=33)  # 3 samples per row, 3 rows
    model = build_model(ModelConfig.preset("debug", arch=arch))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    steps = 100
    for step in range(steps):
        out = model(**batch.as_kwargs(), bp=bp_schedule(step, steps))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    assert out.num_tokens.item() == 8 * 6
    assert out.loss.item() < 0.01, out.loss.item()
    # the memorised answers come back through cached greedy decoding
    model.eval()
    got = generate(model, [p for p, _ in pairs], 6)
    assert got == [r for _, r in pairs]
