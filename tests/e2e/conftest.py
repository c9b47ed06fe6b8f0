"""One real stack per test session: `beluga up` with Redis, two vLLM CPU workers and the
gateway on free ports. Teardown sends Ctrl-C (SIGINT) and fails if any process it started
is still alive afterwards."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
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
from beluga_cli.up import worker_cores
from engine.worker import CPU_BLOCK_SIZE
from kvpool import KVPool
from tests.e2e.lora import NAME as LORA_NAME
from tests.e2e.lora import make_adapter

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / ".beluga" / "models" / "SmolLM2-135M-Instruct"
MODEL_NAME = "smollm2-135m-instruct"
START_TIMEOUT_S = 600
BLOCK = CPU_BLOCK_SIZE  # the stack runs the CPU default, set explicitly on any machine
WORKER_KEY = secrets.token_urlsafe(24)
WORKER_HEADERS = {"authorization": f"Bearer {WORKER_KEY}"}  # for calls straight to a worker


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
    pool_path: Path          # the pool both stack workers share
    worker_urls: list[str]   # the stack's workers, A then B
    reference_url: str       # a cold worker without the connector (--no-pool)
    mismatch_url: str        # a worker whose pool file belongs to another model
    mismatch_log: Path       # that worker's vLLM log
    up_metrics_url: str      # beluga up's own metrics (beluga_up_restarts_total)
    worker_key: str          # the credential every worker of the session requires

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


def start_worker(env: dict[str, str], port: int, prefix: str, log: Path,
                 *flags: str) -> subprocess.Popen[bytes]:
    """A `beluga worker` outside the stack (its own registry prefix: the gateway ignores it)."""
    wenv = dict(env, BELUGA_WORKER_PORT=str(port), BELUGA_REDIS_KEY_PREFIX=prefix)
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "beluga_cli", "worker", *flags],
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=wenv, cwd=ROOT)


@contextlib.contextmanager
def extra_gateway(stack: Stack, name: str, **settings: str) -> Iterator[str]:
    """Another `beluga gateway` on the session's Redis (BELUGA_* `settings` on top), once
    it serves and keys prompts (its tokenizer loads beside serving: until then it routes
    without prefix information). Yields its URL; stopped on exit."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BELUGA_")}
    env.update({"BELUGA_REDIS_URL": stack.redis_url, "BELUGA_MODEL": str(MODEL),
                "BELUGA_GATEWAY_HOST": "127.0.0.1", "BELUGA_GATEWAY_PORT": str(port),
                "BELUGA_STATE_DIR": str(stack.state_dir),
                "BELUGA_WORKER_API_KEY": stack.worker_key,
                **{f"BELUGA_{k.upper()}": v for k, v in settings.items()}})
    log = stack.state_dir / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "beluga_cli", "gateway"], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=2).json()
                if health["status"] == "ok" and health["tokenizers"] and all(
                        health["tokenizers"].values()):
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, deadline: float) -> None:
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"worker at {url} did not become healthy:\n{log.read_text()[-4000:]}")
        time.sleep(1)


