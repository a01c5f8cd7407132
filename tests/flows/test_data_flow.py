"""The data flow under a real Prefect API (prefect_test_harness: a temporary SQLite server)."""

from __future__ import annotations

import json
import shutil
import tempfile
import textwrap
from pathlib import Path
import time

import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.data_flow import OPTIONAL, STAGES, data_flow
from pipeline.io import read_json, sha256_file
from pipeline.runs import read_run, stage_dir
from tiny_spec import TINY  # tests/flows/tiny_spec.py

SPEC = """
name: flowtest
seed: 5
sources:
  - name: wp
    kind: generator
    generator: word_problems
    params: {n: 600, near_dup_rate: 0.1, exact_dup_rate: 0.03}
    fields: {instruction: question, response: answer, id: uid, condition: condition, subset: task}
  - name: gsm8k
    kind: local
    path: GSM8K
    max_rows: 400
    fields: {instruction: question, response: answer}
    condition: cot
  - name: messy
    kind: local
    path: MESSY
stratify:
  rules:
    - {match: wp/, cap_rows: 40}
    - {match: "*", name: rest, stratum: source}
dedup: {threshold: THRESHOLD}
tokenizer: {vocab_size: 600, sample_rows: 2000}
mix: {epochs: 2}
pack: {seq_len: 256, shard_tokens: 16384}
"""


BASE = (set(STAGES) - set(OPTIONAL)) | {"lineage"}  # the task runs of a flow without contamination check


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def states(flow_state, expect: set[str] | None = None, timeout: float = 60.0) -> dict[str, str]:
    """Task-run state names of one flow run, keyed by task name.

    Prefect 3 records task-run states through its event pipeline, asynchronously: right after a flow
    returns, the API may still show a task as Pending. Poll until every task run is in a final state.
    """
    expect = BASE if expect is None else expect
    fr = flow_state.state_details.flow_run_id
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as c:
            trs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr])))
        out = {tr.name.rsplit("-", 1)[0]: tr.state.name for tr in sorted(trs, key=lambda t: t.created)}  # last wins
        settled = set(out) >= expect and all(tr.state is not None and tr.state.is_final() for tr in trs)
        if settled or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def check_lineage(out, man):
    """Rows in = kept + rejected (by reason) + duplicates + capped + dropped at pack, per source and stratum."""
    lin = read_json(stage_dir(out, "lineage") / "lineage.json")
    assert lin["balanced"] and man["lineage"]["counts"]["balanced"]
    # the streamed lineage (stratified rows a batch at a time) = the whole-table reference, byte for byte
    from pipeline import lineage
    from pipeline.io import write_parquet

    ref_df, ref = lineage.build(lineage.stage_dirs(out))
    assert json.loads(json.dumps(ref, default=str)) == lin
    with tempfile.TemporaryDirectory() as tmp:
        ref_rec = write_parquet(ref_df.to_arrow(), Path(tmp) / "lineage.parquet")
    assert ref_rec["sha256"] == read_json(stage_dir(out, "lineage") / "manifest.json")["outputs"]["lineage.parquet"]["sha256"]
    reasons = set()
    for name, st in lin["per_stratum"].items():
        assert st["in"] == st["packed"] + sum(st["removed"].values()), name
        assert st["unaccounted"] == 0 and st["conflicts"] == 0
        reasons |= set(st["removed"])
    assert {"dedup:exact_duplicate", "dedup:near_duplicate", "mix:capped"} <= reasons, reasons
    assert lin["per_source"]["messy"]["rejected_at_normalize"] == {"bad_json": 1, "empty_field": 1,
                                                                   "missing_field": 1}
    ingested = read_json(stage_dir(out, "ingest") / "manifest.json")["counts"]["rows"]
    norm = man["normalize"]["counts"]["per_source"]
    for src, c in lin["per_source"].items():
        assert ingested[src] == c["ingested"] == c["stratified"] + sum(c["rejected_at_normalize"].values())
        assert c["stratified"] == c["packed"] + c["removed"]
        assert norm[src]["kept"] == c["stratified"]
    # and the packed rows really are in the shards, the removed ones are not
    table = pq.read_table(stage_dir(out, "lineage") / "lineage.parquet")
    packed_ids = set()
    for f in sorted(stage_dir(out, "pack").glob("shard-*.arrow")):
        packed_ids |= set(ipc.open_file(str(f)).read_all().column("sample_ids").combine_chunks().flatten().to_pylist())
    status = dict(zip(table.column("id").to_pylist(), table.column("status").to_pylist()))
    assert {i for i, s in status.items() if s == "packed"} == packed_ids


