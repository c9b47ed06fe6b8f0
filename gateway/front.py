"""The gateway's ASGI front: the two completion routes, read and answered without FastAPI.

POSTs to `/v1/chat/completions` and `/v1/completions` go straight to `Gateway.serve`;
everything else (and the lifespan) goes to the FastAPI app. The hot routes skip FastAPI's
router, dependency solving, Request objects and the Starlette middleware that wraps every
`send`: on a slow core that was about a fifth of the gateway's CPU per request (py-spy,
bench/README.md). The FastAPI app still declares both routes (the OpenAPI schema).

What the front bounds, before any routing:
* concurrency: past `max_concurrent_requests` in flight, 503 with `Retry-After` at once;
* memory: a body over `max_request_bytes` is 413, and the bodies held at once share a
  budget (past it, 503 with `Retry-After`);
* time: a body not received within `client_body_timeout_s` is 408 (headers have their own
  timeout in the server, gateway/server.py);
* a refused body is still read (and dropped) up to a bound before the answer is sent, so
  a client that sends the whole body before reading (urllib, the OpenAI SDK) reads the
  413 instead of a broken pipe;
* a client that goes away while its (non-streamed) answer is computed cancels the request:
  the worker's connection is closed, which makes vLLM abort it, as for streams.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from beluga.logs import RequestContext, current_request
from beluga.settings import Settings
from gateway.errors import (
    APIError,
    LoopDetected,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    error_body,
)
from gateway.metrics import GatewayMetrics
from gateway.requests import Endpoint

logger = logging.getLogger(__name__)

HOP_HEADER = b"x-beluga-forwarded"  # on every request a gateway sends to a worker
HOT_ROUTES: dict[str, Endpoint] = {"/v1/chat/completions": "chat",
                                   "/v1/completions": "completions"}
DRAIN_BYTES = 128 * 1024 * 1024  # most of a refused body read (and dropped) before answering
DRAIN_S = 10.0                   # most time spent on that
# Bodies held at once: a parsed body takes up to ~8x its bytes (gateway/requests.py bounds
# its values), so this keeps what requests hold to a few hundred MiB.
MIN_BODY_BUDGET = 32 * 1024 * 1024


REQUEST_ID_HEADER = b"x-request-id"
# A client's request id is used when it is 1-128 of these characters (else one is made):
# what request ids look like (UUIDs, "req_...", ULIDs), nothing that needs escaping anywhere.
_REQUEST_ID_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                              b"0123456789-_.:+=/@")
# W3C Trace Context: version 00 (or a later one, read as 00: its first four fields), a
# 32-hex trace id and a 16-hex parent id, neither all zeros, and the flags.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})"
                          rb"(-[\x21-\x7e]*)?")
MAX_TRACESTATE = 512  # bytes; the spec's limit for what a vendor must pass on


def request_context(request_id: bytes | None, traceparent: bytes | None,
                    tracestate: bytes | None, route: str) -> RequestContext:
    """The request's context: the client's `X-Request-Id` when it looks like one (else a
    new id), and its trace context when `traceparent` is valid (W3C), with `tracestate`
    when that is printable and at most MAX_TRACESTATE bytes."""
    rid = (request_id.decode("ascii")
           if request_id and len(request_id) <= 128 and _REQUEST_ID_CHARS.issuperset(request_id)
           else uuid.uuid4().hex)
    parent = state = None
    if traceparent is not None and (m := _TRACEPARENT.fullmatch(traceparent)) is not None:
        version, trace_id, parent_id, _ = m.groups()[:4]
        if (version != b"ff" and (version != b"00" or m.group(5) is None)
                and trace_id.strip(b"0") and parent_id.strip(b"0")):
            # passed on as version 00 (what this gateway reads a later version as: its
            # first four fields), never the client's extra fields
            parent = b"-".join((b"00", trace_id, parent_id, m.group(4))).decode("ascii")
            if (tracestate is not None and 0 < len(tracestate) <= MAX_TRACESTATE
                    and all(0x20 <= c < 0x7f for c in tracestate)):
                state = tracestate.decode("ascii")
    return RequestContext(rid, parent, state, route=route)


ACCESS = logging.getLogger("beluga.access")


def _safe(text: str | None) -> str | None:
    """A client's string for a log line: percent-encoded beyond a plain set (a decoded path
    or a model name may hold newlines or spaces that would forge a line or a field)."""
    return None if text is None else urllib.parse.quote(text, safe="/._-~:@+=")


def access(ctx: RequestContext, method: str, status: int) -> None:
    """The request's access line (logger `beluga.access`, INFO)."""
    duration = time.perf_counter() - ctx.started
    route, model = _safe(ctx.route) or "", _safe(ctx.model)
    extra = {"route": route, "status": status, "model": model, "worker": ctx.worker,
             "ttft_s": None if ctx.ttft_s is None else round(ctx.ttft_s, 6),
             "duration_s": round(duration, 6), "error": ctx.error,
             "request_id": ctx.request_id}  # (logged once the request's context is reset)
    ACCESS.info("%s %s %d model=%s worker=%s ttft=%s %.3fs%s", method, route, status,
                model or "-", ctx.worker or "-",
                "-" if ctx.ttft_s is None else f"{ctx.ttft_s:.3f}s", duration,
                f" error={ctx.error}" if ctx.error else "", extra=extra)


