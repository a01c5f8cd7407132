"""Stage `mix`: decide which tokenized rows are seen in which epoch, and in what order.

Input: the tokenizer stage folder (`tokenized.parquet`: id, stratum, rule, prompt_tokens,
response_tokens are used). A row's size in tokens is prompt_tokens + response_tokens (the whole
sample, specials included, before any truncation by `pack`).

Semantics
1. Rules. Each row's `rule` column names a `StratumRule` by `rule.label`. "default" (when no rule of
   that name is given) means: no cap, repeat 1, no ratio. An unknown label is an error, and so is a
   stratum whose rows name more than one rule. All rows of a stratum share its rule.
2. Persistent permutation. The rows of each stratum, in id order, are permuted once with a seed
   derived from (mix seed, stratum name): stable across runs, and independent of the other strata
   and of the input row order.
3. Epoch window. Each epoch takes a window of consecutive rows of that permutation, starting where
   the previous epoch's window stopped and wrapping around at the end. Its size is the stratum's cap:
   `cap_rows`, or the rows that fit in `cap_tokens` (taken while the running token sum stays
   <= cap_tokens; at least one row), the smaller of the two when both are set, never more than the
   stratum's rows (so a window holds no row twice). No cap: the window is the whole stratum.
   Capped epochs therefore see different rows: unique rows grow with the epochs (the paper's 40B
   unique tokens seen as about 60B).
4. Repeat r (float, the rule's `repeat`, possibly rescaled by a budget, see 5):
   - r >= 1: the window is used floor(r) times in full, plus a seeded subset (a different one each
     epoch) of frac(r) x window rows.
   - r < 1 (downsampling): only the first r x window rows of the window are used and the pointer
     advances by that many rows, so later epochs go on with rows not seen yet.
   Fractional row counts are rounded with a carry across epochs (round(x * (e+1)) - round(x * e)),
   so over all epochs the counts add up to the planned value.
5. Budget and ratios (`cfg.token_budget` = target seen tokens over all epochs; `rule.ratio` = target
   share of seen tokens). A stratum's natural size is epochs x window tokens x repeat.
   - A ratio belongs to its rule: all strata the rule produced together get ratio x budget tokens,
     split among them in proportion to their natural sizes (every stratum of the rule has its repeat
     multiplied by the same factor).
   - Strata whose rule has no ratio share the rest of the budget, budget x (1 - sum of ratios), in
     proportion to their natural sizes (one common factor on their repeats; it can be < 1).
   - Without a budget, repeats stay as configured.
   Impossible requests fail in `plan`, before any data is written, with the stratum/rule and the
   numbers: a ratio without a budget; ratios adding up to more than 1; ratios adding up to 1 while
   strata without ratio remain, or to less than 1 with no stratum left to take the rest; a ratio whose
   rule has no rows; and any stratum whose effective repeat would exceed `max_repeat` (default 50:
   this is how "a budget larger than the caps allow" or "a ratio the stratum cannot reach" shows up;
   pass a larger `max_repeat`, or None, to allow it). Caps are never raised to meet a budget.
   With token caps and capped windows the planned token counts use the mean row size, so the
   realized seen tokens match the budget in expectation; the report gives realized figures.
6. Order. Each epoch's samples (strata in name order, windows in permutation order, copies after
   each other) are shuffled with a seed derived from (mix seed, epoch).

Outputs
- `mix.parquet`: epoch (int32), order (int64, 0.. within the epoch), id (string, a tokenized row id;
  an id appears several times when repeated). Sorted by (epoch, order).
- `mix_report.json`: the plan, and per stratum: rule, rows available, tokens available, unique rows
  used, unique tokens, seen rows, seen tokens, rows never used ("capped"), planned repeat and
  effective repeat (seen tokens / unique tokens), seen rows per epoch; per rule the realized share;
  totals of unique vs seen tokens.
- `removals.parquet`: rows selected in no epoch, reason "capped" (stage "mix"), so that
  rows_in = rows_used + rows_capped.

`plan(stats_per_stratum, cfg, rules)` needs no data (row counts and mean tokens per row per stratum):
dry runs call it with estimates.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import budget, io
from pipeline.config import MixConfig, StratumRule
from pipeline.schema import REMOVAL_SCHEMA

STAGE = "mix"
MIX_FILE = "mix.parquet"
REPORT_FILE = "mix_report.json"
REMOVALS_FILE = "removals.parquet"
TOKENIZED_FILE = "tokenized.parquet"
DEFAULT_RULE = "default"
MAX_REPEAT = 50.0  # the most times a stratum's unique rows may be seen per epoch, unless allowed
_RATIO_TOL = 1e-6

MIX_SCHEMA = pa.schema(
    [
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("order", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
    ]
)


def derive_seed(seed: int, *parts: Any) -> int:
    """A 64-bit seed from the mix seed and names (stable across runs and platforms)."""
    h = hashlib.sha256(json.dumps([int(seed), *parts], separators=(",", ":")).encode()).digest()
    return int.from_bytes(h[:8], "little")


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


# ----------------------------------------------------------------------------------------------
# the plan (no data needed)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StratumStats:
    rows: int
    mean_tokens: float
    rule: str = DEFAULT_RULE

    @property
    def tokens(self) -> float:
        return self.rows * self.mean_tokens


@dataclass
class StratumPlan:
    stratum: str
    rule: str
    rows: int
    mean_tokens: float
    cap_rows: int | None
    cap_tokens: int | None
    window_rows: float  # capacity window per epoch (estimated from mean_tokens for token caps)
    window_tokens: float
    base_repeat: float  # the rule's repeat
    repeat: float  # effective repeat per epoch window (after budget/ratio scaling)
    ratio: float | None
    natural_tokens: float  # epochs x window tokens x base repeat
    seen_rows: float  # estimates over all epochs
    seen_tokens: float
    unique_rows: float
    unique_tokens: float


@dataclass
class MixPlan:
    epochs: int
    token_budget: int | None
    max_repeat: float | None
    strata: dict[str, StratumPlan] = field(default_factory=dict)
    rules: dict[str, dict] = field(default_factory=dict)

    @property
    def seen_tokens(self) -> float:
        return sum(s.seen_tokens for s in self.strata.values())

    @property
    def unique_tokens(self) -> float:
        return sum(s.unique_tokens for s in self.strata.values())

    def to_dict(self) -> dict:
        return {
            "epochs": self.epochs,
            "token_budget": self.token_budget,
            "max_repeat": self.max_repeat,
            "seen_tokens": self.seen_tokens,
            "unique_tokens": self.unique_tokens,
            "strata": {k: asdict(v) for k, v in sorted(self.strata.items())},
            "rules": dict(sorted(self.rules.items())),
        }


def _rule_table(rules: list[StratumRule]) -> dict[str, StratumRule]:
    table: dict[str, StratumRule] = {}
    for r in rules:
        if r.label in table:
            raise ValueError(f"mix: rule name {r.label!r} is given twice")
        table[r.label] = r
    if DEFAULT_RULE not in table:
        table[DEFAULT_RULE] = StratumRule(match="*", name=DEFAULT_RULE)
    return table


def _as_stats(name: str, v: StratumStats | Mapping[str, Any]) -> StratumStats:
    if isinstance(v, StratumStats):
        st = v
    elif isinstance(v, Mapping):
        unknown = set(v) - {"rows", "mean_tokens", "rule"}
        if unknown or "rows" not in v or "mean_tokens" not in v:
            raise ValueError(
                f"mix.plan: stats for stratum {name!r} need keys rows, mean_tokens (and optionally rule); "
                f"got {sorted(v)}"
            )
        st = StratumStats(int(v["rows"]), float(v["mean_tokens"]), str(v.get("rule", DEFAULT_RULE)))
    else:
        raise TypeError(
            f"mix.plan: stats for stratum {name!r} must be StratumStats or a mapping, got {type(v).__name__}"
        )
    if st.rows < 0 or not (st.mean_tokens >= 0) or (st.rows > 0 and st.mean_tokens <= 0):
        raise ValueError(f"mix.plan: stratum {name!r}: rows={st.rows}, mean_tokens={st.mean_tokens} are not valid")
    return st


def plan(
    stats_per_stratum: Mapping[str, StratumStats | Mapping[str, Any]],
    cfg: MixConfig,
    rules: list[StratumRule],
    *,
    max_repeat: float | None = MAX_REPEAT,
) -> MixPlan:
    """Plan windows and effective repeats per stratum (see the module docstring); raise ValueError
    on impossible requests. `stats_per_stratum`: stratum -> StratumStats(rows, mean_tokens, rule) or a
    mapping with those keys."""
    rt = _rule_table(rules)
    E = cfg.epochs
    B = cfg.token_budget
    stats = {name: _as_stats(name, v) for name, v in sorted(stats_per_stratum.items())}
    for name, st in stats.items():
        if st.rule not in rt:
            raise ValueError(
                f"mix: stratum {name!r} uses rule {st.rule!r}, which is not among the mix rules "
                f"{sorted(rt)} ('{DEFAULT_RULE}' = no cap, repeat 1)"
            )

    # 1. natural sizes
    strata: dict[str, StratumPlan] = {}
    for name, st in stats.items():
        r = rt[st.rule]
        w = float(st.rows)
        if r.cap_rows is not None:
            w = min(w, float(r.cap_rows))
        if r.cap_tokens is not None and st.rows > 0:
            w = min(w, max(1.0, r.cap_tokens / st.mean_tokens))
        wt = w * st.mean_tokens
        strata[name] = StratumPlan(
            stratum=name,
            rule=st.rule,
            rows=st.rows,
            mean_tokens=st.mean_tokens,
            cap_rows=r.cap_rows,
            cap_tokens=r.cap_tokens,
            window_rows=w,
            window_tokens=wt,
            base_repeat=float(r.repeat),
            repeat=float(r.repeat),
            ratio=r.ratio,
            natural_tokens=E * wt * r.repeat,
            seen_rows=0.0,
            seen_tokens=0.0,
            unique_rows=0.0,
            unique_tokens=0.0,
        )

    # 2. budget and ratios
    used_rules = sorted({s.rule for s in strata.values()})
    ratio_rules = {lab: rt[lab].ratio for lab in rt if rt[lab].ratio is not None}
    if ratio_rules and B is None:
        raise ValueError(
            f"mix: rule(s) {sorted(ratio_rules)} set a ratio but mix.token_budget is not set: a ratio is a "
            f"share of the budget, so set token_budget (or remove the ratios)"
        )
    if B is not None:
        total_ratio = sum(ratio_rules.values())
        if total_ratio > 1 + _RATIO_TOL:
            raise ValueError(f"mix: target ratios {ratio_rules} add up to {total_ratio:.4f} > 1")
        for lab in sorted(ratio_rules):
            if sum(s.natural_tokens for s in strata.values() if s.rule == lab) <= 0:
                raise ValueError(
                    f"mix: rule {lab!r} asks for ratio {ratio_rules[lab]} of the budget ({ratio_rules[lab] * B:,.0f} "
                    f"tokens) but no rows use it"
                )
        free = [s for s in strata.values() if s.ratio is None and s.natural_tokens > 0]
        if not free and not ratio_rules:
            raise ValueError(f"mix: token_budget {B:,} is set but no stratum has any tokens")
        rest = B * (1.0 - total_ratio)
        if free and rest <= B * _RATIO_TOL:
            raise ValueError(
                f"mix: ratios add up to {total_ratio:.4f}, so nothing of token_budget {B:,} is left for the "
                f"{len(free)} stratum/strata without a ratio (e.g. {free[0].stratum!r}, rule {free[0].rule!r})"
            )
        if not free and rest > B * _RATIO_TOL:
            raise ValueError(
                f"mix: ratios add up to {total_ratio:.4f} < 1 and every stratum has a ratio, so {rest:,.0f} of "
                f"token_budget {B:,} tokens has no stratum to go to; make the ratios add up to 1 or "
                f"leave some rule without a ratio"
            )
        groups: dict[str | None, list[StratumPlan]] = {}
        for s in strata.values():
            groups.setdefault(s.rule if s.ratio is not None else None, []).append(s)
        for key, members in groups.items():
            target = ratio_rules[key] * B if key is not None else rest
            natural = sum(s.natural_tokens for s in members)
            if natural <= 0:
                continue
            k = target / natural
            for s in members:
                s.repeat = s.base_repeat * k

    # 3. limits
    if max_repeat is not None:
        for s in strata.values():
            if s.repeat > max_repeat * (1 + 1e-12):
                why = (
                    f"its rule {s.rule!r} asks for ratio {s.ratio} of token_budget {B:,}"
                    if s.ratio is not None
                    else (
                        f"token_budget {B:,} (what the strata without a ratio must supply)"
                        if B is not None
                        else "its rule's repeat"
                    )
                )
                raise ValueError(
                    f"mix: stratum {s.stratum!r} would need repeat {s.repeat:.2f} > max_repeat {max_repeat:g}: "
                    f"{why}; its natural size is {s.natural_tokens:,.0f} tokens ({cfg.epochs} epochs x window of "
                    f"{s.window_rows:,.0f} rows = {s.window_tokens:,.0f} tokens x repeat {s.base_repeat:g}, "
                    f"{s.rows:,} rows available). Lower the budget/ratio, raise the cap, or allow a larger max_repeat."
                )

    # 4. estimates
    for s in strata.values():
        per_epoch_unique = s.window_rows * min(1.0, s.repeat)
        s.seen_rows = E * s.window_rows * s.repeat
        s.seen_tokens = s.seen_rows * s.mean_tokens
        s.unique_rows = min(float(s.rows), E * per_epoch_unique)
        s.unique_tokens = s.unique_rows * s.mean_tokens
    out = MixPlan(epochs=E, token_budget=B, max_repeat=max_repeat, strata=strata)
    total_seen = out.seen_tokens
    for lab in used_rules:
        seen = sum(s.seen_tokens for s in strata.values() if s.rule == lab)
        out.rules[lab] = {
            "ratio": rt[lab].ratio,
            "strata": sum(1 for s in strata.values() if s.rule == lab),
            "seen_tokens": seen,
            "share": seen / total_seen if total_seen > 0 else 0.0,
        }
    return out


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------
def _resolve_tokenized(input_path: str | os.PathLike) -> Path:
    p = Path(input_path)
    f = p / TOKENIZED_FILE if p.is_dir() else p
    if not f.exists():
        raise FileNotFoundError(f"mix: {f} not found (expected a tokenizer stage folder)")
    return f


def _wrap(arr: np.ndarray, ptr: int, size: int) -> np.ndarray:
    """arr[ptr], arr[ptr+1], ... (size of them, size <= len(arr)), wrapping around at the end: the values
    of positions (ptr + i) % len(arr), by two slices (no index array)."""
    n = len(arr)
    end = ptr + size
    return arr[ptr:end].copy() if end <= n else np.concatenate([arr[ptr:], arr[: end - n]])


def _token_cap_rows(tok_perm: np.ndarray, ptr: int, cap_tokens: int, limit: int) -> int:
    n = len(tok_perm)
    cums = np.cumsum(_wrap(tok_perm, ptr, min(limit, n)), dtype=np.int64)
    k = int(np.searchsorted(cums, cap_tokens, side="right"))
    return max(1, min(k, limit))


def _code_dtype(k: int) -> type:
    """The smallest signed integer type for codes 0..k-1."""
    return np.int8 if k <= 2**7 else np.int16 if k <= 2**15 else np.int32


def _row_tokens(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """A row's tokens as int32 (int64 only if a row has 2**31 tokens or more)."""
    t = p.astype(np.int64) + r.astype(np.int64)
    return t.astype(np.int32) if not len(t) or t.max() < 2**31 else t


