"""Which failures are worth a retry, and keeping deterministic ones to one line on the console.

Only network reads are retried (a Hub download that timed out or got a 5xx/429): a bad setting, a
missing file or a corrupt Parquet file fails the same way every time, so it fails at once.
"""

from __future__ import annotations

import logging
import os
from typing import Any

_TRANSIENT_NAMES = {
    # requests / urllib3 / httpx / aiohttp / huggingface_hub, matched by name so none is imported here
    "ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "TimeoutException", "ProtocolError",
    "RemoteDisconnected", "ChunkedEncodingError", "IncompleteRead", "ConnectError", "ReadError",
    "RemoteProtocolError", "NetworkError", "TransportError", "ServerDisconnectedError",
    "ClientConnectionError", "ClientPayloadError", "LocalEntryNotFoundError",
}


def _status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    code = getattr(resp, "status_code", None) or getattr(exc, "status_code", None) or getattr(exc, "status", None)
    return code if isinstance(code, int) else None


def is_transient(exc: BaseException | None) -> bool:
    """A network error that may go away: a dropped connection, a time-out, HTTP 429 or 5xx; looked for in
    the exception and the ones it was raised from. File-system errors are never transient."""
    seen = 0
    while exc is not None and seen < 10:
        seen += 1
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
                            KeyError, TypeError)):
            return False  # deterministic (IngestError, SpecError and RunError are ValueErrors)
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(exc).__mro__):
            return True
        code = _status(exc)
        if code is not None and (code == 429 or code >= 500):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_on_network_errors(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a failed task only when it failed on a transient network error."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as e:  # noqa: BLE001 - the failure being classified
        return is_transient(e)
    return False


def is_user_error(exc: BaseException | None) -> bool:
    """An error with a message a user can act on (bad spec, setting, path, data): shown as one line."""
    if exc is None:
        return False
    from pipeline.runs import RunError
    from pipeline.spec import SpecError

    return isinstance(exc, (SpecError, RunError, FileNotFoundError, ValueError, PermissionError)) \
        and not is_transient(exc)


class _OneLine(logging.Filter):
    """Drop the traceback of a user error from console log records (the API logs keep it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_user_error(exc):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_user_errors_on_console() -> None:
    """Install the one-line filter on Prefect's console handlers (HRM_DEBUG=1 keeps tracebacks)."""
    if os.environ.get("HRM_DEBUG"):
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    flt = _OneLine()
    for lg in [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                                       if n.startswith("prefect")]:
        for h in getattr(lg, "handlers", []):
            if isinstance(h, PrefectConsoleHandler) and not any(isinstance(f, _OneLine) for f in h.filters):
                h.addFilter(flt)
