"""Redis killed mid-run and started again: the gateway keeps serving on what it knew, and
recovers (registry, hints) once Redis is back. Redis holds hints only."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx
import psutil
import pytest
import redis

from tests.e2e.conftest import MODEL_NAME, Stack

CHAT = {"model": MODEL_NAME, "max_tokens": 3,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}


@pytest.fixture(scope="session")
def replacement_redis() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Holds the redis-server this test starts; it serves the rest of the session."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.wait(10)


def test_serving_survives_redis_going_away_and_coming_back(
        stack: Stack, replacement_redis: list[subprocess.Popen[bytes]]) -> None:
    port = urlparse(stack.redis_url).port
    victims = [p for p in psutil.Process(stack.proc.pid).children(recursive=True)
               if p.name() == "redis-server"]
    assert len(victims) == 1, victims
    victims[0].send_signal(signal.SIGKILL)  # `beluga up` reaps it; we watch the port
    probe = redis.Redis.from_url(stack.redis_url, socket_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            probe.ping()
        except redis.ConnectionError:
            break
        assert time.monotonic() < deadline, "redis-server did not die"
        time.sleep(0.1)

    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        deadline = time.monotonic() + 10
        while client.get("/health").json()["redis"]:
            assert time.monotonic() < deadline, "the gateway never noticed Redis was gone"
            time.sleep(0.2)
        for _ in range(4):  # served on the last known workers
            r = client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]

        server = shutil.which("redis-server")
        assert server is not None
        replacement_redis.append(subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + 20
        while not (client.get("/health").json()["redis"] and len(stack.workers()) == 2):
            assert time.monotonic() < deadline, "no recovery after Redis came back"
            time.sleep(0.3)
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
    # The workers publish their routing hints again, into the new (empty) Redis.
    client_r = stack.redis()
    deadline = time.monotonic() + 20
    while not list(client_r.scan_iter(match="beluga:v1:hints:*")):
        assert time.monotonic() < deadline, "hints were not published again"
        time.sleep(0.3)
