"""dedup's per-row bookkeeping out of core (issue 13): what the stage holds per row is on disk, or only
for the rows that are duplicates, so its memory does not grow with the row count.

- `ExactSpill`: each row's 128-bit exact-dedup hash, priority and row index, appended batch by batch to
  one of PARTS files chosen by the hash's top bits; `duplicates()` then reads one file at a time and
  finds, in each group of equal hashes, the best-ranked row (lowest priority, then first in the input)
  and the others: memory for one file's rows, and 16 bytes per duplicate.
- `Column`: a per-row number column (priority, stratum code) written batch by batch to a file and read
  back in chunks.
- `ComplementRows`: the near step's documents are the rows that are not exact duplicates, in input
  order, when the input is in rank order: document d is the d-th such row, computed from the sorted
  duplicate rows alone.
- `SparseMask`: a (n,) bool mask given by its few True (or False) rows, sliced like an array.
- `clusters`: union-find and the match tree over the documents that appear in an accepted pair only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import minhash

PART_BITS = 8  # 256 exact-hash partition files: 400k rows each at 100M rows
RECORD = np.dtype([("h0", "<u8"), ("h1", "<u8"), ("prio", "<i8"), ("row", "<i8")])
CHUNK = 1 << 20  # rows of a spilled column read at once


def _scatter(rec: np.ndarray, key: np.ndarray, bits: int, files: list) -> None:
    """Append each record to the file of its key's top `bits` bits (records keep their order in a file)."""
    part = (key >> np.uint64(64 - bits)).astype(np.int64)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(len(files) + 1))
    rec = rec[order]
    for p in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():
        rec[bounds[p] : bounds[p + 1]].tofile(files[p])


class ExactSpill:
    """The exact-dedup hashes of every row, partitioned on disk by the top PART_BITS bits of h0."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.paths = [self.folder / f"exact-{k:03d}.rec" for k in range(1 << PART_BITS)]
        self.files = [open(p, "wb") for p in self.paths]
        self.rows = 0

    def add(self, h: np.ndarray, row0: int, prio: np.ndarray | None) -> None:
        """Rows row0 .. row0+k-1 with hashes h (2, k) uint64 and their priorities (k,) (None: all 0)."""
        k = h.shape[1]
        if not k:
            return
        rec = np.empty(k, RECORD)
        rec["h0"], rec["h1"] = h[0], h[1]
        rec["prio"] = 0 if prio is None else prio
        rec["row"] = np.arange(row0, row0 + k, dtype=np.int64)
        _scatter(rec, h[0], PART_BITS, self.files)
        self.rows += k

    def close(self) -> None:
        for f in self.files:
            f.close()

    def duplicates(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, kept) int64, ascending by row: every row whose hash equals a better-ranked row's, and
        the best-ranked row of its group (= dedup.exact_from_hashes's keep_of at those rows)."""
        self.close()
        rows, kept = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for p in self.paths:
            rec = np.fromfile(p, RECORD)
            p.unlink()
            if rec.size < 2:
                continue
            o = np.argsort(rec["h0"], kind="stable")  # first by h0 alone: only the rows sharing it go on
            s0 = rec["h0"][o]
            eq = s0[1:] == s0[:-1]
            shared = np.zeros(rec.size, bool)
            shared[1:] = eq
            shared[:-1] |= eq
            r = rec[o[shared]]
            del o, s0, eq, shared, rec
            if not r.size:
                continue
            r = r[np.lexsort((r["row"], r["prio"], r["h1"], r["h0"]))]
            start = np.ones(r.size, bool)
            start[1:] = (r["h0"][1:] != r["h0"][:-1]) | (r["h1"][1:] != r["h1"][:-1])
            first = r["row"][start][np.cumsum(start) - 1]
            rows.append(r["row"][~start])
            kept.append(first[~start])
        rows_a, kept_a = np.concatenate(rows), np.concatenate(kept)
        o = np.argsort(rows_a, kind="stable")
        return rows_a[o], kept_a[o]


