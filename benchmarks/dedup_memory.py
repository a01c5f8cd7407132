"""Peak RSS and wall of `hrm stage dedup` on generated rows (issue 13): what dedup keeps in memory per
row, this code beside an older export run on the same files.

    python benchmarks/dedup_memory.py --rows 2000000 --old /tmp/old   # old: `git archive <commit> | tar -x -C DIR`
    python benchmarks/dedup_memory.py --rows 500000 --near            # with the MinHash near step

Input (not timed, written once per --rows into --work): a Parquet file of rows (id, instruction of 12-40
words from a 5,000-word vocabulary, response, source, stratum); 5% of the rows repeat an earlier row's
texts verbatim and 2% with one word changed (exact and near duplicates). Dedup runs exact-only unless
--near, at --memory-gb (default 0.5).

Each run is a fresh process under a waiter process that reports the child's peak RSS (getrusage
RUSAGE_CHILDREN). Bytes per row: (peak at --rows - peak at --rows/10) / (the row difference), the growth
with the row count once the interpreter and the batches (fixed by memory_gb) are paid. The outputs of
both codes are compared by sha256.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import numpy as np

from _common import measure_cli, sha

ROOT = Path(__file__).resolve().parents[1]


SPEC = """
name: ddbench
sources:
  - {{name: g, kind: generator, generator: arithmetic, params: {{n: 10}}}}
dedup: {{near: {near}}}
resources: {{memory_gb: {gb}}}
"""


def generate(path: Path, n: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = np.array([f"w{k}" for k in range(5000)])
    tmp = path.with_suffix(".tmp")
    w = None
    texts: list[str] = []  # every row's instruction so far (copies are drawn from them)
    step = 200_000
    for a in range(0, n, step):
        m = min(step, n - a)
        batch = []
        for i in range(a, a + m):
            u = rng.random()
            if texts and u < 0.07:
                t = texts[int(rng.integers(0, len(texts)))]
                if u >= 0.05:  # a near copy: one word changed
                    ws = t.split()
                    ws[int(rng.integers(0, len(ws)))] = str(words[int(rng.integers(0, 5000))])
                    t = " ".join(ws)
            else:
                t = " ".join(words[rng.integers(0, 5000, int(rng.integers(12, 41)))])
            texts.append(t)
            batch.append(t)
        i = np.arange(a, a + m)
        tab = pa.table({"id": pa.array(np.char.add("r", i.astype(str))), "instruction": pa.array(batch),
                        "response": pa.array(np.char.add("answer ", (i % 997).astype(str))),
                        "source": pa.array(np.array(["a", "b"])[i % 2]),
                        "stratum": pa.array(np.array(["s0", "s1", "s2"])[i % 3])})
        if w is None:
            w = pq.ParquetWriter(tmp, tab.schema)
        w.write_table(tab, row_group_size=65536)
    w.close()
    tmp.rename(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--memory-gb", type=float, default=0.5)
    ap.add_argument("--near", action="store_true", help="with the near (MinHash) step")
    ap.add_argument("--old", type=Path, default=None, help="a folder with the old code (git archive export)")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-dedup-memory")
    a = ap.parse_args()
    codes = [("new", ROOT)] + ([("old", a.old.resolve())] if a.old else [])
    sizes = [a.rows // 10, a.rows]
    res: dict = {}
    for n in sizes:
        src = a.work / f"rows-{n}.parquet"
        generate(src, n)
        spec = a.work / f"spec-{n}.yaml"
        spec.write_text(SPEC.format(near=str(a.near).lower(), gb=a.memory_gb))
        for name, code in codes:
            o = a.work / f"out-{n}-{name}"
            subprocess.run(["rm", "-rf", str(o)], check=True)
            res[(name, n)] = measure_cli(code, ["stage", "dedup", "--input", str(src), "--output", str(o),
                                                "--spec", str(spec), "--no-progress"])
        if a.old:
            same = all(sha(a.work / f"out-{n}-new" / f) == sha(a.work / f"out-{n}-old" / f)
                       for f in ("rows.parquet", "removals.parquet", "clusters.parquet"))
            print(f"rows {n:,}: rows, removals and clusters identical: {same}")
    print(f"\nmemory_gb {a.memory_gb}, {a.rows:,} rows, near step: {a.near}")
    print(f"{'code':5} {'peak RSS MB':>12} {'wall s':>8} {'MB at rows/10':>14} {'bytes/row':>10}")
    for name, _ in codes:
        big, small = res[(name, sizes[1])], res[(name, sizes[0])]
        per_row = (big["maxrss_mb"] - small["maxrss_mb"]) * 2**20 / (sizes[1] - sizes[0])
        print(f"{name:5} {big['maxrss_mb']:12.0f} {big['wall_s']:8.1f} {small['maxrss_mb']:14.0f} {per_row:10.0f}")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"(total {time.time() - t0:.0f} s)")
