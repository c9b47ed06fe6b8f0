from __future__ import annotations

import json

import pytest

from gateway.errors import (
    APIError,
    BadRequest,
    NoHealthyWorker,
    NotFound,
    PayloadTooLarge,
    UpstreamFailure,
    UpstreamTimeout,
    normalize_upstream_error,
)


@pytest.mark.parametrize(
    ("cls", "status", "kind"),
    [(BadRequest, 400, "invalid_request_error"), (NotFound, 404, "invalid_request_error"),
     (PayloadTooLarge, 413, "invalid_request_error"), (NoHealthyWorker, 503,
                                                        "service_unavailable"),
     (UpstreamFailure, 502, "upstream_error"), (UpstreamTimeout, 504, "upstream_timeout")],
)
def test_errors_render_in_the_openai_shape(cls: type[APIError], status: int, kind: str) -> None:
    resp = cls("boom", param="p", code="c").response()
    assert resp.status_code == status
    assert json.loads(bytes(resp.body)) == {
        "error": {"message": "boom", "type": kind, "param": "p", "code": "c"}}


def test_sse_error_event_is_one_data_line() -> None:
    event = UpstreamFailure("gone").sse_event()
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["error"]["message"] == "gone"


@pytest.mark.parametrize(
    ("status", "content", "message", "kind"),
    [
        (400, b'{"error": {"message": "too long", "type": "BadRequestError", "code": 400}}',
         "too long", "BadRequestError"),
        (400, b'{"object": "error", "message": "old shape"}', "old shape",
         "invalid_request_error"),
        (404, b"plain text", "plain text", "not_found_error"),
        (422, b"", "upstream status 422", "invalid_request_error"),
        (500, b"[]", "[]", "internal_error"),
    ],
)
def test_upstream_errors_are_normalized(status: int, content: bytes, message: str,
                                        kind: str) -> None:
    err = normalize_upstream_error(status, content)["error"]
    assert (err["message"], err["type"]) == (message, kind)
