from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from beluga.settings import Settings
from beluga_cli.up import (
    Backoff,
    Role,
    Spec,
    Stack,
    UpError,
    UpMetrics,
    beluga_command,
    core_shares,
    redacted,
    up_settings,
    worker_cores,
)
from engine.worker import vllm_env
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_each_worker_gets_its_own_cores() -> None:
    assert core_shares([0, 1], 2) == ["0", "1"]
    assert core_shares(list(range(8)), 2) == ["0,1,2,3", "4,5,6,7"]
    assert core_shares([0, 2, 4, 6, 8], 2) == ["0,2", "4,6,8"]
    assert core_shares([3], 1) == ["3"]
    assert core_shares([0, 1], 3) == ["0", "1", "0"]   # fewer cores than workers: shared


def test_beluga_up_splits_only_the_cores_beyond_the_reserve() -> None:
    assert worker_cores(list(range(9)), 2, 1) == ["1,2,3,4", "5,6,7,8"]
    assert worker_cores([0, 1, 2], 2, 1) == ["1", "2"]
    assert worker_cores([0, 1], 2, 1) == ["nobind", "nobind"]  # not all pinned to core 0
    assert worker_cores(list(range(8)), 1, 1) is None


def test_the_binding_reaches_vllm_and_bad_lists_are_refused() -> None:
    assert vllm_env(Settings())["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert vllm_env(Settings(cpu_threads_bind="0-3,8"))["VLLM_CPU_OMP_THREADS_BIND"] == "0-3,8"
    for bad in ("0-", "a", "1;rm", ""):
        with pytest.raises(ValidationError):
            Settings(cpu_threads_bind=bad)


def test_unbound_workers_get_their_share_of_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(2)))
    assert vllm_env(Settings(cpu_threads_bind="nobind"))["OMP_NUM_THREADS"] == "1"
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(10)))
    assert vllm_env(Settings(cpu_threads_bind="nobind"))["OMP_NUM_THREADS"] == "4"
    assert "OMP_NUM_THREADS" not in vllm_env(Settings())  # bound: vLLM sets it
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert vllm_env(Settings(cpu_threads_bind="nobind"))["OMP_NUM_THREADS"] == "3"


