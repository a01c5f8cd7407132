"""The demo's held-out benchmark (evaluation.heldout): problems of the demo generators that are never
training rows, the contamination check pointed at its folder, its metric, and the lm-eval task end to end."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest

from evaluation import heldout as H
from evaluation.tasks import HELDOUT_TASK, default_tasks
from pipeline import generators as G
from pipeline.spec import load_spec
from pipeline.stages import contamination as C

DEMO_TYPES = {  # every subset of every demo source
    "arithmetic_cot": {"addition", "subtraction", "multiplication"},
    "arithmetic_direct": {"addition", "subtraction", "multiplication"},
    "word_problems": {"shopping", "rate", "share", "age", "percent"},
    "sequences": {"seq_arithmetic", "seq_geometric", "seq_fibonacci"},
    "comparisons": {"fractions"},
}


def demo_training_rows() -> list[dict]:
    """Every row the demo spec's generator sources emit (its params and seed, planted duplicates too)."""
    spec = load_spec("demo")
    rows = []
    for src in spec.sources:
        params = dict(src.params)
        n, seed = params.pop("n"), params.pop("seed", spec.seed)
        for r in G.generate(src.generator, n, seed, **params):
            rows.append({"id": f"{src.name}/{r['uid']}", "instruction": r["question"], "response": r["answer"],
                         "condition": r["condition"], "source": src.name, "domain": src.domain or src.name,
                         "problem": r["problem"]})
    return rows


@pytest.fixture(scope="module")
def training_rows() -> list[dict]:
    return demo_training_rows()


@pytest.fixture(scope="module")
def demo_rows_file(training_rows, tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("demo_rows") / "rows.jsonl"
    f.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "problem"}) + "\n" for r in training_rows))
    return f


@pytest.fixture(scope="module")
def demo_contamination(demo_rows_file, tmp_path_factory) -> Path:
    """`hrm stage contamination --input <demo rows> --benchmarks evaluation/heldout` (the pipeline's
    tokenizer trained on the rows)."""
    out = tmp_path_factory.mktemp("contam") / "heldout"
    C.run(demo_rows_file, H.HELDOUT_DIR, out, progress=False)
    return out


def test_heldout_items_are_never_demo_training_rows(training_rows, tmp_path):
    items = H.load()
    # a few hundred items, every demo source and every subset of it, with a gold answer
    assert Counter(x["task"] for x in items) == {t: H.PER_TASK for t in DEMO_TYPES}
    for task, types in DEMO_TYPES.items():
        assert {x["type"] for x in items if x["task"] == task} == types, task
    assert all(x["answer"] and H.score(x["response"], x["answer"]) for x in items)
    assert len({x["problem"] for x in items}) == len(items) and len({x["id"] for x in items}) == len(items)
    # the committed file is what the generators give now (byte for byte)
    assert H.write(tmp_path).read_bytes() == (H.HELDOUT_DIR / H.NAME / "test.jsonl").read_bytes()

    # none of them is a training row: not as a problem (canonical text, whatever the phrasing or
    # condition), not as a question text; every held-out problem is in the held-out bucket, no training one is
    train_problems = {r["problem"] for r in training_rows}
    train_questions = {G.canonical(r["instruction"]) for r in training_rows}
    assert len(training_rows) > 20_000
    assert all(G.is_heldout(x["problem"]) and x["problem"] == G.canonical(x["problem"]) for x in items)
    assert not any(G.is_heldout(p) for p in train_problems)
    assert not {x["problem"] for x in items} & train_problems
    assert not {G.canonical(x["question"]) for x in items} & train_questions
    # an arithmetic problem is the same problem in any phrasing (and condition): the key is the sum itself
    tr = next(r for r in training_rows if r["source"] == "arithmetic_direct")
    assert tr["problem"] in tr["instruction"] and not tr["problem"].startswith(("what", "compute"))


