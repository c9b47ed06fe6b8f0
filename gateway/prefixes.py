"""Where a prompt's blocks are cached: per worker (its own KV cache) and in the shared pool.

* Workers' hints (engine/hints.py) are read from Redis with the registry: per worker a
  versioned record (model fingerprint, block size, pool UUID) and a bounded set of hint
  keys. Stale hints cost routing quality, never correctness; with Redis down the last
  snapshot is kept.
* This gateway's own record: the keys of prompts it routed to each worker recently, so a
  follow-up request sticks before the worker's next hint refresh (bounded LRU per worker).
* The pool: when the hints name a pool UUID and that pool is mapped on this host
  (/dev/shm, hugetlbfs, devdax), the gateway attaches it and asks `lookup_prefix` (a few
  microseconds, no pins). Elsewhere (no such pool mapped on this host) the gateway asks a
  worker that shares it (beluga/pool_lookup.py; `remote_pool` says when).

The pool is only called on the gateway's routing thread (`owner`), never on the event loop:
lookups run inside routing's jobs, and `pool_stats` returns a snapshot that each refresh
takes there. The handle waits at most `lock_timeout_s` (the `pool_lock_timeout_s` setting)
for a lock another process holds; a lookup that fails (kvpool.PoolError: busy, corrupt,
closed, ...) counts as "the pool holds none of it" for that request, is counted by kind
(`count_lookup`: beluga_gateway_pool_lookups_total{result}) and logged once per kind a
minute; after a busy lock, pool lookups are skipped for `busy_backoff_s`.

Hints in Redis are untrusted input: each record is validated (beluga/registry.py), a hint
set is read at most `max_keys` members at a time (SRANDMEMBER: never a whole hostile set),
members that are not 32 lowercase hex characters are ignored, and a pool path is attached
only inside `pool_search_dirs` (also once symbolic links are resolved). What is refused is
logged once and counted (`invalid`); `refresh` never raises (but for cancellation).
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from beluga.pool_errors import BUSY_BACKOFF_S, BusyBackoff, PoolErrorLog
from beluga.registry import (
    MAX_RECORD_BYTES,
    HintsRecord,
    InvalidRecord,
    InvalidRecords,
    hint_blocks_key,
    hint_key,
    hints_key,
    load_hints,
    pool_dirs,
    raise_failures,
    valid_hint_keys,
)
from beluga.settings import Settings
from kvpool import KVPool, PoolError, PoolStats, block_keys
from kvpool.keys import Adapter
from kvpool.pool import DEFAULT_CANDIDATES

logger = logging.getLogger(__name__)

DEFAULT_POOL_SEARCH_DIRS: str = Settings.model_fields["pool_search_dirs"].default
DEFAULT_MAX_HINT_KEYS: int = Settings.model_fields["max_hint_keys"].default
DEFAULT_POOL_LOCK_TIMEOUT_S: float = Settings.model_fields["pool_lock_timeout_s"].default
MAX_ATTACH_TRIES = 4  # pool UUIDs tried per refresh (each probes every candidate file)
# Hint keys read per refresh, all workers together (~100 MB at most): max_keys each for up
# to 128 workers, fewer each beyond (a registry of thousands of workers is bounded too).
MAX_HINT_KEYS_TOTAL = 1 << 20


@dataclass(frozen=True)
class WorkerHints:
    record: HintsRecord
    keys: frozenset[str]


@dataclass(frozen=True)
class Keying:
    """How a model's block keys are made (from its workers' hint records)."""

    fingerprint: bytes
    block_tokens: int
    pool_uuid: str | None


PENDING_MAX_BYTES = 64 * 1024 * 1024  # unread prompts kept for routing's follow-ups
# How long this gateway's own record of a prompt it routed to a worker counts, when that
# worker publishes hints, counted from when the worker answered (its first token, or the end
# of the try): long enough for the worker to publish the prompt's blocks (then the hints say
# whether it still holds them), not so long that the record outlives the worker's cache. A
# prompt still queued or computing at the worker counts as held however long that takes. A
# worker's cache may turn over in seconds (a CPU worker with a few thousand tokens of KV
# space); a record kept up to `own_capacity` keys promised blocks long evicted
# (bench/README.md, "Issue 19").
OWN_GRACE_S = 5.0
# How long a try routed to a worker can wait for its answer (the gateway's upstream
# timeouts; app.py passes its settings': `flight_limit_s`).
DEFAULT_FLIGHT_LIMIT_S = 320.0


def flight_limit_s(settings: Settings) -> float:
    """The longest a try waits for its answer: a connection (queued for one, connecting,
    and once more if a kept-alive one was closed), then the worker's silence until its
    first byte; and a margin."""
    return (settings.upstream_queue_timeout_s + 2 * settings.connect_timeout_s
            + settings.upstream_timeout_s + 10.0)


@dataclass
class _Flights:
    """One worker's tries in flight (oldest first), and how many of them hold each key."""

    tries: OrderedDict[int, _Try] = field(default_factory=OrderedDict)
    held: dict[str, int] = field(default_factory=dict)
    keys: int = 0


