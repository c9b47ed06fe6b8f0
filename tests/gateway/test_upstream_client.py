"""The gateway's HTTP/1.1 client against real sockets: raw asyncio servers that answer,
stream, stall, cut connections and misbehave the ways workers do."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gateway.upstream import (
    HIGH_WATER,
    ConnectFailed,
    Disconnected,
    ReadTimeout,
    UpstreamClient,
)
from tests.support import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]]


class Server:
    """A raw HTTP/1.1 server: `handler(reader, writer, head)` answers one request and says
    whether to keep the connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                if not await self.handler(reader, writer, head):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def raw(response: bytes, keep: bool, then_sleep_s: float = 0.0) -> Handler:
    """A handler that answers every request with `response` as it is (optionally going
    silent afterwards), then keeps the connection or closes it."""
    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _h: bytes) -> bool:
        w.write(response)
        await w.drain()
        await asyncio.sleep(then_sleep_s)
        return keep
    return handler


def ok(body: bytes = b'{"ok": true}') -> Handler:
    return raw(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n%s" % (len(body), body), keep=True)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_a_kept_alive_connection_serves_the_next_request() -> None:
    async def go() -> None:
        async with Server(ok()) as server:
            client = UpstreamClient(connect_timeout_s=2, read_timeout_s=5)
            for i in range(3):
                resp = await client.request("POST", server.url + "/v1/x?a=1", b'{"i": %d}' % i,
                                            {"content-type": "application/json"})
                assert resp.status == 200 and resp.headers["content-type"] == "application/json"
                assert await resp.read() == b'{"ok": true}'
                resp.release()
            assert server.connections == 1
            head = server.requests[2]
            assert head.startswith(b"POST /v1/x?a=1 HTTP/1.1\r\n")
            assert f"host: 127.0.0.1:{server.port}".encode() in head
            assert b"content-length: 8\r\n" in head and head.endswith(b'{"i": 2}')
            await client.close()
    run(go())


def test_a_response_not_read_to_its_end_does_not_go_back_to_the_pool() -> None:
    async def go() -> None:
        async with Server(ok(b"x" * (16 * HIGH_WATER))) as server:
            client = UpstreamClient(connect_timeout_s=2, read_timeout_s=5)
            resp = await client.request("GET", server.url + "/")
            resp.release()  # body unread: the connection cannot be reused
            resp = await client.request("GET", server.url + "/")
            assert len(await resp.read()) == 16 * HIGH_WATER
            resp.release()
            assert server.connections == 2
            await client.close()
    run(go())


def test_chunks_arrive_as_the_worker_sends_them() -> None:
    release = asyncio.Event()

    async def stream(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _h: bytes) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n")
        for event in (b"data: 1\n\n", b"data: 2\n\n"):
            w.write(b"%x\r\n%s\r\n" % (len(event), event))
            await w.drain()
            await release.wait()
        w.write(b"0\r\n\r\n")
        await w.drain()
        return True

    async def go() -> None:
        async with Server(stream) as server:
            client = UpstreamClient(connect_timeout_s=2, read_timeout_s=5)
            resp = await client.request("POST", server.url + "/s", b"{}")
            chunks = resp.chunks()
            assert await anext(chunks) == b"data: 1\n\n"   # before the worker sent more
            release.set()
            assert [c async for c in chunks] == [b"data: 2\n\n"]
            resp.release()
            resp = await client.request("POST", server.url + "/s", b"{}")  # reused
            assert await resp.read() == b"data: 1\n\ndata: 2\n\n"
            resp.release()
            assert server.connections == 1
            await client.close()
    run(go())


def test_a_body_without_a_length_ends_with_the_connection() -> None:
    until_close = raw(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it", keep=False)

    async def go() -> None:
        async with Server(until_close) as server:
            client = UpstreamClient(connect_timeout_s=2, read_timeout_s=5)
            resp = await client.request("GET", server.url + "/")
            assert await resp.read() == b"all of it"
            resp.release()
            await client.close()
    run(go())


def test_an_interim_100_response_is_skipped() -> None:
    interim = raw(b"HTTP/1.1 100 Continue\r\n\r\n"
                  b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok", keep=True)

    async def go() -> None:
        async with Server(interim) as server:
            client = UpstreamClient(connect_timeout_s=2, read_timeout_s=5)
            resp = await client.request("POST", server.url + "/", b"{}")
            assert resp.status == 201 and await resp.read() == b"ok"
            resp.release()
            await client.close()
    run(go())


def test_silence_is_a_read_timeout_before_and_after_the_headers() -> None:
    silent = raw(b"", keep=False, then_sleep_s=10)
    stalls = raw(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf", keep=False,
                 then_sleep_s=10)

    async def go() -> None:
        client = UpstreamClient(connect_timeout_s=2, read_timeout_s=0.3)
        async with Server(silent) as server:
            t0 = time.monotonic()
            with pytest.raises(ReadTimeout):
                await client.request("POST", server.url + "/", b"{}")
            assert time.monotonic() - t0 < 2
        async with Server(stalls) as server:
            resp = await client.request("POST", server.url + "/", b"{}")
            with pytest.raises(TimeoutError):
                await resp.read()
            resp.release()
        await client.close()
    run(go())


def test_no_listener_is_connect_failed() -> None:
    async def go() -> None:
        client = UpstreamClient(connect_timeout_s=2, read_timeout_s=5)
        with pytest.raises(ConnectFailed):
            await client.request("POST", f"http://127.0.0.1:{free_port()}/", b"{}")
        with pytest.raises(ConnectFailed):
            await client.request("POST", "ftp://127.0.0.1/", b"{}")
        await client.close()
    run(go())


def test_a_connection_cut_mid_body_is_disconnected_after_the_response_began() -> None:
    cut = raw(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npart", keep=False)

    async def go() -> None:
        async with Server(cut) as server:
            client = UpstreamClient(connect_timeout_s=2, read_timeout_s=5)
            resp = await client.request("POST", server.url + "/", b"{}")
            with pytest.raises(Disconnected) as info:
                await resp.read()
            assert not info.value.before_response
            resp.release()
            await client.close()
    run(go())


def test_a_kept_alive_connection_closed_by_the_worker_is_not_reused() -> None:
    """Closed while idle: the client notices and connects afresh. Closed as a request
    arrives on it: Disconnected, before any response, on a reused connection."""
    served = 0

    async def once(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _h: bytes) -> bool:
        nonlocal served
        served += 1
        if served == 2:
            return False  # takes the request, closes without an answer
        return await ok()(_r, w, _h)

    async def go() -> None:
        async with Server(once) as server:
            client = UpstreamClient(connect_timeout_s=2, read_timeout_s=5)
            resp = await client.request("GET", server.url + "/")
            await resp.read()
            resp.release()
            with pytest.raises(Disconnected) as info:
                await client.request("GET", server.url + "/")
            assert info.value.before_response and info.value.reused
            resp = await client.request("GET", server.url + "/")  # a fresh connection
            assert await resp.read() == b'{"ok": true}'
            resp.release()
            assert server.connections == 2
            await client.close()
    run(go())


def test_idle_connections_expire_after_the_keepalive() -> None:
    async def go() -> None:
        async with Server(ok()) as server:
            client = UpstreamClient(connect_timeout_s=2, read_timeout_s=5, keepalive_s=0.2)
            for _ in range(2):
                resp = await client.request("GET", server.url + "/")
                await resp.read()
                resp.release()
                await asyncio.sleep(0.4)
            assert server.connections == 2
            await client.close()
    run(go())


def test_open_connections_stay_within_the_limit() -> None:
    gate = asyncio.Event()

    async def held(r: asyncio.StreamReader, w: asyncio.StreamWriter, h: bytes) -> bool:
        await gate.wait()
        return await ok()(r, w, h)

    async def one(client: UpstreamClient, url: str) -> bytes:
        resp = await client.request("GET", url)
        try:
            return await resp.read()
        finally:
            resp.release()

    async def go() -> None:
        async with Server(held) as server:
            client = UpstreamClient(connect_timeout_s=2, read_timeout_s=5, limit=2)
            tasks = [asyncio.create_task(one(client, server.url + "/")) for _ in range(5)]
            await asyncio.sleep(0.3)
            assert server.connections == 2   # the other three wait for a connection
            gate.set()
            assert await asyncio.gather(*tasks) == [b'{"ok": true}'] * 5
            assert len(client._open) <= 2
            await client.close()
    run(go())


def test_a_slow_reader_stops_the_socket_being_read() -> None:
    size = 8 * 1024 * 1024

    async def big(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _h: bytes) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            w.write(b"x" * 65536)
            await w.drain()
        return True

    async def go() -> None:
        async with Server(big) as server:
            client = UpstreamClient(connect_timeout_s=2, read_timeout_s=5)
            resp = await client.request("GET", server.url + "/")
            got = 0
            async for chunk in resp.chunks():
                assert len(chunk) <= HIGH_WATER + 256 * 1024   # bounded, not the whole body
                got += len(chunk)
                await asyncio.sleep(0.005)
            assert got == size
            resp.release()
            await client.close()
    run(go())
