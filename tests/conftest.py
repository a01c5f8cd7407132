"""Test settings: every cache and Prefect home lives in a temporary or project-local folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HRM_SHARED_DIR", ROOT.parent / "shared")).resolve()

_tmp = Path(tempfile.mkdtemp(prefix="hrm-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_tmp / "prefect"))
os.environ.setdefault("HF_HOME", str(_tmp / "hf"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

for _var in ("PREFECT_HOME", "HF_HOME", "TORCH_EXTENSIONS_DIR"):  # Prefect cannot start on a missing home
    Path(os.environ[_var]).mkdir(parents=True, exist_ok=True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "data").exists():
        pytest.fail(f"shared data folder not found at {SHARED} (set HRM_SHARED_DIR)")
    return SHARED


@pytest.fixture(scope="session")
def gsm8k_train(shared) -> Path:
    return shared / "data" / "gsm8k" / "train.jsonl"


def write_gsm8k_rows(gsm8k_train: Path, dest: Path, n: int) -> Path:
    """The first n GSM8K train rows as normalized rows (id gsm8k/<i>, condition cot) in a JSONL file."""
    import json

    with open(gsm8k_train) as f, open(dest, "w") as out:
        for i, line in enumerate(f):
            if i == n:
                break
            r = json.loads(line)
            out.write(json.dumps({"id": f"gsm8k/{i}", "instruction": r["question"], "response": r["answer"],
                                  "condition": "cot", "source": "gsm8k", "domain": "math"}) + "\n")
    return dest


@pytest.fixture(scope="session")
def gsm8k_rows(gsm8k_train):
    """gsm8k_rows(dest, n) writes the first n GSM8K train rows in the normalized schema to dest."""
    return lambda dest, n: write_gsm8k_rows(gsm8k_train, Path(dest), n)
