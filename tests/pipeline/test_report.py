"""The run report (pipeline.report) in a real browser.

A small run made by the real data flow (under prefect_test_harness): a generator source with planted
duplicates, a local file with broken lines (normalize rejects), and GSM8K test questions planted in the
training data with the contamination check and decontamination on. The report is rendered by headless
Chromium (`--dump-dom`), and the numbers the page shows are compared with lineage.json, the mix report,
the contamination report and the pack manifest; a screenshot must be a non-empty PNG.

Training and evaluation are recorded in the run manifest by `hrm train` / `hrm eval`; rather than train
a model here, the test writes the records those commands write (the `train` entry of
training/train.py's `_record_in_run`, a metrics.jsonl with its keys, evaluation/run.py's results.json,
recorded by evaluation.locate.record_evaluation itself).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from pipeline.io import read_json, sha256_json
from pipeline.report import collect, render_html, write_report
from pipeline.runs import read_run, stage_dir, update_run

CHROMIUM = next((p for p in (os.environ.get("HRM_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: "
                                    "apt-get install -y chromium; or set HRM_CHROMIUM to a Chrome binary)")

SECTIONS = ("summary", "flow", "stages", "sources", "strata", "removal-examples", "tokens", "training", "shards",
            "contamination", "scores")
PICKS = (3, 50)  # GSM8K test items planted in the training data


# ------------------------------------------------------------------------------------------------
# a small DOM from Chromium's serialized page
# ------------------------------------------------------------------------------------------------
class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None"):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, attrs, parent, [], []

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs) -> list["Node"]:
        out = []
        for n in self.iter():
            if tag is not None and n.tag != tag:
                continue
            if cls is not None and cls not in n.attrs.get("class", "").split():
                continue
            if all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items()):
                out.append(n)
        return out

    def find(self, tag: str | None = None, cls: str | None = None, **attrs) -> "Node":
        found = self.find_all(tag, cls, **attrs)
        assert found, f"no <{tag} class={cls} {attrs}>"
        return found[0]

    def by_id(self, ident: str) -> "Node":
        found = [n for n in self.iter() if n.attrs.get("id") == ident]
        assert len(found) == 1, f"id {ident!r}: {len(found)} elements"
        return found[0]

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)


VOID = {"meta", "br", "img", "input", "link", "hr", "col", "source", "wbr", "area", "base", "embed", "param", "track"}


class DOM(HTMLParser):
    def __init__(self, markup: str):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.cur = self.root
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        n = Node(tag, {k: (v or "") for k, v in attrs}, self.cur)
        self.cur.children.append(n)
        if tag not in VOID:
            self.cur = n

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, {k: (v or "") for k, v in attrs}, self.cur))

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.text.append(data)


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=True)


def browser_dom(page: str, tmp: Path) -> Node:
    out = chromium("--dump-dom", Path(page).resolve().as_uri(), tmp=tmp).stdout
    assert "<section" in out, out[:500]
    return DOM(out).root


def ints(d: dict) -> dict:
    return {k: int(v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def run_dir(harness, tmp_path_factory, shared, gsm8k_train):
    from flows.data_flow import data_flow

    tmp = tmp_path_factory.mktemp("report")
    test_rows = [json.loads(x) for x in (shared / "data" / "gsm8k" / "test.jsonl").read_text().splitlines()[:300]]
    bench = tmp / "bench" / "gsm8k"
    bench.mkdir(parents=True)
    (bench / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    (tmp / "planted.jsonl").write_text("".join(json.dumps({"question": test_rows[i]["question"],
                                                           "answer": test_rows[i]["answer"]}) + "\n" for i in PICKS))
    (tmp / "messy.jsonl").write_text('{"instruction": "Name a prime above 10.", "response": "Eleven is prime."}\n'
                                     '{"instruction": "x",\n{"instruction": "Empty?", "response": ""}\n'
                                     '{"response": "no instruction"}\n')
    spec = tmp / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: reporttest
        seed: 2
        sources:
          - name: wp
            kind: generator
            generator: word_problems
            params: {{n: 400, near_dup_rate: 0.1, exact_dup_rate: 0.05}}
            fields: {{instruction: question, response: answer, id: uid, condition: condition, subset: task}}
          - {{name: gsm8k, kind: local, path: {gsm8k_train}, max_rows: 150,
              fields: {{instruction: question, response: answer}}, condition: cot}}
          - {{name: planted, kind: local, path: {tmp / "planted.jsonl"},
              fields: {{instruction: question, response: answer}}, condition: cot}}
          - {{name: messy, kind: local, path: {tmp / "messy.jsonl"}}}
        stratify:
          rules:
            - {{match: wp/, cap_rows: 40}}
            - {{match: "*", name: rest, stratum: source}}
        tokenizer: {{vocab_size: 600, sample_rows: 2000}}
        contamination: {{benchmarks_dir: {tmp / "bench"}, decontaminate: true}}
        mix: {{epochs: 2}}
        pack: {{seq_len: 512, shard_tokens: 16384}}
        """))
    out = tmp / "run"
    data_flow(spec=str(spec), output_dir=str(out), progress=False)
    return out


