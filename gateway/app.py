"""The FastAPI gateway: one OpenAI-compatible front for all workers.

The app's lifespan owns one `UpstreamClient` (gateway/upstream.py) and the registry
refresher. A request is
parsed (see `gateway.requests`), a policy picks a healthy worker serving its model, and the
body is forwarded unchanged. If connecting to (or reading from) a worker fails before the
client got any byte, the worker is taken out for `unhealthy_cooldown_s` and the request is
tried on another one. A streaming client that goes away closes the upstream stream, which
makes vLLM abort the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hashlib
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from beluga.pool_lookup import LOOKUP_PATH, MAX_KEYS, LookupReply, request_body
from beluga.settings import Settings
from gateway.dashboard import STATIC, UPLOT, Dashboard
from gateway.errors import (
    APIError,
    NoHealthyWorker,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UpstreamFailure,
    UpstreamTimeout,
    error_body,
    normalize_upstream_error,
    status_error_type,
)
from gateway.metrics import GatewayMetrics
from gateway.openapi import CHAT_REQUEST, COMPLETION_REQUEST, operation
from gateway.policies import Choice, Policy, RequestInfo, make_policy
from gateway.prefixes import BlockKeyMemo, Keying, PrefixIndex
from gateway.requests import Endpoint, ParsedRequest, parse_request
from gateway.sse import UsageFilter, with_usage_body
from gateway.tokenize import Prompt, PromptTokenizer
from gateway.upstream import ConnectFailed, Disconnected, UpstreamClient, UpstreamError
from gateway.upstream import Response as UpstreamResponse
from gateway.workers import WorkerPool, WorkerState
from kvpool.keys import next_key

logger = logging.getLogger(__name__)

UPSTREAM_PATHS: dict[Endpoint, str] = {"chat": "/v1/chat/completions",
                                       "completions": "/v1/completions"}
# Errors after which nothing reached the client and the worker is presumed down.
RETRYABLE = (ConnectFailed, Disconnected)
SHUTDOWN_STEP_S = 5.0  # the most each shutdown step may take
LOOKUP_BACKOFF_S = 5.0
UPSTREAM_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}


class Gateway:
    """State shared by all requests of one gateway process."""

    def __init__(self, settings: Settings, pool: WorkerPool, policy: Policy) -> None:
        self.settings = settings
        self.pool = pool
        self.policy = policy
        self.client: UpstreamClient | None = None
        self.tenants = settings.api_key_tenants
        self.metrics = GatewayMetrics(policy.name)
        self.metrics.watch_workers(self.pool.snapshot)
        self.prefixes = PrefixIndex(pool.client, settings.redis_key_prefix)
        self.key_memo = BlockKeyMemo()
        self.lookup_backoff: dict[str, float] = {}  # worker id -> when to ask it again
        self.metrics.watch_pool(self.prefixes.pool_stats)
        self.dashboard = Dashboard(self.metrics.registry, self.pool.snapshot,
                                   self.prefixes.pool_stats,
                                   interval_s=settings.dashboard_interval_s)
        # The served model's tokenizer, from its folder or (a Hub id) the Hugging Face cache.
        local = settings.model_hub_id is None
        self.tokenizer = PromptTokenizer(
            {settings.served_model_name: settings.model_ref}
            if not local or settings.model_path.is_dir() else {})

    def authorize(self, authorization: str) -> str | None:
        """The tenant of the caller's `Authorization` header, or None when no keys are
        configured; 401 otherwise."""
        if not self.tenants:
            return None
        scheme, _, key = authorization.partition(" ")
        tenant = self.tenants.get(key.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise Unauthorized("Incorrect or missing API key. Send `Authorization: Bearer "
                               "<key>` with a key this gateway knows.", code="invalid_api_key")
        return tenant

    @staticmethod
    def salted(req: ParsedRequest, tenant: str) -> tuple[ParsedRequest, bytes]:
        """The request with the tenant's cache salt (combined with any salt the client
        sent), so no two tenants ever share a cached prefix, in vLLM or in the pool."""
        client_salt = req.payload.get("cache_salt")
        h = hashlib.sha256(b"beluga-tenant-v1\0" + tenant.encode())
        if isinstance(client_salt, str) and client_salt:
            h.update(b"\0" + client_salt.encode())
        payload = dict(req.payload, cache_salt=h.hexdigest())
        return replace(req, payload=payload), json.dumps(payload).encode()

    async def route_info(self, req: ParsedRequest, workers: list[WorkerState]
                         ) -> tuple[RequestInfo, Iterator[bytes]]:
        """The request's prompt as the policies see it: length, block keys, and how many
        leading blocks each worker and the pool hold; and the prompt's later block keys, not
        read yet (nobody holds them), to be read off the request's critical path."""
        base = RequestInfo(model=req.model, endpoint=req.endpoint, stream=req.stream)
        if not self.policy.uses_prefixes:
            return base, iter(())
        keying = self.prefixes.keying([w.id for w in workers])
        if keying is None or not self.tokenizer.knows(req.model):
            return base, iter(())
        prompt = self.tokenizer.prompt(req.model, req.endpoint, req.payload)
        if prompt is None:
            return base, iter(())
        salt = req.payload.get("cache_salt")
        # Tokenized and keyed only as far as some worker or the pool holds the prefix.
        later = lazy_block_keys(prompt, keying, salt if isinstance(salt, str) else "",
                                self.key_memo)
        keys, local, pooled = self.prefixes.match(keying, [w.id for w in workers], later)
        remote = self.prefixes.remote_pool(keying)
        if (remote is not None and self.policy.uses_pool
                and self.settings.pool_lookup_timeout_s > 0):
            # The pool is not mapped here: a worker is asked about the keys read so far
            # (up to the first block no worker holds). Only if the pool holds all of them
            # is the rest of the prompt keyed and asked about: a new prompt costs one
            # round trip and no more tokenizing, a pooled one two round trips.
            pooled = await self.ask_pool(remote, keys, workers)
            if keys and pooled == len(keys):
                rest = list(later)
                keys.extend(rest)
                pooled += await self.ask_pool(remote, rest, workers)
        return RequestInfo(
            model=req.model, endpoint=req.endpoint, stream=req.stream,
            prompt_tokens=prompt.estimate_total(), block_tokens=keying.block_tokens,
            keys=tuple(keys), local_blocks=local, pool_blocks=pooled), later

    async def ask_pool(self, pool_uuid: str, keys: list[bytes],
                       workers: list[WorkerState]) -> int:
        """How many leading `keys` the pool holds, as a worker sharing it says within
        `pool_lookup_timeout_s`; 0 when none can say. A worker that fails to answer is not
        asked again for LOOKUP_BACKOFF_S."""
        assert self.client is not None
        now = time.monotonic()
        sharers = [w for w in workers if w.healthy(now) and self.prefixes.shares_pool(
            w.id, pool_uuid) and self.lookup_backoff.get(w.id, 0.0) <= now]
        if not keys or not sharers:
            return 0
        worker = min(sharers, key=lambda w: w.in_flight)
        keys = keys[:MAX_KEYS]
        try:
            async with asyncio.timeout(self.settings.pool_lookup_timeout_s):
                resp = await self.client.request("POST", worker.url + LOOKUP_PATH,
                                                 request_body(pool_uuid, keys),
                                                 UPSTREAM_HEADERS)
                try:
                    content = await resp.read()
                finally:
                    resp.release()
            if resp.status != 200:
                raise UpstreamError(f"HTTP {resp.status}: {content[:200]!r}")
            reply = LookupReply.model_validate_json(content)
            if reply.pool_uuid != pool_uuid or reply.blocks > len(keys):
                raise UpstreamError(f"an answer for another lookup: {reply}")
        except (UpstreamError, TimeoutError, OSError, ValidationError) as exc:
            result = "timeout" if isinstance(exc, TimeoutError) else "error"
            self.metrics.pool_lookup(result)
            self.lookup_backoff[worker.id] = now + LOOKUP_BACKOFF_S
            logger.warning("pool lookup on %s failed (%s: %s); not asking it for %gs",
                           worker.id, result, exc, LOOKUP_BACKOFF_S)
            return 0
        self.metrics.pool_lookup("ok")
        return reply.blocks

    async def refresh(self) -> None:
        await self.pool.refresh()
        await self.prefixes.refresh(w.id for w in self.pool.snapshot())

    async def run_refresh(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.settings.registry_refresh_s)

    async def run_health_checks(self) -> None:
        assert self.client is not None
        while True:
            await asyncio.sleep(self.settings.health_check_interval_s)
            try:
                await self.pool.check_health(self.client)
            except Exception:  # a bug here must not stop the checks for good
                logger.exception("health checks failed")

    async def read_body(self, declared: str | None, stream: AsyncIterator[bytes]) -> bytes:
        """The request body, at most `max_request_bytes` of it (413 past that, declared or
        not)."""
        limit = self.settings.max_request_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def serve(self, endpoint: Endpoint, authorization: str, declared: str | None,
                    stream: AsyncIterator[bytes]) -> Response:
        """One chat or completions request: authorize, read, parse, route, forward. An
        APIError is counted and raised, for the caller to send as the OpenAI error body."""
        try:
            tenant = self.authorize(authorization)
            body = await self.read_body(declared, stream)
            req = parse_request(body, endpoint)
            if tenant is not None:
                req, body = self.salted(req, tenant)
            return await self.forward(req, body)
        except APIError as exc:
            self.metrics.answered(endpoint, exc.status_code, None, None)
            raise

    def candidates(self, req: ParsedRequest, tried: set[str]) -> list[WorkerState]:
        workers = self.pool.for_model(req.model)
        if not workers:
            if not self.pool.snapshot():
                raise NoHealthyWorker("no worker is registered; is any worker running?",
                                      code="no_worker")
            raise NotFound(f"The model '{req.model}' does not exist; available: "
                           f"{', '.join(self.pool.models())}", param="model",
                           code="model_not_found")
        now = time.monotonic()
        return [w for w in workers if w.healthy(now) and w.id not in tried]

    async def forward(self, req: ParsedRequest, body: bytes) -> Response:
        assert self.client is not None
        strip_usage = False
        if req.stream:  # ask for usage (metrics); removed again if the client did not ask
            body, strip_usage = with_usage_body(body, req.payload)
        tried: set[str] = set()
        info: RequestInfo | None = None
        last_error: APIError | None = None
        started = time.perf_counter()
        for _ in range(self.settings.max_attempts):
            candidates = self.candidates(req, tried)
            if info is None:
                info, later = await self.route_info(req, self.pool.for_model(req.model))
            choice = self.policy.select(candidates, info)
            if choice is None:
                break
            worker = choice.worker
            tried.add(worker.id)
            if logger.isEnabledFor(logging.DEBUG):  # its arguments cost per request
                logger.debug("routed to %s (%s, estimate %s): %d tokens, first key %s, "
                             "local %s, pool %d, candidates %s", worker.id, choice.reason,
                             choice.estimate_s, info.prompt_tokens,
                             info.keys[0].hex()[:12] if info.keys else None,
                             dict(info.local_blocks), info.pool_blocks,
                             [w.id for w in candidates])
            # Bookkeeping that can wait (this gateway's record of what the worker will hold,
            # the routing metrics) runs once this task waits for the worker's answer, that
            # is after the request is written: off the request's critical path. The rest of
            # the prompt's keys stay unread unless the prompt comes back.
            asyncio.get_running_loop().call_soon(self.record_route, choice, info, later)
            later = iter(())  # one reader; a retry elsewhere records what routing read
            headers = {"x-beluga-worker": worker.id, "x-beluga-route": choice.reason}
            prefill = choice.prefill_tokens
            worker.begin(prefill)
            try:
                resp = await self.post(worker, req.endpoint, body)
            except RETRYABLE as exc:
                worker.done(prefill)
                self.pool.mark_unhealthy(worker, f"failed ({exc!r})")
                last_error = UpstreamFailure(f"worker {worker.id} failed: {exc!r}")
                continue
            except TimeoutError:
                worker.done(prefill)
                raise UpstreamTimeout(f"worker {worker.id} did not answer in time") from None
            except BaseException:  # e.g. the client went away (cancelled) before the answer
                worker.done(prefill)
                raise
            if resp.status != 200 or not req.stream:
                try:
                    content = await resp.read()
                except RETRYABLE as exc:
                    self.pool.mark_unhealthy(worker, f"failed ({exc!r})")
                    last_error = UpstreamFailure(f"worker {worker.id} failed: {exc!r}")
                    continue
                except TimeoutError:
                    raise UpstreamTimeout(
                        f"worker {worker.id} did not answer in time") from None
                finally:
                    worker.done(prefill)
                    resp.release()
                if resp.status == 200:
                    return Answer(content, resp.headers.get("content-type", "application/json"),
                                  headers, functools.partial(self.answered, req.endpoint,
                                                             worker.id, started, content))
                out = self.buffered_response(resp, content, headers)
                self.metrics.answered(req.endpoint, out.status_code, worker.id,
                                      time.perf_counter() - started)
                return out
            stream = self.relay(resp, worker, choice, info, started, UsageFilter(strip_usage))
            # A client gone before the stream starts leaves the generator never run (its
            # finally too): release the worker and the connection when it is collected.
            weakref.finalize(stream, _release_unstarted, worker, resp, prefill)
            return Relay(stream, headers)
        raise last_error or NoHealthyWorker(
            f"no healthy worker can serve '{req.model}' right now", code="no_healthy_worker")

    def record_route(self, choice: Choice, info: RequestInfo, later: Iterator[bytes]) -> None:
        self.prefixes.routed(choice.worker.id, info.keys, later)
        self.metrics.routed(choice, info)

    async def post(self, worker: WorkerState, endpoint: Endpoint,
                   body: bytes) -> UpstreamResponse:
        """POST to a worker. Workers close idle kept-alive connections (vLLM after 5 s), and
        one can close just as it is reused: the worker never got that request, so it is
        sent again once, to the same worker (another would lose the prefix it was routed
        for). A worker that cannot be connected to at all is not retried here."""
        assert self.client is not None
        url = worker.url + UPSTREAM_PATHS[endpoint]
        try:
            return await self.client.request("POST", url, body, UPSTREAM_HEADERS)
        except Disconnected as exc:
            if not (exc.reused and exc.before_response):
                raise
            logger.info("worker %s closed a kept-alive connection (%s); sending again",
                        worker.id, exc)
            return await self.client.request("POST", url, body, UPSTREAM_HEADERS)

    def answered(self, endpoint: Endpoint, worker_id: str, started: float,
                 content: bytes) -> None:
        """Count a worker's 200 answer (once the client has it)."""
        with contextlib.suppress(ValueError):
            answer = json.loads(content)
            if isinstance(answer, dict):
                self.metrics.usage(answer.get("usage"))
        self.metrics.answered(endpoint, 200, worker_id, time.perf_counter() - started)

    @staticmethod
    def buffered_response(resp: UpstreamResponse, content: bytes,
                          headers: dict[str, str]) -> Response:
        """A worker's error answer, in the OpenAI error format."""
        if resp.status >= 500:
            detail = normalize_upstream_error(resp.status, content)["error"]["message"]
            return UpstreamFailure(f"worker error {resp.status}: {detail}").response()
        return JSONResponse(normalize_upstream_error(resp.status, content),
                            status_code=resp.status, headers=headers)

    async def relay(self, resp: UpstreamResponse, worker: WorkerState, choice: Choice,
                    info: RequestInfo, started: float,
                    usage: UsageFilter) -> AsyncIterator[bytes]:
        """Pass SSE bytes through; a worker failure mid-stream ends with an error event.
        The first chunk's arrival is the request's TTFT, which the policy learns from once
        the chunk is on its way to the client (the learning is off the client's TTFT)."""
        last: float | None = None
        unprefilled = choice.prefill_tokens
        resp.relayed = True  # see _release_unstarted
        try:
            async for chunk in resp.chunks():
                now = time.perf_counter()
                out = usage.feed(chunk)
                if out:
                    yield out
                if last is None:
                    worker.prefilled(unprefilled)
                    unprefilled = 0
                    ttft = now - started
                    self.policy.observe(choice, info, ttft)
                    self.metrics.child(self.metrics.ttft, worker.id,
                                       self.metrics.policy).observe(ttft)
                else:
                    self.metrics.child(self.metrics.itl, worker.id).observe(now - last)
                last = now
            rest = usage.flush()
            if rest:
                yield rest
            self.metrics.usage(usage.usage)
            self.metrics.answered(info.endpoint, 200, worker.id, time.perf_counter() - started)
        except TimeoutError:
            self.metrics.answered(info.endpoint, UpstreamTimeout.status_code, worker.id, None)
            yield UpstreamTimeout(f"worker {worker.id} went silent mid-stream").sse_event()
        except UpstreamError as exc:
            self.pool.mark_unhealthy(worker, f"failed mid-stream ({exc!r})")
            self.metrics.answered(info.endpoint, UpstreamFailure.status_code, worker.id, None)
            yield UpstreamFailure(f"worker {worker.id} failed mid-stream: {exc!r}").sse_event()
        finally:
            worker.done(unprefilled)
            resp.release()


