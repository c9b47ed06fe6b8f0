"""What a hostile review of the issue-17 pool found, each now a test: several handles in
one process (vLLM's scheduler and worker sides can share one), a handle inherited across
fork(), bytes scribbled between a write and its publication, keys crafted to collide in
the index, a pin interrupted by a corrupt value, and probing pools whose lock is held."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvpool import KVPool, PoolBusyError, PoolCorruptError
from tests.kvpool import hostile_pool as h
from tests.kvpool.conftest import FP, block_for, key, reserve
from tests.kvpool.test_checksum import _mix64

MakePool = Callable[..., KVPool]


def test_two_handles_in_one_process_exclude_each_other_and_keep_their_pins(
        make_pool: MakePool, pool_path: Path) -> None:
    h1 = make_pool()
    h2 = KVPool.attach(pool_path, fingerprint=FP, lock_timeout_s=0.3)
    try:
        h1.put([key(0)], [block_for(key(0), 4096)])
        [slot] = h1.pin([key(0)])
        assert h2.sweep() == 0  # h1 is alive: same pid, same start time
        assert h2.stats().pinned_slots == 1
        assert h1._p.debug_lock()
        t0 = time.monotonic()
        with pytest.raises(PoolBusyError):
            h2.lookup_prefix([key(0)])
        assert time.monotonic() - t0 >= 0.25
        assert h1._p.debug_unlock()
        for i in range(1, 40):  # churn through h2: h1's pinned block survives
            h2.put([key(i)], [block_for(key(i), 4096)])
        buf = bytearray(4096)
        assert h1._p.read_verified(slot, buf) and bytes(buf) == block_for(key(0), 4096)
        h1.unpin([slot])
    finally:
        h2.close()


def _inherited(pool: KVPool, out: multiprocessing.Queue) -> None:
    pool.set_lock_timeout(0.3)
    t0 = time.monotonic()
    try:
        pool.lookup_prefix([key(0)])
        out.put(("returned", time.monotonic() - t0))
    except PoolBusyError:
        out.put(("busy", time.monotonic() - t0))
    pool.close()  # must not free the parent's client entry or pins


def test_a_handle_inherited_across_fork_is_a_new_client(make_pool: MakePool) -> None:
    pool = make_pool()
    pool.put([key(0)], [block_for(key(0), 4096)])
    [slot] = pool.pin([key(0)])
    assert pool._p.debug_lock()
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_inherited, args=(pool, out))
    child.start()
    verdict, _ = out.get(timeout=30)
    child.join(timeout=30)
    assert verdict == "busy"  # not the parent's token taken for a stale one of its own
    assert pool._p.debug_unlock()
    st = pool.stats()
    assert st.clients == 1 and st.pinned_slots == 1, st
    pool.unpin([slot])


def test_bytes_scribbled_between_write_and_publish_are_never_returned(
        make_pool: MakePool, pool_path: Path) -> None:
    pool = make_pool()
    [slot] = reserve(pool, [key(1)])
    pool.write(slot, b"W" * 4096)
    h.poke_bytes(pool_path, h.header(pool_path, "data_offset") + slot * 4096 + 96, b"SCRIBBLE")
    pool.complete_store([slot], [4096])  # no checksums given: the ones taken by write()
    assert pool.get([key(1)]) == []


def _key_hash(k: bytes) -> int:
    w = [int.from_bytes(k[i:i + 8], "little") for i in range(0, 32, 8)]
    return _mix64(w[0] ^ _mix64(w[1] ^ _mix64(w[2] ^ _mix64(w[3]))))


def test_keys_crafted_to_collide_cost_a_bounded_probe_not_the_pool(make_pool: MakePool
                                                                   ) -> None:
    pool = make_pool(slot_count=1024)  # index of 2048 buckets
    mask = 2047
    crafted: list[bytes] = []
    i = 0
    while len(crafted) < 300:  # 300 keys whose home is one of 4 buckets
        k = key(10_000 + i)
        i += 1
        if _key_hash(k) & mask < 4:
            crafted.append(k)
    t0 = time.monotonic()
    res = pool.put(crafted, [b"x"] * len(crafted))
    took = time.monotonic() - t0
    assert res.stored <= 140 and res.full == len(crafted) - res.stored, res
    assert took < 2.0, took
    assert pool.lookup_prefix(crafted[:1]) in (0, 1)
    assert pool.put([key(1)], [b"ordinary"]).stored == 1  # the pool still serves


def test_a_pin_interrupted_by_a_corrupt_value_leaves_no_pin(make_pool: MakePool,
                                                           pool_path: Path) -> None:
    pool = make_pool()
    keys = [key(1), key(2)]
    pool.put(keys, [b"a", b"b"])
    second = pool.pin([keys[1]])
    pool.unpin(second)
    h.set_bucket(pool_path, h.bucket_of(pool_path, second[0]), 0xFFFF0000)
    with pytest.raises(PoolCorruptError):
        pool.pin(keys)
    pool.lookup_prefix(keys)  # rebuilds
    assert pool.stats().pinned_slots == 0
    assert pool.remove(keys[0])


def test_probing_pools_whose_lock_is_held_does_not_wait(make_pool: MakePool,
                                                       pool_path: Path) -> None:
    holder = make_pool()
    assert holder._p.debug_lock()
    t0 = time.monotonic()
    found = KVPool.attach_by_uuid(holder.uuid, [str(pool_path)], fingerprint=FP,
                                  prefault=False)
    found.close()
    assert time.monotonic() - t0 < 1.0
    assert holder._p.debug_unlock()


def _die_attached(path: Path) -> None:
    """A process that attaches and dies without detaching: a dead client entry."""
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_attach_and_exit, args=(str(path),))
    child.start()
    child.join(timeout=30)


def _attach_and_exit(path: str) -> None:
    pool = KVPool.attach(path, fingerprint=FP)
    pool.lookup_prefix([key(999_999)])
    os._exit(0)  # no detach: a dead client entry


def test_a_rebuild_keeps_pinned_blocks_findable_and_stale_unpins_touch_no_other_pin(
        pool_path: Path) -> None:
    """A crowded neighbourhood (keys crafted to collide) rebuilt in slot order would drop a
    block that is pinned; and the pinner's later unpin must not take another reader's pin
    on whatever the slot holds then."""
    pool = KVPool.create(pool_path, slot_size=64, slot_count=129, fingerprint=FP)
    other = KVPool.attach(pool_path, fingerprint=FP)
    try:
        mask, home = 511, 100
        crowd: list[bytes] = []
        nextdoor = far = None
        i = 0
        while len(crowd) < 128 or nextdoor is None or far is None:
            k = key(1_000_000 + i)
            i += 1
            hh = _key_hash(k) & mask
            if hh == home and len(crowd) < 128:
                crowd.append(k)
            elif hh == home + 1 and nextdoor is None:
                nextdoor = k
            elif hh == 400 and far is None:
                far = k
        assert pool.put([far], [block_for(far, 64)]).stored == 1  # slot 0
        assert pool.put(crowd, [block_for(k, 64) for k in crowd]).stored == 128
        assert pool.remove(far)
        assert pool.put([nextdoor], [block_for(nextdoor, 64)]).stored == 1  # slot 0 again
        [pinned] = pool.pin([crowd[-1]])
        _die_attached(pool_path)
        assert pool.sweep() == 1  # a rebuild
        assert pool.lookup_prefix([crowd[-1]]) == 1 and pool.stats().pinned_slots == 1
        buf = bytearray(64)
        assert pool._p.read_verified(pinned, buf)
        z = key(5)
        assert other.put([z], [block_for(z, 64)]).stored == 1
        zs = other.pin([z])
        pool.unpin([pinned])
        assert other.stats().pinned_slots == 1  # other's pin stands
        for j in range(300):
            other.put([key(20_000 + j)], [block_for(key(20_000 + j), 64)])
        assert other._p.read_verified(zs[0], buf) and bytes(buf) == block_for(z, 64)
        other.unpin(zs)
    finally:
        other.close()
        pool.close()


def test_deferred_unpins_are_not_replayed_after_a_corrupt_value(make_pool: MakePool,
                                                                pool_path: Path) -> None:
    pool = make_pool(slot_size=64, lock_timeout_s=0.3)
    other = KVPool.attach(pool_path, fingerprint=FP, lock_timeout_s=0.3)
    try:
        pool.put([key(1)], [block_for(key(1), 64)])
        [slot] = pool.pin([key(1)])
        pool.pin([key(1)])  # pinned twice
        [r] = pool.prepare_store([key(5)])
        assert other._p.debug_lock()
        pool.complete_store([r.slot], ok=False)  # deferred abort
        pool.unpin([slot])  # deferred unpin: one of two pins
        assert other._p.debug_unlock()
        h.set_bucket(pool_path, h.bucket_of(pool_path, r.slot), 0xFFFF0000)
        with pytest.raises(PoolCorruptError):
            pool.lookup_prefix([key(1)])
        assert pool.lookup_prefix([key(1)]) == 1
        assert pool.stats().pinned_slots == 1  # the second pin stands
        for j in range(40):
            other.put([key(100 + j)], [block_for(key(100 + j), 64)])
        buf = bytearray(64)
        assert pool._p.read_verified(slot, buf)
        pool.unpin([slot])
    finally:
        other.close()
