"""Stage `tokenizer`: train (or load) a byte-level BPE tokenizer and tokenize every row.

Input: a dedup/stratify stage folder (`rows.parquet`, STRATIFIED_SCHEMA), or a standalone .jsonl /
.parquet file in the normalized schema (id, instruction, response, condition, source, domain).
Missing `stratum` -> the row's source; missing `rule` -> "default".

Tokenizer
- kind "train": a byte-level BPE (`tokenizers` library: ByteLevel pre-tokenizer and decoder, the 256
  byte alphabet always in the vocabulary, no normalizer, so decode(encode(text)) == text) trained on a
  seeded sample of `cfg.sample_rows` rows (their instruction and response texts, fed in id order).
  With `cfg.split_digits` (the default; false keeps BPE digit runs) the pre-tokenizer first isolates every
  digit (`Digits(individual_digits=True)`, then ByteLevel), as the reference tokenizer does (one
  pre-token per number character): BPE never merges digit runs, so "1234" is 4 tokens. The
  pre-tokenizer is saved in tokenizer.json, so every later load (`load_tokenizer`: contamination,
  evaluation) encodes numbers the same way; the meta records `split_digits` and load_tokenizer
  refuses a tokenizer.json that does not split when its meta says it does.
  The special tokens get fixed ids at the start of the vocabulary:
      0 <|pad|>   1 <|boq|>   2 <|eoq|>   3 <|eoa|>   4.. one <|{tag}|> per condition tag, in order.
  A row's condition is a list of tags ("cot", "synth,cot", "synth,noisy,cot"; pipeline.schema
  .parse_condition): as in the reference tokenizer, the prompt holds one token per tag, in the order the
  row gives them. A one-tag condition gives the same tokens as before tag lists existed.
  Training is deterministic: the trainer's merge choice is a total order (count, then pair), and we
  checked that repeated trainings (multi-threaded, separate processes, even with the input reversed)
  give a byte-identical tokenizer.json; the sample is taken from the id-sorted rows, so it does not
  depend on the input file's row order either. The tests re-check this on real data.
- kind "pretrained": `cfg.name` is a local tokenizer.json (or a folder holding one), else a Hugging Face
  Hub name (`Tokenizer.from_pretrained`, network; HF_HOME defaults to <repo>/.cache/hf). The special
  tokens above are added as special tokens (ids wherever the tokenizer puts them; existing ones reused).
  With `cfg.split_digits` its pre-tokenizer is wrapped with the same digit split first (a no-op for
  a tokenizer that already splits digits), and the saved tokenizer.json carries it.

Text is always encoded as text: a literal "<|eoq|>" inside a row is split into ordinary byte tokens
(`encode_special_tokens = True`); special ids are only ever inserted by id. No post-processor tokens
(BOS etc. of a pretrained tokenizer) are added.

Outputs (in `output_dir`)
- `tokenized.parquet`: one row per input row that passed the checks, in input order:
  id, source, stratum, rule, domain, condition (string),
  prompt_ids   list<int32>  [BOQ][tag]... instruction [EOQ]   (one token per condition tag)
  response_ids list<int32>  response [EOA]
  prompt_tokens, response_tokens int32 (the two list lengths, specials included).
- `tokenizer.json` (the `tokenizers` file), `tokenizer_meta.json` (kind, vocab size, special ids,
  condition ids, sample size and the sha256 of the training sample's ids).
- `removals.parquet` (REMOVAL_SCHEMA): rows the loader rejected (reason from pipeline.rows), duplicate
  ids ("duplicate_id"), rows whose condition names a tag without a token ("unknown_condition") and
  rows whose condition is not a tag list (an empty or repeated tag: "bad_condition").
Counts: rows_in = rows_tokenized + rows_removed; tokens (and rows) per stratum.

Later stages use `load_tokenizer(path)` and `special_ids(meta)`; `special_ids(meta).condition_ids("synth,cot")`
gives a prompt's condition token ids.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import sys
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import budget, io
from pipeline.config import TokenizerConfig
from pipeline.rows import RowReader, _IdSet, remove_spills
from pipeline.schema import CONDITION_SEP, NORMALIZED_FIELDS, REMOVAL_SCHEMA, parse_condition

STAGE = "tokenizer"
TOKENIZED_FILE = "tokenized.parquet"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
REMOVALS_FILE = "removals.parquet"

PAD, BOQ, EOQ, EOA = "<|pad|>", "<|boq|>", "<|eoq|>", "<|eoa|>"
BASE_SPECIALS: tuple[str, ...] = (PAD, BOQ, EOQ, EOA)
BATCH_ROWS = 8192  # rows per encode_batch call and per Parquet row group

TOKENIZED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("stratum", pa.string(), nullable=False),
        pa.field("rule", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("condition", pa.string(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        pa.field("response_tokens", pa.int32(), nullable=False),
    ]
)
_TEXT_COLS = ("id", "source", "stratum", "rule", "domain", "condition")


# ----------------------------------------------------------------------------------------------
# helper API for later stages
# ----------------------------------------------------------------------------------------------
def condition_token(condition: str) -> str:
    return f"<|{condition}|>"


def special_tokens(conditions: list[str]) -> list[str]:
    """The special tokens in id order (trained tokenizers): pad, boq, eoq, eoa, then the conditions."""
    if not conditions:
        raise ValueError("tokenizer: `conditions` must name at least one condition (e.g. ['direct', 'cot'])")
    bad = [c for c in conditions
           if not isinstance(c, str) or not c or "|" in c or CONDITION_SEP in c or c != c.strip()]
    if bad:
        raise ValueError(f"tokenizer: invalid condition name(s) {bad!r} "
                         f"(non-empty, no '|' or '{CONDITION_SEP}', no spaces at the ends)")
    dup = sorted({c for c in conditions if conditions.count(c) > 1})
    if dup:
        raise ValueError(f"tokenizer: conditions repeated: {dup}")
    toks = [condition_token(c) for c in conditions]
    clash = [t for t in toks if t in BASE_SPECIALS]
    if clash:
        raise ValueError(f"tokenizer: condition token(s) {clash} clash with the reserved tokens {list(BASE_SPECIALS)}")
    return list(BASE_SPECIALS) + toks


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    boq: int
    eoq: int
    eoa: int
    conditions: dict[str, int] = field(default_factory=dict)

    def condition(self, name: str) -> int:
        """The token id of one condition tag."""
        try:
            return self.conditions[name]
        except KeyError:
            raise KeyError(f"no condition token for {name!r}; known conditions: {sorted(self.conditions)}") from None

    def condition_ids(self, condition: str) -> list[int]:
        """The condition token ids of a prompt, one per tag in the given order: "synth,cot" ->
        [id(<|synth|>), id(<|cot|>)]; "cot" -> [id(<|cot|>)]. ValueError for an empty or repeated tag,
        KeyError naming every tag this tokenizer has no token for."""
        tags = parse_condition(condition)
        unknown = [t for t in tags if t not in self.conditions]
        if unknown:
            raise KeyError(f"condition {condition!r}: no condition token for tag(s) {unknown}; "
                           f"known conditions: {sorted(self.conditions)}")
        return [self.conditions[t] for t in tags]

    def all_ids(self) -> set[int]:
        return {self.pad, self.boq, self.eoq, self.eoa, *self.conditions.values()}


Specials = SpecialIds  # the short name


def special_ids(meta: dict) -> SpecialIds:
    """The special token ids recorded in a `tokenizer_meta.json`."""
    try:
        return SpecialIds(
            pad=int(meta["pad_id"]),
            boq=int(meta["boq_id"]),
            eoq=int(meta["eoq_id"]),
            eoa=int(meta["eoa_id"]),
            conditions={k: int(v) for k, v in meta["condition_ids"].items()},
        )
    except KeyError as e:
        raise ValueError(f"tokenizer meta is missing field {e.args[0]!r}; found {sorted(meta)}") from None


def load_tokenizer(path: str | os.PathLike):
    """Load (tokenizers.Tokenizer, meta) from a tokenizer stage folder or its tokenizer.json.

    The meta's special ids are checked against the tokenizer. The tokenizer comes back with
    `encode_special_tokens = True` (text is encoded as text; insert special ids by id)."""
    from tokenizers import Tokenizer

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    tok_file = p / TOKENIZER_FILE if p.is_dir() else p
    meta_file = folder / META_FILE
    for f in (tok_file, meta_file):
        if not f.exists():
            raise FileNotFoundError(f"load_tokenizer: {f} not found (expected a tokenizer stage folder)")
    tok = Tokenizer.from_file(str(tok_file))
    meta = io.read_json(meta_file)
    ids = special_ids(meta)
    if meta.get("split_digits") and not splits_digits(tok):
        raise ValueError(
            f"load_tokenizer: {meta_file} says split_digits but {tok_file}'s pre-tokenizer keeps digit runs together"
        )
    for name, tid in meta.get("special_tokens", {}).items():
        got = tok.token_to_id(name)
        if got != tid:
            raise ValueError(f"load_tokenizer: {tok_file}: token {name!r} has id {got}, meta says {tid}")
    if tok.token_to_id(PAD) != ids.pad:
        raise ValueError(f"load_tokenizer: {tok_file}: pad id mismatch with {meta_file}")
    tok.encode_special_tokens = True
    return tok, meta


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------
def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _removal(row_id: str, source: str, reason: str, detail: str | None) -> dict:
    return {"id": row_id, "source": source, "stage": STAGE, "reason": reason, "detail": detail, "duplicate_of": None}


class _Prepared:
    """The rows of the input as the stage takes them, a batch at a time: loaded by `RowReader` (its
    rejections), stratum/rule filled, duplicate ids and unknown / malformed conditions removed. Each
    pass over the input makes a new `_Prepared` (the same batches every time).

    After a pass: `removals` (the loader's rejections, then the duplicate ids, then the condition
    removals, each in row order: as the whole-table version listed them), `rows_in`, `rows` (kept),
    and with `keep_ids` the kept rows' ids (`_IdRuns`: past ID_RUN_BYTES in sorted runs on disk)."""

    def __init__(self, input_path, conditions: list[str], memory_gb: float | None, keep_ids: bool = False,
                 spill_dir: Path | None = None, dup_rows: np.ndarray | None = None):
        self.input_path, self.memory_gb, self.spill_dir = input_path, memory_gb, spill_dir
        self.reader = self._reader()
        self.conditions, self.known = list(conditions), set(conditions)
        self.keep_ids = keep_ids
        self.loaded = 0  # rows the loader kept so far (the row numbers of the duplicate details)
        self.rows = 0
        self.ids = _IdRuns(spill_dir) if keep_ids else None  # kept rows' ids
        # the duplicate ids: found by an id set (16 bytes an id) in the first pass; a later pass is given
        # their rows (`dup_rows`, sorted: the first pass's `dup_rows()`) and holds nothing per row
        # (a JSONL reader rejects a repeated id itself, with its own id set: a second one here would find
        # nothing and double the memory of the check)
        self._dup_rows = dup_rows
        self._seen = (_IdSet(budget.id_set_bytes(memory_gb), spill_dir)  # past its budget: spilled to spill_dir
                      if dup_rows is None and self.reader.kind != "jsonl" else None)
        self._dups: list[tuple[int, str, str]] = []  # (row, id, source) of each duplicate
        self._cond_removals: list[dict] = []
        self._cond_memo: dict[str, tuple[str | None, str | None, str | None]] = {}
        self.removals: list[dict] = []
        self.rows_in = 0

    def close(self) -> None:
        """Drop the pass's id sets (their spilled files removed)."""
        if self._seen is not None:
            self._seen.close()
            self._seen = None
        self.reader.close()

    def dup_rows(self) -> np.ndarray:
        """After a pass: the rows (numbered as the duplicate details) of the duplicate ids, sorted."""
        return np.asarray([d[0] for d in self._dups], np.int64)

    def _reader(self) -> RowReader:
        return RowReader(self.input_path, NORMALIZED_FIELDS, stage=STAGE,
                         block_bytes=budget.block_bytes(self.memory_gb),
                         batch_rows=budget.batch_rows(self.memory_gb, 4096),
                         id_bytes=budget.id_set_bytes(self.memory_gb), spill_dir=self.spill_dir)

    def _first_rows(self, dup_ids: list[str]) -> list[int]:
        """The row (numbered as the duplicate details) where each of `dup_ids` first appears: a second
        read of the input, made only when it has duplicate ids (no id is kept per row in the first)."""
        want = pa.array(sorted(set(dup_ids)), pa.string())
        first: dict[str, int] = {}
        start = 0
        reader = self._reader()
        for t in reader:
            t = reader.conform(t)
            id_col = pc.cast(t["id"], pa.string())
            hit = np.flatnonzero(pc.is_in(id_col, value_set=want).to_numpy(zero_copy_only=False))
            if len(hit):
                for i, rid in zip(hit.tolist(), id_col.take(pa.array(hit)).to_pylist()):
                    first.setdefault(rid, start + i)
            start += t.num_rows
        return [first[d] for d in dup_ids]

    def _condition(self, cond: str) -> tuple[str | None, str | None, str | None]:
        """(stored condition, None, None) or (None, reason, detail)."""
        r = self._cond_memo.get(cond)
        if r is None:
            try:
                tags = parse_condition(cond)
            except ValueError as e:
                r = (None, "bad_condition", str(e))
            else:
                unknown = [c for c in tags if c not in self.known]
                if unknown:
                    r = (None, "unknown_condition",
                         f"condition {cond!r}: tag(s) {unknown} not in {self.conditions}")
                else:
                    r = (CONDITION_SEP.join(tags), None, None)  # "synth, cot" -> "synth,cot"
            self._cond_memo[cond] = r
        return r

    def __iter__(self):
        reader = self.reader
        for t in reader:
            t = reader.conform(t)
            for c in NORMALIZED_FIELDS:
                t = t.set_column(t.column_names.index(c), c, pc.cast(t[c], pa.string()))
            n = t.num_rows
            for col, default in (("stratum", t["source"]), ("rule", pa.array(["default"] * n, pa.string()))):
                if col in t.column_names:
                    filled = pc.cast(t[col], pa.string())
                    blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(filled)), 0), True)
                    filled = pc.if_else(blank, default, filled)
                    t = t.set_column(t.column_names.index(col), col, filled)
                else:
                    t = t.append_column(col, default)
            t = t.select(list(_TEXT_COLS) + ["instruction", "response"])
            id_col = t["id"].combine_chunks()
            if self._dup_rows is None:
                dup = self._seen.add_new(id_col) if self._seen is not None else np.zeros(n, bool)
            else:
                dup = np.zeros(n, bool)
                lo, hi = np.searchsorted(self._dup_rows, [self.loaded, self.loaded + n])
                dup[self._dup_rows[lo:hi] - self.loaded] = True
            keep = ~dup
            ids = sources = None
            if dup.any():
                ids, sources = id_col.to_pylist(), t["source"].to_pylist()
                for i in np.flatnonzero(dup).tolist():
                    self._dups.append((self.loaded + i, ids[i], sources[i]))
            conds = t["condition"].to_pylist()
            stored = list(conds)
            for i, cond in enumerate(conds):
                if not keep[i]:
                    continue
                new, reason, detail = self._condition(cond)
                if new is None:
                    keep[i] = False
                    if ids is None:
                        ids, sources = id_col.to_pylist(), t["source"].to_pylist()
                    self._cond_removals.append(_removal(ids[i], sources[i], reason, detail))
                else:
                    stored[i] = new
            if stored != conds:
                t = t.set_column(t.column_names.index("condition"), "condition", pa.array(stored, pa.string()))
            if not keep.all():
                t = t.filter(pa.array(keep))
            self.loaded += n
            self.rows += t.num_rows
            if self.keep_ids:
                self.ids.add(t["id"].combine_chunks())
            if t.num_rows:
                yield t
        self.close()  # (the id set: not kept past the pass)
        self.removals = [dict(r, stage=STAGE) for r in reader.rejects]
        if self._dups and self._dup_rows is None:  # (a later pass: only the rows matter)
            first = self._first_rows([d[1] for d in self._dups])
            for (i, rid, src), f in zip(self._dups, first):
                r = _removal(rid, src, "duplicate_id", f"row {i}: id already used by row {f}")
                r["duplicate_of"] = rid
                self.removals.append(r)
        self.removals += self._cond_removals
        self.rows_in = self.loaded + len(reader.rejects)