def _utf8(arr: pa.Array) -> tuple[memoryview, np.ndarray]:
    """(bytes, int64 offsets from 0) of a string array."""
    arr = arr.cast(pa.large_string())
    off = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    vals = memoryview(data)[int(off[0]) : int(off[-1])] if data is not None and len(arr) else memoryview(b"")
    return vals, off - off[0]


class _RowFiles:
    """Per-row columns of the tokenized rows in spill files, in row order: the ids (their UTF-8 one after
    the other, `ids`) with their n+1 int64 end offsets (`off`), and the rows' stratum and source codes
    (int32, in order of first appearance). Nothing is kept in memory: `window(r0, r1)` reads the ids of a
    range of rows back (two sequential reads), `codes(kind, r0, r1)` a range of codes."""

    def __init__(self, tmp: Path):
        self.paths = {k: tmp / f"rows.{k}" for k in ("ids", "off", "stratum", "source")}
        self._f = {k: open(p, "wb") for k, p in self.paths.items()}
        self._f["off"].write(np.zeros(1, np.int64).tobytes())
        self.total = 0
        self.n = 0

    def add(self, ids: pa.Array, stratum: np.ndarray, source: np.ndarray) -> None:
        vals, off = _utf8(ids)
        self._f["ids"].write(vals)
        self._f["off"].write((off[1:] + self.total).astype(np.int64).tobytes())
        self._f["stratum"].write(np.asarray(stratum, np.int32).tobytes())
        self._f["source"].write(np.asarray(source, np.int32).tobytes())
        self.total += int(off[-1])
        self.n += len(ids)

    def finish(self) -> None:
        for f in self._f.values():
            f.close()

    def _read(self, kind: str, start: int, size: int) -> pa.Buffer:
        """Bytes of a file, into an Arrow buffer (Arrow's memory pool: not the interpreter's heap, which
        keeps the pages of large freed reads)."""
        buf = pa.allocate_buffer(size)
        with open(self.paths[kind], "rb") as f:
            f.seek(start)
            got = f.readinto(memoryview(buf).cast("B")) if size else 0
        if got != size:
            raise OSError(f"mix: {self.paths[kind]}: short read at byte {start}")
        return buf

    def window(self, r0: int, r1: int) -> pa.Array:
        """The ids of rows r0 .. r1-1 as a large_string array."""
        off = np.frombuffer(self._read("off", 8 * r0, 8 * (r1 - r0 + 1)), np.int64)
        data = self._read("ids", int(off[0]), int(off[-1] - off[0]))
        return pa.Array.from_buffers(pa.large_string(), r1 - r0, [None, pa.py_buffer(off - off[0]), data])

    def codes(self, kind: str, r0: int, r1: int) -> np.ndarray:
        return np.frombuffer(self._read(kind, 4 * r0, 4 * (r1 - r0)), np.int32)


