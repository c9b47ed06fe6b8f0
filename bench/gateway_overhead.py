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
No prompt is sent twice in any workload (`--workloads` picks some). `routed_tokens`: where
the gateway predicted each workload's prompt tokens would come from (local, pool, computed),
for the latency pairs and for the rps run: what the run really exercised.

Layouts (`layout` in the JSON says what each run had):
  single   (default) one stand-in worker whose hints list no keys, and no pool: a new
           prompt is read as far as its first block key. The gateway's best case.
           `--remote-pool`: the workers' pool is not mapped on the gateway's host, so each
           request is keyed whole and the stand-in's real pool lookup endpoint is asked
           (`pool_lookups`: their results, cumulative).
  cluster  --workers stand-ins (separate processes), a real pool mapped on this host that
           holds every latency prompt's full blocks, and a full hint set per worker
           (--hint-keys, default max_hint_keys) listing the keys of all but one in
           workers + 1 prompts; the shared system prompt is in worker 0's set. The rps
           run's prompts are tagged at their end, so their leading blocks are held too.
           The gateway reads each prompt whole and looks it up in both.
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
    hint_blocks_key,
    hint_key,
    hints_key,
    worker_key,
)
from beluga.settings import Settings  # noqa: E402
from bench.provenance import commit  # noqa: E402
from kvpool import KVPool, block_keys  # noqa: E402

FINGERPRINT = bytes.fromhex("ab" * 32)
BLOCK = bytes(256)  # what the pool holds for a block here: only its key is looked up
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
                   seconds: float, tmp: Path, tag_at_end: bool = False
                   ) -> tuple[float, int, int]:
    """wrk (C, one thread per core) posting the bodies with a unique tag each time: at the
    start of the last message (its first block differs: nobody holds any of it), or with
    `tag_at_end` at its end (only its last blocks differ: what the cluster holds of the
    body is found, and the whole prompt is read)."""
    threads = max(1, min(2, os.cpu_count() or 1))
    lines = []
    for b in bodies:
        text = json.dumps(b)
        if tag_at_end:
            cut = text.rindex('"}]')
            lines.append(text[:cut] + " \t" + text[cut:])
        else:
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


def start_redis(procs: list[subprocess.Popen[bytes]]) -> int:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is missing: run `make setup`")
    port = free_port()
    procs.append(subprocess.Popen([server, "--port", str(port), "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL))
    return port


def start_upstream(tmp: Path, procs: list[subprocess.Popen[bytes]],
                   remote_pool: KVPool | None = None) -> str:
    """One stand-in upstream process (uvicorn); with `remote_pool`, it also answers the
    worker's real pool lookup endpoint over that pool. Its URL, once it answers."""
    (tmp / "standin.py").write_text(STAND_IN)
    module = "standin:app"
    if remote_pool is not None:
        (tmp / "standin_lookup.py").write_text(STAND_IN_WITH_LOOKUP % remote_pool.path)
        module = "standin_lookup:app"
    port = free_port()
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "uvicorn", module, "--port", str(port),
         "--log-level", "warning", "--no-access-log"], cwd=tmp,
        env=dict(os.environ, PYTHONPATH=str(ROOT))))
    url = f"http://127.0.0.1:{port}"
    wait_http(url)
    return url


def register(r: redis.Redis, settings: Settings, wid: str, url: str, pid: int,
             block_tokens: int, pool_uuid: str | None, pool_path: str | None,
             hint_keys: list[str]) -> None:
    """A worker record and its hints record (and hint set, when `hint_keys`), as a worker
    publishes them."""
    prefix, now = settings.redis_key_prefix, time.time()
    rec = WorkerRecord.model_validate({
        "schema": 1, "id": wid, "url": url, "model": settings.served_model_name,
        "capacity": 10_000, "pid": pid, "started_at": now, "heartbeat_at": now})
    r.set(worker_key(prefix, wid), rec.to_json(), ex=3600)
    hints = HintsRecord(worker_id=wid, fingerprint=FINGERPRINT.hex(),
                        block_tokens=block_tokens, pool_uuid=pool_uuid, pool_path=pool_path,
                        keys=len(hint_keys), updated_at=now)
    if hint_keys:
        r.sadd(hint_blocks_key(prefix, wid), *hint_keys)
        r.expire(hint_blocks_key(prefix, wid), 3600)
    r.set(hints_key(prefix, wid), hints.to_json(), ex=3600)