ID_RUN_BYTES = 8 << 20  # kept ids held before a sorted run of them is spilled (the training sample's ids)
_MERGE_ROWS = 1024  # rows of each spilled run read at a time by the merge (~100 KB of Python objects a run: one run
# per ID_RUN_BYTES of ids, so at 8192 rows the merge held ~3 bytes an id)


class _IdRuns:
    """The kept rows' ids (for the training sample), in row order. Held in memory up to `run_bytes`
    of them; past that (with a `spill_dir`) each such run is sorted and spilled, with its rows, to an
    Arrow IPC file in `spill_dir`, and `sample` merges the runs (ids are unique: the duplicates were
    removed): so no id is held per row, whatever the input's size. Same sample either way."""

    def __init__(self, spill_dir: Path | None, run_bytes: int | None = None):
        self.dir = spill_dir
        self.run_bytes = ID_RUN_BYTES if run_bytes is None else run_bytes
        self.buf: list[pa.Array] = []
        self.buf_bytes = self.n = self.buf_start = 0
        self.files: list[Path] = []

    def add(self, ids: pa.Array) -> None:
        ids = ids.cast(pa.large_string())  # past 2 GB of ids as well
        self.buf.append(ids)
        self.buf_bytes += ids.nbytes
        self.n += len(ids)
        if self.dir is not None and self.buf_bytes >= self.run_bytes:
            self._spill()

    def _buffer(self) -> pa.Array:
        return (pa.chunked_array(self.buf, pa.large_string()).combine_chunks() if self.buf
                else pa.array([], pa.large_string()))

    def _spill(self) -> None:
        ids = self._buffer()
        self.buf, self.buf_bytes = [], 0
        order = pc.sort_indices(ids)
        t = pa.table({"id": ids.take(order), "row": pc.add(order.cast(pa.int64()), self.buf_start)})
        del ids, order
        path = Path(self.dir) / f".tokenizer-ids-{len(self.files):05d}.arrow"
        self.files.append(path)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
            w.write_table(t, max_chunksize=_MERGE_ROWS)
        self.buf_start = self.n

    @staticmethod
    def _run(path: Path):
        """(id, row) of a spilled run, in id order, read a batch at a time (not memory-mapped)."""
        with pa.OSFile(str(path), "rb") as f:
            r = pa.ipc.open_file(f)
            for i in range(r.num_record_batches):
                b = r.get_batch(i)
                yield from zip(b.column(0).to_pylist(), b.column(1).to_pylist())

    def sample(self, sample_rows: int, seed: int) -> tuple[np.ndarray, list[str]]:
        """`_sample_indices` of the kept ids (rows in id order) and those rows' ids."""
        if not self.files:
            ids = self._buffer()
            self.buf = []
            idx = _sample_indices(ids, sample_rows, seed)
            return idx, ids.take(pa.array(idx)).to_pylist()
        if self.buf:
            self._spill()
        merged = heapq.merge(*(self._run(f) for f in self.files))  # Python str order = UTF-8 byte order
        rows: list[int] = []
        got: list[str] = []
        if sample_rows >= self.n:
            for rid, row in merged:
                got.append(rid)
                rows.append(row)
        else:
            rng = np.random.default_rng([seed, 0x70C])
            want = np.sort(rng.choice(self.n, size=sample_rows, replace=False)).tolist()
            k = 0
            for rank, (rid, row) in enumerate(merged):
                if rank == want[k]:
                    got.append(rid)
                    rows.append(row)
                    k += 1
                    if k == len(want):
                        break
        return np.asarray(rows, np.int64), got

    def close(self) -> None:
        self.buf = []
        for f in self.files:
            f.unlink(missing_ok=True)
        self.files = []


