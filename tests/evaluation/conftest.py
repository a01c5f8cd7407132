"""Shared fixtures: a debug checkpoint trained a few steps on GSM8K with the pipeline's tokenizer."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from model import ModelConfig, build_model, save_checkpoint
from pipeline.config import TokenizerConfig
from pipeline.stages import tokenize


@pytest.fixture(scope="session")
def trained(tmp_path_factory, gsm8k_rows):
    """tok/ (vocab 600; conditions direct, cot and synth: the paper's `synth,cot` prompts) and ckpt/: a
    checkpoint as written before checkpoints carried their tokenizer."""
    d = tmp_path_factory.mktemp("eval")
    rows = gsm8k_rows(d / "rows.jsonl", 1500)
    tokenize.run(rows, d / "tok", TokenizerConfig(vocab_size=600, sample_rows=1500),
                 conditions=["direct", "cot", "synth"], seed=0, progress=False)
    meta = json.loads((d / "tok" / "tokenizer_meta.json").read_text())
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("debug", vocab_size=meta["vocab_size"], max_seq_len=512))
    t = pq.read_table(d / "tok" / "tokenized.parquet", columns=["prompt_ids", "response_ids"]).slice(0, 64)
    seqs = [(p, r[: max(160 - len(p), 2)]) for p, r in zip(t["prompt_ids"].to_pylist(), t["response_ids"].to_pylist())]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(4):  # a few plain PyTorch steps with the answer-only PrefixLM layout
        batch = seqs[step * 4 : step * 4 + 4]
        T = max(len(p) + len(r) for p, r in batch)
        ids = torch.zeros(4, T, dtype=torch.long)
        seg = torch.zeros(4, T, dtype=torch.long)
        prm = torch.zeros(4, T, dtype=torch.bool)
        lab = torch.full((4, T), -100, dtype=torch.long)
        for b, (p, r) in enumerate(batch):
            x = p + r
            ids[b, : len(x)] = torch.tensor(x)
            seg[b, : len(x)] = 1
            prm[b, : len(p)] = True
            lab[b, len(p) - 1 : len(x) - 1] = torch.tensor(r)
        out = model(ids, segment_ids=seg, is_prompt=prm, labels=lab, attn_backend="sdpa")
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    save_checkpoint(model, d / "ckpt")
    return d
