"""The FastAPI gateway: one OpenAI-compatible front for all workers.

The parts, one job each:
* `gateway/front.py` — the ASGI front: the two completion routes, body limits and
  timeouts, overload refusals, a client gone cancelling its request;
* `Gateway` (here) — per-process state: the workers, the policy, authentication and tenant
  salts; `serve` parses a request and hands it on;
* `gateway/routing.py` — what routing knows of a prompt (keys, local and pool blocks), its
  CPU work bounded on the routing thread;
* `gateway/forward.py` — tries, retries, answers and stream relays;
* the routes, the lifespan and the supervised background loops (here).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from beluga.credentials import server_secret, tenant_salt
from beluga.logs import current_request
from beluga.settings import Settings
from gateway.dashboard import STATIC, UPLOT, Dashboard
from gateway.errors import (
    APIError,
    NotFound,
    Unauthorized,
    error_body,
    status_error_type,
)
from gateway.forward import Forwarder
from gateway.front import HOP_HEADER, BodyStream, Front
from gateway.metrics import GatewayMetrics
from gateway.openapi import CHAT_REQUEST, COMPLETION_REQUEST, operation
from gateway.policies import Policy, make_policy
from gateway.prefixes import PrefixIndex, flight_limit_s
from gateway.requests import Endpoint, ParsedRequest, parse_request
from gateway.routing import Router
from gateway.sse import with_first_field
from gateway.tokenize import PromptTokenizer
from gateway.upstream import UpstreamClient
from gateway.workers import WorkerRegistry

logger = logging.getLogger(__name__)

SHUTDOWN_STEP_S = 5.0  # the most each shutdown step may take
LOG_EVERY_S = 60.0     # a background loop failing again and again logs this often


def upstream_headers(settings: Settings) -> dict[str, str]:
    """Headers of every request to a worker: JSON, no compression, the worker credential."""
    headers = {"content-type": "application/json", "accept-encoding": "identity",
               HOP_HEADER.decode(): "1"}  # a gateway that gets this refuses it (508)
    if settings.worker_api_key:
        headers["authorization"] = f"Bearer {settings.worker_api_key}"
    return headers


class Gateway:
    """State shared by all requests of one gateway process."""

    def __init__(self, settings: Settings, workers: WorkerRegistry, policy: Policy) -> None:
        self.settings = settings
        self.workers = workers
        self.policy = policy
        self.tenants = settings.api_key_tenants
        self.secret = server_secret(settings) if self.tenants else b""
        self.draining = False  # SIGTERM: new requests refused, /health/ready 503
        self.metrics = GatewayMetrics(policy.name)
        self.metrics.watch_workers(self.workers.snapshot)
        workers.invalid.count = self.metrics.invalid_record
        self.prefixes = PrefixIndex(workers.client, settings.redis_key_prefix,
                                    max_keys=settings.max_hint_keys,
                                    pool_search_dirs=settings.pool_search_dirs,
                                    invalid=workers.invalid,
                                    lock_timeout_s=settings.pool_lock_timeout_s,
                                    flight_limit_s=flight_limit_s(settings))
        self.prefixes.count_lookup = self.metrics.pool_lookup  # (on the routing thread)
        self.metrics.watch_pool(self.prefixes.pool_stats)
        self.dashboard = Dashboard(self.metrics.registry, self.workers.snapshot,
                                   self.prefixes.pool_stats,
                                   interval_s=settings.dashboard_interval_s)
        # The served model's tokenizer, from its folder or (a Hub id) the Hugging Face cache.
        local = settings.model_hub_id is None
        self.tokenizer = PromptTokenizer(
            {settings.served_model_name: settings.model_ref}
            if not local or settings.model_path.is_dir() else {})
        headers = upstream_headers(settings)
        self.router = Router(settings, policy, self.prefixes, self.tokenizer, self.metrics,
                             headers)
        self.forwarder = Forwarder(settings, workers, policy, self.router, self.metrics,
                                   headers)
        self.client: UpstreamClient | None = None  # requests
        self.control: UpstreamClient | None = None  # health checks and pool lookups
        self._failing_since: dict[str, float] = {}

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

    def salted(self, req: ParsedRequest, tenant: str, body: bytes
               ) -> tuple[ParsedRequest, bytes]:
        """The request with the tenant's cache salt (keyed with the server secret, combined
        with any salt the client sent), so no two tenants ever share a cached prefix, in
        vLLM or in the pool, and a tenant's name alone does not give its salt."""
        client_salt = req.payload.get("cache_salt")
        salt = tenant_salt(self.secret, tenant,
                           client_salt if isinstance(client_salt, str) else None)
        payload = dict(req.payload, cache_salt=salt)
        # Spliced in, not serialized again (a long prompt costs that much), when the body
        # has no such key (it would be in the payload).
        spliced = (with_first_field(body, b'"cache_salt":"' + salt.encode() + b'"')
                   if "cache_salt" not in req.payload else None)
        return replace(req, payload=payload), spliced or json.dumps(payload).encode()

    async def serve(self, endpoint: Endpoint, authorization: str, body: bytes) -> Response:
        """One chat or completions request: authorize, parse, route, forward. An APIError is
        counted and raised, for the caller to send as the OpenAI error body."""
        try:
            tenant = self.authorize(authorization)
            req = parse_request(body, endpoint, self.tokenizer.vocab_size)
            if (ctx := current_request.get()) is not None:
                ctx.model = req.model
            if tenant is not None:
                req, body = self.salted(req, tenant, body)
            response: Response = await self.forward(req, body)
            return response
        except APIError as exc:
            self.metrics.answered(endpoint, exc.status_code, None, None)
            raise

    async def forward(self, req: ParsedRequest, body: bytes) -> Any:
        return await self.forwarder.forward(req, body)

    async def refresh(self) -> None:
        await self.workers.refresh()
        await self.prefixes.refresh(w.id for w in self.workers.snapshot())

    async def health_checks(self) -> None:
        assert self.control is not None
        await self.workers.check_health(self.control)

    async def supervised(self, name: str, step: Callable[[], Awaitable[None]],
                         interval_s: float, first_wait: bool = False) -> None:
        """Run `step` every `interval_s` for good: an exception is counted and logged (once
        a minute while it keeps failing) and the loop goes on."""
        if first_wait:
            await asyncio.sleep(interval_s)
        while True:
            try:
                await step()
                self._failing_since.pop(name, None)
            except Exception:
                self.metrics.background_error(name)
                now = time.monotonic()
                last = self._failing_since.get(name)
                if last is None or now - last >= LOG_EVERY_S:
                    self._failing_since[name] = now
                    logger.exception("background task %s failed; it goes on", name)
            await asyncio.sleep(interval_s)


