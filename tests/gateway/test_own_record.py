"""The gateway's own record of what it routed to a worker counts while the worker has not
answered, however long it queues, and for OWN_GRACE_S after its first token (or the end of
the try): real Redis, a stand-in worker over real HTTP that holds its answer until told, the
real gateway app."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

import gateway.prefixes
from beluga.registry import SCHEMA_VERSION, worker_key
from beluga.settings import Settings
from engine.hints import HintPublisher
from gateway.app import create_app
from kvpool import block_keys
from tests.support import RedisServer, serve

PREFIX = "beluga:test-own-record"
FP = hashlib.sha256(b"model").digest()
MODEL = Path(__file__).resolve().parents[2] / ".beluga" / "models" / "SmolLM2-135M-Instruct"
TOKENS = list(range(1000, 1000 + 16 * 6 + 5))  # 6 full blocks of 16, and 5 tokens more
GRACE_S = 0.5


def held_worker(release: threading.Event, finish: threading.Event, fail: bool) -> FastAPI:
    """Answers a completion once `release` is set: whole, or streamed (its first chunk
    then, the rest once `finish` is set); or fails it then (`fail`: HTTP 500)."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def complete(request: Request) -> Any:
        body = await request.json()
        await asyncio.to_thread(release.wait, 30)
        if fail:
            return JSONResponse({"error": {"message": "engine died"}}, status_code=500)
        choice = {"index": 0, "text": "ok", "finish_reason": None}
        if not body.get("stream"):
            return {"object": "text_completion", "model": body["model"],
                    "choices": [{**choice, "finish_reason": "stop"}]}

        def event(choice: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps({"object": "text_completion",
                                           "model": body["model"],
                                           "choices": [choice]}).encode() + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            yield event(choice)
            await asyncio.to_thread(finish.wait, 30)
            yield event({**choice, "text": "!", "finish_reason": "stop"})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@contextlib.contextmanager
def worker(server: RedisServer, release: threading.Event, finish: threading.Event,
           fail: bool) -> Iterator[None]:
    """A registered stand-in worker publishing hints that hold nothing (as a worker whose
    cache evicted everything would)."""
    served = serve(held_worker(release, finish, fail))
    url = next(served)
    rec = {"schema": SCHEMA_VERSION, "id": "w1", "url": url, "model": "m", "capacity": 4,
           "pid": 1, "started_at": 0.0, "heartbeat_at": time.time(), "running": 0,
           "waiting": 0}
    server.client().set(worker_key(PREFIX, "w1"), json.dumps(rec), ex=60)
    hints = HintPublisher(server.url, PREFIX, "w1", FP, 16, None, ttl_s=30, interval_s=0.1,
                          max_keys=100)
    try:
        yield
    finally:
        release.set()
        finish.set()
        hints.close()
        next(served, None)


@pytest.mark.parametrize(("stream", "fail"), [(True, False), (False, False), (False, True)],
                         ids=["streamed", "whole", "failed"])
def test_a_queued_prompt_stays_held_until_the_worker_answers(
        server: RedisServer, monkeypatch: pytest.MonkeyPatch, stream: bool, fail: bool) -> None:
    """Held while queued, however long; then, once answered, for the grace from the
    answer: from the first streamed token (the rest of the stream still coming), from a
    whole answer; a failed try is not held at all (a grace of a minute, dropped at once)."""
    if not MODEL.is_dir():
        pytest.fail(f"the default model is not prepared at {MODEL}: run `make setup`")
    grace = 60.0 if fail else GRACE_S
    monkeypatch.setattr(gateway.prefixes, "OWN_GRACE_S", grace)
    keys = block_keys(TOKENS, 16, FP)
    release, finish = threading.Event(), threading.Event()
    app = create_app(Settings(redis_url=server.url, redis_key_prefix=PREFIX,
                              served_model_name="m", model=str(MODEL),
                              registry_refresh_s=0.1, routing_policy="prefix_affinity",
                              max_attempts=1))
    with worker(server, release, finish, fail), TestClient(app) as gw:
        prefixes = app.gateway.prefixes
        deadline = time.monotonic() + 60  # (the tokenizer loads beside serving)
        while not (prefixes.keying(["w1"])  # the hints have been read
                   and app.gateway.tokenizer.loaded("m")):
            assert time.monotonic() < deadline, "no hints or no tokenizer"
            time.sleep(0.05)
        statuses: list[int] = []

        def send() -> None:
            payload = {"model": "m", "prompt": TOKENS, "max_tokens": 2, "stream": stream}
            with gw.stream("POST", "/v1/completions", json=payload) as resp:
                statuses.append(resp.status_code)
                for _ in resp.iter_bytes():
                    pass

        client = threading.Thread(target=send)
        client.start()
        deadline = time.monotonic() + 10
        # Routing read the prompt's first key (nobody held it; the rest stays unread unless
        # the prompt comes back): the record holds that block.
        while not prefixes.local_blocks("w1", keys):
            assert time.monotonic() < deadline, "the request was never routed"
            time.sleep(0.02)
        time.sleep(4 * GRACE_S)  # queued four times the grace; hints refreshed meanwhile
        assert prefixes.local_blocks("w1", keys) == 1
        released = time.monotonic()  # the worker answers after this
        release.set()
        while prefixes.local_blocks("w1", keys):  # with the stream still open
            assert time.monotonic() < released + 10, "the record never expired"
            time.sleep(0.02)
        assert fail or time.monotonic() - released >= grace  # the grace: from the answer
        finish.set()
        client.join(30)
        assert statuses == [502 if fail else 200]  # the worker's 500: the gateway's 502
