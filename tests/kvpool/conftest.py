from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvpool import KVPool
from tests.kvpool.blocks import FP, block_for, key

__all__ = ["FP", "block_for", "key", "reserve"]


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
