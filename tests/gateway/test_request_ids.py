"""Request ids and trace context through a real gateway (uvicorn, real Redis registry) to a
stand-in worker that records what it receives; the access line each request leaves; and
what a client's worst header values do (a new id, the trace context dropped, never an
error)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from beluga.registry import SCHEMA_VERSION, worker_key
from beluga.settings import Settings
from gateway.front import MAX_TRACESTATE, request_context
from tests.gateway.test_front import run_gateway
from tests.support import RedisServer, serve

PREFIX = "beluga:test-ids"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
HEX32 = re.compile(r"[0-9a-f]{32}")


class Recorder:
    """A worker that keeps the headers of every completion request it is sent."""

    def __init__(self) -> None:
        self.app = FastAPI()
        self.seen: list[dict[str, str]] = []
        self.lock = threading.Lock()

        @self.app.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        @self.app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            with self.lock:
                self.seen.append(dict(request.headers))
            if body.get("stream"):
                slow = body["messages"][-1]["content"] == "slow"

                async def events() -> Any:
                    chunk = {"object": "chat.completion.chunk", "choices": [
                        {"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                    if slow:  # the rest comes later: a client may leave meanwhile
                        await asyncio.sleep(3)
                    yield b"data: [DONE]\n\n"
                return StreamingResponse(events(), media_type="text/event-stream")
            return JSONResponse({"object": "chat.completion", "model": body["model"],
                                 "choices": []})


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[str, Recorder]]:
    redis_server = RedisServer().start()
    worker = Recorder()
    for url in serve(worker.app):
        rec = {"schema": SCHEMA_VERSION, "id": "w-rec", "url": url, "model": "m",
               "capacity": 64, "pid": 1, "started_at": 0.0,
               "heartbeat_at": time.time() + 3600, "running": 0, "waiting": 0}
        redis_server.client().set(worker_key(PREFIX, "w-rec"), json.dumps(rec), ex=3600)
        settings = Settings(redis_url=redis_server.url, redis_key_prefix=PREFIX,
                            routing_policy="least_loaded", health_check_interval_s=0.2)
        for gw in run_gateway(settings):
            deadline = time.monotonic() + 10
            while httpx.get(f"{gw.url}/health").status_code != 200:
                assert time.monotonic() < deadline, "the stand-in never became healthy"
                time.sleep(0.05)
            yield gw.url, worker
    redis_server.stop()


def chat(url: str, headers: dict[str, str | bytes] | None = None, model: str = "m",
         stream: bool = False) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers=headers or {}, timeout=10,
                      json={"model": model, "stream": stream,
                            "messages": [{"role": "user", "content": "hi"}]})


def last_seen(worker: Recorder) -> dict[str, str]:
    with worker.lock:
        return worker.seen[-1]


def test_a_clients_request_id_and_trace_context_reach_the_worker_and_come_back(
        stack: tuple[str, Recorder]) -> None:
    url, worker = stack
    r = chat(url, {"X-Request-Id": "req_7f3a-01", "traceparent": TRACEPARENT,
                   "tracestate": "vendor=abc,other=1"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "req_7f3a-01"
    seen = last_seen(worker)
    assert seen["x-request-id"] == "req_7f3a-01"
    assert seen["traceparent"] == TRACEPARENT
    assert seen["tracestate"] == "vendor=abc,other=1"
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=10,
                      headers={"X-Request-Id": "stream-1"},
                      json={"model": "m", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as s:
        assert s.headers["x-request-id"] == "stream-1"
        assert b"[DONE]" in b"".join(s.iter_bytes())
    assert last_seen(worker)["x-request-id"] == "stream-1"


def test_a_request_without_an_id_gets_one_the_worker_sees_too(
        stack: tuple[str, Recorder]) -> None:
    url, worker = stack
    r = chat(url)
    rid = r.headers["x-request-id"]
    assert HEX32.fullmatch(rid)
    seen = last_seen(worker)
    assert seen["x-request-id"] == rid
    assert "traceparent" not in seen and "tracestate" not in seen
    assert chat(url).headers["x-request-id"] != rid  # one per request


@pytest.mark.parametrize("bad", [
    "a" * 129, "has space", "new\tline", "quote\"d", "semi;colon", "ünïcode", "<script>",
    "{json}", "%0d%0a",
])
def test_a_malformed_request_id_is_replaced_not_refused_and_never_reaches_the_worker(
        stack: tuple[str, Recorder], bad: str) -> None:
    url, worker = stack
    r = chat(url, {"X-Request-Id": bad.encode("utf-8")})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert HEX32.fullmatch(rid)
    assert last_seen(worker)["x-request-id"] == rid


@pytest.mark.parametrize("parent", [
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",   # trace id all zeros
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",   # parent id all zeros
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",   # version ff is invalid
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",   # upper case
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",  # v00 has four fields
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",    # short trace id
    "garbage", "",
])
def test_an_invalid_traceparent_is_dropped_with_its_tracestate(
        stack: tuple[str, Recorder], parent: str) -> None:
    url, worker = stack
    r = chat(url, {"traceparent": parent, "tracestate": "vendor=abc"})
    assert r.status_code == 200
    seen = last_seen(worker)
    assert "traceparent" not in seen and "tracestate" not in seen


def test_trace_context_edge_cases() -> None:
    later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-" + "x" * 60_000
    ctx = request_context(None, later.encode(), b"a=1", "/v1/chat/completions")
    # a later version: passed on as what it is read as, version 00 without the extra fields
    assert ctx.traceparent == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert ctx.tracestate == "a=1"
    long = b"a=" + b"x" * MAX_TRACESTATE
    ctx = request_context(b"id", TRACEPARENT.encode(), long, "/")
    assert ctx.traceparent == TRACEPARENT and ctx.tracestate is None
    ctx = request_context(b"id", TRACEPARENT.encode(), b"a=\x01", "/")
    assert ctx.tracestate is None
    ctx = request_context(b"id", None, b"a=1", "/")
    assert ctx.traceparent is None and ctx.tracestate is None  # no state without a parent
    assert request_context(b"", None, None, "/").request_id != ""


def test_errors_and_other_routes_carry_the_request_id(stack: tuple[str, Recorder]) -> None:
    url, _ = stack
    r = chat(url, {"X-Request-Id": "err-1"}, model="no-such-model")
    assert r.status_code == 404 and r.headers["x-request-id"] == "err-1"
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json",
                   headers={"X-Request-Id": "err-2"}, timeout=10)
    assert r.status_code == 400 and r.headers["x-request-id"] == "err-2"
    r = httpx.get(f"{url}/v1/models", headers={"X-Request-Id": "models-1"}, timeout=10)
    assert r.status_code == 200 and r.headers["x-request-id"] == "models-1"


def test_each_request_leaves_one_access_line(stack: tuple[str, Recorder],
                                             caplog: pytest.LogCaptureFixture) -> None:
    url, _ = stack
    with caplog.at_level(logging.INFO, logger="beluga.access"):
        chat(url, {"X-Request-Id": "acc-1"})
        chat(url, {"X-Request-Id": "acc-2"}, stream=True)
        chat(url, {"X-Request-Id": "acc-3"}, model="nope")
        deadline = time.monotonic() + 5
        while len([r for r in caplog.records if r.name == "beluga.access"]) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    lines = {r.request_id: r for r in caplog.records  # type: ignore[attr-defined]
             if r.name == "beluga.access"}
    ok, streamed, missing = lines["acc-1"], lines["acc-2"], lines["acc-3"]
    assert (ok.status, ok.worker, ok.model, ok.route) == (  # type: ignore[attr-defined]
        200, "w-rec", "m", "/v1/chat/completions")
    assert ok.ttft_s is None and ok.duration_s > 0  # type: ignore[attr-defined]
    assert streamed.status == 200 and streamed.ttft_s > 0  # type: ignore[attr-defined]
    assert missing.status == 404  # type: ignore[attr-defined]
    assert missing.error == "model_not_found"  # type: ignore[attr-defined]
    assert "acc-1" not in ok.getMessage()  # the id is a field, not in the message


def test_a_client_cannot_forge_access_lines(stack: tuple[str, Recorder],
                                           caplog: pytest.LogCaptureFixture) -> None:
    url, _ = stack
    forged = "2026-11-30 13:00:00,000 INFO beluga.access: POST /v1/chat/completions 200"
    with caplog.at_level(logging.INFO, logger="beluga.access"):
        httpx.get(f"{url}/nope%0A{forged.replace(' ', '%20')}", timeout=10,
                  headers={"X-Request-Id": "forge-1"})
        chat(url, {"X-Request-Id": "forge-2"}, model="m worker=w-evil\nINFO forged")
        deadline = time.monotonic() + 5
        while len([r for r in caplog.records if r.name == "beluga.access"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "beluga.access"]
    assert all("\n" not in line for line in lines), lines
    assert not any(" worker=w-evil" in line for line in lines), lines


def test_a_client_leaving_a_stream_is_logged_as_499(stack: tuple[str, Recorder],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    url, worker = stack
    with caplog.at_level(logging.INFO, logger="beluga.access"):
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=10,
                          headers={"X-Request-Id": "leaves-1"},
                          json={"model": "m", "stream": True,
                                "messages": [{"role": "user", "content": "slow"}]}) as s:
            next(s.iter_raw())  # the first event, then the client goes away
        deadline = time.monotonic() + 5
        while not [r for r in caplog.records
                   if r.name == "beluga.access" and getattr(r, "request_id", "") == "leaves-1"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    (line,) = [r for r in caplog.records if getattr(r, "request_id", "") == "leaves-1"]
    assert line.status == 499 and line.error == "client_gone"  # type: ignore[attr-defined]
