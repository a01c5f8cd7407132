"""Evaluate a checkpoint on the benchmarks with lm-evaluation-harness; full and clean-subset scores.

Outputs (in output_dir)
- `lm_eval_<task>.json`: the harness's own results dict for each task (samples left out), and
  `samples_<task>.jsonl`: its per-sample logs.
- `results.json`: per task: harness task name, few-shot, condition token, metrics (full) with n, and
  when `contamination_items` (the contamination stage's items.parquet or its folder) is given, the same
  metrics over the items bucketed clean (each logged doc is mapped back to its contamination item by
  the sha1 of `pipeline.stages.contamination.item_text`, the text the check matched).
- `results.md`: a readable table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from evaluation.tasks import BENCHMARK_OF, COT_TASKS, HARNESS_NAMES, PAPER_FEWSHOT, write_local_tasks

DEFAULT_TASKS = ("mmlu", "arc_challenge", "hellaswag", "gsm8k", "minerva_math", "drop")


def _clean_keys(contamination_items) -> dict[str, dict[str, str]]:
    """benchmark -> {item key: bucket} from items.parquet."""
    import pyarrow.parquet as pq

    p = Path(contamination_items)
    if p.is_dir():
        p = p / "items.parquet"
    out: dict[str, dict[str, str]] = {}
    for r in pq.read_table(p, columns=["benchmark", "key", "bucket"]).to_pylist():
        out.setdefault(r["benchmark"], {})[r["key"]] = r["bucket"]
    return out


def _metric_means(samples: list[dict], metric_names: set[str]) -> dict[str, dict]:
    """{"metric,filter": {"value": mean, "n": count}} over the samples."""
    acc: dict[str, list[float]] = {}
    for s in samples:
        f = s.get("filter", "none")
        for m in metric_names:
            v = s.get(m)
            if isinstance(v, (int, float)) and not isinstance(v, bool) or isinstance(v, bool):
                acc.setdefault(f"{m},{f}", []).append(float(v))
    return {k: {"value": sum(v) / len(v), "n": len(v)} for k, v in sorted(acc.items()) if v}


def run(
    checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike,
    benchmarks_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    tasks: tuple[str, ...] | list[str] = DEFAULT_TASKS,
    limit: int | float | None = None,
    contamination_items: str | os.PathLike | None = None,
    num_fewshot: dict[str, int] | None = None,
    batch_size: int = 8,
    max_gen_toks: int = 256,
    max_length: int = 3072,
    online: bool = False,
    device: str = "cpu",
) -> dict:
    """Evaluate; returns the results.json dict. Offline (default) the local benchmark files in
    `benchmarks_dir` are used; `online=True` runs the standard harness tasks from the Hub."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from evaluation.lm import HRMLM
    from pipeline.stages.contamination import item_key, item_text

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shots = {**PAPER_FEWSHOT, **(num_fewshot or {})}
    if online:
        names = {t: HARNESS_NAMES[t] for t in tasks}
        tm = TaskManager()
    else:
        if benchmarks_dir is None:
            raise ValueError("evaluation: offline runs need benchmarks_dir (the local benchmark folder)")
        names = write_local_tasks(benchmarks_dir, out / "tasks", list(tasks))
        tm = TaskManager(include_path=str(out / "tasks"))  # built once (7-11 s)
    lm = HRMLM(str(checkpoint), tokenizer=str(tokenizer), batch_size=batch_size, max_gen_toks=max_gen_toks,
               max_length=max_length, device=device)
    buckets = _clean_keys(contamination_items) if contamination_items else None
    results: dict = {"checkpoint": str(checkpoint), "limit": limit, "online": online, "tasks": {}}
    for ti, t in enumerate(tasks):
        t0 = time.time()
        print(f"[eval {ti + 1}/{len(tasks)}] {t} ({names[t]}, {shots[t]}-shot, limit {limit})", file=sys.stderr, flush=True)
        lm.condition = "cot" if t in COT_TASKS else "direct"
        r = simple_evaluate(model=lm, tasks=[names[t]], num_fewshot=shots[t], limit=limit, log_samples=True,
                            task_manager=tm, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                            torch_random_seed=0, fewshot_random_seed=0)
        samples = r.pop("samples", {})
        (out / f"lm_eval_{t}.json").write_text(json.dumps(r, indent=2, default=str))
        with open(out / f"samples_{t}.jsonl", "w") as f:
            for sub, ss in samples.items():
                for s in ss:
                    f.write(json.dumps({"task": sub, **s}, default=str) + "\n")
        entry: dict = {"harness_task": names[t], "num_fewshot": shots[t], "condition": lm.condition,
                       "seconds": round(time.time() - t0, 2), "subtasks": {}}
        bench = BENCHMARK_OF[t]
        all_full, all_clean = {}, {}
        for sub, ss in samples.items():
            mnames = {k.split(",")[0] for k in r["results"].get(sub, {}) if "," in k and "_stderr" not in k}
            full = _metric_means(ss, mnames)
            rec: dict = {"full": full}
            if buckets is not None:
                b = buckets.get(bench, {})
                tags = [b.get(item_key(item_text(bench, s["doc"]))) for s in ss]
                clean = [s for s, g in zip(ss, tags) if g == "clean"]
                rec["clean"] = _metric_means(clean, mnames)
                rec["unmatched_docs"] = len({s["doc_id"] for s, g in zip(ss, tags) if g is None})
                rec["n_docs"] = len({s["doc_id"] for s in ss})
                rec["n_clean"] = len({s["doc_id"] for s in clean})
            entry["subtasks"][sub] = rec
            for k, v in full.items():
                all_full.setdefault(k, []).append(v["value"])
            for k, v in rec.get("clean", {}).items():
                all_clean.setdefault(k, []).append(v["value"])
        # macro average over subtasks (MMLU: over subjects; single tasks: the task itself)
        entry["full"] = {k: sum(v) / len(v) for k, v in all_full.items()}
        if buckets is not None:
            entry["clean"] = {k: sum(v) / len(v) for k, v in all_clean.items()}
        entry["harness_results"] = r["results"].get(names[t]) or {}
        results["tasks"][t] = entry
        print(f"[eval {ti + 1}/{len(tasks)}] {t} done in {entry['seconds']:.1f} s: "
              + ", ".join(f"{m}={100 * v:.2f}" for m, v in sorted(entry["full"].items())), file=sys.stderr, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(table(results))
    return results


def table(results: dict) -> str:
    lines = ["| task | shots | metric | full | clean |", "|---|---|---|---|---|"]
    for t, e in results["tasks"].items():
        for k, v in sorted(e["full"].items()):
            c = e.get("clean", {}).get(k)
            lines.append(f"| {t} | {e['num_fewshot']} | {k} | {100 * v:.2f} | {'' if c is None else f'{100 * c:.2f}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hrm eval", description="evaluate a checkpoint with lm-evaluation-harness")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tokenizer", required=True, help="tokenizer stage folder (tokenizer.json + tokenizer_meta.json)")
    ap.add_argument("--benchmarks", default=None, help="local benchmark folder (offline)")
    ap.add_argument("--output", required=True)
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--limit", type=float, default=None)
    ap.add_argument("--contamination", default=None, help="contamination stage folder or items.parquet")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-gen-toks", type=int, default=256)
    ap.add_argument("--fewshot", action="append", default=[], metavar="TASK=N",
                    help="override a task's few-shot count (default: the paper's, in the report)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--online", action="store_true", help="standard harness tasks from the Hub")
    a = ap.parse_args(argv)
    tasks = [t for t in a.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in BENCHMARK_OF]
    if unknown:
        ap.error(f"--tasks: unknown {unknown}; known: {sorted(BENCHMARK_OF)}")
    if a.benchmarks is None and not a.online:
        ap.error("give --benchmarks DIR (local benchmark files) or --online (the harness tasks from the Hub)")
    if not (Path(a.checkpoint) / "config.json").exists():
        ap.error(f"--checkpoint: {a.checkpoint} is not a checkpoint folder (no config.json; e.g. RUN/final/ema)")
    if not (Path(a.tokenizer) / "tokenizer.json").exists() and not Path(a.tokenizer).is_file():
        ap.error(f"--tokenizer: {a.tokenizer} is not a tokenizer stage folder (no tokenizer.json)")
    if a.benchmarks is not None and not Path(a.benchmarks).is_dir():
        ap.error(f"--benchmarks: {a.benchmarks} is not a folder")
    shots: dict[str, int] = {}
    for kv in a.fewshot:
        t, _, n = kv.partition("=")
        if t not in BENCHMARK_OF or not n.isdigit():
            ap.error(f"--fewshot expects TASK=N with TASK in {sorted(BENCHMARK_OF)}, got {kv!r}")
        shots[t] = int(n)
    limit = int(a.limit) if a.limit is not None and a.limit >= 1 else a.limit
    res = run(a.checkpoint, a.tokenizer, a.benchmarks, a.output, tasks=tasks,
              limit=limit, contamination_items=a.contamination, num_fewshot=shots, batch_size=a.batch_size,
              max_gen_toks=a.max_gen_toks, online=a.online, device=a.device)
    print(table(res))
    return 0
