"""Stage `contamination`: n-gram contamination check of benchmarks against training data (words or Llama-2 tokens).

Inputs
- training data: a tokenizer stage folder (`tokenized.parquet` + `tokenizer_meta.json`), a
  tokenized.parquet file (give `tokenizer_path`), or a rows .jsonl/.parquet in the normalized schema
  (tokenized first with the tokenizer at `tokenizer_path`, via the tokenizer stage in "pretrained" mode;
  without one, the pipeline's tokenizer with default settings is trained on the rows).
  Both the prompt (instruction) and the response tokens of every training row count; special tokens
  ([BOQ], condition, [EOQ], [EOA]) are not text and no n-gram contains one; n-grams never cross the
  prompt/response boundary.
- benchmarks: a folder in the layout of the shared benchmark data (`<name>/<split>.jsonl`, Hub field
  layouts), read by `load_benchmarks`. Only the question side of each item is checked (few-shot
  exemplars are separate items of other splits and are not checked):
      gsm8k question | arc_challenge question + choices | hellaswag ctx | mmlu question + choices |
      math problem | drop passage + question
  (`item_text(name, doc)`; the evaluation package uses the same function to map its samples back).

Method (cfg.method; per n in cfg.ngram_sizes, default 13 and 8)
- words (the default; GPT-3 / OLMo style): matching on normalised text, independent of the tokenizer's
  boundaries (the same question tokenizes differently alone and inside a row: "?" vs "?\n" merges).
  Text is folded byte by byte (`fold_bytes`: ASCII letters lowercased, digits kept, the operators
  + - * / = < > ^ % kept as words of their own (36 - 21 is not 36 + 21, -93 is not 93), every other
  byte - punctuation, symbols, whitespace and all non-ASCII bytes (Unicode quotes, dashes, minus signs,
  accented letters) - a separator) and split into words; one-letter words a-z are dropped (option
  labels "A." "(b)" between appended choices, and "a", "I"). Folding per byte makes it exact to work
  from token ids: the training rows are never decoded; `TokenWords` folds each vocabulary entry's bytes
  once (exact for the pipeline's byte-level BPE; special tokens are separators) and assembles word
  hashes (polynomial over the folded bytes of the word, finalised) with token-level array operations.
  Units are word hashes. Text in scripts without ASCII letters has no words and is not checked.
  Short-item rule (`window_sizes`): an item of L words is matched with windows of
  s = min(n, max(ceil(L/2), min(L, cfg.min_ngram))) words: n-grams from 2n words up; a shorter item with
  windows of half its length (two windows cover it; one half copied alone stays below the dirty edge),
  never fewer than min_ngram (8) words; an item of fewer than min_ngram words is matched whole (its
  normalised text as a word-bounded substring of a training segment). A short item (fewer than 2n
  words) is dirty only when one training row holds all of it: with so few words, a row sharing all but
  a number or two ("Which is larger, 11/17 or 30/37?" against "... or 30/31?") is another problem, so
  partial coverage puts it at most in not_dirty. The item's `ngram` column says which size it got.
- tokens (the paper's Llama-2 check, kept for comparison): units are the pipeline's token ids; every
  item is tokenized (no special tokens) and matched with n-token windows; an item shorter than n tokens
  has no n-grams (coverage 0, counted as `too_short`); no n-gram contains a special token.
- Hashing (both): prefix hashes of the units give the hash of any window of any size in two array
  operations (`Windows`); the window size is mixed into the hash. Per window size in use, the distinct
  item window hashes form a sorted uint64 array (the index) with a table of their top bits (about 32
  bits per key, at most 2^27) as a prefilter. The training units are streamed in row batches as one
  flat array (prompt and response are separate segments), every window start of every size in use is
  hashed in one vectorised pass and looked up with np.searchsorted; a hit whose window crosses a
  segment end (or, for tokens, holds a special token) is dropped. Hits are kept as (index entry, training row)
  pairs, at most `cfg.max_rows_per_ngram` rows per window (attribution). Indexing the (small) benchmark
  side and streaming the (large) training side gives exactly the set "item windows that occur in
  training" that an index of the training data would, with memory bounded by one batch.
- An item unit is covered when some window of the item that contains it occurs in training.
  coverage = covered units / item units; longest_span = the longest run of covered units.
- Buckets (fractions of item units covered, Llama-2's four buckets with these exact edges):
      clean      coverage <  0.20
      not_clean  0.20 <= coverage < 0.50
      not_dirty  0.50 <= coverage < 0.80
      dirty      coverage >= 0.80
  The item's `bucket` column uses `cfg.primary_n` (13); every n gets its own columns too.
- Attribution of every item that is not clean: each training row that holds some of its matched windows
  covers part of it; rows are ranked by the units they cover alone. The `responsible` rows are taken in
  that order (skipping rows that add nothing) until together they cover the lower edge of the item's
  bucket (so one verbatim copy is one row); the report lists them with id, source, own coverage and the
  matched span (the longest run of item units the row covers: [start, end) and its normalised text),
  and the next few (`top_rows`).

Outputs (in output_dir)
- `items.parquet`: benchmark, item_id, key (sha1 of the item text), length (units: words or tokens),
  coverage, longest_span, bucket, ngram (window size; 0: none) at primary_n, and coverage_<n>,
  longest_span_<n>, bucket_<n> for every n.
- `report.json`: method, unit, normalisation, short_item_rule, per benchmark and n: checked, too_short,
  short, bucket counts and percentages; per benchmark the `flagged_items` (every item not clean at
  primary n) with bucket, coverage, longest span, responsible / top training rows, and `dirty_items`
  (the dirty ones among them).
- with `cfg.decontaminate`: `tokenized.parquet` (the training rows minus every row responsible for an
  item in bucket `cfg.decontaminate_at` (default dirty) or worse, same schema), `removals.parquet`
  (REMOVAL_SCHEMA, stage "contamination", reason "benchmark_contamination", detail naming the benchmark
  item and its bucket), and copies of tokenizer.json / tokenizer_meta.json, so the folder is a valid
  tokenizer folder for `pack`. rows_in = rows_kept + rows_removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import io
from pipeline.config import ContaminationConfig
from pipeline.parts import MapParts
from pipeline.schema import REMOVAL_SCHEMA

STAGE = "contamination"
TOKENIZED_FILE = "tokenized.parquet"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
ITEMS_FILE = "items.parquet"
REPORT_FILE = "report.json"
REMOVALS_FILE = "removals.parquet"
REASON = "benchmark_contamination"
BUCKETS = ("clean", "not_clean", "not_dirty", "dirty")

# benchmark name -> default split checked (the split evaluated)
DEFAULT_SPLITS = {
    "gsm8k": "test",
    "arc_challenge": "test",
    "hellaswag": "validation",
    "mmlu": "test",
    "math": "test",
    "drop": "validation_subset",
}
HUB = {  # name -> (hub path, config, split) for `load_benchmarks` with names when online (untested)
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "mmlu": ("cais/mmlu", "all", "test"),
    "math": ("EleutherAI/hendrycks_math", None, "test"),
    "drop": ("ucinlp/drop", None, "validation"),
}

_MASK64 = (1 << 64) - 1
_BASE = np.uint64(0x9E3779B97F4A7C15 | 1)  # odd 64-bit multiplier of the polynomial hash
_TABLE_BITS = 26  # prefilter: one byte per 2^26 buckets of the hash's top bits (64 MiB)


NORMALISATION = ("UTF-8 bytes (training rows: their token ids' bytes); ASCII letters lowercased, digits kept, "
                 "the operators + - * / = < > ^ % are words of their own; every other byte (punctuation, symbols, "
                 "whitespace, all non-ASCII bytes) is a separator; "
                 "words are the runs between separators; one-letter words a-z (option labels, 'a', 'I') dropped")
SHORT_RULE = ("an item of L words is matched with windows of min(n, max(ceil(L/2), min(L, {m}))) words: n-grams "
              "from 2n words up; below that half the item (two windows cover it), at least {m} words; an item of "
              "fewer than {m} words is matched whole (its normalised text as a word-bounded substring). An item "
              "shorter than 2n words is dirty only when one training row holds all of it; partly covered, it is "
              "at most not_dirty")


def bucket_of(coverage: np.ndarray, cfg: ContaminationConfig) -> np.ndarray:
    """Bucket names for coverage fractions (edges in the module docstring)."""
    edges = np.array([cfg.clean_below, cfg.not_clean_below, cfg.dirty_at])
    return np.array(BUCKETS, dtype=object)[np.searchsorted(edges, np.asarray(coverage, dtype=float), side="right")]


# ----------------------------------------------------------------------------------------------
# benchmarks
# ----------------------------------------------------------------------------------------------
def _choices_text(choices) -> list[str]:
    if isinstance(choices, dict):  # ARC: {"text": [...], "label": [...]}
        return [str(x) for x in choices.get("text", [])]
    return [str(x) for x in (choices or [])]


def item_text(name: str, doc: dict) -> str:
    """The question side of a benchmark item (what the contamination check matches)."""
    if name == "gsm8k":
        return doc["question"]
    if name in ("arc_challenge", "arc_easy", "mmlu"):
        return "\n".join([doc["question"], *_choices_text(doc["choices"])])
    if name == "hellaswag":
        return doc["ctx"] if doc.get("ctx") else f"{doc['ctx_a']} {doc['ctx_b']}".strip()
    if name == "math":
        return doc["problem"]
    if name == "drop":
        return f"{doc['passage']}\n{doc['question']}"
    for k in ("question", "problem", "prompt", "text"):  # an unknown benchmark: its first question-like field
        if isinstance(doc.get(k), str):
            return doc[k]
    raise ValueError(f"item_text: unknown benchmark {name!r} and no question/problem/prompt/text field in {sorted(doc)}")


def item_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@dataclass
class Benchmark:
    name: str
    split: str
    item_ids: list[str]
    texts: list[str]


def load_benchmarks(
    dir_or_names: str | os.PathLike | Iterable[str],
    names: Iterable[str] | None = None,
    splits: dict[str, str] | None = None,
) -> dict[str, Benchmark]:
    """Benchmarks from a local folder (`<dir>/<name>/<split>.jsonl`) or, given names, from the Hub.

    Item ids are "<name>/<split>/<line index>" (the document order of lm-eval's tasks)."""
    splits = {**DEFAULT_SPLITS, **(splits or {})}
    if isinstance(dir_or_names, (str, os.PathLike)) and Path(dir_or_names).is_dir():
        root = Path(dir_or_names)
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        wanted = list(names) if names is not None else [n for n in found if n in splits or any(root.joinpath(n).glob("*.jsonl"))]
        out: dict[str, Benchmark] = {}
        for name in wanted:
            # a folder of another benchmark (e.g. evaluation/heldout/demo_heldout): its test split
            split = splits.get(name) or ("test" if (root / name / "test.jsonl").is_file() else None)
            f = root / name / f"{split}.jsonl" if split else None
            if f is None or not f.exists():
                have = sorted(p.stem for p in (root / name).glob("*.jsonl")) if (root / name).is_dir() else []
                raise FileNotFoundError(f"load_benchmarks: {root}/{name}/{split}.jsonl not found (splits there: {have})")
            docs = [json.loads(line) for line in f.read_text().split("\n") if line.strip()]
            out[name] = Benchmark(name, split, [f"{name}/{split}/{i}" for i in range(len(docs))],
                                  [item_text(name, d) for d in docs])
        return out
    # names: the Hub (needs network; not exercised by the tests)
    from datasets import load_dataset

    out = {}
    for name in ([dir_or_names] if isinstance(dir_or_names, str) else list(dir_or_names)):
        if name not in HUB:
            raise ValueError(f"load_benchmarks: {name!r} is not a folder and not a known benchmark {sorted(HUB)}")
        path, config, split = HUB[name]
        ds = load_dataset(path, config, split=split)
        out[name] = Benchmark(name, split, [f"{name}/{split}/{i}" for i in range(len(ds))], [item_text(name, d) for d in ds])
    return out


# ----------------------------------------------------------------------------------------------
# hashing
# ----------------------------------------------------------------------------------------------
def _fmix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place."""
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


_BASE_INV = np.uint64(pow(int(_BASE), -1, 1 << 64))
_SIZE_SALT = np.uint64(0xD6E8FEB86659FD93)  # window size mixed into its hash (one index for all sizes)
_POW: list[np.ndarray] = [np.ones(1, np.uint64), np.ones(1, np.uint64)]  # B^k and B^-k, k < len, grown on demand


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    if _POW[0].size < n:
        m = max(n, 2 * _POW[0].size)
        with np.errstate(over="ignore"):
            p = np.full(m, _BASE, dtype=np.uint64)
            p[0] = 1
            q = np.full(m, _BASE_INV, dtype=np.uint64)
            q[0] = 1
            _POW[:] = [np.cumprod(p), np.cumprod(q)]  # wraps mod 2^64
    return _POW[0][:n], _POW[1][:n]


class Windows:
    """Prefix hashes of the units (token ids or word hashes) of segments laid out flat, from which the hash
    of any window of any size is two array operations away:

        H(i, s) = sum_k u[i+k] * B^k = (P[i+s] - P[i]) * B^-i   (mod 2^64; B odd, so invertible)

    then salted with s and finalised. A window that crosses a segment end or holds a `bad` position is
    dropped."""

    def __init__(self, units: np.ndarray, lengths: np.ndarray, bad: np.ndarray | None = None) -> None:
        N = int(units.shape[0])
        self.N = N
        pw, self.ipw = _powers(N + 1)
        self.P = np.zeros(N + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            np.cumsum((units.astype(np.uint64) + np.uint64(1)) * pw[:N], out=self.P[1:])  # 0 never a unit value
        self.seg = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)  # (N,)
        self.bad_cs = None
        if bad is not None and bad.any():
            self.bad_cs = np.zeros(N + 1, dtype=np.int32)
            np.cumsum(bad, out=self.bad_cs[1:])

    def hashes(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hashes uint64 (W,), start positions int64 (W,), segment int64 (W,)) of the size-s windows."""
        h = self.all_hashes(s)
        starts = np.arange(h.size, dtype=np.int64)
        starts = starts[self.valid(starts, s)]
        return h[starts], starts, self.seg[starts]

    def all_hashes(self, s: int) -> np.ndarray:
        """Hashes of the windows of size s at every start 0..N-s, valid or not (see `valid`)."""
        N = self.N
        if N < s or s < 1:
            return np.zeros(0, dtype=np.uint64)
        W = N - s + 1
        with np.errstate(over="ignore"):
            h = self.P[s:] - self.P[:W]
            h *= self.ipw[:W]
            h += np.uint64(s) * _SIZE_SALT
        return _fmix(h)

    def valid(self, starts: np.ndarray, s: int) -> np.ndarray:
        """Whether each start's size-s window stays in one segment and holds no bad position."""
        ok = self.seg[starts] == self.seg[starts + s - 1]
        if self.bad_cs is not None:
            ok &= (self.bad_cs[starts + s] - self.bad_cs[starts]) == 0
        return ok


def window_hashes(tokens: np.ndarray, lengths: np.ndarray, n: int, bad: np.ndarray | None = None):
    """Hashes of every n-unit window of the segments laid out flat in `tokens` (lengths per segment).

    Windows that cross a segment end or contain a `bad` position are dropped. Returns
    (hashes uint64 (W,), start positions int64 (W,), segment index int64 (W,))."""
    return Windows(tokens, lengths, bad).hashes(n)


class NgramIndex:
    """Sorted distinct n-gram hashes of the benchmark items, with a top-bits prefilter table."""

    def __init__(self, hashes: np.ndarray, bits: int = _TABLE_BITS) -> None:
        self.bits = bits
        order = np.argsort(hashes, kind="stable")
        h = hashes[order]
        new = np.r_[True, h[1:] != h[:-1]] if h.size else np.zeros(0, bool)
        self.keys = h[new]  # (U,) sorted distinct
        self.inverse = np.empty(hashes.size, dtype=np.int64)  # hashes[i] == keys[inverse[i]]
        self.inverse[order] = np.cumsum(new) - 1
        self.table = np.zeros(1 << bits, dtype=bool)
        self.table[self.keys >> np.uint64(64 - bits)] = True

    @classmethod
    def from_keys(cls, keys: np.ndarray, bits: int) -> "NgramIndex":
        """The index of `keys` (sorted, distinct; an index's `keys`), for lookups only (no `inverse`)."""
        ix = cls.__new__(cls)
        ix.bits, ix.keys, ix.inverse = bits, keys, None
        ix.table = np.zeros(1 << bits, dtype=bool)
        ix.table[keys >> np.uint64(64 - bits)] = True
        return ix

    def lookup(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in h that are in the index, their index in keys)."""
        cand = np.flatnonzero(self.table[h >> np.uint64(64 - self.bits)])
        if cand.size == 0 or self.keys.size == 0:
            return cand, cand
        hc = h[cand]
        j = np.searchsorted(self.keys, hc)
        j[j == self.keys.size] = 0
        hit = self.keys[j] == hc
        return cand[hit], j[hit]


# ----------------------------------------------------------------------------------------------
# words: normalised text, independent of the tokenizer's boundaries
# ----------------------------------------------------------------------------------------------
SYMBOLS = b"+-*/=<>^%"  # math operators: words of their own (36 - 21 is not 36 + 21, -93 is not 93)


def _fold_table() -> np.ndarray:
    t = np.zeros(256, dtype=np.uint8)  # 0: separator
    for b in range(128):
        c = chr(b)
        if c.isdigit() or ("a" <= c <= "z") or b in SYMBOLS:
            t[b] = b
        elif "A" <= c <= "Z":
            t[b] = b + 32
    return t


_FOLD = _fold_table()
_SYM = np.zeros(256, dtype=bool)
_SYM[list(SYMBOLS)] = True
_WORD_SALT = np.uint64(0x2545F4914F6CDD1D)


def fold_bytes(b: np.ndarray) -> np.ndarray:
    """UTF-8 bytes (N,) uint8 -> folded bytes, 0 for a separator: ASCII letters lowercased, digits and
    the math operators + - * / = < > ^ % kept (each operator is a word of its own); everything else
    (other punctuation, symbols, whitespace, and every non-ASCII byte: Unicode quotes, dashes, minus
    signs, accents) is a separator. Byte by byte, so it does not depend on where a tokenizer cut the text."""
    return _FOLD[b]


def _word_edges(folded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) masks over folded bytes: where a word starts / where one ends (its last byte),
    ignoring segments. A word is a run of letters and digits, or a single operator."""
    isw = folded != 0
    sym = _SYM[folded]
    brk = ~isw | sym  # a word cannot continue across a separator or an operator
    start = isw & (np.r_[True, brk[:-1]] | sym)
    end = isw & (np.r_[brk[1:], True] | sym)
    return start, end


def words_of(folded: np.ndarray, seg_bytes: np.ndarray, with_spans: bool = False):
    """Word hashes of folded bytes laid out flat in segments (byte lengths `seg_bytes`).

    A word is a maximal run of non-separator bytes inside a segment; one-letter words (a-z: option
    labels "A." "(b)", and the articles "a", "I") are dropped. Returns (word hashes uint64 (W,),
    words per segment int64 (S,)), and with `with_spans` the byte (start, end) of each word."""
    S = seg_bytes.size
    isw = folded != 0
    start, _ = _word_edges(folded)
    seg_start = np.r_[0, np.cumsum(seg_bytes)[:-1]] if S else np.zeros(0, np.int64)
    seg_start = seg_start[seg_bytes > 0]
    start[seg_start] = isw[seg_start]
    first = np.flatnonzero(start)  # (W0,) byte position of each word's first byte
    if first.size == 0:
        e = np.zeros(0, dtype=np.int64)
        out = (np.zeros(0, np.uint64), np.zeros(S, np.int64))
        return (*out, e, e) if with_spans else out
    pos = np.flatnonzero(isw)  # word bytes, in order
    wid = np.cumsum(start)[pos] - 1  # (B,) word of each word byte
    wlen = np.bincount(wid, minlength=first.size)
    wfirst = np.r_[0, np.cumsum(wlen)[:-1]]  # index in pos of each word's first byte
    rel = pos - first[wid]
    pw, _ = _powers(int(wlen.max()))
    with np.errstate(over="ignore"):
        h = np.add.reduceat(folded[pos].astype(np.uint64) * pw[rel], wfirst)
        h += wlen.astype(np.uint64) * _WORD_SALT
    _fmix(h)
    keep = ~((wlen == 1) & (folded[first] >= ord("a")) & (folded[first] <= ord("z")))
    seg_of_byte = np.repeat(np.arange(S, dtype=np.int64), seg_bytes)
    wseg = seg_of_byte[first[keep]]
    counts = np.bincount(wseg, minlength=S).astype(np.int64)
    if with_spans:
        return h[keep], counts, first[keep], (first + wlen)[keep]
    return h[keep], counts


def normalized_words(text: str) -> list[str]:
    """The words of a text as the check sees them (the same folding as `words_of`)."""
    b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    f = fold_bytes(b)
    _, _, s, e = words_of(f, np.array([b.size]), with_spans=True)
    raw = f.tobytes()
    return [raw[i:j].decode("utf-8", errors="replace") for i, j in zip(s.tolist(), e.tolist())]


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: byte -> the printable character that stands for it (GPT-2's table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class TokenWords:
    """Word hashes of training token ids without turning rows back into text: each token id's bytes
    (byte-level tokenizers, the pipeline's, map exactly; others map their piece strings: "▁" is a
    space, "<0xNN>" a byte, "##" continues a word; special tokens are one separator byte) are folded
    once per vocabulary, with the prefix sums of the word hash inside the token, where its words start
    and end, and whether its first and last bytes are word bytes. A batch then needs only token-level
    and word-level array operations: a word's hash is (P(end) - P(start)) * B^-start, with P at a byte
    inside token j = P_tok[j] + B^off[j] * (prefix of token j). Gives exactly `words_of(fold_bytes(the
    rows' bytes))` (the tests check it): folding is per byte, so it does not depend on where tokens end."""

    def __init__(self, tok, special: set[int]) -> None:
        cfg = json.loads(tok.to_str())
        byte_level = '"ByteLevel"' in json.dumps(cfg.get("decoder") or {})
        inv = {c: b for b, c in _bytes_to_unicode().items()}
        V = tok.get_vocab_size(with_added_tokens=True)
        added = set(tok.get_added_tokens_decoder())
        pieces: list[bytes] = []
        for i in range(V):
            s = tok.id_to_token(i)
            if s is None or i in special:
                pieces.append(b" ")
            elif i in added:
                pieces.append(s.encode("utf-8"))
            elif byte_level:
                pieces.append(bytes(inv[c] for c in s) if all(c in inv for c in s) else s.encode("utf-8"))
            elif len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
                pieces.append(bytes([int(s[3:5], 16)]))
            else:
                pieces.append((s[2:] if s.startswith("##") else s).replace("\u2581", " ").encode("utf-8"))
        self.pieces = pieces
        L = np.array([len(p) for p in pieces], dtype=np.int64)
        self.L = L
        folded = fold_bytes(np.frombuffer(b"".join(pieces), dtype=np.uint8))
        off = np.r_[0, np.cumsum(L)[:-1]].astype(np.int64)
        self.folded, self.off = folded, off
        # prefix sums of the hash inside each token: H[off[t] + t + k] = sum_{i<k} c_i B^i, k = 0..L[t]
        pw, ipw = _powers(int(L.max()) + 2)
        self.pw, self.ipw = pw, ipw
        hoff = off + np.arange(V, dtype=np.int64)  # each token has L + 1 prefix entries
        H = np.zeros(int(L.sum()) + V, dtype=np.uint64)
        tok_of_byte = np.repeat(np.arange(V, dtype=np.int64), L)
        k_of_byte = np.arange(folded.size, dtype=np.int64) - off[tok_of_byte]
        with np.errstate(over="ignore"):
            contrib = folded.astype(np.uint64) * pw[k_of_byte]
            # within-token cumulative sums, placed at k + 1
            cs = np.cumsum(contrib)
            base = np.r_[np.uint64(0), cs][off]  # cumulative sum before each token
            H[hoff[tok_of_byte] + k_of_byte + 1] = cs - base[tok_of_byte]
        self.hoff, self.H = hoff, H
        self.Hfull = H[hoff + L]
        with np.errstate(over="ignore"):
            self.BL = pw[L]  # B^L[t]
            self.BiL = ipw[L]
        isw = folded != 0
        sym = _SYM[folded]
        nonempty = L > 0
        self.first_w = np.zeros(V, bool)  # first byte a letter or digit (may continue a word)
        self.last_w = np.zeros(V, bool)
        self.first_sym = np.zeros(V, bool)  # first byte an operator (a word of its own)
        self.last_sym = np.zeros(V, bool)
        fb, lb = off[nonempty], off[nonempty] + L[nonempty] - 1
        self.first_w[nonempty] = isw[fb] & ~sym[fb]
        self.last_w[nonempty] = isw[lb] & ~sym[lb]
        self.first_sym[nonempty] = sym[fb]
        self.last_sym[nonempty] = sym[lb]
        # internal word starts (k > 0: byte k a word byte after a separator) and ends (k < L: byte k a
        # separator after a word byte), flat per token in order
        st_all, en_all = _word_edges(folded)  # (token edges are handled per batch: k = 0 and k = L)
        st = st_all & (k_of_byte > 0)
        en = en_all & (k_of_byte < L[tok_of_byte] - 1)
        self.ns = np.bincount(tok_of_byte[st], minlength=V).astype(np.int64)
        self.sk = k_of_byte[st]
        self.s_off = np.r_[0, np.cumsum(self.ns)[:-1]].astype(np.int64)
        self.ne = np.bincount(tok_of_byte[en], minlength=V).astype(np.int64)
        self.ek = k_of_byte[en] + 1  # end positions are exclusive
        self.e_off = np.r_[0, np.cumsum(self.ne)[:-1]].astype(np.int64)

    @staticmethod
    def _place(j_edge: np.ndarray, k_edge: np.ndarray, cnt_int: np.ndarray, off_int: np.ndarray, kflat: np.ndarray,
               tokens: np.ndarray, edge_first: bool) -> tuple[np.ndarray, np.ndarray]:
        """(token index, byte in token) of every word start (or end) in order: per token the boundary
        one (at k = 0 for starts, first; at k = L for ends, last) and the internal ones."""
        N = tokens.size
        ni = cnt_int[tokens]  # (N,)
        nb = np.zeros(N, dtype=np.int64)
        nb[j_edge] = 1
        cnt = ni + nb
        base = np.r_[0, np.cumsum(cnt)[:-1]]
        total = int(cnt.sum())
        J = np.empty(total, dtype=np.int64)
        K = np.empty(total, dtype=np.int64)
        # boundary ones
        bpos = base[j_edge] + (0 if edge_first else ni[j_edge])
        J[bpos] = j_edge
        K[bpos] = k_edge
        # internal ones
        ti = int(ni.sum())
        if ti:
            jj = np.repeat(np.arange(N, dtype=np.int64), ni)
            r = np.arange(ti, dtype=np.int64) - np.repeat(np.r_[0, np.cumsum(ni)[:-1]], ni)
            ipos = base[jj] + (nb[jj] if edge_first else 0) + r
            J[ipos] = jj
            K[ipos] = kflat[off_int[tokens[jj]] + r]
        return J, K

    def __call__(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(word hashes uint64 (W,), words per segment (S,)) of flat token segments."""
        tokens = np.asarray(tokens, dtype=np.int64)
        N, S = tokens.size, lengths.size
        if N == 0:
            return np.zeros(0, np.uint64), np.zeros(S, np.int64)
        seg = np.repeat(np.arange(S, dtype=np.int64), lengths)
        tl = self.L[tokens]
        offb = np.r_[0, np.cumsum(tl)[:-1]]  # byte offset of each token
        with np.errstate(over="ignore"):
            Bo = np.empty(N, dtype=np.uint64)  # B^offb
            Bo[0] = 1
            np.cumprod(self.BL[tokens[:-1]], out=Bo[1:])
            Bio = np.empty(N, dtype=np.uint64)
            Bio[0] = 1
            np.cumprod(self.BiL[tokens[:-1]], out=Bio[1:])
            Ptok = np.zeros(N, dtype=np.uint64)
            np.cumsum(Bo[:-1] * self.Hfull[tokens[:-1]], out=Ptok[1:])
        fw, lw = self.first_w[tokens], self.last_w[tokens]
        fs, ls = self.first_sym[tokens], self.last_sym[tokens]
        new_seg = np.r_[True, seg[1:] != seg[:-1]]
        end_seg = np.r_[seg[1:] != seg[:-1], True]
        # a word starts at a token's first byte when that is an operator, or a letter/digit that does not
        # continue a letter/digit run of the token before (in the same segment); ends likewise
        js = np.flatnonzero(fs | (fw & (new_seg | ~np.r_[False, lw[:-1]])))
        je = np.flatnonzero(ls | (lw & (end_seg | ~np.r_[fw[1:], False])))
        Js, Ks = self._place(js, np.zeros(js.size, np.int64), self.ns, self.s_off, self.sk, tokens, True)
        Je, Ke = self._place(je, tl[je], self.ne, self.e_off, self.ek, tokens, False)
        assert Js.size == Je.size, (Js.size, Je.size)
        with np.errstate(over="ignore"):
            ps = Ptok[Js] + Bo[Js] * self.H[self.hoff[tokens[Js]] + Ks]
            pe = Ptok[Je] + Bo[Je] * self.H[self.hoff[tokens[Je]] + Ke]
            h = (pe - ps) * (Bio[Js] * self.ipw[Ks])
            wlen = (offb[Je] + Ke) - (offb[Js] + Ks)
            h += wlen.astype(np.uint64) * _WORD_SALT
        _fmix(h)
        b0 = self.folded[self.off[tokens[Js]] + Ks]
        keep = ~((wlen == 1) & (b0 >= ord("a")) & (b0 <= ord("z")))
        counts = np.bincount(seg[Js[keep]], minlength=S).astype(np.int64)
        return h[keep], counts


# ----------------------------------------------------------------------------------------------
# training data
# ----------------------------------------------------------------------------------------------
def _flat(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
    return values, lengths


def iter_training(path: Path, batch_rows: int, lo: int = 0, hi: int | None = None
                  ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row index, flat tokens, segment lengths) per batch of at most batch_rows rows, rows in
    file order; only rows [lo, hi) (default: all), read from the row groups that hold them.

    Each row gives two segments: the m prompts come first, then the m responses, so segment s belongs
    to row s % m of the batch."""
    # without pre-buffering: a pre-buffering reader keeps every row group's column chunks it has read
    # until it is closed (the scan's memory grew by the compressed token columns, ~220 bytes a row)
    pf = pq.ParquetFile(path, pre_buffer=False)
    md = pf.metadata
    hi = md.num_rows if hi is None else min(hi, md.num_rows)
    first = np.r_[0, np.cumsum([md.row_group(g).num_rows for g in range(md.num_row_groups)])]
    groups = [g for g in range(md.num_row_groups) if first[g] < hi and first[g + 1] > lo]
    if lo >= hi or not groups:
        return
    pos = int(first[groups[0]])  # row index of the next batch's first row
    for b in pf.iter_batches(batch_size=batch_rows, columns=["prompt_ids", "response_ids"], row_groups=groups):
        n = b.num_rows
        a, e = max(lo - pos, 0), min(hi - pos, n)
        if e > a:
            if (a, e) != (0, n):
                b = b.slice(a, e - a)
            pv, pl = _flat(b.column("prompt_ids"))
            rv, rl = _flat(b.column("response_ids"))
            yield pos + a, np.concatenate([pv, rv]), np.concatenate([pl, rl])
        pos += n
        if pos >= hi:
            return


def _packed_rows(pack_dir: Path, out: Path, memory_gb: float | None = None) -> tuple[Path, Path]:
    """The training rows a pack folder holds (the tokenized rows it read, kept when at least one of their
    samples was packed), written once to `<out>/.inputs/packed-<pack version>.parquet`; with the tokenizer
    folder they were made with.

    Streams: the packed sample ids go, a shard's record batch at a time, into an id set that spills
    past its share of the budget (`rows._IdSet`: 128-bit hashes of the ids), then the tokenized rows
    are read a row group at a time and those whose id is in the set are written as they come."""
    import polars as pl
    import pyarrow.ipc as ipc

    from pipeline import budget
    from pipeline.rows import _IdSet

    man = io.read_json(pack_dir / "manifest.json")
    tok_dir = Path(man.get("inputs", {}).get("tokenized", ""))
    src = tok_dir / TOKENIZED_FILE
    if not src.exists():
        raise FileNotFoundError(f"contamination: the pack {pack_dir} was made from {tok_dir}, which has no "
                                f"{TOKENIZED_FILE} any more")
    dest = out / ".inputs" / f"packed-{io.sha256_json(man.get('outputs', {}))[:16]}.parquet"
    if dest.exists():
        return dest, tok_dir

    def hashes(ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        s = pl.Series(ids)
        return s.hash(seed=11).to_numpy(), s.hash(seed=12).to_numpy()

    ids = _IdSet(run_bytes=budget.id_set_bytes(memory_gb), spill_dir=out / ".inputs")
    try:
        for f in sorted(pack_dir.glob("shard-*.arrow")):
            with pa.memory_map(str(f), "r") as m, ipc.open_file(m) as r:
                for b in range(r.num_record_batches):
                    sample_ids = r.get_batch(b).column("sample_ids").flatten()
                    if len(sample_ids):
                        ids.add_new_hashes(*hashes(sample_ids))  # a sample id repeats across sequences
        pf = pq.ParquetFile(src)
        with io.RowGroupWriter(dest, pf.schema_arrow) as w:
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g)
                if t.num_rows:
                    w.write(t.filter(pa.array(ids.contains_hashes(*hashes(t.column("id").combine_chunks())))))
    finally:
        ids.close()
    return dest, tok_dir


def _resolve_training(train_path, tokenizer_path, out: Path, progress: bool,
                      memory_gb: float | None = None) -> tuple[Path, Path]:
    """(tokenized.parquet, tokenizer folder or file) for the input; rows files are tokenized first."""
    p = Path(train_path)
    if p.is_dir() and (p / "manifest.json").exists() and io.read_json(p / "manifest.json").get("stage") == "pack":
        return _packed_rows(p, out, memory_gb)
    if p.is_dir():
        f = p / TOKENIZED_FILE
        if not f.exists():
            raise FileNotFoundError(f"contamination: {p} is not a tokenizer stage folder (no {TOKENIZED_FILE})")
        return f, Path(tokenizer_path) if tokenizer_path else p
    if not p.exists():
        raise FileNotFoundError(f"contamination: input not found: {p}")
    is_tokenized = p.name.endswith(".parquet") and "prompt_ids" in pq.read_schema(p).names
    if is_tokenized:
        if tokenizer_path is None:
            raise ValueError(f"contamination: {p} holds token ids: give the tokenizer that made them "
                             "(tokenizer_path, --tokenizer)")
        return p, Path(tokenizer_path)
    # rows in the normalized schema: tokenize them with the given tokenizer, or without one with the
    # pipeline's own tokenizer (a byte-level BPE with the default settings) trained on these rows
    from pipeline.config import NormalizeConfig, TokenizerConfig
    from pipeline.stages import tokenize

    tok_dir = out / "input_tokenized"
    if tokenizer_path is None:
        print(f"contamination: no tokenizer given: training the pipeline's tokenizer on {p} ({tok_dir})",
              file=sys.stderr)
        tokenize.run(p, tok_dir, TokenizerConfig(), conditions=list(NormalizeConfig().conditions), seed=0,
                     progress=progress)
        return tok_dir / TOKENIZED_FILE, tok_dir
    tp = Path(tokenizer_path)
    tok_file = tp / TOKENIZER_FILE if tp.is_dir() else tp
    meta = io.read_json(tok_file.parent / META_FILE)
    # the given tokenizer as it was trained: its digit split (or not), never the current default's
    tokenize.run(p, tok_dir, TokenizerConfig(kind="pretrained", name=str(tok_file),
                                             split_digits=bool(meta.get("split_digits", False))),
                 conditions=meta["conditions"], seed=int(meta.get("seed", 0)), progress=progress)
    return tok_dir / TOKENIZED_FILE, tp


# ----------------------------------------------------------------------------------------------
# the check
# ----------------------------------------------------------------------------------------------
@dataclass
class _Items:
    names: list[str]  # benchmark of each item
    item_ids: list[str]
    keys: list[str]
    units: np.ndarray  # flat (T,): token ids (method tokens) or word hashes (method words)
    lengths: np.ndarray  # (I,) units per item
    words: list[list[str]] | None = None  # normalised words of each item (method words)
    tok: object = None  # the tokenizer (method tokens: decodes matched spans)

    def span_text(self, i: int, a: int, b: int) -> str:
        if self.words is not None:
            return " ".join(self.words[i][a:b])
        off = int(self.lengths[:i].sum())
        return self.tok.decode(self.units[off + a : off + b].tolist())


def _collect(benches: dict[str, Benchmark]) -> tuple[list[str], list[str], list[str], list[str]]:
    names, ids, keys, texts = [], [], [], []
    for b in benches.values():
        names += [b.name] * len(b.texts)
        ids += b.item_ids
        texts += b.texts
        keys += [item_key(t) for t in b.texts]
    return names, ids, keys, texts


def _tokenize_items(tok, benches: dict[str, Benchmark]) -> _Items:
    names, ids, keys, texts = _collect(benches)
    enc = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)] if texts else []
    lengths = np.array([len(e) for e in enc], dtype=np.int64)
    flat = np.fromiter((t for e in enc for t in e), dtype=np.int64, count=int(lengths.sum()))
    return _Items(names, ids, keys, flat, lengths, tok=tok)


def _word_items(tok, benches: dict[str, Benchmark]) -> _Items:
    """The items as normalised words. The text goes through the tokenizer's own normalizer first (none
    for the pipeline's tokenizer), as the training text did before it became token ids."""
    names, ids, keys, texts = _collect(benches)
    if tok is not None and tok.normalizer is not None:
        texts = [tok.normalizer.normalize_str(t) for t in texts]
    enc = [t.encode("utf-8") for t in texts]
    raw = np.frombuffer(b"".join(enc), dtype=np.uint8)
    folded = fold_bytes(raw)
    h, counts, s, e = words_of(folded, np.array([len(x) for x in enc], dtype=np.int64), with_spans=True)
    fb = folded.tobytes()
    spans = [fb[a:b].decode("utf-8", errors="replace") for a, b in zip(s.tolist(), e.tolist())]
    off = np.r_[0, np.cumsum(counts)]
    words = [spans[off[i] : off[i + 1]] for i in range(len(texts))]
    return _Items(names, ids, keys, h, counts, words=words)


def window_sizes(lengths: np.ndarray, n: int, cfg: ContaminationConfig) -> np.ndarray:
    """The n-gram size each item is matched with at nominal size n (0: the item has no n-grams).

    tokens (Llama-2): n, and no n-grams for an item shorter than n.
    words, the short-item rule: an item of L words is matched with s = min(n, max(ceil(L/2), min(L, m)))
    words, m = cfg.min_ngram: an item of at least 2n words gets n-grams; a shorter one windows of half its
    length (two windows cover it, so a copy of either half alone stays below the dirty edge), never
    fewer than m words; an item of fewer than m words is matched whole (one window: the whole normalised
    item as a substring of a training segment, at word boundaries)."""
    L = np.asarray(lengths, dtype=np.int64)
    if cfg.method == "tokens":
        return np.where(L >= n, n, 0)
    return np.minimum(n, np.maximum((L + 1) // 2, np.minimum(L, cfg.min_ngram)))


def _cap_pairs(pairs: np.ndarray, k: int) -> np.ndarray:
    """Distinct (key index << 32 | row) pairs, sorted, at most k rows per key (the first rows)."""
    if pairs.size == 0:
        return pairs
    pairs = np.sort(pairs)
    pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]]
    key = pairs >> np.int64(32)
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    rank = np.arange(pairs.size) - np.repeat(first, np.diff(np.r_[first, pairs.size]))
    return pairs[rank < k]


def _runs(mask: np.ndarray) -> tuple[int, int]:
    """(start, end) of the longest run of True ((0, 0) when none)."""
    if not mask.any():
        return 0, 0
    d = np.diff(np.r_[0, mask.astype(np.int8), 0])
    s, e = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    k = int(np.argmax(e - s))
    return int(s[k]), int(e[k])


def training_units(tokens: np.ndarray, lengths: np.ndarray, special_arr: np.ndarray, cfg: ContaminationConfig,
                   tbytes: "TokenWords | None"):
    """(units, units per segment, bad positions or None) of a batch of training segments."""
    if cfg.method == "words":
        h, counts = tbytes(tokens, lengths)
        return h, counts, None
    bad = np.isin(tokens, special_arr) if special_arr.size else None
    return tokens, lengths, bad


PART_BATCHES = 4  # training batches (cfg.batch_rows rows each) per part, with map_parts
TOKEN_BYTES = 200  # memory a training token costs while its batch is hashed (words: ~180 B measured)
BUDGET_SHARE = 1 / 4  # of the memory budget (less the interpreter): one batch's hashing


def scan_batch_rows(train_file: Path, cfg: ContaminationConfig, memory_gb: float | None) -> int:
    """Training rows hashed per batch: cfg.batch_rows, fewer when that many rows' tokens would cost more
    than BUDGET_SHARE of the memory budget (`resources.memory_gb`, default 4 GB) at TOKEN_BYTES a token.
    The tokens per row come from the Parquet metadata (the token columns' value counts); the batch cut
    does not change any output (`_scan`)."""
    from pipeline import budget

    md = pq.ParquetFile(train_file, pre_buffer=False).metadata
    names = [md.schema.column(j).path for j in range(md.num_columns)]
    cols = [j for j, nm in enumerate(names) if nm.split(".")[0] in ("prompt_ids", "response_ids")]
    tokens = sum(md.row_group(g).column(j).num_values for g in range(md.num_row_groups) for j in cols)
    per_row = max(1.0, tokens / max(md.num_rows, 1))
    rows = int(budget.usable_bytes(memory_gb) * BUDGET_SHARE / (TOKEN_BYTES * per_row))
    return max(1, min(cfg.batch_rows, max(budget.MIN_ROWS, rows)))
INDEX_FILE = ".contamination-index.npz"  # the benchmark windows' index, read by the parts


def _scan(train_file: Path, lo: int, hi: int | None, indexes: dict[int, tuple["NgramIndex", int]],
          spec_arr: np.ndarray, cfg: ContaminationConfig, tbytes: "TokenWords | None", found: np.ndarray,
          pbar=None) -> np.ndarray:
    """Stream training rows [lo, hi) against the benchmark windows' index: marks `found` (per index
    entry) and returns the hit pairs (index entry << 32 | training row), at most cfg.max_rows_per_ngram
    rows per entry (the first rows). Neither depends on how the rows are cut into batches or ranges:
    the union of ranges' pairs capped again equals the pairs of the whole."""
    pairs: list[np.ndarray] = []
    for row0, tokens, lengths in iter_training(train_file, cfg.batch_rows, lo, hi):
        m = len(lengths) // 2  # two segments per row
        units, ulen, bad = training_units(tokens, lengths, spec_arr, cfg, tbytes)
        win = Windows(units, ulen, bad)
        for s in sorted(indexes):
            ix, kbase = indexes[s]
            pos, key = ix.lookup(win.all_hashes(s))  # validity checked on the hits only
            ok = win.valid(pos, s)
            pos, key = pos[ok], key[ok] + kbase
            if pos.size:
                found[key] = True
                rows = row0 + win.seg[pos] % m
                pairs.append((key.astype(np.int64) << np.int64(32)) | rows.astype(np.int64))
        if sum(x.size for x in pairs) > 4_000_000:
            pairs = [_cap_pairs(np.concatenate(pairs), cfg.max_rows_per_ngram)]
        del win
        if pbar is not None:
            pbar.update(m)
    return _cap_pairs(np.concatenate(pairs) if pairs else np.zeros(0, np.int64), cfg.max_rows_per_ngram)


def scan_part(train_file: str, lo: int, hi: int, index_file: str, cfg: ContaminationConfig, tok_path: str,
              special: list[int], out_file: str) -> str:
    """Training rows [lo, hi) against the index in `index_file` (written by `check`), as one part for
    `map_parts` (pipeline.parts): the tokenizer's word table rebuilt from `tok_path` (method words),
    the found entries and capped pairs written to `out_file` (returned)."""
    with np.load(index_file) as z:
        indexes = {int(s): (NgramIndex.from_keys(z[f"keys_{s}"], int(z[f"bits_{s}"])), int(z[f"base_{s}"]))
                   for s in z["sizes"].tolist()}
        total = int(z["total"])
    tbytes = None
    if cfg.method == "words":
        from pipeline.stages.tokenize import load_tokenizer

        tbytes = TokenWords(load_tokenizer(tok_path)[0], set(special))
    found = np.zeros(total, bool)
    pairs = _scan(Path(train_file), lo, hi, indexes, np.array(sorted(special), dtype=np.int64), cfg, tbytes, found)
    with io.atomic_path(out_file) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, found=np.flatnonzero(found), pairs=pairs)
    return out_file


