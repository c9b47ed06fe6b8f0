"""Routing hints in a real Redis: published with TTLs, bounded, and surviving an outage."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from beluga.registry import hint_blocks_key, hint_key, hints_key, parse_hints
from engine.hints import HintPublisher
from tests.support import RedisServer

FP = hashlib.sha256(b"model").digest()
PREFIX = "beluga:test"
POOL_UUID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0fabcdef01"


def keys(n: int) -> list[bytes]:
    return [hashlib.sha256(b"%d" % i).digest() for i in range(n)]


def eventually(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def publisher(server: RedisServer, max_keys: int = 100) -> HintPublisher:
    return HintPublisher(server.url, PREFIX, "w1", FP, 128, POOL_UUID, ttl_s=5, interval_s=0.1,
                         max_keys=max_keys)


def test_publishes_the_latest_keys_with_ttls(server: RedisServer) -> None:
    pub = publisher(server, max_keys=3)
    client = server.client()
    try:
        pub.offer(keys(5))  # bounded: the 3 most recent
        want = {hint_key(k).encode() for k in keys(5)[-3:]}
        eventually(lambda: client.smembers(hint_blocks_key(PREFIX, "w1")) == want)
        raw = client.get(hints_key(PREFIX, "w1"))
        assert raw is not None
        rec = parse_hints(raw)
        assert rec is not None and rec.keys == 3 and rec.block_tokens == 128
        assert rec.fingerprint == FP.hex() and rec.pool_uuid == POOL_UUID
        assert 0 < client.ttl(hint_blocks_key(PREFIX, "w1")) <= 5
        assert 0 < client.ttl(hints_key(PREFIX, "w1")) <= 5
        pub.offer(keys(1))
        eventually(lambda: client.scard(hint_blocks_key(PREFIX, "w1")) == 1)
    finally:
        pub.close()
    assert client.exists(hints_key(PREFIX, "w1"), hint_blocks_key(PREFIX, "w1")) == 0


def test_publishes_its_keying_before_the_cache_holds_anything(server: RedisServer) -> None:
    """A gateway keys prompts with the record's fingerprint, block size and pool: without it
    a fresh worker's first requests would be routed blind, even to what the pool holds."""
    pub = publisher(server)
    client = server.client()
    try:
        eventually(lambda: client.get(hints_key(PREFIX, "w1")) is not None, timeout=2)
        rec = parse_hints(client.get(hints_key(PREFIX, "w1")) or b"")
        assert rec is not None and rec.keys == 0 and rec.block_tokens == 128
        assert rec.fingerprint == FP.hex() and rec.pool_uuid == POOL_UUID
        assert client.exists(hint_blocks_key(PREFIX, "w1")) == 0
        time.sleep(0.3)  # refreshed, not rewritten into something else
        assert client.ttl(hints_key(PREFIX, "w1")) > 0
    finally:
        pub.close()


def test_rides_out_a_redis_outage(server: RedisServer) -> None:
    pub = publisher(server)
    try:
        server.stop()
        t0 = time.monotonic()
        pub.offer(keys(4))  # never blocks, even with Redis gone
        assert time.monotonic() - t0 < 0.05
        time.sleep(0.5)
        server.start()
        client = server.client()
        eventually(lambda: client.scard(hint_blocks_key(PREFIX, "w1")) == 4)
    finally:
        pub.close()


def test_malformed_hint_records_are_skipped() -> None:
    assert parse_hints(b"{") is None
    assert parse_hints(b'{"schema": 2}') is None
    assert parse_hints(b'{"schema": 1, "worker_id": "w", "fingerprint": "xyz"}') is None


def test_hints_come_back_after_redis_loses_them(server: RedisServer) -> None:
    """Nothing new is offered (the worker is idle), yet what Redis lost (a restart, an
    eviction) is written again at the next refresh."""
    pub = publisher(server)
    client = server.client()
    try:
        pub.offer(keys(4))
        eventually(lambda: client.scard(hint_blocks_key(PREFIX, "w1")) == 4)
        client.delete(hint_blocks_key(PREFIX, "w1"))  # evicted, the record left alone
        eventually(lambda: client.scard(hint_blocks_key(PREFIX, "w1")) == 4)
        server.stop()
        time.sleep(0.3)
        server.start()
        client = server.client()
        eventually(lambda: client.scard(hint_blocks_key(PREFIX, "w1")) == 4)
        assert client.exists(hints_key(PREFIX, "w1")) == 1
    finally:
        pub.close()