# sizes of the out-of-core steps (the budget sets them; tests raise the bytes per item or lower the floors)
_RUN_ROW_BYTES = 256  # memory per row of a run of the id sort while it is sorted (id, row, tokens, stratum; tests raise it)
_MIN_MERGE_BATCH = 256  # rows per batch of a spilled run
_JOIN_ITEM_BYTES = 512  # memory per row or sample of a range of an epoch's id join (tests raise it)
_RANGE_ITEM_BYTES = 256  # memory per row of a range of the removals (tests raise it)
POS_REC = np.dtype([("pos", "<i8"), ("row", "<i8")])
POS_ID_REC = np.dtype([("pos", "<i8"), ("len", "<i8")])
UNUSED_REC = np.dtype([("row", "<i8"), ("stratum", "<i8")])


def _spread(tmp: Path, kind: str, rec: np.ndarray, key: np.ndarray, size: int, ids: pa.Array | None = None) -> None:
    """Append `rec` (and the UTF-8 of `ids`, one per record) to the range files of key // size."""
    p = key // size
    o = np.argsort(p, kind="stable")
    rec, p = rec[o], p[o]
    if ids is not None:
        vals, off = _utf8(ids.take(pa.array(o)))
    cut = np.flatnonzero(np.diff(p)) + 1
    for a, b in zip([0, *cut.tolist()], [*cut.tolist(), len(p)]):
        io.append_bytes(tmp / f"{kind}-{int(p[a])}", memoryview(np.ascontiguousarray(rec[a:b])).cast("B"))
        if ids is not None:
            io.append_bytes(tmp / f"{kind}ids-{int(p[a])}", vals[int(off[a]) : int(off[b])])