def record_training(run: Path, steps: int = 40) -> dict:
    """What `hrm train RUN` leaves: a train folder with train.json, metrics.jsonl and exports that carry
    the pack's data record, and the run manifest's `train` entry."""
    pack = stage_dir(run, "pack")
    man = read_json(pack / "manifest.json")
    data = {"pack_dir": str(pack), "pack_version": pack.name, "pack_manifest_sha256": sha256_json(man["outputs"]),
            "tokenizer_dir": man["inputs"]["tokenized"], "tokenizer_sha256": "ab" * 32}
    train = run / "train"
    train.mkdir(exist_ok=True)
    (train / "train.json").write_text(json.dumps({"data": data, "seq_len": 512, "world_size": 1}))
    with open(train / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": 9.0 * 0.97 ** s + 1.0, "answer_tokens": 900, "grad_norm": 0.9,
                                "lr": 3e-4 * min(1.0, s / 5), "bp": 2, "tokens_per_s": 8000.0 + s, "step_s": 0.2,
                                "flops": 1e10, "mfu": None}) + "\n")
    for sub in ("final/ema", "final/raw", f"export/step-{steps:08d}/ema"):
        (train / sub).mkdir(parents=True, exist_ok=True)
        (train / sub / "config.json").write_text(json.dumps({"config": {}, "data": {
            k: data[k] for k in ("tokenizer_sha256", "pack_manifest_sha256", "pack_dir", "tokenizer_dir")}}))
    entry = {"dir": "train", "pack_dir": str(pack.relative_to(run)), "pack_version": pack.name,
             "pack_manifest_sha256": data["pack_manifest_sha256"], "tokenizer_sha256": data["tokenizer_sha256"],
             "config_sha256": "cd" * 32, "preset": "debug", "arch": "hrm", "steps": steps, "step": steps,
             "status": "done", "final": {"raw": "train/final/raw", "ema": "train/final/ema"}}
    update_run(run, train=entry)
    return entry


