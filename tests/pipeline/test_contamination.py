"""Contamination check on real data: all of GSM8K train with benchmark items planted in it (verbatim,
with a prefix and a suffix, with case and punctuation changed, with a word edited, partly copied, short
multiple-choice questions with their options appended, an item shorter than the short-item floor)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import ContaminationConfig, TokenizerConfig
from pipeline.stages import contamination as C
from pipeline.stages import tokenize

BENCH = ("gsm8k", "arc_challenge", "mmlu", "math", "hellaswag", "drop")
NOISE = "zebra quantum lantern orchestra pebble vortex marmalade glacier compass thimble walrus"  # no benchmark has it


def _lines(path):
    return [json.loads(x) for x in path.read_text().split("\n") if x.strip()]


def _cut(text: str, frac: float) -> str:
    """The first words of a text (cut at whitespace) holding `frac` of its normalised words."""
    total = len(C.normalized_words(text))
    words = text.split()
    for k in range(1, len(words) + 1):
        if len(C.normalized_words(" ".join(words[:k]))) >= frac * total:
            return " ".join(words[:k])
    return text


def _options(doc, style: str) -> str:
    choices = doc["choices"]["text"] if isinstance(doc["choices"], dict) else doc["choices"]
    if style == "inline":
        return " ".join(f"({'ABCDE'[k]}) {c}" for k, c in enumerate(choices))
    return "\n".join(f"{'ABCDE'[k]}. {c}" for k, c in enumerate(choices))


@pytest.fixture(scope="module")
def planted(tmp_path_factory, shared, gsm8k_rows):
    """GSM8K train (all 7,473 rows) with planted rows, tokenized; returns (dir, bench dir, plants)
    where plants maps a row id to (benchmark item id, expected bucket)."""
    d = tmp_path_factory.mktemp("contam")
    bench = shared / "data" / "benchmarks"
    gsm = _lines(bench / "gsm8k" / "test.jsonl")
    arc = _lines(bench / "arc_challenge" / "test.jsonl")
    mmlu = _lines(bench / "mmlu" / "test.jsonl")
    math = _lines(bench / "math" / "test.jsonl")
    rows = [json.loads(x) for x in gsm8k_rows(d / "gsm8k.jsonl", 10**9).read_text().splitlines()]
    q = [g["question"] for g in gsm]
    w12 = q[12].split()
    w12[len(w12) // 2] = "seventeen" if w12[len(w12) // 2] != "seventeen" else "eighteen"  # one word edited
    sixty_five, thirty_five = _cut(q[4], 0.65), _cut(q[8], 0.35)
    L4, L8 = len(C.normalized_words(q[4])), len(C.normalized_words(q[8]))
    exp4 = str(C.bucket_of(np.array([len(C.normalized_words(sixty_five)) / L4]), ContaminationConfig())[0])
    exp8 = str(C.bucket_of(np.array([len(C.normalized_words(thirty_five)) / L8]), ContaminationConfig())[0])
    assert (exp4, exp8) == ("not_dirty", "not_clean")
    short_arc = next(i for i, x in enumerate(arc) if 10 <= len(C.normalized_words(C.item_text("arc_challenge", x))) < 20)
    short_mmlu = next(i for i, x in enumerate(mmlu) if 12 <= len(C.normalized_words(C.item_text("mmlu", x))) < 20)
    tiny_mmlu = 1580  # "A wave transfers / amplitude / wavelength / frequency / energy": 6 words, matched whole
    plants = {  # row id -> (item id, expected bucket, instruction, response)
        "leak/verbatim": ("gsm8k/test/3", "dirty", q[3], "Answer: 7"),
        "leak/prefixed-suffixed": ("gsm8k/test/1", "dirty", "Solve this one for me.",
                                   f"A student once asked: {q[1]} We worked it out together."),
        "leak/case-punct": ("gsm8k/test/10", "dirty", q[10].upper().replace(",", " ;").replace(".", "!"), "ok"),
        "leak/word-edited": ("gsm8k/test/12", "dirty", " ".join(w12), "The answer is 12."),
        "leak/partial-65": ("gsm8k/test/4", exp4, f"{sixty_five} {NOISE}", "no idea"),
        "leak/partial-35": ("gsm8k/test/8", exp8, f"{NOISE} {thirty_five} {NOISE}", "no idea"),
        "leak/arc-short-options": (f"arc_challenge/test/{short_arc}", "dirty",
                                   f"Question: {arc[short_arc]['question']}\n{_options(arc[short_arc], 'inline')}\nAnswer:",
                                   "B"),
        "leak/mmlu-short-options": (f"mmlu/test/{short_mmlu}", "dirty",
                                    f"{mmlu[short_mmlu]['question']}\n{_options(mmlu[short_mmlu], 'lines')}\nAnswer:", "C"),
        "leak/mmlu-tiny": (f"mmlu/test/{tiny_mmlu}", "dirty", "Physics quiz.",
                           f"Q: {mmlu[tiny_mmlu]['question']}? {_options(mmlu[tiny_mmlu], 'inline')}"),
        "leak/math-in-response": ("math/test/7", "dirty", "Here is a competition problem.",
                                  f"Problem: {math[7]['problem']}\nSolution: see below."),
    }
    for k, (rid, (_, _, ins, resp)) in enumerate(plants.items()):
        rows.insert(700 * (k + 1), {"id": rid, "instruction": ins, "response": resp, "condition": "direct",
                                    "source": "leak", "domain": "general"})
    f = d / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenize.run(f, d / "tok", TokenizerConfig(vocab_size=2000, sample_rows=4000), conditions=["direct", "cot"],
                 seed=0, progress=False)
    texts = {r["id"]: f"{r['instruction']}\n{r['response']}" for r in rows}
    return d, bench, plants, texts


def _items(out):
    return {r["item_id"]: r for r in pq.read_table(out / C.ITEMS_FILE).to_pylist()}


def _flagged(out):
    rep = json.loads((out / C.REPORT_FILE).read_text())
    return rep, {x["item_id"]: x for e in rep["benchmarks"].values() for x in e["flagged_items"]}


def test_every_planted_item_found_bucketed_and_attributed(planted):
    d, bench, plants, texts = planted
    cfg = ContaminationConfig(decontaminate=True)
    assert cfg.method == "words" and cfg.decontaminate_at == "dirty"
    man = C.run(d / "tok", bench, d / "out", cfg, progress=False)
    items = _items(d / "out")
    rep, flagged = _flagged(d / "out")
    for rid, (item, expect, *_) in plants.items():
        it = items[item]
        assert it["bucket"] == expect, (rid, it)
        # the report names the planted row for every item that is not clean, with the matched span
        x = flagged[item]
        assert x["bucket"] == expect and x["responsible"][0]["id"] == rid, (rid, x)
        r = x["responsible"][0]
        assert r["source"] == "leak" and r["span"][1] - r["span"][0] == it["longest_span"] > 0
        assert r["text"] and r["text"] in " ".join(C.normalized_words(texts[rid]))
        if rid in ("leak/verbatim", "leak/prefixed-suffixed", "leak/case-punct", "leak/mmlu-tiny",
                   "leak/arc-short-options", "leak/mmlu-short-options", "leak/math-in-response"):
            assert it["coverage"] == 1.0 and len(x["responsible"]) == 1, (rid, x)
    # the short-item rule: the tiny item is one whole-item window, the short ones half-length windows
    assert items[plants["leak/mmlu-tiny"][0]]["ngram"] == items[plants["leak/mmlu-tiny"][0]]["length"] == 6
    arc_item = items[plants["leak/arc-short-options"][0]]
    assert arc_item["ngram"] == max(8, (arc_item["length"] + 1) // 2) < 13
    assert items["gsm8k/test/0"]["ngram"] == 13 and "fewer than 8 words is matched whole" in rep["short_item_rule"]

    # unrelated rows never make an item dirty, and flag one only when they share its text: outside GSM8K
    # and MATH every not-clean item is planted or shares its text with a planted row (MMLU's sibling
    # questions "Find the degree for the given field extension ..."); GSM8K train rows share sentences
    # with GSM8K test questions (real overlap) and arithmetic runs ("1 + 3 + 5 + 7 + 9 + 11") with a
    # few short MATH problems; every matched span is in the row named for it
    planted_items = {p[0] for p in plants.values()}
    for name in ("arc_challenge", "mmlu", "hellaswag", "drop"):
        got = rep["benchmarks"][name]["flagged_items"]
        assert {x["item_id"] for x in got} >= planted_items & {i for i in items if i.startswith(name + "/")}
        assert all(r["source"] == "leak" for x in got for r in x["responsible"] + x["top_rows"]), name
    others = [x for i, x in flagged.items() if i not in planted_items]
    assert all(x["bucket"] != "dirty" for x in others)
    by_gsm8k_rows = [x for x in others if all(r["source"] == "gsm8k" for r in x["responsible"])]
    assert all(x["item_id"].startswith(("gsm8k/", "math/")) for x in by_gsm8k_rows) and len(by_gsm8k_rows) <= 8
    for x in flagged.values():
        for r in x["responsible"]:
            assert r["text"] in " ".join(C.normalized_words(texts[r["id"]])), (x["item_id"], r)
            assert len(r["text"].split()) >= 6  # never a short phrase

    # decontamination (at dirty) drops exactly the rows that make items dirty; lineage adds up
    removed = pq.read_table(d / "out" / C.REMOVALS_FILE).to_pylist()
    want = sorted(r for r, p in plants.items() if p[1] == "dirty")
    assert sorted(r["id"] for r in removed) == want
    assert all(r["stage"] == "contamination" and r["reason"] == C.REASON and "dirty" in r["detail"] for r in removed)
    n_in = pq.ParquetFile(d / "tok" / "tokenized.parquet").metadata.num_rows
    assert pq.ParquetFile(d / "out" / "tokenized.parquet").metadata.num_rows == n_in - len(want) == man["counts"]["rows_kept"]
    assert (d / "out" / "tokenizer_meta.json").exists()
    # rerun: skipped (same fingerprint); the decontaminated data have no dirty item
    assert C.run(d / "tok", bench, d / "out", cfg, progress=False) == man
    m2 = C.run(d / "out", bench, d / "out2", ContaminationConfig(), progress=False)
    assert m2["counts"]["dirty"] == {b: 0 for b in BENCH}


def test_decontaminate_at_a_lower_bucket(planted):
    d, bench, plants, _ = planted
    cfg = ContaminationConfig(benchmarks=("gsm8k", "arc_challenge"), decontaminate=True, decontaminate_at="not_clean")
    C.run(d / "tok", bench, d / "lower", cfg, progress=False)
    rep, flagged = _flagged(d / "lower")
    removed = {r["id"]: r["detail"] for r in pq.read_table(d / "lower" / C.REMOVALS_FILE).to_pylist()}
    want = {r["id"] for x in flagged.values() for r in x["responsible"]}
    assert set(removed) == want >= {"leak/partial-35", "leak/partial-65", "leak/verbatim"}
    assert removed["leak/partial-35"].endswith("not_clean") and removed["leak/partial-65"].endswith("not_dirty")
    assert rep["decontaminate_at"] == "not_clean"
    with pytest.raises(ValueError, match="decontaminate_at"):
        ContaminationConfig(decontaminate_at="clean")
    # the spec setting (hrm run --set contamination.decontaminate_at=...) reaches the stage's config
    from flows.data_flow import contamination_settings
    from pipeline.spec import load_spec

    sp = load_spec("demo", [f"contamination.benchmarks_dir={bench}", "contamination.decontaminate_at=not_dirty",
                            "contamination.decontaminate=true", "contamination.method=tokens"])
    c = contamination_settings(sp, None, None)
    cfg = ContaminationConfig(**c.model_dump(exclude={"benchmarks_dir", "hub"}))
    assert (cfg.decontaminate_at, cfg.method, cfg.decontaminate) == ("not_dirty", "tokens", True)


def test_token_method_is_the_llama2_check(planted):
    """method tokens: the paper's check over the pipeline's BPE ids, kept for comparison; it finds the
    verbatim long copies but depends on the tokenizer's boundaries and has no short-item rule."""
    d, bench, plants, _ = planted
    cfg = ContaminationConfig(method="tokens", benchmarks=("gsm8k", "math", "mmlu"))
    C.run(d / "tok", bench, d / "tok13", cfg, progress=False)
    items = _items(d / "tok13")
    rep, flagged = _flagged(d / "tok13")
    assert rep["method"] == "tokens" and rep["unit"] == "tokens"
    assert items["math/test/7"]["bucket"] == "dirty" and items["gsm8k/test/3"]["coverage"] > 0.5
    assert flagged["math/test/7"]["responsible"][0]["id"] == "leak/math-in-response"
    # what the word check finds and this one cannot: a copy with its case and punctuation changed, and a
    # short question whose options are appended with labels between them
    assert items["gsm8k/test/10"]["bucket"] == "clean" and items[plants["leak/mmlu-tiny"][0]]["bucket"] == "clean"


