"""Parquet row groups encoded in parallel threads, written as the one file a single writer makes.

pyarrow's ParquetWriter encodes (and zstd-compresses) one row group at a time on the calling thread.
A row group's column chunks do not depend on where in the file they land nor on the other row groups
(each gets fresh column writers, dictionaries and compression frames), and only the footer (the
Thrift FileMetaData) holds absolute file offsets. So `ParallelRowGroupWriter` encodes each row group
as a small Parquet file of its own in a thread (Arrow releases the GIL), appends its column-chunk
bytes to the output in order, and at the end writes one footer: the first row group's footer with
every row group's metadata, their offsets shifted to where their bytes landed, their ordinals set,
and the total row count. The result is byte-identical to `RowGroupWriter` (tests compare them).

The footer is rewritten on its Thrift compact-protocol bytes: every value is copied as it is, except
the few integer fields changed, so what Arrow wrote (field order, encodings) is kept. Files with a page
index or Bloom filters (which a single writer puts between the row groups and the footer) are refused;
the writers here write neither.
"""

from __future__ import annotations

import collections
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .io import ROW_GROUP, RowGroupWriter, file_record

MAGIC = b"PAR1"
_STRUCT, _LIST, _SET, _MAP = 12, 9, 10, 11


# ------------------------------------------------------------------------------------------------
# Thrift compact protocol: just enough to walk a struct and re-encode integer fields
# ------------------------------------------------------------------------------------------------
def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        c = b[i]
        i += 1
        x |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return x, i


def _varint(x: int) -> bytes:
    out = bytearray()
    while x >= 0x80:
        out.append((x & 0x7F) | 0x80)
        x >>= 7
    out.append(x)
    return bytes(out)


def _zigzag(x: int) -> bytes:
    return _varint((x << 1) ^ (x >> 63))


def _unzigzag(x: int) -> int:
    return (x >> 1) ^ -(x & 1)


def _skip(b: bytes, i: int, t: int, in_collection: bool = False) -> int:
    """The position after a value of compact type `t` at i."""
    if t in (1, 2):  # a bool: in the field header, or one byte in a collection
        return i + 1 if in_collection else i
    if t == 3:
        return i + 1
    if t in (4, 5, 6):
        return _read_varint(b, i)[1]
    if t == 7:
        return i + 8
    if t == 8:
        n, i = _read_varint(b, i)
        return i + n
    if t in (_LIST, _SET):
        h = b[i]
        i += 1
        n, et = h >> 4, h & 0x0F
        if n == 15:
            n, i = _read_varint(b, i)
        for _ in range(n):
            i = _skip(b, i, et, True)
        return i
    if t == _MAP:
        n, i = _read_varint(b, i)
        if n:
            kt, vt = b[i] >> 4, b[i] & 0x0F
            i += 1
            for _ in range(n):
                i = _skip(b, _skip(b, i, kt, True), vt, True)
        return i
    if t == _STRUCT:
        return _fields(b, i)[1]
    raise ValueError(f"parquet footer: unknown Thrift compact type {t}")


def _fields(b: bytes, i: int) -> tuple[list[tuple[int, int, int, int, int]], int]:
    """The fields of the struct at i: [(id, type, header start, value start, value end)], and the
    position after its stop byte."""
    out, last = [], 0
    while True:
        hs = b[i]
        start = i
        i += 1
        if hs == 0:
            return out, i
        t, delta = hs & 0x0F, hs >> 4
        if delta:
            fid = last + delta
        else:
            v, i = _read_varint(b, i)
            fid = _unzigzag(v)
        last = fid
        vs = i
        i = _skip(b, i, t)
        out.append((fid, t, start, vs, i))


def _patch(b: bytes, i: int, fix: dict) -> tuple[bytes, int]:
    """The struct at i re-encoded with fix[id](value bytes) -> new value bytes for the fields named
    (every other byte copied); returns (bytes, position after the struct)."""
    fields, end = _fields(b, i)
    out, at = bytearray(), i
    for fid, _t, _hs, vs, ve in fields:
        if fid in fix:
            out += b[at:vs]
            out += fix[fid](b, vs, ve)
            at = ve
    out += b[at:end]
    return bytes(out), end


def _int_field(fn):
    """A fix for an integer field: new value = fn(old value)."""
    return lambda b, vs, ve: _zigzag(fn(_unzigzag(_read_varint(b, vs)[0])))


def _refuse(what: str):
    def fix(b, vs, ve):
        raise ValueError(f"parallel Parquet writer: the row group has {what}")
    return fix


