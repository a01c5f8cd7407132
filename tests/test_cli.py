"""The `hrm` command as a user types it (in-process, through pipeline.cli.main)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_and_plan(capsys):
    code, out, _ = run_cli(capsys, "validate", "demo")
    assert code == 0 and "spec 'demo': OK" in out
    code, out, _ = run_cli(capsys, "plan", "hrm_text_1b", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["epochs"] == 4 and not plan["unplanned_sources"]
    assert 30e9 < plan["unique_tokens"] < 50e9 and 45e9 < plan["seen_tokens"] < 70e9  # paper: 40B / 60B
    assert plan["strata"]["gsm8k"]["repeat"] == 10
    code, out, _ = run_cli(capsys, "plan", "demo")
    assert code == 0 and "unique tok" in out and "word_problems/" in out


def test_bad_spec_exits_with_clear_message(capsys, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nsources:\n  - {name: a, kind: local}\n")
    code, _, err = run_cli(capsys, "validate", str(p))
    assert code == 2 and str(p) in err and "sources[0]" in err and "needs 'path'" in err


def test_every_stage_alone_on_user_files(capsys, tmp_path, gsm8k_train):
    rows = tmp_path / "rows.jsonl"
    with open(gsm8k_train) as f, open(rows, "w") as out:
        for i, line in enumerate(f):
            if i == 1500:
                break
            r = json.loads(line)
            out.write(json.dumps({"id": f"gsm8k/{i}", "instruction": r["question"], "response": r["answer"],
                                  "condition": "cot", "source": "gsm8k", "domain": "math"}) + "\n")
            if i % 100 == 0:  # a planted exact duplicate from another source
                out.write(json.dumps({"id": f"copy/{i}", "instruction": r["question"], "response": r["answer"],
                                      "condition": "cot", "source": "copy", "domain": "math"}) + "\n")
        out.write("not json at all\n")
    d = tmp_path
    assert run_cli(capsys, "stage", "stratify", "--input", str(rows), "--output", str(d / "s"), "--no-progress")[0] == 0
    code, out, _ = run_cli(capsys, "stage", "dedup", "--input", str(d / "s"), "--output", str(d / "d"),
                           "--set", "threshold=0.7", "--no-progress")
    assert code == 0
    counts = json.loads(out)["counts"]
    assert counts["exact_duplicates"] == 15
    removals = pq.read_table(d / "d" / "removals.parquet").to_pylist()
    exact = [r for r in removals if r["reason"] == "exact_duplicate"]
    assert all(r["id"].startswith("copy/") and r["duplicate_of"] == "gsm8k/" + r["id"].split("/")[1] for r in exact)
    assert pq.read_table(d / "s" / "rejects.parquet").to_pylist()[0]["reason"] == "bad_json"
    assert run_cli(capsys, "stage", "tokenizer", "--input", str(d / "d"), "--output", str(d / "t"),
                   "--set", "vocab_size=700", "--no-progress")[0] == 0
    assert run_cli(capsys, "stage", "mix", "--input", str(d / "t"), "--output", str(d / "m"),
                   "--set", "epochs=2", "--no-progress")[0] == 0
    code, out, _ = run_cli(capsys, "stage", "pack", "--input", str(d / "t"), "--mix", str(d / "m"),
                           "--output", str(d / "p"), "--set", "seq_len=512", "--no-progress")
    assert code == 0 and json.loads(out)["counts"]["shards"] >= 1
    # a bad setting is named, before any work
    code, _, err = run_cli(capsys, "stage", "dedup", "--input", str(d / "s"), "--output", str(d / "x"),
                           "--set", "threshold=2")
    assert code == 2 and "threshold" in err and not (d / "x").exists()


@pytest.mark.parametrize("argv, expect", [
    (("stage", "normalize", "--input", "x", "--output", "y"), "needs --spec"),
    (("stage", "pack", "--input", "x", "--output", "y"), "needs --mix"),
    (("stage", "dedup", "--output", "y"), "needs --input"),
    (("run", "demo", "--benchmarks", "/nonexistent/benchmarks"), "--benchmarks: /nonexistent/benchmarks is not a folder"),
    (("stage", "contamination", "--input", "x", "--output", "y"), "give --benchmarks DIR"),
    (("eval", "--checkpoint", "x", "--tokenizer", "y", "--output", "z", "--benchmarks", "b", "--tasks", "mmlu,foo"),
     "unknown ['foo']"),
    (("eval", "--checkpoint", "x", "--tokenizer", "y", "--output", "z"), "--checkpoint: x is not a checkpoint folder"),
    (("eval", "--checkpoint", "/nonexistent", "--tokenizer", "y", "--output", "z", "--benchmarks", "b"),
     "--checkpoint: /nonexistent is not a checkpoint folder"),
    (("train", "--shards", "x", "--out", "y", "--zero-stage", "3"), "invalid choice: 3"),
])
def test_stage_argument_errors(capsys, argv, expect):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and expect in err


def test_missing_benchmark_folder_is_one_line_before_any_work(capsys, tmp_path):
    code, _, err = run_cli(capsys, "stage", "contamination", "--input", "x", "--benchmarks", "/nonexistent/b",
                           "--output", str(tmp_path / "y"))
    assert code == 1 and "benchmark folder not found: /nonexistent/b" in err and "Traceback" not in err
    assert not (tmp_path / "y").exists()


def test_validate_lists_every_missing_path_and_unknown_generator_param(capsys, tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text(
        "name: checks\nsources:\n"
        f"  - {{name: docs, kind: local, path: '{tmp_path}/nowhere/*.jsonl'}}\n"
        "  - {name: sums, kind: generator, generator: arithmetic, params: {n: 10, digits: 4}}\n"
        "  - {name: seqs, kind: generator, generator: sequences, params: {n: 10}}\n"
    )
    code, out, err = run_cli(capsys, "validate", str(p))
    assert code == 2 and "OK" not in out
    lines = err.splitlines()
    assert "2 problem(s)" in lines[0] and str(p) in lines[0]
    assert any(x.startswith("  - sources[0]: source 'docs'") and f"{tmp_path}/nowhere/*.jsonl" in x for x in lines)
    assert any(x.startswith("  - sources[1]: source 'sums'") and "'digits'" in x and "'max_digits'" in x
               for x in lines)
    (tmp_path / "nowhere").mkdir()
    (tmp_path / "nowhere" / "a.jsonl").write_text('{"instruction": "q", "response": "r"}\n')
    p.write_text(p.read_text().replace("digits: 4", "max_digits: 4"))
    code, out, _ = run_cli(capsys, "validate", str(p))
    assert code == 0 and "spec 'checks': OK" in out


def test_stage_alone_on_rows_with_only_instruction_and_response(capsys, tmp_path):
    rows = tmp_path / "mine.jsonl"
    rows.write_text(
        json.dumps({"instruction": "What is 2+2?", "response": "4"}) + "\n"
        + json.dumps({"instruction": "Name a prime.", "response": "7", "condition": "cot", "domain": "math"}) + "\n"
        + json.dumps({"instruction": "Spell cat.", "response": "c-a-t", "id": "own-id", "source": ""}) + "\n"
    )
    code, out, _ = run_cli(capsys, "stage", "stratify", "--input", str(rows), "--output", str(tmp_path / "s"),
                           "--no-progress")
    assert code == 0 and json.loads(out)["counts"]["rejected"] == 0
    got = pq.read_table(tmp_path / "s" / "rows.parquet").to_pylist()
    assert [(r["id"], r["condition"], r["source"], r["domain"]) for r in got] == [
        ("mine/1", "direct", "mine", "mine"), ("mine/2", "cot", "mine", "math"), ("own-id", "direct", "mine", "mine")]
    # the spec's default condition (the first of its normalize.conditions)
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: s\nnormalize: {conditions: [cot, direct]}\nsources:\n"
                    "  - {name: g, kind: generator, generator: sequences, params: {n: 1}, condition: cot}\n")
    code, out, _ = run_cli(capsys, "stage", "dedup", "--input", str(rows), "--output", str(tmp_path / "d"),
                           "--spec", str(spec), "--no-progress")
    assert code == 0 and json.loads(out)["counts"]["kept"] == 3
    conds = pq.read_table(tmp_path / "d" / "rows.parquet").column("condition").to_pylist()
    assert sorted(conds) == ["cot", "cot", "cot"]
    # Parquet with only the content columns: ids from the stem and the 0-based row index
    import pyarrow as pa

    pq.write_table(pa.table({"instruction": ["a b c", "d e f"], "response": ["x", "y"]}), tmp_path / "p.parquet")
    assert run_cli(capsys, "stage", "stratify", "--input", str(tmp_path / "p.parquet"), "--output",
                   str(tmp_path / "s2"), "--no-progress")[0] == 0
    got = pq.read_table(tmp_path / "s2" / "rows.parquet").to_pylist()
    assert [(r["id"], r["source"], r["condition"]) for r in got] == [("p/0", "p", "direct"), ("p/1", "p", "direct")]


def test_stage_input_without_content_columns_names_them(capsys, tmp_path):
    rows = tmp_path / "qa.jsonl"
    rows.write_text(json.dumps({"question": "2+2?", "response": "4"}) + "\n")
    code, _, err = run_cli(capsys, "stage", "stratify", "--input", str(rows), "--output", str(tmp_path / "s"))
    assert code == 1 and "missing column(s) ['instruction']" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_stage_default_condition_is_part_of_the_fingerprint(tmp_path):
    """Rows without a condition column take the spec's default: another spec into the same folder must
    recompute, not return the first spec's outputs."""
    import pyarrow.parquet as pq

    from pipeline.cli import main

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"What is {i} + {i}?", "response": f"{2 * i}"}) + "\n"
                            for i in range(20)))
    got = {}
    for first in ("direct", "cot"):
        other = "cot" if first == "direct" else "direct"
        spec = tmp_path / f"{first}.yaml"
        spec.write_text(f"name: s\nnormalize: {{conditions: [{first}, {other}]}}\nsources:\n"
                        f"  - {{name: g, kind: generator, generator: arithmetic, params: {{n: 5}}}}\n")
        assert main(["stage", "stratify", "--input", str(rows), "--output", str(tmp_path / "out"), "--spec", str(spec),
                     "--no-progress"]) == 0
        got[first] = set(pq.read_table(tmp_path / "out" / "rows.parquet", columns=["condition"])["condition"].to_pylist())
    assert got == {"direct": {"direct"}, "cot": {"cot"}}