def raw_headers(media_type: str, headers: dict[str, str],
                content_length: bytes | None = None) -> list[tuple[bytes, bytes]]:
    """An answer's ASGI headers: its type, its length when known, then `headers`."""
    raw = [(b"content-type", media_type.encode("latin-1"))]
    if content_length is not None:
        raw.append((b"content-length", content_length))
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    return raw


class Answer(Response):
    """A worker's 200 answer, passed on as it came: two ASGI messages, without Starlette's
    header building. `after` (the bookkeeping) runs once the body is handed to the server,
    off the client's critical path."""

    def __init__(self, body: bytes, media_type: str, headers: dict[str, str],
                 after: Callable[[], None]) -> None:
        self.status_code = 200
        self.body = body
        self.background = None
        self.raw_headers = raw_headers(media_type, headers, b"%d" % len(body))
        self._after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self.body})
        finally:
            self._after()
        if self.background is not None:
            await self.background()


class Relay(Response):
    """A worker's stream passed on as raw ASGI messages. A client that goes away (an
    `http.disconnect` on `receive`) cancels the relay wherever it waits, the worker's next
    event included, and the stream is closed, which closes the worker's connection: vLLM
    aborts the request. (Starlette's StreamingResponse does the same with a task group of
    two tasks per stream under uvicorn's ASGI 2.3; this is one small task.)"""

    def __init__(self, stream: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        self.status_code = 200
        self.background = None
        self.body_iterator = stream
        self.raw_headers = raw_headers("text/event-stream; charset=utf-8", headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = asyncio.current_task()
        assert relay is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            relay.cancel()

        watcher = asyncio.create_task(watch())
        try:
            try:
                await send({"type": "http.response.start", "status": 200,
                            "headers": self.raw_headers})
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                # Cancelled before it runs again: the disconnect uvicorn reports once the
                # response is complete never reaches it.
                watcher.cancel()
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:  # (a stream cancelled or ended is closed already)
                    await aclose()
        except asyncio.CancelledError:
            if not gone:
                raise
            relay.uncancel()  # the client left: nothing more to send
            return
        if self.background is not None:
            await self.background()


class ClientGone(Exception):
    """The client disconnected before its request body was read."""


HOT_ROUTES: dict[str, Endpoint] = {path: e for e, path in UPSTREAM_PATHS.items()}


class Front:
    """The gateway's ASGI app: POSTs to the two completion routes go straight to
    `Gateway.serve`, everything else (and the lifespan) to the FastAPI app.

    The hot routes skip FastAPI's router, dependency solving, Request objects and the
    Starlette middleware that wraps every `send`: on a slow core that was about a fifth of
    the gateway's CPU per request (py-spy, bench/README.md). The FastAPI app still declares
    both routes (the OpenAPI schema, and the same handler if it is served on its own)."""

    def __init__(self, app: FastAPI, gateway: Gateway) -> None:
        self.fastapi = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = HOT_ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            await self.fastapi(scope, receive, send)
            return
        authorization, declared = "", None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                declared = value.decode("latin-1")
        response: Response
        try:
            response = await self.gateway.serve(endpoint, authorization, declared,
                                                _body(receive))
        except ClientGone:
            return
        except APIError as exc:
            response = exc.response()
        except Exception:
            logger.exception("unexpected error while serving a request")
            response = JSONResponse(error_body("internal gateway error", "internal_error"),
                                    status_code=500)
        await response(scope, receive, send)


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    """A request body's chunks off the ASGI `receive` channel."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def _release_unstarted(worker: WorkerState, resp: UpstreamResponse,
                       prefill: int) -> None:
    """Finalizer of a relay generator: if it never ran, nobody released its worker."""
    if not resp.relayed:
        worker.done(prefill)
        resp.release()


def lazy_block_keys(prompt: Prompt, keying: Keying, cache_salt: str,
                    memo: BlockKeyMemo) -> Iterator[bytes]:
    """The prompt's block keys (kvpool.block_keys), each tokenized only when asked for. A
    whole piece the memo has seen from the same chain state costs no hashing."""
    bt = keying.block_tokens
    prev = memo.root(keying.fingerprint, cache_salt)
    buf: list[int] = []
    parts = prompt.parts()
    while True:
        try:
            ids, piece = next(parts)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - e.g. a lone surrogate: route without it
            logger.debug("cannot tokenize the rest of a prompt: %s", exc)
            return
        state = None
        if piece is not None and len(ids) >= bt:
            state = (prev, bt, tuple(buf), piece)
            known = memo.get(state)
            if known is not None:
                keys, rest = known
                yield from keys
                if keys:
                    prev = keys[-1]
                buf = list(rest)
                continue
        buf.extend(ids)
        start = 0
        made: list[bytes] = []
        while len(buf) - start >= bt:
            prev = next_key(prev, buf[start:start + bt])
            start += bt
            made.append(prev)
            yield prev
        del buf[:start]
        if state is not None:
            memo.put(state, (tuple(made), tuple(buf)))


def create_app(settings: Settings, pool: WorkerPool | None = None) -> Front:
    """Build the gateway app. `pool` defaults to the Redis-backed registry of `settings`."""
    gw = Gateway(settings, pool or WorkerPool.from_settings(settings),
                 make_policy(settings.routing_policy))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # connect: the TCP handshake; read: silence on the wire. Idle connections are
        # dropped before vLLM's keep-alive (5 s) would drop them.
        client = UpstreamClient(connect_timeout_s=settings.connect_timeout_s,
                                read_timeout_s=settings.upstream_timeout_s, keepalive_s=4.0)
        gw.client = client
        tasks: list[asyncio.Task[None]] = []
        try:
            await gw.refresh()
            if gw.policy.uses_prefixes:  # now, not on the first request
                await asyncio.to_thread(gw.tokenizer.load_all)
            # Everything loaded so far (the tokenizer's vocabulary, transformers, FastAPI)
            # lives as long as the process: out of the collector's sight, a full collection
            # no longer walks millions of objects every few thousand requests. (vLLM's API
            # server does the same after startup; measured in bench/README.md.)
            gc.collect()
            gc.freeze()
            tasks = [asyncio.create_task(gw.run_refresh()),
                     asyncio.create_task(gw.dashboard.run())]
            if settings.health_check_interval_s > 0:
                tasks.append(asyncio.create_task(gw.run_health_checks()))
            yield
        finally:
            # Shutting down never hangs: each step gets a bounded time (a Redis or worker
            # connection stuck mid-close must not keep the process from exiting).
            for task in tasks:
                task.cancel()
            if tasks:
                _done, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_STEP_S)
                if pending:
                    logger.warning("%d background tasks did not stop in %s s", len(pending),
                                   SHUTDOWN_STEP_S)
            gw.prefixes.close()
            gc.unfreeze()  # (an app run in a longer process, e.g. a test, lets go of them)
            for what, closing in (("worker connections", client.close),
                                  ("Redis connection", gw.pool.close)):
                try:
                    await asyncio.wait_for(closing(), SHUTDOWN_STEP_S)
                except TimeoutError:
                    logger.warning("closing the %s took over %s s; left behind", what,
                                   SHUTDOWN_STEP_S)

    app = FastAPI(title="Beluga gateway", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gw

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), status_error_type(exc.status_code)),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving a request")
        return JSONResponse(error_body("internal gateway error", "internal_error"),
                            status_code=500)

    async def handle(request: Request, endpoint: Endpoint) -> Response:
        # Reached only when this FastAPI app is served without its Front (which serves
        # these two routes itself): the same gateway method.
        return await gw.serve(endpoint, request.headers.get("authorization", ""),
                              request.headers.get("content-length"), request.stream())

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {
        "description": "Prometheus text exposition format.",
        "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions", openapi_extra=operation(
        CHAT_REQUEST, "A chat completion, or its server-sent events when streaming."))
    async def chat_completions(request: Request) -> Response:
        return await handle(request, "chat")

    @app.post("/v1/completions", openapi_extra=operation(
        COMPLETION_REQUEST, "A completion, or its server-sent events when streaming."))
    async def completions(request: Request) -> Response:
        return await handle(request, "completions")

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> Response:
        if not (UPLOT / "uPlot.iife.min.js").is_file():
            return PlainTextResponse(
                f"The dashboard's chart library is not installed ({UPLOT}): run `make setup` "
                "(it runs `npm ci` in gateway/static).", status_code=503)
        return FileResponse(STATIC / "dashboard.html", media_type="text/html")

    @app.get("/dashboard/assets/{name}", include_in_schema=False)
    async def dashboard_asset(name: str) -> Response:
        if name not in ("uPlot.iife.min.js", "uPlot.min.css") or not (UPLOT / name).is_file():
            raise NotFound(f"no dashboard asset {name!r}")
        return FileResponse(UPLOT / name)

    @app.get("/dashboard/data", include_in_schema=False)
    async def dashboard_data() -> dict[str, Any]:
        return gw.dashboard.data()

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        gw.authorize(request.headers.get("authorization", ""))
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "beluga"}
            for name in gw.pool.models()]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        now = time.monotonic()
        workers = gw.pool.snapshot()
        return {
            "status": "ok" if any(w.healthy(now) for w in workers) else "no_healthy_worker",
            "redis": gw.pool.redis_ok,
            "workers": [{"id": w.id, "url": w.url, "model": w.record.model,
                         "healthy": w.healthy(now), "in_flight": w.in_flight,
                         "pending_prefill_tokens": w.pending_prefill,
                         "running": w.record.running, "waiting": w.record.waiting}
                        for w in workers],
        }

    return Front(app, gw)
