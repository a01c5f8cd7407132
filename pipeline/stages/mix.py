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


def _window(ptr: int, size: int, n: int) -> np.ndarray:
    """Positions ptr, ptr+1, ... (size of them) in a permutation of n, wrapping around."""
    return (ptr + np.arange(size, dtype=np.int64)) % n


def _token_cap_rows(tok_perm: np.ndarray, ptr: int, cap_tokens: int, limit: int) -> int:
    n = len(tok_perm)
    cums = np.cumsum(tok_perm[_window(ptr, min(limit, n), n)])
    k = int(np.searchsorted(cums, cap_tokens, side="right"))
    return max(1, min(k, limit))


@dataclass
class _Keys:
    """The per-row keys mix needs, in the file's row order."""

    ids: pa.Array  # large_string
    tokens: np.ndarray  # int32: prompt_tokens + response_tokens of one row (sums are taken in int64)
    stratum: np.ndarray  # int32 codes into stratum_names (sorted, so code order = name order)
    rule: np.ndarray  # int32 codes into rule_names
    source: np.ndarray  # int32 codes into source_names
    stratum_names: list[str]
    rule_names: list[str]
    source_names: list[str]

    @property
    def n(self) -> int:
        return len(self.tokens)


def _row_tokens(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """A row's tokens as int32 (int64 only if a row has 2**31 tokens or more)."""
    t = p.astype(np.int64) + r.astype(np.int64)
    return t.astype(np.int32) if not len(t) or t.max() < 2**31 else t


def _read_keys(src: Path, cols: list[str]) -> _Keys:
    pf = pq.ParquetFile(src, pre_buffer=False)
    ids: list[pa.Array] = []
    tokens: list[np.ndarray] = []
    raw: dict[str, list[np.ndarray]] = {"stratum": [], "rule": [], "source": []}
    seen: dict[str, dict[str, int]] = {k: {} for k in raw}
    for i in range(pf.num_row_groups):
        t = pf.read_row_group(i, columns=cols)
        ids.append(t["id"].combine_chunks().cast(pa.large_string()))
        tokens.append(_row_tokens(t["prompt_tokens"].to_numpy(), t["response_tokens"].to_numpy()))
        for k in raw:
            enc = t[k].combine_chunks().dictionary_encode()
            local = np.array([seen[k].setdefault(v, len(seen[k])) for v in enc.dictionary.to_pylist()], np.int32)
            raw[k].append(local[enc.indices.to_numpy(zero_copy_only=False)] if len(local) else np.zeros(0, np.int32))
    names: dict[str, list[str]] = {}
    codes: dict[str, np.ndarray] = {}
    for k in raw:
        first = list(seen[k])  # code of first appearance -> name
        names[k] = sorted(first)
        pos = {v: j for j, v in enumerate(names[k])}
        remap = np.array([pos[v] for v in first], np.int32) if first else np.zeros(0, np.int32)
        codes[k] = remap[np.concatenate(raw[k])] if raw[k] else np.zeros(0, np.int32)
    return _Keys(
        ids=pa.concat_arrays(ids) if ids else pa.array([], pa.large_string()),
        tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
        stratum=codes["stratum"], rule=codes["rule"], source=codes["source"],
        stratum_names=names["stratum"], rule_names=names["rule"], source_names=names["source"],
    )


def _check_unique(ids: pa.Array, by_id: np.ndarray, src: Path, step: int) -> None:
    """Raise if an id is on two rows: `by_id` orders the ids, so a repeat is next to its first."""
    if ids.null_count:
        raise ValueError(f"mix: {src}: row {int(np.flatnonzero(pc.is_null(ids).to_numpy(zero_copy_only=False))[0])}: "
                         f"id is null")
    for s0 in range(0, len(by_id), step):
        rows = by_id[max(0, s0 - 1) : s0 + step]
        c = ids.take(pa.array(rows))
        same = pc.equal(c[1:], c[:-1]).to_numpy(zero_copy_only=False)
        if same.any():
            x = int(np.flatnonzero(same)[0])
            a, b = sorted((int(rows[x]), int(rows[x + 1])))
            raise ValueError(f"mix: {src}: ids are not unique: rows {a} and {b} both have id {c[x].as_py()!r}")


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

    Streams: the tokenized rows are read row group by row group into small per-row keys (the id as
    one Arrow string array, stratum/rule/source codes, the token count; the texts and token lists are
    never read), the permutations are of row indices, and the sample list and the removals are
    gathered and written a batch at a time (`memory_gb` sizes the batches). The outputs do not depend
    on the batch size."""
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
    fp = io.fingerprint(STAGE, io.code_hash(sys.modules[__name__]), params, {"tokenized": src})
    out, done = io.open_stage(output_dir, fp, versioned=versioned, force=force)
    if done is not None:
        return done

    cols = ["id", "source", "stratum", "rule", "prompt_tokens", "response_tokens"]
    names = pq.read_schema(src).names
    missing = [c for c in cols if c not in names]
    if missing:
        raise ValueError(f"mix: {src}: missing column(s) {missing}; expected at least {cols}, found {names}")
    keys = _read_keys(src, cols)
    n_all = keys.n
    if n_all == 0:
        raise ValueError(f"mix: {src} has no rows")
    tokens = keys.tokens

    # strata: contiguous groups of the rows sorted by (stratum, id); stratum codes follow the names' order.
    # The ids are sorted alone (row indices), checked for repeats a batch at a time (neighbours in that
    # order: no hash table of every id), then ordered by stratum with a stable sort.
    row_t = np.int32 if n_all < 2**31 else np.int64
    by_id = pc.sort_indices(keys.ids).to_numpy().astype(row_t)
    _check_unique(keys.ids, by_id, src, budget.batch_rows(memory_gb, 64))
    order = by_id[np.argsort(keys.stratum[by_id], kind="stable")]
    del by_id
    codes = keys.stratum[order]
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(codes)) + 1, [n_all]])
    pairs = np.unique(keys.stratum.astype(np.int64) * len(keys.rule_names) + keys.rule)
    rules_of: dict[int, list[str]] = {}
    for v in pairs.tolist():
        rules_of.setdefault(v // len(keys.rule_names), []).append(keys.rule_names[v % len(keys.rule_names)])
    groups: dict[str, np.ndarray] = {}
    stats: dict[str, StratumStats] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        idx = order[a:b]
        code = int(codes[a])
        name = keys.stratum_names[code]
        labels = rules_of[code]
        if len(labels) != 1:
            raise ValueError(
                f"mix: stratum {name!r} has rows with different rules {sorted(labels)}; one rule per stratum"
            )
        groups[name] = idx
        stats[name] = StratumStats(rows=len(idx), mean_tokens=float(tokens[idx].mean()), rule=labels[0])
    del order, codes

    mp = plan(stats, cfg, rules, max_repeat=max_repeat)

    # per stratum: persistent permutation, epoch windows, copies
    E = cfg.epochs
    epoch_parts: list[list[np.ndarray]] = [[] for _ in range(E)]
    used = np.zeros(n_all, dtype=bool)
    per_stratum: dict[str, dict] = {}
    for name in tqdm(sorted(groups), desc="mix strata", unit="stratum", disable=not progress):
        idx = groups[name]
        sp = mp.strata[name]
        n = len(idx)
        perm = idx[np.random.default_rng(derive_seed(seed, "perm", name)).permutation(n)]
        tok_perm = tokens[perm]
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
            if full == 0:  # downsample: the first x rows of the window; the pointer moves by x
                win = perm[_window(ptr, x, n)]
                ptr = (ptr + x) % n
                sel = [win]
            else:
                win = perm[_window(ptr, w, n)]
                ptr = (ptr + w) % n
                sel = [win] * full
                if x:
                    pick = np.random.default_rng(derive_seed(seed, "extra", name, e)).choice(w, size=x, replace=False)
                    sel.append(win[np.sort(pick)])
            part = np.concatenate(sel) if sel else np.zeros(0, np.int64)
            used[win] = True
            epoch_parts[e].append(part)
            seen_per_epoch.append(int(len(part)))
            seen_tok += int(tokens[part].sum())
        u = used[idx]
        per_stratum[name] = {
            "rule": sp.rule,
            "rows_available": n,
            "tokens_available": int(tokens[idx].sum()),
            "window_rows": cap if sp.cap_tokens is None else None,
            "cap_rows": sp.cap_rows,
            "cap_tokens": sp.cap_tokens,
            "repeat": sp.repeat,
            "unique_rows": int(u.sum()),
            "unique_tokens": int(tokens[idx][u].sum()),
            "seen_rows": int(sum(seen_per_epoch)),
            "seen_tokens": seen_tok,
            "seen_rows_per_epoch": seen_per_epoch,
            "rows_never_used": int(n - u.sum()),
        }
        ps = per_stratum[name]
        ps["effective_repeat"] = ps["seen_tokens"] / ps["unique_tokens"] if ps["unique_tokens"] else 0.0

    # global shuffle per epoch, the sample list written a batch at a time (one chunk per epoch, as the
    # whole table of all epochs was written before)
    ids = keys.ids
    step = budget.batch_rows(memory_gb, row_bytes=max(16.0, ids.nbytes / n_all) * 3)
    seen_rows_per_epoch = []
    with io.RowGroupWriter(out / MIX_FILE, MIX_SCHEMA) as w:
        for e in range(E):
            part = np.concatenate(epoch_parts[e]) if epoch_parts[e] else np.zeros(0, np.int64)
            epoch_parts[e] = []
            part = part[np.random.default_rng(derive_seed(seed, "shuffle", e)).permutation(len(part))]
            seen_rows_per_epoch.append(int(len(part)))
            w.new_chunk()
            for s0 in range(0, len(part), step):
                p = part[s0 : s0 + step]
                w.write(
                    pa.Table.from_arrays(
                        [
                            pa.array(np.full(len(p), e, dtype=np.int32)),
                            pa.array(np.arange(s0, s0 + len(p), dtype=np.int64)),
                            ids.take(pa.array(p)).cast(pa.string()),
                        ],
                        schema=MIX_SCHEMA,
                    )
                )
            del part
    mix_record = w.record

    # removals: never selected
    never = np.flatnonzero(~used)
    detail = {
        name: f"stratum {name!r} (rule {p['rule']!r}): in none of the {E} epoch windows "
        f"({p['unique_rows']} of {p['rows_available']} rows used)"
        for name, p in per_stratum.items()
    }
    details = pa.array([detail.get(x, "") for x in keys.stratum_names], pa.string())
    sources = pa.array(keys.source_names, pa.string())
    with io.RowGroupWriter(out / REMOVALS_FILE, REMOVAL_SCHEMA) as w:
        for s0 in range(0, len(never), step):
            nv = never[s0 : s0 + step]
            w.write(
                pa.Table.from_arrays(
                    [
                        ids.take(pa.array(nv)).cast(pa.string()),
                        sources.take(pa.array(keys.source[nv])),
                        pa.array([STAGE] * len(nv), pa.string()),
                        pa.array(["capped"] * len(nv), pa.string()),
                        details.take(pa.array(keys.stratum[nv])),
                        pa.nulls(len(nv), pa.string()),
                    ],
                    schema=REMOVAL_SCHEMA,
                )
            )
    removals_record = w.record

    unique_tokens = int(tokens[used].sum())
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
            "rows_used": int(used.sum()),
            "rows_capped": int(len(never)),
            "tokens_available": int(tokens.sum()),
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
        "removed_by_reason": {"capped": report["totals"]["rows_capped"]} if len(never) else {},
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
    return io.finish_stage(out, manifest, {"total_s": round(time.time() - t0, 3)})