def test_cache_behaviour_from_task_states(harness, tmp_path, gsm8k_train):
    messy = tmp_path / "messy.jsonl"
    messy.write_text('{"instruction": "Name a prime above 10.", "response": "Eleven is prime."}\n{"instruction": "x",\n'
                     '{"instruction": "Empty?", "response": ""}\n{"response": "no instruction"}\n')
    spec = tmp_path / "spec.yaml"
    text = textwrap.dedent(SPEC).replace("GSM8K", str(gsm8k_train)).replace("MESSY", str(messy))
    spec.write_text(text.replace("THRESHOLD", "0.8"))
    out = tmp_path / "run"

    first = data_flow(spec=str(spec), output_dir=str(out), progress=False, return_state=True)
    assert first.is_completed(), first
    s1 = states(first)
    assert set(s1) == BASE and all(v == "Completed" for v in s1.values()), s1
    man1 = first.result()["manifests"]
    assert man1["pack"]["counts"]["shards"] >= 1
    check_lineage(out, man1)

    second = data_flow(spec=str(spec), output_dir=str(out), progress=False, return_state=True)
    s2 = states(second)
    assert all(v == "Cached" for v in s2.values()), s2  # an unchanged rerun recomputes nothing
    assert second.result()["manifests"] == man1

    # a changed dedup threshold reruns dedup and what follows it, and only that
    spec.write_text(text.replace("THRESHOLD", "0.5"))
    third = data_flow(spec=str(spec), output_dir=str(out), progress=False, return_state=True)
    s3 = states(third)
    assert [s3[k] for k in ("ingest", "normalize", "stratify")] == ["Cached"] * 3, s3
    assert [s3[k] for k in ("dedup", "tokenizer", "mix", "pack", "lineage")] == ["Completed"] * 5, s3
    man3 = third.result()["manifests"]
    assert man3["dedup"]["counts"]["near_duplicates"] > man1["dedup"]["counts"]["near_duplicates"]

    # a stage folder deleted behind Prefect's back is recomputed, not served from a stale cache
    shutil.rmtree(stage_dir(out, "pack"))
    fourth = data_flow(spec=str(spec), output_dir=str(out), progress=False, return_state=True)
    s4 = states(fourth)
    assert s4["pack"] == "Completed" and s4["mix"] == "Cached", s4
    assert (stage_dir(out, "pack") / "manifest.json").exists()
    assert fourth.result()["manifests"]["pack"]["outputs"] == man3["pack"]["outputs"]

    # outputs written into the run folder by other settings (`hrm stage dedup --output <run>/dedup
    # --set threshold=0.5`, flat) are never taken for the flow's
    from pipeline.config import DedupConfig
    from pipeline.stages import dedup

    dedup.run(stage_dir(out, "stratify"), out / "dedup", DedupConfig(threshold=0.5), progress=False)

    # reverting the threshold to 0.8 recomputes nothing and gives the first run's outputs, byte for byte,
    # identical to a clean 0.8 run in another folder
    spec.write_text(text.replace("THRESHOLD", "0.8"))
    fifth = data_flow(spec=str(spec), output_dir=str(out), progress=False, return_state=True)
    s5 = states(fifth)
    assert all(v == "Cached" for v in s5.values()) and set(s5) == BASE, s5
    man5 = fifth.result()["manifests"]
    assert man5["pack"]["path"] == man1["pack"]["path"] and man5["dedup"]["counts"] == man1["dedup"]["counts"]
    assert read_run(out)["stages"]["dedup"]["fingerprint"] == man1["dedup"]["fingerprint"]
    clean = data_flow(spec=str(spec), output_dir=str(tmp_path / "clean"), progress=False)
    a, b = stage_dir(out, "pack"), stage_dir(tmp_path / "clean", "pack")
    assert a.name == b.name
    shards = sorted(x.name for x in a.glob("shard-*"))
    assert shards and shards == sorted(x.name for x in b.glob("shard-*"))
    assert all(sha256_file(a / x) == sha256_file(b / x) for x in shards)
    assert clean["manifests"]["pack"]["outputs"] == man1["pack"]["outputs"]


