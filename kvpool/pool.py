"""KVPool: the Python face of the shared KV-cache pool (native core in `native/`).

Backings: a file in /dev/shm (default) or on hugetlbfs, a devdax device (`/dev/daxX.Y`), or
any of those bound to a NUMA node (CXL memory appears as a CPU-less node). The first process
creates the pool; the rest attach, and attaching checks magic, format version, geometry and
the model fingerprint, refusing (with a typed error, changing nothing) on any mismatch.

Block protocol (see native/include/beluga/pool.h):
    n = pool.lookup_prefix(keys)                  # how many leading blocks are present
    with pool.pinned(keys) as slots: ...read...    # pinned: cannot be evicted while read
    pool.put(keys, blocks)                        # first writer of a key wins

The pool file's contents are untrusted (another process may be buggy, crash mid-write or
scribble): every failure is a `PoolError` subclass (PoolCorruptError for a value out of
bounds, PoolBusyError for a lock held too long, PoolClosedError after close, ...), and a
block is returned only when its bytes match the checksum its writer stored with its key.
"""

from __future__ import annotations

import enum
import glob
import os
import time
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import beluga_native as _native

from kvpool.errors import (
    PoolArgumentError,
    PoolClosedError,
    PoolError,
    PoolExistsError,
    PoolIOError,
    PoolNotFoundError,
    from_native,
)

Coherence = Literal["none", "flush"]


class Outcome(enum.IntEnum):
    """What became of one key of prepare_store (native beluga::Outcome)."""

    RESERVED = _native.OUTCOME_OK  # a slot is reserved: write it, then complete_store
    DUPLICATE = _native.OUTCOME_DUPLICATE  # present already, or being written by someone
    FULL = _native.OUTCOME_FULL  # every slot is pinned or being written


# native outcome value -> Outcome (Outcome(v) costs ~0.4 us a key; prepare_store is hot)
_OUTCOME_OF = {int(o): o for o in Outcome}


class Reservation(NamedTuple):
    outcome: Outcome
    slot: int  # meaningful when outcome is RESERVED

    @property
    def reserved(self) -> bool:
        return self.outcome is Outcome.RESERVED

# GPU copies hashed on the host go in chunks of about this many bytes, each hashed while the
# next copies (gather_cuda / scatter_cuda).
GPU_CHUNK_BYTES = 4 << 20
DEFAULT_DIR = Path("/dev/shm")
DEFAULT_CANDIDATES = ("/dev/dax*", "/dev/shm/*.pool", "/dev/hugepages/*.pool")


@dataclass(frozen=True)
class PoolStats:
    slot_count: int
    slot_size: int
    used_slots: int
    pinned_slots: int
    writing_slots: int
    clients: int
    hits: int
    misses: int
    inserts: int
    evictions: int
    bytes_in: int
    bytes_out: int
    duplicates: int
    full: int
    recoveries: int
    reclaimed: int
    generation: int
    corrupt: int     # values found out of bounds (each marked the pool for a rebuild)
    busy: int        # calls that gave up on a lock held too long


@dataclass(frozen=True)
class PutResult:
    stored: int      # blocks written and published
    duplicate: int   # present already or being written by another process
    full: int        # refused: every slot pinned or being written


def _keys(keys: Sequence[bytes]) -> bytes:
    for k in keys:
        if not isinstance(k, bytes | bytearray | memoryview) or len(k) != _native.KEY_BYTES:
            raise PoolArgumentError(f"a block key is {_native.KEY_BYTES} bytes")
    return b"".join(keys)


def _call(fn: Any, *args: Any) -> Any:
    """A native call with its errors typed: native errors become PoolError subclasses, a
    wrong argument type (pybind11's TypeError) a PoolArgumentError."""
    try:
        return fn(*args)
    except _native.NativePoolError as exc:
        raise from_native(exc) from None
    except (TypeError, OverflowError) as exc:
        raise PoolArgumentError(f"bad argument: {exc}") from None


