"""The whole DAG in one flow run (real Prefect API, DeepSpeed on CPU, lm-eval): data -> train -> check
-> evaluate -> report, then an unchanged rerun that recomputes nothing."""

from __future__ import annotations

import json
import textwrap
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline_flow import EvalSettings, TrainSettings, check_settings, pipeline, plan_pipeline
from pipeline.io import read_json
from pipeline.runs import read_run


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def task_runs(flow_state, expect: set[str], timeout: float = 60.0) -> list:
    fr = flow_state.state_details.flow_run_id
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as c:
            trs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr])))
        names = {tr.name.rsplit("-", 1)[0] for tr in trs}
        if (names >= expect and all(tr.state is not None and tr.state.is_final() for tr in trs)) \
                or time.monotonic() > deadline:
            return trs


def test_plan_pipeline_steps():
    data, model = plan_pipeline("report", None, None, False, True)
    assert data[-1] == "lineage" and model == ["train", "check", "evaluate", "report"]
    assert plan_pipeline("report", None, None, False, False)[1] == ["train", "evaluate", "report"]
    assert plan_pipeline("report", "evaluate", None, False, True) == ([], ["evaluate", "report"])
    assert plan_pipeline("report", None, "train", False, True) == ([], ["train"])
    assert plan_pipeline("dedup", None, None, False, True) == (["ingest", "normalize", "stratify", "dedup"], [])
    with pytest.raises(ValueError, match="only=check needs benchmarks"):
        plan_pipeline("report", None, "check", False, False)
    with pytest.raises(ValueError, match="stop_after must be one of"):
        plan_pipeline("nope", None, None, False, False)


def test_check_step_uses_the_spec_contamination_settings():
    """The check of the packed data runs with the spec's contamination settings (method, buckets), never
    decontaminates, and a settings change changes what the step is keyed on."""
    from pipeline.spec import load_spec

    default = check_settings(load_spec("demo"))
    assert default["method"] == "words" and default["decontaminate"] is False
    s = load_spec("demo", ["contamination.method=tokens", "contamination.dirty_at=0.9",
                           "contamination.decontaminate=true"])
    got = check_settings(s)
    assert got["method"] == "tokens" and got["dirty_at"] == 0.9 and got["decontaminate"] is False
    assert "benchmarks_dir" not in got and got != default


def test_pipeline_end_to_end_and_cached_rerun(harness, tmp_path, shared, gsm8k_train, capfd, caplog):
    test_rows = [json.loads(x) for x in (shared / "data" / "gsm8k" / "test.jsonl").read_text().splitlines()[:40]]
    bench = tmp_path / "bench" / "gsm8k"
    bench.mkdir(parents=True)
    (bench / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    planted = tmp_path / "planted.jsonl"
    planted.write_text("".join(json.dumps({"question": test_rows[i]["question"], "answer": test_rows[i]["answer"]})
                               + "\n" for i in (2, 7)))
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: dag
        seed: 2
        sources:
          - {{name: gsm8k, kind: local, path: {gsm8k_train}, max_rows: 120,
              fields: {{instruction: question, response: answer}}, condition: cot}}
          - {{name: planted, kind: local, path: {planted}, fields: {{instruction: question, response: answer}},
              condition: cot}}
        tokenizer: {{vocab_size: 600, sample_rows: 1000}}
        pack: {{seq_len: 512, shard_tokens: 16384}}
        """))
    out = tmp_path / "run"
    train = TrainSettings(preset="debug", steps=3, warmup_steps=1, save_every=0, micro_batch_size=2)
    evaluation = EvalSettings(tasks=["gsm8k", "demo_heldout"], limit=3, max_gen_toks=8, batch_size=4,
                              protocol="both")
    kw = dict(spec=str(spec), output_dir=str(out), benchmarks=str(tmp_path / "bench"), train=train,
              evaluation=evaluation)
    first = pipeline(**kw, return_state=True)
    assert first.is_completed(), first
    res = first.result()
    assert res["ran"][-4:] == ["train", "check", "evaluate", "report"]
    trs = task_runs(first, {"pack", "train", "check", "evaluate", "report"})
    by_name = {tr.name.rsplit("-", 1)[0]: tr for tr in trs}
    # the run graph has the data dependencies as edges
    ids = {tr.id: tr.name.rsplit("-", 1)[0] for tr in trs}
    ups = {n: {ids.get(getattr(x, "id", None)) for v in tr.task_inputs.values() for x in v} for n, tr in by_name.items()}
    assert {"mix", "tokenizer"} <= ups["pack"], ups["pack"]
    assert "pack" in ups["train"] and "pack" in ups["check"], ups
    assert {"train", "check"} <= ups["evaluate"], ups["evaluate"]

    run = read_run(out)
    m = res["model"]
    # training: a content-addressed train folder named by the run manifest
    assert run["train"]["dir"] == f"train/{m['train']['version']}"
    assert (out / run["train"]["final"]["raw"] / "model.safetensors").exists()
    # the check of the packed rows finds the planted items and names the rows responsible
    rep = read_json(out / run["check"]["dir"] / "report.json")
    dirty = rep["benchmarks"]["gsm8k"]["dirty_items"]
    assert sorted(d["item_id"] for d in dirty) == ["gsm8k/test/2", "gsm8k/test/7"]
    assert all(r["source"] == "planted" for d in dirty for r in d["responsible"])
    # evaluation: full and clean-subset scores, limited and labelled so
    results = read_json(m["evaluate"]["results"])
    assert results["limited"] and set(results["tasks"]) == {"gsm8k", "gsm8k_paper", "demo_heldout"}
    assert results["tasks"]["gsm8k"]["n"] == 3 and "clean" in json.dumps(results["tasks"]["gsm8k"])
    assert run["evaluations"][-1]["output"] == f"eval/{m['evaluate']['version']}"
    # the evaluate task's output holds its own lines, not the disassembly dill prints while datasets hashes
    # the paper tasks' process_docs (Prefect's print capture used to route it into the run's logs)
    cap = capfd.readouterr()
    seen = cap.out + cap.err + caplog.text  # stdout/stderr, and the log records (Prefect's console included)
    assert "[eval" in seen and "done in" in seen
    assert "LOAD_CONST" not in seen and "RETURN_VALUE" not in seen
    # the report
    html = (out / "report" / "index.html").read_text()
    assert "gsm8k" in html and m["train"]["version"] in html

    # unchanged rerun: every task is answered from the cache (the report is always rewritten)
    again = pipeline(**kw, return_state=True)
    assert again.is_completed()
    trs2 = task_runs(again, {"train", "check", "evaluate", "report"})
    states = {tr.name.rsplit("-", 1)[0]: tr.state.name for tr in trs2}
    assert all(v == "Cached" for k, v in states.items() if k != "report"), states
    assert again.result()["model"]["train"]["path"] == m["train"]["path"]

    # one step alone, on the run manifest's outputs
    only = pipeline(**kw, only="report")
    assert only["ran"] == ["report"]
