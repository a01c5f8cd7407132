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


# ------------------------------------------------------------------------------------------------
# byte-order marks, empty sources, spec checks, deterministic vs network errors
# ------------------------------------------------------------------------------------------------
def _jsonl(path, rows, prefix: bytes = b""):
    path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def test_utf8_bom_at_start_of_jsonl_is_dropped(tmp_path):
    import gzip

    rows = [{"instruction": "What is 2+2?", "response": "4"}, {"instruction": "And 3+3?", "response": "6"}]
    plain = _jsonl(tmp_path / "bom.jsonl", rows, b"\xef\xbb\xbf")
    gz = tmp_path / "bomgz.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    srcs = [SourceSpec(name="bom", kind="local", path=str(plain)), SourceSpec(name="gz", kind="local", path=str(gz))]
    ingest.run(srcs, tmp_path / "ingest", progress=False)
    man = normalize.run(tmp_path / "ingest", tmp_path / "norm", srcs, NormalizeConfig(), progress=False)
    assert man["counts"]["rejected"] == 0 and man["counts"]["kept"] == 4
    kept = pq.read_table(tmp_path / "norm" / "rows.parquet").to_pylist()
    assert [r["id"] for r in kept] == ["bom/1", "bom/2", "gz/1", "gz/2"]
    assert kept[0]["instruction"] == "What is 2+2?"
    # a rows file given to a stage alone, too
    from pipeline.rows import load_rows

    loaded = load_rows(plain)
    assert not loaded.rejects and loaded.table.num_rows == 2


def test_empty_source_is_a_warning_recorded_in_the_manifests(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    d = tmp_path / "parts"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b"\n")  # blank lines only: no rows
    _jsonl(d / "b.jsonl", [{"instruction": "q", "response": "r"}])
    srcs = [SourceSpec(name="empty", kind="local", path=str(tmp_path / "empty.jsonl")),
            SourceSpec(name="parts", kind="local", path=str(d)),
            SourceSpec(name="none", kind="generator", generator="arithmetic", params={"n": 0},
                       fields={"instruction": "question", "response": "answer"})]
    man = ingest.run(srcs, tmp_path / "ingest", progress=False)
    err = capsys.readouterr().err
    assert "warning: source 'empty' is empty" in err and "warning: source 'none' is empty" in err
    assert "file a.jsonl is empty" in err
    assert man["sources"]["empty"]["rows"] == 0 and man["counts"]["rows"]["none"] == 0
    assert [(w["source"], w["kind"]) for w in man["warnings"]] == [
        ("empty", "empty_source"), ("parts", "empty_file"), ("none", "empty_source")]
    nm = normalize.run(tmp_path / "ingest", tmp_path / "norm", srcs, NormalizeConfig(), progress=False)
    assert "warning: source 'empty' is empty" in capsys.readouterr().err
    assert nm["counts"]["per_source"]["empty"]["in"] == 0 and nm["counts"]["kept"] == 1
    assert [w["source"] for w in nm["warnings"]] == ["empty", "parts", "none"]
    assert read_json(tmp_path / "norm" / "manifest.json")["warnings"] == nm["warnings"]
    # reused sources keep their warnings
    again = ingest.run(srcs, tmp_path / "ingest", progress=False)
    assert again["warnings"] == man["warnings"]


def test_all_sources_empty_is_an_error_naming_them(tmp_path):
    from pipeline.stages.ingest import EmptySourcesError

    (tmp_path / "e1.jsonl").write_bytes(b"")
    srcs = [SourceSpec(name="e1", kind="local", path=str(tmp_path / "e1.jsonl")),
            SourceSpec(name="e2", kind="generator", generator="sequences", params={"n": 0})]
    with pytest.raises(EmptySourcesError, match=r"every source is empty.*\['e1', 'e2'\]"):
        ingest.run(srcs, tmp_path / "ingest", progress=False)
    # normalize on its own: an ingest folder whose chosen sources are all empty
    full = [*srcs, SourceSpec(name="seq", kind="generator", generator="sequences", params={"n": 3})]
    ingest.run(full, tmp_path / "ingest", progress=False)
    with pytest.raises(EmptySourcesError, match=r"\['e1', 'e2'\]"):
        normalize.run(tmp_path / "ingest", tmp_path / "norm", srcs, NormalizeConfig(), progress=False)