def test_cli_on_rows_file(planted, tmp_path, capsys):
    d, bench, *_ = planted
    rows = tmp_path / "rows.jsonl"
    q = C.item_text("math", _lines(bench / "math" / "test.jsonl")[7])
    rows.write_text(json.dumps({"id": "x/0", "instruction": q, "response": "ok then", "condition": "direct",
                                "source": "x", "domain": "math"}) + "\n")
    code = C.main(["--input", str(rows), "--tokenizer", str(d / "tok"), "--benchmarks", str(bench),
                   "--output", str(tmp_path / "o"), "--set", "benchmarks=[math, drop]", "--no-progress"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"]["dirty"] == {"math": 1, "drop": 0}
    assert _items(tmp_path / "o")["math/test/7"]["bucket"] == "dirty"
    assert C.main(["--input", str(rows), "--benchmarks", str(bench), "--output", str(tmp_path / "p"),
                   "--set", "primary_n=5"]) == 2
    assert C.main(["--input", str(rows), "--benchmarks", str(bench), "--output", str(tmp_path / "p"),
                   "--set", "method=chars"]) == 2
    # without a tokenizer: the pipeline's tokenizer is trained on the rows themselves
    capsys.readouterr()
    code = C.main(["--input", str(d / "gsm8k.jsonl"), "--benchmarks", str(bench), "--output", str(tmp_path / "q"),
                   "--set", "benchmarks=[gsm8k]", "--no-progress"])
    assert code == 0
    assert "training the pipeline's tokenizer" in capsys.readouterr().err
    assert (tmp_path / "q" / "input_tokenized" / "tokenizer.json").exists()


def test_words_hashes_and_buckets():
    # normalisation: case, punctuation, Unicode quotes/dashes/minus folded; option labels dropped
    assert C.normalized_words("What is 12+30? (A) “Paris” — B. Lon-don; CAFÉ −4, -4 3/7") == [
        "what", "is", "12", "+", "30", "paris", "lon", "-", "don", "caf", "4", "-", "4", "3", "/", "7"]
    toks = np.array([5, 6, 7, 8, 5, 6, 7, 1, 5, 6, 7], dtype=np.int64)
    h, starts, seg = C.window_hashes(toks, np.array([4, 7]), 3, bad=toks == 1)
    # windows (5,6,7) at 0, 4 and 8 hash the same; none crosses the segment end (3..5) or holds the 1
    assert starts.tolist() == [0, 1, 4, 8]
    assert h[0] == h[2] == h[3] and h[1] != h[0] and seg.tolist() == [0, 0, 1, 1]
    w = C.Windows(toks, np.array([11]))
    assert w.hashes(3)[0][0] != w.hashes(4)[0][0] and w.hashes(3)[0][0] == w.hashes(3)[0][4]
    # the short-item rule
    cfg = ContaminationConfig()
    assert C.window_sizes(np.array([0, 3, 7, 8, 15, 16, 20, 25, 26, 100]), 13, cfg).tolist() == [
        0, 3, 7, 8, 8, 8, 10, 13, 13, 13]
    assert C.window_sizes(np.array([3, 20]), 13, ContaminationConfig(method="tokens")).tolist() == [0, 13]
    got = C.bucket_of(np.array([0.0, 0.1999, 0.2, 0.4999, 0.5, 0.7999, 0.8, 1.0]), cfg).tolist()
    assert got == ["clean", "clean", "not_clean", "not_clean", "not_dirty", "not_dirty", "dirty", "dirty"]


def test_token_words_equal_the_words_of_the_text(planted):
    """Word hashes assembled from token ids are those of the rows' text, wherever the tokens cut it."""
    d, *_ = planted
    tok, meta = tokenize.load_tokenizer(d / "tok")
    special = tokenize.special_ids(meta).all_ids()
    tw = C.TokenWords(tok, special)
    texts = ["Hello, world! 12 apples cost $3.50 each.", "Ünïcödé — “quotes” and ½ of 3/7, Lon-don", "x", "",
             "A) Paris\nB) London?\n"]
    t = pq.read_table(d / "tok" / "tokenized.parquet").slice(0, 300)
    segs = [tok.encode(x, add_special_tokens=False).ids for x in texts]
    segs += t["prompt_ids"].to_pylist() + t["response_ids"].to_pylist()  # with their special tokens
    flat = np.array([x for e in segs for x in e], dtype=np.int64)
    h, counts = tw(flat, np.array([len(e) for e in segs]))
    text = [tok.decode([x for x in e if x not in special]) for e in segs]
    for k in (0, 1, 4):
        assert tok.decode(segs[k]) == texts[k]
    raw = [" ".join(["", x, ""]).encode("utf-8") for x in text]  # a special token is a separator
    h2, counts2 = C.words_of(C.fold_bytes(np.frombuffer(b"".join(raw), dtype=np.uint8)), np.array([len(x) for x in raw]))
    assert counts.tolist() == counts2.tolist() and h.tolist() == h2.tolist() and h.size > 10_000
    assert counts[:5].tolist() == [8, 9, 0, 0, 2]  # one-letter words dropped ("x", "A", "B", "n", "c", "d")


def test_hub_benchmarks_code_path_on_local_dataset_folders(planted, tmp_path, monkeypatch):
    """Benchmarks by name go through datasets.load_dataset (the Hub path); local dataset folders in
    place of the Hub names exercise the same code offline, through the flow-facing `run`."""
    d, bench, *_ = planted
    hub = {}
    for name, split in (("gsm8k", "test"), ("arc_challenge", "test")):
        folder = tmp_path / "hub" / name
        folder.mkdir(parents=True)
        (folder / f"{split}.jsonl").write_text((bench / name / f"{split}.jsonl").read_text())
        hub[name] = (str(folder), None, split)
    monkeypatch.setattr(C, "HUB", hub)
    man = C.run(d / "tok", ["gsm8k", "arc_challenge"], tmp_path / "o", ContaminationConfig(), progress=False)
    assert man["counts"]["dirty"] == {"gsm8k": 4, "arc_challenge": 1}
    C.run(d / "tok", bench, tmp_path / "l", ContaminationConfig(benchmarks=("gsm8k", "arc_challenge")), progress=False)
    a, b = _items(tmp_path / "o"), _items(tmp_path / "l")
    assert a.keys() == b.keys() and all(a[k]["coverage"] == b[k]["coverage"] for k in a)
    with pytest.raises(ValueError, match="not a known benchmark"):
        C.run(d / "tok", ["squad"], tmp_path / "x", ContaminationConfig(), progress=False)


def test_training_scan_as_parts_equals_the_single_process_check(planted, tmp_path):
    """The training side scanned in row ranges, each a part (the Dask runner's path; here pickled and
    computed last first): items, report, decontaminated rows and removals byte-identical to the
    single-process check, also with few rows remembered per n-gram (the cap applied across parts)."""
    import pickle

    d, bench, *_ = planted
    calls = []

    def reversed_parts(fn, args):
        calls.append((fn.__name__, len(args)))
        jobs = [pickle.loads(pickle.dumps((fn, tuple(a)))) for a in args]
        got = {i: f(*a) for i, (f, a) in reversed(list(enumerate(jobs)))}
        return [got[i] for i in range(len(args))]

    n = pq.ParquetFile(d / "tok" / "tokenized.parquet").metadata.num_rows
    for method in ("words", "tokens"):
        cfg = ContaminationConfig(method=method, decontaminate=True, decontaminate_at="not_clean", batch_rows=600,
                                  max_rows_per_ngram=2, benchmarks=("gsm8k", "mmlu", "math"))
        one = C.run(d / "tok", bench, tmp_path / f"one-{method}", cfg, progress=False)
        calls.clear()
        parts = C.run(d / "tok", bench, tmp_path / f"parts-{method}", cfg, progress=False, map_parts=reversed_parts)
        assert calls == [("scan_part", -(-n // (C.PART_BATCHES * 600)))] and calls[0][1] >= 3
        assert parts["outputs"] == one["outputs"] and parts["counts"] == one["counts"], method
        assert one["counts"]["rows_removed"] >= 5
        for name in one["outputs"]:
            assert (tmp_path / f"parts-{method}" / name).read_bytes() == (tmp_path / f"one-{method}" / name).read_bytes()
        assert not list((tmp_path / f"parts-{method}").glob(".contamination-*"))


def test_training_scan_memory_is_flat_in_the_row_count(tmp_path):
    """The training scan holds one batch of Arrow memory whatever the file's length (issue 13: a
    pre-buffering Parquet reader kept every row group's column chunks it had read, ~220 bytes a row),
    and the rows an attribution names get their id and source from their own row groups only."""
    import pyarrow as pa

    rng = np.random.default_rng(0)
    groups, group_rows, seg = 96, 1024, 48
    n = groups * group_rows
    toks = rng.integers(0, 2000, size=(2, n * seg), dtype=np.int32)
    lists = [pa.ListArray.from_arrays(pa.array(np.arange(0, n * seg + 1, seg, dtype=np.int32)), pa.array(t))
             for t in toks]
    table = pa.table({"id": [f"r{i}" for i in range(n)], "source": [f"s{i % 7}" for i in range(n)],
                      "prompt_ids": lists[0], "response_ids": lists[1]})
    f = tmp_path / "tokenized.parquet"
    pq.write_table(table, f, row_group_size=group_rows, compression="zstd")
    peak, rows = 0, 0  # Arrow's allocated bytes, the most at any batch
    for row0, tokens, lengths in C.iter_training(f, group_rows):
        assert row0 == rows and tokens.size == 2 * seg * group_rows
        rows += lengths.size // 2
        peak = max(peak, pa.total_allocated_bytes())
    assert rows == n
    # about one batch (2.8 MB here), not the file's column chunks (pre-buffered: 16.7 MB, a 14 MB file)
    assert peak < f.stat().st_size / 4, (peak, f.stat().st_size)
    want = {0, 1023, 1024, 5000, n - 1}
    assert C._id_source(f, want) == {r: (f"r{r}", f"s{r % 7}") for r in want}
    # the batches under a memory budget: 96 tokens a row (from the metadata) at TOKEN_BYTES each
    from pipeline import budget

    big = ContaminationConfig(batch_rows=10**6)
    assert C.scan_batch_rows(f, big, 2.0) == int(budget.usable_bytes(2.0) * C.BUDGET_SHARE / (C.TOKEN_BYTES * 96))
    assert C.scan_batch_rows(f, ContaminationConfig(), None) == ContaminationConfig().batch_rows  # 4 GB: 53,876 rows
    assert C.scan_batch_rows(f, big, 0.01) == budget.MIN_ROWS
