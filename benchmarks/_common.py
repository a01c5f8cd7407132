"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`: this folder is on sys.path)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def random_checkpoint(tokenizer_dir: str, preset: str, prefix: str = "bench-") -> Path:
    """A freshly initialised model of `preset` with the tokenizer's vocabulary, saved to a temporary
    checkpoint folder; also pins torch to 2 threads and seed 0 so runs compare."""
    from model import ModelConfig, build_model, save_checkpoint
    from pipeline.stages.tokenize import load_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    _, meta = load_tokenizer(tokenizer_dir)
    ck = Path(tempfile.mkdtemp(prefix=prefix)) / "ckpt"
    save_checkpoint(build_model(ModelConfig.preset(preset, vocab_size=meta["vocab_size"])), ck)
    return ck
