"""The six benchmark tasks: standard harness names online, local-file variants offline.

Offline, `write_local_tasks(benchmarks_dir, out)` writes task YAMLs into `out` that `include:` the
harness's own task YAML and point it at the local JSONL files (`dataset_path: json`,
`dataset_kwargs.data_files`), so prompts, answer extraction and metrics are the harness's. Local task
names are `hrm_<name>`; MMLU becomes 57 per-subject tasks (the local test/dev files split by
`subject`, written under `out/data/mmlu/`) grouped as `hrm_mmlu` with the macro average over subjects.

Few-shot (`PAPER_FEWSHOT`, the paper's settings): MMLU 5, ARC-C 25, HellaSwag 10, DROP 3, GSM8K 0,
MATH 0. Few-shot examples come from: MMLU dev (first 5 of the subject, harness `first_n`), ARC-C
validation, HellaSwag validation and DROP validation_subset (random, the evaluated item excluded by the
harness when the few-shot split is the evaluated split). GSM8K and MATH keep the harness prompts
("Question: ...\\nAnswer:" and Minerva's "Problem: ...\\nSolution:") at 0 shots.

The paper's protocol (`write_paper_tasks`, hooks in evaluation.paper) is a second set of local tasks,
`hrm_paper_<name>` (MMLU: 57 subjects grouped as `hrm_paper_mmlu`, macro average): generative, the
few-shot examples inside the instruction (first_n), generation kwargs naming the condition tags, the
context and the stripping the `hrm` model applies (evaluation.lm), answers scored by evaluation.paper.

The seventh task, `demo_heldout` (evaluation.heldout), is always local: problems of the demo's
generators that are never training data, read from `<benchmarks_dir>/demo_heldout/test.jsonl` when the
benchmark folder has one, else from the committed set (evaluation/heldout). It is a group of one
generative subtask per demo source (`demo_heldout_<source>`, the file split by `task` under
`out/data/demo_heldout/`), 0-shot, prompted exactly as in training (the question is the whole
instruction, the source's condition token passed as the generation kwarg `condition`, which the `hrm`
model reads), greedy until [EOA], scored by exact match of the final answer (evaluation.heldout.score).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import re

import yaml

import lm_eval

TASKS_DIR = Path(lm_eval.__file__).parent / "tasks"
HELDOUT_TASK = "demo_heldout"  # local always (also with --online): evaluation.heldout
STANDARD_TASKS = ("mmlu", "arc_challenge", "hellaswag", "gsm8k", "minerva_math", "drop")
PAPER_FEWSHOT = {"mmlu": 5, "arc_challenge": 25, "hellaswag": 10, "drop": 3, "gsm8k": 0, "minerva_math": 0,
                 HELDOUT_TASK: 0}
HARNESS_NAMES = {"mmlu": "mmlu", "arc_challenge": "arc_challenge", "hellaswag": "hellaswag", "drop": "drop",
                 "gsm8k": "gsm8k", "minerva_math": "minerva_math"}
# task name -> benchmark folder name used by the contamination check
BENCHMARK_OF = {"mmlu": "mmlu", "arc_challenge": "arc_challenge", "hellaswag": "hellaswag", "drop": "drop",
                "gsm8k": "gsm8k", "minerva_math": "math", HELDOUT_TASK: HELDOUT_TASK}
# task -> the local files it reads (benchmark folder, splits)
LOCAL_FILES = {"mmlu": ("mmlu", ["test", "dev"]), "arc_challenge": ("arc_challenge", ["validation", "test"]),
               "hellaswag": ("hellaswag", ["validation"]), "gsm8k": ("gsm8k", ["test"]),
               "minerva_math": ("math", ["test"]), "drop": ("drop", ["validation_subset"])}
COT_TASKS = {"gsm8k", "minerva_math"}


def available_tasks(benchmarks_dir: str | os.PathLike | None) -> list[str]:
    """The standard tasks whose local files are all in `benchmarks_dir` (none without a folder)."""
    if benchmarks_dir is None:
        return []
    bench = Path(benchmarks_dir)
    return [t for t in STANDARD_TASKS
            if all((bench / LOCAL_FILES[t][0] / f"{s}.jsonl").is_file() for s in LOCAL_FILES[t][1])]


def default_tasks(benchmarks_dir: str | os.PathLike | None, online: bool = False) -> list[str]:
    """What `hrm eval` runs without --tasks: the standard tasks whose files are given (all six online),
    then the demo's held-out task."""
    return [*(STANDARD_TASKS if online else available_tasks(benchmarks_dir)), HELDOUT_TASK]


