"""Stage 2, normalize: map every source's fields to one schema, rejecting malformed rows with a reason.

Output schema (`pipeline.schema.NORMALIZED_FULL_SCHEMA`): id, instruction, response, condition,
source, domain, origin.
- `id` is stable: "<source>/<source row id>" where the row id is the source's own id field when the
  spec names one (`fields.id`), else the row index (JSONL: the line number; several files: "file:index").
- `origin` is "<source>/<subset>": the subset field's value (`fields.subset`, e.g. a FLAN task), else
  the file name (local sources), else the split (Hub), else "all". `stratify` matches rules on it.
- Per-row `condition` / `domain` / `subset` fields fall back to the source's defaults where a row lacks
  them; a per-row `id` field is required (a row without one is rejected).
- `condition` is a tag list ("cot", "synth,cot"): every tag must be in `normalize.conditions`; it is
  stored without spaces around the tags, in the given order (pipeline.schema.check_condition).
- `instruction` / `response` come from a field (must hold a string: a number is rejected as
  `wrong_type`; use a template such as "{answer}" to format non-strings), or from a template with
  `{field}` placeholders (any value but null is formatted).

Direct answers (a source's `emit`, as data_io's cot/direct pairs): "cot" keeps the row as given; "direct"
replaces its response with the final answer found in it (same id); "both" keeps the row and adds a copy
with the final answer, id "<id>#direct". The answer is the text after the last "####" (GSM8K), or the
content of the last \\boxed{...} / \\fbox{...} (MATH: nested braces, escaped \\{ \\} skipped, and the
brace-less "\\boxed 5" up to "$" or the line's end) - `answer_format` picks one, "auto" takes "####" when
present. A direct row's condition swaps the tag "cot" for "direct" ("synth,cot" -> "synth,direct"), or
adds "direct". A row (emit direct) or copy (emit both) whose answer is not found is rejected as
`no_final_answer` (the copy under its own "<id>#direct" id), so per source rows_in + direct_copies =
kept + rejected.

Rejections (`rejects.parquet`, `pipeline.schema.REMOVAL_SCHEMA`, stage "normalize"), one reason each:
`bad_json`, `not_an_object`, `non_utf8`, `missing_field`, `wrong_type`, `empty_field`, `too_long`,
`unknown_condition` (a tag not in `normalize.conditions`, or a malformed tag list), `duplicate_id`,
`no_final_answer` (direct rows, above), and `excluded_by_spec` for rows a source's `exclude` filter
removes. Every row in (and every direct copy) is kept or rejected: rows_in + direct_copies = kept +
rejected, per source.
A field missing from a whole Parquet/Hub source is a spec error, raised before any row is processed.

Empty sources: the manifest's `warnings` lists the ingest warnings (empty sources and empty files,
from the ingest folder's manifest) and every source with 0 rows in; each is printed to stderr. When
every source is empty the stage fails (`EmptySourcesError`, naming them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import string
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from ..config import NormalizeConfig, SourceSpec
from .. import budget
from ..io import MANIFEST, RowGroupWriter, open_stage, code_closure, finish_stage, fingerprint, read_json
from ..parts import MapParts
from ..rows import ROWS_FILE, _IdSet, remove_spills
from ..schema import CONDITION_SEP, NORMALIZED_FULL_SCHEMA, REMOVAL_SCHEMA, check_condition, parse_condition
from .ingest import EmptySourcesError

STAGE = "normalize"
REJECTS_FILE = "rejects.parquet"
DIRECT_SUFFIX = "#direct"  # id of a row's direct copy: "<id>#direct"
NO_ANSWER = "no_final_answer"


class NormalizeSpecError(ValueError):
    pass


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------------
# final answers (direct rows)
# ----------------------------------------------------------------------------------------------
def extract_hash_answer(text: str) -> tuple[str | None, str]:
    """The text after the last "####" (GSM8K's answer line), stripped; (None, why) when there is none."""
    i = text.rfind("####")
    if i < 0:
        return None, "no '####' answer marker in the response"
    ans = text[i + 4:].strip()
    return (ans, "") if ans else (None, "nothing after the last '####'")


def extract_boxed_answer(text: str) -> tuple[str | None, str]:
    """The content of the last \\boxed{...} or \\fbox{...} (nested braces; backslash-escaped braces are
    text), or of a brace-less "\\boxed 5" up to "$" or the end of the line; (None, why) otherwise."""
    starts = [(text.rfind(cmd), cmd) for cmd in ("\\boxed", "\\fbox")]
    at, cmd = max(starts)
    if at < 0:
        return None, "no \\boxed{...} in the response"
    j = at + len(cmd)
    if j < len(text) and text[j] == "{":
        depth, k = 0, j
        while k < len(text):
            c = text[k]
            if c == "\\":
                k += 2  # an escaped character (\\{, \\}) is text
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    ans = text[j + 1:k].strip()
                    return (ans, "") if ans else (None, f"empty {cmd}{{}}")
            k += 1
        return None, f"unbalanced braces after the last {cmd}"
    if j < len(text) and text[j] in " \t":
        ans = re.split(r"[$\n]", text[j:], maxsplit=1)[0].strip()
        return (ans, "") if ans else (None, f"nothing after the last '{cmd} '")
    return None, f"the last {cmd} is followed by neither '{{' nor a space"


def extract_answer(text: str, fmt: str) -> tuple[str | None, str]:
    """(final answer, "") or (None, why) for answer_format FMT: hash, boxed, or auto (hash when the text
    has "####", else boxed)."""
    if fmt == "hash" or (fmt == "auto" and "####" in text):
        return extract_hash_answer(text)
    if fmt in ("boxed", "auto"):
        return extract_boxed_answer(text)
    raise ValueError(f"unknown answer_format {fmt!r}")


def direct_condition(condition: str) -> str:
    """The condition of a row's direct version: the tag "cot" becomes "direct" (other tags and their
    order kept), else "direct" is added at the end unless present: "synth,cot" -> "synth,direct"."""
    tags = list(parse_condition(condition))
    if "cot" in tags:
        tags[tags.index("cot")] = "direct"
    if "direct" not in tags:
        tags.append("direct")
    return CONDITION_SEP.join(dict.fromkeys(tags))


def is_template(s: str) -> bool:
    return "{" in s


def template_fields(tpl: str, where: str) -> list[str]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(tpl) if f is not None]
    except ValueError as e:
        raise NormalizeSpecError(f"{where}: bad template {tpl!r}: {e}") from None
    roots = []
    for n in names:
        root = re.split(r"[.\[]", n, maxsplit=1)[0]
        if not root or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", root):
            raise NormalizeSpecError(f"{where}: template {tpl!r} has an unsupported placeholder {{{n}}} "
                                     "(use field names, optionally indexed: {messages[1][content]})")
        roots.append(root)
    return roots


