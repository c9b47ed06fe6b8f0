"""Running the gateway: uvicorn with the limits a public endpoint needs.

* Headers have a size limit (64 KiB: 431 and the connection closed) and a deadline: a
  connection that has not sent a whole request head within
  `client_header_timeout_s` of opening (or of its previous answer) is closed, so clients
  trickling bytes or holding half-open connections cannot pile up (bodies have their own
  timeout in gateway/front.py). The open-file limit is raised to its hard limit, so a few
  hundred idle sockets cannot stop the gateway from accepting more.
* SIGTERM drains: the listening socket closes, new requests on kept-alive connections get
  503, `/health/ready` says 503, requests in flight get up to `drain_timeout_s` to finish,
  then the lifespan closes the rest.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from beluga.settings import Settings

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024  # a request's line and headers, at most (431 past it)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on every request's head."""

    header_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._refused = False

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            logger.debug("closing a connection that sent no request head in %g s",
                         self.header_timeout_s)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        super().on_message_begin()
        self._arm()

    def _count(self, n: int) -> bool:
        """Count `n` bytes of the request head; False (and the connection answered 431 and
        closed) past MAX_HEAD_BYTES: uvicorn keeps every header, unbounded."""
        self._head_bytes += n
        if self._head_bytes <= MAX_HEAD_BYTES:
            return not self._refused
        if not self._refused:
            self._refused = True
            logger.debug("closing a connection whose request head passed %d bytes",
                         MAX_HEAD_BYTES)
            if not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                     b"content-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()
        return False

    def on_url(self, url: bytes) -> None:
        if self._count(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._count(len(name) + len(value) + 4):
            super().on_header(name, value)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's head is due within the timeout too (the rest of a body the
        # app did not read, trickled in, would otherwise hold the connection for good).
        self._arm()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class GatewayServer(uvicorn.Server):
    """uvicorn's server that tells the app when it starts to drain."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        gateway = getattr(self.app, "gateway", None)
        if gateway is not None and not gateway.draining:
            logger.info("draining: refusing new requests, %d in flight get up to %g s",
                        getattr(self.app, "in_flight", 0),
                        self.config.timeout_graceful_shutdown or 0)
            gateway.draining = True
        super().handle_exit(sig, frame)


def raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                        else max(soft, 65536), hard))
        except (ValueError, OSError) as exc:
            logger.info("cannot raise the open-file limit from %d: %s", soft, exc)


def protocol_class(settings: Settings) -> type[HeaderTimeoutProtocol]:
    return type("GatewayHttpProtocol", (HeaderTimeoutProtocol,),
                {"header_timeout_s": settings.client_header_timeout_s})


def config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    # No uvicorn access log (the gateway writes its own, gateway/front.py), proxy-header
    # rewriting or Server/Date headers: per-request work nothing here reads.
    options: dict[str, Any] = dict(
        host=settings.gateway_host, port=settings.gateway_port, log_level="warning",
        access_log=False, proxy_headers=False, server_header=False, date_header=False,
        log_config=None,  # uvicorn's loggers go to this process's handler (text or JSON)
        http=protocol_class(settings), timeout_graceful_shutdown=settings.drain_timeout_s,
        timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024)
    options.update(overrides)
    return uvicorn.Config(app, **options)


def run(settings: Settings) -> None:
    from gateway.app import create_app

    raise_open_files_limit()
    app = create_app(settings)
    GatewayServer(config(app, settings), app).run()
