"""A gateway on a host where the pool is not mapped asks a worker how much of a prompt the
pool holds (beluga/pool_lookup.py): real Redis, a real pool, stand-in workers over real HTTP
with the worker's lookup endpoint (or without it: an older worker), the real gateway app."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from beluga.registry import SCHEMA_VERSION, worker_key
from beluga.settings import Settings
from engine.hints import HintPublisher
from engine.pool_lookup_endpoint import PoolLookupMiddleware
from gateway.app import create_app
from kvpool import KVPool, block_keys
from tests.support import RedisServer, pool_lock_held, serve

PREFIX = "beluga:test-lookup"
FP = hashlib.sha256(b"model").digest()
MODEL = Path(__file__).resolve().parents[2] / ".beluga" / "models" / "SmolLM2-135M-Instruct"
TOKENS = list(range(1000, 1000 + 16 * 6 + 5))  # 6 full blocks of 16, and 5 tokens more


def worker_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def complete(request: Request) -> dict[str, object]:
        body = await request.json()
        return {"object": "text_completion", "model": body["model"],
                "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 1,
                          "total_tokens": len(body["prompt"]) + 1}}

    return app


@pytest.fixture
def pool() -> Iterator[KVPool]:
    # Not where a gateway looks (/dev/shm/*.pool and the like): "another host's" pool.
    path = Path(f"/dev/shm/beluga-test-lookup-{os.getpid()}.elsewhere")
    p = KVPool.create(path, slot_size=4096, slot_count=32, fingerprint=FP)
    yield p
    p.close()
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def worker(server: RedisServer, wid: str, pool: KVPool, endpoint: bool) -> Iterator[None]:
    """A registered stand-in worker that shares `pool` (by its hints), with or without the
    lookup endpoint. Its hints name a path that does not exist on the gateway's host."""
    app = worker_app()
    served = serve(PoolLookupMiddleware(app, Settings(pool_path=pool.path))
                   if endpoint else app)
    url = next(served)
    rec = {"schema": SCHEMA_VERSION, "id": wid, "url": url, "model": "m", "capacity": 4,
           "pid": 1, "started_at": 0.0, "heartbeat_at": time.time(), "running": 0,
           "waiting": 0}
    server.client().set(worker_key(PREFIX, wid), json.dumps(rec), ex=60)
    hints = HintPublisher(server.url, PREFIX, wid, FP, 16, str(pool.uuid), ttl_s=30,
                          interval_s=0.1, max_keys=100, pool_path="/nowhere/on/this/host")
    try:
        yield
    finally:
        hints.close()
        next(served, None)


def gateway(server: RedisServer) -> TestClient:
    if not MODEL.is_dir():
        pytest.fail(f"the default model is not prepared at {MODEL}: run `make setup`")
    return TestClient(create_app(Settings(
        redis_url=server.url, redis_key_prefix=PREFIX, served_model_name="m",
        model=str(MODEL), registry_refresh_s=0.1, pool_lookup_timeout_s=2.0)))


def routed(gw: TestClient, want: str) -> dict[str, str]:
    """Send the prompt until the route is `want` (the gateway reads the registry, then the
    hints, then fails to attach the pool, on its background refresh)."""
    deadline = time.monotonic() + 10
    while True:
        resp = gw.post("/v1/completions", json={"model": "m", "prompt": TOKENS,
                                                "max_tokens": 1})
        assert resp.status_code == 200, resp.text
        if resp.headers["x-beluga-route"] == want or time.monotonic() > deadline:
            return dict(resp.headers)
        time.sleep(0.1)


def metric(gw: TestClient, name: str) -> float:
    for line in gw.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_the_pool_is_asked_of_a_worker_when_it_is_not_mapped_here(
        server: RedisServer, pool: KVPool) -> None:
    keys = block_keys(TOKENS, 16, FP)
    pool.put(keys[:4], [b"x" * 100] * 4)
    with worker(server, "w1", pool, endpoint=True), gateway(server) as gw:
        headers = routed(gw, "pool")
        assert headers["x-beluga-route"] == "pool"
        ok = metric(gw, 'beluga_gateway_pool_lookups_total{result="ok"}')
        pooled = metric(gw, 'beluga_gateway_prompt_tokens_total{source="pool"}')
        assert ok >= 1 and pooled >= 4 * 16
        # Another prompt, all 6 of its blocks in the pool: the whole prompt is keyed and
        # asked (nothing is local to stop at).
        other = [t + 5000 for t in TOKENS]
        pool.put(block_keys(other, 16, FP)[:6], [b"x" * 100] * 6)
        resp = gw.post("/v1/completions", json={"model": "m", "prompt": other,
                                                "max_tokens": 1})
        assert resp.headers["x-beluga-route"] == "pool"
        assert metric(gw, 'beluga_gateway_prompt_tokens_total{source="pool"}') \
            == pooled + 6 * 16
        # Lookups are lazy: a new prompt is asked about once (its first key), one the pool
        # holds twice (the keys read so far, then the rest of the prompt).
        asked = metric(gw, 'beluga_gateway_pool_lookups_total{result="ok"}')
        new = [t + 9000 for t in TOKENS]
        resp = gw.post("/v1/completions", json={"model": "m", "prompt": new, "max_tokens": 1})
        assert resp.headers["x-beluga-route"] == "cold"
        assert metric(gw, 'beluga_gateway_pool_lookups_total{result="ok"}') == asked + 1
        third = [t + 13000 for t in TOKENS]
        pool.put(block_keys(third, 16, FP)[:4], [b"x" * 100] * 4)
        resp = gw.post("/v1/completions", json={"model": "m", "prompt": third,
                                                "max_tokens": 1})
        assert resp.headers["x-beluga-route"] == "pool"
        assert metric(gw, 'beluga_gateway_pool_lookups_total{result="ok"}') == asked + 3