@dataclass
class _Try:
    """A request's try in flight at a worker: the hint keys held on its account."""

    keys: list[str]
    routed_at: float
    pending: tuple[str, str] | None  # its `_pending` entry, while that holds its prompt


class PrefixIndex:
    def __init__(self, client: aioredis.Redis, prefix: str, own_capacity: int = 8192,
                 pending_capacity: int = 1024, *, max_keys: int = DEFAULT_MAX_HINT_KEYS,
                 pool_search_dirs: str | Sequence[str] = DEFAULT_POOL_SEARCH_DIRS,
                 invalid: InvalidRecords | None = None,
                 lock_timeout_s: float = DEFAULT_POOL_LOCK_TIMEOUT_S,
                 busy_backoff_s: float = BUSY_BACKOFF_S,
                 flight_limit_s: float = DEFAULT_FLIGHT_LIMIT_S) -> None:
        self._client = client
        self._prefix = prefix
        self._max_keys = max(1, max_keys)  # hint keys read per worker
        self._pool_dirs = pool_dirs(pool_search_dirs)
        self.invalid = invalid if invalid is not None else InvalidRecords()
        self._hints: dict[str, WorkerHints] = {}
        # worker -> hint keys this gateway routed there -> when (oldest first)
        self._own: dict[str, OrderedDict[str, float]] = {}
        # Per worker, its tries routed and not answered yet (by the id the router gave
        # each, oldest first) and how many of them hold each hint key; which worker each
        # try went to. A try's answer ends its own keys only; one whose answer never comes
        # (its bookkeeping dropped from a full queue) ends at `flight_limit_s`: no try waits
        # longer (the gateway's timeouts).
        self._flights: dict[str, _Flights] = {}
        self._try_worker: dict[int, str] = {}
        self._flight_limit_s = flight_limit_s
        self._own_cap = own_capacity
        self._own_grace_s = OWN_GRACE_S
        self._clock = time.monotonic
        # (worker, hint key of the last block routing read) -> the prompt's later block keys,
        # not tokenized yet: read only if the prompt comes back (most never do); about how
        # many bytes the prompt behind them holds; the try that sent it there.
        # Bounded by entries and by what the prompts behind them hold (`routed`'s `size`).
        self._pending: OrderedDict[tuple[str, str],
                                   tuple[Iterator[bytes], int, int | None]] = OrderedDict()
        self._pending_cap = pending_capacity
        self._pending_bytes, self._pending_max_bytes = 0, PENDING_MAX_BYTES
        # Where the per-request state (`_own`, `_pending`, the pool's use) is touched: the
        # gateway's routing thread. Refresh hands its changes to it through `owner` (None:
        # run them at once, for a caller that uses one thread).
        self.owner: Callable[[Callable[[], None]], None] | None = None
        self._pool: KVPool | None = None
        self._pool_uuid: str | None = None
        self._pool_failed: set[str] = set()
        self._lock_timeout_s = lock_timeout_s
        # Each pool lookup's result: "ok" or the error's kind (beluga/pool_errors.py KINDS);
        # the gateway counts them (set after construction). Called on the owner thread.
        self.count_lookup: Callable[[str], None] | None = None
        self._errors = PoolErrorLog(logger, "routing")
        self._backoff = BusyBackoff(busy_backoff_s)
        self._stats: PoolStats | None = None  # the pool's statistics at the last refresh

    # -- refresh (background task) -------------------------------------------------------
    async def refresh(self, worker_ids: Iterable[str]) -> bool:
        """Re-read the hints of `worker_ids` (from the validated worker registry). False
        when Redis did not answer (the last hints stay); never raises: anything unexpected is
        logged (once per kind of error, with its traceback) and counted."""
        try:
            return await self._refresh(list(dict.fromkeys(worker_ids)))
        except (RedisError, OSError):
            return False
        except Exception as exc:
            self.invalid.report("hints", f"<refresh: {type(exc).__name__}>", "error",
                                repr(exc), action="failed", exc=exc)
            return False

    async def _refresh(self, ids: list[str]) -> bool:
        raw: list[object] = []
        per_worker = max(1, min(self._max_keys, MAX_HINT_KEYS_TOTAL // max(1, len(ids))))
        if ids:
            pipe = self._client.pipeline(transaction=False)
            for wid in ids:
                blocks = hint_blocks_key(self._prefix, wid)
                # At most MAX_RECORD_BYTES + 1 bytes of the record, at most `per_worker`
                # members of the set (a random sample of a larger one), and the set's size.
                pipe.getrange(hints_key(self._prefix, wid), 0, MAX_RECORD_BYTES)
                pipe.srandmember(blocks, per_worker)
                pipe.scard(blocks)
            raw = await pipe.execute(raise_on_error=False)
            raise_failures(raw)
        hints: dict[str, WorkerHints] = {}
        for i, wid in enumerate(ids):
            try:
                record, members, size = raw[3 * i: 3 * i + 3]
                found = self._worker_hints(wid, record, members, size, per_worker)
            except Exception as exc:  # a bug here must not cost the other workers' hints
                self.invalid.report("hints", hints_key(self._prefix, wid), "error", repr(exc),
                                    exc=exc)
                continue
            if found is not None:
                hints[wid] = found
        self._hints = hints
        self._on_owner(lambda: self._prune(ids))
        await self._maybe_attach_pool()
        self._on_owner(self._sample_stats)
        return True

    def _worker_hints(self, wid: str, raw: object, members: object, size: object,
                      read: int) -> WorkerHints | None:
        """One worker's hints from what Redis answered (None: none, or refused)."""
        key = hints_key(self._prefix, wid)
        if not raw and not isinstance(raw, BaseException):
            return None  # nothing published (yet), or expired
        try:
            if isinstance(raw, BaseException):  # WRONGTYPE: a set or list at that key
                raise InvalidRecord("wrong_type", str(raw))
            rec, dropped = load_hints(raw, self._pool_dirs)
            if rec.worker_id != wid:
                raise InvalidRecord("key_mismatch", f"hints of worker {rec.worker_id!r}")
        except InvalidRecord as exc:
            self.invalid.refused("hints", key, exc)
            return None
        if dropped is not None:
            self.invalid.report("hints", key, "pool_path", dropped, action="pool path dropped")
        blocks = hint_blocks_key(self._prefix, wid)
        if isinstance(members, BaseException) or not isinstance(members, list):
            # The record is fine: keep routing on it (keying, pool), without worker keys.
            self.invalid.report("hint_keys", blocks, "wrong_type", str(members),
                                action="ignored")
            return WorkerHints(rec, frozenset())
        keys, bad = valid_hint_keys(members)
        if bad:
            self.invalid.report("hint_keys", blocks, "hint_key",
                                f"{bad} of {len(members)} members are not hint keys",
                                action="partly ignored")
        if isinstance(size, int) and size > self._max_keys:  # more than a worker publishes
            self.invalid.report("hint_keys", blocks, "too_many",
                                f"{size} members, {read} read", action="sampled")
        return WorkerHints(rec, keys)

    async def _maybe_attach_pool(self) -> None:
        uuids = {h.record.pool_uuid for h in self._hints.values() if h.record.pool_uuid}
        # What failed is remembered only while some worker names it: bounded memory, and a
        # pool that comes back under a known UUID (a worker restarted) is tried again.
        self._pool_failed &= uuids
        if self._pool_uuid in uuids or not uuids:
            return
        for uuid in sorted(uuids - self._pool_failed)[:MAX_ATTACH_TRIES]:
            # Where the workers map it first (the same path on a shared host), then the
            # usual places (a CXL device has another /dev/dax name on every host). A path
            # is only used inside pool_search_dirs once symbolic links are resolved.
            named = {(wid, h.record.pool_path) for wid, h in self._hints.items()
                     if h.record.pool_uuid == uuid and h.record.pool_path}
            paths = []
            for wid, path in sorted(named):
                assert path is not None
                if await asyncio.to_thread(_really_inside, path, self._pool_dirs):
                    paths.append(glob.escape(path))
                else:
                    self.invalid.report("hints", hints_key(self._prefix, wid), "pool_path",
                                        "leads outside pool_search_dirs (symbolic link)",
                                        action="pool path dropped")
            try:
                pool = await asyncio.to_thread(KVPool.attach_by_uuid, uuid,
                                               [*sorted(set(paths)), *DEFAULT_CANDIDATES],
                                               prefault=False,
                                               lock_timeout_s=self._lock_timeout_s)
            except PoolError as exc:
                logger.info("pool %s is not mapped on this host (%s); routing on hints only",
                            uuid, exc)
                self._pool_failed.add(uuid)
                continue
            old, self._pool, self._pool_uuid = self._pool, pool, uuid
            if old is not None:  # closed where it may still be in use, once it is not
                self._on_owner(old.close)
            logger.info("attached pool %s at %s for routing", uuid, pool.path)
            return

    def _on_owner(self, fn: Callable[[], None]) -> None:
        if self.owner is None:
            fn()
        else:
            self.owner(fn)

    def _prune(self, ids: list[str]) -> None:
        """Forget what this gateway routed to workers no longer registered, what a worker
        whose hints say what it holds answered more than OWN_GRACE_S ago, and tries in
        flight longer than any try can be."""
        now = self._clock()
        expired = now - self._own_grace_s
        for wid in list(self._flights):
            if wid not in ids:
                for tid in list(self._flights[wid].tries):
                    self._land(tid, stamp=False, forget_rest=True)
            else:
                self._expire(wid, now)
        for wid in list(self._own):
            if wid not in ids:
                del self._own[wid]
                continue
            if wid in self._hints:
                own = self._own[wid]
                while own and next(iter(own.values())) < expired:
                    own.popitem(last=False)
        for key in [k for k in self._pending if k[0] not in ids]:
            self._drop_pending(key)

    def close(self) -> None:
        """(On the owner thread, when there is one.)"""
        pool, self._pool, self._stats = self._pool, None, None
        if pool is not None:
            pool.close()

    def _sample_stats(self) -> None:
        """Take the snapshot `pool_stats` returns (on the owner thread)."""
        pool = self._pool
        if pool is None:
            self._stats = None
            return
        try:
            self._stats = pool.stats()
        except PoolError as exc:
            self._stats = None
            self._errors.report(exc, "reading the pool's statistics")

    # -- per request ---------------------------------------------------------------------
    def keying(self, worker_ids: Sequence[str]) -> Keying | None:
        """How the workers' keys are made, from their hint records: one that shares a pool
        first (workers without a pool publish hints too; their record must not hide the
        pool from routing)."""
        found: Keying | None = None
        for wid in worker_ids:
            h = self._hints.get(wid)
            if h is not None:
                r = h.record
                found = Keying(bytes.fromhex(r.fingerprint), r.block_tokens, r.pool_uuid)
                if r.pool_uuid is not None:
                    break
        return found

    def adapter(self, worker_ids: Sequence[str], name: str) -> Adapter | None:
        """The LoRA adapter `name` as the workers' hint records describe it (the digest of
        its files), or None when none does."""
        for wid in worker_ids:
            h = self._hints.get(wid)
            digest = h.record.adapters.get(name) if h is not None else None
            if digest is not None:
                return Adapter(name, bytes.fromhex(digest))
        return None

    def remote_pool(self, keying: Keying) -> str | None:
        """The UUID of the keying's pool when it is not mapped on this host (attaching it
        here was tried and failed), so its share must be asked of a worker."""
        uuid = keying.pool_uuid
        if uuid and uuid != self._pool_uuid and uuid in self._pool_failed:
            return uuid
        return None

    def shares_pool(self, worker_id: str, pool_uuid: str) -> bool:
        h = self._hints.get(worker_id)
        return h is not None and h.record.pool_uuid == pool_uuid

    def keys(self, keying: Keying, tokens: Sequence[int], cache_salt: str) -> list[bytes]:
        return block_keys(tokens, keying.block_tokens, keying.fingerprint, cache_salt)

    def local_blocks(self, worker_id: str, keys: Sequence[bytes]) -> int:
        """Leading blocks of `keys` the worker holds (its hints or this gateway's record)."""
        hinted = self._hints.get(worker_id)
        held = hinted.keys if hinted is not None else frozenset()
        own = self._own.get(worker_id, OrderedDict())
        flying = self._held_in_flight(worker_id)
        n = 0
        for k in keys:
            h = hint_key(k)
            if h not in held and h not in own and h not in flying:
                break
            n += 1
        return n

    def match(self, keying: Keying, worker_ids: Sequence[str],
              keys: Iterable[bytes]) -> tuple[list[bytes], dict[str, int], int]:
        """Read `keys` (lazily produced, in order) only as far as anyone holds them: returns
        the keys read (the last one held by nobody, unless the prompt ran out), the leading
        blocks each worker holds, and the leading blocks the pool holds. Block keys chain, so
        once no worker and not the pool holds block i, nobody holds any block after it."""
        held: dict[str, tuple[frozenset[str], OrderedDict[str, float], dict[str, int]]] = {}
        for wid in worker_ids:
            hinted = self._hints.get(wid)
            held[wid] = (hinted.keys if hinted is not None else frozenset(),
                         self._own.get(wid, OrderedDict()), self._held_in_flight(wid))
        local = dict.fromkeys(worker_ids, 0)
        alive = list(worker_ids)
        pool = self._pool if (self._pool is not None
                              and keying.pool_uuid == self._pool_uuid) else None
        in_pool = 0
        read: list[bytes] = []
        for k in keys:
            read.append(k)
            h = hint_key(k)
            if alive:
                kept = []
                for w in alive:
                    published, own, flying = held[w]
                    if h not in published and h not in own and h not in flying:
                        continue
                    kept.append(w)
                    local[w] += 1
                    found = self._drop_pending((w, h))
                    if found is not None:  # w was sent this prompt before: key the rest now
                        self._keyed_later(w, [hint_key(k) for k in found[0]], found[1])
                        held[w] = (published, self._own.get(w, OrderedDict()),
                                   self._held_in_flight(w))
                alive = kept
            # The pool is asked once the workers' prefixes have ended (or the prompt has), all
            # keys not asked yet in one call: read[:in_pool] are in the pool, the rest unasked.
            # A failed lookup ends the pool's part (for this request) like a miss.
            if pool is not None and not alive:
                in_pool += self._pool_prefix(pool, read[in_pool:])
                if in_pool < len(read):
                    pool = None
            if not alive and pool is None:
                break
        if pool is not None and in_pool < len(read):
            in_pool += self._pool_prefix(pool, read[in_pool:])
        return read, local, in_pool

    def pool_stats(self) -> PoolStats | None:
        """The attached pool's statistics as of the last refresh (None: no pool mapped on
        this host). Never calls into the pool: safe on the event loop."""
        return self._stats

    def pool_blocks(self, keying: Keying, keys: Sequence[bytes]) -> int:
        """(On the owner thread, when there is one.)"""
        pool = self._pool
        if pool is None or not keys or keying.pool_uuid != self._pool_uuid:
            return 0
        return self._pool_prefix(pool, keys)

    def _pool_prefix(self, pool: KVPool, keys: list[bytes] | Sequence[bytes]) -> int:
        """How many leading `keys` the pool holds; 0 when it cannot say (a PoolError:
        counted and logged, or lookups paused after a busy lock)."""
        if self._backoff.active():
            return 0
        try:
            n = pool.lookup_prefix(keys)
        except PoolError as exc:
            self._backoff.note(exc)
            kind = self._errors.report(exc, "looking up a prompt's blocks (routing as if the "
                                            "pool held none)")
            self._counted(kind)
            return 0
        self._counted("ok")
        return n

    def _counted(self, result: str) -> None:
        if self.count_lookup is not None:
            self.count_lookup(result)

    def routed(self, worker_id: str, keys: Sequence[bytes],
               later: Iterator[bytes] | None = None, size: int = 0,
               try_id: int | None = None) -> None:
        """Remember that `keys` will be in this worker's cache once it has served them, and
        so will `later` (the prompt's remaining keys, read only if it comes back; `size`:
        about how many bytes the unread prompt behind it holds). With a `try_id`, they count
        as held until `answered(try_id)` (then for OWN_GRACE_S more); without one, from
        now for OWN_GRACE_S."""
        entry = None
        if later is not None and keys and size <= self._pending_max_bytes:
            entry = (worker_id, hint_key(keys[-1]))
            self._drop_pending(entry)
            self._pending[entry] = (later, size, try_id)
            self._pending_bytes += size
            while self._pending and (len(self._pending) > self._pending_cap
                                     or self._pending_bytes > self._pending_max_bytes):
                self._drop_pending(next(iter(self._pending)))
        hs = [hint_key(k) for k in keys]
        if try_id is None:
            self._stamp(worker_id, hs)
            return
        # (an id is never reused; a caller's bug must not leak)
        self._land(try_id, stamp=False, forget_rest=False)
        now = self._clock()
        self._expire(worker_id, now)  # (also while Redis is down and refresh cannot prune)
        if not hs:  # nothing to hold (and no rest pending): nothing to record
            return
        f = self._flights.setdefault(worker_id, _Flights())
        f.tries[try_id] = _Try([], now, entry)
        self._try_worker[try_id] = worker_id
        self._fly(try_id, hs)

    def _held_in_flight(self, worker_id: str) -> dict[str, int]:
        f = self._flights.get(worker_id)
        return f.held if f is not None else {}

    def _fly(self, try_id: int, hint_keys: list[str]) -> None:
        """`hint_keys` held on the account of the try (in flight: `_try_worker` has it)."""
        f = self._flights[self._try_worker[try_id]]
        t = f.tries[try_id]
        for h in hint_keys:
            f.held[h] = f.held.get(h, 0) + 1
        t.keys.extend(hint_keys)
        f.keys += len(hint_keys)
        # Bounded per worker like `_own`: 8,192 keys is 262,144 tokens of 32-token blocks
        # queued at one worker, more than its cache holds. The longest in flight go first,
        # counted as answered now (what the worker holds, its hints say after the grace).
        while f.keys > self._own_cap and len(f.tries) > 1:
            # (the try just given keys stays: its prompt's rest, keyed later, is the newest)
            oldest = next(tid for tid in f.tries if tid != try_id)
            self._land(oldest, stamp=True, forget_rest=True)

    def _expire(self, worker_id: str, now: float) -> None:
        """End the worker's tries in flight longer than any try waits (answers lost)."""
        f = self._flights.get(worker_id)
        lost = now - self._flight_limit_s
        while f is not None and f.tries and next(iter(f.tries.values())).routed_at < lost:
            self._land(next(iter(f.tries)), stamp=False, forget_rest=True)

    def _keyed_later(self, worker_id: str, later: list[str], try_id: int | None) -> None:
        """A prompt's later keys, read now that it came back, for the worker that `try_id`
        sent it to. While that try is in flight they are too (its answer ends them); once
        answered, they count from now."""
        if try_id is not None and self._try_worker.get(try_id) == worker_id:
            self._fly(try_id, later)
        else:
            self._stamp(worker_id, later)

    def answered(self, try_id: int, computed: bool = True) -> None:
        """The try `routed` with `try_id` ended its wait: the worker answered (its first
        token, or a whole answer) and, `computed`, holds the prompt: it counts as held for
        OWN_GRACE_S more, then as the worker's hints say; or the try failed before any
        answer (nothing computed): no longer held. A try no longer in flight (ended at the
        flight limit, or at the cap) is not counted again."""
        self._land(try_id, stamp=computed, forget_rest=not computed)

    def _land(self, try_id: int, *, stamp: bool, forget_rest: bool) -> None:
        """The try is no longer in flight: its keys no longer held on its account; `stamp`:
        held for the grace from now; `forget_rest`: its prompt's rest is forgotten there (a
        try whose fate is unknown or failed vouches for nothing more)."""
        wid = self._try_worker.pop(try_id, None)
        if wid is None:
            return
        f = self._flights[wid]
        t = f.tries.pop(try_id)
        for h in t.keys:
            n = f.held.get(h, 0)
            if n > 1:  # another try with this block is still in flight there
                f.held[h] = n - 1
            else:
                f.held.pop(h, None)
        f.keys -= len(t.keys)
        if not f.tries:
            del self._flights[wid]
        if stamp:
            self._stamp(wid, t.keys)
        if forget_rest and t.pending is not None:
            found = self._pending.get(t.pending)
            if found is not None and found[2] == try_id:
                self._drop_pending(t.pending)

    def _stamp(self, worker_id: str, hint_keys: Iterable[str]) -> None:
        own = self._own.setdefault(worker_id, OrderedDict())
        now = self._clock()
        for h in hint_keys:
            own[h] = now
            own.move_to_end(h)
        while len(own) > self._own_cap:
            own.popitem(last=False)


    def _drop_pending(self, entry: tuple[str, str]) -> tuple[Iterator[bytes], int | None] | None:
        """The entry's later keys and the try that sent its prompt, no longer pending."""
        found = self._pending.pop(entry, None)
        if found is None:
            return None
        self._pending_bytes -= found[1]
        return found[0], found[2]


def _really_inside(path: str, dirs: Sequence[str]) -> bool:
    """Whether `path`, symbolic links resolved, is inside one of `dirs` (also resolved)."""
    real = os.path.realpath(path)
    return any(real.startswith(os.path.realpath(d).rstrip("/") + "/") for d in dirs)
