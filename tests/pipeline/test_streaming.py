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


# ------------------------------------------------------------------------------------------------
# streaming stages against their whole-table references
# ------------------------------------------------------------------------------------------------
def _corpus(n: int, seed: int = 0) -> list[dict]:
    """Rows of a few sources with exact copies and near copies (one word changed) of earlier rows."""
    import random

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(300)]
    rows = []
    for i in range(n):
        if i > 10 and rng.random() < 0.1:
            src = dict(rows[rng.randrange(i)])
            if rng.random() < 0.5:
                resp = src["response"].split()
                resp[rng.randrange(len(resp))] = rng.choice(words)
                src["response"] = " ".join(resp)
        else:
            src = {"instruction": " ".join(rng.choices(words, k=8)), "response": " ".join(rng.choices(words, k=40))}
        s = ["alpha", "beta", "gamma"][i % 3]
        rows.append({**src, "id": f"{s}/{i}", "source": s, "domain": "general", "condition": "direct",
                     "origin": f"{s}/part{i % 2}"})
    return rows


def _outputs(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())["outputs"]


def _batches(monkeypatch, rows: int, block: int) -> None:
    """Batches of `rows` rows and JSONL blocks of `block` bytes, whatever the budget."""
    from pipeline import budget

    monkeypatch.setattr(budget, "MIN_ROWS", rows)
    monkeypatch.setattr(budget, "MAX_ROWS", rows)
    monkeypatch.setattr(budget, "MIN_BLOCK", block)
    monkeypatch.setattr(budget, "MAX_BLOCK", block)


def test_stratify_and_dedup_in_small_batches_are_byte_identical_to_one_batch(tmp_path, monkeypatch):
    from pipeline.config import DedupConfig, StratumRule
    from pipeline.io import write_parquet
    from pipeline.stages import dedup, stratify

    rows = _corpus(1500)
    lines = [json.dumps(r) for r in rows]
    lines.insert(700, "{broken")  # a malformed line inside a block: the block is parsed line by line
    jsonl = tmp_path / "rows.jsonl"
    _write_jsonl(jsonl, lines)
    rules = [StratumRule(match="alpha/", stratum="source"), StratumRule(match="beta/part1", name="b1", domain="x")]
    cfg = DedupConfig(num_perm=64, threshold=0.7)
    runs = {}
    for how in ("whole", "batches"):
        if how == "whole":  # one batch: the whole table, as the stages held it before they streamed
            _batches(monkeypatch, 1 << 30, 1 << 30)
        else:  # 16 batches, 60 JSONL blocks
            _batches(monkeypatch, 97, 2048)
        st = stratify.run(jsonl, tmp_path / how / "stratify", rules, source_order=["gamma"], progress=False)
        dd = dedup.run(tmp_path / how / "stratify", tmp_path / how / "dedup", cfg, progress=False)
        dj = dedup.run(jsonl, tmp_path / how / "dedup-jsonl", cfg, progress=False)
        runs[how] = (st, dd, dj)
    for a, b in zip(runs["whole"], runs["batches"]):
        assert a["outputs"] == b["outputs"] and a["counts"] == b["counts"]
    st, dd, dj = runs["batches"]
    assert dd["counts"]["exact_duplicates"] > 20 and dd["counts"]["near_duplicates"] > 10
    assert dj["counts"]["rejected"] == 1 and st["counts"]["rejected"] == 1
    # the streamed rows.parquet is the whole-table write of the kept rows
    ref = load_rows(jsonl, REQ + ("origin",), stage="t").table
    gone = set(pq.read_table(tmp_path / "batches" / "dedup-jsonl" / "removals.parquet")["id"].to_pylist())
    keep = pa.array([i not in gone for i in ref["id"].to_pylist()])
    rec = write_parquet(ref.filter(keep).combine_chunks(), tmp_path / "ref.parquet")
    assert rec["sha256"] == dj["outputs"]["rows.parquet"]["sha256"]


