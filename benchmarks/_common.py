"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`: this folder is on sys.path)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# runs a command and prints its peak RSS (the largest process of its tree) and wall time as JSON
WAITER = """
import json, resource, subprocess, sys, time
t = time.time()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
assert p.returncode == 0, p.stderr[-3000:]
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "wall_s": time.time() - t}))
"""


def measure_cli(code: Path, args: list[str]) -> dict:
    """`hrm ARGS` of the code in folder CODE (this tree or an old export) in a fresh process under
    WAITER: {"maxrss_mb", "wall_s"}."""
    cli = "import sys; sys.path.insert(0, sys.argv.pop(1)); from pipeline.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", WAITER, sys.executable, "-c", cli, str(code), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(code)})
    if p.returncode != 0:
        raise SystemExit(f"{code}: {' '.join(args[:2])} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_checkpoint(tokenizer_dir: str, preset: str, prefix: str = "bench-") -> Path:
    """A freshly initialised model of `preset` with the tokenizer's vocabulary, saved to a temporary
    checkpoint folder; also pins torch to 2 threads and seed 0 so runs compare."""
    import torch

    from model import ModelConfig, build_model, save_checkpoint
    from pipeline.stages.tokenize import load_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    _, meta = load_tokenizer(tokenizer_dir)
    ck = Path(tempfile.mkdtemp(prefix=prefix)) / "ckpt"
    save_checkpoint(build_model(ModelConfig.preset(preset, vocab_size=meta["vocab_size"])), ck)
    return ck
