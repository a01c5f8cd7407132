"""Loading rows in the normalized schema from a stage folder, a Parquet file or a JSONL file.

Used by every stage that can run alone on a user's files. Bad rows never crash the load and are
never dropped silently: each one comes back as a rejection with the line number, field and reason.

A user's file needs only the content columns (`instruction`, `response`); the others a stage asks for
get defaults when a row lacks them (absent, null or blank):
- `condition`: `RowDefaults.condition` (the spec's default condition under `hrm stage --spec`, else
  the first of `NormalizeConfig().conditions`);
- `source` and `domain`: the file's stem (`rows.jsonl` -> "rows");
- `id`: "<stem>/<row>", the row being the line number in JSONL (as `normalize` numbers JSONL rows)
  and the 0-based row index in Parquet, so the id is stable across reruns.
A file in which no row carries a content column is an error naming it. A UTF-8 byte-order mark at the
start of a JSONL file is dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import NormalizeConfig
from .schema import NORMALIZED_FIELDS

ROWS_FILE = "rows.parquet"
CONTENT_FIELDS = ("instruction", "response")  # nothing can stand in for these
FILLED_FIELDS = ("id", "condition", "source", "domain")  # defaulted when a row lacks them
BOM = b"\xef\xbb\xbf"
JSONL_SUFFIXES = (".jsonl.gz", ".jsonl", ".json")


@dataclass(frozen=True)
class RowDefaults:
    """Values for the columns a user's rows may leave out (see the module docstring)."""

    condition: str = field(default_factory=lambda: NormalizeConfig().conditions[0])


_DEFAULTS: ContextVar[RowDefaults | None] = ContextVar("row_defaults", default=None)


@contextlib.contextmanager
def row_defaults(defaults: RowDefaults) -> Iterator[RowDefaults]:
    """Use `defaults` in every `load_rows` call inside the block that is not given its own (this is
    how `hrm stage --spec` hands the spec's default condition to a stage)."""
    token = _DEFAULTS.set(defaults)
    try:
        yield defaults
    finally:
        _DEFAULTS.reset(token)


def file_stem(p: Path) -> str:
    """`rows.jsonl.gz` -> "rows": the default source, domain and id prefix of a file's rows."""
    for suf in (*JSONL_SUFFIXES, ".parquet"):
        if p.name.endswith(suf) and len(p.name) > len(suf):
            return p.name[: -len(suf)]
    return p.stem


@dataclass
class LoadedRows:
    table: pa.Table
    rejects: list[dict] = field(default_factory=list)  # REMOVAL_SCHEMA dicts (stage filled by caller)


def resolve_rows_path(path: str | os.PathLike) -> Path:
    """A stage folder means its rows.parquet; a file is taken as it is."""
    p = Path(path)
    if p.is_dir():
        f = p / ROWS_FILE
        if not f.exists():
            raise FileNotFoundError(f"{p}: not a stage output folder (no {ROWS_FILE} in it)")
        return f
    if not p.exists():
        raise FileNotFoundError(f"input not found: {p}")
    return p


def _reject(row_id: str, source: str, reason: str, detail: str, stage: str) -> dict:
    return {"id": row_id, "source": source, "stage": stage, "reason": reason, "detail": detail, "duplicate_of": None}


def load_rows(
    path: str | os.PathLike,
    required: tuple[str, ...] = NORMALIZED_FIELDS,
    stage: str = "load",
    defaults: RowDefaults | None = None,
) -> LoadedRows:
    """Load rows that must carry `required` string columns.

    `id`, `condition`, `source` and `domain` get defaults where missing (`defaults`, else those set by
    `row_defaults`, else `RowDefaults()`). JSONL: one object per line; malformed JSON, non-objects,
    missing/empty/non-string required fields and duplicate ids are rejected row by row. Parquet: a
    missing content column is an error for the whole file (named); null or empty values in required
    columns are rejected row by row. In both, a content column that no row has is an error.

    The whole table in memory: a stage that streams uses `RowReader` (the same rows, in batches).
    """
    reader = RowReader(path, required, stage, defaults)
    tables = list(reader)
    return LoadedRows(reader.assemble(tables), reader.rejects)


def _fill_values(p: Path, defaults: RowDefaults) -> dict[str, str]:
    stem = file_stem(p)
    return {"condition": defaults.condition, "source": stem, "domain": stem}


def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


# ------------------------------------------------------------------------------------------------
# streaming: RowReader
# ------------------------------------------------------------------------------------------------
JSONL_BLOCK_BYTES = 16 << 20  # default bytes of JSONL lines parsed at once
PARQUET_BATCH_ROWS = 65_536  # default rows per Parquet batch
_SOLID = np.ones(256, bool)  # bytes that make a line non-blank: all but bytes.strip()'s whitespace
_SOLID[[9, 10, 11, 12, 13, 32]] = False
NEWLINE_SLICE = 1 << 22  # bytes of a JSONL block searched for newlines at once


def _all_space(col):
    """Per string: empty or only whitespace (null for null) = utf8_trim_whitespace leaves "" (the same
    Unicode whitespace, checked over every code point), without copying the texts."""
    return pc.or_(pc.equal(pc.binary_length(col), 0), pc.utf8_is_space(col))  # no byte: no character


