"""One real stack per test session: `beluga up` with Redis, two vLLM CPU workers and the
gateway on free ports. Teardown sends Ctrl-C (SIGINT) and fails if any process it started
is still alive afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from beluga.registry import WorkerRecord, parse_record, worker_pattern

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / ".beluga" / "models" / "SmolLM2-135M-Instruct"
MODEL_NAME = "smollm2-135m-instruct"
START_TIMEOUT_S = 600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


def free_port(consecutive: int = 1) -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + consecutive >= 65535:
            continue
        ok = True
        for port in range(base + 1, base + consecutive):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
        if ok:
            return base
    raise RuntimeError("no free ports")


@dataclass
class Stack:
    base_url: str
    redis_url: str
    proc: subprocess.Popen[bytes]
    log: Path
    state_dir: Path

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def workers(self) -> list[WorkerRecord]:
        client = self.redis()
        records = []
        for key in client.scan_iter(match=worker_pattern("beluga:v1")):
            raw = client.get(key)
            if raw is not None and (rec := parse_record(raw)) is not None:
                records.append(rec)
        return sorted(records, key=lambda r: r.id)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not (MODEL / "beluga-model.json").is_file():
        pytest.fail(f"the default model is not prepared at {MODEL}: run `make setup`")
    state = tmp_path_factory.mktemp("stack")
    gateway_port, worker_port, redis_port = free_port(), free_port(2), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BELUGA_")}
    env.update({
        "BELUGA_STATE_DIR": str(state), "BELUGA_MODEL": str(MODEL),
        "BELUGA_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "BELUGA_GATEWAY_HOST": "127.0.0.1", "BELUGA_GATEWAY_PORT": str(gateway_port),
        "BELUGA_WORKER_PORT": str(worker_port), "BELUGA_KV_CACHE_SPACE_GIB": "1",
        "BELUGA_MAX_MODEL_LEN": "2048", "BELUGA_HEARTBEAT_INTERVAL_S": "1",
        "BELUGA_WORKER_TTL_S": "5", "BELUGA_UNHEALTHY_COOLDOWN_S": "60",
        "BELUGA_UPSTREAM_TIMEOUT_S": "120",
    })
    log = state / "up.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "beluga.cli", "up"], stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=ROOT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while b"Press Ctrl-C" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"beluga up did not become ready:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    s = Stack(base_url=f"http://127.0.0.1:{gateway_port}", redis_url=env["BELUGA_REDIS_URL"],
              proc=proc, log=log, state_dir=state)
    yield s

    started = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("beluga up did not stop within 90 s of Ctrl-C")
    _gone, alive = psutil.wait_procs(started, timeout=5)
    for p in alive:
        p.kill()
    assert not alive, f"processes left behind after Ctrl-C: {alive}"
    assert code == 0, log.read_text()[-4000:]


@pytest.fixture(scope="session")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base_url, timeout=120) as client:
        yield client


def worker_running(url: str) -> float:
    """vLLM's count of running requests on one worker."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            total += float(line.rsplit(" ", 1)[1])
    return total
