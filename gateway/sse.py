"""Streams and token usage.

For metrics the gateway wants every stream's token usage, which vLLM reports in a final
chunk only when asked (`stream_options.include_usage`). `with_usage` asks for it upstream
when the client did not; `UsageFilter` then reads the usage from the stream and, for such
clients, removes what they did not ask for (the usage-only chunk and the `"usage": null`
field), so their stream looks exactly as it would have without the gateway.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


def with_usage(payload: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The payload asking for usage, and whether the gateway added the request."""
    opts = payload.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        return payload, False
    new_opts = dict(opts) if isinstance(opts, dict) else {}
    new_opts["include_usage"] = True
    return dict(payload, stream_options=new_opts), True


def with_usage_body(body: bytes, payload: dict[str, Any]) -> tuple[bytes, bool]:
    """`with_usage` on the request body itself: a body without `stream_options` gets the
    field spliced in before its first key (a JSON object's keys have no order), so a long
    prompt is not serialized again; otherwise the payload is."""
    new, added = with_usage(payload)
    if not added:
        return body, False
    if "stream_options" not in payload:
        spliced = with_first_field(body, b'"stream_options":{"include_usage":true}')
        if spliced is not None:
            return spliced, True
    return json.dumps(new).encode(), True


def with_first_field(body: bytes, field: bytes) -> bytes | None:
    """The JSON object `body` with `field` (`"key":value`, a key it does not have) spliced
    in before its first key, instead of serializing it again; None if `body` is no object."""
    start = body.lstrip()
    if not start.startswith(b"{"):
        return None
    rest = start[1:].lstrip()
    return b"{" + field + (b"" if rest.startswith(b"}") else b",") + rest


class UsageFilter:
    """Feed raw SSE bytes in, get the bytes for the client out; `usage` holds the last usage
    object seen. Events are split on blank lines; a partial event waits for the rest.
    Clients that asked for usage themselves get every byte unchanged, and chunks without a
    usage object pass without parsing (a usage object split across two network chunks is
    then missed by the metrics, never by the client)."""

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.usage: dict[str, Any] | None = None
        self._buf = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self.strip and b'"usage":{' not in chunk and not self._buf:
            return chunk  # the fast path: nothing to read or remove here
        self._buf += chunk
        out: list[bytes] = []
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                break
            event, self._buf = self._buf[:end + 2], self._buf[end + 2:]
            out.extend(self._event(event))
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buf = self._buf, b""
        return rest

    def _event(self, event: bytes) -> Iterator[bytes]:
        line = event.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            yield event
            return
        try:
            obj = json.loads(line[6:])
        except ValueError:
            yield event
            return
        if not isinstance(obj, dict):
            yield event
            return
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        if not self.strip or "usage" not in obj:
            yield event
            return
        if usage is not None and not obj.get("choices"):
            return  # the usage-only chunk the client did not ask for
        del obj["usage"]
        yield b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
