"""`hrm eval`'s inputs: the checkpoint's own tokenizer (and the errors for a wrong one), --limit per
benchmark (a seeded sample across MMLU's subjects), and a run folder as the one argument."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from evaluation.locate import TokenizerMismatch, checkpoint_tokenizer
from evaluation.run import main, sample_items
from pipeline import runs
from pipeline.config import TokenizerConfig
from pipeline.stages import contamination as C
from pipeline.stages import tokenize

SUBJECTS = ("abstract_algebra", "anatomy", "astronomy", "college_physics")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def export_with_tokenizer(ckpt: Path, tok: Path, dest: Path) -> Path:
    """The export layout of `hrm train` (train/final/ema): the weights, the tokenizer files copied from
    the tokenizer stage folder, and config.json's "data" record."""
    shutil.copytree(ckpt, dest)
    for f in ("tokenizer.json", "tokenizer_meta.json"):
        shutil.copy(tok / f, dest / f)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["data"] = {"tokenizer_sha256": sha256(tok / "tokenizer.json"), "pack_manifest_sha256": None,
                   "pack_dir": None, "tokenizer_dir": str(tok)}
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    return dest


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory, gsm8k_rows) -> Path:
    """Another tokenizer: vocabulary 512 (the model's is 600)."""
    d = tmp_path_factory.mktemp("tok512")
    tokenize.run(gsm8k_rows(d / "rows.jsonl", 200), d / "tok", TokenizerConfig(vocab_size=512, sample_rows=200),
                 conditions=["direct", "cot"], seed=0, progress=False)
    return d / "tok"