def check(
    train_file: Path,
    items: _Items,
    special: set[int],
    cfg: ContaminationConfig,
    progress: bool = False,
    tbytes: "TokenWords | None" = None,
    *,
    map_parts: MapParts | None = None,
    work_dir: Path | None = None,
    tok_path: Path | None = None,
) -> dict[int, dict]:
    """Per n: coverage (I,), longest span (I,), and for attribution the item windows and hit pairs.

    The training side is streamed against the benchmark windows' index (`_scan`). With `map_parts`
    (pipeline.parts) it is cut into row ranges of PART_BATCHES batches, each a part (`scan_part`: the
    index and the results go through files in `work_dir`, the tokenizer is read from `tok_path`), merged
    in range order: the same found entries and pairs, so the same outputs, as the single-process scan."""
    from tqdm.auto import tqdm

    res: dict[int, dict] = {}
    spec_arr = np.array(sorted(special), dtype=np.int64)
    item_win = Windows(items.units, items.lengths)
    all_h, sizes = [], set()
    for n in cfg.ngram_sizes:
        size_item = window_sizes(items.lengths, n, cfg)
        hs, st, sg, sz = [], [], [], []
        for s in np.unique(size_item[size_item > 0]).tolist():
            h, start, seg = item_win.hashes(s)
            k = size_item[seg] == s
            hs.append(h[k])
            st.append(start[k])
            sg.append(seg[k])
            sz.append(np.full(int(k.sum()), s, dtype=np.int64))
            sizes.add(s)
        cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
        res[n] = {"size_item": size_item, "ih": cat(hs, np.uint64), "istart": cat(st, np.int64),
                  "iseg": cat(sg, np.int64), "isize": cat(sz, np.int64)}
        all_h.append(res[n]["ih"])
    # one index per window size (the size is also in the hash), each with a prefilter table of about
    # 32 bits per key (at most 2^27): a window is looked up only among the item windows of its size
    all_ih = np.concatenate(all_h)
    all_sz = np.concatenate([res[n]["isize"] for n in cfg.ngram_sizes])
    inverse = np.empty(all_ih.size, dtype=np.int64)
    indexes: dict[int, tuple[NgramIndex, int]] = {}
    base = 0
    for s in sorted(sizes):
        sel = np.flatnonzero(all_sz == s)
        bits = int(min(27, max(16, np.ceil(np.log2(max(sel.size, 1) * 32)))))
        ix = NgramIndex(all_ih[sel], bits)
        inverse[sel] = base + ix.inverse
        indexes[s] = (ix, base)
        base += ix.keys.size
    a = 0
    for n in cfg.ngram_sizes:
        b = a + res[n]["ih"].size
        res[n]["wkey"] = inverse[a:b]
        a = b
    found = np.zeros(base, bool)
    n_rows = pq.ParquetFile(train_file).metadata.num_rows
    if map_parts is None:
        pbar = tqdm(total=n_rows, desc="contamination", unit="row", disable=not progress)
        pairs_all = _scan(train_file, 0, None, indexes, spec_arr, cfg, tbytes, found, pbar)
        pbar.close()
    else:
        if work_dir is None or tok_path is None:
            raise ValueError("contamination: check with map_parts needs work_dir and tok_path")
        work_dir = Path(work_dir).resolve()  # the workers may run elsewhere (they must see these paths)
        index_file = work_dir / INDEX_FILE
        with io.atomic_path(index_file) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, sizes=np.array(sorted(indexes), dtype=np.int64), total=np.int64(base),
                         **{f"{k}_{s}": v for s, (ix, b0) in indexes.items()
                            for k, v in (("keys", ix.keys), ("bits", np.int64(ix.bits)), ("base", np.int64(b0)))})
        step = PART_BATCHES * cfg.batch_rows
        jobs = [(str(Path(train_file).resolve()), lo, min(lo + step, n_rows), str(index_file), cfg,
                 str(Path(tok_path).resolve()), sorted(special), str(work_dir / f".contamination-part-{i:05d}.npz"))
                for i, lo in enumerate(range(0, n_rows, step))]
        parts = []
        try:
            for path in map_parts(scan_part, jobs):  # in row order
                with np.load(path) as z:
                    found[z["found"]] = True
                    parts.append(z["pairs"])
        finally:
            for f in [index_file] + [Path(j[-1]) for j in jobs]:
                f.unlink(missing_ok=True)
        pairs_all = _cap_pairs(np.concatenate(parts) if parts else np.zeros(0, np.int64), cfg.max_rows_per_ngram)

    I = items.lengths.size
    item_off = np.r_[0, np.cumsum(items.lengths)]
    for n in cfg.ngram_sizes:
        r = res[n]
        r["pairs"] = pairs_all
        hit = found[r["wkey"]] if r["wkey"].size else np.zeros(0, bool)
        # covered positions: union of [start, start + size) over the windows found in training
        diff = np.zeros(items.units.size + 1, dtype=np.int64)
        np.add.at(diff, r["istart"][hit], 1)
        np.add.at(diff, r["istart"][hit] + r["isize"][hit], -1)
        covered = np.cumsum(diff[:-1]) > 0
        ccount = np.add.reduceat(covered.astype(np.int64), item_off[:-1]) if I else np.zeros(0, np.int64)
        ccount[items.lengths == 0] = 0
        cov = np.where(items.lengths > 0, ccount / np.maximum(items.lengths, 1), 0.0)
        longest = np.zeros(I, dtype=np.int64)
        for i in np.flatnonzero(ccount):
            a_, b_ = _runs(covered[item_off[i] : item_off[i + 1]])
            longest[i] = b_ - a_
        r.update(covered=covered, coverage=cov, longest=longest, hit=hit)
    return res


