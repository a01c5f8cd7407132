"""The data flow under a real Prefect API (prefect_test_harness: a temporary SQLite server)."""

from __future__ import annotations

import shutil
import textwrap

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.data_flow import STAGES, data_flow

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
stratify:
  rules:
    - {match: wp/, cap_rows: 80}
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


def states(flow_state) -> dict[str, str]:
    fr = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as c:
        trs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr])))
    out = {}
    for tr in trs:
        name = tr.name.rsplit("-", 1)[0]
        out[name] = tr.state.name
    return out


def test_cache_behaviour_from_task_states(harness, tmp_path, gsm8k_train):
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(SPEC).replace("GSM8K", str(gsm8k_train)).replace("THRESHOLD", "0.8"))
    out = tmp_path / "run"

    first = data_flow(spec=str(spec), output_dir=str(out), progress=False, return_state=True)
    assert first.is_completed(), first
    s1 = states(first)
    assert set(s1) == set(STAGES) and all(v == "Completed" for v in s1.values()), s1
    man1 = first.result()["manifests"]
    assert man1["pack"]["counts"]["shards"] >= 1

    second = data_flow(spec=str(spec), output_dir=str(out), progress=False, return_state=True)
    s2 = states(second)
    assert all(v == "Cached" for v in s2.values()), s2  # an unchanged rerun recomputes nothing
    assert second.result()["manifests"] == man1

    # a changed dedup threshold reruns dedup and what follows it, and only that
    spec.write_text(textwrap.dedent(SPEC).replace("GSM8K", str(gsm8k_train)).replace("THRESHOLD", "0.5"))
    third = data_flow(spec=str(spec), output_dir=str(out), progress=False, return_state=True)
    s3 = states(third)
    assert [s3[k] for k in ("ingest", "normalize", "stratify")] == ["Cached"] * 3, s3
    assert [s3[k] for k in ("dedup", "tokenizer", "mix", "pack")] == ["Completed"] * 4, s3
    man3 = third.result()["manifests"]
    assert man3["dedup"]["counts"]["near_duplicates"] > man1["dedup"]["counts"]["near_duplicates"]

    # a stage folder deleted behind Prefect's back is recomputed, not served from a stale cache
    shutil.rmtree(out / "pack")
    fourth = data_flow(spec=str(spec), output_dir=str(out), progress=False, return_state=True)
    s4 = states(fourth)
    assert s4["pack"] == "Completed" and s4["mix"] == "Cached", s4
    assert (out / "pack" / "manifest.json").exists()
    assert fourth.result()["manifests"]["pack"]["outputs"] == man3["pack"]["outputs"]
