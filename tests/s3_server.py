"""A local S3-compatible server for tests: moto in server mode on 127.0.0.1 (a free port), with fake
credentials and the endpoint set through environment variables for the test only."""

from __future__ import annotations

import socket
import uuid

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """The URL of a moto S3 server running for the module."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint, monkeypatch) -> str:
    """A fresh bucket on the local server; `s3://<bucket>` (credentials and endpoint set for this test)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("HRM_S3_ENDPOINT_URL", s3_endpoint)
    from pipeline.storage import fs_for

    name = f"hrm-{uuid.uuid4().hex[:12]}"
    fs, _ = fs_for(f"s3://{name}")
    fs.mkdir(name)
    return f"s3://{name}"
