"""`pipeline.trace` and `hrm lineage trace|why` on a real small run made by the data flow (under
prefect_test_harness): a generator source with planted duplicates, a messy local JSONL (bad lines,
a benchmark question planted for decontamination), a JSONL source with its own id field, and a MATH-style
source that emits direct copies (one without a \\boxed answer)."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.testing.utilities import prefect_test_harness

from pipeline.cli import main
from pipeline.io import read_json, sha256_file
from pipeline.runs import read_run, stage_dir, update_run, write_run
from pipeline.trace import UnknownId, format_trace, trace, trace_markdown, why

SPEC = """
name: tracetest
seed: 5
sources:
  - name: wp
    kind: generator
    generator: word_problems
    params: {n: 400, near_dup_rate: 0.1, exact_dup_rate: 0.03}
    fields: {instruction: question, response: answer, id: uid, condition: condition, subset: task}
  - name: messy
    kind: local
    path: MESSY
    condition: cot
  - name: ided
    kind: local
    path: IDED
    fields: {instruction: q, response: a, id: qid}
  - name: boxed
    kind: local
    path: BOXED
    condition: synth,cot
    emit: both
    answer_format: boxed
stratify:
  rules:
    - {match: wp/, cap_rows: 40}
    - {match: "*", name: rest, stratum: source}
