"""The run report: one self-contained HTML page and its JSON, for a run folder.

    hrm report runs/demo            # writes runs/demo/report/index.html and report.json

`write_report(run_dir, out_dir=None)` reads what a run folder records (`run.json`, the stage manifests,
`lineage.json`, `mix_report.json`, the contamination `report.json`, the train folder's `metrics.jsonl` and
records, the evaluations' `results.json`) and writes:

- `report.json`: everything the page shows, as numbers (`collect`);
- `index.html`: the page (`render_html`). It opens without a network: inline CSS and inline SVG only, no
  scripts, fonts, images or links to fetch (a Content-Security-Policy meta tag says so to the browser).

Sections (each an element with an id): `summary` (key numbers), `flow` (a Sankey diagram: sources on the
left, one band per source through every removal stage, removed rows peeling off to a node per stage,
packed rows on the right; widths proportional to rows), `stages` (versions, inputs, stale flags and
counts), `sources` and `strata` (the lineage tables with removal reasons, exactly as lineage.json has
them), `removal-examples`, `tokens` (unique vs seen tokens per stratum), `training` (loss vs step),
`shards` (which pack version and shard files fed which checkpoint), `contamination` (per benchmark:
buckets, dirty items and the training sources responsible) and `scores` (full vs clean, n per task, a
LIMITED label for limited evaluations). A part of the run that has not happened yet gets a note saying
so and the command that makes it.

Key numbers carry `data-*` attributes (and the summary numbers stable ids: `rows-ingested`,
`rows-stratified`, `rows-packed`, `rows-removed`), so the page can be checked against the JSON it
was made from. All text is HTML-escaped.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from .io import atomic_path, read_json, sha256_json, write_json
from .runs import DATA_STAGES, read_run

REPORT_DIR = "report"
REMOVAL_ORDER = ("normalize", "stratify", "dedup", "tokenizer", "contamination", "mix", "pack")
MAX_POINTS = 1000      # points of the training curve kept in report.json and drawn
MAX_DIRTY_SHOWN = 20   # dirty items listed per benchmark on the page (all are in report.json)
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#ff9da7",
           "#86bcb6", "#e15759", "#8cd17d", "#d4a6c8", "#a0cbe8", "#ffbe7d", "#bab0ac")
REMOVED_COLOR = "#c0504d"
BUCKETS = ("clean", "not_clean", "not_dirty", "dirty")  # the contamination stage's buckets, in order


# ------------------------------------------------------------------------------------------------
# reading the run
# ------------------------------------------------------------------------------------------------
def _json_or_none(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError):
        return None


def _under(run_dir: Path, p: str | os.PathLike | None) -> Path | None:
    if not p:
        return None
    p = Path(p)
    return p if p.is_absolute() else run_dir / p


def _rel(run_dir: Path, p: str | os.PathLike | None) -> str | None:
    if p is None:
        return None
    try:
        return str(Path(p).resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(p)


def _stages(run_dir: Path, run: dict) -> list[dict]:
    """One record per stage named by the run manifest, in flow order: version, inputs, stale flag and
    the counts of its manifest (None when the folder or its manifest is missing)."""
    ents = run.get("stages", {}) or {}
    out = []
    for st in [s for s in DATA_STAGES if s in ents] + [s for s in ents if s not in DATA_STAGES]:
        ent = ents[st] if isinstance(ents[st], dict) else {}
        d = _under(run_dir, ent.get("dir"))
        man = _json_or_none(d / "manifest.json") if d is not None else None
        out.append({"stage": st, "dir": ent.get("dir"), "version": ent.get("version"),
                    "fingerprint": ent.get("fingerprint"), "inputs": ent.get("inputs") or {},
                    "stale": ent.get("stale") or None, "missing": man is None,
                    "counts": (man or {}).get("counts")})
    return out


def _stage_path(run_dir: Path, run: dict, stage: str) -> Path | None:
    ent = (run.get("stages") or {}).get(stage)
    d = _under(run_dir, ent.get("dir")) if isinstance(ent, dict) else None
    return d if d is not None and d.is_dir() else None


def _decontaminated(run_dir: Path, run: dict) -> bool:
    """Whether the pack read the contamination stage's rows (decontamination on), as the lineage counts it."""
    pack, con = _stage_path(run_dir, run, "pack"), _stage_path(run_dir, run, "contamination")
    if pack is None or con is None:
        return False
    tok = (_json_or_none(pack / "manifest.json") or {}).get("inputs", {}).get("tokenized")
    return tok is not None and Path(tok).resolve() == con.resolve()


def flow(lineage: dict, stages_run: Iterable[str] = ()) -> dict:
    """The Sankey's numbers from lineage.json: per source, the rows left after each removal stage
    (`kept[0]` = ingested, `kept[j]` = after columns[j]) and the rows each stage removed, by reason.
    The stages are the removal stages the run has (STAGES_RUN) and those the lineage counts removals in."""
    per_source = lineage.get("per_source", {})
    seen = {"normalize"} | {k.split(":", 1)[0] for c in per_source.values() for k in c.get("removed_by", {})}
    seen |= {s for s in stages_run if s in REMOVAL_ORDER and s != "stratify"}
    columns = [s for s in REMOVAL_ORDER if s in seen] + sorted(seen - set(REMOVAL_ORDER))
    sources: dict[str, dict] = {}
    removed: dict[str, dict] = {s: {"rows": 0, "reasons": {}} for s in columns}
    for src, c in per_source.items():
        by_stage: dict[str, dict[str, int]] = {"normalize": dict(c.get("rejected_at_normalize") or {})}
        for key, n in (c.get("removed_by") or {}).items():
            st, _, reason = key.partition(":")
            by_stage.setdefault(st, {})[reason] = n
        kept = [int(c.get("ingested", 0)) + int(c.get("direct_copies", 0))]  # emit both adds copies
        for st in columns:
            gone = sum(by_stage.get(st, {}).values())
            kept.append(kept[-1] - gone)
            removed[st]["rows"] += gone
            for reason, n in by_stage.get(st, {}).items():
                removed[st]["reasons"][reason] = removed[st]["reasons"].get(reason, 0) + n
        sources[src] = {"kept": kept, "removed": {st: sum(by_stage.get(st, {}).values()) for st in columns},
                        "packed": int(c.get("packed", 0))}
        # rows neither packed nor removed (a lineage that does not balance) end in their own sink
        sources[src]["unaccounted"] = kept[-1] - sources[src]["packed"]
    return {"columns": columns, "sources": sources, "removed": removed,
            "unaccounted": sum(s["unaccounted"] for s in sources.values())}


def _downsample(points: list[dict], k: int = MAX_POINTS) -> list[dict]:
    if len(points) <= k:
        return points
    step = (len(points) - 1) / (k - 1)
    return [points[round(i * step)] for i in range(k)]


