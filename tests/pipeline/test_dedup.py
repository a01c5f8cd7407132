"""dedup stage and MinHash kernel, on real GSM8K rows with planted duplicates."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import minhash
from pipeline.config import DedupConfig
from pipeline.io import sha256_file, write_parquet
from pipeline.schema import REMOVAL_SCHEMA
from pipeline.stages import dedup

GSM8K = Path("/work/shared/data/gsm8k/train.jsonl")
pytestmark = pytest.mark.skipif(not GSM8K.exists(), reason=f"{GSM8K} not available")

WORD = re.compile(r"\w+")


def gsm8k_rows(limit: int | None = None) -> list[dict]:
    rows = []
    with open(GSM8K) as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            o = json.loads(line)
            rows.append(
                {
                    "id": f"gsm8k/{i}",
                    "instruction": o["question"],
                    "response": o["answer"],
                    "condition": "cot",
                    "source": "gsm8k",
                    "domain": "math",
                }
            )
    return rows


def ref_shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = WORD.findall(text.lower())
    return {tuple(w[i : i + n]) for i in range(max(1, len(w) - n + 1))} if w else set()


def ref_jaccard(r1: dict, r2: dict) -> float:
    a = ref_shingles(r1["instruction"] + "\n" + r1["response"])
    b = ref_shingles(r2["instruction"] + "\n" + r2["response"])
    return len(a & b) / len(a | b)


# the detail of a near-duplicate removal: "matched ID at J=0.xxx" [+ "; J to kept row 0.xxx </>= T [(chain)]"]
DETAIL = re.compile(
    r"matched (?P<id>\S+) at J=(?P<j>[01]\.\d{3})"
    r"(?:; J to kept row (?P<jk>[01]\.\d{3}) (?P<cmp><|>=) (?P<t>[0-9.]+)(?P<chain> \(chain\))?)?"
)
DIRECT = re.compile(r"matched (?P<id>\S+) at J=(?P<j>[01]\.\d{3})")


def floor3(x: float) -> float:
    return math.floor(x * 1000 + 1e-9) / 1000


def near_copy(rng: random.Random, row: dict, new_id: str, edits: int) -> dict:
    """The row with `edits` single-word substitutions/insertions in its answer, far apart."""
    words = row["response"].split(" ")
    step = max(1, len(words) // (edits + 1))
    for k in range(edits, 0, -1):
        pos = k * step
        if rng.random() < 0.5:
            words[pos] = "banana"
        else:
            words.insert(pos, "really")
    return {**row, "id": new_id, "source": "copies", "response": " ".join(words)}


# ------------------------------------------------------------------------------------------------
# the stage on GSM8K with planted duplicates
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = random.Random(0)
    rows = gsm8k_rows()
    by_id = {r["id"]: r for r in rows}
    originals = rng.sample(rows, 120)
    exact, near, original_of = [], [], {}
    for i, r in enumerate(originals[:30]):  # same text up to case and whitespace
        original_of[f"exact/{i}"] = r["id"]
        exact.append(
            {
                **r,
                "id": f"exact/{i}",
                "source": "copies",
                "instruction": "  " + r["instruction"].upper().replace(" ", "   "),
                "response": r["response"].replace(" ", "\t") + "\n",
            }
        )
    for r in originals[30:]:
        if len(WORD.findall(r["instruction"] + " " + r["response"])) < 120:
            continue  # long enough that two edits keep the Jaccard well above 0.8
        c = near_copy(rng, r, f"near/{len(near)}", edits=rng.choice([1, 2]))
        if ref_jaccard(r, c) >= 0.85:
            near.append(c)
            original_of[c["id"]] = r["id"]
    copies = exact + near
    rng.shuffle(copies)
    path = tmp_path_factory.mktemp("planted") / "rows.jsonl"
    with open(path, "w") as f:
        for r in rows + copies:  # copies after their originals: the originals are kept
            f.write(json.dumps(r) + "\n")
    out = tmp_path_factory.mktemp("planted_out")
    man = dedup.run(path, out, DedupConfig(), progress=False)
    removals = pq.read_table(out / "removals.parquet").to_pylist()
    return {
        "rows": rows,
        "by_id": {**by_id, **{c["id"]: c for c in copies}},
        "exact": exact,
        "near": near,
        "original_of": original_of,
        "out": out,
        "manifest": man,
        "removals": removals,
        "input": path,
    }


def test_planted_duplicates_removed_and_point_at_the_original(planted):
    assert len(planted["near"]) >= 20
    rem = {r["id"]: r for r in planted["removals"]}
    for c in planted["exact"]:
        r = rem[c["id"]]
        assert (r["reason"], r["stage"], r["source"]) == ("exact_duplicate", "dedup", "copies")
        assert r["duplicate_of"] == planted["original_of"][c["id"]]
    for c in planted["near"]:
        r = rem[c["id"]]
        assert r["reason"] == "near_duplicate", c["id"]
        assert r["duplicate_of"] == planted["original_of"][c["id"]]
        m = DIRECT.fullmatch(r["detail"])  # matched with the original itself
        assert m and m["id"] == r["duplicate_of"], r["detail"]
        assert float(m["j"]) == floor3(ref_jaccard(c, planted["by_id"][r["duplicate_of"]])) >= 0.8
    kept = set(pq.read_table(planted["out"] / "rows.parquet")["id"].to_pylist())
    assert set(planted["original_of"].values()) <= kept


def test_unrelated_rows_kept_few_false_positives(planted):
    planted_ids = {c["id"] for c in planted["exact"] + planted["near"]}
    extra = [r for r in planted["removals"] if r["id"] not in planted_ids]
    assert len(extra) <= 5, extra  # of 7,473 GSM8K rows
    by_id = planted["by_id"]
    for r in (r for r in planted["removals"] if r["reason"] == "near_duplicate"):
        # every near duplicate inside GSM8K or planted is matched with a row at true Jaccard >= 0.8
        m = DETAIL.fullmatch(r["detail"])
        assert m, r["detail"]
        assert ref_jaccard(by_id[r["id"]], by_id[m["id"]]) >= 0.8
        assert float(m["j"]) == floor3(ref_jaccard(by_id[r["id"]], by_id[m["id"]]))


def test_outputs_counts_and_schema(planted):
    out, man = planted["out"], planted["manifest"]
    c = man["counts"]
    n_in = len(planted["rows"]) + len(planted["exact"]) + len(planted["near"])
    assert c["rows_in"] == n_in == c["kept"] + c["exact_duplicates"] + c["near_duplicates"]
    assert c["exact_duplicates"] == len(planted["exact"]) and c["rejected"] == 0
    rows = pq.read_table(out / "rows.parquet")
    assert rows.num_rows == c["kept"]
    assert rows.column_names == ["id", "instruction", "response", "condition", "source", "domain"]
    ids = rows["id"].to_pylist()
    order = {r["id"]: i for i, r in enumerate(planted["rows"])}
    assert [order[i] for i in ids if i in order] == sorted(order[i] for i in ids if i in order)  # input order
    assert pq.read_schema(out / "removals.parquet").equals(REMOVAL_SCHEMA)
    assert pq.read_schema(out / "rejects.parquet").equals(REMOVAL_SCHEMA)
    clusters = pq.read_table(out / "clusters.parquet").to_pylist()
    assert {r["id"] for r in clusters} >= {c["id"] for c in planted["near"]}
    assert set(man["outputs"]) == {"rows.parquet", "removals.parquet", "rejects.parquet", "clusters.parquet"}
    for name, rec in man["outputs"].items():
        assert sha256_file(out / name) == rec["sha256"]
    assert (out / "signatures" / "part-00000.npy").exists()
    assert (out / "buckets" / "candidates.parquet").exists()
    assert not (out / "signatures" / dedup.DOCS_FILE).exists()
    assert (out / "timing.json").exists()


def test_idempotent_rerun_returns_manifest_without_recomputing(planted, monkeypatch):
    out = planted["out"]
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(dedup, "near_duplicates", boom)
    monkeypatch.setattr(dedup, "RowReader", boom)
    man = dedup.run(planted["input"], out, DedupConfig(workers=2), progress=False)  # workers: same outputs
    assert man == planted["manifest"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    with pytest.raises(AssertionError, match="recomputed"):  # another threshold is another run
        dedup.run(planted["input"], out, DedupConfig(threshold=0.7), progress=False)


def test_a_change_to_shared_code_is_a_new_run(planted, tmp_path, monkeypatch):
    """The fingerprint covers the pipeline modules the stage uses (io.code_modules), not only its own:
    an edited row reader or Parquet writer never returns an older run's outputs as done."""
    import inspect
    import shutil

    from pipeline import io, parquet_parallel

    names = {m.__name__ for m in io.code_modules(dedup)}
    assert {"pipeline.rows", "pipeline.parquet_parallel", "pipeline.minhash", "pipeline.stages.dedup_ooc",
            "pipeline.io", "pipeline.config"} <= names
    out = tmp_path / "out"
    shutil.copytree(planted["out"], out)
    cfg = DedupConfig(workers=1)
    assert dedup.run(planted["input"], out, cfg, progress=False)["counts"] == planted["manifest"]["counts"]

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(dedup, "RowReader", boom)
    real = inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda o: real(o) + ("\n# edited" if o is parquet_parallel else ""))
    with pytest.raises(AssertionError, match="recomputed"):
        dedup.run(planted["input"], out, cfg, progress=False)


