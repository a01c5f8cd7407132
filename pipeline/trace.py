"""Trace one row of a run: where it came from, and what every stage did with it.

    trace(run_dir, row_id) -> dict       the full path (what `hrm lineage trace RUN ID --json` prints)
    why(run_dir, row_id) -> str          the short answer (`hrm lineage why RUN ID`)
    format_trace(d) / trace_markdown(d)  a trace as plain text / as markdown (a Prefect artifact)

A row id is the one normalize gives ("<source>/<source row id>", e.g. "wp/17" or "messy/3"). The
trace reads the stage versions the run manifest (`run.json`) names and follows the row through them:

- origin: the raw row in the ingest output (`_file`, `_row`) and the source's record in the ingest
  manifest: a local file and its line (JSONL, 1-based) or row index (Parquet, 0-based) with the file's
  sha256 at ingest; a Hub dataset, config, split, revision and row index; or a generator, its
  parameters, seed and row index. A kept row is found by its id: the row index or `file:index` in the
  id itself, else the source's id field (`fields.id`), matched in the raw rows. A rejected row carries
  `file:index` in its normalize detail.
- normalize: kept (source, origin, condition, domain) or rejected with its reason and detail;
- stratify: stratum, rule and priority;
- dedup: kept (and which rows were removed as its duplicates), or removed: reason, duplicate_of, detail;
- tokenizer: prompt and response tokens (specials included), or removed;
- contamination (when the run has it): removed for the benchmark item it makes dirty, or kept; a
  check-only stage names every item that is not clean the row is responsible for (with its bucket),
  without removing it;
- mix: the (epoch, order) of every time it was selected, or capped;
- pack: every shard, sequence (in the shard and in the whole pack folder, the index the trainer
  reports) and token range [start, end) it was packed at, per epoch; truncation; or removed;
- train: the run manifest's `train` record when it trained on this pack version (its final and
  exported checkpoints).

Files are read by row group, the id column first and the other columns only of row groups holding
the id; shards are memory-mapped and skipped when they hold none of the epochs the mix selected the
row in, so a trace on a large run reads little more than the id columns.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .io import MANIFEST, read_json
from .runs import RunError, find_run_dir, read_run, stage_dir

STAGES = ("ingest", "normalize", "stratify", "dedup", "tokenizer", "contamination", "mix", "pack")
REMOVAL_FILES = ("rejects.parquet", "removals.parquet")
SHOWN = 3  # placements, duplicates, dirty items named in one line
MAX_LISTED = 20  # placements listed by format_trace
TEXT_CHARS = 200  # instruction / response shown in a trace
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")


class TraceError(ValueError):
    """A run or row that cannot be traced; the message says why."""


class UnknownId(TraceError):
    """The id is in no stage of the run; `suggestions` holds similar ids."""

    def __init__(self, message: str, suggestions: list[str]):
        super().__init__(message)
        self.suggestions = suggestions


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def _lookup(path: Path, value: Any, columns: list[str], key: str = "id") -> list[dict]:
    """The rows of a Parquet file whose KEY equals VALUE (their COLUMNS that the file has). The key
    column is read one row group at a time, row groups whose min/max exclude the value are skipped,
    and the other columns are read only from row groups holding a match."""
    if not path.exists():
        return []
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if key not in names:
        raise TraceError(f"{path}: no {key!r} column (columns: {names})")
    cols = [key] + [c for c in columns if c in names and c != key]
    ki = names.index(key)  # flat schemas: the Parquet column index is the Arrow field index
    out: list[dict] = []
    for g in range(pf.num_row_groups):
        st = pf.metadata.row_group(g).column(ki).statistics
        if st is not None and st.has_min_max:
            v = value.encode() if isinstance(value, str) and isinstance(st.min, bytes) else value
            try:
                if not (st.min <= v <= st.max):
                    continue
            except TypeError:
                pass
        keys = pf.read_row_group(g, columns=[key]).column(0)
        hits = pc.indices_nonzero(pc.equal(keys, pa.scalar(value, keys.type)))
        if len(hits):
            out += pf.read_row_group(g, columns=cols).take(hits).to_pylist()
    return out


def _removal(d: Path, row_id: str) -> dict | None:
    """The row's removal record in a stage folder (rejects.parquet or removals.parquet), if any."""
    for name in REMOVAL_FILES:
        hits = _lookup(d / name, row_id, ["reason", "detail", "duplicate_of"])
        if hits:
            return {k: hits[0].get(k) for k in ("reason", "detail", "duplicate_of")}
    return None