def pool_enabled(url: str, wait_s: float = 15.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
        if any(ln.startswith("beluga_worker_pool_enabled") and ln.endswith(" 1.0")
               for ln in lines):
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not (MODEL / "beluga-model.json").is_file():
        pytest.fail(f"the default model is not prepared at {MODEL}: run `make setup`")
    state = tmp_path_factory.mktemp("stack")
    gateway_port, worker_port, redis_port = free_port(), free_port(2), free_port()
    ref_port, mm_port, up_metrics_port = free_port(), free_port(), free_port()
    # /dev/shm as users run it; where it is too small (a container's 64 MiB default), a
    # plain file: the pool maps it the same way.
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and shutil.disk_usage(shm).free > 2 * 1024**3 else state
    pool_path = where / f"beluga-e2e-{os.getpid()}.pool"
    mismatch_pool = where / f"beluga-e2e-{os.getpid()}-foreign.pool"
    for p in (pool_path, mismatch_pool):
        p.unlink(missing_ok=True)
    KVPool.create(mismatch_pool, slot_size=4096, slot_count=16,
                  fingerprint=hashlib.sha256(b"another model").digest()).close()
    # Every worker of the session serves a LoRA adapter beside the model (the reference
    # too, so its answers are the cold answers of both configurations).
    adapter = make_adapter(state / "lora", MODEL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BELUGA_")}
    env.update({
        "BELUGA_LORA_MODULES": f"{LORA_NAME}={adapter}",
        "BELUGA_STATE_DIR": str(state), "BELUGA_MODEL": str(MODEL),
        "BELUGA_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "BELUGA_GATEWAY_HOST": "127.0.0.1", "BELUGA_GATEWAY_PORT": str(gateway_port),
        "BELUGA_WORKER_PORT": str(worker_port), "BELUGA_KV_CACHE_SPACE_GIB": "1",
        "BELUGA_MAX_MODEL_LEN": "4096", "BELUGA_HEARTBEAT_INTERVAL_S": "1",
        "BELUGA_WORKER_TTL_S": "5", "BELUGA_UNHEALTHY_COOLDOWN_S": "60",
        "BELUGA_UPSTREAM_TIMEOUT_S": "120", "BELUGA_POOL_PATH": str(pool_path),
        "BELUGA_POOL_SIZE_GIB": "1", "BELUGA_BLOCK_SIZE": str(BLOCK),
        "BELUGA_UP_METRICS_PORT": str(up_metrics_port),
        "BELUGA_POOL_SEARCH_DIRS": f"/dev/shm,{where}",  # (the pool may be in `state`)
        # Set here (not generated by `beluga up`) so the tests can reach workers directly;
        # the reference and mismatch workers require it too.
        "BELUGA_WORKER_API_KEY": WORKER_KEY,
    })
    log = state / "up.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "beluga_cli", "up"], stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=ROOT)
    # Started alongside the stack: a cold reference without the connector, and a worker
    # whose pool file is another model's (it must serve, without sharing).
    # The reference computes with as many threads as a stack worker (the output equality
    # test compares them bit for bit): the cores `beluga up` gives its first worker.
    shares = worker_cores(sorted(os.sched_getaffinity(0)), 2, 1)
    same_cores = shares[0] if shares is not None else "auto"
    ref = start_worker(env, ref_port, "beluga:ref", state / "reference.log", "--no-pool",
                       "--cpu-threads-bind", same_cores)
    mm_log = state / "mismatch.log"
    mm = start_worker(dict(env, BELUGA_POOL_PATH=str(mismatch_pool)), mm_port, "beluga:mm",
                      mm_log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while b"Press Ctrl-C" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"beluga up did not become ready:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    ref_url, mm_url = f"http://127.0.0.1:{ref_port}", f"http://127.0.0.1:{mm_port}"
    wait_healthy(ref_url, ref, state / "reference.log", deadline)
    wait_healthy(mm_url, mm, mm_log, deadline)
    for i in range(2):
        # Every pool test depends on this: say why at once, with the worker's own words.
        url = f"http://127.0.0.1:{worker_port + i}"
        httpx.post(f"{url}/v1/completions", timeout=120, headers=WORKER_HEADERS, json={
            "model": MODEL_NAME, "prompt": "Hello", "max_tokens": 1})  # the gauge comes with a step
        if not pool_enabled(url):
            wlog = state / "logs" / f"worker-{worker_port + i}.vllm.log"
            said = [ln for ln in wlog.read_text(errors="replace").splitlines()
                    if "Beluga" in ln or "beluga" in ln.lower() and "error" in ln.lower()]
            proc.kill()
            pytest.fail(f"stack worker {i} serves without the pool:\n" + "\n".join(said[-30:]))
    s = Stack(base_url=f"http://127.0.0.1:{gateway_port}", redis_url=env["BELUGA_REDIS_URL"],
              proc=proc, log=log, state_dir=state, pool_path=pool_path,
              worker_urls=[f"http://127.0.0.1:{worker_port + i}" for i in range(2)],
              reference_url=ref_url, mismatch_url=mm_url,
              mismatch_log=state / "logs" / f"worker-{mm_port}.vllm.log",
              up_metrics_url=f"http://127.0.0.1:{up_metrics_port}", worker_key=WORKER_KEY)
    yield s

    for extra in (ref, mm):
        extra.send_signal(signal.SIGTERM)
    for extra in (ref, mm):
        try:
            extra.wait(60)
        except subprocess.TimeoutExpired:
            extra.kill()
    for p in (pool_path, mismatch_pool):
        p.unlink(missing_ok=True)

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