def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if isinstance(x, (int, float)) and math.isfinite(x))
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def _training(run_dir: Path, run: dict) -> dict | None:
    """The train record of the run manifest, its metrics and what its checkpoints were made from."""
    ent = run.get("train")
    if not isinstance(ent, dict) or not ent.get("dir"):
        return None
    tdir = _under(run_dir, ent["dir"])
    rec = None
    for name in ("train.json", "run.json"):  # run.json: train folders written before train.json
        if tdir is not None and (tdir / name).is_file():
            rec = _json_or_none(tdir / name)
            break
    data = (rec or {}).get("data") or {}
    metrics: list[dict] = []
    mpath = tdir / "metrics.jsonl" if tdir is not None else None
    if mpath is not None and mpath.is_file():
        for line in mpath.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(r, dict) and "step" in r:
                metrics.append(r)
    losses = [m["loss"] for m in metrics if isinstance(m.get("loss"), (int, float))]
    curve = _downsample([{"step": m["step"], "loss": m.get("loss"), "lr": m.get("lr")} for m in metrics])
    summary = {
        "steps_logged": len(metrics), "last_step": metrics[-1]["step"] if metrics else None,
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "min_loss": min(losses) if losses else None,
        "median_tokens_per_s": _median([m.get("tokens_per_s") for m in metrics]),
        "median_mfu": _median([m.get("mfu") for m in metrics]),
        "final_lr": metrics[-1].get("lr") if metrics else None,
    }
    pack_dir = _under(run_dir, ent.get("pack_dir") or data.get("pack_dir"))
    pack_man = _json_or_none(pack_dir / "manifest.json") if pack_dir is not None else None
    shards = []
    verified = None
    if pack_man:
        outs = pack_man.get("outputs") or {}
        shards = [{"file": f, "sha256": r.get("sha256"), "rows": r.get("rows"), "tokens": r.get("tokens"),
                   "bytes": r.get("bytes"), "samples": r.get("samples")}
                  for f, r in sorted(outs.items()) if f.endswith(".arrow")]
        want = ent.get("pack_manifest_sha256") or data.get("pack_manifest_sha256")
        verified = bool(outs) and want is not None and sha256_json(outs) == want
    checkpoints = []
    if tdir is not None:
        for d in sorted((tdir / "checkpoints").glob("step-*")):
            r = _json_or_none(d / "train_record.json") or {}
            checkpoints.append({"kind": "deepspeed", "path": _rel(run_dir, d), "step": _step_of(d.name),
                                "data": r.get("data") or None})
        exports = sorted((tdir / "export").glob("step-*/*")) + sorted((tdir / "final").glob("*"))
        for d in exports:
            if not (d / "config.json").is_file():
                continue
            cfg = _json_or_none(d / "config.json") or {}
            step = _step_of(d.parent.name) if d.parent.name != "final" else ent.get("step")
            checkpoints.append({"kind": f"{'final' if d.parent.name == 'final' else 'export'} {d.name}",
                                "path": _rel(run_dir, d), "step": step, "data": cfg.get("data") or None})
    want = ent.get("pack_manifest_sha256") or data.get("pack_manifest_sha256")
    for c in checkpoints:
        got = (c["data"] or {}).get("pack_manifest_sha256")
        c["same_shards"] = None if got is None or want is None else got == want
    current = (run.get("stages") or {}).get("pack", {}) or {}
    return {
        "dir": ent.get("dir"), "status": ent.get("status"), "step": ent.get("step"), "steps": ent.get("steps"),
        "preset": ent.get("preset"), "arch": ent.get("arch"), "config_sha256": ent.get("config_sha256"),
        "pack_dir": _rel(run_dir, pack_dir) if pack_dir is not None else None,
        "pack_version": ent.get("pack_version") or data.get("pack_version"),
        "pack_manifest_sha256": want, "shards_verified": verified,
        "pack_is_current": (ent.get("pack_version") or data.get("pack_version")) == current.get("version"),
        "current_pack_version": current.get("version"),
        "tokenizer_sha256": ent.get("tokenizer_sha256") or data.get("tokenizer_sha256"),
        "final": ent.get("final"), "shards": shards, "checkpoints": checkpoints,
        "record_found": rec is not None, "metrics_found": bool(metrics),
        "summary": summary, "curve": curve,
    }


def _step_of(name: str) -> int | None:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


_PROTOCOL = {"harness": "harness", "paper": "paper", "heldout": "own (training prompt)"}  # evaluation.run


def _evaluations(run_dir: Path, run: dict) -> list[dict]:
    out = []
    for rec in run.get("evaluations") or []:
        if not isinstance(rec, dict):
            continue
        path = _under(run_dir, rec.get("results"))
        res = _json_or_none(path) if path is not None else None
        tasks = []
        for t, e in ((res or {}).get("tasks") or {}).items():
            full, clean = e.get("full") or {}, e.get("clean")
            ex = e.get("fewshot_exceptions") or {}
            shots = f"{e.get('num_fewshot')}" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(ex.items()))})"
                                                 if ex else "")
            proto = e.get("protocol", "harness")
            for metric in sorted(full):
                tasks.append({"task": t, "name": e.get("task", t), "metric": metric,
                              "num_fewshot": e.get("num_fewshot"), "shots": shots,
                              "protocol": _PROTOCOL.get(proto, proto), "condition": e.get("condition"),
                              "full": full[metric], "clean": None if clean is None else clean.get(metric),
                              "n": e.get("n"), "n_total": e.get("n_total"), "n_clean": e.get("n_clean"),
                              "limited": bool(e.get("limited"))})
        limited = bool((res or {}).get("limited", rec.get("limited", False)))
        out.append({"checkpoint": rec.get("checkpoint"), "checkpoint_sha256": rec.get("checkpoint_sha256"),
                    "results": rec.get("results"), "found": res is not None, "limit": rec.get("limit"),
                    "seed": rec.get("seed"), "limited": limited, "finished": rec.get("finished"),
                    "contamination": rec.get("contamination"), "online": rec.get("online", False),
                    "rows": tasks})
    return out


def _contamination(run_dir: Path, run: dict) -> dict | None:
    d = _stage_path(run_dir, run, "contamination")
    rep = _json_or_none(d / "report.json") if d is not None else None
    if rep is None:
        return None
    p = str(rep.get("primary_n"))
    benches = {}
    for name, b in (rep.get("benchmarks") or {}).items():
        resp_sources: Counter = Counter()
        resp_rows: set = set()
        for item in b.get("dirty_items") or []:
            for r in item.get("responsible") or []:
                if r.get("id") not in resp_rows:
                    resp_rows.add(r.get("id"))
                    resp_sources[r.get("source")] += 1
        byn = (b.get("by_n") or {}).get(p, {})
        benches[name] = {"split": b.get("split"), "checked": b.get("checked"), "counts": byn.get("counts") or {},
                         "percent": byn.get("percent") or {}, "too_short": byn.get("too_short"),
                         "dirty": len(b.get("dirty_items") or []),
                         "not_clean": len(b.get("flagged_items") or b.get("dirty_items") or []),
                         "responsible_sources": dict(resp_sources.most_common()),
                         "dirty_items": b.get("dirty_items") or []}
    return {"primary_n": rep.get("primary_n"), "ngram_sizes": rep.get("ngram_sizes"),
            "method": rep.get("method", "tokens"), "unit": rep.get("unit", "tokens"),
            "short_item_rule": rep.get("short_item_rule"),
            "bucket_edges": rep.get("bucket_edges"), "train_rows": rep.get("train_rows"),
            "decontaminated": _decontaminated(run_dir, run), "counts": rep.get("counts"), "benchmarks": benches}


def collect(run_dir: str | os.PathLike) -> dict:
    """Everything the report shows, read from RUN_DIR (a run folder with run.json)."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    stages = _stages(run_dir, run)
    lin_dir = _stage_path(run_dir, run, "lineage")
    lineage = _json_or_none(lin_dir / "lineage.json") if lin_dir is not None else None
    mix_dir = _stage_path(run_dir, run, "mix")
    mix = _json_or_none(mix_dir / "mix_report.json") if mix_dir is not None else None
    stages_run = [s["stage"] for s in stages if s["stage"] != "contamination" or _decontaminated(run_dir, run)]
    rep: dict = {
        "format": 1, "run_dir": str(run_dir.resolve()), "name": run.get("name") or run_dir.name,
        "updated": run.get("updated"), "overrides": run.get("overrides") or [],
        "generated": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "stages": stages, "lineage": None, "flow": None, "tokens": None,
    }
    if lineage is not None:
        rep["lineage"] = {k: lineage.get(k) for k in ("rows_stratified", "rows_packed", "rows_removed", "balanced",
                                                      "per_source", "per_stratum", "examples", "warnings",
                                                      "unaccounted", "conflicts", "removed_twice")}
        rep["lineage"]["rows_ingested"] = sum(c.get("ingested", 0) for c in lineage.get("per_source", {}).values())
        rep["flow"] = flow(lineage, stages_run)
    if mix is not None:
        strata = {name: {k: s.get(k) for k in ("rule", "rows_available", "unique_rows", "seen_rows", "unique_tokens",
                                                "seen_tokens", "effective_repeat", "repeat", "cap_rows", "cap_tokens")}
                  for name, s in (mix.get("strata") or {}).items()}
        rep["tokens"] = {"epochs": mix.get("epochs"), "totals": mix.get("totals") or {}, "strata": strata}
    rep["contamination"] = _contamination(run_dir, run)
    rep["training"] = _training(run_dir, run)
    rep["evaluations"] = _evaluations(run_dir, run)
    return rep


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------
def e(x: Any) -> str:
    """HTML-escaped text (attributes too)."""
    return html.escape("" if x is None else str(x), quote=True)


def num(x: Any) -> str:
    """A number for people: thousands separators, 4 significant digits for small fractions."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if abs(x) >= 1000 or x == int(x):
            return f"{x:,.0f}"
        return f"{x:.4g}"
    return str(x)


