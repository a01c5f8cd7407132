"""_IdSet with spilling (issue 13): a tiny memory budget spills the ids to sorted run files (merged on
disk as they grow), and the answers (which ids are repeats) are those of the set held in memory."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline import rows
from pipeline.rows import _IdSet


def _batches(seed: int, n: int = 200_000, batch: int = 5_000):
    """Random 64-bit key pairs in batches, with repeats: within a batch, of recent keys and of keys
    from long ago (spilled by then), plus keys sharing a first hash (ties) with another key."""
    rng = np.random.default_rng(seed)
    pool0 = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    pool1 = rng.integers(0, 2**63, n, dtype=np.uint64)
    pool0[5::101] = pool0[3::101][: pool0[5::101].shape[0]]  # equal h0, other h1: not a repeat
    made = 0
    while made < n:
        k = min(batch, n - made)
        fresh = np.arange(made, made + k)
        old = rng.integers(0, max(1, made), k // 10) if made else np.zeros(0, np.int64)  # repeats of any age
        near = fresh[rng.integers(0, k, k // 50)]  # repeats within the batch
        idx = np.concatenate([fresh, old, near])
        rng.shuffle(idx)
        made += k
        yield pool0[idx], pool1[idx]


def _count_spills(monkeypatch) -> list[int]:
    """The sizes of the id sets at each spill, appended as they spill."""
    spills: list[int] = []
    spill = rows._IdSet._spill

    def counted(self):
        spills.append(len(self))
        spill(self)

    monkeypatch.setattr(rows._IdSet, "_spill", counted)
    return spills


@pytest.mark.parametrize("block", [rows.ID_BLOCK, 3])
def test_spilled_id_set_gives_the_in_memory_answers(tmp_path, monkeypatch, block):
    monkeypatch.setattr(rows, "ID_BLOCK", block)  # 3: ranges of equal h0 across block ends
    monkeypatch.setattr(rows, "_SPILL_CHUNK", 1000)  # on-disk merges of many chunks
    ref, spill = _IdSet(), _IdSet(run_bytes=16 * 7_000, spill_dir=tmp_path / "out")
    total = 0
    for h0, h1 in _batches(1):
        want = ref.add_new_hashes(h0, h1)
        got = spill.add_new_hashes(h0, h1)
        assert got.tolist() == want.tolist()
        total += int((~want).sum())
        # a lookup alone answers the same, and adds nothing
        assert spill.contains_hashes(h0, h1).all()
    assert spill.spilled and spill.held * 16 <= 16 * 7_000 and len(spill) == len(ref) == total
    assert len(spill.spilled) <= 8  # merged on disk as they grow
    for run in spill.spilled:  # each run sorted, its fence every ID_BLOCK-th key
        recs = run.read(0, run.n)
        assert (recs[1:, 0] >= recs[:-1, 0]).all()
        assert run.fence.tolist() == recs[::block, 0].tolist()
    files = list((tmp_path / "out").rglob("*"))
    assert files  # the spilled runs live under the folder given
    spill.close()
    assert list((tmp_path / "out").iterdir()) == []  # close() removes them


def test_id_set_add_new_of_strings_spilled_equals_in_memory(tmp_path):
    rng = np.random.default_rng(2)
    ref, spill = _IdSet(), _IdSet(run_bytes=16 * 3_000, spill_dir=tmp_path)
    for b in range(20):
        ids = pa.array([f"src/{i}" for i in rng.integers(0, 40_000, 4_000).tolist()])
        assert spill.add_new(ids).tolist() == ref.add_new(ids).tolist()
    assert spill.spilled
    del spill  # freed without close(): its folder is removed
    import gc

    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_normalize_with_spilled_ids_writes_the_same_bytes(tmp_path, monkeypatch):
    """normalize under a tiny id budget (its ids spilled to run files, merged on disk, repeats found
    there) writes the same files as the default run, and leaves no spill file behind."""
    import json

    from pipeline import budget
    from pipeline.config import NormalizeConfig, SourceSpec
    from pipeline.io import sha256_file
    from pipeline.stages import ingest, normalize

    rng = np.random.default_rng(5)
    lines = []
    for i in range(4000):
        rid = str(int(rng.integers(0, i))) if i % 37 == 20 else str(i)  # an earlier row's id, of any age
        if i % 211 == 7:
            rid = f"{i - 1}#direct"  # the previous row's copy id
        ans = f"x = {i}\n#### {i % 17}" if i % 13 else "no marker here"
        lines.append(json.dumps({"id": rid, "q": f"What is {i} mod 17?", "a": ans}))
    (tmp_path / "loc.jsonl").write_text("\n".join(lines) + "\n")
    sources = [SourceSpec(name="loc", kind="local", path=str(tmp_path / "loc.jsonl"), emit="both", condition="cot",
                          fields={"instruction": "q", "response": "a", "id": "id"})]
    ingest.run(sources, tmp_path / "ingest", seed=3, progress=False)
    cfg = NormalizeConfig()
    a = normalize.run(tmp_path / "ingest", tmp_path / "a", sources, cfg, progress=False)

    spills = _count_spills(monkeypatch)
    monkeypatch.setattr(rows, "ID_BLOCK", 4)
    monkeypatch.setattr(budget, "MIN_ROWS", 50)
    monkeypatch.setattr(budget, "id_set_bytes", lambda gb: 16 * 300)
    (tmp_path / "b" / ".id-set-stale").mkdir(parents=True)  # left by a killed run: removed
    (tmp_path / "b" / ".id-set-stale" / "run-000001.u64").write_bytes(b"x" * 32)
    normalize.run(tmp_path / "ingest", tmp_path / "b", sources, cfg, progress=False, memory_gb=0.001)
    assert len(spills) >= 10  # ~7,900 ids, 300 held at most
    assert a["counts"]["reasons"]["duplicate_id"] > 100

    def files(d):
        return {p.name: sha256_file(p) for p in sorted(d.iterdir()) if p.name not in ("manifest.json", "timing.json")}

    assert files(tmp_path / "a") == files(tmp_path / "b")  # no .id-set-* folder left either
    strip = ("fingerprint", "path")
    ma, mb = (json.loads((tmp_path / x / "manifest.json").read_text()) for x in "ab")
    assert {k: v for k, v in ma.items() if k not in strip} == {k: v for k, v in mb.items() if k not in strip}


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_tokenizer_with_spilled_ids_writes_the_same_bytes(tmp_path, monkeypatch, kind):
    """The tokenizer's duplicate-id check (its own id set for Parquet, the reader's for JSONL) spilled
    under a tiny id budget: the same files as the default run, no spill file left."""
    import json

    from pipeline import budget
    from pipeline.config import TokenizerConfig
    from pipeline.io import sha256_file
    from pipeline.stages import tokenize

    rng = np.random.default_rng(7)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "7", "42"]
    recs = []
    for i in range(3000):
        rid = f"r{int(rng.integers(0, i))}" if i % 29 == 11 else f"r{i}"  # repeats of ids of any age
        text = " ".join(rng.choice(words, 12).tolist())
        recs.append({"id": rid, "instruction": f"q {i} {text}", "response": f"a {text}", "condition": "cot",
                     "source": f"s{i % 3}", "domain": "d"})
    if kind == "parquet":
        src = tmp_path / "rows.parquet"
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(recs), src)
    else:
        src = tmp_path / "rows.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = TokenizerConfig(vocab_size=300, sample_rows=500)
    a = tokenize.run(src, tmp_path / "a", cfg, conditions=["cot", "direct"], seed=1, progress=False)
    spills = _count_spills(monkeypatch)
    monkeypatch.setattr(budget, "MIN_ROWS", 50)
    monkeypatch.setattr(budget, "id_set_bytes", lambda gb: 16 * 200)
    monkeypatch.setattr(budget, "block_bytes", lambda gb: 24576)  # JSONL blocks of ~130 lines
    tokenize.run(src, tmp_path / "b", cfg, conditions=["cot", "direct"], seed=1, progress=False, memory_gb=0.001)
    assert len(spills) >= 5 and a["counts"]["removed_by_reason"]["duplicate_id"] > 50

    def files(d):
        return {p.name: sha256_file(p) for p in sorted(d.iterdir()) if p.name not in ("manifest.json", "timing.json")}

    assert files(tmp_path / "a") == files(tmp_path / "b")
