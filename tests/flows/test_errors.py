"""Which failures are retried: network errors only."""

from __future__ import annotations

import socket

import pytest

from flows.errors import is_transient, is_user_error


class _Resp:
    def __init__(self, code):
        self.status_code = code


class HfHubHTTPError(Exception):
    def __init__(self, code):
        super().__init__(f"HTTP {code}")
        self.response = _Resp(code)


@pytest.mark.parametrize("exc,transient", [
    (ConnectionResetError("reset"), True),
    (TimeoutError("timed out"), True),
    (socket.timeout("timed out"), True),
    (HfHubHTTPError(503), True),
    (HfHubHTTPError(429), True),
    (HfHubHTTPError(404), False),
    (FileNotFoundError("data/x.jsonl"), False),
    (ValueError("sources[0].path: no file matches"), False),
    (KeyError("field"), False),
])
def test_transient(exc, transient):
    assert is_transient(exc) is transient


def test_transient_cause_is_found():
    try:
        try:
            raise ConnectionError("dropped")
        except ConnectionError as e:
            raise RuntimeError("download failed") from e
    except RuntimeError as e:
        assert is_transient(e)
        assert not is_user_error(e)


def test_user_errors():
    from pipeline.runs import RunLocked
    from pipeline.spec import SpecError

    assert is_user_error(SpecError("bad")) and is_user_error(RunLocked("busy")) and is_user_error(FileNotFoundError("x"))
    assert not is_user_error(ConnectionError("x"))
