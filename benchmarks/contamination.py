"""Figure: the contamination check, its recall on planted leaks against a peer used in practice (GPT-3's
13-gram rule), and its time and memory at scale.

Part 1, recall (the same planted data for both): real GSM8K train rows (7,473) plus PLANT rows, each
holding one benchmark item drawn at random from the six local benchmarks, in one of five forms:
    verbatim     the item as the row's instruction
    wrapped      inside the response, with a sentence before and after
    case_punct   upper-cased, commas and full stops replaced
    edited       one word in the middle replaced
    options      (ARC, MMLU) the question with its choices appended as "A. ...", one per line
  ours   `pipeline.stages.contamination` with its defaults (method words, 13 and 8, short-item rule); an
         item is found when it is not clean and the planted row is among its responsible rows.
  peer   a re-implementation of GPT-3's rule (Brown et al. 2020, appendix C), written here: text
         lowercased, punctuation removed, split on whitespace; per benchmark N = the 5th percentile of
         its items' lengths in words, clamped to [8, 13]; an item is dirty when any of its N-grams
         occurs in a training document; N-grams found in more than 10 training documents are ignored;
         an item shorter than N words has no N-gram (clean). Found: dirty with the planted row among
         the documents that hold its N-grams.
  Printed: recall per form, other items flagged (not planted: real overlap between GSM8K train and
  test, or benchmark items that share text with a planted one) and time, for both.
Part 2, scale: ROWS synthetic tokenized rows (prompt ~60 + response ~140 random tokens of the same
  tokenizer) with PLANT_SCALE items' token ids copied verbatim into random rows; the check over all six
  benchmarks with the default settings. Prints wall time, peak RSS (getrusage maxrss of this process,
  which also holds the generation), the planted items found dirty, and the peer's time per row on a
  subsample of the same rows (decoding + its rule), extrapolated.

    .venv/bin/python benchmarks/contamination.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import string
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ContaminationConfig, TokenizerConfig  # noqa: E402
from pipeline.stages import contamination as C  # noqa: E402
from pipeline.stages import tokenize  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FORMS = ("verbatim", "wrapped", "case_punct", "edited", "options")


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


# ----------------------------------------------------------------------------------------------
# the peer: GPT-3's 13-gram rule
# ----------------------------------------------------------------------------------------------
_PUNCT = str.maketrans("", "", string.punctuation)


def gpt3_words(text: str) -> list[str]:
    return text.lower().translate(_PUNCT).split()


class GPT3Rule:
    """GPT-3's contamination rule (see the module docstring)."""

    def __init__(self, benches: dict[str, C.Benchmark], max_docs: int = 10) -> None:
        self.max_docs = max_docs
        self.N: dict[str, int] = {}
        self.grams: dict[tuple, list[str]] = defaultdict(list)  # N-gram -> item ids
        self.item_grams: dict[str, set] = {}
        for name, b in benches.items():
            words = [gpt3_words(t) for t in b.texts]
            n = int(min(13, max(8, np.percentile([len(w) for w in words], 5))))
            self.N[name] = n
            for iid, w in zip(b.item_ids, words):
                gs = {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
                self.item_grams[iid] = gs
                for g in gs:
                    self.grams[g].append(iid)
        self.sizes = sorted(set(self.N.values()))
        self.docs: dict[tuple, set] = defaultdict(set)  # N-gram -> training docs holding it

    def add(self, doc: int, text: str) -> None:
        w = gpt3_words(text)
        grams, docs = self.grams, self.docs
        for n in self.sizes:
            for i in range(len(w) - n + 1):
                g = tuple(w[i:i + n])
                if g in grams:
                    docs[g].add(doc)

    def dirty(self) -> dict[str, set]:
        """item id -> training docs holding one of its N-grams (N-grams in > max_docs docs ignored)."""
        out: dict[str, set] = defaultdict(set)
        for g, ds in self.docs.items():
            if len(ds) <= self.max_docs:
                for iid in self.grams[g]:
                    out[iid] |= ds
        return out


# ----------------------------------------------------------------------------------------------
# part 1: recall on planted leaks
# ----------------------------------------------------------------------------------------------
def _options_text(doc: dict) -> str | None:
    ch = doc.get("choices")
    if ch is None:
        return None
    texts = ch["text"] if isinstance(ch, dict) else ch
    return doc["question"] + "\n" + "\n".join(f"{'ABCDE'[k]}. {c}" for k, c in enumerate(texts))


def plant(text: str, form: str, doc: dict, rng) -> tuple[str, str]:
    """(instruction, response) of a row leaking `text` in `form`."""
    if form == "verbatim":
        return text, "I am not sure."
    if form == "wrapped":
        return "Answer the question below.", f"Someone once asked me this: {text} It took a while to answer."
    if form == "case_punct":
        return text.upper().replace(",", " ;").replace(".", " !"), "OK."
    if form == "edited":
        w = text.split(" ")
        k = len(w) // 2
        w[k] = "marmalade" if w[k] != "marmalade" else "walrus"
        return " ".join(w), "Done."
    return _options_text(doc), "Answer: B"


def planted_rows(bench_dir: Path, gsm8k_train: Path, n_plant: int, seed: int = 1):
    benches = C.load_benchmarks(bench_dir)
    docs = {name: [json.loads(x) for x in (bench_dir / name / f"{b.split}.jsonl").read_text().split("\n") if x.strip()]
            for name, b in benches.items()}
    pool = [(name, k) for name, b in benches.items() for k in range(len(b.texts))]
    rng = np.random.default_rng(seed)
    rows = []
    with open(gsm8k_train) as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            rows.append({"id": f"gsm8k/{i}", "instruction": r["question"], "response": r["answer"],
                         "condition": "cot", "source": "gsm8k", "domain": "math"})
    plants = {}  # row id -> (item id, form)
    used = set()
    for j in range(n_plant):
        form = FORMS[j % len(FORMS)]
        while True:
            name, k = pool[int(rng.integers(len(pool)))]
            if (name, k) not in used and (form != "options" or name in ("arc_challenge", "mmlu")):
                break
        used.add((name, k))
        ins, resp = plant(benches[name].texts[k], form, docs[name][k], rng)
        rid = f"leak/{j}"
        plants[rid] = (benches[name].item_ids[k], form)
        rows.insert(int(rng.integers(len(rows) + 1)), {"id": rid, "instruction": ins, "response": resp,
                                                        "condition": "direct", "source": "leak", "domain": "x"})
    return benches, rows, plants


def recall(d: Path, bench_dir: Path, gsm8k_train: Path, n_plant: int) -> Path:
    benches, rows, plants = planted_rows(bench_dir, gsm8k_train, n_plant)
    d.mkdir(parents=True, exist_ok=True)
    f = d / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenize.run(f, d / "tok", TokenizerConfig(vocab_size=8192, sample_rows=20_000), conditions=["direct", "cot"],
                 seed=0, progress=False)
    # ours
    t0 = time.perf_counter()
    C.run(d / "tok", bench_dir, d / "ours", ContaminationConfig(), progress=False, force=True)
    ours_s = time.perf_counter() - t0
    rep = json.loads((d / "ours" / C.REPORT_FILE).read_text())
    flagged = {x["item_id"]: x for e in rep["benchmarks"].values() for x in e["flagged_items"]}
    # peer, on the same rows (their text, as the tokenizer stage received it)
    t0 = time.perf_counter()
    peer = GPT3Rule(benches)
    for i, r in enumerate(rows):
        peer.add(i, f"{r['instruction']}\n{r['response']}")
    pdirty = peer.dirty()
    peer_s = time.perf_counter() - t0
    row_of = {r["id"]: i for i, r in enumerate(rows)}

    print(f"Part 1: recall on planted leaks: {len(rows) - len(plants):,} GSM8K train rows + {len(plants)} planted rows "
          f"(items from {', '.join(benches)}); peer N per benchmark {peer.N}")
    print(f"{'form':<11} {'planted':>7} | {'ours found':>10} {'ours dirty':>10} | {'peer found':>10}")
    tot = np.zeros(4, int)
    for form in FORMS:
        ps = [(rid, iid) for rid, (iid, fm) in plants.items() if fm == form]
        of = sum(iid in flagged and any(r["id"] == rid for r in flagged[iid]["responsible"]) for rid, iid in ps)
        od = sum(iid in flagged and flagged[iid]["bucket"] == "dirty" for rid, iid in ps)
        pf = sum(row_of[rid] in pdirty.get(iid, ()) for rid, iid in ps)
        tot += [len(ps), of, od, pf]
        print(f"{form:<11} {len(ps):>7} | {of:>10} {od:>10} | {pf:>10}")
    print(f"{'all':<11} {tot[0]:>7} | {tot[1]:>10} {tot[2]:>10} | {tot[3]:>10}    "
          f"recall ours {100 * tot[1] / tot[0]:.1f}% (dirty {100 * tot[2] / tot[0]:.1f}%), peer {100 * tot[3] / tot[0]:.1f}%")
    planted_items = {iid for iid, _ in plants.values()}
    leak_rows = {row_of[r] for r in plants}
    o_other = [i for i in flagged if i not in planted_items]
    p_other = [i for i, ds in pdirty.items() if i not in planted_items]
    o_unrel = [i for i in o_other if not any(r["id"].startswith("leak/") for r in flagged[i]["responsible"])]
    p_unrel = [i for i in p_other if not pdirty[i] & leak_rows]
    print(f"other items flagged (not planted): ours {len(o_other)} not clean ({sum(flagged[i]['bucket'] == 'dirty' for i in o_other)} "
          f"dirty), {len(o_unrel)} of them by GSM8K train rows alone "
          f"({sum(flagged[i]['bucket'] == 'dirty' for i in o_unrel)} dirty); peer {len(p_other)} dirty, {len(p_unrel)} by "
          f"GSM8K train rows alone. The rest share text with a planted item; per benchmark, ours / peer: "
          + ", ".join(f"{b} {sum(i.startswith(b + '/') for i in o_other)} / {sum(i.startswith(b + '/') for i in p_other)}"
                      for b in benches))
    print(f"time on these {len(rows):,} rows x six benchmarks: ours {ours_s:.1f}s (tokenized rows, incl. loading "
          f"benchmarks), peer {peer_s:.1f}s (text rows)")
    return d / "tok"


# ----------------------------------------------------------------------------------------------
# part 2: scale
# ----------------------------------------------------------------------------------------------
def lists(seqs_flat: np.ndarray, lengths: np.ndarray) -> pa.Array:
    off = np.zeros(lengths.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=off[1:])
    return pa.ListArray.from_arrays(pa.array(off), pa.array(seqs_flat.astype(np.int32)))


def make_training(path: Path, rows: int, vocab: int, plants: list[list[int]], low: int, seed: int = 0) -> dict[int, int]:
    """Write tokenized.parquet of random tokens in [low, vocab); returns {row: plant index}."""
    rng = np.random.default_rng(seed)
    where = dict(zip(rng.choice(rows, size=len(plants), replace=False).tolist(), range(len(plants))))
    group = 65536
    w = pq.ParquetWriter(path, tokenize.TOKENIZED_SCHEMA, compression="zstd")
    for r0 in range(0, rows, group):
        m = min(group, rows - r0)
        pl = rng.integers(40, 80, size=m)
        rl = rng.integers(100, 180, size=m)
        pv = rng.integers(low, vocab, size=int(pl.sum()))
        rv = rng.integers(low, vocab, size=int(rl.sum()))
        hits = [r for r in range(r0, r0 + m) if r in where]
        if hits:  # planted: the item becomes the prompt text of that row
            po = np.r_[0, np.cumsum(pl)]
            parts, lens = [], pl.copy()
            last = 0
            for r in hits:
                k = r - r0
                parts.append(pv[last:po[k]])
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
    w.close()
    return where


def scale(d: Path, tok_dir: Path, bench_dir: Path, rows: int, n_plant: int, peer_rows: int) -> None:
    tok, meta = tokenize.load_tokenizer(tok_dir)
    benches = C.load_benchmarks(bench_dir)
    pool = [(b.name, iid, t) for b in benches.values() for iid, t in zip(b.item_ids, b.texts)]
    rng = np.random.default_rng(1)
    chosen = [pool[i] for i in rng.choice(len(pool), size=n_plant, replace=False)]
    plants = [e.ids for e in tok.encode_batch([t for _, _, t in chosen], add_special_tokens=False)]
    train_dir = d / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_meta.json"):
        (train_dir / f).write_bytes((tok_dir / f).read_bytes())
    low = max(tokenize.special_ids(meta).all_ids()) + 1
    t0 = time.perf_counter()
    make_training(train_dir / "tokenized.parquet", rows, meta["vocab_size"], plants, low)
    gen_s = time.perf_counter() - t0
    rss_before = rss_gb()
    cfg = ContaminationConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    man = C.run(train_dir, bench_dir, d / "out", cfg, progress=False, force=True)
    check_s, check_cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = rss_gb()
    items = {r["item_id"]: r for r in pq.read_table(d / "out" / C.ITEMS_FILE, columns=["item_id", "bucket"]).to_pylist()}
    found = sum(items[iid]["bucket"] == "dirty" for _, iid, _ in chosen)
    timing = json.loads((d / "out" / "timing.json").read_text())
    # the peer on the first peer_rows rows of the same data: decode each row, then its rule
    t = pq.read_table(train_dir / "tokenized.parquet", columns=["prompt_ids", "response_ids"]).slice(0, peer_rows)
    special = tokenize.special_ids(meta).all_ids()
    t0 = time.process_time()
    peer = GPT3Rule(benches)
    for i, (p, r) in enumerate(zip(t["prompt_ids"].to_pylist(), t["response_ids"].to_pylist())):
        text = tok.decode([x for x in p if x not in special]) + "\n" + tok.decode([x for x in r if x not in special])
        peer.add(i, text)
    peer.dirty()
    peer_per_row = (time.process_time() - t0) / peer_rows  # CPU time, as ours below
    print(f"Part 2: scale: {rows:,} rows (~200 tokens each) x six benchmarks ({len(pool):,} items), {n_plant} planted verbatim")
    print(f"generation {gen_s:.1f}s; check {check_s:.1f}s wall, {check_cpu:.1f}s CPU (user+system of this process; "
          f"the wall time counts other processes' load too; benchmarks {timing['benchmarks_s']}s, hashing+lookup "
          f"{timing['check_s']}s); peak RSS {peak:.2f} GiB (before check {rss_before:.2f} GiB); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"planted found dirty {found}/{n_plant}; dirty per benchmark {man['counts']['dirty']}")
    print(f"CPU per row: ours {check_cpu / rows * 1e6:.1f} us/row; peer (GPT-3 rule in Python, decode + n-gram lookups, "
          f"{peer_rows:,} rows) {peer_per_row * 1e6:.1f} us/row, {peer_per_row * rows:.0f}s extrapolated to {rows:,} rows; "
          f"speed-up x{peer_per_row * rows / check_cpu:.1f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--plant", type=int, default=500, help="planted rows in part 1")
    ap.add_argument("--plant-scale", type=int, default=200, help="planted items in part 2")
    ap.add_argument("--peer-rows", type=int, default=20_000)
    ap.add_argument("--benchmarks", default=str(ROOT / "shared/data/benchmarks"))
    ap.add_argument("--gsm8k-train", default=str(ROOT / "shared/data/gsm8k/train.jsonl"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-recall", action="store_true", help="part 2 only, with the tokenizer of an earlier --workdir")
    a = ap.parse_args(argv)
    d = Path(a.workdir or tempfile.mkdtemp(prefix="contam-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    tok_dir = d / "recall" / "tok"
    if not (a.skip_recall and (tok_dir / "tokenizer.json").exists()):
        tok_dir = recall(d / "recall", Path(a.benchmarks), Path(a.gsm8k_train), a.plant)
    if not a.skip_scale:
        scale(d / "scale", tok_dir, Path(a.benchmarks), a.rows, a.plant_scale, a.peer_rows)


if __name__ == "__main__":
    main()