def record_evaluation(run: Path) -> dict:
    """A limited evaluation's results.json (evaluation/run.py's layout) recorded the way `hrm eval` does."""
    from evaluation.locate import record_evaluation as record

    out = run / "eval"
    out.mkdir(exist_ok=True)
    res = {"checkpoint": str(run / "train/final/ema"), "checkpoint_sha256": "ef" * 32, "tokenizer": "t",
           "tokenizer_sha256": "ab" * 32, "limit": 20, "seed": 0, "limited": True, "online": False,
           "benchmarks": "b", "contamination": str(stage_dir(run, "contamination")), "tasks": {
               "gsm8k": {"harness_task": "hrm_gsm8k", "num_fewshot": 0, "condition": "cot",
                         "full": {"exact_match,strict-match": 0.05, "exact_match,flexible-extract": 0.1},
                         "clean": {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 0.0526},
                         "n": 20, "n_total": 300, "limited": True, "n_clean": 19},
               "arc_challenge": {"harness_task": "hrm_arc", "num_fewshot": 25, "condition": "direct",
                                 "full": {"acc,none": 0.25}, "n": 20, "n_total": 1172, "limited": True}}}
    (out / "results.json").write_text(json.dumps(res))
    rec = record(run, res, out)
    assert rec is not None
    return res


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
@needs_chromium
def test_report_numbers_in_the_browser_match_the_run(run_dir, tmp_path):
    lin = read_json(stage_dir(run_dir, "lineage") / "lineage.json")
    assert lin["balanced"]
    # before training and evaluation: those sections say they have not run
    first = write_report(run_dir)
    assert set(first["not_run"]) == {"training", "evaluation"}
    dom = browser_dom(first["html"], tmp_path)
    for sid in ("training", "scores", "shards"):
        assert "not run yet" in dom.by_id(sid).find(cls="not-run").all_text(), sid

    record_training(run_dir)
    ev = record_evaluation(run_dir)
    res = write_report(run_dir)
    assert res["html"] == str(run_dir / "report" / "index.html") and res["not_run"] == []
    page = Path(res["html"]).read_text()
    # self-contained: nothing to fetch, no scripts
    for bad in ("<script", "<link", "src=", "url(", "@import", "<img", "<iframe"):
        assert bad not in page, bad
    dom = browser_dom(res["html"], tmp_path)
    for sid in SECTIONS:
        assert dom.by_id(sid).tag == "section"

    # summary numbers: the values and their display with thousands separators
    total_in = sum(c["ingested"] for c in lin["per_source"].values())
    for ident, want in (("rows-ingested", total_in), ("rows-stratified", lin["rows_stratified"]),
                        ("rows-packed", lin["rows_packed"]), ("rows-removed", lin["rows_removed"])):
        el = dom.by_id(ident)
        assert int(el.attrs["data-value"]) == want and el.all_text().strip() == f"{want:,}", ident
    assert dom.by_id("balanced").attrs["data-value"] == "true"

    # per source: every count and every removal reason as lineage.json has it
    rows = {r.attrs["data-source"]: r for r in dom.by_id("per-source").find_all("tr") if "data-source" in r.attrs}
    assert set(rows) == set(lin["per_source"]) == {"wp", "gsm8k", "planted", "messy"}
    for src, c in lin["per_source"].items():
        r = rows[src]
        for k in ("ingested", "stratified", "packed", "removed"):
            assert int(r.attrs[f"data-{k}"]) == c[k], (src, k)
            cell = r.find("td", cls=k)
            assert int(cell.attrs["data-value"]) == c[k] and cell.all_text() == f"{c[k]:,}", (src, k)
        removed_by = {s.attrs["data-reason"]: int(s.attrs["data-value"])
                      for s in r.find("td", cls="removed-by").find_all("span", cls="reason")}
        assert removed_by == c["removed_by"], src
        rejected = {s.attrs["data-reason"]: int(s.attrs["data-value"])
                    for s in r.find("td", cls="rejected-by").find_all("span", cls="reason")}
        assert rejected == c["rejected_at_normalize"], src
    assert lin["per_source"]["messy"]["rejected_at_normalize"] == {"bad_json": 1, "empty_field": 1, "missing_field": 1}
    assert lin["per_source"]["planted"]["removed_by"] == {"contamination:benchmark_contamination": len(PICKS)}

    # per stratum
    strata = {r.attrs["data-stratum"]: r for r in dom.by_id("per-stratum").find_all("tr") if "data-stratum" in r.attrs}
    assert set(strata) == set(lin["per_stratum"])
    for name, st in lin["per_stratum"].items():
        r = strata[name]
        assert (int(r.attrs["data-in"]), int(r.attrs["data-packed"]), int(r.attrs["data-times-packed"])) == (
            st["in"], st["packed"], st["times_packed"]), name
        got = {s.attrs["data-reason"]: int(s.attrs["data-value"]) for s in r.find_all("span", cls="reason")}
        assert got == st["removed"] and int(r.attrs["data-removed"]) == sum(st["removed"].values()), name
    reasons = {k for st in lin["per_stratum"].values() for k in st["removed"]}
    assert {"dedup:exact_duplicate", "mix:capped", "contamination:benchmark_contamination"} <= reasons, reasons
    examples = dom.by_id("removal-examples").find_all("tr")
    assert {r.attrs["data-reason"] for r in examples if "data-reason" in r.attrs} == set(lin["examples"])

    # the Sankey: sources in, packed out, removals per stage; band widths proportional to rows
    svg = dom.by_id("flow").find("svg", cls="sankey")
    nodes = svg.find_all("rect", cls="sankey-node")
    src_nodes = {n.attrs["data-source"]: n for n in nodes if n.attrs.get("data-column") == "ingested"}
    assert ints({s: n.attrs["data-rows"] for s, n in src_nodes.items()}) == {
        s: c["ingested"] for s, c in lin["per_source"].items()}
    big = max(src_nodes.values(), key=lambda n: int(n.attrs["data-rows"]))
    px_per_row = float(big.attrs["height"]) / int(big.attrs["data-rows"])
    for s, n in src_nodes.items():  # heights are written to 0.01 px
        assert abs(float(n.attrs["height"]) - px_per_row * int(n.attrs["data-rows"])) <= 0.011, s
    packed = {n.attrs["data-source"]: int(n.attrs["data-rows"]) for n in nodes if n.attrs.get("data-column") == "pack"}
    assert packed == {s: c["packed"] for s, c in lin["per_source"].items() if c["packed"]}
    sinks = {n.attrs["data-stage"]: int(n.attrs["data-rows"]) for n in svg.find_all("rect", cls="sankey-removed")}
    want_sinks: dict[str, int] = {}
    for c in lin["per_source"].values():
        if c["rejected_at_normalize"]:
            want_sinks["normalize"] = want_sinks.get("normalize", 0) + sum(c["rejected_at_normalize"].values())
        for k, n in c["removed_by"].items():
            want_sinks[k.split(":")[0]] = want_sinks.get(k.split(":")[0], 0) + n
    assert sinks == want_sinks and {"normalize", "dedup", "contamination", "mix"} <= set(sinks), sinks
    assert sum(sinks.values()) + lin["rows_packed"] == total_in
    links = svg.find_all("path", cls="sankey-link")
    into = sum(int(p.attrs["data-rows"]) for p in links if p.attrs["data-to"] == "removed:contamination")
    assert into == len(PICKS) and {p.attrs["data-source"] for p in links
                                   if p.attrs["data-to"] == "removed:contamination"} == {"planted"}
    for side, key in (("src-in", "ingested"), ("src-out", "packed")):
        labels = {t.attrs["data-source"]: t.all_text() for t in svg.find_all("text", cls=side)}
        assert f"{lin['per_source']['wp'][key]:,}" in labels["wp"] and "wp" in labels["wp"], (side, labels)

    # stages: the versions of the run manifest, no stale flags
    run = read_run(run_dir)
    st_rows = {r.attrs["data-stage"]: r for r in dom.by_id("stages").find_all("tr") if "data-stage" in r.attrs}
    assert set(st_rows) == set(run["stages"])
    for name, ent in run["stages"].items():
        assert st_rows[name].attrs["data-version"] == ent["version"] and st_rows[name].attrs["data-stale"] == "false"

    # unique vs seen tokens per stratum (mix_report.json)
    mix = read_json(stage_dir(run_dir, "mix") / "mix_report.json")
    tok = {r.attrs["data-stratum"]: r for r in dom.by_id("tokens").find_all("tr") if "data-stratum" in r.attrs}
    assert set(tok) == set(mix["strata"])
    for name, s in mix["strata"].items():
        assert (int(tok[name].attrs["data-unique-tokens"]), int(tok[name].attrs["data-seen-tokens"])) == (
            s["unique_tokens"], s["seen_tokens"]), name

    # contamination: the planted items are dirty, made so by the planted source
    con = read_json(stage_dir(run_dir, "contamination") / "report.json")
    g = dom.by_id("contamination-table").find("tr", data_benchmark="gsm8k")
    assert int(g.attrs["data-dirty"]) == len(con["benchmarks"]["gsm8k"]["dirty_items"]) == len(PICKS)
    assert {s.attrs["data-source"]: int(s.attrs["data-value"]) for s in g.find_all("span", cls="src")} == {
        "planted": len(PICKS)}
    items = dom.by_id("contamination").find("table", cls="dirty-items").find_all("tr")
    assert sorted(r.attrs["data-item"] for r in items if "data-item" in r.attrs) == sorted(
        f"gsm8k/test/{i}" for i in PICKS)

    # training curve and the shards behind each checkpoint
    curve = dom.by_id("train-curve")
    assert int(curve.attrs["data-points"]) == 40 and curve.find_all("polyline", cls="curve")
    pack_man = read_json(stage_dir(run_dir, "pack") / "manifest.json")
    shard_rows = {r.attrs["data-file"]: r.attrs["data-sha256"] for r in dom.by_id("shard-table").find_all("tr")
                  if "data-file" in r.attrs}
    assert shard_rows == {f: r["sha256"] for f, r in pack_man["outputs"].items() if f.endswith(".arrow")}
    assert "shards verified" in dom.by_id("shards").all_text()
    ck = [r.attrs["data-checkpoint"] for r in dom.by_id("checkpoint-table").find_all("tr") if "data-checkpoint" in r.attrs]
    assert {"train/final/ema", "train/final/raw", "train/export/step-00000040/ema"} == set(ck)

    # scores: full vs clean with n, and the LIMITED label
    scores = dom.by_id("scores")
    assert scores.find_all("span", cls="limited") and "LIMITED" in scores.all_text()
    srow = scores.find("tr", data_task="gsm8k", data_metric="exact_match,strict-match")
    assert (srow.attrs["data-n"], float(srow.attrs["data-full"]), float(srow.attrs["data-clean"])) == ("20", 0.05, 0.0)
    assert "5.00" in srow.all_text() and "0.00" in srow.all_text()
    first_gsm8k = scores.find("tr", data_task="gsm8k")  # task, shots and n are written once per task
    assert "20 of 300" in first_gsm8k.find("td", cls="n").all_text()
    assert ev["tasks"]["arc_challenge"]["n"] == int(scores.find("tr", data_task="arc_challenge").attrs["data-n"])

    # the report's JSON holds the same numbers
    rj = read_json(res["json"])
    assert rj["lineage"]["per_source"] == lin["per_source"] and rj["lineage"]["per_stratum"] == lin["per_stratum"]

    # a screenshot: a real, non-empty PNG of the window size
    png = tmp_path / "report.png"
    chromium(f"--screenshot={png}", "--window-size=1400,1000", Path(res["html"]).as_uri(), tmp=tmp_path)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert struct.unpack(">II", data[16:24]) == (1400, 1000)


