"""ParallelRowGroupWriter: row groups encoded in threads, the same file bytes as RowGroupWriter."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io import RowGroupWriter
from pipeline.parquet_parallel import ParallelRowGroupWriter, _fields


def _table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    words = np.array(["alpha", "beta", "Ünï", "日本", "", "x" * 40])
    text = [" ".join(rng.choice(words, int(rng.integers(0, 30)))) for _ in range(n)]
    return pa.table({
        "id": pa.array([f"r{i}" for i in range(n)]),
        "text": pa.array([None if i % 17 == 3 else t for i, t in enumerate(text)], pa.large_string()),
        "source": pa.array(rng.choice(["a", "b", "c"], n)),  # dictionary-encoded by the writer
        "priority": pa.array(rng.integers(-5, 5, n), pa.int64()),
        "score": pa.array(rng.random(n)),
        "flag": pa.array(rng.random(n) < 0.3),
        "tags": pa.array([["t"] * int(k) for k in rng.integers(0, 3, n)], pa.list_(pa.string())),
    })


@pytest.mark.parametrize("n, row_group, batch, threads", [
    (0, 100, 10, 2),  # no row
    (57, 100, 10, 2),  # one row group
    (1000, 100, 37, 2),  # a multiple of the row group
    (1733, 50, 97, 3),  # 35 row groups (a list of 15+ in the footer), a last short one
    (2500, 64, 1000, 1),
])
def test_parallel_writer_is_byte_identical(tmp_path, n, row_group, batch, threads):
    t = _table(n)
    recs = []
    for k, (cls, kw) in enumerate(((RowGroupWriter, {}), (ParallelRowGroupWriter, {"threads": threads}))):
        with cls(tmp_path / f"{k}.parquet", t.schema, row_group=row_group, **kw) as w:
            for s in range(0, n, batch):
                w.write(t.slice(s, batch))
        recs.append(w.record)
    assert recs[0] == recs[1]
    assert (tmp_path / "0.parquet").read_bytes() == (tmp_path / "1.parquet").read_bytes()
    back = pq.read_table(tmp_path / "1.parquet")
    assert back.equals(t)
    assert pq.ParquetFile(tmp_path / "1.parquet").metadata.num_row_groups == max(1, (n + row_group - 1) // row_group)


def test_parallel_writer_leaves_no_file_on_error(tmp_path):
    t = _table(300)
    with pytest.raises(RuntimeError):
        with ParallelRowGroupWriter(tmp_path / "x.parquet", t.schema, row_group=50) as w:
            w.write(t)
            raise RuntimeError("stop")
    assert not list(tmp_path.iterdir())


def test_thrift_walk_of_a_footer(tmp_path):
    """The compact-protocol walker reads a real footer to its end: FileMetaData's fields in order."""
    pq.write_table(_table(200), tmp_path / "f.parquet", compression="zstd", row_group_size=64)
    data = (tmp_path / "f.parquet").read_bytes()
    n = int.from_bytes(data[-8:-4], "little")
    footer = data[-8 - n : -8]
    fields, end = _fields(footer, 0)
    assert end == len(footer)
    assert [f[0] for f in fields][:4] == [1, 2, 3, 4]  # version, schema, num_rows, row_groups


def test_parallel_writer_with_masks_equals_the_filtered_rows(tmp_path):
    """write(table, mask): the rows kept, cut into row groups across pieces (a piece with no row kept,
    a row group ending inside a piece), the same bytes as RowGroupWriter of the filtered tables."""
    t = _table(2000, seed=3)
    rng = np.random.default_rng(4)
    keep = rng.random(2000) < 0.7
    keep[300:450] = False  # pieces with nothing kept
    cuts = [0, 7, 300, 320, 450, 1100, 1999, 2000]
    with RowGroupWriter(tmp_path / "a.parquet", t.schema, row_group=128) as w:
        for a, b in zip(cuts[:-1], cuts[1:]):
            w.write(t.slice(a, b - a).filter(pa.array(keep[a:b])))
    with ParallelRowGroupWriter(tmp_path / "b.parquet", t.schema, row_group=128, threads=2) as p:
        for a, b in zip(cuts[:-1], cuts[1:]):
            p.write(t.slice(a, b - a), keep[a:b])
    assert w.record == p.record
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert pq.read_table(tmp_path / "b.parquet").equals(t.filter(pa.array(keep)))
