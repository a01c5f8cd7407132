"""Stage 1, ingest: fetch every source of a spec into one raw Parquet file per source.

Sources: the Hugging Face Hub (through `datasets`: name, config, split, revision), local JSONL/Parquet
files (a file, a folder or a glob), and the built-in generators of `pipeline.generators`.

Nothing is parsed or judged here: JSONL lines are kept as raw bytes (`_json`) so that `normalize`
can reject malformed lines with their reason and line number. Every raw row carries `_file` (the
file, split or generator it came from) and `_row` (its index there, or line number for JSONL).

Outputs in the stage folder: `<source>.parquet` per source, and `manifest.json` recording for each
source where it came from (path or Hub id, config, split, requested and resolved revision, file
sha256s), its row count and its license when known. Local files and Hub splits stream: they are read a
block or batch at a time (`memory_gb` sizes them; Hub splits through datasets' streaming mode) and
written row group by row group, byte-identical to the whole-table write. Each source is fingerprinted on its own, so a
rerun fetches only the sources whose definition or files changed.

A UTF-8 byte-order mark at the start of a JSONL file is dropped. An empty source (or an empty file of
a source) is a warning: printed to stderr and listed under `warnings` in the manifest; a run whose
sources are all empty is an error (`EmptySourcesError`).

Errors: `IngestError` (a ValueError) is deterministic: a path matching no file, an unreadable file, a
bad generator parameter, a Hub dataset/config/split that does not exist. Retrying cannot help.
`SourceFetchError` (a ConnectionError) is a failed network read of the Hub (connection, timeout,
HTTP 408/429/5xx), with the original error as its `__cause__`: the one error worth retrying
(`is_transient`).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import budget, generators
from ..config import SourceSpec
from ..io import atomic_path, code_closure, finish_stage, open_stage, read_json, sha256_file, sha256_json
from ..io import MANIFEST, ROW_GROUP, RowGroupWriter
from ..parts import MapParts, serial

STAGE = "ingest"
SUPPORTED = (".jsonl", ".jsonl.gz", ".json", ".parquet")
RAW_META = ("_file", "_row", "_json")
JSONL_RAW = pa.schema([pa.field("_json", pa.binary()), pa.field("_file", pa.string()), pa.field("_row", pa.int64())])


BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark, written by some editors and exporters


class IngestError(ValueError):
    """A deterministic ingest error (bad path, unreadable file, bad parameter): never worth a retry."""


class EmptySourcesError(IngestError):
    """Every source of the run has no rows."""


class SourceFetchError(ConnectionError):
    """A network read of a source failed (connection, timeout, HTTP 408/429/5xx); a retry may succeed.
    The original error is the `__cause__`."""


def find_local_files(path: str) -> list[Path]:
    """A file, a folder (its supported files, recursively) or a glob, sorted for determinism; [] when
    nothing matches. A remote URL (s3://, gs://, memory://) gives its objects fetched into the local
    content-addressed cache (pipeline/storage.py), sorted by their names under the source."""
    from .. import storage

    if storage.is_remote(path):
        return storage.fetch_files(path, SUPPORTED)
    p = storage.local_path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()]
    else:
        files = [Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()]
    return sorted(f for f in files if f.name.endswith(SUPPORTED))


def no_files_message(path: str, source: str | None = None) -> str:
    who = f"source '{source}': " if source else ""
    return f"{who}local path {path!r} matches no {'/'.join(SUPPORTED)} file"


def local_files(path: str, source: str | None = None) -> list[Path]:
    """`find_local_files`, raising IngestError (naming the source and path) when nothing matches."""
    files = find_local_files(path)
    if not files:
        raise IngestError(no_files_message(path, source))
    return files


class _JsonlLines:
    """A JSONL file's raw lines (`_json`, `_file`, `_row` = line number) a block of about `block` bytes
    and at most `lines` lines at a time (a Parquet row group: each block is then written as it comes,
    with no remainder left in the writer that varies block to block); blank lines are skipped, a BOM at
    the start dropped. Only the first `keep` lines are yielded (None: all), but every line is counted
    (`rows`)."""

    def __init__(self, f: Path, name: str, block: int, keep: int | None = None, lines: int | None = None):
        self.f, self.name, self.block, self.keep, self.max_lines = f, name, block, keep, lines or ROW_GROUP
        self.rows = 0

    def _table(self, lines: list[bytes], rows: list[int]) -> pa.Table:
        return pa.table({"_json": pa.array(lines, pa.binary()), "_file": pa.array([self.name] * len(lines), pa.string()),
                         "_row": pa.array(rows, pa.int64())})

    def __iter__(self):
        import gzip

        opener = gzip.open if self.f.name.endswith(".gz") else open
        lines: list[bytes] = []
        rows: list[int] = []
        size = 0
        with opener(self.f, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if lineno == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM):]
                if not raw.strip():
                    continue
                self.rows += 1
                if self.keep is not None and self.rows > self.keep:
                    continue  # counted, not kept
                lines.append(raw.rstrip(b"\r\n"))
                rows.append(lineno)
                size += len(raw)
                if size >= self.block or len(lines) >= self.max_lines:
                    yield self._table(lines, rows)
                    lines, rows, size = [], [], 0
        if lines:
            yield self._table(lines, rows)


def _with_meta(table: pa.Table, name: str, start: int = 0) -> pa.Table:
    """`_file` and `_row` (the row's index in its file or split: start, start + 1, ...) appended."""
    for c in RAW_META:
        if c in table.column_names:
            raise IngestError(f"{name}: column {c!r} is reserved by the pipeline; rename it in the source")
    n = table.num_rows
    table = table.append_column("_file", pa.array([name] * n, pa.string()))
    return table.append_column("_row", pa.array(np.arange(start, start + n, dtype=np.int64)))


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A batch in the source's schema (columns other files have added as nulls, types promoted), as
    concatenating the files' tables did."""
    if table.schema.equals(schema, check_metadata=False):
        return table
    t = pa.concat_tables([schema.empty_table(), table], promote_options="permissive")
    return t.select(schema.names).cast(schema)


def _concat(tables: list[pa.Table], what: str) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise IngestError(f"{what}: files have incompatible columns: {e}") from None


def _ingest_local(src: SourceSpec, dst: Path, memory_gb: float | None) -> tuple[int, dict, dict]:
    """Each file read a block (JSONL) or a batch of a row group (Parquet) at a time and written as it
    comes: the file equals the whole-table write of every file's rows concatenated (one chunk per file)."""
    files = local_files(src.path, src.name)
    names = _file_names(src, files)
    empties = []
    for f, name in zip(files, names):
        if f.name.endswith(".parquet"):
            try:
                empties.append(_with_meta(pq.read_schema(f).empty_table(), name))
            except (pa.ArrowException, OSError) as e:
                raise IngestError(f"source '{src.name}': {f} is not a readable Parquet file: {e}") from None
        else:
            empties.append(JSONL_RAW.empty_table())
    schema = _concat(empties, f"source '{src.name}'").schema
    block = budget.block_bytes(memory_gb)
    left = src.max_rows  # rows still to write (None: all)
    records: dict = {}
    total = 0
    with RowGroupWriter(dst, schema) as w:
        for f, name in zip(files, names):
            w.new_chunk()
            if f.name.endswith(".parquet"):
                try:
                    pf = pq.ParquetFile(f, pre_buffer=False)
                    n_file = pf.metadata.num_rows
                    row_bytes = max(1.0, pf.metadata.serialized_size / max(1, n_file))
                    if pf.metadata.num_row_groups:
                        rg = pf.metadata.row_group(0)
                        row_bytes = max(row_bytes, rg.total_byte_size / max(1, rg.num_rows))
                    start = 0
                    rows = budget.batch_rows(memory_gb, row_bytes * 2)
                    rows = rows // ROW_GROUP * ROW_GROUP or rows  # whole row groups where one fits (see _JsonlLines)
                    if left is None or left > 0:
                        for batch in pf.iter_batches(batch_size=rows, use_threads=False):
                            t = _with_meta(pa.Table.from_batches([batch]), name, start)
                            start += t.num_rows
                            if left is not None:
                                t = t.slice(0, left)
                                left -= t.num_rows
                            w.write(_conform(t, schema))
                            total += t.num_rows
                            del t
                            pa.default_memory_pool().release_unused()
                            if left == 0:
                                break
                except (pa.ArrowException, OSError) as e:
                    raise IngestError(f"source '{src.name}': {f} is not a readable Parquet file: {e}") from None
            else:
                lines = _JsonlLines(f, name, block, keep=left)
                try:
                    for t in lines:
                        w.write(_conform(t, schema))
                        total += t.num_rows
                        del t
                        pa.default_memory_pool().release_unused()  # the block's buffers back (mimalloc keeps them)
                except (OSError, EOFError) as e:  # gone since listed, no permission, corrupt gzip
                    raise IngestError(f"source '{src.name}': cannot read {f}: {type(e).__name__}: {e}") from None
                n_file = lines.rows
                if left is not None:
                    left = max(0, left - n_file)
            records[name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size, "rows": n_file}
    return total, {"files": records}, w.record


def _ingest_hub(src: SourceSpec, dst: Path, progress: bool, memory_gb: float | None) -> tuple[int, dict, dict]:
    """The split streamed (datasets' streaming mode) and written a batch at a time."""
    import datasets

    if not progress:
        datasets.disable_progress_bars()
    failed = None

    def _fail(e: Exception) -> str:
        return (f"source '{src.name}': cannot load Hub dataset {src.path!r} (config={src.config!r}, "
                f"split={src.split!r}, revision={src.revision!r}): {type(e).__name__}: {e}")

    try:
        ds = datasets.load_dataset(src.path, src.config, split=src.split, revision=src.revision, streaming=True)
        if src.max_rows is not None:
            ds = ds.take(src.max_rows)
    except Exception as e:  # network, auth, missing config: say which source and what was asked
        if is_transient(e):
            raise SourceFetchError(_fail(e)) from e
        failed = _fail(e)
    if failed is not None:  # raised outside the handler: no network error hangs on as its context
        raise IngestError(failed)
    files = _data_files(src) if src.data_file_field else None
    step = budget.batch_rows(memory_gb, 2048)
    n = 0
    w = RowGroupWriter(dst, None)
    try:
        with w:
            for table in ds.with_format("arrow").iter(batch_size=step):
                if src.data_file_field:
                    table = _add_data_file_column(src, table, files, n)
                table = _with_meta(table, f"{src.split}", n)
                if w.schema is None:
                    w.schema = table.schema
                w.write(_conform(table, w.schema))
                n += table.num_rows
            if w.schema is None:
                w.schema = _with_meta(pa.table({}), f"{src.split}").schema
            if files is not None:
                total = int(sum(c for _, c in files))
                if n > total or (src.max_rows is None and n != total):
                    raise IngestError(f"source '{src.name}': the loaded split has {n} rows but its data files hold "
                                      f"{total}; cannot tell which file each row came from")
    except (IngestError, SourceFetchError):
        raise
    except Exception as e:  # a read of the stream failed
        if is_transient(e):
            raise SourceFetchError(_fail(e)) from e
        failed = _fail(e)
    if failed is not None:
        raise IngestError(failed)
    resolved = None
    if not Path(src.path).exists():  # a Hub id, not a local dataset folder
        try:
            from huggingface_hub import HfApi

            resolved = HfApi().dataset_info(src.path, revision=src.revision).sha
        except Exception:
            resolved = None  # offline with a cached copy: the requested revision is what we know
    lic = None
    try:
        lic = ds.info.license or None
    except Exception:
        pass
    return n, {"hub": {"path": src.path, "config": src.config, "split": src.split,
                       "revision": src.revision, "resolved_revision": resolved,
                       "streamed": True}, "license_from_hub": lic}, w.record


def _relative_data_file(src: SourceSpec, f: str) -> str:
    """A data file's path inside the dataset: "data/train-00000.parquet", not a cache path or hf:// URL."""
    m = re.match(r"^hf://datasets/[^/]+/[^/@]+(?:@[^/]+)?/(.*)$", f)
    if m:
        return m.group(1)
    base = Path(src.path).expanduser()
    fp = Path(f)
    if base.is_dir() and fp.is_relative_to(base.resolve()):
        return str(fp.relative_to(base.resolve()))
    if base.is_dir() and fp.is_relative_to(base):
        return str(fp.relative_to(base))
    return fp.name


def _data_files(src: SourceSpec) -> list[tuple[str, int]]:
    """(path inside the dataset, rows) of the split's Parquet data files, in the order the dataset
    builder lists (and `load_dataset` reads) them; the row counts come from the Parquet footers."""
    import datasets
    import fsspec

    try:
        builder = datasets.load_dataset_builder(src.path, src.config, revision=src.revision)
        files = list((builder.config.data_files or {}).get(src.split) or [])
    except Exception as e:
        raise IngestError(f"source '{src.name}': cannot list the data files of {src.path!r} "
                          f"(split={src.split!r}): {type(e).__name__}: {e}") from None
    if not files or not all(str(f).endswith(".parquet") for f in files):
        raise IngestError(f"source '{src.name}': data_file_field needs Parquet data files for split "
                          f"{src.split!r}; found {[str(f) for f in files][:5]}")
    out = []
    for f in files:
        with fsspec.open(str(f), "rb") as fh:
            out.append((_relative_data_file(src, str(f)), pq.ParquetFile(fh).metadata.num_rows))
    return out


def _add_data_file_column(src: SourceSpec, table: pa.Table, files: list[tuple[str, int]], start: int) -> pa.Table:
    """Append `src.data_file_field` to a batch of the split whose first row is row `start`: row i
    belongs to the file whose cumulative row count first exceeds i."""
    col = src.data_file_field
    if col in table.column_names:
        raise IngestError(f"source '{src.name}': data_file_field {col!r} is already a column of the dataset")
    cum = np.cumsum([c for _, c in files])
    idx = np.searchsorted(cum, np.arange(start, start + table.num_rows, dtype=np.int64), side="right")
    if table.num_rows and idx[-1] >= len(files):
        raise IngestError(f"source '{src.name}': the loaded split has more than {int(cum[-1])} rows, the rows its "
                          "data files hold; cannot tell which file each row came from")
    return table.append_column(col, pa.array([f for f, _ in files], pa.string()).take(pa.array(idx)))


def _ingest_generator(src: SourceSpec, seed: int, path: Path, memory_gb: float | None) -> tuple[int, dict, dict]:
    """A generator source written a batch of rows at a time (sized by `memory_gb`): the same bytes as
    the whole table at once (column names from the first row, every column's type from the first
    batch). Returns (rows, where, the file's record)."""
    from itertools import islice

    problems = generators.check_params(src.generator, src.params)
    if problems:
        raise IngestError(f"source '{src.name}': " + "; ".join(problems))
    params = dict(src.params)
    n = params.pop("n")
    gseed = int(params.pop("seed", seed))
    name = f"generator:{src.generator}"
    step = budget.batch_rows(memory_gb, row_bytes=4096)
    done = 0
    schema = None
    try:
        rows = generators.generate(src.generator, n, gseed, **params)
        if src.max_rows is not None:
            rows = islice(rows, src.max_rows)
        with RowGroupWriter(path, None) as w:
            while batch := list(islice(rows, step)):
                t = pa.Table.from_pylist(batch, schema=schema)
                schema = t.schema
                t = _with_meta(t, name, done)
                w.schema = w.schema or t.schema
                w.write(t)
                done += len(batch)
            if not done:
                w.schema = _with_meta(pa.table({"uid": pa.array([], pa.string())}), name).schema
    except IngestError:
        raise
    except ValueError as e:
        raise IngestError(f"source '{src.name}': {e}") from None
    return done, {"generator": {"name": src.generator, "params": dict(src.params), "seed": gseed}}, w.record


def _file_names(src: SourceSpec, files: list[Path]) -> list[str]:
    """Each file's name under the source's path (the `_file` of its rows)."""
    from .. import storage

    if storage.is_remote(src.path):
        return [storage.cached_name(f) for f in files]
    base = storage.local_path(src.path).expanduser()
    root = base if base.is_dir() else base.parent if base.is_file() else Path(os.path.commonpath([str(f.parent) for f in files]))
    return [str(f.relative_to(root)) if f.is_relative_to(root) else f.name for f in files]


def _source_fingerprint(src: SourceSpec, seed: int) -> str:
    ident: dict = {"spec": src.model_dump(), "code": code_closure(sys.modules[__name__])}
    if src.kind == "local":
        from .. import storage

        files = local_files(src.path, src.name)
        keys = [f"{src.path}#{n}" for n in _file_names(src, files)] if storage.is_remote(src.path) else map(str, files)
        ident["files"] = {k: sha256_file(f) for k, f in zip(keys, files)}
    elif src.kind == "generator":
        ident["seed"] = seed
        ident["generator_code"] = code_closure(generators)
    return sha256_json(ident)


def _previous_sources(out: Path, versioned: bool) -> dict[str, tuple[dict, Path]]:
    """Per-source records of earlier ingests that can be reused: the folder's own manifest, and with
    versions, those of the sibling versions (a source unchanged since is not downloaded again)."""
    folders = [out]
    if versioned and out.parent.is_dir():
        folders += sorted(x for x in out.parent.iterdir() if x.is_dir() and x != out)
    old: dict[str, tuple[dict, Path]] = {}
    for d in folders:
        if not (d / MANIFEST).exists():
            continue
        try:
            recs = read_json(d / MANIFEST).get("sources", {})
        except Exception:
            continue
        for name, rec in recs.items():
            old.setdefault(name, (rec, d))
    return old


def ingest_source(s: SourceSpec, out: Path, seed: int, fp: str, progress: bool,
                  memory_gb: float | None) -> tuple[dict, float]:
    """One part of the stage: source `s` into `out/<name>.parquet`; returns (its record, seconds)."""
    fname = f"{s.name}.parquet"
    ts = time.time()
    if progress:
        print(f"[ingest] {s.name}: {s.kind} {s.path or s.generator}", file=sys.stderr, flush=True)
    if s.kind == "local":
        n_rows, where, rec = _ingest_local(s, out / fname, memory_gb)
    elif s.kind == "hub":
        n_rows, where, rec = _ingest_hub(s, out / fname, progress, memory_gb)
    else:
        n_rows, where, rec = _ingest_generator(s, seed, out / fname, memory_gb)
    lic = s.license or where.pop("license_from_hub", None)
    where.pop("license_from_hub", None)
    return ({"fingerprint": fp, "kind": s.kind, "rows": n_rows, "license": lic, "output": rec, **where},
            round(time.time() - ts, 3))


def run(sources: list[SourceSpec], output_dir: str | os.PathLike, *, seed: int = 1234, progress: bool = True,
        versioned: bool = False, force: bool = False, memory_gb: float | None = None,
        map_parts: MapParts | None = None) -> dict:
    """Fetch every source into `<source>.parquet`. Local files and Hub splits stream: read a block or
    batch at a time (sized by `memory_gb`) and written row group by row group; the outputs do not
    depend on the batch size. Each source to fetch is a part (`ingest_source`) handed to `map_parts`
    (default: one after the other here); the manifest lists them in the spec's order."""
    fps = {s.name: _source_fingerprint(s, seed) for s in sources}
    fp = sha256_json(fps)
    # read before open_stage, which removes the stale manifest of a plain (unversioned) folder
    prior = {} if force or versioned else _previous_sources(Path(output_dir), False)
    out, done = open_stage(output_dir, fp, versioned=versioned, force=force)
    if done is not None:
        return done
    old = {} if force else prior or _previous_sources(out, versioned)
    t0 = time.time()
    records, outputs, timing = {}, {}, {}
    todo: list[SourceSpec] = []
    for s in sources:
        fname = f"{s.name}.parquet"
        prev, prev_dir = old.get(s.name, (None, None))
        if prev and prev.get("fingerprint") == fps[s.name] and (prev_dir / fname).exists() \
                and sha256_file(prev_dir / fname) == prev["output"]["sha256"]:
            if prev_dir != out:
                _link_or_copy(prev_dir / fname, out / fname)
            records[s.name] = prev
            timing[s.name] = "reused"
        else:
            todo.append(s)
    done_parts = (map_parts or serial)(ingest_source, [(s, out, seed, fps[s.name], progress, memory_gb) for s in todo])
    for s, (rec, secs) in zip(todo, done_parts):
        records[s.name] = rec
        timing[s.name] = secs
    records = {s.name: records[s.name] for s in sources}  # the spec's order, whoever computed them
    outputs = {f"{name}.parquet": rec["output"] for name, rec in records.items()}
    timing = {s.name: timing[s.name] for s in sources}
    warnings = empty_warnings(records)
    for w in warnings:
        print(f"[ingest] warning: {w['message']}", file=sys.stderr, flush=True)
    if records and all(v["rows"] == 0 for v in records.values()):
        raise EmptySourcesError(f"every source is empty (0 rows): {sorted(records)}; nothing to ingest")
    # files of sources no longer in the spec are left alone but no longer listed
    manifest = {"stage": STAGE, "fingerprint": fp, "sources": records, "outputs": outputs,
                "counts": {"rows": {k: v["rows"] for k, v in records.items()},
                           "total_rows": sum(v["rows"] for v in records.values())},
                "warnings": warnings}
    timing["total_s"] = round(time.time() - t0, 3)
    return finish_stage(out, manifest, timing)


def empty_warnings(records: dict[str, dict]) -> list[dict]:
    """A warning per empty source, and per empty file of a source that has rows in other files:
    {"source", "file" (or None), "kind": "empty_source" | "empty_file", "message"}."""
    out = []
    for name, rec in records.items():
        files = rec.get("files") or {}
        if rec["rows"] == 0:
            where = f" ({', '.join(sorted(files))})" if files else ""
            out.append({"source": name, "file": None, "kind": "empty_source",
                        "message": f"source '{name}' is empty: 0 rows{where}"})
            continue
        for fname, frec in sorted(files.items()):
            if frec.get("rows") == 0:
                out.append({"source": name, "file": fname, "kind": "empty_file",
                            "message": f"source '{name}': file {fname} is empty (0 rows)"})
    return out


def _network_errors() -> tuple[type, ...]:
    kinds: list[type] = [ConnectionError, TimeoutError]
    try:
        import httpx

        kinds.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import requests

        kinds += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:
        pass
    return tuple(kinds)


TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}


def is_transient(exc: BaseException) -> bool:
    """True for a failed network read (SourceFetchError, or an error caused by a connection failure,
    a timeout or HTTP 408/429/5xx): the errors a retry may cure. Everything else is deterministic."""
    kinds = _network_errors()
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, IngestError):
            return False
        if isinstance(e, kinds):
            return True
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in TRANSIENT_HTTP:
            return True
        e = e.__cause__ or e.__context__
    return False


def _link_or_copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def read_source(output_dir: str | os.PathLike, name: str) -> pa.Table:
    return pq.read_table(Path(output_dir) / f"{name}.parquet")


__all__ = ["run", "read_source", "local_files", "find_local_files", "is_transient", "IngestError",
           "EmptySourcesError", "SourceFetchError"]
