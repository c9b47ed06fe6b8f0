"""The pool lookup endpoint (beluga/pool_lookup.py) inside a worker's vLLM API server.

`beluga worker` starts vLLM with ``--middleware engine.pool_lookup_endpoint.PoolLookupMiddleware``
and hands it the pool's path and coherence as BELUGA_POOL_PATH and BELUGA_POOL_COHERENCE (read
through Settings). The middleware answers ``POST /beluga/v1/pool/lookup`` itself, on the port
the gateway already reaches, and passes every other request to vLLM untouched. It attaches
the pool on the first lookup (the engine creates it; the API server may answer first), without
prefaulting: a lookup reads a few index cache lines and takes no pins.

With a worker credential (`worker_api_key`, BELUGA_WORKER_API_KEY), every request but
`GET /health` and `/metrics` needs `Authorization: Bearer <key>`, else 401 in OpenAI's error
shape: the lookup endpoint, and vLLM's routes outside /v1 that its own VLLM_API_KEY check
leaves open (/tokenize, /invocations, /pause, ...). Workers are reached through the gateway.
Without a pool (`--no-pool`) the lookup path is vLLM's (404).

The pool is never called on the API server's event loop: attaching, looking up and detaching
run on one thread of the middleware's own (a pool handle is used by one thread at a time),
and the handle waits at most `pool_lock_timeout_s` (BELUGA_POOL_LOCK_TIMEOUT_S) for a lock
another process holds. A lookup that fails with a kvpool.PoolError is answered 503 with the
error's kind in its code (`pool_busy`, `pool_corrupt`, ...), counted in
`beluga_worker_pool_lookup_errors_total{kind}` and logged once per kind a minute; after a
busy lock, lookups are answered `pool_busy` at once for a moment (BUSY_BACKOFF_S), and past
MAX_WAITING lookups waiting for the thread too.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from prometheus_client import Counter
from pydantic import ValidationError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from beluga.pool_errors import KINDS, BusyBackoff, PoolErrorLog
from beluga.pool_lookup import (
    LOOKUP_PATH,
    LOOKUP_VERSION,
    MAX_BODY_BYTES,
    MAX_KEYS,
    LookupReply,
    LookupRequest,
)
from beluga.settings import Settings
from kvpool import KVPool, PoolBusyError, PoolError

logger = logging.getLogger(f"vllm.{__name__}")  # through vLLM's log handlers

REATTACH_S = 5.0  # how often a pool of another UUID at our path is looked at again
MAX_WAITING = 32  # lookups waiting for the pool thread; more are answered pool_busy

T = TypeVar("T")

# In vLLM's API server process, served on its /metrics (the default registry).
LOOKUP_ERRORS = Counter("beluga_worker_pool_lookup_errors",
                        "Pool lookups this worker answered with an error (503), by kind: "
                        "busy, corrupt, closed, ... (beluga/pool_errors.py KINDS).", ["kind"])


# What stays open with a credential: liveness and metrics (scraped by Prometheus).
OPEN_PATHS = frozenset({"/health", "/metrics"})


def error(status: int, message: str, code: str,
          headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "service_unavailable"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": code}}, status_code=status, headers=headers)


def unauthorized() -> JSONResponse:
    return error(401, "this worker requires its credential: send `Authorization: Bearer "
                 "<worker_api_key>` (clients go through the gateway)", "invalid_api_key",
                 headers={"www-authenticate": "Bearer"})


def bearer_matches(scope: Scope, key: bytes) -> bool:
    """True when the request's first Authorization header is `Bearer <key>` (the token is
    compared in constant time)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            scheme, _, token = bytes(value).strip().partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)
    return False


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body; None past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class PoolLookupMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings | None = None) -> None:
        self.app = app
        s = settings if settings is not None else Settings()
        self.pool_path = s.resolved_pool_path
        self.coherence = s.pool_coherence
        self.serves_lookups = s.pool
        self.key = s.worker_api_key.encode() if s.worker_api_key else None
        self.lock_timeout_s = s.pool_lock_timeout_s
        self._pool: KVPool | None = None
        self._pool_uuid: str | None = None  # the attached pool's (read without the handle)
        self._tried_at = float("-inf")  # the last attach attempt (monotonic)
        self._lock = asyncio.Lock()
        # Every call into the pool runs here, one at a time (the handle is single-threaded).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="beluga-pool-lookup")
        self._waiting = 0
        self.errors = PoolErrorLog(logger, "pool lookup endpoint", self._count)
        self.backoff = BusyBackoff()

    @staticmethod
    def _count(kind: str) -> None:
        LOOKUP_ERRORS.labels(kind if kind in KINDS else "other").inc()

    async def _on_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the pool thread; PoolBusyError at once when MAX_WAITING
        calls wait for it already."""
        if self._waiting >= MAX_WAITING:
            raise PoolBusyError(f"{self._waiting} pool lookups are waiting already")
        self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._thread, lambda: fn(*args, **kwargs))
        finally:
            self._waiting -= 1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        if self.key is not None and not self.is_open(scope) \
                and not bearer_matches(scope, self.key):
            if scope["type"] == "websocket":  # closed before accept: the client sees 403
                await send({"type": "websocket.close", "code": 1008})
            else:
                await unauthorized()(scope, receive, send)
            return
        if scope["type"] != "http" or scope["path"] != LOOKUP_PATH or not self.serves_lookups:
            await self.app(scope, receive, send)
            return
        response = await self.answer(scope["method"], receive)
        await response(scope, receive, send)

    @staticmethod
    def is_open(scope: Scope) -> bool:
        path = str(scope["path"])
        root = str(scope.get("root_path", ""))
        if root and path.startswith(root):
            path = path[len(root):]
        return scope["type"] == "http" and path in OPEN_PATHS

    async def answer(self, method: str, receive: Receive) -> JSONResponse:
        if method != "POST":
            return error(405, f"{LOOKUP_PATH} takes POST", "method_not_allowed")
        body = await read_body(receive, MAX_BODY_BYTES)
        if body is None:
            return error(413, f"lookup body over {MAX_BODY_BYTES} bytes", "too_large")
        try:
            req = LookupRequest.model_validate_json(body)
        except ValidationError as exc:
            first: dict[str, Any] = dict(exc.errors()[0])
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            if where == "keys" and first.get("type") == "too_long":
                return error(413, f"more than {MAX_KEYS} keys in one lookup", "too_large")
            return error(400, f"invalid pool lookup: {where}: {first.get('msg')}",
                         "invalid_lookup")
        try:
            pool = await self.attached(req.pool_uuid)
            if pool is None:
                return error(503, f"the pool at {self.pool_path} cannot be attached here",
                             "pool_unavailable")
            if self._pool_uuid != req.pool_uuid:
                return error(404, f"pool {req.pool_uuid} is not this worker's (it shares "
                             f"{self._pool_uuid})", "pool_not_found")
            if self.backoff.active():  # (not noted again: the backoff ends on time)
                return self.failed(PoolBusyError("the pool lock was busy a moment ago; "
                                                 "not waiting for it again yet"))
            blocks = await self._on_thread(pool.lookup_prefix, req.block_keys())
        except PoolError as exc:
            self.backoff.note(exc)
            return self.failed(exc)
        return JSONResponse(LookupReply(version=LOOKUP_VERSION, pool_uuid=req.pool_uuid,
                                        blocks=blocks).model_dump())

    def failed(self, exc: PoolError) -> JSONResponse:
        """503 for a lookup the pool could not answer, its kind in the code (counted)."""
        kind = self.errors.report(exc, "answering a lookup (503)")
        return error(503, f"pool lookup failed ({kind}): {exc}", f"pool_{kind}")

    async def attached(self, want: str) -> KVPool | None:
        """The pool at our path. Attached on the first lookup, and again when it is not the
        `want`ed one (the file may have been replaced), at most every REATTACH_S."""
        pool = self._pool
        if pool is not None and self._pool_uuid == want:
            return pool
        if time.monotonic() - self._tried_at < REATTACH_S:
            return pool
        async with self._lock:
            if self._pool is not pool or time.monotonic() - self._tried_at < REATTACH_S:
                return self._pool  # another lookup attached (or tried) meanwhile
            self._tried_at = time.monotonic()
            try:
                fresh = await self._on_thread(KVPool.attach, self.pool_path,
                                              coherence=self.coherence, wait_init_s=0.0,
                                              prefault=False,
                                              lock_timeout_s=self.lock_timeout_s)
            except PoolError as exc:
                logger.warning("pool lookup: cannot attach %s: %s", self.pool_path, exc)
                return pool
            self._pool, self._pool_uuid = fresh, str(fresh.uuid)
            if pool is not None:  # after any lookup queued on it (same thread)
                self._thread.submit(pool.close)
            logger.info("pool lookup: attached pool %s at %s", self._pool_uuid,
                        self.pool_path)
            return fresh