def _line_bounds(block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, lines) of a block's lines (bytes or a memoryview of them): byte offsets of every
    line (without its newline; no line after a final newline) and the indices of the non-blank ones (a
    byte that bytes.strip() keeps). Newlines found NEWLINE_SLICE bytes at a time (small temporaries);
    a line is non-blank at once when its first byte is, and only lines that start with whitespace are
    stripped to know."""
    arr = np.frombuffer(block, np.uint8)
    found = [np.flatnonzero(arr[s : s + NEWLINE_SLICE] == 10) + s for s in range(0, arr.size, NEWLINE_SLICE)]
    nla = np.concatenate(found) if found else np.zeros(0, np.int64)
    starts = np.concatenate([np.zeros(1, np.int64), nla + 1])
    ends = np.concatenate([nla, np.array([len(arr)], np.int64)])
    if starts[-1] == len(arr):  # the block ends with a newline: no line after it
        starts, ends = starts[:-1], ends[:-1]
    if not starts.size:
        return starts, ends, starts
    nonempty = ends > starts
    solid = np.zeros(starts.size, bool)
    solid[nonempty] = _SOLID[arr[starts[nonempty]]]
    for k in np.flatnonzero(nonempty & ~solid).tolist():  # starts with whitespace: look at the whole line
        solid[k] = bool(bytes(block[starts[k] : ends[k]]).strip())
    return starts, ends, np.flatnonzero(solid)


def count_lines(path: str | os.PathLike, block: int = 16 << 20) -> int:
    """The lines of a text file (a last line without a newline counted too), read a block at a time."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(block):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


