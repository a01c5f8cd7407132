"""Near-dedup benchmark: the project's MinHash-LSH (pipeline.stages.dedup.near_duplicates) against
datasketch 2.0 (MinHash.bulk + MinHashLSH) on synthetic documents with planted near-duplicates.

    python benchmarks/dedup.py --docs 100000 --workers 2
    python benchmarks/dedup.py --million          # 1,000,000 docs; datasketch on a 50,000-doc prefix
    python benchmarks/dedup.py --docs 100000 --verify estimate   # the looser estimate verification

Documents: ~200 words (180-220) drawn from a 20,000-word vocabulary with Zipf (s=1) frequencies, with
sentence punctuation and capitals. A fraction (--dup-frac, default 5%) of the documents are copies of
an earlier document with 1-8 word edits (substitute / insert / delete), so their true word 5-gram
Jaccard with the original spreads from ~0.65 to ~0.97 around the threshold. Text generation is not
timed; each method is timed from texts in memory to clusters, in a fresh process whose memory (with its
worker processes) is sampled while it runs. The definitions of every figure are printed with the table.

Precision is measured at the threshold itself, against the true Jaccard of plain-Python shingle sets:
for every removed document, of the pair (removed, kept document of its cluster), and of the pair
(removed, the document it was matched with: `minhash.match_tree` over each method's accepted pairs).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import minhash  # noqa: E402
from pipeline.config import DedupConfig  # noqa: E402
from pipeline.stages.dedup import PART_ROWS, lsh_params, near_duplicates, write_docs  # noqa: E402

WORD = re.compile(r"\w+")


# ------------------------------------------------------------------------------------------------
# synthetic documents
# ------------------------------------------------------------------------------------------------
def make_vocab(rng: np.random.Generator, size: int) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words: set[str] = set()
    while len(words) < size:
        for n in rng.integers(2, 11, size):
            words.add("".join(rng.choice(letters, n)))
    return sorted(words)[:size]


def generate(path: Path, n_docs: int, seed: int, dup_frac: float, vocab_size: int, chunk: int = 100_000) -> np.ndarray:
    """Write n_docs texts to an Arrow IPC file (column text); return the planted (original, copy) pairs."""
    rng = np.random.default_rng(seed)
    vocab = make_vocab(rng, vocab_size)
    # 6 surface forms per word: (plain, Capitalised) x (no punctuation, ',', '.')
    forms = pa.array([f for w in vocab for c in (w, w.capitalize()) for f in (c, c + ",", c + ".")])
    cdf = np.cumsum(1.0 / np.arange(1, vocab_size + 1))
    cdf /= cdf[-1]

    lengths = rng.integers(180, 221, n_docs)
    is_copy = rng.random(n_docs) < dup_frac
    is_copy[: min(100, n_docs)] = False
    originals = np.flatnonzero(~is_copy)
    copies = np.flatnonzero(is_copy)
    # each copy's original: a non-copy document before it, each original used at most once
    orig = originals[(rng.random(copies.size) * np.searchsorted(originals, copies)).astype(np.int64)]
    orig, first = np.unique(orig, return_index=True)
    copies = copies[first]
    is_copy[:] = False
    is_copy[copies] = True
    orig_of = dict(zip(copies.tolist(), orig.tolist()))

    doc_ids: list[np.ndarray] = [None] * n_docs  # type: ignore[list-item]
    schema = pa.schema([("text", pa.large_string())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for c0 in range(0, n_docs, chunk):
            c1 = min(c0 + chunk, n_docs)
            flat = np.searchsorted(cdf, rng.random(int(lengths[c0:c1].sum()))).astype(np.int16)
            bounds = np.concatenate([[0], np.cumsum(lengths[c0:c1])])
            for d in range(c0, c1):
                if is_copy[d]:
                    doc_ids[d] = edit(rng, doc_ids[orig_of[d]], cdf)
                else:
                    doc_ids[d] = flat[bounds[d - c0] : bounds[d - c0 + 1]]
            ids = np.concatenate(doc_ids[c0:c1]).astype(np.int64)
            offs = np.concatenate([[0], np.cumsum([doc_ids[d].size for d in range(c0, c1)])])
            punct = rng.choice(3, ids.size, p=[0.88, 0.05, 0.07])
            cap = np.zeros(ids.size, np.int64)
            cap[1:] = punct[:-1] == 2
            cap[offs[:-1]] = 1
            tokens = forms.take(pa.array(ids * 6 + cap * 3 + punct))
            lists = pa.LargeListArray.from_arrays(pa.array(offs, pa.int64()), tokens)
            writer.write_table(pa.table({"text": pc.binary_join(lists, " ").cast(pa.large_string())}))
    return np.stack([orig, copies], axis=1)


def edit(rng: np.random.Generator, ids: np.ndarray, cdf: np.ndarray) -> np.ndarray:
    """A copy of a document (word ids) with 1-8 random substitutions, insertions or deletions."""
    words = ids.tolist()
    for _ in range(int(rng.integers(1, 9))):
        pos = int(rng.integers(0, len(words)))
        new = int(np.searchsorted(cdf, rng.random()))
        kind = rng.random()
        if kind < 0.6:
            words[pos] = new
        elif kind < 0.8:
            words.insert(pos, new)
        elif len(words) > 1:
            del words[pos]
    return np.array(words, np.int16)


def read_texts(path: Path, n: int | None = None, mmap: bool = True) -> pa.ChunkedArray:
    """The first n texts, memory-mapped, or read into memory (mmap=False)."""
    src = pa.memory_map(str(path)) if mmap else pa.OSFile(str(path))
    reader = pa.ipc.open_file(src)
    batches, rows = [], 0
    for i in range(reader.num_record_batches):
        if n is not None and rows >= n:
            break
        batches.append(reader.get_batch(i))
        rows += batches[-1].num_rows
    if not mmap:
        src.close()  # the batches were read into memory
    texts = pa.Table.from_batches(batches)["text"]
    return texts if n is None else texts.slice(0, n)


# ------------------------------------------------------------------------------------------------
# ground truth (plain Python, independent of the kernel)
# ------------------------------------------------------------------------------------------------
def ref_shingles(text: str, n: int) -> set[str]:
    w = WORD.findall(text.lower())
    if not w:
        return set()
    return {" ".join(w[i : i + n]) for i in range(max(1, len(w) - n + 1))}


class Truth:
    def __init__(self, texts: pa.ChunkedArray, ngram: int):
        self.texts, self.ngram, self.cache = texts, ngram, {}

    def shingles(self, d: int) -> set[str]:
        if d not in self.cache:
            self.cache[d] = ref_shingles(self.texts[d].as_py(), self.ngram)
        return self.cache[d]

    def jaccard(self, u: int, v: int) -> float:
        a, b = self.shingles(u), self.shingles(v)
        return len(a & b) / max(1, len(a | b))


def evaluate(
    root: np.ndarray, match: np.ndarray, planted: np.ndarray, planted_j: np.ndarray, truth: Truth, t: float
) -> dict:
    n = root.size
    inside = planted[:, 1] < n
    above = inside & (planted_j >= t)
    found = root[planted[above, 0]] == root[planted[above, 1]]
    dup = np.flatnonzero(root != np.arange(n))
    kept_j = np.array([truth.jaccard(int(d), int(root[d])) for d in dup])
    match_j = np.array([truth.jaccard(int(d), int(match[d])) for d in dup])
    return {
        "planted_above": int(above.sum()),
        "recall": float(found.mean()) if found.size else float("nan"),
        "reported": int(dup.size),
        "precision_kept": float((kept_j >= t).mean()) if dup.size else float("nan"),
        "precision_match": float((match_j >= t).mean()) if dup.size else float("nan"),
        "chains_below_t": int(((kept_j < t) & (match[dup] != root[dup])).sum()),
    }


# ------------------------------------------------------------------------------------------------
# the two methods, each in its own process
# ------------------------------------------------------------------------------------------------
def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm_up() -> None:
    """One-time import costs (pyarrow imports pandas on its first array) stay out of the timings."""
    pa.array([0])
    import pandas  # noqa: F401


def project_job(docs: str, n: int, work: str, cfg_json: str, out: str) -> None:
    cfg = DedupConfig.model_validate_json(cfg_json)
    _warm_up()
    texts = read_texts(Path(docs), n, mmap=False)  # the texts, in memory
    t0 = time.perf_counter()
    write_docs(texts, Path(work) / "docs.arrow")
    res = near_duplicates(Path(work) / "docs.arrow", work, cfg)
    seconds = time.perf_counter() - t0
    np.savez(
        out, root=res.root, match=res.match, seconds=seconds, maxrss=_maxrss_mb(), info=repr(res.info),
        timing=repr(res.timing),
    )


def datasketch_job(docs: str, n: int, cfg_json: str, out: str) -> None:
    from datasketch import MinHash, MinHashLSH

    cfg = DedupConfig.model_validate_json(cfg_json)
    _warm_up()
    texts = read_texts(Path(docs), n, mmap=False).to_pylist()
    t0 = time.perf_counter()
    shingles = [[s.encode() for s in ref_shingles(t, cfg.ngram)] for t in texts]
    sigs = MinHash.bulk(shingles, num_perm=cfg.num_perm, seed=cfg.seed)
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    for i, m in enumerate(sigs):
        lsh.insert(i, m)
    pairs = [(min(i, j), max(i, j)) for i, m in enumerate(sigs) for j in lsh.query(m) if j != i]
    pairs = np.array(sorted(set(pairs)), np.int64).reshape(-1, 2)
    root = minhash.union_find(len(texts), pairs)
    seconds = time.perf_counter() - t0
    # not timed: which row each removal is matched with, the pair with the best MinHash estimate on a
    # shortest path to the kept row (as the project reports it), for the matched-pair precision
    est = np.array([sigs[i].jaccard(sigs[j]) for i, j in pairs.tolist()], np.float64)
    match, _ = minhash.match_tree(root, pairs, est)
    info = repr({"bands": lsh.b, "rows": lsh.r, "pairs": len(pairs)})
    np.savez(out, root=root, match=match, seconds=seconds, maxrss=_maxrss_mb(), info=info, timing="{}")


def run_in_process(target, *args) -> dict:
    """Run target(*args) in a fresh process (forked from a small server, so its getrusage maxrss is
    its own) while sampling the summed RSS of it and all its descendants every 20 ms."""
    ctx = multiprocessing.get_context("forkserver")
    p = ctx.Process(target=target, args=args)
    p.start()
    peak = 0
    proc = psutil.Process(p.pid)
    while p.is_alive():
        total = 0
        try:
            for q in [proc] + proc.children(recursive=True):
                total += q.memory_info().rss
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.02)
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{target.__name__} failed with exit code {p.exitcode}")
    r = np.load(args[-1])
    return {**{k: r[k] for k in r.files}, "peak_tree": peak / 2**20}


# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--million", action="store_true", help="--docs 1000000 --datasketch-docs 50000")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--datasketch-docs", type=int, default=50_000, help="datasketch runs on this prefix")
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--verify", choices=["exact", "estimate"], default="exact", help="DedupConfig.verify")
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--dup-frac", type=float, default=0.05)
    ap.add_argument("--vocab", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.million:
        args.docs, args.datasketch_docs = 1_000_000, 50_000
    n_ds = min(args.datasketch_docs, args.docs)
    cfg = DedupConfig(
        num_perm=args.num_perm, threshold=args.threshold, ngram=args.ngram, workers=args.workers, seed=1,
        verify=args.verify,
    )
    t = cfg.threshold
    work = Path(tempfile.mkdtemp(prefix="dedup-bench-", dir=args.work))
    print(f"load average (1/5/15 min) at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    try:
        print(f"generating {args.docs:,} documents (seed {args.seed}) ...", flush=True)
        g0 = time.perf_counter()
        docs = work / "docs.arrow"
        planted = generate(docs, args.docs, args.seed, args.dup_frac, args.vocab)
        texts = read_texts(docs)
        truth = Truth(texts, cfg.ngram)
        planted_j = np.array([truth.jaccard(int(o), int(c)) for o, c in planted])
        print(
            f"  {time.perf_counter() - g0:.1f}s; {planted.shape[0]:,} planted pairs, true Jaccard "
            f"min {planted_j.min():.2f} median {np.median(planted_j):.2f} max {planted_j.max():.2f}, "
            f"{(planted_j >= t).mean():.0%} >= threshold {t}",
            flush=True,
        )
        bands, rows, verify_at = lsh_params(cfg)
        how = "exact shingle-set" if cfg.verify == "exact" else "estimated"
        print(f"project LSH: {bands} bands x {rows} rows, candidates verified at {how} Jaccard >= {verify_at:.3f}")

        results = []
        for n in dict.fromkeys([args.docs, n_ds]):  # the full set, then datasketch's prefix
            procs = min(args.workers, -(-n // PART_ROWS))  # one signature part per PART_ROWS docs
            name = f"project, {procs} process{'es' if procs > 1 else ''}"
            shutil.rmtree(work / "near", ignore_errors=True)
            print(f"running {name} on {n:,} docs ...", flush=True)
            r = run_in_process(
                project_job, str(docs), n, str(work / "near"), cfg.model_dump_json(), str(work / "p.npz")
            )
            results.append((name, n, r))
            print(f"  {float(r['seconds']):.1f}s  steps {r['timing']}  {r['info']}", flush=True)
        print(f"running datasketch 2.0 on {n_ds:,} docs ...", flush=True)
        r = run_in_process(datasketch_job, str(docs), n_ds, cfg.model_dump_json(), str(work / "d.npz"))
        results.append(("datasketch 2.0 (1 process)", n_ds, r))
        print(f"  {float(r['seconds']):.1f}s  {r['info']}", flush=True)

        print()
        print("Definitions:")
        print(f"  recall    = planted (original, copy) pairs with true word-{cfg.ngram}-gram Jaccard >= {t} that end")
        print("              in the same cluster, among the documents the method ran on (pairs>=t of them)")
        print("  prec kept = removals whose pair (removed document, the kept document of its cluster) has true")
        print(f"              Jaccard >= {t} (below it: a chain of pairs, or a pair accepted below the threshold)")
        print("  prec match= removals whose pair (removed document, the document it was matched with) has true")
        print(f"              Jaccard >= {t}: the precision of the accepted pairs themselves")
        print(f"  chains<t  = removals with true Jaccard < {t} to the kept document, matched with another one")
        print("  docs/s    = documents / seconds from texts in memory to clusters (shingling, hashing, MinHash,")
        print("              LSH, clustering; the project also writes the texts and its step files to disk);")
        print("              per document, so runs on different document counts compare")
        print("  peak MB   = largest sum of RSS over the run's process and all its worker processes (sampled")
        print("              every 20 ms); maxrss MB = getrusage maxrss of the run's main process alone")
        print("  reported  = documents removed as near duplicates")
        print("  imports and reading the generated texts into memory are not timed; the project's figures")
        print("  include starting its worker processes")
        print()
        hdr = (
            f"{'method':<30}{'docs':>10}{'seconds':>9}{'docs/s':>10}{'recall':>8}{'prec kept':>10}"
            f"{'prec match':>11}{'pairs>=t':>9}{'reported':>9}{'chains<t':>9}{'peak MB':>9}{'maxrss MB':>10}"
        )
        print(hdr)
        print("-" * len(hdr))
        rates = []
        for name, n, r in results:
            ev = evaluate(r["root"], r["match"], planted, planted_j, truth, t)
            sec = float(r["seconds"])
            rates.append((name, n, n / sec))
            print(
                f"{name:<30}{n:>10,}{sec:>9.1f}{n / sec:>10,.0f}{ev['recall']:>8.3f}{ev['precision_kept']:>10.3f}"
                f"{ev['precision_match']:>11.3f}{ev['planted_above']:>9,}{ev['reported']:>9,}"
                f"{ev['chains_below_t']:>9,}{float(r['peak_tree']):>9,.0f}{float(r['maxrss']):>10,.0f}"
            )
        ds = rates[-1][2]
        print()
        for name, n, rate in rates[:-1]:
            print(f"throughput ratio project ({name.split(', ')[1]}, {n:,} docs) / datasketch: {rate / ds:.1f}x")
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"machine: {os.cpu_count()} CPUs, load average (1/5/15 min) at the end: {load}")
        full = results[0]
        if full[1] >= 1_000_000:
            sec = float(full[2]["seconds"])
            peak = float(full[2]["peak_tree"])
            print(
                f"1M-doc target: {sec:.1f}s (< 180s: {'yes' if sec < 180 else 'NO'}), "
                f"peak {peak:,.0f} MB (< 4096 MB: {'yes' if peak < 4096 else 'NO'})"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
