"""The gateway's view of the workers: registry records from Redis plus local observations.

A background task re-reads the registry every `registry_refresh_s`. The request path only
reads an immutable snapshot (a tuple swapped in by that task), so nothing is locked per
request. When Redis is unreachable the last snapshot stays in use and the gateway keeps
serving; it recovers as soon as Redis answers again.

Redis is untrusted input: one refresh reads at most `MAX_WORKER_RECORDS` records of at most
`MAX_RECORD_BYTES` each, validates each (beluga/registry.py) and skips, logs once and counts
(`WorkerRegistry.invalid`) what does not pass; `refresh` never raises (but for cancellation).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from beluga.registry import (
    MAX_RECORD_BYTES,
    InvalidRecord,
    InvalidRecords,
    WorkerRecord,
    load_worker,
    raise_failures,
    redacted_url,
    worker_key,
    worker_pattern,
)
from beluga.settings import Settings
from gateway.upstream import UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

MAX_WORKER_RECORDS = 4096  # registry records read per refresh (more are ignored, counted)
SCAN_COUNT = 1000          # keys Redis examines per SCAN call
MAX_SCAN_CALLS = 1024      # SCAN calls per refresh: ~1M keys examined in a shared Redis


@dataclass
class WorkerState:
    """A registered worker and what this gateway has seen of it."""

    record: WorkerRecord
    in_flight: int = 0
    pending_prefill: int = 0  # prompt tokens of those requests the worker has yet to compute
    unhealthy_until: float = 0.0
    failed_checks: int = 0    # consecutive failed health checks
    last_done_at: float = 0.0  # wall clock of the last request this gateway finished here
    last_begin_at: float = 0.0  # wall clock of the last request this gateway sent here

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def url(self) -> str:
        return self.record.url

    def healthy(self, now: float) -> bool:
        return now >= self.unhealthy_until

    def begin(self, prefill: int = 0) -> None:
        """A request sent here, which the router expects to compute `prefill` tokens."""
        self.in_flight += 1
        self.pending_prefill += prefill
        self.last_begin_at = time.time()

    def prefilled(self, tokens: int) -> None:
        """A request's first token came back: its prompt is computed."""
        self.pending_prefill = max(0, self.pending_prefill - tokens)

    def done(self, unprefilled: int = 0) -> None:
        """A request ended; `unprefilled`: its tokens not yet released by `prefilled`."""
        self.in_flight -= 1
        self.prefilled(unprefilled)
        if self.in_flight <= 0:
            self.pending_prefill = 0  # nothing open here, nothing pending: no drift
        self.last_done_at = time.time()

    def load(self) -> float:
        """Occupancy per slot: the worker's reported running + waiting requests (which
        include other gateways' traffic), or this gateway's own open requests when that is
        more, or when the report predates a request that finished here since (stale)."""
        reported = self.record.running + self.record.waiting
        if self.record.heartbeat_at < self.last_done_at:
            reported = 0
        if self.record.heartbeat_at > self.last_begin_at:
            # Everything this gateway has open here began before the worker's report, so
            # the report counts it (or it is over): a count this gateway failed to close
            # cannot skew routing for longer than one heartbeat.
            return reported / self.record.capacity
        return max(self.in_flight, reported) / self.record.capacity