def _dv(x: Any) -> str:
    """A data-* attribute value: the plain number (no separators), so a test can compare it."""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float) and x == int(x) and abs(x) < 2**53:
        return str(int(x))
    return e(x)


def _reasons(d: dict | None, cls: str = "reason") -> str:
    if not d:
        return '<span class="muted">–</span>'
    return " ".join(f'<span class="{cls}" data-reason="{e(k)}" data-value="{_dv(v)}">{e(k)} '
                    f'<b>{num(v)}</b></span>' for k, v in d.items())


def _short(h: str | None, n: int = 16) -> str:
    if not h:
        return '<span class="muted">–</span>'
    return f'<code title="{e(h)}">{e(h[:n])}</code>'


def _note(text: str, cmd: str | None = None, cls: str = "") -> str:
    return (f'<p class="note{" " + cls if cls else ""}">{e(text)}' + (f' <code>{e(cmd)}</code>' if cmd else "") + "</p>")


def _td(value: Any, cls: str, raw: Any = None) -> str:
    v = value if raw is None else raw
    return f'<td class="num {e(cls)}" data-value="{_dv(v)}">{num(value)}</td>'


# ------------------------------------------------------------------------------------------------
# SVG: the Sankey diagram
# ------------------------------------------------------------------------------------------------
def _ribbon(x0: float, a0: float, a1: float, x1: float, b0: float, b1: float) -> str:
    """A band from the edge [a0, a1] at x0 to the edge [b0, b1] at x1 (cubic curves)."""
    xm = (x0 + x1) / 2
    return (f"M{x0:.1f},{a0:.2f} C{xm:.1f},{a0:.2f} {xm:.1f},{b0:.2f} {x1:.1f},{b0:.2f} "
            f"L{x1:.1f},{b1:.2f} C{xm:.1f},{b1:.2f} {xm:.1f},{a1:.2f} {x0:.1f},{a1:.2f} Z")


def _spread(wanted: list[float], gap: float, top: float) -> list[float]:
    """Label positions near WANTED (sorted ascending) at least GAP apart, none above TOP."""
    out: list[float] = []
    for y in wanted:
        y = max(y, top, (out[-1] + gap) if out else top)
        out.append(y)
    return out


def sankey_svg(fl: dict, colors: dict[str, str]) -> str:
    """Sources on the left (height ∝ rows ingested), one band per source through every removal stage,
    removed rows flowing down to a red node per stage, packed rows on the right."""
    cols = fl["columns"]
    srcs = list(fl["sources"])
    total = sum(s["kept"][0] for s in fl["sources"].values())
    if total <= 0 or not srcs:
        return _note("No rows to draw: the run ingested nothing.")
    W, left, right, top = 1280.0, 200.0, 150.0, 58.0
    node_w, gap, sink_gap = 12.0, 7.0, 34.0
    trunk = max(300.0, 15.0 * len(srcs))
    k = (trunk - gap * (len(srcs) - 1)) / total  # px per row
    ncol = len(cols) + 1
    xs = [left + j * (W - left - right - node_w) / (ncol - 1) for j in range(ncol)]
    # per column: the y-range of each source's segment (empty segments take no gap)
    seg: list[dict[str, tuple[float, float]]] = []
    for j in range(ncol):
        y, pos = top, {}
        for s in srcs:
            h = fl["sources"][s]["kept"][j] * k
            pos[s] = (y, y + h)
            if h > 0:
                y += h + gap
        seg.append(pos)
    col_bottom = [max([p[1] for p in seg[j].values()] + [top]) for j in range(ncol)]
    parts: list[str] = []
    labels: list[str] = []
    # removal sinks: below the trunk of the column after the stage
    sinks: dict[int, tuple[float, float]] = {}
    bottom = top + trunk
    for j, st in enumerate(cols, start=1):
        rows = fl["removed"][st]["rows"]
        if rows <= 0:
            continue
        y0 = col_bottom[j] + sink_gap
        sinks[j] = (y0, y0 + rows * k)
        bottom = max(bottom, y0 + rows * k)
    # bands: kept part from the top of each segment, removed part from its bottom into the sink
    for j in range(1, ncol):
        st = cols[j - 1]
        sink_y = sinks.get(j, (0.0, 0.0))[0]
        for s in srcs:
            src = fl["sources"][s]
            (a0, a1), (b0, b1) = seg[j - 1][s], seg[j][s]
            kept, gone = src["kept"][j], src["removed"][st]
            c = colors[s]
            if kept > 0:
                thin = ' stroke="%s" stroke-width="0.6"' % c if (b1 - b0) < 0.8 else ""
                parts.append(f'<path class="sankey-link" data-source="{e(s)}" data-from="{e(_colname(cols, j - 1))}" '
                             f'data-to="{e(_colname(cols, j))}" data-rows="{kept}" d="{_ribbon(xs[j - 1] + node_w, a0, a0 + kept * k, xs[j], b0, b1)}" '
                             f'fill="{c}" fill-opacity="0.42"{thin}><title>{e(s)}: {num(kept)} rows after {e(st)}</title></path>')
            if gone > 0:
                h = gone * k
                thin = ' stroke="%s" stroke-width="0.6"' % c if h < 0.8 else ""
                parts.append(f'<path class="sankey-link sankey-removal" data-source="{e(s)}" data-from="{e(_colname(cols, j - 1))}" '
                             f'data-to="removed:{e(st)}" data-rows="{gone}" d="{_ribbon(xs[j - 1] + node_w, a1 - h, a1, xs[j], sink_y, sink_y + h)}" '
                             f'fill="{c}" fill-opacity="0.28"{thin}><title>{e(s)}: {num(gone)} rows removed by {e(st)}</title></path>')
                sink_y += h
    # nodes
    for j in range(ncol):
        for s in srcs:
            y0, y1 = seg[j][s]
            rows = fl["sources"][s]["kept"][j]
            if rows <= 0:
                continue
            parts.append(f'<rect class="sankey-node" data-column="{e(_colname(cols, j))}" data-source="{e(s)}" '
                         f'data-rows="{rows}" x="{xs[j]:.1f}" y="{y0:.2f}" width="{node_w}" height="{max(y1 - y0, 0.8):.2f}" '
                         f'fill="{colors[s]}"><title>{e(s)}: {num(rows)} rows ({e(_colname(cols, j))})</title></rect>')
    for j, (y0, y1) in sinks.items():
        st = cols[j - 1]
        r = fl["removed"][st]
        parts.append(f'<rect class="sankey-node sankey-removed" data-stage="{e(st)}" data-rows="{r["rows"]}" '
                     f'x="{xs[j]:.1f}" y="{y0:.2f}" width="{node_w}" height="{max(y1 - y0, 3.0):.2f}" fill="{REMOVED_COLOR}">'
                     f'<title>{e(st)}: {num(r["rows"])} rows removed</title></rect>')
        lines = [f'<tspan x="{xs[j] + node_w / 2:.1f}" dy="0" class="sink-title">−{num(r["rows"])} {e(st)}</tspan>']
        for reason, n in sorted(r["reasons"].items(), key=lambda kv: -kv[1]):
            lines.append(f'<tspan x="{xs[j] + node_w / 2:.1f}" dy="14">{e(reason)} {num(n)}</tspan>')
        ly = max(y1, y0 + 3) + 15
        labels.append(f'<text class="sink-label" text-anchor="middle" y="{ly:.1f}">{"".join(lines)}</text>')
        bottom = max(bottom, ly + 14 * (len(lines) - 1) + 6)
    # column headers
    for j in range(ncol):
        kept = sum(fl["sources"][s]["kept"][j] for s in srcs)
        name = "ingested" if j == 0 else ("packed" if j == ncol - 1 and cols[-1] == "pack" else f"after {cols[j - 1]}")
        if j == ncol - 1 and fl.get("unaccounted"):
            name += f" (+{num(fl['unaccounted'])} unaccounted)"
        x = xs[j] + node_w / 2
        labels.append(f'<text class="col-head" text-anchor="middle" x="{x:.1f}" y="18">{e(name)}</text>'
                      f'<text class="col-count" text-anchor="middle" x="{x:.1f}" y="36" data-column="{e(_colname(cols, j))}" '
                      f'data-rows="{kept}">{num(kept)} rows</text>')
    # source labels (left) and packed labels (right), pushed apart when segments are thin
    for side, j in (("left", 0), ("right", ncol - 1)):
        vis = [s for s in srcs if seg[j][s][1] > seg[j][s][0]] if side == "right" else srcs
        wanted = [(seg[j][s][0] + seg[j][s][1]) / 2 + 4 for s in vis]
        ys = _spread(wanted, 15.0, top + 4)
        for s, want, y in zip(vis, wanted, ys):
            rows = fl["sources"][s]["kept"][j]
            if side == "left":
                x = xs[0] - 8
                labels.append(f'<text class="src-label src-in" text-anchor="end" x="{x:.1f}" y="{y:.1f}" data-source="{e(s)}" '
                              f'data-rows="{rows}"><tspan class="src-name">{e(s)}</tspan> {num(rows)}</text>')
            else:
                x = xs[j] + node_w + 8
                labels.append(f'<text class="src-label src-out" x="{x:.1f}" y="{y:.1f}" data-source="{e(s)}" data-rows="{rows}">'
                              f'{num(rows)} <tspan class="muted-svg">{e(s)}</tspan></text>')
            if abs(y - want) > 3:
                x_edge = xs[0] if side == "left" else xs[j] + node_w
                x_lab = x_edge - 6 if side == "left" else x_edge + 6
                labels.append(f'<line x1="{x_edge:.1f}" y1="{want - 4:.1f}" x2="{x_lab:.1f}" y2="{y - 4:.1f}" class="leader"/>')
            bottom = max(bottom, y + 6)
    H = bottom + 12
    return (f'<svg class="sankey" viewBox="0 0 {W:.0f} {H:.0f}" width="100%" role="img" '
            f'aria-label="rows from sources through the removal stages to the packed shards">'
            + "".join(parts) + "".join(labels) + "</svg>")


