"""What the pool's callers do with a `kvpool.PoolError`: serve without the pool, count, log.

Every pool failure reaches Python as a `kvpool.PoolError` subclass (kvpool/errors.py). The
pool is a cache: a busy lock (a peer holding it too long, or frozen), a corrupt value (which
the next call repairs), a closed handle — each means "serve this request without the pool",
never an exception into vLLM and never a 5xx from our code. The callers (engine/connector.py,
engine/pool_lookup_endpoint.py, gateway/prefixes.py) count each failure by `error_kind`
(a fixed set: bounded Prometheus label values) and log it through a `PoolErrorLog`: the
first of each kind at once, then at most one line per kind every `every_s` seconds, saying
how many were not logged.

After a PoolBusyError the pool's optional calls (lookups, pins, saves) are skipped for
`BUSY_BACKOFF_S` (`BusyBackoff`): each busy call waits its handle's whole lock timeout, and a
frozen lock holder would otherwise cost that much on every request or engine step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

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

_KIND_OF: dict[type[PoolError], str] = {
    PoolBusyError: "busy",
    PoolCorruptError: "corrupt",
    PoolClosedError: "closed",
    PoolArgumentError: "argument",
    PoolIOError: "io",
    PoolPermissionError: "permission",
    PoolClientLimitError: "client_limit",
    PoolCudaError: "cuda",
    PoolFormatError: "format",
    PoolGeometryError: "geometry",
    PoolFingerprintError: "fingerprint",
    PoolExistsError: "exists",
    PoolNotFoundError: "not_found",
}
# Every value error_kind returns (the label values of the per-kind counters).
KINDS: tuple[str, ...] = (*_KIND_OF.values(), "other")

BUSY_BACKOFF_S = 2.0  # optional pool calls skipped after a PoolBusyError
LOG_EVERY_S = 60.0    # a kind of pool error logged again at most this often


def error_kind(exc: PoolError) -> str:
    """The kind of a pool error, one of KINDS ("other" for a PoolError of no known class)."""
    for cls in type(exc).__mro__:
        kind = _KIND_OF.get(cls)
        if kind is not None:
            return kind
    return "other"


class PoolErrorLog:
    """Counts pool errors by kind (`count(kind)`) and logs them, rate-limited per kind.

    `report(exc, doing)` logs "<where>: pool <kind> error <doing>: <exc>" at WARNING the
    first time a kind is seen, then at most once per `every_s` per kind (with how many were
    not logged since); returns the kind."""

    def __init__(self, logger: logging.Logger, where: str,
                 count: Callable[[str], None] | None = None, every_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._where = where
        self._count = count
        self._every_s = every_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}  # not logged since the last line, per kind
        self.counts: dict[str, int] = {}  # since construction, per kind

    def report(self, exc: PoolError, doing: str) -> str:
        kind = error_kind(exc)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self._count is not None:
            self._count(kind)
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._every_s:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            return kind
        self._last[kind] = now
        quiet = self._quiet.pop(kind, 0)
        self._logger.warning("%s: pool %s error %s: %s%s", self._where, kind, doing, exc,
                             f" ({quiet} more since the last such line)" if quiet else "")
        return kind


class BusyBackoff:
    """Whether the pool's optional calls are skipped now: for `backoff_s` after a busy
    error (`note`), so a frozen lock holder costs one lock timeout per `backoff_s`, not one
    per call."""

    def __init__(self, backoff_s: float = BUSY_BACKOFF_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backoff_s = backoff_s
        self._clock = clock
        self._until = float("-inf")

    def note(self, exc: BaseException) -> None:
        if isinstance(exc, PoolBusyError):
            self._until = self._clock() + self.backoff_s

    def active(self) -> bool:
        return self._clock() < self._until
