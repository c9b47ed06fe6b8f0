"""Hostile input against the session's real stack: every class of tests/hostile.py (the
same definitions bench/hostile_sweep.py runs at a larger scale), small enough that the file
takes about two minutes.

Each case asserts:
* no 5xx at all where the input is bad (a 4xx), and none from the gateway's own code
  anywhere (500 internal_error); every answer within its bound (no hang);
* /health answering within 100 ms while the case runs: a separate process GETs it every
  50 ms. The bar is p99 < 100 ms (with fewer than 100 probes: at most one over it) and
  max < 1 s over the probes during which the gateway's
  event-loop thread was not starved of CPU, that is did not wait for a core for half the
  probe or more (/proc/<pid>/schedstat): on this 2-core box the vLLM workers' compute can
  take both cores for a moment, which no gateway can help; a loop that is busy (parsing,
  tokenizing) or blocked is the gateway's own stall and counts. Starved probes are still
  printed;
* the gateway's RSS below 1 GiB;
* the gateway alive and serving afterwards: the same process (no crash, no restart), and
  a chat request answering "Paris".

The stack is shared with the other e2e tests (which run after these): each case leaves it as
it found it (no garbage left in Redis, no process left stopped).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tests import hostile as h
from tests.e2e.conftest import MODEL_NAME, Stack

HEALTH_P99_MS = 100.0
HEALTH_MAX_MS = 1000.0
RSS_MAX = 1024**3


def gateway_process(stack: Stack) -> psutil.Process:
    found = [p for p in psutil.Process(stack.proc.pid).children(recursive=True)
             if "gateway" in p.cmdline() and "beluga_cli" in p.cmdline()]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def watch(stack: Stack) -> Iterator[tuple[h.HealthProbe, psutil.Process]]:
    gateway = gateway_process(stack)
    probe = h.HealthProbe(stack.base_url, gateway.pid)
    time.sleep(0.5)
    yield probe, gateway
    probe.remove()


@pytest.fixture
def target(stack: Stack) -> h.Target:
    return h.Target(stack.base_url, MODEL_NAME)


def checked(stack: Stack, watch: tuple[h.HealthProbe, psutil.Process],
            run: Callable[[], list[h.Outcome]]) -> list[h.Outcome]:
    """Run one class with the health probe watching; assert the module doc's bar."""
    probe, gateway = watch
    t0 = time.monotonic()
    outcomes = run()
    t1 = time.monotonic()
    time.sleep(0.2)  # the probe's last lines
    # A class that runs in less than the probe's interval may have no probe inside its
    # window: extend the window to the next probe (what the gateway did right after it).
    deadline = time.monotonic() + 10
    while probe.stats(t0, t1).n == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        t1 = time.monotonic()
    stats = probe.stats(t0, t1)
    rss = probe.rss_max(t0, t1)
    print(f"\n/health: {stats}; gateway RSS max {rss / 2**20:.0f} MiB")
    problems = [f"{o.label}: {o.problem}\n    {o.repro[:400]}" for o in outcomes if o.problem]
    assert not problems, "\n".join(problems)
    assert stats.n > 0 and stats.failed == 0, stats
    # p99 over fewer than 100 probes is their maximum: there, one slow probe (under 1 s)
    # is what p99 allows; the sweep (bench/hostile_sweep.py) holds p99 over thousands.
    p99_ok = stats.own_p99_ms < HEALTH_P99_MS or (stats.n < 100 and stats.busy <= 1)
    assert p99_ok and stats.own_max_ms < HEALTH_MAX_MS, (
        f"/health slow while the case ran: {stats}")
    assert rss < RSS_MAX, f"gateway RSS {rss / 2**20:.0f} MiB"
    assert gateway.is_running() and gateway.status() != psutil.STATUS_ZOMBIE, "gateway died"
    assert gateway_process(stack).pid == gateway.pid, "the gateway was restarted"
    ok, text = h.ask_paris(stack.base_url, MODEL_NAME)
    assert ok, f"the stack no longer answers: {text}"
    return outcomes


@pytest.mark.parametrize("name", list(h.REQUEST_CLASSES))
def test_hostile_requests(stack: Stack, watch: tuple[h.HealthProbe, psutil.Process],
                          name: str) -> None:
    reqs = h.REQUEST_CLASSES[name](MODEL_NAME, h.TEST)
    checked(stack, watch, lambda: h.run_requests(stack.base_url, name, reqs,
                                                 h.TEST.concurrency))


def test_slow_clients_and_half_open_connections(
        stack: Stack, watch: tuple[h.HealthProbe, psutil.Process], target: h.Target) -> None:
    """Bodies and headers trickled, bodies declared and never sent, and 200 idle or
    half-headed connections, all at once (~35 s: the body timeout)."""
    def both() -> list[h.Outcome]:
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(h.slow_clients, target, h.TEST)
            idle = pool.submit(h.half_open, target, h.TEST)
            return slow.result() + idle.result()

    outcomes = checked(stack, watch, both)
    assert {o.status for o in outcomes if "trickled forever" in o.label} == {408}


def test_abandoned_streams_and_requests(stack: Stack, watch: tuple[h.HealthProbe,
                                                                  psutil.Process],
                                        target: h.Target) -> None:
    checked(stack, watch, lambda: h.abandoned(target, h.TEST))


def test_64_mb_bodies_get_a_readable_413(stack: Stack, watch: tuple[h.HealthProbe,
                                                                   psutil.Process],
                                         target: h.Target) -> None:
    outcomes = checked(stack, watch, lambda: h.big_bodies(target, h.TEST))
    assert sum(o.status == 413 for o in outcomes) == 6


def test_poisoned_redis_records(stack: Stack, watch: tuple[h.HealthProbe, psutil.Process],
                                target: h.Target) -> None:
    """Garbage in every field of worker, hints and hint-key records (removed afterwards):
    served throughout, never routed to, counted in
    beluga_gateway_registry_invalid_records_total."""
    try:
        checked(stack, watch, lambda: h.poisoned_redis(target, stack.redis_url,
                                                       gone_within_s=20))
    finally:
        h.clean_poison(stack.redis(), [])
    assert not [k for k in stack.redis().scan_iter(match=f"{h.PREFIX}:*poison*")]


def test_a_frozen_worker(stack: Stack, watch: tuple[h.HealthProbe, psutil.Process],
                         target: h.Target) -> None:
    """One worker SIGSTOPped (its whole process tree; SIGCONT in a finally): out of routing
    within 20 s (its registry record expires after 5 s here), requests then served by the
    other; back after SIGCONT."""
    try:
        checked(stack, watch, lambda: h.stopped_worker(target, stack.redis_url,
                                                       detect_within_s=20))
    finally:
        for rec in stack.workers():
            if psutil.pid_exists(rec.pid):
                h.stop_tree(h.process_tree(rec.pid), signal.SIGCONT)
    assert len(h.healthy_ids(stack.base_url)) == 2


def test_a_frozen_and_a_slow_redis(stack: Stack, watch: tuple[h.HealthProbe, psutil.Process],
                                   target: h.Target) -> None:
    """Redis SIGSTOPped for 3 s, then stopped 300 ms of every 500 ms for 6 s, then frozen
    7 s (past the workers' 5 s registry TTL here): every request served, then and after."""
    pid = h.redis_pid(stack.redis_url)
    try:
        checked(stack, watch, lambda: h.stopped_redis(target, stack.redis_url, stop_s=3,
                                                      slow_s=6, long_stop_s=7))
    finally:
        psutil.Process(pid).send_signal(signal.SIGCONT)