def _colname(cols: list[str], j: int) -> str:
    return "ingested" if j == 0 else cols[j - 1]


# ------------------------------------------------------------------------------------------------
# SVG: the training curve
# ------------------------------------------------------------------------------------------------
def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 x 10^k) from at or below LO to at or above HI."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (0.1 * abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def _tick(v: float) -> str:
    if v == int(v):
        return f"{int(v):,}"
    return f"{v:.3g}"


def line_chart_svg(points: list[dict], x: str = "step", y: str = "loss") -> str:
    pts = [(p[x], p[y]) for p in points if isinstance(p.get(y), (int, float)) and math.isfinite(p[y])]
    if not pts:
        return _note("metrics.jsonl has no finite loss values to draw.")
    W, H, ml, mr, mt, mb = 1000.0, 280.0, 64.0, 20.0, 14.0, 44.0
    xs_, ys_ = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs_), max(xs_)
    if x1 == x0:
        x1 = x0 + 1
    yt = _nice_ticks(min(ys_), max(ys_))
    y0, y1 = min(yt + [min(ys_)]), max(yt + [max(ys_)])
    if y1 == y0:
        y1 = y0 + 1

    def px(v: float) -> float:
        return ml + (v - x0) / (x1 - x0) * (W - ml - mr)

    def py(v: float) -> float:
        return mt + (1 - (v - y0) / (y1 - y0)) * (H - mt - mb)

    out = [f'<svg class="chart" id="train-curve" viewBox="0 0 {W:.0f} {H:.0f}" width="100%" role="img" '
           f'aria-label="training loss against step" data-points="{len(pts)}" data-final-loss="{_dv(pts[-1][1])}">']
    for t in yt:
        out.append(f'<line class="grid" x1="{ml}" x2="{W - mr}" y1="{py(t):.1f}" y2="{py(t):.1f}"/>'
                   f'<text class="axis" text-anchor="end" x="{ml - 8}" y="{py(t) + 4:.1f}">{e(_tick(t))}</text>')
    for t in _nice_ticks(x0, x1, 8):
        if x0 <= t <= x1:
            out.append(f'<line class="grid" x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{mt}" y2="{H - mb}"/>'
                       f'<text class="axis" text-anchor="middle" x="{px(t):.1f}" y="{H - mb + 18}">{e(_tick(t))}</text>')
    out.append(f'<line class="axis-line" x1="{ml}" x2="{W - mr}" y1="{H - mb}" y2="{H - mb}"/>'
               f'<line class="axis-line" x1="{ml}" x2="{ml}" y1="{mt}" y2="{H - mb}"/>')
    out.append(f'<text class="axis-title" text-anchor="middle" x="{(ml + W - mr) / 2:.0f}" y="{H - 6}">{e(x)}</text>'
               f'<text class="axis-title" text-anchor="middle" transform="translate(16 {(mt + H - mb) / 2:.0f}) rotate(-90)">{e(y)}</text>')
    poly = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in pts)
    out.append(f'<polyline class="curve" points="{poly}"/>')
    if len(pts) <= 80:
        out += [f'<circle class="dot" cx="{px(a):.1f}" cy="{py(b):.1f}" r="2.2"><title>step {a}: {b:.4f}</title></circle>'
                for a, b in pts]
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------------------------------------
# HTML sections
# ------------------------------------------------------------------------------------------------
CSS = """
:root{--fg:#1f2933;--muted:#6b7785;--line:#e3e7ec;--bg:#fff;--soft:#f5f7fa;--accent:#2f5f8a;--bad:#b03a2e;--ok:#2e7d4f}
*{box-sizing:border-box}
body{margin:0;background:var(--soft);color:var(--fg);font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
header.top{background:#22313f;color:#fff;padding:18px 32px 14px}
header.top h1{margin:0 0 4px;font-size:22px;font-weight:600}
header.top .meta{color:#c9d3dd;font-size:12.5px}
header.top code{color:#e8eef4;background:none}
nav{margin-top:8px;font-size:12.5px}
nav a{color:#9fc3e6;margin-right:14px;text-decoration:none}
main{max-width:1360px;margin:0 auto;padding:18px 24px 48px}
section{background:var(--bg);border:1px solid var(--line);border-radius:8px;padding:16px 20px;margin:0 0 18px}
h2{font-size:17px;margin:0 0 4px;color:var(--accent)}
h3{font-size:14px;margin:16px 0 6px}
p.lead{margin:0 0 12px;color:var(--muted)}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{flex:1 1 150px;background:var(--soft);border:1px solid var(--line);border-radius:6px;padding:9px 12px}
.card .k{font-size:11.5px;color:var(--muted);text-transform:uppercase;letter-spacing:.03em}
.card .v{font-size:21px;font-weight:600;font-variant-numeric:tabular-nums}
.card .s{font-size:12px;color:var(--muted)}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:5px 8px;text-align:left;vertical-align:top}
th{background:var(--soft);font-weight:600;font-size:12px;color:#3b4754;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.total td{font-weight:600;border-top:2px solid #c5ccd4}
code{font:12px/1.3 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:var(--soft);padding:1px 4px;border-radius:3px}
.muted{color:var(--muted)}
.reason{display:inline-block;background:#fbeceb;color:#7a2a22;border-radius:3px;padding:0 5px;margin:1px 3px 1px 0;font-size:12px}
.reason.rej{background:#fff3df;color:#7a4d06}
.src{display:inline-block;background:#eaf1f8;color:#24476b;border-radius:3px;padding:0 5px;margin:1px 3px 1px 0;font-size:12px}
.badge{display:inline-block;border-radius:3px;padding:1px 7px;font-size:11.5px;font-weight:700;letter-spacing:.03em}
.badge.stale,.badge.limited,.badge.bad{background:var(--bad);color:#fff}
.badge.ok{background:var(--ok);color:#fff}
.badge.info{background:#dde6ef;color:#24476b}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:-1px}
p.note{background:#fff8e1;border:1px solid #f1e0a6;border-radius:6px;padding:9px 12px;margin:6px 0}
.bar{position:relative;height:14px;min-width:120px;background:var(--soft);border-radius:2px}
.bar span{position:absolute;left:0;top:0;bottom:0;border-radius:2px}
.bar .seen{background:#a9c4de}.bar .uniq{background:#2f5f8a}
.legend{font-size:12px;color:var(--muted);margin:4px 0 8px}
.legend i{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px;vertical-align:-1px;border-radius:2px}
.twocol{display:grid;grid-template-columns:minmax(0,1fr) 320px;gap:18px;align-items:start}
svg text{font:12px -apple-system,"Segoe UI",Roboto,Arial,sans-serif;fill:#1f2933}
svg .col-head{font-weight:600;font-size:12.5px}
svg .col-count,svg .muted-svg{fill:#6b7785}
svg .sink-label{font-size:11.5px;fill:#7a2a22}
svg .sink-title{font-weight:600}
svg .src-name{font-weight:600}
svg .leader{stroke:#9aa5b1;stroke-width:.7}
svg .grid{stroke:#eef1f4}
svg .axis{fill:#6b7785;font-size:11.5px}
svg .axis-title{fill:#3b4754;font-size:12px}
svg .axis-line{stroke:#9aa5b1}
svg .curve{fill:none;stroke:#2f5f8a;stroke-width:1.8}
svg .dot{fill:#2f5f8a}
.scroll{overflow-x:auto}
footer{color:var(--muted);font-size:12px;text-align:center}
"""