def create_app(settings: Settings, workers: WorkerRegistry | None = None) -> Front:
    """Build the gateway app. `workers` defaults to the Redis-backed registry of
    `settings`."""
    gw = Gateway(settings, workers or WorkerRegistry.from_settings(settings),
                 make_policy(settings.routing_policy))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # connect: the TCP handshake; read: silence on the wire. Idle connections are
        # dropped before vLLM's keep-alive (5 s) would drop them. Health checks and pool
        # lookups have connections of their own: request traffic that holds every
        # request connection cannot make the checks fail and take healthy workers out.
        client = UpstreamClient(connect_timeout_s=settings.connect_timeout_s,
                                read_timeout_s=settings.upstream_timeout_s, keepalive_s=4.0,
                                limit=settings.max_upstream_connections,
                                queue_timeout_s=settings.upstream_queue_timeout_s)
        control = UpstreamClient(connect_timeout_s=settings.connect_timeout_s,
                                 read_timeout_s=settings.health_check_timeout_s,
                                 keepalive_s=4.0, limit=256,
                                 queue_timeout_s=settings.health_check_timeout_s)
        gw.client = gw.forwarder.client = client
        gw.control = gw.router.client = control
        tasks: list[asyncio.Task[None]] = []
        try:
            try:  # Redis down or holding garbage: the loop below keeps trying
                await gw.refresh()
            except Exception:
                logger.exception("the first registry read failed; starting anyway")
            if gw.policy.uses_prefixes:
                # Loaded beside serving (a few seconds: transformers): until it is, requests
                # are routed without prefix information, so a restarted gateway serves at
                # once.
                loading = asyncio.create_task(asyncio.to_thread(gw.tokenizer.load_all))
                tasks.append(loading)
            # Everything loaded so far (the tokenizer's vocabulary, transformers, FastAPI)
            # lives as long as the process: out of the collector's sight, a full collection
            # no longer walks millions of objects every few thousand requests. (vLLM's API
            # server does the same after startup; measured in bench/README.md.)
            gc.collect()
            gc.freeze()

            async def sample() -> None:
                gw.dashboard.sample()

            tasks += [asyncio.create_task(gw.supervised("registry", gw.refresh,
                                                        settings.registry_refresh_s, True)),
                      asyncio.create_task(gw.supervised("dashboard", sample,
                                                        settings.dashboard_interval_s))]
            if settings.health_check_interval_s > 0:
                tasks.append(asyncio.create_task(gw.supervised(
                    "health_checks", gw.health_checks, settings.health_check_interval_s,
                    True)))
            yield
        finally:
            # Shutting down never hangs: each step gets a bounded time (a Redis or worker
            # connection stuck mid-close must not keep the process from exiting).
            gw.draining = True
            for task in tasks:
                task.cancel()
            if tasks:
                _done, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_STEP_S)
                if pending:
                    logger.warning("%d background tasks did not stop in %s s", len(pending),
                                   SHUTDOWN_STEP_S)
            with contextlib.suppress(Exception):  # (a job still running: left behind)
                await gw.router.thread.run(gw.prefixes.close, SHUTDOWN_STEP_S)
            gw.router.close()
            gc.unfreeze()  # (an app run in a longer process, e.g. a test, lets go of them)
            for what, closing in (("worker connections", client.close),
                                  ("control connections", control.close),
                                  ("Redis connection", gw.workers.close)):
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

    front = Front(app, gw, settings, gw.metrics)

    async def handle(request: Request, endpoint: Endpoint) -> Response:
        # Reached only when this FastAPI app is served without its Front (which serves
        # these two routes itself): the same checks, through the front's body reader.
        body = await front.read_body(request.headers.get("content-length"),
                                     BodyStream(request.receive))
        return await gw.serve(endpoint, request.headers.get("authorization", ""), body)

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
            raise NotFound(f"no dashboard asset {name[:100]!r}")
        return FileResponse(UPLOT / name)

    @app.get("/dashboard/data", include_in_schema=False)
    async def dashboard_data() -> dict[str, Any]:
        return gw.dashboard.data()

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        gw.authorize(request.headers.get("authorization", ""))
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "beluga"}
            for name in gw.workers.models()]}

    @app.get("/health", responses={
        200: {"description": "At least one healthy worker; the document lists them all."},
        503: {"description": "No healthy worker (the same document)."}})
    async def health() -> Response:
        now = time.monotonic()
        workers = gw.workers.snapshot()
        ok = any(w.healthy(now) for w in workers)
        return JSONResponse(status_code=200 if ok else 503, content={
            "status": "ok" if ok else "no_healthy_worker",
            "redis": gw.workers.redis_ok,
            # Per served model: whether its tokenizer has loaded (until then requests are
            # routed without prefix information).
            "tokenizers": {m: gw.tokenizer.loaded(m) for m in gw.workers.models()
                           if gw.tokenizer.knows(m)},
            "workers": [{"id": w.id, "model": w.record.model,
                         **({} if gw.tenants else {"url": w.url}),  # (not to tenants)
                         "healthy": w.healthy(now), "in_flight": w.in_flight,
                         "pending_prefill_tokens": w.pending_prefill,
                         "running": w.record.running, "waiting": w.record.waiting}
                        for w in workers],
        })

    status_doc = {"content": {"application/json": {"schema": {
        "type": "object", "required": ["status"],
        "properties": {"status": {"type": "string"}}}}}}

    @app.get("/health/live", responses={200: {"description": "The process is up.",
                                              **status_doc}})
    async def live() -> dict[str, Any]:
        return {"status": "live"}

    @app.get("/health/ready", responses={
        200: {"description": "Serving: at least one healthy worker, not draining.",
              **status_doc},
        503: {"description": "Not serving: no healthy worker, or shutting down.",
              **status_doc}})
    async def ready() -> Response:
        now = time.monotonic()
        if gw.draining:
            status = "draining"
        elif not any(w.healthy(now) for w in gw.workers.snapshot()):
            status = "no_healthy_worker"
        else:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": status}, status_code=503)

    return front
