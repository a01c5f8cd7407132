"""Streaming data stages (issue 13): the block/row-group reader, the streamed stages against their
whole-table references, and a stage under a low memory budget."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.rows import RowReader, load_rows

REQ = ("id", "instruction", "response", "condition", "source", "domain")


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"question {i}", "response": f"answer {i}", "n": i} for i in range(start, start + n)]


def _write_jsonl(path: Path, lines: list[str | bytes]) -> None:
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")


def _read(path: Path, **kw) -> tuple[pa.Table, list[dict]]:
    r = RowReader(path, REQ, stage="t", **kw)
    return r.assemble(list(r)), r.rejects


def test_malformed_lines_in_the_middle_of_a_block_are_rejected_with_their_line_numbers(tmp_path):
    lines: list[str | bytes] = [json.dumps(r) for r in _rows(300)]
    # 1-based line numbers of the bad lines once inserted (all inside the first 16 MiB block)
    lines.insert(99, "{not json")
    lines.insert(149, "[1, 2, 3]")
    lines.insert(199, b'{"instruction": "caf\xe9", "response": "x"}')  # not UTF-8
    lines.insert(249, json.dumps({"instruction": 5, "response": "x"}))
    lines.insert(279, json.dumps({"instruction": "  ", "response": "x"}))
    lines.insert(289, "")  # blank: not a row, but counted as a line
    f = tmp_path / "rows.jsonl"
    _write_jsonl(f, lines)
    table, rejects = _read(f)
    by_reason = {r["reason"]: r for r in rejects}
    assert by_reason["bad_json"]["id"] == "rows.jsonl:100"
    assert by_reason["not_an_object"]["id"] == "rows.jsonl:150"
    assert by_reason["non_utf8"]["id"] == "rows.jsonl:200"
    assert by_reason["wrong_type"]["detail"].startswith("rows.jsonl:250: field 'instruction' must be a string")
    assert by_reason["empty_field"]["detail"].startswith("rows.jsonl:280: field 'instruction' is empty")
    assert len(rejects) == 5 and table.num_rows == 300
    # the good rows of the failing block are all kept, each id named by its own line
    ids = table["id"].to_pylist()
    assert ids[98:100] == ["rows/99", "rows/101"] and ids[-1] == "rows/306"
    assert table["n"].to_pylist() == list(range(300))
    # the same rows and rejections whatever the block size, and as the line-by-line reference
    ref_t, ref_r = _read(f, arrow=False)
    for block in (64, 1000, 4096):
        t, r = _read(f, block_bytes=block)
        assert t.equals(ref_t) and t.schema == ref_t.schema and r == ref_r
    assert table.equals(ref_t) and rejects == ref_r


def test_jsonl_blocks_match_the_line_by_line_reference(tmp_path):
    """Defaults, duplicate ids across blocks, a BOM, extra columns, ISO dates (that Arrow would read as
    timestamps) and a key given twice: Arrow's blocks give what the line-by-line reference gives."""
    rows = []
    for i in range(400):
        r = {"instruction": f"q{i}", "response": f"a{i}", "extra": i}
        if i % 50 == 7:
            r["id"] = "same"  # kept once, then rejected as duplicate_id in later blocks
        if i % 40 == 3:
            r["source"] = None  # filled from the file name
        if i % 60 == 5:
            r["condition"] = "cot"
            r["meta"] = {"k": i}
        if i == 123:
            r["when"] = "2020-01-01"
        rows.append(json.dumps(r))
    rows.insert(10, '{"instruction": "a", "instruction": "b", "response": "c"}')
    f = tmp_path / "data.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + ("\n".join(rows) + "\n").encode())
    ref_t, ref_r = _read(f, arrow=False)
    assert sum(r["reason"] == "duplicate_id" for r in ref_r) == 7
    for block in (256, 3000, 1 << 20):
        t, r = _read(f, block_bytes=block)
        assert t.equals(ref_t) and t.schema == ref_t.schema, block
        assert r == ref_r, block
    loaded = load_rows(f, REQ, stage="t")
    assert loaded.table.equals(ref_t) and loaded.rejects == ref_r
    assert loaded.table.column_names == [*REQ, "extra"]  # the first kept row's keys


def test_parquet_is_read_by_row_group_with_the_same_rows(tmp_path):
    t = pa.Table.from_pylist(_rows(1000))
    t = t.append_column("source", pa.array([None if i % 97 == 0 else "s" for i in range(1000)], pa.string()))
    resp = t["instruction"].to_pylist()
    resp[500] = " "
    t = t.set_column(0, "instruction", pa.array(resp, pa.string()))
    f = tmp_path / "rows.parquet"
    pq.write_table(t, f, row_group_size=128)
    whole = load_rows(f, REQ, stage="t")
    r = RowReader(f, REQ, stage="t", batch_rows=100)
    batches = list(r)
    assert len(batches) >= 10 and max(b.num_rows for b in batches) <= 100
    assert r.assemble(batches).equals(whole.table) and r.rejects == whole.rejects
    assert whole.table.num_rows == 999 and whole.rejects[0]["id"] == "rows/500"
    assert whole.table["id"].to_pylist()[-1] == "rows/999"  # the file's row index, not the batch's


def test_a_file_whose_rows_lack_a_content_column_is_an_error(tmp_path):
    f = tmp_path / "rows.jsonl"
    _write_jsonl(f, [json.dumps({"instruction": "x"}) for _ in range(5)])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['response'\]"):
        _read(f, block_bytes=32)
