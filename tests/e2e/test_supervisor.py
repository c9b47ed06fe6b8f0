"""`beluga up` is a supervisor: on the session's real stack, the gateway, then one worker (its
whole process group, vLLM's engine included), then Redis are SIGKILLed; each comes back by
itself, requests succeed again within 5 s of the new process appearing, nothing else is
restarted (the other processes keep their pids), and beluga_up_restarts_total counts each
restart. The timings are recorded as properties (`--junitxml`) and printed (`-rP`).

Leaves the stack as it found it: both workers healthy and registered (test_worker_faults,
which runs after this file, starts from two)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import httpx
import psutil
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import MODEL_NAME, Stack

CHAT = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}
BACK_WITHIN_S = 5.0        # requests succeed again this soon after the new process is seen
RESTART_SEEN_S = 30.0      # the first back-off is 1 s; a new process shows up well within this
WORKER_READY_S = 300.0     # a restarted worker starts vLLM again (~60-90 s on 2 cores)


def children(stack: Stack) -> dict[str, psutil.Process]:
    """`beluga up`'s own children by name: gateway, worker-<port>, redis."""
    out: dict[str, psutil.Process] = {}
    for p in psutil.Process(stack.proc.pid).children():
        try:
            cmd = p.cmdline()
            if p.name() == "redis-server" or (cmd and cmd[0].endswith("redis-server")):
                out["redis"] = p
            elif "beluga_cli" in cmd and "gateway" in cmd:
                out["gateway"] = p
            elif "beluga_cli" in cmd and "worker" in cmd:
                out[f"worker-{cmd[cmd.index('--worker-port') + 1]}"] = p
        except (psutil.NoSuchProcess, psutil.ZombieProcess, ValueError, IndexError):
            continue
    return out


def pids(stack: Stack) -> dict[str, int]:
    return {name: p.pid for name, p in children(stack).items()}


def restarts(stack: Stack) -> dict[str, float]:
    text = httpx.get(f"{stack.up_metrics_url}/metrics", timeout=5).text
    return {s.labels["process"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "beluga_up_restarts_total"}


def redis_settled(stack: Stack) -> bool:
    """`beluga up`'s Redis has been up for 2 s and answers (not one that keeps dying because
    something else holds its port)."""
    p = children(stack).get("redis")
    try:
        return p is not None and time.time() - p.create_time() > 2 and \
            bool(stack.redis().ping())
    except (psutil.Error, redis.RedisError):
        return False


def answered(client: httpx.Client, url: str = "/v1/chat/completions",
             headers: dict[str, str] | None = None) -> bool:
    try:
        r = client.post(url, json=CHAT, headers=headers, timeout=30)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and "Paris" in (r.json()["choices"][0]["message"]["content"]
                                                or "")


def wait_until(what: Callable[[], object], timeout: float, message: str,
               every: float = 0.05) -> float:
    """Seconds until `what()` was true; fails past `timeout`."""
    start = time.monotonic()
    while not what():
        assert time.monotonic() - start < timeout, message
        time.sleep(every)
    return time.monotonic() - start


def kill_and_watch(stack: Stack, client: httpx.Client, victim: str,
                   timings: dict[str, float]) -> int:
    """SIGKILL `victim`'s process group; wait for `beluga up` to start it again and for
    requests through the gateway to succeed; the others untouched. The new pid."""
    before = pids(stack)
    assert victim in before, before
    group = [psutil.Process(before[victim])]
    group += group[0].children(recursive=True)
    os.killpg(before[victim], signal.SIGKILL)
    killed_at = time.monotonic()
    _gone, alive = psutil.wait_procs(group, timeout=30)
    assert not alive, f"{victim}'s group outlived SIGKILL: {alive}"
    wait_until(lambda: pids(stack).get(victim, before[victim]) != before[victim],
               RESTART_SEEN_S, f"beluga up did not start {victim} again")
    seen_at = time.monotonic()
    new = pids(stack)[victim]
    timings[f"{victim}_new_process_after_s"] = round(seen_at - killed_at, 2)
    wait_until(lambda: answered(client), 60, f"no answer after {victim} came back", 0.1)
    timings[f"{victim}_requests_ok_after_s"] = round(time.monotonic() - seen_at, 2)
    after = pids(stack)
    assert {n: p for n, p in after.items() if n != victim} == \
        {n: p for n, p in before.items() if n != victim}, "something else was restarted"
    assert stack.proc.poll() is None, "beluga up must survive a crash"
    return new


def test_beluga_up_restarts_the_gateway_a_worker_and_redis(
        stack: Stack, record_property: Callable[[str, object], None]) -> None:
    timings: dict[str, float] = {}
    port = stack.worker_urls[1].rsplit(":", 1)[1]
    victim = f"worker-{port}"   # the worker answering the second URL
    try:
        restart_each(stack, victim, timings)
    finally:  # what was measured, also when something failed
        for name, value in timings.items():
            record_property(name, value)
        print("supervisor timings (s):", timings)
    for name in ("gateway", victim, "redis"):
        assert timings[f"{name}_requests_ok_after_s"] <= BACK_WITHIN_S, timings


def restart_each(stack: Stack, victim: str, timings: dict[str, float]) -> None:
    survivor = f"worker-{stack.worker_urls[0].rsplit(':', 1)[1]}"
    with httpx.Client(base_url=stack.base_url, timeout=30) as client:
        wait_until(lambda: len(stack.workers()) == 2 and answered(client), 60,
                   "the stack does not serve with two workers to begin with", 0.5)
        wait_until(lambda: redis_settled(stack), 60,
                   "beluga up's own Redis does not stay up (another redis-server on its port?)",
                   0.2)
        start = pids(stack)
        assert set(start) == {"gateway", "redis", victim, survivor}, start
        counts = restarts(stack)

        kill_and_watch(stack, client, "gateway", timings)

        # A worker, with its vLLM server and engine.
        new_worker = kill_and_watch(stack, client, victim, timings)
        # It starts vLLM again on the same port with the same credential, registers again,
        # and the gateway takes it back.
        key = psutil.Process(new_worker).environ()["BELUGA_WORKER_API_KEY"]
        t0 = time.monotonic()
        with httpx.Client(base_url=stack.worker_urls[1], timeout=30) as direct:
            wait_until(lambda: answered(direct, headers={"authorization": f"Bearer {key}"}),
                       WORKER_READY_S, f"{victim} does not serve after its restart", 1.0)
            timings[f"{victim}_vllm_serving_after_s"] = round(time.monotonic() - t0, 2)
            assert direct.post("/v1/chat/completions", json=CHAT).status_code == 401
        wait_until(lambda: len(stack.workers()) == 2, 30, f"{victim} did not register again")
        wait_until(lambda: sum(w["healthy"] for w in client.get("/health").json()["workers"])
                   == 2, 60, f"the gateway did not take {victim} back", 0.5)

        kill_and_watch(stack, client, "redis", timings)
        # Redis came back empty: the workers register again (test_worker_faults needs both).
        wait_until(lambda: len(stack.workers()) == 2, 30,
                   "the workers did not register in the restarted Redis", 0.2)

        final = pids(stack)
        assert final[survivor] == start[survivor], "the other worker was restarted"
        assert {n: final[n] != start[n] for n in final} == \
            {n: n in ("gateway", victim, "redis") for n in final}
        now = restarts(stack)
        assert {n: now[n] - counts.get(n, 0.0) for n in now} == \
            {n: 1.0 if n in ("gateway", victim, "redis") else 0.0 for n in now}, now
