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
    """
    p = resolve_rows_path(path)
    defaults = defaults or _DEFAULTS.get() or RowDefaults()
    name = p.name
    if name.endswith(JSONL_SUFFIXES):
        return _load_jsonl(p, required, stage, defaults)
    if name.endswith(".parquet"):
        return _load_parquet(p, required, stage, defaults)
    raise ValueError(f"{p}: unsupported input format (expected .jsonl or .parquet, or a stage folder)")


def _fill_values(p: Path, defaults: RowDefaults) -> dict[str, str]:
    stem = file_stem(p)
    return {"condition": defaults.condition, "source": stem, "domain": stem}


def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _load_jsonl(p: Path, required: tuple[str, ...], stage: str, defaults: RowDefaults) -> LoadedRows:
    import gzip

    opener = gzip.open if p.name.endswith(".gz") else open
    stem, fill = file_stem(p), _fill_values(p, defaults)
    filled = [c for c in required if c in FILLED_FIELDS]
    parsed: list[tuple[int, dict]] = []
    rejects: list[dict] = []
    with opener(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            where = f"{p.name}:{lineno}"
            if not raw.strip():
                continue  # blank lines are not rows
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rejects.append(_reject(f"{where}", "", "non_utf8", str(e), stage))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                rejects.append(_reject(f"{where}", "", "bad_json", f"{e.msg} at column {e.colno}", stage))
                continue
            if not isinstance(obj, dict):
                rejects.append(_reject(f"{where}", "", "not_an_object", type(obj).__name__, stage))
                continue
            parsed.append((lineno, obj))
    if parsed:
        absent = [c for c in required if c in CONTENT_FIELDS and not any(c in obj for _, obj in parsed)]
        if absent:
            found = sorted({k for _, obj in parsed for k in obj})
            raise ValueError(f"{p}: missing column(s) {absent} (no row has them); found {found}")
    good: list[dict] = []
    seen: set[str] = set()
    extra_cols: set[str] = set()
    for lineno, obj in parsed:
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
        if problem is None and rid in seen:
            problem = ("duplicate_id", f"id '{rid}' appears twice in {p.name}")
        if problem:
            rejects.append(_reject(rid, src, problem[0], f"{where}: {problem[1]}", stage))
            continue
        seen.add(rid)
        good.append(obj)
        extra_cols.update(obj.keys())
    cols = list(required) + sorted(extra_cols - set(required))
    table = pa.Table.from_pylist(good, schema=None) if good else None
    if table is None:
        table = pa.table({c: pa.array([], pa.string()) for c in required})
    else:
        table = table.select([c for c in cols if c in table.column_names])
    return LoadedRows(table, rejects)


def _fill_parquet(table: pa.Table, p: Path, required: tuple[str, ...], defaults: RowDefaults) -> pa.Table:
    """Add the missing FILLED_FIELDS columns of a Parquet table and fill their null/blank values."""
    stem, fill, n = file_stem(p), _fill_values(p, defaults), table.num_rows
    for c in required:
        if c not in FILLED_FIELDS:
            continue
        default = pa.array([f"{stem}/{i}" for i in range(n)] if c == "id" else [fill[c]] * n, pa.string())
        if c not in table.column_names:
            table = table.append_column(c, default)
            continue
        col = table[c]
        if pa.types.is_null(col.type):
            col = col.cast(pa.string())
        elif not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            continue  # reported as a wrong column type below
        blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0), True)
        table = table.set_column(table.column_names.index(c), c, pc.if_else(blank, default, col))
    return table


def _load_parquet(p: Path, required: tuple[str, ...], stage: str, defaults: RowDefaults) -> LoadedRows:
    table = pq.read_table(p)
    missing = [c for c in required if c not in table.column_names and c not in FILLED_FIELDS]
    if missing:
        raise ValueError(f"{p}: missing column(s) {missing}; found {table.column_names}")
    table = _fill_parquet(table, p, required, defaults)
    for c in required:
        if not pa.types.is_string(table.schema.field(c).type) and not pa.types.is_large_string(
            table.schema.field(c).type
        ):
            raise ValueError(f"{p}: column '{c}' must be a string column, got {table.schema.field(c).type}")
    bad = None
    for c in required:
        col = table[c]
        is_bad = pc.or_(pc.is_null(col), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0))
        is_bad = pc.fill_null(is_bad, True)
        bad = is_bad if bad is None else pc.or_(bad, is_bad)
    rejects: list[dict] = []
    if bad is not None and pc.any(bad).as_py():
        bad_rows = table.filter(bad).to_pylist()
        for r in bad_rows:
            which = [c for c in required if r.get(c) is None or not str(r.get(c)).strip()]
            rid = r.get("id") or ""
            rejects.append(
                _reject(rid, r.get("source") or "", "empty_field", f"{p.name}: empty or null {which}", stage)
            )
        table = table.filter(pc.invert(bad))
    return LoadedRows(table, rejects)
