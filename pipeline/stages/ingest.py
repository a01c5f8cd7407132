"""Stage 1, ingest: fetch every source of a spec into one raw Parquet file per source.

Sources: the Hugging Face Hub (through `datasets`: name, config, split, revision), local JSONL/Parquet
files (a file, a folder or a glob), and the built-in generators of `pipeline.generators`.

Nothing is parsed or judged here: JSONL lines are kept as raw bytes (`_json`) so that `normalize`
can reject malformed lines with their reason and line number. Every raw row carries `_file` (the
file, split or generator it came from) and `_row` (its index there, or line number for JSONL).

Outputs in the stage folder: `<source>.parquet` per source, and `manifest.json` recording for each
source where it came from (path or Hub id, config, split, requested and resolved revision, file
sha256s), its row count and its license when known. Each source is fingerprinted on its own, so a
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

from .. import generators
from ..config import SourceSpec
from ..io import atomic_path, code_hash, finish_stage, open_stage, read_json, sha256_file, sha256_json
from ..io import MANIFEST, write_parquet

STAGE = "ingest"
SUPPORTED = (".jsonl", ".jsonl.gz", ".json", ".parquet")
RAW_META = ("_file", "_row", "_json")


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
    nothing matches."""
    p = Path(path).expanduser()
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