def test_row_group_writer_is_byte_identical_to_the_whole_table_write(tmp_path):
    from pipeline.io import RowGroupWriter, write_parquet

    t = pa.Table.from_pylist(_rows(70_000))
    whole = write_parquet(t, tmp_path / "a.parquet")
    with RowGroupWriter(tmp_path / "b.parquet", t.schema) as w:
        for s in range(0, t.num_rows, 6_007):
            w.write(t.slice(s, 6_007))
    assert w.record == whole
    with RowGroupWriter(tmp_path / "c.parquet", t.schema) as w:
        pass
    assert w.record == write_parquet(t.slice(0, 0), tmp_path / "d.parquet")


# ------------------------------------------------------------------------------------------------
# a stage under a low memory budget
# ------------------------------------------------------------------------------------------------
_WAITER = """
import json, resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
assert p.returncode == 0, p.stderr
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "out": p.stdout}))
"""

_STAGE = """
import sys
from pipeline.stages import stratify
man = stratify.run(sys.argv[1], sys.argv[2], [], progress=False, memory_gb=float(sys.argv[3]))
print(man["counts"]["kept"])
"""


def test_stratify_stays_within_a_low_memory_budget(tmp_path):
    """500k rows (about 160 MB of text; the whole-table stratify peaked at 935 MB on them) streamed by
    stratify under a 400 MB budget (measured: about 325 MB), peak RSS measured by getrusage in a waiter
    process (a process's own maxrss would count the memory of the process it was forked from).

    Not 200 MB: the interpreter with pyarrow and polars is about 110 MB, the Parquet reader decodes a
    whole row group of the input (64k rows, as every stage writes them) at a time, the writer holds
    one row group of the output, and the allocators keep some of what was freed."""
    import subprocess
    import sys

    import numpy as np
    import pyarrow.compute as pc

    n = 500_000
    rng = np.random.default_rng(0)
    vocab = pa.array([f"w{i}" for i in range(3000)])

    def texts(lo: int, hi: int) -> pa.Array:
        k = rng.integers(lo, hi, n)
        offs = pa.array(np.concatenate([[0], np.cumsum(k)]), pa.int32())
        return pc.binary_join(pa.ListArray.from_arrays(offs, vocab.take(rng.integers(0, 3000, int(k.sum())))), " ")

    t = pa.table({"id": pa.array(np.char.add("r", np.arange(n).astype(str))), "instruction": texts(8, 20),
                  "response": texts(30, 60), "condition": pa.array(["direct"] * n), "source": pa.array(["s"] * n),
                  "domain": pa.array(["general"] * n)})
    text_mb = (t["instruction"].nbytes + t["response"].nbytes) / 2**20
    f = tmp_path / "rows.parquet"
    pq.write_table(t, f, row_group_size=64 * 1024)
    del t
    root = str(Path(__file__).resolve().parents[2])
    p = subprocess.run([sys.executable, "-c", _WAITER, sys.executable, "-c", _STAGE, str(f), str(tmp_path / "out"), "0.4"],
                       capture_output=True, text=True, cwd=root, env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert int(r["out"].strip()) == n
    assert text_mb > 150
    assert r["maxrss_mb"] < 400, r


def test_dedup_of_a_file_without_a_good_row_writes_empty_outputs(tmp_path):
    from pipeline.config import DedupConfig
    from pipeline.stages import dedup

    f = tmp_path / "rows.jsonl"
    _write_jsonl(f, ["{bad", json.dumps({"instruction": "x", "response": " "})])
    man = dedup.run(f, tmp_path / "out", DedupConfig(), progress=False)
    assert man["counts"] == {"rows_in": 0, "kept": 0, "exact_duplicates": 0, "near_duplicates": 0, "rejected": 2}
    rows = pq.read_table(tmp_path / "out" / "rows.parquet")
    assert rows.num_rows == 0 and rows.column_names == list(REQ)


def test_lsh_buckets_band_by_band_on_disk_equal_all_bands_in_memory(tmp_path):
    """bucket_step writes each part's band keys to one file per band and pairs each band alone: the
    candidates are those of `minhash.candidate_pairs` over every band of every part at once."""
    import numpy as np

    from pipeline import minhash
    from pipeline.config import DedupConfig
    from pipeline.stages import dedup

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(200)]
    texts = [" ".join(rng.choice(words, 30)) for _ in range(3000)]
    texts += [t.replace("w1 ", "w2 ", 1) for t in texts[:500]]
    dedup.write_docs(pa.array(texts, pa.large_string()), tmp_path / "docs.arrow")
    cfg = DedupConfig(threshold=0.5)
    parts = dedup.signature_step(tmp_path / "docs.arrow", tmp_path / "sig", cfg, key=None, part_rows=700,
                                 progress=False)
    bands, rows, _ = dedup.lsh_params(cfg)
    cand = dedup.bucket_step(parts, tmp_path / "buckets", bands, rows)
    keys = np.concatenate([minhash.band_keys(np.load(p), bands, rows) for p in parts], axis=1)
    valid = np.concatenate([np.load(p)[:, 0] != minhash.EMPTY for p in parts])
    ref = minhash.candidate_pairs(keys, valid)
    assert len(parts) == 5 and ref.shape[0] >= 500
    assert np.array_equal(np.stack([cand["a"].to_numpy(), cand["b"].to_numpy()], axis=1), ref)
    assert [p.name for p in (tmp_path / "buckets").iterdir()] == ["candidates.parquet"]  # band files removed


