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
OFF_BLOCK = 1024  # rows per int64 base of the spill files' offsets (_Offsets)
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
    """Collects the plan of packed sequences (each sample's row, offset, lengths; no tokens) and hands a
    shard's plan out every `rows_per_shard` sequences: `write_shard` gathers its tokens and ids from the
    spill files and writes it. Without `map_parts` each shard is written as its plan fills (one shard's
    tokens in memory); with it, each plan goes to a small file in the output folder and the shards are
    written at the end as parts (`write_shard_part`), merged in shard order (`finish`)."""

    def __init__(self, out: Path, seq_len: int, pad_id: int, rows_per_shard: int, keys: "_RowKeys",
                 map_parts=None):
        self.out, self.seq_len, self.pad = out, seq_len, pad_id
        self.rows_per_shard = rows_per_shard
        self.keys, self.map_parts = keys, map_parts
        self.records: list[tuple[str, dict]] = []
        self.plans: list[tuple] = []  # with map_parts: one part's arguments per shard
        self.files = (str(keys.prompt_file), str(keys.response_file), str(keys.id_file))
        self.k = 0
        self._reset()

    def _reset(self) -> None:
        self.starts: list[int] = []
        self.lens: list[int] = []
        self.plens: list[int] = []
        self.rows: list[int] = []
        self.per_row: list[int] = []
        self.epochs: list[int] = []
        self.sources: dict[str, int] = {}
        self.answer = 0
        self.truncated = 0

    def add(self, starts, lens, plens, rows, epoch: int, truncated: int) -> None:
        self.starts += starts
        self.lens += lens
        self.plens += plens
        self.rows += rows
        self.per_row.append(len(starts))
        self.epochs.append(epoch)
        names, src = self.keys.source_names, self.keys.src
        for j in rows:
            name = names[int(src[j])]
            self.sources[name] = self.sources.get(name, 0) + 1
        self.answer += sum(lens) - sum(plens)
        self.truncated += truncated
        if len(self.per_row) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.per_row:
            return
        keys = self.keys
        rows = np.asarray(self.rows, dtype=np.int64)
        lens = np.asarray(self.lens, dtype=np.int32)
        plens = np.asarray(self.plens, dtype=np.int32)
        plan = {
            "p_start": keys.p_off[rows], "r_start": keys.r_off[rows], "i_start": keys.i_off[rows],
            "i_len": keys.i_off[rows + 1] - keys.i_off[rows],
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


class _RowKeys:
    """The per-row keys of the tokenized rows, read row group by row group. The token lists go to two
    flat int32 files (prompts, responses) and the ids to a bytes file (the UTF-8 of each id, one after
    the other), from which the packer gathers them in batches; no id string stays in memory.

    Held per row: prompt and response lengths (int32 each), the row's offsets into the three files
    (`_Offsets`: 4 bytes each), a source code (uint16), and until the mix is matched (`drop_index`) a
    64-bit hash of the id, sorted, with its row (int32 below 2**31 rows): 22 bytes a row, 34 while
    matching, whatever the lengths of the texts and ids. A hash only proposes a row: the id itself is
    compared (read back from the file)."""

    def __init__(self, tok_file: Path, spill: Path, eoa: int, batch_rows: int, progress: bool):
        from tqdm.auto import tqdm

        pf = pq.ParquetFile(tok_file, pre_buffer=False)
        n = pf.metadata.num_rows
        self.prompt_file, self.response_file = spill.with_suffix(".prompts"), spill.with_suffix(".responses")
        self.id_file = spill.with_suffix(".ids")
        # filled in place batch by batch (no list of batches concatenated: that held each twice)
        self.P, self.R = np.empty(n, np.int32), np.empty(n, np.int32)
        self.src = np.empty(n, np.uint16)  # widened past 65,536 sources
        self.p_off, self.r_off, self.i_off = _Offsets(n), _Offsets(n), _Offsets(n)
        h = np.empty(n, np.int64)
        self.source_names: list[str] = []
        code: dict[str, int] = {}
        first_bad, n_bad = None, 0
        bar = tqdm(total=n, desc="pack read", unit="row", unit_scale=True, disable=not progress, mininterval=1.0)
        done = 0
        with open(self.prompt_file, "wb") as fp, open(self.response_file, "wb") as fr, open(self.id_file, "wb") as fi:
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
                self.P[done : done + m] = p_len
                self.R[done : done + m] = r_len
                self.p_off.extend(p_len)
                self.r_off.extend(r_len)
                id_col = b.column("id")
                if id_col.null_count:
                    k = int(np.flatnonzero(pc.is_null(id_col).to_numpy(zero_copy_only=False))[0])
                    raise ValueError(f"pack: {tok_file}: row {done + k}: id is null")
                id_vals, id_off = _utf8(id_col)
                fi.write(id_vals)
                self.i_off.extend(np.diff(id_off))
                h[done : done + m] = _hash(id_col)
                sources = b.column("source")
                uniq = pc.unique(sources).to_pylist()
                for s in uniq:
                    if s not in code:
                        code[s] = len(self.source_names)
                        self.source_names.append(s)
                idx = pc.index_in(sources, value_set=pa.array(uniq, sources.type)).to_numpy(zero_copy_only=False)
                if len(self.source_names) > np.iinfo(self.src.dtype).max + 1:
                    self.src = self.src.astype(np.int32)
                self.src[done : done + m] = np.asarray([code[s] for s in uniq], dtype=np.int64)[idx]
                done += b.num_rows
                bar.update(b.num_rows)
        bar.close()
        if first_bad is not None:
            raise ValueError(
                f"pack: {tok_file}: row {first_bad!r} (and {n_bad - 1} more): response_ids "
                f"must end with <|eoa|> (id {eoa})"
            )
        if done != n:
            raise ValueError(f"pack: {tok_file}: {done} rows read, its metadata says {n}")
        self.row_dtype = np.int32 if n < 2**31 else np.int64
        by_hash = np.argsort(h, kind="stable")  # equal hashes: rows in file order
        self.H_row = by_hash.astype(self.row_dtype)
        del by_hash
        h.sort()  # in place: the values of h[by_hash]
        self.H = h

    def drop_index(self) -> None:
        """The hash index (12 bytes a row) is no longer needed: every id of the mix is matched."""
        self.H = self.H_row = None

    def ids(self, rows: np.ndarray) -> pa.Array:
        """The ids of `rows` (in that order), a large_string array read from the id file."""
        start = self.i_off[rows]
        vals, off = _take(self.id_file, start, self.i_off[rows + 1] - start, np.uint8)
        return pa.Array.from_buffers(pa.large_string(), len(rows), [None, pa.py_buffer(off), pa.py_buffer(vals)])

    def find(self, ids: pa.Array) -> np.ndarray:
        """The row of each of `ids` (the first row with that id, as `pc.index_in` finds it), -1 where
        no row has it: candidates by hash, then the ids compared."""
        q = _hash(ids)
        lo = np.searchsorted(self.H, q, side="left")
        hi = np.searchsorted(self.H, q, side="right")
        res = np.full(len(q), -1, np.int64)
        one = np.flatnonzero(hi - lo == 1)
        if len(one):
            rows = self.H_row[lo[one]].astype(np.int64)
            same = pc.equal(self.ids(rows), ids.take(pa.array(one)).cast(pa.large_string()))
            ok = same.to_numpy(zero_copy_only=False)
            res[one[ok]] = rows[ok]
        for x in np.flatnonzero(hi - lo > 1).tolist():  # the same hash for several rows (or equal ids)
            want = ids[x].as_py()
            cand = np.sort(self.H_row[lo[x] : hi[x]].astype(np.int64))
            for j, got in zip(cand.tolist(), self.ids(cand).to_pylist()):
                if got == want:
                    res[x] = j
                    break
        return res

    def close(self) -> None:
        for f in (self.prompt_file, self.response_file, self.id_file):
            if f.exists():
                f.unlink()


class _Offsets:
    """The n+1 offsets of n consecutive ranges (row j's is [off[j], off[j+1])), appended batch by batch
    as lengths: an int64 base per block of OFF_BLOCK rows and a uint32 offset within the block per row
    (4 bytes a row, not 8; a block spanning 2**32 values or more switches to plain int64 offsets).
    `off[rows]` (an integer array) gives the int64 offsets."""

    def __init__(self, n: int):
        self.base = np.zeros(n // OFF_BLOCK + 1, np.int64)
        self.local = np.zeros(n + 1, np.uint32)
        self.full: np.ndarray | None = None
        self.pos = 0  # offsets set: [0, pos]
        self.total = 0

    def extend(self, lengths: np.ndarray) -> None:
        m = len(lengths)
        off = np.empty(m + 1, np.int64)
        off[0] = self.total
        np.cumsum(lengths, out=off[1:])
        off[1:] += self.total
        idx = np.arange(self.pos, self.pos + m + 1, dtype=np.int64)
        if self.full is not None:
            self.full[idx] = off
        else:
            first = idx[idx % OFF_BLOCK == 0]
            self.base[first // OFF_BLOCK] = off[first - self.pos]
            loc = off - self.base[idx // OFF_BLOCK]
            if m and int(loc.max()) >= 2**32:
                self.full = np.zeros(len(self.local), np.int64)
                done = np.arange(self.pos, dtype=np.int64)
                self.full[: self.pos] = self.base[done // OFF_BLOCK] + self.local[: self.pos]
                del done
                self.full[idx] = off
                self.base = self.local = None
            else:
                self.local[idx] = loc
        self.pos += m
        self.total = int(off[-1])

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if self.full is not None:
            return self.full[rows]
        return self.base[rows // OFF_BLOCK] + self.local[rows]


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

    Streams (`memory_gb`, default `ResourcesConfig().memory_gb`, sizes the batches; never part of the
    fingerprint): the tokenized rows are read row group by row group into per-row keys (`_RowKeys`:
    lengths, file offsets, source code, a sorted 64-bit hash of the id; 34 bytes a row, 22 once the mix
    is matched) while their tokens and ids go to three flat files in the output folder (removed at the
    end). The mix is read a batch at a time, its ids matched to rows (hash, then the id compared), each
    row's occurrences counted (int32 a row) and each sample's (row, epoch) spilled to two files in the
    output folder, read back a batch at a time (held in memory, with the order and a sort, only for a mix
    not in (epoch, order)); a row's fate is a bool a row, its sample length is taken per batch.
    The samples are then placed in mix order a batch at a time (at most `open_bins` sequences open):
    this plan (which sample goes where: row, offset, lengths) is made here, and writing a shard (its
    tokens gathered from the spill files into place, its ids read back from the id file, the Arrow file,
    its record) is a part (`write_shard`), one shard's tokens in memory at a time. With
    `map_parts` (pipeline.parts) the shards are handed to it as parts after the plan is made and merged
    in shard order: the same shards and manifest as the single-process path, which writes each shard as
    its plan fills. The spill files are in the output folder: the workers must see it."""
    from tqdm.auto import tqdm

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
    open_bins = cfg.open_bins
    params = {"cfg": cfg.model_dump()}
    inputs = {"tokenized": tokenized_dir, "mix": mix_dir}
    fp = io.fingerprint(STAGE, io.code_hash(sys.modules[__name__]), params, inputs)
    out, done = io.open_stage(output_dir, fp, versioned=versioned, force=force)
    if done is not None:
        return done
    for stale in list(out.glob("shard-*.arrow")) + list(out.glob("shard-*.json")):
        stale.unlink()

    meta = io.read_json(meta_file)
    pad, eoa = int(meta["pad_id"]), int(meta["eoa_id"])
    seq_len, min_resp = cfg.seq_len, cfg.min_response_tokens

    _check_columns(tok_file, ["id", "source", "prompt_ids", "response_ids"])
    _check_columns(mix_file, ["epoch", "order", "id"])
    # a tokenized row costs its token lists (about seq_len / 2 tokens of 4 bytes, at most) a few times over
    read_rows = budget.batch_rows(memory_gb, row_bytes=4 * 3 * max(64, seq_len // 2))
    keys = _RowKeys(tok_file, out / ".pack-spill", eoa, read_rows, progress)
    try:
        manifest = _pack(keys, tok_file, mix_file, out, cfg, fp, params, inputs, pad, seq_len, min_resp, open_bins,
                         read_rows, progress, tqdm, memory_gb, map_parts)
    finally:
        keys.close()  # before finish_stage renames a versioned folder into place
        for f in (out / ".pack-mix.rows", out / ".pack-mix.epochs"):
            f.unlink(missing_ok=True)
    return io.finish_stage(out, manifest, {"total_s": round(time.time() - t0, 3)})


def _pack(keys: _RowKeys, tok_file, mix_file, out: Path, cfg: PackConfig, fp, params, inputs, pad: int,
          seq_len: int, min_resp: int, open_bins: int, batch: int, progress: bool, tqdm, memory_gb,
          map_parts: MapParts | None = None) -> dict:
    """The packing itself; returns the manifest (written by `run`)."""
    P, R = keys.P, keys.R
    n_rows = len(P)

    # rows: their fate (a bool a row); the lengths are taken per batch from P and R (`lengths`)
    dropped = (R < min_resp + 1) | (P >= seq_len - min_resp)  # short response (EOA excluded) or prompt too long

    def lengths(rows):
        """(kept sample length, truncated) of `rows`: the response keeps seq_len - prompt tokens at most."""
        p, r = P[rows], R[rows]
        keep = np.minimum(r, seq_len - p)
        return p + keep, keep < r

    # samples, in mix order
    # the mix read a batch at a time: each batch's ids matched to rows (no id of the mix is kept). A mix
    # written by the mix stage is already in (epoch, order): then (row, epoch) of each sample are spilled
    # (int32 each below 2**31 rows); otherwise kept with the order, and the samples sorted by (epoch, order).
    # Matching a batch costs ~150 bytes a sample (its ids as Python strings, their hashes, the rows' ids
    # read back): the batch is sized at 1 KB a sample (at 4 GB ~235k samples; was 64 B: 1M, ~140 MB)
    mix_pf = pq.ParquetFile(mix_file, pre_buffer=False)
    mb_rows = budget.batch_rows(memory_gb, 1024)
    in_order, prev = True, None
    for mb in mix_pf.iter_batches(batch_size=mb_rows, columns=["epoch", "order"], use_threads=False):
        e = mb.column("epoch").to_numpy().astype(np.int64)
        o = mb.column("order").to_numpy().astype(np.int64)
        if prev is not None:
            e, o = np.concatenate([[prev[0]], e]), np.concatenate([[prev[1]], o])
        de, do = np.diff(e), np.diff(o)
        if ((de < 0) | ((de == 0) & (do <= 0))).any():
            in_order = False
            break
        if len(e):
            prev = (e[-1], o[-1])
    # in mix order the samples' (row, epoch) go to two spill files in the output folder, read back a
    # batch at a time to place them (nothing held per sample); a mix out of order is sorted in memory
    ep_l, ord_l, j_l, missing = [], [], [], []
    occ = np.zeros(n_rows, np.int32)  # occurrences of each row in the mix
    n_samples = 0
    spill_j, spill_e = out / ".pack-mix.rows", out / ".pack-mix.epochs"
    with open(spill_j, "wb") as fj, open(spill_e, "wb") as fe:
        for mb in mix_pf.iter_batches(batch_size=mb_rows, columns=["epoch", "order", "id"], use_threads=False):
            j_of = keys.find(mb.column("id"))
            if (j_of < 0).any():
                miss = pa.array(j_of < 0)
                missing.append(pa.Table.from_batches([mb]).filter(miss))
                j_of[j_of < 0] = 0
            u, c = np.unique(j_of, return_counts=True)
            occ[u] += c.astype(np.int32)
            n_samples += len(j_of)
            if in_order:
                j_of.astype(keys.row_dtype).tofile(fj)
                mb.column("epoch").to_numpy().astype(np.int32).tofile(fe)
            else:
                ep_l.append(mb.column("epoch").to_numpy().astype(np.int32))
                ord_l.append(mb.column("order").to_numpy().astype(np.int64))
                j_l.append(j_of.astype(keys.row_dtype))
    keys.drop_index()
    if missing:
        miss = pa.concat_tables(missing).sort_by([("epoch", "ascending"), ("order", "ascending")])["id"]
        raise ValueError(
            f"pack: {mix_file} names {len(miss)} sample(s) not in {tok_file}, e.g. {miss.slice(0, 3).to_pylist()}: "
            f"the mix was made from another tokenizer output"
        )
    if not in_order:
        cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
        EP, J = cat(ep_l, np.int32), cat(j_l, keys.row_dtype)
        del ep_l, j_l
        perm = np.lexsort((cat(ord_l, np.int64), EP))  # (epoch, order): the mix order
        J, EP = J[perm], EP[perm]
        del perm, ord_l

    def samples():
        """(rows, epochs) of the samples in mix order, `batch` at a time."""
        if not in_order:
            for i0 in range(0, n_samples, batch):
                yield J[i0 : i0 + batch].astype(np.int64), EP[i0 : i0 + batch]
            return
        with open(spill_j, "rb") as fj, open(spill_e, "rb") as fe:
            for i0 in range(0, n_samples, batch):
                k = min(batch, n_samples - i0)
                yield (np.fromfile(fj, keys.row_dtype, count=k).astype(np.int64),
                       np.fromfile(fe, np.int32, count=k))

    min_len = seq_len
    for r0 in range(0, n_rows, batch):  # the shortest kept sample
        rows = np.flatnonzero((occ[r0 : r0 + batch] > 0) & ~dropped[r0 : r0 + batch]) + r0
        if len(rows):
            min_len = min(min_len, int(lengths(rows)[0].min()))

    writer = _ShardWriter(out, seq_len, pad, max(1, cfg.shard_tokens // seq_len), keys, map_parts)

    class _Bin:  # an open sequence: its samples so far (their tokens are gathered when the shard is written)
        __slots__ = ("pos", "starts", "lens", "plens", "rows", "trunc")

        def __init__(self):
            self.pos = 0
            self.starts, self.lens, self.plens, self.rows = [], [], [], []
            self.trunc = 0

    def emit(b: _Bin, epoch: int) -> None:
        assert b.pos <= seq_len
        writer.add(b.starts, b.lens, b.plens, b.rows, epoch, b.trunc)

    bins: list[_Bin] = []
    free: list[int] = []
    cur_epoch = None
    bar = tqdm(total=n_samples, desc="pack", unit="row", unit_scale=True, disable=not progress, mininterval=1.0)
    for Jb, EPb in samples():
        kb = ~dropped[Jb]
        # the batch's lengths as Python ints (lists per batch: per row they would cost ~36 bytes each)
        Lb, Tb = lengths(Jb)
        Lb, Pb, Tb = Lb.tolist(), P[Jb].tolist(), Tb.tolist()
        for x, (j, e, kept) in enumerate(zip(Jb.tolist(), EPb.tolist(), kb.tolist())):
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
            b.rows.append(j)
            b.trunc += Tb[x]
            b.pos += need
            while bins and free[0] < min_len:
                emit(bins.pop(0), cur_epoch)
                free.pop(0)
        bar.update(len(Jb))
    bar.close()
    for b in bins:
        emit(b, cur_epoch)
    spill_j.unlink(missing_ok=True)
    spill_e.unlink(missing_ok=True)
    J = EP = None
    writer.finish()

    # accounting
    in_mix = occ > 0
    removals = []
    reason_rows: dict[str, int] = {}
    reason_samples: dict[str, int] = {}
    gone = np.flatnonzero(in_mix & dropped)
    gone_ids = keys.ids(gone).to_pylist() if len(gone) else []
    for j, rid in zip(gone.tolist(), gone_ids):
        if R[j] < min_resp + 1:
            reason = "short_response"
            detail = f"{int(R[j]) - 1} response token(s) (EOA excluded) < min_response_tokens {min_resp}"
        else:
            reason = "prompt_too_long"
            detail = f"prompt of {int(P[j])} tokens >= seq_len {seq_len} - min_response_tokens {min_resp}"
        detail += f"; {int(occ[j])} occurrence(s) in the mix"
        removals.append(
            {
                "id": rid,
                "source": keys.source_names[int(keys.src[j])],
                "stage": STAGE,
                "reason": reason,
                "detail": detail,
                "duplicate_of": None,
            }
        )
        reason_rows[reason] = reason_rows.get(reason, 0) + 1
        reason_samples[reason] = reason_samples.get(reason, 0) + int(occ[j])

    outputs: dict[str, dict] = {}
    for name, rec in writer.records:
        outputs[name] = rec
        js = Path(name).with_suffix(".json").name
        outputs[js] = io.file_record(out / js)
    outputs[REMOVALS_FILE] = io.write_parquet(
        pa.Table.from_pylist(removals, schema=REMOVAL_SCHEMA), out / REMOVALS_FILE
    )

    recs = [r for _, r in writer.records]
    samples_packed = int(sum(r["samples"] for r in recs))
    rows_in = int(in_mix.sum())
    rows_packed = int((in_mix & ~dropped).sum())
    sequences = int(sum(r["rows"] for r in recs))
    tokens = sequences * seq_len
    non_pad = int(sum(r["non_pad_tokens"] for r in recs))
    kept_samples = samples_truncated = tokens_truncated = 0
    for r0 in range(0, n_rows, batch):  # per batch of rows: occurrences of each kept row
        kept_occ = np.where(dropped[r0 : r0 + batch], 0, occ[r0 : r0 + batch]).astype(np.int64)
        rows = np.arange(r0, r0 + len(kept_occ), dtype=np.int64)
        L_b, trunc = lengths(rows)
        kept_samples += int(kept_occ.sum())
        samples_truncated += int(kept_occ[trunc].sum())
        tokens_truncated += int((kept_occ * (R[rows] - (L_b - P[rows])).astype(np.int64)).sum())
    assert samples_packed == kept_samples
    assert rows_in == rows_packed + len(removals)
    counts = {
        "rows_in": rows_in,
        "rows_packed": rows_packed,
        "rows_removed": len(removals),
        "removed_by_reason": dict(sorted(reason_rows.items())),
        "samples_in": int(n_samples),
        "samples_packed": samples_packed,
        "samples_removed_by_reason": dict(sorted(reason_samples.items())),
        "samples_truncated": samples_truncated,
        "tokens_truncated": tokens_truncated,
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