@needs_chromium
def test_stale_stages_are_flagged(run_dir, tmp_path):
    """After `--only dedup` with another threshold, the stages after dedup are stale; the report says so."""
    from flows.data_flow import data_flow

    spec = run_dir.parent / "spec.yaml"
    data_flow(spec=str(spec), output_dir=str(run_dir), only="dedup", overrides=["dedup.threshold=0.5"], progress=False)
    stale = {k for k, v in read_run(run_dir)["stages"].items() if v.get("stale")}
    assert {"tokenizer", "mix", "pack", "lineage"} <= stale
    dom = browser_dom(write_report(run_dir, tmp_path / "rep")["html"], tmp_path)
    rows = {r.attrs["data-stage"]: r for r in dom.by_id("stages").find_all("tr") if "data-stage" in r.attrs}
    assert {k for k, r in rows.items() if r.attrs["data-stale"] == "true"} == stale
    assert all("STALE" in rows[k].all_text() for k in stale)
    assert "Stale stages" in dom.by_id("summary").find(cls="stale").all_text()


def test_text_is_escaped_and_the_cli_writes_the_report(run_dir, tmp_path, capsys):
    from pipeline.cli import main

    rep = collect(run_dir)
    rep["name"] = "<script>alert(1)</script>"
    ex = next(iter(rep["lineage"]["examples"].values()))
    ex[0]["detail"] = 'a "quoted" <b>detail</b> & more'
    page = render_html(rep)
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;detail&lt;/b&gt; &amp; more" in page and "<b>detail</b>" not in page

    assert main(["report", str(run_dir), "--output", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cli" / "index.html") in out
    assert (tmp_path / "cli" / "report.json").is_file()
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "nowhere")])