# ------------------------------------------------------------------------------------------------
# mix and ingest stream
# ------------------------------------------------------------------------------------------------
def test_row_group_writer_keeps_the_chunks_of_a_whole_table_made_of_several(tmp_path):
    """new_chunk(): the file equals write_parquet of a table whose chunks break where new_chunk was
    called (mix writes one chunk per epoch, as its whole table of all epochs was)."""
    from pipeline.io import RowGroupWriter, write_parquet

    parts = [pa.Table.from_pylist(_rows(n, s)) for n, s in ((30_000, 0), (50_000, 30_000), (3, 80_000), (20_000, 9))]
    whole = write_parquet(pa.concat_tables(parts), tmp_path / "a.parquet")
    with RowGroupWriter(tmp_path / "b.parquet", parts[0].schema) as w:
        for p in parts:
            w.new_chunk()
            for s in range(0, p.num_rows, 7_001):
                w.write(p.slice(s, 7_001))
    assert w.record == whole


def _tokenized(path: Path, n: int) -> None:
    import numpy as np

    rng = np.random.default_rng(3)
    st = rng.choice(["a/x", "a/y", "b", "é"], n)
    rule = np.where(st == "a/x", "capr", np.where(st == "b", "capt", np.where(st == "é", "down", "default")))
    t = pa.table({"id": [f"r{i:05d}" for i in rng.permutation(n)], "source": rng.choice(["p", "q"], n),
                  "stratum": st, "rule": rule, "prompt_tokens": rng.integers(1, 9, n).astype("int32"),
                  "response_tokens": rng.integers(1, 90, n).astype("int32")})
    pq.write_table(t, path, row_group_size=700)


def test_mix_in_small_batches_is_byte_identical_to_one_batch(tmp_path, monkeypatch):
    from pipeline.config import MixConfig, StratumRule
    from pipeline.stages import mix

    _tokenized(tmp_path / "tokenized.parquet", 3000)
    rules = [StratumRule(match="*", name="capr", cap_rows=300, repeat=1.5),
             StratumRule(match="*", name="capt", cap_tokens=9000, repeat=2.3),
             StratumRule(match="*", name="down", repeat=0.4)]
    runs = {}
    for how, rows in (("whole", 1 << 30), ("batches", 97)):
        _batches(monkeypatch, rows, 2048)
        runs[how] = mix.run(tmp_path, tmp_path / how, MixConfig(epochs=3), rules=rules, seed=5, progress=False)
    assert runs["whole"]["outputs"] == runs["batches"]["outputs"]
    assert runs["whole"]["counts"]["rows_capped"] > 100 and runs["whole"]["counts"]["seen_rows"] > 3000
    m = pq.read_table(tmp_path / "batches" / "mix.parquet")
    assert m["order"].to_pylist()[:5] == [0, 1, 2, 3, 4] and sorted(set(m["epoch"].to_pylist())) == [0, 1, 2]
    rem = pq.read_table(tmp_path / "batches" / "removals.parquet")
    assert set(rem["id"].to_pylist()).isdisjoint(m["id"].to_pylist())
    assert rem.num_rows + len(set(m["id"].to_pylist())) == 3000