class RowReader:
    """The rows of a stage folder, Parquet or JSONL file in batches (pa.Table each), with the same
    defaults, checks and rejections as `load_rows` (which is this reader's batches concatenated).

    JSONL is read in blocks of about `block_bytes` of whole lines, each parsed at once by Arrow's JSON
    reader; only a block that reader cannot take as it is (a malformed or non-object line, a value of
    the wrong type, a value Arrow would read as a timestamp, a key given twice) is parsed line by line
    in Python, so each bad line is still rejected alone with its line number. Parquet is read
    `batch_rows` rows at a time (row group by row group). Duplicate ids are found across the whole
    file through a 128-bit hash of each kept id (16 bytes per row held).

    `rejects` (REMOVAL_SCHEMA dicts) is complete once the batches are exhausted: for JSONL the lines
    that do not parse, then the rows that fail a check, each in line order (as `load_rows` always
    listed them). A content column that no row has raises ValueError at the end of the iteration.
    `rows_read` counts the kept rows so far; `total_rows` is the Parquet row count, and for JSONL the
    file's lines (counted on first use by a fast pass over the bytes: blank, malformed and rejected
    lines included, so a bar of the kept rows may stop short of it; None for gzip).
    `arrow=False` parses every JSONL line alone in Python (the reference the tests compare with);
    `json_threads=False` has Arrow parse each block on the calling thread (for a caller whose other
    processes keep every core busy; the tables are the same).
    `id_bytes` and `spill_dir` (both given): the JSONL id set holds `id_bytes` of ids in memory and
    spills the rest to sorted run files in a temporary folder of `spill_dir` (`_IdSet`; the same
    rejections), removed at the end of the iteration or by `close()`."""

    def __init__(
        self,
        path: str | os.PathLike,
        required: tuple[str, ...] = NORMALIZED_FIELDS,
        stage: str = "load",
        defaults: RowDefaults | None = None,
        *,
        batch_rows: int = PARQUET_BATCH_ROWS,
        block_bytes: int = JSONL_BLOCK_BYTES,
        arrow: bool = True,
        json_threads: bool = True,
        id_bytes: int | None = None,
        spill_dir: str | os.PathLike | None = None,
    ):
        self.path = p = resolve_rows_path(path)
        self.required, self.stage = tuple(required), stage
        self.defaults = defaults or _DEFAULTS.get() or RowDefaults()
        self.batch_rows, self.block_bytes = max(1, int(batch_rows)), max(1, int(block_bytes))
        self.arrow = arrow  # False: every JSONL line parsed alone in Python (the reference the tests use)
        self.json_threads = json_threads  # False: Arrow parses a block on the calling thread (the same table)
        if p.name.endswith(JSONL_SUFFIXES):
            self.kind = "jsonl"
        elif p.name.endswith(".parquet"):
            self.kind = "parquet"
        else:
            raise ValueError(f"{p}: unsupported input format (expected .jsonl or .parquet, or a stage folder)")
        self.stem, self.fill = file_stem(p), _fill_values(p, self.defaults)
        self.parse_rejects: list[dict] = []
        self.row_rejects: list[dict] = []
        self.rows_read = 0
        self._total_rows: int | None = None
        self._pf = None
        if self.kind == "parquet":
            self._pf = pq.ParquetFile(p, pre_buffer=False)  # pre-buffering reads ahead whole row groups
            self._total_rows = self._pf.metadata.num_rows
            self._check_parquet_schema(self._pf.schema_arrow)
        self._seen = _IdSet(id_bytes, spill_dir)  # (JSONL) past id_bytes of ids: spilled to spill_dir
        self._keys: set[str] = set()  # JSONL: every key of every parsed object
        self._parsed = 0  # JSONL: objects parsed
        self._first_cols: set[str] | None = None  # JSONL: the keys of the first kept row

    def close(self) -> None:
        """Drop the id set (and remove its spilled files) before the iteration's end."""
        self._seen.close()

    @property
    def total_rows(self) -> int | None:
        if self._total_rows is None and self.kind == "jsonl" and not self.path.name.endswith(".gz"):
            self._total_rows = count_lines(self.path)
        return self._total_rows

    @property
    def rejects(self) -> list[dict]:
        return self.parse_rejects + self.row_rejects

    def __iter__(self) -> Iterator[pa.Table]:
        if self.kind == "parquet":
            yield from self._iter_parquet()
            return
        for table in self._iter_jsonl():
            if table.num_rows:
                yield table
        self._seen.close()  # every id checked: its spilled files removed
        if self._parsed:
            absent = [c for c in self.required if c in CONTENT_FIELDS and c not in self._keys]
            if absent:
                raise ValueError(f"{self.path}: missing column(s) {absent} (no row has them); found {sorted(self._keys)}")

    @property
    def columns(self) -> list[str] | None:
        """JSONL: the columns of the rows, `required` then the other keys of the first kept row sorted
        (a key that only later rows have is not a column, as `load_rows` always did); None before a
        row is kept. Parquet: the file's columns (the filled ones added at the end)."""
        if self.kind == "parquet":
            names = self._pf.schema_arrow.names
            return names + [c for c in self.required if c not in names]
        if self._first_cols is None:
            return None
        return list(self.required) + sorted(self._first_cols - set(self.required))

    def assemble(self, tables: list[pa.Table]) -> pa.Table:
        """The batches as one table (JSONL: the columns of `columns`)."""
        if self.kind == "parquet":
            if not tables:
                return _fill_parquet(self._pf.schema_arrow.empty_table(), self.path, self.required, self.defaults)
            return pa.concat_tables(tables)
        if not tables:
            return pa.table({c: pa.array([], pa.string()) for c in self.required})
        return pa.concat_tables([self.conform(t) for t in tables], promote_options="permissive")

    def conform(self, table: pa.Table) -> pa.Table:
        """A JSONL batch with the columns of `columns` (a missing one all null), in that order."""
        if self.kind == "parquet":
            return table
        cols = self.columns or list(self.required)
        for c in cols:
            if c not in table.column_names:
                table = table.append_column(c, pa.nulls(table.num_rows))
        return table.select(cols)

    # ---------------------------------------------------------------------------------------------
    # Parquet
    # ---------------------------------------------------------------------------------------------
    def _check_parquet_schema(self, schema: pa.Schema) -> None:
        p, required = self.path, self.required
        missing = [c for c in required if c not in schema.names and c not in FILLED_FIELDS]
        if missing:
            raise ValueError(f"{p}: missing column(s) {missing}; found {schema.names}")
        for c in required:
            if c not in schema.names:
                continue
            t = schema.field(c).type
            if c in FILLED_FIELDS and pa.types.is_null(t):
                continue
            if not pa.types.is_string(t) and not pa.types.is_large_string(t):
                raise ValueError(f"{p}: column '{c}' must be a string column, got {t}")

    def _iter_parquet(self) -> Iterator[pa.Table]:
        start = 0
        p, required = self.path, self.required
        for batch in self._pf.iter_batches(batch_size=self.batch_rows, use_threads=False):
            table = pa.Table.from_batches([batch])
            table = _fill_parquet(table, p, required, self.defaults, start=start)
            start += table.num_rows
            bad = None
            for c in required:
                col = table[c]
                is_bad = pc.or_(pc.is_null(col), _all_space(col))
                is_bad = pc.fill_null(is_bad, True)
                bad = is_bad if bad is None else pc.or_(bad, is_bad)
            if bad is not None and pc.any(bad).as_py():
                for r in table.filter(bad).to_pylist():
                    which = [c for c in required if r.get(c) is None or not str(r.get(c)).strip()]
                    rid = r.get("id") or ""
                    self.row_rejects.append(
                        _reject(rid, r.get("source") or "", "empty_field", f"{p.name}: empty or null {which}", self.stage)
                    )
                table = table.filter(pc.invert(bad))
            self.rows_read += table.num_rows
            yield table

    # ---------------------------------------------------------------------------------------------
    # JSONL
    # ---------------------------------------------------------------------------------------------
    def _blocks(self) -> Iterator[memoryview]:
        """The file's whole lines, about block_bytes at a time, the BOM of line 1 dropped. Each block is
        a view of one buffer that every read reuses (no fresh pages to fault in per block, no copies
        to join a line cut by a read): valid until the next block is asked for."""
        import gzip

        opener = gzip.open if self.path.name.endswith(".gz") else open
        size = self.block_bytes  # bytes read at a time, after the head of a line carried over
        with opener(self.path, "rb") as f:
            buf = bytearray(size + min(size, 1 << 20))
            have, first = 0, True  # have: bytes at the start of buf carried over (the head of a line)
            while True:
                if have + size > len(buf):  # a long line carried over: a bigger buffer (a block may
                    buf = buf[:have] + bytearray(max(2 * len(buf), have + size) - have)  # still view the old)
                got = f.readinto(memoryview(buf)[have : have + size]) or 0
                end = have + got
                if first:
                    first = False
                    if buf[: min(end, len(BOM))] == BOM:
                        buf[: end - len(BOM)] = buf[len(BOM) : end]
                        end -= len(BOM)
                if not got:
                    if have:
                        yield memoryview(buf)[:have]
                    return
                cut = buf.rfind(b"\n", have, end)
                if cut < 0:
                    have = end
                    continue
                yield memoryview(buf)[: cut + 1]
                have = end - cut - 1
                buf[:have] = buf[cut + 1 : end]  # same size: allowed while a view of buf exists

    def _iter_jsonl(self) -> Iterator[pa.Table]:
        import pyarrow.json as pajson

        opts = pajson.ReadOptions(use_threads=self.json_threads, block_size=1 << 20)
        first_line = 1
        for block in self._blocks():
            starts, ends, lines = _line_bounds(block)
            linenos = first_line + lines
            first_line += starts.size  # every block but the last ends with a newline
            table = None
            try:
                if not self.arrow:
                    raise pa.ArrowInvalid("line by line")
                # Arrow's JSON reader does not check UTF-8: a block that is not is read line by line
                # (ASCII is; else Python's decoder: 25x faster here than an Arrow cast of the block)
                if len(block) and np.frombuffer(block, np.uint8).max() >= 0x80:
                    str(block, "utf-8")
                table = pajson.read_json(pa.BufferReader(pa.py_buffer(block)), read_options=opts)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError):
                pass
            if table is not None and (table.num_rows != lines.size or not self._arrow_ok(table)):
                table = None
            if table is None:
                yield self._python_block(bytes(block), starts, ends, lines, linenos)
            else:
                yield self._arrow_block(table, linenos)

    def _arrow_ok(self, table: pa.Table) -> bool:
        """Whether Arrow read the block as Python would: no timestamp (Arrow reads ISO dates in
        strings as timestamps), string or null required columns."""
        for f in table.schema:
            if _has_temporal(f.type):
                return False
        for c in self.required:
            if c in table.column_names and not (pa.types.is_string(table[c].type) or pa.types.is_null(table[c].type)):
                return False
        return True

    def _arrow_block(self, table: pa.Table, linenos: np.ndarray) -> pa.Table:
        name, stem, required = self.path.name, self.stem, self.required
        self._parsed += table.num_rows
        self._keys.update(table.column_names)
        n = table.num_rows
        for c in required:  # a key no row of the block has: all null
            if c not in table.column_names:
                table = table.append_column(c, pa.nulls(n, pa.string()))
            elif pa.types.is_null(table[c].type):
                table = table.set_column(table.column_names.index(c), c, table[c].cast(pa.string()))
        line_str = None  # the line numbers as strings, made only for a block that needs them

        def lines() -> pa.Array:
            nonlocal line_str
            if line_str is None:
                line_str = pa.array(linenos.astype(np.int64)).cast(pa.string())
            return line_str

        for c in required:
            if c not in FILLED_FIELDS:
                continue
            col = table[c]
            blank = pc.fill_null(_all_space(col), True)
            if not pc.any(blank).as_py():  # nothing to fill (the usual case): the column as it is
                continue
            if c == "id":
                default = pc.binary_join_element_wise(pa.scalar(f"{stem}/"), lines(), pa.scalar(""))
            else:
                default = pa.repeat(pa.scalar(self.fill[c], pa.string()), n)  # (np.full + pa.array: 12 ms)
            table = table.set_column(table.column_names.index(c), c, pc.if_else(blank, default, col))
        missing, empty = {}, {}  # per required column: (n,) bool
        for c in required:
            col = table[c]
            missing[c] = pc.is_null(col).to_numpy(zero_copy_only=False)
            empty[c] = pc.fill_null(_all_space(col), False).to_numpy(
                zero_copy_only=False
            )
        bad = np.zeros(n, bool)
        for c in required:
            bad |= missing[c] | empty[c]
        # the id a row is known by: its id when a non-empty string, else "<file>:<line>"
        has_id = None
        if "id" in table.column_names and pa.types.is_string(table["id"].type):
            has_id = pc.fill_null(pc.greater(pc.utf8_length(table["id"]), 0), False)
        if has_id is not None and pc.all(has_id).as_py():
            rid = table["id"]
        else:
            where = pc.binary_join_element_wise(pa.scalar(f"{name}:"), lines(), pa.scalar(""))
            rid = where if has_id is None else pc.if_else(has_id, table["id"], where)
        rid = rid.combine_chunks() if isinstance(rid, pa.ChunkedArray) else rid
        problems: dict[int, tuple[str, str]] = {}
        for i in np.flatnonzero(bad).tolist():
            for c in required:  # the first column with a problem, as the line-by-line check
                if missing[c][i]:
                    problems[i] = ("missing_field", f"field '{c}' is missing")
                    break
                if empty[c][i]:
                    problems[i] = ("empty_field", f"field '{c}' is empty")
                    break
        cand = np.flatnonzero(~bad)
        dup = self._seen.add_new(rid if cand.size == n else rid.take(pa.array(cand)))  # (len(cand),): seen before
        for i in cand[dup].tolist():
            problems[i] = ("duplicate_id", f"id '{rid[i].as_py()}' appears twice in {name}")
        if problems:
            src = table["source"] if "source" in table.column_names and pa.types.is_string(table["source"].type) else None
            for i in sorted(problems):
                reason, text = problems[i]
                s = src[i].as_py() if src is not None else ""
                self.row_rejects.append(
                    _reject(rid[i].as_py(), s or "", reason, f"{name}:{int(linenos[i])}: {text}", self.stage)
                )
            keep = np.ones(n, bool)
            keep[list(problems)] = False
            table = table.filter(pa.array(keep))
        if self._first_cols is None and table.num_rows:
            self._first_cols = {c for c in table.column_names if table[c][0].is_valid} | set(required)
        self.rows_read += table.num_rows
        return table

    def _python_block(self, block: bytes, starts, ends, lines, linenos) -> pa.Table:
        """A block Arrow could not take: line by line, as `load_rows` always did."""
        p, stem, fill, required, stage = self.path, self.stem, self.fill, self.required, self.stage
        filled = [c for c in required if c in FILLED_FIELDS]
        parsed: list[tuple[int, dict]] = []
        for k, lineno in zip(lines.tolist(), linenos.tolist()):
            raw = block[starts[k] : ends[k]]
            where = f"{p.name}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self.parse_rejects.append(_reject(f"{where}", "", "non_utf8", str(e), stage))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                self.parse_rejects.append(_reject(f"{where}", "", "bad_json", f"{e.msg} at column {e.colno}", stage))
                continue
            if not isinstance(obj, dict):
                self.parse_rejects.append(_reject(f"{where}", "", "not_an_object", type(obj).__name__, stage))
                continue
            parsed.append((lineno, obj))
            self._keys.update(obj)
        self._parsed += len(parsed)
        problems: dict[int, tuple[str, str, str, str]] = {}  # parsed row -> (rid, source, reason, detail)
        cand: list[int] = []
        cand_ids: list[str] = []
        for k, (lineno, obj) in enumerate(parsed):
            where = f"{p.name}:{lineno}"
            for c in filled:
                if _blank(obj.get(c)):
                    obj[c] = f"{stem}/{lineno}" if c == "id" else fill[c]
            rid = obj.get("id") if isinstance(obj.get("id"), str) and obj.get("id") else where
            src = obj.get("source") if isinstance(obj.get("source"), str) else ""
            problem = None
            for c in required:
                v = obj.get(c)
                if c not in obj or v is None:
                    problem = ("missing_field", f"field '{c}' is missing")
                elif not isinstance(v, str):
                    problem = ("wrong_type", f"field '{c}' must be a string, got {type(v).__name__}")
                elif not v.strip():
                    problem = ("empty_field", f"field '{c}' is empty")
                if problem:
                    break
            if problem:
                problems[k] = (rid, src, problem[0], f"{where}: {problem[1]}")
            else:
                cand.append(k)
                cand_ids.append(rid)
        dup = self._seen.add_new(pa.array(cand_ids, pa.string()))  # the duplicate check, in line order
        for k, rid in zip(np.asarray(cand)[dup].tolist(), np.asarray(cand_ids, object)[dup].tolist()):
            lineno, obj = parsed[k]
            src = obj.get("source") if isinstance(obj.get("source"), str) else ""
            problems[k] = (rid, src, "duplicate_id", f"{p.name}:{lineno}: id '{rid}' appears twice in {p.name}")
        for k in sorted(problems):
            self.row_rejects.append(_reject(*problems[k][:3], problems[k][3], stage))
        good = [obj for k, (_, obj) in enumerate(parsed) if k not in problems]
        if not good:
            return pa.table({c: pa.array([], pa.string()) for c in required})
        if self._first_cols is None:
            self._first_cols = set(good[0]) | set(required)
        table = pa.Table.from_struct_array(pa.array(good))  # every key of every row (from_pylist: the first's)
        self.rows_read += table.num_rows
        return table


