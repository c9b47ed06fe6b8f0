"""The vectorised checksummed copy (native/src/hash_copy.cpp: AVX-512, AVX2 or scalar, chosen
by CPUID) against the checksum's pure-Python definition (tests/kvpool/test_checksum.py),
through the public API only: gather (engine -> pool, non-temporal stores from 16 KiB up),
scatter (pool -> engine, verified), put and get. Sizes around every boundary the code has
(the 8-byte word, the 32/64-byte vector, the 128/256-byte iteration, the 4 KiB prefetch
window, the 16 KiB streaming threshold), engine buffers at every kind of misalignment, and
blocks split into segments at offsets that are not multiples of the vector width. The same
checks run once per implementation the CPU has (beluga_native.hash_copy_force), so the
narrower ones are tested on a CPU that has wider ones."""

from __future__ import annotations

import ctypes
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import beluga_native
import pytest

from kvpool import KVPool, Reservation
from tests.kvpool.conftest import key
from tests.kvpool.test_checksum import bound, reference

ROOT = Path(__file__).resolve().parents[2]
SLOT = 320 * 1024
# Block sizes: every residue around the vector and iteration boundaries, the prefetch
# window (4096 + 256) and the streaming threshold (16 KiB), and large blocks.
SIZES = sorted({*range(1, 70), 120, 127, 128, 129, 255, 256, 257, 263, 511, 512, 520,
                1000, 4095, 4096, 4353, 4359, 8191, 16383, 16384, 16385, 16391, 20000,
                65536, 65536 + 5, 100_003, 262_144, SLOT})
# Misalignments of the engine buffer (the pool's slots are page-aligned).
OFFSETS = [0, 1, 3, 8, 24, 60]


def slots_of(reserved: Sequence[Reservation]) -> list[int]:
    assert all(r.reserved for r in reserved), reserved
    return [r.slot for r in reserved]


@pytest.fixture(autouse=True, params=["best", "avx2", "scalar"])
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test once per implementation (a no-op where the CPU lacks one: then a narrower
    one runs, which must agree too)."""
    yield beluga_native.hash_copy_force("" if request.param == "best" else request.param)
    beluga_native.hash_copy_force("")


class Engine:
    """An engine-side buffer at a chosen misalignment, with its address."""

    def __init__(self, nbytes: int, misalign: int) -> None:
        self.raw = bytearray(nbytes + 128)
        base = ctypes.addressof((ctypes.c_char * len(self.raw)).from_buffer(self.raw))
        self.start = (-base) % 64 + misalign  # 64-byte aligned, then misaligned
        self.addr = base + self.start

    def view(self, lo: int, n: int) -> bytes:
        return bytes(self.raw[self.start + lo:self.start + lo + n])

    def fill(self, lo: int, data: bytes) -> None:
        self.raw[self.start + lo:self.start + lo + len(data)] = data


@pytest.fixture
def pool(make_pool: Callable[..., KVPool]) -> KVPool:
    return make_pool(slot_size=SLOT, slot_count=8)


def roundtrip(pool: KVPool, rng: random.Random, tag: int, splits: list[int],
              misalign: int, out_misalign: int) -> None:
    """Two blocks of sum(splits) bytes, segment j holding splits[j] bytes of each, gathered
    from one engine buffer into the pool, then scattered (verified) into another."""
    total = sum(splits)
    stride = total + 24  # blocks 0 and 1 of every segment's region, with a gap
    engines = [Engine(2 * stride, misalign) for _ in splits]
    blocks = [b"", b""]
    for b in range(2):
        for e, n in zip(engines, splits, strict=True):
            data = rng.randbytes(n)
            e.fill(b * stride, data)
            blocks[b] += data
    segs = [(e.addr, stride, n) for e, n in zip(engines, splits, strict=True)]
    keys = [key(10_000 * tag + i) for i in range(2)]
    slots = slots_of(pool.prepare_store(keys))
    sums = pool.gather(slots, [1, 0], segs)
    want = [reference(blocks[1]), reference(blocks[0])]
    assert sums == want, f"gather checksums, splits={splits} misalign={misalign}"
    pool.complete_store(slots, [total, total], checksums=sums)
    assert pool.get(keys[::-1]) == [blocks[0], blocks[1]]
    outs = [Engine(2 * stride, out_misalign) for _ in splits]
    with pool.pinned(keys) as pinned:
        failed = pool.scatter(pinned, [0, 1], [(o.addr, stride, n)
                                               for o, n in zip(outs, splits, strict=True)])
    assert failed == []
    lo = 0
    for o, n in zip(outs, splits, strict=True):
        assert o.view(0, n) == blocks[1][lo:lo + n]
        assert o.view(stride, n) == blocks[0][lo:lo + n]
        lo += n
    for k in keys:
        pool.remove(k)


@pytest.mark.parametrize("misalign", OFFSETS)
def test_one_segment_blocks_of_every_size(pool: KVPool, misalign: int) -> None:
    rng = random.Random(misalign)
    for i, n in enumerate(SIZES):
        roundtrip(pool, rng, i, [n], misalign, OFFSETS[(i + misalign) % len(OFFSETS)])


@pytest.mark.parametrize("misalign", [0, 5, 8])
def test_blocks_split_into_segments(pool: KVPool, misalign: int) -> None:
    """Whole-word segments are hashed while copied, each from its own word index (the
    last may be any length); a segment that is not whole words (not last) makes the pool
    copy and then hash the slot. Either way the checksum is the block's."""
    rng = random.Random(100 + misalign)
    splits = [[8, 8], [8, 13], [24, 40, 7], [64, 64, 64], [56, 200, 1], [40, 40, 13],
              [37, 37], [4096, 8, 4096], [4104, 20000], [16384, 16384, 5], [17000, 33],
              [16392, 65536], [8 * 517, 8 * 2049, 8 * 4099, 3], [100_000, 100_000]]
    for _ in range(10):  # random splits of random totals, word-aligned and not
        parts = rng.randrange(1, 6)
        splits.append([rng.randrange(1, 9000) * (8 if rng.random() < 0.7 else 1)
                       for _ in range(parts)])
    for i, sp in enumerate(splits):
        roundtrip(pool, rng, 100 + i, sp, misalign, (misalign + i) % 64)