def _list_items(b: bytes, vs: int) -> tuple[list[tuple[int, int]], int]:
    """The (start, end) of each struct of the list<struct> value at vs, and the list's end."""
    h = b[vs]
    i = vs + 1
    n, et = h >> 4, h & 0x0F
    if n == 15:
        n, i = _read_varint(b, i)
    assert et == _STRUCT, "a list of structs"
    items = []
    for _ in range(n):
        j = _skip(b, i, _STRUCT)
        items.append((i, j))
        i = j
    return items, i


def _list_header(n: int, et: int) -> bytes:
    return bytes([(n << 4) | et]) if n < 15 else bytes([0xF0 | et]) + _varint(n)


def _row_group(footer: bytes, delta: int, ordinal: int) -> tuple[bytes, int]:
    """The one RowGroup of a single-row-group footer, its offsets moved by `delta` and its ordinal
    set; and its row count."""
    fields, _ = _fields(footer, 0)
    f = {fid: (vs, ve) for fid, _t, _hs, vs, ve in fields}
    items, _ = _list_items(footer, f[4][0])
    assert len(items) == 1, "one row group per encoded piece"
    shift = _int_field(lambda x: x + delta if x else 0)  # an offset (Arrow writes ColumnChunk.file_offset 0)
    meta = {9: shift, 10: shift, 11: shift, 14: _refuse("a Bloom filter")}  # ColumnMetaData offsets

    def column(b, vs, ve):  # ColumnChunk: file_offset, meta_data; a page index is refused
        return _patch(b, vs, {2: shift, 3: lambda b2, s2, e2: _patch(b2, s2, meta)[0],
                              4: _refuse("an offset index"), 6: _refuse("a column index")})[0]

    def columns(b, vs, ve):
        its, end = _list_items(b, vs)
        assert end == ve
        return b[vs : its[0][0] if its else ve] + b"".join(column(b, s, e) for s, e in its)

    rg, _ = _patch(footer, items[0][0], {1: columns, 5: shift, 7: _int_field(lambda x: ordinal)})
    rows = _unzigzag(_read_varint(footer, f[3][0])[0])
    return rg, rows


def merged_footer(footers: list[bytes], deltas: list[int]) -> bytes:
    """One FileMetaData from single-row-group footers whose column chunks were placed `deltas` bytes
    further into the file than in their own files: the first footer with all the row groups."""
    groups, total = [], 0
    for k, (foot, delta) in enumerate(zip(footers, deltas)):
        rg, rows = _row_group(foot, delta, k)
        groups.append(rg)
        total += rows
    first = footers[0]
    list_value = _list_header(len(groups), _STRUCT) + b"".join(groups)
    out, _ = _patch(first, 0, {3: _int_field(lambda x: total), 4: lambda b, vs, ve: list_value})
    return out


# ------------------------------------------------------------------------------------------------
# the writer
# ------------------------------------------------------------------------------------------------
def _kept_slices(table: pa.Table, mask: np.ndarray | None) -> list[pa.Table]:
    """Zero-copy slices of `table`, one per run of consecutive rows where `mask` (None: all rows)."""
    if mask is None:
        return [table]
    edge = np.diff(mask.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edge == 1).tolist(), np.flatnonzero(edge == -1).tolist()
    return [table.slice(a, b - a) for a, b in zip(starts, ends)]


def _encode(pieces: list[tuple[pa.Table, np.ndarray | None]], schema: pa.Schema, row_group: int) -> tuple[bytes, bytes]:
    """(column-chunk bytes, footer) of the rows of `pieces` (each a table and the mask of its rows to
    keep, None: all) written alone, as RowGroupWriter writes a row group: one contiguous chunk. The
    column-chunk bytes are a view of the stream's buffer (which grows by doubling: up to twice their
    size), held until they are written.
    `pieces` is emptied (the executor holds the list until the call returns: the pieces are freed
    once the row group is assembled)."""
    mine = list(pieces)
    pieces.clear()
    # one copy of the rows kept: zero-copy slices of each piece's runs of kept rows, combined at once
    # (a filter per piece and then the combine copied them twice)
    head = pa.concat_tables([s for t, m in mine for s in _kept_slices(t, m)]).combine_chunks()
    del mine
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, schema, compression="zstd") as w:
        w.write_table(head, row_group_size=row_group)
    del head
    buf = sink.getvalue()
    data = memoryview(buf)
    n = int.from_bytes(data[-8:-4], "little")
    assert bytes(data[:4]) == MAGIC and bytes(data[-4:]) == MAGIC, "a Parquet file"
    footer = bytes(data[len(data) - 8 - n : len(data) - 8])
    del data
    return buf.slice(4, buf.size - 12 - n), footer  # the chunks: a view of the buffer, not a copy


