"""dedup: exact dedup (normalized text) then MinHash-LSH near dedup, across all strata.

Rows are ranked by `priority` (lower wins: the source's position in the spec) when the column exists,
else by input order, ties broken by input order. Of each group of duplicates the best-ranked row is
kept; every other row is written to removals.parquet with the id of the kept row.

1. exact:  rows whose normalized text (instruction + SEP + response, lowercased when cfg.lowercase,
           runs of whitespace collapsed, trimmed) equals a better-ranked row's.
2. near:   among the exact survivors (text = instruction + newline + response), two rows are near
           duplicates when the Jaccard similarity of their sets of word cfg.ngram-gram shingles is
           >= cfg.threshold. Five steps that talk through files in the output folder so each can be
           rerun or scaled out alone:
   a. signatures  signatures/part-NNNNN.npy: (rows, num_perm) uint32 per part of PART_ROWS documents,
                  computed by cfg.workers processes from signatures/docs.arrow (the texts, rank order),
                  or, for a JSONL input, from the rows the first pass spilled (`SpillDocs`: the
                  instruction and response hashed without being joined; the same signatures).
   b. buckets     buckets/candidates.parquet (a, b, estimated_jaccard): the pairs sharing an LSH bucket.
   c. verify      verify/pairs.parquet (a, b, jaccard, accepted): each candidate's similarity and
                  whether it is a near duplicate (see below).
   d. clusters    union-find over the accepted pairs -> clusters.parquet (id, cluster_id = kept id),
                  one row per member of every cluster with more than one member.
   e. filter      rows.parquet (kept rows, input columns and order), removals.parquet.

Verification (cfg.verify):
- "exact" (default): the exact Jaccard of the two documents' shingle sets (the same 32-bit shingle
  hashes the signatures are computed from, `minhash.shingle_sets`), computed for the candidate pairs
  only; a pair is accepted when it is >= cfg.threshold, so the threshold means what it says. The
  banding makes a pair at the threshold a candidate with probability >= MIN_RECALL. (Two different
  shingles share a 32-bit hash with probability 2^-32: for two 200-shingle documents, about once in
  100,000 pairs, and then the Jaccard is off by 1/400.)
- "estimate": the MinHash estimate (fraction of equal signature entries), accepted when it is
  >= threshold - VERIFY_Z standard errors, so that pairs truly at the threshold are not lost to
  estimation noise. Looser: it does not read the texts a second time, but pairs whose true Jaccard is
  below the threshold get through (about 0.73 at threshold 0.8 with 128 permutations).

A cluster is a connected component of accepted pairs, so a removed row can be a near duplicate of the
kept row only through other rows (A~B, B~C, not A~C). The `detail` of a near-duplicate removal names
the row it was matched with (its neighbour on a shortest chain of accepted pairs to the kept row,
`minhash.match_tree`) and that pair's similarity; when that row is not the kept row, also the
similarity to the kept row, marked "(chain)" when it is below the threshold:
    matched src/12 at J=0.912
    matched src/40 at J=0.861; J to kept row 0.739 < 0.8 (chain)
(J is printed rounded down to 3 decimals, "est. J" with verify="estimate".)

Also written: rejects.parquet (rows the loader rejected), manifest.json (last) and timing.json.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from .. import minhash
from ..config import DedupConfig
from ..io import (
    atomic_path,
    open_stage,
    code_closure,
    fingerprint,
    finish_stage,
    read_json,
    write_json,
    write_parquet,
)
from .. import budget
from ..parquet_parallel import ParallelRowGroupWriter
from ..parts import MapParts
from ..rows import RowReader, _IdSet
from ..schema import REMOVAL_SCHEMA
from . import dedup_ooc

STAGE = "dedup"
PART_ROWS = 32_768  # documents per signature part
SEP = "\x1f"  # between instruction and response in the exact-dedup key
VERIFY_Z = 2.0  # verify="estimate" keeps pairs whose estimate is >= threshold - VERIFY_Z * std error
VERIFY_PAIRS = 8192  # candidate pairs whose texts are shingled at once by exact verification
MIN_RECALL = 0.99  # default banding: candidate probability at the threshold itself
DOCS_FILE = "docs.arrow"
EXACT_SLICE = 65_536  # rows whose normalized texts exist at once
BAND_SHARE = 1 / 4  # of the budget: the bands' keys and their sorts in the LSH bucket step
TAIL_THREADS = min(2, os.cpu_count() or 1)  # threads of the bucket and verify steps (bands, blocks of pairs)
CLUSTERS_SCHEMA = pa.schema(
    [pa.field("id", pa.string(), nullable=False), pa.field("cluster_id", pa.string(), nullable=False)]
)


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------
def run(
    input_path: str | os.PathLike, output_dir: str | os.PathLike, cfg: DedupConfig, *, progress: bool = True,
    versioned: bool = False, force: bool = False, memory_gb: float | None = None,
    map_parts: MapParts | None = None,
) -> dict:
    """Deduplicate `input_path` (a stage folder, .parquet or .jsonl in the normalized schema) into
    `output_dir`; returns the manifest (from a finished identical run without recomputing, if any).

    The rows stream (`memory_gb`, default `ResourcesConfig().memory_gb`, sizes the batches): a first
    pass hashes each batch for the exact step and writes its joined texts to a file (Parquet input; a
    JSONL input's rows are spilled as they are and read from there); the near step works from files
    (signatures/, buckets/, verify/); a second pass writes the kept rows row group by row group. Nothing
    is held per row (issue 13, `dedup_ooc`): the exact hashes, priorities and strata go to spill files,
    the id sets spill past their share of the budget, the LSH bands are split by key range when they
    pass theirs, and what is held is per duplicate (the removals and clusters, the ids they name) -- but
    for an input whose priorities decrease somewhere, whose rank order is held (8 bytes a row).

    With cfg.workers > 1 the signature parts are computed by processes started with multiprocessing's
    forkserver method, so a script calling this must guard its entry point (if __name__ == "__main__").
    cfg.workers and memory_gb are left out of the fingerprint: they never change the outputs.
    With `map_parts` (pipeline.parts), the signature parts are handed to it instead (after the first
    pass; cfg.workers is then not used)."""
    # workers only changes how fast the signatures are computed, never the outputs
    params = cfg.model_dump(exclude={"workers"})
    # the eager signature workers' forkserver starts now: its import of this module overlaps the
    # fingerprint's hash of the input and the first rows' parse; the workers are forked from it when
    # the first signature part is ready (`_EagerSignatures` starts its pool then)
    eager_on = cfg.near and cfg.workers > 1 and map_parts is None
    if eager_on:
        _start_forkserver()
    fp = fingerprint(STAGE, code_closure(sys.modules[__name__]), params, {"input": input_path})
    out, done = open_stage(output_dir, fp, versioned=versioned, force=force)
    if done is not None:
        return done
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    spill = out / "spill"
    shutil.rmtree(spill, ignore_errors=True)
    spill.mkdir(parents=True)

    # 1. one pass over the rows: exact-dedup hashes, priorities, strata, the texts to a file
    # with several workers, the signature parts are computed while the rows are read (_EagerSignatures)
    eager = None
    try:
        if eager_on:
            eager = _EagerSignatures(spill / "texts.arrow", out / "signatures", cfg, fp)
        first = _first_pass(input_path, spill, cfg, memory_gb, progress, eager)
    except BaseException:
        if eager is not None:
            eager.abandon()
        raise
    n, rejects = first.rows, first.rejects
    timing["load"] = time.perf_counter() - t0

    # 1. exact: the duplicates and their kept rows, one hash partition file at a time
    t = time.perf_counter()
    ex_rows = ex_keep = np.zeros(0, np.int64)  # ascending rows, the best-ranked identical row of each
    if first.exact is not None:
        ex_rows, ex_keep = first.exact.duplicates()
    first.exact = None
    # the near step's documents: the rows that are not exact duplicates, in rank order
    if first.priority is None or first.in_order:  # rank order is input order: nothing held per row
        docmap: dedup_ooc.ComplementRows | dedup_ooc.DenseRows = dedup_ooc.ComplementRows(ex_rows, n)
    else:  # priorities that decrease somewhere: the rank order of every row (8 bytes a row)
        rank = first.rank()
        docmap = dedup_ooc.DenseRows(rank[~dedup_ooc.in_sorted(ex_rows, rank)])
        del rank
    if first.priority is not None:
        first.priority.unlink()
    timing["exact"] = time.perf_counter() - t

    # 2. near, over the exact survivors in rank order
    t = time.perf_counter()
    z = np.zeros(0, np.int64)
    near_rows, near_keep, near_match, near_mj, near_j = z, z, z, np.zeros(0), np.zeros(0)
    members = member_root = z
    lsh_info: dict = {}
    D = docmap.size
    if cfg.near and D > 1:
        docs = out / "signatures" / DOCS_FILE
        # the texts file holds every row but the skipped ones: it is the docs file when the skipped rows
        # are exactly the exact duplicates and the rank order is the input order
        if isinstance(docmap, dedup_ooc.ComplementRows) and np.array_equal(first.skipped, ex_rows):
            if eager is not None:  # its parts are this docs file's (the workers read it by its path)
                eager.finish(D)
            if first.texts is not None:
                docs.parent.mkdir(parents=True, exist_ok=True)
                os.replace(first.texts, docs)
        else:
            if eager is not None:
                eager.abandon()
            if first.texts is not None:
                write_docs(_gather_docs(first.texts, first.skipped, docmap), docs)
        if first.texts is None:  # JSONL: the texts are read from the spilled rows
            docs = first.spill_docs(docmap)
        res = near_clusters(docs, out, cfg, key=fp, progress=progress, map_parts=map_parts, memory_gb=memory_gb)
        lsh_info = res.info
        dup = np.flatnonzero(res.root != res.docs)
        near_rows = docmap.rows(res.docs[dup])
        near_keep, near_match = docmap.rows(res.root[dup]), docmap.rows(res.match[dup])
        near_mj, near_j = res.match_jaccard[dup], res.jaccard[dup]
        members, member_root = docmap.rows(res.docs), docmap.rows(res.root)
        timing.update({f"near_{k}": v for k, v in res.timing.items()})
        del res
        if isinstance(docs, Path):
            docs.unlink()  # a copy of the input text
    else:  # no near step this time: no step files of an earlier run left behind
        if eager is not None:
            eager.abandon()
        for step in ("signatures", "buckets", "verify"):
            shutil.rmtree(out / step, ignore_errors=True)
    timing["near"] = time.perf_counter() - t
    del docmap

    # 3. second pass: the kept rows row group by row group; the ids the outputs name
    t = time.perf_counter()
    rem = _Removed.build(ex_rows, ex_keep, near_rows, near_keep, near_match, near_mj, near_j)
    named = np.where(rem.near, rem.matched, rem.exact_of)
    need = np.unique(np.concatenate([rem.rows, rem.keep, named, members, member_root]))
    rows_rec, ids = _second_pass(input_path, first, dedup_ooc.SparseMask(rem.rows, n, False),
                                 dedup_ooc.SparseMask(need, n, True), out / "rows.parquet", memory_gb, progress)
    clusters = pa.Table.from_pylist([], schema=CLUSTERS_SCHEMA)
    if members.size:
        order = np.argsort(members, kind="stable")  # the members in input order
        clusters = pa.table({"id": ids.take(members[order]), "cluster_id": ids.take(member_root[order])},
                            schema=CLUSTERS_SCHEMA)
    kept = int(n - rem.rows.size)
    outputs = {
        "rows.parquet": rows_rec,
        "removals.parquet": write_parquet(_removals(ids, rem, cfg), out / "removals.parquet"),
        "rejects.parquet": write_parquet(_rejects(rejects), out / "rejects.parquet"),
        "clusters.parquet": write_parquet(clusters, out / "clusters.parquet"),
    }
    strata = _strata_counts(first.strata, first.strata_dict, ex_rows, near_rows) if first.strata is not None else None
    shutil.rmtree(spill, ignore_errors=True)
    counts = {
        "rows_in": n,
        "kept": kept,
        "exact_duplicates": int(ex_rows.size),
        "near_duplicates": int(near_rows.size),
        "rejected": len(rejects),
    }
    assert counts["rows_in"] == counts["kept"] + counts["exact_duplicates"] + counts["near_duplicates"]
    manifest = {
        "stage": STAGE,
        "fingerprint": fp,
        "input": str(input_path),
        "config": cfg.model_dump(),
        "outputs": outputs,
        "counts": counts,
        "lsh": lsh_info,
    }
    if strata is not None:
        manifest["strata"] = strata
    timing["write"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t0
    return finish_stage(out, manifest, timing)


# ------------------------------------------------------------------------------------------------
# the two passes over the rows
# ------------------------------------------------------------------------------------------------
@dataclass
class FirstPass:
    rows: int
    rejects: list[dict]
    priority: dedup_ooc.Column | None  # the priority column (nulls after every value), if any, on disk
    in_order: bool  # the rows came in rank order (no priority, or priorities that never decrease)
    exact: dedup_ooc.ExactSpill | None  # every row's exact-dedup hash (cfg.exact), on disk
    texts: Path | None  # Arrow IPC file: instruction + newline + response of every row but `skipped`, input
    # order (Parquet input; a JSONL input's near step reads the texts from the spilled rows: `spill_docs`)
    skipped: np.ndarray  # (k,) ascending: rows whose text was not written (exact copies seen in order)
    strata: dedup_ooc.Column | None  # the int32 code of each row's stratum, if the column exists, on disk
    strata_dict: list[str]
    schema: pa.Schema | None  # of the rows (JSONL: every batch's types unified)
    spilled: list[Path]  # JSONL: the rows batch by batch (read once; Parquet is read again instead)
    reader_kind: str
    spill_starts: np.ndarray | None = None  # JSONL: (len(spilled)+1,) the first row of each spill file

    def spill_docs(self, docmap) -> "SpillDocs":
        """The documents of `docmap` (document -> row: dedup_ooc.ComplementRows/DenseRows), read from the
        spill files."""
        return SpillDocs([str(f) for f in self.spilled], self.spill_starts, docmap)

    def rank(self) -> np.ndarray:
        """Row indices best first: by `priority` (lower first) when present, then by input order
        (8 bytes a row: used only when the rows did not come in rank order)."""
        if self.priority is None or self.in_order:
            return np.arange(self.rows, dtype=np.int64)
        return np.argsort(self.priority.read_all(), kind="stable").astype(np.int64)


def _reader(input_path, memory_gb: float | None, row_bytes: float = 2048, json_threads: bool = True,
            spill_dir: Path | None = None) -> RowReader:
    """The rows in batches sized from the budget; with `spill_dir`, the reader's id set (repeated ids of
    a JSONL input) spills there past its share of the budget."""
    return RowReader(
        input_path, stage=STAGE, block_bytes=budget.block_bytes(memory_gb),
        batch_rows=budget.batch_rows(memory_gb, row_bytes), json_threads=json_threads,
        id_bytes=budget.id_set_bytes(memory_gb) if spill_dir is not None else None, spill_dir=spill_dir,
    )


class _EagerSignatures:
    """The near step's signature parts computed while the first pass still reads: while the rows come
    in rank order, the texts file the first pass writes is the docs file, and `_TextsFile` cuts its
    record batches at every PART_ROWS texts, so each part's texts are whole record batches of it. As
    soon as a part's record batches are written, a worker process (cfg.workers of them, forkserver)
    reads them from the file (by their offsets: the file has no footer yet) and writes
    signatures/part-NNNNN.npy (the same bytes `signature_step` writes); the JSON parsing and hashing of
    the next batches overlap with it. `finish` (before the texts file is moved) writes
    signatures/meta.json with the stage's key, so `signature_step` finds the parts done; `abandon` (the
    rows stopped coming in rank order) waits for the workers and leaves no meta, so the parts are
    computed again there.
    With a JSONL input (`add_rows`) there is no texts file: a part is made of pieces (spill file, rows
    of it) and the worker hashes those rows' instruction and response (`SpillDocs`).
    """

    PENDING = 2  # parts waiting per worker before the reader waits for the oldest

    def __init__(self, texts: Path, sig_dir: Path, cfg: DedupConfig, key: str):
        self.texts, self.sig_dir, self.key = texts, sig_dir, key
        self.workers = cfg.workers
        self.job = dict(num_perm=cfg.num_perm, ngram=cfg.ngram, seed=cfg.seed, lowercase=cfg.lowercase)
        self.pieces: list[tuple[int, int]] = []  # (offset, bytes) of the current part's record batches
        self.buffered = 0
        self.parts = 0
        self.pool: ProcessPoolExecutor | None = None  # started at the first part
        self.pending: list = []
        self.active = True
        sig_dir.mkdir(parents=True, exist_ok=True)
        (sig_dir / "meta.json").unlink(missing_ok=True)
        for old in sig_dir.glob("part-*.npy"):
            old.unlink()

    def add(self, offset: int, nbytes: int, rows: int) -> None:
        """A record batch of `rows` texts was written at `offset` of the texts file."""
        if not self.active:
            return
        self.pieces.append((offset, nbytes))
        self.buffered += rows
        if self.buffered >= PART_ROWS:
            self._submit()

    def add_rows(self, path: Path, rows: np.ndarray) -> None:
        """The texts of these `rows` (ascending) of the spill file `path` are the next documents."""
        s = 0
        while self.active and s < rows.size:
            k = min(rows.size - s, PART_ROWS - self.buffered)
            self.pieces.append((str(path), rows[s : s + k]))
            self.buffered += k
            s += k
            if self.buffered >= PART_ROWS:
                self._submit()

    def _submit(self) -> None:
        if self.pool is None:
            self.pool = _signature_pool(self.workers)
        out = self.sig_dir / f"part-{self.parts:05d}.npy"
        self.pending.append(self.pool.submit(_signature_pieces, self.texts, self.pieces, self.buffered, out, self.job))
        self.pieces, self.buffered = [], 0
        self.parts += 1
        while len(self.pending) > self.PENDING * self.workers:
            self.pending.pop(0).result()

    def _close(self) -> None:
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pending = []
            if self.pool is not None:
                self.pool.shutdown(wait=True)
                self.pool = None

    def abandon(self) -> None:
        if self.active:
            self.active = False
            self.pieces, self.buffered = [], 0
            self._close()

    def finish(self, n_docs: int) -> None:
        if not self.active:
            return
        if self.buffered:
            self._submit()
        self._close()
        write_json({"key": self.key, "docs": n_docs, "part_rows": PART_ROWS}, self.sig_dir / "meta.json")


def _start_forkserver() -> None:
    """Start multiprocessing's forkserver with this module preloaded, without waiting for its import
    (forking a worker from it waits: `_signature_pool`)."""
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload([__name__])
    forkserver.ensure_running()


def _signature_pool(workers: int) -> ProcessPoolExecutor:
    """`workers` processes forked from a forkserver that has imported this module, started now (the
    pool starts a process per task waiting, up to its size)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    for _ in range(workers):
        pool.submit(os.getpid)
    return pool