def test_ingest_in_small_batches_is_byte_identical_to_one_batch(tmp_path, monkeypatch):
    """Local JSONL (BOM, blank lines, gzip, CRLF) and Parquet files of different columns, max_rows
    across files, and a Hub-like folder streamed through datasets: the same bytes in 97-row batches /
    2 KB blocks as in one batch, and the concatenation of every file's rows (one chunk per file)."""
    import gzip

    from pipeline.config import SourceSpec
    from pipeline.io import write_parquet
    from pipeline.stages import ingest

    d = tmp_path / "loc"
    (d / "sub").mkdir(parents=True)
    lines = [json.dumps({"instruction": f"q{i}", "response": "a" * (i % 30)}) for i in range(1200)]
    (d / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines[:800]).encode() + b"\n\n  \n")
    with gzip.open(d / "sub" / "b.jsonl.gz", "wb") as f:
        f.write("\r\n".join(lines[800:]).encode())
    pq.write_table(pa.table({"instruction": [f"p{i}" for i in range(900)], "response": ["r"] * 900,
                             "n": pa.array(range(900), pa.int32())}), d / "c.parquet", row_group_size=250)
    pq.write_table(pa.table({"instruction": ["z"] * 50, "n": pa.array(range(50), pa.int64()), "x": [1.5] * 50}),
                   d / "sub" / "d.parquet")
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    for k, n in enumerate((700, 40)):
        pq.write_table(pa.table({"query": [f"f{k} q{i}" for i in range(n)], "answer": ["x"] * n}),
                       hub / f"train-0000{k}-of-00002.parquet")
    srcs = [SourceSpec(name="loc", kind="local", path=str(d)),
            SourceSpec(name="cut", kind="local", path=str(d), max_rows=1500),
            SourceSpec(name="hub", kind="hub", path=str(hub.parent), split="train", data_file_field="data_file"),
            SourceSpec(name="hubcut", kind="hub", path=str(hub.parent), split="train", max_rows=710)]
    runs = {}
    for how, rows, block in (("whole", 1 << 30, 1 << 30), ("batches", 97, 2048)):
        _batches(monkeypatch, rows, block)
        runs[how] = ingest.run(srcs, tmp_path / how, progress=False)
    assert runs["whole"]["outputs"] == runs["batches"]["outputs"]
    assert runs["batches"]["counts"]["rows"] == {"loc": 2150, "cut": 1500, "hub": 740, "hubcut": 710}
    # the whole-table reference: every file's rows concatenated
    names = ["a.jsonl", "c.parquet", "sub/b.jsonl.gz", "sub/d.parquet"]
    parts = []
    for name in names:
        f = d / name
        if name.endswith(".parquet"):
            t = pq.read_table(f)
            t = t.append_column("_file", pa.array([name] * t.num_rows)).append_column(
                "_row", pa.array(range(t.num_rows), pa.int64()))
        else:
            raw = (gzip.decompress(f.read_bytes()) if name.endswith(".gz") else f.read_bytes()).removeprefix(b"\xef\xbb\xbf")
            kept = [(i, x.rstrip(b"\r")) for i, x in enumerate(raw.split(b"\n"), 1) if x.strip()]
            t = pa.table({"_json": pa.array([x for _, x in kept], pa.binary()), "_file": [name] * len(kept),
                          "_row": pa.array([i for i, _ in kept], pa.int64())})
        parts.append(t)
    ref = pa.concat_tables(parts, promote_options="permissive")
    assert write_parquet(ref, tmp_path / "ref.parquet")["sha256"] == runs["batches"]["outputs"]["loc.parquet"]["sha256"]
    assert write_parquet(ref.slice(0, 1500), tmp_path / "ref2.parquet")["sha256"] == \
        runs["batches"]["outputs"]["cut.parquet"]["sha256"]
    h = pq.read_table(tmp_path / "batches" / "hub.parquet")
    assert h["data_file"].to_pylist() == ["data/train-00000-of-00002.parquet"] * 700 + ["data/train-00001-of-00002.parquet"] * 40
    assert h["_row"].to_pylist() == list(range(740))