SECTIONS = (("summary", "Summary"), ("flow", "Row flow"), ("stages", "Stages"), ("sources", "Per source"),
            ("strata", "Per stratum"), ("removal-examples", "Removed rows"), ("tokens", "Tokens"),
            ("training", "Training"), ("shards", "Shards → checkpoints"), ("contamination", "Contamination"),
            ("scores", "Scores"))


def _section(sid: str, title: str, lead: str, body: str) -> str:
    return (f'<section id="{e(sid)}"><h2>{e(title)}</h2>' + (f'<p class="lead">{e(lead)}</p>' if lead else "")
            + body + "</section>")


def _card(key: str, value: Any, sub: str = "", ident: str | None = None) -> str:
    ida = f' id="{e(ident)}"' if ident else ""
    return (f'<div class="card"><div class="k">{e(key)}</div><div class="v"{ida} data-value="{_dv(value)}">'
            f'{num(value)}</div>' + (f'<div class="s">{sub}</div>' if sub else "") + "</div>")


def _summary(rep: dict) -> str:
    lin, tok, tr = rep.get("lineage"), rep.get("tokens"), rep.get("training")
    cards = []
    if lin:
        ok = lin.get("balanced")
        cards += [
            _card("rows ingested", lin["rows_ingested"], "all sources", "rows-ingested"),
            _card("rows stratified", lin["rows_stratified"], "after normalize", "rows-stratified"),
            _card("rows packed", lin["rows_packed"], "in the shards, at least once", "rows-packed"),
            _card("rows removed", lin["rows_removed"], "by dedup, tokenizer, mix, pack…", "rows-removed"),
        ]
        badge = ('<span class="badge ok" id="balanced" data-value="true">BALANCED</span>' if ok else
                 '<span class="badge bad" id="balanced" data-value="false">DOES NOT BALANCE</span>')
    else:
        badge = '<span class="badge info">no lineage yet</span>'
    if tok:
        t = tok.get("totals") or {}
        cards += [_card("unique tokens", t.get("unique_tokens"), "distinct rows used", "unique-tokens"),
                  _card("seen tokens", t.get("seen_tokens"), f"over {num(tok.get('epochs'))} epochs", "seen-tokens")]
    if tr and tr["summary"].get("final_loss") is not None:
        cards.append(_card("final loss", round(tr["summary"]["final_loss"], 4),
                           f"step {num(tr['summary']['last_step'])}", "final-loss"))
    con = rep.get("contamination")
    if con:
        cards.append(_card("dirty benchmark items", sum(b["dirty"] for b in con["benchmarks"].values()),
                           f"{len(con['benchmarks'])} benchmarks checked", "dirty-items"))
    body = f'<p class="lead">Lineage: {badge}</p>' + (f'<div class="cards">{"".join(cards)}</div>' if cards else
                                                      _note("The run has no lineage yet: run the data flow to the end.",
                                                            f"hrm run SPEC -o {rep['run_dir']}"))
    warns = [w.get("message") if isinstance(w, dict) else str(w) for w in (lin or {}).get("warnings") or []]
    if warns:
        body += "<h3>Warnings</h3><ul>" + "".join(f"<li>{e(w)}</li>" for w in warns) + "</ul>"
    stale = [st["stage"] for st in rep["stages"] if st.get("stale")]
    if stale:
        first = next(st for st in rep["stages"] if st.get("stale"))["stale"]
        body += _note(f"Stale stages: {', '.join(stale)} ({first}). The numbers below are those of the versions the run "
                      "manifest names; bring them up to date with", f"hrm run SPEC -o {rep['run_dir']} --from {stale[0]}",
                      "stale")
    if lin and not lin.get("balanced"):
        body += _note(f"Rows unaccounted: {lin.get('unaccounted')}; removed and packed: {lin.get('conflicts')}; "
                      f"removed twice: {lin.get('removed_twice')} (first 20 ids each).")
    return _section("summary", "Summary", "", body)


def _flow(rep: dict, colors: dict[str, str]) -> str:
    fl = rep.get("flow")
    if not fl:
        return _section("flow", "Row flow", "", _note("No lineage yet: the flow picture needs the lineage stage.",
                                                      f"hrm run SPEC -o {rep['run_dir']}"))
    lead = ("Every row from its source (left) through the removal stages to the packed shards (right). Band widths "
            "are proportional to rows; the rows a stage removes flow down into a red node labelled with its "
            "reasons. Hover a band for its count.")
    return _section("flow", "Row flow: sources → stages → packed / removed", lead,
                    f'<div class="scroll">{sankey_svg(fl, colors)}</div>')