def test_lineage_report_lists_empty_sources():
    from pipeline.lineage import report_markdown

    src = {"ingested": 0, "rejected_at_normalize": {}, "stratified": 0, "packed": 0, "removed": 0}
    summary = {"rows_stratified": 0, "rows_packed": 0, "rows_removed": 0, "balanced": True,
               "per_source": {"empty": src}, "per_stratum": {}}
    md = report_markdown(summary)
    assert "## Warnings" in md and "- source 'empty' is empty: 0 rows" in md
    summary["warnings"] = [{"source": "p", "message": "source 'p': file a.jsonl is empty (0 rows)"}]
    assert "- source 'p': file a.jsonl is empty (0 rows)" in report_markdown(summary)
    summary["per_source"]["empty"]["ingested"] = 5
    del summary["warnings"]
    assert "Warnings" not in report_markdown(summary)


def test_check_spec_names_missing_paths_and_unknown_generator_params(tmp_path):
    from pipeline.checks import check_spec, require_ok
    from pipeline.spec import SpecError, parse_spec

    _jsonl(tmp_path / "ok.jsonl", [{"instruction": "q", "response": "r"}])
    spec = parse_spec({"name": "t", "sources": [
        {"name": "ok", "kind": "local", "path": str(tmp_path / "ok.jsonl")},
        {"name": "gone", "kind": "local", "path": str(tmp_path / "missing" / "*.jsonl")},
        {"name": "arith", "kind": "generator", "generator": "arithmetic", "params": {"n": 5, "digits": 3}},
        {"name": "wp", "kind": "generator", "generator": "word_problems", "params": {"cot": True}},
        {"name": "nogen", "kind": "generator", "generator": "nope", "params": {"n": 1}},
        {"name": "good", "kind": "generator", "generator": "sequences", "params": {"n": 2, "near_dup_rate": 0.1}},
    ]})
    problems = check_spec(spec)
    assert len(problems) == 4, problems
    assert problems[0].startswith("sources[1]: source 'gone'") and str(tmp_path / "missing" / "*.jsonl") in problems[0]
    assert "sources[2]: source 'arith'" in problems[1] and "'digits'" in problems[1]
    assert "['cot', 'exact_dup_rate', 'max_digits', 'n', 'near_dup_rate', 'ops', 'seed']" in problems[1]
    assert "sources[3]: source 'wp'" in problems[2] and "integer 'n'" in problems[2]
    assert "sources[4]: source 'nogen'" in problems[3] and "unknown generator 'nope'" in problems[3]
    with pytest.raises(SpecError) as e:
        require_ok(spec, "t.yaml")
    assert str(e.value).count("\n  - ") == 4
    assert check_spec(spec.model_copy(update={"sources": [spec.sources[0], spec.sources[-1]]})) == []


def test_deterministic_ingest_errors_are_ingest_errors_naming_source_and_file(tmp_path):
    from pipeline.stages.ingest import is_transient

    assert issubclass(IngestError, ValueError)
    with pytest.raises(IngestError, match=r"source 'x': local path .*none\*\.jsonl.* matches no") as e:
        ingest.run([SourceSpec(name="x", kind="local", path=str(tmp_path / "none*.jsonl"))], tmp_path / "o",
                   progress=False)
    assert not is_transient(e.value)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 truncated")
    with pytest.raises(IngestError, match=rf"source 'p': {bad} is not a readable Parquet"):
        ingest.run([SourceSpec(name="p", kind="local", path=str(bad))], tmp_path / "o", progress=False)
    with pytest.raises(IngestError, match=r"source 'g': generator 'sequences' has no parameter 'cot'; "
                                          r"accepted: \['exact_dup_rate', 'n', 'near_dup_rate', 'seed'\]"):
        ingest.run([SourceSpec(name="g", kind="generator", generator="sequences", params={"n": 3, "cot": True})],
                   tmp_path / "o", progress=False)
    gz = tmp_path / "broken.jsonl.gz"
    gz.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(IngestError, match=rf"source 'z': cannot read {gz}"):
        ingest.run([SourceSpec(name="z", kind="local", path=str(gz))], tmp_path / "o", progress=False)


