"""The data flow with a source and the run folder on object storage (a moto S3 server on 127.0.0.1): the
shards equal the local run's byte for byte, every stage version is published (files, then _files.json),
and a rerun from another machine (an empty local mirror) fetches the published versions and recomputes
nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.data_flow import data_flow
from pipeline import storage
from pipeline.io import read_json
from pipeline.runs import RunError
from s3_server import s3_bucket, s3_endpoint  # noqa: F401  (fixtures)
from tiny_spec import TINY  # tests/flows/tiny_spec.py
from training.cli import resolve_paths
from training.records import data_record

ARITH = """  - name: arith
    kind: local
    path: PATH
    fields: {instruction: question, response: answer}
"""


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _spec(tmp: Path, source: str, name: str) -> Path:
    text = TINY.replace("tokenizer:", ARITH.replace("PATH", source) + "tokenizer:", 1)
    assert "name: arith" in text
    p = tmp / f"{name}.yaml"
    p.write_text(text)
    return p


def _rows() -> bytes:
    return "".join(json.dumps({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b} #### {a + b}"}) + "\n"
                   for a in range(12) for b in range(0, 30, 3)).encode()


def _shards(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.glob("shard-*"))}


def test_remote_source_and_run_folder(harness, s3_bucket, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HRM_CACHE_DIR", str(tmp_path / "cache"))
    local_src = tmp_path / "src" / "arith.jsonl"
    local_src.parent.mkdir()
    local_src.write_bytes(_rows())
    local = data_flow(spec=str(_spec(tmp_path, str(local_src), "local")), output_dir=str(tmp_path / "run"),
                      progress=False)

    storage.write_bytes(f"{s3_bucket}/src/arith.jsonl", _rows())
    url = f"{s3_bucket}/runs/tiny"
    spec = _spec(tmp_path, f"{s3_bucket}/src/arith.jsonl", "remote")
    first = data_flow(spec=str(spec), output_dir=url, progress=False)
    assert first["output_dir"] == url
    mirror = Path(first["mirror"])
    assert mirror.is_relative_to(tmp_path / "cache")
    # the same rows: the shards are the local run's, byte for byte
    assert _shards(Path(first["manifests"]["pack"]["path"])) == _shards(Path(local["manifests"]["pack"]["path"]))
    assert first["manifests"]["ingest"]["sources"]["arith"]["files"]["arith.jsonl"]["sha256"] == \
        local["manifests"]["ingest"]["sources"]["arith"]["files"]["arith.jsonl"]["sha256"]

    # every stage version of the run manifest is published on the remote with its index
    run = json.loads(storage.read_bytes(f"{url}/run.json"))
    assert run["remote"] == url
    indexes = {}
    for st, ent in run["stages"].items():
        idx = storage.remote_index(storage.join(url, ent["dir"]))
        assert idx is not None and "manifest.json" in idx["files"], st
        assert storage.verify_remote(storage.join(url, ent["dir"]), idx), st
        indexes[st] = idx
    timing = {st: (mirror / ent["dir"] / "timing.json").read_bytes() for st, ent in run["stages"].items()}

    # another machine (no local mirror, no Prefect cache): every version is fetched, none recomputed
    shutil.rmtree(mirror)
    second = data_flow(spec=str(spec), output_dir=url, progress=False)
    run2 = json.loads(storage.read_bytes(f"{url}/run.json"))
    assert {st: e["version"] for st, e in run2["stages"].items()} == {st: e["version"] for st, e in run["stages"].items()}
    for st, ent in run2["stages"].items():
        assert (mirror / ent["dir"] / "timing.json").read_bytes() == timing[st], f"{st} was recomputed"
        assert storage.remote_index(storage.join(url, ent["dir"])) == indexes[st]
    assert _shards(Path(second["manifests"]["pack"]["path"])) == _shards(Path(local["manifests"]["pack"]["path"]))

    # --only on a fresh machine: the stages before it come from the remote run manifest, fetched on first use
    shutil.rmtree(mirror)
    only = data_flow(spec=str(spec), output_dir=url, only="pack", progress=False)
    assert only["ran"] == ["pack"]
    assert (mirror / run["stages"]["pack"]["dir"] / "timing.json").read_bytes() == timing["pack"]
    assert (mirror / run["stages"]["mix"]["dir"] / "manifest.json").is_file()

    # a consumer (hrm train/eval) on another machine given the remote run folder gets a checked local copy
    # of the pack, and of the tokenizer its manifest names
    shutil.rmtree(tmp_path / "cache")
    monkeypatch.setenv("HRM_CACHE_DIR", str(tmp_path / "other-machine"))
    shards, out, run_dir = resolve_paths(url, None, str(tmp_path / "train"))
    pack = Path(shards)
    assert pack.is_relative_to(tmp_path / "other-machine") and run_dir is None
    assert read_json(pack / "manifest.json")["stage"] == "pack"
    assert _shards(pack) == _shards(Path(local["manifests"]["pack"]["path"]))
    data = data_record(pack)
    assert Path(data["tokenizer_dir"]).is_relative_to(tmp_path / "other-machine")
    assert data["tokenizer_sha256"] == read_json(Path(local["manifests"]["tokenizer"]["path"]) / "manifest.json")[
        "outputs"]["tokenizer.json"]["sha256"]
    with pytest.raises(RunError, match="pass --out DIR"):
        resolve_paths(url, None, None)
