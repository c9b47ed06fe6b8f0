"""The gateway's HTTP/1.1 client for its workers: kept-alive connections, one request at a
time on each, responses parsed by httptools (the C parser uvicorn uses).

It does only what the gateway asks of a worker: POST a JSON body (or GET /health), read the
status and headers, then the body whole or chunk by chunk as it arrives (server-sent
events, chunked transfer decoded), with a connect timeout and a read timeout that bounds the
silence between two arrivals. Bytes pass through untouched (no decompression: workers are
asked for identity). Per request it costs about a third of aiohttp's CPU (0.12 vs 0.34 ms
per round trip on the AVX2-only VM, bench/README.md), which was the gateway's largest
single share of CPU.

Failures are typed for the gateway's retry rules:

    UpstreamError
    ├── ConnectFailed   no connection could be made (refused, unreachable, connect timeout):
    │                   nothing was sent
    ├── Saturated       every connection slot stayed in use for the queue timeout: nothing
    │                   was sent, and another worker would not do better
    ├── Disconnected    the connection closed or broke before the response ended;
    │                   `before_response` and `reused` tell whether the worker may have
    │                   got the request at all
    ├── TooLarge        a body past the reader's limit
    └── ReadTimeout     (also a TimeoutError) the worker went silent for the read timeout
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 256 * 1024  # bytes buffered from a worker before its socket stops being read
MAX_HEADER_BYTES = 64 * 1024  # a worker's response headers, at most


class UpstreamError(Exception):
    """A worker could not be reached or did not answer properly."""


class ConnectFailed(UpstreamError):
    """No connection to the worker: the request was not sent."""


class Saturated(UpstreamError):
    """No connection slot came free within the queue timeout: the request was not sent."""


class TooLarge(UpstreamError):
    """A body longer than the reader's limit."""


class Disconnected(UpstreamError):
    """The connection ended before the response did."""

    def __init__(self, message: str, *, before_response: bool, reused: bool) -> None:
        super().__init__(message)
        self.before_response = before_response
        self.reused = reused


class ReadTimeout(UpstreamError, TimeoutError):
    """The worker sent nothing for the read timeout."""


Origin = tuple[str, str, int]  # scheme, host, port


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; at most one request in flight."""

    def __init__(self, origin: Origin, on_lost: Callable[[_Connection], None]) -> None:
        self.origin = origin
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.uses = 0
        self.idle_since = 0.0
        self._loop = asyncio.get_running_loop()
        self._parser: httptools.HttpResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self._header_bytes = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = True
        self.error: UpstreamError | None = None
        self._until_eof = False
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)

    def data_received(self, data: bytes) -> None:
        if self._parser is None:  # bytes nobody asked for: this connection is not reusable
            self.keep_alive = False
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Disconnected(f"malformed response: {exc}",
                                    before_response=not self.headers_done, reused=self.uses > 1))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_lost(self)
        if self._parser is not None and not self.complete:
            if self.headers_done and self._until_eof and exc is None:
                self.on_message_complete()  # a body delimited by the end of the connection
            else:
                self._fail(Disconnected(
                    f"connection closed before the response ended ({exc!r})" if exc else
                    "connection closed before the response ended",
                    before_response=not self.headers_done, reused=self.uses > 1))

    # -- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            if self.error is None:
                self._fail(Disconnected("the response's headers are too large",
                                        before_response=True, reused=self.uses > 1))
                self.close()
            return
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        self._until_eof = ("content-length" not in self.headers
                           and "chunked" not in self.headers.get("transfer-encoding", "")
                           and self.status not in (204, 304) and self.status >= 200)
        if self.status < 200:  # 1xx: an interim response; the real one follows
            self.headers = {}
            return
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.headers_done:  # the end of a 1xx
            return
        self.complete = True
        self._parser = None
        self._wake()

    # -- used by the client ----------------------------------------------------------------
    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self._reset()
        self.uses += 1
        self._parser = httptools.HttpResponseParser(self)
        self.transport.write(data)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout_s: float | None) -> None:
        """Until something new arrives (headers, body, the end, an error)."""
        if self.error is not None:
            raise self.error
        w = self._waiter = self._loop.create_future()
        timer = (self._loop.call_later(timeout_s, _expire, w, timeout_s)
                 if timeout_s is not None else None)
        try:
            await w
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def take(self) -> bytes:
        data = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        self._body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return data

    def has_body(self) -> bool:
        return bool(self._body)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()
        self.closed = True


def _expire(waiter: asyncio.Future[None], timeout_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(ReadTimeout(f"no data from the worker for {timeout_s:g} s"))


class Response:
    """A worker's response: status and headers now, the body as it comes. `release()` when
    done with it (the connection is kept for the next request only if the body was read to
    its end)."""

    def __init__(self, conn: _Connection, client: UpstreamClient, read_timeout_s: float | None
                 ) -> None:
        self._conn: _Connection | None = conn
        self._client = client
        self._timeout = read_timeout_s
        self.status = conn.status
        self.headers = conn.headers
        self.relayed = False  # set by the gateway once a stream's relay has started

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (whatever has arrived, joined, per step)."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("the response was released")
        while True:
            if conn.has_body():
                yield conn.take()
                continue
            if conn.complete:
                return
            await conn.wait(self._timeout)

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; TooLarge past `limit` bytes (the connection is then dropped)."""
        if limit is None:
            return b"".join([chunk async for chunk in self.chunks()])
        chunks, size = [], 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the answer is larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client._give_back(conn)


