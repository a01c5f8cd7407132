"""Tokenizer stage on real data (GSM8K train): special ids, layout, determinism, rejections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import io
from pipeline.config import TokenizerConfig
from pipeline.schema import STRATIFIED_SCHEMA
from pipeline.stages import tokenize as T

GSM8K = Path("/work/shared/data/gsm8k/train.jsonl")
CONDITIONS = ["direct", "cot"]
CFG = TokenizerConfig(vocab_size=768, min_frequency=2, sample_rows=1500, split_digits=True)
N_ROWS = 2000

pytestmark = pytest.mark.skipif(not GSM8K.exists(), reason=f"{GSM8K} not available")


def gsm8k_rows(n: int) -> list[dict]:
    """Normalized rows: even rows 'cot' (full worked answer), odd rows 'direct' (final answer only)."""
    rows = []
    with GSM8K.open() as f:
        for i, line in enumerate(f):
            if i >= n:
                break
            r = json.loads(line)
            cot = i % 2 == 0
            rows.append(
                {
                    "id": f"gsm8k/{i}",
                    "instruction": r["question"],
                    "response": r["answer"] if cot else r["answer"].split("####")[-1].strip(),
                    "condition": "cot" if cot else "direct",
                    "source": "gsm8k",
                    "domain": "math",
                }
            )
    return rows


def write_jsonl(rows: list, path: Path) -> Path:
    with path.open("w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return gsm8k_rows(N_ROWS)


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory, rows):
    d = tmp_path_factory.mktemp("tok")
    src = write_jsonl(rows, d / "rows.jsonl")
    man = T.run(src, d / "out", CFG, conditions=CONDITIONS, seed=11, progress=False)
    return d, src, man


def test_special_ids_and_meta(tok_run):
    d, _, man = tok_run
    tok, meta = T.load_tokenizer(d / "out")
    ids = T.special_ids(meta)
    assert (ids.pad, ids.boq, ids.eoq, ids.eoa) == (0, 1, 2, 3)
    assert ids.conditions == {"direct": 4, "cot": 5}
    assert ids.condition("cot") == 5
    with pytest.raises(KeyError, match="known conditions"):
        ids.condition("noisy")
    for name, i in meta["special_tokens"].items():
        assert tok.token_to_id(name) == i
    assert meta["vocab_size"] == tok.get_vocab_size() == CFG.vocab_size
    assert meta["sample_rows"] == CFG.sample_rows
    assert len(meta["sample_sha256"]) == 64
    assert meta["tokenizer_sha256"] == io.sha256_file(d / "out" / "tokenizer.json")
    # loading from the tokenizer.json path works the same way
    tok2, meta2 = T.load_tokenizer(d / "out" / "tokenizer.json")
    assert meta2 == meta and tok2.to_str() == tok.to_str()


def test_layout_and_roundtrip(tok_run, rows):
    d, _, man = tok_run
    tok, meta = T.load_tokenizer(d / "out")
    ids = T.special_ids(meta)
    t = pq.read_table(d / "out" / "tokenized.parquet")
    assert t.schema.equals(T.TOKENIZED_SCHEMA)
    assert t.num_rows == len(rows) == man["counts"]["rows_tokenized"]
    by_id = {r["id"]: r for r in rows}
    specials = ids.all_ids()
    for rec in t.to_pylist():
        src = by_id[rec["id"]]
        p, r = rec["prompt_ids"], rec["response_ids"]
        assert p[0] == ids.boq and p[1] == ids.condition(src["condition"]) and p[-1] == ids.eoq
        assert r[-1] == ids.eoa
        assert not specials & set(p[2:-1]) and not specials & set(r[:-1])
        assert rec["prompt_tokens"] == len(p) and rec["response_tokens"] == len(r)
        # byte-level BPE: decoding the text tokens gives the text back exactly
        assert tok.decode(p[2:-1], skip_special_tokens=False) == src["instruction"]
        assert tok.decode(r[:-1], skip_special_tokens=False) == src["response"]
        assert (rec["stratum"], rec["rule"], rec["condition"]) == ("gsm8k", "default", src["condition"])
    c = man["counts"]
    assert c["tokens"] == c["prompt_tokens"] + c["response_tokens"] == sum(c["tokens_per_stratum"].values())
    assert c["rows_per_stratum"] == {"gsm8k": len(rows)}


def test_deterministic_training_and_outputs(tmp_path, tok_run, rows):
    d, src, man = tok_run
    # same input, another folder: byte-identical outputs
    man2 = T.run(src, tmp_path / "again", CFG, conditions=CONDITIONS, seed=11, progress=False)
    for f in ("tokenizer.json", "tokenized.parquet", "tokenizer_meta.json", "removals.parquet"):
        assert man2["outputs"][f]["sha256"] == man["outputs"][f]["sha256"], f
    # another process (other hash seeds), input rows reversed: the same tokenizer
    rev = write_jsonl(list(reversed(rows)), tmp_path / "rev.jsonl")
    code = (
        "import sys; from pipeline.stages import tokenize as T; from pipeline.config import TokenizerConfig;"
        f"T.run(sys.argv[1], sys.argv[2], TokenizerConfig(**{CFG.model_dump()!r}), conditions={CONDITIONS!r},"
        " seed=11, progress=False)"
    )
    env = dict(os.environ, PYTHONHASHSEED="123", RAYON_NUM_THREADS="2")
    subprocess.run([sys.executable, "-c", code, str(rev), str(tmp_path / "rev")], check=True, env=env)
    assert (tmp_path / "rev" / "tokenizer.json").read_bytes() == (d / "out" / "tokenizer.json").read_bytes()
    meta, meta_rev = (io.read_json(p / "tokenizer_meta.json") for p in (d / "out", tmp_path / "rev"))
    assert meta_rev["sample_sha256"] == meta["sample_sha256"]
    # a different seed draws another training sample
    other = T.run(src, tmp_path / "seed12", CFG, conditions=CONDITIONS, seed=12, progress=False)
    assert io.read_json(tmp_path / "seed12" / "tokenizer_meta.json")["sample_sha256"] != meta["sample_sha256"]
    assert other["fingerprint"] != man["fingerprint"]


def test_idempotent_and_checksums(tmp_path, rows):
    src = write_jsonl(rows[:300], tmp_path / "rows.jsonl")
    cfg = TokenizerConfig(vocab_size=400, sample_rows=300)
    man = T.run(src, tmp_path / "out", cfg, conditions=CONDITIONS, seed=1, progress=False)
    for name, rec in man["outputs"].items():
        assert io.sha256_file(tmp_path / "out" / name) == rec["sha256"], name
    mtime = (tmp_path / "out" / "tokenized.parquet").stat().st_mtime_ns
    assert T.run(src, tmp_path / "out", cfg, conditions=CONDITIONS, seed=1, progress=False) == man
    assert (tmp_path / "out" / "tokenized.parquet").stat().st_mtime_ns == mtime
    man3 = T.run(
        src, tmp_path / "out", cfg.model_copy(update={"vocab_size": 420}), conditions=CONDITIONS, seed=1, progress=False
    )
    assert man3["fingerprint"] != man["fingerprint"] and man3["counts"]["vocab_size"] == 420


def test_malformed_rows_rejected_with_reasons(tmp_path, rows):
    good = rows[:50]
    bad = [
        "{not json",
        json.dumps({**rows[60], "response": ""}),
        json.dumps({k: v for k, v in rows[61].items() if k != "instruction"}),
        json.dumps({**rows[62], "instruction": 7}),
        json.dumps({**rows[63], "id": rows[0]["id"]}),  # duplicate id
        json.dumps({**rows[64], "condition": "noisy"}),  # no such condition token
        "[1, 2]",
    ]
    src = write_jsonl(good + bad, tmp_path / "rows.jsonl")
    man = T.run(src, tmp_path / "out", TokenizerConfig(vocab_size=300), conditions=CONDITIONS, seed=1, progress=False)
    c = man["counts"]
    assert c["rows_in"] == len(good) + len(bad) == c["rows_tokenized"] + c["rows_removed"]
    assert c["rows_tokenized"] == len(good)
    rem = pq.read_table(tmp_path / "out" / "removals.parquet").to_pylist()
    reasons = sorted(r["reason"] for r in rem)
    assert reasons == sorted(
        ["bad_json", "empty_field", "missing_field", "wrong_type", "duplicate_id", "unknown_condition", "not_an_object"]
    )
    assert all(r["stage"] == "tokenizer" and r["detail"] for r in rem)
    assert c["removed_by_reason"]["unknown_condition"] == 1
    unk = next(r for r in rem if r["reason"] == "unknown_condition")
    assert unk["id"] == rows[64]["id"] and "noisy" in unk["detail"]


def test_stratified_parquet_input_and_special_text(tmp_path, rows):
    sub = rows[:200]
    ext = [
        dict(
            r, origin=f"gsm8k/part{i % 2}", stratum=f"gsm8k/part{i % 2}", rule="hq" if i % 2 else "default", priority=0
        )
        for i, r in enumerate(sub)
    ]
    # literal special-token text inside a row stays text
    ext[0]["instruction"] = "What is <|eoq|> and <|pad|>? " + ext[0]["instruction"]
    pq.write_table(pa.Table.from_pylist(ext, schema=STRATIFIED_SCHEMA), tmp_path / "rows.parquet")
    man = T.run(
        tmp_path, tmp_path / "out", TokenizerConfig(vocab_size=400), conditions=CONDITIONS, seed=3, progress=False
    )
    tok, meta = T.load_tokenizer(tmp_path / "out")
    ids = T.special_ids(meta)
    t = pq.read_table(tmp_path / "out" / "tokenized.parquet").to_pylist()
    first = t[0]
    assert ids.eoq not in first["prompt_ids"][2:-1] and ids.pad not in first["prompt_ids"]
    assert tok.decode(first["prompt_ids"][2:-1], skip_special_tokens=False) == ext[0]["instruction"]
    assert {(r["stratum"], r["rule"]) for r in t} == {("gsm8k/part0", "default"), ("gsm8k/part1", "hq")}
    assert set(man["counts"]["tokens_per_stratum"]) == {"gsm8k/part0", "gsm8k/part1"}


def test_pretrained_local_tokenizer(tmp_path, tok_run):
    d, src, _ = tok_run
    # a trained tokenizer reused as "pretrained", with one more condition: its token is added
    cfg = TokenizerConfig(kind="pretrained", name=str(d / "out" / "tokenizer.json"))
    conds = ["direct", "cot", "noisy"]
    man = T.run(src, tmp_path / "pre", cfg, conditions=conds, seed=0, progress=False)
    tok, meta = T.load_tokenizer(tmp_path / "pre")
    ids = T.special_ids(meta)
    assert (ids.pad, ids.boq, ids.eoq, ids.eoa, ids.conditions["cot"]) == (0, 1, 2, 3, 5)
    assert ids.conditions["noisy"] == CFG.vocab_size  # appended after the existing vocabulary
    assert meta["kind"] == "pretrained" and meta["sample_sha256"] is None
    assert man["counts"]["rows_tokenized"] == N_ROWS
    # same ids as the trained run for the same rows
    a = pq.read_table(d / "out" / "tokenized.parquet", columns=["prompt_ids", "response_ids"])
    b = pq.read_table(tmp_path / "pre" / "tokenized.parquet", columns=["prompt_ids", "response_ids"])
    assert a.equals(b)


def test_config_errors(tmp_path, rows):
    src = write_jsonl(rows[:20], tmp_path / "rows.jsonl")
    with pytest.raises(ValueError, match="too small"):
        T.run(
            src,
            tmp_path / "o1",
            TokenizerConfig(vocab_size=300),
            conditions=CONDITIONS + [f"c{i}" for i in range(60)],
            seed=1,
            progress=False,
        )
    with pytest.raises(ValueError, match="clash"):
        T.run(src, tmp_path / "o2", TokenizerConfig(vocab_size=300), conditions=["pad"], seed=1, progress=False)
    with pytest.raises(ValueError, match="repeated"):
        T.special_tokens(["cot", "cot"])
    with pytest.raises(FileNotFoundError):
        T.run(tmp_path / "missing.jsonl", tmp_path / "o3", CFG, conditions=CONDITIONS, seed=1, progress=False)
    with pytest.raises(ValueError, match="pad_id"):
        T.special_ids({"boq_id": 1})
    assert not (tmp_path / "o1" / "manifest.json").exists()


def test_tokens_sane(tok_run):
    d, _, man = tok_run
    t = pq.read_table(d / "out" / "tokenized.parquet", columns=["prompt_tokens", "response_tokens", "condition"])
    cond = np.array(t["condition"].to_pylist())
    resp = t["response_tokens"].to_numpy()
    # direct answers (a number) are short, worked answers are long
    assert np.median(resp[cond == "direct"]) <= 4 < np.median(resp[cond == "cot"])


def test_digits_split_by_default_and_kept_by_every_load(tmp_path, tok_run, rows):
    """Every digit is its own token (the reference's \\p{N} split); the saved tokenizer.json carries the
    pre-tokenizer, so load_tokenizer (contamination, evaluation) encodes numbers the same way."""
    d, _, _ = tok_run
    assert CFG.split_digits is True  # (also the default)
    tok, meta = T.load_tokenizer(d / "out")
    assert meta["split_digits"] is True and T.splits_digits(tok)
    enc = tok.encode("She paid 1234 dollars and 72 cents.", add_special_tokens=False)
    digit_toks = [t for t in enc.tokens if any(c.isdigit() for c in t)]
    assert digit_toks == ["1", "2", "3", "4", "7", "2"]
    assert tok.decode(enc.ids) == "She paid 1234 dollars and 72 cents."
    # no vocabulary entry holds two digits
    assert not [t for t in tok.get_vocab() if sum(c.isdigit() for c in t) > 1 and not t.startswith("<|")]
    # the tokenized rows match an encode with the loaded tokenizer
    t = pq.read_table(d / "out" / "tokenized.parquet", columns=["id", "response_ids"]).to_pylist()
    direct = next(r for r in t if r["id"] == rows[1]["id"])
    assert direct["response_ids"][:-1] == tok.encode(rows[1]["response"], add_special_tokens=False).ids
    assert len(direct["response_ids"]) - 1 == len(rows[1]["response"])  # "72" -> 2 tokens (+ EOA)


def test_split_digits_off_merges_runs_and_pretrained_gets_the_split(tmp_path, rows):
    src = write_jsonl(rows[:600], tmp_path / "rows.jsonl")
    cfg = TokenizerConfig(vocab_size=600, sample_rows=600, split_digits=False)
    T.run(src, tmp_path / "merged", cfg, conditions=CONDITIONS, seed=1, progress=False)
    tok, meta = T.load_tokenizer(tmp_path / "merged")
    assert meta["split_digits"] is False and not T.splits_digits(tok)
    assert any(sum(c.isdigit() for c in t) > 1 for t in tok.get_vocab())  # BPE merged digit runs
    # the same file loaded as "pretrained" with split_digits gets the digit split, saved with it
    pre = TokenizerConfig(kind="pretrained", name=str(tmp_path / "merged" / "tokenizer.json"), split_digits=True)
    T.run(src, tmp_path / "pre", pre, conditions=CONDITIONS, seed=1, progress=False)
    tok2, meta2 = T.load_tokenizer(tmp_path / "pre")
    assert meta2["split_digits"] is True and T.splits_digits(tok2)
    assert [t for t in tok2.encode(" 2024", add_special_tokens=False).tokens if t.strip("Ġ")] == ["2", "0", "2", "4"]
    # a meta that claims the split over a tokenizer.json without it is refused
    m = json.loads((tmp_path / "merged" / "tokenizer_meta.json").read_text())
    m["split_digits"] = True
    (tmp_path / "merged" / "tokenizer_meta.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="split_digits"):
        T.load_tokenizer(tmp_path / "merged")


def test_spilled_id_runs_draw_the_same_sample_and_outputs(tmp_path, tok_run, rows, monkeypatch):
    """Past ID_RUN_BYTES the kept ids go to sorted runs on disk (merged for the sample): the same sample,
    tokenizer and outputs as with every id in memory; no run file is left behind. Duplicate ids name
    their first row (found by a second read of the input, as no id is kept per row)."""
    ids = [f"x{(i * 7919) % 1000:04d}é" for i in range(1000)]
    for sample_rows in (10, 999, 1000, 2000):
        runs = T._IdRuns(tmp_path, run_bytes=1)
        for k in range(0, 1000, 64):
            runs.add(pa.array(ids[k : k + 64], pa.string()))
        assert len(runs.files) == 16
        want = T._sample_indices(pa.array(ids), sample_rows, 5)
        got, got_ids = runs.sample(sample_rows, 5)
        assert got.tolist() == want.tolist() and got_ids == [ids[i] for i in want]
        runs.close()
    assert not list(tmp_path.glob(".tokenizer-ids-*"))
    d, src, man = tok_run
    dup = tmp_path / "d.parquet"  # (a JSONL reader names duplicate ids itself)
    pq.write_table(pa.Table.from_pylist(rows + [{**rows[5], "response": "again"}, {**rows[7], "condition": "direct"}]),
                   dup, row_group_size=512)
    monkeypatch.setattr(T, "ID_RUN_BYTES", 1)
    man2 = T.run(dup, tmp_path / "spilled", CFG, conditions=CONDITIONS, seed=11, progress=False)
    for f in ("tokenizer.json", "tokenized.parquet", "tokenizer_meta.json"):
        assert man2["outputs"][f]["sha256"] == man["outputs"][f]["sha256"], f
    assert not list((tmp_path / "spilled").glob(".tokenizer-ids-*"))
    rem = pq.read_table(tmp_path / "spilled" / "removals.parquet").to_pylist()
    assert [(r["reason"], r["detail"]) for r in rem] == [
        ("duplicate_id", f"row {N_ROWS}: id already used by row 5"),
        ("duplicate_id", f"row {N_ROWS + 1}: id already used by row 7"),
    ]
