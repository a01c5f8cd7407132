"""MinHash-LSH near-duplicate kernel: pure numpy, no Python loop per word or per shingle.

The pieces, each usable alone (the dedup stage runs them as separate steps that talk through files):

1. `word_hashes`     texts -> 64-bit hash of every word (W,) and per-document word offsets (D+1,).
   A word is a maximal run of word characters: ASCII letters, digits and '_' plus, in non-ASCII
   texts, Unicode letters, digits and marks (everything else separates words). Lowercased first when
   asked. ASCII texts are handled on the raw UTF-8 bytes in numpy; only non-ASCII texts go through
   Arrow's Unicode kernels first (lowercase, punctuation -> space).
2. `shingle_hashes`  word hashes -> one 32-bit hash per word n-gram (S,) with per-document offsets.
   A document with fewer than n words (but at least one) has a single shingle: all its words.
   A document with no word at all has no shingle (its signature is the EMPTY sentinel).
3. `minhash`         shingles -> (D, P) uint32 signatures with P universal hashes
   h_i(x) = ((a_i * x + b_i) mod 2^64) >> 33 (see `permutations`), the minimum over each document's
   shingles. Computed over groups of ~`block` shingles as (P, block) matrices reduced per document
   with np.minimum.reduceat, so the working set stays in cache.
4. `optimal_bands`, `band_keys`, `candidate_pairs`: LSH banding and the pairs of documents that share
   a bucket in any band (each bucket linked as a star to its smallest document index).
5. `estimated_jaccard`: the fraction of equal signature entries of each pair.
   `shingle_sets`, `set_overlap`: each document's exact set of shingle hashes (the values `minhash`
   takes its minima over) and, for pairs of documents, |A & B| and |A | B|: the exact Jaccard of the
   sets the signatures estimate, for the verification of candidate pairs.
6. `union_find`: connected components of the verified pairs, labelled by their smallest index
   (so when documents are ordered by priority, the label is the document to keep).
   `match_tree`: for each document of a component, the neighbour it is matched with on a shortest
   path of verified pairs to the component's label (the explanation of a removal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

U64 = np.uint64
SIG_SHIFT = U64(33)  # keep the top 31 bits of the 64-bit hash: never equal to EMPTY
EMPTY = np.uint32(0xFFFFFFFF)  # signature value of a document with no shingle
_GOLDEN = U64(0x9E3779B97F4A7C15)
_MIX = U64(0xC2B2AE3D27D4EB4F)
_NON_WORD_UNICODE = r"[^\p{L}\p{N}\p{M}_]+"


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place on a uint64 array (returned for chaining)."""
    h ^= h >> U64(33)
    h *= U64(0xFF51AFD7ED558CCD)
    h ^= h >> U64(33)
    h *= U64(0xC4CEB9FE1A85EC53)
    h ^= h >> U64(33)
    return h


# ------------------------------------------------------------------------------------------------
# 1. words
# ------------------------------------------------------------------------------------------------
def _as_string_array(texts: pa.Array | pa.ChunkedArray | Sequence[str]) -> pa.Array:
    """One string array, nulls as empty texts."""
    texts = _as_pair_array(texts)
    if texts.null_count:
        texts = pc.fill_null(texts, "")
    return texts


def _unicode_prepare(arr: pa.Array, lowercase: bool) -> pa.Array:
    """Non-ASCII rows only: Unicode lowercase and every non-word character replaced by a space, so
    that the byte-level pass below can treat all remaining bytes >= 0x80 as word bytes."""
    non_ascii = pc.invert(pc.string_is_ascii(arr))
    if not pc.any(non_ascii).as_py():
        return arr
    sub = arr.filter(non_ascii)
    if lowercase:
        sub = pc.utf8_lower(sub)
    sub = pc.replace_substring_regex(sub, _NON_WORD_UNICODE, " ")
    return pc.replace_with_mask(arr, non_ascii, sub.cast(arr.type))