def _harness_fn(folder: str, name: str):
    """A function of a harness task's utils.py (loaded by file path: task folders are not packages)."""
    import importlib.util

    path = TASKS_DIR / folder / "utils.py"
    mod_name = f"_hrm_harness_{folder}_utils"
    mod = sys.modules.get(mod_name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[mod_name] = mod
    return getattr(mod, name)


# The harness resolves `!function` of an included YAML to a plain string when the including YAML
# lives elsewhere, so the local YAMLs name these wrappers (hrm_task_utils.py beside them) instead.
def hellaswag_process_docs(dataset):
    return _harness_fn("hellaswag", "process_docs")(dataset)


def math_process_docs(dataset):
    return _harness_fn("minerva_math", "process_docs")(dataset)


def math_doc_to_text(doc):
    return _harness_fn("minerva_math", "doc_to_text")(doc)


def math_process_results(doc, results):
    return _harness_fn("minerva_math", "process_results")(doc, results)


def math_fewshot_samples():
    return _harness_fn("minerva_math", "list_fewshot_samples")()


def drop_process_results(doc, results):
    return _harness_fn("drop", "process_results")(doc, results)


def heldout_process_results(doc, results):
    from evaluation.heldout import process_results

    return process_results(doc, results)


def drop_process_docs(dataset):
    """DROP in the local layout (passage, question, answers: list of answer span lists)."""

    def _process(doc):
        answers = [tuple(a) if isinstance(a, (list, tuple)) else (str(a),) for a in doc["answers"]]
        return {"id": doc["query_id"], "passage": doc["passage"], "question": doc["question"], "answers": answers,
                "answer": list(answers[0]) if answers else []}  # the target of few-shot examples

    return dataset.map(_process)


_UTILS = "hrm_task_utils"


def _write(path: Path, obj: dict) -> None:
    """Write a task YAML; string values "!fn NAME" become `!function hrm_task_utils.NAME`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)
    text = re.sub(r"'!fn (\w+)'", rf"!function {_UTILS}.\1", text)
    path.write_text(text)
    names = ", ".join(n for n in globals() if n.startswith(("drop_", "hellaswag_", "math_", "heldout_")))
    from evaluation.paper import HOOKS

    (path.parent / f"{_UTILS}.py").write_text(f"from evaluation.tasks import {names}  # noqa: F401\n"
                                              f"from evaluation.paper import {', '.join(HOOKS)}  # noqa: F401\n")


def _files(bench: Path, name: str, splits: list[str]) -> dict[str, str]:
    out = {}
    for s in splits:
        f = bench / name / f"{s}.jsonl"
        if not f.exists():
            raise FileNotFoundError(f"evaluation: {f} not found")
        out[s] = str(f.resolve())
    return out


def write_local_tasks(benchmarks_dir: str | os.PathLike | None, out: str | os.PathLike, tasks: list[str],
                      max_gen_toks: int = 256) -> dict[str, str]:
    """Write local task YAMLs for `tasks` into `out`; returns {task: local task or group name}.
    `benchmarks_dir` may be None when `tasks` is only the held-out task (its files ship with the
    package); `max_gen_toks` caps the held-out subtasks' generation length."""
    bench, out = Path(benchmarks_dir) if benchmarks_dir is not None else None, Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = {}
    local = {"dataset_path": "json", "dataset_name": None, "training_split": None}
    for t in tasks:
        if t == HELDOUT_TASK:
            names[t] = _write_heldout(bench, out, local, max_gen_toks)
            continue
        if t not in LOCAL_FILES:
            raise ValueError(f"evaluation: unknown task {t!r}; known: {sorted(PAPER_FEWSHOT)}")
        if bench is None:
            raise ValueError(f"evaluation: task {t!r} needs a benchmark folder (--benchmarks DIR with "
                             f"{LOCAL_FILES[t][0]}/{LOCAL_FILES[t][1][0]}.jsonl)")
        name = f"hrm_{t}"
        if t == "arc_challenge":
            _write(out / f"{name}.yaml", {
                "include": str(TASKS_DIR / "arc" / "arc_challenge.yaml"), "task": name, "tag": [], **local,
                "dataset_kwargs": {"data_files": _files(bench, "arc_challenge", ["validation", "test"])},
                "validation_split": "validation", "test_split": "test", "fewshot_split": "validation"})
        elif t == "hellaswag":
            _write(out / f"{name}.yaml", {
                "include": str(TASKS_DIR / "hellaswag" / "hellaswag.yaml"), "task": name, "tag": [], **local,
                "dataset_kwargs": {"data_files": _files(bench, "hellaswag", ["validation"])},
                "validation_split": "validation", "fewshot_split": "validation",
                "process_docs": "!fn hellaswag_process_docs"})
        elif t == "gsm8k":
            _write(out / f"{name}.yaml", {
                "include": str(TASKS_DIR / "gsm8k" / "gsm8k.yaml"), "task": name, "tag": [], **local,
                "dataset_kwargs": {"data_files": _files(bench, "gsm8k", ["test"])},
                "test_split": "test", "fewshot_split": "test"})
        elif t == "minerva_math":
            _write(out / f"{name}.yaml", {
                "include": str(TASKS_DIR / "minerva_math" / "minerva_math_algebra.yaml"), "task": name, "tag": [],
                **local, "dataset_kwargs": {"data_files": _files(bench, "math", ["test"])}, "test_split": "test",
                "process_docs": "!fn math_process_docs", "doc_to_text": "!fn math_doc_to_text",
                "process_results": "!fn math_process_results",
                "fewshot_config": {"sampler": "first_n", "samples": "!fn math_fewshot_samples"}})
        elif t == "drop":
            _write(out / f"{name}.yaml", {
                "include": str(TASKS_DIR / "drop" / "default.yaml"), "task": name, **local,
                "dataset_kwargs": {"data_files": _files(bench, "drop", ["validation_subset"])},
                "validation_split": "validation_subset", "fewshot_split": "validation_subset",
                "process_docs": "!fn drop_process_docs", "process_results": "!fn drop_process_results"})
        elif t == "mmlu":
            subjects = _split_mmlu(bench, out / "data" / "mmlu")
            subtasks = []
            for s in subjects:
                d = out / "data" / "mmlu" / s
                _write(out / "mmlu" / f"{name}_{s}.yaml", {
                    "include": str(TASKS_DIR / "mmlu" / "default" / "_default_template_yaml"),
                    "task": f"{name}_{s}", "task_alias": s, **local,
                    "description": f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n",
                    "dataset_kwargs": {"data_files": {"test": str(d / "test.jsonl"), "dev": str(d / "dev.jsonl")}},
                    "test_split": "test", "fewshot_split": "dev"})
                subtasks.append(f"{name}_{s}")
            _write(out / "mmlu" / f"{name}.yaml", {
                "group": name, "task": subtasks,
                "aggregate_metric_list": [{"metric": "acc", "weight_by_size": False}],  # macro average
                "metadata": {"version": 1}})
        else:
            raise ValueError(f"evaluation: unknown task {t!r}; known: {sorted(PAPER_FEWSHOT)}")
        names[t] = name
    return names


def _write_heldout(bench: Path | None, out: Path, local: dict, max_gen_toks: int) -> str:
    """The held-out group: one generative subtask per source (see the module docstring)."""
    from evaluation.heldout import HELDOUT_DIR, NAME, load

    folder = bench if bench is not None and (bench / NAME / "test.jsonl").is_file() else HELDOUT_DIR
    by: dict[str, list[dict]] = {}
    for x in load(folder):
        by.setdefault(x["task"], []).append(x)
    subtasks = []
    for task, docs in by.items():
        conditions = {x["condition"] for x in docs}
        if len(conditions) != 1:
            raise ValueError(f"evaluation: {folder}/{NAME}: task {task!r} mixes conditions {sorted(conditions)}")
        f = out / "data" / NAME / task / "test.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in docs))
        # room for the longest reference response (byte-level BPE: at most one token per byte) + [EOA]
        need = max(len(x["response"].encode("utf-8")) for x in docs) + 1
        sub = f"{NAME}_{task}"
        _write(out / NAME / f"{sub}.yaml", {
            "task": sub, "task_alias": task, **local, "dataset_kwargs": {"data_files": {"test": str(f.resolve())}},
            "test_split": "test", "output_type": "generate_until", "num_fewshot": 0,
            "doc_to_text": "{{question}}", "doc_to_target": "answer", "target_delimiter": "",
            "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": min(need, max_gen_toks),
                                  "condition": conditions.pop()},
            "process_results": "!fn heldout_process_results",
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1}})
        subtasks.append(sub)
    _write(out / NAME / f"{NAME}.yaml", {
        "group": NAME, "task": subtasks,
        "aggregate_metric_list": [{"metric": "exact_match", "weight_by_size": True}],
        "metadata": {"version": 1}})
    return NAME


