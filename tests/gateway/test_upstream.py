"""Upstream failures through the real gateway app: a real Redis holds the registry, and a
real HTTP stand-in upstream (uvicorn on a free port) answers, fails, stalls or streams
depending on the model asked for. A registered worker whose port is closed plays a dead one.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.testclient import TestClient

from beluga.registry import SCHEMA_VERSION, worker_key
from beluga.settings import Settings
from gateway.app import create_app
from tests.support import RedisServer, free_port, gateway_in_front_of, serve

PREFIX = "beluga:test"


def stand_in() -> FastAPI:
    app = FastAPI()
    app.state.health_status = 200

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=app.state.health_status)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        model = body["model"]
        if model == "boom":
            return Response("worker exploded", status_code=500)
        if model == "slow":
            await asyncio.sleep(5)
        if body.get("stream"):
            async def events() -> AsyncIterator[bytes]:
                for i in range(3):
                    yield f'data: {{"n": {i}}}\n\n'.encode()
                    if model == "dies" and i == 1:
                        raise RuntimeError("the worker died")  # connection cut mid-body
                yield b"data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        if body.get("max_tokens") == 99999:
            return JSONResponse({"error": {"message": "too many tokens", "type": "BadRequest",
                                           "param": "max_tokens", "code": 400}},
                                status_code=400)
        return JSONResponse({"object": "chat.completion", "model": model,
                             "echo": body.get("seed"), "salt": body.get("cache_salt")})

    return app


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    server = RedisServer().start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    yield from serve(stand_in())


def register(client: redis.Redis, wid: str, url: str, model: str) -> None:
    rec = {"schema": SCHEMA_VERSION, "id": wid, "url": url, "model": model, "capacity": 4,
           "pid": 1, "started_at": 0.0, "heartbeat_at": time.time(), "running": 0,
           "waiting": 0}
    client.set(worker_key(PREFIX, wid), json.dumps(rec), ex=60)


@pytest.fixture(scope="module")
def gateway(redis_url: str, upstream_url: str) -> Iterator[TestClient]:
    client = redis.Redis.from_url(redis_url)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    register(client, "a-dead", dead, "m")
    register(client, "b-live", upstream_url, "m")
    register(client, "c-boom", upstream_url, "boom")
    register(client, "d-slow", upstream_url, "slow")
    register(client, "e-dies", upstream_url, "dies")
    settings = Settings(redis_url=redis_url, redis_key_prefix=PREFIX, upstream_timeout_s=1.0,
                        connect_timeout_s=1.0, unhealthy_cooldown_s=30)
    with TestClient(create_app(settings)) as tc:
        yield tc


def chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_requests_retry_past_a_dead_worker(gateway: TestClient) -> None:
    for i in range(4):
        resp = gateway.post("/v1/chat/completions", json=chat("m", seed=i))
        assert resp.status_code == 200, resp.text
        assert resp.json()["echo"] == i  # the body went through untouched
        assert resp.headers["x-beluga-worker"] == "b-live"
    dead = next(w for w in gateway.get("/health").json()["workers"] if w["id"] == "a-dead")
    assert dead["healthy"] is False


def test_worker_5xx_is_502(gateway: TestClient) -> None:
    resp = gateway.post("/v1/chat/completions", json=chat("boom"))
    assert resp.status_code == 502
    err = resp.json()["error"]
    assert err["type"] == "upstream_error" and "worker exploded" in err["message"]


def test_worker_4xx_passes_through_in_openai_shape(gateway: TestClient) -> None:
    resp = gateway.post("/v1/chat/completions", json=chat("m", max_tokens=99999))
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == "too many tokens"


def test_silent_worker_is_504(gateway: TestClient) -> None:
    started = time.monotonic()
    resp = gateway.post("/v1/chat/completions", json=chat("slow"))
    assert resp.status_code == 504
    assert resp.json()["error"]["type"] == "upstream_timeout"
    assert time.monotonic() - started < 4


def test_streams_are_relayed_as_sse(gateway: TestClient) -> None:
    with gateway.stream("POST", "/v1/chat/completions", json=chat("m", stream=True)) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and len(lines) == 4


def test_models_lists_every_registered_model(gateway: TestClient) -> None:
    ids = [m["id"] for m in gateway.get("/v1/models").json()["data"]]
    assert ids == ["boom", "dies", "m", "slow"]


def test_metrics_count_requests_routes_and_latencies(gateway: TestClient) -> None:
    ok = gateway.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200
    bad = gateway.post("/v1/chat/completions", content=b"{")
    assert bad.status_code == 400
    text = gateway.get("/metrics").text
    # the answering worker's model; "-" where no worker answered (the client's string never
    # becomes a label value)
    assert 'beluga_gateway_requests_total{endpoint="chat",model="m",status="200"}' in text
    assert 'beluga_gateway_requests_total{endpoint="chat",model="-",status="400"}' in text
    unknown = gateway.post("/v1/chat/completions", json={
        "model": "no-such-model-\u2603", "messages": [{"role": "user", "content": "hi"}]})
    assert unknown.status_code == 404
    assert "no-such-model" not in gateway.get("/metrics").text
    assert "beluga_gateway_route_decisions_total{" in text
    assert "beluga_gateway_e2e_seconds_bucket{" in text
    assert 'beluga_gateway_prompt_tokens_total{source="pool"}' in text


@pytest.fixture(scope="module")
def secured(redis_url: str, upstream_url: str) -> Iterator[TestClient]:
    register(redis.Redis.from_url(redis_url), "b-live", upstream_url, "m")
    settings = Settings(redis_url=redis_url, redis_key_prefix=PREFIX,
                        api_keys="key-a:alice, key-b:bob")
    with TestClient(create_app(settings)) as tc:
        yield tc


def test_api_keys_are_required_and_checked(secured: TestClient) -> None:
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic key-a"}):
        resp = secured.post("/v1/chat/completions", json=chat("m"), headers=headers)
        assert resp.status_code == 401
        err = resp.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    assert secured.get("/v1/models").status_code == 401
    assert secured.get("/v1/models", headers={"authorization": "Bearer key-b"}).status_code == 200
    assert secured.get("/health").status_code == 200  # operators' endpoints stay open
    assert 'status="401"' in secured.get("/metrics").text


def test_each_tenant_gets_its_own_cache_salt(secured: TestClient) -> None:
    def salt(key: str, **extra: object) -> str:
        resp = secured.post("/v1/chat/completions", json=chat("m", **extra),
                            headers={"authorization": f"Bearer {key}"})
        assert resp.status_code == 200, resp.text
        return str(resp.json()["salt"])

    a, b = salt("key-a"), salt("key-b")
    assert a != b and len(a) == 64 and salt("key-a") == a  # stable per tenant
    # A client's own salt is combined with the tenant's, never replaces it.
    assert salt("key-a", cache_salt="x") not in (a, "x")
    assert salt("key-a", cache_salt="x") != salt("key-b", cache_salt="x")


def test_malformed_api_keys_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="key:tenant"):
        Settings(api_keys="justakey")


def test_health_checks_take_a_worker_out_and_put_it_back(redis_url: str) -> None:
    """A worker whose /health fails is out of routing (no request is needed to find out);
    once it passes again it is back at the next check, not after the 60 s cooldown."""
    app = stand_in()
    for url in serve(app):
        client = redis.Redis.from_url(redis_url)
        register(client, "h-flaky", url, "hm")
        register(client, "h-steady", url.replace("127.0.0.1", "localhost"), "hm")
        settings = Settings(redis_url=redis_url, redis_key_prefix=PREFIX,
                            unhealthy_cooldown_s=60, health_check_interval_s=0.1,
                            health_check_timeout_s=1.0, health_check_failures=2)
        with TestClient(create_app(settings)) as gw:

            def healthy() -> dict[str, bool]:
                return {w["id"]: w["healthy"] for w in gw.get("/health").json()["workers"]
                        if w["id"].startswith("h-")}

            def wait_for(want: dict[str, bool]) -> None:
                deadline = time.monotonic() + 5
                while healthy() != want:
                    assert time.monotonic() < deadline, healthy()
                    time.sleep(0.05)

            wait_for({"h-flaky": True, "h-steady": True})
            app.state.health_status = 503     # both answer from this one stand-in
            wait_for({"h-flaky": False, "h-steady": False})
            resp = gw.post("/v1/chat/completions", json=chat("hm"))
            assert resp.status_code == 503    # nobody to route to: the OpenAI error body
            assert resp.json()["error"]["code"] == "no_healthy_worker"
            metrics = gw.get("/metrics").text
            assert 'beluga_gateway_worker_healthy{worker="h-flaky"} 0.0' in metrics
            app.state.health_status = 200
            wait_for({"h-flaky": True, "h-steady": True})
            resp = gw.post("/v1/chat/completions", json=chat("hm", seed=3))
            assert resp.status_code == 200 and resp.json()["echo"] == 3
            assert 'beluga_gateway_worker_healthy{worker="h-flaky"} 1.0' in gw.get(
                "/metrics").text
        client.delete(worker_key(PREFIX, "h-flaky"), worker_key(PREFIX, "h-steady"))


def test_a_worker_dying_mid_stream_ends_the_stream_with_an_error_event(
        gateway: TestClient) -> None:
    with gateway.stream("POST", "/v1/chat/completions", json=chat("dies", stream=True)) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[:2] == ['{"n": 0}', '{"n": 1}']
    error = json.loads(events[2])["error"]
    assert error["type"] == "upstream_error" and "failed mid-stream" in error["message"]
    assert len(events) == 3   # the error event ends the stream


class DropsReusedConnections:
    """An HTTP/1.1 worker (raw asyncio server, in a thread) that answers the first request
    on each connection and keeps it open, then closes it when the next request arrives,
    unanswered: what a worker timing out an idle kept-alive connection does at the moment
    the gateway reuses it. Health checks are answered with `Connection: close`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dropped = 0
        self.answered = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),),
                                        daemon=True)
        self._stop: asyncio.Event | None = None
        self._thread.start()
        assert self._ready.wait(10)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                length = next((int(v) for k, _, v in (h.partition(":") for h in lines[1:])
                               if k.lower() == "content-length"), 0)
                if lines[0].startswith("GET /health"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                    await writer.drain()
                    return
                await reader.readexactly(length)
                if served:
                    self.dropped += 1
                    return
                body = b'{"object": "chat.completion", "choices": []}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                served += 1
                self.answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    def stop(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def test_a_kept_alive_connection_the_worker_closed_is_retried_on_that_worker() -> None:
    """Workers time idle connections out (vLLM after 5 s); one closed just as the gateway
    reuses it never got the request. The gateway sends it again to the same worker, which
    stays in routing: before, the worker was taken out and the request went elsewhere,
    losing the prefix it was routed for."""
    worker = DropsReusedConnections()
    try:
        for gw in gateway_in_front_of(f"http://127.0.0.1:{worker.port}", "k-1", "km", PREFIX):
            with httpx.Client(base_url=gw, timeout=10) as client:
                for i in range(3):
                    r = client.post("/v1/chat/completions", json=chat("km"))
                    assert r.status_code == 200, (i, r.text)
                    assert r.headers["x-beluga-worker"] == "k-1"
                metrics = client.get("/metrics").text
            assert worker.dropped >= 2 and worker.answered == 3
            assert 'beluga_gateway_worker_healthy{worker="k-1"} 1.0' in metrics
    finally:
        worker.stop()