def word_hashes(
    texts: pa.Array | pa.ChunkedArray | Sequence[str], lowercase: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Hash every word of every text.

    Returns (hashes, offsets): hashes (W,) uint64, offsets (D+1,) int64 with document d's words at
    hashes[offsets[d]:offsets[d+1]]. Equal words give equal hashes (within and across calls).
    """
    arr = _unicode_prepare(_as_string_array(texts), lowercase)
    D = len(arr)
    off_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    off = np.frombuffer(arr.buffers()[1], off_type)[arr.offset : arr.offset + D + 1].astype(np.int64)
    if D == 0 or off[-1] == off[0]:
        return np.zeros(0, U64), np.zeros(D + 1, np.int64)
    raw = np.frombuffer(arr.buffers()[2], np.uint8)[off[0] : off[-1]]
    off -= off[0]
    N = raw.shape[0]

    # bytes, lowercased (ASCII) into a buffer padded by 8 zero bytes for the 8-byte loads below
    buf = np.zeros(N + 8, np.uint8)
    c = buf[:N]
    if lowercase:
        upper = (raw - np.uint8(65)) < 26  # 'A'..'Z' (uint8 wraps below 'A')
        np.add(raw, upper.view(np.uint8) << 5, out=c)
    else:
        c[:] = raw
    is_word = ((c | np.uint8(0x20)) - np.uint8(97) < 26) | ((c - np.uint8(48)) < 10) | (c == 95) | (c >= 128)

    # word starts/ends; a document boundary always separates words
    prev = np.empty(N, bool)  # (N,) the byte before is a word byte of the same document
    prev[0] = False
    prev[1:] = is_word[:-1]
    prev[off[:-1][off[:-1] < N]] = False
    nxt = np.empty(N, bool)  # (N,) the byte after is a word byte of the same document
    nxt[-1] = False
    nxt[:-1] = is_word[1:]
    nxt[off[1:][off[1:] > 0] - 1] = False
    starts = np.flatnonzero(is_word & ~prev)
    ends = np.flatnonzero(is_word & ~nxt) + 1
    assert starts.shape == ends.shape
    lengths = ends - starts  # (W,)

    # hash: 8 bytes at a time (little-endian unaligned loads), masked to the word's length
    loads = np.ndarray((N + 1,), "<u8", buffer=buf, offset=0, strides=(1,))  # loads[k] = bytes k..k+7
    with np.errstate(over="ignore"):
        h = loads[starts]
        h &= _low_bytes_mask(lengths)
        h ^= lengths.astype(U64) * _GOLDEN
        _fmix64(h)
        longer = np.flatnonzero(lengths > 8)
        j = 8
        while longer.size:  # words longer than 8 bytes: one more 8-byte block per round
            rest = lengths[longer] - j
            block = loads[starts[longer] + j] & _low_bytes_mask(rest)
            h[longer] = _fmix64(h[longer] * _MIX + block)
            longer = longer[rest > 8]
            j += 8
    word_off = np.searchsorted(starts, off).astype(np.int64)  # (D+1,)
    return h, word_off


def joined_word_hashes(
    first: pa.Array | pa.ChunkedArray | Sequence[str],
    second: pa.Array | pa.ChunkedArray | Sequence[str],
    lowercase: bool = True,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`word_hashes` of the texts first[d] + "\n" + second[d] for d in `rows` (default: all, in order),
    without joining them: the newline is a word separator, so the joined text's words are the first
    text's then the second's, each hashed alone (a word's hash depends on its bytes only, and the
    lowercasing and the Unicode preparation act on each character alone). As for the joined texts, a
    null in either column (whose join is null) gives a document without words."""
    a, b = _as_pair_array(first), _as_pair_array(second)
    if len(a) != len(b):
        raise ValueError(f"joined_word_hashes: {len(a)} first texts but {len(b)} second texts")
    if a.null_count or b.null_count:
        null = pc.or_(pc.is_null(a), pc.is_null(b))
        a = pc.if_else(null, pa.scalar("", a.type), a)
        b = pc.if_else(null, pa.scalar("", b.type), b)
    ha, oa = word_hashes(a, lowercase)
    hb, ob = word_hashes(b, lowercase)
    r = np.arange(len(a), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    # document k's words: the segment ha[oa[r_k]:oa[r_k+1]] then hb[ob[r_k]:ob[r_k+1]], gathered from
    # [ha, hb] at once (2k segments)
    lengths = np.empty((r.size, 2), np.int64)
    lengths[:, 0] = oa[r + 1] - oa[r]
    lengths[:, 1] = ob[r + 1] - ob[r]
    starts = np.empty((r.size, 2), np.int64)
    starts[:, 0] = oa[r]
    starts[:, 1] = ob[r] + ha.shape[0]
    seg = lengths.ravel()
    word_off = np.zeros(r.size + 1, np.int64)
    np.cumsum(lengths.sum(axis=1), out=word_off[1:])
    W = int(word_off[-1])
    if W == 0:
        return np.zeros(0, U64), word_off
    seg_start = np.zeros(seg.size, np.int64)  # each segment's first position in the output
    np.cumsum(seg[:-1], out=seg_start[1:])
    src = np.repeat(starts.ravel() - seg_start, seg) + np.arange(W, dtype=np.int64)
    return np.concatenate([ha, hb])[src], word_off


def take_rows(col: pa.Array | pa.ChunkedArray, idx: np.ndarray) -> pa.Array:
    """col[idx] (any order) as one array, taken chunk by chunk: Arrow's take of a chunked string array
    first concatenates all its chunks (a copy of the whole column per call)."""
    idx = np.asarray(idx, np.int64)
    if isinstance(col, pa.Array):
        return col.take(pa.array(idx))
    if col.num_chunks == 1:
        return col.chunk(0).take(pa.array(idx))
    starts = np.cumsum([0] + [len(c) for c in col.chunks])
    which = np.searchsorted(starts, idx, side="right") - 1
    got, where = [], []
    for k in np.unique(which).tolist():
        sel = np.flatnonzero(which == k)
        got.append(col.chunk(k).take(pa.array(idx[sel] - starts[k])))
        where.append(sel)
    if not got:
        return pa.array([], col.type)
    at = np.concatenate(where)
    inv = np.empty_like(at)
    inv[at] = np.arange(at.size)
    out = pa.concat_arrays(got)
    return out if np.array_equal(at, np.arange(at.size)) else out.take(pa.array(inv))


def _as_pair_array(texts) -> pa.Array:
    """A string array with its nulls (no fill: `joined_word_hashes` needs them)."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)
    elif not isinstance(texts, pa.Array):
        texts = pa.array(list(texts), pa.large_string())
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        raise TypeError(f"texts must be strings, got {texts.type}")
    return texts


_BYTE_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(9)], U64)  # keep the low k bytes


def _low_bytes_mask(n: np.ndarray) -> np.ndarray:
    """uint64 masks keeping the low min(n, 8) bytes."""
    return _BYTE_MASKS[np.minimum(n, 8)]


# ------------------------------------------------------------------------------------------------
# 2. shingles
# ------------------------------------------------------------------------------------------------
def _position_keys(ngram: int) -> np.ndarray:
    rng = np.random.default_rng(0x5EED)
    return rng.integers(0, 2**63, ngram, dtype=U64) * U64(2) + U64(1)  # odd 64-bit multipliers


def shingle_hashes(word_h: np.ndarray, word_off: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Hash each word n-gram of each document to 32 bits (held in uint64).

    Returns (shingles (S,) uint64 < 2^32, offsets (D+1,) int64). The hash of an n-gram is
    fmix(sum_j word[j] * K_j) >> 32 with fixed odd K_j, so it depends on the words and their order only.
    """
    assert word_off.ndim == 1 and word_off[0] == 0 and word_off[-1] == word_h.shape[0]
    W = word_h.shape[0]
    nw = np.diff(word_off)  # (D,)
    ns = np.where(nw >= ngram, nw - ngram + 1, (nw > 0).astype(np.int64))  # shingles per document
    soff = np.zeros(nw.shape[0] + 1, np.int64)
    np.cumsum(ns, out=soff[1:])
    S = int(soff[-1])
    K = _position_keys(ngram)
    with np.errstate(over="ignore"):
        padded = np.zeros(W + ngram - 1, U64)
        padded[:W] = word_h
        comb = padded[:W] * K[0]
        for j in range(1, ngram):
            comb += padded[j : W + j] * K[j]
        # shingle s of document d starts at word word_off[d] + (s - soff[d])
        pos = np.repeat(word_off[:-1] - soff[:-1], ns) + np.arange(S, dtype=np.int64)
        out = comb[pos]
        short = np.flatnonzero((nw > 0) & (nw < ngram))
        if short.size:  # the whole document is one shingle: sum over its (fewer than n) words
            widx = np.repeat(word_off[short], nw[short]) + _ranges(nw[short])
            contrib = word_h[widx] * K[_ranges(nw[short])]
            seg = np.zeros(short.size + 1, np.int64)
            np.cumsum(nw[short], out=seg[1:])
            out[soff[short]] = np.add.reduceat(contrib, seg[:-1])
        _fmix64(out)
    out >>= U64(32)
    return out, soff


def _ranges(n: np.ndarray) -> np.ndarray:
    """concat(arange(k) for k in n), vectorised."""
    total = int(n.sum())
    starts = np.zeros(n.shape[0], np.int64)
    np.cumsum(n[:-1], out=starts[1:])
    return np.arange(total, dtype=np.int64) - np.repeat(starts, n)


# ------------------------------------------------------------------------------------------------
# 3. MinHash
# ------------------------------------------------------------------------------------------------
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of num_perm hash functions h(x) = ((a x + b) mod 2^64) >> 33, a and b uniform 64-bit.

    This is Dietzfelbinger's multiply-add-shift family: for 32-bit x it is strongly universal, as
    (a x + b) mod p is, but needs no modular reduction since the product wraps in uint64 for free:
    2 array operations per (hash, shingle) instead of 5-8 for a Mersenne-prime reduction (measured
    about 2.5x faster here), with the same Jaccard estimation error as datasketch's hashes."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(np.uint64).max
    a = rng.integers(0, top, num_perm, dtype=U64, endpoint=True)
    b = rng.integers(0, top, num_perm, dtype=U64, endpoint=True)
    return a, b


def minhash(shingles: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray, block: int = 8192) -> np.ndarray:
    """(D, P) uint32 MinHash signatures: row d, column i = min over document d's shingles x of
    ((a_i x + b_i) mod 2^64) >> 33 (31 bits, so no value equals EMPTY, the row of a document without
    shingles).

    Documents are processed in groups of about `block` shingles as (P, shingles) matrices reduced per
    document with np.minimum.reduceat; a document longer than `block` is processed alone in pieces."""
    (P,) = a.shape
    D = offsets.shape[0] - 1
    assert shingles.shape == (int(offsets[-1]),) and b.shape == (P,) and shingles.dtype == U64
    nonempty = np.flatnonzero(np.diff(offsets) > 0)  # (E,)
    start = offsets[nonempty]
    length = offsets[nonempty + 1] - start
    out = np.empty((P, nonempty.shape[0]), U64)  # (P, E) minimum per non-empty document
    if nonempty.size:
        # groups of consecutive documents whose starts fall in the same window of `block` shingles;
        # a long document is a group of its own
        long = length > block
        window = start // block
        new_group = np.ones(nonempty.shape[0], bool)
        new_group[1:] = (window[1:] != window[:-1]) | long[1:] | long[:-1]
        g_first = np.flatnonzero(new_group)
        g_end = np.append(g_first[1:], nonempty.shape[0])
        a_col, b_col = a[:, None], b[:, None]
        buf = np.empty((P, 2 * block), U64)
        with np.errstate(over="ignore"):
            for k0, k1 in zip(g_first.tolist(), g_end.tolist()):
                s0 = int(start[k0])
                if long[k0]:  # one long document: running minimum over pieces of `block` shingles
                    acc = out[:, k0]
                    acc[:] = ~U64(0)
                    for p0 in range(s0, s0 + int(length[k0]), block):
                        x = shingles[p0 : min(p0 + block, s0 + int(length[k0]))]
                        h = buf[:, : x.shape[0]]
                        np.multiply(a_col, x[None, :], out=h)
                        h += b_col
                        np.minimum(acc, h.min(axis=1), out=acc)
                    continue
                s1 = int(start[k1 - 1] + length[k1 - 1])
                h = buf[:, : s1 - s0]  # (P, n)
                np.multiply(a_col, shingles[None, s0:s1], out=h)
                h += b_col
                np.minimum.reduceat(h, start[k0:k1] - s0, axis=1, out=out[:, k0:k1])
    sig = np.full((D, P), EMPTY, np.uint32)
    sig[nonempty] = (out >> SIG_SHIFT).T
    return sig


@dataclass(frozen=True)
class MinHasher:
    """texts -> (D, num_perm) uint32 signatures, in chunks of documents to bound memory."""

    num_perm: int = 128
    ngram: int = 5
    seed: int = 1
    lowercase: bool = True
    chunk_docs: int = 4096
    a: np.ndarray = field(init=False, repr=False, compare=False)
    b: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        a, b = permutations(self.num_perm, self.seed)
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)

    def signatures(self, texts: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
        arr = _as_string_array(texts)
        D = len(arr)
        sig = np.empty((D, self.num_perm), np.uint32)
        for i in range(0, D, self.chunk_docs):
            part = arr.slice(i, self.chunk_docs)
            wh, wo = word_hashes(part, self.lowercase)
            sh, so = shingle_hashes(wh, wo, self.ngram)
            sig[i : i + len(part)] = minhash(sh, so, self.a, self.b)
        return sig

    def joined_signatures(
        self,
        first: pa.Array | pa.ChunkedArray | Sequence[str],
        second: pa.Array | pa.ChunkedArray | Sequence[str],
        rows: np.ndarray | None = None,
    ) -> np.ndarray:
        """`signatures` of the texts first[d] + "\n" + second[d] for d in `rows` (default: all), equal
        to those of the joined texts (`joined_word_hashes`), in chunks of about chunk_docs documents.
        Rows close together (ascending, few left out) are hashed from slices of the columns; scattered
        rows are taken from them first. Chunked columns are never combined whole (only a chunk's slice
        that spans chunks is)."""
        a, b = (x if isinstance(x, pa.ChunkedArray) else _as_pair_array(x) for x in (first, second))
        r = np.arange(len(a), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        sig = np.empty((r.size, self.num_perm), np.uint32)
        for i in range(0, r.size, self.chunk_docs):
            part = r[i : i + self.chunk_docs]
            lo, hi = int(part.min()), int(part.max()) + 1
            if hi - lo <= 2 * part.size:
                wh, wo = joined_word_hashes(a.slice(lo, hi - lo), b.slice(lo, hi - lo), self.lowercase, part - lo)
            else:
                wh, wo = joined_word_hashes(take_rows(a, part), take_rows(b, part), self.lowercase)
            sh, so = shingle_hashes(wh, wo, self.ngram)
            sig[i : i + part.size] = minhash(sh, so, self.a, self.b)
        return sig


# ------------------------------------------------------------------------------------------------
# 4. LSH, and the similarity of candidate pairs
# ------------------------------------------------------------------------------------------------
def candidate_probability(jaccard: np.ndarray | float, bands: int, rows: int) -> np.ndarray | float:
    """P(two documents with this Jaccard share at least one of `bands` buckets of `rows` rows)."""
    return 1.0 - (1.0 - np.asarray(jaccard, dtype=np.float64) ** rows) ** bands


def optimal_bands(
    threshold: float,
    num_perm: int,
    fp_weight: float = 0.5,
    fn_weight: float = 0.5,
    min_recall: float | None = None,
) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising
    fp_weight * (area under the candidate curve below the threshold)
    + fn_weight * (area above it missed), as datasketch does.

    With `min_recall`, only (bands, rows) whose candidate probability at the threshold itself is at
    least min_recall are considered (a near-dedup that verifies its candidates wants few misses and can
    afford extra candidates); if none reaches it, the one that comes closest is returned."""
    grid = np.linspace(0.0, 1.0, 2001)
    below, above = grid[grid <= threshold], grid[grid >= threshold]
    best: tuple[float, int, int] | None = None
    closest: tuple[float, int, int] | None = None
    for r in range(1, num_perm + 1):
        for bands in range(1, num_perm // r + 1):
            p_t = float(candidate_probability(threshold, bands, r))
            if closest is None or p_t > closest[0]:
                closest = (p_t, bands, r)
            if min_recall is not None and p_t < min_recall:
                continue
            fp = np.trapezoid(candidate_probability(below, bands, r), below)
            fn = np.trapezoid(1.0 - candidate_probability(above, bands, r), above)
            err = fp_weight * fp + fn_weight * fn
            if best is None or err < best[0]:
                best = (err, bands, r)
    if best is None:
        assert closest is not None
        return closest[1], closest[2]
    return best[1], best[2]


def band_keys(sig: np.ndarray, bands: int, rows: int, block: int = 1024) -> np.ndarray:
    """(bands, D) uint64 bucket key of each band (`rows` signature entries) of each signature."""
    D, P = sig.shape
    if bands * rows > P:
        raise ValueError(f"bands*rows = {bands}*{rows} exceeds the signature length {P}")
    keys = np.empty((bands, D), U64)
    seed = (np.arange(1, bands + 1, dtype=U64) * _GOLDEN)[:, None]
    with np.errstate(over="ignore"):
        for d0 in range(0, D, block):  # transposed a block at a time, in cache
            cols = np.ascontiguousarray(sig[d0 : d0 + block, : bands * rows].T)  # (bands*rows, n)
            cols = cols.reshape(bands, rows, -1)
            h = np.repeat(seed, cols.shape[2], axis=1)  # (bands, n)
            for c in range(rows):
                h ^= cols[:, c, :]
                h *= _MIX
                h ^= h >> U64(29)
            keys[:, d0 : d0 + block] = _fmix64(h)
    return keys


def candidate_pairs(keys: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(E, 2) int64 unique pairs (u < v) of documents sharing a bucket in at least one band;
    keys (bands, D) from `band_keys`.

    A bucket with members m0 < m1 < ... gives the star (m0, m1), (m0, m2), ...: linear in the bucket
    size, and the union-find joins the whole bucket through m0. (When pairs are verified, a link
    between two members that m0 is not similar to is lost in that band; such pairs nearly always
    share another band.) `valid` (D,) bool leaves documents out (e.g. those without shingles)."""
    bands, D = keys.shape
    idx = np.arange(D, dtype=np.int64) if valid is None else np.flatnonzero(valid)
    low_mask = U64((1 << 20) - 1)
    marked = np.zeros(1 << 20, bool)  # a filter on the low 20 bits of the shared keys
    edges = []
    for j in range(bands):
        k = keys[j] if valid is None else keys[j, idx]  # (n,)
        sk = np.sort(k)
        shared = np.unique(sk[1:][sk[1:] == sk[:-1]])  # keys of the buckets with 2+ members
        if shared.size == 0:
            continue
        # members of those buckets: a cheap filter first, then an exact lookup of the few left
        low = (shared & low_mask).astype(np.intp)
        marked[low] = True
        maybe = np.flatnonzero(marked[(k & low_mask).astype(np.intp)])
        marked[low] = False
        found = shared[np.searchsorted(shared, k[maybe]).clip(max=shared.size - 1)] == k[maybe]
        members = maybe[found]  # ascending positions
        mk = k[members]
        o = np.argsort(mk, kind="stable")  # by bucket, then by position
        members, mk = members[o], mk[o]
        first = np.ones(members.size, bool)
        np.not_equal(mk[1:], mk[:-1], out=first[1:])
        m0 = members[first][np.cumsum(first) - 1]  # (members,) smallest member of its bucket
        edges.append(np.stack([idx[m0[~first]], idx[members[~first]]], axis=1))
    if not edges:
        return np.zeros((0, 2), np.int64)
    e = np.concatenate(edges)
    code = np.unique(e[:, 0] * np.int64(D) + e[:, 1])
    return np.stack([code // D, code % D], axis=1)


def estimated_jaccard(sig_u: np.ndarray, sig_v: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """(E,) float32: fraction of equal entries of paired signature rows sig_u[i], sig_v[i]."""
    assert sig_u.shape == sig_v.shape
    E, P = sig_u.shape
    out = np.empty(E, np.float32)
    for i in range(0, E, chunk):
        out[i : i + chunk] = np.count_nonzero(sig_u[i : i + chunk] == sig_v[i : i + chunk], axis=1) / P
    return out


def shingle_sets(
    texts: pa.Array | pa.ChunkedArray | Sequence[str], ngram: int, lowercase: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Each document's set of shingle hashes: the values `minhash` is computed from (same words, same
    n-grams, same 32-bit hashes), each once, sorted.

    Returns (values (S,) uint64 < 2^32, offsets (D+1,) int64): document d's set is
    values[offsets[d]:offsets[d+1]]."""
    wh, wo = word_hashes(texts, lowercase)
    sh, so = shingle_hashes(wh, wo, ngram)
    D = so.shape[0] - 1
    doc = np.repeat(np.arange(D, dtype=U64), np.diff(so))  # (S,) document of each shingle
    key = np.sort((doc << U64(32)) | sh)  # by document, then value (np.sort: np.unique hashes, 10x slower)
    first = np.ones(key.shape[0], bool)
    np.not_equal(key[1:], key[:-1], out=first[1:])
    key = key[first]  # each (document, value) once
    offsets = np.searchsorted(key >> U64(32), np.arange(D + 1, dtype=U64)).astype(np.int64)  # (D+1,)
    return key & U64(0xFFFFFFFF), offsets


def set_overlap(
    values: np.ndarray, offsets: np.ndarray, u: np.ndarray, v: np.ndarray, block: int = 1 << 22
) -> tuple[np.ndarray, np.ndarray]:
    """(|A_i & B_i|, |A_i | B_i|), each (E,) int64, for the sets A_i = set u[i], B_i = set v[i] of a
    `shingle_sets` result.

    No Python loop per pair: the sets of a block of pairs (about `block` values) are tagged with the
    pair's position, (position << 32) | value, which leaves the u-side and the v-side keys each sorted;
    a binary search of the u-side keys among the v-side keys counts the common values of every pair."""
    assert u.shape == v.shape and u.ndim == 1
    E = u.shape[0]
    lu = offsets[u + 1] - offsets[u]  # (E,) set sizes
    lv = offsets[v + 1] - offsets[v]
    inter = np.zeros(E, np.int64)
    total = np.cumsum(lu + lv)  # (E,) values up to and including each pair
    e0 = 0
    while e0 < E:  # pairs [e0, e1) hold about `block` values (a pair with more is a block alone)
        done = int(total[e0 - 1]) if e0 else 0
        e1 = max(e0 + 1, int(np.searchsorted(total, done + block, "right")))
        ku = _tagged(values, offsets, u[e0:e1], lu[e0:e1])  # (values of the u sides,) sorted
        kv = _tagged(values, offsets, v[e0:e1], lv[e0:e1])
        if kv.size:
            found = kv[np.searchsorted(kv, ku).clip(max=kv.size - 1)] == ku
            inter[e0:e1] = np.bincount((ku[found] >> U64(32)).astype(np.int64), minlength=e1 - e0)
        e0 = e1
    return inter, lu + lv - inter


def _tagged(values: np.ndarray, offsets: np.ndarray, docs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(position << 32) | value for the values of the sets of docs[0], docs[1], ... in turn: sorted,
    since each set is."""
    at = np.repeat(offsets[docs], lengths) + _ranges(lengths)
    return (np.repeat(np.arange(docs.shape[0], dtype=U64), lengths) << U64(32)) | values[at]


# ------------------------------------------------------------------------------------------------
# 5. clusters
# ------------------------------------------------------------------------------------------------
def union_find(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of `pairs` over n nodes: (n,) int64 root = smallest node of the component.

    Vectorised union-find: every round finds the roots of all edge ends (full path compression by
    pointer jumping), hooks each larger root under the smallest root it is joined to, and keeps only
    the edges whose ends are still in different trees."""
    parent = np.arange(n, dtype=np.int64)
    if pairs.shape[0] == 0:
        return parent
    u, v = pairs[:, 0].copy(), pairs[:, 1].copy()
    while True:
        _compress(parent)
        ru, rv = parent[u], parent[v]
        apart = ru != rv
        if not apart.any():
            return parent
        u, v, ru, rv = u[apart], v[apart], ru[apart], rv[apart]
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))


def _compress(parent: np.ndarray) -> None:
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return
        parent[:] = grand


def match_tree(root: np.ndarray, pairs: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each document, the neighbour in `pairs` (E, 2) it is matched with on a shortest path of pairs
    to its root (`union_find` of the same pairs): (match (n,) int64, itself for a root; edge (n,) int64,
    the row of `pairs` that joins them, -1 for a root).

    Breadth-first from the roots, one vectorised round per step of distance: a document first reached
    in round k is matched with the neighbour reached in round k-1 whose pair has the highest `weight`
    (E,) (ties: the smallest neighbour). A document paired with its root is matched with the root."""
    (n,) = root.shape
    E = weight.shape[0]
    assert pairs.shape == (E, 2)
    match = np.arange(n, dtype=np.int64)
    edge = np.full(n, -1, np.int64)
    depth = np.where(root == match, 0, -1)  # (n,) rounds from the root, -1 while not reached
    src = np.concatenate([pairs[:, 0], pairs[:, 1]]).astype(np.int64)  # (2E,) both directions
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]]).astype(np.int64)
    eid = np.concatenate([np.arange(E), np.arange(E)])
    order = np.lexsort((src, -np.concatenate([weight, weight]), dst))  # by destination, best first
    src, dst, eid = src[order], dst[order], eid[order]
    k = 0
    while src.size:
        open_ = depth[dst] < 0
        src, dst, eid = src[open_], dst[open_], eid[open_]
        step = np.flatnonzero(depth[src] == k)
        if step.size == 0:
            break
        d = dst[step]
        first = np.ones(step.size, bool)  # the best edge into each newly reached document
        np.not_equal(d[1:], d[:-1], out=first[1:])
        match[d[first]] = src[step[first]]
        edge[d[first]] = eid[step[first]]
        depth[d[first]] = k + 1
        k += 1
    assert (depth >= 0).all(), "a document not connected to its root"
    return match, edge
