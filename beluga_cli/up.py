"""`beluga up`: Redis (when none answers), N workers and the gateway, as one supervised unit.

Each child runs in its own session (process group) with its output in a log file under
`<state_dir>/logs`. Settings reach the children as `BELUGA_*` variables (secrets included:
the environment, never a command line, which `ps` shows to everyone).

Until the stack is first ready, a child that dies fails `beluga up` (a broken configuration
is reported, not retried forever). After that, `beluga up` is a supervisor: a gateway, worker
or Redis (one it started) that dies is started again with the same command, port and
environment after a back-off (1 s, doubling per quick death up to `restart_backoff_max_s`,
back to 1 s once it ran 60 s), while the others keep serving; every restart is logged and
counted (`beluga_up_restarts_total{process}` on `up_metrics_port`). Before a child is started
again, whatever is left of its process group (a worker's vLLM engine processes) is killed,
so its port is free.

Only SIGINT or SIGTERM stops the stack, in order: the gateway first (it drains requests in
flight for up to `drain_timeout_s`), then the workers (each removes its registry entry before
it stops vLLM), Redis last. Each gets SIGTERM (the group leader only: it stops its own
children in its own order), then its whole group SIGKILL after a grace period, so nothing
started here outlives `beluga up`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import httpx
import redis
from prometheus_client import CollectorRegistry, Counter, start_http_server

from beluga import logs
from beluga.credentials import new_token
from beluga.registry import redacted_url
from beluga.settings import SECRET_FIELDS, Settings
from engine.model import ModelError, check_model_folder, prepare_default_model

logger = logging.getLogger(__name__)

# Stop grace periods (SIGTERM, then SIGKILL of the whole group).
GATEWAY_STOP_MARGIN_S = 10.0   # beyond the gateway's own drain_timeout_s
WORKER_STOP_S = 45.0           # a worker waits up to 30 s for vLLM itself (engine/worker.py)
REDIS_STOP_S = 10.0
GROUP_GONE_S = 10.0            # how long a dead child's group may take to vanish after SIGKILL

# Restart back-off.
FIRST_RESTART_S = 1.0
STABLE_RUN_S = 60.0            # a process that ran this long died "slowly": back-off resets
POLL_S = 0.2                   # how often the supervisor looks at its children

Role = Literal["gateway", "worker", "redis"]
STOP_ORDER: tuple[Role, ...] = ("gateway", "worker", "redis")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PR_SET_PDEATHSIG = 1


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
    return [sys.executable, "-m", "beluga_cli", "--log-level", level,
            "--log-format", logs.active_format()]


class UpError(RuntimeError):
    """The stack could not be started."""


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as BELUGA_* variables, for child processes. Secrets are among them (the
    children need them): pass this only as an environment, never log it or put it on a
    command line (see `redacted`). Every setting is among them, so the config file that
    gave some of them (`config`) is not: a child reading it again would change nothing."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(exclude={"config"}).items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[f"BELUGA_{name.upper()}"] = str(value)
    return env


def redacted(settings: Settings) -> dict[str, Any]:
    """The settings for a log line: every secret that is set shows as '***'."""
    out = settings.model_dump()
    for name in SECRET_FIELDS:
        if out.get(name):
            out[name] = "***"
    out["redis_url"] = redacted_url(settings.redis_url)
    return out


def up_settings(settings: Settings) -> Settings:
    """The settings `beluga up` runs its children with: a fresh worker credential for this
    run unless the operator set one, and workers on loopback unless the operator chose an
    address (they are reached through the gateway)."""
    update: dict[str, Any] = {}
    if not settings.worker_api_key:
        update["worker_api_key"] = new_token()
    if "worker_host" not in settings.model_fields_set:
        update["worker_host"] = "127.0.0.1"
    return settings.model_copy(update=update) if update else settings


def redis_alive(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1.0,
                                         socket_connect_timeout=1.0).ping())
    except (redis.RedisError, OSError):
        return False


@dataclass
class Backoff:
    """The wait before a dead process is started again: `first_s`, doubling per quick death
    (one that ran less than `stable_s`) up to `max_s`; a process that ran `stable_s` or more
    starts the schedule over."""

    max_s: float
    first_s: float = FIRST_RESTART_S
    stable_s: float = STABLE_RUN_S
    quick_deaths: int = 0

    def next_delay(self, ran_s: float) -> float:
        if ran_s >= self.stable_s:
            self.quick_deaths = 0
        delay = min(self.max_s, self.first_s * 2.0 ** min(self.quick_deaths, 62))
        self.quick_deaths += 1
        return delay


@dataclass
class Spec:
    """How to start one child: the same every time it is started."""

    name: str
    cmd: list[str]
    role: Role
    env: dict[str, str] | None = None
    stop_timeout_s: float = WORKER_STOP_S


@dataclass(eq=False)
class Child:
    spec: Spec
    log: Path
    proc: subprocess.Popen[bytes]
    backoff: Backoff
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    restart_at: float | None = None    # when dead: when it is started again
    dead_group: int | None = None      # when dead: its process group, killed before a restart

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def alive(self) -> bool:
        return self.restart_at is None


def group_members(pgid: int) -> list[int]:
    """Processes of a process group that are still running (zombies excluded: they hold no
    port, and where PID 1 does not reap, orphans can stay zombies for good)."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc: ask the kernel whether anything is left at all
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