def _read_jsonl_raw(f: Path, name: str) -> pa.Table:
    import gzip

    opener = gzip.open if f.name.endswith(".gz") else open
    lines, rows = [], []
    with opener(f, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            if not raw.strip():
                continue
            lines.append(raw.rstrip(b"\r\n"))
            rows.append(lineno)
    return pa.table(
        {
            "_json": pa.array(lines, pa.binary()),
            "_file": pa.array([name] * len(lines), pa.string()),
            "_row": pa.array(rows, pa.int64()),
        }
    )


def _with_meta(table: pa.Table, name: str) -> pa.Table:
    for c in RAW_META:
        if c in table.column_names:
            raise IngestError(f"{name}: column {c!r} is reserved by the pipeline; rename it in the source")
    n = table.num_rows
    table = table.append_column("_file", pa.array([name] * n, pa.string()))
    return table.append_column("_row", pa.array(range(n), pa.int64()))


def _concat(tables: list[pa.Table], what: str) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise IngestError(f"{what}: files have incompatible columns: {e}") from None


def _ingest_local(src: SourceSpec) -> tuple[pa.Table, dict]:
    files = local_files(src.path, src.name)
    base = Path(src.path).expanduser()
    root = base if base.is_dir() else base.parent if base.is_file() else Path(os.path.commonpath([str(f.parent) for f in files]))
    tables, records = [], {}
    for f in files:
        name = str(f.relative_to(root)) if f.is_relative_to(root) else f.name
        if f.name.endswith(".parquet"):
            try:
                raw = pq.read_table(f)
            except (pa.ArrowException, OSError) as e:
                raise IngestError(f"source '{src.name}': {f} is not a readable Parquet file: {e}") from None
            t = _with_meta(raw, f"{name}")
        else:
            try:
                t = _read_jsonl_raw(f, name)
            except (OSError, EOFError) as e:  # gone since listed, no permission, corrupt gzip
                raise IngestError(f"source '{src.name}': cannot read {f}: {type(e).__name__}: {e}") from None
        tables.append(t)
        records[name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size, "rows": t.num_rows}
    table = _concat(tables, f"source '{src.name}'")
    if src.max_rows is not None:
        table = table.slice(0, src.max_rows)
    return table, {"files": records}


def _ingest_hub(src: SourceSpec, progress: bool) -> tuple[pa.Table, dict]:
    import datasets

    if not progress:
        datasets.disable_progress_bars()
    split = src.split if src.max_rows is None else f"{src.split}[:{src.max_rows}]"
    failed = None
    try:
        ds = datasets.load_dataset(src.path, src.config, split=split, revision=src.revision)
    except Exception as e:  # network, auth, missing config: say which source and what was asked
        what = (f"source '{src.name}': cannot load Hub dataset {src.path!r} (config={src.config!r}, "
                f"split={src.split!r}, revision={src.revision!r}): {type(e).__name__}: {e}")
        if is_transient(e):
            raise SourceFetchError(what) from e
        failed = what
    if failed is not None:  # raised outside the handler: no network error hangs on as its context
        raise IngestError(failed)
    ds = ds.flatten_indices() if getattr(ds, "_indices", None) is not None else ds
    table = ds.data.table if hasattr(ds.data, "table") else ds.with_format("arrow")[:]
    if src.data_file_field:
        table = _add_data_file_column(src, table)
    table = _with_meta(table, f"{src.split}")
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
    return table, {"hub": {"path": src.path, "config": src.config, "split": src.split,
                           "revision": src.revision, "resolved_revision": resolved,
                           "fingerprint": getattr(ds, "_fingerprint", None)}, "license_from_hub": lic}


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


def _add_data_file_column(src: SourceSpec, table: pa.Table) -> pa.Table:
    """Append `src.data_file_field`: the data file each row came from. The split's Parquet files are
    listed by the dataset builder in the order `load_dataset` reads them; each file's row count comes
    from its Parquet footer, so row i belongs to the file whose cumulative count first exceeds i."""
    import datasets
    import fsspec

    col = src.data_file_field
    if col in table.column_names:
        raise IngestError(f"source '{src.name}': data_file_field {col!r} is already a column of the dataset")
    try:
        builder = datasets.load_dataset_builder(src.path, src.config, revision=src.revision)
        files = list((builder.config.data_files or {}).get(src.split) or [])
    except Exception as e:
        raise IngestError(f"source '{src.name}': cannot list the data files of {src.path!r} "
                          f"(split={src.split!r}): {type(e).__name__}: {e}") from None
    if not files or not all(str(f).endswith(".parquet") for f in files):
        raise IngestError(f"source '{src.name}': data_file_field needs Parquet data files for split "
                          f"{src.split!r}; found {[str(f) for f in files][:5]}")
    names, counts = [], []
    for f in files:
        with fsspec.open(str(f), "rb") as fh:
            counts.append(pq.ParquetFile(fh).metadata.num_rows)
        names.append(_relative_data_file(src, str(f)))
    total = sum(counts)
    n = table.num_rows
    if n > total or (src.max_rows is None and n != total):
        raise IngestError(f"source '{src.name}': the loaded split has {n} rows but its data files hold {total}; "
                          "cannot tell which file each row came from")
    idx = np.repeat(np.arange(len(counts), dtype=np.int64), counts)[:n]
    per_row = pa.array(names, pa.string()).take(pa.array(idx))
    return table.append_column(col, per_row)


def _ingest_generator(src: SourceSpec, seed: int) -> tuple[pa.Table, dict]:
    problems = generators.check_params(src.generator, src.params)
    if problems:
        raise IngestError(f"source '{src.name}': " + "; ".join(problems))
    params = dict(src.params)
    n = params.pop("n")
    gseed = int(params.pop("seed", seed))
    try:
        rows = list(generators.generate(src.generator, n, gseed, **params))
    except ValueError as e:
        raise IngestError(f"source '{src.name}': {e}") from None
    if src.max_rows is not None:
        rows = rows[: src.max_rows]
    table = pa.Table.from_pylist(rows) if rows else pa.table({"uid": pa.array([], pa.string())})
    table = _with_meta(table, f"generator:{src.generator}")
    return table, {"generator": {"name": src.generator, "params": dict(src.params), "seed": gseed}}


def _source_fingerprint(src: SourceSpec, seed: int) -> str:
    ident: dict = {"spec": src.model_dump(), "code": code_hash(sys.modules[__name__])}
    if src.kind == "local":
        ident["files"] = {str(f): sha256_file(f) for f in local_files(src.path, src.name)}
    elif src.kind == "generator":
        ident["seed"] = seed
        ident["generator_code"] = code_hash(generators)
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


def run(sources: list[SourceSpec], output_dir: str | os.PathLike, *, seed: int = 1234, progress: bool = True,
        versioned: bool = False, force: bool = False) -> dict:
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
    for s in sources:
        fname = f"{s.name}.parquet"
        prev, prev_dir = old.get(s.name, (None, None))
        if prev and prev.get("fingerprint") == fps[s.name] and (prev_dir / fname).exists() \
                and sha256_file(prev_dir / fname) == prev["output"]["sha256"]:
            if prev_dir != out:
                _link_or_copy(prev_dir / fname, out / fname)
            records[s.name] = prev
            outputs[fname] = prev["output"]
            timing[s.name] = "reused"
            continue
        ts = time.time()
        if progress:
            print(f"[ingest] {s.name}: {s.kind} {s.path or s.generator}", file=sys.stderr, flush=True)
        if s.kind == "local":
            table, where = _ingest_local(s)
        elif s.kind == "hub":
            table, where = _ingest_hub(s, progress)
        else:
            table, where = _ingest_generator(s, seed)
        rec = write_parquet(table, out / fname)
        lic = s.license or where.pop("license_from_hub", None)
        where.pop("license_from_hub", None)
        records[s.name] = {"fingerprint": fps[s.name], "kind": s.kind, "rows": table.num_rows,
                           "license": lic, "output": rec, **where}
        outputs[fname] = rec
        timing[s.name] = round(time.time() - ts, 3)
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
