"""Real helpers shared by the tests: a free port, a redis-server, an ASGI app on real HTTP."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest
import redis
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(app: Any) -> Iterator[str]:
    """Serve an ASGI app (lifespan included) with uvicorn on a free port, in a thread;
    yields its base URL, stops it after."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


class RedisServer:
    """A private redis-server (no persistence) that tests can stop and start again on the
    same port, to play an outage."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server is missing: run `make setup`")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.port_args = ["--port", str(self.port)]
        self.extra_args: list[str] = []
        self.log: Path | None = None  # its output (else dropped)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        assert self.binary is not None
        out = self.log.open("ab") if self.log is not None else None
        try:
            self.proc = subprocess.Popen(
                [self.binary, *self.port_args, "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", *self.extra_args],
                stdout=out or subprocess.DEVNULL, stderr=out)
        finally:
            if out is not None:
                out.close()
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None and self.log is not None:
                    text = self.log.read_text(errors="replace")
                    raise RuntimeError(f"redis-server exited: {text[-2000:]}") from None
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)


def gateway_in_front_of(worker: Any, worker_id: str, model: str, prefix: str,
                        **settings: Any) -> Iterator[str]:
    """A real Redis, `worker` (an ASGI stand-in, served here, or the URL of a server already
    running) registered as `worker_id` for `model`, and the gateway in front of it over real
    HTTP; yields the gateway's base URL."""
    import json

    from beluga.registry import SCHEMA_VERSION, worker_key
    from beluga.settings import Settings
    from gateway.app import create_app

    server = RedisServer().start()
    try:
        for worker_url in ([worker] if isinstance(worker, str) else serve(worker)):
            rec = {"schema": SCHEMA_VERSION, "id": worker_id, "url": worker_url,
                   "model": model, "capacity": 4, "pid": 1, "started_at": 0.0,
                   "heartbeat_at": time.time(), "running": 0, "waiting": 0}
            redis.Redis.from_url(server.url).set(worker_key(prefix, worker_id),
                                                 json.dumps(rec), ex=600)
            gw = create_app(Settings(redis_url=server.url, redis_key_prefix=prefix,
                                     served_model_name=model, **settings))
            yield from serve(gw)
    finally:
        server.stop()
