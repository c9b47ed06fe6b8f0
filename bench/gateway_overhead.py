"""Gateway overhead: the latency one gateway adds, and the requests per second it sustains.

    python bench/gateway_overhead.py --json OUT.json

A fast stand-in upstream (a raw ASGI app under uvicorn answering every completion with a
fixed body) is registered in a private Redis as a worker, with routing hints for the default
model, so the gateway does all its real work: parse, tokenize (1,000-token prompts, the
model's chat template), block keys, hint lookups, policy, proxy. Measured in one run, for
each workload: `unique` (every request a new 1,000-token prompt: no cache can help; the
headline), `shared` (a 2,000-token system prompt shared by all requests + a new 50-token
question) and `stream` (`unique`, streamed: the stand-in sends an event per token, usage
when asked, then [DONE]):

  added_p50_ms / added_p99_ms  gateway latency minus direct latency, same client, requests
                               alternating between the two paths, non-streaming
  rps                          non-streaming requests per second through one gateway
                               process under `--concurrency` concurrent connections, driven
                               by wrk (C) when installed, else by a Python client
  cpu_ms_per_request           the gateway process's CPU time (user + system, all threads)
                               per request of the rps run: what a request costs it, much
                               steadier than the two above on a shared machine
  added_ttft_p50_ms / _p99_ms  (`stream`) the same for the time to the first event; each
                               stream must end with [DONE]
No prompt is sent twice in any workload (`--workloads` picks some). `--remote-pool`: the
workers' pool is not mapped on the gateway's host, so each request is keyed whole and the
stand-in's real pool lookup endpoint is asked (`pool_lookups`: their results, cumulative).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
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

from beluga.registry import (  # noqa: E402
    HintsRecord,
    WorkerRecord,
    hints_key,
    worker_key,
)
from beluga.settings import Settings  # noqa: E402
from kvpool import KVPool  # noqa: E402

FINGERPRINT = bytes.fromhex("ab" * 32)
from engine.worker import CPU_BLOCK_SIZE  # noqa: E402

STAND_IN = '''
import json
BODY = json.dumps({"id": "x", "object": "chat.completion", "model": "m", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1000, "completion_tokens": 1, "total_tokens": 1001}}).encode()
CHUNK = {"id": "x", "object": "chat.completion.chunk", "model": "m"}
EVENTS = [dict(CHUNK, choices=[{"index": 0, "delta": {"role": "assistant", "content": w},
                                "finish_reason": None}]) for w in ("o", "k", "!")]
EVENTS.append(dict(CHUNK, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
USAGE = dict(CHUNK, choices=[], usage={"prompt_tokens": 1000, "completion_tokens": 3,
                                       "total_tokens": 1003})


def sse(event):
    return b"data: " + json.dumps(event).encode() + b"\\n\\n"


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    try:  # parsed only for the streaming workload: the plain answer stays as cheap as before
        request = json.loads(body) if b'"stream"' in body else {}
    except ValueError:
        request = {}
    if not request.get("stream"):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": BODY})
        return
    # a stream, as vLLM sends one: an event per token, usage when asked, then [DONE]
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    events = list(EVENTS)
    if (request.get("stream_options") or {}).get("include_usage"):
        events.append(USAGE)
    for event in events:
        await send({"type": "http.response.body", "body": sse(event), "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\\n\\n"})
'''
WORDS = ("river mountain quiet engine silver market garden letter winter doctor window "
         "signal harbor orange paper castle forest bridge camera pocket rabbit thunder")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up") from None
            time.sleep(0.2)


def prompt_text(rng: random.Random, tokens: int) -> str:
    words = WORDS.split()
    return " ".join(rng.choice(words) for _ in range(int(tokens * 0.95)))


def bodies_for(scenario: str, n: int, tokens: int, model: str, seed: int) -> list[dict[str, Any]]:
    """`unique`: a new prompt each; `shared`: one system prompt + a new question each;
    `stream`: `unique`, streamed."""
    rng = random.Random(seed)
    system = prompt_text(random.Random(1), 2000)
    out = []
    for i in range(n):
        if scenario == "shared":
            messages = [{"role": "system", "content": system},
                        {"role": "user", "content": f"{i} " + prompt_text(rng, 50)}]
        else:
            messages = [{"role": "user", "content": f"{i} " + prompt_text(rng, tokens)}]
        body: dict[str, Any] = {"model": model, "max_tokens": 1, "messages": messages}
        if scenario == "stream":
            body.update(stream=True, max_tokens=3)
        out.append(body)
    return out


async def timed(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> float:
    """Seconds to the answer, or for a stream to its first event (its TTFT; the rest of
    the stream is read, and must end with [DONE])."""
    t0 = time.perf_counter()
    if not body.get("stream"):
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        elapsed = time.perf_counter() - t0
        r.raise_for_status()
        return elapsed
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        chunks = r.aiter_raw()
        first = await anext(chunks)
        elapsed = time.perf_counter() - t0
        rest = b"".join([chunk async for chunk in chunks])
    if not (first + rest).rstrip().endswith(b"data: [DONE]"):
        raise RuntimeError(f"a stream from {url} did not end with [DONE]")
    return elapsed


async def latencies(gw: str, direct: str, bodies: list[dict[str, Any]]) -> list[float]:
    added = []
    async with httpx.AsyncClient(timeout=30) as client:
        for body in bodies:
            pair = [await timed(client, url, body) for url in (direct, gw)]
            added.append((pair[1] - pair[0]) * 1000)
    return added


# Each line of the bodies file is a JSON body cut where its last message's content starts
# (pre TAB post); every request puts "<thread>-<n> " there, so no prompt is sent twice
# however many requests a run makes (the first block differs, so every block key does).
WRK_SCRIPT = """
local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end
function init(args)
  pre, post = {}, {}
  for line in io.lines(args[1]) do
    local tab = string.find(line, "\t", 1, true)
    pre[#pre + 1] = string.sub(line, 1, tab - 1)
    post[#post + 1] = string.sub(line, tab + 1)
  end
  n = 0
end
function request()
  n = n + 1
  local j = (n % #pre) + 1
  return wrk.format("POST", "/v1/chat/completions", {["Content-Type"] = "application/json"},
                    pre[j] .. "w" .. tid .. "-" .. n .. " " .. post[j])
end
"""


def throughput_wrk(gw: str, bodies: list[dict[str, Any]], concurrency: int,
                   seconds: float, tmp: Path) -> tuple[float, int, int]:
    """wrk (C, one thread per core) posting the bodies with a unique tag each time."""
    threads = max(1, min(2, os.cpu_count() or 1))
    lines = []
    for b in bodies:
        text = json.dumps(b)
        cut = text.rindex('"content": "') + len('"content": "')
        lines.append(text[:cut] + "\t" + text[cut:])
    (tmp / "bodies.tsv").write_text("\n".join(lines) + "\n")
    (tmp / "post.lua").write_text(WRK_SCRIPT)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{int(seconds)}s", "--timeout", "30s",
         "-s", str(tmp / "post.lua"), gw, "--", str(tmp / "bodies.tsv")],
        capture_output=True, text=True, check=True).stdout
    print(out, file=sys.stderr, flush=True)
    if "Socket errors:" in out:
        raise SystemExit(f"wrk saw socket errors; the run is not valid:\n{out}")
    rps = float(out.split("Requests/sec:")[1].split()[0])
    total = int(out.split(" requests in ")[0].split()[-1])
    errors = 0
    if "Non-2xx or 3xx responses:" in out:
        errors = int(out.split("Non-2xx or 3xx responses:")[1].split()[0])
    return rps - errors / seconds, errors, total


async def throughput(gw: str, bodies: list[dict[str, Any]], concurrency: int,
                     seconds: float) -> tuple[float, int, int]:
    done = errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        async def one(i: int) -> None:
            nonlocal done, errors
            k = i
            while time.perf_counter() < stop:
                r = await client.post(f"{gw}/v1/chat/completions", json=bodies[k % len(bodies)])
                k += concurrency
                if r.status_code == 200:
                    done += 1
                else:
                    errors += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(concurrency)))
        return done / (time.perf_counter() - t0), errors, done + errors


STAND_IN_WITH_LOOKUP = '''
from beluga.settings import Settings
from engine.pool_lookup_endpoint import PoolLookupMiddleware
from standin import app as plain

app = PoolLookupMiddleware(plain, Settings(pool_path=%r))
'''


def start_stand_in(settings: Settings, tmp: Path, procs: list[subprocess.Popen[bytes]],
                   block_tokens: int, remote_pool: KVPool | None = None) -> tuple[int, str]:
    """A private Redis and the stand-in upstream, registered there as a worker with routing
    hints for the default model: (the Redis port, the stand-in's URL). Started processes
    go into `procs`. With `remote_pool`, the hints name that pool at a path that does not
    exist here, so the gateway cannot attach it and asks the stand-in, which answers with
    the worker's real lookup endpoint."""
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is missing: run `make setup`")
    redis_port, up_port = free_port(), free_port()
    procs.append(subprocess.Popen([server, "--port", str(redis_port), "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL))
    (tmp / "standin.py").write_text(STAND_IN)
    module = "standin:app"
    if remote_pool is not None:
        (tmp / "standin_lookup.py").write_text(STAND_IN_WITH_LOOKUP % remote_pool.path)
        module = "standin_lookup:app"
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "uvicorn", module, "--port", str(up_port),
         "--log-level", "warning", "--no-access-log"], cwd=tmp,
        env=dict(os.environ, PYTHONPATH=str(ROOT))))
    direct = f"http://127.0.0.1:{up_port}"
    wait_http(direct)
    r = redis.Redis(port=redis_port)
    prefix = settings.redis_key_prefix
    now = time.time()
    rec = WorkerRecord.model_validate({
        "schema": 1, "id": "standin", "url": direct, "model": settings.served_model_name,
        "capacity": 10_000, "pid": procs[-1].pid, "started_at": now, "heartbeat_at": now})
    r.set(worker_key(prefix, "standin"), rec.to_json(), ex=3600)
    hints = HintsRecord(worker_id="standin", fingerprint=FINGERPRINT.hex(),
                        block_tokens=block_tokens,
                        pool_uuid=None if remote_pool is None else str(remote_pool.uuid),
                        pool_path=None if remote_pool is None else "/nowhere/on/this/host",
                        keys=0, updated_at=now)
    r.set(hints_key(prefix, "standin"), hints.to_json(), ex=3600)
    return redis_port, direct


def start_gateway(procs: list[subprocess.Popen[bytes]], redis_port: int, policy: str,
                  checkout: Path) -> tuple[str, psutil.Process]:
    """One `beluga gateway` process of `checkout` (run with `-m` from there, so its own
    packages come first) on that Redis: its URL, once it answers, and its process."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BELUGA_")}
    env.update({"BELUGA_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "BELUGA_GATEWAY_HOST": "127.0.0.1", "BELUGA_GATEWAY_PORT": str(port),
                "BELUGA_ROUTING_POLICY": policy})
    procs.append(subprocess.Popen([sys.executable, "-m", "beluga_cli", "gateway"], env=env,
                                  cwd=checkout.resolve(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL))
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health")
    return url, psutil.Process(procs[-1].pid)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM in reverse start order, SIGKILL after 10 s."""
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--requests", type=int, default=400, help="latency pairs")
    ap.add_argument("--tokens", type=int, default=1000, help="prompt tokens")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--policy", default="pool_aware")
    ap.add_argument("--block-tokens", type=int, default=CPU_BLOCK_SIZE,
                    help="the stand-in worker's block size (default: a CPU worker's)")
    ap.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                    help="load generator of the rps run (auto: wrk when installed)")
    ap.add_argument("--workloads", nargs="+", default=["unique", "shared", "stream"],
                    choices=["unique", "shared", "stream"])
    ap.add_argument("--remote-pool", action="store_true",
                    help="the workers' pool is not mapped on the gateway's host: every "
                    "request also asks the stand-in's pool lookup endpoint")
    args = ap.parse_args()

    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"
    settings = Settings()
    tmp = Path(tempfile.mkdtemp(prefix="beluga-gwbench-"))
    procs: list[subprocess.Popen[bytes]] = []
    pool_file = Path(f"/dev/shm/beluga-gwbench-{os.getpid()}.elsewhere")
    pool = (KVPool.create(pool_file, slot_size=4096, slot_count=64, fingerprint=FINGERPRINT)
            if args.remote_pool else None)
    try:
        redis_port, direct = start_stand_in(settings, tmp, procs, args.block_tokens, pool)
        gw, gateway = start_gateway(procs, redis_port, args.policy, ROOT)
        from gateway.tokenize import PromptTokenizer
        tok = PromptTokenizer({settings.served_model_name: settings.model_path})
        results: dict[str, dict[str, Any]] = {}
        for k, scenario in enumerate(args.workloads):
            warm = bodies_for(scenario, 20, args.tokens, settings.served_model_name, 100 + k)
            pairs = bodies_for(scenario, args.requests, args.tokens, settings.served_model_name,
                               200 + k)
            load = bodies_for(scenario, 500 if client == "wrk" else int(args.seconds * 800),
                              args.tokens, settings.served_model_name, 300 + k)
            n_tokens = statistics.median(
                len(tok.tokens(settings.served_model_name, "chat", b) or []) for b in pairs[:20])
            asyncio.run(latencies(gw, direct, warm))  # tokenizer load, connections
            added = sorted(asyncio.run(latencies(gw, direct, pairs)))
            cpu0 = gateway.cpu_times()
            if client == "wrk":
                rps, errors, total = throughput_wrk(gw, load, args.concurrency, args.seconds,
                                                    tmp)
            else:
                rps, errors, total = asyncio.run(throughput(gw, load, args.concurrency,
                                                            args.seconds))
            cpu1 = gateway.cpu_times()
            cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
            what = "added_ttft" if scenario == "stream" else "added"  # a stream: its TTFT
            results[scenario] = {
                "prompt_tokens": n_tokens, "pairs": len(added),
                f"{what}_p50_ms": round(statistics.median(added), 3),
                f"{what}_p99_ms": round(added[int(0.99 * (len(added) - 1))], 3),
                "rps": round(rps, 1), "errors": errors,
                "cpu_ms_per_request": round(1000 * cpu_s / max(1, total), 3)}
            if args.remote_pool:  # every lookup so far, by result (cumulative)
                text = httpx.get(f"{gw}/metrics", timeout=10).text
                results[scenario]["pool_lookups"] = {
                    line.split('"')[1]: int(float(line.split()[-1]))
                    for line in text.splitlines()
                    if line.startswith("beluga_gateway_pool_lookups_total{")}
            print(scenario, json.dumps(results[scenario]), flush=True)
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)
        if pool is not None:
            pool.close()
            pool_file.unlink(missing_ok=True)
    summary: dict[str, Any] = {
        "policy": args.policy, "block_tokens": args.block_tokens,
        "remote_pool": args.remote_pool,
        "concurrency": args.concurrency, "cpus": os.cpu_count(),
        "load_generator": client, "scenarios": results,
    }
    u = results.get("unique")
    if u is not None:  # the headline: new 1,000-token prompts, non-streaming
        summary.update(added_p50_ms=u["added_p50_ms"], added_p99_ms=u["added_p99_ms"],
                       rps=u["rps"], cpu_ms_per_request=u["cpu_ms_per_request"])
        summary["targets"] = {"added_p50_le_1ms": u["added_p50_ms"] <= 1.0,
                              "rps_ge_1000": u["rps"] >= 1000}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