class _Mapper:
    """Compiled field mapping of one source."""

    def __init__(self, src: SourceSpec, cfg: NormalizeConfig, columns: list[str] | None, many_files: bool):
        self.src, self.cfg, self.many_files = src, cfg, many_files
        f = src.fields
        self.needed: list[str] = []
        self.parts = {}
        for key in ("instruction", "response"):
            spec = getattr(f, key)
            if is_template(spec):
                names = template_fields(spec, f"source '{src.name}': fields.{key}")
                self.parts[key] = ("template", spec, names)
                self.needed += names
            else:
                self.parts[key] = ("field", spec, [spec])
                self.needed.append(spec)
        for key in ("id", "condition", "domain", "subset"):
            v = getattr(f, key)
            if v:
                self.needed.append(v)
        self.needed += list(src.exclude)
        if columns is not None:  # Parquet / Hub / generator: the columns are known up front
            missing = sorted({c for c in self.needed if c not in columns})
            if missing:
                raise NormalizeSpecError(
                    f"source '{src.name}': field(s) {missing} named in the spec's 'fields' are not columns of "
                    f"the source; its columns are {sorted(c for c in columns if not c.startswith('_'))}"
                )

    def _text(self, key: str, row: dict) -> str:
        kind, spec, names = self.parts[key]
        if kind == "field":
            if spec not in row or row[spec] is None:
                raise _Bad("missing_field", f"field '{spec}' ({key}) is missing")
            v = row[spec]
            if not isinstance(v, str):
                raise _Bad("wrong_type", f"field '{spec}' ({key}) must be a string, got {type(v).__name__}")
        else:
            vals = {}
            for n in names:
                if n not in row or row[n] is None:
                    raise _Bad("missing_field", f"field '{n}' (in the {key} template) is missing")
                vals[n] = row[n]
            try:
                v = spec.format(**vals)
            except (IndexError, KeyError, TypeError, AttributeError, ValueError) as e:
                raise _Bad("missing_field", f"{key} template {spec!r} cannot be filled: {type(e).__name__}: {e}") from None
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _Bad("non_utf8", f"{key} is not valid UTF-8 text: {e.reason} at {e.start}") from None
        if self.cfg.strip:
            v = v.strip()
        if not v.strip():
            raise _Bad("empty_field", f"{key} is empty")
        limit = self.cfg.max_instruction_chars if key == "instruction" else self.cfg.max_response_chars
        if len(v) > limit:
            raise _Bad("too_long", f"{key} has {len(v)} characters, over the limit of {limit}")
        return v

    def _opt_str(self, field: str | None, row: dict, what: str, default: str | None) -> str:
        """A per-row field; absent or empty falls back to `default` (None: the field is required)."""
        if not field:
            return default
        v = row.get(field)
        if v is None or (isinstance(v, str) and not v.strip()):
            if default is not None:
                return default
            raise _Bad("missing_field", f"field '{field}' ({what}) is missing")
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise _Bad("wrong_type", f"field '{field}' ({what}) must be a string or integer, got {type(v).__name__}")
        return str(v).strip()

    def row_id(self, row: dict, file: str, idx: int) -> str:
        f = self.src.fields
        if f.id:
            local = self._opt_str(f.id, row, "id", None)
        else:
            local = f"{file}:{idx}" if self.many_files else str(idx)
        return f"{self.src.name}/{local}"

    def map(self, row: dict, rid: str, file: str) -> dict:
        s, f = self.src, self.src.fields
        for field_name, values in s.exclude.items():
            if row.get(field_name) in values:
                raise _Bad("excluded_by_spec", f"field '{field_name}' = {row.get(field_name)!r} is excluded by the spec")
        out = {"id": rid}
        out["instruction"] = self._text("instruction", row)
        out["response"] = self._text("response", row)
        cond = self._opt_str(f.condition, row, "condition", s.condition)
        try:
            out["condition"] = check_condition(cond, self.cfg.conditions)
        except ValueError as e:
            raise _Bad("unknown_condition", str(e)) from None
        out["source"] = s.name
        out["domain"] = self._opt_str(f.domain, row, "domain", s.domain)
        default_sub = file if s.kind == "local" else s.split if s.kind == "hub" else "all"
        sub = self._opt_str(f.subset, row, "subset", default_sub)
        out["origin"] = f"{s.name}/{sub}"
        return out  # the duplicate-id check comes last, in `_SourceNormalizer` (ids held hashed)

    def direct(self, out: dict, rid: str) -> dict:
        """The direct version of a mapped row (id RID): its final answer as response (a copy's id RID is
        checked for duplicates by the caller, after this)."""
        ans, why = extract_answer(out["response"], self.src.answer_format)
        if ans is None:
            raise _Bad(NO_ANSWER, f"{why} (answer_format {self.src.answer_format!r})")
        cond = direct_condition(out["condition"])
        if any(t not in self.cfg.conditions for t in parse_condition(cond)):
            raise _Bad("unknown_condition", f"direct condition {cond!r}: a tag is not in {self.cfg.conditions}")
        return {**out, "id": rid, "response": ans, "condition": cond}