def _sample_indices(ids: pa.Array | list[str], sample_rows: int, seed: int) -> np.ndarray:
    """Seeded sample of row indices, chosen among the id-sorted rows (independent of input order);
    returned in id order. (Arrow sorts strings by their UTF-8 bytes: the code point order.)"""
    ids = ids if isinstance(ids, pa.Array) else pa.array(ids, pa.string())
    order = pc.sort_indices(ids).to_numpy().astype(np.int64)
    if sample_rows >= len(ids):
        return order
    rng = np.random.default_rng([seed, 0x70C])
    pick = np.sort(rng.choice(len(ids), size=sample_rows, replace=False))
    return order[pick]


def _digit_split_pre_tokenizer(inner=None):
    """Digits(individual) first, then `inner` (default: ByteLevel without prefix space, GPT-2 regex)."""
    from tokenizers import pre_tokenizers

    if inner is None:
        inner = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), inner])


def splits_digits(tok) -> bool:
    """True when the tokenizer's pre-tokenizer puts every digit of a run in its own pre-token."""
    pre = tok.pre_tokenizer
    if pre is None:
        return False
    digits = [p for p, _ in pre.pre_tokenize_str("x 2024 7")]
    return sum(any(c.isdigit() for c in p) for p in digits) == 5 and all(
        sum(c.isdigit() for c in p) <= 1 for p in digits
    )


