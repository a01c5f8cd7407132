"""Remote storage through fsspec URLs: `s3://`, `gs://`, `memory://`, `file://` (and plain paths).

The stages always compute on a local disk; this module moves finished folders to and from object
storage, and only ever takes a remote folder after checking every byte of it.

Publication (`publish_tree`): object stores have no rename, so a folder cannot appear at once. Every
file is uploaded first, then `_files.json` LAST: the list of the folder's files with their sha256 and
size. A remote folder exists only when its `_files.json` does; an upload cut short (files without
`_files.json`) is never taken, and the next publication overwrites it. Republishing a folder first
deletes its `_files.json`, so a half-replaced folder is never complete either. One object (run.json,
a checkpoint's `latest`) is written with a single PUT, which is atomic on S3 and GCS.

Fetching (`fetch_tree`): every file listed in `_files.json` is downloaded into a temporary folder,
its sha256 and size checked, and the folder renamed into place; a mismatch raises StorageError naming
the object. Remote sources (`fetch_files`) are kept in a content-addressed cache
(`$HRM_CACHE_DIR/remote`, default `.cache/remote` under the current folder), their content hash is the
sha256 of their bytes, so a changed object is never taken for the cached one.

Run folders (`hrm run SPEC -o s3://bucket/run`): the flow computes in a local mirror folder
(`mirror_dir(url)`) registered with `mirror(local, url)`; a stage version missing locally is fetched
from the remote when published there (`fetch_version`), and every finished version is published.

S3 settings come from the usual AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
AWS_DEFAULT_REGION); HRM_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL) points at an S3-compatible server
(MinIO, moto, Ceph).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .io import replace_dir, sha256_file

INDEX = "_files.json"  # a published folder's file list, uploaded last: the folder exists when it does
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
EXTRAS = {"gcsfs": " (or: pip install -e .[gcs])"}
CHUNK = 1 << 20


class StorageError(OSError):
    """A remote object or folder that is missing, incomplete, corrupt or not reachable; names the URL."""


def protocol(url: str | os.PathLike) -> str:
    s = str(url)
    return s.split("://", 1)[0].lower() if "://" in s else ""


def is_remote(url: Any) -> bool:
    """A URL on another filesystem than the local one (file:// URLs and plain paths are local)."""
    return isinstance(url, str) and protocol(url) not in ("", "file", "local")


def local_path(url: str | os.PathLike) -> Path:
    """A plain path for a local URL (`file:///x` -> `/x`)."""
    s = str(url)
    return Path(s.split("://", 1)[1]) if protocol(s) in ("file", "local") else Path(s)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts if p]])


def cache_root() -> Path:
    """Where fetched objects and run mirrors live: $HRM_CACHE_DIR/remote, default ./.cache/remote."""
    return Path(os.environ.get("HRM_CACHE_DIR") or Path.cwd() / ".cache").resolve() / "remote"


def storage_options(proto: str) -> dict:
    if proto in ("s3", "s3a"):
        ep = os.environ.get("HRM_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") \
            or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": ep}} if ep else {}
    return {}


_FS_LOCK = threading.Lock()


def fs_for(url: str):
    """(fsspec filesystem, path inside it) for URL; a StorageError saying which package to install when
    the backend is missing. Listings are never cached (another writer may have changed them)."""
    import fsspec

    proto = protocol(url)
    try:
        with _FS_LOCK:
            fs, path = fsspec.core.url_to_fs(url, **storage_options(proto))
    except ImportError as e:
        pkg = BACKENDS.get(proto, "the fsspec backend for it")
        raise StorageError(f"{url}: {proto}:// needs the {pkg} package: pip install {pkg}{EXTRAS.get(pkg, '')} "
                           f"({e})") from None
    except ValueError as e:
        raise StorageError(f"{url}: not a storage URL fsspec knows ({e})") from None
    fs.invalidate_cache()
    return fs, path


def _explain(url: str, e: BaseException) -> StorageError:
    name = type(e).__name__
    if isinstance(e, FileNotFoundError):
        return StorageError(f"{url}: no such object or bucket")
    if isinstance(e, PermissionError) or "Credentials" in name or "AccessDenied" in str(e):
        return StorageError(f"{url}: access denied or no credentials ({name}: {e}); set AWS_ACCESS_KEY_ID/"
                            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and HRM_S3_ENDPOINT_URL for a non-AWS server")
    return StorageError(f"{url}: {name}: {e}")


def exists(url: str) -> bool:
    fs, path = fs_for(url)
    try:
        return bool(fs.exists(path))
    except Exception as e:  # credentials, endpoint down: say so instead of answering "no"
        raise _explain(url, e) from None


def read_bytes(url: str) -> bytes:
    fs, path = fs_for(url)
    try:
        return fs.cat_file(path)
    except Exception as e:
        raise _explain(url, e) from None


def _parent(fs, path: str) -> None:
    """Object stores have no folders; a local filesystem needs the parent folder made."""
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)