class ParallelRowGroupWriter(RowGroupWriter):
    """`RowGroupWriter` (same bytes) whose row groups are built and encoded `threads` at a time, in
    threads of its own: `write` returns while they encode (it waits only when `threads` are pending).
    `write(table, mask)` writes the rows of `table` where `mask` is true: they are picked in those
    threads too, as the row group is assembled (its one copy of the rows). Holds the tables written
    until their rows are encoded, and up to `threads` row groups being encoded. Needs the schema up
    front."""

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, row_group: int = ROW_GROUP, threads: int = 2):
        if schema is None:
            raise ValueError("ParallelRowGroupWriter needs the schema")
        super().__init__(path, schema, row_group)
        self.threads = max(1, int(threads))
        self.pieces: collections.deque = collections.deque()  # (table, mask or None, rows kept)
        self.pending: collections.deque = collections.deque()
        self.footers: list[bytes] = []
        self.deltas: list[int] = []
        self.pool: ThreadPoolExecutor | None = None
        self.sink = None
        self.at = 0  # bytes of column chunks written
        self.sha = hashlib.sha256()
        self.size = 0

    def new_chunk(self) -> None:
        raise NotImplementedError("ParallelRowGroupWriter: chunk breaks are not supported")

    def write(self, table: pa.Table, mask: np.ndarray | None = None) -> None:
        kept = table.num_rows if mask is None else int(np.count_nonzero(mask))
        if mask is not None and len(mask) != table.num_rows:
            raise ValueError(f"a mask of {len(mask)} rows for {table.num_rows} rows")
        if kept == 0:
            return
        self.pieces.append((table, None if mask is None else np.asarray(mask, bool), kept))
        self.buffered += kept
        while self.buffered >= self.row_group:
            self._cut(self.row_group)

    def _cut(self, k: int) -> None:
        """The next k rows kept (from the pieces written) become a row group."""
        spec, need = [], k
        while need:
            t, m, c = self.pieces[0]
            if c <= need:
                spec.append((t, m))
                self.pieces.popleft()
                need -= c
                continue
            at = need if m is None else int(np.flatnonzero(m)[need - 1]) + 1  # rows of t up to the need-th kept
            spec.append((t.slice(0, at), None if m is None else m[:at]))
            self.pieces[0] = (t.slice(at), None if m is None else m[at:], c - need)
            need = 0
        self.buffered -= k
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="parquet-encode")
            self.sink = open(self.tmp, "wb")
            self._put(MAGIC)
        while len(self.pending) >= self.threads:  # at most `threads` row groups encoding or encoded
            self._drain_one()
        self.pending.append(self.pool.submit(_encode, spec, self.schema, self.row_group))
        self.rows += k

    def _put(self, data: bytes | pa.Buffer) -> None:
        """Write to the file, hashing as it goes (the record's sha256 without reading the file again)."""
        self.sink.write(data)
        self.sha.update(data)
        self.size += len(data)

    def _drain_one(self) -> None:
        chunks, footer = self.pending.popleft().result()
        self._put(chunks)
        self.footers.append(footer)
        self.deltas.append(self.at)
        self.at += len(chunks)

    def __exit__(self, et, ev, tb) -> None:
        try:
            try:
                if et is None:
                    if self.buffered:
                        self._cut(self.buffered)
                    if self.pool is None:  # no row at all: as write_parquet of an empty table
                        pq.write_table(self.schema.empty_table(), self.tmp, compression="zstd",
                                       row_group_size=self.row_group)
                    else:
                        while self.pending:
                            self._drain_one()
                        footer = merged_footer(self.footers, self.deltas)
                        self._put(footer + len(footer).to_bytes(4, "little") + MAGIC)
            finally:
                self.pieces.clear()
                if self.pool is not None:
                    self.pool.shutdown(wait=True, cancel_futures=True)
                if self.sink is not None:
                    self.sink.close()
        finally:
            self._ctx.__exit__(et, ev, tb)
        if et is None:
            if self.pool is None:
                self.record = file_record(self.path, rows=self.rows)
            else:  # as file_record
                self.record = {"sha256": self.sha.hexdigest(), "bytes": self.size, "rows": int(self.rows)}
