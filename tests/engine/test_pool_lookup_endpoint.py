"""The worker's pool lookup endpoint (engine/pool_lookup_endpoint.py) on a real pool, in front
of a stand-in for vLLM's app, over real HTTP (uvicorn)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from beluga.pool_lookup import LOOKUP_PATH, MAX_KEYS, LookupReply, request_body
from beluga.settings import Settings
from engine.pool_lookup_endpoint import PoolLookupMiddleware
from kvpool import KVPool, block_keys
from tests.support import serve

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
