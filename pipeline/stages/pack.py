"""Stage `pack`: lay the mixed samples out in fixed-length sequences, written as Arrow IPC shards.

Inputs: the tokenizer folder (`tokenized.parquet`, `tokenizer_meta.json`) and the mix folder
(`mix.parquet`: epoch, order, id).

Sample layout: prompt_ids + response_ids, i.e. [BOQ][tag]... instruction [EOQ] response [EOA] (one condition token
per tag of the row's condition, e.g. "synth,cot": the prompt_lengths below count them).
- "Response tokens" means the response text's tokens, EOA excluded (= len(response_ids) - 1).
  A row with fewer than `cfg.min_response_tokens` of them is dropped: reason "short_response".
  The default 1 follows the reference: one content token plus EOA is a sample (a one-digit answer).
- A row whose prompt alone has >= seq_len - min_response_tokens tokens is dropped: reason
  "prompt_too_long" (checked after "short_response"; each dropped row gets one reason).
- A longer sample is truncated in the response: the prompt is kept whole, the response keeps its
  first seq_len - prompt tokens (so at least min_response_tokens + 1) and then has no EOA (the text
  did not end there). Truncated samples and cut tokens are counted.
A dropped row is dropped with all its occurrences (epochs, repeats); removals.parquet has one line
per row id (REMOVAL_SCHEMA, stage "pack"), so lineage adds up per row:
rows_in (distinct ids in the mix) = rows_packed + rows removed by reason; the same holds per sample
occurrence (samples_in = samples_packed + samples removed by reason).

Packing: bounded first-fit in mix order, per epoch. Samples are taken in (epoch, order); each goes
into the first of the (at most `open_bins`, default 32) open sequences with room for it, else a new
sequence is opened (when `open_bins` are open, the oldest is closed first). Sequences are closed and
written in the order they were opened, and a sequence holds only samples of one epoch, in mix order.
A sample is never split across sequences; every sequence is padded at its tail with <|pad|> to
exactly `cfg.seq_len`. Deterministic: same inputs and config -> byte-identical shards.

Shards: `shard-00000.arrow`, ... (Arrow IPC file format, uncompressed, memory-mappable; written to a
temp name and renamed), about `cfg.shard_tokens` tokens each (shard_tokens // seq_len sequences, at
least one). One row per packed sequence:
    input_ids       fixed_size_list<int32>[seq_len]  the tokens, pad after the last sample
    sample_starts   list<int32>   offset of each sample in input_ids (0 for the first, increasing)
    sample_lengths  list<int32>   tokens of each sample (prompt + kept response)
    prompt_lengths  list<int32>   tokens of each sample's prompt ([BOQ][tags] instruction [EOQ])
    sample_ids      list<string>  the tokenized row id of each sample (lineage)
    epoch           int32
The schema metadata holds seq_len and pad_id. For the trainer: for a sample at s with length L and
prompt length p, position ids restart at s (0..L-1); the PrefixLM mask lets positions [s, s+p) see
each other both ways and positions [s+p, s+L) see [s, s+p) plus earlier response positions; no
position sees another sample or the padding. Answer-only labels: the token at position t+1 is the
label of position t for t in [s+p-1, s+L-2] (the last prompt token predicts the first response
token); every other label (prompt, last token of a sample, padding) is -100. Mask and labels come
from the same prompt_lengths.

Each shard also gets `shard-00000.json` (rows, tokens, non-pad tokens, samples, answer tokens,
truncated samples, samples per source and sequences per epoch, sha256), and the same figures are in
its entry of the stage manifest's outputs.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import budget, io
from pipeline.config import PackConfig
from pipeline.parts import MapParts
from pipeline.schema import REMOVAL_SCHEMA

STAGE = "pack"
TOKENIZED_FILE = "tokenized.parquet"
META_FILE = "tokenizer_meta.json"
MIX_FILE = "mix.parquet"
REMOVALS_FILE = "removals.parquet"
OPEN_BINS = 32
FORMAT = "hrm-pack/1"


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.arrow"


def pack_schema(seq_len: int, pad_id: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.int32(), seq_len), nullable=False),
            pa.field("sample_starts", pa.list_(pa.int32()), nullable=False),
            pa.field("sample_lengths", pa.list_(pa.int32()), nullable=False),
            pa.field("prompt_lengths", pa.list_(pa.int32()), nullable=False),
            pa.field("sample_ids", pa.list_(pa.string()), nullable=False),
            pa.field("epoch", pa.int32(), nullable=False),
        ],
        metadata={"format": FORMAT, "seq_len": str(seq_len), "pad_id": str(pad_id)},
    )


def read_shard(path: str | os.PathLike) -> pa.Table:
    """Read one packed shard (memory-mapped)."""
    with pa.memory_map(str(path), "r") as src:
        return pa.ipc.open_file(src).read_all()


def _flat(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list<int32> column, offsets starting at 0."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return values.astype(np.int32, copy=False), offsets - offsets[0]


def _list(lengths: list[int], values: pa.Array) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("pack: a shard column has more than 2**31 values; lower shard_tokens")
    offsets = offsets.astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


class _ShardWriter:
    """Collects the plan of packed sequences (each sample's file offsets and lengths; no tokens) and hands
    a shard's plan out every `rows_per_shard` sequences: `write_shard` gathers its tokens and ids from the
    spill files and writes it. Without `map_parts` each shard is written as its plan fills (one shard's
    tokens in memory); with it, each plan goes to a small file in the output folder and the shards are
    written at the end as parts (`write_shard_part`), merged in shard order (`finish`)."""

    def __init__(self, out: Path, seq_len: int, pad_id: int, rows_per_shard: int, files: tuple[str, str, str],
                 source_names: list[str], map_parts=None):
        self.out, self.seq_len, self.pad = out, seq_len, pad_id
        self.rows_per_shard = rows_per_shard
        self.files, self.source_names, self.map_parts = files, source_names, map_parts
        self.records: list[tuple[str, dict]] = []
        self.plans: list[tuple] = []  # with map_parts: one part's arguments per shard
        self.k = 0
        self._reset()

    def _reset(self) -> None:
        self.starts: list[int] = []
        self.lens: list[int] = []
        self.plens: list[int] = []
        self.where: list[tuple[int, int, int, int]] = []  # per sample: prompt, response, id offsets; id length
        self.per_row: list[int] = []
        self.epochs: list[int] = []
        self.sources: dict[str, int] = {}
        self.answer = 0
        self.truncated = 0

    def add(self, starts, lens, plens, where, srcs, epoch: int, truncated: int) -> None:
        self.starts += starts
        self.lens += lens
        self.plens += plens
        self.where += where
        self.per_row.append(len(starts))
        self.epochs.append(epoch)
        names = self.source_names
        for s in srcs:
            name = names[s]
            self.sources[name] = self.sources.get(name, 0) + 1
        self.answer += sum(lens) - sum(plens)
        self.truncated += truncated
        if len(self.per_row) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.per_row:
            return
        where = np.asarray(self.where, dtype=np.int64).reshape(-1, 4)
        lens = np.asarray(self.lens, dtype=np.int32)
        plens = np.asarray(self.plens, dtype=np.int32)
        plan = {
            "p_start": where[:, 0].copy(), "r_start": where[:, 1].copy(), "i_start": where[:, 2].copy(),
            "i_len": where[:, 3].copy(),
            "starts": np.asarray(self.starts, dtype=np.int32), "lens": lens, "plens": plens,
            "per_row": np.asarray(self.per_row, dtype=np.int64), "epochs": np.asarray(self.epochs, dtype=np.int32),
        }
        stats = {"answer_tokens": int(self.answer), "truncated_samples": int(self.truncated),
                 "sources": dict(sorted(self.sources.items()))}
        job = (str(self.out), self.k, self.seq_len, self.pad, self.files, stats)
        if self.map_parts is None:
            self.records.append(write_shard(*job, plan))
        else:  # the plan to a file: the driver holds no shard's plan until the parts run
            path = self.out / f".pack-plan-{self.k:05d}.npz"
            np.savez(path, **plan)
            self.plans.append((*job, str(path)))
        self.k += 1
        self._reset()

    def finish(self) -> None:
        """The last shard; with `map_parts`, every shard written as a part, records in shard order."""
        self.flush()
        if self.map_parts is not None and self.plans:
            try:
                self.records = [tuple(r) for r in self.map_parts(write_shard_part, self.plans)]
            finally:
                for job in self.plans:
                    Path(job[-1]).unlink(missing_ok=True)


def write_shard(out: str, k: int, seq_len: int, pad: int, files: tuple[str, str, str], stats: dict,
                plan: dict) -> tuple[str, dict]:
    """Write shard k from its plan: each sample's prompt and kept response tokens read from the spill
    files (`files`: prompts, responses, ids) at its row's offsets and placed at its offset in its
    sequence (the rest <|pad|>), its id read from the id file; then `shard-k.json`. Returns
    (file name, record)."""
    per_row, starts, lens, plens = plan["per_row"], plan["starts"], plan["lens"], plan["plens"]
    rows = len(per_row)
    flat = np.full(rows * seq_len, pad, dtype=np.int32)
    dest = np.repeat(np.arange(rows, dtype=np.int64) * seq_len, per_row) + starts  # each sample's first token
    _take_into(Path(files[0]), plan["p_start"], plens.astype(np.int64), flat, dest)  # prompt, then kept response
    _take_into(Path(files[1]), plan["r_start"], (lens - plens).astype(np.int64), flat, dest + plens)
    id_vals, id_off = _take(Path(files[2]), plan["i_start"], plan["i_len"], np.uint8)
    ids = pa.Array.from_buffers(pa.large_string(), len(lens), [None, pa.py_buffer(id_off), pa.py_buffer(id_vals)])
    schema = pack_schema(seq_len, pad)
    table = pa.Table.from_arrays(
        [
            pa.FixedSizeListArray.from_arrays(pa.array(flat), seq_len),
            _list(per_row, pa.array(starts)),
            _list(per_row, pa.array(lens)),
            _list(per_row, pa.array(plens)),
            _list(per_row, ids.cast(pa.string())),
            pa.array(plan["epochs"]),
        ],
        schema=schema,
    )
    path = Path(out) / shard_name(k)
    with io.atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
            w.write_table(table, max_chunksize=1024)
    rec = io.file_record(path, rows=rows)
    ep: dict[str, int] = {}
    for e in plan["epochs"].tolist():
        ep[str(e)] = ep.get(str(e), 0) + 1
    rec.update(
        {
            "tokens": rows * seq_len,
            "non_pad_tokens": int(lens.sum(dtype=np.int64)),
            "samples": len(lens),
            "answer_tokens": stats["answer_tokens"],
            "truncated_samples": stats["truncated_samples"],
            "sources": stats["sources"],
            "epochs": ep,
        }
    )
    io.write_json({"file": path.name, "seq_len": seq_len, "pad_id": pad, **rec}, path.with_suffix(".json"))
    return path.name, rec


def write_shard_part(out: str, k: int, seq_len: int, pad: int, files: tuple[str, str, str], stats: dict,
                     plan_file: str) -> tuple[str, dict]:
    """`write_shard` as one part for `map_parts` (pipeline.parts): the plan read from its file."""
    with np.load(plan_file) as z:
        plan = {name: z[name] for name in z.files}
    return write_shard(out, k, seq_len, pad, files, stats, plan)


def _check_columns(path: Path, cols: list[str]) -> None:
    schema = pq.read_schema(path)
    missing = [c for c in cols if c not in schema.names]
    if missing:
        raise ValueError(f"pack: {path}: missing column(s) {missing}; found {schema.names}")


def _utf8(col) -> tuple[memoryview, np.ndarray]:
    """(bytes, offsets from 0) of a string column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    arr = arr.cast(pa.large_string())
    off = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    vals = memoryview(data)[int(off[0]) : int(off[-1])] if data is not None else memoryview(b"")
    return vals, off - off[0]


def _hash(col) -> np.ndarray:
    """A 64-bit hash of each string: Python's string hash (SipHash; salted per process, so only
    compared within one run), taken a batch at a time."""
    return np.fromiter(map(hash, col.to_pylist()), np.int64, count=len(col))


def _take(path: Path, starts: np.ndarray, lengths: np.ndarray, dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Values [start, start+length) of each range of a file of `dtype` values, concatenated; with their
    offsets. Read range by range (pread), not through a memory map: a mapped file's pages around each
    range (read-ahead, fault-around: 64 KB and more) would count in the process's RSS."""
    size = np.dtype(dtype).itemsize
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    vals = np.empty(int(off[-1]), dtype)
    mv = memoryview(vals).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        for s, o, n in zip((starts * size).tolist(), (off[:-1] * size).tolist(), (lengths * size).tolist()):
            if n and os.preadv(fd, [mv[o : o + n]], s) != n:
                raise OSError(f"pack: {path}: short read at byte {s}")
    finally:
        os.close(fd)
    return vals, off


def _take_into(path: Path, starts: np.ndarray, lengths: np.ndarray, out: np.ndarray, dest: np.ndarray) -> None:
    """Values [start, start+length) of each range of a file of out's dtype, read straight into
    out[dest : dest+length] (pread, as `_take`; no copy between)."""
    size = out.dtype.itemsize
    mv = memoryview(out).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        for s, o, n in zip((starts * size).tolist(), (dest * size).tolist(), (lengths * size).tolist()):
            if n and os.preadv(fd, [mv[o : o + n]], s) != n:
                raise OSError(f"pack: {path}: short read at byte {s}")
    finally:
        os.close(fd)


def _sum_sources(recs: list[dict]) -> dict[str, int]:
    tot: dict[str, int] = {}
    for r in recs:
        for k, v in r["sources"].items():
            tot[k] = tot.get(k, 0) + v
    return dict(sorted(tot.items()))


# The out-of-core join of the mix's ids to the tokenized rows. Every row's keys (a 64-bit hash of its id,
# its row number, lengths, file offsets and source code) and every sample's (the hash, its place in mix
# order, its epoch) are written with their ids to partition files by hash; one partition at a time is
# then joined in memory (a sorted hash, the ids compared), and its samples go to files by their place in
# mix order (read back one range at a time to be packed) and its rows named by the mix but dropped to
# files by row range (the removals, written in row order). Nothing is held per row or per sample.
ROW_REC = np.dtype([("h", "<i8"), ("row", "<i8"), ("p_off", "<i8"), ("r_off", "<i8"), ("i_off", "<i8"),
                    ("p", "<i4"), ("r", "<i4"), ("i_len", "<i4"), ("src", "<i4")])
MIX_REC = np.dtype([("h", "<i8"), ("s", "<i8"), ("e", "<i4"), ("len", "<i4")])  # s: the place in mix order
SAMPLE_REC = np.dtype([("s", "<i8"), ("p_off", "<i8"), ("r_off", "<i8"), ("i_off", "<i8"), ("p", "<i4"),
                       ("r", "<i4"), ("i_len", "<i4"), ("src", "<i4"), ("e", "<i4"), ("_", "<i4")])
GONE_REC = np.dtype([("row", "<i8"), ("occ", "<i8"), ("p", "<i4"), ("r", "<i4"), ("i_off", "<i8"),
                     ("i_len", "<i4"), ("src", "<i4")])
_JOIN_ITEM_BYTES = 256  # memory per row or sample of a partition while it is joined (tests raise it)
_RANGE_ITEM_BYTES = 192  # memory per sample of a range of samples being packed, per dropped row of a range


def _scatter(tmp: Path, kind: str, rec: np.ndarray, ids, parts: int) -> None:
    """Append `rec` and the UTF-8 of `ids` (one per record) to the partition files of their hash."""
    p = (rec["h"].astype(np.uint64) % np.uint64(parts)).astype(np.int64)
    o = np.argsort(p, kind="stable")
    rec = rec[o]
    vals, off = _utf8(ids.take(pa.array(o)))
    cut = np.searchsorted(p[o], np.arange(parts + 1))
    for k in np.flatnonzero(np.diff(cut)).tolist():
        a, b = int(cut[k]), int(cut[k + 1])
        io.append_bytes(tmp / f"{kind}-{k}", memoryview(rec[a:b]).cast("B"))
        io.append_bytes(tmp / f"{kind}ids-{k}", vals[int(off[a]) : int(off[b])])


def _spread(tmp: Path, kind: str, rec: np.ndarray, key: np.ndarray, size: int) -> None:
    """Append `rec` to the range files of key // size (in the order given within one file)."""
    p = key // size
    o = np.argsort(p, kind="stable")
    rec, p = rec[o], p[o]
    cut = np.flatnonzero(np.diff(p)) + 1
    for a, b in zip([0, *cut.tolist()], [*cut.tolist(), len(p)]):
        io.append_bytes(tmp / f"{kind}-{int(p[a])}", memoryview(rec[a:b]).cast("B"))


def _load(path: Path, dtype, id_file: Path | None = None, len_field: str = "len"):
    """A partition's records (and their ids as a large_string array)."""
    rec = np.fromfile(path, dtype) if path.exists() else np.zeros(0, dtype)
    if id_file is None:
        return rec
    off = np.zeros(len(rec) + 1, np.int64)
    np.cumsum(rec[len_field], out=off[1:])
    data = id_file.read_bytes() if id_file.exists() else b""
    ids = pa.Array.from_buffers(pa.large_string(), len(rec), [None, pa.py_buffer(off), pa.py_buffer(data)])
    return rec, ids


def _match(H: np.ndarray, order: np.ndarray, row_ids: pa.Array, q: np.ndarray, ids: pa.Array) -> np.ndarray:
    """For each id of `ids` (hash `q`) the first row (index into row_ids) with that id, -1 if none: `H` is
    the rows' hashes sorted, `order` the rows in that order (equal hashes: in row order). A hash only
    proposes rows: the ids themselves are compared, candidate after candidate."""
    lo = np.searchsorted(H, q, side="left")
    hi = np.searchsorted(H, q, side="right")
    res = np.full(len(q), -1, np.int64)
    live = np.flatnonzero(hi > lo)
    t = 0
    while len(live):
        cand = order[lo[live] + t]
        eq = pc.equal(row_ids.take(pa.array(cand)), ids.take(pa.array(live))).to_numpy(zero_copy_only=False)
        res[live[eq]] = cand[eq]
        t += 1
        live = live[~eq & (lo[live] + t < hi[live])]
    return res


class _Tally:
    """The figures of the rows named by the mix, summed partition by partition."""

    def __init__(self):
        self.rows_in = self.rows_packed = self.kept_samples = self.samples_truncated = self.tokens_truncated = 0
        self.min_len: int | None = None
        self.reason_rows: dict[str, int] = {}
        self.reason_samples: dict[str, int] = {}
        self.missing = 0
        self.first_missing: list[tuple[int, str]] = []  # the first 3 in mix order: (place, id)


def _spill_rows(tok_file: Path, tmp: Path, eoa: int, batch_rows: int, parts: int, progress: bool) -> dict:
    """Read the tokenized rows a batch at a time: their tokens to two flat int32 files (prompts,
    responses), their ids to a bytes file (the UTF-8 of each, one after the other), and each row's keys
    with its id to the partition files of its id's hash. Returns the spill file paths and source names."""
    from tqdm.auto import tqdm

    pf = pq.ParquetFile(tok_file, pre_buffer=False)
    n = pf.metadata.num_rows
    files = (tmp / "prompts", tmp / "responses", tmp / "ids")
    source_names: list[str] = []
    code: dict[str, int] = {}
    first_bad, n_bad = None, 0
    p_tot = r_tot = i_tot = 0
    bar = tqdm(total=n, desc="pack read", unit="row", unit_scale=True, disable=not progress, mininterval=1.0)
    done = 0
    with open(files[0], "wb") as fp, open(files[1], "wb") as fr, open(files[2], "wb") as fi:
        for b in pf.iter_batches(batch_size=batch_rows, columns=["id", "source", "prompt_ids", "response_ids"],
                                 use_threads=False):
            p_vals, p_off = _flat(b.column("prompt_ids"))
            r_vals, r_off = _flat(b.column("response_ids"))
            p_vals.tofile(fp)
            r_vals.tofile(fr)
            p_len, r_len = np.diff(p_off), np.diff(r_off)
            last = r_vals[np.maximum(r_off[1:] - 1, 0)] if len(r_vals) else np.zeros(len(r_len), np.int32)
            bad = np.flatnonzero((r_len == 0) | (last != eoa))
            if len(bad):
                if first_bad is None:
                    first_bad = b.column("id")[int(bad[0])].as_py()
                n_bad += len(bad)
            m = len(p_len)
            if done + m > n:
                raise ValueError(f"pack: {tok_file}: more rows than its metadata's {n}")
            id_col = b.column("id")
            if id_col.null_count:
                k = int(np.flatnonzero(pc.is_null(id_col).to_numpy(zero_copy_only=False))[0])
                raise ValueError(f"pack: {tok_file}: row {done + k}: id is null")
            id_vals, id_off = _utf8(id_col)
            fi.write(id_vals)
            rec = np.empty(m, ROW_REC)
            rec["row"] = np.arange(done, done + m, dtype=np.int64)
            rec["p"], rec["r"] = p_len, r_len
            rec["p_off"] = p_off[:-1] + p_tot
            rec["r_off"] = r_off[:-1] + r_tot
            rec["i_off"] = id_off[:-1] + i_tot
            rec["i_len"] = np.diff(id_off)
            p_tot, r_tot, i_tot = p_tot + int(p_off[-1]), r_tot + int(r_off[-1]), i_tot + int(id_off[-1])
            rec["h"] = _hash(id_col)
            sources = b.column("source")
            uniq = pc.unique(sources).to_pylist()
            for s in uniq:
                if s not in code:
                    code[s] = len(source_names)
                    source_names.append(s)
            idx = pc.index_in(sources, value_set=pa.array(uniq, sources.type)).to_numpy(zero_copy_only=False)
            rec["src"] = np.asarray([code[s] for s in uniq], dtype=np.int64)[idx]
            _scatter(tmp, "rows", rec, id_col, parts)
            done += m
            bar.update(m)
    bar.close()
    if first_bad is not None:
        raise ValueError(
            f"pack: {tok_file}: row {first_bad!r} (and {n_bad - 1} more): response_ids "
            f"must end with <|eoa|> (id {eoa})"
        )
    if done != n:
        raise ValueError(f"pack: {tok_file}: {done} rows read, its metadata says {n}")
    return {"files": tuple(str(f) for f in files), "source_names": source_names, "rows": n}


def _mix_in_order(mix_pf: pq.ParquetFile, batch: int) -> bool:
    """Whether the mix's samples are in (epoch, order) order already (as the mix stage writes them)."""
    prev = None
    for mb in mix_pf.iter_batches(batch_size=batch, columns=["epoch", "order"], use_threads=False):
        e = mb.column("epoch").to_numpy().astype(np.int64)
        o = mb.column("order").to_numpy().astype(np.int64)
        if prev is not None:
            e, o = np.concatenate([[prev[0]], e]), np.concatenate([[prev[1]], o])
        de, do = np.diff(e), np.diff(o)
        if ((de < 0) | ((de == 0) & (do <= 0))).any():
            return False
        if len(e):
            prev = (e[-1], o[-1])
    return True


def _spill_mix(mix_file: Path, tmp: Path, batch: int, parts: int) -> int:
    """The mix's samples, a batch at a time, with their place in mix order (for a mix not in (epoch, order)
    order the places come from one sort of all its (epoch, order) pairs in memory, 20 bytes a sample), to
    the partition files of their id's hash. Returns the number of samples."""
    mix_pf = pq.ParquetFile(mix_file, pre_buffer=False)
    place = None
    if not _mix_in_order(mix_pf, batch):
        eo = pq.read_table(mix_file, columns=["epoch", "order"])
        perm = np.lexsort((eo["order"].to_numpy().astype(np.int64), eo["epoch"].to_numpy().astype(np.int32)))
        del eo
        place = np.empty(len(perm), np.int64)
        place[perm] = np.arange(len(perm), dtype=np.int64)
        del perm
    s0 = 0
    for mb in mix_pf.iter_batches(batch_size=batch, columns=["epoch", "id"], use_threads=False):
        ids = mb.column("id")
        if ids.null_count:
            k = int(np.flatnonzero(pc.is_null(ids).to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"pack: {mix_file}: sample {s0 + k}: id is null")
        m = mb.num_rows
        rec = np.empty(m, MIX_REC)
        rec["h"] = _hash(ids)
        rec["s"] = np.arange(s0, s0 + m, dtype=np.int64) if place is None else place[s0 : s0 + m]
        rec["e"] = mb.column("epoch").to_numpy()
        rec["len"] = np.diff(_utf8(ids)[1])
        _scatter(tmp, "mix", rec, ids, parts)
        s0 += m
    return s0


def _join(tmp: Path, parts: int, n_rows: int, n_samples: int, memory_gb, seq_len: int, min_resp: int,
          progress: bool) -> tuple[_Tally, int, int]:
    """Join each hash partition's samples to its rows (the first row with the sample's id); the samples
    with their rows' keys go to range files by place in mix order (`samp-k`, range_size places each), the
    rows named by the mix but dropped to range files by row (`gone-k`, gone_size rows each); the rows'
    figures are summed in a _Tally. Returns (tally, range_size, gone_size)."""
    from tqdm.auto import tqdm

    range_size = -(-max(1, n_samples) // budget.join_parts(n_samples, memory_gb, _RANGE_ITEM_BYTES))
    gone_size = -(-max(1, n_rows) // budget.join_parts(n_rows, memory_gb, _RANGE_ITEM_BYTES))
    t = _Tally()
    for k in tqdm(range(parts), desc="pack join", unit="part", disable=not progress or parts < 2):
        rows, row_ids = _load(tmp / f"rows-{k}", ROW_REC, tmp / f"rowsids-{k}", "i_len")
        (tmp / f"rows-{k}").unlink(missing_ok=True)
        (tmp / f"rowsids-{k}").unlink(missing_ok=True)
        smp, ids = _load(tmp / f"mix-{k}", MIX_REC, tmp / f"mixids-{k}")
        (tmp / f"mix-{k}").unlink(missing_ok=True)
        (tmp / f"mixids-{k}").unlink(missing_ok=True)
        order = np.argsort(rows["h"], kind="stable")  # the file has the rows in row order
        j = _match(rows["h"][order], order, row_ids, smp["h"], ids)
        del order, row_ids
        miss = np.flatnonzero(j < 0)
        if len(miss):
            t.missing += len(miss)
            first = miss[np.argsort(smp["s"][miss], kind="stable")[:3]]
            t.first_missing = sorted(t.first_missing + list(zip(smp["s"][first].tolist(),
                                                                ids.take(pa.array(first)).to_pylist())))[:3]
            continue  # an error once every partition is joined
        del ids
        # the samples, with their rows' keys, to the files of their range of places
        r = rows[j]
        s = np.empty(len(smp), SAMPLE_REC)
        s["s"], s["e"], s["_"] = smp["s"], smp["e"], 0
        for f in ("p_off", "r_off", "i_off", "p", "r", "i_len", "src"):
            s[f] = r[f]
        del r
        _spread(tmp, "samp", s, s["s"], range_size)
        del s, smp
        # the rows' figures
        occ = np.bincount(j, minlength=len(rows)).astype(np.int64)
        del j
        P, R = rows["p"].astype(np.int64), rows["r"].astype(np.int64)
        in_mix = occ > 0
        dropped = (R < min_resp + 1) | (P >= seq_len - min_resp)
        kept = in_mix & ~dropped
        keep = np.minimum(R, seq_len - P)
        t.rows_in += int(in_mix.sum())
        t.rows_packed += int(kept.sum())
        if kept.any():
            m = int((P + keep)[kept].min())
            t.min_len = m if t.min_len is None else min(t.min_len, m)
        ko = np.where(kept, occ, 0)
        t.kept_samples += int(ko.sum())
        t.samples_truncated += int(ko[keep < R].sum())
        t.tokens_truncated += int((ko * (R - keep)).sum())
        gone = np.flatnonzero(in_mix & dropped)
        if len(gone):
            g = np.empty(len(gone), GONE_REC)
            g["occ"] = occ[gone]
            for f in ("row", "p", "r", "i_off", "i_len", "src"):
                g[f] = rows[f][gone]
            _spread(tmp, "gone", g, g["row"], gone_size)
    return t, range_size, gone_size


def _removals(tmp: Path, id_file: Path, path: Path, source_names: list[str], n_rows: int, gone_size: int,
              seq_len: int, min_resp: int, step: int, tally: _Tally) -> dict:
    """removals.parquet: the rows the mix names but that are dropped, one line per row in row order (a
    range of rows at a time), with the number of their occurrences in the mix."""
    names = pa.array(source_names, pa.string())
    with io.RowGroupWriter(path, REMOVAL_SCHEMA) as w:
        for k in range(-(-n_rows // gone_size)):
            g = _load(tmp / f"gone-{k}", GONE_REC)
            (tmp / f"gone-{k}").unlink(missing_ok=True)
            g = g[np.argsort(g["row"], kind="stable")]
            for a in range(0, len(g), step):
                x = g[a : a + step]
                vals, off = _take(id_file, x["i_off"], x["i_len"].astype(np.int64), np.uint8)
                ids = pa.Array.from_buffers(pa.large_string(), len(x), [None, pa.py_buffer(off), pa.py_buffer(vals)])
                reasons, details = [], []
                for p, r, occ in zip(x["p"].tolist(), x["r"].tolist(), x["occ"].tolist()):
                    if r < min_resp + 1:
                        reason = "short_response"
                        detail = f"{r - 1} response token(s) (EOA excluded) < min_response_tokens {min_resp}"
                    else:
                        reason = "prompt_too_long"
                        detail = f"prompt of {p} tokens >= seq_len {seq_len} - min_response_tokens {min_resp}"
                    reasons.append(reason)
                    details.append(f"{detail}; {occ} occurrence(s) in the mix")
                    tally.reason_rows[reason] = tally.reason_rows.get(reason, 0) + 1
                    tally.reason_samples[reason] = tally.reason_samples.get(reason, 0) + occ
                w.write(pa.Table.from_arrays(
                    [ids.cast(pa.string()), names.take(pa.array(x["src"])), pa.array([STAGE] * len(x), pa.string()),
                     pa.array(reasons, pa.string()), pa.array(details, pa.string()), pa.nulls(len(x), pa.string())],
                    schema=REMOVAL_SCHEMA))
    return w.record


def run(
    tokenized_dir: str | os.PathLike,
    mix_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    cfg: PackConfig,
    *,
    progress: bool = True, versioned: bool = False, force: bool = False, memory_gb: float | None = None,
    map_parts: MapParts | None = None,
) -> dict:
    """Pack the mixed samples into fixed-length sequences; return the stage manifest.

    Out of core, nothing held per row or per sample (`memory_gb`, default `ResourcesConfig().memory_gb`,
    sizes the batches and partitions; never part of the fingerprint): the tokenized rows are read a batch
    at a time, their tokens and ids written to three flat files in the output folder (removed at the end)
    and each row's keys (a 64-bit hash of its id, lengths, file offsets, source code) with its id to
    partition files by hash; the mix's samples likewise, with their place in mix order. Each partition
    is joined in memory (the hash proposes rows, the ids are compared; a sample's row is the first with
    its id), its samples written with their rows' keys to files by range of places, and its rows' figures
    summed (occurrences, drops, truncation, the shortest kept sample). The samples are then placed one
    range at a time in mix order (at most `open_bins` sequences open): this plan (which sample goes where:
    file offsets, lengths) is made here, and writing a shard (its tokens gathered from the spill files
    into place, its ids read back from the id file, the Arrow file, its record) is a part
    (`write_shard`), one shard's tokens in memory at a time. With `map_parts` (pipeline.parts) the shards
    are handed to it as parts after the plan is made and merged in shard order: the same shards and
    manifest as the single-process path, which writes each shard as its plan fills. The spill files are
    in the output folder: the workers must see it."""
    t0 = time.time()
    out = Path(output_dir)
    tok_file, meta_file, mix_file = (
        Path(tokenized_dir) / TOKENIZED_FILE,
        Path(tokenized_dir) / META_FILE,
        Path(mix_dir) / MIX_FILE,
    )
    for f in (tok_file, meta_file, mix_file):
        if not f.exists():
            raise FileNotFoundError(f"pack: {f} not found")
    params = {"cfg": cfg.model_dump()}
    inputs = {"tokenized": tokenized_dir, "mix": mix_dir}
    fp = io.fingerprint(STAGE, io.code_closure(sys.modules[__name__]), params, inputs)
    out, done = io.open_stage(output_dir, fp, versioned=versioned, force=force)
    if done is not None:
        return done
    for stale in list(out.glob("shard-*.arrow")) + list(out.glob("shard-*.json")):
        stale.unlink()

    meta = io.read_json(meta_file)
    pad, eoa = int(meta["pad_id"]), int(meta["eoa_id"])
    _check_columns(tok_file, ["id", "source", "prompt_ids", "response_ids"])
    _check_columns(mix_file, ["epoch", "order", "id"])
    tmp = out / ".pack-spill"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _pack(tok_file, mix_file, out, tmp, cfg, fp, params, inputs, pad, eoa, progress, memory_gb,
                         map_parts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # before finish_stage renames a versioned folder into place
    return io.finish_stage(out, manifest, {"total_s": round(time.time() - t0, 3)})


def _pack(tok_file: Path, mix_file: Path, out: Path, tmp: Path, cfg: PackConfig, fp, params, inputs, pad: int,
          eoa: int, progress: bool, memory_gb, map_parts: MapParts | None = None) -> dict:
    """The packing itself; returns the manifest (written by `run`)."""
    from tqdm.auto import tqdm

    seq_len, min_resp, open_bins = cfg.seq_len, cfg.min_response_tokens, cfg.open_bins
    n_rows = pq.ParquetFile(tok_file).metadata.num_rows
    n_mix = pq.ParquetFile(mix_file).metadata.num_rows
    parts = budget.join_parts(n_rows + n_mix, memory_gb, _JOIN_ITEM_BYTES)
    # a tokenized row costs its token lists (about seq_len / 2 tokens of 4 bytes, at most) a few times over
    batch = budget.batch_rows(memory_gb, row_bytes=4 * 3 * max(64, seq_len // 2))
    rows_info = _spill_rows(tok_file, tmp, eoa, batch, parts, progress)
    # a batch of the mix costs ~150 bytes a sample (its ids, their hashes, the records): sized at 1 KB a sample
    n_samples = _spill_mix(mix_file, tmp, budget.batch_rows(memory_gb, 1024), parts)
    tally, range_size, gone_size = _join(tmp, parts, n_rows, n_samples, memory_gb, seq_len, min_resp, progress)
    if tally.missing:
        raise ValueError(
            f"pack: {mix_file} names {tally.missing} sample(s) not in {tok_file}, e.g. "
            f"{[x for _, x in tally.first_missing]}: the mix was made from another tokenizer output"
        )
    min_len = seq_len if tally.min_len is None else tally.min_len

    files = rows_info["files"]
    writer = _ShardWriter(out, seq_len, pad, max(1, cfg.shard_tokens // seq_len), files, rows_info["source_names"],
                          map_parts)

    class _Bin:  # an open sequence: its samples so far (their tokens are gathered when the shard is written)
        __slots__ = ("pos", "starts", "lens", "plens", "where", "srcs", "trunc")

        def __init__(self):
            self.pos = 0
            self.starts, self.lens, self.plens, self.where, self.srcs = [], [], [], [], []
            self.trunc = 0

    def emit(b: _Bin, epoch: int) -> None:
        assert b.pos <= seq_len
        writer.add(b.starts, b.lens, b.plens, b.where, b.srcs, epoch, b.trunc)

    def samples():
        """The samples with their rows' keys in mix order, `batch` at a time (a range file at a time)."""
        for k in range(-(-n_samples // range_size)):
            s = _load(tmp / f"samp-{k}", SAMPLE_REC)
            (tmp / f"samp-{k}").unlink(missing_ok=True)
            s = s[np.argsort(s["s"], kind="stable")]
            for a in range(0, len(s), batch):
                yield s[a : a + batch]

    bins: list[_Bin] = []
    free: list[int] = []
    cur_epoch = None
    bar = tqdm(total=n_samples, desc="pack", unit="row", unit_scale=True, disable=not progress, mininterval=1.0)
    for sb in samples():
        P, R = sb["p"].astype(np.int64), sb["r"].astype(np.int64)
        kb = ~((R < min_resp + 1) | (P >= seq_len - min_resp))
        keep = np.minimum(R, seq_len - P)
        # the batch's figures as Python ints (lists per batch: per sample they would cost ~36 bytes each)
        Lb, Pb, Tb = (P + keep).tolist(), P.tolist(), (keep < R).tolist()
        where = np.stack([sb["p_off"], sb["r_off"], sb["i_off"], sb["i_len"].astype(np.int64)], axis=1).tolist()
        for x, (e, kept, src) in enumerate(zip(sb["e"].tolist(), kb.tolist(), sb["src"].tolist())):
            if e != cur_epoch:
                for b in bins:
                    emit(b, cur_epoch)
                bins, free, cur_epoch = [], [], e
            if not kept:
                continue
            need = Lb[x]
            for q, f in enumerate(free):
                if f >= need:
                    b = bins[q]
                    free[q] = f - need
                    break
            else:
                if len(bins) >= open_bins:
                    emit(bins.pop(0), cur_epoch)
                    free.pop(0)
                b = _Bin()
                bins.append(b)
                free.append(seq_len - need)
            b.starts.append(b.pos)
            b.lens.append(need)
            b.plens.append(Pb[x])
            b.where.append(where[x])
            b.srcs.append(src)
            b.trunc += Tb[x]
            b.pos += need
            while bins and free[0] < min_len:
                emit(bins.pop(0), cur_epoch)
                free.pop(0)
        bar.update(len(sb))
    bar.close()
    for b in bins:
        emit(b, cur_epoch)
    writer.finish()

    # accounting
    outputs: dict[str, dict] = {}
    for name, rec in writer.records:
        outputs[name] = rec
        js = Path(name).with_suffix(".json").name
        outputs[js] = io.file_record(out / js)
    outputs[REMOVALS_FILE] = _removals(tmp, Path(files[2]), out / REMOVALS_FILE, rows_info["source_names"], n_rows,
                                       gone_size, seq_len, min_resp, budget.batch_rows(memory_gb, 1024), tally)
    rows_removed = sum(tally.reason_rows.values())

    recs = [r for _, r in writer.records]
    samples_packed = int(sum(r["samples"] for r in recs))
    sequences = int(sum(r["rows"] for r in recs))
    tokens = sequences * seq_len
    non_pad = int(sum(r["non_pad_tokens"] for r in recs))
    assert samples_packed == tally.kept_samples
    assert tally.rows_in == tally.rows_packed + rows_removed
    counts = {
        "rows_in": tally.rows_in,
        "rows_packed": tally.rows_packed,
        "rows_removed": rows_removed,
        "removed_by_reason": dict(sorted(tally.reason_rows.items())),
        "samples_in": int(n_samples),
        "samples_packed": samples_packed,
        "samples_removed_by_reason": dict(sorted(tally.reason_samples.items())),
        "samples_truncated": tally.samples_truncated,
        "tokens_truncated": tally.tokens_truncated,
        "sequences": sequences,
        "shards": len(recs),
        "tokens": tokens,
        "non_pad_tokens": non_pad,
        "answer_tokens": int(sum(r["answer_tokens"] for r in recs)),
        "packing_efficiency": non_pad / tokens if tokens else 0.0,
        "sources": _sum_sources(recs),
    }
    manifest = {
        "stage": STAGE,
        "fingerprint": fp,
        "params": params,
        "inputs": {k: str(v) for k, v in inputs.items()},
        "outputs": outputs,
        "shards": [name for name, _ in writer.records],
        "counts": counts,
        "seq_len": seq_len,
        "pad_id": pad,
    }
    return manifest