def start_stand_in(settings: Settings, tmp: Path, procs: list[subprocess.Popen[bytes]],
                   block_tokens: int, remote_pool: KVPool | None = None) -> tuple[int, str]:
    """A private Redis and the stand-in upstream, registered there as a worker with routing
    hints (no keys) for the default model: (the Redis port, the stand-in's URL). Started
    processes go into `procs`. With `remote_pool`, the hints name that pool at a path that
    does not exist here, so the gateway cannot attach it and asks the stand-in, which
    answers with the worker's real lookup endpoint."""
    redis_port = start_redis(procs)
    direct = start_upstream(tmp, procs, remote_pool)
    register(redis.Redis(port=redis_port), settings, "standin", direct, procs[-1].pid,
             block_tokens, None if remote_pool is None else str(remote_pool.uuid),
             None if remote_pool is None else "/nowhere/on/this/host", [])
    return redis_port, direct


def start_cluster(settings: Settings, tmp: Path, procs: list[subprocess.Popen[bytes]],
                  block_tokens: int, pool: KVPool, hint_sets: list[list[str]]
                  ) -> tuple[int, list[str]]:
    """A private Redis and one stand-in per hint set, each registered as a worker sharing
    `pool` (mapped on this host, so the gateway attaches it) with that set as the keys its
    cache holds: (the Redis port, the stand-ins' URLs)."""
    redis_port = start_redis(procs)
    r = redis.Redis(port=redis_port)
    urls = []
    for i, keys in enumerate(hint_sets):
        urls.append(start_upstream(tmp, procs))
        register(r, settings, f"standin-{i}", urls[-1], procs[-1].pid, block_tokens,
                 str(pool.uuid), pool.path, keys)
    return redis_port, urls


def cluster_state(settings: Settings, bodies: dict[str, list[dict[str, Any]]],
                  shared: set[str], workers: int, block_tokens: int, pool: KVPool,
                  hint_keys: int, seed: int) -> tuple[list[list[str]], dict[str, Any]]:
    """What a running cluster would hold for these requests: every prompt's full blocks in
    the pool (as the workers that answered them stored them) and, for all but one in
    `workers + 1` prompts, in one worker's cache too (round robin; a scenario in `shared`
    has its common system prompt in worker 0's cache). Each worker's hint set is padded
    with other keys to `hint_keys` members (a worker's set is usually full). Returns the
    hint sets and what was put where."""
    from gateway.tokenize import PromptTokenizer

    tok = PromptTokenizer({settings.served_model_name: settings.model_path})
    # per worker, its hint keys in the order stored (a worker publishes its most recent
    # `hint_keys` ones, as engine/local_cache.py does with max_hint_keys)
    sets: list[dict[str, None]] = [{} for _ in range(workers)]
    blocks = 0
    held = {"worker_and_pool": 0, "pool_only": 0}
    for scenario, group in bodies.items():
        common: list[bytes] | None = None
        for j, body in enumerate(group):
            ids = tok.tokens(settings.served_model_name, "chat", body)
            if ids is None:
                raise RuntimeError(f"a {scenario} body could not be tokenized")
            keys = block_keys(ids, block_tokens, FINGERPRINT)
            put = pool.put(keys, [BLOCK] * len(keys))
            blocks += put.stored
            if put.full or put.stored + put.duplicate != len(keys):
                raise RuntimeError("the pool is too small for the prompts' blocks")
            owner = 0 if scenario in shared else j % (workers + 1)
            if scenario in shared:  # the worker holds the system prompt's blocks
                if common is None:
                    common = keys
                n = 0
                while n < min(len(keys), len(common)) and keys[n] == common[n]:
                    n += 1
                common = keys = keys[:n]
            if owner == workers:
                held["pool_only"] += 1
                continue
            held["worker_and_pool"] += 1
            for k in keys:
                h = hint_key(k)
                sets[owner].pop(h, None)
                sets[owner][h] = None
    rng = random.Random(seed)
    out: list[list[str]] = []
    for s in sets:
        keep = list(s)[-hint_keys:]  # the most recently stored
        padding: set[str] = set()
        while len(keep) + len(padding) < hint_keys:
            padding.add(rng.randbytes(16).hex())
        out.append(keep + sorted(padding - set(keep)))
    return out, {"blocks_put": blocks, "prompts": held,
                 "hint_keys_per_worker": [len(s) for s in out],
                 "keys_held_beyond_the_hint_sets": [max(0, len(s) - hint_keys) for s in sets]}


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
    # The tokenizer loads beside serving; until it has, prompts are routed unkeyed
    # (beluga_gateway_prompts_unkeyed_total{reason="tokenizer_loading"}): not what is measured.
    deadline = time.monotonic() + 300
    while not all(httpx.get(f"{url}/health", timeout=5).json().get("tokenizers", {}).values()
                  or [False]):
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway's tokenizer did not load within 300 s")
        time.sleep(0.2)
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


