"""Python API over the native KV pool: open/create a pool, block keys, typed errors, stats.

Importing this package has no side effects; it does not import vLLM or FastAPI.
"""

from kvpool.errors import (
    PoolArgumentError,
    PoolBusyError,
    PoolClientLimitError,
    PoolCorruptError,
    PoolError,
    PoolExistsError,
    PoolFingerprintError,
    PoolFormatError,
    PoolGeometryError,
    PoolIOError,
    PoolNotFoundError,
)
from kvpool.keys import KEY_BYTES, ModelIdentity, block_keys, root_key
from kvpool.pool import DUPLICATE, FULL, KVPool, PoolStats, PutResult

__all__ = [
    "KEY_BYTES", "DUPLICATE", "FULL", "KVPool", "ModelIdentity", "PoolStats", "PutResult",
    "block_keys", "root_key", "PoolError", "PoolArgumentError", "PoolBusyError",
    "PoolClientLimitError", "PoolCorruptError", "PoolExistsError", "PoolFingerprintError",
    "PoolFormatError", "PoolGeometryError", "PoolIOError", "PoolNotFoundError",
]