def _check_vocab(cfg: TokenizerConfig, specials: list[str]) -> None:
    if cfg.kind == "train" and cfg.vocab_size < 256 + len(specials):
        raise ValueError(
            f"tokenizer.vocab_size {cfg.vocab_size} is too small: the byte alphabet (256) and "
            f"{len(specials)} special tokens need at least {256 + len(specials)}"
        )


def _train(texts: Iterable[str], n_texts: int, cfg: TokenizerConfig, specials: list[str], progress: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_vocab(cfg, specials)
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = _digit_split_pre_tokenizer(byte_level) if cfg.split_digits else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=n_texts)
    for i, s in enumerate(specials):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"tokenizer training put {s!r} at id {tok.token_to_id(s)}, expected {i}")
    return tok


def _load_pretrained(name: str, specials: list[str], split_digits: bool):
    from tokenizers import AddedToken, Tokenizer

    p = Path(name)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if p.exists():
        tok = Tokenizer.from_file(str(p))
    else:
        os.environ.setdefault("HF_HOME", str(_repo_root() / ".cache" / "hf"))
        try:
            tok = Tokenizer.from_pretrained(name)
        except Exception as e:  # network / unknown name: say what was tried
            raise RuntimeError(
                f"tokenizer: {name!r} is not a local file and could not be loaded from the Hub: {e}"
            ) from e
    if split_digits and not splits_digits(tok):
        from tokenizers import pre_tokenizers

        inner = tok.pre_tokenizer
        tok.pre_tokenizer = (
            _digit_split_pre_tokenizer(inner) if inner is not None else pre_tokenizers.Digits(individual_digits=True)
        )
    tok.no_truncation()
    tok.no_padding()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def _local_pretrained_file(cfg: TokenizerConfig) -> Path | None:
    if cfg.kind != "pretrained" or not cfg.name:
        return None
    p = Path(cfg.name)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    return p if p.exists() else None