TEXT_SCHEMA = pa.schema([("text", pa.large_string())])
_IPC_MAGIC = b"ARROW1"


class _TextsFile:
    """The first pass's texts (Arrow IPC file, column `text`) written as they come, in record batches
    cut at every PART_ROWS texts (and at the ends of the arrays written); each record batch's offset
    and size go to `eager`, if any."""

    def __init__(self, path: Path, eager: _EagerSignatures | None):
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, TEXT_SCHEMA)
        self.eager = eager
        self.rows = 0

    def write(self, texts: pa.Array) -> None:
        s = 0
        while s < len(texts):
            k = min(len(texts) - s, PART_ROWS - self.rows % PART_ROWS)
            at = self.sink.tell()
            self.writer.write_batch(pa.record_batch([texts.slice(s, k)], schema=TEXT_SCHEMA))
            if self.eager is not None:
                self.eager.add(at, self.sink.tell() - at, k)
            s += k
            self.rows += k

    def close(self) -> None:
        try:
            self.writer.close()
        finally:
            self.sink.close()


def _read_pieces(path: Path, pieces: list[tuple[int, int]]) -> pa.ChunkedArray:
    """The texts of the record batches written at (offset, bytes) of an Arrow IPC file still being
    written (the first piece written also holds the file's magic and schema message)."""
    chunks = []
    with pa.memory_map(str(path)) as src:
        for off, size in pieces:
            src.seek(off)
            if off == 0:
                assert src.read(len(_IPC_MAGIC)) == _IPC_MAGIC, f"{path}: not an Arrow IPC file"
                src.seek(8)  # the magic, padded to 8 bytes
            while src.tell() < off + size:
                msg = pa.ipc.read_message(src)
                if msg.type == "record batch":
                    chunks.append(pa.ipc.read_record_batch(msg, TEXT_SCHEMA).column(0))
    return pa.chunked_array(chunks, pa.large_string())


