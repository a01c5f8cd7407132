"""Figure: generate_until throughput of the lm-eval adapter, KV cache and batching vs without, on CPU.

A freshly initialised model (preset `--preset`, the tokenizer's vocabulary) continues `--prompts` GSM8K
test questions in the harness's gsm8k prompt for `--max-gen-toks` tokens (greedy; `until` never hit by
a random model, so every row generates the full budget). Prints generated tokens per second for
cache on/off x batch size 1 / `--batch`, and checks that all settings produce the same texts.

    .venv/bin/python benchmarks/eval_generation.py --tokenizer TOKENIZER_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_eval.api.instance import Instance  # noqa: E402

from _common import random_checkpoint  # noqa: E402
from evaluation.lm import HRMLM  # noqa: E402


def main(argv=None) -> None:
    root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="tokenizer stage folder")
    ap.add_argument("--benchmarks", default=str(root / "shared/data/benchmarks"))
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-gen-toks", type=int, default=32)
    a = ap.parse_args(argv)
    ck = random_checkpoint(a.tokenizer, a.preset, prefix="evalgen-")
    qs = [json.loads(x)["question"] for x in (Path(a.benchmarks) / "gsm8k" / "test.jsonl").read_text().split("\n")
          if x.strip()][: a.prompts]
    reqs = [Instance("generate_until", {}, (f"Question: {q}\nAnswer:", {"until": ["Question:"], "max_gen_toks": a.max_gen_toks}), i)
            for i, q in enumerate(qs)]
    lm = HRMLM(str(ck), tokenizer=a.tokenizer, condition="cot", progress=False)
    base = None
    print(f"preset {a.preset}, {len(qs)} prompts, {a.max_gen_toks} new tokens each, torch threads 2")
    rates = {}
    for cache in (True, False):
        for bs in (a.batch, 1):
            lm.use_cache, lm.batch_size = cache, bs
            t0 = time.perf_counter()
            out = lm.generate_until(reqs)
            dt = time.perf_counter() - t0
            n = sum(len(lm.encode(o)) for o in out)
            rates[(cache, bs)] = n / dt
            same = "" if base is None else ("same texts" if out == base else "TEXTS DIFFER")
            base = base or out
            print(f"cache={'on ' if cache else 'off'} batch={bs:2d}: {dt:7.2f}s  {n / dt:8.1f} tok/s  {same}")
    print(f"speed-up of cache+batch {a.batch} over no cache, batch 1: x{rates[(True, a.batch)] / rates[(False, 1)]:.1f}")


if __name__ == "__main__":
    main()
