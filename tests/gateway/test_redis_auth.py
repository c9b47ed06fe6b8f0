"""Redis with a password (`--requirepass`) and with TLS (`rediss://`, the CA passed as the
URL's `ssl_ca_certs` query parameter), against a real redis-server: the gateway's registry
and hints reader, the workers' hint publisher and `beluga up`'s liveness probe all reach
it; wrong credentials or a CA that does not match leave the gateway up and serving, saying
once that Redis is unreachable, with no traceback and no password in any log line."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from beluga.registry import SCHEMA_VERSION, hint_blocks_key, hint_key, hints_key, worker_key
from beluga.settings import Settings
from beluga_cli.up import redis_alive
from engine.hints import HintPublisher
from gateway.prefixes import PrefixIndex
from gateway.workers import WorkerRegistry
from tests.conftest import REDIS_PASSWORD, ConfiguredRedis

PREFIX = "beluga:auth"
FP = hashlib.sha256(b"model").digest()
POOL_UUID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0fabcdef01"
WRONG = "not-the-password"


def eventually(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def settings(url: str, **over: Any) -> Settings:
    values: dict[str, Any] = {"redis_url": url, "redis_key_prefix": PREFIX,
                              "registry_refresh_s": 60, "health_check_interval_s": 0,
                              "routing_policy": "round_robin", **over}
    return Settings(**values)


def register(server: ConfiguredRedis, wid: str) -> None:
    now = time.time()
    server.client().set(worker_key(PREFIX, wid), json.dumps({
        "schema": SCHEMA_VERSION, "id": wid, "url": "http://127.0.0.1:9", "model": "m",
        "capacity": 4, "pid": 1, "started_at": now, "heartbeat_at": now}))


def check_everything_reaches(server: ConfiguredRedis) -> None:
    """Registry (gateway), hint publisher (worker), hints reader (gateway), liveness probe
    (`beluga up`): all through `server.url` alone."""
    assert redis_alive(server.url)
    register(server, "w1")
    keys = [hashlib.sha256(b"%d" % i).digest() for i in range(3)]
    pub = HintPublisher(server.url, PREFIX, "w1", FP, 16, POOL_UUID, ttl_s=10,
                        interval_s=0.05, max_keys=100)
    try:
        pub.offer(keys)
        client = server.client()
        eventually(lambda: client.scard(hint_blocks_key(PREFIX, "w1")) == 3
                   and bool(client.exists(hints_key(PREFIX, "w1"))))
        pool = WorkerRegistry.from_settings(settings(server.url))

        async def go() -> None:
            index = PrefixIndex(pool.client, PREFIX)
            try:
                await pool.refresh()
                assert pool.redis_ok and [w.id for w in pool.snapshot()] == ["w1"]
                assert await index.refresh(w.id for w in pool.snapshot())
                assert index._hints["w1"].keys == {hint_key(k) for k in keys}
            finally:
                index.close()
                await pool.close()

        asyncio.run(go())
    finally:
        pub.close()


def check_refused_quietly(url: str, caplog: pytest.LogCaptureFixture,
                          secrets: tuple[str, ...]) -> None:
    """A gateway pointed at `url` (which Redis refuses) keeps going: refreshes do not raise,
    it says once that Redis is unreachable, without a traceback or a password; the hint
    publisher rides it out too."""
    caplog.clear()
    assert not redis_alive(url)
    pool = WorkerRegistry.from_settings(settings(url))

    async def go() -> None:
        index = PrefixIndex(pool.client, PREFIX)
        try:
            for _ in range(4):
                await pool.refresh()
                assert not await index.refresh(["w1"])
            assert not pool.redis_ok and pool.snapshot() == ()
        finally:
            index.close()
            await pool.close()

    asyncio.run(go())
    pub = HintPublisher(url, PREFIX, "w1", FP, 16, POOL_UUID, ttl_s=10, interval_s=0.05,
                        max_keys=100)
    try:
        pub.offer([FP])
        eventually(lambda: any("routing hints" in r.getMessage() for r in caplog.records))
        time.sleep(0.3)  # several more tries
        assert pub._thread.is_alive()
    finally:
        pub.close()
    down = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len([r for r in down if r.name == "gateway.workers"]) == 1
    assert len([r for r in down if r.name.endswith("engine.hints")]) == 1
    if "@" in url:
        assert "***" in next(r.getMessage() for r in down if r.name == "gateway.workers")
    assert not any(r.exc_info for r in caplog.records)
    for r in caplog.records:
        for secret in secrets:
            assert secret not in r.getMessage()


def test_a_password_protected_redis_is_used_through_its_url(
        password_server: ConfiguredRedis) -> None:
    assert f":{REDIS_PASSWORD}@" in password_server.url
    check_everything_reaches(password_server)


def test_a_wrong_or_missing_password_leaves_the_gateway_serving(
        password_server: ConfiguredRedis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    wrong = password_server.url.replace(REDIS_PASSWORD, WRONG)
    check_refused_quietly(wrong, caplog, (WRONG,))
    check_refused_quietly(f"redis://127.0.0.1:{password_server.port}/0", caplog, ())
    # The whole gateway: starts, answers, reports Redis as down, logs it once.
    caplog.clear()
    from gateway.app import create_app

    with TestClient(create_app(settings(wrong, registry_refresh_s=0.05))) as http:
        for _ in range(10):
            health = http.get("/health")
            # it answers (503: no worker is known while Redis refuses it)
            assert health.status_code == 503 and health.json()["redis"] is False
            assert health.json()["status"] == "no_healthy_worker"
            time.sleep(0.03)
    down = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(down) == 1 and not any(r.exc_info for r in caplog.records)
    assert not any(WRONG in r.getMessage() for r in caplog.records)


def test_redis_over_tls_is_used_through_its_url(tls_server: ConfiguredRedis) -> None:
    assert tls_server.url.startswith("rediss://") and f"ssl_ca_certs={tls_server.ca}" in \
        tls_server.url
    check_everything_reaches(tls_server)


def test_tls_without_the_right_ca_or_without_tls_is_refused_quietly(
        tls_server: ConfiguredRedis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    base = f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{tls_server.port}/0"
    check_refused_quietly(base, caplog, (REDIS_PASSWORD,))  # the system CAs: not ours
    check_refused_quietly(f"{base}?ssl_ca_certs=/nonexistent/ca.crt", caplog,
                          (REDIS_PASSWORD,))
    check_refused_quietly(base.replace("rediss://", "redis://"), caplog, (REDIS_PASSWORD,))


def test_the_async_client_takes_the_ca_from_the_url(tls_server: ConfiguredRedis) -> None:
    """What the gateway relies on: redis-py passes `ssl_ca_certs` from a rediss:// URL's
    query to its TLS connection (sync and asyncio clients alike)."""
    async def go() -> None:
        client = aioredis.Redis.from_url(tls_server.url)
        try:
            assert await client.ping()
        finally:
            await client.aclose()

    asyncio.run(go())
