"""Publishing a worker's routing hints to Redis without ever blocking the caller.

The local-cache tracker (engine/local_cache.py) hands a snapshot (the block keys the
worker's KV cache holds) to `HintPublisher.offer`, which only swaps a reference. A daemon
thread writes the latest snapshot to Redis (set + record, both with a TTL), re-publishes it
to refresh the TTL, and rides out Redis outages (a warning when Redis goes away, an info
when it is back). Losing Redis costs routing quality, never correctness.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence

import redis

from beluga.registry import HintsRecord, hint_blocks_key, hint_key, hints_key

logger = logging.getLogger(f"vllm.{__name__}")  # through vLLM's log handlers


class HintPublisher:
    def __init__(self, redis_url: str, prefix: str, worker_id: str, fingerprint: bytes,
                 block_tokens: int, pool_uuid: str | None, ttl_s: int, interval_s: float,
                 max_keys: int, pool_path: str | None = None,
                 adapters: Mapping[str, bytes] | None = None) -> None:
        self._client = redis.Redis.from_url(redis_url, socket_timeout=2.0,
                                            socket_connect_timeout=2.0)
        self._prefix, self._worker = prefix, worker_id
        self._fingerprint, self._block_tokens = fingerprint.hex(), block_tokens
        # Absolute and normalized, as gateways require of a pool path (beluga/registry.py).
        self._pool_uuid = pool_uuid
        self._pool_path = os.path.abspath(pool_path) if pool_path else None
        self._ttl, self._interval, self._max = ttl_s, interval_s, max_keys
        self._adapters = {name: d.hex() for name, d in (adapters or {}).items()}
        # Published at once, before the cache holds anything: the record tells gateways how
        # to key prompts for this worker (fingerprint, block size, pool), so they can route
        # to what the pool holds from the first request on.
        self._latest: list[str] = []
        self._wake = threading.Event()
        self._wake.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="beluga-hints", daemon=True)
        self._thread.start()

    def offer(self, block_keys: Sequence[bytes]) -> None:
        """The keys the local cache holds now, most recently used last (never blocks)."""
        keys = [hint_key(k) for k in block_keys[-self._max:]]
        self._latest = keys
        self._wake.set()

    def set_pool(self, pool_uuid: str, pool_path: str) -> None:
        """The pool this worker shares through, once known (the record says so next)."""
        self._pool_uuid, self._pool_path = pool_uuid, os.path.abspath(pool_path)
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            self._client.delete(hints_key(self._prefix, self._worker),
                                hint_blocks_key(self._prefix, self._worker))
        self._client.close()

    def _run(self) -> None:
        published: list[str] | None = None
        healthy = True
        failures: set[type[BaseException]] = set()
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            keys = self._latest
            try:
                self._publish(keys, changed=keys is not published)
                published = keys
                if not healthy:
                    logger.info("routing hints: Redis is back, publishing again")
                healthy = True
            except (redis.RedisError, OSError) as exc:
                published = None  # whatever Redis held may be gone when it is back
                if healthy:
                    logger.warning("routing hints: Redis unreachable (%s); retrying", exc)
                healthy = False
            except Exception as exc:
                # Not Redis being away: a URL option redis-py refuses only when it connects,
                # a record the registry refuses. The thread goes on (it is the only one
                # publishing this worker's hints); logged with its traceback once per kind.
                published = None
                if type(exc) not in failures:
                    failures.add(type(exc))
                    logger.exception("routing hints: publishing failed; retrying")
                healthy = False

    def _publish(self, keys: list[str], changed: bool) -> None:
        record = HintsRecord(worker_id=self._worker, fingerprint=self._fingerprint,
                             block_tokens=self._block_tokens, pool_uuid=self._pool_uuid,
                             pool_path=self._pool_path, keys=len(keys), updated_at=time.time(),
                             adapters=self._adapters)
        blocks = hint_blocks_key(self._prefix, self._worker)
        pipe = self._client.pipeline(transaction=True)
        if changed:
            pipe.delete(blocks)
            if keys:
                pipe.sadd(blocks, *keys)
        pipe.expire(blocks, self._ttl)
        pipe.set(hints_key(self._prefix, self._worker), record.to_json(), ex=self._ttl)
        refreshed = pipe.execute()[-2]
        if keys and not changed and not refreshed:
            # The set is gone although nothing changed here (Redis restarted between two
            # refreshes, or evicted it): write it again.
            self._publish(keys, changed=True)