@pytest.mark.parametrize("drop", [False, True])
def test_dedup_signatures_computed_while_reading_equal_the_near_steps(tmp_path, monkeypatch, drop):
    """With workers > 1 the signature parts are computed while the rows are read (rows in rank
    order); when a priority drops midway they are computed again by the near step. Either way the
    outputs and signature parts are those of one worker."""
    from pipeline.config import DedupConfig
    from pipeline.stages import dedup

    rows = _corpus(1500)
    for i, r in enumerate(rows):
        r["priority"] = 1 if i < 1100 or not drop else 0  # a drop at row 1100: rows no longer in rank order
    _write_jsonl(tmp_path / "rows.jsonl", [json.dumps(r) for r in rows])
    _batches(monkeypatch, 97, 2048)
    monkeypatch.setattr(dedup, "PART_ROWS", 200)
    m1 = dedup.run(tmp_path / "rows.jsonl", tmp_path / "one", DedupConfig(num_perm=64, threshold=0.7), progress=False)
    m2 = dedup.run(tmp_path / "rows.jsonl", tmp_path / "two", DedupConfig(num_perm=64, threshold=0.7, workers=2),
                   progress=False)
    assert m1["outputs"] == m2["outputs"] and m1["counts"] == m2["counts"]
    assert m1["counts"]["exact_duplicates"] > 20 and m1["lsh"]["signature_parts"] >= 6
    for k in range(m1["lsh"]["signature_parts"]):
        part = f"signatures/part-{k:05d}.npy"
        assert (tmp_path / "one" / part).read_bytes() == (tmp_path / "two" / part).read_bytes()
    assert not list((tmp_path / "two").glob("spill*"))


def test_jsonl_block_buffer_edges_match_the_line_by_line_reference(tmp_path):
    """The reused read buffer: lines longer than a block (the buffer grows), blank and whitespace-only
    lines, a non-ASCII and a non-UTF-8 line, a BOM, no newline after the last line, gzip: the same
    batches' rows and rejections as the line-by-line reference at every block size."""
    import gzip

    lines = [json.dumps({"instruction": "q " * (i * 37 % 300 + 1), "response": f"a {i} é", "id": f"r{i}"},
                        ensure_ascii=i % 2 == 0).encode() for i in range(60)]
    lines[7], lines[19], lines[33] = b"", b"  \t ", b'{"instruction": "x", "response": "\xff"}'
    raw = b"\xef\xbb\xbf" + b"\n".join(lines)  # no final newline
    for name, data in (("a.jsonl", raw), ("b.jsonl.gz", gzip.compress(raw))):
        f = tmp_path / name
        f.write_bytes(data)
        ref = RowReader(f, REQ, stage="t", arrow=False)
        ref_rows, ref_r = [b.to_pylist() for b in ref], ref.rejects
        assert ref_r and sum(map(len, ref_rows)) == 57
        for block in (1, 7, 100, 4096, 1 << 20):
            r = RowReader(f, REQ, stage="t", block_bytes=block)
            got = [b.to_pylist() for b in r]
            assert [x for b in got for x in b] == [x for b in ref_rows for x in b], (name, block)
            assert r.rejects == ref_r, (name, block)


def test_id_set_merge_places_each_hash_at_its_rank():
    """_IdSet merges two runs by rank (no concatenation and argsort): the same arrays as the stable
    sort of the older run then the newer one, ties on the first hash included."""
    import numpy as np

    from pipeline.rows import _IdSet

    rng = np.random.default_rng(0)
    for _ in range(200):
        nb, na = rng.integers(0, 40, 2)
        b0, a0 = (np.sort(rng.integers(0, 15, k).astype(np.uint64)) for k in (nb, na))
        b1, a1 = (rng.integers(0, 2**63, k).astype(np.uint64) for k in (nb, na))
        order = np.argsort(np.concatenate([b0, a0]), kind="stable")
        m0, m1 = _IdSet._merge(b0, b1, a0, a1)
        assert m0.tolist() == np.concatenate([b0, a0])[order].tolist()
        assert m1.tolist() == np.concatenate([b1, a1])[order].tolist()
