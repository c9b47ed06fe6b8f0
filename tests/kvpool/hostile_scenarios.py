"""The hostile scenarios of test_hostile_pool, one function per case, each run in a fresh
interpreter by hostile_pool.run_in_child: it asserts and exits 0, or fails the test. This
module does not import pytest: every child imports it, and pytest costs more to import
than most scenarios take to run.

The scribbles target pool format 3 (layout.h): lock tokens naming a client entry with the
full identity of its process (pid, start time, pid namespace, host); the offsets come from
tests/kvpool/hostile_pool.py, checked against layout.h's static_asserts and against this
process's own client entry before a fake one is written.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from kvpool import (
    KVPool,
    PoolArgumentError,
    PoolBusyError,
    PoolClosedError,
    PoolCorruptError,
    PoolError,
    PoolPermissionError,
)
from tests.kvpool import hostile_pool as h
from tests.kvpool.blocks import FP, block_for, key

SLOT = 4096


# -- shared pieces of the scenarios (run in the child) --------------------------------------
def new_pool(path: str, *, slot_count: int = 16, slot_size: int = SLOT,
             **options: Any) -> KVPool:
    """A small pool (8 clients of 64 pins: a few MiB)."""
    return KVPool.create(path, slot_size=slot_size, slot_count=slot_count, fingerprint=FP,
                         max_clients=8, max_pins=64, **options)


def attach(path: str, **options: Any) -> KVPool:
    return KVPool.attach(path, fingerprint=FP, **options)


def fill(pool: KVPool, n: int, first: int = 0) -> list[bytes]:
    keys = [key(i) for i in range(first, first + n)]
    res = pool.put(keys, [block_for(k, SLOT) for k in keys])
    assert res.stored == n, res
    return keys


def slot_holding(path: str, k: bytes) -> int:
    """The slot whose metadata carries key `k` (read from the file)."""
    for s in range(int(h.header(path, "slot_count"))):
        if h.slot_field(path, s, "key") == k and h.slot_field(path, s, "state") == h.READY:
            return s
    raise AssertionError("key not stored")


def no_wrong_block(pool: KVPool, keys: list[bytes]) -> None:
    """get() returns, per key, nothing or exactly that key's bytes (a PoolCorruptError is
    allowed: the pool is being repaired)."""
    for k in keys:
        got, err = h.attempt(partial(pool.get, [k]), [PoolCorruptError])
        if err is None:
            assert got in ([], [block_for(k, SLOT)]), f"get returned a wrong block for {k.hex()}"


def usable_afterwards(path: str, keys: list[bytes]) -> None:
    """A fresh handle stores and reads new blocks (after at most two typed refusals while
    the pool repairs itself), and never returns a wrong block of the old ones; or attach is
    refused with PoolCorruptError every time."""
    pool = None
    for _ in range(3):
        pool, err = h.attempt(lambda: attach(path), [PoolCorruptError])
        if pool is not None:
            break
        h.note(f"attach refused: {err!r}")
    if pool is None:
        h.note("typed-refused")
        return
    fresh = [key(5000 + i) for i in range(2)]
    blocks = [block_for(k, SLOT) for k in fresh]
    for _ in range(3):
        got, err = h.attempt(lambda: (pool.put(fresh, blocks), pool.get(fresh))[1],
                             [PoolCorruptError])
        if got == blocks:
            break
        h.note(f"round trip: {err!r}")
    else:
        raise AssertionError("a fresh handle could not put and get after the scribble")
    no_wrong_block(pool, keys)
    h.note("usable")


def expect(fn: Callable[[], Any], error: type[BaseException], what: str) -> BaseException:
    """`fn` must raise `error` (a kvpool class): anything else is the failure described."""
    try:
        result = fn()
    except error as exc:
        h.note(f"{what}: {type(exc).__name__}: {exc}")
        return exc
    except BaseException as exc:
        raise AssertionError(f"{what}: raised {type(exc).__module__}.{type(exc).__qualname__}"
                             f" ({exc}), expected {error.__qualname__}") from exc
    raise AssertionError(f"{what}: returned {result!r}, expected {error.__qualname__}")


# ===========================================================================================
# 1. Scribbled shared metadata
# ===========================================================================================
def scenario_scribble(path: str, case: str) -> None:
    pool = new_pool(path)
    keys = fill(pool, 8)
    op: Callable[[], Any]
    if case == "clock-hand":  # format 2: SIGSEGV (slot_at(hand) far past the mapping)
        h.set_header(path, "clock_hand", 1 << 32)
        op = lambda: pool.put([key(100)], [block_for(key(100), SLOT)])  # noqa: E731
    elif case == "index-full":  # format 2: put loops forever in index_insert, lock held
        n = int(h.header(path, "slot_count"))
        cap = int(h.header(path, "index_capacity"))
        h.poke_bytes(path, int(h.header(path, "index_offset")),
                     b"".join((b % n + 1).to_bytes(4, "little") for b in range(cap)))
        op = lambda: pool.put([key(100)], [block_for(key(100), SLOT)])  # noqa: E731
    elif case == "bad-bucket":  # format 2: SIGSEGV in index_erase (slot_at(bucket - 1))
        b = h.bucket_of(path, slot_holding(path, keys[3]))
        cap = int(h.header(path, "index_capacity"))
        h.set_bucket(path, (b + 1) % cap, 0x7FFFFFF0)
        op = lambda: pool.remove(keys[3])  # noqa: E731
    elif case == "pin-count":  # format 2: SIGSEGV in unpin (table[npins - 1] far away)
        slots = pool.pin(keys[:2])
        h.check_own_entry(path, pool._p.client_index)
        h.set_client_field(path, pool._p.client_index, "npins", 0xFFFFFFF0)
        op = lambda: pool.unpin(slots)  # noqa: E731
    elif case == "slot-length":  # format 2: MemoryError from get (bytearray(2**62))
        h.set_slot_field(path, slot_holding(path, keys[2]), "length", 1 << 62)
        op = lambda: pool.get(keys[2:3])  # noqa: E731
    else:
        raise AssertionError(case)
    result, err = h.attempt(op, [PoolCorruptError])
    h.note(f"{case}: " + (f"typed {err!r}" if err else f"no error, {result!r:.60}"))
    if case == "slot-length" and err is None:
        assert result in ([], [block_for(keys[2], SLOT)]), "get returned a wrong block"
    no_wrong_block(pool, keys)
    usable_afterwards(path, keys)
    os._exit(0)  # skip detaching a handle whose metadata was scribbled


def scenario_random_scribbles(path: str, seed: int) -> None:
    """Random values (random, all-ones, small, slot_count, top bit) over the metadata
    regions, with a second live handle holding pins; then every operation either works
    (returning no wrong block) or raises PoolCorruptError."""
    rng = random.Random(seed)
    pool = new_pool(path)
    keys = fill(pool, 12)
    other = attach(path)
    pinned = other.pin(keys[:3])
    regions = h.regions(path)
    n = int(h.header(path, "slot_count"))
    for _ in range(24):
        lo, hi = regions[rng.choice(sorted(regions))]
        width = rng.choice([4, 8])
        off = lo + rng.randrange((hi - lo) // width) * width
        bits = width * 8
        value = rng.choice([rng.getrandbits(bits), (1 << bits) - 1, rng.randrange(64), n,
                            1 << (bits - 1)])
        h.poke(path, off, "<I" if width == 4 else "<Q", value)
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("lookup_prefix", lambda: pool.lookup_prefix(keys)),
        ("get", lambda: no_wrong_block(pool, keys)),
        ("put", lambda: pool.put([key(200), key(201)],
                                 [block_for(key(200), SLOT), block_for(key(201), SLOT)])),
        ("unpin", lambda: other.unpin(pinned)),
        ("pin", lambda: other.unpin(other.pin(keys))),
        ("remove", lambda: pool.remove(keys[5])),
        ("stats", lambda: pool.stats()),
        ("sweep", lambda: pool.sweep()),
        ("other.get", lambda: no_wrong_block(other, keys)),
    ]
    for name, step in steps:
        _, err = h.attempt(step, [PoolCorruptError])
        h.note(f"{name}: {err!r}" if err else f"{name}: ok")
    no_wrong_block(pool, keys + [key(200), key(201)])
    usable_afterwards(path, keys)
    os._exit(0)


SCRIBBLES = ["clock-hand", "index-full", "bad-bucket", "pin-count", "slot-length"]
RANDOM_SEEDS = range(10)


# ===========================================================================================
# 2. Arithmetic that wraps
# ===========================================================================================
WRAP = 1 << 64


def _neighbours(pool: KVPool, path: str) -> tuple[int, bytes]:
    """Reserve a slot s whose neighbour s - 1 holds a published block; (s, that key)."""
    keys = fill(pool, 4)
    (r,) = pool.prepare_store([key(50)])
    s = r.slot
    assert s >= 1, s
    (k,) = [k for k in keys if slot_holding(path, k) == s - 1]
    return s, k


def scenario_wrap(path: str, case: str) -> None:
    if case == "create-geometry":  # 2**58 * 64 == 2**64: a 0-byte data region
        made, err = h.attempt(lambda: KVPool.create(
            path, slot_size=1 << 58, slot_count=64, fingerprint=FP, max_clients=8, max_pins=64),
            [PoolArgumentError])
        if err is not None:
            h.note(f"refused: {err!r}")
            return
        made.put([key(i) for i in range(4)], [b"x" * 64] * 4)  # format 2: SIGSEGV at slot 1
        raise AssertionError("create accepted slot_size * slot_count == 2**64")
    if case == "create-geometry-in-limits":
        # 2**34 (the largest slot) * 2**30 slots == 2**64: within each limit, the product
        # wraps. Format 2 made the data region 0 bytes and the metadata ~68 GiB: run on a
        # 16 MiB tmpfs (the test mounts it), so format 2 failed with ENOSPC, not a host OOM.
        _, err = h.attempt(lambda: KVPool.create(
            path, slot_size=1 << 34, slot_count=1 << 30, fingerprint=FP, max_clients=8,
            max_pins=64, prefault=False), [PoolArgumentError])
        assert err is not None, "create accepted slot_size * slot_count == 2**64"
        h.note(f"refused: {err!r}")
        assert not os.listdir(os.path.dirname(path)), "create left a file behind"
        return
    if case == "attach-geometry":  # slot_size + 2**58: the same layout, a valid checksum
        new_pool(path, slot_count=64).close()
        h.set_header(path, "slot_size", SLOT + (1 << 58), fix_checksum=True)
        pool, err = h.attempt(lambda: attach(path), [PoolCorruptError])
        if err is not None:
            h.note(f"refused: {err!r}")
            return
        pool.put([key(i) for i in range(4)], [b"x" * 64] * 4)  # format 2: SIGSEGV at slot 1
        raise AssertionError("attach accepted slot_size * slot_count wrapping past 2**64")
    pool = new_pool(path)
    buf = ctypes.create_string_buffer(2 * SLOT)
    base = ctypes.addressof(buf)
    if case == "write-offset":  # format 2: writes the last 64 bytes of the neighbour slot
        s, neighbour = _neighbours(pool, path)
        expect(lambda: pool.write(s, b"\xee" * 64, offset=WRAP - 64), PoolArgumentError,
               "write(offset=2**64-64)")
        assert pool.get([neighbour]) == [block_for(neighbour, SLOT)], "neighbour damaged"
    elif case == "read-offset":  # format 2: returns the neighbour's last 64 bytes
        s, neighbour = _neighbours(pool, path)
        pool.write(s, block_for(key(50), SLOT))
        pool.complete_store([s], [SLOT])
        pool.pin([key(50)])
        out = bytearray(64)
        expect(lambda: pool.read(s, out, offset=WRAP - 64), PoolArgumentError,
               "read(offset=2**64-64)")
        assert bytes(out) != block_for(neighbour, SLOT)[-64:], "neighbour's bytes returned"
    elif case in ("gather-sum", "scatter-sum"):  # format 2: memcpy of 2**64 - 64 bytes
        segments = [(base, 0, WRAP - 64), (base, 0, 128)]  # sum: 64 modulo 2**64
        if case == "gather-sum":
            (r,) = pool.prepare_store([key(60)])
            slots = [r.slot]
            fn: Callable[[], Any] = lambda: pool.gather(slots, [0], segments)  # noqa: E731
        else:
            keys = fill(pool, 1)
            slots = pool.pin(keys)
            fn = lambda: pool.scatter(slots, [0], segments)  # noqa: E731
        expect(fn, PoolArgumentError, f"{case.split('-')[0]} with segment sizes summing "
                                      "past 2**64")
    elif case == "stride-wrap":  # block_id * stride == 2**64: engine address wraps to base
        (r,) = pool.prepare_store([key(60)])
        expect(lambda: pool.gather([r.slot], [4], [(base, 1 << 62, 64)]),
               PoolArgumentError, "gather with block_id * stride == 2**64")
    elif case == "unpin-2^32":  # format 2: SIGSEGV (the table entry matches s, then slot_at)
        keys = fill(pool, 2)
        (s,) = pool.pin(keys[:1])
        expect(lambda: pool.unpin([s + (1 << 32)]), PoolArgumentError, "unpin(slot + 2**32)")
        assert pool.remove(keys[0]) is False, "the real pin was dropped"
        pool.unpin([s])
        assert pool.remove(keys[0]) is True
    else:
        raise AssertionError(case)
    os._exit(0)


# ===========================================================================================
# 3. Misuse: any call after close()
# ===========================================================================================
def _closed_calls(pool: KVPool, s: int, base: int) -> dict[str, Callable[[], Any]]:
    k = [key(1)]
    return {
        "lookup_prefix": lambda: pool.lookup_prefix(k),
        "pin": lambda: pool.pin(k),
        "unpin": lambda: pool.unpin([s]),
        "prepare_store": lambda: pool.prepare_store([key(9)]),
        "complete_store": lambda: pool.complete_store([s], [64]),
        "write": lambda: pool.write(s, b"x" * 64),
        "read": lambda: pool.read(s, bytearray(64)),
        "slot_length": lambda: pool.slot_length(s),
        "checksum": lambda: pool.checksum(s),
        "put": lambda: pool.put([key(9)], [b"x" * 64]),
        "get": lambda: pool.get(k),
        "remove": lambda: pool.remove(key(1)),
        "gather": lambda: pool.gather([s], [0], [(base, 64, 64)]),
        "scatter": lambda: pool.scatter([s], [0], [(base, 64, 64)]),
        "stats": lambda: pool.stats(),
        "sweep": lambda: pool.sweep(),
        "cuda_register": lambda: pool.cuda_register(),
    }


CLOSED_CALLS = ["lookup_prefix", "pin", "unpin", "prepare_store", "complete_store", "write",
                "read", "slot_length", "checksum", "put", "get", "remove", "gather",
                "scatter", "stats", "sweep", "cuda_register"]
PROPERTIES = ["slot_size", "slot_count", "uuid", "fingerprint", "coherence", "path"]


def scenario_after_close(path: str, call: str) -> None:
    pool = new_pool(path)
    (s,) = pool.pin(fill(pool, 1))
    buf = ctypes.create_string_buffer(256)
    before = {p: getattr(pool, p) for p in PROPERTIES}
    pool.close()
    pool.close()  # idempotent
    fn = (_closed_calls(pool, s, ctypes.addressof(buf)).get(call)
          or (lambda: getattr(pool, call)))
    try:
        value = fn()
    except Exception as exc:
        assert isinstance(exc, PoolClosedError), (
            f"{call} after close raised {type(exc).__module__}.{type(exc).__qualname__} "
            f"({exc}), expected PoolClosedError")
        h.note(f"{call}: {exc!r}")
    else:
        # A property may keep answering what it answered before close(); calls refuse.
        assert call in PROPERTIES, f"{call} after close returned {value!r:.80}"
        assert value == before[call], f"{call} after close: {value!r}, was {before[call]!r}"
    os._exit(0)


# ===========================================================================================
# 4. Errors that escape their type (the lock held by a stopped process)
# ===========================================================================================
LOCK_TIMEOUT_S = 0.25


def holder_that_stops(path: str) -> None:
    """Attach, take the lock with the native test hook and stop (SIGSTOP) holding it."""
    pool = attach(path)
    pool._p.debug_lock()
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(60)


def _busy_calls(pool: KVPool, keys: list[bytes], pinned: list[int],
                s: int) -> dict[str, Callable[[], Any]]:
    return {
        "lookup_prefix": lambda: pool.lookup_prefix(keys),
        "pin": lambda: pool.pin(keys),
        "unpin": lambda: pool.unpin(pinned),
        "prepare_store": lambda: pool.prepare_store([key(70)]),
        "complete_store": lambda: pool.complete_store([s], [64]),
        "put": lambda: pool.put([key(71)], [b"y" * 64]),
        "get": lambda: pool.get(keys),
        "remove": lambda: pool.remove(keys[1]),
        "stats": lambda: pool.stats(),
        "sweep": lambda: pool.sweep(),
        "close": lambda: pool.close(),
    }


BUSY_CALLS = ["lookup_prefix", "pin", "unpin", "prepare_store", "complete_store", "put",
              "get", "remove", "stats", "sweep", "close"]
# These need no lock from the caller's point of view (an unpin is deferred to the
# next call that gets the lock, close leaves it to the rebuild, stats reads counters): they
# may return. Every other call must raise PoolBusyError.
MAY_RETURN_WHEN_BUSY = {"unpin", "stats", "close"}


def scenario_busy(path: str, call: str) -> None:
    pool = new_pool(path, lock_timeout_s=LOCK_TIMEOUT_S)
    keys = fill(pool, 2)
    pinned = pool.pin(keys[:1])
    (r,) = pool.prepare_store([key(69)])
    s = r.slot
    pool.write(s, b"z" * 64)
    holder = h.spawn(holder_that_stops, path)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        h.wait_stopped(holder.pid)
        t0 = time.monotonic()
        fn = _busy_calls(pool, keys, pinned, s)[call]
        what = f"{call} while a stopped process holds the lock"
        if call in MAY_RETURN_WHEN_BUSY:
            _, err = h.attempt(fn, [PoolBusyError, Exception])
            if err is not None and not isinstance(err, PoolBusyError):
                raise AssertionError(f"{what}: raised {type(err).__module__}."
                                     f"{type(err).__qualname__} ({err}), expected "
                                     "PoolBusyError or nothing")
            h.note(f"{what}: {err!r}")
        else:
            expect(fn, PoolBusyError, what)
        took = time.monotonic() - t0
        assert took < LOCK_TIMEOUT_S + 2.0, f"took {took:.1f} s, lock_timeout_s={LOCK_TIMEOUT_S}"
    finally:
        holder.kill()
        holder.wait()
    os._exit(0)


# ===========================================================================================
# 5. Lock liveness
# ===========================================================================================
def fake_client(path: str, pool: KVPool, *, pid: int, ticks: int, other_host: bool,
                last_seen_ns: int) -> int:
    """Write a live client entry (the last one) for `pid`, in our pid namespace, on this host
    or another (another `host` hash; format 2 could not say); returns its lock token."""
    me = pool._p.client_index
    h.check_own_entry(path, me)
    host = h.client_field(path, me, "host")
    return h.make_client(path, int(h.header(path, "max_clients")) - 1, pid=pid, ticks=ticks,
                         pidns=h.own_pidns(), host=host ^ 0xDEAD if other_host else host,
                         last_seen_ns=last_seen_ns)


def recovers(path: str, pool: KVPool, keys: list[bytes], within_s: float) -> None:
    """The lock left by a dead holder is taken over: the next calls work (a PoolCorruptError
    for a token naming no client is allowed once), with the stored blocks intact."""
    t0 = time.monotonic()
    n, err = h.attempt(lambda: pool.lookup_prefix(keys), [PoolCorruptError])
    if err is not None:
        h.note(f"first call: {err!r}")
        n = pool.lookup_prefix(keys)
    took = time.monotonic() - t0
    assert n == len(keys), f"lookup_prefix found {n} of {len(keys)}"
    assert took < within_s, f"took {took:.1f} s to take over a dead holder's lock"
    assert pool.get(keys) == [block_for(k, SLOT) for k in keys]
    usable_afterwards(path, keys)


def slow_reader(path: str) -> None:
    """Loop on a long critical section (a million-key lookup) until a call fails."""
    pool = attach(path)
    print(f"ready {pool._p.client_index}", flush=True)
    keys = [key(0)] * 1_000_000
    try:
        while True:
            pool.lookup_prefix(keys)
    except PoolError as exc:
        print(f"err {type(exc).__name__}", flush=True)
    os._exit(0)


def scenario_liveness(path: str, case: str) -> None:
    pool = new_pool(path, lock_timeout_s=1.0)
    keys = fill(pool, 4)
    stranger = os.getppid()  # alive, never attached to this pool (the test runner)
    now_ns = time.time_ns()
    if case == "bare-pid":
        # A process that died while attaching left a token with no client entry, and its
        # pid now belongs to an unrelated live process. Format 2 judged it by the bare pid:
        # alive, the pool is wedged (PoolBusyError forever). Format 3: a token naming no
        # client is corrupt: taken over, derived state rebuilt.
        h.set_header(path, "lock_word", h.bare_pid_token(stranger))
        recovers(path, pool, keys, within_s=3.0)
    elif case == "reused-pid":
        # The dead holder's entry names a pid now reused (another start time): dead.
        token = fake_client(path, pool, pid=stranger, ticks=h.start_ticks(stranger) + 1234,
                            other_host=False, last_seen_ns=now_ns)
        h.set_header(path, "lock_word", token)
        recovers(path, pool, keys, within_s=3.0)
    elif case == "other-host-same-pidns":
        # Another host (another boot_id) whose pid namespace has our inode number (the
        # initial pid namespace has the same inode everywhere) and whose pid and start
        # time happen to be a live process here; its lease ran out an hour ago. Format 2:
        # judged by pid, alive, wedged. Format 3: another host -> the lease decides.
        token = fake_client(path, pool, pid=stranger, ticks=h.start_ticks(stranger),
                            other_host=True, last_seen_ns=now_ns - 3600 * 10**9)
        h.set_header(path, "lock_word", token)
        recovers(path, pool, keys, within_s=3.0)
    elif case == "stale-holder-unlock":
        stale_holder_unlock(path, pool)
    else:
        raise AssertionError(case)
    os._exit(0)


def stale_holder_unlock(path: str, pool: KVPool) -> None:
    """X holds the lock and stops; its lease runs out (it looks like a client of another
    host, last seen an hour ago); Y takes the lock over and keeps it. When X resumes and
    finishes its critical section, its release must not free Y's lock (SPEC: release is a
    CAS of the holder's own token) and X's call fails with PoolBusyError."""
    x = h.spawn(slow_reader, path)
    try:
        assert x.stdout is not None
        line = x.stdout.readline().split()
        assert line[:1] == ["ready"], line
        xc = int(line[1])
        assert h.client_field(path, xc, "pid") == x.pid, "ClientEntry.pid offset moved"
        x_token = h.token_of(path, xc)
        for _ in range(500):  # stop X inside its critical section
            os.kill(x.pid, signal.SIGSTOP)
            h.wait_stopped(x.pid)
            if h.header(path, "lock_word") == x_token:
                break
            os.kill(x.pid, signal.SIGCONT)
            time.sleep(0.003)
        else:
            raise AssertionError("never caught X holding the lock")
        # X's entry now looks like a client of another host, its lease an hour old.
        h.set_client_field(path, xc, "host", h.client_field(path, xc, "host") ^ 0xDEAD)
        h.set_client_field(path, xc, "last_seen_ns", time.time_ns() - 3600 * 10**9)
        assert pool._p.debug_lock(), "Y could not take X's expired lock over"
        y_token = h.token_of(path, pool._p.client_index)
        assert h.header(path, "lock_word") == y_token
        os.kill(x.pid, signal.SIGCONT)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            word = h.header(path, "lock_word")
            assert word == y_token, f"X's release freed Y's lock (lock word {word:#x})"
            if x.poll() is not None:
                break
            time.sleep(0.005)
        out = x.stdout.read() if x.poll() is not None else ""
        h.note(f"X: {out.strip()!r}")
        assert "err PoolBusyError" in out, "X's call did not fail with PoolBusyError"
    finally:
        x.kill()
        x.wait()


# ===========================================================================================
# 6. Neighbours on the host
# ===========================================================================================
NOBODY = 65534


def scenario_neighbour_attach(path: str, case: str) -> None:
    new_pool(path).close()
    target = path
    if case.startswith("other-uid"):
        os.chown(path, NOBODY, NOBODY)
    if case.endswith("0666"):
        os.chmod(path, 0o666)
    if case == "symlink":
        target = path + ".link"
        os.symlink(path, target)
    expect(lambda: KVPool.attach(target, fingerprint=FP), PoolPermissionError,
           f"attach ({case})")
    os._exit(0)


def scenario_fifo_build(path: str) -> None:
    """A FIFO under the name of an abandoned build: format 2's sweep opened it and blocked."""
    fifo = f"{path}.building.4242.0000f1f0"
    os.mkfifo(fifo, 0o600)
    pool = new_pool(path)
    keys = fill(pool, 2)
    assert pool.get(keys) == [block_for(k, SLOT) for k in keys]
    os._exit(0)