def test_deterministic_across_runs_and_workers(tmp_path, monkeypatch):
    rows = gsm8k_rows(3000)
    rows += [{**r, "id": f"copy/{i}", "response": r["response"] + " Done."} for i, r in enumerate(rows[:200:7])]
    src = tmp_path / "rows.parquet"
    table = pa.Table.from_pylist(rows)
    write_parquet(table.set_column(2, "response", table["response"].cast(pa.large_string())), src)
    monkeypatch.setattr(dedup, "PART_ROWS", 700)  # several parts, shared by the two workers
    m1 = dedup.run(src, tmp_path / "a", DedupConfig(workers=1), progress=False)
    m2 = dedup.run(src, tmp_path / "b", DedupConfig(workers=2), progress=False)
    assert m2["counts"] == m1["counts"]
    assert m1["lsh"]["signature_parts"] == 5
    assert m1["counts"]["near_duplicates"] >= 25
    for name in ("rows.parquet", "removals.parquet", "clusters.parquet"):
        assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name)
    for k in range(5):
        part = f"signatures/part-{k:05d}.npy"
        assert np.array_equal(np.load(tmp_path / "a" / part), np.load(tmp_path / "b" / part))


def test_priority_wins_and_strata_counts(tmp_path):
    base = gsm8k_rows(400)
    rows = []
    for i, r in enumerate(base):
        rows.append({**r, "source": "low", "stratum": "low/all", "priority": 1})
    # the same problems again from a better source, later in the file: exact copies and near copies
    rng = random.Random(1)
    for i, r in enumerate(base[:60]):
        c = {**r, "id": f"high/{i}", "source": "high", "stratum": "high/all", "priority": 0}
        if i % 2:
            c = near_copy(rng, c, f"high/{i}", edits=1)
            c["source"], c["stratum"], c["priority"] = "high", "high/all", 0
        rows.append(c)
    rows.append({**base[100], "id": "low/tie", "source": "low", "stratum": "low/all", "priority": 1})  # tie
    rows.append({**base[3], "id": "low/again", "source": "low", "stratum": "low/all", "priority": 1})
    src = tmp_path / "rows.parquet"
    table = pa.Table.from_pylist(rows).cast(
        pa.schema([(f.name, pa.int32() if f.name == "priority" else f.type) for f in pa.Table.from_pylist(rows).schema])
    )
    write_parquet(table, src)
    man = dedup.run(src, tmp_path / "out", DedupConfig(), progress=False)
    rem = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "removals.parquet").to_pylist()}
    kept = pq.read_table(tmp_path / "out" / "rows.parquet")
    kept_ids = set(kept["id"].to_pylist())
    for i in range(60):
        assert f"high/{i}" in kept_ids
        if i == 1:  # the one edit leaves this short row at Jaccard 0.792 with its copy: below 0.8, kept
            assert ref_jaccard(base[1], next(r for r in rows if r["id"] == "high/1")) < 0.8
            assert "gsm8k/1" in kept_ids
            continue
        r = rem[f"gsm8k/{i}"]
        assert r["duplicate_of"] == f"high/{i}"
        assert r["reason"] == ("near_duplicate" if i % 2 else "exact_duplicate")
    assert rem["low/tie"]["duplicate_of"] == "gsm8k/100"  # same priority: the earlier row wins
    # an exact copy of gsm8k/3, itself a near duplicate of high/3, points at the kept row
    assert rem["low/again"]["duplicate_of"] == "high/3"
    assert rem["low/again"]["reason"] == "exact_duplicate" and rem["low/again"]["detail"].endswith("gsm8k/3")
    assert kept.column_names == table.column_names
    strata = man["strata"]
    assert strata["high/all"] == {"in": 60, "kept": 60, "exact": 0, "near": 0}
    assert strata["low/all"]["in"] == 402
    assert strata["low/all"]["exact"] == 32 and strata["low/all"]["near"] >= 29
    assert sum(s["kept"] for s in strata.values()) == man["counts"]["kept"]