def raw_headers(media_type: str, headers: dict[str, str],
                content_length: bytes | None = None) -> list[tuple[bytes, bytes]]:
    """An answer's ASGI headers: its type, its length when known, then `headers`."""
    raw = [(b"content-type", media_type.encode("latin-1"))]
    if content_length is not None:
        raw.append((b"content-length", content_length))
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    return raw


class Answer(Response):
    """A worker's 200 answer, passed on as it came: two ASGI messages, without Starlette's
    header building. `after` (the bookkeeping) runs once the body is handed to the server,
    off the client's critical path."""

    def __init__(self, body: bytes, media_type: str, headers: dict[str, str],
                 after: Callable[[], None]) -> None:
        self.status_code = 200
        self.body = body
        self.background = None
        self.raw_headers = raw_headers(media_type, headers, b"%d" % len(body))
        self._after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self.body})
        finally:
            self._after()
        if self.background is not None:
            await self.background()


class Relay(Response):
    """A worker's stream passed on as raw ASGI messages. A client that goes away (an
    `http.disconnect` on `receive`) cancels the relay wherever it waits, the worker's next
    event included, and the stream is closed, which closes the worker's connection: vLLM
    aborts the request. (Starlette's StreamingResponse does the same with a task group of
    two tasks per stream under uvicorn's ASGI 2.3; this is one small task.)"""

    def __init__(self, stream: Any, headers: dict[str, str]) -> None:
        self.status_code = 200
        self.background = None
        self.client_gone = False  # set when the client left mid-stream (logged as 499)
        self.body_iterator = stream
        self.raw_headers = raw_headers("text/event-stream; charset=utf-8", headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = asyncio.current_task()
        assert relay is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            relay.cancel()

        watcher = asyncio.create_task(watch())
        try:
            try:
                await send({"type": "http.response.start", "status": 200,
                            "headers": self.raw_headers})
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                # Cancelled before it runs again: the disconnect uvicorn reports once the
                # response is complete never reaches it.
                watcher.cancel()
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:  # (a stream cancelled or ended is closed already)
                    await aclose()
        except asyncio.CancelledError:
            if not gone:
                raise
            relay.uncancel()  # the client left: nothing more to send
            self.client_gone = True
            return
        if self.background is not None:
            await self.background()


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class BodyStream:
    """A request's `receive` channel, and whether its body has ended."""

    def __init__(self, receive: Receive, expect_continue: bool = False) -> None:
        self.receive = receive
        self.ended = False
        # `Expect: 100-continue`: the client sends its body only once asked, which the
        # server does on the first read; an answer before any read means "don't send it".
        self.expect_continue = expect_continue
        self.read_any = False

    async def next(self) -> bytes:
        """The next chunk of the body (b"" once it ended); ClientGone if the client left."""
        if self.ended:
            return b""
        self.read_any = True
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.ended = True
            raise ClientGone
        self.ended = not message.get("more_body", False)
        chunk: bytes = message.get("body", b"")
        return chunk


class Front:
    """The gateway's ASGI app (see the module's doc)."""

    def __init__(self, app: FastAPI, gateway: Any, settings: Settings,
                 metrics: GatewayMetrics) -> None:
        self.fastapi = app
        self.gateway = gateway
        self.settings = settings
        self.metrics = metrics
        self.in_flight = 0
        self.body_bytes = 0  # bytes of request bodies held now
        self.body_budget = max(MIN_BODY_BUDGET, 4 * settings.max_request_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.fastapi(scope, receive, send)
            return
        endpoint = HOT_ROUTES.get(scope["path"])
        request_id = traceparent = tracestate = None
        authorization, declared, expect, hop = "", None, False, False
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                declared = value.decode("latin-1")
            elif name == b"expect":
                expect = value.lower() == b"100-continue"
            elif name == HOP_HEADER:
                hop = True
            elif name == b"x-request-id":
                request_id = value
            elif name == b"traceparent":
                traceparent = value
            elif name == b"tracestate":
                tracestate = value
        ctx = request_context(request_id, traceparent, tracestate, scope["path"])
        token = current_request.set(ctx)
        status = 0
        try:
            if endpoint is None or scope["method"] != "POST":
                async def tagged(message: Message) -> None:
                    nonlocal status
                    if message["type"] == "http.response.start":
                        status = message["status"]
                        message["headers"] = [*message.get("headers", ()),
                                              (REQUEST_ID_HEADER, ctx.request_id.encode())]
                    await send(message)

                await self.fastapi(scope, receive, tagged)
                return
            status = await self.serve_hot(endpoint, authorization, declared, expect, hop,
                                          ctx, scope, receive, send)
        finally:
            current_request.reset(token)
            if not status and endpoint is not None:  # the client left before its answer
                status, ctx.error = 499, ctx.error or "client_gone"
            probe = scope["path"].startswith("/health")
            if status and self.settings.access_log and (
                    endpoint is not None or (status >= 400 and not probe)
                    or logger.isEnabledFor(logging.DEBUG)):
                access(ctx, scope["method"], status)

    async def serve_hot(self, endpoint: Endpoint, authorization: str, declared: str | None,
                        expect: bool, hop: bool, ctx: RequestContext, scope: Scope,
                        receive: Receive, send: Send) -> int:
        """A completion request, answered: its status (0: the client left first)."""
        stream = BodyStream(receive, expect)
        if hop:
            # A gateway's own request came back to a gateway: a registry record names a
            # gateway as a worker. Refused, so the sender takes that "worker" out.
            return await self.refuse(LoopDetected("this is a Beluga gateway, not a worker; "
                                                  "check the worker registry",
                                                  code="loop_detected"),
                                     endpoint, stream, scope, send)
        limit = self.settings.max_concurrent_requests
        if self.gateway.draining or (limit and self.in_flight >= limit):
            self.metrics.refusal("overloaded")
            why = "shutting down" if self.gateway.draining else "at its concurrency limit"
            return await self.refuse(Overloaded(f"this gateway is {why}; try again shortly",
                                                code="overloaded"), endpoint, stream, scope,
                                     send)
        held = 0
        try:
            # (A request counts toward the concurrency limit once its body is in: clients
            # trickling bodies hold only the body budget, each for at most the body timeout.)
            body = await self.read_body(declared, stream)
        except APIError as exc:
            return await self.refuse(exc, endpoint, stream, scope, send)
        except ClientGone:
            return 0
        held = len(body)
        self.in_flight += 1
        try:
            try:
                response = await self.serve_watched(endpoint, authorization, body, receive)
            except ClientGone:
                ctx.error = "client_gone"
                return 499
            except APIError as exc:
                ctx.error = exc.code or type(exc).__name__
                response = exc.response()
            except Exception:
                logger.exception("unexpected error while serving a request")
                ctx.error = "internal_error"
                response = JSONResponse(error_body("internal gateway error",
                                                   "internal_error"), status_code=500)
            del body
            self.body_bytes -= held
            held = 0
            response.raw_headers.append((REQUEST_ID_HEADER, ctx.request_id.encode()))
            await response(scope, receive, send)
            if getattr(response, "client_gone", False):  # a stream the client left
                ctx.error = ctx.error or "client_gone"
                return 499
            return int(response.status_code)
        finally:
            self.body_bytes -= held
            self.in_flight -= 1

    async def read_body(self, declared: str | None, stream: BodyStream) -> bytes:
        """The request body: at most `max_request_bytes` of it (413 past that, declared or
        not), within `client_body_timeout_s` (408), within the shared body budget (503)."""
        limit = self.settings.max_request_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self.metrics.refusal("too_large")
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.settings.client_body_timeout_s):
                while not stream.ended:
                    chunk = await stream.next()
                    if chunk:
                        size += len(chunk)
                        if size > limit:
                            self.metrics.refusal("too_large")
                            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
                        if self.body_bytes + len(chunk) > self.body_budget:
                            self.metrics.refusal("overloaded")
                            raise Overloaded("this gateway holds too many request bodies "
                                             "now; try again shortly", code="overloaded")
                        self.body_bytes += len(chunk)
                        chunks.append(chunk)
        except TimeoutError:
            self.body_bytes -= sum(len(c) for c in chunks)
            self.metrics.refusal("body_timeout")
            raise RequestTimeout(f"the request body was not received within "
                                 f"{self.settings.client_body_timeout_s:g} s",
                                 code="request_timeout") from None
        except BaseException:
            self.body_bytes -= sum(len(c) for c in chunks)
            raise
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    async def serve_watched(self, endpoint: Endpoint, authorization: str, body: bytes,
                            receive: Receive) -> Any:
        """`Gateway.serve`, cancelled if the client disconnects meanwhile (ClientGone)."""
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            message: Message = await receive()
            while message["type"] != "http.disconnect":
                message = await receive()
            gone = True
            task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            return await self.gateway.serve(endpoint, authorization, body)
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()
            self.metrics.answered(endpoint, 499, None, None)  # nginx's "client closed"
            raise ClientGone from None
        finally:
            watcher.cancel()

    async def refuse(self, exc: APIError, endpoint: Endpoint, stream: BodyStream,
                     scope: Scope, send: Send) -> int:
        """Answer `exc` after reading what is left of the body (dropped), up to DRAIN_BYTES
        and DRAIN_S, so a client still sending it can read the answer. Its status, or 0
        if the client left first."""
        self.metrics.answered(endpoint, exc.status_code, None, None)
        ctx = current_request.get()
        if ctx is not None:
            ctx.error = exc.code or type(exc).__name__
        # (nothing to drain from a client too slow to send, or one that waits to be asked)
        drained = DRAIN_BYTES if isinstance(exc, RequestTimeout) or (
            stream.expect_continue and not stream.read_any) else 0
        try:
            async with asyncio.timeout(DRAIN_S):
                while not stream.ended and drained < DRAIN_BYTES:
                    drained += len(await stream.next())
        except TimeoutError:
            pass
        except ClientGone:
            return 0
        response = exc.response()
        response.headers["connection"] = "close"
        if ctx is not None:
            response.raw_headers.append((REQUEST_ID_HEADER, ctx.request_id.encode()))
        await response(scope, stream.receive, send)
        return exc.status_code
