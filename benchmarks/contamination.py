"""Figure: the contamination check at scale, against a plain Python set-of-tuples baseline.

Synthetic training data: ROWS tokenized rows (prompt ~60 + response ~140 random tokens, in the
tokenizer stage's tokenized.parquet layout), with PLANT benchmark items (tokenized with the real
tokenizer) copied verbatim into random rows. The check runs over all six local benchmarks
(n = 13 and 8). Prints wall time, peak RSS (getrusage maxrss of this process, which also holds the
generation, done in row groups), the planted items found dirty, and the baseline: a Python set of
n-gram tuples built from a subsample of the rows, then the benchmark n-grams looked up in it, timed
per training row in the same run.

    .venv/bin/python benchmarks/contamination.py --rows 1000000 --benchmarks /path/to/benchmarks
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import TokenizerConfig  # noqa: E402
from pipeline.stages import contamination as C  # noqa: E402
from pipeline.stages import tokenize  # noqa: E402


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def make_tokenizer(d: Path, gsm8k_train: Path) -> Path:
    rows = d / "rows.jsonl"
    with open(gsm8k_train) as f, open(rows, "w") as out:
        for i, line in enumerate(f):
            r = json.loads(line)
            out.write(json.dumps({"id": f"g/{i}", "instruction": r["question"], "response": r["answer"],
                                  "condition": "cot", "source": "g", "domain": "math"}) + "\n")
    tokenize.run(rows, d / "tok", TokenizerConfig(vocab_size=8192, sample_rows=8000), conditions=["direct", "cot"],
                 seed=0, progress=False)
    return d / "tok"


def lists(seqs_flat: np.ndarray, lengths: np.ndarray) -> pa.Array:
    off = np.zeros(lengths.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=off[1:])
    return pa.ListArray.from_arrays(pa.array(off), pa.array(seqs_flat.astype(np.int32)))


def make_training(path: Path, rows: int, vocab: int, plants: list[list[int]], seed: int = 0) -> dict[int, int]:
    """Write tokenized.parquet; returns {row: plant index}."""
    rng = np.random.default_rng(seed)
    where = dict(zip(rng.choice(rows, size=len(plants), replace=False).tolist(), range(len(plants))))
    group = 65536
    w = pq.ParquetWriter(path, tokenize.TOKENIZED_SCHEMA, compression="zstd")
    for r0 in range(0, rows, group):
        m = min(group, rows - r0)
        pl = rng.integers(40, 80, size=m)
        rl = rng.integers(100, 180, size=m)
        pv = rng.integers(10, vocab, size=int(pl.sum()))
        rv = rng.integers(10, vocab, size=int(rl.sum()))
        pv_list = None
        hits = [r for r in range(r0, r0 + m) if r in where]
        if hits:  # planted: the item becomes the prompt text of that row
            po = np.r_[0, np.cumsum(pl)]
            parts, lens = [], pl.copy()
            last = 0
            for r in hits:
                k = r - r0
                parts.append(pv[last : po[k]])
                parts.append(np.array([1, 5, *plants[where[r]], 2]))  # [BOQ][cond] item [EOQ]
                lens[k] = len(plants[where[r]]) + 3
                last = po[k + 1]
            parts.append(pv[last:])
            pv, pl = np.concatenate(parts), lens
        t = pa.table({
            "id": pa.array([f"synth/{i}" for i in range(r0, r0 + m)]),
            "source": pa.array(["synth"] * m), "stratum": pa.array(["synth"] * m),
            "rule": pa.array(["default"] * m), "domain": pa.array(["general"] * m),
            "condition": pa.array(["direct"] * m),
            "prompt_ids": lists(pv, pl), "response_ids": lists(rv, rl),
            "prompt_tokens": pa.array(pl.astype(np.int32)), "response_tokens": pa.array(rl.astype(np.int32)),
        }, schema=tokenize.TOKENIZED_SCHEMA)
        w.write_table(t, row_group_size=8192)
        del pv_list
    w.close()
    return where


def baseline(train: Path, items: list[list[int]], ns: tuple[int, ...], rows: int) -> float:
    """Seconds per training row of a Python set-of-tuples index (build + lookup of every item n-gram)."""
    t = pq.read_table(train, columns=["prompt_ids", "response_ids"]).slice(0, rows)
    t0 = time.perf_counter()
    index: dict[int, set] = {n: set() for n in ns}
    for p, r in zip(t["prompt_ids"].to_pylist(), t["response_ids"].to_pylist()):
        for seq in (p, r):
            for n in ns:
                s = index[n]
                for i in range(len(seq) - n + 1):
                    s.add(tuple(seq[i : i + n]))
    hits = 0
    for n in ns:
        s = index[n]
        for it in items:
            hits += sum(tuple(it[i : i + n]) in s for i in range(len(it) - n + 1))
    return (time.perf_counter() - t0) / rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--plant", type=int, default=200)
    ap.add_argument("--baseline-rows", type=int, default=20_000)
    ap.add_argument("--benchmarks", default=str(Path(__file__).resolve().parents[2] / "shared/data/benchmarks"))
    ap.add_argument("--gsm8k-train", default=str(Path(__file__).resolve().parents[2] / "shared/data/gsm8k/train.jsonl"))
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    d = Path(a.workdir or tempfile.mkdtemp(prefix="contam-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    tok_dir = make_tokenizer(d, Path(a.gsm8k_train))
    tok, meta = tokenize.load_tokenizer(tok_dir)
    benches = C.load_benchmarks(a.benchmarks)
    pool = [(b.name, iid, t) for b in benches.values() for iid, t in zip(b.item_ids, b.texts)]
    rng = np.random.default_rng(1)
    chosen = [pool[i] for i in rng.choice(len(pool), size=a.plant, replace=False)]
    plants = [e.ids for e in tok.encode_batch([t for _, _, t in chosen], add_special_tokens=False)]
    train_dir = d / "train"
    train_dir.mkdir(exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_meta.json"):
        (train_dir / f).write_bytes((tok_dir / f).read_bytes())
    t0 = time.perf_counter()
    where = make_training(train_dir / "tokenized.parquet", a.rows, meta["vocab_size"], plants)
    gen_s = time.perf_counter() - t0
    tokens = sum(pq.ParquetFile(train_dir / "tokenized.parquet").metadata.row_group(i).num_rows
                 for i in range(pq.ParquetFile(train_dir / "tokenized.parquet").num_row_groups))
    rss_before = rss_gb()
    cfg = C.ContaminationConfig()
    t0 = time.perf_counter()
    man = C.run(train_dir, a.benchmarks, d / "out", cfg, progress=False)
    check_s = time.perf_counter() - t0
    items = {r["item_id"]: r for r in pq.read_table(d / "out" / C.ITEMS_FILE, columns=["item_id", "bucket", "tokens"]).to_pylist()}
    long_enough = [c for c, p in zip(chosen, plants) if len(p) >= cfg.primary_n]
    found = sum(items[iid]["bucket"] == "dirty" for _, iid, _ in long_enough)
    rep = json.loads((d / "out" / C.REPORT_FILE).read_text())
    attributed = sum(
        1 for e in rep["benchmarks"].values() for x in e["dirty_items"]
        if any(r["id"].startswith("synth/") and int(r["id"].split("/")[1]) in where for r in x["responsible"]))
    timing = json.loads((d / "out" / "timing.json").read_text())
    per_row = check_s / a.rows
    base = baseline(train_dir / "tokenized.parquet", plants + [e for e in plants], cfg.ngram_sizes, a.baseline_rows)
    print(f"rows {a.rows:,} (~{tokens and 200} tokens each), benchmark items {len(pool):,}, planted {a.plant} "
          f"({len(long_enough)} with >= {cfg.primary_n} tokens)")
    print(f"generation {gen_s:.1f}s; check {check_s:.1f}s (benchmarks {timing['benchmarks_s']}s, "
          f"hashing+lookup {timing['check_s']}s); peak RSS {rss_gb():.2f} GiB (before check {rss_before:.2f} GiB)")
    print(f"planted found dirty {found}/{len(long_enough)}; dirty items attributed to the planting row {attributed}; "
          f"dirty per benchmark {man['counts']['dirty']}")
    print(f"vectorised {per_row * 1e6:.2f} us/row; set-of-tuples baseline ({a.baseline_rows:,} rows, build + lookup) "
          f"{base * 1e6:.2f} us/row; speed-up x{base / per_row:.1f}")


if __name__ == "__main__":
    main()
