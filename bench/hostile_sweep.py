"""Hostile sweep: every class of hostile input against a running stack, with the gateway's
/health latency and memory watched throughout.

    python bench/hostile_sweep.py [--url http://127.0.0.1:8000] [--minutes N] [--json OUT]

Without --url it starts its own stack (`beluga up` with default settings, as `make run`,
on free ports) and stops it at the end; with --url it uses a running one (`make run`'s:
the gateway's pid is found by its port, or --gateway-pid; Redis at --redis-url).

The classes (tests/hostile.py, the same definitions as tests/e2e/test_hostile.py, at a
larger scale): huge JSON (7 MiB, many times and concurrently), deep JSON, invalid UTF-8,
wrong content types and malformed HTTP, absurd numbers in every numeric field, huge `n`,
huge stop lists and logit_bias maps, token ids out of range, header injection in the model
name, request chat templates, many-message chats, repeated huge prompts, slow bodies and
headers, hundreds of half-open connections, abandoned streams and non-streams, 64 MB bodies
from urllib and the OpenAI SDK, poisoned Redis records, a frozen (SIGSTOP) worker, a frozen
and a slow Redis. With --minutes, the request classes are run again (in a seeded random
order) until that much time has passed.

Meanwhile a separate process GETs /health every 50 ms and samples the gateway's RSS. At the
end the stack must still answer "What is the capital of France?" with Paris.

Printed: one table row per class (requests, statuses, slowest answer, /health p99 and max
while it ran, how many /health probes over 100 ms found the gateway's event loop busy
(its own stall) or starved of CPU (the machine's), problems), every problem with a
reproduction, and the totals: gateway 5xx (500 internal_error: the gateway's own bug), worker
5xx (502/504), 503 overload refusals, hangs, crashes (the gateway's pid changed or gone),
/health p99, RSS max. Exit status 1 when the sweep fails the bar of issue 16: any gateway
500, hang or crash, /health p99 >= 100 ms, RSS >= 1 GiB, or no Paris (--strict: any problem
at all).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import hostile as h  # noqa: E402

GIB = 1024**3
HEALTH_P99_MS = 100.0


def table_row(name: str, outs: list[h.Outcome], health: h.HealthStats) -> str:
    statuses = Counter("-" if o.status is None else str(o.status) for o in outs)
    shown = " ".join(f"{k}:{v}" for k, v in sorted(statuses.items()))
    slowest = max((o.elapsed_s for o in outs), default=0.0)
    problems = sum(1 for o in outs if o.problem)
    return (f"{name:<22} {len(outs):>5}  {shown[:44]:<44} {slowest:>7.1f}s "
            f"{health.p99_ms:>8.1f} {health.max_ms:>8.1f} {health.busy:>5} {health.starved:>5} "
            f"{problems:>5}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running stack's gateway (default: start one)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                    help="the stack's Redis (with --url)")
    ap.add_argument("--gateway-pid", type=int, help="the gateway's pid (with --url)")
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="run the request classes again until this many minutes passed")
    ap.add_argument("--classes", help="comma-separated subset of classes")
    ap.add_argument("--no-stack-classes", action="store_true",
                    help="skip poisoned Redis, the frozen worker and frozen Redis")
    ap.add_argument("--header-timeout", type=float, default=10.0,
                    help="the gateway's client_header_timeout_s")
    ap.add_argument("--body-timeout", type=float, default=30.0,
                    help="the gateway's client_body_timeout_s")
    ap.add_argument("--seed", type=int, default=0, help="order of the repeated classes")
    ap.add_argument("--strict", action="store_true", help="exit 1 on any problem")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    with h.stack_at(args.url, args.redis_url) as (url, redis_url):
        return sweep(args, url, redis_url)


def sweep(args: argparse.Namespace, url: str, redis_url: str | None) -> int:
    pid = args.gateway_pid or h.gateway_pid(url)
    if pid is None:
        print(f"cannot find the gateway's process at {url}: pass --gateway-pid",
              file=sys.stderr)
        return 2
    ok, text = h.ask_paris(url, args.model)
    if not ok:
        print(f"the stack does not answer before the sweep: {text}", file=sys.stderr)
        return 2
    target = h.Target(url, args.model, args.header_timeout, args.body_timeout)
    scale = h.SWEEP
    wanted = set(args.classes.split(",")) if args.classes else None

    def chosen(name: str) -> bool:
        return wanted is None or name in wanted

    probe = h.HealthProbe(url, pid)
    started = time.monotonic()
    results: list[tuple[str, list[h.Outcome], h.HealthStats, float, float]] = []
    crashes: list[str] = []
    pids = {pid}

    def run(name: str, fn: Any) -> None:
        nonlocal probe
        t0 = time.monotonic()
        print(f"  {name} ...", end="", flush=True)
        try:
            outs = fn()
        except Exception as exc:  # a class that cannot run says so and the sweep goes on
            outs = [h.Outcome(name, "the class itself", None, time.monotonic() - t0,
                              message=repr(exc), problem=f"class failed to run: {exc!r}")]
        t1 = time.monotonic()
        for o in outs:  # a fast refusal under overload is what the gateway should do:
            if o.kind == "overloaded" and o.elapsed_s < 5:  # counted, not a problem
                o.problem = None
        results.append((name, outs, probe.stats(t0, t1), t0, t1))
        print(f" {len(outs)} requests, {t1 - t0:.0f} s", flush=True)
        now_pid = h.gateway_pid(url) if not args.gateway_pid else (
            args.gateway_pid if psutil.pid_exists(args.gateway_pid) else None)
        if now_pid not in pids:
            crashes.append(f"after {name}: gateway pid {sorted(pids)} -> {now_pid}")
            if now_pid is not None:
                pids.add(now_pid)
                probe.close()
                probe = h.HealthProbe(url, now_pid)  # (keeps measuring the new one)

    print(f"sweep against {url} (gateway pid {pid})", flush=True)
    for name, build in h.REQUEST_CLASSES.items():
        if chosen(name):
            reqs = build(args.model, scale)
            run(name, lambda r=reqs, n=name: h.run_requests(url, n, r, scale.concurrency))
    for name, client_fn in h.CLIENT_CLASSES.items():
        if chosen(name):
            run(name, lambda f=client_fn: f(target, scale))
    if not args.no_stack_classes:
        if chosen("poisoned_redis"):
            run("poisoned_redis", lambda: h.poisoned_redis(target, redis_url))
        if chosen("stopped_worker"):
            run("stopped_worker", lambda: h.stopped_worker(target, redis_url, window=True))
        if chosen("stopped_redis"):
            run("stopped_redis", lambda: h.stopped_redis(target, redis_url, long_stop_s=12))
    rng = random.Random(args.seed)
    names = [n for n in h.REQUEST_CLASSES if chosen(n)]
    rounds = 0
    while names and time.monotonic() - started < args.minutes * 60:
        name = rng.choice(names)
        reqs = h.REQUEST_CLASSES[name](args.model, scale)
        rounds += 1
        run(f"{name}#{rounds}", lambda r=reqs, n=name: h.run_requests(url, n, r,
                                                                        scale.concurrency))
    ended = time.monotonic()
    paris_ok, paris_text = h.ask_paris(url, args.model)
    time.sleep(0.5)
    probe.close()
    overall = probe.stats(started, ended)
    rss_max = probe.rss_max(started, ended)
    rss_first = next((r for _t, r in probe.rss_series() if r > 0), 0)
    probe.remove()

    print()
    print(f"{'class':<22} {'reqs':>5}  {'statuses':<44} {'slowest':>8} "
          f"{'hp99 ms':>8} {'hmax ms':>8} {'busy':>5} {'starv':>5} {'probs':>5}")
    all_outs: list[h.Outcome] = []
    for name, outs, health, _t0, _t1 in results:
        print(table_row(name, outs, health))
        all_outs += outs
    kinds = Counter(o.kind for o in all_outs)
    problems = [o for o in all_outs if o.problem]
    gateway_500 = [o for o in all_outs if o.kind == "gateway_bug"]
    hangs = [o for o in all_outs if o.status is None and o.problem
             and ("timeout" in o.message or "timed out" in o.message)]
    print()
    if problems:
        print(f"problems ({len(problems)}; the distinct ones, each with a reproduction):")
        counts = Counter((o.cls, o.problem or "") for o in problems)
        seen: set[tuple[str, str]] = set()
        for o in problems:
            key = (o.cls, o.problem or "")
            if key in seen:
                continue
            seen.add(key)
            more = f" (x{counts[key]}, e.g. this one)" if counts[key] > 1 else ""
            print(f"- [{o.cls}] {o.label}: {o.problem} ({o.elapsed_s:.1f} s){more}")
            if o.repro:
                print(f"    {o.repro[:700]}")
    print()
    totals = {
        "requests": len(all_outs),
        "gateway_5xx_internal_error": len(gateway_500),
        "worker_5xx": kinds["worker_5xx"],
        "overload_503": kinds["overloaded"],
        "unavailable_503": kinds["unavailable"],
        "other_5xx": kinds["other_5xx"],
        "no_answer": kinds["no_answer"],
        "hangs": len(hangs),
        "crashes": len(crashes),
        "problems": len(problems),
        "health_p50_ms": round(overall.p50_ms, 1),
        "health_p99_ms": round(overall.p99_ms, 1),
        "health_max_ms": round(overall.max_ms, 1),
        "health_failed": overall.failed,
        "health_over_100ms": overall.slow,
        "health_over_100ms_loop_busy": overall.busy,
        "health_over_100ms_cpu_starved": overall.starved,
        "health_p99_ms_without_starved": round(overall.own_p99_ms, 1),
        "health_probes": overall.n,
        "rss_start_mib": round(rss_first / 2**20),
        "rss_max_mib": round(rss_max / 2**20),
        "paris": paris_ok,
        "minutes": round((ended - started) / 60, 1),
    }
    for c in crashes:
        print(f"CRASH: {c}")
    print("totals: " + ", ".join(f"{k}={v}" for k, v in totals.items()))
    print(f"answer to the capital question: {paris_text!r}")
    failed = (gateway_500 or hangs or crashes or overall.p99_ms >= HEALTH_P99_MS
              or rss_max >= GIB or not paris_ok or (args.strict and problems))
    print("RESULT: " + ("FAIL" if failed else "PASS"))
    if args.json:
        args.json.write_text(json.dumps({
            "url": url, "totals": totals, "crashes": crashes,
            "classes": [{"class": n, "requests": len(o), "statuses": dict(Counter(
                str(x.status) for x in o)), "slowest_s": round(max(
                    (x.elapsed_s for x in o), default=0.0), 2),
                "health_p99_ms": round(hs.p99_ms, 1), "health_max_ms": round(hs.max_ms, 1)}
                for n, o, hs, _a, _b in results],
            "problems": [{"class": o.cls, "label": o.label, "problem": o.problem,
                          "status": o.status, "repro": o.repro[:2000]} for o in problems],
        }, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