def test_decontamination_is_counted_in_the_lineage(harness, tmp_path, shared, gsm8k_train):
    """Benchmark questions planted in the training data: the check finds them, decontamination drops
    exactly those rows before mixing, and the lineage counts them with the reason and the item."""
    import json

    test_rows = [json.loads(x) for x in (shared / "data" / "gsm8k" / "test.jsonl").read_text().splitlines()[:300]]
    bench = tmp_path / "bench" / "gsm8k"
    bench.mkdir(parents=True)
    (bench / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    planted = tmp_path / "planted.jsonl"
    picks = [3, 50, 120]
    planted.write_text("".join(json.dumps({"question": test_rows[i]["question"], "answer": test_rows[i]["answer"]}) + "\n"
                               for i in picks))
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: decon
        seed: 3
        sources:
          - {{name: gsm8k, kind: local, path: {gsm8k_train}, max_rows: 300,
              fields: {{instruction: question, response: answer}}, condition: cot}}
          - {{name: planted, kind: local, path: {planted}, fields: {{instruction: question, response: answer}},
              condition: cot}}
        tokenizer: {{vocab_size: 800, sample_rows: 2000}}
        contamination: {{benchmarks_dir: {tmp_path / "bench"}, decontaminate: true}}
        pack: {{seq_len: 512, shard_tokens: 16384}}
        """))
    out = tmp_path / "run"
    first = data_flow(spec=str(spec), output_dir=str(out), progress=False, return_state=True)
    assert first.is_completed(), first
    s1 = states(first, BASE | {"contamination"})
    assert s1["contamination"] == "Completed", s1
    man = first.result()["manifests"]
    assert man["contamination"]["counts"]["dirty"] == {"gsm8k": 3}
    assert man["contamination"]["counts"]["rows_removed"] == 3
    assert man["pack"]["inputs"]["tokenized"] == man["contamination"]["path"]

    lin = read_json(stage_dir(out, "lineage") / "lineage.json")
    assert lin["balanced"]
    assert lin["per_source"]["planted"] == {"ingested": 3, "rejected_at_normalize": {}, "stratified": 3,
                                            "packed": 0, "removed": 3,
                                            "removed_by": {"contamination:benchmark_contamination": 3}}
    assert lin["examples"]["contamination:benchmark_contamination"][0]["detail"].startswith("makes benchmark item")
    md = (stage_dir(out, "lineage") / "lineage.md").read_text()
    assert "| planted | 3 | 0 (-) | 3 | 0 | 3 (contamination:benchmark_contamination 3) |" in md, md
    removed = pq.read_table(stage_dir(out, "lineage") / "lineage.parquet").to_pylist()
    dropped = [r for r in removed if r["stage"] == "contamination"]
    assert len(dropped) == 3 and all(r["reason"] == "benchmark_contamination" for r in dropped)
    assert sorted(r["detail"] for r in dropped) == sorted(f"makes benchmark item gsm8k/test/{i} dirty" for i in picks)
    assert {r["source"] for r in dropped} == {"planted"}
    assert sum(v.get("contamination:benchmark_contamination", 0) for v in
               (st["removed"] for st in lin["per_stratum"].values())) == 3

    # check only (no decontamination): the same dirty items are reported, nothing is dropped for them,
    # and the contamination folder of the earlier run does not leak into the lineage
    second = data_flow(spec=str(spec), output_dir=str(out), decontaminate=False, progress=False, return_state=True)
    s2 = states(second, BASE | {"contamination"})
    assert s2["contamination"] == "Completed" and s2["mix"] == "Completed", s2
    man2 = second.result()["manifests"]
    assert man2["contamination"]["counts"]["dirty"] == {"gsm8k": 3} and "rows_removed" not in man2["contamination"]["counts"]
    lin2 = read_json(stage_dir(out, "lineage") / "lineage.json")
    assert lin2["balanced"] and lin2["per_source"]["planted"]["packed"] == 3
    assert not any(r.startswith("contamination:") for st in lin2["per_stratum"].values() for r in st["removed"])

    # a row both packed and removed: the lineage task writes its report, then fails naming it
    import pyarrow as pa

    from flows.data_flow import lineage_task
    from pipeline.lineage import LineageError

    mix_dir = stage_dir(out, "mix")
    rem = pq.read_table(mix_dir / "removals.parquet")
    packed_row = next(r for r in pq.read_table(stage_dir(out, "lineage") / "lineage.parquet").to_pylist()
                      if r["status"] == "packed")
    extra = pa.Table.from_pylist([{"id": packed_row["id"], "source": packed_row["source"], "stage": "mix",
                                   "reason": "capped", "detail": None, "duplicate_of": None}], schema=rem.schema)
    pq.write_table(pa.concat_tables([rem, extra]), mix_dir / "removals.parquet")
    dirs = {st: str(stage_dir(out, st)) for st in ("normalize", "stratify", "dedup", "tokenizer", "mix", "pack")}
    with pytest.raises(LineageError, match="does not balance"):
        lineage_task.fn(stage_dirs=dirs, output_dir=str(tmp_path / "lin-bad"), title="bad", progress=False,
                        versioned=False)
    bad = read_json(tmp_path / "lin-bad" / "lineage.json")
    assert not bad["balanced"] and bad["conflicts"] == [packed_row["id"]]


def test_decontaminate_without_benchmarks_is_an_error(harness, tmp_path):
    with pytest.raises(ValueError, match="decontaminate needs benchmarks"):
        data_flow(spec="demo", output_dir=str(tmp_path / "run"), decontaminate=True, progress=False)




def test_rerun_controls(harness, tmp_path):
    """--set, --only, --from and --refresh, and what the run manifest says after each."""
    from pipeline.runs import RunError, RunLocked, gc, run_lock
    from pipeline.spec import SpecError

    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    out = tmp_path / "run"
    with pytest.raises(RunError, match="no dedup output|no stratify output|run the whole flow"):
        data_flow(spec=str(spec), output_dir=str(out), only="dedup", progress=False)
    first = data_flow(spec=str(spec), output_dir=str(out), progress=False)
    assert first["ran"] == ["ingest", "normalize", "stratify", "dedup", "tokenizer", "mix", "pack", "lineage"]
    with pytest.raises(SpecError, match=r"dedup\.threshold"):  # typed and validated like the spec
        data_flow(spec=str(spec), output_dir=str(out), overrides=["dedup.threshold=high"], progress=False)

    # only dedup, with another threshold: the stages after it are kept but marked stale
    st = data_flow(spec=str(spec), output_dir=str(out), only="dedup", overrides=["dedup.threshold=0.5"],
                   progress=False, return_state=True)
    assert states(st, {"dedup"}) == {"dedup": "Completed"}
    res = st.result()
    assert res["ran"] == ["dedup"] and set(res["stale"]) == {"tokenizer", "mix", "pack", "lineage"}
    assert res["manifests"]["dedup"]["counts"]["near_duplicates"] > first["manifests"]["dedup"]["counts"]["near_duplicates"]
    with pytest.raises(RunError, match="stale"):
        stage_dir(out, "pack")
    # from the tokenizer on: up to date again
    st = data_flow(spec=str(spec), output_dir=str(out), from_stage="tokenizer", overrides=["dedup.threshold=0.5"],
                   progress=False, return_state=True)
    assert states(st, {"tokenizer", "mix", "pack", "lineage"}) == dict.fromkeys(("tokenizer", "mix", "pack", "lineage"),
                                                                                "Completed")
    assert not st.result()["stale"] and stage_dir(out, "pack").name == Path(st.result()["manifests"]["pack"]["path"]).name
    run = read_run(out)
    assert run["overrides"] == ["dedup.threshold=0.5"] and run["spec"]["dedup"]["threshold"] == 0.5
    # refresh recomputes a cached stage; its outputs are the same bytes, so what follows stays cached
    before = read_json(stage_dir(out, "dedup") / "manifest.json")
    st = data_flow(spec=str(spec), output_dir=str(out), overrides=["dedup.threshold=0.5"], refresh=["dedup"],
                   progress=False, return_state=True)
    s = states(st)
    assert s["dedup"] == "Completed" and s["tokenizer"] == "Cached" and s["pack"] == "Cached", s
    assert read_json(stage_dir(out, "dedup") / "manifest.json") == before

    # a second run on a folder in use fails at once, naming the holder
    with run_lock(out, what="test holder"):
        with pytest.raises(RunLocked, match=r"in use by another run: PID \d+ .*test holder"):
            data_flow(spec=str(spec), output_dir=str(out), progress=False)

    # gc: the versions of the first run are no longer named by the run manifest
    dry = gc(out)
    assert dry["remove"] and not dry["applied"] and all(Path(p).exists() for p, _ in dry["remove"])
    names = {Path(p).parent.name for p, _ in dry["remove"]}
    assert {"dedup", "tokenizer", "mix", "pack", "lineage"} <= names and "ingest" not in names
    done = gc(out, apply=True)
    assert done["bytes"] == dry["bytes"] and not any(Path(p).exists() for p, _ in dry["remove"])
    assert gc(out)["remove"] == []
    again = data_flow(spec=str(spec), output_dir=str(out), overrides=["dedup.threshold=0.5"], progress=False,
                      return_state=True)
    assert all(v == "Cached" for v in states(again).values())