class KVPool:
    """One process's handle on a shared pool. Not thread-safe: one handle per thread."""

    def __init__(self, native: Any) -> None:
        self._native = native
        self._closed = False

    @property
    def _p(self) -> Any:
        if self._closed:
            raise PoolClosedError("the pool handle is closed")
        return self._native

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, *, slot_size: int, slot_count: int,
               fingerprint: bytes, coherence: Coherence = "none", max_clients: int = 64,
               max_pins: int = 16384, numa_node: int = -1, mode: int = 0o600,
               prefault: bool = True, lease_s: float = 30.0,
               lock_timeout_s: float = 5.0) -> KVPool:
        """Create a new pool (fails with PoolExistsError if the file exists). `prefault`
        maps every page now (MAP_POPULATE) so copies never take page faults later.
        `lease_s`: a process in another pid namespace or on another host that has not
        called into the pool for this long is taken for dead. `lock_timeout_s`: how long
        this handle waits for a lock held by a live process before PoolBusyError."""
        _check_coherence(coherence)
        return cls(_call(lambda: _native.Pool.create(
            str(path), slot_size=slot_size, slot_count=slot_count, fingerprint=fingerprint,
            flush=coherence == "flush", max_clients=max_clients, max_pins=max_pins,
            numa_node=numa_node, mode=mode, prefault=prefault, lease_s=lease_s,
            lock_timeout_s=lock_timeout_s)))

    @classmethod
    def attach(cls, path: str | Path, *, fingerprint: bytes = b"", slot_size: int = 0,
               coherence: Coherence | None = None, wait_init_s: float = 5.0,
               prefault: bool = True, lock_timeout_s: float = 5.0,
               trusted_gid: int | None = None) -> KVPool:
        """Attach to an existing pool, checking format, geometry and fingerprint. The file
        must be ours: a regular file (or a devdax device) owned by this user (or by the
        group `trusted_gid`), not writable by others, not reached through a symlink
        (PoolPermissionError otherwise)."""
        if coherence is not None:
            _check_coherence(coherence)
        return cls(_call(lambda: _native.Pool.attach(
            str(path), fingerprint=fingerprint, slot_size=slot_size, wait_init_s=wait_init_s,
            flush=coherence == "flush", prefault=prefault, lock_timeout_s=lock_timeout_s,
            trusted_gid=-1 if trusted_gid is None else trusted_gid)))

    @classmethod
    def attach_by_uuid(cls, pool_uuid: uuidlib.UUID | str,
                       candidates: Sequence[str] = DEFAULT_CANDIDATES, *,
                       fingerprint: bytes = b"", slot_size: int = 0,
                       coherence: Coherence | None = None, prefault: bool = True,
                       lock_timeout_s: float = 5.0) -> KVPool:
        """Attach to the pool whose header carries `pool_uuid`, wherever it is mapped here.

        The same CXL device gets different /dev/daxX.Y names on different hosts; the UUID in
        its header does not change. `candidates` are glob patterns; each match is probed
        with the full attach checks (without prefaulting) and detached unless it matches.
        """
        want = uuidlib.UUID(str(pool_uuid))
        seen: list[str] = []
        for pattern in candidates:
            for path in sorted(glob.glob(pattern)):
                try:
                    probe = cls.attach(path, fingerprint=fingerprint, slot_size=slot_size,
                                       coherence=coherence, wait_init_s=0.0, prefault=False,
                                       lock_timeout_s=lock_timeout_s)
                except PoolError:
                    continue
                found = probe.uuid == want
                probe.close()
                if found:
                    return cls.attach(path, fingerprint=fingerprint, slot_size=slot_size,
                                      coherence=coherence, prefault=prefault,
                                      lock_timeout_s=lock_timeout_s)
                seen.append(path)
        raise PoolNotFoundError(f"no pool with UUID {want} among {list(candidates)} "
                                f"(other pools seen: {seen or 'none'})")

    @classmethod
    def open(cls, path: str | Path, *, slot_size: int, slot_count: int, fingerprint: bytes,
             coherence: Coherence = "none", **kwargs: Any) -> KVPool:
        """Attach if the pool exists, else create it (the race between creators is safe)."""
        attach_kw = {k: kwargs[k] for k in ("lock_timeout_s", "prefault") if k in kwargs}
        for _ in range(3):
            if not str(path).startswith("/dev/dax") and not os.path.exists(path):
                try:
                    return cls.create(path, slot_size=slot_size, slot_count=slot_count,
                                      fingerprint=fingerprint, coherence=coherence, **kwargs)
                except PoolExistsError:
                    pass
            try:
                return cls.attach(path, fingerprint=fingerprint, slot_size=slot_size,
                                  coherence=coherence, **attach_kw)
            except PoolIOError:
                time.sleep(0.01)  # removed between the two calls: try again
        raise PoolIOError(f"cannot open or create {path}")

    # -- identity ------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return str(self._native.path)

    @property
    def uuid(self) -> uuidlib.UUID:
        return uuidlib.UUID(bytes=bytes(self._p.uuid))

    @property
    def fingerprint(self) -> bytes:
        """The model fingerprint in the header (block keys derive from it)."""
        return bytes(self._p.fingerprint)

    @property
    def slot_size(self) -> int:
        return int(self._p.slot_size)

    @property
    def slot_count(self) -> int:
        return int(self._p.slot_count)

    @property
    def coherence(self) -> Coherence:
        return "flush" if self._p.flush_mode else "none"

    # -- blocks --------------------------------------------------------------------------
    def lookup_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading keys of the chain are present (one call, no pins)."""
        return int(_call(self._p.lookup_prefix, _keys(keys)))

    def pin(self, keys: Sequence[bytes]) -> list[int]:
        """Pin the present prefix of `keys`; returns its slots. Unpin when done."""
        return list(_call(self._p.pin, _keys(keys)))

    def unpin(self, slots: Sequence[int]) -> None:
        _call(self._p.unpin, list(slots))

    @contextmanager
    def pinned(self, keys: Sequence[bytes]) -> Iterator[list[int]]:
        slots = self.pin(keys)
        try:
            yield slots
        finally:
            if not self._closed:
                self.unpin(slots)

    def prepare_store(self, keys: Sequence[bytes]) -> list[Reservation]:
        """A Reservation per key: RESERVED with its slot, DUPLICATE or FULL. Write the
        reserved slots, then complete_store them."""
        return [Reservation(_OUTCOME_OF[o], s) for o, s in _call(self._p.prepare_store,
                                                                    _keys(keys))]

    def complete_store(self, slots: Sequence[int], lengths: Sequence[int] = (),
                       ok: bool = True, checksums: Sequence[int] = ()) -> None:
        """Publish (ok) or free reserved slots. `checksums` (as gather or write returned
        them) are bound to each block's key and verified by every reader; without them the
        native side computes them from the slots."""
        for name, seq in (("lengths", lengths), ("checksums", checksums)):
            if seq and len(seq) != len(slots):
                raise PoolArgumentError(f"{name} and slots differ in length")
        _call(self._p.complete_store, list(slots), list(lengths), ok, list(checksums))

    def write(self, slot: int, data: Any, offset: int = 0) -> int:
        """Copy into a reserved slot; at offset 0 returns the bytes' block checksum."""
        return int(_call(self._p.write, slot, data, offset))

    def read(self, slot: int, out: Any, offset: int = 0) -> None:
        """Copy out of a pinned slot, unverified (see get for the verified path)."""
        _call(self._p.read, slot, out, offset)

    def slot_length(self, slot: int) -> int:
        return int(_call(self._p.slot_length, slot))

    def put(self, keys: Sequence[bytes], blocks: Sequence[Any]) -> PutResult:
        """Store blocks (buffers of at most slot_size bytes) under their keys, each with
        the checksum of the bytes as they were copied in."""
        if len(keys) != len(blocks):
            raise PoolArgumentError("keys and blocks differ in length")
        views = [memoryview(b).cast("B") for b in blocks]
        res = self.prepare_store(keys)
        reserved = [r.slot for r in res if r.reserved]
        written: list[int] = []
        lengths: list[int] = []
        sums: list[int] = []
        try:
            for r, view in zip(res, views, strict=True):
                if r.reserved:
                    sums.append(self.write(r.slot, view))
                    written.append(r.slot)
                    lengths.append(view.nbytes)
        except BaseException:
            # Abort every reserved slot, written or not: none of them may stay WRITING.
            if not self._closed:
                self.complete_store(reserved, ok=False)
            raise
        self.complete_store(written, lengths, checksums=sums)
        return PutResult(stored=len(written),
                         duplicate=sum(r.outcome is Outcome.DUPLICATE for r in res),
                         full=sum(r.outcome is Outcome.FULL for r in res))

    def get(self, keys: Sequence[bytes]) -> list[bytes]:
        """The bytes of the present prefix of `keys` (pinned while copied). A block whose
        bytes, length or key no longer match its checksum ends the prefix: it is never
        returned."""
        out: list[bytes] = []
        with self.pinned(keys) as slots:
            for slot in slots:
                buf = bytearray(self.slot_length(slot))
                if not _call(self._p.read_verified, slot, buf):
                    break
                out.append(bytes(buf))
        return out

    def checksum(self, slot: int) -> int:
        """The checksum stored with a slot's block (bound to its key; 0: none)."""
        return int(_call(self._p.slot_checksum, slot))

    def remove(self, key: bytes) -> bool:
        """Drop one block unless it is pinned or being written."""
        return bool(_call(self._p.remove, _keys([key])))

    # -- copy engine -------------------------------------------------------------------
    def gather(self, slots: Sequence[int], block_ids: Sequence[int],
               segments: Sequence[tuple[int, int, int]], threads: int = 4) -> list[int]:
        """Engine blocks -> slots. segments: (base_ptr, block_stride_bytes, bytes).
        Returns each block's checksum: pass them to complete_store."""
        return list(_call(self._p.gather, list(slots), list(block_ids), list(segments),
                          threads))

    def scatter(self, slots: Sequence[int], block_ids: Sequence[int],
                segments: Sequence[tuple[int, int, int]], threads: int = 4,
                verify: bool = True, keys: Sequence[bytes] | None = None) -> list[int]:
        """Slots -> engine blocks. segments: (base_ptr, block_stride_bytes, bytes).
        Returns the positions (into `slots`) of blocks that failed verification: their
        bytes differ from the checksum stored with them under the key they were pinned by,
        or are fewer than the segments need. Those engine blocks hold garbage and must be
        recomputed. `keys`: the slots' keys where another handle pinned them; without
        them, every slot must be pinned by this handle."""
        return list(_call(self._p.scatter, list(slots), list(block_ids), list(segments),
                          threads, verify, _keys(keys or ())))

    # -- GPU copy engine (built where nvcc was present; see setup.py) ---------------------
    def gather_cuda(self, slots: Sequence[int], block_ids: Sequence[int],
                    segments: Sequence[tuple[int, int, int]], device: int = 0,
                    stream: int = 0, threads: int = 4, chunk_bytes: int = GPU_CHUNK_BYTES,
                    host_hash: bool = False) -> list[int]:
        """GPU blocks -> slots, a kernel reading device memory and writing the pool through
        its registered mapping (no bounce buffer). segments: (device_ptr, stride, bytes);
        `stream` a raw cudaStream_t (e.g. torch.cuda.current_stream().cuda_stream).
        The kernel also computes the blocks' checksums while it copies. Where a segment
        other than the last is not whole 8-byte words (or with `host_hash`), the blocks go
        in chunks of about `chunk_bytes` (0: one kernel for all) and `threads` host threads
        hash each chunk once it has landed, while the GPU copies the next. Returns when the
        copy is done, with the checksums as gather does. Raises PoolCudaError without CUDA."""
        return list(_call(self._p.gather_cuda, list(slots), list(block_ids),
                          list(segments), device, stream, threads, chunk_bytes, host_hash))

    def scatter_cuda(self, slots: Sequence[int], block_ids: Sequence[int],
                     segments: Sequence[tuple[int, int, int]], device: int = 0,
                     stream: int = 0, threads: int = 4, chunk_bytes: int = GPU_CHUNK_BYTES,
                     host_hash: bool = False, keys: Sequence[bytes] | None = None
                     ) -> list[int]:
        """Slots -> GPU blocks, the kernel reading the pool directly; returns the blocks
        whose bytes, as the GPU read them, fail verification, as scatter does (`keys` as
        there). See gather_cuda."""
        return list(_call(self._p.scatter_cuda, list(slots), list(block_ids),
                          list(segments), device, stream, threads, chunk_bytes,
                          host_hash, _keys(keys or ())))

    def cuda_register(self) -> None:
        """Register the mapping with the GPU now (otherwise done on the first GPU copy)."""
        _call(self._p.cuda_register)

    # -- housekeeping --------------------------------------------------------------------
    def stats(self) -> PoolStats:
        s = _call(self._p.stats)
        return PoolStats(**{f: int(getattr(s, f)) for f in PoolStats.__dataclass_fields__})

    def sweep(self) -> int:
        """Reclaim dead processes' pins and half-written slots now (also done lazily)."""
        return int(_call(self._p.sweep))

    def close(self) -> None:
        """Detach: release this process's pins and unfinished slots, unmap. Idempotent;
        every other call on a closed handle raises PoolClosedError."""
        if not self._closed:
            self._closed = True
            self._native.detach()

    @property
    def closed(self) -> bool:
        return self._closed

    def set_lock_timeout(self, seconds: float) -> None:
        """How long this handle waits for a lock held by a live process (PoolBusyError)."""
        _call(self._p.set_lock_timeout, seconds)

    def __enter__(self) -> KVPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cuda_built() -> bool:
    """Whether beluga_native carries the GPU copy path."""
    return bool(_native.CUDA_BUILT)


def cuda_device_count() -> int:
    """CUDA devices the GPU path can use (0 without CUDA, driver or device)."""
    return int(_native.cuda_device_count())


def _check_coherence(value: str) -> None:
    if value not in ("none", "flush"):
        raise PoolError(f"coherence must be 'none' or 'flush', not {value!r}")
