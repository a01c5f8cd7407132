"""The data flow's parts on a Dask cluster (flows/dask_runner.py): a LocalCluster of two worker
processes on 127.0.0.1 runs the per-source ingest and normalize parts, the dedup signature parts, the
contamination check's training-scan parts and the pack shards as Prefect tasks; every data file of every
stage is byte-identical to the single-process run (a tiny two-source spec, and the bundled demo with a
contamination check)."""

from __future__ import annotations

import hashlib
import textwrap
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
from prefect.testing.utilities import prefect_test_harness

from flows.data_flow import data_flow
from flows.dask_runner import parts_runner
from pipeline.io import sha256_file
from tiny_spec import TINY  # tests/flows/tiny_spec.py

# TINY with a second source, so ingest and normalize have two parts each
TWO_SOURCES = TINY.replace("tokenizer:", textwrap.dedent("""\
  - name: wp2
    kind: generator
    generator: word_problems
    params: {n: 200, near_dup_rate: 0.1, exact_dup_rate: 0.03}
    fields: {instruction: question, response: answer, id: uid, condition: condition, subset: task}
tokenizer:"""), 1)
SKIP = {"timing.json", "manifest.json"}  # they hold times and the folder's own path


def data_hashes(run: Path) -> dict[str, str]:
    """sha256 of every data file of every stage version folder, by path inside the run folder."""
    out = {}
    for f in sorted(run.rglob("*")):
        rel = f.relative_to(run)
        if f.is_file() and rel.parts[0] not in (".prefect", "run.json") and f.name not in SKIP \
                and not f.name.startswith("."):
            if f.suffix == ".md":  # the lineage report names the run folder in its title
                out[str(rel)] = hashlib.sha256(f.read_text().replace(str(run), "RUN").encode()).hexdigest()
            else:
                out[str(rel)] = sha256_file(f)
    return out


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_dask_runner_outputs_equal_the_local_run(harness, tmp_path):
    spec = tmp_path / "tiny2.yaml"
    spec.write_text(TWO_SOURCES)
    local = data_flow(spec=str(spec), output_dir=str(tmp_path / "local"), progress=False)
    dask = data_flow(spec=str(spec), output_dir=str(tmp_path / "dask"), progress=False, runner="dask", workers=2)
    assert local["ran"] == dask["ran"] and "lineage" in dask["ran"]
    for st, m in local["manifests"].items():  # same versions (fingerprints), same counts
        assert Path(m["path"]).name == Path(dask["manifests"][st]["path"]).name, st
        assert m["counts"] == dask["manifests"][st]["counts"], st
    assert list(dask["manifests"]["ingest"]["counts"]["rows"]) == ["wp", "wp2"]  # two sources: two parts
    a, b = data_hashes(tmp_path / "local"), data_hashes(tmp_path / "dask")
    stages = {k.split("/")[0] for k in a}
    assert {"ingest", "normalize", "dedup", "pack", "lineage"} <= stages
    assert any(k.startswith("dedup/") and "signatures/part-" in k for k in a)
    assert a == b
    assert not any("/parts/" in k for k in b)  # normalize's per-source parts are merged and removed
    # the parts ran as Prefect task runs: one per source for ingest and normalize, one signature part
    want = {"ingest_source-0", "ingest_source-1", "normalize_source_part-0", "normalize_source_part-1",
            "signature_part_job-0", "write_shard_part-0"}
    deadline = time.time() + 30
    while True:
        with get_client(sync_client=True) as c:
            done = {t.name for t in c.read_task_runs(limit=200) if t.state and t.state.is_completed()}
        if want <= done or time.time() > deadline:
            break
        time.sleep(0.5)
    assert want <= done, sorted(done)


@pytest.mark.slow
def test_demo_through_a_local_cluster_equals_the_local_run(harness, tmp_path):
    """The bundled demo, with a contamination check and decontamination (benchmark items: 30 of the demo's
    own word problems), through a LocalCluster of two workers and in one process: every data file of
    every stage (ingest .. pack, lineage) has the same sha256. Small contamination batches, so its
    training scan has several parts; pack has three shards, each a part."""
    import json

    from pipeline.generators import word_problems

    bench = tmp_path / "bench" / "gsm8k"
    bench.mkdir(parents=True)
    items = [{"question": r["question"], "answer": r["answer"]} for r in word_problems(30, 1234, cot=True)]
    (bench / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    kw = dict(spec="demo", benchmarks=str(tmp_path / "bench"), decontaminate=True, progress=False,
              overrides=["contamination.batch_rows=2048"])
    local = data_flow(output_dir=str(tmp_path / "local"), **kw)
    dask = data_flow(output_dir=str(tmp_path / "dask"), runner="dask", workers=2, **kw)
    assert local["ran"] == dask["ran"] == ["ingest", "normalize", "stratify", "dedup", "tokenizer", "contamination",
                                           "mix", "pack", "lineage"]
    for st, m in local["manifests"].items():
        assert Path(m["path"]).name == Path(dask["manifests"][st]["path"]).name, st
        assert m["counts"] == dask["manifests"][st]["counts"], st
    c = dask["manifests"]["contamination"]["counts"]
    assert c["dirty"]["gsm8k"] > 0 and c["rows_removed"] > 0  # the check found the copies and dropped rows
    assert dask["manifests"]["pack"]["counts"]["shards"] >= 3
    a, b = data_hashes(tmp_path / "local"), data_hashes(tmp_path / "dask")
    assert {k.split("/")[0] for k in a} == set(local["ran"])
    assert a == b
    want = {f"ingest_source-{i}" for i in range(6)} | {f"normalize_source_part-{i}" for i in range(6)} | {
        "signature_part_job-0", "scan_part-0", "scan_part-2", "write_shard_part-0", "write_shard_part-2"}
    deadline = time.time() + 30
    while True:
        with get_client(sync_client=True) as cl:
            runs = cl.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=sorted(want))), limit=200)
            done = {t.name for t in runs if t.state and t.state.is_completed()}
        if want <= done or time.time() > deadline:
            break
        time.sleep(0.5)
    assert want <= done, sorted(want - done)


def test_runner_setting_is_checked():
    with pytest.raises(ValueError, match="runner must be one of"):
        with parts_runner("ray"):
            pass
    with pytest.raises(ValueError, match="--address is for --runner dask"):
        with parts_runner("local", "tcp://127.0.0.1:8786"):
            pass


def test_spec_runner_setting_is_validated(tmp_path):
    from pipeline.spec import load_spec

    spec = tmp_path / "s.yaml"
    spec.write_text(TINY + "resources: {runner: dask, address: 'tcp://127.0.0.1:8786', workers: 3}\n")
    r = load_spec(str(spec)).resources
    assert (r.runner, r.address, r.workers) == ("dask", "tcp://127.0.0.1:8786", 3)
    spec.write_text(TINY + "resources: {runner: ray}\n")
    with pytest.raises(Exception, match="runner"):
        load_spec(str(spec))