def sources(gw: str) -> dict[str, int]:
    """The gateway's beluga_gateway_prompt_tokens_total by source (local, pool, computed):
    where it predicted each routed prompt's tokens would come from; and `unkeyed`, the
    prompts it routed without keying them (beluga_gateway_prompts_unkeyed_total)."""
    out = {"unkeyed": 0}
    for line in httpx.get(f"{gw}/metrics", timeout=10).text.splitlines():
        if line.startswith("beluga_gateway_prompt_tokens_total{"):
            out[line.split('source="')[1].split('"')[0]] = int(float(line.split()[-1]))
        elif line.startswith("beluga_gateway_prompts_unkeyed_total{"):
            out["unkeyed"] += int(float(line.split()[-1]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--requests", type=int, default=400, help="latency pairs")
    ap.add_argument("--tokens", type=int, default=1000, help="prompt tokens")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--policy", default="pool_aware")
    ap.add_argument("--seed", type=int, default=5, help="of the padding hint keys")
    ap.add_argument("--block-tokens", type=int, default=CPU_BLOCK_SIZE,
                    help="the stand-in worker's block size (default: a CPU worker's)")
    ap.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                    help="load generator of the rps run (auto: wrk when installed)")
    ap.add_argument("--workloads", nargs="+", default=["unique", "shared", "stream"],
                    choices=["unique", "shared", "stream"])
    ap.add_argument("--remote-pool", action="store_true",
                    help="(single) the workers' pool is not mapped on the gateway's host: "
                    "every request also asks the stand-in's pool lookup endpoint")
    ap.add_argument("--layout", choices=("single", "cluster"), default="single",
                    help="single: one stand-in worker whose hints list no keys, and no pool "
                    "(or --remote-pool): the gateway's best case. cluster: --workers "
                    "stand-ins, a real pool mapped on this host holding every latency "
                    "prompt's blocks, and hint sets of --hint-keys keys each, most latency "
                    "prompts' among them")
    ap.add_argument("--workers", type=int, default=3, help="(cluster) stand-in workers")
    ap.add_argument("--hint-keys", type=int, default=0,
                    help="(cluster) keys in each worker's hint set (its prompts' keys padded "
                    "with others; default: max_hint_keys, a full set)")
    args = ap.parse_args()
    args.commit = commit()  # at the start: what the run ran
    if args.layout == "cluster" and args.remote_pool:
        ap.error("--remote-pool is for the single layout")

    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"
    settings = Settings()
    tmp = Path(tempfile.mkdtemp(prefix="beluga-gwbench-"))
    procs: list[subprocess.Popen[bytes]] = []
    model = settings.served_model_name
    bodies = {scenario: (bodies_for(scenario, 20, args.tokens, model, 100 + k),
                         bodies_for(scenario, args.requests, args.tokens, model, 200 + k),
                         bodies_for(scenario, 500 if client == "wrk" else int(args.seconds * 800),
                                    args.tokens, model, 300 + k))
              for k, scenario in enumerate(args.workloads)}
    pool: KVPool | None = None
    layout: dict[str, Any] = {"name": args.layout}
    if args.layout == "cluster":
        pool_file = Path(f"/dev/shm/beluga-gwbench-{os.getpid()}.pool")
        # every latency prompt's blocks, one 256-byte stand-in each (only keys are looked up)
        pool = KVPool.create(pool_file, slot_size=4096, slot_count=1 << 17,
                             fingerprint=FINGERPRINT)
    elif args.remote_pool:
        pool_file = Path(f"/dev/shm/beluga-gwbench-{os.getpid()}.elsewhere")
        pool = KVPool.create(pool_file, slot_size=4096, slot_count=64, fingerprint=FINGERPRINT)
    try:
        if pool is not None and args.layout == "cluster":
            hint_sets, held = cluster_state(
                settings, {s: warm + pairs + load for s, (warm, pairs, load) in bodies.items()},
                {"shared"}, args.workers, args.block_tokens, pool,
                args.hint_keys or settings.max_hint_keys, args.seed)
            redis_port, urls = start_cluster(settings, tmp, procs, args.block_tokens, pool,
                                             hint_sets)
            direct = urls[0]  # the stand-ins are identical: the direct path is any of them
            layout.update(workers=args.workers, **held, pool=(
                "mapped on the gateway's host, holding every prompt's full blocks (the rps "
                "run's are tagged at their end: all but their last blocks are held)"))
        else:
            redis_port, direct = start_stand_in(settings, tmp, procs, args.block_tokens, pool)
            layout.update(workers=1, hint_keys_per_worker=[0], pool=(
                "on another host: asked of the stand-in's real lookup endpoint"
                if args.remote_pool else "none (the hints name no pool)"))
        gw, gateway = start_gateway(procs, redis_port, args.policy, ROOT)
        from gateway.tokenize import PromptTokenizer
        tok = PromptTokenizer({model: settings.model_path})
        results: dict[str, dict[str, Any]] = {}
        for scenario, (warm, pairs, load) in bodies.items():
            before = sources(gw)
            n_tokens = statistics.median(
                len(tok.tokens(settings.served_model_name, "chat", b) or []) for b in pairs[:20])
            asyncio.run(latencies(gw, direct, warm))  # tokenizer load, connections
            added = sorted(asyncio.run(latencies(gw, direct, pairs)))
            mid = sources(gw)
            cpu0 = gateway.cpu_times()
            if client == "wrk":
                rps, errors, total = throughput_wrk(gw, load, args.concurrency, args.seconds,
                                                    tmp, tag_at_end=args.layout == "cluster")
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
            # where the gateway found the prompts' tokens (by source: local, pool, computed),
            # for the latency pairs (with their warm-up) and for the rps run
            after = sources(gw)
            results[scenario]["routed_tokens"] = {
                "latency": {k: mid[k] - before.get(k, 0) for k in mid},
                "rps": {k: after[k] - mid.get(k, 0) for k in after}}
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
        "commit": args.commit, "policy": args.policy, "block_tokens": args.block_tokens,
        "layout": layout,
        "remote_pool": args.remote_pool,
        "concurrency": args.concurrency, "cpus": os.cpu_count(),
        "load_generator": client, "scenarios": results,
    }
    u = results.get("unique")
    # The headline: 1,000-token prompts new to the gateway, non-streaming (single layout:
    # new to everyone; cluster layout: mostly held by the workers or the pool, read whole)
    if u is not None:
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