def _split_mmlu(bench: Path, out: Path) -> list[str]:
    by: dict[str, dict[str, list[str]]] = {}
    for split in ("test", "dev"):
        for line in (bench / "mmlu" / f"{split}.jsonl").read_text().split("\n"):
            if line.strip():
                by.setdefault(json.loads(line)["subject"], {"test": [], "dev": []})[split].append(line)
    for s, parts in by.items():
        for split, lines in parts.items():
            f = out / s / f"{split}.jsonl"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("".join(x + "\n" for x in lines))
    return sorted(s for s, p in by.items() if p["test"])


# ------------------------------------------------------------------------------------------------
# the paper's protocol (evaluation.paper): generative, prompts stripped, condition tags per task
# ------------------------------------------------------------------------------------------------
PROTOCOLS = ("harness", "paper")
PAPER_TASK_PREFIX = "hrm_paper_"


def result_key(task: str, protocol: str) -> str:
    """The key of a task's entry in results.json: the harness's under the task's name (as before the
    paper protocol existed), the paper's as `<task>_paper`; demo_heldout has one protocol, its own."""
    return task if protocol != "paper" or task == HELDOUT_TASK else f"{task}_paper"


def write_paper_tasks(benchmarks_dir: str | os.PathLike, out: str | os.PathLike, tasks: list[str],
                      conditions: dict[str, str] | None = None,
                      max_gen_toks: int | None = None) -> dict[str, str]:
    """Write the paper-protocol task YAMLs (`hrm_paper_<task>`, MMLU a group of 57 subjects) into `out`;
    returns {task: local task or group name}. `conditions`: the condition each task is prompted with
    (default: the paper's, evaluation.paper.PAPER; evaluation.run passes the tags the checkpoint's
    tokenizer has). `max_gen_toks`: a cap on generated tokens (None: up to the context, the reference)."""
    from evaluation.paper import PAPER

    bench, out = Path(benchmarks_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = {}
    local = {"dataset_path": "json", "dataset_name": None, "training_split": None}
    for t in tasks:
        if t not in PAPER:
            raise ValueError(f"evaluation: no paper protocol for task {t!r}; known: {sorted(PAPER)}")
        p = PAPER[t]
        gen = {"until": [], "condition": (conditions or {}).get(t, p.condition), "max_context": p.max_context,
               "strip": True, "overlong": "empty", "max_gen_toks": max_gen_toks}
        common = {**local, "output_type": "generate_until", "generation_kwargs": gen,
                  "fewshot_config": {"sampler": "first_n"}, "target_delimiter": " ", "fewshot_delimiter": "\n\n",
                  "metadata": {"version": 1, "protocol": "paper"}}
        em = [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]
        mc = {"doc_to_text": "!fn paper_mc_text", "doc_to_target": "!fn paper_mc_target",
              "process_results": "!fn paper_mc_process_results", "metric_list": em}
        name = f"{PAPER_TASK_PREFIX}{t}"
        if t == "arc_challenge":
            _write(out / "paper" / f"{name}.yaml", {
                "task": name, **common, **mc, "process_docs": "!fn paper_arc_process_docs",
                "dataset_kwargs": {"data_files": _files(bench, "arc_challenge", ["validation", "test"])},
                "test_split": "test", "fewshot_split": "validation"})
        elif t == "hellaswag":
            _write(out / "paper" / f"{name}.yaml", {
                "task": name, **common, **mc, "process_docs": "!fn paper_hellaswag_process_docs",
                "dataset_kwargs": {"data_files": _files(bench, "hellaswag", ["validation"])},
                "test_split": "validation", "fewshot_split": "validation"})
        elif t == "drop":
            _write(out / "paper" / f"{name}.yaml", {
                "task": name, **common, "process_docs": "!fn drop_process_docs",
                "doc_to_text": "!fn paper_drop_text", "doc_to_target": "!fn paper_drop_target",
                "process_results": "!fn paper_drop_process_results",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("em", "f1")],
                "dataset_kwargs": {"data_files": _files(bench, "drop", ["validation_subset"])},
                "test_split": "validation_subset", "fewshot_split": "validation_subset"})
        elif t in ("gsm8k", "minerva_math"):
            folder, kind = ("gsm8k", "gsm8k") if t == "gsm8k" else ("math", "math")
            _write(out / "paper" / f"{name}.yaml", {
                "task": name, **common, "process_docs": f"!fn paper_{kind}_process_docs",
                "doc_to_text": f"!fn paper_{kind}_text", "doc_to_target": "!fn paper_gold_target",
                "process_results": "!fn paper_boxed_process_results", "metric_list": em,
                "dataset_kwargs": {"data_files": _files(bench, folder, ["test"])}, "test_split": "test"})
        elif t == "mmlu":
            subjects = _split_mmlu(bench, out / "data" / "mmlu")
            subtasks = []
            for s in subjects:
                d = out / "data" / "mmlu" / s
                _write(out / "paper" / "mmlu" / f"{name}_{s}.yaml", {
                    "task": f"{name}_{s}", "task_alias": s, **common, **mc,
                    "process_docs": "!fn paper_mmlu_process_docs",
                    "description": f"The following are multiple choice questions (with answers) about "
                                   f"{s.replace('_', ' ')}.\n\n",
                    "dataset_kwargs": {"data_files": {"test": str(d / "test.jsonl"), "dev": str(d / "dev.jsonl")}},
                    "test_split": "test", "fewshot_split": "dev"})
                subtasks.append(f"{name}_{s}")
            _write(out / "paper" / "mmlu" / f"{name}.yaml", {
                "group": name, "task": subtasks,
                "aggregate_metric_list": [{"metric": "exact_match", "weight_by_size": False}],  # macro average
                "metadata": {"version": 1}})
        names[t] = name
    return names
