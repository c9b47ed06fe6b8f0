"""Errors in the OpenAI error format.

Every failure the gateway reports is an :class:`APIError` rendered as
``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status:

    APIError
    ├── BadRequest          400 invalid_request_error   malformed JSON, wrong types
    ├── NotFound            404 invalid_request_error   unknown model (code model_not_found)
    ├── RequestTimeout      408 invalid_request_error   body not sent within client_body_timeout_s
    ├── PayloadTooLarge     413 invalid_request_error   body over max_request_bytes
    ├── NoHealthyWorker     503 service_unavailable     nothing can serve the model now
    ├── Overloaded          503 service_unavailable     over a limit now (Retry-After), or draining
    ├── LoopDetected        508 loop_detected           a gateway's request reached a gateway
    ├── UpstreamFailure     502 upstream_error          worker refused, reset or 5xx'd
    └── UpstreamTimeout     504 upstream_timeout        worker went silent too long
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse


class APIError(Exception):
    status_code = 500
    error_type = "internal_error"
    headers: dict[str, str] = {}

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code,
                            headers=self.headers or None)

    def sse_event(self) -> bytes:
        """The error as one server-sent event, for failures after a stream has started."""
        return f"data: {json.dumps(self.body())}\n\n".encode()


class BadRequest(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class Unauthorized(APIError):
    status_code = 401
    error_type = "invalid_request_error"


class NotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"


class RequestTimeout(APIError):
    status_code = 408
    error_type = "invalid_request_error"
    headers = {"connection": "close"}


class PayloadTooLarge(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    headers = {"connection": "close"}


class NoHealthyWorker(APIError):
    status_code = 503
    error_type = "service_unavailable"


class Overloaded(APIError):
    """Refused at once: a limit of this gateway is reached; try again shortly."""

    status_code = 503
    error_type = "service_unavailable"
    headers = {"retry-after": "1"}


class LoopDetected(APIError):
    """A request a gateway forwarded reached a gateway (a registry record names one)."""

    status_code = 508
    error_type = "loop_detected"
    headers = {"connection": "close"}


class UpstreamFailure(APIError):
    status_code = 502
    error_type = "upstream_error"


class UpstreamTimeout(APIError):
    status_code = 504
    error_type = "upstream_timeout"


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def status_error_type(status: int) -> str:
    """OpenAI error `type` for an HTTP status that did not come from an APIError."""
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "internal_error"


def normalize_upstream_error(status: int, content: bytes) -> dict[str, Any]:
    """An upstream error body in the OpenAI shape, whatever the worker sent."""
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return {"error": {
                "message": err["message"],
                "type": err.get("type") or status_error_type(status),
                "param": err.get("param"),
                "code": err.get("code"),
            }}
        if isinstance(data.get("message"), str):  # vLLM's older top-level error shape
            return error_body(data["message"], status_error_type(status))
    text = content.decode("utf-8", "replace").strip()[:500] or f"upstream status {status}"
    return error_body(text, status_error_type(status))
