"""Usage in streams: asked upstream for metrics, removed when the client did not ask."""

from __future__ import annotations

import json

from gateway.sse import UsageFilter, with_usage, with_usage_body

CHUNKS = [
    b'data: {"id":"1","choices":[{"delta":{"content":"Hi"}}],"usage":null}\n\n',
    b'data: {"id":"1","choices":[{"delta":{"content":" there"}}],"us',
    b'age":null}\n\ndata: {"id":"1","choices":[],"usage":{"prompt_tokens":5,'
    b'"completion_tokens":2,"total_tokens":7}}\n\ndata: [DONE]\n\n',
]


def test_with_usage_adds_the_option_only_when_missing() -> None:
    p, added = with_usage({"stream": True})
    assert added and p["stream_options"] == {"include_usage": True}
    p, added = with_usage({"stream_options": {"include_usage": True, "x": 1}})
    assert not added and p["stream_options"]["x"] == 1
    p, added = with_usage({"stream_options": {"continuous_usage_stats": True}})
    assert added and p["stream_options"] == {"continuous_usage_stats": True,
                                             "include_usage": True}


def test_stripped_streams_look_as_if_never_asked() -> None:
    f = UsageFilter(strip=True)
    out = b"".join(f.feed(c) for c in CHUNKS) + f.flush()
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    bodies = [json.loads(e[6:]) for e in events[:-1]]
    assert [b["choices"][0]["delta"]["content"] for b in bodies] == ["Hi", " there"]
    assert all("usage" not in b for b in bodies)
    assert f.usage == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_clients_that_asked_get_the_bytes_unchanged() -> None:
    f = UsageFilter(strip=False)
    out = b"".join(f.feed(c) for c in CHUNKS) + f.flush()
    assert out == b"".join(CHUNKS)
    assert f.usage is not None and f.usage["completion_tokens"] == 2


def test_with_usage_body_splices_the_option_into_the_body_as_sent() -> None:
    for body in (b'{"model":"m","stream":true}', b'  {\n "model": "m", "stream": true}\n',
                 b'{}', b'{ }', '{"messages":[{"content":"ü \\u00e9"}]}'.encode()):
        payload = json.loads(body)
        new, added = with_usage_body(body, payload)
        assert added and json.loads(new) == with_usage(payload)[0]
        assert new.endswith(body.lstrip()[1:].lstrip())  # the rest as sent, not re-serialized
    # stream_options already there: the payload is written again, the client's options kept
    body = b'{"stream_options":{"continuous_usage_stats":true},"model":"m"}'
    new, added = with_usage_body(body, json.loads(body))
    assert added and json.loads(new)["stream_options"] == {"continuous_usage_stats": True,
                                                           "include_usage": True}
    body = b'{"stream_options":{"include_usage":true}}'
    assert with_usage_body(body, json.loads(body)) == (body, False)