def _attribute(i: int, r: dict, items: _Items, item_off: np.ndarray, need: float):
    """Training rows covering item i: {row: covered mask}, [(row, covered units)] best first, and the
    responsible rows: taken in that order (skipping rows that add nothing) until together they cover
    `need` of the item (the lower edge of its bucket), so one verbatim copy is one row."""
    L = int(items.lengths[i])
    sel = np.flatnonzero((r["iseg"] == i) & r["hit"])
    pairs = r["pairs"]
    pkey = pairs >> np.int64(32)
    per_row: dict[int, np.ndarray] = {}
    for w in sel:
        k = int(r["wkey"][w])
        lo, hi = np.searchsorted(pkey, k), np.searchsorted(pkey, k, side="right")
        s = int(r["istart"][w] - item_off[i])
        e = s + int(r["isize"][w])
        for row in (pairs[lo:hi] & np.int64(0xFFFFFFFF)).tolist():
            m = per_row.get(row)
            if m is None:
                m = per_row[row] = np.zeros(L, dtype=bool)
            m[s:e] = True
    ranked = sorted(((row, int(m.sum())) for row, m in per_row.items()), key=lambda x: (-x[1], x[0]))
    union = np.zeros(L, dtype=bool)
    responsible = []
    for row, _ in ranked:
        if union.sum() >= need * L - 1e-9:
            break
        if (per_row[row] & ~union).any():
            union |= per_row[row]
            responsible.append(row)
    return per_row, ranked, responsible


