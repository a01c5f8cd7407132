"""The data flow under a real Prefect API (prefect_test_harness: a temporary SQLite server)."""

from __future__ import annotations

import shutil
import textwrap
import time

import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.data_flow import STAGES, data_flow
from pipeline.io import read_json

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


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def states(flow_state, timeout: float = 60.0) -> dict[str, str]:
    """Task-run state names of one flow run, keyed by task name.

    Prefect 3 records task-run states through its event pipeline, asynchronously: right after a flow
    returns, the API may still show a task as Pending. Poll until every task run is in a final state.
    """
    fr = flow_state.state_details.flow_run_id
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as c:
            trs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr])))
        out = {tr.name.rsplit("-", 1)[0]: tr.state.name for tr in trs}
        settled = set(out) >= set(STAGES) and all(tr.state is not None and tr.state.is_final() for tr in trs)
        if settled or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def check_lineage(out, man):
    """Rows in = kept + rejected (by reason) + duplicates + capped + dropped at pack, per source and stratum."""
    lin = read_json(out / "lineage" / "lineage.json")
    assert lin["balanced"] and man["lineage"]["counts"]["balanced"]
    reasons = set()
    for name, st in lin["per_stratum"].items():
        assert st["in"] == st["packed"] + sum(st["removed"].values()), name
        assert st["unaccounted"] == 0 and st["conflicts"] == 0
        reasons |= set(st["removed"])
    assert {"dedup:exact_duplicate", "dedup:near_duplicate", "mix:capped"} <= reasons, reasons
    assert lin["per_source"]["messy"]["rejected_at_normalize"] == {"bad_json": 1, "empty_field": 1,
                                                                   "missing_field": 1}
    ingested = read_json(out / "ingest" / "manifest.json")["counts"]["rows"]
    norm = man["normalize"]["counts"]["per_source"]
    for src, c in lin["per_source"].items():
        assert ingested[src] == c["ingested"] == c["stratified"] + sum(c["rejected_at_normalize"].values())
        assert c["stratified"] == c["packed"] + c["removed"]
        assert norm[src]["kept"] == c["stratified"]
    # and the packed rows really are in the shards, the removed ones are not
    table = pq.read_table(out / "lineage" / "lineage.parquet")
    packed_ids = set()
    for f in sorted((out / "pack").glob("shard-*.arrow")):
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
    assert set(s1) == set(STAGES) | {"lineage"} and all(v == "Completed" for v in s1.values()), s1
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
    shutil.rmtree(out / "pack")
    fourth = data_flow(spec=str(spec), output_dir=str(out), progress=False, return_state=True)
    s4 = states(fourth)
    assert s4["pack"] == "Completed" and s4["mix"] == "Cached", s4
    assert (out / "pack" / "manifest.json").exists()
    assert fourth.result()["manifests"]["pack"]["outputs"] == man3["pack"]["outputs"]