def _encode(tok, texts: list[str]) -> list[list[int]]:
    enc = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    return [e.ids for e in enc(texts, add_special_tokens=False)]


def _list_array(seqs: list[list[int]]) -> pa.Array:
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int32, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(chain.from_iterable(seqs), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)), lengths


def _blocks(batches, rows: int):
    """The rows of `batches` again in tables of exactly `rows` rows (the last one shorter), each column
    one contiguous chunk."""
    buf: list[pa.Table] = []
    have = 0
    for t in batches:
        buf.append(t)
        have += t.num_rows
        while have >= rows:
            whole = pa.concat_tables(buf)
            yield whole.slice(0, rows).combine_chunks()
            rest = whole.slice(rows)
            buf, have = ([rest] if rest.num_rows else []), rest.num_rows
    if have:
        yield pa.concat_tables(buf).combine_chunks()


def _gather(batches, rows: np.ndarray) -> pa.Table:
    """instruction/response of the kept rows numbered `rows` (in that order), read batch by batch."""
    want = np.sort(rows)
    parts, start = [], 0
    for t in batches:
        lo, hi = np.searchsorted(want, [start, start + t.num_rows])
        if hi > lo:
            parts.append(t.select(["instruction", "response"]).take(pa.array(want[lo:hi] - start)))
        start += t.num_rows
    got = pa.concat_tables(parts) if parts else pa.table({"instruction": pa.array([], pa.string()),
                                                           "response": pa.array([], pa.string())})
    return got.take(pa.array(np.searchsorted(want, rows)))


