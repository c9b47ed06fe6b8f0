"""What the gateway knows about cached prefixes: workers' hints from a real Redis, its own
routing record, and the shared pool attached by UUID."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from beluga.registry import hint_blocks_key, hints_key
from engine.hints import HintPublisher
from gateway.prefixes import Keying, PrefixIndex
from gateway.routing import lazy_block_keys
from gateway.tokenize import Prompt
from kvpool import KVPool, block_keys
from kvpool.keys import ChainMemo, Identity
from tests.support import RedisServer, pool_lock_held, scribble_index

FP = hashlib.sha256(b"model").digest()
PREFIX = "beluga:test"
TOKENS = list(range(1000, 1000 + 16 * 6))  # 6 blocks of 16


@pytest.fixture
def shm_pool() -> Iterator[KVPool]:
    path = Path(f"/dev/shm/beluga-test-prefixes-{os.getpid()}.pool")
    pool = KVPool.create(path, slot_size=4096, slot_count=32, fingerprint=FP)
    yield pool
    pool.close()
    path.unlink(missing_ok=True)


def publish(server: RedisServer, wid: str, keys: list[bytes], pool_uuid: str | None,
            pool_path: str | None = None) -> None:
    pub = HintPublisher(server.url, PREFIX, wid, FP, 16, pool_uuid, ttl_s=10, interval_s=0.05,
                        max_keys=100, pool_path=pool_path)
    pub.offer(keys)
    client = server.client()
    deadline = time.monotonic() + 5
    # The record too: with no keys the set's size is right before anything was written.
    while (client.scard(hint_blocks_key(PREFIX, wid)) != len(keys)
           or not client.exists(hints_key(PREFIX, wid))):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pub._stop.set()  # leave the hints in Redis (close() would delete them)
    pub._wake.set()


@contextlib.asynccontextmanager
async def index_on(server: RedisServer, pool_search_dirs: str = "/dev/shm",
                   **client_args: Any) -> AsyncIterator[PrefixIndex]:
    """A PrefixIndex reading `server`, closed (pool and Redis client) afterwards."""
    client = aioredis.Redis.from_url(server.url, **client_args)
    index = PrefixIndex(client, PREFIX, pool_search_dirs=pool_search_dirs)
    try:
        yield index
    finally:
        index.close()
        await client.aclose()


def recording(keys: list[bytes], handed: list[bytes]) -> Iterator[bytes]:
    """`keys`, one at a time, each noted in `handed` as it is read."""
    for k in keys:
        handed.append(k)
        yield k


def test_local_and_pool_prefixes(server: RedisServer, shm_pool: KVPool) -> None:
    keys = block_keys(TOKENS, 16, FP)
    publish(server, "w1", keys[:4], str(shm_pool.uuid))   # w1 holds 4 leading blocks
    publish(server, "w2", keys[2:], str(shm_pool.uuid))   # w2 holds blocks 2.. (no prefix)
    shm_pool.put(keys[:5], [b"x" * 100] * 5)              # the pool holds 5

    async def go() -> None:
        async with index_on(server) as index:
            assert await index.refresh(["w1", "w2", "w3"])
            keying = index.keying(["w3", "w1"])
            assert keying is not None and keying.fingerprint == FP
            assert keying.block_tokens == 16 and keying.pool_uuid == str(shm_pool.uuid)
            ks = index.keys(keying, TOKENS, "")
            assert ks == keys
            assert index.local_blocks("w1", ks) == 4
            assert index.local_blocks("w2", ks) == 0   # a prefix, not any blocks
            assert index.local_blocks("w3", ks) == 0
            assert index.pool_blocks(keying, ks) == 5  # attached the pool by its UUID
            index.routed("w3", ks)                     # this gateway just sent it to w3
            assert index.local_blocks("w3", ks) == 6
            salted = index.keys(keying, TOKENS, "tenant-b")
            assert index.local_blocks("w1", salted) == 0  # tenants never share prefixes

    asyncio.run(go())


def test_redis_down_keeps_the_last_hints(server: RedisServer) -> None:
    keys = block_keys(TOKENS, 16, FP)
    publish(server, "w1", keys[:3], None)

    async def go() -> None:
        async with index_on(server, socket_timeout=0.5, socket_connect_timeout=0.5) as index:
            try:
                assert await index.refresh(["w1"])
                server.stop()
                assert not await index.refresh(["w1"])
                assert index.local_blocks("w1", keys) == 3  # routing on what it knew
                keying = index.keying(["w1"])
                assert keying is not None and index.pool_blocks(keying, keys) == 0
            finally:
                server.start()

    asyncio.run(go())


def test_the_pool_is_found_where_the_workers_map_it(server: RedisServer,
                                                    tmp_path: Path) -> None:
    """A pool outside the usual places (/dev/dax*, /dev/shm, /dev/hugepages): the hints say
    where the workers map it, and the gateway attaches it there (checking the UUID)."""
    path = tmp_path / "odd [place]" / "p.pool"   # glob characters are taken literally
    path.parent.mkdir()
    pool = KVPool.create(path, slot_size=4096, slot_count=32, fingerprint=FP)
    try:
        keys = block_keys(TOKENS, 16, FP)
        pool.put(keys[:3], [b"x" * 100] * 3)
        publish(server, "w1", keys[:1], str(pool.uuid), str(path))

        async def go() -> None:
            async with index_on(server, pool_search_dirs=str(tmp_path)) as index:
                assert await index.refresh(["w1"])
                keying = index.keying(["w1"])
                assert keying is not None
                assert index.pool_blocks(keying, index.keys(keying, TOKENS, "")) == 3

        asyncio.run(go())
    finally:
        pool.close()


def test_match_reads_keys_only_as_far_as_anyone_holds_them(server: RedisServer,
                                                            shm_pool: KVPool) -> None:
    keys = block_keys(TOKENS, 16, FP)
    assert len(keys) >= 6
    publish(server, "w1", keys[:2], str(shm_pool.uuid))   # w1: blocks 0-1
    publish(server, "w2", keys[:1], str(shm_pool.uuid))   # w2: block 0
    shm_pool.put(keys[:3], [b"x" * 100] * 3)              # the pool: blocks 0-2
    handed: list[bytes] = []

    async def go() -> None:
        async with index_on(server) as index:
            assert await index.refresh(["w1", "w2"])
            keying = index.keying(["w1"])
            assert keying is not None
            read, local, pooled = index.match(keying, ["w1", "w2", "w3"],
                                              recording(keys, handed))
            assert (local, pooled) == ({"w1": 2, "w2": 1, "w3": 0}, 3)
            assert read == keys[:4] and handed == keys[:4]  # block 3: held by nobody, last
            index.routed("w3", read)                          # routed there: now w3 has 4
            read, local, pooled = index.match(keying, ["w1", "w3"], iter(keys))
            assert local == {"w1": 2, "w3": 4} and read == keys[:5]

    asyncio.run(go())


def test_a_prompts_later_keys_are_read_only_when_it_comes_back(server: RedisServer) -> None:
    keys = block_keys(TOKENS, 16, FP)
    publish(server, "w8", [], None)
    handed: list[bytes] = []

    async def go() -> None:
        async with index_on(server) as index:
            assert await index.refresh(["w8", "w9"])
            keying = index.keying(["w8"])
            assert keying is not None
            first = recording(keys, handed)
            read, local, _ = index.match(keying, ["w8", "w9"], first)
            assert read == keys[:1] and local == {"w8": 0, "w9": 0}
            index.routed("w9", read, first)       # sent to w2; the rest stays unread
            assert handed == keys[:1]
            # The same prompt again: w2 holds block 0, so its rest is keyed now, once.
            read, local, _ = index.match(keying, ["w8", "w9"], iter(keys))
            assert local == {"w8": 0, "w9": len(keys)} and read == keys
            assert handed == keys

    asyncio.run(go())


@pytest.mark.parametrize(("w1", "w2", "pooled"), [
    (4, 0, 5),   # the pool goes past the workers: asked key by key after them
    (5, 2, 2),   # a worker goes past the pool: the pool asked once, when w1's prefix ends
    (0, 0, 3),
    (2, 1, 0),
    (6, 0, 6),   # everyone holds the whole prompt
    (0, 0, 0),
])
def test_match_layouts_of_worker_and_pool_prefixes(
        server: RedisServer, shm_pool: KVPool, w1: int, w2: int, pooled: int) -> None:
    keys = block_keys(TOKENS, 16, FP)   # 6 keys
    if pooled:
        shm_pool.put(keys[:pooled], [b"x" * 100] * pooled)
    publish(server, "m1", keys[:w1], str(shm_pool.uuid))
    publish(server, "m2", keys[:w2], str(shm_pool.uuid))
    handed: list[bytes] = []

    async def go() -> None:
        async with index_on(server) as index:
            assert await index.refresh(["m1", "m2"])
            keying = index.keying(["m1"])
            assert keying is not None
            read, local, in_pool = index.match(keying, ["m1", "m2"], recording(keys, handed))
            assert local == {"m1": w1, "m2": w2} and in_pool == pooled
            assert read == keys[:min(len(keys), max(w1, w2, pooled) + 1)] == handed

    asyncio.run(go())


def test_lazy_block_keys_from_the_memo_equal_the_whole_prompts_keys() -> None:
    """Pieces seen before (a shared system prompt, after leftovers of various lengths) come
    from the memo and give exactly kvpool.block_keys of the whole prompt."""
    system = list(range(5000, 5000 + 75))  # not a multiple of any block size below
    memo = ChainMemo(entries=8)
    for bt in (7, 16, 32):
        for salt in ("", "tenant"):
            for head in ([], [1], list(range(2, 2 + bt + 3))):
                for question in ([9, 8, 7], list(range(300, 300 + 2 * bt))):
                    parts = [(head, None), (system, "SYSTEM"), ([42], "<|sep|>"),
                             (question, None)]
                    want = block_keys([t for ids, _ in parts for t in ids], bt, FP, salt)
                    for _ in range(2):  # the second time from the memo
                        prompt = Prompt(iter([(ids, len(ids), piece) for ids, piece in parts]),
                                        0)
                        got = lazy_block_keys(prompt, Identity(FP, salt), bt, memo)
                        assert list(got) == want
    hits = 0
    get = memo.get

    def counting(state: Any) -> Any:
        nonlocal hits
        found = get(state)
        hits += found is not None
        return found

    memo.get = counting  # type: ignore[method-assign]
    prompt = Prompt(iter([([], 0, None), (system, 75, "SYSTEM"), ([42], 1, "<|sep|>"),
                          ([9, 8, 7], 3, None)]), 0)
    keys = list(lazy_block_keys(prompt, Identity(FP, "tenant"), 32, memo))
    assert hits == 1 and keys == block_keys([*system, 42, 9, 8, 7], 32, FP, "tenant")
    assert len(memo._memo) <= 8


def test_a_prompt_read_part_way_leaves_no_memo_entry() -> None:
    memo = ChainMemo()
    system = list(range(5000, 5100))
    prompt = Prompt(iter([(system, 100, "SYSTEM")]), 0)
    keys = lazy_block_keys(prompt, Identity(FP), 16, memo)
    assert next(keys) == block_keys(system, 16, FP)[0]
    assert not memo._memo  # only a piece read to its end is remembered
    assert list(keys) == block_keys(system, 16, FP)[1:]
    assert len(memo._memo) == 1


# --- the pool in trouble: routed as if it held none, counted, never raised ------------------

@contextlib.asynccontextmanager
async def troubled_index(server: RedisServer, pool: KVPool, keys: list[bytes],
                         **kw: Any) -> AsyncIterator[tuple[PrefixIndex, Keying, list[str]]]:
    """A PrefixIndex that attached `pool` (named by w1's hints; w1 holds no keys), each
    lookup's result noted in the list it yields."""
    publish(server, "w1", [], str(pool.uuid))
    client = aioredis.Redis.from_url(server.url)
    index = PrefixIndex(client, PREFIX, pool_search_dirs="/dev/shm", **kw)
    results: list[str] = []
    index.count_lookup = results.append
    try:
        assert await index.refresh(["w1"])
        keying = index.keying(["w1"])
        assert keying is not None and index.pool_blocks(keying, keys) == 5
        assert results == ["ok"]
        results.clear()
        yield index, keying, results
    finally:
        index.close()
        await client.aclose()


def test_a_busy_pool_is_counted_and_routed_on_quickly(server: RedisServer,
                                                      shm_pool: KVPool) -> None:
    keys = block_keys(TOKENS, 16, FP)
    shm_pool.put(keys[:5], [b"x" * 100] * 5)

    async def go() -> None:
        async with troubled_index(server, shm_pool, keys) as (index, keying, results):
            stats = index.pool_stats()
            assert stats is not None and stats.used_slots == 5
            with pool_lock_held(shm_pool.path):
                t0 = time.monotonic()
                assert index.pool_blocks(keying, keys) == 0  # the default: 0.05 s
                assert time.monotonic() - t0 < 0.5
                assert results == ["busy"]
                # Backing off: the next requests do not wait for the lock again.
                t0 = time.monotonic()
                read, local, pooled = index.match(keying, ["w1"], iter(keys))
                assert (len(read), local, pooled) == (1, {"w1": 0}, 0)
                assert time.monotonic() - t0 < 0.2 and results == ["busy"]
                # The statistics are a snapshot: reading them never calls into the pool.
                assert index.pool_stats() == stats
                assert await index.refresh(["w1"])  # a refresh goes on too
            index._backoff = type(index._backoff)(0.0)
            assert index.pool_blocks(keying, keys) == 5  # the holder is gone
            assert results == ["busy", "ok"]

    asyncio.run(go())


def test_a_corrupt_or_closed_pool_is_counted_and_routed_on(server: RedisServer,
                                                           shm_pool: KVPool) -> None:
    keys = block_keys(TOKENS, 16, FP)
    shm_pool.put(keys[:5], [b"x" * 100] * 5)

    async def go() -> None:
        async with troubled_index(server, shm_pool, keys) as (index, keying, results):
            scribble_index(shm_pool.path)
            _, _, pooled = index.match(keying, ["w1"], iter(keys))
            assert pooled == 0 and results == ["corrupt"]
            assert index.pool_blocks(keying, keys) == 5  # rebuilt by the next call
            assert index._pool is not None
            index._pool.close()  # detached while routing still holds it
            assert index.pool_blocks(keying, keys) == 0
            assert results == ["corrupt", "ok", "closed"]

    asyncio.run(go())


def test_pool_lookups_are_counted_in_the_gateways_metrics() -> None:
    from gateway.metrics import GatewayMetrics
    m = GatewayMetrics("pool_aware")
    for result in ("ok", "ok", "busy", "corrupt", "timeout", "not a kind"):
        m.pool_lookup(result)
    text = m.render().decode()
    assert 'beluga_gateway_pool_lookups_total{result="ok"} 2.0' in text
    assert 'beluga_gateway_pool_lookups_total{result="busy"} 1.0' in text
    assert 'beluga_gateway_pool_lookups_total{result="corrupt"} 1.0' in text
    assert 'beluga_gateway_pool_lookups_total{result="error"} 1.0' in text  # bounded labels


@contextlib.asynccontextmanager
async def clocked(server: RedisServer, *workers: str,
                  unpublished: tuple[str, ...] = ()) -> AsyncIterator[tuple[PrefixIndex, Any]]:
    """An index on a clock the test moves (`tick(s)` moves it and refreshes), whose
    `workers` publish hints that hold nothing; `unpublished` ones publish none."""
    for w in workers:
        publish(server, w, [], None)
    async with index_on(server) as index:
        now = [1000.0]
        index._clock = lambda: now[0]
        index._flight_limit_s = 300.0
        ids = [*workers, *unpublished]

        async def tick(seconds: float) -> None:
            now[0] += seconds
            assert await index.refresh(ids)

        await tick(0)
        yield index, tick


def test_its_own_record_yields_to_the_hints_of_a_worker_that_publishes_them(
        server: RedisServer) -> None:
    """What this gateway routed counts until the worker has answered and then had time to
    publish its blocks; after that the worker's hints say what it still holds (its cache may
    have evicted the prompt long before `own_capacity` keys were routed there). A worker
    publishing no hints keeps the gateway's record."""
    keys = block_keys(TOKENS, 16, FP)

    async def go() -> None:
        async with clocked(server, "w1", unpublished=("w2",)) as (index, tick):
            index.routed("w1", keys, try_id=1)
            index.routed("w2", keys, try_id=2)
            index.answered(1)
            index.answered(2)
            await tick(4.0)                       # within the grace: still counted
            assert index.local_blocks("w1", keys) == 6
            index.routed("w1", keys[:2], try_id=3)  # routed again and answered: fresh
            index.answered(3)
            await tick(2.0)                       # past the grace for the other four
            assert index.local_blocks("w1", keys) == 2
            assert index.local_blocks("w2", keys) == 6
            await tick(10.0)
            assert index.local_blocks("w1", keys) == 0
            assert index.local_blocks("w2", keys) == 6
            index.routed("w1", keys)              # no try id: counted from now
            await tick(4.0)
            assert index.local_blocks("w1", keys) == 6
            await tick(2.0)
            assert index.local_blocks("w1", keys) == 0

    asyncio.run(go())


def test_its_own_record_counts_from_the_answer_not_from_routing(server: RedisServer) -> None:
    """A prompt queued at a busy worker longer than the grace is still held there (it will
    be once computed): the grace starts when the worker answers. Two tries in flight with
    the same blocks: the first answer does not end the second's hold. A worker no longer
    registered loses its tries in flight too."""
    keys = block_keys(TOKENS, 16, FP)

    async def go() -> None:
        async with clocked(server, "w1") as (index, tick):
            index.routed("w1", keys, try_id=1)
            index.routed("w1", keys[:3], try_id=2)  # a second try sharing three blocks
            await tick(60.0)                      # both still queued a minute later
            assert index.local_blocks("w1", keys) == 6
            read, local, _ = index.match(Keying(FP, 16, None), ["w1"], iter(keys))
            assert local == {"w1": 6} and len(read) == 6
            index.answered(1)                     # the first answers: grace from now
            index.answered(1)                     # (once only)
            await tick(4.0)
            assert index.local_blocks("w1", keys) == 6
            await tick(2.0)                       # the grace is over; the second in flight
            assert index.local_blocks("w1", keys) == 3
            index.answered(2)
            await tick(6.0)
            assert index.local_blocks("w1", keys) == 0
            index.routed("w1", keys, try_id=3)    # in flight when w1 leaves the registry
            assert await index.refresh([])
            assert index.local_blocks("w1", keys) == 0 and not index._flights

    asyncio.run(go())


def test_a_prompts_later_keys_are_held_with_the_try_that_sent_it(server: RedisServer) -> None:
    """A prompt queued at w1 comes back and is sent elsewhere (w1 is busy): the rest of its
    keys, read now, are held at w1 with the try that sent it there, until that try's answer
    and then for the grace. Once that try has answered, they count from when they are read."""
    keys = block_keys(TOKENS, 16, FP)

    async def go() -> None:
        async with clocked(server, "w1", "w2") as (index, tick):
            keying = index.keying(["w1"])
            assert keying is not None
            first = iter(keys)
            read, _, _ = index.match(keying, ["w1", "w2"], first)
            index.routed("w1", read, first, try_id=1)  # queued at w1; the rest unread
            read, local, _ = index.match(keying, ["w1", "w2"], iter(keys))
            assert local == {"w1": 6, "w2": 0}
            index.routed("w2", read, try_id=2)   # the repeat goes to w2
            await tick(60.0)                     # w1 still has not answered
            assert index.local_blocks("w1", keys) == 6
            index.answered(2)
            index.answered(1)                    # w1's first token
            await tick(4.0)
            assert index.local_blocks("w1", keys) == 6
            await tick(2.0)
            assert index.local_blocks("w1", keys) == 0
            # Sent to w1 and answered; it comes back (its later keys read now: for the
            # grace from now), goes to w2; nothing stays held at w1 past the grace.
            first = iter(keys)
            read, _, _ = index.match(keying, ["w1", "w2"], first)
            index.routed("w1", read, first, try_id=3)
            index.answered(3)
            await tick(3.0)
            read, local, _ = index.match(keying, ["w1", "w2"], iter(keys))
            assert local["w1"] == 6
            index.routed("w2", read, try_id=4)
            await tick(2.5)                      # try 3's first key: past its grace
            assert index.local_blocks("w1", keys) == 0
            index.answered(4)
            await tick(300.0)
            assert not index._flights and not index._try_worker

    asyncio.run(go())


def test_later_keys_go_with_their_own_try_only(server: RedisServer) -> None:
    """Two prompts sharing their first block, both queued at w1 (the second's routing read
    the same one key): the second's later keys are held with the second try, not credited
    to the first's answer. A try that read past the key its prompt's rest hangs on (another
    worker held more) answers for all it holds: nothing stays held in flight."""
    p1 = block_keys(TOKENS, 16, FP)
    p2 = block_keys(TOKENS[:16] + [t + 7 for t in TOKENS[16:]], 16, FP)
    assert p1[0] == p2[0] and p1[1] != p2[1]

    async def go() -> None:
        async with clocked(server, "w1", "w2") as (index, tick):
            keying = index.keying(["w1"])
            assert keying is not None
            g1, g2 = iter(p1), iter(p2)
            r1, _, _ = index.match(keying, ["w1", "w2"], g1)  # both matched before either
            r2, _, _ = index.match(keying, ["w1", "w2"], g2)  # is recorded (a burst)
            index.routed("w1", r1, g1, try_id=1)
            index.routed("w1", r2, g2, try_id=2)  # its pending entry replaces p1's
            read, local, _ = index.match(keying, ["w1", "w2"], iter(p2))  # p2 comes back
            assert local["w1"] == 6
            index.routed("w2", read, try_id=3)
            index.answered(3)
            index.answered(1)                     # p1 answers; p2 is still queued
            await tick(6.0)
            assert index.local_blocks("w1", p2) == 6   # with try 2, in flight
            index.answered(2)
            await tick(4.0)
            assert index.local_blocks("w1", p2) == 6   # its grace
            await tick(2.0)
            assert index.local_blocks("w1", p2) == 0
            assert not index._flights and not index._try_worker

    asyncio.run(go())


def test_a_try_that_failed_or_never_answers_is_not_held(server: RedisServer) -> None:
    """A try that failed before any answer computed nothing: not held, not for the grace
    either, and its prompt's later keys are forgotten (the retry elsewhere holds it). A try
    whose answer never reaches the record (its bookkeeping dropped) is held no longer than
    a try can wait for its answer; its answer, if late, ends nothing of a later try."""
    keys = block_keys(TOKENS, 16, FP)

    async def go() -> None:
        async with clocked(server, "w1", "w2") as (index, tick):
            keying = index.keying(["w1"])
            assert keying is not None
            index.routed("w1", keys, try_id=1)
            index.routed("w1", keys[:2], try_id=2)
            index.answered(1, computed=False)
            assert index.local_blocks("w1", keys) == 2   # the other try is in flight
            index.answered(2, computed=False)
            assert index.local_blocks("w1", keys) == 0
            # Fails at w1, the retry computes it at w2: the prompt is w2's, not w1's.
            first = iter(keys)
            read, _, _ = index.match(keying, ["w1", "w2"], first)
            index.routed("w1", read, first, try_id=3)
            index.answered(3, computed=False)
            index.routed("w2", read, try_id=4)
            index.answered(4)
            assert not index._pending
            # Lost answers: held up to the flight limit, and a late one ends only itself.
            index.routed("w1", keys, try_id=5)
            await tick(299.0)
            assert index.local_blocks("w1", keys) == 6
            index.routed("w1", keys[:1], try_id=6)       # routed again later: fresh
            await tick(2.0)
            assert index.local_blocks("w1", keys) == 1
            index.routed("w1", keys, try_id=7)
            index.answered(5)                             # late: try 5 had ended
            assert index.local_blocks("w1", keys) == 6
            index.answered(7, computed=False)
            assert index.local_blocks("w1", keys) == 1
            await tick(300.0)
            assert index.local_blocks("w1", keys) == 0 and not index._flights

    asyncio.run(go())


def test_the_in_flight_record_is_bounded_per_worker(server: RedisServer) -> None:
    """Tries that never answer (a gateway bug, lost answers) cannot grow the record past
    `own_capacity` keys per worker: the longest in flight there go first, counted as
    answered then (their prompts' rest forgotten). One worker's flood ends none of another
    worker's tries. A try with no keys is not recorded at all."""
    p = block_keys(TOKENS, 16, FP)

    async def go() -> None:
        async with clocked(server, "w1", "w2") as (index, tick):
            index._own_cap = 64
            keying = index.keying(["w1"])
            assert keying is not None
            first = iter(p)
            read, _, _ = index.match(keying, ["w1", "w2"], first)
            index.routed("w2", read, first, try_id=1000)      # P queued at w2
            for i in range(100):
                index.routed("w1", block_keys(list(range(i * 1000, i * 1000 + 96)), 16, FP),
                             try_id=i)
                index.routed("w1", [], try_id=10_000 + i)     # keyless: nothing to hold
            f = index._flights["w1"]
            assert len(f.held) == 60 and f.keys == 60
            assert list(f.tries) == list(range(90, 100))
            assert len(index._try_worker) == 11             # w1's ten and w2's one
            assert index.local_blocks("w1", block_keys(list(range(89_000, 89_096)), 16,
                                                       FP)) == 6   # evicted: for the grace
            assert index.local_blocks("w2", p) == 1 and 1000 in index._flights["w2"].tries
            # A try evicted at the cap that then fails vouches for nothing more there.
            index._own_cap = 4
            first = iter(p)
            read, _, _ = index.match(keying, ["w1"], first)
            index.routed("w1", read, first, try_id=2000)     # P sent to w1 as well
            for i in range(5):
                index.routed("w1", block_keys(list(range(i * 1000, i * 1000 + 16)), 16, FP),
                             try_id=3000 + i)
            assert 2000 not in index._try_worker
            assert not any(v[2] == 2000 for v in index._pending.values())
            index.answered(2000, computed=False)
            _, local, _ = index.match(keying, ["w1"], iter(p))
            assert local == {"w1": 1}

    asyncio.run(go())


def test_the_flight_limit_holds_while_the_hints_cannot_be_read(server: RedisServer) -> None:
    """Routing goes on while Redis is down (no refresh prunes): a try whose answer was lost
    still ends at the flight limit, at the next routing to that worker."""
    keys = block_keys(TOKENS, 16, FP)

    async def go() -> None:
        async with clocked(server, "w1") as (index, tick):
            now = [2000.0]
            index._clock = lambda: now[0]
            index.routed("w1", keys, try_id=1)
            now[0] += 301.0
            index.routed("w1", keys[:1], try_id=2)
            assert index.local_blocks("w1", keys) == 1 and 1 not in index._try_worker

    asyncio.run(go())