try:  # loaded here, not between fork and exec
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # SIGTERM (each child's own graceful stop) if `beluga up` is killed outright. The kernel
    # sends it when the *thread* that started the child ends: children are started from the
    # thread that lives as long as the stack (run_up's main thread).
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class UpMetrics:
    """`beluga up`'s own Prometheus metrics, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.restarts = Counter(
            "beluga_up_restarts", "Processes `beluga up` started again after they died.",
            ["process"], registry=self.registry)
        self._server: Any = None

    def serve(self, port: int) -> None:
        """Serve /metrics on 127.0.0.1:`port` (prometheus_client's own server); a port in
        use is a warning, not a failure of the stack."""
        try:
            self._server, _thread = start_http_server(port, addr="127.0.0.1",
                                                      registry=self.registry)
        except OSError as exc:
            logger.warning("cannot serve beluga up's metrics on 127.0.0.1:%d: %s; going on "
                           "without them", port, exc)
            return
        logger.info("beluga up's metrics: http://127.0.0.1:%d/metrics", port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class Stack:
    """The children of `beluga up` and their supervision.

    `start()` starts Redis (when needed), the workers and the gateway of `settings`;
    `launch()` starts any `Spec` (tests use cheap stand-ins). `wait_ready()` waits for
    `ready` (default: the gateway reports every worker healthy), failing if a child dies
    first; `supervise()` restarts dead children until `stop_event` is set; `stop()` stops
    everything in order."""

    def __init__(self, settings: Settings, ready: Callable[[], bool] | None = None,
                 first_restart_s: float = FIRST_RESTART_S, poll_s: float = POLL_S) -> None:
        self.settings = settings
        self.children: list[Child] = []
        self.stop_event = threading.Event()
        self.log_dir = settings.log_dir.resolve()
        self.metrics = UpMetrics()
        self.first_restart_s = first_restart_s
        self.poll_s = poll_s
        self._ready = ready if ready is not None else self.gateway_ready
        self._lock = threading.Lock()  # children list vs. stop() from another thread

    # -- starting ------------------------------------------------------------------------
    @property
    def redis_child(self) -> Child | None:
        return next((c for c in self.children if c.spec.role == "redis"), None)

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def _popen(self, spec: Spec, note: str) -> tuple[subprocess.Popen[bytes], Path]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{spec.name}.log"
        with open(log, "ab") as fh:
            fh.write(f"--- beluga up: {note} at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n"
                     .encode())
            fh.flush()
            proc = subprocess.Popen(spec.cmd, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=spec.env,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        logger.debug("%s command: %s", spec.name, shlex.join(spec.cmd))
        return proc, log

    def launch(self, spec: Spec) -> Child:
        """Start `spec` and supervise it from now on."""
        proc, log = self._popen(spec, "start")
        logger.info("started %s (pid %s), log: %s", spec.name, proc.pid, log)
        child = Child(spec, log, proc,
                      Backoff(self.settings.restart_backoff_max_s, self.first_restart_s))
        self.metrics.restarts.labels(process=spec.name)  # the series exists from 0
        with self._lock:
            self.children.append(child)
        return child

    def child_env(self) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        env.pop("BELUGA_CONFIG", None)  # every setting travels on its own (settings_env)
        env.update(settings_env(s))
        env["BELUGA_MODEL"] = s.model_hub_id or str(s.model_path.resolve())
        env["BELUGA_STATE_DIR"] = str(s.state_dir.resolve())
        return env

    def plan(self) -> list[Spec]:
        """The workers and the gateway of the settings (no secret on any command line: they
        travel in `env`)."""
        s = self.settings
        env = self.child_env()
        py = beluga_command()
        shares = worker_cores(sorted(os.sched_getaffinity(0)), s.num_workers,
                              s.cpu_reserved_cores)
        specs = []
        for i in range(s.num_workers):
            port = s.worker_port + i
            extra = []
            if s.cpu_threads_bind == "auto" and shares is not None:
                extra = ["--cpu-threads-bind", shares[i]]
            specs.append(Spec(f"worker-{port}", py + [
                "worker", "--worker-port", str(port), *extra], "worker", env, WORKER_STOP_S))
        specs.append(Spec("gateway", py + ["gateway"], "gateway", env,
                          s.drain_timeout_s + GATEWAY_STOP_MARGIN_S))
        return specs

    def redis_spec(self, server: str) -> Spec:
        parsed = urlparse(self.settings.redis_url)
        host = parsed.hostname or "127.0.0.1"
        data_dir = (self.settings.state_dir / "redis").resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        command = [server]
        if parsed.password:
            # The password in a config file only this user reads, never on a command line.
            conf = data_dir / "redis.conf"
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"requirepass {unquote(parsed.password)}\n")
            command.append(str(conf))
        return Spec("redis", [
            *command, "--port", str(parsed.port or 6379), "--bind", host, "--save", "",
            "--appendonly", "no", "--dir", str(data_dir), "--protected-mode", "yes"],
            "redis", None, REDIS_STOP_S)

    def start_redis(self) -> None:
        url = self.settings.redis_url
        if redis_alive(url):
            logger.info("using the Redis at %s", redacted_url(url))
            return
        host = urlparse(url).hostname or "127.0.0.1"
        if not self.settings.start_redis or host not in LOOPBACK:
            raise UpError(f"no Redis answers at {redacted_url(url)}; start one or fix "
                          "--redis-url")
        if not url.startswith("redis://"):
            raise UpError(f"no Redis answers at {redacted_url(url)}, and `beluga up` starts "
                          "only a plain TCP Redis (redis://): start a TLS or socket Redis "
                          "yourself")
        server = shutil.which("redis-server")
        if server is None:
            raise UpError("redis-server is not installed: run `make setup` (as root it installs "
                          "Debian's redis-server) or install Redis yourself")
        child = self.launch(self.redis_spec(server))
        deadline = time.monotonic() + 10
        while not redis_alive(url):
            if child.proc.poll() is not None or time.monotonic() > deadline:
                raise UpError(f"redis-server did not start; see {child.log}")
            time.sleep(0.1)

    def start(self) -> None:
        s = self.settings
        if s.up_metrics_port:
            self.metrics.serve(s.up_metrics_port)
        if s.serves_default_model:
            prepare_default_model(s.model_path)
        if s.model_hub_id is None:
            check_model_folder(s.model_path)
        self.start_redis()
        for spec in self.plan():
            self.launch(spec)

    # -- readiness -----------------------------------------------------------------------
    def gateway_ready(self) -> bool:
        s = self.settings
        host = "127.0.0.1" if s.gateway_host in ("0.0.0.0", "") else s.gateway_host
        try:
            health = httpx.get(f"http://{host}:{s.gateway_port}/health", timeout=2.0).json()
            return bool(sum(w["healthy"] for w in health["workers"]) >= s.num_workers)
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return False

    def wait_ready(self) -> None:
        """Wait until the stack is ready; any child that dies before is an UpError (a broken
        configuration fails `beluga up` instead of being restarted forever)."""
        s = self.settings
        deadline = time.monotonic() + s.worker_start_timeout_s
        while not self.stop_event.is_set():
            self.check_children()
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise UpError(f"not ready after {s.worker_start_timeout_s:.0f} s; "
                              f"see the logs in {self.log_dir}")
            self.stop_event.wait(1.0)

    def check_children(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise UpError(f"{child.name} exited with code {code} before the stack was "
                              f"ready; see {child.log}")

    def print_urls(self) -> None:
        s = self.settings
        host = "127.0.0.1" if s.gateway_host in ("0.0.0.0", "") else s.gateway_host
        base = f"http://{host}:{s.gateway_port}"
        logger.info("Beluga is up: %d workers serving '%s'", s.num_workers, s.served_model_name)
        logger.info("  OpenAI endpoint: %s/v1/chat/completions", base)
        logger.info("  dashboard:       %s/dashboard", base)
        logger.info("  models:          %s/v1/models", base)
        logger.info("  health:          %s/health", base)
        for i in range(s.num_workers):
            logger.info("  worker:          http://%s:%d (requires the worker credential)",
                        s.worker_host, s.worker_port + i)
        if s.up_metrics_port:
            logger.info("  supervisor:      http://127.0.0.1:%d/metrics", s.up_metrics_port)
        logger.info("  logs:            %s", self.log_dir)
        logger.info("Press Ctrl-C to stop.")

    # -- supervision ---------------------------------------------------------------------
    def supervise(self) -> None:
        """Restart children that die, until `stop_event` is set."""
        while not self.stop_event.is_set():
            self.tick(time.monotonic())
            self.stop_event.wait(self._next_wait())

    def tick(self, now: float) -> None:
        """One look at every child: a dead one is scheduled for a restart, a due one
        started again."""
        for child in list(self.children):
            if self.stop_event.is_set():
                return
            if child.alive:
                code = child.proc.poll()
                if code is not None:
                    self._died(child, code, now)
            elif child.restart_at is not None and now >= child.restart_at:
                self._restart(child, now)

    def _next_wait(self) -> float:
        now = time.monotonic()
        due = [c.restart_at - now for c in self.children if c.restart_at is not None]
        # (a restart past due waits for its old group to vanish: look again soon)
        return max(0.02, min([self.poll_s, *due]))

    def _died(self, child: Child, code: int, now: float) -> None:
        # What is left of its group (a worker's vLLM engine, say) goes now, so the port is
        # free when it starts again.
        _signal_group(child.proc.pid, signal.SIGKILL)
        delay = child.backoff.next_delay(now - child.started_at)
        child.dead_group = child.proc.pid
        child.restart_at = now + delay
        logger.warning("%s exited with code %s; restart %d in %.1f s", child.name, code,
                       child.restarts + 1, delay)

    def _restart(self, child: Child, now: float) -> None:
        assert child.restart_at is not None
        if child.dead_group is not None:
            left = group_members(child.dead_group)
            if left and now < child.restart_at + GROUP_GONE_S:
                _signal_group(child.dead_group, signal.SIGKILL)
                return  # looked at again next tick
            if left:
                logger.warning("processes %s of %s's old group outlived SIGKILL for %.0f s; "
                               "starting it anyway", left, child.name, GROUP_GONE_S)
        with self._lock:
            if self.stop_event.is_set():  # stop() has begun: start nothing new
                return
            try:
                proc, _log = self._popen(child.spec, f"restart {child.restarts + 1}")
            except (OSError, subprocess.SubprocessError) as exc:
                # A full disk, no file descriptors or memory left: try again later, and
                # keep supervising the rest (only Ctrl-C or SIGTERM stops the stack).
                delay = child.backoff.next_delay(0.0)
                child.restart_at = now + delay
                child.dead_group = None
                logger.error("cannot restart %s (%s); trying again in %.1f s", child.name,
                             exc, delay)
                return
            child.restarts += 1
            child.proc = proc
            child.started_at = time.monotonic()
            child.restart_at = None
            child.dead_group = None
        self.metrics.restarts.labels(process=child.name).inc()
        logger.warning("restarted %s (pid %s; restart %d)", child.name, proc.pid,
                       child.restarts)

    # -- stopping ------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every child: the gateway (it drains), the workers (they unregister, then stop
        vLLM), Redis; nothing of theirs is left afterwards."""
        self.stop_event.set()
        with self._lock:
            children = list(self.children)
        for role in STOP_ORDER:
            self._stop_all([c for c in children if c.spec.role == role])
        self.metrics.close()
        logger.info("all processes stopped")

    @staticmethod
    def _stop_all(children: Iterable[Child]) -> None:
        children = list(children)
        if not children:
            return
        for child in children:
            if child.alive and child.proc.poll() is None:
                # The leader only: it stops its own children (vLLM) in its own order.
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for child in children:
            if not child.alive:
                continue
            try:
                child.proc.wait(max(0.0, signalled + child.spec.stop_timeout_s
                                    - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s; killing it", child.name,
                               child.spec.stop_timeout_s)
        for child in children:
            group = child.proc.pid if child.alive else child.dead_group
            if group is None or not group_members(group):
                if child.alive:
                    child.proc.wait()  # reaped already, or a zombie to reap
                continue
            # SIGKILL whatever is left in the group (vLLM's engine processes included).
            _signal_group(group, signal.SIGKILL)
            if child.alive:
                child.proc.wait()
            gone_by = time.monotonic() + GROUP_GONE_S
            while group_members(group) and time.monotonic() < gone_by:
                time.sleep(0.05)


def run_stack(stack: Stack, start: Callable[[], None]) -> int:
    """Start, wait until ready, supervise until SIGINT/SIGTERM, stop; the exit code."""

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("received %s; stopping", signal.Signals(signum).name)
        stack.stop_event.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        start()
        stack.wait_ready()
        if not stack.stop_event.is_set():
            stack.print_urls()
            stack.supervise()
    except (UpError, ModelError) as exc:
        logger.error("%s", exc)
        code = 1
    finally:
        stack.stop()
    return code


def run_up(settings: Settings) -> int:
    settings = up_settings(settings)
    logger.debug("settings: %s", redacted(settings))
    stack = Stack(settings)
    return run_stack(stack, stack.start)