def test_a_worker_without_the_endpoint_costs_routing_nothing_but_the_pool(
        server: RedisServer, pool: KVPool) -> None:
    pool.put(block_keys(TOKENS, 16, FP)[:4], [b"x" * 100] * 4)
    with worker(server, "old", pool, endpoint=False), gateway(server) as gw:
        deadline = time.monotonic() + 10
        while metric(gw, 'beluga_gateway_pool_lookups_total{result="error"}') < 1:
            assert time.monotonic() < deadline, "the gateway never asked the worker"
            resp = gw.post("/v1/completions", json={"model": "m", "prompt": TOKENS,
                                                    "max_tokens": 1})
            assert resp.status_code == 200 and resp.headers["x-beluga-route"] == "cold"
            time.sleep(0.1)
        for _ in range(5):  # not asked again for a while: no error per request
            resp = gw.post("/v1/completions", json={"model": "m", "prompt": TOKENS,
                                                    "max_tokens": 1})
            assert resp.status_code == 200
        assert metric(gw, 'beluga_gateway_pool_lookups_total{result="error"}') == 1
        assert metric(gw, 'beluga_gateway_pool_lookups_total{result="ok"}') == 0


def test_a_workers_busy_pool_is_counted_as_busy_and_routed_on(server: RedisServer,
                                                              pool: KVPool) -> None:
    pool.put(block_keys(TOKENS, 16, FP)[:4], [b"x" * 100] * 4)
    with worker(server, "w1", pool, endpoint=True), gateway(server) as gw:
        routed(gw, "pool")
        with pool_lock_held(pool.path):
            t0 = time.monotonic()
            resp = gw.post("/v1/completions", json={"model": "m", "prompt": TOKENS,
                                                    "max_tokens": 1})
            assert resp.status_code == 200 and resp.headers["x-beluga-route"] != "pool"
            assert time.monotonic() - t0 < 1.0
            assert metric(gw, 'beluga_gateway_pool_lookups_total{result="busy"}') == 1


def test_a_busy_pool_mapped_here_costs_a_request_no_stall_and_no_error(
        server: RedisServer) -> None:
    """The pool is mapped on the gateway's host (found among /dev/shm/*.pool) and a frozen
    process holds its lock: requests are answered (200) at once, routed as if the pool held
    nothing, /metrics answers at once, and the lookup is counted as busy."""
    path = Path(f"/dev/shm/beluga-test-lookup-here-{os.getpid()}.pool")
    here = KVPool.create(path, slot_size=4096, slot_count=32, fingerprint=FP)
    try:
        here.put(block_keys(TOKENS, 16, FP)[:4], [b"x" * 100] * 4)
        with worker(server, "w1", here, endpoint=False), gateway(server) as gw:
            routed(gw, "pool")
            assert metric(gw, 'beluga_gateway_pool_lookups_total{result="ok"}') >= 1
            with pool_lock_held(path):
                for _ in range(3):
                    t0 = time.monotonic()
                    resp = gw.post("/v1/completions", json={"model": "m", "prompt": TOKENS,
                                                            "max_tokens": 1})
                    assert resp.status_code == 200, resp.text
                    assert resp.headers["x-beluga-route"] != "pool"
                    assert time.monotonic() - t0 < 0.5
                    t0 = time.monotonic()
                    assert gw.get("/metrics").status_code == 200
                    assert time.monotonic() - t0 < 0.5
                # Once, then lookups pause (BUSY_BACKOFF_S): not one lock timeout a request.
                assert metric(gw, 'beluga_gateway_pool_lookups_total{result="busy"}') == 1
                assert metric(gw, "beluga_pool_slots") == 32  # the last snapshot
    finally:
        here.close()
        path.unlink(missing_ok=True)