def run(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    cfg: TokenizerConfig,
    *,
    conditions: list[str],
    seed: int,
    progress: bool = True, versioned: bool = False, force: bool = False, memory_gb: float | None = None,
) -> dict:
    """Train or load the tokenizer, tokenize every row; return the stage manifest.

    Streams (`memory_gb`, default `ResourcesConfig().memory_gb`, sizes the read batches; never part of
    the fingerprint): a first pass over the input checks the rows (an id set of 16 bytes an id, dropped
    after it; a duplicate's first row is found by another read only when there are duplicates) and
    spills their ids in sorted runs to the output folder (`_IdRuns`, merged for the training sample);
    with kind "train" a second pass gathers the sample's texts (at most `cfg.sample_rows` rows,
    whatever the input's size); the last pass tokenizes the rows BATCH_ROWS at a time and writes each
    batch as one Parquet row group. The later passes drop the first one's duplicate rows by number."""
    from tqdm.auto import tqdm

    t0 = time.time()
    out = Path(output_dir)
    specials = special_tokens(list(conditions))
    _check_vocab(cfg, specials)
    params = {"cfg": cfg.model_dump(), "conditions": list(conditions), "seed": int(seed)}
    inputs: dict[str, str | os.PathLike] = {"input": input_path}
    local = _local_pretrained_file(cfg)
    if local is not None:
        inputs["pretrained"] = local
    fp = io.fingerprint(STAGE, io.code_closure(sys.modules[__name__]), params, inputs)
    out, done = io.open_stage(output_dir, fp, versioned=versioned, force=force)
    if done is not None:
        return done
    remove_spills(out)  # an id set's spill folder left by a killed run

    first = _Prepared(input_path, list(conditions), memory_gb, keep_ids=cfg.kind == "train", spill_dir=out)
    try:
        return _run(first, input_path, out, cfg, conditions, seed, progress, memory_gb, specials, params, inputs, fp,
                    t0, tqdm)
    finally:
        if first.ids is not None:
            first.ids.close()
        first.close()


