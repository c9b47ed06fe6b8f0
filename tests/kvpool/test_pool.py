from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from kvpool import (
    KVPool,
    Outcome,
    PoolCorruptError,
    PoolError,
    PoolExistsError,
    PoolFingerprintError,
    PoolFormatError,
    PoolGeometryError,
    PoolIOError,
    PoolNotFoundError,
)
from tests.kvpool.blocks import small_tmpfs
from tests.kvpool.conftest import FP, block_for, key, reserve

MakePool = Callable[..., KVPool]


def test_create_sets_owner_only_permissions_and_a_header(make_pool: MakePool,
                                                          pool_path: Path) -> None:
    pool = make_pool()
    assert stat.S_IMODE(os.stat(pool_path).st_mode) == 0o600
    assert pool.slot_size == 4096 and pool.slot_count == 16
    assert pool.uuid.version == 4
    with open(pool_path, "rb") as f:
        assert f.read(8) == b"BELUGAKV"


def test_put_get_round_trip_and_prefix(make_pool: MakePool) -> None:
    pool = make_pool()
    keys = [key(i) for i in range(6)]
    assert pool.lookup_prefix(keys) == 0
    res = pool.put(keys[:4], [block_for(k, 4096) for k in keys[:4]])
    assert (res.stored, res.duplicate, res.full) == (4, 0, 0)
    assert pool.lookup_prefix(keys) == 4
    assert pool.lookup_prefix([keys[1]] + keys) == 5  # any chain, counted from its start
    assert pool.lookup_prefix([keys[5]] + keys) == 0
    assert pool.get(keys) == [block_for(k, 4096) for k in keys[:4]]
    short = pool.put([keys[4]], [b"abc"])
    assert short.stored == 1 and pool.get([keys[4]]) == [b"abc"]


def test_same_block_is_stored_once(make_pool: MakePool) -> None:
    pool = make_pool()
    k = key(1)
    assert pool.put([k], [b"first"]).stored == 1
    again = pool.put([k], [b"second"])
    assert (again.stored, again.duplicate) == (0, 1)
    assert pool.get([k]) == [b"first"]  # first writer wins
    assert pool.stats().used_slots == 1


def test_a_key_being_written_is_a_duplicate_for_others(make_pool: MakePool,
                                                       pool_path: Path) -> None:
    a = make_pool()
    b = KVPool.attach(pool_path, fingerprint=FP)
    try:
        (slot,) = reserve(a, [key(1)])
        assert [r.outcome for r in b.prepare_store([key(1)])] == [Outcome.DUPLICATE]
        assert b.lookup_prefix([key(1)]) == 0  # not visible before complete_store
        a.write(slot, b"x" * 4096)
        a.complete_store([slot], [4096])
        assert b.get([key(1)]) == [b"x" * 4096]
    finally:
        b.close()


def test_aborted_store_frees_the_slot(make_pool: MakePool) -> None:
    pool = make_pool()
    slots = reserve(pool, [key(1), key(2)])
    pool.complete_store(slots, ok=False)
    assert pool.lookup_prefix([key(1)]) == 0
    assert pool.stats().used_slots == 0


def test_eviction_is_lru_like_and_never_takes_pinned(make_pool: MakePool) -> None:
    pool = make_pool(slot_count=4)
    keys = [key(i) for i in range(8)]
    pool.put(keys[:4], [b"a"] * 4)
    with pool.pinned(keys[:2]) as slots:
        assert len(slots) == 2
        res = pool.put(keys[4:6], [b"b"] * 2)
        assert res.stored == 2
        assert pool.lookup_prefix(keys[:2]) == 2  # pinned survived
        assert pool.lookup_prefix(keys[2:4]) == 0  # unpinned were evicted
    st = pool.stats()
    assert st.evictions == 2 and st.pinned_slots == 0 and st.used_slots == 4


def test_full_when_everything_is_pinned_returns_at_once(make_pool: MakePool) -> None:
    pool = make_pool(slot_count=2)
    pool.put([key(1), key(2)], [b"a", b"b"])
    with pool.pinned([key(1), key(2)]):
        res = pool.prepare_store([key(3), key(4)])
        assert [r.outcome for r in res] == [Outcome.FULL, Outcome.FULL]
        assert pool.put([key(5)], [b"c"]).full == 1
    assert pool.stats().full == 3


def test_remove_skips_pinned_blocks(make_pool: MakePool) -> None:
    pool = make_pool()
    pool.put([key(1)], [b"a"])
    with pool.pinned([key(1)]):
        assert not pool.remove(key(1))
    assert pool.remove(key(1))
    assert not pool.remove(key(1))