class UpstreamClient:
    """Kept-alive connections to workers, at most `limit` open at once."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float | None,
                 keepalive_s: float = 4.0, limit: int = 1000,
                 queue_timeout_s: float | None = None) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.queue_timeout_s = queue_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_s = keepalive_s
        self._idle: dict[Origin, list[_Connection]] = {}
        self._origins: dict[str, tuple[Origin, bytes]] = {}
        self._slots = asyncio.Semaphore(limit)
        self._open: set[_Connection] = set()
        self._waiting = 0  # requests waiting for a connection slot
        self._ssl: ssl.SSLContext | None = None

    def _origin(self, url: str) -> tuple[Origin, bytes, bytes]:
        """(origin, Host header value, path) of a URL; the origin part is cached."""
        scheme_host, slash, path = url.partition("://")[2].partition("/")
        base = url[: len(url) - len(path) - len(slash)]
        known = self._origins.get(base)
        if known is None:
            parts = urlsplit(base)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConnectFailed(f"not an http(s) URL: {url!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                host = parts.netloc.encode("ascii")
            except UnicodeEncodeError:
                raise ConnectFailed(f"not an ASCII host name: {url!r}") from None
            known = ((parts.scheme, parts.hostname, port), host)
            if len(self._origins) < 4096:
                self._origins[base] = known
        return known[0], known[1], ("/" + path).encode("latin-1")

    async def request(self, method: str, url: str, body: bytes = b"",
                      headers: dict[str, str] | None = None,
                      read_timeout_s: float | None = None) -> Response:
        """Send one request and wait for its status and headers."""
        origin, host, path = self._origin(url)
        head = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode(), path, host)]
        if body or method == "POST":
            head.append(b"content-length: %d\r\n" % len(body))
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        head.append(b"\r\n")
        conn = self._idle_connection(origin)
        if conn is None:
            conn = await self._connect(origin)
        timeout = read_timeout_s if read_timeout_s is not None else self.read_timeout_s
        try:
            conn.send(b"".join(head) + body)
            while not conn.headers_done:
                await conn.wait(timeout)
        except BaseException:
            self._discard(conn)
            raise
        return Response(conn, self, timeout)

    async def status(self, url: str, timeout_s: float) -> int:
        """GET `url` within `timeout_s` (all of it); its status. The body is discarded."""
        async with asyncio.timeout(timeout_s):
            resp = await self.request("GET", url)
            try:
                await resp.read()
            finally:
                resp.release()
        return resp.status

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_s:
                return conn
            self._discard(conn)
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        if self._slots.locked():
            self._close_one_idle()
        self._waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise Saturated(f"all {len(self._open)} connections stayed busy for "
                            f"{self.queue_timeout_s:g} s") from None
        finally:
            self._waiting -= 1
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(origin, self._lost), host, port,
                    ssl=self._tls() if scheme == "https" else None)
        except TimeoutError:
            self._slots.release()
            raise ConnectFailed(f"connecting to {host}:{port} timed out after "
                                f"{self.connect_timeout_s:g} s") from None
        except OSError as exc:
            self._slots.release()
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from None
        except BaseException:
            self._slots.release()
            raise
        if conn.closed:  # closed again before it could be used
            self._slots.release()
            raise ConnectFailed(f"{host}:{port} closed the connection at once")
        self._open.add(conn)
        return conn

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _give_back(self, conn: _Connection) -> None:
        # At the limit with requests waiting, its slot goes to them (they may be for
        # another worker) rather than to an idle connection.
        if (conn.complete and conn.keep_alive and not conn.closed and conn.error is None
                and not self._waiting):
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.origin, []).append(conn)
        else:
            self._discard(conn)

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._lost(conn)  # now: its slot is free before the transport's callback runs

    def _lost(self, conn: _Connection) -> None:
        """A connection closed (by either side): it no longer counts, idle or not."""
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)
        if conn in self._open:
            self._open.discard(conn)
            self._slots.release()

    def _close_one_idle(self) -> None:
        for idle in self._idle.values():
            if idle:
                self._discard(idle.pop(0))
                return

    async def close(self) -> None:
        for conn in list(self._open):  # idle ones included
            self._discard(conn)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)  # let the transports run their close callbacks
