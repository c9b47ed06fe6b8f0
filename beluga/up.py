"""`beluga up`: Redis (when none answers), N workers and the gateway, as one supervised unit.

Each child runs in its own session (process group) with its output in a log file under
`<state_dir>/logs`. Settings reach the children as `BELUGA_*` variables. On SIGINT or SIGTERM
every group gets SIGTERM, then SIGKILL after a grace period, Redis last, so nothing started
here outlives it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import redis

from beluga.settings import Settings
from engine.model import ModelError, check_model_folder, prepare_default_model

logger = logging.getLogger(__name__)

STOP_GRACE_S = 30.0


def worker_cores(cores: list[int], workers: int, reserved: int) -> list[str] | None:
    """The cores `beluga up` gives each of its workers: `reserved` cores are left to the
    front ends (API servers, schedulers, the gateway, Redis), the rest split among the
    workers. None (vLLM's own layout) for one worker. With too few cores to give every
    worker at least one after the reserve, 'nobind' for all: on 2 cores, splitting them
    between 2 workers left the front ends no core (the test suite ran twice as long), and
    vLLM's own layout pins every worker to the same core, where on Linux 6.18 one worker's
    runnable threads got no CPU at all for minutes while the other's held the core (the e2e
    fault test's stall, 2026-11-26); unpinned, the kernel can move a waiting worker."""
    if workers < 2:
        return None
    if len(cores) - reserved < workers:
        return ["nobind"] * workers
    return core_shares(cores[reserved:], workers)


def core_shares(cores: list[int], workers: int) -> list[str]:
    """Each worker's own cores (VLLM_CPU_OMP_THREADS_BIND lists): contiguous, disjoint,
    as even as the count allows; with fewer cores than workers, workers share round-robin.
    vLLM's 'auto' binds every worker on a host to the same cores, so two workers' prefills
    would take turns on one core while the others idle."""
    if len(cores) < workers:
        return [str(cores[i % len(cores)]) for i in range(workers)]
    out = []
    for i in range(workers):
        mine = cores[i * len(cores) // workers:(i + 1) * len(cores) // workers]
        out.append(",".join(str(c) for c in mine))
    return out


def beluga_command() -> list[str]:
    """`beluga` for a child process, logging at this process's level (so `beluga --log-level
    DEBUG up` reaches the workers and the gateway)."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return [sys.executable, "-m", "beluga.cli", "--log-level", level]


class UpError(RuntimeError):
    """The stack could not be started."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as BELUGA_* variables, for child processes."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[f"BELUGA_{name.upper()}"] = str(value)
    return env


def redis_alive(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1.0,
                                         socket_connect_timeout=1.0).ping())
    except (redis.RedisError, OSError):
        return False


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: list[Child] = []
        self.redis_child: Child | None = None
        self.stop_event = threading.Event()
        self.log_dir = settings.log_dir.resolve()

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        logger.info("started %s (pid %s), log: %s", name, proc.pid, log)
        return Child(name, proc, log)

    def start_redis(self) -> None:
        url = self.settings.redis_url
        if redis_alive(url):
            logger.info("using the Redis at %s", url)
            return
        parsed = urlparse(url)
        host = parsed.hostname or "127.0.0.1"
        if not self.settings.start_redis or host not in ("127.0.0.1", "localhost", "::1"):
            raise UpError(f"no Redis answers at {url}; start one or fix --redis-url")
        server = shutil.which("redis-server")
        if server is None:
            raise UpError("redis-server is not installed: run `make setup` (as root it installs "
                          "Debian's redis-server) or install Redis yourself")
        data_dir = (self.settings.state_dir / "redis").resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        port = str(parsed.port or 6379)
        self.redis_child = self.spawn("redis", [
            server, "--port", port, "--bind", host, "--save", "", "--appendonly", "no",
            "--dir", str(data_dir), "--protected-mode", "yes"])
        deadline = time.monotonic() + 10
        while not redis_alive(url):
            if self.redis_child.proc.poll() is not None or time.monotonic() > deadline:
                raise UpError(f"redis-server did not start; see {self.redis_child.log}")
            time.sleep(0.1)

    def start(self) -> None:
        s = self.settings
        if s.model is None:
            prepare_default_model(s.model_path)
        if s.model_hub_id is None:
            check_model_folder(s.model_path)
        self.start_redis()
        env = dict(os.environ)
        env.update(settings_env(s))
        env["BELUGA_MODEL"] = s.model_hub_id or str(s.model_path.resolve())
        env["BELUGA_STATE_DIR"] = str(s.state_dir.resolve())
        py = beluga_command()
        shares = worker_cores(sorted(os.sched_getaffinity(0)), s.num_workers,
                              s.cpu_reserved_cores)
        for i in range(s.num_workers):
            port = s.worker_port + i
            extra = []
            if s.cpu_threads_bind == "auto" and shares is not None:
                extra = ["--cpu-threads-bind", shares[i]]
            self.children.append(self.spawn(f"worker-{port}", py + [
                "worker", "--worker-port", str(port), *extra], env))
        self.children.append(self.spawn("gateway", py + ["gateway"], env))

    def wait_ready(self) -> None:
        s = self.settings
        host = "127.0.0.1" if s.gateway_host in ("0.0.0.0", "") else s.gateway_host
        url = f"http://{host}:{s.gateway_port}/health"
        deadline = time.monotonic() + s.worker_start_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while not self.stop_event.is_set():
                self.check_children()
                try:
                    health = client.get(url).json()
                    if sum(w["healthy"] for w in health["workers"]) >= s.num_workers:
                        return
                except (httpx.HTTPError, ValueError, KeyError, TypeError):
                    pass
                if time.monotonic() > deadline:
                    raise UpError(f"not ready after {s.worker_start_timeout_s:.0f} s; "
                                  f"see the logs in {self.log_dir}")
                self.stop_event.wait(1.0)

    def check_children(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise UpError(f"{child.name} exited with code {code}; see {child.log}")

    def print_urls(self) -> None:
        s = self.settings
        host = "127.0.0.1" if s.gateway_host in ("0.0.0.0", "") else s.gateway_host
        base = f"http://{host}:{s.gateway_port}"
        logger.info("Beluga is up: %d workers serving '%s'", s.num_workers, s.served_model_name)
        logger.info("  OpenAI endpoint: %s/v1/chat/completions", base)
        logger.info("  models:          %s/v1/models", base)
        logger.info("  health:          %s/health", base)
        for i in range(s.num_workers):
            logger.info("  worker:          http://%s:%d", s.worker_host, s.worker_port + i)
        logger.info("  logs:            %s", self.log_dir)
        logger.info("Press Ctrl-C to stop.")

    def supervise(self) -> bool:
        """Watch the children until stopped; False if the gateway died (the stack is down)."""
        reported: set[str] = set()
        while not self.stop_event.wait(1.0):
            for child in self.children:
                code = child.proc.poll()
                if code is not None and child.name not in reported:
                    reported.add(child.name)
                    logger.error("%s exited with code %s; see %s", child.name, code, child.log)
                    if child.name == "gateway":
                        return False
        return True

    def stop(self) -> None:
        self._stop_group(self.children)
        if self.redis_child is not None:
            self._stop_group([self.redis_child])
        logger.info("all processes stopped")

    @staticmethod
    def _stop_group(children: list[Child]) -> None:
        for child in children:
            _signal_group(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", child.name)
        for child in children:
            # SIGKILL whatever is left in the group (vLLM's engine processes included).
            _signal_group(child.proc.pid, signal.SIGKILL)
            child.proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def run_up(settings: Settings) -> int:
    stack = Stack(settings)

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("received %s; stopping", signal.Signals(signum).name)
        stack.stop_event.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        stack.start()
        stack.wait_ready()
        if not stack.stop_event.is_set():
            stack.print_urls()
            if not stack.supervise():
                code = 1
    except (UpError, ModelError) as exc:
        logger.error("%s", exc)
        code = 1
    finally:
        stack.stop()
    return code