def test_index_survives_heavy_churn(make_pool: MakePool) -> None:
    pool = make_pool(slot_count=32)
    for i in range(2000):
        pool.put([key(i)], [block_for(key(i), 64)])
        if i % 3 == 0:
            pool.remove(key(i))
    alive = [i for i in range(1968, 2000) if i % 3]
    assert all(pool.get([key(i)]) == [block_for(key(i), 64)] for i in alive)


def test_stats_count_bytes_and_hits(make_pool: MakePool) -> None:
    pool = make_pool()
    pool.put([key(1), key(2)], [b"x" * 100, b"y" * 50])
    pool.lookup_prefix([key(1), key(2), key(3)])
    pool.get([key(1)])
    st = pool.stats()
    assert (st.inserts, st.bytes_in, st.hits, st.misses, st.bytes_out) == (2, 150, 2, 1, 100)


@pytest.mark.parametrize("coherence", ["none", "flush"])
def test_gather_and_scatter_move_strided_blocks(make_pool: MakePool, coherence: str) -> None:
    pool = make_pool(slot_size=256, coherence=coherence)
    # An "engine cache": 2 layers, 8 blocks each, K and V segments of 64 bytes per block.
    layers = [bytearray(os.urandom(8 * 128)) for _ in range(2)]
    addrs = [ctypes.addressof((ctypes.c_char * len(b)).from_buffer(b)) for b in layers]
    segments = [(a + off, 128, 64) for a in addrs for off in (0, 64)]
    slots = reserve(pool, [key(1), key(2)])
    pool.gather(slots, [3, 6], segments)
    pool.complete_store(slots, [256, 256])
    expect = b"".join(bytes(layers[layer][6 * 128 + o:6 * 128 + o + 64])
                      for layer in range(2) for o in (0, 64))
    assert pool.get([key(2)]) == [expect]
    dest = [bytearray(8 * 128) for _ in range(2)]
    daddrs = [ctypes.addressof((ctypes.c_char * len(b)).from_buffer(b)) for b in dest]
    with pool.pinned([key(1), key(2)]) as pinned:
        pool.scatter(pinned, [0, 7], [(a + off, 128, 64) for a in daddrs for off in (0, 64)])
    for layer in range(2):
        assert dest[layer][0:128] == layers[layer][3 * 128:4 * 128]
        assert dest[layer][7 * 128:8 * 128] == layers[layer][6 * 128:7 * 128]


@pytest.mark.parametrize("coherence", ["none", "flush"])
def test_scatter_verifies_checksums_and_reports_scribbled_blocks(make_pool: MakePool,
                                                                 coherence: str) -> None:
    pool = make_pool(slot_size=256, coherence=coherence)
    src = bytearray(os.urandom(4 * 256))
    base = ctypes.addressof((ctypes.c_char * len(src)).from_buffer(src))
    seg = [(base, 256, 256)]
    keys = [key(i) for i in range(4)]
    slots = reserve(pool, keys)
    sums = pool.gather(slots, [0, 1, 2, 3], seg)
    assert len(sums) == 4 and all(s != 0 for s in sums) and len(set(sums)) == 4
    pool.complete_store(slots, [256] * 4, checksums=sums)
    # Stored bound to each block's key: the same bytes under another key do not verify.
    stored = [pool.checksum(s) for s in slots]
    assert all(stored) and stored != sums and len(set(stored)) == 4

    # Scribble over 3 bytes of block 2 with plain stores (a stray writer, a bad DIMM...).
    with pool.pinned(keys) as pinned:
        target = pool._p.slot_address(pinned[2]) + 17
    ctypes.memmove(target, bytes(b ^ 0xFF for b in src[2 * 256 + 17:2 * 256 + 20]), 3)
    out = bytearray(4 * 256)
    obase = ctypes.addressof((ctypes.c_char * len(out)).from_buffer(out))
    with pool.pinned(keys) as pinned:
        failed = pool.scatter(pinned, [0, 1, 2, 3], [(obase, 256, 256)])
        assert failed == [2]
        assert pool.scatter(pinned, [0, 1, 2, 3], [(obase, 256, 256)], verify=False) == []
    assert out[:512] == src[:512] and out[768:] == src[768:]
    # get() never returns a block that fails its checksum: the prefix ends before it.
    assert pool.get(keys) == [bytes(src[0:256]), bytes(src[256:512])]
    # A slot shorter than the segments ask for fails too.
    short = reserve(pool, [key(9)])
    pool.gather(short, [0], seg)
    pool.complete_store(short, [100])
    with pool.pinned([key(9)]) as pinned:
        assert pool.scatter(pinned, [0], [(obase, 256, 256)]) == [0]


