"""Peak RSS and wall of `hrm stage mix` and `hrm stage pack` on generated tokenized rows (issue 13):
what each stage keeps in memory per row, this code beside an older export run on the same files.

    python benchmarks/pack_mix_memory.py --rows 2000000 --old /tmp/h10-old   # old: `git archive <commit> | tar -x -C DIR`
    python benchmarks/pack_mix_memory.py --rows 200000 --memory-gb 1

Input (not timed, written once per --rows into --work): tokenized.parquet with ids like
"src3/000001234", 8 sources, 4 strata (rule "default"), prompts of 8-24 and responses of 10-40 tokens
(the last one <|eoa|>), row groups of 8192 rows; mix runs with --epochs (default 2), and pack packs
that mix (this code's; the old code's mix.parquet is compared with it by sha256) into seq_len 512.

Each stage runs in a fresh process under a waiter process that reports the child's peak RSS
(getrusage RUSAGE_CHILDREN). Bytes per row: (peak at --rows - peak at --rows/10) / (the row difference),
the growth with the row count once the interpreter and the batches (fixed by memory_gb) are paid.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from _common import measure_cli, sha

ROOT = Path(__file__).resolve().parents[1]


SPEC = """
name: pmbench
sources:
  - {{name: g, kind: generator, generator: arithmetic, params: {{n: 10}}}}
mix: {{epochs: {epochs}}}
pack: {{seq_len: 512, min_response_tokens: 1, shard_tokens: 4194304}}
resources: {{memory_gb: {gb}}}
"""


def generate(d: Path, n: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (d / "tokenized.parquet").exists():
        return
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tmp = d / "tokenized.parquet.tmp"
    step = 262_144
    w = None
    for a in range(0, n, step):
        m = min(step, n - a)
        i = np.arange(a, a + m)

        def lists(lo: int, hi: int, last: int | None) -> tuple:
            k = rng.integers(lo, hi, m)
            off = np.zeros(m + 1, np.int32)
            np.cumsum(k, out=off[1:])
            vals = rng.integers(8, 4000, int(off[-1]), dtype=np.int32)
            if last is not None:
                vals[off[1:] - 1] = last
            return pa.ListArray.from_arrays(pa.array(off), pa.array(vals)), k

        p, pk = lists(8, 25, None)
        r, rk = lists(10, 41, 3)
        src = np.array([f"src{k}" for k in range(8)])[i % 8]
        t = pa.table({
            "id": pa.array(np.char.add(np.char.add(src, "/"), np.char.zfill(i.astype(str), 9))),
            "source": pa.array(src),
            "stratum": pa.array(np.array(["s0", "s1", "s2", "s3"])[(i * 7919) % 4]),
            "rule": pa.array(np.full(m, "default")),
            "prompt_ids": p, "response_ids": r,
            "prompt_tokens": pa.array(pk.astype(np.int32)), "response_tokens": pa.array(rk.astype(np.int32)),
        })
        if w is None:
            w = pq.ParquetWriter(tmp, t.schema)
        w.write_table(t, row_group_size=8192)
    w.close()
    (d / "tokenizer_meta.json").write_text(json.dumps({"pad_id": 0, "eoa_id": 3}))
    tmp.rename(d / "tokenized.parquet")


def shard_hashes(d: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(d.glob("shard-*.arrow"))} | {"removals": sha(d / "removals.parquet")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--memory-gb", type=float, default=0.5)
    ap.add_argument("--old", type=Path, default=None, help="a folder with the old code (git archive export)")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-pack-mix")
    ap.add_argument("--stages", default="mix,pack", help="mix,pack (default) or mix alone")
    a = ap.parse_args()
    codes = [("new", ROOT)] + ([("old", a.old.resolve())] if a.old else [])
    sizes = [a.rows // 10, a.rows]
    res: dict = {}
    for n in sizes:
        d = a.work / f"rows-{n}"
        generate(d / "tok", n)
        spec = d / "spec.yaml"
        spec.write_text(SPEC.format(epochs=a.epochs, gb=a.memory_gb))
        for name, code in codes:
            o = d / name
            subprocess.run(["rm", "-rf", str(o)], check=True)
            common = ["--spec", str(spec), "--no-progress"]
            res[(name, "mix", n)] = measure_cli(code, ["stage", "mix", "--input", str(d / "tok"), "--output",
                                                       str(o / "mix"), *common])
            # pack always packs this code's mix (the old mix is compared with it below)
            if "pack" not in a.stages.split(","):
                continue
            res[(name, "pack", n)] = measure_cli(code, ["stage", "pack", "--input", str(d / "tok"), "--mix",
                                                        str(d / "new" / "mix"), "--output", str(o / "pack"), *common])
        if a.old:
            same_mix = sha(d / "new" / "mix" / "mix.parquet") == sha(d / "old" / "mix" / "mix.parquet")
            same_pack = (shard_hashes(d / "new" / "pack") == shard_hashes(d / "old" / "pack")
                         if "pack" in a.stages.split(",") else "not run")
            print(f"rows {n:,}: mix.parquet identical: {same_mix}; pack shards + removals identical: {same_pack}")
    samples = a.rows * a.epochs
    print(f"\nmemory_gb {a.memory_gb}, {a.rows:,} rows, mix epochs {a.epochs} ({samples:,} samples for pack)")
    print(f"{'code':5} {'stage':5} {'peak RSS MB':>12} {'wall s':>8} {'MB at rows/10':>14} {'bytes/row':>10}")
    for name, _ in codes:
        for stage in [s for s in ("mix", "pack") if s in a.stages.split(",")]:
            big, small = res[(name, stage, sizes[1])], res[(name, stage, sizes[0])]
            per_row = (big["maxrss_mb"] - small["maxrss_mb"]) * 2**20 / (sizes[1] - sizes[0])
            print(f"{name:5} {stage:5} {big['maxrss_mb']:12.0f} {big['wall_s']:8.1f} {small['maxrss_mb']:14.0f} "
                  f"{per_row:10.0f}")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"(total {time.time() - t0:.0f} s)")
