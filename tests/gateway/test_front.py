"""The gateway's front over real HTTP, served as `beluga gateway` serves it
(gateway/server.py): bodies, headers and slow clients bounded, overload refused at once with
Retry-After, a non-streaming client gone cancelling its upstream request, health checks that
request traffic cannot starve, a drain on SIGTERM. A real Redis registry and a real
stand-in worker (uvicorn) behind it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from beluga.registry import SCHEMA_VERSION, worker_key
from beluga.settings import Settings
from gateway.app import create_app
from gateway.server import GatewayServer, config
from tests.support import RedisServer, free_port, serve

PREFIX = "beluga:test-front"


class StandIn:
    """A worker: `slow` answers after `delay_s`, noting a client that went away."""

    def __init__(self) -> None:
        self.app = FastAPI()
        self.delay_s = 2.0
        self.disconnected = threading.Event()
        self.started = 0

        @self.app.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        @self.app.post("/v1/chat/completions")
        async def chat(request: Request) -> JSONResponse:
            body = await request.json()
            self.started += 1
            if body["model"] == "huge":
                return JSONResponse({"choices": [], "pad": "x" * (2 * 1024 * 1024)})
            if body["model"] == "slow":
                end = time.monotonic() + self.delay_s
                while time.monotonic() < end:
                    if await request.is_disconnected():
                        self.disconnected.set()
                        return JSONResponse({}, status_code=499)
                    await asyncio.sleep(0.02)
            return JSONResponse({"object": "chat.completion", "model": body["model"],
                                 "choices": []})


class Gateway:
    def __init__(self, url: str, server: GatewayServer, app: Any) -> None:
        self.url, self.server, self.app = url, server, app


def run_gateway(settings: Settings) -> Iterator[Gateway]:
    app = create_app(settings)
    port = free_port()
    server = GatewayServer(config(app, settings, host="127.0.0.1", port=port,
                                  log_level="error"), app)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    yield Gateway(f"http://127.0.0.1:{port}", server, app)
    server.should_exit = True
    thread.join(15)


@pytest.fixture(scope="module")
def backend() -> Iterator[tuple[RedisServer, StandIn]]:
    redis_server = RedisServer().start()
    worker = StandIn()
    for url in serve(worker.app):
        for model in ("fast", "slow", "huge"):
            rec = {"schema": SCHEMA_VERSION, "id": f"w-{model}", "url": url, "model": model,
                   "capacity": 64, "pid": 1, "started_at": 0.0,
                   "heartbeat_at": time.time() + 3600, "running": 0, "waiting": 0}
            redis_server.client().set(worker_key(PREFIX, f"w-{model}"), json.dumps(rec),
                                      ex=3600)
        yield redis_server, worker
    redis_server.stop()


def gateway(backend: tuple[RedisServer, StandIn], **over: Any) -> Iterator[Gateway]:
    settings = dict(redis_url=backend[0].url, redis_key_prefix=PREFIX,
                    routing_policy="least_loaded", health_check_interval_s=0.2,
                    health_check_failures=1, max_request_bytes=1024 * 1024)
    settings.update(over)
    yield from run_gateway(Settings(**settings))


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def test_a_413_is_readable_by_a_client_that_sends_its_whole_body_first(
        backend: tuple[RedisServer, StandIn]) -> None:
    for gw in gateway(backend):
        body = b'{"model": "fast", "prompt": "' + b"A" * (32 * 1024 * 1024) + b'"}'
        req = urllib.request.Request(f"{gw.url}/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 413
        assert json.loads(err.value.read())["error"]["type"] == "invalid_request_error"
        # and when the length was not declared up front (chunked)
        with httpx.Client(timeout=30) as client:
            resp = client.post(f"{gw.url}/v1/completions",
                               content=iter([body[i:i + 65536]
                                             for i in range(0, len(body), 65536)]))
        assert resp.status_code == 413, resp.text


def raw_request(url: str, head: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head)
    return sock


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_a_body_trickled_slower_than_its_timeout_gets_408(
        backend: tuple[RedisServer, StandIn]) -> None:
    for gw in gateway(backend, client_body_timeout_s=0.5):
        started = time.monotonic()
        sock = raw_request(gw.url, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                                   b"content-type: application/json\r\ncontent-length: 100\r\n"
                                   b"\r\n" + b'{"model"')
        answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer
        assert time.monotonic() - started < 3


def test_connections_that_send_no_request_head_are_closed(
        backend: tuple[RedisServer, StandIn]) -> None:
    for gw in gateway(backend, client_header_timeout_s=0.5):
        host, port = gw.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(200)]
        half = raw_request(gw.url, b"GET /health HTTP/1.1\r\nhost: x\r\n")  # never ends
        started = time.monotonic()
        health = httpx.get(f"{gw.url}/health", timeout=5)  # others are served meanwhile
        assert health.status_code == 200 and time.monotonic() - started < 0.5
        for sock in [*idle, half]:
            assert sock.recv(1) == b""  # closed by the gateway
            sock.close()


def test_past_the_concurrency_limit_requests_are_refused_at_once(
        backend: tuple[RedisServer, StandIn]) -> None:
    backend[1].delay_s = 1.5
    for gw in gateway(backend, max_concurrent_requests=2):
        with ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(httpx.post, f"{gw.url}/v1/chat/completions",
                                json=chat("slow"), timeout=10) for _ in range(2)]
            time.sleep(0.5)
            started = time.monotonic()
            resp = httpx.post(f"{gw.url}/v1/chat/completions", json=chat("fast"), timeout=10)
            assert resp.status_code == 503 and time.monotonic() - started < 0.5
            assert resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["code"] == "overloaded"
            assert [f.result().status_code for f in slow] == [200, 200]
        assert httpx.post(f"{gw.url}/v1/chat/completions", json=chat("fast"),
                          timeout=10).status_code == 200
        assert 'beluga_gateway_refused_total{reason="overloaded"} 1.0' in httpx.get(
            f"{gw.url}/metrics").text


def test_busy_worker_connections_mean_503_after_the_queue_timeout_and_health_stays(
        backend: tuple[RedisServer, StandIn]) -> None:
    backend[1].delay_s = 2.0
    for gw in gateway(backend, max_upstream_connections=2, upstream_queue_timeout_s=0.5,
                      health_check_timeout_s=0.3):
        with ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(httpx.post, f"{gw.url}/v1/chat/completions",
                                json=chat("slow"), timeout=10) for _ in range(2)]
            time.sleep(0.3)
            started = time.monotonic()
            resp = httpx.post(f"{gw.url}/v1/chat/completions", json=chat("fast"), timeout=10)
            assert resp.status_code == 503, resp.text
            assert 0.4 < time.monotonic() - started < 1.5
            assert resp.headers["retry-after"] == "1"
            # the health checks (every 0.2 s, one failure takes a worker out) have their own
            # connections: the worker stays in routing although every request one is busy
            time.sleep(0.6)
            workers = httpx.get(f"{gw.url}/health").json()["workers"]
            assert all(w["healthy"] for w in workers), workers
            assert [f.result().status_code for f in slow] == [200, 200]


def test_a_non_streaming_client_gone_cancels_its_upstream_request(
        backend: tuple[RedisServer, StandIn]) -> None:
    worker = backend[1]
    worker.delay_s = 10.0
    worker.disconnected.clear()
    for gw in gateway(backend):
        body = json.dumps(chat("slow")).encode()
        sock = raw_request(gw.url, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                                   b"content-type: application/json\r\n"
                                   b"content-length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.5)
        sock.close()
        assert worker.disconnected.wait(3), "the worker's request was not cancelled"
        assert 'status="499"' in httpx.get(f"{gw.url}/metrics").text


def test_sigterm_drains_requests_in_flight_and_refuses_new_ones(
        backend: tuple[RedisServer, StandIn]) -> None:
    backend[1].delay_s = 1.0
    for gw in gateway(backend, drain_timeout_s=10):
        assert httpx.get(f"{gw.url}/health/ready").json() == {"status": "ready"}
        with ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(httpx.post, f"{gw.url}/v1/chat/completions",
                                   json=chat("slow"), timeout=10)
            time.sleep(0.3)
            gw.server.handle_exit(signal.SIGTERM, None)
            assert gw.app.gateway.draining
            assert inflight.result().status_code == 200  # finished, not cut
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # the listener is closed
            httpx.get(f"{gw.url}/health/live", timeout=2)


def test_ready_is_503_without_a_healthy_worker(backend: tuple[RedisServer, StandIn]) -> None:
    for gw in gateway(backend, redis_key_prefix="beluga:test-front-empty"):
        assert httpx.get(f"{gw.url}/health/live").json() == {"status": "live"}
        resp = httpx.get(f"{gw.url}/health/ready")
        assert resp.status_code == 503 and resp.json() == {"status": "no_healthy_worker"}


def test_bodies_that_timed_out_give_their_budget_back(
        backend: tuple[RedisServer, StandIn]) -> None:
    for gw in gateway(backend, client_body_timeout_s=0.5):
        socks = [raw_request(gw.url, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                                     b"content-length: 1000000\r\n\r\n" + b"x" * 900_000)
                 for _ in range(4)]
        for sock in socks:
            assert read_all(sock).startswith(b"HTTP/1.1 408")
        assert gw.app.body_bytes == 0 and gw.app.in_flight == 0
        assert httpx.post(f"{gw.url}/v1/chat/completions", json=chat("fast"),
                          timeout=10).status_code == 200


def test_clients_still_sending_their_bodies_do_not_take_the_concurrency_slots(
        backend: tuple[RedisServer, StandIn]) -> None:
    for gw in gateway(backend, max_concurrent_requests=2, client_body_timeout_s=5):
        slow = [raw_request(gw.url, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                                    b"content-length: 100\r\n\r\n{") for _ in range(20)]
        time.sleep(0.3)
        assert httpx.post(f"{gw.url}/v1/chat/completions", json=chat("fast"),
                          timeout=10).status_code == 200
        for sock in slow:
            sock.close()


@pytest.mark.parametrize("head", [
    b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"a: b\r\n" * 20_000,      # many headers
    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nhost: x\r\n"])           # a long URL
def test_a_request_head_past_64_kib_is_431_and_the_connection_closed(
        backend: tuple[RedisServer, StandIn], head: bytes) -> None:
    for gw in gateway(backend):
        sock = raw_request(gw.url, b"")
        with contextlib.suppress(OSError):  # (it may be closed before all is sent)
            for i in range(0, len(head), 4096):
                sock.sendall(head[i:i + 4096])
        try:
            answer = read_all(sock)
        except ConnectionResetError:  # closed while the client still sent: reset, not read
            answer = b"HTTP/1.1 431 (reset)"
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        assert httpx.get(f"{gw.url}/health/live", timeout=5).status_code == 200


def test_a_connection_trickling_an_unread_body_after_its_answer_is_closed(
        backend: tuple[RedisServer, StandIn]) -> None:
    for gw in gateway(backend, client_header_timeout_s=1.0):
        sock = raw_request(gw.url, b"GET /health/live HTTP/1.1\r\nhost: x\r\n"
                                   b"content-length: 1000000000\r\n\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 8:
            try:
                sock.sendall(b"x")
            except OSError:
                closed = True
                break
            sock.settimeout(0.3)
            try:
                if sock.recv(65536) == b"" and time.monotonic() - started > 0.5:
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed and time.monotonic() - started < 4


def test_a_gateway_named_as_a_worker_is_refused_and_taken_out_no_loop(
        backend: tuple[RedisServer, StandIn]) -> None:
    redis_server = backend[0]
    for gw in gateway(backend, health_check_interval_s=0):
        rec = {"schema": SCHEMA_VERSION, "id": "w-loop", "url": gw.url, "model": "loop",
               "capacity": 64, "pid": 1, "started_at": 0.0,
               "heartbeat_at": time.time() + 3600, "running": 0, "waiting": 0}
        redis_server.client().set(worker_key(PREFIX, "w-loop"), json.dumps(rec), ex=60)
        try:
            deadline = time.monotonic() + 5
            while "w-loop" not in {w["id"] for w in httpx.get(f"{gw.url}/health").json()[
                    "workers"]}:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            started = time.monotonic()
            resp = httpx.post(f"{gw.url}/v1/chat/completions", json=chat("loop"), timeout=10)
            assert resp.status_code in (502, 503) and time.monotonic() - started < 2
            assert resp.json()["error"]["type"] in ("upstream_error", "service_unavailable")
            health = {w["id"]: w["healthy"] for w in httpx.get(f"{gw.url}/health").json()[
                "workers"]}
            assert health["w-loop"] is False and health["w-fast"] is True
            assert httpx.post(f"{gw.url}/v1/chat/completions", json=chat("fast"),
                              timeout=10).status_code == 200
        finally:
            redis_server.client().delete(worker_key(PREFIX, "w-loop"))


def test_an_expect_100_continue_over_the_limit_gets_its_413_at_once(
        backend: tuple[RedisServer, StandIn]) -> None:
    for gw in gateway(backend):
        started = time.monotonic()
        sock = raw_request(gw.url, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n"
                                   b"content-length: 99999999\r\nexpect: 100-continue\r\n\r\n")
        answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
        assert time.monotonic() - started < 2


def test_a_worker_answer_past_the_limit_is_a_502_not_a_crash(
        backend: tuple[RedisServer, StandIn], monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import forward

    monkeypatch.setattr(forward, "MAX_ANSWER_BYTES", 1024 * 1024)
    for gw in gateway(backend):
        resp = httpx.post(f"{gw.url}/v1/chat/completions", json=chat("huge"), timeout=10)
        assert resp.status_code == 502, resp.text[:200]
        assert resp.json()["error"]["code"] == "worker_error"
