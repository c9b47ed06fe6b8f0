"""A real Redis poisoned with every kind of bad record, next to one valid worker: the gateway
keeps the valid worker, skips the rest, counts each in
beluga_gateway_registry_invalid_records_total, logs each once across refreshes, never raises
out of a refresh, and starts and answers /health with Redis holding only garbage."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

import gateway.prefixes
import gateway.workers
from beluga.registry import (
    HINTS_SCHEMA_VERSION,
    SCHEMA_VERSION,
    hint_blocks_key,
    hints_key,
    worker_key,
)
from beluga.settings import Settings
from gateway.metrics import GatewayMetrics
from gateway.prefixes import PrefixIndex
from gateway.workers import MAX_WORKER_RECORDS, WorkerRegistry
from tests.support import RedisServer

PREFIX = "beluga:hostile"
POOL_UUID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0fabcdef01"
METRIC = "beluga_gateway_registry_invalid_records_total"


def worker(wid: str, **over: Any) -> dict[str, Any]:
    now = time.time()
    return {"schema": SCHEMA_VERSION, "id": wid, "url": "http://127.0.0.1:9", "model": "m",
            "capacity": 4, "pid": 1, "started_at": now, "heartbeat_at": now, "running": 0,
            "waiting": 0, **over}


def hints(wid: str, **over: Any) -> dict[str, Any]:
    return {"schema": HINTS_SCHEMA_VERSION, "worker_id": wid, "fingerprint": "ab" * 32,
            "block_tokens": 16, "pool_uuid": POOL_UUID, "pool_path": None, "keys": 2,
            "updated_at": time.time(), **over}


def hint_keys(n: int, start: int = 0) -> list[str]:
    return [f"{i:032x}" for i in range(start, start + n)]


# (worker id, what is stored at its registry key, the reason it is refused)
BAD_WORKERS: list[tuple[str, Any, str]] = [
    ("file", worker("file", url="file:///etc/passwd"), "url"),
    ("gopher", worker("gopher", url="gopher://127.0.0.1:70"), "url"),
    ("port0", worker("port0", url="http://h:0"), "url"),
    ("port99999", worker("port99999", url="http://h:99999"), "url"),
    ("space", worker("space", url="http://a b:1"), "url"),
    ("crlf", worker("crlf", url="http://h:1/\r\nX: y"), "url"),
    ("userinfo", worker("userinfo", url="http://u:p@h:1"), "url"),
    ("header-id", worker("header-id\r\nx-evil: 1"), "id"),
    ("nan", worker("nan", capacity=float("nan")), "capacity"),
    ("huge", worker("huge", capacity=1e308), "capacity"),
    ("negative", worker("negative", running=-1), "running"),
    ("future", worker("future", heartbeat_at=1e308), "heartbeat_at"),
    ("nan-time", worker("nan-time", started_at=float("nan")), "started_at"),
    ("model-crlf", worker("model-crlf", model="m\r\nx-evil: 1"), "model"),
    ("impostor", worker("good"), "key_mismatch"),       # at worker:impostor, claims "good"
    ("schema", worker("schema", schema=2), "schema"),
    ("utf8", b"\xff\xfe{\"schema\": 1}", "not_json"),
    ("deep", b"[" * 10_000, "not_json"),                 # json.loads: RecursionError
    ("deeper", b"[" * 100_000, "too_large"),             # not even read whole
    ("megabyte", worker("megabyte", model="m" * (1 << 20)), "too_large"),
    ("list", [1, 2, 3], "not_object"),
    ("set", {"a set": True}, "wrong_type"),               # a Redis set at that key
    ("hash", {"a hash": True}, "wrong_type"),
]


def store(client: Any, key: str, what: Any) -> None:
    if isinstance(what, dict) and what.get("a set"):
        client.sadd(key, "x", "y")
    elif isinstance(what, dict) and what.get("a hash"):
        client.hset(key, mapping={"url": "http://h:1"})
    elif isinstance(what, bytes):
        client.set(key, what)
    else:
        client.set(key, json.dumps(what))


@pytest.fixture
def poisoned(server: RedisServer) -> Iterator[RedisServer]:
    """`server` holding one valid worker ("good") and every bad worker record."""
    client = server.client()
    client.set(worker_key(PREFIX, "good"), json.dumps(worker("good")))
    for wid, what, _ in BAD_WORKERS:
        store(client, worker_key(PREFIX, wid), what)
    yield server


def gateway_settings(server: RedisServer, **over: Any) -> Settings:
    values: dict[str, Any] = {"redis_url": server.url, "redis_key_prefix": PREFIX,
                              "registry_refresh_s": 60, "health_check_interval_s": 0, **over}
    return Settings(**values)


def counted(metrics: GatewayMetrics, kind: str, reason: str) -> float:
    return metrics.registry.get_sample_value(METRIC, {"kind": kind, "reason": reason}) or 0.0


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records
               if r.levelno >= logging.WARNING and text in r.getMessage())


def test_refresh_keeps_the_valid_worker_and_counts_each_bad_record(
        poisoned: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    metrics = GatewayMetrics("round_robin")
    pool = WorkerRegistry.from_settings(gateway_settings(poisoned))
    pool.invalid.count = metrics.invalid_record

    async def go() -> None:
        try:
            for _ in range(3):
                await pool.refresh()
        finally:
            await pool.close()

    asyncio.run(go())
    assert pool.redis_ok
    assert [w.id for w in pool.snapshot()] == ["good"]
    assert pool.snapshot()[0].url == "http://127.0.0.1:9"
    want: dict[str, int] = {}
    for _, _, reason in BAD_WORKERS:
        want[reason] = want.get(reason, 0) + 3  # every refresh counts what it skips
    for reason, n in want.items():
        assert counted(metrics, "worker", reason) == n, reason
    for wid, _, reason in BAD_WORKERS:  # each logged once across the three refreshes
        shown = repr(worker_key(PREFIX, wid))[:60]
        assert warnings_about(caplog, shown) == 1, (wid, reason)
    assert not any(r.exc_info for r in caplog.records)  # skipped records: no tracebacks
    assert all("\r" not in r.getMessage() and "\n" not in r.getMessage()
               for r in caplog.records)


def test_a_heartbeat_from_the_future_does_not_keep_a_worker_forever(
        server: RedisServer) -> None:
    client = server.client()
    client.set(worker_key(PREFIX, "w"), json.dumps(worker("w", heartbeat_at=9e10)))
    pool = WorkerRegistry.from_settings(gateway_settings(server))

    async def go() -> None:
        try:
            await pool.refresh()
            assert [w.id for w in pool.snapshot()] == ["w"]
            client.delete(worker_key(PREFIX, "w"))
            await pool.refresh()  # gone from Redis, heartbeat "in" 2255: gone here too
            assert pool.snapshot() == ()
        finally:
            await pool.close()

    asyncio.run(go())


def test_a_registry_with_more_keys_than_the_bound_is_read_only_so_far(
        server: RedisServer) -> None:
    client = server.client()
    n = MAX_WORKER_RECORDS + 904
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.set(worker_key(PREFIX, f"w{i}"), json.dumps(worker(f"w{i}")))
    pipe.execute()
    metrics = GatewayMetrics("round_robin")
    pool = WorkerRegistry.from_settings(gateway_settings(server))
    pool.invalid.count = metrics.invalid_record

    async def go() -> None:
        try:
            await pool.refresh()
            assert pool.redis_ok and len(pool.snapshot()) == MAX_WORKER_RECORDS
            assert counted(metrics, "worker", "too_many") == 1
            # Ids rotating (all new ones, the old ones gone but inside their TTL) do not
            # pile up: what Redis holds now comes first, the total stays bounded.
            client.flushdb()
            pipe = client.pipeline(transaction=False)
            for i in range(MAX_WORKER_RECORDS // 2):
                pipe.set(worker_key(PREFIX, f"x{i}"), json.dumps(worker(f"x{i}")))
            pipe.execute()
            await pool.refresh()
            ids = {w.id for w in pool.snapshot()}
            assert len(ids) == MAX_WORKER_RECORDS
            assert {f"x{i}" for i in range(MAX_WORKER_RECORDS // 2)} <= ids
        finally:
            await pool.close()

    asyncio.run(go())


def test_refresh_survives_a_bug_in_one_record_and_in_the_whole_refresh(
        poisoned: RedisServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    real = gateway.workers.load_worker

    def buggy(raw: Any) -> Any:
        rec = real(raw)
        if rec.id == "other":
            raise RuntimeError("a bug in the validation")
        return rec

    metrics = GatewayMetrics("round_robin")
    client = poisoned.client()
    client.set(worker_key(PREFIX, "other"), json.dumps(worker("other")))
    pool = WorkerRegistry.from_settings(gateway_settings(poisoned))
    pool.invalid.count = metrics.invalid_record

    async def go() -> None:
        try:
            with monkeypatch.context() as m:
                m.setattr(gateway.workers, "load_worker", buggy)
                await pool.refresh()
                await pool.refresh()
            assert [w.id for w in pool.snapshot()] == ["good"]  # the bug cost one record

            async def broken(*args: Any, **kwargs: Any) -> Any:
                raise TypeError("a bug in the whole refresh")

            with monkeypatch.context() as m:
                m.setattr(pool.client, "scan", broken)
                await pool.refresh()  # does not raise
                await pool.refresh()
            await pool.refresh()   # and the next one works again
            assert sorted(w.id for w in pool.snapshot()) == ["good", "other"]
        finally:
            await pool.close()

    asyncio.run(go())
    assert counted(metrics, "worker", "error") == 4
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 2  # one per distinct failure, not one per refresh


# -- hints ----------------------------------------------------------------------------------
BAD_HINTS: list[tuple[str, Any, str]] = [
    ("h-utf8", b"\xff\xfe\xfd", "not_json"),
    ("h-deep", b"{\"a\":" * 3000, "not_json"),
    ("h-big", hints("h-big", pool_path="/dev/shm/" + "a" * (1 << 20)), "too_large"),
    ("h-nan", hints("h-nan", block_tokens=float("nan")), "block_tokens"),
    ("h-blocks", hints("h-blocks", block_tokens=4096), "block_tokens"),
    ("h-uuid", hints("h-uuid", pool_uuid="../../etc/passwd"), "pool_uuid"),
    ("h-fp", hints("h-fp", fingerprint="AB" * 32), "fingerprint"),
    ("h-time", hints("h-time", updated_at=float("inf")), "updated_at"),
    ("h-mismatch", hints("good"), "key_mismatch"),
    ("h-set", {"a set": True}, "wrong_type"),
]


def test_hints_keep_what_is_valid_and_count_the_rest(
        server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client = server.client()
    good = hint_keys(3)
    # "good": a valid record naming a pool path outside pool_search_dirs, and a hint set
    # with some members that are not hint keys.
    client.set(hints_key(PREFIX, "good"), json.dumps(hints("good", pool_path="/etc/passwd")))
    client.sadd(hint_blocks_key(PREFIX, "good"), *good, "ABCDEF" * 6, "x" * 1000,
                b"\xff" * 32, good[0] + "\r\n")
    client.set(hints_key(PREFIX, "dotdot"),
               json.dumps(hints("dotdot", pool_path="/dev/shm/../etc/x")))
    # 100k members: read at most max_keys of them
    client.set(hints_key(PREFIX, "many"), json.dumps(hints("many")))
    pipe = client.pipeline(transaction=False)
    for i in range(0, 100_000, 10_000):
        pipe.sadd(hint_blocks_key(PREFIX, "many"), *hint_keys(10_000, i))
    pipe.execute()
    # a valid record whose hint "set" is a string
    client.set(hints_key(PREFIX, "strset"), json.dumps(hints("strset")))
    client.set(hint_blocks_key(PREFIX, "strset"), "not a set")
    for wid, what, _ in BAD_HINTS:
        store(client, hints_key(PREFIX, wid), what)
        client.sadd(hint_blocks_key(PREFIX, wid), *good)

    metrics = GatewayMetrics("round_robin")
    ids = ["good", "dotdot", "many", "strset", "absent", *(w for w, _, _ in BAD_HINTS)]

    async def go() -> PrefixIndex:
        aclient = aioredis.Redis.from_url(server.url)
        index = PrefixIndex(aclient, PREFIX, max_keys=1000,
                            pool_search_dirs="/dev/shm,/dev/hugepages")
        index.invalid.count = metrics.invalid_record
        try:
            for _ in range(3):
                assert await index.refresh(ids)
        finally:
            index.close()
            await aclient.aclose()
        return index

    index = asyncio.run(go())
    held = index._hints
    assert sorted(held) == ["dotdot", "good", "many", "strset"]
    assert held["good"].keys == frozenset(good)
    assert held["good"].record.pool_path is None and held["dotdot"].record.pool_path is None
    assert held["good"].record.pool_uuid == POOL_UUID   # routing on it goes on
    assert len(held["many"].keys) == 1000
    assert held["strset"].keys == frozenset()
    assert index.keying(["good"]) is not None
    for _, _, reason in BAD_HINTS:
        assert counted(metrics, "hints", reason) >= 3, reason
    assert counted(metrics, "hints", "pool_path") == 6   # two paths, three refreshes
    assert counted(metrics, "hint_keys", "hint_key") == 3
    assert counted(metrics, "hint_keys", "too_many") == 3
    assert counted(metrics, "hint_keys", "wrong_type") == 3
    for wid in ["good", "dotdot", *(w for w, _, _ in BAD_HINTS)]:
        assert warnings_about(caplog, repr(hints_key(PREFIX, wid))) == 1, wid
    assert not any(r.exc_info for r in caplog.records)


def test_hint_keys_read_per_refresh_are_bounded_for_all_workers_together(
        server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    client = server.client()
    ids = [f"w{i}" for i in range(4)]
    for wid in ids:
        client.set(hints_key(PREFIX, wid), json.dumps(hints(wid)))
        client.sadd(hint_blocks_key(PREFIX, wid), *hint_keys(100))
    monkeypatch.setattr(gateway.prefixes, "MAX_HINT_KEYS_TOTAL", 100)
    metrics = GatewayMetrics("round_robin")

    async def go() -> dict[str, int]:
        aclient = aioredis.Redis.from_url(server.url)
        index = PrefixIndex(aclient, PREFIX, max_keys=1000)
        index.invalid.count = metrics.invalid_record
        try:
            assert await index.refresh(ids)
            return {wid: len(h.keys) for wid, h in index._hints.items()}
        finally:
            await aclient.aclose()

    assert asyncio.run(go()) == dict.fromkeys(ids, 25)
    assert counted(metrics, "hint_keys", "too_many") == 0  # sampled, not refused


def test_a_pool_path_that_links_outside_the_search_dirs_is_not_used(
        server: RedisServer, tmp_path: Path) -> None:
    target = tmp_path / "outside.pool"
    target.write_bytes(b"\0" * 4096)
    link = Path(f"/dev/shm/beluga-test-hostile-link-{os.getpid()}")  # not *.pool: not probed
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    probed: list[list[str]] = []

    def attach(uuid: str, candidates: list[str], **kwargs: Any) -> Any:
        probed.append(list(candidates))
        raise gateway.prefixes.PoolError("not here")

    try:
        client = server.client()
        client.set(hints_key(PREFIX, "w"), json.dumps(hints("w", pool_path=str(link))))
        metrics = GatewayMetrics("round_robin")

        async def go() -> None:
            aclient = aioredis.Redis.from_url(server.url)
            index = PrefixIndex(aclient, PREFIX)
            index.invalid.count = metrics.invalid_record
            try:
                assert await index.refresh(["w"])
            finally:
                await aclient.aclose()

        with pytest.MonkeyPatch.context() as m:
            m.setattr(gateway.prefixes.KVPool, "attach_by_uuid", attach)
            asyncio.run(go())
    finally:
        link.unlink(missing_ok=True)
    assert probed and not any(str(link) in c for c in probed[0])
    assert counted(metrics, "hints", "pool_path") == 1


def test_hints_refresh_survives_bugs(server: RedisServer, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    client = server.client()
    for wid in ("a", "b"):
        client.set(hints_key(PREFIX, wid), json.dumps(hints(wid)))
    real = gateway.prefixes.load_hints

    def buggy(raw: Any, dirs: Any) -> Any:
        rec = real(raw, dirs)
        if rec[0].worker_id == "a":
            raise RuntimeError("a bug in one record")
        return rec

    async def go() -> None:
        aclient = aioredis.Redis.from_url(server.url)
        index = PrefixIndex(aclient, PREFIX)
        try:
            monkeypatch.setattr(gateway.prefixes, "load_hints", buggy)
            assert await index.refresh(["a", "b"])
            assert sorted(index._hints) == ["b"]
            monkeypatch.undo()

            async def broken() -> None:
                raise ValueError("a bug in attaching")

            monkeypatch.setattr(index, "_maybe_attach_pool", broken)
            assert not await index.refresh(["a", "b"])  # no exception out of it
            monkeypatch.undo()
            assert await index.refresh(["a", "b"])
            assert sorted(index._hints) == ["a", "b"]
        finally:
            index.close()
            await aclient.aclose()

    asyncio.run(go())
    assert len([r for r in caplog.records if r.exc_info]) == 2


# -- the whole gateway ----------------------------------------------------------------------
def test_the_gateway_starts_and_answers_with_redis_holding_only_garbage(
        server: RedisServer) -> None:
    client = server.client()
    for wid, what, _ in BAD_WORKERS:
        store(client, worker_key(PREFIX, wid), what)
        store(client, hints_key(PREFIX, wid), what)
        client.sadd(hint_blocks_key(PREFIX, wid), "not-a-key", b"\xff" * 40)
    from gateway.app import create_app

    app = create_app(gateway_settings(server, registry_refresh_s=0.05,
                                      routing_policy="round_robin"))
    with TestClient(app) as http:
        for _ in range(5):
            resp = http.get("/health")
            assert resp.status_code == 503  # answers: no worker is registered
            assert resp.json()["workers"] == [] and resp.json()["redis"] is True
            time.sleep(0.05)
        assert http.get("/v1/models").json()["data"] == []
        resp = http.post("/v1/chat/completions",
                         json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert resp.status_code == 503  # no worker: the documented answer, not a crash
        # A valid worker appears next to the garbage: the running gateway picks it up.
        client.set(worker_key(PREFIX, "good"), json.dumps(worker("good")))
        client.set(hints_key(PREFIX, "good"), json.dumps(hints("good")))
        client.sadd(hint_blocks_key(PREFIX, "good"), *hint_keys(2))
        deadline = time.monotonic() + 5
        while [w["id"] for w in http.get("/health").json()["workers"]] != ["good"]:
            assert time.monotonic() < deadline, "the valid worker was never picked up"
            time.sleep(0.05)
        # every refusal is on /metrics, by kind and reason
        counted = {line.split(" ")[0]: float(line.split(" ")[1])
                   for line in http.get("/metrics").text.splitlines()
                   if line.startswith("beluga_gateway_registry_invalid_records_total{")}
        kinds = {name.split('kind="')[1].split('"')[0] for name in counted}
        assert "worker" in kinds, counted  # (hints are read only for valid workers)
        assert all(v >= 1 for v in counted.values())


def test_uuid_text_is_canonical() -> None:
    assert str(uuid.UUID(POOL_UUID)) == POOL_UUID