@pytest.fixture(scope="module")
def bench(shared, tmp_path_factory) -> Path:
    """Real benchmark files, MMLU cut to four subjects (all their test and dev items)."""
    src = shared / "data" / "benchmarks"
    d = tmp_path_factory.mktemp("bench")
    shutil.copytree(src / "arc_challenge", d / "arc_challenge")
    (d / "mmlu").mkdir()
    for split in ("test", "dev"):
        lines = [x for x in (src / "mmlu" / f"{split}.jsonl").read_text().split("\n")
                 if x.strip() and json.loads(x)["subject"] in SUBJECTS]
        (d / "mmlu" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_tokenizer_comes_from_the_checkpoint_and_a_wrong_one_is_an_error(trained, small_tok, bench, tmp_path):
    tok = trained / "tok"
    ck = export_with_tokenizer(trained / "ckpt", tok, tmp_path / "final" / "ema")
    assert checkpoint_tokenizer(ck) == ck  # the default: the checkpoint's own
    assert checkpoint_tokenizer(ck, tok) == tok  # the same file, given explicitly

    args = ["--benchmarks", str(bench), "--tasks", "arc_challenge", "--limit", "2", "--output", str(tmp_path / "out")]
    # a tokenizer other than the one recorded: an error naming both hashes, before any evaluation
    with pytest.raises(TokenizerMismatch) as e:
        main(["--checkpoint", str(ck), "--tokenizer", str(small_tok), *args])
    assert sha256(small_tok / "tokenizer.json") in str(e.value) and sha256(tok / "tokenizer.json") in str(e.value)
    # a checkpoint without the record: the explicit tokenizer's vocabulary must be the model's
    old = trained / "ckpt"
    with pytest.raises(TokenizerMismatch, match=r"512 tokens.*vocab_size 600"):
        main(["--checkpoint", str(old), "--tokenizer", str(small_tok), *args])
    with pytest.raises(TokenizerMismatch, match="give --tokenizer"):  # and it cannot be left out
        main(["--checkpoint", str(old), *args])
    # a tokenizer.json replaced inside the export is caught too
    bad = shutil.copytree(ck, tmp_path / "bad")
    shutil.copy(small_tok / "tokenizer.json", bad / "tokenizer.json")
    with pytest.raises(TokenizerMismatch, match="replaced"):
        checkpoint_tokenizer(bad)
    assert not (tmp_path / "out").exists()


def test_sample_items_is_per_benchmark_seeded_and_spread(shared):
    sizes = {}
    for line in (shared / "data" / "benchmarks" / "mmlu" / "test.jsonl").read_text().split("\n"):
        if not line.strip():
            continue
        s = f"mmlu_{json.loads(line)['subject']}"
        sizes[s] = sizes.get(s, 0) + 1
    assert len(sizes) == 57 and sum(sizes.values()) == 14042
    p8 = sample_items(sizes, 8)
    assert sum(map(len, p8.values())) == 8  # 8 items in all, not 8 per subject
    p200 = sample_items(sizes, 200)
    assert sum(map(len, p200.values())) == 200 and len(p200) > 40  # spread over the subjects
    assert p200 == sample_items(sizes, 200, seed=0) != sample_items(sizes, 200, seed=1)
    assert all(set(v) <= set(p200[k]) for k, v in p8.items())  # a larger limit scores a superset
    assert all(v == sorted(v) and v[-1] < sizes[k] for k, v in p200.items())
    frac = sample_items(sizes, 0.01)  # a fraction of the benchmark
    assert sum(map(len, frac.values())) == 141
    assert sample_items(sizes, 14042) is None and sample_items(sizes, None) is None


def test_limit_is_per_benchmark_and_labelled(trained, bench, tmp_path):
    import evaluation

    res = evaluation.run(trained / "ckpt", trained / "tok", bench, tmp_path / "eval", tasks=["mmlu"], limit=8,
                         num_fewshot={"mmlu": 1})
    e = res["tasks"]["mmlu"]
    assert res["limited"] and e["limited"] and e["n"] == 8  # 8 items of MMLU, not 8 per subject
    assert sum(s["n_docs"] for s in e["subtasks"].values()) == 8 and len(e["subtasks"]) >= 2
    # the harness scored exactly the sampled doc indices of each subject
    sizes = {}
    for line in (bench / "mmlu" / "test.jsonl").read_text().split("\n"):
        if not line.strip():
            continue
        s = f"hrm_mmlu_{json.loads(line)['subject']}"
        sizes[s] = sizes.get(s, 0) + 1
    assert e["n_total"] == sum(sizes.values())
    scored: dict[str, list[int]] = {}
    for line in (tmp_path / "eval" / "samples_mmlu.jsonl").read_text().split("\n"):
        if not line.strip():
            continue
        r = json.loads(line)
        scored.setdefault(r["task"], []).append(r["doc_id"])
    assert {k: sorted(v) for k, v in scored.items()} == sample_items(sizes, 8)
    md = (tmp_path / "eval" / "results.md").read_text()
    assert md.splitlines()[0].startswith("# LIMITED") and "--limit 8" in md.splitlines()[0]
    assert f"| mmlu | harness | 1 | direct | 8 of {e['n_total']} | acc,none |" in md


def test_run_folder_is_enough(trained, bench, tmp_path, capsys):
    tok = trained / "tok"
    run = tmp_path / "runs" / "demo"
    export_with_tokenizer(trained / "ckpt", tok, run / "train" / "final" / "ema")
    (run / "train" / "train.json").write_text(json.dumps({"data": {}}))  # hrm train's own record
    man = C.run(tok, bench, run / "contamination", C.ContaminationConfig(benchmarks=("arc_challenge",)),
                progress=False, versioned=True)
    # the run manifest as `hrm run` and `hrm train` write it
    runs.write_run(run, {"format": 1, "stages": {"contamination": runs.stage_entry(run, "contamination", man, {})},
                         "train": {"dir": "train", "status": "done", "final": {"raw": "train/final/raw",
                                                                                "ema": "train/final/ema"}}})

    assert main([str(run), "--tasks", "arc_challenge", "--limit", "4", "--fewshot", "arc_challenge=1"]) == 0
    out = capsys.readouterr().out
    res = json.loads((run / "eval" / "results.json").read_text())
    ck = run / "train" / "final" / "ema"
    assert Path(res["checkpoint"]) == ck and Path(res["tokenizer"]) == ck  # the checkpoint's own tokenizer
    assert Path(res["benchmarks"]) == bench  # the folder the run's contamination check read
    arc = res["tasks"]["arc_challenge"]
    assert arc["n"] == 4 and arc["n_clean"] == 4 and arc["clean"] == arc["full"]
    rec = runs.read_run(run)["evaluations"]
    assert len(rec) == 1 and rec[0]["checkpoint"] == "train/final/ema" and rec[0]["results"] == "eval/results.json"
    assert rec[0]["checkpoint_sha256"] == sha256(ck / "model.safetensors")
    assert rec[0]["tasks"] == ["arc_challenge"] and rec[0]["limit"] == 4 and rec[0]["n"] == {"arc_challenge": 4}
    assert "LIMITED" in out and out.strip().splitlines()[-1].startswith(f"results: {run / 'eval' / 'results.md'}")


def test_locate_from_a_train_folder_a_checkpoint_or_an_unfinished_run(trained, tmp_path):
    from evaluation.locate import locate

    run = tmp_path / "runs" / "demo"
    ck = export_with_tokenizer(trained / "ckpt", trained / "tok", run / "train" / "final" / "ema")
    (run / "train" / "run.json").write_text(json.dumps({"model_config": {}}))  # a train folder's older record
    runs.write_run(run, {"format": 1, "stages": {}, "train": {"dir": "train", "status": "done"}})
    for path in (run, run / "train", ck):
        t = locate(path)
        assert t.checkpoint.resolve() == ck.resolve() and t.run_dir == run.resolve() and t.contamination is None
    runs.write_run(run, {"format": 1, "train": {"dir": "train", "status": "training", "step": 3, "steps": 10}})
    shutil.rmtree(ck)
    with pytest.raises(runs.RunError, match="not finished.*step 3 of 10"):
        locate(run)
    runs.write_run(run, {"format": 1, "stages": {}})
    shutil.rmtree(run / "train")
    with pytest.raises(runs.RunError, match="no trained model"):
        locate(run)