def test_malformed_input_rejected_and_counted(tmp_path):
    good = gsm8k_rows(50)
    lines = [json.dumps(r) for r in good]
    lines += [
        '{"id": "bad/json", "instruction": "x", ',  # truncated JSON
        json.dumps({"id": "bad/missing", "instruction": "q", "condition": "cot", "source": "s", "domain": "d"}),
        json.dumps({**good[0], "id": "bad/type", "response": 5}),
        json.dumps({**good[1], "id": "bad/empty", "response": "   "}),
        "[1, 2, 3]",
        json.dumps({**good[2], "id": "dup/2"}),  # a valid exact duplicate
    ]
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(lines) + "\n")
    man = dedup.run(src, tmp_path / "out", DedupConfig(), progress=False)
    c = man["counts"]
    assert c["rejected"] == 5 and c["rows_in"] == 51 and c["exact_duplicates"] == 1 and c["kept"] == 50
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert {r["reason"] for r in rejects} == {"bad_json", "missing_field", "wrong_type", "empty_field", "not_an_object"}
    assert all(r["stage"] == "dedup" for r in rejects)


def test_empty_and_tiny_inputs(tmp_path):
    src = tmp_path / "one.jsonl"
    src.write_text(json.dumps(gsm8k_rows(1)[0]) + "\n")
    man = dedup.run(src, tmp_path / "out", DedupConfig(), progress=False)
    assert man["counts"] == {"rows_in": 1, "kept": 1, "exact_duplicates": 0, "near_duplicates": 0, "rejected": 0}
    rows = [
        {"id": f"p/{i}", "instruction": "?", "response": "!!", "condition": "c", "source": "s", "domain": "d"}
        for i in range(2)
    ]
    rows.append({**rows[0], "id": "p/x", "instruction": "¿?"})  # no word at all: never a near duplicate
    src = tmp_path / "punct.parquet"
    write_parquet(pa.Table.from_pylist(rows), src)
    man = dedup.run(src, tmp_path / "out2", DedupConfig(), progress=False)
    assert man["counts"]["exact_duplicates"] == 1 and man["counts"]["near_duplicates"] == 0