def _signature_pieces(path: Path, pieces: list[tuple], n: int, out_path: Path, job: dict) -> None:
    if pieces and isinstance(pieces[0][0], str):  # (spill file, rows): see _EagerSignatures.add_rows
        hasher = minhash.MinHasher(**job)
        sig = np.concatenate([_spill_signatures(f, rows, hasher) for f, rows in pieces])
        assert sig.shape == (n, hasher.num_perm), "a signature part's rows"
        _write_signatures(sig, out_path)
        return
    texts = _read_pieces(path, pieces)
    assert len(texts) == n, "a signature part's texts"
    _save_signatures(texts, out_path, **job)


def _spill_signatures(path: str, rows: np.ndarray, hasher: minhash.MinHasher) -> np.ndarray:
    """Signatures of instruction + newline + response of `rows` (any order) of a spill file, without
    joining the texts (`MinHasher.joined_signatures`); only the pages of the rows' span are read."""
    if not rows.size:
        return np.empty((0, hasher.num_perm), np.uint32)
    lo, hi = int(rows.min()), int(rows.max()) + 1
    with pa.memory_map(path) as src:
        t = pa.ipc.open_file(src).read_all().slice(lo, hi - lo)
        return hasher.joined_signatures(t["instruction"], t["response"], rows - lo)


@dataclass
class SpillDocs:
    """The near step's documents (instruction + newline + response, as `_joined_texts` joins them) of
    a JSONL input, read from the first pass's spill files of its rows instead of a docs file: document
    i is the row rows[i] (`rows`: an array of row indices of the input, or a document map whose
    rows(docs) gives them without an array per document; starts (files+1,): the first row of each file).
    Signatures are computed from the two columns without joining them; the few texts verification
    needs are joined when read (`read_texts`). Small to pickle once cut to a part (`sub`)."""

    files: list[str]
    starts: np.ndarray
    rows: "np.ndarray | dedup_ooc.ComplementRows | dedup_ooc.DenseRows"

    def __len__(self) -> int:
        return int(self.rows.size)

    def _rows(self, docs: np.ndarray) -> np.ndarray:
        docs = np.asarray(docs, np.int64)
        return self.rows[docs] if isinstance(self.rows, np.ndarray) else self.rows.rows(docs)

    def sub(self, start: int, stop: int) -> "SpillDocs":
        return SpillDocs(self.files, self.starts, self._rows(np.arange(start, stop, dtype=np.int64)))

    def _by_file(self, rows: np.ndarray):
        """(file index, positions in `rows`, rows of that file) for each file some of `rows` are in."""
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for k in np.unique(which).tolist():
            sel = np.flatnonzero(which == k)
            yield k, sel, rows[sel] - self.starts[k]

    def signatures(self, start: int, stop: int, hasher: minhash.MinHasher) -> np.ndarray:
        rows = self._rows(np.arange(start, stop, dtype=np.int64))
        sig = np.empty((rows.size, hasher.num_perm), np.uint32)
        for k, sel, local in self._by_file(rows):
            sig[sel] = _spill_signatures(self.files[k], local, hasher)
        return sig

    def texts(self, idx: np.ndarray) -> pa.ChunkedArray:
        """The joined texts of documents idx, in that order: each file mapped alone (then unmapped), and
        only its record batches that hold some of the rows read (a spill file has one per ~1,400 rows:
        reading all of them costs ~2 ms a file, for each block of pairs verification reads)."""
        rows = self._rows(idx)
        got, where = [], []
        big = pa.large_string()
        for k, sel, local in self._by_file(rows):
            with pa.memory_map(self.files[k]) as src:
                reader = pa.ipc.open_file(src)
                starts = self._batch_starts(k, reader)
                which = np.searchsorted(starts, local, side="right") - 1
                for j in np.unique(which).tolist():
                    at = np.flatnonzero(which == j)
                    batch = reader.get_batch(j)
                    take = pa.array(local[at] - starts[j])
                    got.append(pc.binary_join_element_wise(  # a copy
                        batch.column("instruction").take(take).cast(big),
                        batch.column("response").take(take).cast(big), pa.scalar("\n", big)))
                    where.append(sel[at])
                    del batch
                del reader
        if not got:
            return pa.chunked_array([], big)
        at = np.concatenate(where)
        inv = np.empty_like(at)
        inv[at] = np.arange(at.size)
        return pa.chunked_array([pa.concat_arrays(got).take(pa.array(inv))], big)

    def _batch_starts(self, k: int, reader: pa.ipc.RecordBatchFileReader) -> np.ndarray:
        """(batches+1,) the first row of each record batch of file k (its metadata read once, kept)."""
        cache = self.__dict__.setdefault("_starts_of", {})
        if k not in cache:
            cache[k] = np.cumsum([0] + [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)])
        return cache[k]


