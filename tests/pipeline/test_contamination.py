"""Contamination check on real data: GSM8K train with planted benchmark questions."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import TokenizerConfig
from pipeline.stages import contamination as C
from pipeline.stages import tokenize


def _lines(path):
    return [json.loads(x) for x in path.read_text().split("\n") if x.strip()]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, shared, gsm8k_train):
    """Tokenized GSM8K train (all rows) plus planted rows; returns (tokenizer dir, bench dir, plants)."""
    d = tmp_path_factory.mktemp("contam")
    bench = shared / "data" / "benchmarks"
    gsm_test = _lines(bench / "gsm8k" / "test.jsonl")
    arc = _lines(bench / "arc_challenge" / "test.jsonl")
    mmlu = _lines(bench / "mmlu" / "test.jsonl")
    rows = []
    for i, r in enumerate(_lines(gsm8k_train)):
        rows.append({"id": f"gsm8k/{i}", "instruction": r["question"], "response": r["answer"],
                     "condition": "cot", "source": "gsm8k", "domain": "math"})
    q = gsm_test[10]["question"]
    words = q.split()
    edited = " ".join(w if k % 9 != 4 else w.upper() for k, w in enumerate(words))  # every 9th word changed
    plants = {
        # row id -> (benchmark item id, expectation)
        "leak/verbatim-gsm8k": ("gsm8k/test/3", "dirty", gsm_test[3]["question"], "Answer: 7"),
        "leak/edited-gsm8k": ("gsm8k/test/10", "not_clean", edited, "The answer is 12."),
        "leak/arc-in-response": ("arc_challenge/test/5", "dirty", "Here is a science question.",
                                 "Consider: " + C.item_text("arc_challenge", arc[5]) + "\nThe answer is B."),
        "leak/mmlu-in-prompt": ("mmlu/test/1234", "dirty",
                                "Solve this. " + C.item_text("mmlu", mmlu[1234]) + " Think first.", "It is C."),
    }
    for k, (pos, (_, _, ins, resp)) in enumerate(plants.items()):
        rows.insert(1000 * (k + 1), {"id": pos, "instruction": ins, "response": resp, "condition": "direct",
                                     "source": "leak", "domain": "general"})
    f = d / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenize.run(f, d / "tok", TokenizerConfig(vocab_size=2000, sample_rows=4000), conditions=["direct", "cot"],
                 seed=0, progress=False)
    return d, bench, plants


def _items(out):
    return {r["item_id"]: r for r in pq.read_table(out / C.ITEMS_FILE).to_pylist()}


def test_planted_items_found_and_bucketed(planted):
    d, bench, plants = planted
    cfg = C.ContaminationConfig(benchmarks=("gsm8k", "arc_challenge", "mmlu"), decontaminate=True)
    man = C.run(d / "tok", bench, d / "out", cfg, progress=False)
    items = _items(d / "out")
    for rid, (item, expect, *_ ) in plants.items():
        it = items[item]
        if expect == "dirty":
            assert it["bucket"] == "dirty" and it["coverage"] >= 0.99, (rid, it)
            assert it["longest_span"] >= 0.99 * it["tokens"]
        else:
            assert it["bucket"] != "clean" and it["bucket_8"] != "clean", (rid, it)
            assert 0.2 <= it["coverage"] < 1.0

    # unrelated items stay clean: ARC and MMLU have only their planted item dirty (MMLU repeats some
    # choice lists, so a sibling of the planted question may be partly covered); GSM8K train and test
    # share templates, but clean is the overwhelming majority
    rep = json.loads((d / "out" / C.REPORT_FILE).read_text())
    for name in ("arc_challenge", "mmlu"):
        c = rep["benchmarks"][name]["by_n"]["13"]["counts"]
        assert c["dirty"] == 1 and c["clean"] >= rep["benchmarks"][name]["checked"] - 3, (name, c)
    g = rep["benchmarks"]["gsm8k"]["by_n"]["13"]["percent"]
    assert g["clean"] > 99.0, g
    assert rep["benchmarks"]["gsm8k"]["by_n"]["8"]["percent"]["clean"] > 90.0  # 8-grams catch shared phrasing (about 93% clean)

    # the report names the responsible rows (id and source)
    dirty = {x["item_id"]: x for e in rep["benchmarks"].values() for x in e["dirty_items"]}
    assert set(dirty) == {p[0] for p in plants.values() if p[1] == "dirty"}
    for rid, (item, expect, *_ ) in plants.items():
        if expect == "dirty":
            assert [r["id"] for r in dirty[item]["responsible"]] == [rid]
            assert dirty[item]["responsible"][0]["source"] == "leak"
            assert dirty[item]["top_rows"][0]["coverage"] >= 0.99

    # decontamination drops exactly the rows that make items dirty, and lineage adds up
    removed = pq.read_table(d / "out" / C.REMOVALS_FILE).to_pylist()
    assert sorted(r["id"] for r in removed) == sorted(r for r, p in plants.items() if p[1] == "dirty")
    assert all(r["stage"] == "contamination" and r["reason"] == C.REASON and r["detail"] for r in removed)
    n_in = pq.ParquetFile(d / "tok" / "tokenized.parquet").metadata.num_rows
    kept = pq.read_table(d / "out" / "tokenized.parquet")
    assert kept.num_rows == n_in - 3 == man["counts"]["rows_kept"]
    assert "leak/edited-gsm8k" in set(kept["id"].to_pylist())
    assert (d / "out" / "tokenizer_meta.json").exists()

    # rerun: skipped (same fingerprint); the decontaminated data are clean
    assert C.run(d / "tok", bench, d / "out", cfg, progress=False) == man
    C.run(d / "out", bench, d / "out2", C.ContaminationConfig(benchmarks=("gsm8k", "arc_challenge", "mmlu")),
          progress=False)
    assert json.loads((d / "out2" / C.REPORT_FILE).read_text())["counts"]["dirty"] == {
        "gsm8k": 0, "arc_challenge": 0, "mmlu": 0}


def test_cli_on_rows_file(planted, tmp_path, capsys):
    d, bench, _ = planted
    rows = tmp_path / "rows.jsonl"
    q = C.item_text("math", _lines(bench / "math" / "test.jsonl")[7])
    rows.write_text(json.dumps({"id": "x/0", "instruction": q, "response": "ok then", "condition": "direct",
                                "source": "x", "domain": "math"}) + "\n")
    code = C.main(["--input", str(rows), "--tokenizer", str(d / "tok"), "--benchmarks", str(bench),
                   "--output", str(tmp_path / "o"), "--set", "benchmarks=[math, drop]", "--no-progress"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"]["dirty"] == {"math": 1, "drop": 0}
    items = _items(tmp_path / "o")
    assert items["math/test/7"]["bucket"] == "dirty"
    assert C.main(["--input", str(rows), "--benchmarks", str(bench), "--output", str(tmp_path / "p"),
                   "--set", "primary_n=5"]) == 2
    # the command, without a tokenizer: the pipeline's tokenizer is trained on the rows themselves
    capsys.readouterr()
    code = C.main(["--input", str(d / "rows.jsonl"), "--benchmarks", str(bench), "--output", str(tmp_path / "q"),
                   "--set", "benchmarks=[gsm8k, arc_challenge, mmlu]", "--no-progress"])
    assert code == 0
    cap = capsys.readouterr()
    assert "training the pipeline's tokenizer" in cap.err
    report = json.loads((tmp_path / "q" / C.REPORT_FILE).read_text())
    assert (tmp_path / "q" / "input_tokenized" / "tokenizer.json").exists()
    assert report["counts"]["dirty"]["gsm8k"] >= 1


def test_window_hashes_and_buckets():
    toks = np.array([5, 6, 7, 8, 5, 6, 7, 1, 5, 6, 7], dtype=np.int64)
    h, starts, seg = C.window_hashes(toks, np.array([4, 7]), 3, bad=toks == 1)
    # windows (5,6,7) at 0, 4 and 8 hash the same; none crosses the segment end (3..5) or holds the 1
    assert starts.tolist() == [0, 1, 4, 8]
    assert h[0] == h[2] == h[3] and h[1] != h[0] and seg.tolist() == [0, 0, 1, 1]
    cfg = C.ContaminationConfig()
    got = C.bucket_of(np.array([0.0, 0.1999, 0.2, 0.4999, 0.5, 0.7999, 0.8, 1.0]), cfg).tolist()
    assert got == ["clean", "clean", "not_clean", "not_clean", "not_dirty", "not_dirty", "dirty", "dirty"]


def test_hub_benchmarks_code_path_on_local_dataset_folders(planted, tmp_path, monkeypatch):
    """Benchmarks by name go through datasets.load_dataset (the Hub path); local dataset folders in
    place of the Hub names exercise the same code offline, through the flow-facing `run`."""
    d, bench, _ = planted
    hub = {}
    for name, split in (("gsm8k", "test"), ("arc_challenge", "test")):
        folder = tmp_path / "hub" / name
        folder.mkdir(parents=True)
        (folder / f"{split}.jsonl").write_text((bench / name / f"{split}.jsonl").read_text())
        hub[name] = (str(folder), None, split)
    monkeypatch.setattr(C, "HUB", hub)
    man = C.run(d / "tok", ["gsm8k", "arc_challenge"], tmp_path / "o", C.ContaminationConfig(), progress=False)
    assert man["counts"]["dirty"] == {"gsm8k": 1, "arc_challenge": 1}
    C.run(d / "tok", bench, tmp_path / "l", C.ContaminationConfig(benchmarks=("gsm8k", "arc_challenge")),
                  progress=False)
    a, b = _items(tmp_path / "o"), _items(tmp_path / "l")
    assert a.keys() == b.keys() and all(a[k]["coverage"] == b[k]["coverage"] for k in a)
    with pytest.raises(ValueError, match="not a known benchmark"):
        C.run(d / "tok", ["squad"], tmp_path / "x", C.ContaminationConfig(), progress=False)
