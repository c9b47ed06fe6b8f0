from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvpool import KVPool

FP = hashlib.sha256(b"test-model").digest()


def key(i: int) -> bytes:
    return hashlib.sha256(b"key-%d" % i).digest()


def block_for(k: bytes, size: int) -> bytes:
    """Content derived from the key: any torn or misplaced block is detectable."""
    seed = hashlib.sha256(b"content" + k).digest()
    return (seed * (size // 32 + 1))[:size]


def reserve(pool: KVPool, keys: list[bytes]) -> list[int]:
    """prepare_store where every key must get a slot: the slots."""
    res = pool.prepare_store(keys)
    assert all(r.reserved for r in res), res
    return [r.slot for r in res]


@pytest.fixture
def pool_path(tmp_path: Path) -> Path:
    return tmp_path / "test.pool"


@pytest.fixture
def make_pool(pool_path: Path) -> Iterator[Callable[..., KVPool]]:
    opened: list[KVPool] = []

    def make(**kw: object) -> KVPool:
        args: dict[str, object] = {"slot_size": 4096, "slot_count": 16, "fingerprint": FP}
        args.update(kw)
        pool = KVPool.create(pool_path, **args)  # type: ignore[arg-type]
        opened.append(pool)
        return pool

    yield make
    for p in opened:
        p.close()