def _short(text: str | None, n: int = TEXT_CHARS) -> str | None:
    if text is None or len(text) <= n:
        return text
    return text[: n - 1] + "…"


def _run_root(run_dir: str | os.PathLike) -> Path:
    p = Path(run_dir)
    if not p.exists():
        raise TraceError(f"{run_dir} does not exist")
    root = find_run_dir(p)
    if root is None:
        raise TraceError(f"{run_dir} is not a run folder (no run.json): give the folder `hrm run SPEC -o DIR` wrote")
    return root


def _rel(p: Path, root: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(p)


# ------------------------------------------------------------------------------------------------
# origin: the raw row in the ingest output
# ------------------------------------------------------------------------------------------------
_WHERE = re.compile(r"^(?P<file>.*?):(?P<row>-?\d+): ")


def _raw_row(ingest: Path, source: str, src: dict, row_id: str, where: tuple[str, int] | None) -> dict | None:
    """{"_file", "_row"} of the row's raw record in the ingest output, found from WHERE (a rejected row's
    file and index), from the id itself (no `fields.id`: index or file:index), or by the id field."""
    path = ingest / f"{source}.parquet"
    if not path.exists():
        return None
    local = row_id[len(source) + 1:].removesuffix("#direct")  # a direct copy comes from its row's raw record
    id_field = (src.get("fields") or {}).get("id")
    if where is None and not id_field:
        file, _, idx = local.rpartition(":")
        if not re.fullmatch(r"-?\d+", idx):
            return None
        where = (file or None, int(idx))
    if where is not None:
        file, idx = where
        hits = _lookup(path, idx, ["_file"], key="_row")
        hits = [h for h in hits if file is None or h["_file"] == file]
        return hits[0] if hits else None
    # the source's own id field: the first raw row carrying it (normalize keeps the first of a repeated id)
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    for g in range(pf.num_row_groups):
        if id_field in names:
            t = pf.read_row_group(g, columns=[id_field, "_file", "_row"])
            col = t.column(id_field)
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                if not pa.types.is_integer(col.type):
                    continue
                col = pc.cast(col, pa.string())
            hits = pc.indices_nonzero(pc.equal(pc.utf8_trim_whitespace(col), local))
            if len(hits):
                return t.take(hits.slice(0, 1)).select(["_file", "_row"]).to_pylist()[0]
        elif "_json" in names:  # JSONL: the raw lines; parse only those that contain the id's text
            t = pf.read_row_group(g, columns=["_json", "_file", "_row"])
            cand = pc.indices_nonzero(pc.fill_null(pc.match_substring(t.column("_json"), local), False))
            for i in cand.to_pylist():
                try:
                    obj = json.loads(t.column("_json")[i].as_py())
                except (ValueError, UnicodeDecodeError):
                    continue
                v = obj.get(id_field) if isinstance(obj, dict) else None
                if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip() == local:
                    return {"_file": t.column("_file")[i].as_py(), "_row": t.column("_row")[i].as_py()}
    return None


def _local_file(spec_path: str | None, name: str) -> str | None:
    """The file a local source's ingest recorded as NAME (relative to the source's path)."""
    if not spec_path:
        return None
    base = Path(spec_path).expanduser()
    if base.is_file():
        return str(base) if base.name == name or Path(name).name == base.name else None
    if base.is_dir():
        return str(base / name)
    return None  # a glob: NAME is relative to the files' common folder


def _origin(run: dict, dirs: dict[str, Path], source: str, row_id: str, subset: str | None,
            where: tuple[str, int] | None) -> dict:
    src = next((s for s in (run.get("spec") or {}).get("sources", []) if s.get("name") == source), None)
    out: dict[str, Any] = {"source": source, "subset": subset}
    if src is None:
        out.update(kind=None, found=False, summary=f"source {source!r} (not in the run's spec)")
        return out
    kind = src.get("kind")
    rec: dict = {}
    raw = None
    if "ingest" in dirs:
        try:
            rec = (read_json(dirs["ingest"] / MANIFEST).get("sources") or {}).get(source) or {}
        except (OSError, ValueError):
            rec = {}
        raw = _raw_row(dirs["ingest"], source, src, row_id, where)
    if raw is None and where is not None:
        raw = {"_file": where[0], "_row": where[1]}
    file, row = (raw or {}).get("_file"), (raw or {}).get("_row")
    out.update(kind=kind, found=raw is not None)
    if kind == "local":
        line = file is not None and file.endswith(JSONL_SUFFIXES)
        frec = (rec.get("files") or {}).get(file) or {}
        out.update(path=src.get("path"), file=file, file_path=_local_file(src.get("path"), file) if file else None,
                   sha256=frec.get("sha256"), **({"line": row} if line else {"row": row}))
        at = f"line {row}" if line else f"row {row}"
        what = out["file_path"] or (f"{src.get('path')} ({file})" if file else src.get("path"))
        sha = f" (sha256 {frec['sha256'][:12]}… at ingest)" if frec.get("sha256") else ""
        out["summary"] = f"local file {what} {at}{sha}" if raw else f"local {what} (raw row not found)"
    elif kind == "hub":
        hub = rec.get("hub") or {}
        out.update(dataset=hub.get("path", src.get("path")), config=hub.get("config", src.get("config")),
                   split=hub.get("split", src.get("split")), revision=hub.get("revision", src.get("revision")),
                   resolved_revision=hub.get("resolved_revision"), row=row)
        rev = out["resolved_revision"] or out["revision"] or "default"
        out["summary"] = (f"Hub dataset {out['dataset']} config {out['config']} split {out['split']} revision {rev} "
                          f"row {row if raw else '?'}")
    elif kind == "generator":
        gen = rec.get("generator") or {}
        params = gen.get("params", src.get("params") or {})
        out.update(generator=gen.get("name", src.get("generator")), params=params, seed=gen.get("seed"), row=row)
        ps = ", ".join(f"{k}={v}" for k, v in params.items())
        seed = f"; seed {out['seed']}" if out["seed"] is not None else ""
        out["summary"] = f"generator {out['generator']} ({ps}{seed}) row {row if raw else '?'}"
    else:
        out["summary"] = f"source {source!r} ({kind})"
    if rec.get("license"):
        out["license"] = rec["license"]
    return out


# ------------------------------------------------------------------------------------------------
# pack and train
# ------------------------------------------------------------------------------------------------
def _placements(pack: Path, root: Path, row_id: str, epochs: set[int] | None, expected: int | None,
                warnings: list[str]) -> list[dict]:
    """Where the row was packed: shard, sequence (in the shard and in the pack folder: shards in name
    order, as the trainer numbers them), token range, prompt tokens and epoch; shards holding none of
    EPOCHS are skipped and the scan stops after EXPECTED placements."""
    outputs = read_json(pack / MANIFEST).get("outputs", {})
    names = sorted(n for n in outputs if n.startswith("shard-") and n.endswith(".arrow"))
    found: list[dict] = []
    base = 0
    for name in names:
        rows = int(outputs[name].get("rows", 0))
        eps = outputs[name].get("epochs")
        skip = epochs is not None and eps is not None and not epochs & {int(e) for e in eps}
        if skip or (expected is not None and len(found) >= expected):
            base += rows
            continue
        path = pack / name
        if not path.exists():
            warnings.append(f"{_rel(path, root)} is named in the pack manifest but missing")
            base += rows
            continue
        with pa.memory_map(str(path), "r") as src:
            reader = pa.ipc.open_file(src)
            r0 = 0
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                sids = batch.column("sample_ids")
                hits = pc.indices_nonzero(pc.equal(sids.flatten(), row_id)).to_numpy()
                if len(hits):
                    offs = sids.offsets.to_numpy()
                    offs = offs - offs[0]
                    seqs = np.searchsorted(offs, hits, side="right") - 1
                    starts = batch.column("sample_starts").flatten()
                    lens = batch.column("sample_lengths").flatten()
                    plens = batch.column("prompt_lengths").flatten()
                    ep = batch.column("epoch")
                    for h, s in zip(hits.tolist(), seqs.tolist()):
                        start, n = starts[h].as_py(), lens[h].as_py()
                        found.append({"epoch": ep[s].as_py(), "shard": _rel(path, root), "sequence": r0 + s,
                                      "global_sequence": base + r0 + s, "sample": h - int(offs[s]),
                                      "start": start, "end": start + n, "tokens": n, "prompt_tokens": plens[h].as_py()})
                r0 += batch.num_rows
        base += rows
    return sorted(found, key=lambda x: (x["epoch"], x["global_sequence"], x["start"]))


def _training(run: dict, root: Path, pack_version: str) -> list[dict]:
    """The run manifest's train record(s), and for one that trained on PACK_VERSION its checkpoints."""
    ents = run.get("train")
    ents = ents if isinstance(ents, list) else [ents] if isinstance(ents, dict) else []
    out = []
    for e in ents:
        rec = {k: e.get(k) for k in ("dir", "status", "step", "steps", "preset", "arch", "pack_version")}
        rec["on_this_pack"] = e.get("pack_version") == pack_version
        if rec["on_this_pack"]:
            ck = []
            for kind, p in sorted((e.get("final") or {}).items()):
                ck.append({"checkpoint": f"final/{kind}", "path": p, "exists": (root / p).exists()})
            d = Path(e["dir"]) if e.get("dir") else None
            d = d if d is None or d.is_absolute() else root / d
            if d is not None and (d / "export").is_dir():
                steps = [x for x in (d / "export").iterdir() if re.fullmatch(r"step-\d+", x.name)]
                for x in sorted(steps, key=lambda x: int(x.name.split("-")[1])):
                    for kind in ("ema", "raw"):
                        if (x / kind).exists():
                            ck.append({"checkpoint": f"export/{x.name}/{kind}", "path": _rel(x / kind, root),
                                       "exists": True})
            rec["checkpoints"] = ck
            state = f"{rec['status'] or '?'}, step {rec['step']}/{rec['steps']}"
            names = ", ".join(c["checkpoint"] for c in ck) or "no checkpoint yet"
            rec["summary"] = f"trained on by {rec['dir']} ({state}): {names}"
        else:
            rec["summary"] = (f"{rec['dir']} trained on pack {rec['pack_version']}, not on this pack ({pack_version})")
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------------------
# the trace
# ------------------------------------------------------------------------------------------------
def _consistency(root: Path, ents: dict) -> list[str]:
    """Warnings for stale stages and stages made from other versions than the run now names."""
    out = []
    for st, e in ents.items():
        if not isinstance(e, dict):
            continue
        if e.get("stale"):
            out.append(f"{st} is stale ({e['stale']}): traced as it is; rerun `hrm run SPEC -o {root} --from {st}`")
        for up, ver in (e.get("inputs") or {}).items():
            cur = (ents.get(up) or {}).get("version")
            if cur is not None and ver != cur:
                out.append(f"{st} was made from {up} {ver}, but the run now names {up} {cur}")
    return out


def _suggest(dirs: dict[str, Path], row_id: str, n: int = 5) -> tuple[list[str], list[str]]:
    """(ids like ROW_ID, the run's sources): the same id up to case and spaces, ids ending in it (the
    source left out), then the closest ids sharing the longest prefix with it."""
    ids = []
    for name in ("rows.parquet", "rejects.parquet"):
        f = dirs["normalize"] / name
        if f.exists():
            ids.append(pq.read_table(f, columns=["id"]).column("id").combine_chunks())
    if not ids:
        return [], []
    all_ids = pa.concat_arrays([a.cast(pa.string()) for a in ids])
    sources = sorted(pc.unique(pc.replace_substring_regex(all_ids, r"/.*$", "")).to_pylist())
    q = row_id.strip()
    out: list[str] = []

    def add(arr, limit=n):
        for x in arr[:limit]:
            if x not in out and x != row_id:
                out.append(x)

    add(all_ids.filter(pc.equal(pc.utf8_lower(all_ids), q.lower())).to_pylist())
    for k in range(len(q), 0, -1):
        cand = all_ids.filter(pc.starts_with(all_ids, q[:k]))
        if len(cand) >= n or k == 1:
            add(difflib.get_close_matches(q, cand.slice(0, 50_000).to_pylist(), n=3, cutoff=0.5))
            break
    tail = q.split("/", 1)[1] if "/" in q else q
    if tail:
        add(sorted(all_ids.filter(pc.ends_with(all_ids, "/" + tail)).to_pylist()))
    return out[:n], sources


def trace(run_dir: str | os.PathLike, row_id: str) -> dict:
    """The path of ROW_ID through the run in RUN_DIR (see the module docstring). Raises UnknownId (with
    similar ids) when no stage has it, TraceError/RunError when the run cannot be read."""
    root = _run_root(run_dir)
    run = read_run(root)
    ents = {k: v for k, v in (run.get("stages") or {}).items() if isinstance(v, dict) and "dir" in v}
    dirs = {st: stage_dir(root, st, check=False) for st in (*STAGES, "lineage") if st in ents}
    if "normalize" not in dirs:
        raise TraceError(f"{root}: the run has no normalize output (stages done: {', '.join(ents) or 'none'}); "
                         f"run `hrm run SPEC -o {root}` first")
    warnings = _consistency(root, ents)
    d: dict[str, Any] = {"id": row_id, "run": str(root), "stages": [], "warnings": warnings}
    steps: list[dict] = d["stages"]

    def step(st: str, status: str, summary: str, **kw) -> dict:
        ver = dirs[st].name if st in dirs else None
        rec = {"stage": st, "version": ver, "status": status, "summary": summary, **kw}
        steps.append(rec)
        return rec

    # normalize: kept or rejected (a rejected row can share the id of a kept one: duplicate_id)
    norm = dirs["normalize"]
    kept = _lookup(norm / "rows.parquet", row_id,
                   ["source", "domain", "condition", "origin", "instruction", "response"])
    rejects = _lookup(norm / "rejects.parquet", row_id, ["source", "reason", "detail"])
    if not kept and not rejects:
        sugg, sources = _suggest(dirs, row_id)
        msg = f"{row_id!r} is in no stage of {root}: normalize neither kept nor rejected a row with this id"
        if "/" not in row_id or row_id.split("/", 1)[0] not in sources:
            msg += f" (ids are <source>/<row id>; the run's sources: {', '.join(sources) or 'none'})"
        msg += f"; similar ids: {', '.join(sugg)}" if sugg else "; no similar ids"
        raise UnknownId(msg, sugg)
    rej_where = []
    for r in rejects:
        m = _WHERE.match(r.get("detail") or "")
        rej_where.append((m["file"], int(m["row"])) if m else None)
    if kept:
        k = kept[0]
        source = k["source"]
        origin = _origin(run, dirs, source, row_id, k["origin"].split("/", 1)[-1] if k.get("origin") else None, None)
    else:
        source = rejects[0]["source"]
        origin = _origin(run, dirs, source, row_id, None, rej_where[0])
    d["source"] = source
    d["origin"] = origin
    if "ingest" in dirs:
        step("ingest", "ingested" if origin.get("found") else "not_found", origin["summary"])
    others = []
    for r, w in zip(rejects if kept else rejects[1:], rej_where if kept else rej_where[1:]):
        o = _origin(run, dirs, source, row_id, None, w)
        others.append({"reason": r["reason"], "detail": r["detail"], "origin": o})
    extra = {"other_rows_with_this_id": others} if others else {}
    if not kept:
        r = rejects[0]
        step("normalize", "rejected", f"rejected: {r['reason']} ({r['detail']})", reason=r["reason"],
             detail=r["detail"], duplicate_of=None, **extra)
        return _finish(d, run, root, dirs)
    k = kept[0]
    d["text"] = {"instruction": _short(k["instruction"]), "response": _short(k["response"])}
    also = ""
    if others:
        also = "; other row(s) with this id rejected: " + "; ".join(f"{o['reason']} ({o['detail']})" for o in others)
    step("normalize", "kept", f"kept: source {k['source']}, origin {k['origin']}, condition {k['condition']}, "
         f"domain {k['domain']}{also}", origin=k["origin"], condition=k["condition"], domain=k["domain"], **extra)

    # stratify .. pack: each either keeps the row (with what it added) or removes it
    def removed_here(st: str) -> bool:
        rem = _removal(dirs[st], row_id)
        if rem is None:
            return False
        dup = f" of {rem['duplicate_of']}" if rem.get("duplicate_of") else ""
        det = f" ({rem['detail']})" if rem.get("detail") else ""
        step(st, "removed", f"removed: {rem['reason']}{dup}{det}", **rem)
        return True

    def missing(st: str, what: str) -> None:
        step(st, "missing", f"not in {st}'s {what} and not removed there (the run's lineage does not balance)")

    if "stratify" not in dirs or removed_here("stratify"):
        return _finish(d, run, root, dirs)
    s = _lookup(dirs["stratify"] / "rows.parquet", row_id, ["stratum", "rule", "priority"])
    if not s:
        missing("stratify", "rows.parquet")
        return _finish(d, run, root, dirs)
    s = s[0]
    d["stratum"] = s["stratum"]
    step("stratify", "kept", f"stratum {s['stratum']}, rule {s['rule']!r} (source priority {s['priority']})",
         stratum=s["stratum"], rule=s["rule"], priority=s["priority"])

    if "dedup" not in dirs or removed_here("dedup"):
        return _finish(d, run, root, dirs)
    if not _lookup(dirs["dedup"] / "rows.parquet", row_id, []):
        missing("dedup", "rows.parquet")
        return _finish(d, run, root, dirs)
    dups = _lookup(dirs["dedup"] / "removals.parquet", row_id, ["id", "reason", "detail"], key="duplicate_of")
    txt = "kept"
    if dups:
        named = ", ".join(f"{x['id']} ({x['reason']})" for x in dups[:SHOWN])
        txt += f"; {len(dups)} duplicate(s) removed in its favour: {named}" + (" ..." if len(dups) > SHOWN else "")
    step("dedup", "kept", txt, duplicates_removed=[{k: x[k] for k in ("id", "reason", "detail")} for x in dups])

    if "tokenizer" not in dirs or removed_here("tokenizer"):
        return _finish(d, run, root, dirs)
    t = _lookup(dirs["tokenizer"] / "tokenized.parquet", row_id, ["prompt_tokens", "response_tokens"])
    if not t:
        missing("tokenizer", "tokenized.parquet")
        return _finish(d, run, root, dirs)
    t = t[0]
    step("tokenizer", "kept",
         f"prompt {t['prompt_tokens']} + response {t['response_tokens']} tokens (specials included)",
         prompt_tokens=t["prompt_tokens"], response_tokens=t["response_tokens"])

    # contamination: a removal stage when pack read its rows (decontamination), else a check only
    packed_from = set((ents.get("pack") or ents.get("mix") or {}).get("inputs") or {})
    if "contamination" in dirs:
        if "contamination" in packed_from:
            if removed_here("contamination"):
                return _finish(d, run, root, dirs)
            step("contamination", "kept", "kept: makes no benchmark item dirty")
        else:
            flagged = _flagged_items(dirs["contamination"], row_id)
            items = [f for f, b in flagged if b == "dirty"]
            if flagged:
                by_bucket: dict[str, list[str]] = {}
                for f, b in flagged:
                    by_bucket.setdefault(b, []).append(f)
                named = "; ".join(f"{b} item(s) " + ", ".join(fs[:SHOWN]) + (" ..." if len(fs) > SHOWN else "")
                                  for b, fs in sorted(by_bucket.items(), key=lambda kv: -BUCKET_RANK.get(kv[0], 0)))
                txt = f"checked, not removed (no decontamination): responsible for {named}"
            else:
                txt = "checked: responsible for no benchmark item that is not clean (no decontamination)"
            step("contamination", "checked", txt, dirty_items=items,
                 flagged_items=[{"item": f, "bucket": b} for f, b in flagged])

    if "mix" not in dirs or removed_here("mix"):
        return _finish(d, run, root, dirs)
    sel = sorted((x["epoch"], x["order"]) for x in _lookup(dirs["mix"] / "mix.parquet", row_id, ["epoch", "order"]))
    if not sel:
        missing("mix", "mix.parquet")
        return _finish(d, run, root, dirs)
    per_epoch: dict[int, list[int]] = {}
    for e, o in sel:
        per_epoch.setdefault(e, []).append(o)
    parts = []
    for e, orders in per_epoch.items():
        at = f" (order {', '.join(map(str, orders[:SHOWN]))}{' ...' if len(orders) > SHOWN else ''})"
        parts.append(f"epoch {e} x{len(orders)}{at}")
    step("mix", "selected", f"selected {len(sel)}x: " + "; ".join(parts),
         times_per_epoch={str(e): len(o) for e, o in per_epoch.items()},
         selections=[{"epoch": e, "order": o} for e, o in sel])

    if "pack" not in dirs or removed_here("pack"):
        return _finish(d, run, root, dirs)
    places = _placements(dirs["pack"], root, row_id, set(per_epoch), len(sel), warnings)
    full = t["prompt_tokens"] + t["response_tokens"]
    for p in places:
        p["truncated_tokens"] = max(0, full - p["tokens"])
    if len(places) != len(sel):
        warnings.append(f"the mix selects {row_id} {len(sel)} time(s) but the shards hold it {len(places)} time(s)")
    if not places:
        missing("pack", "shards")
        return _finish(d, run, root, dirs)
    cut = places[0]["truncated_tokens"]
    if len(places) == 1:
        txt = f"packed 1x: {_place(places[0])}"
    else:
        eps = ", ".join(f"epoch {e} x{sum(p['epoch'] == e for p in places)}"
                        for e in sorted({p["epoch"] for p in places}))
        txt = f"packed {len(places)}x ({eps}) in {len({p['shard'] for p in places})} shard(s)"
    step("pack", "packed", txt + (f"; truncated: {cut} response token(s) cut" if cut else ""), placements=places)
    d["train"] = _training(run, root, dirs["pack"].name)
    return _finish(d, run, root, dirs)


BUCKET_RANK = {"not_clean": 1, "not_dirty": 2, "dirty": 3}


def _flagged_items(contam: Path, row_id: str) -> list[tuple[str, str]]:
    """(benchmark:item, bucket) for every item that is not clean and names this row among its responsible
    rows in a check-only contamination stage (older reports list dirty items only)."""
    f = contam / "report.json"
    if not f.exists():
        return []
    out = []
    for name, b in (read_json(f).get("benchmarks") or {}).items():
        for it in b.get("flagged_items", b.get("dirty_items")) or []:
            if any(r.get("id") == row_id for r in it.get("responsible") or []):
                out.append((f"{name}:{it.get('item_id')}", it.get("bucket", "dirty")))
    return out


def _place(p: dict) -> str:
    return f"epoch {p['epoch']} {p['shard']} seq {p['sequence']} tokens [{p['start']}, {p['end']})"


def _finish(d: dict, run: dict, root: Path, dirs: dict[str, Path]) -> dict:
    """The outcome (the stage that decided the row's fate) and a cross-check against lineage.parquet."""
    last = d["stages"][-1]
    if last["status"] in ("removed", "rejected", "missing"):
        out = {"status": last["status"], "stage": last["stage"], "reason": last.get("reason"),
               "detail": last.get("detail"), "duplicate_of": last.get("duplicate_of")}
    elif last["status"] == "packed":
        out = {"status": "packed", "stage": "pack", "times_packed": len(last["placements"])}
    else:
        nxt = [st for st in STAGES if st not in dirs and STAGES.index(st) > STAGES.index(last["stage"])
               and st != "contamination"]
        out = {"status": "in_progress", "stage": last["stage"], "next": nxt[0] if nxt else None}
    d["outcome"] = out
    if "lineage" in dirs and out["status"] != "rejected":
        lin = _lookup(dirs["lineage"] / "lineage.parquet", d["id"], ["status", "stage", "reason", "times_packed"])
        if lin:
            lin = lin[0]
            d["lineage"] = lin
            same = (lin["status"] == out["status"]
                    and (out["status"] != "removed" or (lin["stage"], lin["reason"]) == (out["stage"], out["reason"]))
                    and (out["status"] != "packed" or lin["times_packed"] == out["times_packed"]))
            if not same and out["status"] != "in_progress":
                d["warnings"].append(f"lineage.parquet says {lin['status']} ({lin['stage']}:{lin['reason']}, packed "
                                     f"{lin['times_packed']}x); the stage outputs say {out['status']}")
    d["why"] = _why_lines(d)
    return d


def _why_lines(d: dict) -> list[str]:
    out, last = d["outcome"], d["stages"][-1]
    if out["status"] == "packed":
        places = last["placements"]
        eps = sorted({p["epoch"] for p in places})
        shown = []
        for i, p in enumerate(places[:SHOWN]):  # the first shard with its folder, the next by name
            prev = places[i - 1]["shard"] if i else None
            where = "" if p["shard"] == prev else (Path(p["shard"]).name if prev else p["shard"]) + " "
            shown.append(f"{where}seq {p['sequence']} [{p['start']}, {p['end']})")
        line = (f"packed {len(places)}x (epoch{'s' if len(eps) > 1 else ''} {','.join(map(str, eps))}) in "
                + ", ".join(shown) + (f" (+{len(places) - SHOWN} more)" if len(places) > SHOWN else ""))
        cut = places[0].get("truncated_tokens")
        line += f"; truncated by {cut} tokens" if cut else ""
    elif out["status"] in ("removed", "rejected"):
        dup = f" of {out['duplicate_of']}" if out.get("duplicate_of") else ""
        line = f"{out['status']} at {out['stage']}: {out['reason']}{dup}"
        line += f" ({out['detail']})" if out.get("detail") else ""
    elif out["status"] == "missing":
        line = f"lost at {out['stage']}: {last['summary']}"
    else:
        line = f"kept through {out['stage']}"
        line += f"; the run has no {out['next']} output yet" if out.get("next") else ""
    second = f"from {d['origin']['summary']}"
    trained = [t for t in d.get("train") or [] if t["on_this_pack"]]
    if trained:
        second += "; " + "; ".join(t["summary"] for t in trained)
    return [line, second]


def why(run_dir: str | os.PathLike, row_id: str) -> str:
    """One or two lines: what became of ROW_ID (packed where, or removed where and why) and its origin."""
    return "\n".join(trace(run_dir, row_id)["why"])


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------
def format_trace(d: dict) -> str:
    """A trace as plain text (what `hrm lineage trace` prints)."""
    lines = [f"{d['id']} in {d['run']}", *(f"  {x}" for x in d["why"]), ""]
    w = max(len(s["stage"]) for s in d["stages"])
    for s in d["stages"]:
        lines.append(f"{s['stage']:<{w}}  {s['version'] or '-':<16}  {s['status']:<9} {s['summary']}")
        if s["status"] == "packed" and len(s["placements"]) > 1:
            for p in s["placements"][:MAX_LISTED]:
                lines.append(f"{'':<{w}}  {'':<16}  {'':<9}   {_place(p)}")
            if len(s["placements"]) > MAX_LISTED:
                more = len(s["placements"]) - MAX_LISTED
                lines.append(f"{'':<{w}}  {'':<16}  {'':<9}   ... {more} more (--json lists all)")
    for t in d.get("train") or []:
        lines.append(f"{'train':<{w}}  {t.get('pack_version') or '-':<16}  {t.get('status') or '-':<9} {t['summary']}")
    if d.get("text"):
        lines += ["", f"instruction: {d['text']['instruction']!r}", f"response:    {d['text']['response']!r}"]
    if d["warnings"]:
        lines += ["", *(f"warning: {x}" for x in d["warnings"])]
    return "\n".join(lines)


def _md(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def trace_markdown(d: dict) -> str:
    """A trace as markdown (for a Prefect artifact)."""
    o = d["origin"]
    lines = [f"# Trace of `{d['id']}`", "", f"Run `{d['run']}`", "", *(f"**{_md(x)}**  " for x in d["why"]), "",
             "## Origin", "", *(f"- {k}: `{_md(v)}`" for k, v in o.items() if k != "summary" and v is not None), "",
             "## Stages", "", "| stage | version | status | what happened |", "|---|---|---|---|"]
    for s in d["stages"]:
        lines.append(f"| {s['stage']} | `{s['version'] or '-'}` | {s['status']} | {_md(s['summary'])} |")
    places = next((s["placements"] for s in d["stages"] if s["status"] == "packed"), None)
    if places:
        lines += ["", "## Packed", "",
                  "| epoch | shard | sequence | sequence in pack | tokens | prompt tokens | truncated |",
                  "|---:|---|---:|---:|---|---:|---:|"]
        for p in places:
            lines.append(f"| {p['epoch']} | `{p['shard']}` | {p['sequence']} | {p['global_sequence']} | "
                         f"[{p['start']}, {p['end']}) | {p['prompt_tokens']} | {p['truncated_tokens']} |")
    if d.get("train"):
        lines += ["", "## Training", ""]
        for t in d["train"]:
            lines.append(f"- {_md(t['summary'])}")
            for c in t.get("checkpoints") or []:
                lines.append(f"  - `{c['path']}` ({c['checkpoint']}{'' if c['exists'] else ', missing'})")
    if d.get("text"):
        lines += ["", "## Text", "", f"- instruction: {_md(d['text']['instruction'])}",
                  f"- response: {_md(d['text']['response'])}"]
    if d["warnings"]:
        lines += ["", "## Warnings", "", *(f"- {_md(x)}" for x in d["warnings"])]
    return "\n".join(lines) + "\n"


__all__ = ["trace", "why", "format_trace", "trace_markdown", "TraceError", "UnknownId", "RunError"]
