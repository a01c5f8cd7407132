"""The ablation ladder's report: a markdown table like the paper's, inline-SVG plots and one
self-contained HTML page (no plotting library in the lock: the charts are written as SVG by hand).

Input: the summary dict that flows.ablation_flow builds (`rungs`: one entry per rung with its
train metrics, FLOPs, scores, held-out answer loss, logit lens and attention entropy). Pure Python.
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


# ------------------------------------------------------------------------------------------------
# SVG charts
# ------------------------------------------------------------------------------------------------
def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + 1e-9 * step:
        out.append(round(v, 10))
        v += step
    return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.1e}"
    return f"{v:.3g}"


def line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], title: str, xlabel: str,
               ylabel: str, *, xticklabels: Sequence[str] | None = None, width: int = 660, height: int = 320,
               ylim: tuple[float, float] | None = None) -> str:
    """An SVG line chart; series = [(label, xs, ys)]. xticklabels: names for x = 0, 1, 2, ..."""
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    L, R, T, B = 60, 200, 30, 45
    w, h = width - L - R, height - T - B
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<text x="{L + w / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>']
    if not pts:
        parts.append(f'<text x="{L}" y="{T + 20}">no data</text></svg>')
        return "".join(parts)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = ylim if ylim else (min(p[1] for p in pts), max(p[1] for p in pts))
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.04 * (y1 - y0)
    y0, y1 = (y0, y1) if ylim else (y0 - pad, y1 + pad)

    def sx(x: float) -> float:
        return L + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return T + h - (min(max(y, y0), y1) - y0) / (y1 - y0) * h

    parts.append(f'<rect x="{L}" y="{T}" width="{w}" height="{h}" fill="none" stroke="#999"/>')
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{L}" x2="{L + w}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
                     f'<text x="{L - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    if xticklabels is not None:
        for i, lab in enumerate(xticklabels):
            parts.append(f'<text x="{sx(i):.1f}" y="{T + h + 14}" text-anchor="middle">{html.escape(lab)}</text>')
    else:
        for t in _ticks(x0, x1):
            parts.append(f'<text x="{sx(t):.1f}" y="{T + h + 14}" text-anchor="middle">{_fmt(t)}</text>')
    parts.append(f'<text x="{L + w / 2}" y="{height - 8}" text-anchor="middle">{html.escape(xlabel)}</text>'
                 f'<text x="14" y="{T + h / 2}" text-anchor="middle" transform="rotate(-90 14 {T + h / 2})">'
                 f'{html.escape(ylabel)}</text>')
    for k, (label, xs, ys) in enumerate(series):
        c = COLORS[k % len(COLORS)]
        seg = [(sx(x), sy(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if seg:
            d = " ".join(f"{a:.1f},{b:.1f}" for a, b in seg)
            parts.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="1.6"/>')
            if len(seg) <= 40:
                parts.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{c}"/>' for a, b in seg)
        parts.append(f'<rect x="{L + w + 10}" y="{T + 14 * k}" width="10" height="10" fill="{c}"/>'
                     f'<text x="{L + w + 24}" y="{T + 9 + 14 * k}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(groups: Sequence[str], series: Sequence[tuple[str, Sequence[float | None]]], title: str,
              ylabel: str, *, width: int = 660, height: int = 300) -> str:
    """Grouped bars: one group per entry of `groups`, one bar per series."""
    L, R, T, B = 60, 200, 30, 60
    w, h = width - L - R, height - T - B
    vals = [v for _, vs in series for v in vs if v is not None and math.isfinite(v)]
    top = max(vals + [0.0])
    y1 = top * 1.1 if top > 0 else 1.0  # all zeros (e.g. no item solved): a 0..1 axis
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<text x="{L + w / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
             f'<rect x="{L}" y="{T}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for t in _ticks(0, y1):
        y = T + h - t / y1 * h
        parts.append(f'<line x1="{L}" x2="{L + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{L - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    gw = w / max(len(groups), 1)
    bw = gw * 0.8 / max(len(series), 1)
    for g, name in enumerate(groups):
        parts.append(f'<text x="{L + gw * (g + 0.5):.1f}" y="{T + h + 14}" text-anchor="middle">{html.escape(name)}</text>')
        for k, (_, vs) in enumerate(series):
            v = vs[g]
            if v is None or not math.isfinite(v):
                continue
            bh = v / y1 * h
            x = L + gw * g + gw * 0.1 + bw * k
            parts.append(f'<rect x="{x:.1f}" y="{T + h - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                         f'fill="{COLORS[k % len(COLORS)]}"><title>{_fmt(v)}</title></rect>'
                         f'<text x="{x + bw / 2:.1f}" y="{T + h - bh - 3:.1f}" text-anchor="middle" font-size="9">'
                         f'{_fmt(v)}</text>')
    for k, (label, _) in enumerate(series):
        parts.append(f'<rect x="{L + w + 10}" y="{T + 14 * k}" width="10" height="10" fill="{COLORS[k % len(COLORS)]}"/>'
                     f'<text x="{L + w + 24}" y="{T + 9 + 14 * k}">{html.escape(label)}</text>')
    parts.append(f'<text x="14" y="{T + h / 2}" text-anchor="middle" transform="rotate(-90 14 {T + h / 2})">'
                 f'{html.escape(ylabel)}</text></svg>')
    return "".join(parts)


# ------------------------------------------------------------------------------------------------
# the table and the plots of an ablation summary
# ------------------------------------------------------------------------------------------------
def score_columns(summary: dict) -> list[str]:
    cols: list[str] = []
    for r in summary["rungs"]:
        for t in (r.get("scores") or {}):
            if t not in cols:
                cols.append(t)
    return cols


def _num(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.3e}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table_rows(summary: dict) -> list[dict]:
    """One row per rung: what was trained and how well (the Prefect table artifact)."""
    rows = []
    for r in summary["rungs"]:
        row = {"rung": r["title"], "arch": r["arch"], "loss": r["loss"], "mask": r["mask"],
               "params": r["params"], "train_tokens": r["train_tokens"], "train_flops": r["train_flops"],
               "flops_per_token": r["flops_per_token"], "final_train_loss": r["final_train_loss"],
               "final_train_answer_loss": r["final_train_answer_loss"],
               "heldout_answer_loss": r["heldout_answer_loss"]}
        for t in score_columns(summary):
            s = (r.get("scores") or {}).get(t)
            row[t] = None if s is None else s["value"]
        rows.append(row)
    return rows


def markdown_table(summary: dict) -> str:
    cols = score_columns(summary)
    head = ["rung", "params", "train tokens", "train FLOPs", "FLOPs/token", "train loss (objective)",
            "train answer loss", "held-out answer loss", *[f"{c} (n)" for c in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rungs"]:
        cells = [r["title"], f"{r['params']:,}", f"{r['train_tokens']:,}", f"{r['train_flops']:.3e}",
                 f"{r['flops_per_token']:.3e}", _num(r["final_train_loss"]), _num(r["final_train_answer_loss"]),
                 _num(r["heldout_answer_loss"])]
        for c in cols:
            s = (r.get("scores") or {}).get(c)
            cells.append("-" if s is None else f"{100 * s['value']:.1f}% ({s['n']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _curve(metrics: list[dict], key: str, n: int = 200) -> tuple[list[float], list[float]]:
    recs = [m for m in metrics if m.get(key) is not None]
    stride = max(1, len(recs) // n)
    # a running mean over the stride smooths the per-step noise of small batches
    xs, ys = [], []
    for i in range(0, len(recs), stride):
        chunk = recs[i:i + stride]
        xs.append(sum(m["tokens_seen"] for m in chunk) / len(chunk))
        ys.append(sum(m[key] for m in chunk) / len(chunk))
    return xs, ys


def plots(summary: dict) -> dict[str, str]:
    """name -> SVG of every chart of the report."""
    rungs = summary["rungs"]
    out: dict[str, str] = {}
    out["loss_curves"] = line_chart([(r["title"], *_curve(r["metrics"], "loss")) for r in rungs],
                                    "training loss (each rung's own objective)", "training tokens", "loss (nats/token)")
    out["answer_loss_curves"] = line_chart([(r["title"], *_curve(r["metrics"], "answer_loss")) for r in rungs],
                                           "training answer-token loss", "training tokens", "loss (nats/answer token)")
    cols = score_columns(summary)
    names = [r["short"] for r in rungs]
    bars = [(c, [((r.get("scores") or {}).get(c) or {}).get("value") for r in rungs]) for c in cols]
    out["scores"] = bar_chart(names, bars, "scores per rung (exact match / accuracy)", "score")
    out["heldout_loss"] = bar_chart(names, [("held-out answer loss", [r["heldout_answer_loss"] for r in rungs])],
                                    "held-out answer-token loss (teacher forced)", "nats/token")
    for r in rungs:
        lens = r.get("logit_lens") or {}
        states = list(lens.get("states") or [])
        if not states:
            continue
        x = list(range(len(states)))
        f = next((f for f in (1, 10, 100, 1000) if max(lens["kl"]) / f <= 1.0), 10000)  # KL drawn on the 0..1 axis
        kl_label = "KL(final || state)" + (f" / {f}" if f > 1 else "")
        out[f"lens_{r['name']}"] = line_chart(
            [("p(final prediction)", x, lens["p_final"]), (kl_label, x, [k / f for k in lens["kl"]])],
            f"logit lens: {r['title']}", "state (module call / layer)", "probability; " + kl_label + " (nats)",
            xticklabels=states, ylim=(0.0, 1.0))
    for arch, what in (("transformer", "Transformer rungs: causal vs PrefixLM, per layer"),
                       ("hrm", "HRM: per module call and layer")):
        series, labels = [], []
        for r in rungs:
            e = r.get("attention_entropy") or {}
            if r["arch"] != arch or not e.get("states"):
                continue
            labels = e["states"]
            for part in ("prompt", "answer"):
                series.append((f"{r['short']} ({r['mask']}, {part} queries)", list(range(len(e[part]))), e[part]))
        if series:
            out[f"attention_entropy_{arch}"] = line_chart(series, f"attention entropy: {what}", "state",
                                                          "mean entropy (nats)", width=860, xticklabels=labels)
    return out


CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
       "th{background:#f3f3f3}td:first-child{text-align:left}.note{color:#555;font-size:13px}"
       "figure{display:inline-block;margin:0.5em}")


def render_html(summary: dict) -> str:
    svg = plots(summary)
    cols = score_columns(summary)
    head = ["rung", "arch", "loss", "mask", "params", "train tokens", "train FLOPs", "FLOPs/token",
            "train loss (objective)", "train answer loss", "held-out answer loss", *[f"{c} (n)" for c in cols]]
    rows = []
    for r in summary["rungs"]:
        cells = [r["title"], r["arch"], r["loss"], r["mask"], f"{r['params']:,}", f"{r['train_tokens']:,}",
                 f"{r['train_flops']:.3e}", f"{r['flops_per_token']:.3e}", _num(r["final_train_loss"]),
                 _num(r["final_train_answer_loss"]), _num(r["heldout_answer_loss"])]
        for c in cols:
            s = (r.get("scores") or {}).get(c)
            cells.append("-" if s is None else f"{100 * s['value']:.1f}% (n={s['n']})")
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in summary.get("notes", []))
    figs = "".join(f"<figure>{s}</figure>" for s in svg.values())
    setting = html.escape(", ".join(f"{k}={v}" for k, v in summary.get("settings", {}).items()))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Ablation ladder: {html.escape(summary['spec'])}"
            f"</title><style>{CSS}</style></head><body>"
            f"<h1>Ablation ladder on <code>{html.escape(summary['spec'])}</code></h1>"
            f"<p class='note'>Run folder: <code>{html.escape(summary['run_dir'])}</code>; pack "
            f"<code>{html.escape(summary['pack'])}</code>; match: <b>{html.escape(summary['match'])}</b>; "
            f"settings: {setting}</p>"
            "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"
            f"<ul class='note'>{notes}</ul>{figs}</body></html>")


__all__ = ["line_chart", "bar_chart", "plots", "markdown_table", "table_rows", "render_html", "score_columns"]
