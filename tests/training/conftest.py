"""Fixtures of the training tests: real GSM8K rows through the pipeline's data stages, once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `training` is not (yet) in pyproject's package list
    sys.path.insert(0, str(ROOT))

THREADS = 1


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread, here and in child runs (tests pass OMP_NUM_THREADS on): with 2 OpenMP
    threads on a 2-core machine that another job also uses, every parallel region waits for a
    descheduled thread and a 0.2 s step became 12 s. Bit-exact comparisons between a child run and
    an in-process run also need the same thread count on both sides."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    monkeypatch.setenv("OMP_NUM_THREADS", str(THREADS))
    yield
    torch.set_num_threads(before)


def _stage(*argv: str) -> None:
    from pipeline.cli import main

    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    assert code == 0, f"stage {argv[1]} failed"


@pytest.fixture(scope="session")
def run_stage():
    """run_stage("stage", NAME, "--input", ...): one pipeline stage through the hrm CLI (asserts success)."""
    return _stage


@pytest.fixture(scope="session")
def packed(tmp_path_factory, gsm8k_rows) -> Path:
    """A pack folder: 400 GSM8K train rows -> stratify -> dedup -> tokenizer (vocab 512) -> mix -> pack
    (seq_len 256, ~32 sequences per shard)."""
    d = tmp_path_factory.mktemp("gsm8k-pack")
    rows = gsm8k_rows(d / "rows.jsonl", 400)
    _stage("stage", "stratify", "--input", str(rows), "--output", str(d / "s"), "--no-progress")
    _stage("stage", "dedup", "--input", str(d / "s"), "--output", str(d / "d"), "--no-progress")
    _stage("stage", "tokenizer", "--input", str(d / "d"), "--output", str(d / "t"), "--set", "vocab_size=512",
           "--no-progress")
    _stage("stage", "mix", "--input", str(d / "t"), "--output", str(d / "m"), "--no-progress")
    _stage("stage", "pack", "--input", str(d / "t"), "--mix", str(d / "m"), "--output", str(d / "p"),
           "--set", "seq_len=256", "--set", "shard_tokens=8192", "--no-progress")
    return d / "p"