def test_put_and_get_checksum_and_return_the_bytes(pool: KVPool) -> None:
    rng = random.Random(7)
    for i, n in enumerate(SIZES):
        data = rng.randbytes(n)
        k = key(50_000 + i)
        assert pool.put([k], [data]).stored == 1
        with pool.pinned([k]) as [slot]:
            assert pool.checksum(slot) == bound(reference(data), k)
        assert pool.get([k]) == [data]
        pool.remove(k)


def test_scatter_reports_a_scribbled_word_anywhere(pool: KVPool) -> None:
    """A flipped bit in any vector lane, iteration position or the tail fails the load."""
    rng = random.Random(9)
    n = 16384 + 4096 + 77
    data = rng.randbytes(n)
    src = Engine(n, 0)
    src.fill(0, data)
    k = key(60_000)
    [slot] = slots_of(pool.prepare_store([k]))
    sums = pool.gather([slot], [0], [(src.addr, 0, n)])
    pool.complete_store([slot], [n], checksums=sums)
    out = Engine(n, 3)
    for pos in [0, 7, 8, 63, 64, 255, 256, 4096, 16383, 16384, n - 78, n - 1,
                *rng.sample(range(n), 20)]:
        with pool.pinned([k]) as [pinned]:
            cell = ctypes.c_uint8.from_address(pool._p.slot_address(pinned) + pos)
            cell.value ^= 1 << (pos % 8)
            try:
                assert pool.scatter([pinned], [0], [(out.addr, 0, n)]) == [0], pos
            finally:
                cell.value ^= 1 << (pos % 8)
            assert pool.scatter([pinned], [0], [(out.addr, 0, n)]) == []
    assert out.view(0, n) == data


@pytest.mark.parametrize("misalign", [0, 8, 3])
def test_a_call_larger_than_the_cache_streams_and_verifies(
        make_pool: Callable[..., KVPool], misalign: int) -> None:
    """A scatter of more bytes than any core's L2 (12 x 1 MiB) stores around the cache
    (non-temporal, where the engine side allows it: word-aligned heads) and verifies each
    block as the small ones do: every byte lands, and one scribbled block of the batch is
    reported alone."""
    n, count = (1 << 20) + 77, 12
    pool = make_pool(slot_size=(n + 63) // 64 * 64, slot_count=count)
    rng = random.Random(1000 + misalign)
    blocks = [rng.randbytes(n) for _ in range(count)]
    stride = n + 40
    src = Engine(count * stride, 0)
    for i, b in enumerate(blocks):
        src.fill(i * stride, b)
    keys = [key(70_000 + i) for i in range(count)]
    slots = slots_of(pool.prepare_store(keys))
    sums = pool.gather(slots, list(range(count)), [(src.addr, stride, n)])
    pool.complete_store(slots, [n] * count, checksums=sums)
    out = Engine(count * stride, misalign)
    order = list(range(count))[::-1]  # engine block i gets pool block count - 1 - i
    with pool.pinned(keys) as pinned:
        assert pool.scatter(pinned, order, [(out.addr, stride, n)], threads=1) == []
        for i in range(count):
            assert out.view(order[i] * stride, n) == blocks[i], i
        cell = ctypes.c_uint8.from_address(pool._p.slot_address(pinned[5]) + n // 2)
        cell.value ^= 0x10
        try:
            assert pool.scatter(pinned, order, [(out.addr, stride, n)], threads=1) == [5]
        finally:
            cell.value ^= 0x10