def _stages_table(rep: dict) -> str:
    rows = []
    for s in rep["stages"]:
        c = s.get("counts") or {}
        shown = []
        for k, v in c.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                shown.append(f'<span class="cnt" data-key="{e(k)}" data-value="{_dv(v)}">{e(k)} <b>{num(v)}</b></span>')
            elif isinstance(v, bool):
                shown.append(f'<span class="cnt" data-key="{e(k)}" data-value="{_dv(v)}">{e(k)} <b>{num(v)}</b></span>')
            elif isinstance(v, dict) and v and len(v) <= 8 and all(isinstance(x, (int, float)) for x in v.values()):
                shown.append(f'{e(k)}: ' + ", ".join(f"{e(a)} <b>{num(b)}</b>" for a, b in v.items()))
        status = (f'<span class="badge stale" title="{e(s["stale"])}">STALE</span> <span class="muted">{e(s["stale"])}</span>'
                  if s.get("stale") else ('<span class="badge bad">MISSING</span>' if s.get("missing")
                                          else '<span class="badge ok">ok</span>'))
        inputs = " ".join(f'<span class="src">{e(k)} {e(v)}</span>' for k, v in (s.get("inputs") or {}).items())
        rows.append(f'<tr data-stage="{e(s["stage"])}" data-version="{e(s.get("version"))}" '
                    f'data-stale="{_dv(bool(s.get("stale")))}"><td><b>{e(s["stage"])}</b></td><td>{_short(s.get("version"))}</td>'
                    f'<td>{status}</td><td>{inputs or "<span class=muted>–</span>"}</td>'
                    f'<td class="counts">{" · ".join(shown) or "<span class=muted>–</span>"}</td></tr>')
    if not rows:
        return _section("stages", "Stages", "", _note("The run manifest names no stage yet."))
    table = ("<table><thead><tr><th>stage</th><th>version</th><th>status</th><th>inputs (stage version)</th>"
             "<th>counts (from the stage manifest)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    return _section("stages", "Stages", "The version of each stage that the run manifest names (first 16 hex digits "
                    "of its fingerprint), the versions it read and the counts its manifest records. A stale stage was "
                    "made from an older version of a stage before it.", table)


def _sources_table(rep: dict, colors: dict[str, str]) -> str:
    lin = rep.get("lineage")
    if not lin:
        return _section("sources", "Per source", "", _note("No lineage yet."))
    rows, tot = [], Counter()
    for src, c in lin["per_source"].items():
        rej = c.get("rejected_at_normalize") or {}
        for k in ("ingested", "stratified", "packed", "removed"):
            tot[k] += c.get(k, 0)
        tot["rejected"] += sum(rej.values())
        rows.append(f'<tr data-source="{e(src)}" data-ingested="{c.get("ingested")}" data-stratified="{c.get("stratified")}" '
                    f'data-packed="{c.get("packed")}" data-removed="{c.get("removed")}">'
                    f'<td><span class="swatch" style="background:{colors.get(src, "#999")}"></span>{e(src)}</td>'
                    + _td(c.get("ingested"), "ingested") + _td(sum(rej.values()), "rejected")
                    + f'<td class="reasons rejected-by">{_reasons(rej, "reason rej")}</td>'
                    + _td(c.get("stratified"), "stratified") + _td(c.get("packed"), "packed") + _td(c.get("removed"), "removed")
                    + f'<td class="reasons removed-by">{_reasons(c.get("removed_by"))}</td></tr>')
    rows.append('<tr class="total"><td>total</td>' + _td(tot["ingested"], "ingested") + _td(tot["rejected"], "rejected")
                + "<td></td>" + _td(tot["stratified"], "stratified") + _td(tot["packed"], "packed")
                + _td(tot["removed"], "removed") + "<td></td></tr>")
    table = ('<div class="scroll"><table id="per-source"><thead><tr><th>source</th><th class="num">ingested</th>'
             '<th class="num">rejected at normalize</th><th>reasons</th><th class="num">stratified</th>'
             '<th class="num">packed</th><th class="num">removed</th><th>removed by stage:reason</th></tr></thead><tbody>'
             + "".join(rows) + "</tbody></table></div>")
    return _section("sources", "Per source", "Rows ingested = rejected at normalize + stratified; stratified = packed "
                    "+ removed (lineage.json's per_source table).", table)


def _strata_table(rep: dict) -> str:
    lin = rep.get("lineage")
    if not lin:
        return _section("strata", "Per stratum", "", _note("No lineage yet."))
    rows, tot = [], Counter()
    for name, st in lin["per_stratum"].items():
        removed = sum((st.get("removed") or {}).values())
        for k in ("in", "packed", "times_packed"):
            tot[k] += st.get(k, 0)
        tot["removed"] += removed
        bal = ('<span class="badge ok">yes</span>' if st.get("balanced") else '<span class="badge bad">NO</span>')
        rows.append(f'<tr data-stratum="{e(name)}" data-in="{st.get("in")}" data-packed="{st.get("packed")}" '
                    f'data-removed="{removed}" data-times-packed="{st.get("times_packed")}"><td>{e(name)}</td>'
                    + _td(st.get("in"), "in") + _td(st.get("packed"), "packed") + _td(st.get("times_packed"), "times-packed")
                    + _td(removed, "removed") + f'<td class="reasons removed-by">{_reasons(st.get("removed"))}</td>'
                    f'<td>{bal}</td></tr>')
    rows.append('<tr class="total"><td>total</td>' + _td(tot["in"], "in") + _td(tot["packed"], "packed")
                + _td(tot["times_packed"], "times-packed") + _td(tot["removed"], "removed") + "<td></td><td></td></tr>")
    table = ('<div class="scroll"><table id="per-stratum"><thead><tr><th>stratum</th><th class="num">in</th>'
             '<th class="num">packed</th><th class="num">times packed</th><th class="num">removed</th>'
             '<th>removed by stage:reason</th><th>balanced</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table></div>")
    return _section("strata", "Per stratum", "Rows stratified = packed + removed, by stage and reason; times packed "
                    "counts repeats over the epochs (lineage.json's per_stratum table).", table)


def _examples(rep: dict) -> str:
    ex = (rep.get("lineage") or {}).get("examples") or {}
    if not ex:
        body = _note("No removed rows." if rep.get("lineage") else "No lineage yet.")
    else:
        rows = []
        for why, items in ex.items():
            for i, r in enumerate(items):
                rows.append(f'<tr data-reason="{e(why)}">' + (f'<td rowspan="{len(items)}"><span class="reason">{e(why)}</span></td>'
                                                             if i == 0 else "")
                            + f'<td><code>{e(r.get("id"))}</code></td><td>{e(r.get("source"))}</td>'
                              f'<td>{e(r.get("detail"))}</td><td>{"<code>" + e(r["duplicate_of"]) + "</code>" if r.get("duplicate_of") else ""}</td></tr>')
        body = ('<table><thead><tr><th>stage:reason</th><th>id</th><th>source</th><th>detail</th><th>duplicate of</th>'
                "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    return _section("removal-examples", "Examples of removed rows", "Up to three per stage and reason "
                    "(all of them: lineage.parquet).", body)


def _tokens(rep: dict) -> str:
    tok = rep.get("tokens")
    if not tok:
        return _section("tokens", "Unique vs seen tokens", "", _note("No mix yet: run the data flow through mix."))
    strata = tok["strata"]
    top = max([s.get("seen_tokens") or 0 for s in strata.values()] + [s.get("unique_tokens") or 0 for s in strata.values()] + [1])
    rows = []
    for name, s in strata.items():
        u, sn = s.get("unique_tokens") or 0, s.get("seen_tokens") or 0
        cap = (f'{num(s["cap_rows"])} rows' if s.get("cap_rows") else f'{num(s["cap_tokens"])} tokens' if s.get("cap_tokens") else "–")
        rows.append(f'<tr data-stratum="{e(name)}" data-unique-tokens="{_dv(u)}" data-seen-tokens="{_dv(sn)}"><td>{e(name)}</td>'
                    f'<td class="muted">{e(s.get("rule"))}</td>' + _td(s.get("unique_rows"), "unique-rows")
                    + _td(s.get("seen_rows"), "seen-rows") + _td(u, "unique-tokens") + _td(sn, "seen-tokens")
                    + f'<td class="num">{num(round(s["effective_repeat"], 2)) if s.get("effective_repeat") is not None else "–"}×</td>'
                    f'<td class="num">{cap}</td><td style="width:26%"><div class="bar">'
                    f'<span class="seen" style="width:{100 * sn / top:.2f}%"></span>'
                    f'<span class="uniq" style="width:{100 * u / top:.2f}%"></span></div></td></tr>')
    t = tok.get("totals") or {}
    rows.append('<tr class="total"><td>total</td><td></td>' + _td(t.get("rows_used"), "unique-rows")
                + _td(t.get("seen_rows"), "seen-rows") + _td(t.get("unique_tokens"), "unique-tokens")
                + _td(t.get("seen_tokens"), "seen-tokens")
                + f'<td class="num">{num(round(t["effective_repeat"], 2)) if t.get("effective_repeat") is not None else "–"}×</td>'
                  "<td></td><td></td></tr>")
    table = ('<div class="legend">bar:<i style="background:#2f5f8a"></i>unique tokens<i style="background:#a9c4de"></i>'
             'seen tokens (with repeats over the epochs)</div><div class="scroll"><table id="tokens-table"><thead><tr>'
             '<th>stratum</th><th>rule</th><th class="num">unique rows</th><th class="num">seen rows</th>'
             '<th class="num">unique tokens</th><th class="num">seen tokens</th><th class="num">repeat</th>'
             '<th class="num">cap per epoch</th><th></th></tr></thead><tbody>' + "".join(rows) + "</tbody></table></div>")
    return _section("tokens", "Unique vs seen tokens per stratum", f"From mix_report.json ({num(tok.get('epochs'))} "
                    "epochs): unique tokens are the distinct rows the mix uses; seen tokens count every repeat.", table)


def _training_section(rep: dict) -> str:
    tr = rep.get("training")
    cmd = f"hrm train {rep['run_dir']} --preset cpu-small --steps 200 --warmup-steps 20"
    if not tr:
        return _section("training", "Training", "", _note("Training: not run yet. Train on this run's pack with", cmd, "not-run"))
    s = tr["summary"]
    info = (f'<p class="lead">Train folder <code>{e(tr["dir"])}</code>: {e(tr.get("arch"))}, preset {e(tr.get("preset"))}, '
            f'status <b>{e(tr.get("status"))}</b> at step {num(tr.get("step"))} of {num(tr.get("steps"))}; config '
            f'{_short(tr.get("config_sha256"))}.</p>')
    if not tr["metrics_found"]:
        return _section("training", "Training", "", info + _note("No metrics.jsonl in the train folder yet."))
    cards = "".join([
        _card("steps logged", s["steps_logged"]), _card("first loss", _r(s["first_loss"])),
        _card("final loss", _r(s["final_loss"]), "", "train-final-loss"), _card("min loss", _r(s["min_loss"])),
        _card("tokens/s (median)", _r(s["median_tokens_per_s"], 0)),
        _card("MFU (median)", _r(s["median_mfu"], 4) if s["median_mfu"] is not None else None,
              "" if s["median_mfu"] is not None else "not recorded (no peak FLOPs known)"),
        _card("final LR", s["final_lr"]),
    ])
    return _section("training", "Training curve", "", info + f'<div class="cards">{cards}</div>'
                    + f'<h3>loss vs step (metrics.jsonl)</h3>{line_chart_svg(tr["curve"])}')


def _r(x: float | None, nd: int = 4) -> float | int | None:
    if x is None:
        return None
    return int(round(x)) if nd == 0 else round(x, nd)


def _shards(rep: dict) -> str:
    tr = rep.get("training")
    if not tr:
        return _section("shards", "Shards → checkpoints", "", _note("Training: not run yet, so no checkpoint to trace.", None, "not-run"))
    ok = tr.get("shards_verified")
    ver = ('<span class="badge ok">shards verified</span>' if ok else
           '<span class="badge bad">shards differ from the record</span>' if ok is False else
           '<span class="badge info">pack folder not found</span>')
    cur = ("" if tr.get("pack_is_current") else
           f' <span class="badge stale">NOT THE RUN\'S CURRENT PACK</span> (now {_short(tr.get("current_pack_version"))})')
    head = (f'<p>Pack version {_short(tr.get("pack_version"))} <code>{e(tr.get("pack_dir"))}</code>{cur}; shards record '
            f'(sha256 of the pack manifest\'s outputs) {_short(tr.get("pack_manifest_sha256"))} {ver}; tokenizer '
            f'{_short(tr.get("tokenizer_sha256"))}.</p>')
    srows = "".join(f'<tr data-file="{e(x["file"])}" data-sha256="{e(x["sha256"])}"><td><code>{e(x["file"])}</code></td>'
                    f'<td><code class="sha">{e(x["sha256"])}</code></td>' + _td(x.get("rows"), "sequences")
                    + _td(x.get("samples"), "samples") + _td(x.get("tokens"), "tokens") + _td(x.get("bytes"), "bytes") + "</tr>"
                    for x in tr["shards"])
    shards = ('<table id="shard-table"><thead><tr><th>shard</th><th>sha256</th><th class="num">sequences</th>'
              '<th class="num">samples</th><th class="num">tokens</th><th class="num">bytes</th></tr></thead><tbody>'
              + srows + "</tbody></table>") if srows else _note("The pack folder the training read is gone (hrm gc?).")
    evals = {ev.get("checkpoint"): ev for ev in rep.get("evaluations") or []}
    crows = []
    for c in tr["checkpoints"]:
        same = c.get("same_shards")
        b = ('<span class="badge ok">same shards</span>' if same else '<span class="badge bad">other shards</span>'
             if same is False else '<span class="muted">no data record</span>')
        ev = evals.get(c["path"])
        crows.append(f'<tr data-checkpoint="{e(c["path"])}"><td>{e(c["kind"])}</td>' + _td(c.get("step"), "step")
                     + f'<td><code>{e(c["path"])}</code></td><td>{_short((c.get("data") or {}).get("pack_manifest_sha256"))} {b}</td>'
                     f'<td>{("evaluated " + _short(ev.get("checkpoint_sha256"), 12)) if ev else ""}</td></tr>')
    ck = ('<table id="checkpoint-table"><thead><tr><th>checkpoint</th><th class="num">step</th><th>folder</th>'
          '<th>shards record it carries</th><th>evaluation</th></tr></thead><tbody>' + "".join(crows) + "</tbody></table>"
          if crows else _note("No checkpoint written yet."))
    return _section("shards", "Which shards fed which checkpoint", "From the run manifest's train record, the pack "
                    "manifest and the data record each checkpoint carries.", head + "<h3>shards</h3>" + shards
                    + "<h3>checkpoints</h3>" + ck)


def _contamination_section(rep: dict) -> str:
    con = rep.get("contamination")
    if not con:
        return _section("contamination", "Contamination", "", _note(
            "Contamination check: not run in this run. Give the data flow benchmarks:",
            f"hrm run SPEC -o {rep['run_dir']} --benchmarks BENCH_DIR", "not-run"))
    edges = con.get("bucket_edges") or {}
    mode = ("decontaminated: the rows responsible were dropped before the mix" if con.get("decontaminated") else
            "check only: the rows responsible are still in the training data")
    lead = (f"{con.get('primary_n')}-gram ({e(con.get('unit') or 'tokens')}) coverage of each benchmark item by the training rows "
            f"({num(con.get('train_rows'))} rows checked); buckets "
            + ", ".join(f"{k.replace('_', ' ')} {edges[k]}" for k in BUCKETS if k in edges) + f". {mode.capitalize()}."
            + (f" Short items: {e(con['short_item_rule'])}." if con.get("short_item_rule") else "")
            + " report.json names the responsible rows and matched span of every item that is not clean.")
    rows, details = [], []
    for name, b in con["benchmarks"].items():
        c = b.get("counts") or {}
        srcs = " ".join(f'<span class="src" data-source="{e(s)}" data-value="{n}">{e(s)} <b>{num(n)}</b></span>'
                        for s, n in b["responsible_sources"].items())
        dirty_cls = "badge bad" if b["dirty"] else "muted"
        rows.append(f'<tr data-benchmark="{e(name)}" data-dirty="{b["dirty"]}" data-checked="{_dv(b.get("checked"))}">'
                    f'<td>{e(name)}</td><td>{e(b.get("split"))}</td>' + _td(b.get("checked"), "checked")
                    + "".join(_td(c.get(k), k.replace("_", "-")) for k in ("clean", "not_clean", "not_dirty"))
                    + f'<td class="num dirty" data-value="{b["dirty"]}"><span class="{dirty_cls}">{num(b["dirty"])}</span></td>'
                    f'<td class="num">{num((b.get("percent") or {}).get("dirty"))}%</td>'
                    f'<td>{srcs or "<span class=muted>–</span>"}</td></tr>')
        if b["dirty_items"]:
            items = []
            for it in b["dirty_items"][:MAX_DIRTY_SHOWN]:
                resp = " ".join(f'<span class="src">{e(r.get("id"))} <span class="muted">({e(r.get("source"))})</span></span>'
                                for r in it.get("responsible") or [])
                items.append(f'<tr data-item="{e(it.get("item_id"))}"><td><code>{e(it.get("item_id"))}</code></td>'
                             f'<td class="num">{num(round(100 * (it.get("coverage") or 0), 1))}%</td>'
                             + _td(it.get("longest_span"), "longest-span") + _td(it.get("length", it.get("tokens")), "length")
                             + f"<td>{resp}</td></tr>")
            more = len(b["dirty_items"]) - MAX_DIRTY_SHOWN
            details.append(f'<h3>{e(name)}: dirty items</h3><table class="dirty-items" data-benchmark="{e(name)}"><thead><tr>'
                           '<th>item</th><th class="num">coverage</th><th class="num">longest span</th>'
                           f'<th class="num">{e(con.get("unit") or "tokens")}</th><th>training rows responsible (source)</th></tr></thead><tbody>'
                           + "".join(items) + "</tbody></table>"
                           + (f'<p class="muted">and {num(more)} more (report.json)</p>' if more > 0 else ""))
    table = ('<table id="contamination-table"><thead><tr><th>benchmark</th><th>split</th><th class="num">items</th>'
             '<th class="num">clean</th><th class="num">not clean</th><th class="num">not dirty</th><th class="num">dirty</th>'
             '<th class="num">dirty %</th><th>training sources responsible (rows)</th></tr></thead><tbody>'
             + "".join(rows) + "</tbody></table>")
    return _section("contamination", "Contamination findings", lead, table + "".join(details))


def _scores(rep: dict) -> str:
    evs = rep.get("evaluations") or []
    if not evs:
        cmd = f"hrm eval {rep['run_dir']} --benchmarks BENCH_DIR --limit 200"
        return _section("scores", "Scores", "", _note("Evaluation: not run yet. Score the trained checkpoint with", cmd, "not-run"))
    body = []
    for i, ev in enumerate(evs):
        lim = ev.get("limited")
        label = (f'<span class="badge limited" data-limited="true">LIMITED</span> --limit {e(ev.get("limit"))}, '
                 f'a seeded sample (seed {e(ev.get("seed"))}): not the full benchmarks' if lim else
                 '<span class="badge ok" data-limited="false">FULL</span> every item of each benchmark')
        head = (f'<h3>Evaluation {i + 1}: <code>{e(ev.get("checkpoint"))}</code></h3><p>{label}; checkpoint '
                f'{_short(ev.get("checkpoint_sha256"))}; finished {e(ev.get("finished"))}; clean subset from '
                f'{("<code>" + e(ev["contamination"]) + "</code>") if ev.get("contamination") else "– (no contamination stage)"}.</p>')
        if not ev.get("found"):
            body.append(head + _note(f"results.json not found at {ev.get('results')}."))
            continue
        rows = []
        per_task = Counter(r["task"] for r in ev["rows"])
        for i, r in enumerate(ev["rows"]):
            n = (f'{num(r["n"])} of {num(r["n_total"])}' if r.get("limited") else num(r.get("n")))
            first = i == 0 or ev["rows"][i - 1]["task"] != r["task"]
            span = f' rowspan="{per_task[r["task"]]}"'
            lead = (f'<td{span}><b>{e(r.get("name", r["task"]))}</b></td>'
                    f'<td{span}>{e(r.get("protocol", "harness"))}</td>'
                    f'<td class="num"{span}>{e(r.get("shots", r.get("num_fewshot")))}</td>'
                    f'<td{span}>{e(r.get("condition") or "")}</td>'
                    f'<td class="num n"{span} data-value="{_dv(r.get("n"))}">{n}'
                    + (' <span class="badge limited">LIMITED</span>' if r.get("limited") else "") + "</td>"
                    if first else "")
            rows.append(f'<tr data-task="{e(r["task"])}" data-metric="{e(r["metric"])}" data-n="{_dv(r.get("n"))}" '
                        f'data-full="{_dv(r["full"])}" data-clean="{_dv(r.get("clean"))}">{lead}'
                        + f'<td>{e(r["metric"])}</td><td class="num full">{_pct(r["full"])}</td>'
                        f'<td class="num clean">{_pct(r.get("clean"))}</td>'
                        f'<td class="num">{num(r.get("n_clean")) if r.get("clean") is not None else ""}</td></tr>')
        body.append(head + '<table class="scores"><thead><tr><th>task</th><th>protocol</th><th class="num">shots</th>'
                    '<th>condition</th><th class="num">n</th>'
                    '<th>metric</th><th class="num">full</th><th class="num">clean</th><th class="num">clean n</th></tr>'
                    "</thead><tbody>" + "".join(rows) + "</tbody></table>")
    return _section("scores", "Scores: full vs clean", "Scores in percent on every item scored (full) and on "
                    "the items the contamination check bucketed clean; n is the items scored per task; protocol: "
                    "lm-eval's standard task (harness) or the HRM-Text paper's generative one (paper), with its shot "
                    "count and condition.", "".join(body))


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def render_html(rep: dict) -> str:
    """The page for a report dict (see `collect`)."""
    srcs = list(((rep.get("lineage") or {}).get("per_source") or {}))
    colors = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(srcs)}
    nav = "".join(f'<a href="#{sid}">{e(t)}</a>' for sid, t in SECTIONS)
    over = (" · overrides " + ", ".join(f"<code>{e(o)}</code>" for o in rep["overrides"])) if rep.get("overrides") else ""
    head = (f'<header class="top"><h1>Run report: {e(rep["name"])}</h1><div class="meta">run folder <code>{e(rep["run_dir"])}</code>'
            f' · run manifest updated {e(rep.get("updated") or "–")} · report generated {e(rep["generated"])}{over}</div>'
            f"<nav>{nav}</nav></header>")
    body = "".join([_summary(rep), _flow(rep, colors), _stages_table(rep), _sources_table(rep, colors),
                    _strata_table(rep), _examples(rep), _tokens(rep), _training_section(rep), _shards(rep),
                    _contamination_section(rep), _scores(rep)])
    csp = "default-src 'none'; style-src 'unsafe-inline'"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Run report: {e(rep['name'])}</title><style>{CSS}</style></head><body>"
            f"{head}<main>{body}</main><footer>hrm report · report.json beside this page holds every number shown"
            "</footer></body></html>\n")


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict:
    """Write RUN_DIR's report into OUT_DIR (default `<run>/report/`): `index.html` and `report.json`.
    Returns {"html": path, "json": path, "sections": [...], "notes": [...]} (notes: the parts not run yet)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    rep = collect(run_dir)
    page = render_html(rep)
    out.mkdir(parents=True, exist_ok=True)
    write_json(rep, out / "report.json")
    with atomic_path(out / "index.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    missing = [what for what, key in (("lineage", "lineage"), ("mix", "tokens"), ("contamination", "contamination"),
                                      ("training", "training"), ("evaluation", "evaluations")) if not rep.get(key)]
    return {"html": str(out / "index.html"), "json": str(out / "report.json"),
            "sections": [sid for sid, _ in SECTIONS], "not_run": missing}