@pytest.mark.parametrize("exc, transient", [
    (ConnectionError("connection reset by peer"), True),
    (TimeoutError("read timed out"), True),
    (FileNotFoundError("no such dataset"), False),
    (ValueError("Unknown split 'tran'"), False),
])
def test_hub_network_errors_are_distinguishable_from_deterministic_ones(tmp_path, monkeypatch, exc, transient):
    import datasets

    from pipeline.stages.ingest import SourceFetchError, is_transient

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(datasets, "load_dataset", fail)
    src = SourceSpec(name="hubby", kind="hub", path="org/some-dataset", split="train")
    with pytest.raises((SourceFetchError, IngestError)) as e:
        ingest.run([src], tmp_path / "o", progress=False)
    assert "source 'hubby'" in str(e.value) and "org/some-dataset" in str(e.value)
    assert is_transient(e.value) is transient
    assert isinstance(e.value, SourceFetchError if transient else IngestError)
    if transient:
        assert isinstance(e.value, ConnectionError) and e.value.__cause__ is exc


def test_http_status_decides_whether_a_hub_error_is_transient():
    import httpx

    from pipeline.stages.ingest import is_transient

    req = httpx.Request("GET", "https://huggingface.co/api/datasets/x")
    for status, transient in ((503, True), (429, True), (404, False), (401, False)):
        err = httpx.HTTPStatusError("boom", request=req, response=httpx.Response(status, request=req))
        assert is_transient(err) is transient, status
    wrapped = RuntimeError("datasets wrapped it")
    wrapped.__cause__ = httpx.ConnectError("no route to host")
    assert is_transient(wrapped)


def test_jsonl_blocks_of_row_groups_same_bytes(tmp_path, monkeypatch):
    """A local JSONL source is read in blocks of at most a row group of lines (so that the writer flushes
    each block and holds no remainder): blocks of 64 lines (two files, blank lines, a BOM, max_rows
    mid-file) give the same raw Parquet bytes and manifest as the default run (one block a file)."""
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + b"".join(
        (b"\n" if i % 97 == 5 else b"") + json.dumps({"q": f"q{i}", "a": f"a {i}"}).encode() + b"\n"
        for i in range(700)))
    (d / "b.jsonl").write_text("".join(json.dumps({"q": f"r{i}", "a": "x" * (i % 50)}) + "\n" for i in range(500)))
    srcs = [SourceSpec(name="s", kind="local", path=str(d), fields={"instruction": "q", "response": "a"}),
            SourceSpec(name="m", kind="local", path=str(d), max_rows=900, fields={"instruction": "q", "response": "a"})]
    a = ingest.run(srcs, tmp_path / "a", progress=False)
    blocks = []
    table = ingest._JsonlLines._table
    monkeypatch.setattr(ingest._JsonlLines, "_table", lambda self, lines, rows: (blocks.append(len(lines)),
                                                                                  table(self, lines, rows))[1])
    monkeypatch.setattr(ingest, "ROW_GROUP", 64)
    b = ingest.run(srcs, tmp_path / "b", progress=False)
    assert max(blocks) == 64 and sum(blocks) == 700 + 500 + 900
    for name in ("s.parquet", "m.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a["sources"] == b["sources"] and a["sources"]["m"]["rows"] == 900


def test_parquet_batches_of_row_groups_same_bytes(tmp_path, monkeypatch):
    """A local Parquet source read in batches of whole row groups (of 128 rows here: batches of 384 where
    the budget gives 400), with max_rows mid-batch: the same raw Parquet bytes and manifest as the default
    run (one batch)."""
    f = tmp_path / "src.parquet"
    pq.write_table(pa.table({"q": [f"q{i}" for i in range(3000)], "a": ["x" * (i % 300) for i in range(3000)]}),
                   f, row_group_size=500)
    srcs = [SourceSpec(name="p", kind="local", path=str(f), fields={"instruction": "q", "response": "a"}),
            SourceSpec(name="m", kind="local", path=str(f), max_rows=2900, fields={"instruction": "q", "response": "a"})]
    a = ingest.run(srcs, tmp_path / "a", progress=False)
    from pipeline import budget

    monkeypatch.setattr(budget, "batch_rows", lambda *a, **k: 400)  # the budget's batch: 400 rows
    monkeypatch.setattr(ingest, "ROW_GROUP", 128)  # read as 3 row groups of 128
    sizes = []
    conform = ingest._conform
    monkeypatch.setattr(ingest, "_conform", lambda t, s: (sizes.append(t.num_rows), conform(t, s))[1])
    b = ingest.run(srcs, tmp_path / "b", progress=False)
    assert sizes[:3] == [384] * 3 and len(sizes) == 8 + 8 and all(n == 384 for n in sizes[:7] + sizes[8:15]), sizes
    for name in ("p.parquet", "m.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a["sources"] == b["sources"]