def _load(path: Path, dtype, with_ids: bool = False):
    """A range file's records (and their ids, as a large_string array), the files removed."""
    rec = np.fromfile(path, dtype) if path.exists() else np.zeros(0, dtype)
    path.unlink(missing_ok=True)
    if not with_ids:
        return rec
    id_path = path.with_name(path.name.replace("-", "ids-", 1))
    off = np.zeros(len(rec) + 1, np.int64)
    np.cumsum(rec["len"], out=off[1:])
    data = id_path.read_bytes() if id_path.exists() else b""
    id_path.unlink(missing_ok=True)
    return rec, pa.Array.from_buffers(pa.large_string(), len(rec), [None, pa.py_buffer(off), pa.py_buffer(data)])


class _IdRuns:
    """The ids sorted out of core: runs of rows (as many as the budget allows) are sorted by id in
    memory and, when there is more than one, spilled to one Arrow IPC file in batches; `merge` then
    goes through them all in id order (a k-way merge a batch per run at a time). Each row may carry
    integer columns along (`cols`, as int64)."""

    def __init__(self, path: Path, batch: int):
        self.path, self.batch = path, max(1, int(batch))
        self.mem: tuple | None = None  # the only run, kept in memory
        self.runs: list[tuple[int, int]] = []  # per spilled run: its batches [a, b) in the file
        self._writer = None
        self._nb = 0

    def add(self, ids: pa.Array, first_row: int, last: bool, cols: tuple = ()) -> None:
        """One run: `ids` of the rows first_row, first_row+1, ... (and their `cols`); `last`: no run follows."""
        idx = pc.sort_indices(ids)
        sids = ids.take(idx)
        o = idx.to_numpy().astype(np.int64)
        extra = [np.asarray(c)[o].astype(np.int64) for c in cols]
        rows = o + first_row
        del o
        if last and self._writer is None:
            self.mem = (sids, rows, *extra)
            return
        if self._writer is None:
            self._schema = pa.schema([pa.field("id", pa.large_string()), pa.field("row", pa.int64())]
                                     + [pa.field(f"c{i}", pa.int64()) for i in range(len(extra))])
            self._sink = pa.OSFile(str(self.path), "wb")
            self._writer = pa.ipc.new_file(self._sink, self._schema)
        a = self._nb
        for s0 in range(0, len(rows), self.batch):
            self._writer.write_batch(pa.record_batch(
                [sids.slice(s0, self.batch), *(pa.array(x[s0 : s0 + self.batch]) for x in (rows, *extra))],
                schema=self._schema))
            self._nb += 1
        self.runs.append((a, self._nb))
        if last:
            self._writer.close()
            self._sink.close()

    def merge(self):
        """Yield (ids, rows, *cols) chunks, together all rows in id order (equal ids: in row order)."""
        if self.mem is not None:
            cols = self.mem
            self.mem = None
            for s0 in range(0, len(cols[1]), self.batch):
                yield (cols[0].slice(s0, self.batch), *(c[s0 : s0 + self.batch] for c in cols[1:]))
            return
        if not self.runs:
            return
        with pa.OSFile(str(self.path), "rb") as src:
            reader = pa.ipc.open_file(src)
            nxt = [a for a, _ in self.runs]
            bufs: list[tuple | None] = [None] * len(self.runs)
            while True:
                for k, (a, b) in enumerate(self.runs):  # refill the runs whose batch is used up
                    if bufs[k] is None and nxt[k] < b:
                        rb = reader.get_batch(nxt[k])
                        nxt[k] += 1
                        bufs[k] = (rb.column(0), *(rb.column(i).to_numpy() for i in range(1, rb.num_columns)))
                live = [k for k in range(len(bufs)) if bufs[k] is not None]
                if not live:
                    return
                # every row up to the smallest of the batches' last ids can go: no run has a smaller one left
                bound = min((bufs[k][0][-1].as_py() for k in live), key=lambda s: s.encode())
                parts = []
                for k in live:  # in run order, so that equal ids stay in row order (a stable sort)
                    buf = bufs[k]
                    m = int(pc.sum(pc.less_equal(buf[0], pa.scalar(bound, pa.large_string()))).as_py() or 0)
                    if m:
                        parts.append((buf[0].slice(0, m), *(x[:m] for x in buf[1:])))
                    bufs[k] = (buf[0].slice(m), *(x[m:] for x in buf[1:])) if m < len(buf[1]) else None
                ids_c = pa.concat_arrays([p[0] for p in parts])
                rest = [np.concatenate([p[i] for p in parts]) for i in range(1, len(parts[0]))]
                if len(parts) > 1:
                    o = pc.sort_indices(ids_c)
                    on = o.to_numpy()
                    ids_c, rest = ids_c.take(o), [x[on] for x in rest]
                yield (ids_c, *rest)

    def close(self) -> None:
        if self._writer is not None and not self._sink.closed:
            self._sink.close()
        self.path.unlink(missing_ok=True)


