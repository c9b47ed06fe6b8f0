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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gateway_overhead import STAND_IN, bodies_for, free_port, timed, wait_http  # noqa: E402

from beluga.registry import HintsRecord, WorkerRecord, hints_key, worker_key  # noqa: E402
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
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("redis-server is missing: run `make setup`")
        redis_port, up_port = free_port(), free_port()
        procs.append(subprocess.Popen([server, "--port", str(redis_port), "--save", "",
                                       "--appendonly", "no"], stdout=subprocess.DEVNULL))
        (tmp / "standin.py").write_text(STAND_IN)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "standin:app", "--port", str(up_port),
             "--log-level", "warning", "--no-access-log"], cwd=tmp))
        direct = f"http://127.0.0.1:{up_port}"
        wait_http(direct)
        r = redis.Redis(port=redis_port)
        now = time.time()
        rec = WorkerRecord.model_validate({
            "schema": 1, "id": "standin", "url": direct, "model": model,
            "capacity": 10_000, "pid": procs[-1].pid, "started_at": now, "heartbeat_at": now})
        r.set(worker_key(settings.redis_key_prefix, "standin"), rec.to_json(), ex=3600)
        hints = HintsRecord(worker_id="standin", fingerprint="ab" * 32,
                            block_tokens=CPU_BLOCK_SIZE, pool_uuid=None, keys=0,
                            updated_at=now)
        r.set(hints_key(settings.redis_key_prefix, "standin"), hints.to_json(), ex=3600)
        gateways: list[tuple[str, str, psutil.Process]] = []
        for checkout in args.checkouts:
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("BELUGA_")}
            env.update({"BELUGA_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                        "BELUGA_GATEWAY_HOST": "127.0.0.1", "BELUGA_GATEWAY_PORT": str(port),
                        "BELUGA_ROUTING_POLICY": args.policy})
            # `-m` from the checkout: its own packages come first on the path.
            procs.append(subprocess.Popen([sys.executable, "-m", "beluga.cli", "gateway"],
                                          env=env, cwd=checkout.resolve(),
                                          stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            gateways.append((str(checkout), f"http://127.0.0.1:{port}",
                             psutil.Process(procs[-1].pid)))
        for _, url, _ in gateways:
            wait_http(f"{url}/health")
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
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
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
