"""Logging for every Beluga process: plain text or one JSON object per line.

`configure(level, fmt)` is called once by the `beluga` command. With `fmt="json"` each record
is one line: `time` (UTC, ISO 8601), `level`, `logger`, `message`, the request's fields when
the record was made while serving one (`request_id`, and on the gateway's access line
`route`, `model`, `worker`, `status`, `ttft_s`, `duration_s`), and `exception` with the
traceback when there is one. Values are JSON-escaped, so a client's request id or a model
name cannot break a line or forge a field.

The request being served is a context variable (`current_request`), set by the gateway's
front for each request: every record logged while serving it carries its id, in either
format.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# what a record may carry through `extra=` into the JSON line (other extras are ignored)
FIELDS = ("route", "model", "worker", "status", "ttft_s", "duration_s", "error")


@dataclass
class RequestContext:
    """One request as the gateway serves it: its id, the trace context it forwards, and
    what the access line reports once it is answered."""

    request_id: str
    traceparent: str | None = None
    tracestate: str | None = None
    started: float = field(default_factory=time.perf_counter)
    route: str = ""
    model: str | None = None
    worker: str | None = None
    ttft_s: float | None = None
    error: str | None = None


current_request: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "beluga_request", default=None)


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record (`%(request_id)s`; "-" outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            ctx = current_request.get()
            record.request_id = ctx.request_id if ctx is not None else None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            out["request_id"] = request_id
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        # ASCII only: no raw U+2028 or other line separators a log reader might split on
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """The plain format, with the request id appended to records made while serving one."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return text if request_id is None else f"{text} [request {request_id}]"


_active: LogFormat = "text"


def active_format() -> LogFormat:
    """The format `configure` set (what `beluga up` passes on to its children)."""
    return _active


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (not when it was made)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure(level: str | int = "INFO", fmt: LogFormat = "text") -> None:
    """The root logger of this process: one stderr handler in `fmt`, at `level`."""
    global _active
    _active = fmt
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