class Column:
    """A per-row number column appended batch by batch to a file (not held in memory)."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.f = open(self.path, "wb")
        self.rows = 0

    def add(self, values: np.ndarray) -> None:
        np.ascontiguousarray(values, self.dtype).tofile(self.f)
        self.rows += len(values)

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()

    def chunks(self, rows: int = CHUNK):
        """(start, values) of consecutive chunks of the column."""
        self.close()
        with open(self.path, "rb") as f:
            s = 0
            while s < self.rows:
                v = np.fromfile(f, self.dtype, count=min(rows, self.rows - s))
                yield s, v
                s += v.size

    def read_all(self) -> np.ndarray:
        self.close()
        return np.fromfile(self.path, self.dtype, count=self.rows)

    def unlink(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class ComplementRows:
    """Document d -> the d-th row (input order) of 0..n-1 that is not in `excluded` (ascending)."""

    def __init__(self, excluded: np.ndarray, n: int):
        self.excluded = np.asarray(excluded, np.int64)
        self.n = n
        # excluded[i] - i: the number of kept rows before the i-th excluded row (non-decreasing)
        self.before = self.excluded - np.arange(self.excluded.size, dtype=np.int64)

    @property
    def size(self) -> int:
        return self.n - self.excluded.size

    def rows(self, docs: np.ndarray) -> np.ndarray:
        docs = np.asarray(docs, np.int64)
        return docs + np.searchsorted(self.before, docs, side="right")


class DenseRows:
    """Document d -> rows[d] (the rank order of an input that is not in rank order)."""

    def __init__(self, rows: np.ndarray):
        self.r = rows

    @property
    def size(self) -> int:
        return self.r.size

    def rows(self, docs: np.ndarray) -> np.ndarray:
        return self.r[np.asarray(docs, np.int64)]


class SparseMask:
    """(n,) bool, `value` at `rows` (ascending, unique) and not `value` elsewhere; `mask[a:b]` gives
    that slice as a numpy array."""

    def __init__(self, rows: np.ndarray, n: int, value: bool):
        self.rows, self.n, self.value = np.asarray(rows, np.int64), n, value

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, sl: slice) -> np.ndarray:
        a, b, _ = sl.indices(self.n)
        lo, hi = np.searchsorted(self.rows, [a, b])
        out = np.full(max(0, b - a), not self.value, bool)
        out[self.rows[lo:hi] - a] = self.value
        return out


def in_sorted(sorted_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(len(rows),) bool: which of `rows` are in `sorted_rows` (ascending)."""
    if not sorted_rows.size:
        return np.zeros(np.shape(rows), bool)
    pos = np.searchsorted(sorted_rows, rows).clip(max=sorted_rows.size - 1)
    return sorted_rows[pos] == rows


def clusters(pairs: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Connected components of the accepted `pairs` (E, 2) of documents, over the documents in a pair
    only: (docs (m,) ascending, root (m,) = the smallest document of its component, match (m,) = the
    neighbour on a shortest path to the root (`minhash.match_tree`), edge (m,) = the pair joining
    them, -1 for a root). The same values `minhash.union_find`/`match_tree` give those documents over
    all documents, in memory for the paired documents only."""
    if not pairs.size:
        z = np.zeros(0, np.int64)
        return z, z, z, z
    docs, local = np.unique(pairs.reshape(-1), return_inverse=True)  # ascending: order kept
    local = local.reshape(-1, 2).astype(np.int64)
    root = minhash.union_find(docs.size, local)
    match, edge = minhash.match_tree(root, local, sim)
    return docs, docs[root], docs[match], edge



BAND_BYTES_PER_DOC = 40  # what one band's in-memory candidate search holds per document (keys, sort)
KEY_DOC = np.dtype([("key", "<u8"), ("doc", "<i8")])


def band_pairs(band_file: Path, n_docs: int, invalid: np.ndarray, max_bytes: int) -> np.ndarray:
    """(E, 2) int64 pairs (u < v, unique) of documents sharing a bucket in the band whose keys (n_docs
    uint64, document order) are in `band_file`, documents in `invalid` (ascending) left out: each
    bucket's smallest member paired with each other member (`minhash.candidate_pairs` of one band).

    When the band's keys with their sort would take more than `max_bytes`, the (key, document) pairs
    are first split on disk by the top bits of the key into as many partition files as needed, and each
    partition's buckets are found alone (a bucket never spans two partitions): the same pairs."""
    parts = 1
    while n_docs * BAND_BYTES_PER_DOC > max_bytes * parts and parts < (1 << 16):
        parts *= 2
    if parts == 1:
        keys = np.fromfile(band_file, np.uint64, count=n_docs)
        valid = None
        if invalid.size:
            valid = np.ones(n_docs, bool)
            valid[invalid] = False
        return minhash.candidate_pairs(keys[None, :], valid)
    bits = int(parts).bit_length() - 1
    paths = [band_file.with_name(f"{band_file.name}.p{k:05d}") for k in range(parts)]
    files = [open(p, "wb") for p in paths]
    try:
        with open(band_file, "rb") as f:
            for s in range(0, n_docs, CHUNK):
                k = np.fromfile(f, np.uint64, count=min(CHUNK, n_docs - s))
                rec = np.empty(k.size, KEY_DOC)
                rec["key"], rec["doc"] = k, np.arange(s, s + k.size, dtype=np.int64)
                if invalid.size:
                    rec = rec[~in_sorted(invalid, rec["doc"])]
                _scatter(rec, rec["key"], bits, files)
    finally:
        for f in files:
            f.close()
    edges = [np.zeros((0, 2), np.int64)]
    for p in paths:
        rec = np.fromfile(p, KEY_DOC)
        p.unlink()
        if rec.size < 2:
            continue
        rec = rec[np.lexsort((rec["doc"], rec["key"]))]  # by bucket, then by document
        first = np.ones(rec.size, bool)
        np.not_equal(rec["key"][1:], rec["key"][:-1], out=first[1:])
        m0 = rec["doc"][first][np.cumsum(first) - 1]  # each member's bucket's smallest document
        edges.append(np.stack([m0[~first], rec["doc"][~first]], axis=1))
    e = np.concatenate(edges)
    code = np.unique(e[:, 0] * np.int64(max(n_docs, 1)) + e[:, 1])
    return np.stack([code // max(n_docs, 1), code % max(n_docs, 1)], axis=1)