def test_complete_store_rejects_mismatched_checksums(make_pool: MakePool) -> None:
    pool = make_pool()
    slots = reserve(pool, [key(1), key(2)])
    with pytest.raises(PoolError, match="checksums and slots differ"):
        pool.complete_store(slots, [4096, 4096], checksums=[1])
    pool.complete_store(slots, ok=False)


def test_flush_mode_round_trips(make_pool: MakePool, pool_path: Path) -> None:
    pool = make_pool(coherence="flush")
    assert pool.coherence == "flush"
    pool.put([key(1)], [block_for(key(1), 4096)])
    other = KVPool.attach(pool_path, fingerprint=FP)
    try:
        assert other.coherence == "flush"
        assert other.get([key(1)]) == [block_for(key(1), 4096)]
    finally:
        other.close()


# --- bad inputs -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "kw",
    [{"slot_size": 0}, {"slot_size": 100}, {"slot_count": 0}, {"fingerprint": b"x" * 33},
     {"coherence": "sometimes"}, {"max_clients": 0}],
)
def test_bad_create_arguments(make_pool: MakePool, pool_path: Path, kw: dict[str, object]
                              ) -> None:
    with pytest.raises(PoolError):
        make_pool(**kw)
    assert not pool_path.exists()


def test_create_refuses_an_existing_file(make_pool: MakePool, pool_path: Path) -> None:
    make_pool()
    with pytest.raises(PoolExistsError):
        KVPool.create(pool_path, slot_size=4096, slot_count=16, fingerprint=FP)


def test_bad_keys_and_slots(make_pool: MakePool) -> None:
    pool = make_pool()
    with pytest.raises(PoolError):
        pool.lookup_prefix([b"short"])
    with pytest.raises(PoolError):
        pool.read(99, bytearray(10))
    with pytest.raises(PoolError):
        pool.write(0, b"x" * 5000)
    with pytest.raises(PoolError):
        pool.put([key(1)], [])


def test_attach_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PoolIOError):
        KVPool.attach(tmp_path / "nope.pool")


def snapshot(path: Path) -> bytes:
    return path.read_bytes()


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda b: b"NOTAPOOL" + b[8:], PoolFormatError),
        (lambda b: b[:8] + (99).to_bytes(4, "little") + b[12:], PoolFormatError),
        (lambda b: b[:24] + (8192).to_bytes(8, "little") + b[32:], PoolCorruptError),
        (lambda b: b[:80] + (12345).to_bytes(8, "little") + b[88:], PoolCorruptError),
        (lambda b: b[: len(b) // 2], PoolCorruptError),
        (lambda b: b[:100], PoolCorruptError),
        (lambda b: b"\0" * 8 + b[8:], PoolFormatError),
    ],
)
def test_scribbled_or_truncated_pools_are_refused_unchanged(
        make_pool: MakePool, pool_path: Path, mutate: Callable[[bytes], bytes],
        error: type[PoolError]) -> None:
    make_pool().close()
    bad = mutate(snapshot(pool_path))
    pool_path.write_bytes(bad)
    with pytest.raises(error):
        KVPool.attach(pool_path, fingerprint=FP, wait_init_s=0.05)
    assert snapshot(pool_path) == bad  # attach never "repairs" a foreign pool


def test_a_pool_of_another_release_is_refused_saying_what_to_do(make_pool: MakePool,
                                                                pool_path: Path) -> None:
    make_pool().close()
    b = snapshot(pool_path)
    pool_path.write_bytes(b[:8] + (1).to_bytes(4, "little") + b[12:])  # format 1 (checksum v1)
    with pytest.raises(PoolFormatError, match=r"has pool format 1; this build reads format 3 "
                                              r"\(.*only a cache, so delete it once no process"):
        KVPool.attach(pool_path, fingerprint=FP, wait_init_s=0.05)


def test_foreign_model_or_geometry_is_refused(make_pool: MakePool, pool_path: Path) -> None:
    make_pool()
    with pytest.raises(PoolFingerprintError):
        KVPool.attach(pool_path, fingerprint=b"\1" * 32)
    with pytest.raises(PoolGeometryError):
        KVPool.attach(pool_path, fingerprint=FP, slot_size=8192)