tokenizer: {vocab_size: 600, sample_rows: 2000}
contamination: {benchmarks_dir: BENCH, decontaminate: true}
mix: {epochs: 2}
pack: {seq_len: 256, shard_tokens: 8192}
"""

PLANTED = 4  # the gsm8k test item planted as messy line 5


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared) -> Path:
    from flows.data_flow import data_flow

    d = tmp_path_factory.mktemp("trace")
    test_rows = [json.loads(x) for x in (shared / "data" / "gsm8k" / "test.jsonl").read_text().splitlines()[:40]]
    (d / "bench" / "gsm8k").mkdir(parents=True)
    (d / "bench" / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    planted = test_rows[PLANTED]
    lines = ['{"instruction": "Name a prime above 10.", "response": "Eleven is prime, and so is thirteen."}',
             '{"instruction": "x",',
             '{"instruction": "Empty?", "response": ""}',
             '{"response": "no instruction"}',
             json.dumps({"instruction": planted["question"], "response": planted["answer"]})]
    lines += [json.dumps({"instruction": f"Add {i} and {3 * i + 7}, then say the sum in words.",
                          "response": f"{i} + {3 * i + 7} = {4 * i + 7}. The sum is {4 * i + 7}."}) for i in range(20)]
    (d / "messy.jsonl").write_text("\n".join(lines) + "\n")
    ided = [{"qid": "q-1", "q": "Spell the word cat.", "a": "The word cat is spelled C A T."},
            {"qid": "q-2", "q": "Spell the word dog backwards.", "a": "Backwards, dog is spelled G O D."},
            {"qid": "q-1", "q": "Spell the word cow.", "a": "The word cow is spelled C O W."},
            {"qid": 7, "q": "Spell the word hen.", "a": "The word hen is spelled H E N."}]
    (d / "ided.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ided))
    boxed = [{"instruction": f"What is {i} times {i + 3}, as a fraction over {i + 1}?",
              "response": f"Multiply: {i} * {i + 3} = {i * (i + 3)}, so $\\boxed{{\\frac{{{i * (i + 3)}}}{{{i + 1}}}}}$."}
             for i in range(1, 6)]
    boxed[2]["response"] = "I cannot put this in a box."
    (d / "boxed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in boxed))
    spec = d / "spec.yaml"
    spec.write_text(textwrap.dedent(SPEC).replace("MESSY", str(d / "messy.jsonl"))
                    .replace("IDED", str(d / "ided.jsonl")).replace("BENCH", str(d / "bench"))
                    .replace("BOXED", str(d / "boxed.jsonl")))
    with prefect_test_harness(server_startup_timeout=120):
        data_flow(spec=str(spec), output_dir=str(d / "run"), progress=False)
    return d / "run"


def lineage_rows(run: Path) -> list[dict]:
    return pq.read_table(stage_dir(run, "lineage") / "lineage.parquet").to_pylist()


def test_packed_row_names_its_shards_and_sequences(run):
    row = next(r for r in lineage_rows(run) if r["status"] == "packed" and r["times_packed"] == 2)
    d = trace(run, row["id"])
    assert d["outcome"] == {"status": "packed", "stage": "pack", "times_packed": 2}
    assert [s["stage"] for s in d["stages"]] == ["ingest", "normalize", "stratify", "dedup", "tokenizer",
                                                  "contamination", "mix", "pack"]
    pack = stage_dir(run, "pack")
    places = d["stages"][-1]["placements"]
    assert sorted(p["epoch"] for p in places) == [0, 1]
    tok = pq.read_table(stage_dir(run, "tokenizer") / "tokenized.parquet",
                        filters=[("id", "==", row["id"])]).to_pylist()[0]
    sample = tok["prompt_ids"] + tok["response_ids"]
    outputs = read_json(pack / "manifest.json")["outputs"]
    shards = sorted(n for n in outputs if n.endswith(".arrow"))
    for p in places:
        shard = run / p["shard"]
        assert shard.parent == pack and shard.exists()
        t = pa.ipc.open_file(str(shard)).read_all()
        seq = t.slice(p["sequence"], 1).to_pylist()[0]
        assert row["id"] in seq["sample_ids"]
        k = p["sample"]
        assert seq["sample_ids"][k] == row["id"] and seq["epoch"] == p["epoch"]
        assert seq["sample_starts"][k] == p["start"] and seq["sample_lengths"][k] == p["end"] - p["start"]
        assert seq["prompt_lengths"][k] == p["prompt_tokens"] == tok["prompt_tokens"]
        assert seq["input_ids"][p["start"]:p["end"]] == sample[: p["end"] - p["start"]]
        before = sum(outputs[n]["rows"] for n in shards[: shards.index(shard.name)])
        assert p["global_sequence"] == before + p["sequence"]
    mix = d["stages"][-2]
    assert mix["stage"] == "mix" and mix["times_per_epoch"] == {"0": 1, "1": 1}
    first, second = why(run, row["id"]).splitlines()
    assert first.startswith("packed 2x (epochs 0,1) in pack/") and f"seq {places[0]['sequence']} " in first
    assert second.startswith("from ")


def test_origin_of_local_rows_is_file_and_line(run):
    messy = run.parent / "messy.jsonl"
    d = trace(run, "messy/1")
    o = d["origin"]
    assert (o["kind"], o["file"], o["line"], o["file_path"]) == ("local", "messy.jsonl", 1, str(messy))
    assert o["sha256"] == sha256_file(messy) and o["found"]
    assert d["text"]["instruction"] == "Name a prime above 10."
    # a source with its own id field: found by the id in the raw lines (a string and an integer id)
    assert trace(run, "ided/7")["origin"]["line"] == 4
    d = trace(run, "ided/q-1")
    assert d["origin"]["line"] == 1
    norm = next(s for s in d["stages"] if s["stage"] == "normalize")
    assert norm["status"] == "kept"
    [other] = norm["other_rows_with_this_id"]
    assert other["reason"] == "duplicate_id" and other["origin"]["line"] == 3


def test_origin_of_generated_rows(run):
    row = next(r for r in lineage_rows(run) if r["source"] == "wp" and r["reason"] == "capped")
    d = trace(run, row["id"])
    o = d["origin"]
    assert o["kind"] == "generator" and o["generator"] == "word_problems" and o["params"]["n"] == 400
    raw = pq.read_table(stage_dir(run, "ingest") / "wp.parquet").to_pylist()[o["row"]]
    assert "wp/" + raw["uid"] == row["id"]
    assert why(run, row["id"]).splitlines()[0].startswith("removed at mix: capped (stratum")


def test_why_of_a_near_duplicate_names_the_kept_row(run):
    rem = pq.read_table(stage_dir(run, "dedup") / "removals.parquet").to_pylist()
    near = next(r for r in rem if r["reason"] == "near_duplicate")
    line = why(run, near["id"]).splitlines()[0]
    assert line == f"removed at dedup: near_duplicate of {near['duplicate_of']} ({near['detail']})"
    assert "matched " in line and "J=" in line
    kept = trace(run, near["duplicate_of"])
    dedup = next(s for s in kept["stages"] if s["stage"] == "dedup")
    assert dedup["status"] == "kept" and near["id"] in [x["id"] for x in dedup["duplicates_removed"]]


def test_why_of_normalize_rejects_gives_the_reason(run):
    first, second = why(run, "messy/3").splitlines()
    assert first == "rejected at normalize: empty_field (messy.jsonl:3: response is empty)"
    assert second.startswith("from local file ") and "messy.jsonl line 3" in second
    assert why(run, "messy/2").startswith("rejected at normalize: bad_json (messy.jsonl:2: ")
    assert why(run, "messy/4").startswith("rejected at normalize: missing_field (messy.jsonl:4: ")


def test_why_of_direct_copies(run):
    d = trace(run, "boxed/1#direct")
    norm = next(s for s in d["stages"] if s["stage"] == "normalize")
    assert norm["condition"] == "synth,direct" and d["text"]["response"] == r"\frac{4}{2}"
    first, second = why(run, "boxed/1#direct").splitlines()
    assert first.startswith("packed ") and "boxed.jsonl line 1" in second  # the copy's origin: its row's line
    first, second = why(run, "boxed/3#direct").splitlines()
    assert first == ("rejected at normalize: no_final_answer (boxed.jsonl:3: direct copy of boxed/3: "
                     "no \\boxed{...} in the response (answer_format 'boxed'))")
    assert "boxed.jsonl line 3" in second
    assert why(run, "boxed/3").startswith("packed ")  # the chain-of-thought row itself is kept
    src = read_json(stage_dir(run, "lineage") / "lineage.json")["per_source"]["boxed"]
    assert src["ingested"] == 5 and src["direct_copies"] == 5 and src["rejected_at_normalize"] == {"no_final_answer": 1}
    assert src["stratified"] == 9


def test_decontaminated_row_names_the_benchmark_item(run):
    line = why(run, "messy/5").splitlines()[0]
    assert line == ("removed at contamination: benchmark_contamination "
                    f"(makes benchmark item gsm8k/test/{PLANTED} dirty)")
    kept = trace(run, "messy/1")
    assert next(s for s in kept["stages"] if s["stage"] == "contamination")["status"] == "kept"


def test_unknown_id_is_a_clear_error_with_similar_ids(run):
    with pytest.raises(UnknownId) as e:
        trace(run, "wq/12")
    assert "wp/12" in e.value.suggestions and "is in no stage of" in str(e.value)
    assert "sources: boxed, ided, messy, wp" in str(e.value)
    with pytest.raises(UnknownId) as e:
        why(run, "12")
    assert "wp/12" in e.value.suggestions


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli(run, capsys):
    code, out, err = run_cli(capsys, "lineage", "why", str(run), "messy/3")
    assert code == 0 and out.startswith("rejected at normalize: empty_field (messy.jsonl:3: response is empty)\n")
    code, out, _ = run_cli(capsys, "lineage", "trace", str(run), "messy/1", "--json")
    d = json.loads(out)
    assert code == 0 and d["id"] == "messy/1" and d["outcome"]["status"] == "packed"
    code, out, _ = run_cli(capsys, "lineage", "trace", str(run), "messy/1")
    assert code == 0 and out.startswith("messy/1 in ") and "\npack " in out and "\nnormalize " in out
    code, out, err = run_cli(capsys, "lineage", "why", str(run), "wq/12")
    assert code == 1 and out == "" and err.startswith("hrm: error: 'wq/12' is in no stage of")
    assert "wp/12" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "lineage", "why", str(run / "nowhere"), "wp/1")
    assert code == 1 and "does not exist" in err


def test_training_record_and_unfinished_runs(run, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".prefect", ".lock"))  # a moved run still traces
    row = next(r for r in lineage_rows(copy) if r["status"] == "packed")
    pack_version = read_run(copy)["stages"]["pack"]["version"]
    (copy / "train" / "final" / "ema").mkdir(parents=True)
    (copy / "train" / "export" / "step-10" / "ema").mkdir(parents=True)
    update_run(copy, train={"dir": "train", "pack_dir": f"pack/{pack_version}", "pack_version": pack_version,
                            "status": "done", "step": 20, "steps": 20,
                            "final": {"raw": "train/final/raw", "ema": "train/final/ema"}})
    d = trace(copy, row["id"])
    [t] = d["train"]
    assert t["on_this_pack"] and [c["checkpoint"] for c in t["checkpoints"]] == ["final/ema", "final/raw",
                                                                               "export/step-10/ema"]
    assert [c["exists"] for c in t["checkpoints"]] == [True, False, True]
    assert "trained on by train (done, step 20/20): final/ema" in why(copy, row["id"]).splitlines()[1]
    md = trace_markdown(d)
    assert md.startswith(f"# Trace of `{row['id']}`") and "## Packed" in md and "`train/final/ema`" in md
    assert "| pack | `" + pack_version in md
    assert "train" in format_trace(d)
    update_run(copy, train={"dir": "train", "pack_version": "0" * 16, "status": "done", "step": 20, "steps": 20})
    d = trace(copy, row["id"])
    assert not d["train"][0]["on_this_pack"] and "not on this pack" in d["train"][0]["summary"]
    assert "trained" not in why(copy, row["id"])

    # a run that stopped after the tokenizer: the trace goes as far as the run went
    r = read_run(copy)
    r["stages"] = {k: v for k, v in r["stages"].items()
                   if k in ("ingest", "normalize", "stratify", "dedup", "tokenizer")}
    write_run(copy, r)
    d = trace(copy, row["id"])
    assert d["outcome"] == {"status": "in_progress", "stage": "tokenizer", "next": "mix"}
    assert why(copy, row["id"]).splitlines()[0] == "kept through tokenizer; the run has no mix output yet"


def test_check_only_names_items_not_dirty_too(run, tmp_path):
    """A check-only contamination stage: the row behind an item that is only partly copied (not_dirty)
    is named with that bucket, beside the dirty item it copies whole."""
    from pipeline.stages import contamination
    from pipeline.trace import _flagged_items

    planted = json.loads((run.parent / "bench" / "gsm8k" / "test.jsonl").read_text().splitlines()[PLANTED])
    words = planted["question"].split()
    assert len(words) >= 30
    # about 60% of the item is the planted row's question, the rest words no training row has
    partial = " ".join(words[:30] + [f"zebra{i} quokka{i}" for i in range(10)])
    bench = tmp_path / "bench" / "gsm8k"
    bench.mkdir(parents=True)
    (bench / "test.jsonl").write_text(json.dumps(planted) + "\n" + json.dumps({**planted, "question": partial}) + "\n")
    m = contamination.run(stage_dir(run, "tokenizer"), tmp_path / "bench", tmp_path / "contam", progress=False)
    got = dict(_flagged_items(Path(m["path"]) if "path" in m else tmp_path / "contam", "messy/5"))
    assert got == {"gsm8k:gsm8k/test/0": "dirty", "gsm8k:gsm8k/test/1": "not_dirty"}, got
    assert _flagged_items(tmp_path / "contam", "messy/1") == []
