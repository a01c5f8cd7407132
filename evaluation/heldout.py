"""`demo_heldout`: the demo's own benchmark, problems of the demo's generators that are never training data.

The embedded default (data_specs/demo.yaml) trains on generated arithmetic (with and without worked
steps), word problems, sequences and comparisons. Its held-out benchmark is made by the same
generators: `pipeline.generators.heldout` draws only problems whose canonical text hashes into the
held-out bucket, and the generators never emit such a problem as a training row, with any seed or
parameters (pipeline.generators, "Held-out split"). So the set is disjoint from the training data of
every spec by construction; the contamination check can confirm it on a run's data
(`hrm stage contamination --benchmarks evaluation/heldout ...`).

Items (`build_items`): for each generator source of the spec (sources that repeat another's generator
and parameters, like the demo's `word_problems_mirror`, are skipped), the first `per_task` distinct
held-out problems drawn with the source's parameters and seed HELDOUT_SEED. One JSON object a line:

    id        "<source>/<k>"
    task      the source: one harness subtask per source (demo_heldout_<source>)
    type      the generator's subset (addition, shopping, seq_geometric, fractions, ...)
    condition the condition token the source trains with (direct / cot): the prompt's
    question  the instruction, exactly as in training (the contamination check matches this field)
    answer    the gold final answer (`final_answer` of the reference response)
    response  the reference response (as a training row would have it)
    problem   the canonical problem text (the held-out hash is taken of it)

The committed file is `evaluation/heldout/demo_heldout/test.jsonl` (the layout of the other local
benchmarks: `<name>/test.jsonl`); `python -m evaluation.heldout` rewrites it (byte-identical: the
tests check that the generators still give it).

Scoring (`score`): the model's greedy continuation (prompted [BOQ][condition] question [EOQ], as in
training; 0-shot) is reduced to its final answer - the number after the last "####", "The answer is"
or "The next term is", else the last number (integer, decimal or fraction) in the text, else the
stripped text - and compared with the gold answer numerically (1,234 = 1234 = 1234.0; 6/14 = 3/7),
or as stripped strings when either is not a number. The metric is `exact_match` (0 or 1 per item).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
from fractions import Fraction
from pathlib import Path

NAME = "demo_heldout"
HELDOUT_DIR = Path(__file__).parent / "heldout"  # a --benchmarks folder: heldout/demo_heldout/test.jsonl
HELDOUT_SEED = 20_251  # any seed: the hash split, not the seed, keeps the problems out of training
PER_TASK = 60  # items per source (5 demo sources: 300 items)
_DRAW_FACTOR = 50  # rows drawn per item wanted at most (small problem spaces repeat problems)

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_MARKERS = ("####", "The answer is", "The next term is")


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------
def final_answer(text: str) -> str:
    """The final answer of a response (see the module docstring)."""
    text = text.strip()
    for marker in _MARKERS:
        k = text.rfind(marker)
        if k >= 0:
            m = _NUM.search(text, k + len(marker))
            if m:
                return m.group()
    nums = _NUM.findall(text)
    return nums[-1] if nums else text


def as_number(text: str) -> Fraction | None:
    """An integer, decimal or fraction (commas, a leading $ and trailing . , allowed), else None."""
    t = text.strip().lstrip("$").rstrip(".,").replace(",", "")
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def score(generated: str, gold: str) -> bool:
    """True when the final answer of `generated` is the gold answer (numerically when both are numbers)."""
    pred = final_answer(generated)
    a, b = as_number(pred), as_number(gold)
    if a is not None and b is not None:
        return a == b
    return pred.strip() == gold.strip()


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """The harness hook: exact_match of the one greedy generation."""
    return {"exact_match": float(score(results[0], doc["answer"]))}


# ------------------------------------------------------------------------------------------------
# the items
# ------------------------------------------------------------------------------------------------
def build_items(spec: str = "demo", per_task: int = PER_TASK, seed: int = HELDOUT_SEED) -> list[dict]:
    """The held-out items of a spec's generator sources (see the module docstring)."""
    from pipeline.generators import heldout
    from pipeline.spec import load_spec

    sp = load_spec(spec)
    items: list[dict] = []
    done: set[tuple] = set()
    for src in sp.sources:
        if src.kind != "generator":
            continue
        params = {k: v for k, v in src.params.items() if k not in ("n", "seed", "near_dup_rate", "exact_dup_rate")}
        key = (src.generator, json.dumps(params, sort_keys=True))
        if key in done:  # the same problems again (a mirror source)
            continue
        done.add(key)
        seen: set[str] = set()
        for row in itertools.islice(heldout(src.generator, per_task * _DRAW_FACTOR, seed, **params),
                                    per_task * _DRAW_FACTOR):
            if row["problem"] in seen:
                continue
            seen.add(row["problem"])
            gold = final_answer(row["answer"])
            assert score(row["answer"], gold), (src.name, row)
            items.append({"id": f"{src.name}/{len(seen) - 1}", "task": src.name, "type": row["task"],
                          "condition": row["condition"], "question": row["question"], "answer": gold,
                          "response": row["answer"], "problem": row["problem"]})
            if len(seen) == per_task:
                break
        else:
            raise ValueError(f"heldout: source {src.name!r} gave only {len(seen)} distinct held-out problems "
                             f"in {per_task * _DRAW_FACTOR} draws (wanted {per_task})")
    return items


def write(out_dir: str | os.PathLike = HELDOUT_DIR, spec: str = "demo", per_task: int = PER_TASK,
          seed: int = HELDOUT_SEED) -> Path:
    """Write `<out_dir>/demo_heldout/test.jsonl`; returns its path."""
    f = Path(out_dir) / NAME / "test.jsonl"
    f.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in build_items(spec, per_task, seed))
    tmp = f.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(f)
    return f


def load(folder: str | os.PathLike | None = None) -> list[dict]:
    """The items of `<folder>/demo_heldout/test.jsonl` (default: the committed set)."""
    f = Path(folder or HELDOUT_DIR) / NAME / "test.jsonl"
    return [json.loads(line) for line in f.read_text().split("\n") if line.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation.heldout",
                                 description="write the demo's held-out benchmark (<output>/demo_heldout/test.jsonl)")
    ap.add_argument("--output", default=str(HELDOUT_DIR), help="benchmark folder (default: the committed one)")
    ap.add_argument("--spec", default="demo", help="spec whose generator sources give the items (default: demo)")
    ap.add_argument("--per-task", type=int, default=PER_TASK)
    ap.add_argument("--seed", type=int, default=HELDOUT_SEED)
    a = ap.parse_args(argv)
    f = write(a.output, a.spec, a.per_task, a.seed)
    items = load(f.parent.parent)
    counts: dict[str, int] = {}
    for x in items:
        counts[x["task"]] = counts.get(x["task"], 0) + 1
    print(f"{f}: {len(items)} items " + json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
