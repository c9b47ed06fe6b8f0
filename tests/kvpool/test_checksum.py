"""The block checksum (pool format 2, native/include/beluga/checksum.h), pinned by a Python
reference: a sum of per-word terms that the CPU computes in one pass and the GPU copy kernel
while it copies (tests/kvpool/test_cuda.py checks that both agree)."""

from __future__ import annotations

import ctypes
import random
from collections.abc import Callable

import pytest

from kvpool import KVPool
from tests.kvpool.conftest import key, reserve

M64 = (1 << 64) - 1
P1, P2, P3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9


def term(word: int, k: int) -> int:
    x = ((word ^ (k * P1 & M64)) * P2) & M64
    return x ^ (x >> 29)


def reference(data: bytes) -> int:
    padded = data + b"\0" * (-len(data) % 8)
    s = sum(term(int.from_bytes(padded[i:i + 8], "little"), i // 8)
            for i in range(0, len(padded), 8)) & M64
    h = s ^ (len(data) * P3 & M64)
    h ^= h >> 33
    h = h * P2 & M64
    h ^= h >> 29
    h = h * P3 & M64
    h ^= h >> 32
    folded = (h ^ (h >> 32)) & 0xFFFFFFFF
    return folded or 1


def _mix64(x: int) -> int:
    x ^= x >> 30
    x = x * 0xBF58476D1CE4E5B9 & M64
    x ^= x >> 27
    x = x * 0x94D049BB133111EB & M64
    return x ^ (x >> 31)


def bound(checksum: int, key: bytes) -> int:
    """The checksum stored with a block (format 3): its block checksum bound to its key
    (native/src/internal.h bind_key, over the index's key hash)."""
    w = [int.from_bytes(key[i:i + 8], "little") for i in range(0, 32, 8)]
    h = _mix64(w[0] ^ _mix64(w[1] ^ _mix64(w[2] ^ _mix64(w[3]))))
    return (checksum ^ (h & 0xFFFFFFFF) ^ (h >> 32)) or 1


def native(pool: KVPool, data: bytes) -> int:
    [slot] = reserve(pool, [key(len(data))])
    try:
        pool.write(slot, data)
        return int(pool._p.compute_checksum(slot, len(data)))
    finally:
        pool.complete_store([slot], ok=False)


@pytest.fixture
def pool(make_pool: Callable[..., KVPool]) -> KVPool:
    return make_pool(slot_size=8192, slot_count=4)


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 15, 16, 17, 31, 100, 4095, 8192])
def test_the_native_checksum_is_the_specified_one(pool: KVPool, size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert native(pool, data) == reference(data)


def test_every_single_byte_change_and_word_swap_changes_the_checksum(pool: KVPool) -> None:
    rng = random.Random(5)
    data = bytearray(rng.randbytes(4096))
    base = native(pool, bytes(data))
    for _ in range(64):
        i = rng.randrange(len(data))
        flipped = bytearray(data)
        flipped[i] ^= 1 << rng.randrange(8)
        assert native(pool, bytes(flipped)) != base
    swapped = bytearray(data)
    swapped[0:8], swapped[8:16] = data[8:16], data[0:8]
    assert native(pool, bytes(swapped)) != base
    # Trailing zero bytes are part of the block: a shorter block is another block.
    assert native(pool, bytes(data) + b"\0") != base


@pytest.mark.parametrize("sizes", [[64, 64, 64], [40, 40, 13], [37, 37], [5]])
def test_gather_and_scatter_checksum_the_bytes_they_copy(make_pool: Callable[..., KVPool],
                                                         sizes: list[int]) -> None:
    """Whole-word segments are hashed while copied, others after the copy: either way the
    checksum is the block's (the reference's), and a scribbled slot fails its load."""
    pool = make_pool(slot_size=256, slot_count=4)
    rng = random.Random(sum(sizes))
    stride = 64
    engine = [bytearray(rng.randbytes(4 * stride)) for _ in sizes]
    addrs = [ctypes.addressof((ctypes.c_char * len(b)).from_buffer(b)) for b in engine]
    segs = [(a, stride, n) for a, n in zip(addrs, sizes, strict=True)]
    keys = [key(300 + i) for i in range(3)]
    slots = reserve(pool, keys)
    sums = pool.gather(slots, [3, 0, 2], segs)
    blocks = [b"".join(bytes(e[b * stride:b * stride + n]) for e, n in zip(engine, sizes,
                                                                           strict=True))
              for b in (3, 0, 2)]
    assert sums == [reference(b) for b in blocks]
    pool.complete_store(slots, [sum(sizes)] * 3, checksums=sums)
    with pool.pinned(keys) as pinned:
        target = ctypes.c_uint8.from_address(pool._p.slot_address(pinned[1]) + sum(sizes) - 1)
        target.value ^= 0x80
        out = [bytearray(4 * stride) for _ in sizes]
        oaddrs = [ctypes.addressof((ctypes.c_char * len(b)).from_buffer(b)) for b in out]
        failed = pool.scatter(pinned, [1, 2, 3], [(a, stride, n) for a, n in
                                                  zip(oaddrs, sizes, strict=True)])
    assert failed == [1]
    assert all(bytes(o[stride:2 * stride][:n]) == bytes(e[3 * stride:3 * stride + n])
               for o, e, n in zip(out, engine, sizes, strict=True))
