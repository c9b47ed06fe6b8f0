"""Real helpers shared by the tests: a free port, a redis-server, an ASGI app on real HTTP."""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
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


# --- a pool in trouble: its lock held by a live process, a value scribbled ----------------

REPO_ROOT = Path(__file__).resolve().parents[1]
CLOCK_HAND_OFFSET = 320  # PoolHeader::clock_hand (native/include/beluga/layout.h)
INDEX_CAPACITY_OFFSET, INDEX_OFFSET_OFFSET = 40, 80  # PoolHeader::index_capacity, index_offset


@contextlib.contextmanager
def pool_lock_held(path: Path | str, stop: bool = True) -> Iterator[subprocess.Popen[str]]:
    """A child process that attaches the pool at `path`, takes its lock (the native test
    hook) and keeps it: SIGSTOPped when `stop` (a frozen peer), else asleep. The lock's
    holder is alive, so nobody may take it over: every call that needs it is busy. Killed
    on exit (the next call then takes the dead holder's lock over and rebuilds)."""
    code = ("import sys, time; from kvpool import KVPool;"
            "p = KVPool.attach(sys.argv[1]); assert p._p.debug_lock();"
            "print('locked', flush=True); time.sleep(120)")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        if stop:
            os.kill(proc.pid, signal.SIGSTOP)
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def _poke(path: Path | str, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        struct.pack_into(fmt, mm, offset, value)


def scribble_clock_hand(path: Path | str, value: int = 1 << 40) -> None:
    """An out-of-range CLOCK hand in the pool's header: the next allocation (put,
    prepare_store) finds it, raises PoolCorruptError and marks the pool for a rebuild."""
    _poke(path, CLOCK_HAND_OFFSET, "<Q", value)


def scribble_index(path: Path | str) -> None:
    """Every index bucket names a slot that does not exist: the next lookup or pin raises
    PoolCorruptError and marks the pool for a rebuild (which rebuilds the index from the
    slots)."""
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        capacity, = struct.unpack_from("<Q", mm, INDEX_CAPACITY_OFFSET)
        offset, = struct.unpack_from("<Q", mm, INDEX_OFFSET_OFFSET)
        mm[offset:offset + 4 * capacity] = struct.pack("<I", 0x7FFF_FFF0) * capacity