def test_children_log_at_the_level_beluga_up_was_given() -> None:
    root = logging.getLogger()
    old = root.level
    try:
        root.setLevel(logging.DEBUG)
        cmd = beluga_command()
    finally:
        root.setLevel(old)
    assert cmd[cmd.index("--log-level") + 1] == "DEBUG"
    assert cmd[cmd.index("--log-format") + 1] == "text"  # (and the format, likewise)
    # ... and the child accepts it
    out = subprocess.run([*cmd, "gateway", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


# --- the supervisor ------------------------------------------------------------------------

# A cheap stand-in for every child of `beluga up`: an HTTP server on its port answering
# "<name> <pid>", logging its start and its SIGTERM (with the system-wide monotonic clock)
# to an events file. With "engine" it starts a grandchild in its group (like vLLM's engine)
# that inherits the listening socket: the port stays taken until the whole group is gone.
# With "die" it exits with code 3 at once; with "slow-stop" it takes 0.3 s to stop.
STAND_IN = r'''
import os, signal, subprocess, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

name, port, events, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

def note(what):
    with open(events, "a") as f:
        f.write(f"{time.monotonic():.6f} {name} {what} {os.getpid()}\n")

note("start")
if mode == "die":
    sys.exit(3)

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{name} {os.getpid()}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
engine = None
if mode == "engine":
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"],
                              pass_fds=(server.fileno(),))
    note(f"engine-{engine.pid}")

def on_term(*_):
    note("sigterm")
    if mode == "slow-stop":
        time.sleep(0.3)
    threading.Thread(target=server.shutdown).start()

signal.signal(signal.SIGTERM, on_term)
server.serve_forever()
if engine is not None:
    engine.terminate()
    engine.wait()
note("exit")
'''


@dataclass
class StandIns:
    script: Path
    events: Path
    ports: dict[str, int]

    def spec(self, name: str, role: Role, mode: str = "") -> Spec:
        port = self.ports.setdefault(name, free_port())
        return Spec(name, [sys.executable, str(self.script), name, str(port),
                           str(self.events), mode or "-"], role, None, stop_timeout_s=10)

    def answer(self, name: str) -> int | None:
        """The pid serving `name`'s port, or None."""
        try:
            r = httpx.get(f"http://127.0.0.1:{self.ports[name]}/", timeout=1)
        except httpx.HTTPError:
            return None
        who, pid = r.text.split()
        assert who == name
        return int(pid)

    def lines(self) -> list[tuple[float, str, str, int]]:
        out = []
        if self.events.exists():
            for line in self.events.read_text().splitlines():
                t, name, what, pid = line.split(" ", 3)
                out.append((float(t), name, what, int(pid)))
        return out


def engine_pid(event: str) -> int:
    return int(event.split("-", 1)[1])


@pytest.fixture
def stand_ins(tmp_path: Path) -> StandIns:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return StandIns(script, tmp_path / "events", {})


def wait_for(what: Callable[[], Any], timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def drive(stack: Stack, steps: Callable[[], None]) -> None:
    """Run `stack.supervise()` on this (the main) thread, as `beluga up` does, while `steps`
    act on another; stop the stack after and re-raise what `steps` raised."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            steps()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            failed.append(exc)
        finally:
            stack.stop_event.set()

    driver = threading.Thread(target=run)
    driver.start()
    try:
        stack.supervise()
    finally:
        driver.join(60)
        stack.stop()
    if failed:
        raise failed[0]


def restarts_metric(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "beluga_up_restarts_total":
                out[sample.labels["process"]] = sample.value
    return out


def test_the_back_off_doubles_per_quick_death_up_to_the_cap_and_resets_after_60_s() -> None:
    b = Backoff(max_s=30)
    assert [b.next_delay(ran_s=0.5) for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert b.next_delay(ran_s=59.9) == 30       # still a quick death
    assert b.next_delay(ran_s=60.0) == 1        # it ran a minute: start over
    assert b.next_delay(ran_s=3) == 2
    assert [Backoff(max_s=0.5).next_delay(0) for _ in range(2)] == [0.5, 0.5]
    many = Backoff(max_s=10)
    assert [many.next_delay(0) for _ in range(2000)][-1] == 10  # no overflow, ever
    assert Backoff(max_s=Settings().restart_backoff_max_s).first_s == 1.0


def test_beluga_up_makes_a_credential_per_run_and_keeps_workers_on_loopback() -> None:
    s = up_settings(Settings())
    assert len(s.worker_api_key) >= 32 and s.worker_host == "127.0.0.1"
    assert up_settings(Settings()).worker_api_key != s.worker_api_key  # one per run
    mine = up_settings(Settings(worker_api_key="operator-key", worker_host="0.0.0.0"))
    assert mine.worker_api_key == "operator-key" and mine.worker_host == "0.0.0.0"


def test_secrets_travel_in_the_environment_never_on_a_command_line_or_in_a_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = up_settings(Settings(state_dir=tmp_path, server_secret="s3cret-value",
                             api_keys="client-key:acme", drain_timeout_s=7))
    key = s.worker_api_key
    specs = Stack(s).plan()
    assert [sp.name for sp in specs] == ["worker-8100", "worker-8101", "gateway"]
    for sp in specs:
        assert sp.env is not None and sp.env["BELUGA_WORKER_API_KEY"] == key
        assert sp.env["BELUGA_SERVER_SECRET"] == "s3cret-value"
        assert sp.env["BELUGA_WORKER_HOST"] == "127.0.0.1"
        for secret in (key, "s3cret-value", "client-key"):
            assert not any(secret in arg for arg in sp.cmd), sp.cmd
    assert specs[0].cmd[specs[0].cmd.index("--worker-port") + 1] == "8100"
    assert specs[-1].role == "gateway" and specs[-1].stop_timeout_s == 7 + 10
    shown = str(redacted(s))
    for secret in (key, "s3cret-value", "client-key"):
        assert secret not in shown
    assert redacted(Settings())["server_secret"] == ""  # unset stays visibly unset
    # What run_up logs about the settings and its children, at DEBUG.
    caplog.set_level(logging.DEBUG, logger="beluga_cli.up")
    stack = Stack(s, ready=lambda: True)
    echo = Spec("worker-8100", [sys.executable, "-c", "pass"], "worker", specs[0].env)
    stack.launch(echo).proc.wait(30)
    stack.stop()
    logging.getLogger("beluga_cli.up").debug("settings: %s", redacted(s))
    for secret in (key, "s3cret-value", "client-key"):
        assert secret not in caplog.text


def test_workers_keep_their_port_and_core_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(9)))
    specs = Stack(up_settings(Settings(num_workers=2, worker_port=9000))).plan()
    binds = [sp.cmd[sp.cmd.index("--cpu-threads-bind") + 1] for sp in specs[:2]]
    assert binds == ["1,2,3,4", "5,6,7,8"]
    ports = [sp.cmd[sp.cmd.index("--worker-port") + 1] for sp in specs[:2]]
    assert ports == ["9000", "9001"]
    # a restart starts the very same Spec again (same command, same environment)


def test_a_dead_child_comes_back_by_itself_and_the_others_keep_serving(
        tmp_path: Path, stand_ins: StandIns, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="beluga_cli.up")
    metrics_port = free_port()
    s = Settings(state_dir=tmp_path / "state", up_metrics_port=metrics_port)
    names = ("redis", "worker-1", "worker-2", "gateway")
    stack = Stack(s, ready=lambda: all(stand_ins.answer(n) for n in names), poll_s=0.05)
    stack.metrics.serve(metrics_port)
    stack.launch(stand_ins.spec("redis", "redis"))
    stack.launch(stand_ins.spec("worker-1", "worker", "engine"))
    stack.launch(stand_ins.spec("worker-2", "worker", "engine"))
    stack.launch(stand_ins.spec("gateway", "gateway"))
    stack.wait_ready()
    first = {n: stand_ins.answer(n) for n in names}
    assert first == {n: stack.child(n).proc.pid for n in names}
    assert restarts_metric(metrics_port) == dict.fromkeys(names, 0.0)
    every_pid: set[int] = set()

    def kill_and_watch(victim: str, restarts: dict[str, float]) -> None:
        old = stand_ins.answer(victim)
        assert old is not None
        engines = [engine_pid(what) for _t, n, what, _pid in stand_ins.lines()
                   if n == victim and what.startswith("engine-")]
        os.kill(old, signal.SIGKILL)  # the leader only: an engine keeps the port
        killed_at = time.monotonic()
        new = wait_for(lambda: (p := stand_ins.answer(victim)) != old and p, 15,
                       f"{victim} did not come back")
        back_after = time.monotonic() - killed_at
        assert 1.0 <= back_after < 5, back_after           # the first back-off is 1 s
        for engine in engines:                              # its old group is gone
            assert not psutil.pid_exists(engine) or \
                psutil.Process(engine).status() == psutil.STATUS_ZOMBIE
        assert stack.child(victim).proc.pid == new
        for other in names:
            if other != victim:
                assert stand_ins.answer(other) == current[other], other
        current[victim] = new
        every_pid.add(new)
        assert restarts_metric(metrics_port) == restarts
        assert stack.child(victim).restarts == 1

    current = dict(first)

    def steps() -> None:
        kill_and_watch("gateway", {"redis": 0, "worker-1": 0, "worker-2": 0, "gateway": 1})
        kill_and_watch("worker-1", {"redis": 0, "worker-1": 1, "worker-2": 0, "gateway": 1})
        kill_and_watch("redis", {"redis": 1, "worker-1": 1, "worker-2": 0, "gateway": 1})

    started = psutil.Process().children(recursive=True)
    drive(stack, steps)
    every_pid.update(p.pid for p in started)
    for _t, _n, what, pid in stand_ins.lines():
        every_pid.add(engine_pid(what) if what.startswith("engine-") else pid)
    alive = [p for p in every_pid if psutil.pid_exists(p)
             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {alive}"
    for name in ("gateway", "worker-1", "redis"):
        assert re.search(rf"{name} exited with code -9; restart 1 in 1\.0 s", caplog.text)
    # Stopped in order: the gateway, then the workers, then Redis.
    term = {n: t for t, n, what, _pid in stand_ins.lines() if what == "sigterm"}
    assert term["gateway"] < min(term["worker-1"], term["worker-2"])
    assert max(term["worker-1"], term["worker-2"]) < term["redis"]
    with pytest.raises(httpx.HTTPError):  # the metrics server is gone with the stack
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1)


def test_a_child_that_keeps_dying_waits_longer_each_time(
        tmp_path: Path, stand_ins: StandIns, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="beluga_cli.up")
    stack = Stack(Settings(state_dir=tmp_path, restart_backoff_max_s=0.8),
                  first_restart_s=0.2, poll_s=0.05)
    stack.launch(stand_ins.spec("gateway", "gateway"))
    stack.launch(stand_ins.spec("worker-1", "worker", "die"))
    gateway = stack.child("gateway").proc.pid

    def starts() -> list[float]:
        return [t for t, n, what, _ in stand_ins.lines() if n == "worker-1" and what == "start"]

    def steps() -> None:
        wait_for(lambda: len(starts()) >= 6, 30, "too few restarts")
        assert stand_ins.answer("gateway") == gateway  # untouched all along

    drive(stack, steps)
    gaps = [b - a for a, b in zip(starts(), starts()[1:], strict=False)]
    for gap, wait in zip(gaps, [0.2, 0.4, 0.8, 0.8, 0.8], strict=False):
        assert gap >= wait, gaps
    for n, wait in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 0.8)]:
        assert f"worker-1 exited with code 3; restart {n} in {wait:.1f} s" in caplog.text
    assert stack.child("worker-1").restarts >= 5
    assert stack.child("gateway").restarts == 0
    assert [pid for _t, n, what, pid in stand_ins.lines()
            if n == "gateway" and what == "start"] == [gateway]


def test_a_child_that_dies_before_the_stack_is_ready_fails_it(
        tmp_path: Path, stand_ins: StandIns) -> None:
    stack = Stack(Settings(state_dir=tmp_path), ready=lambda: False)
    stack.launch(stand_ins.spec("gateway", "gateway"))
    stack.launch(stand_ins.spec("worker-1", "worker", "die"))
    with pytest.raises(UpError, match="worker-1 exited with code 3 before the stack was ready"):
        stack.wait_ready()
    stack.stop()
    assert stack.child("worker-1").restarts == 0
    assert stack.child("gateway").proc.poll() is not None


# `beluga up`'s own loop (run_stack) in a process of its own, with the stand-ins, stopped
# with a real signal.
RUNNER = r'''
import logging, sys
from pathlib import Path
from beluga.settings import Settings
from beluga_cli.up import Spec, Stack, run_stack

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
script, events, state, mode, *ports = sys.argv[1:]

def spec(name, role, port, how="-"):
    return Spec(name, [sys.executable, script, name, port, events, how], role, None, 10)

stack = Stack(Settings(state_dir=Path(state)), ready=lambda: Path(events).exists()
              and Path(events).read_text().count(" start ") >= 4)

def start():
    stack.launch(spec("redis", "redis", ports[0]))
    stack.launch(spec("worker-1", "worker", ports[1], "engine"))
    stack.launch(spec("worker-2", "worker", ports[2], "die" if mode == "broken" else "slow-stop"))
    stack.launch(spec("gateway", "gateway", ports[3], "slow-stop"))

sys.exit(run_stack(stack, start))
'''


def this_tree_env() -> dict[str, str]:
    """The runner imports this checkout's packages, not whichever copy is installed."""
    return dict(os.environ, PYTHONPATH=str(ROOT))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_everything_in_order_and_leaves_nothing(
        tmp_path: Path, stand_ins: StandIns, sig: signal.Signals) -> None:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    ports = [str(free_port()) for _ in range(4)]
    log = tmp_path / "up.log"
    with open(log, "wb") as fh:
        up = subprocess.Popen([sys.executable, str(runner), str(stand_ins.script),
                               str(stand_ins.events), str(tmp_path / "state"), "ok", *ports],
                              stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                              env=this_tree_env())
    try:
        wait_for(lambda: b"Press Ctrl-C" in log.read_bytes(), 30, "not ready")
        started = psutil.Process(up.pid).children(recursive=True)
        assert len(started) == 5  # four children and worker-1's engine
        up.send_signal(sig)
        assert up.wait(30) == 0, log.read_text()
    finally:
        if up.poll() is None:
            up.kill()
    _gone, alive = psutil.wait_procs(started, timeout=5)
    assert not alive, f"left behind: {alive}"
    term = {n: t for t, n, what, _pid in stand_ins.lines() if what == "sigterm"}
    # the workers get SIGTERM once the gateway has stopped (it takes 0.3 s), Redis once
    # both workers have (worker-2 takes 0.3 s)
    assert term["gateway"] + 0.3 <= min(term["worker-1"], term["worker-2"])
    assert term["worker-2"] + 0.3 <= term["redis"]
    assert "all processes stopped" in log.read_text()


def test_a_broken_start_exits_1_and_leaves_nothing(tmp_path: Path,
                                                   stand_ins: StandIns) -> None:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    ports = [str(free_port()) for _ in range(4)]
    out = subprocess.run([sys.executable, str(runner), str(stand_ins.script),
                          str(stand_ins.events), str(tmp_path / "state"), "broken", *ports],
                         capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env=this_tree_env())
    assert out.returncode == 1, out.stdout + out.stderr
    assert "worker-2 exited with code 3 before the stack was ready" in out.stderr
    assert "restart" not in out.stderr
    pids = {pid for _t, _n, _what, pid in stand_ins.lines()}
    pids |= {engine_pid(what) for _t, _n, what, _p in stand_ins.lines()
             if what.startswith("engine-")}
    alive = [p for p in pids if psutil.pid_exists(p)
             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive


def test_a_metrics_port_in_use_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        metrics = UpMetrics()
        metrics.serve(busy.getsockname()[1])
        metrics.close()
    assert "cannot serve beluga up's metrics" in caplog.text


def test_a_redis_with_a_password_is_started_with_it_in_a_private_file(tmp_path: Path) -> None:
    import shutil

    from beluga_cli.up import redis_alive
    from tests.support import free_port

    port = free_port()
    url = f"redis://:s3cret%21@127.0.0.1:{port}/0"
    stack = Stack(Settings(state_dir=tmp_path, redis_url=url))
    server = shutil.which("redis-server")
    assert server is not None
    spec = stack.redis_spec(server)
    assert not any("s3cret" in arg for arg in spec.cmd)  # never on a command line
    conf = tmp_path / "redis" / "redis.conf"
    assert (conf.stat().st_mode & 0o777) == 0o600
    assert conf.read_text() == "requirepass s3cret!\n"
    proc = subprocess.Popen(spec.cmd, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not redis_alive(url):
            assert time.monotonic() < deadline, "the Redis with a password did not answer"
            time.sleep(0.05)
        assert not redis_alive(f"redis://127.0.0.1:{port}/0")  # without it: refused
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_tls_redis_is_not_started_by_beluga_up(tmp_path: Path) -> None:
    from beluga_cli.up import UpError
    from tests.support import free_port

    stack = Stack(Settings(state_dir=tmp_path,
                           redis_url=f"rediss://:pw@127.0.0.1:{free_port()}/0"))
    with pytest.raises(UpError, match="TLS") as err:
        stack.start_redis()
    assert "pw" not in str(err.value)


def test_a_restart_that_cannot_start_is_tried_again_and_the_rest_keep_running(
        tmp_path: Path, stand_ins: StandIns, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="beluga_cli.up")
    stack = Stack(Settings(state_dir=tmp_path, restart_backoff_max_s=0.4),
                  first_restart_s=0.2, poll_s=0.05)
    stack.launch(stand_ins.spec("gateway", "gateway"))
    stack.launch(stand_ins.spec("worker-1", "worker", "die"))
    gateway = stack.child("gateway").proc.pid
    log = stack.log_dir / "worker-1.log"

    def starts() -> int:
        return sum(1 for _t, n, what, _ in stand_ins.lines()
                   if n == "worker-1" and what == "start")

    def steps() -> None:
        wait_for(lambda: starts() >= 1, 30, "the worker never started")
        log.unlink()
        log.mkdir()  # its log cannot be opened: every restart fails (as on a full disk)
        wait_for(lambda: caplog.text.count("cannot restart worker-1") >= 2, 30,
                 "no failed restart reported")
        assert stand_ins.answer("gateway") == gateway  # the rest keep running
        before = starts()
        log.rmdir()
        wait_for(lambda: starts() > before, 30, "not restarted once it could be")

    drive(stack, steps)
    assert stack.child("gateway").restarts == 0