def write_bytes(url: str, data: bytes) -> None:
    """One object in one PUT (atomic on object stores: readers see the old or the new bytes)."""
    fs, path = fs_for(url)
    try:
        _parent(fs, path)
        fs.pipe_file(path, data)
    except Exception as e:
        raise _explain(url, e) from None


def remove(url: str) -> None:
    fs, path = fs_for(url)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    except Exception as e:
        raise _explain(url, e) from None


def sha256_url(url: str) -> str:
    """sha256 of a remote object's bytes, streamed."""
    fs, path = fs_for(url)
    h = hashlib.sha256()
    try:
        with fs.open(path, "rb", block_size=CHUNK) as f:
            while b := f.read(CHUNK):
                h.update(b)
    except Exception as e:
        raise _explain(url, e) from None
    return h.hexdigest()


def _download(url: str, dst: Path) -> str:
    """Stream URL into DST; returns the sha256 of the bytes written."""
    fs, path = fs_for(url)
    h = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with fs.open(path, "rb", block_size=CHUNK) as src, open(dst, "wb") as out:
            while b := src.read(CHUNK):
                h.update(b)
                out.write(b)
    except Exception as e:
        raise _explain(url, e) from None
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# folders: publish and fetch
# ------------------------------------------------------------------------------------------------
def tree_index(local_dir: str | os.PathLike) -> dict:
    """{"files": {relative path: {"sha256", "bytes"}}} of every file under LOCAL_DIR (hidden files and
    our own index excepted), sorted."""
    root = Path(local_dir)
    files = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if not f.is_file() or rel == INDEX or any(part.startswith(".") for part in Path(rel).parts):
            continue
        files[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return {"format": 1, "files": files}


def remote_index(url: str) -> dict | None:
    """The `_files.json` of a published folder, else None (not published, or cut short)."""
    idx = join(url, INDEX)
    if not exists(idx):
        return None
    try:
        return json.loads(read_bytes(idx))
    except json.JSONDecodeError:
        return None


def publish_tree(local_dir: str | os.PathLike, url: str, index: dict | None = None, force: bool = False) -> dict:
    """Upload every file of LOCAL_DIR under URL, then `_files.json` last. A folder already published with
    the same index and sizes is left alone (nothing uploaded) unless `force`; a fetch that finds a
    corrupted file removes the index, so the next publication uploads again. Returns the index."""
    local_dir = Path(local_dir)
    index = index or tree_index(local_dir)
    if not force and remote_index(url) == index and verify_remote(url, index, hashes=False):
        return index
    remove(join(url, INDEX))  # from here until the end, the remote folder is incomplete
    fs, base = fs_for(url)
    for rel in index["files"]:
        try:
            _parent(fs, f"{base.rstrip('/')}/{rel}")
            fs.put_file(str(local_dir / rel), f"{base.rstrip('/')}/{rel}")
        except Exception as e:
            raise _explain(join(url, rel), e) from None
    write_bytes(join(url, INDEX), (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())
    return index


def verify_remote(url: str, index: dict, hashes: bool = True) -> bool:
    """Every file of INDEX is under URL with its size (and with `hashes`, its sha256)."""
    fs, base = fs_for(url)
    for rel, rec in index.get("files", {}).items():
        p = f"{base.rstrip('/')}/{rel}"
        try:
            if fs.size(p) != rec["bytes"]:
                return False
        except FileNotFoundError:
            return False
        except Exception as e:
            raise _explain(join(url, rel), e) from None
        if hashes and sha256_url(join(url, rel)) != rec["sha256"]:
            return False
    return True


def local_matches(local_dir: Path, index: dict) -> bool:
    if not local_dir.is_dir():
        return False
    for rel, rec in index["files"].items():
        f = local_dir / rel
        if not f.is_file() or f.stat().st_size != rec["bytes"] or sha256_file(f) != rec["sha256"]:
            return False
    return True


def fetch_tree(url: str, local_dir: str | os.PathLike, index: dict | None = None) -> Path:
    """Download the published folder URL into LOCAL_DIR (replaced as a whole when complete), checking
    every file's sha256 and size against its `_files.json`. A folder that already holds those bytes is
    kept as is. StorageError when URL is not published (no `_files.json`) or a file does not match."""
    local_dir = Path(local_dir)
    index = index or remote_index(url)
    if index is None:
        raise StorageError(f"{url}: not a published folder (no {INDEX}: never published, or the upload was cut "
                           "short; publish it again)")
    if local_matches(local_dir, index):
        return local_dir
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".fetch-{local_dir.name}-", dir=local_dir.parent))
    try:
        for rel, rec in index["files"].items():
            got = _download(join(url, rel), tmp / rel)
            size = (tmp / rel).stat().st_size
            if got != rec["sha256"] or size != rec["bytes"]:
                raise StorageError(f"{join(url, rel)}: content does not match {join(url, INDEX)} (sha256 {got[:16]}, "
                                   f"{size} bytes; expected {rec['sha256'][:16]}, {rec['bytes']} bytes): the object was "
                                   "changed or corrupted after publication; publish the folder again")
        (tmp / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
        replace_dir(tmp, local_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local_dir


def fetch_cached(url: str) -> Path:
    """A published folder in the local cache, in a folder named by the hash of its `_files.json` (a
    folder republished with other bytes lands elsewhere)."""
    index = remote_index(url)
    if index is None:
        raise StorageError(f"{url}: not a published folder (no {INDEX}: never published, or the upload was cut "
                           "short; publish it again)")
    key = hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()[:16]
    return fetch_tree(url, cache_root() / "trees" / key, index)


# ------------------------------------------------------------------------------------------------
# sources: remote files in a content-addressed cache
# ------------------------------------------------------------------------------------------------
def _glob_base(path: str) -> str:
    """The part of a glob before its first wildcard, up to a '/'."""
    cut = min([i for i, c in enumerate(path) if c in "*?["] or [len(path)])
    return path[:cut].rsplit("/", 1)[0] if cut < len(path) else path


def list_files(url: str, suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(URL of each object, its name relative to the source's base) for a remote file, folder or glob,
    sorted by name; only names ending in SUFFIXES."""
    fs, path = fs_for(url)
    proto = protocol(url)
    try:
        if any(c in path for c in "*?["):
            base = _glob_base(path)
            found = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isfile(path):
            base, found = path.rsplit("/", 1)[0] if "/" in path else "", [path]
        elif fs.isdir(path):
            base, found = path.rstrip("/"), [p for p in fs.find(path)]
        else:
            return []
    except Exception as e:
        raise _explain(url, e) from None
    out = []
    for p in found:
        p = p.lstrip("/") if proto == "memory" and not path.startswith("/") else p
        rel = p[len(base):].lstrip("/") if base and p.startswith(base) else p.rsplit("/", 1)[-1]
        if rel.endswith(suffixes):
            out.append((fs.unstrip_protocol(p), rel))
    return sorted(out, key=lambda x: x[1])


def _object_id(url: str) -> str | None:
    """A strong identifier of the object's current bytes when the store gives one (S3/GCS ETag with size
    and modification time), else None (the object is then hashed on every use)."""
    fs, path = fs_for(url)
    try:
        info = fs.info(path)
    except Exception as e:
        raise _explain(url, e) from None
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if not tag:
        return None
    return json.dumps([str(tag), info.get("size"), str(info.get("LastModified") or info.get("updated") or "")])


_SOURCE_INDEX = threading.Lock()


def fetch_object(url: str, name: str) -> Path:
    """The object URL in the cache as `<cache>/objects/<sha256>/<name>` (the name keeps its suffix, which
    says how to read it). Downloaded unless the store's ETag says the cached copy holds its bytes."""
    root = cache_root() / "objects"
    known = root / "etags.json"
    oid = _object_id(url)
    if oid is not None:
        with _SOURCE_INDEX:
            seen = json.loads(known.read_text()) if known.exists() else {}
        sha = seen.get(url, {}).get(oid)
        if sha and (root / sha / name).is_file():
            return root / sha / name
    tmp_dir = root / ".incoming"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir)
    os.close(fd)
    try:
        sha = _download(url, Path(tmp))
        dst = root / sha / name
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if oid is not None:
        with _SOURCE_INDEX:
            seen = json.loads(known.read_text()) if known.exists() else {}
            seen[url] = {oid: sha}
            fd, t = tempfile.mkstemp(dir=root)
            with os.fdopen(fd, "w") as f:
                json.dump(seen, f, sort_keys=True)
            os.replace(t, known)
    return dst


def fetch_files(url: str, suffixes: tuple[str, ...]) -> list[Path]:
    """The remote source URL (a file, folder or glob) as local cached files, sorted by their names under
    the source (`cached_name` gives that name back)."""
    return [fetch_object(u, rel) for u, rel in list_files(url, suffixes)]


def cached_name(path: Path) -> str:
    """The name of a cached object under its source (`<cache>/objects/<sha>/<name>` -> name)."""
    root = cache_root() / "objects"
    rel = Path(path).resolve().relative_to(root)
    return Path(*rel.parts[1:]).as_posix()


# ------------------------------------------------------------------------------------------------
# run folders: a local mirror of a remote run
# ------------------------------------------------------------------------------------------------
_MIRRORS: dict[Path, str] = {}


def mirror_dir(url: str) -> Path:
    """The local folder a remote run folder is computed in."""
    return cache_root() / "runs" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


@contextmanager
def mirror(local: str | os.PathLike, url: str) -> Iterator[Path]:
    """While the block runs, LOCAL stands for the remote folder URL: `remote_for` maps paths under it."""
    local = Path(local).resolve()
    _MIRRORS[local] = url.rstrip("/")
    try:
        yield local
    finally:
        _MIRRORS.pop(local, None)


def register_mirror(local: str | os.PathLike, url: str) -> Path:
    local = Path(local).resolve()
    _MIRRORS[local] = url.rstrip("/")
    return local


def remote_for(path: str | os.PathLike) -> str | None:
    """The remote URL of a local path inside a registered mirror, else None."""
    p = Path(path).resolve()
    for local, url in list(_MIRRORS.items()):
        if p == local:
            return url
        if p.is_relative_to(local):
            return join(url, p.relative_to(local).as_posix())
    return None


def fetch_version(local_dir: str | os.PathLike, fingerprint: str | None = None) -> bool:
    """A stage version folder missing (or incomplete) locally, fetched from the remote run it mirrors when
    it is published there with that FINGERPRINT. True when fetched."""
    url = remote_for(local_dir)
    if url is None:
        return False
    index = remote_index(url)
    if index is None or "manifest.json" not in index["files"]:
        return False
    if fingerprint is not None:
        try:
            man = json.loads(read_bytes(join(url, "manifest.json")))
        except json.JSONDecodeError:
            return False
        if man.get("fingerprint") != fingerprint:
            return False
    try:
        fetch_tree(url, local_dir, index)
    except StorageError as e:  # a corrupt remote version is recomputed and republished, never used
        print(f"[storage] {e}; recomputing it", flush=True)
        remove(join(url, INDEX))
        return False
    return True


def publish_version(local_dir: str | os.PathLike) -> str | None:
    """Publish a finished stage version of a mirrored run (no-op outside a mirror); returns its URL."""
    url = remote_for(local_dir)
    if url is None:
        return None
    publish_tree(local_dir, url)
    return url


def pull_file(url: str, local: Path) -> bool:
    """Copy one remote object to LOCAL (atomically) when it exists; True if copied."""
    if not exists(url):
        return False
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.parent / f".{local.name}.pull"
    tmp.write_bytes(read_bytes(url))
    os.replace(tmp, local)
    return True


def localize(url: str) -> Path:
    """A local folder for a remote URL given to a consumer (`hrm train --shards`, `hrm eval`): a
    published folder (a stage version) is fetched into the cache; a run folder (with run.json) gets its
    mirror, registered so that its stage versions are fetched on first use."""
    if remote_index(url) is not None:
        return fetch_cached(url)
    if exists(join(url, "run.json")):
        local = mirror_dir(url)
        pull_file(join(url, "run.json"), local / "run.json")
        return register_mirror(local, url)
    raise StorageError(f"{url}: neither a published stage folder (no {INDEX}) nor a run folder (no run.json)")


# ------------------------------------------------------------------------------------------------
# training checkpoints: tag folders, then the `latest` pointer
# ------------------------------------------------------------------------------------------------
LATEST = "latest"


def publish_checkpoint(ckdir: str | os.PathLike, tag: str, url: str, keep: list[str] | None = None) -> str:
    """Publish the DeepSpeed checkpoint CKDIR/TAG under URL/TAG (files, then its _files.json), then write
    URL/latest (one PUT) naming it: a reader following `latest` always finds a complete tag. Remote tags
    not in KEEP (the tags kept locally) are removed after `latest` has moved on. Returns URL/TAG."""
    dst = join(url, tag)
    publish_tree(Path(ckdir) / tag, dst)
    write_bytes(join(url, LATEST), tag.encode())
    if keep is not None:
        fs, base = fs_for(url)
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)]
        except FileNotFoundError:
            names = []
        for name in names:
            if name.startswith("step-") and name not in keep and name != tag:
                remove(join(url, name))
    return dst


def fetch_checkpoint(url: str, ckdir: str | os.PathLike) -> str | None:
    """The tag URL/latest names, fetched (every file checked) into CKDIR/TAG, then CKDIR/latest written;
    None when URL holds no checkpoint. A `latest` naming an unpublished or corrupt tag is a StorageError."""
    ckdir = Path(ckdir)
    if not exists(join(url, LATEST)):
        return None
    tag = read_bytes(join(url, LATEST)).decode().strip()
    fetch_tree(join(url, tag), ckdir / tag)
    tmp = ckdir / f"{LATEST}.tmp"
    tmp.write_text(tag)
    os.replace(tmp, ckdir / LATEST)
    return tag
