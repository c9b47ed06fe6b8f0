"""The worker's pool lookup endpoint (engine/pool_lookup_endpoint.py) on a real pool, in front
of a stand-in for vLLM's app, over real HTTP (uvicorn)."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY, generate_latest
from starlette.responses import PlainTextResponse

from beluga.pool_errors import BusyBackoff
from beluga.pool_lookup import LOOKUP_PATH, MAX_KEYS, LookupReply, request_body
from beluga.settings import Settings
from engine.pool_lookup_endpoint import PoolLookupMiddleware
from kvpool import KVPool, block_keys
from tests.support import pool_lock_held, scribble_index, serve

FP = hashlib.sha256(b"model").digest()
KEYS = block_keys(list(range(16 * 8)), 16, FP)  # 8 blocks of 16 tokens


def vllm_stand_in() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


@pytest.fixture(scope="module")
def pool() -> Iterator[KVPool]:
    path = Path(f"/dev/shm/beluga-test-lookup-{os.getpid()}.pool")
    p = KVPool.create(path, slot_size=4096, slot_count=32, fingerprint=FP)
    p.put(KEYS[:5], [b"x" * 100] * 5)
    p.put(KEYS[6:7], [b"y" * 100])  # after a gap: not part of the prefix
    yield p
    p.close()
    path.unlink(missing_ok=True)


def worker_url(pool_path: Path | str) -> Iterator[str]:
    app = PoolLookupMiddleware(vllm_stand_in(), Settings(pool_path=pool_path))
    yield from serve(app)


@pytest.fixture(scope="module")
def url(pool: KVPool) -> Iterator[str]:
    yield from worker_url(pool.path)


def lookup(url: str, body: bytes | str, method: str = "POST") -> httpx.Response:
    return httpx.request(method, url + LOOKUP_PATH, content=body,
                         headers={"content-type": "application/json"}, timeout=10)


def test_counts_the_leading_blocks_the_pool_holds(url: str, pool: KVPool) -> None:
    for n, want in [(8, 5), (5, 5), (3, 3), (0, 0)]:
        resp = lookup(url, request_body(str(pool.uuid), KEYS[:n]))
        assert resp.status_code == 200, resp.text
        reply = LookupReply.model_validate_json(resp.content)
        assert reply.blocks == want and reply.pool_uuid == str(pool.uuid)
    other = block_keys(list(range(16 * 8)), 16, FP, "another tenant")
    assert lookup(url, request_body(str(pool.uuid), other)).json()["blocks"] == 0


def test_every_other_request_reaches_the_app(url: str) -> None:
    assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}


@pytest.mark.parametrize("body, where", [
    (b"{", "body"),
    (b"[]", "body"),
    (json.dumps({"version": 2, "pool_uuid": str(uuid.uuid4()), "keys": []}), "version"),
    (json.dumps({"version": 1, "pool_uuid": "not-a-uuid", "keys": []}), "pool_uuid"),
    (json.dumps({"version": 1, "pool_uuid": str(uuid.uuid4()), "keys": ["zz" * 32]}),
     "keys.0"),
    (json.dumps({"version": 1, "pool_uuid": str(uuid.uuid4()), "keys": ["ab"]}), "keys.0"),
    (json.dumps({"version": 1, "pool_uuid": str(uuid.uuid4())}), "keys"),
    (json.dumps({"version": 1, "pool_uuid": str(uuid.uuid4()), "keys": [], "x": 1}), "x"),
])
def test_malformed_lookups_are_400_in_the_openai_shape(url: str, body: bytes | str,
                                                       where: str) -> None:
    resp = lookup(url, body)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_lookup"
    assert f": {where}:" in err["message"] or where == "body"


def test_limits_and_methods(url: str, pool: KVPool) -> None:
    too_many = request_body(str(pool.uuid), KEYS[:1] * (MAX_KEYS + 1))
    resp = lookup(url, too_many)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "too_large"
    assert lookup(url, b"x" * (2 * len(too_many))).status_code == 413
    assert lookup(url, request_body(str(pool.uuid), KEYS[:1] * MAX_KEYS)).status_code == 200
    resp = lookup(url, b"", method="GET")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


def test_another_pools_uuid_is_404(url: str) -> None:
    other = str(uuid.uuid4())
    resp = lookup(url, request_body(other, KEYS[:2]))
    assert resp.status_code == 404
    assert other in resp.json()["error"]["message"]


def test_a_pool_that_cannot_be_attached_is_503(tmp_path: Path) -> None:
    for url in worker_url(tmp_path / "missing.pool"):
        resp = lookup(url, request_body(str(uuid.uuid4()), KEYS[:2]))
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "pool_unavailable"


# --- the worker credential -----------------------------------------------------------------

KEY = "worker-credential-0123456789abcdef"


def guarded_app(pool_path: Path | str, **settings: Any) -> FastAPI | PoolLookupMiddleware:
    app = vllm_stand_in()

    @app.post("/tokenize")
    async def tokenize() -> dict[str, int]:  # a vLLM route outside /v1
        return {"count": 1}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse("vllm:num_requests_running 0.0\n")

    return PoolLookupMiddleware(app, Settings(pool_path=pool_path, **settings))


@pytest.fixture(scope="module")
def guarded_url(pool: KVPool) -> Iterator[str]:
    yield from serve(guarded_app(pool.path, worker_api_key=KEY))


def looked_up(url: str, pool: KVPool, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(url + LOOKUP_PATH, content=request_body(str(pool.uuid), KEYS[:8]),
                      headers={"content-type": "application/json", **headers}, timeout=10)


@pytest.mark.parametrize("headers", [
    {},
    {"authorization": f"Bearer {KEY}x"},
    {"authorization": f"Bearer {KEY[:-1]}"},
    {"authorization": "Bearer"},
    {"authorization": f"Basic {KEY}"},
    {"authorization": KEY},
    {"x-api-key": KEY},
])
def test_with_a_credential_a_lookup_without_it_is_401(guarded_url: str, pool: KVPool,
                                                      headers: dict[str, str]) -> None:
    resp = looked_up(guarded_url, pool, headers)
    assert resp.status_code == 401
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error"
    assert KEY not in resp.text
    assert resp.headers["www-authenticate"] == "Bearer"


def test_with_a_credential_the_right_key_is_answered(guarded_url: str, pool: KVPool) -> None:
    for value in (f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY}"):  # RFC 7235: 1*SP
        resp = looked_up(guarded_url, pool, {"authorization": value})
        assert resp.status_code == 200, resp.text
        assert resp.json()["blocks"] == 5


def test_with_a_credential_health_and_metrics_stay_open_and_the_rest_is_guarded(
        guarded_url: str) -> None:
    assert httpx.get(guarded_url + "/health", timeout=10).json() == {"status": "ok"}
    assert "vllm:num_requests_running" in httpx.get(guarded_url + "/metrics", timeout=10).text
    # vLLM's own VLLM_API_KEY check covers /v1 only: /tokenize, /invocations ... are ours.
    for path in ("/tokenize", "/health/", "/invocations", "/v1/models"):
        resp = httpx.post(guarded_url + path, json={}, timeout=10)
        assert resp.status_code == 401, path
    ok = httpx.post(guarded_url + "/tokenize", json={}, timeout=10,
                    headers={"authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json() == {"count": 1}


def test_without_a_pool_a_credential_still_guards_and_the_lookup_is_vllms(
        tmp_path: Path) -> None:
    for url in serve(guarded_app(tmp_path / "none.pool", pool=False, worker_api_key=KEY)):
        body = request_body(str(uuid.uuid4()), KEYS[:2])
        assert httpx.post(url + LOOKUP_PATH, content=body, timeout=10).status_code == 401
        resp = httpx.post(url + LOOKUP_PATH, content=body, timeout=10,
                          headers={"authorization": f"Bearer {KEY}"})
        assert resp.status_code == 404  # not served here: vLLM's (the stand-in's) answer
        assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_without_a_credential_nothing_changes(url: str, pool: KVPool) -> None:
    assert lookup(url, request_body(str(pool.uuid), KEYS[:8])).json()["blocks"] == 5
    resp = looked_up(url, pool, {"authorization": "Bearer anything"})
    assert resp.status_code == 200 and resp.json()["blocks"] == 5


# --- a pool in trouble: a clear 503, never a 500, never a stalled event loop ---------------

@pytest.fixture
def own_pool(tmp_path: Path) -> Iterator[KVPool]:
    path = Path(f"/dev/shm/beluga-test-lookup-trouble-{os.getpid()}.pool")
    p = KVPool.create(path, slot_size=4096, slot_count=32, fingerprint=FP)
    p.put(KEYS[:5], [b"x" * 100] * 5)
    yield p
    p.close()
    path.unlink(missing_ok=True)


def test_a_busy_pool_is_a_quick_503_and_the_loop_serves_on(own_pool: KVPool) -> None:
    app = PoolLookupMiddleware(vllm_stand_in(), Settings(pool_path=own_pool.path,
                                                         pool_lock_timeout_s=1.0))
    app.backoff = BusyBackoff(0.5)
    body = request_body(str(own_pool.uuid), KEYS[:8])
    for url in serve(app):
        assert lookup(url, body).json()["blocks"] == 5  # attached
        with pool_lock_held(own_pool.path), ThreadPoolExecutor(1) as ex:
            pending = ex.submit(lookup, url, body)  # waits up to 1 s for the lock...
            time.sleep(0.2)
            assert not pending.done()
            t0 = time.monotonic()  # ...off the event loop: other requests are answered
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            assert time.monotonic() - t0 < 0.5
            resp = pending.result(timeout=10)
            assert resp.status_code == 503, resp.text
            err = resp.json()["error"]
            assert err["code"] == "pool_busy" and "busy" in err["message"]
            # Backing off: answered at once, without waiting for the lock again.
            t0 = time.monotonic()
            assert lookup(url, body).json()["error"]["code"] == "pool_busy"
            assert time.monotonic() - t0 < 0.3
            assert lookup(url, body).json()["error"]["code"] == "pool_busy"
        assert app.errors.counts == {"busy": 3}
        time.sleep(0.5)  # the backoff ends on time (lookups during it do not extend it)
        assert lookup(url, body).json()["blocks"] == 5  # the holder is gone


def test_a_busy_pool_with_the_default_lock_timeout(own_pool: KVPool) -> None:
    app = PoolLookupMiddleware(vllm_stand_in(), Settings(pool_path=own_pool.path))
    assert app.lock_timeout_s == 0.05
    body = request_body(str(own_pool.uuid), KEYS[:8])
    for url in serve(app):
        assert lookup(url, body).json()["blocks"] == 5
        with pool_lock_held(own_pool.path):
            t0 = time.monotonic()
            resp = lookup(url, body)
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "pool_busy"
            assert time.monotonic() - t0 < 0.5


def test_a_corrupt_pool_is_a_503_once_then_heals(own_pool: KVPool) -> None:
    app = PoolLookupMiddleware(vllm_stand_in(), Settings(pool_path=own_pool.path))
    body = request_body(str(own_pool.uuid), KEYS[:8])
    for url in serve(app):
        assert lookup(url, body).json()["blocks"] == 5
        scribble_index(own_pool.path)
        resp = lookup(url, body)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "pool_corrupt"
        assert lookup(url, body).json()["blocks"] == 5  # the next call rebuilt the index
        assert app.errors.counts == {"corrupt": 1}
    text = generate_latest(REGISTRY).decode()
    assert 'beluga_worker_pool_lookup_errors_total{kind="corrupt"}' in text
