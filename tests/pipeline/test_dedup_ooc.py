"""dedup's per-row bookkeeping out of core (issue 13): each piece against the in-memory computation it
replaces, and whole runs whose out-of-core paths are forced against the default run."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import minhash
from pipeline.config import DedupConfig
from pipeline.stages import dedup, dedup_ooc


def test_exact_spill_finds_the_duplicates_exact_from_hashes_finds(tmp_path):
    rng = np.random.default_rng(3)
    n = 50_000
    h = rng.integers(0, 2**64, (2, n), dtype=np.uint64, endpoint=False)
    src = rng.integers(0, n, n // 5)
    dst = rng.integers(0, n, n // 5)
    h[:, dst] = h[:, src]  # repeats, some of them chained
    h[1, rng.integers(0, n, 500)] ^= np.uint64(1)  # same h0, different h1
    prio = rng.integers(0, 4, n)
    spill = dedup_ooc.ExactSpill(tmp_path / "x")
    for s in range(0, n, 7_000):  # batches, as the first pass adds them
        spill.add(h[:, s : s + 7_000], s, prio[s : s + 7_000])
    rows, kept = spill.duplicates()
    keep_of = dedup.exact_from_hashes(h, np.argsort(prio, kind="stable").astype(np.int64))
    ref = np.flatnonzero(keep_of >= 0)
    assert rows.size > 5_000 and np.array_equal(rows, ref) and np.array_equal(kept, keep_of[ref])
    assert not list((tmp_path / "x").iterdir())  # partition files removed once read


def test_clusters_over_the_paired_documents_equal_union_find_over_all():
    rng = np.random.default_rng(5)
    D = 20_000
    pairs = np.unique(np.sort(rng.integers(0, D, (3_000, 2)), axis=1), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    sim = rng.random(pairs.shape[0])
    root = minhash.union_find(D, pairs)
    match, edge = minhash.match_tree(root, pairs, sim)
    docs, r, m, e = dedup_ooc.clusters(pairs, sim)
    assert np.array_equal(docs, np.unique(pairs))
    assert np.array_equal(r, root[docs]) and np.array_equal(m, match[docs]) and np.array_equal(e, edge[docs])
    assert np.all(root[np.setdiff1d(np.arange(D), docs)] == np.setdiff1d(np.arange(D), docs))


def test_complement_rows_and_sparse_mask():
    rng = np.random.default_rng(7)
    n = 10_000
    excluded = np.unique(rng.integers(0, n, 2_000))
    kept = np.setdiff1d(np.arange(n), excluded)
    cr = dedup_ooc.ComplementRows(excluded, n)
    assert cr.size == kept.size
    docs = rng.integers(0, kept.size, 3_000)
    assert np.array_equal(cr.rows(docs), kept[docs])
    mask = np.ones(n, bool)
    mask[excluded] = False
    sm = dedup_ooc.SparseMask(excluded, n, False)
    for a, b in ((0, n), (17, 4_000), (9_990, n), (5, 5)):
        assert np.array_equal(sm[a:b], mask[a:b])


def test_band_pairs_split_by_key_range_equal_the_band_in_memory(tmp_path):
    rng = np.random.default_rng(11)
    D = 40_000
    keys = rng.integers(0, 5_000, D).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # many shared buckets
    f = tmp_path / "band-00.u64"
    keys.tofile(f)
    invalid = np.unique(rng.integers(0, D, 300))
    ref = dedup_ooc.band_pairs(f, D, invalid, max_bytes=1 << 40)  # one piece
    valid = np.ones(D, bool)
    valid[invalid] = False
    assert np.array_equal(ref, minhash.candidate_pairs(keys[None, :], valid)) and ref.shape[0] > 30_000
    split = dedup_ooc.band_pairs(f, D, invalid, max_bytes=D * dedup_ooc.BAND_BYTES_PER_DOC // 8)  # 8 pieces
    assert np.array_equal(split, ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["band-00.u64"]  # partition files removed


def _corpus(path, n=6_000, seed=0):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(300)]
    ins, resp = [], []
    for i in range(n):
        if i > 10 and rng.random() < 0.08:  # an exact copy (other case and spacing) of an earlier row
            j = int(rng.integers(0, i))
            ins.append(ins[j].upper())
            resp.append("  " + resp[j])
        elif i > 10 and rng.random() < 0.1:  # a near copy
            j = int(rng.integers(0, i))
            w = resp[j].split(" ")
            w[int(rng.integers(0, len(w)))] = "changed"
            ins.append(ins[j])
            resp.append(" ".join(w))
        else:
            ins.append(" ".join(rng.choice(words, 8)))
            resp.append(" ".join(rng.choice(words, 40)))
    t = pa.table({
        "id": [f"r{i}" for i in range(n)], "instruction": ins, "response": resp,
        "source": [f"s{i % 3}" for i in range(n)], "domain": ["general"] * n, "condition": ["direct"] * n,
        "priority": pa.array(rng.integers(0, 3, n), pa.int32()),  # not ascending: the rank-order path
        "stratum": [f"st{i % 5}" for i in range(n)],
    })
    pq.write_table(t, path)


def _digest(out):
    files = {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in
             ("rows.parquet", "removals.parquet", "clusters.parquet", "rejects.parquet")}
    man = json.loads((out / "manifest.json").read_text())
    return files, man["counts"], man["strata"], man["lsh"]


def test_dedup_with_its_buckets_split_on_disk_writes_the_same_outputs(tmp_path, monkeypatch):
    src = tmp_path / "in.parquet"
    _corpus(src)
    cfg = DedupConfig(threshold=0.7, workers=1)
    dedup.run(src, tmp_path / "a", cfg, progress=False)
    ref = _digest(tmp_path / "a")
    assert ref[1]["exact_duplicates"] > 300 and ref[1]["near_duplicates"] > 300
    assert sum(s["in"] for s in ref[2].values()) == 6_000
    calls = []
    real = dedup_ooc.band_pairs

    def split(f, n, invalid, max_bytes):
        calls.append(n)
        return real(f, n, invalid, max_bytes=n * dedup_ooc.BAND_BYTES_PER_DOC // 4)  # 4 key ranges

    monkeypatch.setattr(dedup_ooc, "band_pairs", split)
    dedup.run(src, tmp_path / "b", cfg, progress=False)
    assert calls and _digest(tmp_path / "b") == ref
