"""Python API over the native KV pool: open/create a pool, block keys, typed errors, stats.

Importing this package has no side effects; it does not import vLLM or FastAPI.
"""

from kvpool.errors import (
    PoolArgumentError,
    PoolBusyError,
    PoolClientLimitError,
    PoolClosedError,
    PoolCorruptError,
    PoolCudaError,
    PoolError,
    PoolExistsError,
    PoolFingerprintError,
    PoolFormatError,
    PoolGeometryError,
    PoolIOError,
    PoolNotFoundError,
    PoolPermissionError,
)
from kvpool.keys import KEY_BYTES, ModelIdentity, block_keys, root_key
from kvpool.pool import (
    KVPool,
    Outcome,
    PoolStats,
    PutResult,
    Reservation,
    cuda_built,
    cuda_device_count,
)

__all__ = [
    "KEY_BYTES", "Outcome", "Reservation", "KVPool", "ModelIdentity", "PoolStats", "PutResult",
    "block_keys", "root_key", "PoolError", "PoolArgumentError", "PoolBusyError",
    "PoolClientLimitError", "PoolCorruptError", "PoolExistsError", "PoolFingerprintError",
    "PoolFormatError", "PoolGeometryError", "PoolIOError", "PoolNotFoundError", "PoolCudaError",
    "PoolClosedError", "PoolPermissionError",
    "cuda_built", "cuda_device_count",
]