def _run(first: "_Prepared", input_path, out: Path, cfg: TokenizerConfig, conditions, seed: int, progress: bool,
         memory_gb, specials: list[str], params: dict, inputs: dict, fp: str, t0: float, tqdm) -> dict:
    """`run` past the fingerprint check (`first`: the first pass, not yet read)."""
    bar = tqdm(total=first.reader.total_rows if progress else None, desc="tokenizer read", unit="row",
               unit_scale=True, disable=not progress, mininterval=1.0)  # (a JSONL total is a read of the file)
    for t in first:
        bar.update(t.num_rows)
    bar.close()
    removals, rows_in, n = first.removals, first.rows_in, first.rows
    if n == 0:
        raise ValueError(f"tokenizer: no usable rows in {input_path} ({len(removals)} rejected)")
    ids = first.ids

    # 1. the tokenizer
    t_train = time.time()
    if cfg.kind == "train":
        sample, sample_ids = ids.sample(cfg.sample_rows, seed)
        ids.close()
        sample_sha = hashlib.sha256("\n".join(sample_ids).encode()).hexdigest()
        del sample_ids
        sub = _gather(_Prepared(input_path, list(conditions), memory_gb, spill_dir=out, dup_rows=first.dup_rows()),
                      sample)
        texts = chain.from_iterable(zip(sub["instruction"].to_pylist(), sub["response"].to_pylist()))
        tok = _train(texts, 2 * len(sample), cfg, specials, progress)
        del sub
    else:
        sample, sample_sha = np.zeros(0, dtype=np.int64), None
        tok = _load_pretrained(cfg.name, specials, cfg.split_digits)
    tok.encode_special_tokens = True
    train_s = time.time() - t_train
    sid = {s: tok.token_to_id(s) for s in specials}
    meta = {
        "kind": cfg.kind,
        "name": cfg.name,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "requested_vocab_size": cfg.vocab_size if cfg.kind == "train" else None,
        "min_frequency": cfg.min_frequency if cfg.kind == "train" else None,
        "split_digits": splits_digits(tok),
        "special_tokens": sid,
        "pad_id": sid[PAD],
        "boq_id": sid[BOQ],
        "eoq_id": sid[EOQ],
        "eoa_id": sid[EOA],
        "conditions": list(conditions),
        "condition_ids": {c: sid[condition_token(c)] for c in conditions},
        "seed": int(seed),
        "sample_rows": int(len(sample)),
        "sample_sha256": sample_sha,
        "tokenizers_version": __import__("tokenizers").__version__,
    }
    tok_path = out / TOKENIZER_FILE
    with io.atomic_path(tok_path) as tmp:
        tmp.write_text(tok.to_str(pretty=True))
    meta["tokenizer_sha256"] = io.sha256_file(tok_path)
    io.write_json(meta, out / META_FILE)

    # 2. tokenize every row, streamed to Parquet in row groups of BATCH_ROWS
    boq, eoq, eoa = sid[BOQ], sid[EOQ], sid[EOA]
    spec_ids = special_ids(meta)
    cond_ids: dict[str, list[int]] = {}  # condition string -> its tag token ids
    tokens_per_stratum: dict[str, int] = {}
    rows_per_stratum: dict[str, int] = {}
    total_prompt = total_response = 0
    tok_path_out = out / TOKENIZED_FILE
    t_tok = time.time()
    bar = tqdm(total=n, desc="tokenize", unit="row", unit_scale=True, disable=not progress, mininterval=1.0)
    with io.atomic_path(tok_path_out) as tmp:
        writer = pq.ParquetWriter(tmp, TOKENIZED_SCHEMA, compression="zstd")
        try:
            rows = _Prepared(input_path, list(conditions), memory_gb, spill_dir=out, dup_rows=first.dup_rows())
            for b in _blocks(rows, BATCH_ROWS):
                conds = b["condition"].to_pylist()
                instr = _encode(tok, b["instruction"].to_pylist())
                resp = _encode(tok, b["response"].to_pylist())
                for c in set(conds) - cond_ids.keys():
                    cond_ids[c] = spec_ids.condition_ids(c)
                prompts = [[boq, *cond_ids[c], *x, eoq] for c, x in zip(conds, instr)]
                del instr
                for r in resp:
                    r.append(eoa)
                p_arr, p_len = _list_array(prompts)
                r_arr, r_len = _list_array(resp)
                del prompts, resp
                cols = [b[c] for c in _TEXT_COLS] + [p_arr, r_arr, pa.array(p_len), pa.array(r_len)]
                writer.write_table(pa.Table.from_arrays(cols, schema=TOKENIZED_SCHEMA), row_group_size=BATCH_ROWS)
                total_prompt += int(p_len.sum())
                total_response += int(r_len.sum())
                per = p_len.astype(np.int64) + r_len
                for s, k in zip(b["stratum"].to_pylist(), per.tolist()):
                    tokens_per_stratum[s] = tokens_per_stratum.get(s, 0) + k
                    rows_per_stratum[s] = rows_per_stratum.get(s, 0) + 1
                bar.update(b.num_rows)
        finally:
            writer.close()
            bar.close()
    tokenize_s = time.time() - t_tok

    outputs = {
        TOKENIZER_FILE: io.file_record(tok_path),
        META_FILE: io.file_record(out / META_FILE),
        TOKENIZED_FILE: io.file_record(tok_path_out, rows=n),
        REMOVALS_FILE: io.write_parquet(pa.Table.from_pylist(removals, schema=REMOVAL_SCHEMA), out / REMOVALS_FILE),
    }
    reasons: dict[str, int] = {}
    for r in removals:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    assert rows_in == n + len(removals)
    counts = {
        "rows_in": rows_in,
        "rows_tokenized": n,
        "rows_removed": len(removals),
        "removed_by_reason": dict(sorted(reasons.items())),
        "training_sample_rows": int(len(sample)),
        "vocab_size": meta["vocab_size"],
        "prompt_tokens": total_prompt,
        "response_tokens": total_response,
        "tokens": total_prompt + total_response,
        "tokens_per_stratum": dict(sorted(tokens_per_stratum.items())),
        "rows_per_stratum": dict(sorted(rows_per_stratum.items())),
    }
    manifest = {
        "stage": STAGE,
        "fingerprint": fp,
        "params": params,
        "inputs": {k: str(v) for k, v in inputs.items()},
        "outputs": outputs,
        "counts": counts,
    }
    timing = {"total_s": round(time.time() - t0, 3), "train_s": round(train_s, 3), "tokenize_s": round(tokenize_s, 3)}
    return io.finish_stage(out, manifest, timing)