# ------------------------------------------------------------------------------------------------
# the threshold is the exact Jaccard; chains are explained
# ------------------------------------------------------------------------------------------------
class Words:
    """Documents of words that occur nowhere else (w0, w1, ...): two documents share exactly the
    shingles their construction says."""

    def __init__(self) -> None:
        self.next = 0

    def __call__(self, n: int) -> list[str]:
        self.next += n
        return [f"w{k}" for k in range(self.next - n, self.next)]


def doc_row(row_id: str, words: list[str]) -> dict:
    # the near-dedup text is instruction + newline + response: the words in order
    return {"id": row_id, "instruction": " ".join(words[:5]), "response": " ".join(words[5:]),
            "condition": "c", "source": row_id.split("/")[0], "domain": "d"}


def with_suffix_replaced(words: list[str], k: int, new: Words) -> list[str]:
    """The words with the last k replaced: with S = len(words) - 4 distinct 5-grams, the two share
    S - k of them, Jaccard (S - k) / (S + k)."""
    return words[:-k] + new(k)


def run_rows(tmp_path: Path, rows: list[dict], name: str = "out", **cfg) -> tuple[dict, dict, set]:
    src = tmp_path / "rows.parquet"
    write_parquet(pa.Table.from_pylist(rows), src)
    man = dedup.run(src, tmp_path / name, DedupConfig(**cfg), progress=False)
    rem = {r["id"]: r for r in pq.read_table(tmp_path / name / "removals.parquet").to_pylist()}
    kept = set(pq.read_table(tmp_path / name / "rows.parquet")["id"].to_pylist())
    return man, rem, kept