def test_open_creates_then_attaches(pool_path: Path) -> None:
    a = KVPool.open(pool_path, slot_size=4096, slot_count=8, fingerprint=FP)
    b = KVPool.open(pool_path, slot_size=4096, slot_count=8, fingerprint=FP)
    try:
        assert a.uuid == b.uuid and b.stats().clients == 2
    finally:
        a.close()
        b.close()


def test_close_releases_pins_and_unfinished_stores(make_pool: MakePool,
                                                   pool_path: Path) -> None:
    a = make_pool()
    a.put([key(1)], [b"a"])
    b = KVPool.attach(pool_path, fingerprint=FP)
    b.pin([key(1)])
    reserve(b, [key(2)])
    assert a.stats().pinned_slots == 1 and a.stats().writing_slots == 1
    b.close()
    st = a.stats()
    assert (st.pinned_slots, st.writing_slots, st.clients, st.used_slots) == (0, 0, 1, 1)


def test_attach_by_uuid_finds_the_pool_under_any_name(tmp_path: Path) -> None:
    a = KVPool.create(tmp_path / "a.pool", slot_size=4096, slot_count=4, fingerprint=FP)
    b = KVPool.create(tmp_path / "b.pool", slot_size=4096, slot_count=4, fingerprint=FP)
    (tmp_path / "junk.pool").write_bytes(b"not a pool" * 1000)
    try:
        b.put([key(1)], [b"in b"])
        found = KVPool.attach_by_uuid(str(b.uuid), [str(tmp_path / "*.pool")])
        assert found.path == str(tmp_path / "b.pool")
        assert found.get([key(1)]) == [b"in b"]
        found.close()
        assert a.stats().clients == 1 and b.stats().clients == 1  # probes detached
        with pytest.raises(PoolNotFoundError):
            KVPool.attach_by_uuid("00000000-0000-4000-8000-000000000000",
                                  [str(tmp_path / "*.pool")])
    finally:
        a.close()
        b.close()


def test_a_failed_put_leaves_no_reserved_slot(make_pool: MakePool) -> None:
    pool = make_pool()
    with pytest.raises(PoolError):
        pool.put([key(1), key(2), key(3)], [b"ok", b"x" * 5000, b"never"])  # 2nd too big
    st = pool.stats()
    assert (st.writing_slots, st.used_slots) == (0, 0)
    assert pool.lookup_prefix([key(1)]) == 0


def test_a_pool_file_appears_only_once_complete(pool_path: Path) -> None:
    """Creation builds under a private name and links the finished pool into place."""
    leftovers = lambda: sorted(p.name for p in pool_path.parent.iterdir())  # noqa: E731
    pool = KVPool.create(pool_path, slot_size=4096, slot_count=8, fingerprint=FP)
    try:
        assert leftovers() == [pool_path.name]
        # The published file already carries its header: an attacher needs no waiting.
        assert KVPool.attach(pool_path, fingerprint=FP, wait_init_s=0.0).uuid == pool.uuid
    finally:
        pool.close()


def test_an_abandoned_build_is_swept_and_a_live_one_kept(pool_path: Path) -> None:
    import fcntl

    dead = pool_path.parent / f"{pool_path.name}.building.4242.0000dead"
    dead.write_bytes(b"\0" * 8192)              # sized, nobody holds its lock: abandoned
    live = pool_path.parent / f"{pool_path.name}.building.4243.00001ive"
    live.write_bytes(b"\0" * 8192)
    other = pool_path.parent / "other.pool.building.1.00000000"
    other.write_bytes(b"\0" * 8192)             # another pool's build: not ours to sweep
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)        # a creator still building
        pool = KVPool.create(pool_path, slot_size=4096, slot_count=8, fingerprint=FP)
        pool.close()
    assert not dead.exists()
    assert live.exists() and other.exists()


def test_a_full_filesystem_fails_at_create_not_later(tmp_path: Path) -> None:
    """A 16 MiB tmpfs and a 40 MiB pool: a clear PoolIOError at create, no file left behind
    (not a SIGBUS on some later copy)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    with small_tmpfs(tmp_path / "small") as mnt:
        if mnt is None:
            pytest.skip("cannot mount tmpfs here")
        with pytest.raises(PoolIOError, match="not enough space"):
            KVPool.create(mnt / "big.pool", slot_size=65536, slot_count=512, fingerprint=FP)
        assert list(mnt.iterdir()) == []
        small = KVPool.create(mnt / "fits.pool", slot_size=4096, slot_count=64, fingerprint=FP)
        small.close()
