"""Gateway latency, several code versions side by side: the A/B companion of gateway_overhead.

    python bench/gateway_ab.py --json OUT.json CHECKOUT [CHECKOUT ...]

Each CHECKOUT is a directory holding a version of this repository (`git worktree add DIR
COMMIT`, with this checkout's native module, `.venv` and `.beluga` linked or copied in);
`.` is this one. One stand-in upstream and one Redis as in gateway_overhead.py, one gateway
process per checkout, and every request body is sent directly and through each gateway in
turn, the order rotating per body: a slow minute of a shared machine hits every version
alike, which separate runs minutes apart cannot promise (there the same code moved by
0.5 ms between runs). Per checkout and workload: the added latency (gateway minus direct,
same body) p25/p50/p90 and the gateway's CPU time per request over the run. Requests go
one at a time, so each finds its gateway idle, as gateway_overhead's latency pairs do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gateway_overhead import (  # noqa: E402
    bodies_for,
    start_gateway,
    start_stand_in,
    stop,
    timed,
)

from beluga.settings import Settings  # noqa: E402
from engine.worker import CPU_BLOCK_SIZE  # noqa: E402


async def rotate(urls: list[str], bodies: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each body to every url, one request at a time, the order rotating per body."""
    times: dict[str, list[float]] = {u: [] for u in urls}
    async with httpx.AsyncClient(timeout=30) as client:
        for i, body in enumerate(bodies):
            k = i % len(urls)
            for url in urls[k:] + urls[:k]:
                times[url].append(await timed(client, url, body))
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkouts", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--requests", type=int, default=1500, help="bodies per workload")
    ap.add_argument("--tokens", type=int, default=1000, help="prompt tokens")
    ap.add_argument("--policy", default="pool_aware")
    ap.add_argument("--workloads", nargs="+", default=["unique", "shared"],
                    choices=["unique", "shared", "stream"],
                    help="as gateway_overhead.py's (`stream`: the added time to the first "
                         "event)")
    args = ap.parse_args()

    settings = Settings()
    model = settings.served_model_name
    tmp = Path(tempfile.mkdtemp(prefix="beluga-gwab-"))
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {}
    try:
        redis_port, direct = start_stand_in(settings, tmp, procs, CPU_BLOCK_SIZE)
        gateways = [(str(c), *start_gateway(procs, redis_port, args.policy, c))
                    for c in args.checkouts]
        urls = [direct] + [url for _, url, _ in gateways]
        for k, workload in enumerate(args.workloads):
            asyncio.run(rotate(urls, bodies_for(workload, 50, args.tokens, model, 100 + k)))
            bodies = bodies_for(workload, args.requests, args.tokens, model, 200 + k)
            cpu0 = [p.cpu_times() for _, _, p in gateways]
            times = asyncio.run(rotate(urls, bodies))
            cpu1 = [p.cpu_times() for _, _, p in gateways]
            rows = {}
            for (name, url, _), c0, c1 in zip(gateways, cpu0, cpu1, strict=True):
                added = sorted((a - b) * 1000 for a, b in zip(times[url], times[direct],
                                                             strict=True))
                rows[name] = {
                    "added_p25_ms": round(added[len(added) // 4], 3),
                    "added_p50_ms": round(statistics.median(added), 3),
                    "added_p90_ms": round(added[int(0.9 * (len(added) - 1))], 3),
                    "cpu_ms_per_request": round(
                        1000 * (c1.user + c1.system - c0.user - c0.system) / len(bodies), 3)}
                print(workload, name, json.dumps(rows[name]), flush=True)
            results[workload] = rows
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {"policy": args.policy, "requests": args.requests, "cpus": os.cpu_count(),
               "checkouts": [str(c) for c in args.checkouts], "workloads": results}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
