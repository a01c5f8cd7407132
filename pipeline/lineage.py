"""Lineage of a data run: where every training row came from, and why every dropped row was dropped.

Reads the stage folders of a run (`<run>/<stage>/`) and accounts for every row:
- per source: rows ingested (+ the direct copies a source's `emit: both` adds) = rows normalized + rows
  rejected by normalize (by reason; e.g. `no_final_answer`: a direct row or copy whose final answer, "####"
  or \\boxed{}, was not found in the response);
- per stratum: rows stratified = rows packed + rows removed, by stage and reason (dedup's exact and
  near duplicates with the id of the copy kept, tokenizer rejects, rows dropped by decontamination
  because they make a benchmark item dirty, mix's capped rows, pack's short responses and overlong
  prompts).
Each row is removed at most once and never both removed and packed; a row that is neither is reported
as unaccounted (the run's lineage then does not balance, and `check` says so).

Outputs (`<run>/lineage/`): `lineage.parquet` (one line per stratified row: id, source, stratum, status,
stage, reason, detail, duplicate_of, times_packed), `lineage.json` (the per-source and per-stratum tables,
with examples of removed rows per stage and reason) and `lineage.md` (the same as a readable report).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from .io import code_closure, file_record, finish_stage, fingerprint, open_stage
from .io import read_json, write_json
from .runs import RUN_MANIFEST, read_run, stage_dir

STAGE = "lineage"
REMOVAL_STAGES = ("stratify", "dedup", "tokenizer", "contamination", "mix", "pack")
REMOVAL_FILES = ("rejects.parquet", "removals.parquet")


class LineageError(RuntimeError):
    pass


Stages = dict[str, Path]


def stage_dirs(run: str | os.PathLike | Stages) -> Stages:
    """The stage folders of a run: given as {stage: folder}, or found from a run folder (its run
    manifest names each stage's version; a folder without one is read as `<run>/<stage>/`)."""
    if isinstance(run, dict):
        return {k: Path(v) for k, v in run.items()}
    run = Path(run)
    if (run / RUN_MANIFEST).exists():
        ents = read_run(run).get("stages", {})
        return {st: stage_dir(run, st, check=False) for st in ents if st in ("normalize", *REMOVAL_STAGES)}
    return {st: run / st for st in ("normalize", *REMOVAL_STAGES) if (run / st).exists()}


def removal_stages(run: str | os.PathLike | Stages) -> list[str]:
    """The removal stages of this run. The contamination folder counts only when pack read its rows
    (decontamination on); a check-only contamination folder, or one left from an earlier run, removes
    nothing."""
    d = stage_dirs(run)
    pm = d["pack"] / "manifest.json" if "pack" in d else None
    packed_from = read_json(pm).get("inputs", {}).get("tokenized") if pm is not None and pm.exists() else None
    used = (packed_from is not None and "contamination" in d
            and Path(packed_from).resolve() == d["contamination"].resolve())
    return [st for st in REMOVAL_STAGES if st in d and (st != "contamination" or used)]


def _removals(d: Stages) -> pl.DataFrame:
    frames = []
    for st in removal_stages(d):
        for name in REMOVAL_FILES:
            f = d[st] / name
            if f.exists():
                df = pl.read_parquet(f, columns=["id", "stage", "reason", "detail", "duplicate_of"])
                frames.append(df.with_columns(stage=pl.lit(st)))
    if not frames:
        return pl.DataFrame(schema={"id": pl.String, "stage": pl.String, "reason": pl.String,
                                    "detail": pl.String, "duplicate_of": pl.String})
    return pl.concat(frames)


def _packed_counts(d: Stages) -> pl.DataFrame:
    ids: list[pa.Array] = []
    for f in sorted(d["pack"].glob("shard-*.arrow")):
        with ipc.open_file(pa.memory_map(str(f), "r")) as r:
            t = r.read_all()
        ids.append(t.column("sample_ids").combine_chunks().flatten())
    if not ids:
        return pl.DataFrame(schema={"id": pl.String, "times_packed": pl.UInt32})
    s = pl.Series("id", pa.concat_arrays(ids))
    return s.value_counts(name="times_packed").with_columns(pl.col("times_packed").cast(pl.UInt32))


def build(run_dir: str | os.PathLike | Stages) -> tuple[pl.DataFrame, dict]:
    """Per-row lineage and the summary tables of a run (stages through pack): a run folder or
    {stage: folder}."""
    d = stage_dirs(run_dir)
    for st in ("normalize", "stratify", "pack"):
        if st not in d or not (d[st] / "manifest.json").exists():
            raise LineageError(f"lineage: no finished {st} stage folder ({d.get(st, 'missing')})")
    rows = pl.read_parquet(d["stratify"] / "rows.parquet", columns=["id", "source", "stratum"])
    rem = _removals(d)
    twice = rem.group_by("id").len().filter(pl.col("len") > 1)
    packed = _packed_counts(d)
    df = _lineage_batch(rows, rem.unique("id", keep="first", maintain_order=True), packed)

    norm_man = read_json(d["normalize"] / "manifest.json")
    norm = norm_man["counts"]["per_source"]
    per_source = {}
    for src, c in norm.items():
        sub = df.filter(pl.col("source") == src)
        by = (sub.filter(pl.col("status") == "removed").group_by("stage", "reason").len()
              .sort("stage", "reason").to_dicts())
        per_source[src] = {
            "ingested": c["in"], "rejected_at_normalize": c["reasons"], "stratified": sub.height,
            **({"direct_copies": c["direct_copies"]} if c.get("direct_copies") else {}),
            "packed": sub.filter(pl.col("status") == "packed").height,
            "removed": sub.filter(pl.col("status") == "removed").height,
            "removed_by": {f"{r['stage']}:{r['reason']}": r["len"] for r in by},
        }
    per_stratum = {}
    for key, sub in sorted(df.group_by("stratum"), key=lambda kv: kv[0][0]):
        name = key[0]
        reasons = (sub.filter(pl.col("status") == "removed").group_by("stage", "reason").len()
                   .sort("stage", "reason").to_dicts())
        entry = {
            "in": sub.height,
            "packed": sub.filter(pl.col("status") == "packed").height,
            "times_packed": int(sub["times_packed"].sum()),
            "removed": {f"{r['stage']}:{r['reason']}": r["len"] for r in reasons},
            "unaccounted": sub.filter(pl.col("status") == "unaccounted").height,
            "conflicts": sub.filter(pl.col("status") == "conflict").height,
        }
        entry["balanced"] = entry["in"] == entry["packed"] + sum(entry["removed"].values())
        per_stratum[name] = entry
    stray = packed.join(rows, on="id", how="anti").height  # packed ids that never were stratified rows
    summary = {
        "rows_stratified": rows.height,
        "rows_packed": df.filter(pl.col("status") == "packed").height,
        "rows_removed": df.filter(pl.col("status") == "removed").height,
        "unaccounted": df.filter(pl.col("status") == "unaccounted")["id"].head(20).to_list(),
        "conflicts": df.filter(pl.col("status") == "conflict")["id"].head(20).to_list(),
        "removed_twice": twice["id"].head(20).to_list(),
        "packed_ids_not_in_stratify": stray,
        "per_source": per_source,
        "per_stratum": per_stratum,
    }
    examples = {}
    removed = df.filter(pl.col("status") == "removed")
    for key, sub in sorted(removed.group_by("stage", "reason"), key=lambda kv: kv[0]):
        examples[f"{key[0]}:{key[1]}"] = sub.head(3).select("id", "source", "detail", "duplicate_of").to_dicts()
    summary["examples"] = examples
    summary["warnings"] = norm_man.get("warnings") or []  # empty sources and files, from ingest/normalize
    summary["balanced"] = (not summary["unaccounted"] and not summary["conflicts"] and not summary["removed_twice"]
                           and stray == 0 and all(v["balanced"] for v in per_stratum.values()))
    return df, summary


def _lineage_batch(rows: pl.DataFrame, rem_first: pl.DataFrame, packed: pl.DataFrame) -> pl.DataFrame:
    """`build`'s per-row lineage of some stratified rows."""
    df = (rows.join(rem_first, on="id", how="left")
          .join(packed, on="id", how="left")
          .with_columns(times_packed=pl.col("times_packed").fill_null(0)))
    df = df.with_columns(
        status=pl.when(pl.col("reason").is_not_null() & (pl.col("times_packed") > 0)).then(pl.lit("conflict"))
        .when(pl.col("reason").is_not_null()).then(pl.lit("removed"))
        .when(pl.col("times_packed") > 0).then(pl.lit("packed"))
        .otherwise(pl.lit("unaccounted")))
    return df.select("id", "source", "stratum", "status", "stage", "reason", "detail", "duplicate_of", "times_packed")


_HASH_SEED = 0x11E4_6E  # the id hash that splits the rows, removals and packed ids into buckets
_BUCKET_ENTRY_BYTES = 256  # memory per id of a bucket while it is joined (id, hash tables, join output)
_MAX_BUCKETS = 1000  # spill files open at once (a process may have 1024)
_ROW_BYTES = 1024  # memory per stratified row of a batch of the lineage (joins, group-bys, Arrow copy, writer)
_MIN_BUCKET = _MIN_RANGE = 1 << 14  # ids of a bucket, rows of a range at least (4 MB: more would only add parts)
_RESULT_ROW_BYTES = 256  # memory per joined row of a range read back (row, id, removal; its parts and sorted copy)


def _bucket_rows(memory_gb: float | None) -> int:
    """Ids of a bucket joined in memory at once (and of a batch split into buckets): the budget's
    LINEAGE_SHARE at _BUCKET_ENTRY_BYTES an id."""
    from . import budget

    n = int(budget.usable_bytes(memory_gb) * budget.LINEAGE_SHARE / _BUCKET_ENTRY_BYTES)
    return min(budget.MAX_ROWS, max(_MIN_BUCKET, n))


def _batch_rows(memory_gb: float | None) -> int:
    """Stratified rows of a batch of the lineage: the budget's LINEAGE_SHARE at _ROW_BYTES a row."""
    from . import budget

    n = int(budget.usable_bytes(memory_gb) * budget.LINEAGE_SHARE / _ROW_BYTES)
    return min(budget.MAX_ROWS, max(budget.MIN_ROWS, n))


def _range_rows(memory_gb: float | None) -> int:
    """Row numbers of a range of the joined rows, read back a range at a time (all buckets' rows of a
    range: about this many rows held): the budget's LINEAGE_SHARE at _RESULT_ROW_BYTES a row. Larger
    than a batch (a joined row is lighter than a row of a batch being joined and written), so that each
    bucket's part of a range is not a handful of rows."""
    from . import budget

    n = int(budget.usable_bytes(memory_gb) * budget.LINEAGE_SHARE / _RESULT_ROW_BYTES)
    return max(_MIN_RANGE, n)


def _bucket_of(ids: pa.Array | pa.ChunkedArray, n_buckets: int) -> np.ndarray:
    """The bucket of each id (a hash of the id mod n_buckets), as int64."""
    if n_buckets == 1:
        return np.zeros(len(ids), np.int64)
    h = pl.Series("id", ids, dtype=pl.String).hash(_HASH_SEED).to_numpy()
    return (h % np.uint64(n_buckets)).astype(np.int64)


class _BucketFiles:
    """One Arrow IPC file per bucket, written a batch at a time: `write(table)` splits the rows of
    `table` by the bucket of their id."""

    def __init__(self, folder: Path, name: str, schema: pa.Schema, n_buckets: int):
        self.paths = [folder / f"{name}-{k:04d}.arrow" for k in range(n_buckets)]
        self.sinks = [pa.OSFile(str(q), "wb") for q in self.paths]
        self.writers = [ipc.new_file(snk, schema) for snk in self.sinks]
        self.n = n_buckets

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        b = _bucket_of(table.column("id"), self.n)
        order = np.argsort(b, kind="stable")
        bounds = np.searchsorted(b[order], np.arange(self.n + 1))
        table = table.take(pa.array(order))  # one copy in bucket order, written a slice per bucket
        for k in range(self.n):
            if bounds[k + 1] > bounds[k]:
                self.writers[k].write_table(table.slice(bounds[k], bounds[k + 1] - bounds[k]))

    def close(self) -> None:
        for w, snk in zip(self.writers, self.sinks):
            w.close()
            snk.close()


def _read_ipc(path: Path) -> pa.Table:
    with pa.OSFile(str(path), "rb") as f:
        return ipc.open_file(f).read_all()


class _JoinedRanges:
    """The joined rows of all buckets (each bucket's file sorted by row number, one record batch per
    range of `range_rows` row numbers that has rows: `batch_of[k, j]` is bucket k's batch of range j, or
    -1), read forward a range at a time: a range's parts of every bucket are put together and sorted by
    row number, and batches of the lineage are sliced from it. What is held is one range of joined rows,
    and each bucket's file is read once, a record batch a range, whatever the number of buckets."""

    def __init__(self, paths: list[Path], batch_of: np.ndarray, range_rows: int):
        self.files = [pa.OSFile(str(q), "rb") for q in paths]
        self.readers = [ipc.open_file(f) for f in self.files]
        self.batch_of, self.range_rows = batch_of, range_rows
        self.j = 0  # the next range to read
        self.cur: pa.Table | None = None  # the range read last, from row `self.at` on not taken yet
        self.rows: np.ndarray | None = None  # its row numbers
        self.at = 0

    def take(self, hi: int) -> list[pa.Table]:
        """The rows numbered below `hi` not taken yet."""
        import pyarrow.compute as pc

        out = []
        while True:
            if self.cur is None:
                if self.j >= self.batch_of.shape[1] or self.j * self.range_rows >= hi:
                    return out
                parts = [self.readers[k].get_batch(int(i)) for k, i in enumerate(self.batch_of[:, self.j]) if i >= 0]
                self.j += 1
                if not parts:
                    continue
                t = pa.Table.from_batches(parts)
                del parts
                self.cur = t.take(pc.sort_indices(t.column("_row")))
                del t
                self.rows = self.cur.column("_row").to_numpy()
                self.at = 0
            k = int(np.searchsorted(self.rows, hi, side="left"))
            if k > self.at:
                out.append(self.cur.slice(self.at, k - self.at))
            if k < len(self.rows):
                self.at = k
                return out
            self.cur = self.rows = None

    def close(self) -> None:
        for f in self.files:
            f.close()


_REM_SCHEMA = pa.schema([("_rem", pa.int64()), ("id", pa.large_string()), ("stage", pa.large_string()),
                         ("reason", pa.large_string()), ("detail", pa.large_string()),
                         ("duplicate_of", pa.large_string())])


def _join_buckets(d: Stages, stratify_rows: Path, spill: Path, memory_gb: float | None,
                  bucket_entries: int | None = None, range_rows: int | None = None,
                  ) -> tuple[list[Path], np.ndarray, list[str], int]:
    """Out-of-core join of the stratified rows with the removals and the packed ids: all three are split
    into buckets by a hash of the id (spill files), and each bucket is joined in memory. Returns per
    bucket a file of the stratified rows that are removed or packed (row number `_row`, id, the first
    removal of the id: stage, reason, detail, duplicate_of, and its times_packed), sorted by row number
    and cut into one record batch per range of `range_rows` row numbers (with the (bucket, range) ->
    batch index, -1 where a bucket has no row in a range); the first 20 ids removed more than once (in
    the removals' order) and the count of packed ids that are no stratified row.
    Buckets hold about `bucket_entries` ids (default: budget.LINEAGE_SHARE of the budget), so that the
    peak is a bucket's join or a range's rows whatever the row count."""
    import pyarrow.parquet as pq

    per_bucket = bucket_entries or _bucket_rows(memory_gb)
    range_rows = range_rows or _range_rows(memory_gb)
    batch = _bucket_rows(memory_gb)
    pf = pq.ParquetFile(stratify_rows, pre_buffer=False)
    n_rows = pf.metadata.num_rows
    rem_files = [(st, d[st] / name) for st in removal_stages(d) for name in REMOVAL_FILES if (d[st] / name).exists()]
    shards = sorted(d["pack"].glob("shard-*.arrow"))
    n_pack = 0
    for f in shards:
        with pa.OSFile(str(f), "rb") as src:
            r = ipc.open_file(src)
            sids = r.schema.get_field_index("sample_ids")
            n_pack += sum(len(r.get_batch(i).column(sids).flatten()) for i in range(r.num_record_batches))
    n_rem = sum(pq.ParquetFile(f).metadata.num_rows for _, f in rem_files)
    # at most _MAX_BUCKETS open files at a time (4 GB: buckets of ~235k ids, so ~235M ids before they grow)
    n_buckets = min(_MAX_BUCKETS, max(1, -(-(n_rows + n_rem + n_pack) // per_bucket)))

    rows_b = _BucketFiles(spill, "rows", pa.schema([("_row", pa.int64()), ("id", pa.large_string())]), n_buckets)
    try:
        at = 0
        for b in pf.iter_batches(batch_size=batch, columns=["id"], use_threads=False):
            ids = b.column(0).cast(pa.large_string())
            rows_b.write(pa.table({"_row": pa.array(np.arange(at, at + len(ids), dtype=np.int64)), "id": ids}))
            at += len(ids)
            del ids, b
    finally:
        rows_b.close()
    rem_b = _BucketFiles(spill, "rem", _REM_SCHEMA, n_buckets)
    try:
        at = 0
        for st, f in rem_files:
            rf = pq.ParquetFile(f, pre_buffer=False)
            for b in rf.iter_batches(batch_size=batch, columns=["id", "reason", "detail", "duplicate_of"],
                                     use_threads=False):
                n = b.num_rows
                cols = {c: b.column(c).cast(pa.large_string()) for c in ("id", "reason", "detail", "duplicate_of")}
                rem_b.write(pa.table({"_rem": pa.array(np.arange(at, at + n, dtype=np.int64)), "id": cols["id"],
                                      "stage": pa.repeat(pa.scalar(st, pa.large_string()), n),
                                      "reason": cols["reason"], "detail": cols["detail"],
                                      "duplicate_of": cols["duplicate_of"]}, schema=_REM_SCHEMA))
                at += n
                del cols, b
    finally:
        rem_b.close()
    pack_b = _BucketFiles(spill, "packed", pa.schema([("id", pa.large_string())]), n_buckets)
    try:
        for f in shards:
            with pa.OSFile(str(f), "rb") as src:  # read, not mapped: a mapped shard's pages stay in the RSS
                r = ipc.open_file(src)
                sids = r.schema.get_field_index("sample_ids")
                for i in range(r.num_record_batches):
                    ids = r.get_batch(i).column(sids).flatten().cast(pa.large_string())
                    for lo in range(0, len(ids), batch):
                        pack_b.write(pa.table({"id": ids.slice(lo, batch)}))
                    del ids
    finally:
        pack_b.close()

    n_ranges = max(1, -(-n_rows // range_rows))
    bounds = np.arange(n_ranges + 1, dtype=np.int64) * range_rows
    batch_of = np.full((n_buckets, n_ranges), -1, np.int32)
    results, twice, stray = [], [], 0
    for k in range(n_buckets):
        rows = pl.from_arrow(_read_ipc(rows_b.paths[k]))
        rem = pl.from_arrow(_read_ipc(rem_b.paths[k])).sort("_rem")
        packed = pl.from_arrow(_read_ipc(pack_b.paths[k]))
        for q in (rows_b.paths[k], rem_b.paths[k], pack_b.paths[k]):
            q.unlink()
        twice += (rem.group_by("id").agg(pl.len(), pl.col("_rem").min()).filter(pl.col("len") > 1)
                  .select("_rem", "id").rows())
        rem_first = (rem.unique("id", keep="first", maintain_order=True).drop("_rem")
                     .with_columns(_r=pl.lit(True)))
        del rem
        counts = (packed["id"].value_counts(name="times_packed")
                  .with_columns(pl.col("times_packed").cast(pl.UInt32)))
        del packed
        stray += counts.join(rows, on="id", how="anti").height
        res = (rows.join(rem_first, on="id", how="left").join(counts, on="id", how="left")
               .filter(pl.col("_r").is_not_null() | pl.col("times_packed").is_not_null())
               .sort("_row"))
        del rows, rem_first, counts
        path = spill / f"joined-{k:04d}.arrow"
        t = res.to_arrow()
        del res
        cuts = np.searchsorted(t.column("_row").to_numpy(), bounds)
        with pa.OSFile(str(path), "wb") as snk, ipc.new_file(snk, t.schema) as w:
            written = 0
            for j in range(n_ranges):
                if cuts[j + 1] > cuts[j]:
                    w.write_batch(t.slice(int(cuts[j]), int(cuts[j + 1] - cuts[j])).combine_chunks().to_batches()[0])
                    batch_of[k, j] = written
                    written += 1
        del t
        results.append(path)
        pa.default_memory_pool().release_unused()
    twice_ids = [i for _, i in sorted(twice)[:20]]
    return results, batch_of, twice_ids, stray


def build_streaming(run_dir: str | os.PathLike | Stages, rows_path: str | os.PathLike | None = None, *,
                    memory_gb: float | None = None, progress: bool = False,
                    bucket_entries: int | None = None, batch_rows: int | None = None,
                    range_rows: int | None = None) -> tuple[dict, dict | None]:
    """`build` with the stratified rows read a batch at a time: the per-row lineage is written to
    `rows_path` row group by row group (byte-identical to `build`'s table written whole) and the
    summary is summed over the batches. Returns (summary, file record of rows_path or None).
    The removals and packed ids are joined with the stratified rows out of core (`_join_buckets`:
    buckets of about `bucket_entries` ids, by default budget.LINEAGE_SHARE of the budget), so that what
    is held is a batch of rows (`batch_rows`, by default budget.LINEAGE_SHARE of the budget), a bucket
    and a range of the joined rows (`range_rows`), whatever the row count; the report keeps counts and the first few examples only."""
    import shutil
    import tempfile

    d = stage_dirs(run_dir)
    for st in ("normalize", "stratify", "pack"):
        if st not in d or not (d[st] / "manifest.json").exists():
            raise LineageError(f"lineage: no finished {st} stage folder ({d.get(st, 'missing')})")
    range_rows = range_rows or _range_rows(memory_gb)
    spill = Path(tempfile.mkdtemp(prefix=".lineage-spill-", dir=Path(rows_path).parent if rows_path else None))
    try:
        joined, batch_of, removed_twice, stray = _join_buckets(d, d["stratify"] / "rows.parquet", spill, memory_gb,
                                                               bucket_entries, range_rows)
        ranges = _JoinedRanges(joined, batch_of, range_rows)
        try:
            return _stream_rows(d, rows_path, ranges, removed_twice, stray, batch_rows or _batch_rows(memory_gb),
                                progress)
        finally:
            ranges.close()
    finally:
        shutil.rmtree(spill, ignore_errors=True)


_EMPTY_REM = {"id": pl.String, "stage": pl.String, "reason": pl.String, "detail": pl.String,
              "duplicate_of": pl.String}


def _stream_rows(d: Stages, rows_path, ranges: _JoinedRanges, removed_twice: list[str], stray: int,
                 batch_rows: int, progress: bool) -> tuple[dict, dict | None]:
    """The per-row lineage and the summary, the stratified rows a batch at a time, each batch joined with
    the joined rows of its rows (`ranges`)."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from .io import RowGroupWriter

    pf = pq.ParquetFile(d["stratify"] / "rows.parquet", pre_buffer=False)
    n_rows = pf.metadata.num_rows
    status_n: dict[str, int] = {}
    by_source: dict[tuple, int] = {}  # (source, status) and (source, "removed", stage, reason)
    by_stratum: dict[tuple, int] = {}
    times_packed: dict[str, int] = {}
    firsts: dict[str, list] = {"unaccounted": [], "conflict": []}
    examples: dict[tuple, list] = {}
    sources: set = set()
    empty_rem = pl.DataFrame(schema=_EMPTY_REM)
    empty_packed = pl.DataFrame(schema={"id": pl.String, "times_packed": pl.UInt32})
    writer = RowGroupWriter(rows_path, None) if rows_path is not None else None
    pool = pa.default_memory_pool()
    bar = tqdm(total=n_rows, desc="lineage", unit="row", unit_scale=True, disable=not progress)
    at = 0
    try:
        if writer is not None:
            writer.__enter__()
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["id", "source", "stratum"], use_threads=False):
            rows = pl.from_arrow(pa.Table.from_batches([batch]))
            at += batch.num_rows
            parts = ranges.take(at)
            hits = pl.from_arrow(pa.concat_tables(parts)) if parts else None
            if hits is not None:
                rem_sub = (hits.filter(pl.col("_r").is_not_null()).select(list(_EMPTY_REM))
                           .unique("id", keep="first", maintain_order=True))
                packed_sub = (hits.filter(pl.col("times_packed").is_not_null()).select("id", "times_packed")
                              .unique("id", keep="first", maintain_order=True))
            else:
                rem_sub, packed_sub = empty_rem, empty_packed
            df = _lineage_batch(rows, rem_sub, packed_sub)
            if writer is not None:
                t = df.to_arrow()
                if writer.schema is None:
                    writer.schema = t.schema
                writer.write(t)
            for r in df.group_by("status").len().iter_rows():
                status_n[r[0]] = status_n.get(r[0], 0) + r[1]
            for r in df.group_by("source", "status").len().iter_rows():
                sources.add(r[0])
                by_source[(r[0], r[1])] = by_source.get((r[0], r[1]), 0) + r[2]
            removed = df.filter(pl.col("status") == "removed")
            for r in removed.group_by("source", "stage", "reason").len().iter_rows():
                k = (r[0], "removed", r[1], r[2])
                by_source[k] = by_source.get(k, 0) + r[3]
            for r in df.group_by("stratum", "status").len().iter_rows():
                by_stratum[(r[0], r[1])] = by_stratum.get((r[0], r[1]), 0) + r[2]
            for r in removed.group_by("stratum", "stage", "reason").len().iter_rows():
                k = (r[0], "removed", r[1], r[2])
                by_stratum[k] = by_stratum.get(k, 0) + r[3]
            for r in df.group_by("stratum").agg(pl.col("times_packed").sum()).iter_rows():
                times_packed[r[0]] = times_packed.get(r[0], 0) + int(r[1])
            for st in ("unaccounted", "conflict"):
                if len(firsts[st]) < 20:
                    firsts[st] += df.filter(pl.col("status") == st)["id"].head(20 - len(firsts[st])).to_list()
            for key, sub in removed.group_by("stage", "reason"):
                got = examples.setdefault(key, [])
                if len(got) < 3:
                    got += sub.head(3 - len(got)).select("id", "source", "detail", "duplicate_of").to_dicts()
            bar.update(batch.num_rows)
            del rows, hits, parts, df, removed
            pool.release_unused()  # the batch's Arrow buffers back to the system: a flat peak over the batches
        if writer is not None:
            if writer.schema is None:  # no stratified row: the empty table's schema
                writer.schema = _lineage_batch(pl.from_arrow(pf.schema_arrow.empty_table().select(
                    ["id", "source", "stratum"])), empty_rem, empty_packed).to_arrow().schema
            writer.__exit__(None, None, None)
    except BaseException as e:
        if writer is not None:
            writer.__exit__(type(e), e, e.__traceback__)
        raise
    finally:
        bar.close()

    norm_man = read_json(d["normalize"] / "manifest.json")
    per_source = {}
    for src, c in norm_man["counts"]["per_source"].items():
        removed_by = {f"{k[2]}:{k[3]}": v for k, v in sorted(
            ((k, v) for k, v in by_source.items() if len(k) == 4 and k[0] == src), key=lambda kv: kv[0][2:])}
        per_source[src] = {
            "ingested": c["in"], "rejected_at_normalize": c["reasons"],
            "stratified": sum(v for k, v in by_source.items() if len(k) == 2 and k[0] == src),
            **({"direct_copies": c["direct_copies"]} if c.get("direct_copies") else {}),
            "packed": by_source.get((src, "packed"), 0),
            "removed": by_source.get((src, "removed"), 0),
            "removed_by": removed_by,
        }
    per_stratum = {}
    for name in sorted({k[0] for k in by_stratum}):
        reasons = {f"{k[2]}:{k[3]}": v for k, v in sorted(
            ((k, v) for k, v in by_stratum.items() if len(k) == 4 and k[0] == name), key=lambda kv: kv[0][2:])}
        entry = {
            "in": sum(v for k, v in by_stratum.items() if len(k) == 2 and k[0] == name),
            "packed": by_stratum.get((name, "packed"), 0),
            "times_packed": times_packed.get(name, 0),
            "removed": reasons,
            "unaccounted": by_stratum.get((name, "unaccounted"), 0),
            "conflicts": by_stratum.get((name, "conflict"), 0),
        }
        entry["balanced"] = entry["in"] == entry["packed"] + sum(entry["removed"].values())
        per_stratum[name] = entry
    summary = {
        "rows_stratified": n_rows,
        "rows_packed": status_n.get("packed", 0),
        "rows_removed": status_n.get("removed", 0),
        "unaccounted": firsts["unaccounted"],
        "conflicts": firsts["conflict"],
        "removed_twice": removed_twice,
        "packed_ids_not_in_stratify": stray,
        "per_source": per_source,
        "per_stratum": per_stratum,
        "examples": {f"{k[0]}:{k[1]}": v for k, v in sorted(examples.items())},
    }
    summary["warnings"] = norm_man.get("warnings") or []
    summary["balanced"] = (not summary["unaccounted"] and not summary["conflicts"] and not summary["removed_twice"]
                           and stray == 0 and all(v["balanced"] for v in per_stratum.values()))
    return summary, (writer.record if writer is not None else None)


def run(run_dir: str | os.PathLike | Stages, output_dir: str | os.PathLike | None = None, *, progress: bool = True,
        title: str | None = None, versioned: bool = False, force: bool = False, memory_gb: float | None = None) -> dict:
    """Account for every row of a run (a run folder, or {stage: folder}) into OUTPUT_DIR (default
    `<run>/lineage`)."""
    if output_dir is None and isinstance(run_dir, dict):
        raise ValueError("lineage: give output_dir when the stage folders are given one by one")
    d = stage_dirs(run_dir)
    name = title or (Path(run_dir).name if not isinstance(run_dir, dict) else "run")
    inputs = {st: str(d[st]) for st in ("normalize", "stratify", *removal_stages(d)) if st in d}
    fp = fingerprint(STAGE, code_closure(sys.modules[__name__]), {}, inputs)
    out, done = open_stage(output_dir or Path(run_dir) / STAGE, fp, versioned=versioned, force=force)
    if done is not None:
        return done
    t0 = time.time()
    summary, rows_rec = build_streaming(d, out / "lineage.parquet", memory_gb=memory_gb, progress=progress)
    write_json(summary, out / "lineage.json")
    (out / "lineage.md").write_text(report_markdown(summary, f"Lineage of {name}"))
    outputs = {"lineage.parquet": rows_rec,
               "lineage.json": file_record(out / "lineage.json"), "lineage.md": file_record(out / "lineage.md")}
    counts = {k: summary[k] for k in ("rows_stratified", "rows_packed", "rows_removed", "balanced")}
    manifest = {"stage": STAGE, "fingerprint": fp, "outputs": outputs, "counts": counts}
    return finish_stage(out, manifest, {"total_s": round(time.time() - t0, 3)})


def _fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in d.items()) or "-"


def report_markdown(summary: dict, title: str = "Lineage") -> str:
    """A readable lineage report: totals, per source, per stratum, and example removed rows."""
    s = summary
    lines = [f"# {title}", "",
             f"**{s['rows_stratified']:,}** rows stratified = **{s['rows_packed']:,}** packed + "
             f"**{s['rows_removed']:,}** removed. Balanced: **{s['balanced']}**"
             + ("" if s["balanced"] else f" (unaccounted {s['unaccounted']}, conflicts {s['conflicts']}, "
                f"removed twice {s['removed_twice']})"), "",
             "## Per source", "",
             "| source | ingested | rejected at normalize | stratified | packed | removed |", "|---|---:|---|---:|---:|---|"]
    for src, c in s["per_source"].items():
        rej = c["rejected_at_normalize"]
        copies = f" (+{c['direct_copies']:,} direct copies)" if c.get("direct_copies") else ""
        lines.append(f"| {src} | {c['ingested']:,}{copies} | {sum(rej.values()):,} ({_fmt(rej)}) | {c['stratified']:,} | "
                     f"{c['packed']:,} | {c['removed']:,} ({_fmt(c.get('removed_by', {}))}) |")
    # the normalize manifest's warnings when the summary carries them, else the sources it counts as empty
    warns = [w["message"] if isinstance(w, dict) else str(w) for w in s.get("warnings") or []] or [
        f"source '{src}' is empty: 0 rows" for src, c in s["per_source"].items() if c["ingested"] == 0]
    if warns:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in warns)]
    lines += ["", "## Per stratum", "", "| stratum | in | packed | times packed | removed |", "|---|---:|---:|---:|---|"]
    for name, st in s["per_stratum"].items():
        lines.append(f"| {name} | {st['in']:,} | {st['packed']:,} | {st['times_packed']:,} | "
                     f"{sum(st['removed'].values()):,} ({_fmt(st['removed'])}) |")
    if s.get("examples"):
        lines += ["", "## Examples of removed rows", "", "| stage:reason | id | source | detail | duplicate of |",
                  "|---|---|---|---|---|"]
        for why, rows in s["examples"].items():
            for r in rows:
                detail = (r.get("detail") or "").replace("|", "\\|")[:120]
                lines.append(f"| {why} | {r['id']} | {r['source']} | {detail} | {r.get('duplicate_of') or ''} |")
    return "\n".join(lines) + "\n"


def check(run_dir: str | os.PathLike) -> None:
    """Raise LineageError unless every row of the run is accounted for exactly once (streamed: a batch of
    rows and a bucket of ids in memory at a time)."""
    s, _ = build_streaming(run_dir)
    if not s["balanced"]:
        bad = {k: v for k, v in s["per_stratum"].items() if not v["balanced"]}
        raise LineageError(f"lineage does not balance: unaccounted={s['unaccounted']} conflicts={s['conflicts']} "
                           f"removed_twice={s['removed_twice']} strata={list(bad)[:10]}")
