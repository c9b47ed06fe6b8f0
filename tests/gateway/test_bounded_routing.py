"""Routing's CPU work on client input is bounded and off the event loop: the real gateway
app with the default model's tokenizer, a real Redis with a worker's hint record (so
prompts are keyed), and a real stand-in worker. A prompt past a bound is still served,
routed without (or with partial) prefix information, and counted."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from beluga.registry import SCHEMA_VERSION, worker_key
from beluga.settings import Settings
from engine.hints import HintPublisher
from gateway.app import create_app
from tests.support import RedisServer, serve

PREFIX = "beluga:test-bounded"
MODEL = Path(__file__).resolve().parents[2] / ".beluga" / "models" / "SmolLM2-135M-Instruct"
FP = hashlib.sha256(b"bounded").digest()
LOOPS = ("{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}"
         "{% endfor %}")


def worker_app(seen: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def answer(request: Request) -> dict[str, Any]:
        seen.append(await request.json())
        return {"object": "chat.completion", "choices": []}

    return app


@pytest.fixture(scope="module")
def seen() -> list[dict[str, Any]]:
    return []


def gateway(seen: list[dict[str, Any]], **settings: Any) -> Iterator[str]:
    if not MODEL.is_dir():
        pytest.fail(f"the default model is not prepared at {MODEL}: run `make setup`")
    server = RedisServer().start()
    hints = HintPublisher(server.url, PREFIX, "w1", FP, 16, None, ttl_s=60,
                          interval_s=0.1, max_keys=100)
    try:
        for worker_url in serve(worker_app(seen)):
            rec = {"schema": SCHEMA_VERSION, "id": "w1", "url": worker_url, "model": "m",
                   "capacity": 4, "pid": 1, "started_at": 0.0,
                   "heartbeat_at": time.time() + 600, "running": 0, "waiting": 0}
            server.client().set(worker_key(PREFIX, "w1"), json.dumps(rec), ex=600)
            yield from serve(create_app(Settings(
                redis_url=server.url, redis_key_prefix=PREFIX, served_model_name="m",
                model=str(MODEL), registry_refresh_s=0.1, **settings)))
    finally:
        hints.close()
        server.stop()


def counter(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_keyed(url: str) -> None:
    """Until the gateway has read the worker's hint record (prompts are keyed)."""
    deadline = time.monotonic() + 10
    while counter(url, 'beluga_gateway_prompt_tokens_total') == 0:
        assert time.monotonic() < deadline, "prompts are never keyed"
        httpx.post(f"{url}/v1/chat/completions", json=chat("warm up " * 20), timeout=10)
        time.sleep(0.1)


def chat(text: str, **over: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **over}


class HealthProbe:
    """GETs /health every 20 ms on its own thread. `check()`: 95% of the answers within
    100 ms and none past 1 s (a stalled event loop shows as one answer as slow as the
    stall; the 5% allow for a 2-core machine's other processes)."""

    def __init__(self, url: str) -> None:
        self.url, self.latencies, self.stop = url, [0.0], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stop.is_set():
                t0 = time.monotonic()
                assert client.get(f"{self.url}/health").status_code == 200
                self.latencies.append(time.monotonic() - t0)
                time.sleep(0.02)

    def check(self) -> None:
        ordered = sorted(self.latencies)
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        assert p95 < 0.1 and ordered[-1] < 1.0, (p95, ordered[-5:])

    def __enter__(self) -> HealthProbe:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def test_a_request_template_is_not_rendered_unless_trusted(seen: list[dict[str, Any]]) -> None:
    for url in gateway(seen):
        wait_keyed(url)
        for body in (chat("hi", chat_template_kwargs={"chat_template": LOOPS}),
                     chat("hi", chat_template=LOOPS)):
            started = time.monotonic()
            resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
            assert resp.status_code == 200 and time.monotonic() - started < 1
            assert seen[-1]["chat_template_kwargs" if "chat_template_kwargs" in body
                           else "chat_template"]  # forwarded: vLLM decides
        assert counter(url, 'beluga_gateway_prompts_unkeyed_total{reason="request_template"}'
                       ) == 2


def test_a_runaway_template_is_stopped_at_the_deadline_and_the_request_served(
        seen: list[dict[str, Any]]) -> None:
    for url in gateway(seen, trust_request_chat_template=True, routing_timeout_s=0.3):
        wait_keyed(url)
        with HealthProbe(url) as probe:
            started = time.monotonic()
            resp = httpx.post(f"{url}/v1/chat/completions",
                              json=chat("hi", chat_template=LOOPS), timeout=10)
            assert resp.status_code == 200 and time.monotonic() - started < 2
        probe.check()
        assert counter(url, 'beluga_gateway_prompts_unkeyed_total{reason="timeout"}') == 1
        # the routing thread is free again: the next prompt is keyed as usual
        before = counter(url, 'beluga_gateway_prompt_tokens_total')
        assert httpx.post(f"{url}/v1/chat/completions", json=chat("a new prompt " * 30),
                          timeout=10).status_code == 200
        assert counter(url, 'beluga_gateway_prompt_tokens_total') > before


def test_a_huge_prompt_is_keyed_on_its_start_only_without_stalling_anyone(
        seen: list[dict[str, Any]]) -> None:
    for url in gateway(seen, max_request_bytes=16 * 1024 * 1024):
        wait_keyed(url)
        prompt = "word " * (7 * 1024 * 1024 // 5)  # 7 MiB
        with HealthProbe(url) as probe:
            for endpoint, body in (("completions", {"model": "m", "prompt": prompt}),
                                   ("chat/completions", chat(prompt))):
                started = time.monotonic()
                resp = httpx.post(f"{url}/v1/{endpoint}", json=body, timeout=30)
                assert resp.status_code == 200
                assert time.monotonic() - started < 5
        probe.check()
        assert counter(url, "beluga_gateway_prompts_truncated_total") == 2
        assert json.dumps(seen[-1]).count("word") >= 7 * 1024 * 1024 // 5  # forwarded whole


def test_token_ids_past_the_vocabulary_are_400(seen: list[dict[str, Any]]) -> None:
    for url in gateway(seen):
        wait_keyed(url)  # (the vocabulary is known once the tokenizer is loaded)
        for prompt in ([1, 49152], [-1], [2**32], [[1], [10**12]]):
            resp = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": prompt},
                              timeout=10)
            assert resp.status_code == 400, (prompt, resp.text)
            assert resp.json()["error"]["param"] == "prompt"
        assert httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": [1, 49151]},
                          timeout=10).status_code == 200

