"""Checkpoints on object storage (a moto S3 server on 127.0.0.1): each DeepSpeed tag is published (files,
then _files.json), then `latest`; a train folder on another machine (empty) resumes from the published
tag and ends with the weights of the uninterrupted run; a tag whose publication was cut short is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import storage
from pipeline.storage import StorageError
from s3_server import s3_bucket, s3_endpoint  # noqa: F401  (fixtures)
from training import TrainConfig, train


def cfg(packed, out, **kw) -> TrainConfig:
    base = dict(shards=str(packed), out=str(out), preset="debug", steps=6, micro_batch_size=4, grad_accum=1,
                lr=3e-3, warmup_steps=2, ema_decay=0.9, progress=False, tensorboard=False, seed=11, save_every=3)
    return TrainConfig(**{**base, **kw})


def test_remote_checkpoint_save_and_resume(packed, s3_bucket, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HRM_CACHE_DIR", str(tmp_path / "cache"))
    url = f"{s3_bucket}/run/checkpoints"
    whole = train(cfg(packed, tmp_path / "a", checkpoint_url=url))
    assert whole["checkpoint_url"] == url
    assert storage.read_bytes(f"{url}/latest") == b"step-00000006"
    for tag in ("step-00000003", "step-00000006"):  # keep_checkpoints=2
        idx = storage.remote_index(f"{url}/{tag}")
        assert idx == storage.tree_index(tmp_path / "a" / "checkpoints" / tag)
        assert storage.verify_remote(f"{url}/{tag}", idx)

    # the machine died after publishing step 3: another machine, with an empty train folder, resumes there
    storage.write_bytes(f"{url}/latest", b"step-00000003")
    second = train(cfg(packed, tmp_path / "b", checkpoint_url=url))
    assert second["start_step"] == 3
    assert storage.read_bytes(f"{url}/latest") == b"step-00000006"
    for kind in ("raw", "ema"):  # the weights of the uninterrupted run
        x = load_file(str(tmp_path / "b" / "final" / kind / "model.safetensors"))
        y = load_file(str(tmp_path / "a" / "final" / kind / "model.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), kind
    last = [json.loads(line)["loss"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert last[-3:] == want[3:]

    # a tag whose upload was cut short (no _files.json) is never resumed from
    storage.remove(f"{url}/step-00000006/_files.json")
    with pytest.raises(StorageError, match="step-00000006: not a published folder"):
        train(cfg(packed, tmp_path / "c", checkpoint_url=url))
    assert not (Path(tmp_path / "c" / "checkpoints" / "latest")).exists()