def _local_benchmarks(benchmarks: str | os.PathLike | list[str]) -> bool:
    """True for a local benchmark folder, False for a list of Hub names; a path that is not a folder
    is an error (never read as a list of names)."""
    if isinstance(benchmarks, (str, os.PathLike)):
        if not Path(benchmarks).is_dir():
            raise FileNotFoundError(f"contamination: benchmark folder not found: {benchmarks}")
        return True
    return False


def _fingerprint(train_file: Path, tok_path: Path, benchmarks_dir, local: bool, cfg: ContaminationConfig) -> str:
    tok_file = tok_path / TOKENIZER_FILE if tok_path.is_dir() else tok_path
    inputs: dict[str, str | os.PathLike] = {"train": train_file, "tokenizer": tok_file}
    params = cfg.model_dump(mode="json")
    if local:
        inputs["benchmarks"] = benchmarks_dir
    else:  # Hub benchmarks by name
        params["hub_benchmarks"] = sorted(benchmarks_dir)
    return io.fingerprint(STAGE, io.code_closure(sys.modules[__name__]), params, inputs)


def run(
    train_path: str | os.PathLike,
    benchmarks_dir: str | os.PathLike | list[str],
    output_dir: str | os.PathLike,
    cfg: ContaminationConfig | None = None,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    progress: bool = True, versioned: bool = False, force: bool = False,
    map_parts: MapParts | None = None, memory_gb: float | None = None,
) -> dict:
    """Check every benchmark item against the training data; return the stage manifest.

    With `map_parts` (pipeline.parts), the training rows are scanned in row ranges, each a part
    (`scan_part`), merged in row order: the same outputs as the single-process check.

    `benchmarks_dir`: a local benchmark folder, or a list of benchmark names to download from the Hub
    (see `HUB`).

    Streams: memory is bounded by the benchmark side (the index) and one batch of training rows, sized by
    `memory_gb` (`scan_batch_rows`; never part of the fingerprint: the batches do not change the outputs)."""
    from pipeline.stages.tokenize import load_tokenizer, special_ids

    cfg = cfg or ContaminationConfig()
    t0 = time.time()
    local = _local_benchmarks(benchmarks_dir)  # checked before any work
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_file, tok_path = _resolve_training(train_path, tokenizer_path, out, progress, memory_gb)
    fp = _fingerprint(train_file, tok_path, benchmarks_dir, local, cfg)
    out, done = io.open_stage(output_dir, fp, versioned=versioned, force=force)
    if done is not None:
        return done

    tok, meta = load_tokenizer(tok_path)
    special = special_ids(meta).all_ids()
    t_load = time.time()
    if local:
        benches = load_benchmarks(benchmarks_dir, names=cfg.benchmarks, splits=cfg.splits)
    else:
        benches = load_benchmarks(list(benchmarks_dir))
    words = cfg.method == "words"
    items = _word_items(tok, benches) if words else _tokenize_items(tok, benches)
    tbytes = TokenWords(tok, special) if words else None
    load_s = time.time() - t_load
    t_check = time.time()
    scan_cfg = cfg.model_copy(update={"batch_rows": scan_batch_rows(train_file, cfg, memory_gb)})
    res = check(train_file, items, special, scan_cfg, progress, tbytes, map_parts=map_parts, work_dir=out,
                tok_path=tok_path)
    check_s = time.time() - t_check

    # items.parquet
    unit = "words" if words else "tokens"
    cols: dict[str, pa.Array] = {
        "benchmark": pa.array(items.names, pa.string()),
        "item_id": pa.array(items.item_ids, pa.string()),
        "key": pa.array(items.keys, pa.string()),
        "length": pa.array(items.lengths.astype(np.int32)),
    }
    buckets = {n: bucket_of(res[n]["coverage"], cfg) for n in cfg.ngram_sizes}
    item_off = np.r_[0, np.cumsum(items.lengths)]
    if words:  # the short-item rule: a short item is dirty only when one training row holds all of it
        for n in cfg.ngram_sizes:
            for i in np.flatnonzero((items.lengths < 2 * n) & (buckets[n] == "dirty")):
                per_row, _, _ = _attribute(int(i), res[n], items, item_off, cfg.dirty_at)
                if not any(m.all() for m in per_row.values()):
                    buckets[n][i] = "not_dirty"
    p = cfg.primary_n
    cols["coverage"] = pa.array(res[p]["coverage"], pa.float64())
    cols["longest_span"] = pa.array(res[p]["longest"].astype(np.int32))
    cols["bucket"] = pa.array(buckets[p].tolist(), pa.string())
    cols["ngram"] = pa.array(res[p]["size_item"].astype(np.int32))
    for n in cfg.ngram_sizes:
        cols[f"coverage_{n}"] = pa.array(res[n]["coverage"], pa.float64())
        cols[f"longest_span_{n}"] = pa.array(res[n]["longest"].astype(np.int32))
        cols[f"bucket_{n}"] = pa.array(buckets[n].tolist(), pa.string())
    items_table = pa.table(cols)

    # report + attribution (primary n) of every item that is not clean
    pf = pq.ParquetFile(train_file, pre_buffer=False)
    row_recs: list[dict] = []  # records naming a training row: their id and source are read at the end
    names_arr = np.array(items.names, dtype=object)
    edge = {"not_clean": cfg.clean_below, "not_dirty": cfg.not_clean_below, "dirty": cfg.dirty_at}
    drop_from = BUCKETS.index(cfg.decontaminate_at)
    report: dict = {"method": cfg.method, "unit": unit, "primary_n": p, "ngram_sizes": list(cfg.ngram_sizes),
                    "train_rows": pf.metadata.num_rows, "normalisation": NORMALISATION if words else None,
                    "short_item_rule": (SHORT_RULE.format(m=cfg.min_ngram) if words else
                                        "none (Llama-2): an item shorter than n tokens has no n-grams (coverage 0, too_short)"),
                    "bucket_edges": {"clean": f"< {cfg.clean_below}", "not_clean": f"[{cfg.clean_below}, {cfg.not_clean_below})",
                                     "not_dirty": f"[{cfg.not_clean_below}, {cfg.dirty_at})", "dirty": f">= {cfg.dirty_at}"},
                    "decontaminate": cfg.decontaminate, "decontaminate_at": cfg.decontaminate_at,
                    "benchmarks": {}}
    drop: dict[int, str] = {}
    for name, b in benches.items():
        sel = np.flatnonzero(names_arr == name)
        entry: dict = {"split": b.split, "checked": int(sel.size), "by_n": {}}
        for n in cfg.ngram_sizes:
            bk = buckets[n][sel]
            counts = {k: int((bk == k).sum()) for k in BUCKETS}
            size_item = res[n]["size_item"][sel]
            entry["by_n"][str(n)] = {
                "too_short": int((size_item == 0).sum()),
                "short": int((items.lengths[sel] < (n if not words else 2 * n)).sum()),
                "counts": counts,
                "percent": {k: round(100.0 * v / max(sel.size, 1), 3) for k, v in counts.items()},
            }
        flagged = []
        for i in sel[buckets[p][sel] != "clean"]:
            bucket = str(buckets[p][i])
            per_row, ranked, responsible = _attribute(int(i), res[p], items, item_off, edge[bucket])
            L = int(items.lengths[i])

            def row_rec(row: int, c: int, text: bool) -> dict:
                a_, b_ = _runs(per_row[row])
                rec = {"row": row, "id": None, "source": None,
                       "coverage": round(c / max(L, 1), 4), "span": [a_, b_]}
                if text:
                    rec["text"] = items.span_text(int(i), a_, b_)
                row_recs.append(rec)
                return rec

            own = dict(ranked)
            flagged.append({
                "item_id": items.item_ids[i],
                "bucket": bucket,
                "coverage": round(float(res[p]["coverage"][i]), 4),
                "longest_span": int(res[p]["longest"][i]),
                "length": L,
                "ngram": int(res[p]["size_item"][i]),
                "responsible": [row_rec(r_, own[r_], True) for r_ in responsible],
                "top_rows": [row_rec(r_, c, False) for r_, c in ranked[: cfg.top_rows]],
            })
            if BUCKETS.index(bucket) >= drop_from:
                for r_ in responsible:
                    drop.setdefault(r_, f"{items.item_ids[i]} {bucket}")
        entry["flagged_items"] = flagged
        entry["dirty_items"] = [x for x in flagged if x["bucket"] == "dirty"]
        report["benchmarks"][name] = entry
    id_src = _id_source(train_file, {rec["row"] for rec in row_recs} | set(drop))
    for rec in row_recs:
        rec["id"], rec["source"] = id_src[rec["row"]]

    outputs = {ITEMS_FILE: io.write_parquet(items_table, out / ITEMS_FILE)}
    counts = {"items": int(items.lengths.size), "train_rows": pf.metadata.num_rows,
              "dirty": {nm: len(e["dirty_items"]) for nm, e in report["benchmarks"].items()},
              "not_clean": {nm: len(e["flagged_items"]) for nm, e in report["benchmarks"].items()},
              "rows_responsible": len(drop)}  # rows making an item decontaminate_at or worse
    if cfg.decontaminate:
        outputs.update(_decontaminate(train_file, tok_path, out, drop, id_src))
        counts.update(rows_in=pf.metadata.num_rows, rows_removed=len(drop), rows_kept=pf.metadata.num_rows - len(drop))
    report["counts"] = counts
    io.write_json(report, out / REPORT_FILE)
    outputs[REPORT_FILE] = io.file_record(out / REPORT_FILE)
    manifest = {
        "stage": STAGE,
        "fingerprint": fp,
        "params": cfg.model_dump(mode="json"),
        "inputs": {"train": str(train_file), "tokenizer": str(tok_path), "benchmarks": str(benchmarks_dir) if local else list(benchmarks_dir)},
        "outputs": outputs,
        "counts": counts,
    }
    timing = {"total_s": round(time.time() - t0, 3), "benchmarks_s": round(load_s, 3), "check_s": round(check_s, 3)}
    return io.finish_stage(out, manifest, timing)


