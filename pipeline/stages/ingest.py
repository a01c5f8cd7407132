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
"""

from __future__ import annotations

import glob
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import generators
from ..config import SourceSpec
from ..io import code_hash, completed_manifest, finish_stage, read_json, sha256_file, sha256_json
from ..io import MANIFEST, write_parquet

STAGE = "ingest"
SUPPORTED = (".jsonl", ".jsonl.gz", ".json", ".parquet")
RAW_META = ("_file", "_row", "_json")


class IngestError(RuntimeError):
    pass


def local_files(path: str) -> list[Path]:
    """A file, a folder (its supported files, recursively) or a glob, sorted for determinism."""
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()]
    else:
        files = [Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()]
    files = sorted(f for f in files if f.name.endswith(SUPPORTED))
    if not files:
        raise IngestError(f"local source path {path!r} matches no {'/'.join(SUPPORTED)} file")
    return files


def _read_jsonl_raw(f: Path, name: str) -> pa.Table:
    import gzip

    opener = gzip.open if f.name.endswith(".gz") else open
    lines, rows = [], []
    with opener(f, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
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
    files = local_files(src.path)
    base = Path(src.path).expanduser()
    root = base if base.is_dir() else base.parent if base.is_file() else Path(os.path.commonpath([str(f.parent) for f in files]))
    tables, records = [], {}
    for f in files:
        name = str(f.relative_to(root)) if f.is_relative_to(root) else f.name
        if f.name.endswith(".parquet"):
            try:
                t = _with_meta(pq.read_table(f), name)
            except pa.ArrowInvalid as e:
                raise IngestError(f"source '{src.name}': {f} is not a readable Parquet file: {e}") from None
        else:
            t = _read_jsonl_raw(f, name)
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
    try:
        ds = datasets.load_dataset(src.path, src.config, split=split, revision=src.revision)
    except Exception as e:  # network, auth, missing config: say which source and what was asked
        raise IngestError(
            f"source '{src.name}': cannot load Hub dataset {src.path!r} (config={src.config!r}, "
            f"split={src.split!r}, revision={src.revision!r}): {type(e).__name__}: {e}"
        ) from None
    ds = ds.flatten_indices() if getattr(ds, "_indices", None) is not None else ds
    table = ds.data.table if hasattr(ds.data, "table") else ds.with_format("arrow")[:]
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


def _ingest_generator(src: SourceSpec, seed: int) -> tuple[pa.Table, dict]:
    params = dict(src.params)
    n = params.pop("n", None)
    if not isinstance(n, int) or n < 0:
        raise IngestError(f"source '{src.name}': generator params need an integer 'n' (rows), got {n!r}")
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
        ident["files"] = {str(f): sha256_file(f) for f in local_files(src.path)}
    elif src.kind == "generator":
        ident["seed"] = seed
        ident["generator_code"] = code_hash(generators)
    return sha256_json(ident)


def run(sources: list[SourceSpec], output_dir: str | os.PathLike, *, seed: int = 1234, progress: bool = True) -> dict:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fps = {s.name: _source_fingerprint(s, seed) for s in sources}
    fp = sha256_json(fps)
    done = completed_manifest(out, fp)
    if done is not None:
        return done
    old = {}
    if (out / MANIFEST).exists():
        try:
            old = read_json(out / MANIFEST).get("sources", {})
        except Exception:
            old = {}
    t0 = time.time()
    records, outputs, timing = {}, {}, {}
    for s in sources:
        fname = f"{s.name}.parquet"
        prev = old.get(s.name)
        if prev and prev.get("fingerprint") == fps[s.name] and (out / fname).exists() \
                and sha256_file(out / fname) == prev["output"]["sha256"]:
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
    # files of sources no longer in the spec are left alone but no longer listed
    manifest = {"stage": STAGE, "fingerprint": fp, "sources": records, "outputs": outputs,
                "counts": {"rows": {k: v["rows"] for k, v in records.items()},
                           "total_rows": sum(v["rows"] for v in records.values())}}
    timing["total_s"] = round(time.time() - t0, 3)
    return finish_stage(out, manifest, timing)


def read_source(output_dir: str | os.PathLike, name: str) -> pa.Table:
    return pq.read_table(Path(output_dir) / f"{name}.parquet")


__all__ = ["run", "read_source", "local_files", "IngestError"]
