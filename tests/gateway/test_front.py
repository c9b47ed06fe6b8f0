"""The gateway's front over real HTTP, served as `beluga gateway` serves it
(gateway/server.py): bodies, headers and slow clients bounded, overload refused at once with
Retry-After, a non-streaming client gone cancelling its upstream request, health checks that
request traffic cannot starve, a drain on SIGTERM. A real Redis registry and a real
stand-in worker (uvicorn) behind it."""

from __future__ import annotations

import asyncio
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
        for model in ("fast", "slow"):
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
