"""Figure: loglikelihood throughput of the lm-eval adapter, one prefill per shared prompt vs every
request scored on its own, on CPU.

Requests in the harness's layouts over the local benchmark files: MMLU 5-shot (four one-token choices
" A".." D" after a prompt of five dev exemplars and the question) and ARC-Challenge 25-shot style
(full-text choices). A freshly initialised model (preset `--preset`, the tokenizer's vocabulary) scores
them both ways; the script checks the two give the same scores (to 1e-3) and greedy flags, and prints
requests per second, medians of `--repeats` runs, and their ratio.

    .venv/bin/python benchmarks/eval_loglikelihood.py --tokenizer TOKENIZER_DIR [--benchmarks DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_eval.api.instance import Instance  # noqa: E402

from _common import random_checkpoint  # noqa: E402
from evaluation.lm import HRMLM  # noqa: E402


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().split("\n") if x.strip()]


def mmlu_requests(bench: Path, n: int) -> list[Instance]:
    dev = _rows(bench / "mmlu" / "dev.jsonl")
    test = _rows(bench / "mmlu" / "test.jsonl")[:n]

    def block(d: dict, with_answer: bool) -> str:
        opts = "".join(f"\n{k}. {c}" for k, c in zip("ABCD", d["choices"]))
        return f"{d['question'].strip()}{opts}\nAnswer:" + (f" {'ABCD'[d['answer']]}\n\n" if with_answer else "")

    reqs = []
    for i, d in enumerate(test):
        shots = [x for x in dev if x["subject"] == d["subject"]][:5]
        ctx = "".join(block(x, True) for x in shots) + block(d, False)
        reqs += [Instance("loglikelihood", {}, (ctx, f" {k}"), len(reqs)) for k in "ABCD"]
    return reqs


def arc_requests(bench: Path, n: int, shots: int) -> list[Instance]:
    val = _rows(bench / "arc_challenge" / "validation.jsonl")[:shots]
    test = _rows(bench / "arc_challenge" / "test.jsonl")[:n]
    fs = "".join(f"Question: {x['question']}\nAnswer: {x['choices']['text'][x['choices']['label'].index(x['answerKey'])]}\n\n"
                 for x in val)
    reqs = []
    for d in test:
        ctx = fs + f"Question: {d['question']}\nAnswer:"
        reqs += [Instance("loglikelihood", {}, (ctx, f" {c}"), len(reqs)) for c in d["choices"]["text"]]
    return reqs


def main(argv=None) -> None:
    root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="tokenizer stage folder")
    ap.add_argument("--benchmarks", default=str(root / "shared/data/benchmarks"))
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--items", type=int, default=16, help="benchmark items per task")
    ap.add_argument("--arc-shots", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    ck = random_checkpoint(a.tokenizer, a.preset, prefix="evalll-")
    lm = HRMLM(str(ck), tokenizer=a.tokenizer, batch_size=a.batch, progress=False)
    bench = Path(a.benchmarks)
    print(f"preset {a.preset}, batch {a.batch}, torch threads 2, median of {a.repeats}")
    for name, reqs in (("mmlu 5-shot", mmlu_requests(bench, a.items)),
                       (f"arc_challenge {a.arc_shots}-shot", arc_requests(bench, a.items, a.arc_shots))):
        times, outs = {}, {}
        for shared in (True, False):
            lm.share_prompts = shared
            ts = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                outs[shared] = lm.loglikelihood(reqs)
                ts.append(time.perf_counter() - t0)
            times[shared] = statistics.median(ts)
        same = all(abs(x[0] - y[0]) < 1e-3 and x[1] == y[1] for x, y in zip(outs[True], outs[False]))
        print(f"{name:>22}: {len(reqs)} requests  shared prompts {len(reqs) / times[True]:7.1f} req/s  "
              f"each alone {len(reqs) / times[False]:7.1f} req/s  speed-up x{times[False] / times[True]:.2f}  "
              f"{'same scores' if same else 'SCORES DIFFER'}")


if __name__ == "__main__":
    main()
