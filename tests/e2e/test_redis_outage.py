"""Redis killed mid-run: `beluga up` starts it again, empty. The gateway keeps serving on
what it knew meanwhile, and routing recovers (registry, hints) once the workers have
published again into the new Redis. Redis holds hints only."""

from __future__ import annotations

import signal
import time

import httpx
import psutil
import redis

from tests.e2e.conftest import MODEL_NAME, Stack

CHAT = {"model": MODEL_NAME, "max_tokens": 3,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}


def test_serving_survives_redis_dying_and_the_registry_comes_back(stack: Stack) -> None:
    victims = [p for p in psutil.Process(stack.proc.pid).children(recursive=True)
               if p.name() == "redis-server"]
    assert len(victims) == 1, victims
    old = victims[0].pid
    victims[0].send_signal(signal.SIGKILL)
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        for _ in range(4):  # served throughout, on the last known workers
            r = client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        # `beluga up` restarted it (empty): the workers register and publish hints again
        deadline = time.monotonic() + 30
        while True:
            alive = [p for p in psutil.Process(stack.proc.pid).children(recursive=True)
                     if p.name() == "redis-server" and p.pid != old]
            try:
                if alive and len(stack.workers()) == 2 and client.get(
                        "/health").json()["redis"]:
                    break
            except redis.ConnectionError:
                pass
            assert time.monotonic() < deadline, "no recovery after Redis came back"
            time.sleep(0.3)
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
    client_r = stack.redis()
    deadline = time.monotonic() + 20
    while not list(client_r.scan_iter(match="beluga:v1:hints:*")):
        assert time.monotonic() < deadline, "hints were not published again"
        time.sleep(0.3)