def test_accepted_pairs_have_exact_jaccard_at_least_threshold(tmp_path):
    new = Words()
    rows, below, above = [], [], []  # (original, copy, true Jaccard)
    for k in [23, 24, 25, 26, 27, 28] * 3:  # S = 200: Jaccard 0.794 ... 0.754, just below 0.8
        a = new(204)
        rows += [doc_row(f"orig/{len(rows)}", a), doc_row(f"below/{len(rows)}", with_suffix_replaced(a, k, new))]
        below.append((rows[-2], rows[-1], (200 - k) / (200 + k)))
    for S, k in [(198, 22)] * 4 + [(200, k) for k in range(10, 23)]:  # 0.8 exactly (176/220), 0.802 ... 0.905
        a = new(S + 4)
        rows += [doc_row(f"orig/{len(rows)}", a), doc_row(f"above/{len(rows)}", with_suffix_replaced(a, k, new))]
        above.append((rows[-2], rows[-1], (S - k) / (S + k)))
    for o, c, j in below + above:  # the construction is what it says
        assert ref_jaccard(o, c) == pytest.approx(j, abs=1e-12)

    man, rem, kept = run_rows(tmp_path, rows)
    for o, c, j in below:  # not near duplicates, however close
        assert c["id"] in kept and o["id"] in kept, (c["id"], j)
    for o, c, j in above:  # near duplicates, down to exactly the threshold
        r = rem[c["id"]]
        assert (r["reason"], r["duplicate_of"]) == ("near_duplicate", o["id"]), (c["id"], j)
        assert r["detail"] == f"matched {o['id']} at J={floor3(j):.3f}"
    assert set(rem) == {c["id"] for _, c, _ in above}
    assert man["lsh"]["verify"] == "exact" and man["lsh"]["verify_threshold"] == 0.8
    # the below pairs were candidates, and verification is what turned them down
    pairs = pq.read_table(tmp_path / "out" / "verify" / "pairs.parquet").to_pylist()
    assert all(p["jaccard"] >= 0.8 for p in pairs if p["accepted"])
    assert sum(not p["accepted"] for p in pairs) >= len(below) - 2
    refused = sorted(round(p["jaccard"], 9) for p in pairs if not p["accepted"])
    assert set(round(j, 9) for _, _, j in below) <= set(refused)

    # the looser verify="estimate" accepts pairs below the threshold (within 2 standard errors)
    man, rem, kept = run_rows(tmp_path, rows, "estimate", verify="estimate")
    assert man["lsh"]["verify_threshold"] < 0.75
    assert sum(c["id"] in rem for _, c, _ in below) >= 5
    assert all(r["detail"].startswith("matched ") and " at est. J=" in r["detail"] for r in rem.values())


def test_chain_removal_names_the_matched_row_and_its_jaccard_to_the_kept_row(tmp_path):
    new = Words()
    rows, chains = [], []
    for t in range(4):
        # A ~ B ~ C: B = A with its last 15 words replaced, C = B with its first 15 words replaced.
        # J(A,B) = J(B,C) = 185/215 = 0.860 >= 0.8, J(A,C) = 170/230 = 0.739 < 0.8
        a = new(204)
        b = with_suffix_replaced(a, 15, new)
        c = new(15) + b[15:]
        rows += [doc_row(f"a/{t}", a), doc_row(f"b/{t}", b), doc_row(f"c/{t}", c)]
        chains.append(rows[-3:])
    # and D ~ E ~ F with F also similar enough to D: F is matched with D directly, no chain
    d = new(404)
    e = with_suffix_replaced(d, 10, new)
    f = new(10) + e[10:]
    rows += [doc_row("d/0", d), doc_row("e/0", e), doc_row("f/0", f)]
    assert ref_jaccard(rows[-3], rows[-1]) >= 0.8 > max(ref_jaccard(x, z) for x, _, z in chains)

    man, rem, kept = run_rows(tmp_path, rows)
    for a, b, c in chains:
        assert a["id"] in kept
        assert rem[b["id"]]["detail"] == f"matched {a['id']} at J={floor3(185 / 215):.3f}"
        r = rem[c["id"]]
        assert (r["reason"], r["duplicate_of"]) == ("near_duplicate", a["id"])  # still names the kept row
        assert r["detail"] == f"matched {b['id']} at J=0.860; J to kept row 0.739 < 0.8 (chain)"
        m = DETAIL.fullmatch(r["detail"])
        assert float(m["jk"]) == floor3(ref_jaccard(a, c)) and m["chain"]
    assert rem["f/0"]["duplicate_of"] == "d/0"
    assert rem["f/0"]["detail"] == f"matched d/0 at J={floor3(380 / 420):.3f}"
    assert man["lsh"]["chained"] == 4 and man["lsh"]["chained_below_threshold"] == 4


# ------------------------------------------------------------------------------------------------
# kernel
# ------------------------------------------------------------------------------------------------
TRICKY = [
    "Hello, World! hello WORLD",
    "",
    "!!! ... ---",
    "one",
    "naïve café — Ünïcode wörds; don’t STOP",
    "x" * 30 + " " + "y" * 17 + " " + "z" * 8 + " " + "z" * 9 + " " + "w" * 16,
    "ÉCOLE école Straße",
    "under_score snake_case 123 4.5 a-b",
    "tail",
    "word",
]