@pytest.mark.parametrize("name,params", [
    ("arithmetic", {"cot": True, "max_digits": 2, "ops": "+"}),  # a small problem space: 8,100 sums
    ("arithmetic", {"max_digits": 9}),
    ("word_problems", {"cot": False, "kinds": "percent"}),
    ("sequences", {}),
    ("comparisons", {}),
])
def test_no_seed_or_parameters_emit_a_heldout_problem(name, params):
    for seed in (0, 1, 99):
        rows = list(G.generate(name, 1500, seed, near_dup_rate=0.05, exact_dup_rate=0.05, **params))
        assert len(rows) >= 1500 and not any(G.is_heldout(r["problem"]) for r in rows)
    ho = list(itertools.islice(G.heldout(name, 50, 7, **params), 50))
    assert len(ho) == 50 and all(G.is_heldout(r["problem"]) for r in ho)
    # a spec cannot ask for them
    assert any("'heldout' is not a spec parameter" in p for p in G.check_params(name, {"n": 5, "heldout": True}))
    with pytest.raises(ValueError, match="heldout"):
        G.generate(name, 5, 0, heldout=True)


def test_contamination_check_on_the_heldout_folder(demo_contamination, demo_rows_file, training_rows, tmp_path):
    items = H.load()
    report = json.loads((demo_contamination / "report.json").read_text())["benchmarks"][H.NAME]
    assert report["split"] == "test" and report["checked"] == len(items)
    import pyarrow.parquet as pq

    buckets = {r["item_id"]: r["bucket"] for r in pq.read_table(demo_contamination / "items.parquet").to_pylist()}
    task_of = {f"{H.NAME}/test/{i}": x["task"] for i, x in enumerate(items)}
    # no item is in any training row: no row holds all of an item's n-grams
    dirty = report["dirty_items"]
    assert all(d["top_rows"][0]["coverage"] < 1.0 for d in dirty)
    # only the word problems share enough template text with training problems to reach the dirty
    # coverage (other problems of the same templates; never the same problem)
    assert {task_of[d["item_id"]] for d in dirty} <= {"word_problems"}
    assert all(b != "dirty" for i, b in buckets.items() if task_of[i] != "word_problems")

    # a held-out problem planted in the training rows is found, with the row that holds it
    seq = next(i for i, x in enumerate(items) if x["task"] == "sequences")
    wp = next(i for i, x in enumerate(items) if x["task"] == "word_problems")
    assert buckets[f"{H.NAME}/test/{seq}"] != "dirty"
    planted = tmp_path / "rows.jsonl"
    extra = [{"id": f"planted/{i}", "instruction": items[i]["question"], "response": items[i]["response"],
              "condition": items[i]["condition"], "source": "planted", "domain": "x"} for i in (seq, wp)]
    planted.write_text(demo_rows_file.read_text() + "".join(json.dumps(r) + "\n" for r in extra))
    C.run(planted, H.HELDOUT_DIR, tmp_path / "contam", progress=False)
    rep2 = json.loads((tmp_path / "contam" / "report.json").read_text())["benchmarks"][H.NAME]
    found = {d["item_id"]: d for d in rep2["dirty_items"]}
    for i in (seq, wp):
        d = found[f"{H.NAME}/test/{i}"]
        assert d["responsible"][0]["id"] == f"planted/{i}" and d["responsible"][0]["coverage"] == 1.0
    assert set(found) >= {d["item_id"] for d in dirty}
    assert {i for i in found if task_of[i] != "word_problems"} == {f"{H.NAME}/test/{seq}"}


def test_metric_scores_hand_made_answers():
    # worked answers: the number after the last marker; direct answers: the number
    assert H.score("Let's work it out step by step.\n12 + 30 = 42\nThe answer is 42.", "42")
    assert H.score("The change is $20 - $10 = $10.\n#### 10", "10")
    assert H.score("Each term adds -3. The next term is -7.", "-7")
    assert H.score(" 1,234,567 ", "1234567") and H.score("1234567.0", "1234567")
    assert H.score("6/14", "3/7")  # numbers compared numerically
    assert not H.score("Let's work it out step by step.\nThe answer is 41.", "42")
    assert not H.score("#### 11\nThe change is 10", "10")  # the marker's number, not the last one
    assert not H.score("17/7", "13/5") and not H.score("", "5") and not H.score("no idea", "5")
    assert H.score("The answer is 42. Then 7", "42")
    assert H.process_results({"answer": "13/5"}, ["13/5"]) == {"exact_match": 1.0}
    assert H.process_results({"answer": "13/5"}, ["17/7"]) == {"exact_match": 0.0}
    # every committed item: its reference response scores 1, the same response with another number 0
    for x in H.load():
        assert H.score(x["response"], x["answer"])
        wrong = str(H.as_number(x["answer"]) + 1)
        assert not H.score(x["response"].replace(x["answer"], "@").replace("@", wrong), x["answer"])