def _has_temporal(t: pa.DataType) -> bool:
    if pa.types.is_temporal(t):
        return True
    if pa.types.is_struct(t):
        return any(_has_temporal(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _has_temporal(t.value_type)
    return False


ID_BLOCK = 256  # records (16 bytes each: h0, h1) of a spilled run read at once (4 KB); the fence holds every 256th h0
BLOOM_BITS = 12  # bits an id of a spilled run's Bloom filter (~1% of new ids read a block)
BLOOM_PROBES = 8  # bits set per key, all in one 64-bit word of the filter (one memory access a lookup)
_READ_BLOCKS = 256  # blocks of a spilled run read at most at once by a lookup (1 MB)
_SPILL_CHUNK = 1 << 16  # records of each spilled run read at a time when two are merged on disk
_MUL = np.uint64(0x9E3779B97F4A7C15)


SPILL_PREFIX = ".id-set-"  # the temporary folder of an id set's spilled runs, in the folder it is given


def remove_spills(folder: str | os.PathLike) -> None:
    """Remove the spill folders an id set left in FOLDER (a run killed before its end): a stage calls
    this on its output folder before it starts, so a rerun there never finishes with them in it."""
    import shutil

    p = Path(folder)
    if p.is_dir():
        for d in p.glob(SPILL_PREFIX + "*"):
            shutil.rmtree(d, ignore_errors=True)


class _SpilledRun:
    """A sorted run of (h0, h1) pairs on disk (little-endian uint64 pairs, sorted by h0), with what is
    held of it in memory: the h0 of every ID_BLOCK-th record (the fence: which block a key can be in)
    and a Bloom filter of its keys (BLOOM_BITS bits an id), so that a new id almost never reads it."""

    def __init__(self, path: Path, n: int, fence: np.ndarray, bloom: np.ndarray):
        import weakref

        self.path, self.n, self.fence, self.bloom = path, n, fence, bloom
        self.fd = os.open(path, os.O_RDONLY)
        self._close_fd = weakref.finalize(self, os.close, self.fd)  # also when freed without close()

    @staticmethod
    def bloom_words(n: int) -> int:
        return max(1, -(-n * BLOOM_BITS // 64))

    @staticmethod
    def bloom_keys(h0: np.ndarray, h1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(word hash, mask) of each key for every run's filter: the word from h1, the BLOOM_PROBES bits
        set within it from a mix of h0 (a blocked Bloom filter)."""
        b = h0 * _MUL
        mask = np.zeros(h0.shape[0], np.uint64)
        for j in range(BLOOM_PROBES):
            mask |= np.left_shift(np.uint64(1), (b >> np.uint64(6 * j + 16)) & np.uint64(63))
        return h1, mask

    @staticmethod
    def word_of(wh: np.ndarray, words: int) -> np.ndarray:
        """The filter word (< words) of each word hash: its high 32 bits times `words` (% past 2**32 words)."""
        if words < 2**32:
            return ((wh >> np.uint64(32)) * np.uint64(words) >> np.uint64(32)).astype(np.intp)
        return (wh % np.uint64(words)).astype(np.intp)

    @classmethod
    def add_to_bloom(cls, bloom: np.ndarray, h0: np.ndarray, h1: np.ndarray) -> None:
        wh, mask = cls.bloom_keys(h0, h1)
        np.bitwise_or.at(bloom, cls.word_of(wh, bloom.shape[0]), mask)

    def maybe(self, wh: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(n,) bool: False for a key (given by `bloom_keys`) surely not in the run."""
        return self.bloom[self.word_of(wh, self.bloom.shape[0])] & mask == mask

    def read(self, start: int, stop: int) -> np.ndarray:
        """Records [start, stop) as an (k, 2) uint64 array (one pread: no mapping of the file)."""
        start, stop = max(0, start), min(self.n, stop)
        if stop <= start:
            return np.zeros((0, 2), np.uint64)
        raw = os.pread(self.fd, (stop - start) * 16, start * 16)
        return np.frombuffer(raw, "<u8").astype(np.uint64, copy=False).reshape(-1, 2)

    def contains(self, h0: np.ndarray, h1: np.ndarray, wh: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(n,) bool: whether each key is in the run: the Bloom filter (`wh`, `mask`: `bloom_keys`), then
        the blocks a key can be in (read _READ_BLOCKS at most at a time, consecutive blocks in one read)."""
        found = np.zeros(h0.shape[0], bool)
        cand = np.flatnonzero(self.maybe(wh, mask))
        if not cand.size:
            return found
        cand = cand[np.argsort(h0[cand], kind="stable")]
        k0, k1 = h0[cand], h1[cand]
        # blocks first..last: from the one before the first fence >= the key (the key's range of equal
        # h0 can start there) to the last one whose first key is <= it (nearly always the same block)
        first = np.maximum(np.searchsorted(self.fence, k0, side="left") - 1, 0)
        last = np.maximum(np.searchsorted(self.fence, k0, side="right") - 1, 0)
        s = 0
        while s < cand.size:
            e = min(cand.size, s + _READ_BLOCKS)
            span = last[s:e] - first[s:e] + 1
            within = np.arange(int(span.sum())) - np.repeat(np.cumsum(span) - span, span)
            blocks = np.unique(np.repeat(first[s:e], span) + within)
            runs = np.split(blocks, np.flatnonzero(np.diff(blocks) != 1) + 1)  # consecutive blocks: one read
            recs = np.concatenate([self.read(int(r[0]) * ID_BLOCK, (int(r[-1]) + 1) * ID_BLOCK) for r in runs])
            q0, q1 = k0[s:e], k1[s:e]
            lo = np.searchsorted(recs[:, 0], q0, side="left")
            hi = np.searchsorted(recs[:, 0], q0, side="right")
            one = hi - lo == 1  # the common case: one record with the key's h0
            hit = np.zeros(e - s, bool)
            hit[one] = recs[lo[one], 1] == q1[one]
            for i in np.flatnonzero(hi - lo > 1).tolist():  # equal h0 (another id): compare h1 over the range
                hit[i] = bool((recs[lo[i] : hi[i], 1] == q1[i]).any())
            found[cand[s:e][hit]] = True
            s = e
        return found

    def close(self) -> None:
        self._close_fd()
        self.fd = -1
        self.path.unlink(missing_ok=True)


class _RunWriter:
    """Writes a sorted run of (h0, h1) pairs chunk by chunk, keeping its fence (every ID_BLOCK-th h0)
    and building its Bloom filter (sized for `n` keys, known up front)."""

    def __init__(self, path: Path, n: int):
        self.path, self.n, self.at = path, n, 0
        self.f = open(path, "wb")
        self.fence: list[np.ndarray] = []
        self.bloom = np.zeros(_SpilledRun.bloom_words(n), np.uint64)

    def write(self, h0: np.ndarray, h1: np.ndarray) -> None:
        k = h0.shape[0]
        if not k:
            return
        first = -self.at % ID_BLOCK  # the chunk's first record that starts a block
        self.fence.append(h0[first::ID_BLOCK].copy())
        _SpilledRun.add_to_bloom(self.bloom, h0, h1)
        rec = np.empty((k, 2), "<u8")
        rec[:, 0], rec[:, 1] = h0, h1
        rec.tofile(self.f)
        self.at += k

    def finish(self) -> _SpilledRun:
        self.f.close()
        assert self.at == self.n, (self.at, self.n)
        fence = np.concatenate(self.fence) if self.fence else np.zeros(0, np.uint64)
        return _SpilledRun(self.path, self.n, fence.astype(np.uint64), self.bloom)


class _IdSet:
    """The ids kept so far, as 128-bit hashes (two seeded 64-bit polars hashes), for exact repeat checks.

    In memory: runs sorted by the first hash, merged as they grow (each check a few binary searches,
    16 bytes an id held, about 37 at the largest merge). With a `spill_dir` (a folder of the stage's
    output) and `run_bytes`, once the runs in memory hold more than `run_bytes` they are merged into
    one and spilled to a file there (`_SpilledRun`: sorted (h0, h1) pairs; held in memory: a fence of
    every ID_BLOCK-th key and a Bloom filter of BLOOM_BITS bits an id), and spilled runs of about the
    same size are merged on disk as they grow (a few runs at any time). A lookup reads from disk only
    the blocks of keys the Bloom filter lets through (repeats and ~1% of new ids). So a set of N ids
    holds at most ~3x `run_bytes` plus ~1.5 bytes an id (the Bloom filters), whatever N. The answers
    are the same with or without spilling (the same keys, looked up exactly). Without a `spill_dir`
    everything stays in memory. `close()` removes the spilled files (also done when the set is freed).
    """

    def __init__(self, run_bytes: int | None = None, spill_dir: str | os.PathLike | None = None) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (h0 sorted, h1 in the same order)
        self.run_bytes = run_bytes
        self.spill_root = Path(spill_dir) if spill_dir is not None and run_bytes is not None else None
        self.spilled: list[_SpilledRun] = []
        self._dir: Path | None = None  # made at the first spill
        self._files = 0
        self._finalizer = None

    @property
    def held(self) -> int:
        """Ids held in the in-memory runs."""
        return sum(r[0].shape[0] for r in self.runs)

    def __len__(self) -> int:
        return self.held + sum(r.n for r in self.spilled)

    def add_new(self, ids: pa.Array) -> np.ndarray:
        """(n,) bool: True for an id seen before (earlier in `ids` or in an earlier call); the others
        are added."""
        import polars as pl

        if len(ids) == 0:
            return np.zeros(0, bool)
        s = pl.Series(ids)
        return self.add_new_hashes(s.hash(seed=11).to_numpy(), s.hash(seed=12).to_numpy())

    def contains_hashes(self, h0: np.ndarray, h1: np.ndarray) -> np.ndarray:
        """(n,) bool: whether each key (two 64-bit hashes, each (n,) uint64) is in the set."""
        found = np.zeros(h0.shape[0], bool)
        if h0.shape[0] == 0:
            return found
        if self.runs:
            # looked up in ascending order: numpy's binary search then starts each search where the
            # previous one ended (far fewer cache misses in a run of millions than random order)
            order = np.argsort(h0)
            q = h0[order]
            for r0, r1 in self.runs:
                pos = np.empty_like(order)
                pos[order] = np.searchsorted(r0, q)
                hit = np.flatnonzero(pos < r0.shape[0])
                hit = hit[r0[pos[hit]] == h0[hit]]
                for i in hit.tolist():  # an equal h0 (nearly always an equal key): compare h1 over the range
                    j = int(pos[i])
                    while j < r0.shape[0] and r0[j] == h0[i]:
                        if r1[j] == h1[i]:
                            found[i] = True
                            break
                        j += 1
        if self.spilled:
            wh, mask = _SpilledRun.bloom_keys(h0, h1)
            for run in self.spilled:
                rest = np.flatnonzero(~found)
                if not rest.size:
                    break
                found[rest[run.contains(h0[rest], h1[rest], wh[rest], mask[rest])]] = True
        return found

    def add_new_hashes(self, h0: np.ndarray, h1: np.ndarray) -> np.ndarray:
        """`add_new` of keys given by their two 64-bit hashes, each (n,) uint64."""
        import polars as pl

        n = h0.shape[0]
        if n == 0:
            return np.zeros(0, bool)
        dup = ~pl.DataFrame({"a": h0, "b": h1}).select(pl.struct("a", "b").is_first_distinct()).to_series().to_numpy()
        first = np.flatnonzero(~dup)
        dup[first[self.contains_hashes(h0[first], h1[first])]] = True
        keep = ~dup
        self.insert_hashes(h0[keep], h1[keep])
        return dup

    def insert_hashes(self, h0: np.ndarray, h1: np.ndarray) -> None:
        """Add keys the caller knows are new and distinct (no lookup)."""
        if h0.shape[0] == 0:
            return
        self._push(h0, h1, np.argsort(h0))
        while len(self.runs) > 1 and self.runs[-2][0].shape[0] <= 2 * self.runs[-1][0].shape[0]:
            (a0, a1), (b0, b1) = self.runs.pop(), self.runs.pop()
            self.runs.append(self._merge(b0, b1, a0, a1))
            del a0, a1, b0, b1
        if self.spill_root is not None and 16 * self.held > self.run_bytes:
            self._spill()

    @staticmethod
    def _merge(b0, b1, a0, a1) -> tuple[np.ndarray, np.ndarray]:
        """Two runs sorted by h0 merged (equal h0: b's first; the stable sort of b then a): each element
        placed at its rank (its index plus the other run's elements before it). Holds the two outputs
        and one run's ranks (was both runs concatenated, their argsort and the outputs: 56 bytes an id
        at the largest merge, now about 37)."""
        n = b0.shape[0] + a0.shape[0]
        m0, m1 = np.empty(n, b0.dtype), np.empty(n, b1.dtype)
        at = np.searchsorted(a0, b0, side="left")
        at += np.arange(b0.shape[0], dtype=at.dtype)
        m0[at], m1[at] = b0, b1
        del at
        at = np.searchsorted(b0, a0, side="right")
        at += np.arange(a0.shape[0], dtype=at.dtype)
        m0[at], m1[at] = a0, a1
        return m0, m1

    def _push(self, h0: np.ndarray, h1: np.ndarray, order: np.ndarray) -> None:
        """A run sorted by h0 alone (`order`): the lookup compares h1 over each range of equal h0."""
        self.runs.append((np.ascontiguousarray(h0[order]), np.ascontiguousarray(h1[order])))

    # ---------------------------------------------------------------------------------------------
    # spilling
    # ---------------------------------------------------------------------------------------------
    def _new_path(self) -> Path:
        if self._dir is None:
            import shutil
            import tempfile
            import weakref

            self.spill_root.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=self.spill_root))
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        self._files += 1
        return self._dir / f"run-{self._files:06d}.u64"

    def _spill(self) -> None:
        """The in-memory runs merged into one and written out; spilled runs of about the same size merged."""
        while len(self.runs) > 1:
            (a0, a1), (b0, b1) = self.runs.pop(), self.runs.pop()
            self.runs.append(self._merge(b0, b1, a0, a1))
            del a0, a1, b0, b1
        h0, h1 = self.runs.pop()
        w = _RunWriter(self._new_path(), h0.shape[0])
        for s in range(0, h0.shape[0], _SPILL_CHUNK):
            w.write(h0[s : s + _SPILL_CHUNK], h1[s : s + _SPILL_CHUNK])
        del h0, h1
        self.spilled.append(w.finish())
        while len(self.spilled) > 1 and self.spilled[-2].n <= 2 * self.spilled[-1].n:
            a, b = self.spilled.pop(), self.spilled.pop()
            self.spilled.append(self._merge_spilled(b, a))

    def _merge_spilled(self, b: _SpilledRun, a: _SpilledRun) -> _SpilledRun:
        """Two spilled runs merged on disk, _SPILL_CHUNK records of each read at a time (their Bloom
        filters dropped first: no lookup meanwhile, and the merged run's is built as it is written)."""
        a.bloom = b.bloom = None
        w = _RunWriter(self._new_path(), a.n + b.n)
        pa_, pb = 0, 0  # the run's record at the start of its buffer
        ra, rb = a.read(0, _SPILL_CHUNK), b.read(0, _SPILL_CHUNK)
        while ra.shape[0] and rb.shape[0]:
            bound = min(ra[-1, 0], rb[-1, 0])  # all up to it from both: the buffer with the smaller last is used up
            ka = int(np.searchsorted(ra[:, 0], bound, side="right"))
            kb = int(np.searchsorted(rb[:, 0], bound, side="right"))
            m0, m1 = self._merge(rb[:kb, 0], rb[:kb, 1], ra[:ka, 0], ra[:ka, 1])
            w.write(m0, m1)
            del m0, m1
            ra, pa_, rb, pb = ra[ka:], pa_ + ka, rb[kb:], pb + kb
            if not ra.shape[0]:
                ra = a.read(pa_, pa_ + _SPILL_CHUNK)
            if not rb.shape[0]:
                rb = b.read(pb, pb + _SPILL_CHUNK)
        for r, run, p in ((ra, a, pa_), (rb, b, pb)):
            while r.shape[0]:
                w.write(np.ascontiguousarray(r[:, 0]), np.ascontiguousarray(r[:, 1]))
                p += r.shape[0]
                r = run.read(p, p + _SPILL_CHUNK)
        a.close()
        b.close()
        return w.finish()

    def close(self) -> None:
        """Drop every id and remove the spilled files."""
        self.runs = []
        for r in self.spilled:
            r.close()
        self.spilled = []
        if self._finalizer is not None:
            self._finalizer()
            self._dir = None


def _fill_parquet(table: pa.Table, p: Path, required: tuple[str, ...], defaults: RowDefaults, start: int = 0) -> pa.Table:
    """Add the missing FILLED_FIELDS columns of a Parquet table (rows from `start` of the file) and fill
    their null/blank values."""
    stem, fill, n = file_stem(p), _fill_values(p, defaults), table.num_rows
    for c in required:
        if c not in FILLED_FIELDS:
            continue
        default = pa.array([f"{stem}/{i}" for i in range(start, start + n)] if c == "id" else [fill[c]] * n, pa.string())
        if c not in table.column_names:
            table = table.append_column(c, default)
            continue
        col = table[c]
        if pa.types.is_null(col.type):
            col = col.cast(pa.string())
        elif not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            continue  # reported as a wrong column type below
        blank = pc.fill_null(_all_space(col), True)
        table = table.set_column(table.column_names.index(c), c, pc.if_else(blank, default, col))
    return table