def test_word_hashes_match_python_words():
    wh, wo = minhash.word_hashes(TRICKY)
    seen: dict[str, int] = {}
    for d, text in enumerate(TRICKY):
        ref = WORD.findall(text.lower())
        got = wh[wo[d] : wo[d + 1]].tolist()
        assert len(got) == len(ref), text
        for w, h in zip(ref, got):
            assert seen.setdefault(w, h) == h, w
    assert len(set(seen.values())) == len(seen)  # different words, different hashes
    wh2, _ = minhash.word_hashes(pa.array(TRICKY, pa.large_string()))  # same hashes in another call/type
    assert np.array_equal(wh, wh2)
    wh3, wo3 = minhash.word_hashes(TRICKY, lowercase=False)
    assert wh3[wo3[0]] != wh3[wo3[0] + 2]  # Hello vs hello
    sliced = pa.array([None] + TRICKY).slice(3, 5)  # an Arrow slice (offset != 0) after a null
    wh4, wo4 = minhash.word_hashes(sliced)
    assert np.array_equal(wh4, wh[wo[2] : wo[7]]) and np.array_equal(wo4, wo[2:8] - wo[2])


def test_shingles_count_and_identity():
    texts = ["a b c d e f g", "a b c", "", "c d e f g a b c d e", "x y"]
    wh, wo = minhash.word_hashes(texts)
    sh, so = minhash.shingle_hashes(wh, wo, 5)
    assert np.diff(so).tolist() == [3, 1, 0, 6, 1]
    assert sh.max() < 2**32
    assert sh[so[0] + 2] == sh[so[3]]  # the 5-gram "c d e f g" in both
    assert sh[so[0]] == sh[so[3] + 5]  # "a b c d e"
    assert len(set(sh[so[3] : so[4]].tolist())) == 6
    assert sh[so[1]] not in set(sh[so[0] : so[1]].tolist())  # "a b c" (a short doc) is not a 5-gram


def test_minhash_matches_definition():
    a, b = minhash.permutations(32, seed=3)
    rng = np.random.default_rng(0)
    sizes = [5, 0, 1, 300, 9000]  # includes a document longer than a block
    sh = rng.integers(0, 2**32, sum(sizes), dtype=np.uint64)
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    sig = minhash.minhash(sh, off, a, b, block=2048)
    mask = (1 << 64) - 1
    for d in range(len(sizes)):
        xs = [int(x) for x in sh[off[d] : off[d + 1]]]
        if not xs:
            assert (sig[d] == minhash.EMPTY).all()
            continue
        ref = [min((int(ai) * x + int(bi)) & mask for x in xs) >> 33 for ai, bi in zip(a, b)]
        assert sig[d].tolist() == ref


def test_estimated_jaccard_close_to_true_jaccard():
    rng = np.random.default_rng(1)
    a, b = minhash.permutations(128, seed=1)
    docs, true_j = [], []
    for _ in range(200):
        n = int(rng.integers(50, 400))
        j = rng.uniform(0.0, 1.0)
        common = int(round(n * 2 * j / (1 + j)))
        pool = rng.choice(2**32, 2 * n, replace=False).astype(np.uint64)
        docs += [pool[:n], np.concatenate([pool[:common], pool[n : 2 * n - common]])]
        true_j.append(common / (2 * n - common))
    off = np.concatenate([[0], np.cumsum([d.size for d in docs])]).astype(np.int64)
    sig = minhash.minhash(np.concatenate(docs), off, a, b)
    est = minhash.estimated_jaccard(sig[0::2], sig[1::2])
    err = est - np.array(true_j)
    assert abs(err.mean()) < 0.01
    assert np.sqrt((err**2).mean()) < 0.05  # binomial std <= sqrt(0.25 / 128) = 0.044
    assert np.abs(err).max() < 0.16


def test_lsh_recall_above_threshold_and_few_random_candidates():
    rng = np.random.default_rng(2)
    hasher = minhash.MinHasher(num_perm=128, seed=1)
    bands, rows = minhash.optimal_bands(0.8, 128, min_recall=0.99)
    assert bands * rows <= 128 and minhash.candidate_probability(0.8, bands, rows) >= 0.99
    vocab = np.array([f"w{i}" for i in range(5000)])
    texts, pairs, true_j = [], [], []
    for k in range(300):
        words = list(vocab[rng.integers(0, 5000, 200)])
        copy = list(words)
        for pos in rng.choice(200, int(rng.integers(0, 5)), replace=False):
            copy[pos] = "edited"
        texts += [" ".join(words), " ".join(copy)]
        pairs.append((2 * k, 2 * k + 1))
        true_j.append(
            len(ref_shingles(texts[-2]) & ref_shingles(texts[-1]))
            / len(ref_shingles(texts[-2]) | ref_shingles(texts[-1]))
        )
    sig = hasher.signatures(texts)
    cand = {tuple(p) for p in minhash.candidate_pairs(minhash.band_keys(sig, bands, rows)).tolist()}
    above = [p for p, j in zip(pairs, true_j) if j >= 0.8]
    assert len(above) >= 100
    assert sum(p in cand for p in above) / len(above) >= 0.98
    unrelated = [p for p in cand if p not in set(pairs)]
    assert len(unrelated) <= 3


