from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import NormalizeConfig, SourceSpec
from pipeline.io import read_json, sha256_file
from pipeline.stages import ingest, normalize
from pipeline.stages.ingest import IngestError
from pipeline.stages.normalize import NormalizeSpecError


def gsm_source(path, **kw) -> SourceSpec:
    return SourceSpec(name=kw.pop("name", "gsm8k"), kind="local", path=str(path),
                      fields={"instruction": "question", "response": "answer"}, condition="cot", domain="math", **kw)


def test_gsm8k_local_source_end_to_end(tmp_path, gsm8k_train):
    src = gsm_source(gsm8k_train, license="MIT")
    man = ingest.run([src], tmp_path / "ingest", progress=False)
    rec = man["sources"]["gsm8k"]
    assert rec["rows"] == 7473 and rec["license"] == "MIT"
    assert rec["files"]["train.jsonl"]["sha256"] == sha256_file(gsm8k_train)
    nm = normalize.run(tmp_path / "ingest", tmp_path / "norm", [src], NormalizeConfig(), progress=False)
    assert nm["counts"]["kept"] == 7473 and nm["counts"]["rejected"] == 0
    t = pq.read_table(tmp_path / "norm" / "rows.parquet")
    assert t.column_names == ["id", "instruction", "response", "condition", "source", "domain", "origin"]
    first = t.slice(0, 1).to_pylist()[0]
    assert first["id"] == "gsm8k/1"  # JSONL row id = line number
    assert first["instruction"].startswith("Natalia sold clips") and first["response"].endswith("#### 72")
    assert first["origin"] == "gsm8k/train.jsonl" and first["condition"] == "cot"
    # rerun: nothing recomputed, same files
    mtime = (tmp_path / "norm" / "rows.parquet").stat().st_mtime_ns
    again = normalize.run(tmp_path / "ingest", tmp_path / "norm", [src], NormalizeConfig(), progress=False)
    assert again == nm and (tmp_path / "norm" / "rows.parquet").stat().st_mtime_ns == mtime


def test_malformed_jsonl_rows_are_rejected_with_reasons(tmp_path):
    lines = [
        json.dumps({"q": "What is 2+2?", "a": "4", "k": "x1"}),
        '{"q": "broken json", "a": ',
        json.dumps(["not", "an", "object"]),
        json.dumps({"q": "no answer here", "k": "x3"}),
        json.dumps({"q": "number answer", "a": 42, "k": "x4"}),
        json.dumps({"q": "empty answer", "a": "   ", "k": "x5"}),
        json.dumps({"q": "x" * 300, "a": "long one", "k": "x6"}),
        json.dumps({"q": "bad condition", "a": "ok", "k": "x7", "c": "sarcastic"}),
        json.dumps({"q": "repeat id", "a": "ok", "k": "x1"}),
        json.dumps({"q": "lone surrogate \ud800", "a": "ok", "k": "x9"}),
        json.dumps({"q": "Fine question?", "a": "Fine answer.", "k": "x10", "lang": "de"}),
        json.dumps({"q": "Also fine?", "a": "Yes.", "k": "x11"}),
    ]
    f = tmp_path / "raw.jsonl"
    f.write_bytes(("\n".join(lines) + "\n").encode() + b'{"q": "latin-1 \xe9", "a": "x", "k": "x12"}\n\n')
    src = SourceSpec(name="raw", kind="local", path=str(f), exclude={"lang": ["de"]},
                     fields={"instruction": "q", "response": "a", "id": "k", "condition": None})
    src2 = src.model_copy(update={"fields": src.fields.model_copy(update={"condition": "c"})})
    ingest.run([src2], tmp_path / "ingest", progress=False)
    man = normalize.run(tmp_path / "ingest", tmp_path / "norm", [src2],
                        NormalizeConfig(max_instruction_chars=200), progress=False)
    c = man["counts"]
    assert c["rows_in"] == 13 and c["kept"] == 2 and c["rejected"] == 11
    rej = pq.read_table(tmp_path / "norm" / "rejects.parquet").to_pylist()
    by_reason = {}
    for r in rej:
        by_reason.setdefault(r["reason"], []).append(r)
    assert sorted(by_reason) == ["bad_json", "duplicate_id", "empty_field", "excluded_by_spec", "missing_field",
                                 "non_utf8", "not_an_object", "too_long", "unknown_condition", "wrong_type"]
    assert len(by_reason["non_utf8"]) == 2  # a lone surrogate and a latin-1 byte
    assert "raw.jsonl:2" in by_reason["bad_json"][0]["detail"]  # file and line are named
    assert "'a'" in by_reason["missing_field"][0]["detail"]
    assert "int" in by_reason["wrong_type"][0]["detail"]
    assert by_reason["duplicate_id"][0]["id"] == "raw/x1"
    kept = pq.read_table(tmp_path / "norm" / "rows.parquet").to_pylist()
    assert [r["id"] for r in kept] == ["raw/x1", "raw/x11"]