@dataclass
class _Keys:
    """What the read pass leaves: the per-row spill files, and per stratum (codes in name order) its rows
    in id order with their tokens in a file (`stratum_files`), its row count and token sum."""

    files: _RowFiles
    n: int
    row_t: Any  # the dtype of a row number: int32 (int64 from 2**31 rows)
    rec_t: np.dtype  # a stratum file's records: (row, tok)
    stratum_names: list[str]
    source_names: list[str]
    stratum_remap: np.ndarray  # first-appearance code -> code in name order
    source_remap: np.ndarray
    rules_of: dict[int, list[str]]  # stratum code -> the rules its rows name
    stratum_files: dict[int, Path]
    rows_of: np.ndarray  # per stratum code
    tokens_of: np.ndarray


def _read_keys(src: Path, cols: list[str], tmp: Path, memory_gb: float | None, progress: bool) -> _Keys:
    """One pass over the tokenized rows a batch at a time: ids and stratum/source codes written to the
    row files, ids sorted in runs (`_IdRuns`) with their rows' token counts and strata; then the runs
    merged, the ids checked for repeats in id order (a repeat is next to its first), and each stratum's
    rows appended in id order to its file."""
    from tqdm.auto import tqdm

    part = max(budget.MIN_JOIN_PART, budget.usable_bytes(memory_gb) * budget.JOIN_SHARE)
    run_rows = min(budget.MAX_ROWS, max(budget.MIN_ROWS, int(part / _RUN_ROW_BYTES)))  # sorted in memory at once
    run_bytes = max(1 << 20, int(part / 2))
    pf = pq.ParquetFile(src, pre_buffer=False)
    n_all = pf.metadata.num_rows
    files = _RowFiles(tmp)
    runs = _IdRuns(tmp / "runs", batch=max(_MIN_MERGE_BATCH, run_rows // 16))
    try:
        big_tok = False  # a row with 2**31 tokens or more
        seen: dict[str, dict[str, int]] = {k: {} for k in ("stratum", "source", "rule")}
        pairs: set[tuple[int, int]] = set()
        run_ids: list[pa.Array] = []
        run_tok: list[np.ndarray] = []
        run_st: list[np.ndarray] = []
        run_first = run_n = run_b = 0
        done = 0
        bar = tqdm(total=n_all, desc="mix read", unit="row", unit_scale=True, disable=not progress, mininterval=1.0)
        for b in pf.iter_batches(batch_size=min(run_rows, 65536), columns=cols, use_threads=False):
            id_col = b.column("id")
            if id_col.null_count:
                k = int(np.flatnonzero(pc.is_null(id_col).to_numpy(zero_copy_only=False))[0])
                raise ValueError(f"mix: {src}: row {done + k}: id is null")
            id_col = id_col.cast(pa.large_string())
            t = _row_tokens(b.column("prompt_tokens").to_numpy(), b.column("response_tokens").to_numpy())
            big_tok = big_tok or t.dtype == np.int64
            local: dict[str, np.ndarray] = {}
            for k in ("stratum", "source", "rule"):
                enc = b.column(k).dictionary_encode()
                m = np.array([seen[k].setdefault(v, len(seen[k])) for v in enc.dictionary.to_pylist()], np.int32)
                local[k] = m[enc.indices.to_numpy(zero_copy_only=False)] if len(m) else np.zeros(0, np.int32)
            sr = np.unique((local["stratum"].astype(np.int64) << 32) | local["rule"].astype(np.int64))
            pairs.update(zip((sr >> 32).tolist(), (sr & 0xFFFFFFFF).tolist()))
            files.add(id_col, local["stratum"], local["source"])
            run_ids.append(id_col)
            run_tok.append(t)
            run_st.append(local["stratum"])
            run_n += b.num_rows
            run_b += id_col.nbytes
            done += b.num_rows
            bar.update(b.num_rows)
            if (run_n >= run_rows or run_b >= run_bytes) and done < n_all:
                runs.add(pa.concat_arrays(run_ids), run_first, last=False,
                         cols=(np.concatenate(run_tok), np.concatenate(run_st)))
                run_ids, run_tok, run_st, run_first, run_n, run_b = [], [], [], done, 0, 0
        bar.close()
        if run_ids or runs.runs:
            cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
            runs.add(pa.concat_arrays(run_ids) if run_ids else pa.array([], pa.large_string()), run_first, last=True,
                     cols=(cat(run_tok), cat(run_st)))
        del run_ids, run_tok, run_st
        files.finish()
        names: dict[str, list[str]] = {}
        remap: dict[str, np.ndarray] = {}
        for k in ("stratum", "source"):  # first-appearance codes -> codes in name order
            first = list(seen[k])
            names[k] = sorted(first)
            pos = {v: j for j, v in enumerate(names[k])}
            remap[k] = np.array([pos[v] for v in first], np.int64) if first else np.zeros(0, np.int64)
        spos = {v: j for j, v in enumerate(names["stratum"])}
        rule_first = list(seen["rule"])
        rules_of: dict[int, list[str]] = {}
        strat_first = list(seen["stratum"])
        for s, r in sorted(pairs):
            rules_of.setdefault(spos[strat_first[s]], []).append(rule_first[r])
        for v in rules_of.values():
            v.sort()

        # the rows in id order, checked for repeats, appended to their stratum's file (in id order)
        row_t = np.int32 if n_all < 2**31 else np.int64
        rec_t = np.dtype([("row", row_t), ("tok", np.int64 if big_tok else np.int32)])
        n_st = len(names["stratum"])
        rows_of = np.zeros(n_st, np.int64)
        tokens_of = np.zeros(n_st, np.int64)
        stratum_files = {c: tmp / f"stratum-{c}" for c in range(n_st)}
        prev: tuple[Any, int] | None = None  # the last id of the previous chunk, and its row
        for cids, crows, ctok, cst in runs.merge():
            if not len(crows):
                continue
            same = pc.equal(cids[1:], cids[:-1]).to_numpy(zero_copy_only=False)
            if prev is not None and cids[0].as_py() == prev[0]:
                a, b = sorted((prev[1], int(crows[0])))
                raise ValueError(f"mix: {src}: ids are not unique: rows {a} and {b} both have id {prev[0]!r}")
            if same.any():
                x = int(np.flatnonzero(same)[0])
                a, b = sorted((int(crows[x]), int(crows[x + 1])))
                raise ValueError(f"mix: {src}: ids are not unique: rows {a} and {b} both have id {cids[x].as_py()!r}")
            prev = (cids[-1].as_py(), int(crows[-1]))
            c = remap["stratum"][cst]
            o = np.argsort(c, kind="stable")
            c, r, tk = c[o], crows[o], ctok[o]
            cut = np.flatnonzero(np.diff(c)) + 1
            for a, b in zip([0, *cut.tolist()], [*cut.tolist(), len(c)]):
                s = int(c[a])
                rec = np.empty(b - a, rec_t)
                rec["row"], rec["tok"] = r[a:b], tk[a:b]
                io.append_bytes(stratum_files[s], memoryview(rec).cast("B"))
                rows_of[s] += b - a
                tokens_of[s] += int(tk[a:b].sum())
        return _Keys(files=files, n=n_all, row_t=row_t, rec_t=rec_t, stratum_names=names["stratum"],
                     source_names=names["source"], stratum_remap=remap["stratum"], source_remap=remap["source"],
                     rules_of=rules_of, stratum_files=stratum_files, rows_of=rows_of, tokens_of=tokens_of)
    finally:
        runs.close()


def run(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    cfg: MixConfig,
    *,
    rules: list[StratumRule],
    seed: int,
    progress: bool = True, versioned: bool = False, force: bool = False,
    memory_gb: float | None = None,
) -> dict:
    """Select and order the samples of every epoch; return the stage manifest.

    Out of core: what is held per row is only what a permutation needs, one at a time: a stratum's rows
    with their token counts while it is permuted and its epoch windows taken (8 bytes a row of that
    stratum), and an epoch's samples (a row number each) while they are shuffled. The tokenized rows are
    read a batch at a time (the texts and token lists never); their ids, stratum and source codes go to
    spill files in row order; the ids are sorted out of core (sorted runs merged) with each row's token
    count and stratum, and each stratum's rows go in id order to a file of its own. Each epoch's samples
    are spilled until it is shuffled; the shuffled samples are joined to their ids by ranges of rows
    (the id file read a range at a time) and put back in order by ranges of places, and the sample list
    is written a range at a time; the rows never used are written in row order a range of rows at a
    time (`memory_gb` sizes the runs, ranges and batches). The outputs do not depend on the sizes."""
    from tqdm.auto import tqdm

    t0 = time.time()
    out = Path(output_dir)
    seed = cfg.seed if cfg.seed is not None else int(seed)
    max_repeat = cfg.max_repeat
    src = _resolve_tokenized(input_path)
    params = {
        "cfg": cfg.model_dump(),
        "rules": [r.model_dump() for r in rules],
        "seed": seed,
        "max_repeat": max_repeat,
    }
    fp = io.fingerprint(STAGE, io.code_closure(sys.modules[__name__]), params, {"tokenized": src})
    out, done = io.open_stage(output_dir, fp, versioned=versioned, force=force)
    if done is not None:
        return done

    cols = ["id", "source", "stratum", "rule", "prompt_tokens", "response_tokens"]
    names = pq.read_schema(src).names
    missing = [c for c in cols if c not in names]
    if missing:
        raise ValueError(f"mix: {src}: missing column(s) {missing}; expected at least {cols}, found {names}")
    if pq.ParquetFile(src).metadata.num_rows == 0:
        raise ValueError(f"mix: {src} has no rows")
    tmp = out / ".mix-spill"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        keys = _read_keys(src, cols, tmp, memory_gb, progress)
        manifest = _mix(keys, src, out, tmp, cfg, rules, seed, max_repeat, fp, params, memory_gb, progress, tqdm)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return io.finish_stage(out, manifest, {"total_s": round(time.time() - t0, 3)})


def _mix(keys: _Keys, src: Path, out: Path, tmp: Path, cfg: MixConfig, rules, seed: int, max_repeat, fp, params,
         memory_gb, progress: bool, tqdm) -> dict:
    n_all = keys.n
    stats: dict[str, StratumStats] = {}
    code_of: dict[str, int] = {}
    for code, name in enumerate(keys.stratum_names):
        n = int(keys.rows_of[code])
        if n == 0:
            continue
        labels = keys.rules_of[code]
        if len(labels) != 1:
            raise ValueError(
                f"mix: stratum {name!r} has rows with different rules {sorted(labels)}; one rule per stratum"
            )
        code_of[name] = code
        stats[name] = StratumStats(rows=n, mean_tokens=float(np.float64(keys.tokens_of[code]) / n), rule=labels[0])

    mp = plan(stats, cfg, rules, max_repeat=max_repeat)

    # per stratum: persistent permutation, epoch windows, copies; each epoch's samples (row numbers) are
    # appended to its spill file, stratum after stratum; the rows never used go to files by row range
    E = cfg.epochs
    row_t = keys.row_t
    epoch_files = [tmp / f"epoch-{e}" for e in range(E)]
    unused_size = -(-n_all // budget.join_parts(n_all, memory_gb, _RANGE_ITEM_BYTES))
    per_stratum: dict[str, dict] = {}
    sinks = [open(f, "wb") for f in epoch_files]
    try:
        for name in tqdm(sorted(stats), desc="mix strata", unit="stratum", disable=not progress):
            code = code_of[name]
            sp = mp.strata[name]
            # the stratum's (row, tokens) in id order, shuffled together (the same swaps as a shuffle of the
            # rows alone: idx[rng.permutation(n)])
            recs = np.fromfile(keys.stratum_files[code], keys.rec_t)
            keys.stratum_files[code].unlink()
            n = len(recs)
            np.random.default_rng(derive_seed(seed, "perm", name)).shuffle(recs)
            perm, tok_perm = recs["row"], recs["tok"]
            used = np.zeros(n, dtype=bool)  # by place in the permutation
            cap = n if sp.cap_rows is None else min(n, sp.cap_rows)
            r = sp.repeat
            full = int(math.floor(r + 1e-12))
            frac = max(0.0, r - full)
            ptr = 0
            carry_x = 0.0  # cumulative fractional rows planned (extra copies, or the downsampled window)
            carry_n = 0  # cumulative fractional rows taken
            seen_per_epoch = []
            seen_tok = 0
            for e in range(E):
                w = cap
                if sp.cap_tokens is not None:
                    w = _token_cap_rows(tok_perm, ptr, sp.cap_tokens, cap)
                carry_x += frac * w
                x = min(w, max(0, _round(carry_x) - carry_n))
                carry_n += x
                size = x if full == 0 else w  # downsample: the first x rows of the window; the pointer moves by x
                win, win_tok = _wrap(perm, ptr, size), _wrap(tok_perm, ptr, size)
                end = ptr + size
                used[ptr:end] = True
                if end > n:
                    used[: end - n] = True
                ptr = end % n
                k = 0
                if full == 0:
                    sel = [(win, win_tok)]
                else:
                    sel = [(win, win_tok)] * full
                    if x:
                        pick = np.sort(np.random.default_rng(derive_seed(seed, "extra", name, e)).choice(w, size=x, replace=False))
                        sel.append((win[pick], win_tok[pick]))
                for s, st in sel:
                    s.astype(row_t, copy=False).tofile(sinks[e])
                    k += len(s)
                    seen_tok += int(st.sum(dtype=np.int64))
                seen_per_epoch.append(k)
                del win, win_tok, sel
            n_used = int(used.sum())
            for a in range(0, n, unused_size):  # the rows never used, a range of places at a time
                un = a + np.flatnonzero(~used[a : a + unused_size])
                if len(un):
                    rec = np.empty(len(un), UNUSED_REC)
                    rec["row"], rec["stratum"] = perm[un], code
                    _spread(tmp, "unused", rec, rec["row"], unused_size)
                    del rec
            per_stratum[name] = {
                "rule": sp.rule,
                "rows_available": n,
                "tokens_available": int(keys.tokens_of[code]),
                "window_rows": cap if sp.cap_tokens is None else None,
                "cap_rows": sp.cap_rows,
                "cap_tokens": sp.cap_tokens,
                "repeat": sp.repeat,
                "unique_rows": n_used,
                "unique_tokens": int(tok_perm[used].sum(dtype=np.int64)),
                "seen_rows": int(sum(seen_per_epoch)),
                "seen_tokens": seen_tok,
                "seen_rows_per_epoch": seen_per_epoch,
                "rows_never_used": int(n - n_used),
            }
            ps = per_stratum[name]
            ps["effective_repeat"] = ps["seen_tokens"] / ps["unique_tokens"] if ps["unique_tokens"] else 0.0
            del recs, perm, tok_perm, used
    finally:
        for f in sinks:
            f.close()

    # global shuffle per epoch; the shuffled samples joined to their ids by ranges of rows and put back in
    # order by ranges of places; the sample list written a range at a time (one chunk per epoch, as the
    # whole table of all epochs was written before)
    files = keys.files
    mean_id = float(files.total) / max(1, n_all)
    # a batch of samples costs its ids 3 times over (read, taken, cast), and again in the writer's row group buffer
    step = budget.batch_rows(memory_gb, row_bytes=96 + 4 * (mean_id + 8))
    seen_rows_per_epoch = []
    with io.RowGroupWriter(out / MIX_FILE, MIX_SCHEMA) as w:
        for e in range(E):
            m, ranges = _epoch_ids(epoch_files[e], np.random.default_rng(derive_seed(seed, "shuffle", e)), row_t,
                                   files, tmp, memory_gb)
            seen_rows_per_epoch.append(int(m))
            w.new_chunk()
            for pos0, ids in ranges:
                for s0 in range(0, len(ids), step):
                    k = min(step, len(ids) - s0)
                    w.write(
                        pa.Table.from_arrays(
                            [
                                pa.array(np.full(k, e, dtype=np.int32)),
                                pa.array(np.arange(pos0 + s0, pos0 + s0 + k, dtype=np.int64)),
                                ids.slice(s0, k).cast(pa.string()),
                            ],
                            schema=MIX_SCHEMA,
                        )
                    )
    mix_record = w.record

    # removals: never selected (in row order, a range of rows at a time)
    detail = {
        name: f"stratum {name!r} (rule {p['rule']!r}): in none of the {E} epoch windows "
        f"({p['unique_rows']} of {p['rows_available']} rows used)"
        for name, p in per_stratum.items()
    }
    details = pa.array([detail.get(x, "") for x in keys.stratum_names], pa.string())
    sources = pa.array(keys.source_names, pa.string())
    with io.RowGroupWriter(out / REMOVALS_FILE, REMOVAL_SCHEMA) as w:
        for q in range(-(-n_all // unused_size)):
            rec = _load(tmp / f"unused-{q}", UNUSED_REC)
            if not len(rec):
                continue
            rec = rec[np.argsort(rec["row"], kind="stable")]
            r0, r1 = q * unused_size, min(n_all, (q + 1) * unused_size)
            local = rec["row"] - r0
            ids = files.window(r0, r1).take(pa.array(local))
            src_codes = keys.source_remap[files.codes("source", r0, r1)[local]]
            for s0 in range(0, len(rec), step):
                sl = slice(s0, s0 + step)
                w.write(
                    pa.Table.from_arrays(
                        [
                            ids.slice(s0, step).cast(pa.string()),
                            sources.take(pa.array(src_codes[sl])),
                            pa.array([STAGE] * len(rec[sl]), pa.string()),
                            pa.array(["capped"] * len(rec[sl]), pa.string()),
                            details.take(pa.array(rec["stratum"][sl])),
                            pa.nulls(len(rec[sl]), pa.string()),
                        ],
                        schema=REMOVAL_SCHEMA,
                    )
                )
            del rec, local, ids, src_codes
            pa.default_memory_pool().release_unused()  # the freed pages of the range back (mimalloc keeps them)
    removals_record = w.record

    rows_used = sum(p["unique_rows"] for p in per_stratum.values())
    rows_capped = int(n_all - rows_used)
    unique_tokens = sum(p["unique_tokens"] for p in per_stratum.values())
    seen_tokens = sum(p["seen_tokens"] for p in per_stratum.values())
    rules_report = {}
    for lab, info in mp.rules.items():
        seen = sum(p["seen_tokens"] for p in per_stratum.values() if p["rule"] == lab)
        rules_report[lab] = {
            "ratio": info["ratio"],
            "strata": info["strata"],
            "seen_tokens": seen,
            "share": seen / seen_tokens if seen_tokens else 0.0,
        }
    report = {
        "epochs": E,
        "seed": seed,
        "token_budget": cfg.token_budget,
        "max_repeat": max_repeat,
        "totals": {
            "rows_available": n_all,
            "rows_used": rows_used,
            "rows_capped": rows_capped,
            "tokens_available": int(sum(p["tokens_available"] for p in per_stratum.values())),
            "unique_tokens": unique_tokens,
            "seen_rows": int(sum(seen_rows_per_epoch)),
            "seen_tokens": seen_tokens,
            "seen_rows_per_epoch": seen_rows_per_epoch,
            "effective_repeat": seen_tokens / unique_tokens if unique_tokens else 0.0,
            "budget_error": (seen_tokens - cfg.token_budget) / cfg.token_budget if cfg.token_budget else None,
        },
        "rules": rules_report,
        "strata": per_stratum,
        "plan": mp.to_dict(),
    }

    outputs = {
        MIX_FILE: mix_record,
        REPORT_FILE: None,
        REMOVALS_FILE: removals_record,
    }
    io.write_json(report, out / REPORT_FILE)
    outputs[REPORT_FILE] = io.file_record(out / REPORT_FILE)
    assert report["totals"]["rows_used"] + report["totals"]["rows_capped"] == n_all
    counts = {
        "rows_in": n_all,
        "rows_used": report["totals"]["rows_used"],
        "rows_capped": report["totals"]["rows_capped"],
        "removed_by_reason": {"capped": report["totals"]["rows_capped"]} if rows_capped else {},
        "strata": len(per_stratum),
        "epochs": E,
        "seen_rows": report["totals"]["seen_rows"],
        "seen_rows_per_epoch": seen_rows_per_epoch,
        "unique_tokens": unique_tokens,
        "seen_tokens": seen_tokens,
    }
    manifest = {
        "stage": STAGE,
        "fingerprint": fp,
        "params": params,
        "inputs": {"tokenized": str(src)},
        "outputs": outputs,
        "counts": counts,
    }
    return manifest


def _epoch_ids(path: Path, rng: np.random.Generator, row_t, files: _RowFiles, tmp: Path, memory_gb):
    """An epoch's samples (row numbers, from their spill file) shuffled, and their ids in that order:
    (number of samples, an iterator of (first place, ids) ranges in order). When the rows' ids and the
    samples fit in budget.JOIN_SHARE, one range from the whole id file; else the samples go with their
    places to files by range of rows (the shuffled row numbers are then dropped), each range of rows is
    joined to its ids (one window of the id file), and the (place, id) pairs go to files by range of
    places, read back in order."""
    part = np.fromfile(path, dtype=row_t)
    path.unlink()
    rng.shuffle(part)  # = part[rng.permutation(len(part))]
    n, m = files.n, len(part)
    k = budget.join_parts(n + m, memory_gb, _JOIN_ITEM_BYTES)
    if k == 1:
        return m, iter([(0, files.window(0, n).take(pa.array(part)))])
    rr, pr = -(-n // k), -(-max(1, m) // k)
    rec = None
    for s0 in range(0, m, pr):
        rec = np.empty(min(pr, m - s0), POS_REC)
        rec["pos"] = np.arange(s0, s0 + len(rec), dtype=np.int64)
        rec["row"] = part[s0 : s0 + len(rec)]
        _spread(tmp, "byrow", rec, rec["row"], rr)
    del part, rec

    def ranges():
        for q in range(-(-n // rr)):
            rec = _load(tmp / f"byrow-{q}", POS_REC)
            if not len(rec):
                continue
            ids = files.window(q * rr, min(n, (q + 1) * rr)).take(pa.array(rec["row"] - q * rr))
            out = np.empty(len(rec), POS_ID_REC)
            out["pos"] = rec["pos"]
            out["len"] = np.diff(_utf8(ids)[1])
            _spread(tmp, "bypos", out, out["pos"], pr, ids)
            del rec, ids, out
        for q in range(-(-m // pr)):
            rec, ids = _load(tmp / f"bypos-{q}", POS_ID_REC, with_ids=True)
            o = np.argsort(rec["pos"], kind="stable")
            if not np.array_equal(rec["pos"][o], np.arange(q * pr, q * pr + len(rec))):
                raise AssertionError(f"mix: epoch samples {q * pr}..: places lost in the id join")
            yield q * pr, ids.take(pa.array(o))

    return m, ranges()