def test_shingle_sets_and_overlap_match_python_sets():
    rng = np.random.default_rng(4)
    texts = [" ".join(f"w{x}" for x in rng.integers(0, 25, int(rng.integers(0, 40)))) for _ in range(300)]
    texts += TRICKY
    values, offsets = minhash.shingle_sets(texts, 3)
    wh, wo = minhash.word_hashes(texts)
    sh, so = minhash.shingle_hashes(wh, wo, 3)
    sets = [set(values[offsets[d] : offsets[d + 1]].tolist()) for d in range(len(texts))]
    for d, st in enumerate(sets):  # the values minhash is computed from, once each, sorted
        assert st == set(sh[so[d] : so[d + 1]].tolist())
        assert values[offsets[d] : offsets[d + 1]].tolist() == sorted(st)
    u, v = rng.integers(0, len(texts), 4000), rng.integers(0, len(texts), 4000)
    for block in (50, 1 << 22):  # many blocks of pairs (a pair larger than a block alone), one block
        inter, union = minhash.set_overlap(values, offsets, u, v, block=block)
        assert inter.tolist() == [len(sets[a] & sets[b]) for a, b in zip(u, v)]
        assert union.tolist() == [len(sets[a] | sets[b]) for a, b in zip(u, v)]


def test_match_tree_shortest_path_best_weight():
    pairs = np.array([[0, 1], [1, 2], [0, 3], [2, 3], [3, 4], [5, 6], [2, 4]])
    weight = np.array([0.9, 0.85, 0.8, 0.95, 0.8, 0.9, 0.99])
    root = minhash.union_find(8, pairs)
    match, edge = minhash.match_tree(root, pairs, weight)
    # 1, 3: paired with the root; 2: one step from 1 and from 3, 3's pair weighs more; 4: via 3
    # (distance 2) rather than its heavier pair with 2 (distance 3 through 2)
    assert match.tolist() == [0, 0, 3, 0, 3, 5, 5, 7]
    assert edge.tolist() == [-1, 0, 3, 2, 4, -1, 5, -1]
    m2, _ = minhash.match_tree(root, pairs, np.ones(7))  # equal weights: the smaller neighbour
    assert m2[2] == 1


def test_union_find_components_rooted_at_smallest():
    rng = np.random.default_rng(3)
    n = 2000
    pairs = rng.integers(0, n, (1500, 2))
    root = minhash.union_find(n, pairs)
    parent = list(range(n))  # plain reference union-find

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in pairs.tolist():
        ru, rv = find(u), find(v)
        parent[max(ru, rv)] = min(ru, rv)
    assert root.tolist() == [find(x) for x in range(n)]
    assert minhash.union_find(5, np.zeros((0, 2), np.int64)).tolist() == [0, 1, 2, 3, 4]


def test_optimal_bands_like_datasketch_and_min_recall():
    # datasketch 2.0's _optimal_param(threshold, num_perm, 0.5, 0.5) gives these
    assert minhash.optimal_bands(0.8, 128) == (9, 13)
    assert minhash.optimal_bands(0.5, 128) == (25, 5)
    assert minhash.optimal_bands(0.9, 256) == (9, 28)
    bands, rows = minhash.optimal_bands(0.8, 128, min_recall=0.99)
    assert minhash.candidate_probability(0.8, bands, rows) >= 0.99 and bands * rows <= 128
    assert dedup.lsh_params(DedupConfig(bands=32))[:2] == (32, 4)


def test_candidate_pairs_are_bucket_stars():
    keys = np.arange(16 * 12, dtype=np.uint64).reshape(16, 12) * np.uint64(0x9E3779B97F4A7C15)
    keys[:, 7] = keys[:, 5]  # 5 and 7 share every band
    keys[3, 9] = keys[3, 5]  # bucket {5, 7, 9} in band 3
    keys[2, [3, 10]] = keys[2, 5]  # bucket {3, 5, 7, 10} in band 2
    assert minhash.candidate_pairs(keys).tolist() == [[3, 5], [3, 7], [3, 10], [5, 7], [5, 9]]
    valid = np.ones(12, bool)
    valid[3] = False
    assert minhash.candidate_pairs(keys, valid).tolist() == [[5, 7], [5, 9], [5, 10]]
    assert minhash.candidate_pairs(keys[:, :3]).shape == (0, 2)