@dataclass
class WorkerRegistry:
    settings: Settings
    client: aioredis.Redis
    _workers: dict[str, WorkerState] = field(default_factory=dict)
    _snapshot: tuple[WorkerState, ...] = ()
    redis_ok: bool = False
    last_refresh: float = 0.0
    # Refused records: logged once, counted through `invalid.count` (the gateway sets it to
    # its metrics' `invalid_record`).
    invalid: InvalidRecords = field(default_factory=InvalidRecords)
    _down_logged: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerRegistry:
        client = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        return cls(settings=settings, client=client)

    def snapshot(self) -> tuple[WorkerState, ...]:
        return self._snapshot

    def models(self) -> list[str]:
        """Every model and LoRA adapter some worker serves (not an adapter name that is
        ambiguous: see `for_model`)."""
        models = {w.record.model for w in self._snapshot}
        bases: dict[str, set[str]] = {}
        for w in self._snapshot:
            for name in w.record.adapters:
                bases.setdefault(name, set()).add(w.record.model)
        return sorted(models | {n for n, b in bases.items() if len(b) == 1 and n not in models})

    def for_model(self, model: str) -> list[WorkerState]:
        """The workers that serve `model`: as their model, else as a LoRA adapter. A model
        name is never also taken as an adapter's, and an adapter name that workers of
        different base models list serves nobody (`ambiguous`): a request must never be
        answered by one model on one worker and another on the next."""
        base = [w for w in self._snapshot if w.record.model == model]
        if base:
            return base
        served = [w for w in self._snapshot if model in w.record.adapters]
        return [] if len({w.record.model for w in served}) > 1 else served

    def ambiguous(self, model: str) -> list[str]:
        """The base models an adapter name is listed under, when there are several (and no
        worker serves it as its model); else []."""
        if any(w.record.model == model for w in self._snapshot):
            return []
        bases = sorted({w.record.model for w in self._snapshot if model in w.record.adapters})
        return bases if len(bases) > 1 else []

    def mark_unhealthy(self, worker: WorkerState, why: str = "failed") -> None:
        now = time.monotonic()
        was_healthy = worker.healthy(now)
        worker.unhealthy_until = max(worker.unhealthy_until,
                                     now + self.settings.unhealthy_cooldown_s)
        if was_healthy:
            logger.warning("worker %s at %s %s; taken out of routing", worker.id, worker.url,
                           why)

    async def check_health(self, client: UpstreamClient) -> None:
        """GET every worker's /health at once: `health_check_failures` failures in a row take
        (or keep) it out (one slow answer from a loaded worker does not), a pass puts it back
        at once, whatever the remaining cooldown."""
        workers = self._snapshot
        results = await asyncio.gather(*(self._probe(client, w) for w in workers))
        for worker, problem in zip(workers, results, strict=True):
            if problem is not None:
                worker.failed_checks += 1
                if worker.failed_checks >= self.settings.health_check_failures:
                    self.mark_unhealthy(worker, f"failed {worker.failed_checks} health "
                                                f"checks in a row ({problem})")
                continue
            worker.failed_checks = 0
            if not worker.healthy(time.monotonic()):
                worker.unhealthy_until = 0.0
                logger.info("worker %s at %s passed its health check; back in routing",
                            worker.id, worker.url)

    async def _probe(self, client: UpstreamClient, worker: WorkerState) -> str | None:
        """None when healthy, else what went wrong."""
        try:
            status = await client.status(f"{worker.url}/health",
                                         self.settings.health_check_timeout_s)
        except (UpstreamError, TimeoutError) as exc:
            return type(exc).__name__
        return None if status == 200 else f"HTTP {status}"

    async def refresh(self) -> None:
        """Re-read the registry. Never raises: Redis errors keep the last snapshot, anything
        unexpected is logged (once per kind of error, with its traceback) and counted."""
        try:
            await self._refresh()
        except Exception as exc:
            self.invalid.report("worker", f"<refresh: {type(exc).__name__}>", "error",
                                repr(exc), action="failed", exc=exc)

    async def _read_registry(self) -> list[WorkerRecord]:
        """The valid worker records in Redis (RedisError/OSError when it is unreachable)."""
        prefix = self.settings.redis_key_prefix
        keys: dict[bytes | str, None] = {}  # SCAN may return a key twice
        cursor, calls = 0, 0
        while True:
            cursor, batch = await self.client.scan(cursor=cursor, match=worker_pattern(prefix),
                                                   count=SCAN_COUNT)
            calls += 1
            keys.update(dict.fromkeys(batch))
            if cursor == 0 or len(keys) >= MAX_WORKER_RECORDS or calls >= MAX_SCAN_CALLS:
                break
        if cursor != 0 or len(keys) > MAX_WORKER_RECORDS:
            self.invalid.report("worker", worker_pattern(prefix), "too_many",
                                f"over {MAX_WORKER_RECORDS} keys or {MAX_SCAN_CALLS} SCAN "
                                "calls: the rest ignored this refresh", action="truncated")
        names = list(keys)[:MAX_WORKER_RECORDS]
        if not names:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in names:
            # At most MAX_RECORD_BYTES + 1 bytes: a longer value is refused, never read whole.
            pipe.getrange(key, 0, MAX_RECORD_BYTES)
        values = await pipe.execute(raise_on_error=False)
        raise_failures(values)
        records: list[WorkerRecord] = []
        for key, raw in zip(names, values, strict=True):
            try:
                if isinstance(raw, BaseException):  # WRONGTYPE: a set or list at that key
                    raise InvalidRecord("wrong_type", str(raw))
                if not raw:
                    continue  # expired since the SCAN
                rec = load_worker(raw)
                name = key if isinstance(key, bytes) else str(key).encode()
                if name != worker_key(prefix, rec.id).encode():
                    raise InvalidRecord("key_mismatch", f"record of worker {rec.id!r}")
                records.append(rec)
            except InvalidRecord as exc:
                self.invalid.refused("worker", key, exc)
            except Exception as exc:  # a bug here must not cost the other records
                self.invalid.report("worker", key, "error", repr(exc), exc=exc)
        return records

    async def _refresh(self) -> None:
        try:
            records = await self._read_registry()
        except (RedisError, OSError) as exc:
            if self.redis_ok or not self._down_logged:
                logger.warning("Redis at %s unreachable (%s: %s); routing on the last known "
                               "workers", redacted_url(self.settings.redis_url),
                               type(exc).__name__, exc)
                self._down_logged = True
            self.redis_ok = False
            return
        if not self.redis_ok:
            logger.info("Redis reachable; %d workers registered", len(records))
        self.redis_ok = True
        self._down_logged = False
        self.last_refresh = time.monotonic()
        fresh: dict[str, WorkerState] = {}
        # A worker missing from the registry is dropped once its last heartbeat is older
        # than the registry TTL (what key expiry means), not at once: after a Redis restart
        # the registry is empty until the workers' next heartbeats, and they are alive. (A
        # heartbeat from the future does not keep it forever: that counts as old too.)
        # At most MAX_WORKER_RECORDS in all: what Redis holds now first (ids rotating in a
        # hostile registry cannot pile up here).
        now = time.time()
        current = {rec.id for rec in records}
        room = MAX_WORKER_RECORDS - len(current)
        for wid, known in self._workers.items():
            if (abs(now - known.record.heartbeat_at) < self.settings.worker_ttl_s
                    and (wid in current or room > 0)):
                fresh[wid] = known
                room -= wid not in current
        for rec in records:
            old = self._workers.get(rec.id)
            if old is not None and old.url == rec.url and old.record.pid == rec.pid:
                old.record = rec
                fresh[rec.id] = old
            else:
                fresh[rec.id] = WorkerState(record=rec)
        self._workers = fresh
        self._snapshot = tuple(fresh.values())

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.settings.registry_refresh_s)

    async def close(self) -> None:
        await self.client.aclose()
