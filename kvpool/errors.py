"""Typed errors of the KV pool.

    PoolError
    ├── PoolArgumentError       a bad argument (also a ValueError)
    ├── PoolIOError             the backing could not be opened, sized or mapped
    ├── PoolExistsError         create: the backing already holds a pool file
    ├── PoolFormatError         not a Beluga pool, or another format version
    ├── PoolGeometryError       another slot size than the caller's model needs
    ├── PoolFingerprintError    another model's pool
    ├── PoolCorruptError        a value in the pool is out of bounds (header, index, slots,
    │                           clients): the pool is marked and rebuilt by the next call
    ├── PoolBusyError           the pool lock stayed held by a live process past the
    │                           handle's lock timeout (or this handle's lease expired)
    ├── PoolClosedError         the handle was closed
    ├── PoolPermissionError     the file is not ours: another owner, writable by others, a
    │                           symlink, not a regular file
    ├── PoolClientLimitError    too many processes attached
    ├── PoolCudaError           GPU path: built without CUDA, no device, or a CUDA call failed
    └── PoolNotFoundError       attach_by_uuid: no pool with that UUID

Expected per-key outcomes (duplicate, full) are values (kvpool.Outcome), not exceptions.
"""

from __future__ import annotations


class PoolError(Exception):
    """Base of every pool error."""


class PoolArgumentError(PoolError, ValueError):
    pass


class PoolIOError(PoolError, OSError):
    pass


class PoolExistsError(PoolError):
    pass


class PoolFormatError(PoolError):
    pass


class PoolGeometryError(PoolError):
    pass


class PoolFingerprintError(PoolError):
    pass


class PoolCorruptError(PoolError):
    pass


class PoolBusyError(PoolError):
    pass


class PoolClientLimitError(PoolError):
    pass


class PoolNotFoundError(PoolError):
    pass


class PoolCudaError(PoolError):
    pass


class PoolClosedError(PoolError):
    pass


class PoolPermissionError(PoolError, PermissionError):
    pass


# ErrorKind values of native/include/beluga/pool.h
_BY_KIND: dict[int, type[PoolError]] = {
    1: PoolArgumentError, 2: PoolIOError, 3: PoolExistsError, 4: PoolFormatError,
    5: PoolGeometryError, 6: PoolFingerprintError, 7: PoolCorruptError, 8: PoolBusyError,
    9: PoolClientLimitError, 10: PoolCudaError, 11: PoolClosedError, 12: PoolPermissionError,
}


def from_native(exc: Exception) -> PoolError:
    """The typed error for a native exception (which carries `kind`)."""
    cls = _BY_KIND.get(int(getattr(exc, "kind", 0)), PoolError)
    return cls(str(exc))