def test_default_tasks(tmp_path):
    assert default_tasks(None) == [HELDOUT_TASK]
    assert default_tasks(None, online=True) == ["mmlu", "arc_challenge", "hellaswag", "gsm8k", "minerva_math", "drop",
                                                HELDOUT_TASK]
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("{}\n")
    (tmp_path / "mmlu").mkdir()
    (tmp_path / "mmlu" / "test.jsonl").write_text("{}\n")  # no dev.jsonl: not run
    assert default_tasks(tmp_path) == ["gsm8k", HELDOUT_TASK]


def test_hrm_eval_runs_the_heldout_task_without_benchmarks(trained, demo_contamination, tmp_path, capsys):
    from evaluation.run import main

    out = tmp_path / "eval"
    assert main(["--checkpoint", str(trained / "ckpt"), "--tokenizer", str(trained / "tok"), "--output", str(out),
                 "--limit", "10", "--max-gen-toks", "12", "--contamination", str(demo_contamination)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["tasks"]) == [HELDOUT_TASK]
    e = res["tasks"][HELDOUT_TASK]
    acc = e["full"]["exact_match,none"]
    assert 0.0 <= acc <= 1.0 and e["n"] == 10 and e["n_total"] == len(H.load()) and e["limited"]
    assert {s.removeprefix(f"{HELDOUT_TASK}_") for s in e["subtasks"]} <= set(DEMO_TYPES)
    assert sum(s["n_docs"] for s in e["subtasks"].values()) == 10
    assert all(s["unmatched_docs"] == 0 for s in e["subtasks"].values())  # each doc mapped to its check item
    # prompted as in training: the question alone, the source's condition token, 0-shot, greedy
    samples = [json.loads(x) for x in (out / f"samples_{HELDOUT_TASK}.jsonl").read_text().splitlines()]
    assert len(samples) == 10
    for s in samples:
        ((ctx, kw),) = s["arguments"]
        assert ctx == s["doc"]["question"] and kw["condition"] == s["doc"]["condition"] and kw["max_gen_toks"] <= 12
        assert s["exact_match"] == float(H.score(s["resps"][0][0], s["doc"]["answer"]))
    md = (out / "results.md").read_text()
    assert (f"| {HELDOUT_TASK} | own (training prompt) | 0 | per subtask (its source's) | 10 of {e['n_total']} | "
            "exact_match,none |") in md
    err = capsys.readouterr().err
    assert "no benchmark files for mmlu" in err


def test_the_condition_generation_kwarg_sets_the_prompt_token(trained):
    from lm_eval.api.instance import Instance

    from evaluation.lm import HRMLM

    lm = HRMLM(str(trained / "ckpt"), tokenizer=str(trained / "tok"), progress=False)
    seen = []
    real = lm.generate_batch
    lm.generate_batch = lambda prompts, until, max_new: seen.extend(prompts) or real(prompts, until, max_new)
    q = "What is 12 + 30?"
    reqs = [Instance("generate_until", {}, (q, {"until": [], "max_gen_toks": 3, "condition": c}), i)
            for i, c in enumerate(["cot", "direct", None])]
    lm.generate_until(reqs)
    body = lm.encode(q)
    want = {(lm.ids.boq, lm.ids.condition(c), *body, lm.ids.eoq) for c in ("cot", "direct")}
    assert {tuple(p) for p in seen} == want  # None: the model's default condition (direct)