def test_parquet_source_templates_and_missing_column(tmp_path):
    t = pa.table({"question": ["2+2?", "3+3?"], "choices": [["3", "4"], ["6", "7"]],
                  "messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "4"}],
                               [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "6"}]],
                  "task": ["add", "add2"]})
    pq.write_table(t, tmp_path / "mc.parquet")
    src = SourceSpec(name="mc", kind="local", path=str(tmp_path / "mc.parquet"),
                     fields={"instruction": "{question}\nOptions: {choices[0]} / {choices[1]}",
                             "response": "{messages[1][content]}", "subset": "task"})
    ingest.run([src], tmp_path / "ingest", progress=False)
    normalize.run(tmp_path / "ingest", tmp_path / "norm", [src], NormalizeConfig(), progress=False)
    rows = pq.read_table(tmp_path / "norm" / "rows.parquet").to_pylist()
    assert rows[0]["instruction"] == "2+2?\nOptions: 3 / 4" and rows[0]["response"] == "4"
    assert [r["origin"] for r in rows] == ["mc/add", "mc/add2"] and rows[1]["id"] == "mc/1"
    bad = src.model_copy(update={"fields": src.fields.model_copy(update={"response": "answer"})})
    with pytest.raises(NormalizeSpecError, match=r"\['answer'\].*not columns"):
        normalize.run(tmp_path / "ingest", tmp_path / "norm2", [bad], NormalizeConfig(), progress=False)


def test_generators_are_deterministic_and_plant_duplicates(tmp_path):
    src = SourceSpec(name="wp", kind="generator", generator="word_problems",
                     params={"n": 400, "near_dup_rate": 0.1, "exact_dup_rate": 0.05},
                     fields={"instruction": "question", "response": "answer", "id": "uid", "subset": "task"})
    a = ingest.run([src], tmp_path / "a", seed=7, progress=False)
    b = ingest.run([src], tmp_path / "b", seed=7, progress=False)
    c = ingest.run([src], tmp_path / "c", seed=8, progress=False)
    assert a["outputs"] == b["outputs"] and a["outputs"] != c["outputs"]
    rows = pq.read_table(tmp_path / "a" / "wp.parquet").to_pylist()
    dups = [r for r in rows if r["uid"].startswith("dup")]
    assert 20 < len(dups) < 120
    questions = {r["question"] for r in rows if not r["uid"].startswith("dup")}
    assert any(d["question"] in questions for d in dups)  # verbatim copies
    assert any(d["question"] not in questions for d in dups)  # edited copies


def test_ingest_errors_are_clear(tmp_path):
    with pytest.raises(IngestError, match="matches no"):
        ingest.run([SourceSpec(name="x", kind="local", path=str(tmp_path / "none*.jsonl"))], tmp_path / "o",
                   progress=False)
    with pytest.raises(IngestError, match="integer 'n'"):
        ingest.run([SourceSpec(name="g", kind="generator", generator="arithmetic")], tmp_path / "o", progress=False)
    with pytest.raises(IngestError, match="unknown generator"):
        ingest.run([SourceSpec(name="g", kind="generator", generator="nope", params={"n": 1})], tmp_path / "o",
                   progress=False)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(IngestError, match="not a readable Parquet"):
        ingest.run([SourceSpec(name="p", kind="local", path=str(tmp_path / "bad.parquet"))], tmp_path / "o",
                   progress=False)


def test_ingest_reuses_unchanged_sources(tmp_path, gsm8k_train):
    gen = SourceSpec(name="seq", kind="generator", generator="sequences", params={"n": 50})
    f = tmp_path / "local.jsonl"
    f.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n")
    loc = SourceSpec(name="loc", kind="local", path=str(f))
    ingest.run([gen, loc], tmp_path / "i", progress=False)
    f.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n" + json.dumps({"instruction": "c", "response": "d"}) + "\n")
    ingest.run([gen, loc], tmp_path / "i", progress=False)
    timing = read_json(tmp_path / "i" / "timing.json")
    assert timing["seq"] == "reused" and timing["loc"] != "reused"
    assert read_json(tmp_path / "i" / "manifest.json")["sources"]["loc"]["rows"] == 2


def test_hub_code_path_on_a_local_dataset_folder(tmp_path, gsm8k_train):
    """`kind: hub` goes through datasets.load_dataset; a local folder exercises the same path offline."""
    import shutil

    d = tmp_path / "hubdata"
    d.mkdir()
    shutil.copy(gsm8k_train, d / "train.jsonl")
    src = SourceSpec(name="gsm", kind="hub", path=str(d), split="train", max_rows=300,
                     fields={"instruction": "question", "response": "answer"})
    man = ingest.run([src], tmp_path / "ingest", progress=False)
    rec = man["sources"]["gsm"]
    assert rec["rows"] == 300 and rec["hub"]["path"] == str(d) and rec["hub"]["split"] == "train"
    nm = normalize.run(tmp_path / "ingest", tmp_path / "norm", [src], NormalizeConfig(), progress=False)
    rows = pq.read_table(tmp_path / "norm" / "rows.parquet").to_pylist()
    assert nm["counts"]["kept"] == 300 and rows[0]["id"] == "gsm/0" and rows[0]["origin"] == "gsm/train"
    bad = SourceSpec(name="nope", kind="hub", path=str(tmp_path / "missing"), split="train")
    with pytest.raises(IngestError, match="cannot load Hub dataset"):
        ingest.run([bad], tmp_path / "ingest2", progress=False)
