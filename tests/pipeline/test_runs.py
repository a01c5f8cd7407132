"""Run folders: stage resolution, the run lock (held, and taken over from a killed holder), gc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.io import finish_stage, open_stage, read_json, sha256_json
from pipeline.runs import (RunError, RunLocked, gc, read_run, resolve_stage, run_lock, stage_dir, stage_entry,
                           write_run)

ROOT = Path(__file__).resolve().parents[2]


def _version(root: Path, stage: str, payload: str) -> dict:
    fp = sha256_json({"stage": stage, "payload": payload})
    out, done = open_stage(root / stage, fp, versioned=True)
    assert done is None and out.name.startswith(".tmp-")
    (out / "data.txt").write_text(payload)
    from pipeline.io import file_record

    man = finish_stage(out, {"stage": stage, "fingerprint": fp, "outputs": {"data.txt": file_record(out / "data.txt")}})
    assert Path(man["path"]).name == fp[:16] and not out.exists()
    return man


def test_versions_are_written_once_and_found_again(tmp_path):
    a = _version(tmp_path, "dedup", "a")
    fp = a["fingerprint"]
    out, done = open_stage(tmp_path / "dedup", fp, versioned=True)
    assert done is not None and done["path"] == a["path"] and out == Path(a["path"])
    # damaged: recomputed into a temporary folder, never into the version itself
    (Path(a["path"]) / "data.txt").write_text("changed!")
    out, done = open_stage(tmp_path / "dedup", fp, versioned=True)
    assert done is None and out.name == f".tmp-{fp[:16]}"


def test_resolve_stage_from_run_folder_stage_root_and_version(tmp_path):
    a = _version(tmp_path, "pack", "p")
    b = _version(tmp_path, "tokenizer", "t")
    with pytest.raises(RunError, match="not a run folder"):
        read_run(tmp_path)
    write_run(tmp_path, {"stages": {"pack": stage_entry(tmp_path, "pack", a, {"tokenizer": Path(b["path"]).name})}})
    assert read_run(tmp_path)["stages"]["pack"]["dir"] == f"pack/{Path(a['path']).name}"
    for p in (tmp_path, tmp_path / "pack", Path(a["path"])):
        assert resolve_stage(p, "pack") == Path(a["path"])
    with pytest.raises(RunError, match="has no tokenizer output"):
        stage_dir(tmp_path, "tokenizer")
    with pytest.raises(RunError, match="outputs of stage 'pack', not 'tokenizer'"):
        resolve_stage(a["path"], "tokenizer")
    with pytest.raises(RunError, match="does not exist"):
        resolve_stage(tmp_path / "nope", "pack")


HOLD = """
import sys, time
from pipeline.runs import run_lock
with run_lock(sys.argv[1], what="holder"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_names_the_holder_and_is_taken_over_after_kill(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=rf"PID {p.pid} on .*holder"):
            with run_lock(tmp_path):
                pass
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with run_lock(tmp_path, what="me") as info:  # the killed holder's lock is gone with it
        assert info["taken_over"]["pid"] == p.pid
        assert read_json(tmp_path / ".lock")["what"] == "me"
    with run_lock(tmp_path) as info:  # released cleanly: nothing to take over
        assert "taken_over" not in info


def test_gc_removes_only_unreferenced_versions(tmp_path):
    old = _version(tmp_path, "dedup", "old")
    new = _version(tmp_path, "dedup", "new")
    (tmp_path / "dedup" / ".tmp-0123456789abcdef").mkdir()  # an unfinished version of a killed run
    (tmp_path / "dedup" / "notes").mkdir()  # not ours: left alone
    write_run(tmp_path, {"stages": {"dedup": stage_entry(tmp_path, "dedup", new, {})}})
    dry = gc(tmp_path)
    assert sorted(Path(p).name for p, _ in dry["remove"]) == [".tmp-0123456789abcdef", Path(old["path"]).name]
    assert Path(old["path"]).exists()
    gc(tmp_path, apply=True)
    assert not Path(old["path"]).exists() and Path(new["path"]).exists() and (tmp_path / "dedup" / "notes").exists()
    assert stage_dir(tmp_path, "dedup") == Path(new["path"])