def _first_pass(input_path, spill: Path, cfg: DedupConfig, memory_gb: float | None, progress: bool,
                eager: _EagerSignatures | None = None) -> FirstPass:
    # with the eager signature workers busy on every core, Arrow's threads only add to the JSON parse's
    # CPU (10-40% measured on a busy 2-core machine; the same tables)
    reader = _reader(input_path, memory_gb, json_threads=eager is None, spill_dir=spill)
    prio: dedup_ooc.Column | None = None
    exact = dedup_ooc.ExactSpill(spill / "exact") if cfg.exact else None
    strata: dedup_ooc.Column | None = None
    strata_dict: dict[str, int] = {}
    spilled: list[Path] = []
    schemas: list[pa.Schema] = []
    texts_path = spill / "texts.arrow"
    has_prio = has_stratum = None
    n = 0
    # While the rows come in rank order (no priority, or priorities that never decrease), a row whose
    # exact-dedup key was seen before can never be kept: its text is not written, and the texts file
    # is the near step's docs file as it is. Once a priority decreases, every later text is written.
    in_order, last_prio = True, None
    seen = _IdSet(budget.id_set_bytes(memory_gb), spill) if cfg.exact else None  # spills past its share
    skipped: list[np.ndarray] = []  # rows whose text is not in the texts file, ascending
    bar = None  # opened at the first batch: an input that fails before any row shows no bar
    # a JSONL input's rows are spilled: the near step reads their texts from there (SpillDocs), no texts file
    texts = _TextsFile(texts_path, eager) if reader.kind != "jsonl" else None
    spill_starts = [0]
    try:
        for batch in reader:
            if bar is None:
                bar = tqdm(total=reader.total_rows if progress else None, desc="dedup read", unit="row",
                           unit_scale=True, disable=not progress)  # (a JSONL total is a read of the file)
            batch = reader.conform(batch)
            if has_prio is None:
                has_prio, has_stratum = "priority" in batch.column_names, "stratum" in batch.column_names
                if has_prio:
                    prio = dedup_ooc.Column(spill / "priority.i64", np.int64)
                if has_stratum:
                    strata = dedup_ooc.Column(spill / "strata.i32", np.int32)
            p = None
            if has_prio:
                p = _priority(batch["priority"]).astype(np.int64)
                prio.add(p)
                if in_order and p.size:
                    in_order = (last_prio is None or p[0] >= last_prio) and bool(np.all(p[1:] >= p[:-1]))
                    last_prio = p[-1]
            sel = np.arange(batch.num_rows)  # rows of the batch whose text is written
            if cfg.exact:
                h = np.empty((2, batch.num_rows), np.uint64)
                for s in range(0, batch.num_rows, EXACT_SLICE):
                    k = exact_hashes(batch.slice(s, EXACT_SLICE), cfg.lowercase)
                    h[:, s : s + k.shape[1]] = k
                exact.add(h, n, p)
                if in_order:
                    sel = np.flatnonzero(~seen.add_new_hashes(h[0], h[1]))
                else:
                    seen = None
            if eager is not None and not in_order:
                eager.abandon()
            if has_stratum:
                names = pc.fill_null(batch["stratum"].cast(pa.string()), "").combine_chunks().dictionary_encode()
                codes = np.array([strata_dict.setdefault(x, len(strata_dict)) for x in names.dictionary.to_pylist()],
                                 np.int32)
                strata.add(codes[names.indices.to_numpy(zero_copy_only=False)] if len(codes) else
                           np.zeros(0, np.int32))
            if sel.size < batch.num_rows:
                gone = np.ones(batch.num_rows, bool)
                gone[sel] = False
                skipped.append(n + np.flatnonzero(gone))
            if texts is not None:
                texts.write(_joined_texts(batch, sel))
            if reader.kind == "jsonl":  # JSONL is parsed once: its rows wait in a file for the second pass
                f = spill / f"rows-{len(spilled):05d}.arrow"
                with pa.OSFile(str(f), "wb") as rs, pa.ipc.new_file(rs, batch.schema) as w:
                    w.write_table(batch)
                spilled.append(f)
                spill_starts.append(n + batch.num_rows)
                if eager is not None and in_order:
                    eager.add_rows(f, sel)
            schemas.append(batch.schema)
            n += batch.num_rows
            bar.update(batch.num_rows)
    finally:
        if texts is not None:
            texts.close()
        for col in (prio, strata):
            if col is not None:
                col.close()
        if exact is not None:
            exact.close()
    if bar is not None:
        bar.close()
    if not schemas:  # no row: the columns the loader gives an empty file
        schema_rows = reader.assemble([]).schema
    elif reader.kind == "jsonl":
        schema_rows = pa.unify_schemas(schemas, promote_options="permissive")
    else:
        schema_rows = schemas[0]
    # the keys seen (16 bytes a row here and in the reader) freed, and each list freed once joined,
    # before the next is joined
    rejects, kind = reader.rejects, reader.kind
    if seen is not None:
        seen.close()
    del seen, reader

    def cat(parts: list, **kw) -> np.ndarray:
        out = np.concatenate(parts, **kw)
        parts.clear()
        return out

    return FirstPass(
        rows=n,
        rejects=rejects,
        priority=prio,
        in_order=in_order,
        exact=exact,
        texts=texts_path if texts is not None else None,
        skipped=cat(skipped) if skipped else np.zeros(0, np.int64),
        strata=strata,
        strata_dict=list(strata_dict),
        schema=schema_rows,
        spilled=spilled,
        reader_kind=kind,
        spill_starts=np.asarray(spill_starts, np.int64) if kind == "jsonl" else None,
    )


@dataclass
class _Removed:
    """The removed rows (ascending) and, for each, what the removals name: the row kept in its place,
    the identical row it was dropped for (exact; -1 for near), and for near duplicates the row it was
    matched with, that pair's similarity and the similarity to the kept row (-1, 1, 1 for exact)."""

    rows: np.ndarray
    keep: np.ndarray
    exact_of: np.ndarray
    near: np.ndarray  # bool
    matched: np.ndarray
    match_j: np.ndarray
    jaccard: np.ndarray

    @classmethod
    def build(cls, ex_rows, ex_keep, near_rows, near_keep, near_match, near_mj, near_j) -> "_Removed":
        # an exact copy of a row removed as a near duplicate points at the row kept in its place
        o = np.argsort(near_rows, kind="stable")
        nr, nk = near_rows[o], near_keep[o]
        hit = dedup_ooc.in_sorted(nr, ex_keep)
        keep_ex = ex_keep.copy()
        if hit.any():
            keep_ex[hit] = nk[np.searchsorted(nr, ex_keep[hit])]
        rows = np.concatenate([ex_rows, near_rows])
        order = np.argsort(rows, kind="stable")
        m_ex, m_near = ex_rows.size, near_rows.size
        return cls(
            rows=rows[order],
            keep=np.concatenate([keep_ex, near_keep])[order],
            exact_of=np.concatenate([ex_keep, np.full(m_near, -1, np.int64)])[order],
            near=np.concatenate([np.zeros(m_ex, bool), np.ones(m_near, bool)])[order],
            matched=np.concatenate([np.full(m_ex, -1, np.int64), near_match])[order],
            match_j=np.concatenate([np.ones(m_ex), near_mj])[order],
            jaccard=np.concatenate([np.ones(m_ex), near_j])[order],
        )


def _priority(col: pa.ChunkedArray) -> np.ndarray:
    if not pa.types.is_integer(col.type):
        raise ValueError(f"dedup: column 'priority' must be an integer column, got {col.type}")
    if col.null_count:  # a row without a priority comes after all the others
        col = pc.fill_null(col, pa.scalar(np.iinfo(col.type.to_pandas_dtype()).max, col.type))
    return col.to_numpy()


def _gather_texts(texts: Path, rows: np.ndarray) -> Iterable[pa.Array]:
    """The texts at positions `rows` (any order) of the texts file, PART_ROWS at a time."""
    for s in range(0, rows.size, PART_ROWS):
        part = rows[s : s + PART_ROWS]
        order = np.argsort(part, kind="stable")
        got = read_texts(texts, part[order]).combine_chunks()
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        yield got.take(pa.array(inv))


def _gather_docs(texts: Path, skipped: np.ndarray, docmap) -> Iterable[pa.Array]:
    """The documents' texts in document order, from the texts file (every row but `skipped`), PART_ROWS
    documents at a time."""
    for d in range(0, docmap.size, PART_ROWS):
        rows = docmap.rows(np.arange(d, min(d + PART_ROWS, docmap.size), dtype=np.int64))
        assert not dedup_ooc.in_sorted(skipped, rows).any(), "a kept row's text was not written"
        yield from _gather_texts(texts, rows - np.searchsorted(skipped, rows))


class IdLookup:
    """The ids of some rows (those the outputs name), gathered during the second pass: `take(idx)`
    like a column's take, for indices among them."""

    def __init__(self, need: np.ndarray | dedup_ooc.SparseMask, ids: pa.Array, sources: pa.Array):
        self.rows = need.rows if isinstance(need, dedup_ooc.SparseMask) else np.flatnonzero(need)  # ascending
        self.ids, self.sources = ids, sources

    def _pos(self, idx: np.ndarray) -> pa.Array:
        idx = np.asarray(idx, np.int64)
        pos = np.searchsorted(self.rows, idx)
        assert np.array_equal(self.rows[pos], idx), "an id that was not gathered"
        return pa.array(pos)

    def take(self, idx: np.ndarray) -> pa.Array:
        return self.ids.take(self._pos(idx))

    def take_source(self, idx: np.ndarray) -> pa.Array:
        return self.sources.take(self._pos(idx))


