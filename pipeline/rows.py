"""Loading rows in the normalized schema from a stage folder, a Parquet file or a JSONL file.

Used by every stage that can run alone on a user's files. Bad rows never crash the load and are
never dropped silently: each one comes back as a rejection with the line number, field and reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .schema import NORMALIZED_FIELDS

ROWS_FILE = "rows.parquet"


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
) -> LoadedRows:
    """Load rows that must carry `required` string columns.

    JSONL: one object per line; malformed JSON, non-objects, missing/empty/non-string required fields
    and duplicate ids are rejected row by row. Parquet: a missing column is an error for the whole file
    (named); null or empty values in required columns are rejected row by row.
    """
    p = resolve_rows_path(path)
    name = p.name
    if name.endswith(".jsonl") or name.endswith(".json") or name.endswith(".jsonl.gz"):
        return _load_jsonl(p, required, stage)
    if name.endswith(".parquet"):
        return _load_parquet(p, required, stage)
    raise ValueError(f"{p}: unsupported input format (expected .jsonl or .parquet, or a stage folder)")


def _load_jsonl(p: Path, required: tuple[str, ...], stage: str) -> LoadedRows:
    import gzip

    opener = gzip.open if p.name.endswith(".gz") else open
    good: list[dict] = []
    rejects: list[dict] = []
    seen: set[str] = set()
    extra_cols: set[str] = set()
    with opener(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
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


def _load_parquet(p: Path, required: tuple[str, ...], stage: str) -> LoadedRows:
    table = pq.read_table(p)
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"{p}: missing column(s) {missing}; found {table.column_names}")
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
