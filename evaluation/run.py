"""Evaluate a checkpoint on the benchmarks with lm-evaluation-harness; full and clean-subset scores.

    hrm eval runs/demo --limit 200                      # a run folder: its checkpoint, tokenizer, contamination
    hrm eval --checkpoint C --benchmarks B --output O   # explicit form (tokenizer: the checkpoint's own)
    hrm eval --checkpoint C --output O                  # the demo's held-out task alone (no benchmark files)

Tasks: by default the standard tasks whose files are in the benchmark folder (all six with --online),
then `demo_heldout` (evaluation.heldout: the demo generators' held-out problems, always local).

Protocols (`protocol`, `hrm eval --protocol harness|paper|both`; default harness):
- harness: lm-eval's standard tasks (their prompts, few-shot format and metrics) at the paper's shot
  counts: MMLU, ARC-C and HellaSwag scored by the log-likelihood of each choice; GSM8K (the harness's
  "Question/Answer" prompt), MATH (Minerva's prompt) and DROP generated greedily. Condition `cot` for
  GSM8K and MATH, `direct` for the others. The context is cut from its start to fit max_length.
- paper: the reference's protocol (evaluation.paper): everything generated greedily from a stripped
  prompt with the few-shot examples inside the instruction, MC answers read as letters, GSM8K/MATH 0-shot
  CoT under `synth,cot` scored from the last \boxed{} by math_verify, a prompt too long for the context
  answered "" (counted: `n_overlong`). A tokenizer without one of the paper's tags (the demo's has no
  `synth`) is prompted with the tags it has; the entry records both (`condition`, `condition_paper`).
- both: each standard task under both; results.json keys the harness entry by the task name and the
  paper entry by `<task>_paper`. demo_heldout has one protocol (its training prompt) and runs once.
Every entry and table row names its protocol, shot count, condition and the items behind it (n).

Tokenizer: the checkpoint's own (see evaluation.locate); an explicit one must be the same file (sha256)
or, for checkpoints that do not record it, have the model's vocabulary size.

Limit: `limit` counts items per benchmark (not per harness subtask): N >= 1 items, or a fraction
0 < x < 1 of the benchmark's items (rounded up). The items are a seeded shuffle of all (subtask, doc
index) pairs of the benchmark, first N taken, grouped back by subtask (`sample_items`), so MMLU's N
items spread over its subjects in proportion to their sizes and a larger N scores a superset. They are
passed to the harness as `samples={subtask: [doc indices]}`; only subtasks with items are run (the
harness scores every doc of a subtask it is given without indices). The group's score is then the
macro average over the subtasks scored. `n` (items scored) and `n_total` are reported per task, and a
limited run says so in results.md's title and columns.

Outputs (in output_dir)
- `lm_eval_<task>.json`: the harness's own results dict for each task (samples left out), and
  `samples_<task>.jsonl`: its per-sample logs.
- `results.json`: per task and protocol: harness task name, protocol, few-shot, condition, scoring,
  context, metrics (full) with n, and
  when `contamination_items` (the contamination stage's items.parquet or its folder) is given, the same
  metrics over the items bucketed clean (each logged doc is mapped back to its contamination item by
  the sha1 of `pipeline.stages.contamination.item_text`, the text the check matched).
- `results.md`: a readable table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

from evaluation.locate import checkpoint_tokenizer, is_checkpoint, locate, record_evaluation, sha256_file
from evaluation.tasks import (BENCHMARK_OF, COT_TASKS, HARNESS_NAMES, HELDOUT_TASK, PAPER_FEWSHOT, PROTOCOLS,
                              STANDARD_TASKS, default_tasks, result_key, write_local_tasks, write_paper_tasks)

DEFAULT_TASKS = STANDARD_TASKS  # the six standard tasks (the default adds demo_heldout: evaluation.tasks.default_tasks)
HARNESS_MAX_GEN_TOKS = 256  # the harness protocol's generation cap when none is given
HARNESS_SCORING = {"mmlu": "loglikelihood of each choice", "arc_challenge": "loglikelihood of each choice",
                   "hellaswag": "loglikelihood of each choice", "gsm8k": "greedy, harness answer regex",
                   "minerva_math": "greedy, Minerva answer equivalence", "drop": "greedy, DROP em/f1",
                   HELDOUT_TASK: "greedy, final answer exact match"}


def protocols_of(protocol: str) -> list[str]:
    """harness | paper | both -> the protocols to run, in order."""
    if protocol == "both":
        return list(PROTOCOLS)
    if protocol not in PROTOCOLS:
        raise ValueError(f"evaluation: protocol must be harness, paper or both, got {protocol!r}")
    return [protocol]


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


def sample_items(sizes: dict[str, int], limit: int | float | None, seed: int = 0) -> dict[str, list[int]] | None:
    """The items of one benchmark to score under `limit` (see the module docstring): {subtask: sorted doc
    indices}, subtasks with no item left out; None when the limit covers the whole benchmark."""
    if limit is None:
        return None
    if limit <= 0:
        raise ValueError(f"evaluation: limit must be > 0 (items, or a fraction < 1 of each benchmark), got {limit}")
    total = sum(sizes.values())
    n = math.ceil(total * limit) if limit < 1 else int(limit)
    if n >= total:
        return None
    pairs = [(name, i) for name in sorted(sizes) for i in range(sizes[name])]
    random.Random(seed).shuffle(pairs)
    picked: dict[str, list[int]] = {}
    for name, i in pairs[:n]:
        picked.setdefault(name, []).append(i)
    # sorted: the harness maps its k-th selected doc back to indices[k]
    return {name: sorted(ix) for name, ix in sorted(picked.items())}


def run(
    checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike | None,
    benchmarks_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    tasks: tuple[str, ...] | list[str] | None = None,
    limit: int | float | None = None,
    contamination_items: str | os.PathLike | None = None,
    num_fewshot: dict[str, int] | None = None,
    batch_size: int = 8,
    max_gen_toks: int | None = None,
    max_length: int = 3072,
    online: bool = False,
    device: str = "cpu",
    seed: int = 0,
    protocol: str = "harness",
) -> dict:
    """Evaluate; returns the results.json dict. `tokenizer=None`: the checkpoint's own (an explicit one
    is checked against it: evaluation.locate.checkpoint_tokenizer). `limit`: items per benchmark (or a
    fraction of each), a seeded sample across its subtasks. Offline (default) the local benchmark files
    in `benchmarks_dir` are used; `online=True` runs the standard harness tasks from the Hub. `tasks=None`:
    `default_tasks` (the standard tasks whose files are given, then demo_heldout, always local).
    `protocol`: harness, paper or both (see the module docstring). `max_gen_toks`: a cap on generated
    tokens; None: 256 for the harness protocol, up to the context for the paper's (the reference)."""
    tok = checkpoint_tokenizer(checkpoint, tokenizer)  # before anything slow
    if limit is not None and limit <= 0:
        raise ValueError(f"evaluation: limit must be > 0 (items, or a fraction < 1 of each benchmark), got {limit}")
    protocols = protocols_of(protocol)
    if online and "paper" in protocols:
        raise ValueError("evaluation: the paper protocol reads the local benchmark files; drop --online and give "
                         "--benchmarks DIR")

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from evaluation.lm import HRMLM
    from pipeline.stages.contamination import item_key, item_text

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shots = {**PAPER_FEWSHOT, **(num_fewshot or {})}
    tasks = list(default_tasks(benchmarks_dir, online) if tasks is None else tasks)
    standard = [t for t in tasks if t != HELDOUT_TASK]
    lm = HRMLM(str(checkpoint), tokenizer=str(tok), batch_size=batch_size,
               max_gen_toks=HARNESS_MAX_GEN_TOKS if max_gen_toks is None else max_gen_toks,
               max_length=max_length, device=device)
    names: dict[tuple[str, str], str] = {}  # (task, protocol) -> harness task or group name
    if online:
        names.update({(t, "harness"): HARNESS_NAMES[t] for t in standard})
    elif benchmarks_dir is None and standard:
        raise ValueError("evaluation: offline runs of the standard tasks need benchmarks_dir (the local "
                         "benchmark folder)")
    local = ([] if online else [t for t in standard if "harness" in protocols]) + \
        ([HELDOUT_TASK] if HELDOUT_TASK in tasks else [])
    if local:
        names.update({(t, "harness"): n for t, n in write_local_tasks(
            benchmarks_dir, out / "tasks", local,
            max_gen_toks=HARNESS_MAX_GEN_TOKS if max_gen_toks is None else max_gen_toks).items()})
    paper_cond: dict[str, tuple[str, list[str]]] = {}
    if "paper" in protocols and standard:
        from evaluation.paper import PAPER, resolve_condition

        paper_cond = {t: resolve_condition(PAPER[t].condition, set(lm.ids.conditions)) for t in standard}
        for t, (used, missing) in paper_cond.items():
            if missing:
                print(f"hrm eval: {t} (paper): the tokenizer has no condition token for {', '.join(missing)}; "
                      f"prompted with {used!r} instead of {PAPER[t].condition!r}", file=sys.stderr)
        names.update({(t, "paper"): n for t, n in write_paper_tasks(
            benchmarks_dir, out / "tasks", standard, conditions={t: c for t, (c, _) in paper_cond.items()},
            max_gen_toks=max_gen_toks).items()})
    tm = TaskManager(include_path=str(out / "tasks")) if (out / "tasks").is_dir() else TaskManager()  # 7-11 s
    jobs = [(t, p) for p in protocols for t in standard] + ([(HELDOUT_TASK, "heldout")] if HELDOUT_TASK in tasks else [])
    buckets = _clean_keys(contamination_items) if contamination_items else None
    tok_file = Path(tok) / "tokenizer.json" if Path(tok).is_dir() else Path(tok)
    results: dict = {"checkpoint": str(checkpoint),
                     "checkpoint_sha256": sha256_file(Path(checkpoint) / "model.safetensors"),
                     "tokenizer": str(tok), "tokenizer_sha256": sha256_file(tok_file), "limit": limit, "seed": seed,
                     "limited": False, "online": online, "benchmarks": None if online else str(benchmarks_dir),
                     "contamination": str(contamination_items) if contamination_items else None,
                     "protocol": protocol, "max_gen_toks": max_gen_toks, "tasks": {}}
    for ti, (t, proto) in enumerate(jobs):
        t0 = time.time()
        key = result_key(t, proto)
        name = names[(t, "harness" if proto == "heldout" else proto)]
        lm.condition = "cot" if t in COT_TASKS else "direct"  # harness; paper and held-out name theirs per request
        lm.overlong = 0
        loaded = tm.load(name)  # the task or group with its subtasks, datasets loaded once
        leaves = loaded["tasks"]
        sizes = {n: len(task.eval_docs) for n, task in leaves.items()}
        picks = sample_items(sizes, limit, seed)
        if picks is None:
            objs = [loaded["groups"].get(name) or leaves[name]]
        else:
            objs = [leaves[n] for n in picks]  # a subtask given without indices would be scored whole
        nshot, exceptions = shots[t], {}
        if proto == "paper":  # shots set per subtask (MMLU's exception), the harness told nothing
            from evaluation.paper import MMLU_SHOTS, PAPER

            if t == "mmlu" and "mmlu" not in (num_fewshot or {}):
                exceptions = {s: v for s, v in MMLU_SHOTS.items() if f"{name}_{s}" in leaves}
            for n, task in leaves.items():
                task.set_config(key="num_fewshot", value=exceptions.get(n.removeprefix(f"{name}_"), nshot))
        n_sel = sum(sizes.values()) if picks is None else sum(len(v) for v in picks.values())
        print(f"[eval {ti + 1}/{len(jobs)}] {key} ({name}, {proto}, {nshot}-shot, {n_sel} of {sum(sizes.values())} items"
              + (f" in {len(picks)} of {len(sizes)} subtasks" if picks is not None and len(sizes) > 1 else "") + ")",
              file=sys.stderr, flush=True)
        r = simple_evaluate(model=lm, tasks=objs, num_fewshot=None if proto == "paper" else nshot, samples=picks,
                            log_samples=True, task_manager=tm, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                            torch_random_seed=0, fewshot_random_seed=0)
        samples = r.pop("samples", {})
        (out / f"lm_eval_{key}.json").write_text(json.dumps(r, indent=2, default=str))
        with open(out / f"samples_{key}.jsonl", "w") as f:
            for sub, ss in samples.items():
                for s in ss:
                    f.write(json.dumps({"task": sub, **s}, default=str) + "\n")
        entry: dict = {"task": t, "protocol": proto, "harness_task": name, "num_fewshot": nshot, "seconds": 0.0,
                       "subtasks": {}}
        if proto == "paper":
            used, missing = paper_cond[t]
            entry.update({"fewshot_exceptions": exceptions, "condition": used, "condition_paper": PAPER[t].condition,
                          "condition_missing_tags": missing, "scoring": PAPER[t].answer,
                          "context": min(PAPER[t].max_context, lm.model_max), "max_gen_toks": max_gen_toks,
                          "n_overlong": lm.overlong})
        else:
            entry.update({"condition": "per subtask (its source's)" if t == HELDOUT_TASK else lm.condition,
                          "scoring": HARNESS_SCORING.get(t, ""), "context": lm.max_length,
                          "max_gen_toks": lm.max_gen_toks})
        bench = BENCHMARK_OF[t]
        all_full, all_clean = {}, {}
        n_docs = n_clean = 0
        for sub, ss in samples.items():
            mnames = {k.split(",")[0] for k in r["results"].get(sub, {}) if "," in k and "_stderr" not in k}
            full = _metric_means(ss, mnames)
            rec: dict = {"full": full, "n_docs": len({s["doc_id"] for s in ss}), "n_total": sizes.get(sub)}
            n_docs += rec["n_docs"]
            if buckets is not None:
                b = buckets.get(bench, {})
                tags = [b.get(item_key(item_text(bench, s["doc"]))) for s in ss]
                clean = [s for s, g in zip(ss, tags) if g == "clean"]
                rec["clean"] = _metric_means(clean, mnames)
                rec["unmatched_docs"] = len({s["doc_id"] for s, g in zip(ss, tags) if g is None})
                rec["n_clean"] = len({s["doc_id"] for s in clean})
                n_clean += rec["n_clean"]
            entry["subtasks"][sub] = rec
            for k, v in full.items():
                all_full.setdefault(k, []).append(v["value"])
            for k, v in rec.get("clean", {}).items():
                all_clean.setdefault(k, []).append(v["value"])
        # macro average over the subtasks scored (MMLU: over subjects; single tasks: the task itself)
        entry["full"] = {k: sum(v) / len(v) for k, v in all_full.items()}
        entry["n"], entry["n_total"] = n_docs, sum(sizes.values())
        entry["limited"] = n_docs < entry["n_total"]
        results["limited"] = results["limited"] or entry["limited"]
        if buckets is not None:
            entry["clean"] = {k: sum(v) / len(v) for k, v in all_clean.items()}
            entry["n_clean"] = n_clean
        entry["harness_results"] = r["results"].get(name) or {}
        entry["seconds"] = round(time.time() - t0, 2)
        results["tasks"][key] = entry
        print(f"[eval {ti + 1}/{len(jobs)}] {key} done in {entry['seconds']:.1f} s ({n_docs} items): "
              + ", ".join(f"{m}={100 * v:.2f}" for m, v in sorted(entry["full"].items())), file=sys.stderr, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(table(results))
    return results


PROTOCOL_LABEL = {"harness": "harness", "paper": "paper", "heldout": "own (training prompt)"}


def shots_text(e: dict) -> str:
    """The few-shot setting of an entry: "5", "5 (high_school_european_history 3)"."""
    ex = e.get("fewshot_exceptions") or {}
    return str(e.get("num_fewshot")) + (f" ({', '.join(f'{s} {v}' for s, v in sorted(ex.items()))})" if ex else "")


def condition_text(e: dict) -> str:
    c = e.get("condition", "")
    if e.get("condition_missing_tags"):
        c += f" (paper: {e.get('condition_paper')}; no {', '.join(e['condition_missing_tags'])} token)"
    return c


def table(results: dict) -> str:
    """results.md: a title saying what was scored (a limited run says so), then one row per task, protocol
    and metric with its few-shot setting, condition and the items scored (n of the benchmark's total;
    clean n when there is a clean subset), then what each protocol means."""
    limited = results.get("limited", False)
    if limited:
        lim = results.get("limit")
        fraction = isinstance(lim, float) and lim < 1
        what = f"a fraction {lim} of each benchmark" if fraction else f"{lim} items per benchmark"
        title = (f"# LIMITED evaluation (--limit {lim}: {what}, seeded sample, seed {results.get('seed', 0)}): "
                 f"not the full benchmarks")
    else:
        title = "# Evaluation on the full benchmarks"
    lines = [title, "", f"checkpoint: {results.get('checkpoint')}", f"protocol: {results.get('protocol', 'harness')}", ""]
    n_head = "n (LIMITED: of total)" if limited else "n"
    lines += [f"| task | protocol | shots | condition | {n_head} | metric | full | clean | clean n |",
              "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for key, e in results["tasks"].items():
        t = e.get("task", key)
        proto = PROTOCOL_LABEL.get(e.get("protocol", "harness"), e.get("protocol"))
        n, total = e.get("n"), e.get("n_total")
        n_txt = "" if n is None else (f"{n} of {total}" if e.get("limited") else f"{n}")
        for k, v in sorted(e["full"].items()):
            c = e.get("clean", {}).get(k)
            lines.append(f"| {t} | {proto} | {shots_text(e)} | {condition_text(e)} | {n_txt} | {k} | {100 * v:.2f} | "
                         f"{'' if c is None else f'{100 * c:.2f}'} | {e.get('n_clean', '') if c is not None else ''} |")
        if t == HELDOUT_TASK:  # the breakdown per demo source
            for sub, rec in sorted(e.get("subtasks", {}).items()):
                for k, v in sorted(rec["full"].items()):
                    c = rec.get("clean", {}).get(k, {}).get("value")
                    lines.append(f"| {t}/{sub.removeprefix(HELDOUT_TASK + '_')} | {proto} | {e['num_fewshot']} | "
                                 f"{condition_text(e)} | {rec['n_docs']} of {rec.get('n_total')} | {k} | "
                                 f"{100 * v['value']:.2f} | {'' if c is None else f'{100 * c:.2f}'} | "
                                 f"{rec.get('n_clean', '') if c is not None else ''} |")
        if e.get("n_overlong"):
            notes.append(f"{t} ({proto}): {e['n_overlong']} of {n} prompts do not fit the {e.get('context')}-token "
                         f"context and were answered \"\" (scored wrong), as the reference does.")
        if e.get("protocol") == "paper" and e.get("max_gen_toks") is not None:
            notes.append(f"{t} ({proto}): answers capped at {e['max_gen_toks']} tokens (the paper: up to the "
                         f"{e.get('context')}-token context).")
    protos = {e.get("protocol", "harness") for e in results["tasks"].values()}
    lines += [""]
    if "harness" in protos:
        lines.append("harness: lm-eval's standard tasks (their prompts and metrics; MMLU, ARC-C, HellaSwag by the "
                     "log-likelihood of each choice, GSM8K, MATH and DROP generated greedily); few-shot examples "
                     "in the harness's format inside the instruction.")
    if "paper" in protos:
        lines.append("paper: the HRM-Text reference's protocol: greedy generation from the stripped prompt, few-shot "
                     "examples inside the instruction, MC answers read as letters, GSM8K/MATH 0-shot CoT with the "
                     "last \\boxed{} checked by math_verify, DROP em/f1 (evaluation.paper).")
    lines += [f"- {x}" for x in notes]
    if limited:
        lines += ["", "Limited run: scores are over the n items shown, a seeded sample of each benchmark "
                      "(MMLU: across its subjects, macro-averaged over the subjects scored)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="hrm eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="evaluate a checkpoint with lm-evaluation-harness",
        epilog="examples:\n"
               "  hrm eval runs/demo --limit 200     checkpoint (train/final/ema), tokenizer, contamination and\n"
               "                                     benchmarks from the run; results in runs/demo/eval\n"
               "  hrm eval runs/demo/train --benchmarks BENCH_DIR --tasks mmlu,gsm8k\n"
               "  hrm eval --checkpoint CKPT --benchmarks BENCH_DIR --output OUT\n"
               "           [--tokenizer TOK] [--contamination C]\n"
               "  hrm eval --checkpoint CKPT --output OUT     the demo's held-out task (demo_heldout) alone\n"
               "  hrm eval runs/demo --protocol both --limit 50   harness and paper protocols side by side\n"
               "Default tasks: those of the six whose files are in BENCH_DIR, then demo_heldout (local, always).\n"
               "--limit N counts items per benchmark (a seeded sample across MMLU's subjects); 0<N<1 is a fraction.")
    ap.add_argument("run", nargs="?", metavar="RUN_DIR",
                    help="a run folder (runs/NAME with run.json), a train folder (final/ema) or a checkpoint folder")
    ap.add_argument("--checkpoint", default=None, help="checkpoint folder (default: RUN_DIR's train/final/ema)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer folder; default and checked: the checkpoint's own tokenizer.json")
    ap.add_argument("--benchmarks", default=None,
                    help="local benchmark folder (default: the one the run's contamination check read)")
    ap.add_argument("--output", default=None, help="output folder (default: RUN_DIR/eval)")
    ap.add_argument("--tasks", default=None,
                    help=f"comma-separated, of {','.join([*STANDARD_TASKS, HELDOUT_TASK])} (default: the standard "
                         "tasks whose files are in --benchmarks, all six with --online, then demo_heldout)")
    ap.add_argument("--limit", type=float, default=None,
                    help="items per benchmark (a seeded sample across subtasks), or a fraction 0<x<1 of each")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    ap.add_argument("--contamination", default=None,
                    help="contamination stage folder or items.parquet (default: the run's contamination stage)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-gen-toks", type=int, default=None,
                    help=f"tokens generated at most per answer (default: {HARNESS_MAX_GEN_TOKS} for the harness "
                         "protocol, up to the context for the paper's, as the reference)")
    ap.add_argument("--protocol", choices=["harness", "paper", "both"], default="harness",
                    help="harness: lm-eval's standard tasks (default); paper: the HRM-Text reference's generative "
                         "protocol (evaluation.paper); both: each task under both")
    ap.add_argument("--fewshot", action="append", default=[], metavar="TASK=N",
                    help="override a task's few-shot count (default: the paper's, in the report)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--online", action="store_true", help="standard harness tasks from the Hub")
    a = ap.parse_args(argv)
    tasks = None if a.tasks is None else [t for t in a.tasks.split(",") if t]
    unknown = [t for t in tasks or [] if t not in BENCHMARK_OF]
    if unknown:
        ap.error(f"--tasks: unknown {unknown}; known: {sorted(BENCHMARK_OF)}")
    if a.run is None and a.checkpoint is None:
        ap.error("give RUN_DIR (a run folder, train folder or checkpoint) or --checkpoint CKPT")
    if a.limit is not None and a.limit <= 0:
        ap.error(f"--limit must be > 0 (items per benchmark, or a fraction 0<x<1 of each), got {a.limit:g}")
    if a.max_gen_toks is not None and a.max_gen_toks < 1:
        ap.error(f"--max-gen-toks must be >= 1, got {a.max_gen_toks}")
    if a.online and a.protocol != "harness":
        ap.error(f"--protocol {a.protocol}: the paper protocol reads local benchmark files; give --benchmarks DIR "
                 "instead of --online")
    checkpoint_ok = a.checkpoint is None or is_checkpoint(a.checkpoint)
    target = locate(a.run if a.run is not None else a.checkpoint, checkpoint=a.checkpoint) if checkpoint_ok else None
    benchmarks = a.benchmarks or (None if a.online or target is None else target.benchmarks)
    needs_files = tasks is not None and any(t != HELDOUT_TASK for t in tasks)
    if benchmarks is None and not a.online and needs_files:  # what is missing first, then what is wrong
        ap.error("give --benchmarks DIR (local benchmark files) or --online (the harness tasks from the Hub)"
                 + ("" if target is None or target.run_dir is None else
                    f"; the run {target.run_dir} has no contamination check that names a benchmark folder"))
    if not checkpoint_ok:
        ap.error(f"--checkpoint: {a.checkpoint} is not a checkpoint folder (no config.json + model.safetensors; "
                 "e.g. RUN/train/final/ema)")
    tok_arg = None if a.tokenizer is None else Path(a.tokenizer)
    if tok_arg is not None and not (tok_arg / "tokenizer.json").is_file() and not tok_arg.is_file():
        ap.error(f"--tokenizer: {a.tokenizer} is not a tokenizer folder (no tokenizer.json)")
    if benchmarks is not None and not Path(benchmarks).is_dir():
        ap.error(f"--benchmarks: {benchmarks} is not a folder")
    if a.output is not None:
        output = Path(a.output)
    elif a.run is not None:
        output = Path(a.run) / "eval"
    elif target.run_dir is not None:
        output = target.run_dir / "eval"
    else:
        ap.error("give --output DIR (or RUN_DIR, whose eval/ folder is the default)")
    shots: dict[str, int] = {}
    for kv in a.fewshot:
        t, _, n = kv.partition("=")
        if t not in BENCHMARK_OF or not n.isdigit():
            ap.error(f"--fewshot expects TASK=N with TASK in {sorted(BENCHMARK_OF)}, got {kv!r}")
        shots[t] = int(n)
    checkpoint = target.checkpoint
    for note in target.notes:
        print(f"hrm eval: {note}", file=sys.stderr)
    tokenizer = checkpoint_tokenizer(checkpoint, a.tokenizer)  # a wrong tokenizer fails here, before any work
    contamination = a.contamination or target.contamination
    limit = int(a.limit) if a.limit is not None and a.limit >= 1 else a.limit
    if tasks is None:
        tasks = default_tasks(benchmarks, a.online)
        missing = [t for t in STANDARD_TASKS if t not in tasks]
        if missing:
            print(f"hrm eval: no benchmark files for {', '.join(missing)}"
                  + (f" in {benchmarks}" if benchmarks else " (no --benchmarks DIR)") + ": not run", file=sys.stderr)
    print(f"hrm eval: checkpoint {checkpoint}, tokenizer {tokenizer}, contamination {contamination or '-'}, "
          f"output {output}", file=sys.stderr)
    res = run(checkpoint, tokenizer, benchmarks, output, tasks=tasks, limit=limit, contamination_items=contamination,
              num_fewshot=shots, batch_size=a.batch_size, max_gen_toks=a.max_gen_toks, online=a.online,
              device=a.device, seed=a.seed, protocol=a.protocol)
    print(table(res))
    if target.run_dir is not None and record_evaluation(target.run_dir, res, output) is not None:
        print(f"recorded in {target.run_dir / 'run.json'} (evaluations)")
    print(f"results: {output / 'results.md'}"
          + ("  (LIMITED run: drop --limit for full scores)" if res["limited"] else ""))
    return 0