def _id_source(train_file: Path, rows: set[int]) -> dict[int, tuple[str, str]]:
    """{row: (id, source)} of the given training rows, read from the row groups that hold them only (the
    rows an attribution names: their number is bounded by the benchmark items, not the training rows)."""
    if not rows:
        return {}
    pf = pq.ParquetFile(train_file, pre_buffer=False)
    md = pf.metadata
    first = np.r_[0, np.cumsum([md.row_group(g).num_rows for g in range(md.num_row_groups)])]
    want = np.array(sorted(rows), dtype=np.int64)
    group = np.searchsorted(first, want, side="right") - 1
    out: dict[int, tuple[str, str]] = {}
    for g in np.unique(group).tolist():
        sel = want[group == g]
        t = pf.read_row_group(g, columns=["id", "source"]).take(pa.array(sel - first[g]))
        for r, i, src in zip(sel.tolist(), t.column("id").to_pylist(), t.column("source").to_pylist()):
            out[r] = (i, src)
    return out


def _decontaminate(train_file: Path, tok_path: Path, out: Path, drop: dict[int, str],
                   id_src: dict[int, tuple[str, str]]) -> dict:
    """The training rows without the `drop` rows, batch by batch (memory: one batch, whatever the rows)."""
    pf = pq.ParquetFile(train_file, pre_buffer=False)
    n = pf.metadata.num_rows
    dropped = np.array(sorted(drop), dtype=np.int64)
    outputs = {}
    with io.atomic_path(out / TOKENIZED_FILE) as tmp:
        w = pq.ParquetWriter(tmp, pf.schema_arrow, compression="zstd")
        try:
            row0 = 0
            for b in pf.iter_batches(batch_size=65536):
                k = np.ones(b.num_rows, dtype=bool)
                k[dropped[(dropped >= row0) & (dropped < row0 + b.num_rows)] - row0] = False
                w.write_table(pa.Table.from_batches([b]).filter(pa.array(k)))
                row0 += b.num_rows
        finally:
            w.close()
    outputs[TOKENIZED_FILE] = io.file_record(out / TOKENIZED_FILE, rows=n - len(drop))
    rows = sorted(drop)
    removals = pa.Table.from_pylist(
        [{"id": id_src[r][0], "source": id_src[r][1], "stage": STAGE, "reason": REASON,
          "detail": f"makes benchmark item {drop[r]}", "duplicate_of": None} for r in rows],
        schema=REMOVAL_SCHEMA)
    outputs[REMOVALS_FILE] = io.write_parquet(removals, out / REMOVALS_FILE)
    folder = tok_path if tok_path.is_dir() else tok_path.parent
    for f in (TOKENIZER_FILE, META_FILE):
        if (folder / f).exists():
            shutil.copyfile(folder / f, out / f)
            outputs[f] = io.file_record(out / f)
    return outputs