def _iter_raw(table: pa.Table):
    """Yield (row dict or _Bad, file, index) for a raw ingest table."""
    files = table.column("_file").to_pylist()
    idxs = table.column("_row").to_pylist()
    if "_json" in table.column_names:
        for raw, file, idx in zip(table.column("_json").to_pylist(), files, idxs):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield _Bad("non_utf8", f"line is not UTF-8: {e.reason} at byte {e.start}"), file, idx
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield _Bad("bad_json", f"{e.msg} at column {e.colno}"), file, idx
                continue
            if not isinstance(obj, dict):
                yield _Bad("not_an_object", f"a JSON {type(obj).__name__}, not an object"), file, idx
                continue
            yield obj, file, idx
    else:
        data = table.drop_columns(["_file", "_row"]).to_pylist()
        yield from zip(data, files, idxs)


class _Seen:
    """The ids claimed so far, as 128-bit hashes (two seeded 64-bit polars hashes) in a `rows._IdSet`:
    sorted runs in memory up to `run_bytes` of them, past that (with a `spill_dir`) spilled to sorted
    run files there (a fence and a Bloom filter held per file), so the check holds a few MB and ~1.5
    bytes an id whatever the source's size. The same answers as the set held in memory."""

    def __init__(self, run_bytes: int | None = None, spill_dir: Path | None = None) -> None:
        self.ids = _IdSet(run_bytes, spill_dir)

    @staticmethod
    def _hash(ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import polars as pl

        s = pl.Series(ids, dtype=pl.String)
        return s.hash(seed=21).to_numpy(), s.hash(seed=22).to_numpy()

    def contains(self, ids: list[str]) -> np.ndarray:
        if not ids or not len(self.ids):
            return np.zeros(len(ids), bool)
        return self.ids.contains_hashes(*self._hash(ids))

    def add(self, ids: list[str]) -> None:
        """Ids not claimed before, each once."""
        if ids:
            self.ids.insert_hashes(*self._hash(ids))

    def close(self) -> None:
        self.ids.close()


class _SourceNormalizer:
    """Normalizes one source's raw rows a batch at a time (the batches in file order give the rows and
    rejects of the whole table at once). Held across batches: the hashed ids (`_Seen`) and counts."""

    def __init__(self, src: SourceSpec, cfg: NormalizeConfig, columns: list[str] | None, many: bool,
                 id_bytes: int | None = None, spill_dir: Path | None = None):
        self.src, self.many = src, many
        self.mapper = _Mapper(src, cfg, columns, many)
        self.seen = _Seen(id_bytes, spill_dir)
        self.copies = 0

    def batch(self, table: pa.Table) -> tuple[list[dict], list[dict]]:
        src, mapper = self.src, self.mapper
        plans = []  # per row: (rid, where, _Bad) or (rid, where, row, direct row or _Bad, copy id)
        claims: list[str] = []  # the ids rows and copies would take, for one membership query
        for obj, file, idx in _iter_raw(table):
            where = f"{file}:{idx}"
            rid = f"{src.name}/{file}:{idx}" if self.many else f"{src.name}/{idx}"
            try:
                if isinstance(obj, _Bad):
                    raise obj
                rid = mapper.row_id(obj, file, idx)
                row = mapper.map(obj, rid, file)
            except _Bad as b:
                plans.append((rid, where, b))
                continue
            claims.append(rid)
            cid = rid + DIRECT_SUFFIX if src.emit == "both" else rid
            if src.emit != "cot":
                try:
                    d = mapper.direct(row, cid)
                except _Bad as b:
                    d = b
                if src.emit == "both" and not isinstance(d, _Bad):
                    claims.append(cid)
            else:
                d = None
            plans.append((rid, where, row, d, cid))
        before = dict(zip(claims, self.seen.contains(claims).tolist()))
        local: set[str] = set()

        def claim(i: str) -> bool:
            if before[i] or i in local:
                return False
            local.add(i)
            return True

        rows, rejects = [], []

        def reject(rid: str, reason: str, detail: str) -> None:
            rejects.append({"id": rid, "source": src.name, "stage": STAGE, "reason": reason, "detail": detail,
                            "duplicate_of": None})

        dup = "duplicate_id"
        for plan in plans:
            if len(plan) == 3:
                rid, where, b = plan
                reject(rid, b.reason, f"{where}: {b.detail}")
                continue
            rid, where, row, d, cid = plan
            if not claim(rid):
                reject(rid, dup, f"{where}: id {rid!r} appears more than once in the source")
                continue
            if src.emit == "cot":
                rows.append(row)
            elif src.emit == "direct":
                if isinstance(d, _Bad):
                    reject(rid, d.reason, f"{where}: {d.detail}")
                else:
                    rows.append(d)
            else:
                rows.append(row)
                self.copies += 1
                if isinstance(d, _Bad):
                    reject(cid, d.reason, f"{where}: direct copy of {rid}: {d.detail}")
                elif not claim(cid):
                    reject(cid, dup, f"{where}: direct copy of {rid}: id {cid!r} appears more than once in the source")
                else:
                    rows.append(d)
        self.seen.add(sorted(local))
        return rows, rejects


def _source_files(pf: pq.ParquetFile, batch_rows: int) -> int:
    """How many distinct `_file` values a raw ingest file holds (up to 2: only 'more than one' matters)."""
    files: set[str] = set()
    for b in pf.iter_batches(batch_size=batch_rows, columns=["_file"], use_threads=False):
        files.update(pc.unique(b.column("_file")).to_pylist())
        if len(files) > 1:
            break
    return len(files)


def normalize_table(src: SourceSpec, cfg: NormalizeConfig, table: pa.Table, progress: bool = False,
                    stats: dict | None = None):
    """Normalize one raw source table (whole, in memory). Returns (rows: list[dict], rejects: list[dict]);
    STATS (a dict) gets "direct_copies", the direct copies made (emit both), kept or rejected."""
    columns = None if "_json" in table.column_names or table.num_rows == 0 else table.column_names
    norm = _SourceNormalizer(src, cfg, columns, len(table.column("_file").unique()) > 1)
    rows, rejects = norm.batch(table)
    if stats is not None:
        stats["direct_copies"] = norm.copies
    return rows, rejects


def _ingest_warnings(ingest_dir: Path, names: set[str]) -> list[dict]:
    """The warnings the ingest manifest records for these sources (none without a manifest)."""
    m = ingest_dir / MANIFEST
    if not m.exists():
        return []
    try:
        warnings = read_json(m).get("warnings") or []
    except (ValueError, OSError):
        return []
    return [w for w in warnings if w.get("source") in names]


def _warn_empty(ingest_warnings: list[dict], per_source: dict) -> list[dict]:
    """The ingest warnings and one per source with 0 rows in (each printed to stderr)."""
    warnings = list(ingest_warnings)
    warned = {w["source"] for w in warnings if w.get("kind") == "empty_source"}
    warnings += [{"source": k, "file": None, "kind": "empty_source", "message": f"source '{k}' is empty: 0 rows"}
                 for k, v in per_source.items() if v["in"] == 0 and k not in warned]
    for w in warnings:
        print(f"[normalize] warning: {w['message']}", file=sys.stderr, flush=True)
    return warnings


def _normalize_source(s: SourceSpec, cfg: NormalizeConfig, path: Path, rows_per_batch: int, progress: bool,
                      w_rows: RowGroupWriter, w_rej: RowGroupWriter, id_bytes: int | None = None,
                      spill_dir: Path | None = None) -> tuple[dict, Counter]:
    """Source `s`'s ingested rows (`path`) mapped and written to w_rows / w_rej; returns (its counts,
    its reject reasons). The ids past `id_bytes` of them are spilled to a temporary folder in
    `spill_dir` (removed when the source is done)."""
    pf = pq.ParquetFile(path, pre_buffer=False)
    n_in = pf.metadata.num_rows
    names = pf.schema_arrow.names
    # columns known up front (Parquet/Hub/generator) are checked against the spec; an empty source has none
    columns = None if "_json" in names or n_in == 0 else names
    norm = _SourceNormalizer(s, cfg, columns, n_in > 0 and _source_files(pf, rows_per_batch) > 1, id_bytes, spill_dir)
    try:
        return _normalize_batches(s, pf, norm, rows_per_batch, progress, w_rows, w_rej)
    finally:
        norm.seen.close()


def _normalize_batches(s: SourceSpec, pf: pq.ParquetFile, norm: _SourceNormalizer, rows_per_batch: int,
                       progress: bool, w_rows: RowGroupWriter, w_rej: RowGroupWriter) -> tuple[dict, Counter]:
    n_in = pf.metadata.num_rows
    kept = rejected = 0
    src_reasons: Counter = Counter()
    bar = tqdm(total=n_in, desc=f"normalize {s.name}", unit="row", unit_scale=True, file=sys.stderr,
               mininterval=1.0, disable=not progress)
    for b in pf.iter_batches(batch_size=rows_per_batch, use_threads=False):
        rows, rejects = norm.batch(pa.Table.from_batches([b]))
        w_rows.write(pa.Table.from_pylist(rows, schema=NORMALIZED_FULL_SCHEMA))
        w_rej.write(pa.Table.from_pylist(rejects, schema=REMOVAL_SCHEMA))
        kept += len(rows)
        rejected += len(rejects)
        src_reasons.update(r["reason"] for r in rejects)
        bar.update(b.num_rows)
        del rows, rejects
    bar.close()
    st = {"in": n_in, "kept": kept, "rejected": rejected, "reasons": dict(sorted(src_reasons.items()))}
    if s.emit != "cot":  # only then: the manifests of other sources stay as they were
        st.update(emit=s.emit, direct_copies=norm.copies)
    assert n_in + norm.copies == kept + rejected, s.name
    return st, src_reasons


def normalize_source_part(s: SourceSpec, cfg: NormalizeConfig, path: Path, parts: Path, rows_per_batch: int,
                          progress: bool, id_bytes: int | None = None) -> tuple[dict, Counter]:
    """One part of the stage: source `s` into parts/<name>.rows.parquet and .rejects.parquet (the rows
    `_normalize_source` would write for it); returns what `_normalize_source` returns."""
    with RowGroupWriter(parts / f"{s.name}.{ROWS_FILE}", NORMALIZED_FULL_SCHEMA) as w_rows, \
            RowGroupWriter(parts / f"{s.name}.{REJECTS_FILE}", REMOVAL_SCHEMA) as w_rej:
        return _normalize_source(s, cfg, path, rows_per_batch, progress, w_rows, w_rej, id_bytes, parts)


def run(ingest_dir: str | os.PathLike, output_dir: str | os.PathLike, sources: list[SourceSpec],
        cfg: NormalizeConfig, *, progress: bool = True, versioned: bool = False, force: bool = False,
        memory_gb: float | None = None, map_parts: MapParts | None = None) -> dict:
    """Normalize every source's ingested rows; return the stage manifest. With `map_parts`, each source
    is a part (`normalize_source_part`) written to parts/ and the parts are then appended in the spec's
    order: the same bytes as the single-process run.

    Streams (`memory_gb`, default `ResourcesConfig().memory_gb`, sizes the batches; never part of the
    fingerprint): each source's raw rows are read a batch at a time (Parquet row groups), mapped, and
    the kept rows and rejects written row group by row group (byte-identical to writing them all at
    once). Held across a source's batches: its ids as 128-bit hashes for the duplicate check, in memory
    up to `budget.id_set_bytes` of them (16 bytes an id), past that spilled to sorted run files in a
    temporary folder of the output (removed when the source is done; ~1.5 bytes an id kept in memory):
    so the stage's peak does not grow with the row count."""
    ingest_dir, out = Path(ingest_dir), Path(output_dir)
    inputs = {s.name: ingest_dir / f"{s.name}.parquet" for s in sources}
    for name, p in inputs.items():
        if not p.exists():
            raise FileNotFoundError(f"normalize: no ingested data for source '{name}' ({p}); run ingest first")
    params = {"sources": [s.model_dump() for s in sources], "cfg": cfg.model_dump()}
    ingest_warnings = _ingest_warnings(ingest_dir, {s.name for s in sources})
    fp = fingerprint(STAGE, code_closure(sys.modules[__name__]), {**params, "ingest_warnings": ingest_warnings},
                     {k: str(v) for k, v in inputs.items()})
    out, done = open_stage(output_dir, fp, versioned=versioned, force=force)
    if done is not None:
        return done
    remove_spills(out)  # an id set's spill folder left by a killed run
    t0 = time.time()
    per_source = {}
    reasons: Counter = Counter()
    rows_per_batch = budget.batch_rows(memory_gb, 8192)  # a raw row costs a few KB as Python objects
    id_bytes = budget.id_set_bytes(memory_gb)  # the ids held in memory by the duplicate check; the rest spilled
    with RowGroupWriter(out / ROWS_FILE, NORMALIZED_FULL_SCHEMA) as w_rows, \
            RowGroupWriter(out / REJECTS_FILE, REMOVAL_SCHEMA) as w_rej:
        if map_parts is None:  # every source straight into the stage's files
            stats = [_normalize_source(s, cfg, inputs[s.name], rows_per_batch, progress, w_rows, w_rej, id_bytes, out)
                     for s in sources]
        else:  # one part per source into parts/, then the parts appended in the spec's order
            parts = out / "parts"
            parts.mkdir(exist_ok=True)
            stats = map_parts(normalize_source_part, [(s, cfg, inputs[s.name], parts, rows_per_batch, progress, id_bytes)
                                                      for s in sources])
            for s in sources:
                for f, w in ((parts / f"{s.name}.{ROWS_FILE}", w_rows), (parts / f"{s.name}.{REJECTS_FILE}", w_rej)):
                    pf = pq.ParquetFile(f, pre_buffer=False)
                    for i in range(pf.num_row_groups):
                        w.write(pf.read_row_group(i, use_threads=False).replace_schema_metadata(w.schema.metadata))
            shutil.rmtree(parts)
        for s, (st, src_reasons) in zip(sources, stats):
            per_source[s.name] = st
            reasons.update(src_reasons)
        if all(v["in"] == 0 for v in per_source.values()):
            _warn_empty(ingest_warnings, per_source)
            raise EmptySourcesError(f"every source is empty (0 rows): {sorted(per_source)}; nothing to normalize")
    warnings = _warn_empty(ingest_warnings, per_source)
    outputs = {ROWS_FILE: w_rows.record, REJECTS_FILE: w_rej.record}
    counts = {"rows_in": sum(v["in"] for v in per_source.values()), "kept": w_rows.record["rows"],
              "rejected": w_rej.record["rows"],
              "reasons": dict(sorted(reasons.items())),
              "per_source": per_source}
    manifest = {"stage": STAGE, "fingerprint": fp, "params": params, "outputs": outputs, "counts": counts,
                "warnings": warnings}
    return finish_stage(out, manifest, {"total_s": round(time.time() - t0, 3)})