def test_exact_key_whitespace_collapse_is_the_regex():
    """collapse_whitespace (literal replaces for ASCII texts, the regex for the others) gives what
    replace_all(r"\\s{2,}|[^\\S ]", " ") gives, over every kind of whitespace, and the exact-dedup key
    is instruction + SEP + response each lowercased, collapsed and trimmed."""
    import polars as pl

    rng = random.Random(5)
    alphabet = list("aB c") + ["\t", "\n", "\x0b", "\x0c", "\r", "\x1c", "\x1f", "\u0085", "\u00a0", "\u1680",
                               "\u2003", "\u2028", "\u3000", "É", "ß", "\u200b", "İ"]
    vals = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(20_000)]
    vals += ["ascii  only\n\n text", " x ", "", None]
    s = pl.Series(vals, dtype=pl.String)
    assert dedup.collapse_whitespace(s).to_list() == s.str.replace_all(r"\s{2,}|[^\S ]", " ").to_list()
    ascii_vals = ["".join(rng.choice("aBQ c\t\n\r\x0b\x0c\x1f") for _ in range(rng.randint(0, 12))) for _ in range(5000)]
    for ins, resp in ((vals[: len(vals) // 2], vals[len(vals) // 2 :][: len(vals) // 2]),  # some non-ASCII
                      (ascii_vals[:2500], ascii_vals[2500:])):  # ASCII only (Arrow's ASCII lowercase)
        _check_exact_key(ins, resp)


def _check_exact_key(ins: list, resp: list) -> None:
    t = pa.table({"instruction": pa.array(ins, pa.string()), "response": pa.array(resp, pa.large_string())})
    for lowercase in (True, False):
        def ref(x):
            if x is None:
                return None
            x = x.lower() if lowercase else x
            return re.sub(r"\s{2,}|[^\S ]", " ", x).strip(" ")  # Python's \s: also \x1c-\x1f

        want = [None if a is None or b is None else f"{ref(a)}{dedup.SEP}{ref(b)}" for a, b in zip(ins, resp)]
        got = dedup.normalized_text(t, lowercase).to_list()
        # Python's \s also matches \x1c-\x1f, which Unicode White_Space (polars' \s) does not
        ok = [g == w for g, w, a, b in zip(got, want, ins, resp) if not re.search("[\x1c-\x1f]", (a or "") + (b or ""))]
        assert len(ok) > 500 and all(ok)
        # the exact step's 128-bit hashes (computed from the two columns) group rows as the keys do
        h = dedup.exact_hashes(t, lowercase)
        by_key: dict = {}
        by_hash: dict = {}
        for i, (k, h0, h1) in enumerate(zip(got, h[0].tolist(), h[1].tolist())):
            by_key.setdefault(k, i)
            by_hash.setdefault((h0, h1), i)
            assert by_key[k] == by_hash[(h0, h1)]
        assert len(by_key) == len(by_hash)


def test_joined_texts_of_any_rows():
    """The texts file's joined texts: the filtered-then-joined path (ascending rows) is the joined
    texts taken at those rows, for chunked, sliced, null and string/large_string columns."""
    rng = np.random.default_rng(3)
    n = 300
    ins = pa.chunked_array([pa.array([f"q{i}\n" if i % 7 else None for i in range(0, 120)]),
                            pa.array([f"q{i} é" for i in range(120, n)])])
    resp = pa.array([f"r{i}" * (i % 5) for i in range(n)], pa.large_string())
    t = pa.table({"instruction": ins, "response": resp}).slice(11)
    m = t.num_rows
    whole = pa.compute.binary_join_element_wise(
        t["instruction"].combine_chunks().cast(pa.large_string()), t["response"].combine_chunks(),
        pa.scalar("\n", pa.large_string()))
    for rows in (np.arange(m), np.flatnonzero(rng.random(m) < 0.9), np.flatnonzero(rng.random(m) < 0.1),
                 rng.permutation(m), np.zeros(0, np.int64)):
        got = dedup._joined_texts(t, rows)
        assert got.type == pa.large_string() and got.equals(whole.take(pa.array(rows, pa.int64())))