def _second_pass(
    input_path, first: FirstPass, keep: np.ndarray, need: np.ndarray, path: Path, memory_gb: float | None,
    progress: bool,
) -> tuple[dict, IdLookup]:
    """Write the rows with `keep` (input order) to `path`; gather the id and source of the rows in `need`."""
    if first.reader_kind == "jsonl":
        def batches():
            for f in first.spilled:
                with pa.memory_map(str(f)) as src:
                    t = pa.ipc.open_file(src).read_all()
                yield t.cast(first.schema) if t.schema != first.schema else t
                f.unlink()
    else:
        def batches():
            yield from _reader(input_path, memory_gb)
    ids, sources = [], []
    s = 0
    bar = tqdm(total=first.rows, desc="dedup write", unit="row", unit_scale=True, disable=not progress)
    # the row groups are assembled from the kept rows and encoded TAIL_THREADS at a time in the
    # writer's threads (the same bytes as RowGroupWriter's) while the next batches are read here; a
    # batch (a mapped spill file, or a Parquet input's batch) is held until its last kept row is encoded
    with ParallelRowGroupWriter(path, first.schema, threads=TAIL_THREADS) as w:
        for t in batches():
            m = t.num_rows
            w.write(t, keep[s : s + m])
            sel = np.flatnonzero(need[s : s + m])
            if sel.size:
                ids.append(t["id"].take(pa.array(sel)))
                sources.append(t["source"].take(pa.array(sel)))
            s += m
            bar.update(m)
    bar.close()
    assert s == first.rows, "the rows changed between the two passes"

    def cat(parts: list) -> pa.Array:
        if not parts:
            return pa.array([], pa.string())
        return pa.chunked_array([c for p in parts for c in (p.chunks if isinstance(p, pa.ChunkedArray) else [p])]).combine_chunks()

    return w.record, IdLookup(need, cat(ids), cat(sources))


def priority_order(table: pa.Table) -> np.ndarray:
    """Row indices best first: by `priority` (lower first) when present, then by input order."""
    n = table.num_rows
    if "priority" not in table.column_names:
        return np.arange(n, dtype=np.int64)
    col = table["priority"]
    if not pa.types.is_integer(col.type):
        raise ValueError(f"dedup: column 'priority' must be an integer column, got {col.type}")
    if col.null_count:  # a row without a priority comes after all the others
        col = pc.fill_null(col, pa.scalar(np.iinfo(col.type.to_pandas_dtype()).max, col.type))
    return np.argsort(col.to_numpy(), kind="stable").astype(np.int64)


def normalized_text(table: pa.Table, lowercase: bool) -> pl.Series:
    """The exact-dedup key: instruction + SEP + response, each lowercased (optionally), whitespace
    runs collapsed to one space and trimmed."""
    ins, resp = _normalized_columns(table, lowercase)
    return pl.DataFrame([ins, resp]).select(pl.concat_str([pl.col(ins.name), pl.col(resp.name)], separator=SEP)).to_series()


def _normalized_columns(table: pa.Table, lowercase: bool, checks: dict | None = None) -> tuple[pl.Series, pl.Series]:
    """The instruction and response of `normalized_text`, before they are joined; `checks`, if given,
    gets each column's `_byte_checks`."""

    def norm(c: str) -> pl.Series:
        a = table[c]
        s = pl.from_arrow(a).alias(c)
        # from the values' bytes (the bytes behind nulls too: they can only make a check say yes)
        ascii_only, controls, edge_space = _byte_checks(a)
        if checks is not None:
            checks[c] = (ascii_only, controls, edge_space)
        if lowercase:  # ASCII texts: Arrow's ASCII lowercase is polars' Unicode one there, 4x faster
            s = pl.from_arrow(pc.ascii_lower(a)).alias(c) if ascii_only else s.str.to_lowercase()
        out = collapse_whitespace(s, ascii_only=ascii_only, controls=controls)
        if out is s and not edge_space:  # unchanged, and no text starts or ends with a space: nothing to strip
            return out
        return out.str.strip_chars(" ")

    return norm("instruction"), norm("response")


def _byte_checks(col: pa.Array | pa.ChunkedArray) -> tuple[bool, bool, bool]:
    """(every byte ASCII, some byte an ASCII control character (< 0x20: tab, newline, ...), some text
    starts or ends with a space) of a string column, from its values' bytes: a few numpy reductions
    instead of a scan of the texts per question. The bytes of null slots count too (a null slot has
    none in practice): a check can say yes wrongly, never no."""
    ascii_only, controls, edge = True, False, False
    for ch in col.chunks if isinstance(col, pa.ChunkedArray) else [col]:
        if not len(ch):
            continue
        off_t = np.int64 if pa.types.is_large_string(ch.type) else np.int32
        bufs = ch.buffers()
        off = np.frombuffer(bufs[1], off_t)[ch.offset : ch.offset + len(ch) + 1]
        if off[-1] == off[0] or bufs[2] is None:
            continue
        data = np.frombuffer(bufs[2], np.uint8)
        x = data[off[0] : off[-1]]
        ascii_only &= bool(x.max() < 128)
        controls |= bool(x.min() < 32)
        nonempty = off[1:] > off[:-1]
        edge |= bool((data[off[:-1][nonempty]] == 32).any() or (data[off[1:][nonempty] - 1] == 32).any())
    return ascii_only, controls, edge


_PAIR_MIX = np.uint64(0x9E3779B97F4A7C15)
_SEP_CLASS = np.uint64(0x5EB5EB5EB5EB5EB5)


def exact_hashes(table: pa.Table, lowercase: bool) -> np.ndarray:
    """(2, n) uint64: a 128-bit hash of each row's exact-dedup key (`normalized_text`), two 64-bit
    halves of different seeds; equal keys give equal hashes, different keys differ but with
    probability ~2^-128. Computed from the two normalized columns without joining them (a copy of
    every text less): each half mixes a hash of the normalized instruction with one of the normalized
    response. When neither contains SEP, the key is equal exactly when both are; a row where one does
    (the key alone no longer tells where the instruction ends) hashes its joined key instead, marked
    apart, so that such keys are compared as keys. A slice with a null text hashes the joined keys
    (null keys, equal to each other, as `normalized_text` makes them)."""
    checks: dict = {}
    ins, resp = _normalized_columns(table, lowercase, checks)
    n = len(ins)
    h = np.empty((2, n), np.uint64)
    if ins.null_count() or resp.null_count():
        key = pl.DataFrame([ins, resp]).select(pl.concat_str([pl.col(ins.name), pl.col(resp.name)], separator=SEP))
        h[0], h[1] = key.to_series().hash(seed=1).to_numpy(), key.to_series().hash(seed=2).to_numpy()
        return h
    for half, (si, sr) in enumerate(((1, 3), (2, 4))):
        m = ins.hash(seed=si).to_numpy() * _PAIR_MIX
        m ^= resp.hash(seed=sr).to_numpy()
        h[half] = minhash._fmix64(m)
    # SEP is a control character: a column whose bytes have none (_byte_checks) has no SEP
    if not (checks["instruction"][1] or checks["response"][1]):
        return h
    sep = (ins.str.contains(SEP, literal=True) | resp.str.contains(SEP, literal=True)).to_numpy()
    if sep.any():
        idx = np.flatnonzero(sep)
        key = pl.DataFrame([ins.gather(idx), resp.gather(idx)]).select(
            pl.concat_str([pl.col(ins.name), pl.col(resp.name)], separator=SEP)).to_series()
        h[0, idx] = key.hash(seed=1).to_numpy() ^ _SEP_CLASS
        h[1, idx] = key.hash(seed=2).to_numpy()
    return h


_ASCII_SPACE = ["\t", "\n", "\x0b", "\x0c", "\r"]  # the ASCII whitespace (Unicode White_Space) but " "
_WHITESPACE_RUN = r"\s{2,}|[^\S ]"  # every maximal run of whitespace, a single space alone excepted


def collapse_whitespace(s: pl.Series, ascii_only: bool = False, controls: bool = True) -> pl.Series:
    r"""= s.str.replace_all(r"\s{2,}|[^\S ]", " "): every maximal run of (Unicode) whitespace becomes one
    space. That regex scans every byte through a Unicode class (about half of the exact step's time);
    here, in ASCII texts, each ASCII whitespace character that is not a space becomes a space (the runs
    keep their lengths; a literal search per character, only for the characters some text has) and
    runs of two or more spaces become one (a search for two spaces), and only the texts with a non-ASCII
    character (where other whitespace can be) go through the regex (none when `ascii_only`: the caller
    knows every text is ASCII). `controls` False: the caller knows no text has an ASCII control
    character (the ASCII whitespace but the space are among them), so none is searched for. Returns `s`
    itself when nothing changed."""
    out = s
    for c in _ASCII_SPACE if controls else ():
        if out.str.contains(c, literal=True).any():
            out = out.str.replace_all(c, " ", literal=True)
    if out.str.contains("  ", literal=True).any():
        out = out.str.replace_all(" {2,}", " ")
    wide = None if ascii_only else (s.str.len_chars() != s.str.len_bytes()).fill_null(False)  # non-ASCII
    if wide is not None and wide.any():
        idx = wide.arg_true()
        out = (s.clone() if out is s else out).scatter(idx, s.gather(idx).str.replace_all(_WHITESPACE_RUN, " "))
    return out


