"""Cross-worker TTFT: a ~3,000-token prompt computed on worker A, then sent to worker B.

    python bench/cross_worker_ttft.py --json OUT.json [--prompts 5] [--tokens 3000]

One invocation starts every server it compares (real vLLM OpenAI servers, each with its
KV space capped), then for each of several distinct prompts, in the same order each time:

  recompute_s          B without any connector: a cold prefill (the worst case)
  example_connector_s  vLLM's own ExampleConnector on A and B, storage in /dev/shm
  beluga_s             BelugaConnector on A and B, one pool in /dev/shm
  local_hit_s          the same prompt again on Beluga's A: vLLM's own prefix cache (the floor)

TTFT is the time from sending a streaming completion to its first token, measured on the
client. Reported: medians over the prompts, ratios, and the targets of issue 4. Mooncake's
vLLM store connector is tried only if it can start on this machine (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from beluga.settings import Settings  # noqa: E402
from engine.worker import vllm_command, vllm_env  # noqa: E402

WORDS = ("river mountain quiet engine silver market garden letter winter doctor window "
         "signal harbor orange paper castle forest bridge camera pocket rabbit thunder "
         "violin ladder marble planet candle desert island jacket lemon mirror needle "
         "ocean pepper rocket saddle tunnel velvet wagon yellow zebra anchor basket")


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(name: str, settings: Settings, logs: Path) -> Server:
    log = logs / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(vllm_command(settings), stdout=fh, stderr=subprocess.STDOUT,
                                env=vllm_env(settings), start_new_session=True, cwd=ROOT)
    return Server(name, settings.worker_port, proc, log)


def wait_ready(servers: list[Server], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    for s in servers:
        while True:
            try:
                if httpx.get(f"{s.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if s.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{s.name} did not start; see {s.log}")
            time.sleep(2)


def stop(servers: list[Server]) -> None:
    for s in servers:
        if s.proc.poll() is None:
            os.killpg(s.proc.pid, 15)
    for s in servers:
        try:
            s.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(s.proc.pid, 9)


def prompts(model: Path, n: int, tokens: int, seed: int) -> list[list[int]]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = " ".join(" ".join(rng.sample(WORDS.split(), rng.randint(5, 11))).capitalize() + "."
                        for _ in range(tokens // 6))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) < tokens:
            raise RuntimeError("prompt text too short")
        out.append(ids[:tokens])
    return out


def ttft(url: str, model_name: str, ids: list[int], settle_s: float = 2.0) -> float:
    """Seconds to the first streamed token of a greedy completion. Waits `settle_s` first:
    every server here shares 2 cores, and a server that just finished keeps its OpenMP
    threads spinning for a while, which would be charged to whoever runs next."""
    time.sleep(settle_s)
    body = {"model": model_name, "prompt": ids, "max_tokens": 2, "temperature": 0,
            "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    return time.perf_counter() - t0
    raise RuntimeError("stream ended without a token")


def beluga_counters(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("beluga_worker_") and "_created" not in line:
            labelled, value = line.rsplit(" ", 1)
            key = labelled.split("{")[0]
            if 'source="' in labelled:
                key += ":" + labelled.split('source="')[1].split('"')[0]
            out[key] = out.get(key, 0.0) + float(value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--prompts", type=int, default=7, help="distinct prompts (median over)")
    ap.add_argument("--tokens", type=int, default=3000, help="prompt length in tokens")
    ap.add_argument("--kv-gib", type=int, default=1, help="KV space per worker (whole GiB)")
    ap.add_argument("--pool-gib", type=float, default=2.0, help="Beluga pool size (GiB)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    # One prefill pass per prompt everywhere (ExampleConnector saves only a request's first
    # chunk, so with chunked prefill its B would load a short file and crash).
    batch = f"--max-num-batched-tokens {args.tokens + 64}"
    base = Settings(kv_cache_space_gib=args.kv_gib, max_model_len=args.tokens + 64,
                    pool=False, vllm_extra_args=batch)
    logs = Path(tempfile.mkdtemp(prefix="beluga-ttft-"))
    shm = Path(tempfile.mkdtemp(prefix="beluga-ttft-", dir="/dev/shm"))
    example_cfg = json.dumps({
        "kv_connector": "ExampleConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": str(shm / "example")}})

    def worker(**kw: Any) -> Settings:
        return base.model_copy(update={"worker_port": free_port(), **kw})

    pool_path = shm / "beluga.pool"
    configs = {
        "recompute": worker(),
        "example_a": worker(vllm_extra_args=f"{batch} --kv-transfer-config '{example_cfg}'"),
        "example_b": worker(vllm_extra_args=f"{batch} --kv-transfer-config '{example_cfg}'"),
        "beluga_a": worker(pool=True, pool_path=pool_path, pool_size_gib=args.pool_gib,
                           redis_url="redis://127.0.0.1:1/0"),
        "beluga_b": worker(pool=True, pool_path=pool_path, pool_size_gib=args.pool_gib,
                           redis_url="redis://127.0.0.1:1/0"),
    }
    servers: list[Server] = []
    try:
        print(f"starting {len(configs)} vLLM servers (logs in {logs}) ...", flush=True)
        t0 = time.monotonic()
        for name, settings in configs.items():
            servers.append(start(name, settings, logs))
            if name == "beluga_a":  # let A create the pool before B attaches
                wait_ready([servers[-1]])
        wait_ready(servers)
        print(f"ready in {time.monotonic() - t0:.0f} s", flush=True)
        by = {s.name: s for s in servers}
        model_name = base.served_model_name
        work = prompts(base.model_path, args.prompts, args.tokens, args.seed)
        # warm-up (first-request overheads), not reported
        warm = prompts(base.model_path, 1, 256, args.seed + 1)[0]
        for s in servers:
            ttft(s.url, model_name, warm, settle_s=0)
        rows = []
        for i, ids in enumerate(work):
            row: dict[str, float] = {}
            row["recompute_s"] = ttft(by["recompute"].url, model_name, ids)
            ttft(by["example_a"].url, model_name, ids)  # A computes and stores
            row["example_connector_s"] = ttft(by["example_b"].url, model_name, ids)
            row["beluga_a_cold_s"] = ttft(by["beluga_a"].url, model_name, ids)
            before = beluga_counters(by["beluga_b"].url)
            row["beluga_s"] = ttft(by["beluga_b"].url, model_name, ids)
            after = beluga_counters(by["beluga_b"].url)
            row["beluga_pool_tokens"] = (after.get("beluga_worker_prompt_tokens_total:pool", 0)
                                         - before.get("beluga_worker_prompt_tokens_total:pool",
                                                      0))
            # B's own time copying the blocks out of the pool (checksums included)
            row["beluga_copy_s"] = (after.get("beluga_worker_pool_load_seconds_total", 0)
                                    - before.get("beluga_worker_pool_load_seconds_total", 0))
            row["local_hit_s"] = ttft(by["beluga_a"].url, model_name, ids)
            rows.append(row)
            print(f"prompt {i}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()),
                  flush=True)
    finally:
        stop(servers)
        shutil.rmtree(shm, ignore_errors=True)

    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    summary: dict[str, Any] = {
        "prompt_tokens": args.tokens, "prompts": args.prompts, "kv_space_gib": args.kv_gib,
        "pool_gib": args.pool_gib, **{k: round(v, 4) for k, v in med.items()},
        "beluga_vs_recompute": med["beluga_s"] / med["recompute_s"],
        "beluga_vs_local_hit": med["beluga_s"] / med["local_hit_s"],
        "beluga_vs_example": med["beluga_s"] / med["example_connector_s"],
        "mooncake_s": None,
        "mooncake_unavailable": "vLLM's MooncakeStoreConnector needs a CUDA device "
                                "(see bench/README.md)",
    }
    summary["targets"] = {
        "beluga_le_0.1x_recompute": summary["beluga_vs_recompute"] <= 0.1,
        "beluga_le_1.5x_local_hit": summary["beluga_vs_local_hit"] <= 1.5,
        "beluga_below_example": summary["beluga_vs_example"] < 1.0,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
