"""dedup's near step without joined texts: the signatures of instruction + newline + response computed
from the two columns (minhash.joined_word_hashes / MinHasher.joined_signatures), and a JSONL input's
documents read from the spilled rows (dedup.SpillDocs), equal to the joined-texts path."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import minhash
from pipeline.stages import dedup

WORDS = ["a", "B", "Ünï", "déjà", "x_y", "İstanbul", "KELVIN\u212a", "naïve", "1234567890abcdefXYZ", "ÀÉ", "\u0301x",
         "ß", "日本語", "-", "!", "", "tab\there", "ΣΑΣ"]


def _texts(rng, n: int) -> list[str | None]:
    out = []
    for _ in range(n):
        sep = " \n" if rng.random() < 0.3 else " "
        out.append(None if rng.random() < 0.05 else sep.join(rng.choice(WORDS, int(rng.integers(0, 12)))))
    return out


@pytest.mark.parametrize("lowercase", [True, False])
def test_joined_signatures_equal_the_joined_texts(lowercase):
    """Unicode (lowercasing that changes a character's length, marks, non-Latin scripts), empty and null
    instructions or responses, words longer than 8 bytes, newlines inside a text: the same word hashes
    and signatures as the joined texts, for all rows, ascending rows with holes, scattered rows, and
    chunked or string/large_string columns."""
    rng = np.random.default_rng(0)
    n = 1500
    ins, resp = _texts(rng, n), _texts(rng, n)
    ins[:5], resp[:5] = ["", "", "a", None, "\n"], ["", "b", "", "c", None]
    a, b = pa.array(ins, pa.string()), pa.array(resp, pa.large_string())
    joined = dedup._joined_texts(pa.table({"instruction": a, "response": b}), np.arange(n))
    wh, wo = minhash.word_hashes(joined, lowercase)
    wh2, wo2 = minhash.joined_word_hashes(a, b, lowercase)
    assert np.array_equal(wh, wh2) and np.array_equal(wo, wo2)
    for ngram in (1, 3):
        h = minhash.MinHasher(num_perm=32, ngram=ngram, lowercase=lowercase, chunk_docs=211)
        ref = h.signatures(joined)
        assert (ref[[0, 3, 4]] == minhash.EMPTY).all() and (ref[[1, 2]] != minhash.EMPTY).all()  # no word, nulls
        assert np.array_equal(h.joined_signatures(a, b), ref)
        rows = np.sort(rng.choice(n, 1100, replace=False))
        assert np.array_equal(h.joined_signatures(a, b, rows), ref[rows])
        rows = rng.permutation(n)[:400]
        chunked = pa.chunked_array([a.slice(0, 333), a.slice(333, 1), a.slice(334)])
        assert np.array_equal(h.joined_signatures(chunked, b, rows), ref[rows])
    assert minhash.joined_word_hashes(a.slice(0, 0), b.slice(0, 0))[1].tolist() == [0]


def test_spill_docs_match_the_docs_file(tmp_path, monkeypatch):
    """A JSONL input (documents read from the spilled rows, signatures from the two columns) and the
    same rows as Parquet (a texts file of joined texts): byte-identical signature parts and outputs,
    with one worker and with the eager workers, and with the bucket and verify steps in threads (many
    blocks of pairs) or not; SpillDocs' texts are the joined texts."""
    from pipeline.config import DedupConfig
    from pipeline import budget

    rng = np.random.default_rng(1)
    rows = []
    for i in range(900):
        if i > 5 and rng.random() < 0.15:  # an exact or a near copy of an earlier row
            r = dict(rows[int(rng.integers(0, i))])
            if rng.random() < 0.5:
                w = r["response"].split(" ")
                w[int(rng.integers(0, len(w)))] = "Ünï"
                r["response"] = " ".join(w)
        else:
            r = {"instruction": " ".join(rng.choice(WORDS, 6)) + f" q{i % 50}",
                 "response": " ".join(rng.choice(WORDS[:12], 30))}
        rows.append({**r, "id": f"s/{i}", "source": "s", "domain": "general", "condition": "direct"})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for k in ("MIN_ROWS", "MAX_ROWS"):
        monkeypatch.setattr(budget, k, 128)
    monkeypatch.setattr(dedup, "PART_ROWS", 100)
    cfg = DedupConfig(num_perm=64, threshold=0.6)
    runs = {}
    for name, inp, workers in (("pq", "rows.parquet", 1), ("js", "rows.jsonl", 1), ("js2", "rows.jsonl", 2)):
        # the reference: the bucket and verify steps on one thread, verification in one block of pairs
        monkeypatch.setattr(dedup, "TAIL_THREADS", 1 if name == "pq" else 2)
        monkeypatch.setattr(dedup, "VERIFY_PAIRS", 8192 if name == "pq" else 7)
        runs[name] = dedup.run(tmp_path / inp, tmp_path / name, cfg.model_copy(update={"workers": workers}),
                               progress=False)
    ref = runs["pq"]
    assert ref["counts"]["near_duplicates"] > 10 and ref["lsh"]["signature_parts"] >= 7
    assert ref["lsh"]["candidate_pairs"] > 5 * 7  # several blocks of pairs verified at once
    for name in ("js", "js2"):
        assert runs[name]["counts"] == ref["counts"] and runs[name]["lsh"] == ref["lsh"]
        for out in ("removals.parquet", "clusters.parquet"):
            assert runs[name]["outputs"][out] == ref["outputs"][out], (name, out)
        for k in range(ref["lsh"]["signature_parts"]):
            part = f"signatures/part-{k:05d}.npy"
            assert (tmp_path / name / part).read_bytes() == (tmp_path / "pq" / part).read_bytes(), (name, part)

    # SpillDocs alone: joined texts of any documents, in the order asked
    spill = tmp_path / "spill"
    spill.mkdir()
    t = pa.Table.from_pylist(rows)
    files, starts = [], [0]
    for s in range(0, t.num_rows, 250):
        f = spill / f"rows-{s}.arrow"
        with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
            w.write_table(t.slice(s, 250), max_chunksize=90)
        files.append(str(f))
        starts.append(min(s + 250, t.num_rows))
    order = rng.permutation(t.num_rows)[:700]
    docs = dedup.SpillDocs(files, np.array(starts), order)
    joined = dedup._joined_texts(t, np.arange(t.num_rows))
    idx = np.sort(rng.choice(700, 300, replace=False))
    assert docs.texts(idx).to_pylist() == joined.take(pa.array(order[idx])).to_pylist()
    h = minhash.MinHasher(num_perm=32)
    assert np.array_equal(docs.signatures(0, 700, h), h.signatures(joined.take(pa.array(order))))
    assert np.array_equal(docs.sub(100, 400).signatures(0, 300, h), h.signatures(joined.take(pa.array(order[100:400]))))


def test_take_rows_of_chunked_columns():
    """minhash.take_rows (chunk by chunk, no concatenation of the column) == Arrow's take."""
    rng = np.random.default_rng(2)
    vals = [None if i % 7 == 0 else f"t{i}é" * (i % 4) for i in range(300)]
    cuts = [0, 1, 50, 50, 170, 299, 300]
    col = pa.chunked_array([pa.array(vals[a:b], pa.string()) for a, b in zip(cuts[:-1], cuts[1:])])
    for idx in (np.arange(300), rng.permutation(300)[:120], np.sort(rng.choice(300, 77, replace=False)),
                np.array([5, 5, 299, 0]), np.zeros(0, np.int64)):
        got = minhash.take_rows(col, idx)
        assert isinstance(got, pa.Array) and got.to_pylist() == [vals[i] for i in idx]
    assert minhash.take_rows(col.chunk(1), np.array([3, 0])).to_pylist() == [vals[4], vals[1]]


def test_normalized_columns_from_byte_checks_on_sliced_chunked_columns():
    """The exact-dedup key's columns (whose ASCII, control-character and edge-space checks read the raw
    bytes of each chunk) equal polars' whitespace regex + strip, on sliced and chunked columns, with
    nulls, empty texts, edge spaces, tabs and newlines, and non-ASCII whitespace."""
    import polars as pl

    rng = np.random.default_rng(5)
    alphabet = list("aBc Q") + ["  ", "\t", "\n", "\r\n", "é", "\u00a0", "\u2003", "Ω"]
    vals = [None if i % 11 == 0 else "".join(rng.choice(alphabet, int(rng.integers(0, 9)))) for i in range(600)]
    plain = [v if v is None else "".join(ch for ch in v if ch in "aBcQ ") for v in vals]  # ASCII, no controls
    for texts in (vals, plain):
        full = pa.chunked_array([pa.array(texts[a:b], pa.large_string()) for a, b in ((0, 250), (250, 251), (251, 600))])
        for t in (pa.table({"instruction": full, "response": full}), pa.table({"instruction": full, "response": full}).slice(37, 400)):
            for lowercase in (True, False):
                ins, _ = dedup._normalized_columns(t, lowercase)
                ref = pl.from_arrow(t["instruction"])
                ref = ref.str.to_lowercase() if lowercase else ref
                ref = ref.str.replace_all(r"\s{2,}|[^\S ]", " ").str.strip_chars(" ")
                assert ins.to_list() == ref.to_list()
