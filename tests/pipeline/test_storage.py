"""Remote storage (pipeline/storage.py) on the local filesystem, fsspec's memory filesystem and a local S3
server (moto on 127.0.0.1): content hashes, publication that is never taken when cut short or corrupted,
remote sources in the content-addressed cache, and clear errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.io import sha256_file
from pipeline.stages.ingest import SUPPORTED, find_local_files
from pipeline.storage import INDEX, StorageError
from s3_server import s3_bucket, s3_endpoint  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HRM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(params=["file", "memory", "s3"])
def base(request, tmp_path) -> str:
    """A fresh remote folder on each backend."""
    if request.param == "file":
        return f"file://{tmp_path}/remote"
    if request.param == "memory":
        return f"memory://hrm-test-{uuid.uuid4().hex[:8]}"
    return request.getfixturevalue("s3_bucket") + "/runs"


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "rows.parquet").write_bytes(bytes(range(256)) * 4000)  # > 1 MiB: streamed in several chunks
    (root / "sub" / "part-0.npy").write_bytes(b"abc" * 10)
    (root / "manifest.json").write_text(json.dumps({"stage": "x", "fingerprint": "f" * 64}))
    return root


def test_publish_fetch_hashes_and_partial_publication(base, tmp_path):
    local = _tree(tmp_path / "v1")
    url = storage.join(base, "pack", "0123456789abcdef")
    assert storage.remote_index(url) is None
    idx = storage.publish_tree(local, url)
    assert set(idx["files"]) == {"rows.parquet", "sub/part-0.npy", "manifest.json"}
    # the content hash of a remote object is the sha256 of its bytes, as for the local file
    assert storage.sha256_url(storage.join(url, "rows.parquet")) == sha256_file(local / "rows.parquet")
    assert storage.verify_remote(url, idx)
    got = storage.fetch_tree(url, tmp_path / "fetched")
    for rel in idx["files"]:
        assert (got / rel).read_bytes() == (local / rel).read_bytes()

    # an upload cut short (files there, no _files.json) is never taken
    storage.remove(storage.join(url, INDEX))
    assert storage.remote_index(url) is None
    with pytest.raises(StorageError, match="not a published folder"):
        storage.fetch_tree(url, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    # publishing again repairs it
    storage.publish_tree(local, url)
    assert storage.fetch_tree(url, tmp_path / "again").is_dir()

    # a file corrupted after publication (same size) is found on fetch, naming the object; nothing is kept
    storage.write_bytes(storage.join(url, "sub/part-0.npy"), b"abd" * 10)
    assert not storage.verify_remote(url, idx)
    with pytest.raises(StorageError, match=r"part-0\.npy: content does not match"):
        storage.fetch_tree(url, tmp_path / "third")
    assert not (tmp_path / "third").exists()
    # a mirrored run that meets it does not use it: the version is unpublished (to be recomputed), and
    # the next publication uploads it again
    mirror = tmp_path / "mirror"
    with storage.mirror(mirror, base):
        assert not storage.fetch_version(mirror / "pack" / "0123456789abcdef", "f" * 64)
        assert storage.remote_index(url) is None
        shutil.copytree(local, mirror / "pack" / "0123456789abcdef")
        assert storage.publish_version(mirror / "pack" / "0123456789abcdef") == url
    assert storage.verify_remote(url, idx)
    with storage.mirror(tmp_path / "mirror2", base):
        assert storage.fetch_version(tmp_path / "mirror2" / "pack" / "0123456789abcdef", "f" * 64)
        assert not storage.fetch_version(tmp_path / "mirror2" / "pack" / "0123456789abcdef", "e" * 64)
    assert (tmp_path / "mirror2" / "pack" / "0123456789abcdef" / "rows.parquet").read_bytes() == \
        (local / "rows.parquet").read_bytes()


def _names(files: list[Path], src: str) -> list[str]:
    if storage.is_remote(src):
        return [storage.cached_name(f) for f in files]
    return [f.relative_to(storage.local_path(src)).as_posix() for f in files]  # file:// is read in place


def test_remote_source_is_cached_by_content(base, tmp_path):
    src = storage.join(base, "src")
    storage.write_bytes(storage.join(src, "a.jsonl"), b'{"q": 1}\n')
    storage.write_bytes(storage.join(src, "deep/b.jsonl"), b'{"q": 2}\n')
    storage.write_bytes(storage.join(src, "notes.txt"), b"not data")
    files = find_local_files(src)
    assert _names(files, src) == ["a.jsonl", "deep/b.jsonl"]
    assert sha256_file(files[0]) == hashlib.sha256(b'{"q": 1}\n').hexdigest()
    assert [f.name for f in find_local_files(storage.join(src, "*.jsonl"))] == ["a.jsonl"]
    # a changed object is never taken for the cached one
    storage.write_bytes(storage.join(src, "a.jsonl"), b'{"q": 3}\n')
    again = find_local_files(src)
    assert sha256_file(again[0]) == hashlib.sha256(b'{"q": 3}\n').hexdigest()
    if storage.is_remote(src):
        assert again[0] != files[0] and sha256_file(files[0]) == hashlib.sha256(b'{"q": 1}\n').hexdigest()
    assert find_local_files(storage.join(base, "nothing-here")) == []
    assert storage.list_files(src, SUPPORTED)[0][0].endswith("src/a.jsonl")


def test_clear_errors(s3_bucket, monkeypatch, tmp_path):  # noqa: F811
    with pytest.raises(StorageError, match="gcsfs"):
        try:
            import gcsfs  # noqa: F401
            pytest.skip("gcsfs is installed")
        except ImportError:
            storage.fs_for("gs://bucket/x")
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-hrm/x\.json: no such object"):
        storage.read_bytes("s3://no-such-bucket-hrm/x.json")
    with pytest.raises(StorageError, match="neither a published stage folder"):
        storage.localize(s3_bucket + "/empty")
    assert not storage.is_remote("file:///tmp/x") and not storage.is_remote("runs/demo")
    assert storage.is_remote("s3://b/x") and storage.is_remote("memory://x")
    assert storage.local_path("file:///tmp/x") == Path("/tmp/x")


def test_stage_refuses_a_url_output(tmp_path, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as e:
        main(["stage", "stratify", "--input", str(tmp_path), "--output", "memory://x/stratify"])
    assert e.value.code == 2 and "hrm run SPEC -o memory://x/stratify" in capsys.readouterr().err
    assert not Path("memory:").exists()
