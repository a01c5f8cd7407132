"""`hrm run` as a user types it: a deterministic error inside a task is one line, not retried."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _hrm(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("HRM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_corrupt_parquet_fails_once_with_one_line(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file PAR1")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: broken\nsources:\n  - {{name: b, kind: local, path: {bad}}}\n")
    r = _hrm("run", str(spec), "-o", str(tmp_path / "run"), "--no-progress", cwd=ROOT, home=tmp_path / "prefect-home")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    last = [x for x in r.stderr.splitlines() if x.startswith("hrm: error:")]
    assert len(last) == 1 and "bad.parquet" in last[0], out
    assert "Traceback" not in out, out
    assert "AwaitingRetry" not in out and "Retrying" not in out, out  # deterministic: never retried


def test_missing_local_file_fails_before_prefect_starts(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: broken\nsources:\n  - {{name: gone, kind: local, path: {tmp_path / 'nope.jsonl'}}}\n")
    r = _hrm("run", str(spec), "-o", str(tmp_path / "run"), cwd=ROOT, home=tmp_path / "prefect-home")
    assert r.returncode != 0
    assert "gone" in r.stderr and "nope.jsonl" in r.stderr and "Traceback" not in r.stderr
    assert "Starting temporary server" not in r.stdout + r.stderr