def exact_duplicates(table: pa.Table, rank: np.ndarray, lowercase: bool, slice_rows: int = 65_536) -> np.ndarray:
    """(n,) int64: for each row, the index of the best-ranked row with the same normalized text, or
    -1 for that row itself (and for rows without a duplicate).

    Rows are compared by a 128-bit hash of their normalized text (two seeded 64-bit hashes), computed a
    slice of rows at a time so that the normalized copies of the text never all exist at once."""
    n = table.num_rows
    h = np.empty((2, n), np.uint64)  # (2, n)
    for s in range(0, n, slice_rows):
        k = exact_hashes(table.slice(s, slice_rows), lowercase)
        h[:, s : s + k.shape[1]] = k
    return exact_from_hashes(h, rank)


def exact_from_hashes(h: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """`exact_duplicates` from the rows' (2, n) uint64 hashes of their normalized text.

    About 26 bytes a row besides the hashes and the result (a group-by over (h0, h1, rank position)
    took some 250): the rows are sorted by the first hash alone, and only those that share it with
    another row (nearly only the duplicates) are sorted by (h0, h1, rank position), each group's first
    being the row kept."""
    n = h.shape[1]
    keep_of = np.full(n, -1, np.int64)
    if n < 2:
        return keep_of
    o = np.argsort(h[0], kind="stable")
    s0 = h[0][o]
    eq = s0[1:] == s0[:-1]
    del s0
    shared = np.zeros(n, bool)
    shared[1:] = eq
    shared[:-1] |= eq
    del eq
    rows = o[shared]
    del o, shared
    if not rows.size:
        return keep_of
    pos = np.empty(n, np.int64)  # each row's position in rank order
    for a in range(0, n, 1 << 20):
        pos[rank[a : a + (1 << 20)]] = np.arange(a, min(n, a + (1 << 20)), dtype=np.int64)
    p = pos[rows]
    del pos
    g0, g1 = h[0][rows], h[1][rows]
    k = np.lexsort((p, g1, g0))
    rows, g0, g1 = rows[k], g0[k], g1[k]
    start = np.ones(rows.size, bool)
    start[1:] = (g0[1:] != g0[:-1]) | (g1[1:] != g1[:-1])
    first = rows[start][np.cumsum(start) - 1]  # the best-ranked row of each row's group
    dup = ~start
    keep_of[rows[dup]] = first[dup]
    return keep_of


def _joined_texts(table: pa.Table, rows: np.ndarray) -> pa.Array:
    """instruction + newline + response of the given rows, as one large_string array."""
    big = pa.large_string()  # either column may be string or large_string
    n = table.num_rows
    everything = rows.size == n and np.array_equal(rows, np.arange(n))
    # ascending rows (pass 1: all but the exact copies): each column filtered (runs of kept rows copied
    # at once), then joined; a take of the joined texts costs 4x more
    ascending = not everything and bool(np.all(rows[1:] > rows[:-1]))
    if ascending:
        mask = np.zeros(n, bool)
        mask[rows] = True
        mask = pa.array(mask)

    def col(c: str) -> pa.Array:
        a = table[c]
        a = a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
        if ascending:
            a = a.filter(mask)
        elif not everything:
            a = a.take(pa.array(rows))
        return a.cast(big)

    return pc.binary_join_element_wise(col("instruction"), col("response"), pa.scalar("\n", big))


# ------------------------------------------------------------------------------------------------
# near dedup: signatures -> buckets -> clusters
# ------------------------------------------------------------------------------------------------
@dataclass
class NearResult:
    root: np.ndarray  # (D,) int64: the document each one is a duplicate of (itself when kept)
    match: np.ndarray  # (D,) int64: the document each one was matched with (`minhash.match_tree`)
    match_jaccard: np.ndarray  # (D,) float64: similarity of each document to its match (1 for roots)
    jaccard: np.ndarray  # (D,) float64: similarity of each document to its root (1 for roots)
    info: dict  # banding, verification and pair counts, for the manifest
    timing: dict  # seconds per step


@dataclass
class NearClusters:
    """`NearResult` for the documents in a cluster of 2+ only (every other document is its own root,
    matched with itself at 1): memory for the paired documents, not for every document."""

    docs: np.ndarray  # (m,) int64 ascending: the documents in a cluster
    root: np.ndarray  # (m,) int64: the cluster's kept document (the smallest)
    match: np.ndarray  # (m,) int64
    match_jaccard: np.ndarray  # (m,) float64
    jaccard: np.ndarray  # (m,) float64
    n_docs: int
    info: dict
    timing: dict

    def dense(self) -> NearResult:
        root, match = np.arange(self.n_docs, dtype=np.int64), np.arange(self.n_docs, dtype=np.int64)
        mj, jac = np.ones(self.n_docs), np.ones(self.n_docs)
        root[self.docs], match[self.docs] = self.root, self.match
        mj[self.docs], jac[self.docs] = self.match_jaccard, self.jaccard
        return NearResult(root, match, mj, jac, self.info, self.timing)


def lsh_params(cfg: DedupConfig) -> tuple[int, int, float]:
    """(bands, rows, verify_threshold) for a config: cfg.bands if given, else the banding with
    candidate probability >= MIN_RECALL at the threshold that minimises false positives + negatives.
    verify_threshold: the similarity a candidate needs, cfg.threshold itself with verify="exact"."""
    if cfg.bands is not None:
        if cfg.bands > cfg.num_perm:
            raise ValueError(f"dedup: bands={cfg.bands} exceeds num_perm={cfg.num_perm}")
        bands, rows = cfg.bands, cfg.num_perm // cfg.bands
    else:
        bands, rows = minhash.optimal_bands(cfg.threshold, cfg.num_perm, min_recall=MIN_RECALL)
    if cfg.verify == "exact":
        return bands, rows, cfg.threshold
    std = math.sqrt(cfg.threshold * (1 - cfg.threshold) / cfg.num_perm)
    return bands, rows, max(0.0, cfg.threshold - VERIFY_Z * std)


def write_docs(texts: pa.Array | pa.ChunkedArray | Iterable[pa.Array], path: Path) -> int:
    """Write texts (an array, or batches of them) to an Arrow IPC file with one column `text`, the input
    of `near_duplicates`; returns the number of texts."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.chunks
    elif isinstance(texts, pa.Array):
        texts = [texts]
    schema = pa.schema([("text", pa.large_string())])
    rows = 0
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for batch in texts:
            writer.write_table(pa.table({"text": batch.cast(pa.large_string())}), max_chunksize=PART_ROWS)
            rows += len(batch)
    return rows


def near_duplicates(docs: Path, work_dir: str | os.PathLike, cfg: DedupConfig, **kw) -> NearResult:
    """Near-duplicate clusters of the texts in `docs` (see `write_docs`; best-ranked first): writes
    signatures/ and buckets/ into work_dir; `kw` as `near_clusters` takes them. Per document arrays:
    `near_clusters` gives them for the clustered ones only."""
    return near_clusters(docs, work_dir, cfg, **kw).dense()


def near_clusters(
    docs: Path,
    work_dir: str | os.PathLike,
    cfg: DedupConfig,
    *,
    key: str | None = None,
    part_rows: int | None = None,
    progress: bool = False,
    map_parts: MapParts | None = None,
    memory_gb: float | None = None,
) -> NearClusters:
    """`near_duplicates` with its per-document values for the documents in a cluster only. With `key`,
    signature parts of an interrupted run with the same key are reused."""
    work = Path(work_dir)
    part_rows = part_rows or PART_ROWS
    t0 = time.perf_counter()
    parts = signature_step(docs, work / "signatures", cfg, key=key, part_rows=part_rows, progress=progress,
                           map_parts=map_parts)
    t1 = time.perf_counter()
    bands, rows, verify_at = lsh_params(cfg)
    cand = bucket_step(parts, work / "buckets", bands, rows, memory_gb)
    t2 = time.perf_counter()
    checked = verify_step(docs, parts, cand, work / "verify", cfg, verify_at)
    t3 = time.perf_counter()
    n_docs = sum(np.load(p, mmap_mode="r").shape[0] for p in parts)
    accepted = checked.filter(checked["accepted"])
    pairs = np.stack([accepted["a"].to_numpy(), accepted["b"].to_numpy()], axis=1).reshape(-1, 2)  # (E, 2)
    sim = accepted["jaccard"].to_numpy()  # (E,)
    # over the documents of the accepted pairs only (memory for those, not for every document)
    members, root, match, edge = dedup_ooc.clusters(pairs, sim)  # (m,) each
    dup = np.flatnonzero(root != members)
    match_jaccard = np.ones(members.size, np.float64)
    match_jaccard[dup] = sim[edge[dup]]
    jaccard = match_jaccard.copy()  # to the root: the pair's own similarity when matched with the root
    chain = dup[match[dup] != root[dup]]
    if chain.size:
        jaccard[chain] = similarity(docs, parts, members[chain], root[chain], cfg)
    info = {
        "bands": bands,
        "rows": rows,
        "verify": cfg.verify,
        "verify_threshold": round(verify_at, 6),
        "documents": n_docs,
        "signature_parts": len(parts),
        "candidate_pairs": cand.num_rows,
        "verified_pairs": accepted.num_rows,
        "chained": int(chain.size),  # near duplicates matched with another row than the kept one
        "chained_below_threshold": int((jaccard[chain] < cfg.threshold).sum()),
    }
    timing = {"signatures": t1 - t0, "buckets": t2 - t1, "verify": t3 - t2, "clusters": time.perf_counter() - t3}
    return NearClusters(members, root, match, match_jaccard, jaccard, n_docs, info, timing)


def signature_step(
    docs: Path, sig_dir: Path, cfg: DedupConfig, *, key: str | None, part_rows: int, progress: bool,
    map_parts: MapParts | None = None,
) -> list[Path]:
    """One signature part per `part_rows` documents of the docs file, computed by cfg.workers processes,
    or handed to `map_parts` (`signature_part_job`) when given (parts of a run with the same `key`
    already there are kept); returns the part paths in order."""
    n_docs = _num_docs(docs)
    meta = {"key": key, "docs": n_docs, "part_rows": part_rows}
    sig_dir.mkdir(parents=True, exist_ok=True)
    meta_path = sig_dir / "meta.json"
    if key is None or not meta_path.exists() or read_json(meta_path) != meta:
        for old in sig_dir.glob("part-*.npy"):
            old.unlink()
    write_json(meta, meta_path)
    bounds = [(s, min(s + part_rows, n_docs)) for s in range(0, n_docs, part_rows)]
    parts = [sig_dir / f"part-{i:05d}.npy" for i in range(len(bounds))]
    todo = [i for i, p in enumerate(parts) if not p.exists()]
    if todo:
        job = dict(num_perm=cfg.num_perm, ngram=cfg.ngram, seed=cfg.seed, lowercase=cfg.lowercase)
        bar = tqdm(total=len(todo), desc="dedup signatures", unit="part", disable=not progress)
        if map_parts is not None:
            map_parts(signature_part_job, [(*_part_docs(docs, *bounds[i]), parts[i], job) for i in todo])
            bar.update(len(todo))
        elif cfg.workers == 1 or len(todo) == 1:
            for i in todo:
                signature_part(docs, *bounds[i], parts[i], **job)
                bar.update()
        else:
            # workers fork from a fresh server process that has imported this module: they start at
            # once, never inherit the parent's memory or its Arrow/polars threads
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            with ProcessPoolExecutor(max_workers=min(cfg.workers, len(todo)), mp_context=ctx) as pool:
                futures = [pool.submit(signature_part, *_part_docs(docs, *bounds[i]), parts[i], **job) for i in todo]
                for f in as_completed(futures):
                    f.result()
                    bar.update()
        bar.close()
    return parts


def _num_docs(docs: "Path | SpillDocs") -> int:
    if isinstance(docs, SpillDocs):
        return len(docs)
    with pa.memory_map(str(docs)) as src:
        return pa.ipc.open_file(src).read_all().num_rows


def _part_docs(docs: "Path | SpillDocs", start: int, stop: int) -> tuple:
    """(docs, start, stop) of a part, as sent to a process: SpillDocs cut to the part's rows."""
    return (docs.sub(start, stop), 0, stop - start) if isinstance(docs, SpillDocs) else (docs, start, stop)


def signature_part_job(docs: Path, start: int, stop: int, out_path: Path, job: dict) -> str:
    """`signature_part` as one part for `map_parts` (job: its keyword arguments); returns out_path."""
    signature_part(docs, start, stop, out_path, **job)
    return str(out_path)


def signature_part(
    docs: Path, start: int, stop: int, out_path: Path, *, num_perm: int, ngram: int, seed: int, lowercase: bool
) -> None:
    """One part: documents [start, stop) of the docs file (or SpillDocs) -> out_path, (stop-start, num_perm) uint32."""
    if isinstance(docs, SpillDocs):
        hasher = minhash.MinHasher(num_perm=num_perm, ngram=ngram, seed=seed, lowercase=lowercase)
        _write_signatures(docs.signatures(start, stop, hasher), out_path)
        return
    with pa.memory_map(str(docs)) as src:  # only this part's pages are read; unmapped when done
        texts = pa.ipc.open_file(src).read_all()["text"].slice(start, stop - start)
        _save_signatures(texts, out_path, num_perm=num_perm, ngram=ngram, seed=seed, lowercase=lowercase)


def _save_signatures(
    texts: pa.ChunkedArray, out_path: Path, *, num_perm: int, ngram: int, seed: int, lowercase: bool
) -> None:
    hasher = minhash.MinHasher(num_perm=num_perm, ngram=ngram, seed=seed, lowercase=lowercase)
    sig = hasher.signatures(texts)
    assert sig.shape == (len(texts), num_perm)
    _write_signatures(sig, out_path)


def _write_signatures(sig: np.ndarray, out_path: Path) -> None:
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        np.save(f, sig)


class SignatureStore:
    """Row access to the signature parts without loading them: each row read from its part's .npy file
    (pread), not through a memory map, whose pages would count in the process's RSS (rows drawn from
    all over the parts touch nearly every page: 512 bytes a document with 128 permutations)."""

    def __init__(self, parts: list[Path]):
        self.paths, self.data_at, counts = [str(p) for p in parts], [], [0]
        self.P = 0
        for p in parts:
            with open(p, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                assert not fortran and dtype == np.uint32 and len(shape) == 2, f"{p}: a signature part"
                self.data_at.append(f.tell())
            counts.append(shape[0])
            self.P = shape[1]
        self.starts = np.cumsum(counts)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        out = np.empty((idx.size, self.P), np.uint32)
        if not idx.size:
            return out
        size = self.P * 4
        mv = memoryview(out).cast("B")
        which = np.searchsorted(self.starts, idx, side="right") - 1
        for k in np.unique(which).tolist():
            sel = np.flatnonzero(which == k)
            fd = os.open(self.paths[k], os.O_RDONLY)
            try:
                base = self.data_at[k]
                for i, r in zip(sel.tolist(), (idx[sel] - self.starts[k]).tolist()):
                    if os.preadv(fd, [mv[i * size : (i + 1) * size]], base + r * size) != size:
                        raise OSError(f"dedup: {self.paths[k]}: short read of signature row {r}")
            finally:
                os.close(fd)
        return out


def bucket_step(parts: list[Path], bucket_dir: Path, bands: int, rows: int, memory_gb: float | None = None) -> pa.Table:
    """LSH buckets of all parts -> bucket_dir/candidates.parquet (a, b, estimated_jaccard), a < b,
    sorted by (a, b).

    Out of core: each part's band keys are appended to one file per band (bucket_dir/band-NN.u64), then
    each band's keys alone give that band's pairs (`dedup_ooc.band_pairs`: in memory while a band's keys
    fit its share of the budget, else split on disk by key range); the pairs of all bands are merged.
    Held at once: TAIL_THREADS parts' signatures and keys, then TAIL_THREADS bands' keys (or key ranges
    of them), and the pairs."""
    bucket_dir.mkdir(parents=True, exist_ok=True)
    band_files = [bucket_dir / f"band-{j:02d}.u64" for j in range(bands)]
    invalid = [np.zeros(0, np.int64)]  # documents without a shingle: never a near duplicate
    D = 0
    sinks = [open(f, "wb") for f in band_files]

    def part_keys(p: Path) -> tuple[np.ndarray, np.ndarray]:
        """(bands, n) band keys of a part; (n,) whether each document has shingles"""
        sig = np.load(p, mmap_mode="r")
        return minhash.band_keys(sig, bands, rows), sig[:, 0] != minhash.EMPTY

    try:
        for w in range(0, len(parts), TAIL_THREADS):  # TAIL_THREADS parts at once, written in order
            for keys, ok_part in _ordered_map(part_keys, parts[w : w + TAIL_THREADS]):
                for j in range(bands):
                    keys[j].tofile(sinks[j])
                invalid.append(D + np.flatnonzero(~ok_part))
                D += ok_part.size
                del keys
    finally:
        for f in sinks:
            f.close()
    bad = np.concatenate(invalid)
    share = int(budget.usable_bytes(memory_gb) * BAND_SHARE / TAIL_THREADS)

    def band_pairs(f: Path) -> np.ndarray:
        e = dedup_ooc.band_pairs(f, D, bad, share)
        f.unlink()
        return e

    # the bands' sorts release the GIL: TAIL_THREADS bands at once
    edges = [np.zeros((0, 2), np.int64), *_ordered_map(band_pairs, band_files)]
    e = np.concatenate(edges)
    code = np.unique(e[:, 0] * np.int64(max(D, 1)) + e[:, 1])  # as candidate_pairs merges its bands
    pairs = np.stack([code // max(D, 1), code % max(D, 1)], axis=1)
    store = SignatureStore(parts)
    est = minhash.estimated_jaccard(store.rows(pairs[:, 0]), store.rows(pairs[:, 1]))
    cand = pa.table(
        {
            "a": pa.array(pairs[:, 0], pa.int64()),
            "b": pa.array(pairs[:, 1], pa.int64()),
            "estimated_jaccard": pa.array(est, pa.float32()),
        }
    )
    write_parquet(cand, bucket_dir / "candidates.parquet")
    return cand


def verify_step(
    docs: Path, parts: list[Path], cand: pa.Table, verify_dir: Path, cfg: DedupConfig, verify_at: float
) -> pa.Table:
    """The candidates' similarity (cfg.verify) and acceptance -> verify_dir/pairs.parquet
    (a, b, jaccard, accepted), in the candidates' order."""
    a, b = cand["a"].to_numpy(), cand["b"].to_numpy()
    if cfg.verify == "exact":
        sim = exact_jaccard(docs, a, b, cfg)  # (E,) float64
        accepted = sim >= cfg.threshold
    else:
        est = cand["estimated_jaccard"].to_numpy()  # (E,) float32
        sim = est.astype(np.float64)
        accepted = est >= np.float32(verify_at) - np.float32(1e-6)
    checked = pa.table(
        {
            "a": cand["a"],
            "b": cand["b"],
            "jaccard": pa.array(sim, pa.float64()),
            "accepted": pa.array(accepted, pa.bool_()),
        }
    )
    write_parquet(checked, verify_dir / "pairs.parquet")
    return checked


def similarity(docs: Path, parts: list[Path], u: np.ndarray, v: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """(E,) float64 similarity of documents u[i], v[i] as cfg.verify measures it."""
    if cfg.verify == "exact":
        return exact_jaccard(docs, u, v, cfg)
    store = SignatureStore(parts)
    return minhash.estimated_jaccard(store.rows(u), store.rows(v)).astype(np.float64)


def exact_jaccard(docs: Path, u: np.ndarray, v: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """(E,) float64: exact Jaccard of the shingle sets of documents u[i], v[i] of the docs file.

    VERIFY_PAIRS pairs at a time: the texts of their documents are read and shingled once each, and
    the sets intersected with `minhash.set_overlap`."""
    assert u.shape == v.shape
    out = np.empty(u.shape[0], np.float64)

    def block(s: int) -> None:
        bu, bv = u[s : s + VERIFY_PAIRS], v[s : s + VERIFY_PAIRS]
        need = np.unique(np.concatenate([bu, bv]))  # (K,) documents of this block, ascending
        values, offsets = minhash.shingle_sets(read_texts(docs, need), cfg.ngram, cfg.lowercase)
        inter, union = minhash.set_overlap(values, offsets, np.searchsorted(need, bu), np.searchsorted(need, bv))
        out[s : s + bu.shape[0]] = inter / np.maximum(union, 1)

    _ordered_map(block, range(0, u.shape[0], VERIFY_PAIRS))  # TAIL_THREADS blocks at once (numpy, Arrow)
    return out


def _ordered_map(fn, items) -> list:
    """[fn(x) for x in items], TAIL_THREADS calls at a time in threads (numpy's and Arrow's kernels
    release the GIL: the steps after the signatures would otherwise use one core); results in order,
    the first error raised."""
    items = list(items)
    threads = min(TAIL_THREADS, len(items))
    if threads <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="dedup-tail") as ex:
        return list(ex.map(fn, items))


def read_texts(docs: Path, idx: np.ndarray) -> pa.ChunkedArray:
    """The texts idx (ascending) of the docs file, copied out one record batch at a time, each through
    a memory map of its own that is unmapped when done. (A gather through one map of the whole file
    keeps every page it touched mapped, and the kernel maps ~64 KiB around each: 16k texts of 1M
    raised the process's RSS by 1.4 GB, 0.1 GB this way.) `docs` may be SpillDocs (a JSONL input)."""
    if isinstance(docs, SpillDocs):
        return docs.texts(idx)
    with pa.memory_map(str(docs)) as src:
        reader = pa.ipc.open_file(src)
        sizes = [reader.get_batch(k).num_rows for k in range(reader.num_record_batches)]  # metadata only
    starts = np.cumsum([0] + sizes)  # (batches+1,)
    cut = np.searchsorted(idx, starts)  # idx[cut[k]:cut[k+1]] fall in batch k
    taken = []
    for k in np.flatnonzero(cut[1:] > cut[:-1]).tolist():
        with pa.memory_map(str(docs)) as src:
            texts = pa.ipc.open_file(src).get_batch(k).column(0)
            taken.append(texts.take(pa.array(idx[cut[k] : cut[k + 1]] - starts[k])))  # a copy
            del texts
    return pa.chunked_array(taken, pa.large_string())


# ------------------------------------------------------------------------------------------------
# output tables
# ------------------------------------------------------------------------------------------------
def _removals(ids: "IdLookup", rem: _Removed, cfg: DedupConfig) -> pa.Table:
    j = "J" if cfg.verify == "exact" else "est. J"
    t = cfg.threshold
    # the row named in each detail: the matched row (near) or the identical row (exact), fetched at once
    named = ids.take(np.where(rem.near, rem.matched, rem.exact_of)).to_pylist()
    detail = []
    for near, m, mj, jk, keep, ex, other in zip(rem.near.tolist(), rem.matched.tolist(), rem.match_j.tolist(),
                                                rem.jaccard.tolist(), rem.keep.tolist(), rem.exact_of.tolist(), named):
        if near:
            text = f"matched {other} at {j}={_floor3(mj)}"
            if m != keep:  # reached the kept row through other rows
                below = jk < t
                text += f"; {j} to kept row {_floor3(jk)} {'<' if below else '>='} {t:g}"
                text += " (chain)" if below else ""
            detail.append(text)
        elif ex == keep:
            detail.append("same normalized text")
        else:  # its identical row was itself removed as a near duplicate of the kept row
            detail.append(f"same normalized text as {other}")
    return pa.table(
        {
            "id": ids.take(rem.rows),
            "source": ids.take_source(rem.rows),
            "stage": pa.array([STAGE] * rem.rows.size, pa.string()),
            "reason": pa.array(np.where(rem.near, "near_duplicate", "exact_duplicate").tolist(), pa.string()),
            "detail": pa.array(detail, pa.string()),
            "duplicate_of": ids.take(rem.keep),
        },
        schema=REMOVAL_SCHEMA,
    )


def _floor3(x: float) -> str:
    """x rounded down to 3 decimals, so that a printed value is never on the other side of a
    threshold than the value itself (0.7996 < 0.8 prints 0.799). The 1e-9 keeps a ratio that is
    exactly k/1000 (e.g. 4/5) at k/1000 despite floating-point error."""
    return f"{math.floor(float(x) * 1000 + 1e-9) / 1000:.3f}"


def _rejects(rejects: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{**r, "stage": STAGE} for r in rejects], schema=REMOVAL_SCHEMA)


def _strata_counts(codes: dedup_ooc.Column, names: list[str], ex_rows: np.ndarray, near_rows: np.ndarray) -> dict:
    """Per stratum (by name): rows in, kept, exact and near duplicates, from one read of the stratum
    codes on disk."""
    k = len(names)
    n_in, n_ex, n_near = (np.zeros(k, np.int64) for _ in range(3))
    near_rows = np.sort(near_rows)
    for s, v in codes.chunks():
        n_in += np.bincount(v, minlength=k)
        for rows, count in ((ex_rows, n_ex), (near_rows, n_near)):
            lo, hi = np.searchsorted(rows, [s, s + v.size])
            count += np.bincount(v[rows[lo:hi] - s], minlength=k)
    codes.unlink()
    return {
        names[c]: {"in": int(n_in[c]), "kept": int(n_in[c] - n_ex[c] - n_near[c]), "exact": int(n_ex[c]),
                   "near": int(n_near[c])}
        for c in sorted(range(k), key=lambda c: names[c])
        if n_in[c]
    }