# ----------------------------------------------------------------------------------------------
# CLI: hrm stage contamination --input TOKENIZER_DIR_OR_ROWS --benchmarks DIR --output DIR
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    import yaml

    ap = argparse.ArgumentParser(prog="hrm stage contamination", description=__doc__.split("\n")[0])
    ap.add_argument("--input", required=True, help="tokenizer stage folder, tokenized.parquet, or rows .jsonl/.parquet")
    ap.add_argument("--benchmarks", default=None, help="folder of <name>/<split>.jsonl benchmark files")
    ap.add_argument("--hub", action="store_true", help="download the benchmarks from the Hugging Face Hub instead")
    ap.add_argument("--output", required=True)
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer folder or tokenizer.json of the training run (rows files without it: the "
                         "pipeline's tokenizer is trained on the rows)")
    ap.add_argument("--decontaminate", action="store_true", help="also write the training rows without the dirty-making ones")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--memory-gb", type=float, default=None,
                    help="memory budget (resources.memory_gb, default 4): sizes the training batches")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    over = {}
    for s in a.set:
        if "=" not in s:
            ap.error(f"--set expects key=value, got {s!r}")
        k, v = s.split("=", 1)
        over[k.strip()] = yaml.safe_load(v)
    if a.decontaminate:
        over["decontaminate"] = True
    try:
        cfg = ContaminationConfig(**over)
    except Exception as e:  # pydantic error naming the field
        print(f"hrm: error: contamination: {e}", file=sys.stderr)
        return 2
    if a.benchmarks is None and not a.hub:
        ap.error("give --benchmarks DIR (local benchmark files) or --hub (download them)")
    bench = a.benchmarks if a.benchmarks is not None else list(cfg.benchmarks or HUB)
    from pipeline.runs import resolve_input

    man = run(resolve_input(a.input, "tokenizer"), bench, a.output, cfg, tokenizer_path=a.tokenizer,
              progress=not a.no_progress, memory_gb=a.memory_gb)
    print(json.dumps({"stage": STAGE, "output": a.output, "counts": man["counts"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
